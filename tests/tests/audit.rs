//! The audit log end to end: one record per request whatever its outcome, tampering in
//! the SQLite file found and named, fail-closed under a held lock and a full disk,
//! records only in the journal kept through kill -9,
//! nothing answered lost to kill -9, and no prompt or completion text persisted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::*;

/// Runs Python's sqlite3 on the audit database (the tampering an attacker with file
/// access could do).
fn sql(dir: &Path, script: &str) {
    let db = dir.join("audit/audit.db");
    let program = format!(
        "import sqlite3, hashlib, sys\ndb = sqlite3.connect({:?})\n{script}\ndb.commit()\n",
        db.display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&program)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `appliance audit verify` on `dir`: (success, stdout + stderr).
fn verify(dir: &Path, extra: &[&str]) -> (bool, String) {
    let out = appliance()
        .args(["audit", "verify", "--data-dir"])
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The seq a failed verification names.
fn bad_seq(report: &str) -> u64 {
    let at = report
        .find("FAILED at record ")
        .unwrap_or_else(|| panic!("no record named: {report}"));
    report[at + 17..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One request with curl: (HTTP status, x-request-id).
fn request(s: &Server, args: &[&str]) -> (u16, String) {
    let mut all = vec![
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %header{x-request-id}",
    ];
    all.extend_from_slice(args);
    let (out, _) = s.curl(&all);
    let (code, id) = out.split_once(' ').unwrap_or((&out, ""));
    (code.parse().unwrap_or(0), id.trim().to_string())
}

fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}")
}

/// SIGTERM and wait: the daemon drains, records its stop and signs a last checkpoint.
fn stop(mut s: Server) -> PathBuf {
    let dir = s.dir.clone();
    Command::new("kill")
        .args(["-TERM", &s.pid().to_string()])
        .status()
        .unwrap();
    let t0 = Instant::now();
    while s.guard.0.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(30), "did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
    dir
}

#[test]
fn every_request_gets_exactly_one_complete_record() {
    let scratch_dir = scratch("audit-mix-model");
    let bad = scratch_dir.join("bad.gguf");
    std::fs::write(&bad, b"GGUF but not really a model").unwrap();
    let bad_arg = format!("bad={}", bad.display());
    let s = Server::start("audit-mix", &["--model", &bad_arg]);
    let key = s.key();
    let narrow = s.cli(&["key", "create", "--tenant", "acme", "--models", "other"]);
    let slow = s.cli(&["key", "create", "--tenant", "acme", "--rpm", "1"]);
    let chat = r#"{"model":"smollm2","max_tokens":2,"messages":[{"role":"user","content":"Hi"}]}"#;
    let models = s.url("/v1/models");
    let completions = s.url("/v1/chat/completions");
    // (status, request id, made with a valid key)
    let mut sent: Vec<(u16, String, bool)> = vec![];
    let mut expect = |want: u16, authed: bool, args: &[&str]| {
        let (code, id) = request(&s, args);
        assert_eq!(code, want, "{args:?}");
        assert!(id.starts_with("req_"), "no request id: {id:?}");
        sent.push((code, id, authed));
    };
    expect(200, true, &["-H", &bearer(&key), &models]);
    expect(200, true, &["-H", &bearer(&key), "-d", chat, &completions]);
    expect(
        401,
        false,
        &["-H", "Authorization: Bearer sk-appl-nope", &models],
    );
    expect(401, false, &[&models]);
    expect(
        403,
        true,
        &["-H", &bearer(&narrow), "-d", chat, &completions],
    );
    expect(404, false, &["-H", &bearer(&key), &s.url("/v1/nothing")]);
    expect(404, true, &["-H", &bearer(&key), &s.url("/v1/models/nope")]);
    expect(405, false, &["-X", "PUT", "-H", &bearer(&key), &models]);
    expect(200, true, &["-H", &bearer(&slow), "-d", chat, &completions]);
    expect(429, true, &["-H", &bearer(&slow), "-d", chat, &completions]);
    expect(
        400,
        true,
        &["-H", &bearer(&key), "-d", "{not json", &completions],
    );
    expect(
        400,
        true,
        &[
            "-H",
            &bearer(&key),
            "-d",
            r#"{"model":"smollm2","messages":[{"role":"user","content":"Hi"}],"temperature":9}"#,
            &completions,
        ],
    );
    expect(
        503,
        true,
        &[
            "-H",
            &bearer(&key),
            "-d",
            r#"{"model":"bad","messages":[{"role":"user","content":"Hi"}]}"#,
            &completions,
        ],
    );
    expect(200, false, &[&s.url("/metrics")]);
    // Health probes are the one unaudited route.
    let (code, probe) = request(&s, &[&s.url("/healthz")]);
    assert_eq!(code, 200);

    let dir = stop(s);
    let all = audit_records(&dir);
    for (code, id, authed) in &sent {
        let mine: Vec<&serde_json::Value> = all
            .iter()
            .filter(|r| r["request_id"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{id} ({code}): {mine:?}");
        let r = mine[0];
        assert_eq!(r["status"], *code, "{r}");
        for field in ["time", "node", "action", "source", "request_id"] {
            let v = r[field].as_str().unwrap_or("");
            assert!(!v.is_empty(), "{field} empty in {r}");
        }
        assert!(r["seq"].as_u64().unwrap() > 0);
        if *authed {
            assert_eq!(r["tenant"], "acme", "{r}");
            assert!(r["key_id"].as_str().is_some_and(|k| k.len() == 16), "{r}");
        }
        if *code >= 400 {
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
        }
    }
    assert!(all.iter().all(|r| r["request_id"] != probe.as_str()));
    // The generation's record carries its tokens, model and destination.
    let gen = all
        .iter()
        .find(|r| r["request_id"] == sent[1].1.as_str())
        .unwrap();
    assert_eq!(gen["action"], "chat.completions");
    assert_eq!(gen["resource"], "smollm2");
    assert_eq!(gen["destination"], "local/cpu");
    assert_eq!(gen["completion_tokens"], 2);
    assert!(gen["prompt_tokens"].as_u64().unwrap() > 0);
    // Admin actions and the daemon's life are there too.
    let actions: Vec<&str> = all.iter().filter_map(|r| r["action"].as_str()).collect();
    for a in ["tenant.create", "key.create", "daemon.start", "daemon.stop"] {
        assert!(actions.contains(&a), "no {a} in {actions:?}");
    }
    let key_create = all.iter().find(|r| r["action"] == "key.create").unwrap();
    assert_eq!(key_create["source"], "local");
    assert!(key_create["user"].as_str().is_some_and(|u| !u.is_empty()));
    // The request ids are all different records: exactly one per request.
    let ids: std::collections::BTreeSet<&str> = all
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    assert_eq!(
        ids.len(),
        all.iter().filter(|r| r["request_id"].is_string()).count()
    );
}

/// A stopped log of some records, copied for each tampering.
fn stopped_log(name: &str) -> PathBuf {
    let s = Server::start(name, &[]);
    let key = s.key();
    for _ in 0..12 {
        let (code, _) = request(&s, &["-H", &bearer(&key), &s.url("/v1/models")]);
        assert_eq!(code, 200);
    }
    let dir = stop(s);
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
    dir
}

fn copy_of(dir: &Path, name: &str) -> PathBuf {
    let to = scratch(name);
    std::fs::remove_dir_all(&to).unwrap();
    let ok = Command::new("cp")
        .arg("-a")
        .arg(dir)
        .arg(&to)
        .status()
        .unwrap();
    assert!(ok.success());
    to
}

/// `appliance serve` exits at start with `why` in its error, and `tenant create` (an
/// audited admin action) fails with it too.
fn refuses_to_append(dir: &Path, why: &str) {
    let mut serve = appliance()
        .args(["serve", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("the daemon started on an altered log ({why})");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("does not verify") && err.contains(why),
        "{err}"
    );
    let out = appliance()
        .args(["tenant", "create", "late", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(why), "{err}");
}

#[test]
fn tampering_with_the_database_is_found_at_the_first_bad_record() {
    let base = stopped_log("audit-tamper");

    let d = copy_of(&base, "audit-tamper-field");
    sql(
        &d,
        r#"db.execute("UPDATE audit_records SET body = replace(body, '\"status\":200', '\"status\":201') WHERE seq = 6")"#,
    );
    let (ok, report) = verify(&d, &[]);
    assert!(!ok);
    assert_eq!(bad_seq(&report), 6, "{report}");
    // Neither the daemon nor an audited admin command appends to it.
    refuses_to_append(&d, "record 6 was altered");

    let d = copy_of(&base, "audit-tamper-delete");
    sql(&d, "db.execute('DELETE FROM audit_records WHERE seq = 7')");
    let (ok, report) = verify(&d, &[]);
    assert!(!ok);
    assert_eq!(bad_seq(&report), 7, "{report}");
    refuses_to_append(&d, "record 7 is missing");

    let d = copy_of(&base, "audit-tamper-swap");
    sql(
        &d,
        "a = db.execute('SELECT time_ms, leaf, body FROM audit_records WHERE seq = 8').fetchone()
b = db.execute('SELECT time_ms, leaf, body FROM audit_records WHERE seq = 9').fetchone()
db.execute('UPDATE audit_records SET time_ms=?, leaf=?, body=? WHERE seq = 8', b)
db.execute('UPDATE audit_records SET time_ms=?, leaf=?, body=? WHERE seq = 9', a)",
    );
    let (ok, report) = verify(&d, &[]);
    assert!(!ok);
    assert_eq!(bad_seq(&report), 8, "{report}");

    let d = copy_of(&base, "audit-tamper-insert");
    sql(
        &d,
        "db.execute('UPDATE audit_records SET seq = seq + 1000000 WHERE seq >= 5')
db.execute('UPDATE audit_records SET seq = seq - 999999 WHERE seq >= 1000000')
db.execute('INSERT INTO audit_records (seq, time_ms, leaf, body) SELECT 5, time_ms, leaf, body FROM audit_records WHERE seq = 4')",
    );
    let (ok, report) = verify(&d, &[]);
    assert!(!ok);
    assert_eq!(bad_seq(&report), 5, "{report}");

    // A field changed and its stored hash recomputed: the signed checkpoint catches it.
    let d = copy_of(&base, "audit-tamper-rehash");
    sql(
        &d,
        r#"body = db.execute('SELECT body FROM audit_records WHERE seq = 10').fetchone()[0].replace('"status":200', '"status":201')
leaf = hashlib.sha256(b'\x00' + body.encode()).digest()
db.execute('UPDATE audit_records SET body = ?, leaf = ? WHERE seq = 10', (body, leaf))"#,
    );
    let (ok, report) = verify(&d, &[]);
    assert!(!ok, "{report}");
    assert!(bad_seq(&report) <= 10, "{report}");
    assert!(report.contains("checkpoint"), "{report}");

    // Truncated and rebuilt into a self-consistent log (re-signed with the same key):
    // an older checkpoint kept elsewhere exposes it.
    let d = copy_of(&base, "audit-tamper-rebuild");
    let out = appliance()
        .args(["audit", "checkpoint", "--data-dir"])
        .arg(&d)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kept = d.parent().unwrap().join("audit-tamper-kept.note");
    std::fs::write(&kept, &out.stdout).unwrap();
    sql(
        &d,
        "db.execute('DELETE FROM audit_records WHERE seq > 5')
db.execute('DELETE FROM audit_checkpoints WHERE size > 5')",
    );
    let s = Server::start_in(d.clone(), &[], None, None);
    let key = s.key();
    for _ in 0..30 {
        request(&s, &["-H", &bearer(&key), &s.url("/v1/models")]);
    }
    let d = stop(s);
    let (ok, report) = verify(&d, &[]);
    assert!(ok, "the rebuilt log is self-consistent: {report}");
    let (ok, report) = verify(&d, &["--checkpoint", kept.to_str().unwrap()]);
    assert!(!ok, "{report}");
    assert!(report.contains("FAILED"), "{report}");
    // And a checkpoint from another key is refused outright.
    let other = copy_of(&base, "audit-tamper-otherkey");
    std::fs::remove_file(other.join("audit/signing.key")).unwrap();
    std::fs::remove_file(other.join("audit/public.key")).unwrap();
    let (ok, report) = verify(
        &other,
        &[
            "--public-key",
            base.join("audit/public.key").to_str().unwrap(),
        ],
    );
    assert!(ok, "{report}");
    // A key file that is not there is named as such, not as a malformed key.
    let (ok, report) = verify(&base, &["--public-key", "/nonexistent/auditor.key"]);
    assert!(!ok);
    assert!(report.contains("no such file"), "{report}");
    let (ok, report) = verify(&scratch("audit-no-log"), &[]);
    assert!(!ok);
    assert!(report.contains("public.key is missing"), "{report}");
}

/// An admin action from the command line is recorded before it is done: when the log
/// cannot be written, nothing is done. A refused duplicate is recorded once, as refused.
#[test]
fn a_tenant_the_log_cannot_tell_of_is_not_created() {
    let dir = scratch("audit-tenant-first");
    let data = dir.to_str().unwrap();
    appliance_ok(&["tenant", "create", "first", "--data-dir", data]);
    let out = run_appliance(&["tenant", "create", "first", "--data-dir", data]);
    assert!(!out.status.success());
    let creates = |dir: &std::path::Path| -> Vec<(u64, String)> {
        audit_records(dir)
            .iter()
            .filter(|r| r["action"] == "tenant.create")
            .map(|r| {
                (
                    r["status"].as_u64().unwrap(),
                    r["tenant"].as_str().unwrap_or("").into(),
                )
            })
            .collect()
    };
    let seen = creates(&dir);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0], (200, "first".to_string()));
    assert_eq!(seen[1], (400, "first".to_string()), "{seen:?}");
    // The log's signing key spoilt: no record can be written, so no tenant is made.
    std::fs::write(dir.join("audit/signing.key"), "not a key\n").unwrap();
    let out = run_appliance(&["tenant", "create", "second", "--data-dir", data]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the tenant was not created"), "{err}");
    let list = appliance_ok(&["tenant", "list", "--data-dir", data]);
    assert_eq!(list.trim(), "first", "{list}");
}

/// Small journal files: the log takes ~40 records while its store cannot be written.
const FAST_AUDIT: &str =
    "[audit]\nlock_timeout_ms = 300\ncheckpoint_interval_secs = 1\njournal_kib = 16\n";

#[test]
fn a_lock_held_by_another_process_refuses_requests_until_it_is_released() {
    let s = Server::start_with_config("audit-lock", &[], Some(FAST_AUDIT));
    let key = s.key();
    let models = s.url("/v1/models");
    let (code, _) = request(&s, &["-H", &bearer(&key), &models]);
    assert_eq!(code, 200);
    // Another process takes the database's write lock and holds it.
    let mut holder = hold_lock(&s.dir.join("audit/audit.db"));
    // The journal takes records while the store is locked (each answered request is in
    // it); once it is full, nothing is answered without a record.
    let mut answered = vec![];
    let mut full = false;
    for _ in 0..300 {
        let (code, id) = request(&s, &["-H", &bearer(&key), &models]);
        match code {
            200 => answered.push(id),
            503 => {
                full = true;
                break;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(full, "a full journal never refused a request");
    assert!(!answered.is_empty(), "the journal took no record");
    for body in [
        None,
        Some(r#"{"model":"smollm2","max_tokens":2,"messages":[{"role":"user","content":"Hi"}]}"#),
    ] {
        let (out, _) = match body {
            None => s.curl(&["-H", &bearer(&key), &models]),
            Some(b) => s.curl(&["-H", &bearer(&key), "-d", b, &s.url("/v1/chat/completions")]),
        };
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["code"], "audit_unavailable", "{out}");
    }
    let (code, id_refused) = request(&s, &["-H", &bearer(&key), &models]);
    assert_eq!(code, 503);
    // Released: service resumes by itself.
    drop(holder.stdin.take());
    holder.wait().unwrap();
    let t0 = Instant::now();
    let id_ok = loop {
        let (code, id) = request(&s, &["-H", &bearer(&key), &models]);
        if code == 200 {
            break id;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "did not recover");
    };
    let dir = stop(s);
    let all = audit_records(&dir);
    for id in answered.iter().chain([&id_ok]) {
        assert!(
            all.iter().any(|r| r["request_id"] == id.as_str()),
            "answered {id} has no record"
        );
    }
    assert!(all.iter().all(|r| r["request_id"] != id_refused.as_str()));
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
}

#[test]
fn a_full_disk_refuses_requests_and_service_resumes_when_space_returns() {
    let dir = scratch("audit-diskfull");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        mounted,
        "this test needs to mount a small tmpfs (run the suite as root)"
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    std::fs::write(dir.join("appliance.toml"), FAST_AUDIT).unwrap();
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let models = s.url("/v1/models");
    let (code, _) = request(&s, &["-H", &bearer(&key), &models]);
    assert_eq!(code, 200);
    // Fill the file system.
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    let chunk = vec![0u8; 64 << 10];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
    drop(f);
    // Records still go to the journal (its files are written in place); once they are
    // full and SQLite has no room, nothing is answered without a record.
    let mut answered = vec![];
    let mut refused = 0;
    for _ in 0..600 {
        let (code, id) = request(&s, &["-H", &bearer(&key), &models]);
        match code {
            200 => answered.push(id),
            503 => {
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(refused >= 5, "the full disk never refused a request");
    std::fs::remove_file(&filler).unwrap();
    let t0 = Instant::now();
    loop {
        let (code, id) = request(&s, &["-H", &bearer(&key), &models]);
        if code == 200 {
            answered.push(id);
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "did not recover");
    }
    let dir = stop(s);
    let all = audit_records(&dir);
    for id in &answered {
        assert!(
            all.iter().any(|r| r["request_id"] == id.as_str()),
            "answered {id} has no record"
        );
    }
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
}

/// Another process holds `audit.db`'s write lock until its stdin closes.
fn hold_lock(db: &Path) -> std::process::Child {
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import sqlite3, sys\ndb = sqlite3.connect({:?}, isolation_level=None)\ndb.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\nsys.stdin.read()\ndb.execute('ROLLBACK')\n",
            db.display().to_string()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    holder
}

#[test]
fn records_only_in_the_journal_survive_kill_9_and_verify_names_them() {
    let s = Server::start("audit-journal", &[]);
    let key = s.key();
    let models = s.url("/v1/models");
    assert_eq!(request(&s, &["-H", &bearer(&key), &models]).0, 200);
    // With audit.db locked, answered requests are recorded in the journal only.
    let mut holder = hold_lock(&s.dir.join("audit/audit.db"));
    let mut answered = vec![];
    for _ in 0..5 {
        let (code, id) = request(&s, &["-H", &bearer(&key), &models]);
        assert_eq!(code, 200);
        answered.push(id);
    }
    let dir = s.dir.clone();
    let mut s = s;
    s.guard.0.kill().unwrap();
    s.guard.0.wait().unwrap();
    drop(s);
    drop(holder.stdin.take());
    holder.wait().unwrap();
    // Offline, verify checks audit.db and says what only the journal has.
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
    assert!(
        report.contains("in the journal but not yet in audit.db"),
        "{report}"
    );
    // The next start applies the journal: every answered request is in the log.
    let s = Server::start_in(dir, &[], None, None);
    let dir = stop(s);
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
    assert!(!report.contains("in the journal"), "{report}");
    let all = audit_records(&dir);
    for id in &answered {
        assert_eq!(
            all.iter()
                .filter(|r| r["request_id"] == id.as_str())
                .count(),
            1,
            "answered {id}: not exactly one record"
        );
    }
}

#[test]
fn kill_9_under_load_loses_no_answered_request() {
    let s = Server::start("audit-kill9", &[]);
    let key = s.key();
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut clients = vec![];
    for _ in 0..3 {
        let (cert, url, key) = (s.cert(), s.url("/v1/models"), key.clone());
        clients.push(std::thread::spawn(move || {
            let mut answered = vec![];
            while Instant::now() < stop_at + Duration::from_secs(2) {
                let mut args: Vec<String> = vec![
                    "-s".into(),
                    "--noproxy".into(),
                    "*".into(),
                    "--cacert".into(),
                    cert.display().to_string(),
                    "-H".into(),
                    bearer(&key),
                    "-w".into(),
                    "%{http_code} %header{x-request-id}\\n".into(),
                ];
                for _ in 0..10 {
                    args.extend(["-o".into(), "/dev/null".into(), url.clone()]);
                }
                let out = Command::new("curl").args(&args).output().unwrap();
                for l in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some(id) = l.strip_prefix("200 ") {
                        answered.push(id.trim().to_string());
                    }
                }
            }
            answered
        }));
    }
    // Streams in flight when the daemon dies become interrupted records. The stream
    // starts just before the kill (its first line read), so that it cannot have ended
    // however fast the engine is.
    std::thread::sleep(stop_at.saturating_duration_since(Instant::now()));
    let (_stream, mut lines) = s.stream(
        &key,
        r#"{"model":"smollm2","stream":true,"max_tokens":400,"messages":[{"role":"user","content":"Write a long story."}]}"#,
    );
    assert!(lines.next().is_some());
    let dir = s.dir.clone();
    let mut s = s;
    s.guard.0.kill().unwrap();
    s.guard.0.wait().unwrap();
    let answered: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().unwrap())
        .collect();
    assert!(answered.len() > 20, "too little load: {}", answered.len());
    drop(s);
    // Restarted: the log verifies and holds every answered request.
    let s = Server::start_in(dir, &[], None, None);
    let dir = stop(s);
    let (ok, report) = verify(&dir, &[]);
    assert!(ok, "{report}");
    let all = audit_records(&dir);
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .filter_map(|r| r["request_id"].as_str())
        .collect();
    let lost: Vec<&String> = answered
        .iter()
        .filter(|i| !ids.contains(i.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} answered requests lost: {lost:?}",
        lost.len()
    );
    assert!(
        all.iter()
            .any(|r| r["action"] == "chat.completions" && r["error"] == "interrupted"),
        "the stream cut by kill -9 was not recorded as interrupted"
    );
}

#[test]
fn a_canary_in_prompts_and_completions_is_never_persisted() {
    const CANARY: &str = "CANARY-5f1c9e";
    let dir = scratch("audit-canary");
    let log = dir.with_extension("log");
    let _ = std::fs::remove_file(&log);
    let s = Server::start_in(dir, &[], None, Some(&log));
    let key = s.key();
    let prompt = format!("{CANARY} {CANARY} {CANARY} {CANARY}");
    let (out, ok) = s.curl(&[
        "-H",
        &bearer(&key),
        "-H",
        "Content-Type: application/json",
        "-d",
        &format!(r#"{{"model":"smollm2","prompt":"{prompt}","max_tokens":16,"temperature":0}}"#),
        &s.url("/v1/completions"),
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains(CANARY),
        "the model did not repeat the canary: {out}"
    );
    let (out, _) = s.chat(
        &key,
        &format!(r#"{{"model":"smollm2","stream":true,"max_tokens":16,"temperature":0,"messages":[{{"role":"user","content":"Say {CANARY}"}}]}}"#),
    );
    assert!(out.contains("[DONE]"));
    // Refused requests carrying it: out of range, and of the wrong type (whose error
    // message quotes the value back to the client, and nowhere else).
    s.chat(&key, &format!(r#"{{"model":"smollm2","temperature":9,"messages":[{{"role":"user","content":"{CANARY}"}}]}}"#));
    let (out, _) = s.chat(
        &key,
        &format!(r#"{{"model":"smollm2","messages":"{CANARY}"}}"#),
    );
    assert!(out.contains("invalid_request_error"), "{out}");
    let scan = |root: &Path| {
        let mut hits = vec![];
        let mut stack = vec![root.to_path_buf()];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().flatten().map(|e| e.path()));
            } else if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(CANARY.len()).any(|w| w == CANARY.as_bytes()) {
                    hits.push(p);
                }
            }
        }
        hits
    };
    // While running (WAL files present) and after a clean stop.
    let hits = scan(&s.dir);
    assert!(hits.is_empty(), "canary persisted in {hits:?}");
    let dir = stop(s);
    let mut hits = scan(&dir);
    hits.extend(scan(&log));
    assert!(hits.is_empty(), "canary persisted in {hits:?}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("status=200"),
        "the access log was not captured"
    );
}
