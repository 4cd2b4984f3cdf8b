//! `appliance serve` end to end: the real daemon, real workers, the real model, HTTPS with
//! the generated certificate. The OpenAI SDK, httpx and curl suite lives in
//! `tests/e2e/test_openai_api.py` and runs under pytest from here; the process-level
//! behaviour (worker crash, drain, config errors) is tested in Rust.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::*;

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = rest.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            out.push(p);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap() + 2..].starts_with('Z'))
            .unwrap_or(true)
}

const LONG_STREAM: &str = r#"{"model":"smollm2","messages":[{"role":"user","content":"Count from 1 to 1000."}],"max_tokens":2000,"ignore_eos":true,"temperature":0,"stream":true}"#;

#[test]
fn openai_sdk_httpx_and_curl_suite() {
    let python = std::env::var("APPLIANCE_TEST_PYTHON").expect(
        "APPLIANCE_TEST_PYTHON must name a Python with tests/e2e/requirements.txt installed (scripts/test sets it up)",
    );
    let s = Server::start("sdk", &[]);
    let status = Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"])
        .arg(repo_root().join("tests/e2e/test_openai_api.py"))
        .env("APPLIANCE_BASE_URL", s.url("/v1"))
        .env("APPLIANCE_CACERT", s.cert())
        .env("APPLIANCE_MODEL", "smollm2")
        .env("APPLIANCE_BIN", binary())
        .env("APPLIANCE_DATA_DIR", &s.dir)
        .env("APPLIANCE_TENANT", "acme")
        .status()
        .unwrap();
    assert!(status.success(), "the pytest suite failed");
}

#[test]
fn a_worker_killed_mid_stream_ends_the_stream_cleanly_and_is_restarted() {
    let s = Server::start("kill", &[]);
    let key = s.key();
    let (_curl, mut lines) = s.stream(&key, LONG_STREAM);
    // Wait for real tokens to flow.
    let mut seen = 0;
    while seen < 3 {
        let l = lines.next().expect("stream ended early").unwrap();
        if l.starts_with("data: {") {
            seen += 1;
        }
    }
    let workers = children(s.pid());
    assert_eq!(workers.len(), 1, "one worker process: {workers:?}");
    let status = Command::new("kill")
        .args(["-9", &workers[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The client gets an error event, then the stream ends (no hang, no [DONE]).
    let rest: Vec<String> = lines
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
        .collect();
    let last = rest.last().expect("an error event");
    assert!(last.starts_with("data: {\"error\""), "last line: {last}");
    assert!(last.contains("worker_error"), "{last}");
    assert!(!rest.iter().any(|l| l == "data: [DONE]"));
    // The supervisor restarts it; the next request succeeds.
    let t0 = Instant::now();
    loop {
        let (out, _) = s.chat(
            &key,
            r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":4}"#,
        );
        if out.contains("\"chat.completion\"") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not back after 30 s: {out}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        s.metric("appliance_worker_restarts_total{model=\"smollm2\",instance=\"0\"}"),
        Some(1.0)
    );
    let new_workers = children(s.pid());
    assert_eq!(new_workers.len(), 1);
    assert_ne!(new_workers, workers);
    assert!(!alive(workers[0]), "the killed worker was reaped");
    // The metrics, restarts and token counts included, are valid for Prometheus.
    let (text, _) = s.curl(&[&s.url("/metrics")]);
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup-e2e installs it)");
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_client_that_disconnects_frees_its_slot_at_once() {
    let s = Server::start("disconnect", &[]);
    let key = s.cli(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--max-concurrency",
        "1",
    ]);
    let (curl, mut lines) = s.stream(&key, LONG_STREAM);
    for _ in 0..3 {
        lines.next().unwrap().unwrap();
    }
    assert_eq!(s.metric("appliance_in_flight_requests"), Some(1.0));
    drop(curl); // kills curl: the connection closes mid-stream
    let t0 = Instant::now();
    while s.metric("appliance_in_flight_requests") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the stream was not cancelled"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The key's one concurrency slot is free again.
    let (out, _) = s.chat(
        &key,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#,
    );
    assert!(out.contains("\"chat.completion\""), "{out}");
    // The same for a client that gives up waiting for a whole (non-streamed) answer.
    let long = LONG_STREAM.replace(r#","stream":true"#, "");
    let t0 = Instant::now();
    let (_, ok) = s.curl(&[
        "--max-time",
        "1",
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-d",
        &long,
        &s.url("/v1/chat/completions"),
    ]);
    assert!(!ok, "a 2000-token answer arrived within a second");
    while s.metric("appliance_in_flight_requests") != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "the abandoned request kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (out, _) = s.chat(
        &key,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#,
    );
    assert!(out.contains("\"chat.completion\""), "{out}");
    // Both abandoned requests were recorded as such (499), with the tokens they used.
    let (metrics, _) = s.curl(&[&s.url("/metrics")]);
    let abandoned = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "appliance_http_requests_total{route=\"/v1/chat/completions\",status=\"499\"",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(abandoned, Some(2.0), "{metrics}");
}

#[test]
fn sigterm_drains_in_flight_requests_refuses_new_ones_and_exits_0() {
    let mut s = Server::start("drain", &["--drain-timeout", "60"]);
    let key = s.key();
    let body = r#"{"model":"smollm2","messages":[{"role":"user","content":"Count to 200."}],"max_tokens":200,"ignore_eos":true,"temperature":0,"stream":true}"#;
    let (_curl, mut lines) = s.stream(&key, body);
    lines.next().unwrap().unwrap();
    let workers = children(s.pid());
    assert_eq!(workers.len(), 1);
    Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    // New requests are refused while the stream finishes.
    let (out, _) = s.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-d",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}]}"#,
        &s.url("/v1/chat/completions"),
    ]);
    assert_eq!(out, "503");
    let rest: Vec<String> = lines
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("data: [DONE]"),
        "{rest:?}"
    );
    let tokens = rest.iter().filter(|l| l.contains("\"content\":\"")).count();
    assert!(
        tokens >= 190,
        "the stream was cut short: {tokens} content chunks"
    );
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = s.guard.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the daemon did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!alive(workers[0]), "the worker outlived the daemon");
}

