//! The web console over real HTTPS with curl as the browser (cookie jar, forms): first-run
//! setup, login and lockout, sessions, CSRF on every state change, roles enforced by the
//! server, the security headers on every response, and the key flow against the API.
//! (`tests/e2e/console.spec.mjs` drives the same pages in headless Chromium.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use appliance_tests::*;

/// A browser: a cookie jar and the last page's CSRF token.
struct Browser {
    jar: PathBuf,
    base: String,
    cert: PathBuf,
    csrf: String,
}

struct Page {
    code: u16,
    headers: HashMap<String, Vec<String>>,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
            .unwrap_or("")
    }
}

impl Browser {
    fn new(s: &Server, name: &str, port: u16) -> Browser {
        Browser {
            jar: s.dir.join(format!("jar-{name}")),
            base: format!("https://127.0.0.1:{port}"),
            cert: s.cert(),
            csrf: String::new(),
        }
    }

    fn run(&mut self, args: &[&str]) -> Page {
        let head = self.jar.with_extension("head");
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "30", "--cacert"])
            .arg(&self.cert)
            .arg("-c")
            .arg(&self.jar)
            .arg("-b")
            .arg(&self.jar)
            .arg("-D")
            .arg(&head)
            .args(args)
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "curl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw = std::fs::read_to_string(&head).unwrap();
        let mut lines = raw.lines();
        let code = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for l in lines {
            if let Some((k, v)) = l.split_once(':') {
                headers
                    .entry(k.trim().to_ascii_lowercase())
                    .or_default()
                    .push(v.trim().to_string());
            }
        }
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(t) = body
            .split("name=\"csrf\" value=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        {
            self.csrf = t.to_string();
        }
        Page {
            code,
            headers,
            body,
        }
    }

    fn get(&mut self, path: &str) -> Page {
        let url = format!("{}{path}", self.base);
        self.run(&[&url])
    }

    /// A form post with the current CSRF token (unless `fields` brings its own).
    fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let mut args: Vec<String> = vec![];
        if !fields.iter().any(|(k, _)| *k == "csrf") {
            args.push("--data-urlencode".into());
            args.push(format!("csrf={}", self.csrf));
        }
        for (k, v) in fields {
            args.push("--data-urlencode".into());
            args.push(format!("{k}={v}"));
        }
        args.push(format!("{}{path}", self.base));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.run(&refs)
    }

    fn login(&mut self, user: &str, password: &str) -> Page {
        self.get("/login");
        self.post("/login", &[("user", user), ("password", password)])
    }
}

const ADMIN_PW: &str = "tulip-gravel-41-orbit";

/// The HTTP status of `GET /v1/models` with `key`.
fn api_status(s: &Server, key: &str) -> String {
    s.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: Bearer {key}"),
        &s.url("/v1/models"),
    ])
    .0
}