#[test]
fn plain_http_only_redirects_and_old_tls_is_refused() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = Server::start(
        "redirect",
        &["--redirect-listen", &format!("127.0.0.1:{port}")],
    );
    let out = Command::new("curl")
        .args([
            "-sS",
            "--noproxy",
            "*",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg(format!("http://127.0.0.1:{port}/v1/models?x=1"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out,
        format!("308 https://127.0.0.1:{}/v1/models?x=1", s.port)
    );
    // TLS 1.1 and older are not offered.
    let (_, ok) = s.curl(&["--tlsv1.1", "--tls-max", "1.1", &s.url("/healthz")]);
    assert!(!ok, "a TLS 1.1 handshake succeeded");
    let (out, ok) = s.curl(&["--tlsv1.2", "--tls-max", "1.2", &s.url("/healthz")]);
    assert!(ok && out.contains("ok"), "{out}");
}

/// `appliance serve` of smollm2 on `dir`, for a start expected to fail: its output.
fn serve_smollm2_once(dir: &Path) -> std::process::Output {
    appliance()
        .args(["serve", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .arg("--model")
        .arg(format!("smollm2={}", model().display()))
        .output()
        .unwrap()
}

/// `appliance serve` on a fresh data directory with `config`: it must exit 1; its
/// stderr and the directory.
fn serve_refuses(name: &str, config: &str) -> (String, PathBuf) {
    let dir = scratch(name);
    std::fs::write(dir.join("appliance.toml"), config).unwrap();
    let out = appliance()
        .args(["serve", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    (String::from_utf8_lossy(&out.stderr).into_owned(), dir)
}

#[test]
fn a_bad_config_file_is_reported_with_its_line() {
    let (err, _) = serve_refuses(
        "badconfig",
        "[api]\nlisten = \"0.0.0.0:8443\"\n\n[limits]\nmax_body = 5\n",
    );
    assert!(err.contains("appliance.toml: line 5, column 1"), "{err}");
    assert!(err.contains("max_body"), "{err}");
}

#[test]
fn an_audit_journal_size_out_of_range_is_refused() {
    let (err, dir) = serve_refuses("badjournal", "[audit]\njournal_kib = 2\n");
    let want = "[audit] journal_kib = 2: must be 16 to 1048576";
    assert!(err.contains(want), "{err}");
    assert!(!dir.join("audit/journal.0").exists(), "nothing made");
}

/// A start that fails after the audit log opened (here: the port is taken) is recorded
/// as a stop that says why, and leaves nothing in the journal for the next start.
#[test]
fn a_failed_start_is_recorded_and_leaves_the_journal_applied() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (err, dir) = serve_refuses(
        "porttaken",
        &format!("[api]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    assert!(err.contains("Address already in use"), "{err}");
    let out = appliance()
        .args(["audit", "verify", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("not yet in audit.db"), "{said}");
    let records = audit_records(&dir);
    let actions: Vec<&str> = records
        .iter()
        .filter_map(|r| r["action"].as_str())
        .collect();
    let start = actions
        .iter()
        .position(|a| *a == "daemon.start")
        .expect("daemon.start");
    let stop = &records[start..]
        .iter()
        .find(|r| r["action"] == "daemon.stop")
        .expect("daemon.stop");
    assert_eq!(stop["status"], 500, "{stop}");
    assert_eq!(stop["error"], "start_failed", "{stop}");
    let detail = stop["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("127.0.0.1:{port}")), "{detail}");
    drop(taken);

    // Failing once its workers have started (the control socket's place is taken by a
    // folder): the workers are stopped as after serving, none is left behind.
    let dir = scratch("ctlblocked");
    std::fs::create_dir_all(dir.join("run/control.sock")).unwrap();
    let out = serve_smollm2_once(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("control.sock"), "{err}");
    assert!(err.contains("worker smollm2: stopped"), "{err}");
    let needle = dir.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(&needle))
        .collect();
    assert!(left.is_empty(), "left running: {left:?}");
    let stop = audit_records(&dir)
        .into_iter()
        .rfind(|r| r["action"] == "daemon.stop")
        .expect("daemon.stop");
    assert_eq!(stop["error"], "start_failed", "{stop}");
}

#[test]
fn keys_cli_contract() {
    let dir = scratch("keyscli");
    let run = |args: &[&str]| {
        appliance()
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .output()
            .unwrap()
    };
    std::fs::write(dir.join("appliance.toml"), "[models]\na = \"a.gguf\"\n").unwrap();
    assert!(run(&["tenant", "create", "acme"]).status.success());
    let dup = run(&["tenant", "create", "acme"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));
    let out = run(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--expires-in",
        "15m",
        "--models",
        "a,b",
        "--rpm",
        "5",
    ]);
    assert!(out.status.success());
    // A model no one here has is said (a typo, most likely); one the config names is not.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("warning: --models b: no model"), "{err}");
    assert!(!err.contains("--models a"), "{err}");
    let secret = String::from_utf8(out.stdout).unwrap();
    // The secret alone on stdout, one line.
    assert_eq!(secret.lines().count(), 1);
    assert!(secret.starts_with("sk-appl-") && secret.trim().len() == 8 + 16 + 1 + 64);
    let id = &secret[8..24];
    let list = run(&["key", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(v[0]["id"], id);
    assert_eq!(v[0]["status"], "active");
    assert_eq!(v[0]["models"], serde_json::json!(["a", "b"]));
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&secret[25..]),
        "the secret leaked into the listing"
    );
    // The database holds no secret either.
    let db = std::fs::read(dir.join("appliance.db")).unwrap();
    assert!(!db.windows(64).any(|w| w == &secret.trim().as_bytes()[25..]));
    // Limits: whole numbers of at least 1, a negative one said to be out of range.
    let neg = run(&["key", "create", "--tenant", "acme", "--rpm", "-1"]);
    assert!(!neg.status.success());
    let err = String::from_utf8_lossy(&neg.stderr);
    assert!(
        err.contains("'-1' for '--rpm <RPM>'") && err.contains("not in 1.."),
        "{err}"
    );
    // A bad name is shown cut short, not echoed whole.
    let long = "x".repeat(5000);
    let out = run(&["tenant", "create", &long]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be 1 to 64") && err.len() < 400, "{err}");
    assert!(!run(&["key", "create", "--tenant", "nobody"])
        .status
        .success());
    assert!(
        !run(&["key", "create", "--tenant", "acme", "--expires-in", "soon"])
            .status
            .success()
    );
    assert!(!run(&["key", "revoke", "0123456789abcdef"]).status.success());
    // Rotation: the key expires in 15 minutes, so a grace of an hour is 15 minutes (the
    // message says so); the successor keeps the original expiry; a key already rotated
    // is refused, naming its successor, and nothing is added.
    let rot = run(&["key", "rotate", id, "--grace", "1h"]);
    assert!(
        rot.status.success(),
        "{}",
        String::from_utf8_lossy(&rot.stderr)
    );
    let said = String::from_utf8_lossy(&rot.stderr).to_string();
    assert!(
        said.contains("stays valid for 14m") || said.contains("stays valid for 15m"),
        "{said}"
    );
    let next = String::from_utf8(rot.stdout).unwrap();
    let next_id = &next[8..24];
    let again = run(&["key", "rotate", id, "--grace", "1h"]);
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(
        said.contains("already rotated") && said.contains(next_id),
        "{said}"
    );
    let v: serde_json::Value =
        serde_json::from_slice(&run(&["key", "list", "--json"]).stdout).unwrap();
    let keys = v.as_array().unwrap();
    assert_eq!(keys.len(), 2, "{v}");
    let by_id = |k: &str| keys.iter().find(|x| x["id"] == k).unwrap().clone();
    assert_eq!(by_id(next_id)["expires_at"], by_id(id)["expires_at"], "{v}");
    assert!(run(&["key", "revoke", next_id]).status.success());
    assert!(run(&["key", "revoke", id]).status.success());
    // Again: still a success (idempotent), and it says the key was already revoked.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let again = run(&["key", "revoke", id]);
    assert!(again.status.success());
    let said = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(said.contains("was already revoked"), "{said}");
    let rot = run(&["key", "rotate", id]);
    assert!(!rot.status.success(), "a revoked key was rotated");
}

/// A TLS connection (ALPN h2 or http/1.1) that never sends a request is closed after the
/// header timeout, so silent clients cannot hold connection slots.
#[test]
fn silent_connections_are_closed() {
    let python = std::env::var("APPLIANCE_TEST_PYTHON")
        .expect("APPLIANCE_TEST_PYTHON (scripts/test sets it)");
    let s = Server::start_with_config("silent", &[], Some("[limits]\nheader_timeout_secs = 1\n"));
    let script = r#"
import socket, ssl, sys, time
ctx = ssl.create_default_context(cafile=sys.argv[2])
ctx.set_alpn_protocols([sys.argv[3]])
raw = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
tls = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
assert tls.selected_alpn_protocol() == sys.argv[3], tls.selected_alpn_protocol()
tls.settimeout(20)
t0 = time.time()
try:
    while tls.recv(4096):
        pass  # an HTTP/2 server sends its SETTINGS first
except (ConnectionResetError, ssl.SSLError):
    pass
print(round(time.time() - t0, 2))
"#;
    for alpn in ["h2", "http/1.1"] {
        let out = Command::new(&python)
            .args(["-c", script, &s.port.to_string()])
            .arg(s.cert())
            .arg(alpn)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{alpn}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(
            secs < 5.0,
            "{alpn}: a silent connection stayed open {secs} s"
        );
    }
}

/// A body over the limit gets its 413 (and a refused key its 401) as an answer the client
/// reads: over HTTP/1.1 with or without `Expect: 100-continue` and over HTTP/2 (curl),
/// and, for a body beyond what is drained, over HTTP/2 as the answer, the end of its
/// stream and a NO_ERROR reset, the connection still serving (Python's h2: Debian 12's
/// curl fails a request whose stream is reset while it uploads, whatever the code).
#[test]
fn a_body_over_the_limit_is_answered_not_reset() {
    let s = Server::start_with_config("bigbody", &[], Some("[limits]\nmax_body_bytes = 65536\n"));
    let key = s.key();
    let big = s.dir.join("big.json");
    let small = s.dir.join("small.json");
    std::fs::write(&big, vec![b' '; 20 << 20]).unwrap();
    std::fs::write(&small, vec![b' '; 2 << 20]).unwrap();
    let url = s.url("/v1/chat/completions");
    let good = format!("Authorization: Bearer {key}");
    let bad = "Authorization: Bearer sk-not-a-key";
    let upload = |args: &[&str], auth: &str, file: &Path, stdin: bool| {
        let mut c = Command::new("curl");
        c.args(["-sS", "--noproxy", "*", "--max-time", "60", "--cacert"])
            .arg(s.cert())
            .args(args)
            .args(["-H", auth, "-H", "Content-Type: application/json"])
            .args(["-w", "\n%{size_upload} %{http_code}"]);
        if stdin {
            // No declared length: HTTP/2 DATA frames until the end, HTTP/1.1 chunked.
            c.args(["-X", "POST", "-T", "-"])
                .stdin(std::fs::File::open(file).unwrap());
        } else {
            c.arg("--data-binary").arg(format!("@{}", file.display()));
        }
        let out = c.arg(&url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = text.rsplit_once('\n').unwrap_or(("", ""));
        let (sent, code) = tail.split_once(' ').unwrap_or(("", ""));
        (
            out.status.code(),
            code.to_string(),
            sent.parse::<u64>().unwrap_or(u64::MAX),
            body.to_string(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cases: &[(&[&str], &Path, bool)] = &[
        (&["--http2"], &small, false),
        (&["--http2"], &small, true),
        (&["--http1.1"], &big, false), // curl sends Expect: 100-continue
        (&["--http1.1"], &small, true), // chunked: read (to 16 MiB past the limit)
        (&["--http1.1"], &big, true),  // ... and beyond: the connection closes lingering
        (&["--http1.1", "-H", "Expect:"], &small, false),
        (&["--http1.1", "-H", "Expect:"], &small, true),
        (&["--http1.1", "-H", "Expect:"], &big, false),
    ];
    for (args, file, stdin) in cases {
        let what = format!("{args:?} {} stdin={stdin}", file.display());
        for (auth, status, code) in [
            (good.as_str(), "413", "request_too_large"),
            (bad, "401", "invalid_api_key"),
        ] {
            let (rc, got, sent, body, err) = upload(args, auth, file, *stdin);
            assert_eq!(
                (rc, got.as_str()),
                (Some(0), status),
                "{what}: {err} {body}"
            );
            let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
            assert_eq!(v["error"]["code"], code, "{what}");
            if args == &["--http1.1"] && !stdin {
                // Expect: 100-continue with a length over the limit: refused unsent.
                assert!(
                    sent < 1 << 20,
                    "{what}: {sent} bytes sent before the answer"
                );
            }
        }
    }
    let python = std::env::var("APPLIANCE_TEST_PYTHON").expect("APPLIANCE_TEST_PYTHON");
    let probe = r#"
import json, socket, ssl, sys, h2.connection, h2.config, h2.events
port, cafile, auth, size, declare = sys.argv[1:6]
size = int(size)
ctx = ssl.create_default_context(cafile=cafile)
ctx.set_alpn_protocols(["h2"])
s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", int(port))), server_hostname="127.0.0.1")
s.settimeout(30)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
def head(sid, method, path, extra):
    c.send_headers(sid, [(":method", method), (":path", path), (":scheme", "https"),
                         (":authority", "127.0.0.1")] + extra, end_stream=method == "GET")
extra = [("authorization", auth), ("content-type", "application/json")]
if declare == "yes":
    extra.append(("content-length", str(size)))
head(1, "POST", "/v1/chat/completions", extra)
out = {"sent": 0, "body": b""}
streams = {1: out}
while True:
    while "reset" not in out and out["sent"] < size:
        w = min(c.local_flow_control_window(1), c.max_outbound_frame_size, size - out["sent"])
        if w <= 0:
            break
        c.send_data(1, b" " * w, end_stream=out["sent"] + w == size)
        out["sent"] += w
    s.sendall(c.data_to_send())
    data = s.recv(65536)
    if not data:
        break
    for e in c.receive_data(data):
        r = streams.get(getattr(e, "stream_id", None))
        if isinstance(e, h2.events.ResponseReceived):
            r["status"] = dict(e.headers)[b":status"].decode()
        elif isinstance(e, h2.events.DataReceived):
            r["body"] += e.data
            c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        elif isinstance(e, h2.events.StreamEnded):
            r["ended"] = True
            if e.stream_id == 1:
                streams[3] = {"body": b""}
                head(3, "GET", "/healthz", [])
        elif isinstance(e, h2.events.StreamReset):
            r["reset"] = e.error_code.name
    if streams.get(3, {}).get("ended"):
        break
print(json.dumps({"status": out.get("status"), "ended": out.get("ended", False),
                  "reset": out.get("reset"), "sent": out["sent"],
                  "body": out["body"].decode(), "after": streams.get(3, {}).get("status")}))
"#;
    let bearer = format!("Bearer {key}");
    for (auth, status, code) in [
        (bearer.as_str(), "413", "request_too_large"),
        ("Bearer sk-not-a-key", "401", "invalid_api_key"),
    ] {
        for declare in ["yes", "no"] {
            let out = Command::new(&python)
                .args(["-c", probe, &s.port.to_string()])
                .arg(s.cert())
                .args([auth, &(20u64 << 20).to_string(), declare])
                .output()
                .unwrap();
            let what = format!("h2 {status} declared={declare}");
            assert!(
                out.status.success(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(v["status"], status, "{what}: {v}");
            assert_eq!(v["ended"], true, "{what}: {v}");
            assert_eq!(v["reset"], "NO_ERROR", "{what}: {v}");
            assert_eq!(v["after"], "200", "{what}: the connection went down: {v}");
            let body: serde_json::Value =
                serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], code, "{what}");
            let sent = v["sent"].as_u64().unwrap();
            if declare == "yes" {
                // Beyond what would be drained: answered before the body is read.
                assert!(
                    sent < 4 << 20,
                    "{what}: {sent} bytes sent before the answer"
                );
            }
        }
    }
    // The connections stayed usable: a request within the limit is still served.
    let (out, ok) = s.chat(
        &key,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#,
    );
    assert!(ok && out.contains("chat.completion"), "{out}");
}

/// HEAD is GET without the body, over HTTP/2 and HTTP/1.1 (load balancers probe with
/// it); a 405 says which methods the endpoint takes.
#[test]
fn head_answers_like_get_without_a_body_and_a_405_says_what_is_allowed() {
    let s = Server::start("head", &[]);
    let key = s.key();
    let auth = format!("Authorization: Bearer {key}");
    for version in ["--http2", "--http1.1"] {
        for path in ["/healthz", "/v1/models"] {
            let (get, ok) = s.curl(&[version, "-H", &auth, &s.url(path)]);
            assert!(ok, "{get}");
            let (head, ok) = s.curl(&[version, "-I", "-H", &auth, &s.url(path)]);
            assert!(ok, "{version} HEAD {path}: {head}");
            let lines: Vec<&str> = head.lines().collect();
            assert!(lines[0].contains(" 200"), "{head}");
            let length = format!("content-length: {}", get.len());
            assert!(
                lines.iter().any(|l| l.eq_ignore_ascii_case(&length)),
                "{version} {path}: {head}"
            );
        }
        let (out, _) = s.curl(&[
            version,
            "-i",
            "-X",
            "DELETE",
            "-H",
            &auth,
            &s.url("/v1/chat/completions"),
        ]);
        assert!(out.lines().next().unwrap_or("").contains(" 405"), "{out}");
        assert!(out.to_ascii_lowercase().contains("allow: post"), "{out}");
    }
}

/// The worker process serving `model`, among the daemon's children.
fn worker_of(s: &Server, model: &str) -> u32 {
    let needle = format!("worker-{model}.sock");
    *children(s.pid())
        .iter()
        .find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("no worker for {model}"))
}

fn wait_ready_again(s: &Server, key: &str, model: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"Hi"}}],"max_tokens":2}}"#
    );
    loop {
        let (out, _) = s.chat(key, &body);
        if out.contains("\"chat.completion\"") {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{model} not back within {within:?}: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const FAST_SUPERVISION: &str = "[workers]\nrestart_backoff_initial_ms = 200\nrestart_backoff_max_secs = 2\ncrash_loop_after = 3\nhealth_interval_ms = 500\nhealth_timeout_ms = 500\nhealth_misses = 2\n";

#[test]
fn one_worker_failing_never_affects_another_model() {
    let other = format!("other={}", model().display());
    let s = Server::start_with_config("isolation", &["--model", &other], Some(FAST_SUPERVISION));
    let key = s.key();
    let (_a, mut a_lines) = s.stream(&key, LONG_STREAM);
    let b_body = LONG_STREAM
        .replace("smollm2", "other")
        .replace("2000", "60");
    let (_b, mut b_lines) = s.stream(&key, &b_body);
    for lines in [&mut a_lines, &mut b_lines] {
        for _ in 0..2 {
            lines.next().unwrap().unwrap();
        }
    }
    let victim = worker_of(&s, "smollm2");
    let survivor = worker_of(&s, "other");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let a_rest: Vec<String> = a_lines
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        a_rest.last().unwrap().contains("worker_error"),
        "{:?}",
        a_rest.last()
    );
    // The other model's stream runs to its end, on the same worker.
    let b_rest: Vec<String> = b_lines
        .map(|l| l.unwrap())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(b_rest.last().map(String::as_str), Some("data: [DONE]"));
    assert_eq!(worker_of(&s, "other"), survivor);
    let took = wait_ready_again(&s, &key, "smollm2", Duration::from_secs(10));
    eprintln!("killed worker replaced and serving after {took:?}");
    assert!(!alive(victim));
}

#[test]
fn a_stopped_worker_is_detected_and_replaced() {
    let s = Server::start_with_config("sigstop", &[], Some(FAST_SUPERVISION));
    let key = s.key();
    let victim = worker_of(&s, "smollm2");
    Command::new("kill")
        .args(["-STOP", &victim.to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    // Liveness bound with these settings: 0.5 + 2 × (0.5 + 0.5) = 2.5 s, then a restart.
    while children(s.pid()).contains(&victim) {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "a stopped worker was not replaced"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_ready_again(&s, &key, "smollm2", Duration::from_secs(10));
    eprintln!(
        "stopped worker replaced and serving after {:?}",
        t0.elapsed()
    );
    assert!(!alive(victim), "the stopped worker was not reaped");
    assert_eq!(
        s.metric("appliance_worker_restarts_total{model=\"smollm2\",instance=\"0\"}"),
        Some(1.0)
    );
}

#[test]
fn a_model_file_that_cannot_be_used_fails_for_good_and_is_reported() {
    let dir = scratch("unusable-model");
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really a model").unwrap();
    let bad_arg = format!("bad={}", bad.display());
    let s = Server::start_with_config("unusable", &["--model", &bad_arg], Some(FAST_SUPERVISION));
    let t0 = Instant::now();
    while s.metric("appliance_worker_state{model=\"bad\",instance=\"0\",state=\"failed\"}")
        != Some(1.0)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no failure reported"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // With restarts 0.2 s apart, a second of crash loop would have restarted it several
    // times: the same file fails the same way, so it is not started again.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        s.metric("appliance_worker_restarts_total{model=\"bad\",instance=\"0\"}"),
        Some(0.0)
    );
    let status: serde_json::Value = serde_json::from_str(&s.cli(&["status", "--json"])).unwrap();
    let w = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["model"] == "bad")
        .unwrap()
        .clone();
    assert_eq!(w["state"], "failed", "{w}");
    assert_eq!(w["gave_up"], true, "{w}");
    let why = w["last_error"].as_str().unwrap();
    assert!(
        why.contains(&format!("{} is not a valid GGUF file", bad.display())),
        "{why}"
    );
    assert!(!why.contains('\n'), "one line, no backtrace: {why}");
    // The request says so, without a Retry-After that would have it come back.
    let key = s.key();
    let (out, _) = s.curl(&[
        "-i",
        "-H",
        &format!("Authorization: Bearer {key}"),
        "-d",
        r#"{"model":"bad","messages":[{"role":"user","content":"Hi"}]}"#,
        &s.url("/v1/chat/completions"),
    ]);
    assert!(out.starts_with("HTTP/2 503"), "{out}");
    assert!(out.contains("\"code\":\"model_failed\""), "{out}");
    assert!(!out.to_ascii_lowercase().contains("retry-after"), "{out}");
    // The good model is unaffected: ready and serving.
    wait_ready_again(&s, &key, "smollm2", Duration::from_secs(5));
}

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Run as root, the daemon runs its workers as an unprivileged user, with no way back,
/// no core dumps, capped descriptors and nothing inherited. Not root, it refuses the
/// setting clearly.
#[test]
fn workers_run_with_least_privilege() {
    let dir = scratch("privilege");
    std::fs::write(
        dir.join("appliance.toml"),
        "[workers]\nuser = \"nobody\"\nmax_open_files = 512\n",
    )
    .unwrap();
    // A copy of the model any user can read (the checkout may sit in a private home).
    let shared = scratch("privilege-model");
    let model_copy = shared.join("m.gguf");
    std::fs::copy(model(), &model_copy).unwrap();
    let root = status_field(std::process::id(), "Uid").starts_with("0\t");
    let mut child = appliance()
        .args(["serve", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .arg("--model")
        .arg(format!("smollm2={}", model_copy.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if !root {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs the daemon to run as root"));
        return;
    }
    let pid = child.id();
    let out = child.stdout.take().unwrap();
    let mut daemon = Guard(child);
    std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
    let nobody: String = std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("nobody:"))
        .map(|l| l.split(':').nth(2).unwrap().to_string())
        .expect("user nobody");
    let t0 = Instant::now();
    let worker = loop {
        if let Some(&w) = children(pid).first() {
            // Ready once it has dropped privileges and loaded the model.
            if status_field(w, "Uid").starts_with(&format!("{nobody}\t"))
                && Path::new(&dir.join("run/workers/worker-smollm2.sock")).exists()
            {
                break w;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no unprivileged worker came up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let uid = status_field(worker, "Uid");
    assert!(uid.split_whitespace().all(|u| u == nobody), "uid {uid}");
    assert_eq!(
        status_field(worker, "Groups").split_whitespace().count(),
        1,
        "supplementary groups kept"
    );
    assert_eq!(status_field(worker, "NoNewPrivs"), "1");
    assert_eq!(status_field(worker, "CapEff"), "0000000000000000");
    let limits = std::fs::read_to_string(format!("/proc/{worker}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| {
                l[name.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string()
            })
            .unwrap()
    };
    assert_eq!(limit("Max core file size"), "0");
    assert_eq!(limit("Max open files"), "512");
    for fd in std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(
            !t.contains("appliance.db")
                && !t.contains("audit")
                && !t.contains("key.pem")
                && !t.contains("control.sock"),
            "worker holds {t}"
        );
    }
    // Dropping privileges must not lose the parent-death signal: kill -9 of the daemon
    // ends the unprivileged worker too.
    daemon.0.kill().unwrap();
    daemon.0.wait().unwrap();
    let t0 = Instant::now();
    while alive(worker) {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the worker outlived its daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Placement refuses a model whose estimate does not fit, with the numbers; a placed
/// model's device, estimate and the hardware show in `appliance status` and `/metrics`.
#[test]
fn placement_and_status() {
    let dir = scratch("placement");
    std::fs::write(
        dir.join("appliance.toml"),
        "[workers]\nmax_batch = 100000\n",
    )
    .unwrap();
    let out = serve_smollm2_once(&dir);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("placement: model smollm2 needs"), "{err}");
    assert!(
        err.contains("for 100000 sequences of 8192 tokens") && err.contains("free: cpu"),
        "{err}"
    );
    let s = Server::start("status", &[]);
    let status = s.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    let w = &v["workers"][0];
    assert_eq!(w["model"], "smollm2");
    assert_eq!(w["state"], "ready");
    assert_eq!(w["device"], "cpu");
    // 30 layers × 3 KV heads × 64 × 2 (K, V) × 4 bytes × 8 sequences × 8192 tokens, plus weights.
    let kv = 30 * 3 * 64 * 2 * 4 * 8 * 8192u64;
    let est = w["estimate_bytes"].as_u64().unwrap();
    assert!(est > kv && est < kv + (200 << 20), "{est}");
    let inv = &v["inventory"];
    assert!(inv["memory_total"].as_u64().unwrap() > 0 && inv["cpu_threads"].as_u64().unwrap() >= 1);
    assert!(inv["gpus"].as_array().unwrap().is_empty() || inv["gpu_note"].is_null());
    assert_eq!(
        s.metric("appliance_model_memory_estimate_bytes{model=\"smollm2\",instance=\"0\",device=\"cpu\"}"),
        Some(est as f64)
    );
    assert!(s.metric("appliance_memory_available_bytes").unwrap() > 0.0);
    let human = s.cli(&["status"]);
    assert!(
        human.contains("smollm2") && human.contains("ready"),
        "{human}"
    );
}

/// Two instances of one model: requests are spread by queue depth, and one instance
/// failing leaves the model served by the other.
#[test]
fn instances_share_the_load_and_cover_for_each_other() {
    let s = Server::start_with_config(
        "instances",
        &[],
        Some(&format!("{FAST_SUPERVISION}\n[instances]\nsmollm2 = 2\n")),
    );
    let t0 = Instant::now();
    while children(s.pid()).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = s.key();
    // Two long streams at once: one on each instance.
    let (_a, mut a) = s.stream(&key, LONG_STREAM);
    let (_b, mut b) = s.stream(&key, LONG_STREAM);
    for lines in [&mut a, &mut b] {
        lines.next().unwrap().unwrap();
    }
    let v: serde_json::Value = serde_json::from_str(&s.cli(&["status", "--json"])).unwrap();
    let per: Vec<u64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["in_flight"].as_u64().unwrap())
        .collect();
    assert_eq!(per, vec![1, 1], "{v}");
    // Kill instance 0: its stream ends with an error; the model stays served.
    let victim = worker_of(&s, "smollm2#0");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let (out, _) = s.chat(
        &key,
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"max_tokens":2}"#,
    );
    assert!(out.contains("\"chat.completion\""), "{out}");
    assert_eq!(
        s.metric("appliance_worker_restarts_total{model=\"smollm2\",instance=\"1\"}"),
        Some(0.0)
    );
}