fn console_port(s: &Server) -> u16 {
    s.banner
        .iter()
        .find_map(|l| l.strip_prefix("appliance: console https://127.0.0.1:"))
        .and_then(|r| r.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no console line in {:?}", s.banner))
}

fn setup_token(s: &Server) -> String {
    s.banner
        .iter()
        .find_map(|l| l.split("setup?token=").nth(1))
        .unwrap_or_else(|| panic!("no setup link in {:?}", s.banner))
        .to_string()
}

fn assert_secure_headers(p: &Page, what: &str) {
    let csp = p.header("content-security-policy");
    assert!(csp.contains("default-src 'self'"), "{what}: CSP {csp:?}");
    assert!(
        csp.contains("frame-ancestors 'none'"),
        "{what}: CSP {csp:?}"
    );
    assert!(!csp.contains("unsafe-inline"), "{what}: CSP {csp:?}");
    assert!(
        p.header("strict-transport-security")
            .starts_with("max-age="),
        "{what}"
    );
    assert_eq!(p.header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(p.header("referrer-policy"), "same-origin", "{what}");
}

/// The first admin, through the one-time setup link.
fn set_up(s: &Server, port: u16) -> Browser {
    let mut b = Browser::new(s, "admin", port);
    let token = setup_token(s);
    let p = b.get(&format!("/setup?token={token}"));
    assert_eq!(p.code, 200, "{}", p.body);
    let p = b.post(
        "/setup",
        &[
            ("token", &token),
            ("user", "alice"),
            ("password", ADMIN_PW),
            ("confirm", ADMIN_PW),
        ],
    );
    assert_eq!(p.code, 303, "{}", p.body);
    b
}

#[test]
fn setup_login_keys_audit_and_logout() {
    let s = Server::start("console", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let token = setup_token(&s);

    // No session: the pages send you to the login; nothing else is shown.
    let mut anon = Browser::new(&s, "anon", port);
    let p = anon.get("/keys");
    assert_eq!((p.code, p.header("location")), (303, "/login"));
    assert_secure_headers(&p, "redirect");
    // A wrong token, and a weak password: refused, and the link still works after.
    assert_eq!(
        anon.get("/setup?token=00112233445566778899aabbccddeeff")
            .code,
        404
    );
    anon.get(&format!("/setup?token={token}"));
    let p = anon.post(
        "/setup",
        &[
            ("token", &token),
            ("user", "mallory"),
            ("password", "password1234"),
            ("confirm", "password1234"),
        ],
    );
    assert_eq!(p.code, 400);
    assert!(p.body.contains("common"), "{}", p.body);

    let mut admin = set_up(&s, port);
    // The link worked once.
    let p = anon.get(&format!("/setup?token={token}"));
    assert_eq!(p.code, 404);
    let p = admin.get("/");
    assert_eq!(p.code, 200);
    assert!(
        p.body.contains("Hardware") && p.body.contains("Workers"),
        "{}",
        p.body
    );
    assert!(p.body.contains("smollm2"));

    // A tenant and a key; the secret is shown once.
    let p = admin.get("/keys");
    assert_eq!(p.code, 200);
    let p = admin.post("/keys/tenant", &[("name", "radiology")]);
    assert!(p.body.contains("Tenant radiology created"), "{}", p.body);
    let p = admin.post(
        "/keys/create",
        &[
            ("tenant", "radiology"),
            ("label", "reporting app"),
            ("days", "30"),
            ("rpm", "600"),
        ],
    );
    assert_eq!(p.code, 200, "{}", p.body);
    let secret = p
        .body
        .split("id=\"new-secret\" type=\"text\" readonly value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the secret on the page")
        .to_string();
    assert!(secret.starts_with("sk-"), "{secret}");
    let key_id = p
        .body
        .split("Key ")
        .nth(1)
        .and_then(|r| r.split(" created for radiology").next())
        .expect("the new key's id in the message")
        .to_string();
    assert!(secret.contains(&key_id), "{secret} / {key_id}");
    assert!(
        !admin.get("/keys").body.contains(&secret),
        "the secret is shown only once"
    );

    // The key works against the API at once; the request appears on the audit page.
    let api = |key: &str| api_status(&s, key);
    assert_eq!(api(&secret), "200");
    // Usage accounting: on the keys page (24-hour sparkline, 30-day totals) and as CSV.
    let p = admin.get("/keys");
    let row = p
        .body
        .split(&format!("<code>{key_id}</code>"))
        .nth(1)
        .unwrap_or("");
    assert!(
        row.contains("1 in all") && row.contains("</svg> 1 / 0"),
        "{row}"
    );
    let csv = admin.get("/keys/usage.csv?days=2");
    assert!(csv.header("content-type").starts_with("text/csv"));
    let line = csv
        .body
        .lines()
        .find(|l| l.contains(&key_id))
        .unwrap_or_else(|| panic!("{}", csv.body));
    assert!(
        line.contains("\"radiology\"") && line.ends_with(",1,0,0"),
        "{line}"
    );
    let p = admin.get(&format!("/audit?key={key_id}"));
    assert!(
        p.body.contains("radiology / ") && p.body.contains("models.list"),
        "{}",
        p.body
    );
    // Revoked: the API refuses it.
    let p = admin.post("/keys/revoke", &[("id", &key_id)]);
    assert!(p.body.contains("revoked"), "{}", p.body);
    assert_eq!(api(&secret), "401");

    // Verify now.
    let p = admin.post("/audit/verify", &[]);
    assert!(p.body.contains("OK: "), "{}", p.body);

    // Logout ends the session on the server: the old cookie no longer works.
    let jar_before = std::fs::read_to_string(&admin.jar).unwrap();
    let p = admin.post("/logout", &[]);
    assert_eq!((p.code, p.header("location")), (303, "/login"));
    std::fs::write(&admin.jar, jar_before).unwrap();
    assert_eq!(admin.get("/keys").code, 303);

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let by_alice: Vec<&str> = all
        .iter()
        .filter(|r| r["user"] == "alice")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for action in [
        "console.setup",
        "tenant.create",
        "key.create",
        "key.revoke",
        "usage.export",
        "audit.verify",
        "audit.read",
        "console.logout",
    ] {
        assert!(
            by_alice.contains(&action),
            "{action} missing from {by_alice:?}"
        );
    }
    assert!(all
        .iter()
        .any(|r| r["user"] == "mallory" || r["action"] == "console.setup"));
}

#[test]
fn roles_csrf_headers_and_lockout() {
    let s = Server::start("console-roles", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let mut admin = set_up(&s, port);
    admin.get("/users");
    let p = admin.post(
        "/users/create",
        &[
            ("user", "audrey"),
            ("role", "auditor"),
            ("password", "heron-quartz-77-lantern"),
        ],
    );
    assert!(
        p.body.contains("User audrey created as auditor"),
        "{}",
        p.body
    );
    let p = admin.post(
        "/users/create",
        &[
            ("user", "otto"),
            ("role", "operator"),
            ("password", "short"),
        ],
    );
    assert!(p.body.contains("at least 12"), "{}", p.body);

    // Session cookie: __Host-, Secure, HttpOnly, SameSite=Strict.
    let mut auditor = Browser::new(&s, "auditor", port);
    let p = auditor.login("audrey", "heron-quartz-77-lantern");
    assert_eq!(p.code, 303);
    let cookie = p.headers["set-cookie"]
        .iter()
        .find(|c| c.starts_with("__Host-console="))
        .unwrap();
    for attr in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    let id = cookie
        .trim_start_matches("__Host-console=")
        .split(';')
        .next()
        .unwrap();
    assert_eq!(id.len(), 32, "128-bit session id");

    // The auditor: audit yes; keys, users, policy no (the server says 403).
    assert_eq!(auditor.get("/audit").code, 200);
    for page in ["/keys", "/users", "/policy", "/system", "/models"] {
        let p = auditor.get(page);
        assert_eq!(p.code, 403, "{page}");
        assert_secure_headers(&p, page);
    }
    let p = auditor.post("/keys/tenant", &[("name", "sneaky")]);
    assert_eq!(p.code, 403);
    assert!(
        !auditor.get("/").body.contains("href=\"/keys\""),
        "no link to what the role may not open"
    );

    // CSRF: a forged POST (no token, a wrong token, a token from another session, or
    // not a form) changes nothing.
    let auditor_token = auditor.csrf.clone();
    for forged in [
        vec![("csrf", "")],
        vec![("csrf", "0123456789abcdef0123456789abcdef")],
        vec![("csrf", auditor_token.as_str())],
    ] {
        let mut f = forged.clone();
        f.push(("name", "forged"));
        let p = admin.post("/keys/tenant", &f);
        assert_eq!(p.code, 403, "{forged:?}");
        assert_secure_headers(&p, "csrf refusal");
    }
    let p = admin.run(&[
        "-H",
        "Content-Type: application/json",
        "-d",
        "{}",
        &format!("{}/keys/tenant", admin.base),
    ]);
    assert_eq!(p.code, 403);
    // No state change on GET.
    assert_eq!(admin.get("/keys/tenant?name=viaget").code, 404);
    let listing = admin.get("/keys").body;
    assert!(
        !listing.contains("forged") && !listing.contains("viaget"),
        "a forged request created a tenant"
    );

    // The headers on every route, errors included.
    for page in [
        "/",
        "/models",
        "/keys",
        "/policy",
        "/upstreams",
        "/audit",
        "/users",
        "/system",
        "/api/stats",
        "/nope",
        "/static/app.css",
        "/static/app.js",
        "/login",
    ] {
        let p = admin.get(page);
        assert_secure_headers(&p, page);
    }
    let js = admin.get("/static/app.js");
    assert!(js.header("content-type").starts_with("text/javascript"));
    assert!(
        !admin.get("/").body.contains("<script>"),
        "no inline script"
    );

    // Lockout: ten wrong passwords lock the account; then even the right one is refused.
    let mut guesser = Browser::new(&s, "guesser", port);
    for _ in 0..10 {
        assert_eq!(guesser.login("audrey", "not-the-password-1").code, 401);
    }
    let p = guesser.login("audrey", "heron-quartz-77-lantern");
    assert_eq!(p.code, 401);
    assert!(p.body.contains("locked"), "{}", p.body);
    let users = admin.get("/users").body;
    assert!(
        users.contains("<span class=\"state locked\">locked</span>"),
        "{users}"
    );
    // An admin's reset clears it.
    let p = admin.post(
        "/users/reset",
        &[
            ("reset-user", "audrey"),
            ("reset-password", "osprey-marble-12-canyon"),
        ],
    );
    assert!(p.body.contains("password was reset"), "{}", p.body);
    assert_eq!(guesser.login("audrey", "osprey-marble-12-canyon").code, 303);

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    assert!(all
        .iter()
        .any(|r| r["action"] == "console.lockout" && r["user"] == "audrey"));
    assert!(
        all.iter()
            .filter(|r| r["action"] == "console.login" && r["status"] == 401)
            .count()
            >= 10
    );
    assert!(all
        .iter()
        .any(|r| r["action"] == "console.denied" && r["user"] == "audrey"));
    assert!(all.iter().any(|r| r["action"] == "console.csrf"));
}

/// The flows in Debian's headless Chromium (playwright-core): setup link → admin →
/// logout/login → tenant and key → the key against the API → the request on the audit
/// page → revoke → refused → every page (labelled controls, keyboard) → auditor gets 403
/// on keys → lockout. Writes the screenshots under docs/screenshots.
#[test]
fn in_a_real_browser() {
    let node_path = std::env::var("APPLIANCE_TEST_NODE_PATH").expect(
        "APPLIANCE_TEST_NODE_PATH must name node_modules with playwright-core (scripts/setup-browser; scripts/test sets it)",
    );
    let s = Server::start("console-browser", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let out = Command::new("node")
        .arg(repo_root().join("tests/e2e/console/flow.mjs"))
        .env("APPLIANCE_TEST_NODE_PATH", node_path)
        .env(
            "SETUP_URL",
            format!("https://127.0.0.1:{port}/setup?token={}", setup_token(&s)),
        )
        .env("CONSOLE_URL", format!("https://127.0.0.1:{port}"))
        .env("API_URL", format!("https://127.0.0.1:{}", s.port))
        .env("CERT", s.cert())
        .env("SHOTS", repo_root().join("docs/screenshots"))
        .env("MODEL", model())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn models_are_imported_from_the_appliance_with_progress_and_removed() {
    let s = Server::start("console-models", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let mut admin = set_up(&s, port);
    admin.get("/models");
    let wait = |b: &mut Browser| -> serde_json::Value {
        let t0 = std::time::Instant::now();
        loop {
            let p = b.get("/models/progress");
            let v: serde_json::Value = serde_json::from_str(&p.body).unwrap();
            if v["active"] == false {
                return v;
            }
            assert!(t0.elapsed().as_secs() < 60, "import still running");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    // A path that is not there: refused at once, nothing started.
    let p = admin.post(
        "/models/import",
        &[("path", "/nonexistent/model.gguf"), ("name", "ghost")],
    );
    assert!(
        p.body
            .contains("/nonexistent/model.gguf is not a file or bundle folder"),
        "{}",
        p.body
    );
    assert_eq!(admin.get("/models/progress").body, "{\"active\":false}");
    // The real file, under a new name.
    let model = model().display().to_string();
    let p = admin.post(
        "/models/import",
        &[("path", &model), ("name", "smollm2-copy")],
    );
    assert!(p.body.contains("Import started"), "{}", p.body);
    let v = wait(&mut admin);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["done"].as_u64().unwrap() > 0 && v["done"] == v["total"],
        "{v}"
    );
    let list = admin.get("/models").body;
    assert!(
        list.contains("smollm2-copy") && list.contains("Q4_1"),
        "{list}"
    );
    // Pinning: to the CPU (shown, recorded), not to a GPU this build cannot use, nor a
    // model that is not there; back to automatic.
    let pin = |b: &mut Browser, model: &str, device: &str, code: u16, says: &str| {
        let p = b.post("/models/pin", &[("model", model), ("device", device)]);
        assert_eq!(p.code, code, "{}", p.body);
        assert!(p.body.contains(says), "{}", p.body);
    };
    pin(
        &mut admin,
        "smollm2-copy",
        "cpu",
        200,
        "Model smollm2-copy pinned to cpu.",
    );
    assert!(admin.get("/models").body.contains("<td>cpu</td>"));
    pin(&mut admin, "smollm2-copy", "cuda:0", 400, "has no CUDA");
    pin(&mut admin, "ghost", "cpu", 400, "ghost");
    let auto = "Model smollm2-copy is placed automatically.";
    pin(&mut admin, "smollm2-copy", "auto", 200, auto);
    assert!(!admin.get("/models").body.contains("<td>cpu</td>"));
    // A loaded model cannot be removed; an unloaded one can.
    let p = admin.post("/models/remove", &[("model", "smollm2")]);
    assert!(p.body.contains("unload it before removing"), "{}", p.body);
    let p = admin.post("/models/remove", &[("model", "smollm2-copy")]);
    assert!(p.body.contains("Model smollm2-copy removed."), "{}", p.body);
    assert!(!admin.get("/models").body.contains("smollm2-copy"));

    // Uploads from the browser: the raw bytes, the session's token in a header.
    let upload = |b: &mut Browser, file: &Path, query: &str, token: &str| -> Page {
        let token = format!("X-CSRF-Token: {token}");
        raw_post(b, &format!("/models/upload?{query}"), file, &[&token])
    };
    admin.get("/models");
    let token = admin.csrf.clone();
    let junk = s.dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let p = upload(&mut admin, &junk, "file=junk.gguf", "forged");
    assert_eq!(p.code, 403, "{}", p.body);
    let p = upload(&mut admin, &junk, "file=run.sh", &token);
    assert_eq!(p.code, 400, "{}", p.body);
    assert!(p.body.contains(".gguf model or a .tar"), "{}", p.body);
    // Refused uploads start nothing: the progress still shows the earlier import.
    let v: serde_json::Value = serde_json::from_str(&admin.get("/models/progress").body).unwrap();
    assert_eq!(v["active"], false, "{v}");
    assert_eq!(
        v["message"].as_str().unwrap().split(' ').next(),
        Some("smollm2-copy"),
        "{v}"
    );
    // Bytes that are not a model: uploaded, refused by the import, nothing left.
    let p = upload(&mut admin, &junk, "file=junk.gguf", &token);
    assert_eq!(p.code, 200, "{}", p.body);
    let v = wait(&mut admin);
    assert_eq!(v["ok"], false, "{v}");
    // The real file, under a new name.
    let p = upload(
        &mut admin,
        Path::new(&model),
        "file=SmolLM2.Q4_1.gguf&name=smollm2-up",
        &token,
    );
    assert_eq!(p.code, 200, "{}", p.body);
    assert!(p.body.contains("uploaded; importing"), "{}", p.body);
    let v = wait(&mut admin);
    assert_eq!(v["ok"], true, "{v}");
    assert!(admin.get("/models").body.contains("smollm2-up"));
    let left: Vec<_> = std::fs::read_dir(s.dir.join("uploads"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "uploads left behind: {left:?}");

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let imports: Vec<u64> = all
        .iter()
        .filter(|r| r["action"] == "model.import")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(imports, [200, 400, 200]);
    let uploads = all
        .iter()
        .filter(|r| r["action"] == "model.upload" && r["user"] == "alice")
        .count();
    assert_eq!(uploads, 2);
    assert!(all
        .iter()
        .any(|r| r["action"] == "console.csrf" && r["resource"] == "/models/upload"));
    assert!(all
        .iter()
        .any(|r| r["action"] == "model.remove" && r["user"] == "alice"));
    let pins: Vec<u64> = all
        .iter()
        .filter(|r| r["action"] == "model.pin")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    // Each attempt is recorded before it acts; the two refusals then with their 400.
    assert_eq!(pins, [200, 200, 400, 200, 400, 200], "{pins:?}");
}

/// A file's raw bytes POSTed from the page's session (as the page's scripts send them),
/// with extra headers.
fn raw_post(b: &mut Browser, path: &str, file: &Path, headers: &[&str]) -> Page {
    let url = format!("{}{path}", b.base);
    let data = format!("@{}", file.display());
    let mut args = vec![
        "-H",
        "Expect:",
        "-H",
        "Content-Type: application/octet-stream",
    ];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", &data, &url]);
    b.run(&args)
}

/// `appliance backup ...` with the passphrase on stdin: (success, stdout + stderr).
fn backup_cli(args: &[&str], pass: &str) -> (bool, String) {
    let mut c = appliance()
        .arg("backup")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before it reads the passphrase closes its stdin: its output
    // then says why, so a broken pipe here is not the failure to report.
    let _ = std::io::Write::write_all(c.stdin.as_mut().unwrap(), format!("{pass}\n").as_bytes());
    drop(c.stdin.take());
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn backups_download_verify_and_restore() {
    const PASS: &str = "ferry-lichen-93-summit";
    let s = Server::start("console-backup", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let key = s.key();
    assert_eq!(api_status(&s, &key), "200");
    let mut admin = set_up(&s, port);
    admin.get("/system");
    let p = admin.post("/system/backup", &[("passphrase", "short")]);
    assert!(p.body.contains("at least 12"), "{}", p.body);
    // The download, from the console.
    let file = s.dir.join("backup.bin");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(s.cert())
        .arg("-b")
        .arg(&admin.jar)
        .args(["--data-urlencode", &format!("csrf={}", admin.csrf)])
        .args(["--data-urlencode", &format!("passphrase={PASS}")])
        .arg("-o")
        .arg(&file)
        .arg(format!("{}/system/backup", admin.base))
        .status()
        .unwrap();
    assert!(out.success());
    let bytes = std::fs::read(&file).unwrap();
    assert!(
        bytes.starts_with(b"APPLBAK1"),
        "{:?}",
        &bytes[..bytes.len().min(200)]
    );
    let text = String::from_utf8_lossy(&bytes);
    assert!(
        !text.contains("BEGIN PRIVATE KEY") && !text.contains(&key[..20]),
        "the backup is encrypted"
    );

    // It verifies; a wrong passphrase or one altered byte does not.
    let f = file.to_str().unwrap();
    let (ok, out) = backup_cli(&["verify", f], PASS);
    assert!(ok, "{out}");
    assert!(
        out.contains("OK: backup of appliance") && out.contains("audit log OK"),
        "{out}"
    );
    let (ok, out) = backup_cli(&["verify", f], "not-the-passphrase");
    assert!(!ok && out.contains("does not decrypt"), "{out}");
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 1;
    let bad_file = s.dir.join("backup-altered.bin");
    std::fs::write(&bad_file, &bad).unwrap();
    let (ok, out) = backup_cli(&["verify", bad_file.to_str().unwrap()], PASS);
    assert!(!ok && out.contains("does not decrypt"), "{out}");
    // A file that is no backup at all is said so before any passphrase is asked for.
    let junk = s.dir.join("junk.bin");
    std::fs::write(&junk, b"this is no backup").unwrap();
    let (ok, out) = backup_cli(&["verify", junk.to_str().unwrap()], "");
    assert!(
        !ok && out.contains("junk.bin: not an appliance backup"),
        "{out}"
    );
    // Not while the daemon runs.
    let (ok, out) = backup_cli(&["restore", f, "--data-dir", s.dir.to_str().unwrap()], PASS);
    assert!(!ok && out.contains("stop it"), "{out}");

    // From the page: a key made after the backup, then the backup restored: refused
    // with a wrong passphrase (nothing changes), staged with the right one, and the
    // daemon restarts itself (status 75) to put it in place.
    let later = appliance()
        .args(["key", "create", "--tenant", "acme", "--data-dir"])
        .arg(&s.dir)
        .output()
        .unwrap();
    let later = String::from_utf8_lossy(&later.stdout).trim().to_string();
    assert_eq!(api_status(&s, &later), "200");
    let restore = |b: &mut Browser, pass: &str| -> Page {
        let token = format!("X-CSRF-Token: {}", b.csrf);
        let pass = format!("X-Backup-Passphrase: {pass}");
        raw_post(b, "/system/restore", &file, &[&token, &pass])
    };
    admin.get("/system");
    let p = raw_post(
        &mut admin,
        "/system/restore",
        &file,
        &[
            "X-CSRF-Token: forged",
            &format!("X-Backup-Passphrase: {PASS}"),
        ],
    );
    assert_eq!(p.code, 403, "a forged token: {}", p.body);
    let p = restore(&mut admin, "not-the-passphrase");
    assert_eq!(p.code, 400, "{}", p.body);
    assert!(p.body.contains("does not decrypt"), "{}", p.body);
    assert_eq!(api_status(&s, &later), "200", "nothing changed");
    let p = restore(&mut admin, PASS);
    assert_eq!(p.code, 200, "{}", p.body);
    assert!(p.body.contains("restarts now"), "{}", p.body);
    let mut s = s;
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = s.guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(t0.elapsed().as_secs() < 60, "the daemon did not stop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(status.code(), Some(75), "{status:?}");
    let back = Server::start_in(
        s.dir.clone(),
        &["--console-listen", "127.0.0.1:0"],
        None,
        None,
    );
    assert_eq!(api_status(&back, &key), "200", "the backup's key works");
    assert_eq!(api_status(&back, &later), "401", "the later key is gone");
    assert!(!back.dir.join("restore/staged").exists());
    appliance_ok(&["audit", "verify", "--data-dir", back.dir.to_str().unwrap()]);
    drop(back);
    // The restored log goes on from the backup's end with the restore; the log it
    // replaced (with the staging records) is kept aside.
    let all = audit_records(&s.dir);
    assert!(all
        .iter()
        .any(|r| r["action"] == "backup.restore" && r["status"] == 200));
    let aside = std::fs::read_dir(&s.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("pre-restore-")
        })
        .expect("the replaced files are kept");
    let before = audit_records(&aside);
    for status in [400, 200] {
        assert!(
            before
                .iter()
                .any(|r| r["action"] == "backup.stage" && r["status"] == status),
            "no backup.stage {status}"
        );
    }
    drop(s);

    // Onto another appliance: refused without --new-appliance (another audit key),
    // restored with it; the key, the console user and the audit log come back.
    let other = scratch("console-backup-restored");
    let first = Server::start_in(other.clone(), &[], None, None);
    drop(first);
    let target = other.to_str().unwrap();
    let (ok, out) = backup_cli(&["restore", f, "--data-dir", target], PASS);
    assert!(!ok && out.contains("not this appliance's"), "{out}");
    let (ok, out) = backup_cli(
        &["restore", f, "--new-appliance", "--data-dir", target],
        PASS,
    );
    assert!(ok, "{out}");
    assert!(out.contains("restored:"), "{out}");
    let restored = Server::start_in(
        other.clone(),
        &["--console-listen", "127.0.0.1:0"],
        None,
        None,
    );
    assert_eq!(api_status(&restored, &key), "200", "the key came back");
    let mut again = Browser::new(&restored, "restored", console_port(&restored));
    assert_eq!(
        again.login("alice", ADMIN_PW).code,
        303,
        "the console user came back"
    );
    assert!(
        !restored.banner.iter().any(|l| l.contains("setup?token=")),
        "no setup link: there is an admin"
    );
    let dir = restored.dir.clone();
    drop(restored);
    let all = audit_records(&dir);
    assert!(all
        .iter()
        .any(|r| r["action"] == "backup.create" && r["user"] == "alice"));
    assert!(all.iter().any(|r| r["action"] == "backup.restore"));
}

#[test]
fn the_sites_certificate_replaces_the_self_signed_one_while_running() {
    let s = Server::start("console-cert", &["--console-listen", "127.0.0.1:0"]);
    let port = console_port(&s);
    let mut admin = set_up(&s, port);
    let make = |name: &str| {
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=site.example",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1"])
            .arg("-keyout")
            .arg(s.dir.join(format!("{name}-key.pem")))
            .arg("-out")
            .arg(s.dir.join(format!("{name}-cert.pem")))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success());
        (
            std::fs::read_to_string(s.dir.join(format!("{name}-cert.pem"))).unwrap(),
            std::fs::read_to_string(s.dir.join(format!("{name}-key.pem"))).unwrap(),
        )
    };
    let (cert, key) = make("site");
    let (_, other_key) = make("other");
    admin.get("/system");
    let p = admin.post(
        "/system/certificate",
        &[("cert", &cert), ("key", &other_key)],
    );
    assert!(p.body.contains("does not belong"), "{}", p.body);
    let p = admin.post(
        "/system/certificate",
        &[("cert", &cert), ("key", "not a key")],
    );
    assert!(p.body.contains("private key"), "{}", p.body);
    let old_cert = s.cert();
    let old = std::fs::read(&old_cert).unwrap();
    let p = admin.post("/system/certificate", &[("cert", &cert), ("key", &key)]);
    assert!(p.body.contains("new certificate is in use"), "{}", p.body);
    // New connections get it, on the API and on the console; the old one is refused.
    let site = s.dir.join("site-cert.pem");
    let status = |ca: &std::path::Path, url: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(ca)
            .arg(url)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status(&site, &s.url("/healthz")), "200");
    assert_eq!(
        status(&site, &format!("https://127.0.0.1:{port}/login")),
        "200"
    );
    let old_copy = s.dir.join("old-cert.pem");
    std::fs::write(&old_copy, &old).unwrap();
    assert_eq!(
        status(&old_copy, &s.url("/healthz")),
        "000",
        "the old certificate is gone"
    );
    assert_eq!(
        std::fs::read_to_string(s.cert()).unwrap(),
        cert,
        "kept for the next start"
    );
    assert!(!s.dir.join("tls/generated-for.txt").exists());
    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let replaced: Vec<u64> = all
        .iter()
        .filter(|r| r["action"] == "certificate.replace")
        .map(|r| r["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        replaced,
        [400, 400, 200],
        "each refusal and the replacement"
    );
}
