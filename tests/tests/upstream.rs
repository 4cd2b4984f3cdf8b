//! Upstream destinations under the policy, against a fake cloud server on loopback that
//! records every byte it receives (`tests/e2e/fake_upstream.py`, HTTPS with its own CA
//! given to the destination as `ca_file`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::*;

struct Fake {
    _guard: Guard,
    port: u16,
    log: PathBuf,
}

/// A CA (`ca.pem`, what the destination trusts) and a certificate for 127.0.0.1 signed
/// by it (openssl), and the fake upstream in `mode`.
fn fake(dir: &Path, mode: &str) -> Fake {
    let (cert, key) = (dir.join("up-cert.pem"), dir.join("up-key.pem"));
    if !cert.exists() {
        let run = |args: &[&str]| {
            let ok = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .stderr(Stdio::null())
                .status()
                .expect("openssl");
            assert!(ok.success(), "openssl {args:?}");
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=fake-ca",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.pem",
        ];
        a.extend(ec);
        run(&a);
        let mut a = vec![
            "req",
            "-subj",
            "/CN=fake-upstream",
            "-keyout",
            "up-key.pem",
            "-out",
            "up.csr",
        ];
        a.extend(ec);
        run(&a);
        std::fs::write(
            dir.join("up.ext"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "up.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "up.ext",
            "-out",
            "up-cert.pem",
        ]);
    }
    let log = dir.join(format!("upstream-{mode}.log"));
    let portfile = dir.join(format!("upstream-{mode}.port"));
    let _ = std::fs::remove_file(&portfile);
    std::fs::write(&log, b"").unwrap();
    let child = Command::new("python3")
        .arg(repo_root().join("tests/e2e/fake_upstream.py"))
        .args([&cert, &key, &log, &portfile])
        .arg(mode)
        .spawn()
        .unwrap();
    let guard = Guard(child);
    let t0 = Instant::now();
    let port = loop {
        if let Ok(p) = std::fs::read_to_string(&portfile) {
            if let Ok(p) = p.trim().parse() {
                break p;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "fake upstream did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Fake {
        _guard: guard,
        port,
        log,
    }
}

fn policy(port: u16, cert: &Path) -> String {
    format!(
        r#"
[destinations.local]
kind = "local"
model = "smollm2"

[destinations.cloud]
kind = "external"
url = "https://127.0.0.1:{port}/v1"
model = "cloud-large"
jurisdiction = "EU"
provider = "Fake Cloud"
ca_file = "{}"
credential = "cloud"
timeout_ms = 5000

[[rules]]
name = "patient data stays here"
classes = ["PHI"]
action = "allow"
destinations = ["local"]

[[rules]]
name = "personal data redacted"
classes = ["PII"]
action = "redact"
destinations = ["cloud", "local"]

[[rules]]
name = "the rest"
action = "allow"
destinations = ["cloud", "local"]

[aliases]
default = "cloud"
"#,
        cert.display()
    )
}

fn write_policy(dir: &Path, text: &str) {
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/policy.toml"), text).unwrap();
}

/// The test policy with no local fallback for requests without sensitive data.
fn cloud_only(policy: &str) -> String {
    policy.replace(
        "name = \"the rest\"\naction = \"allow\"\ndestinations = [\"cloud\", \"local\"]",
        "name = \"the rest\"\naction = \"allow\"\ndestinations = [\"cloud\"]",
    )
}

fn chat(s: &Server, key: &str, text: &str) -> (u16, serde_json::Value) {
    s.chat_status(key, "default", 4, text)
}

#[test]
fn only_what_policy_allows_reaches_the_cloud_redacted_and_restored() {
    let dir = scratch("upstream");
    let up = fake(&dir, "ok");
    write_policy(&dir, &policy(up.port, &dir.join("ca.pem")));
    // The credential, stored write-only through the CLI.
    let mut c = appliance()
        .args(["policy", "credential-set", "cloud", "--data-dir"])
        .arg(&dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(c.stdin.as_mut().unwrap(), b"sk-cloud-SECRET-7\n").unwrap();
    drop(c.stdin.take());
    assert!(c.wait().unwrap().success());
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();

    // Patient data: answered locally, not one byte to the cloud.
    let (code, v) = chat(&s, &key, "NHS number 943 476 5919: summarise the referral.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    assert_eq!(
        std::fs::read(&up.log).unwrap().len(),
        0,
        "PHI reached the upstream"
    );

    // Nothing sensitive: the cloud answers, with the stored credential.
    let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        answer,
        "UPSTREAM heard: Draft a note about the parking rules."
    );
    let seen = std::fs::read_to_string(&up.log).unwrap();
    assert!(seen.contains("Bearer sk-cloud-SECRET-7"), "{seen}");

    // Personal data: the cloud sees placeholders, the client the original values.
    let (code, v) = chat(
        &s,
        &key,
        "Email jane.doe@example.org and copy jane.doe@example.org.",
    );
    assert_eq!(code, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(
        answer,
        "UPSTREAM heard: Email jane.doe@example.org and copy jane.doe@example.org."
    );
    let seen = std::fs::read_to_string(&up.log).unwrap();
    assert!(!seen.contains("jane.doe"), "{seen}");
    assert!(seen.contains("Email [PII_1] and copy [PII_1]."), "{seen}");

    // The cloud goes down: the request falls back to the local model.
    drop(up);
    let (code, v) = chat(&s, &key, "Draft another note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let chats: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["action"] == "chat.completions")
        .collect();
    let dests: Vec<&str> = chats
        .iter()
        .map(|r| r["destination"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        dests,
        ["local/cpu", "cloud", "cloud", "local/cpu"],
        "{chats:?}"
    );
    assert_eq!(chats[2]["decision"], "redact: personal data redacted");
    // The secret is in no record and no persisted file but its own.
    let export = std::fs::read_to_string(dir.join("export.jsonl")).unwrap();
    assert!(!export.contains("SECRET"));
    assert!(all.iter().any(|r| r["action"] == "credential.set"));
}

#[test]
fn a_failing_cloud_without_a_local_fallback_is_a_clear_503() {
    let dir = scratch("upstream-500");
    let up = fake(&dir, "error500");
    let p = cloud_only(&policy(up.port, &dir.join("ca.pem")));
    write_policy(&dir, &p);
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_allowed_destination");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("cloud"),
        "{v}"
    );
    // It did try (and the body it sent was the request).
    assert!(std::fs::read_to_string(&up.log)
        .unwrap()
        .contains("parking rules"));
}

/// How often `needle` is in what the fake upstream has logged so far.
fn log_count(up: &Fake, needle: &str) -> usize {
    std::fs::read_to_string(&up.log)
        .unwrap()
        .matches(needle)
        .count()
}

/// Chat requests the fake upstream has received so far.
fn received(up: &Fake) -> usize {
    log_count(up, "\"messages\"")
}

#[test]
fn a_failing_upstream_opens_its_circuit_and_is_probed_after_the_cooldown() {
    let dir = scratch("upstream-breaker");
    let up = fake(&dir, "error500");
    let p = policy(up.port, &dir.join("ca.pem")).replace(
        "timeout_ms = 5000",
        "timeout_ms = 5000\nbreaker_failures = 2\nbreaker_cooldown_ms = 6000",
    );
    write_policy(&dir, &p);
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let ask = || {
        let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["model"], "smollm2", "served by the local fallback");
    };
    ask();
    ask();
    assert_eq!(received(&up), 2);
    let opened = std::time::Instant::now();
    // Open: the upstream is not even tried. (The cooldown is long enough for two local
    // answers on a loaded machine; the assertion below says so if it was not.)
    ask();
    ask();
    assert!(
        opened.elapsed() < Duration::from_millis(6000),
        "asks too slow for the test"
    );
    assert_eq!(received(&up), 2);
    // After the cooldown one probe goes through; it fails, and the circuit opens again.
    std::thread::sleep(Duration::from_millis(6100).saturating_sub(opened.elapsed()));
    ask();
    assert_eq!(received(&up), 3);
    ask();
    assert_eq!(received(&up), 3);
}

#[test]
fn a_certificate_from_another_ca_is_refused() {
    let dir = scratch("upstream-wrong-ca");
    let up = fake(&dir, "ok");
    // Another CA, made the same way in another directory.
    let other = scratch("upstream-other-ca");
    let _other_up = fake(&other, "ok");
    let p = cloud_only(&policy(up.port, &other.join("ca.pem")));
    write_policy(&dir, &p);
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_allowed_destination");
    assert_eq!(
        received(&up),
        0,
        "a request was sent over an unverified connection"
    );
}

#[test]
fn a_classifier_over_its_budget_keeps_the_request_local() {
    let dir = scratch("upstream-budget");
    let up = fake(&dir, "ok");
    // A budget no classification can meet: every request counts as unclassified.
    let p = format!(
        "[classification]\nbudget_ms = 0\n{}",
        policy(up.port, &dir.join("ca.pem"))
    );
    write_policy(&dir, &p);
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    assert_eq!(
        received(&up),
        0,
        "an unclassified request left the appliance"
    );
    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let r = all
        .iter()
        .find(|r| r["action"] == "chat.completions")
        .unwrap();
    assert!(
        r["decision"].as_str().unwrap().contains("over its budget"),
        "{r}"
    );
    assert_eq!(r["destination"], "local/cpu");
}

/// A request through curl, its answer kept whole: (status, the JSON body, or the
/// `data:` payloads of a stream with `[DONE]` as a string).
fn post(
    s: &Server,
    key: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, Vec<serde_json::Value>) {
    let (code, text) = s.post_json(key, path, &body);
    if !text.starts_with("data:") {
        return (code, vec![serde_json::from_str(&text).unwrap_or_default()]);
    }
    let events = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|_| serde_json::Value::from(d)))
        .collect();
    (code, events)
}

/// The text a stream carried (chat deltas or completion texts).
fn streamed_text(events: &[serde_json::Value]) -> String {
    events
        .iter()
        .filter_map(|e| {
            let c = &e["choices"][0];
            c["delta"]["content"].as_str().or(c["text"].as_str())
        })
        .collect()
}

fn connections(up: &Fake) -> usize {
    log_count(up, "CONNECTION\n")
}

#[test]
fn streams_and_text_completions_go_upstream_with_placeholders_restored() {
    let dir = scratch("upstream-stream");
    let up = fake(&dir, "ok");
    write_policy(&dir, &policy(up.port, &dir.join("ca.pem")));
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let said = "Write to jane.doe@example.org about the parking rules.";

    // A streamed chat with personal data: the upstream sees a placeholder (split across
    // its events on the way back), the client the address.
    let (code, events) = post(
        &s,
        &key,
        "/v1/chat/completions",
        serde_json::json!({"model": "default", "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": said}]}),
    );
    assert_eq!(code, 200);
    assert_eq!(
        streamed_text(&events),
        format!("UPSTREAM heard: {said}"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(events
        .iter()
        .all(|e| e == "[DONE]" || e["id"].as_str().unwrap().starts_with("chatcmpl-")));
    let usage = &events[events.len() - 2]["usage"];
    assert_eq!(usage["prompt_tokens"], 11, "{events:?}");
    let seen = std::fs::read_to_string(&up.log).unwrap();
    assert!(!seen.contains("jane.doe"), "{seen}");
    assert!(seen.contains("Write to [PII_1] about"), "{seen}");

    // Text completions, whole and streamed.
    let (code, v) = post(
        &s,
        &key,
        "/v1/completions",
        serde_json::json!({"model": "default", "prompt": "Parking rules:", "max_tokens": 5}),
    );
    assert_eq!(code, 200, "{v:?}");
    assert_eq!(v[0]["choices"][0]["text"], "UPSTREAM heard: Parking rules:");
    assert_eq!(v[0]["model"], "cloud-large");
    assert_eq!(v[0]["usage"]["completion_tokens"], 7);
    let (code, events) = post(
        &s,
        &key,
        "/v1/completions",
        serde_json::json!({"model": "default", "prompt": "Parking rules:", "stream": true}),
    );
    assert_eq!(code, 200);
    assert_eq!(streamed_text(&events), "UPSTREAM heard: Parking rules:");
    assert_eq!(events.last().unwrap(), "[DONE]");

    // Three requests, one connection: it is kept alive and reused.
    assert_eq!(received(&up) + seen_prompts(&up), 3);
    assert_eq!(
        connections(&up),
        1,
        "{}",
        std::fs::read_to_string(&up.log).unwrap()
    );

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let sent: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["action"] == "chat.completions" || r["action"] == "completions")
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    for r in &sent {
        assert_eq!(r["destination"], "cloud", "{r}");
        assert_eq!(r["jurisdiction"], "EU", "{r}");
        assert_eq!(r["status"], 200, "{r}");
    }
    assert_eq!(sent[0]["decision"], "redact: personal data redacted");
}

fn seen_prompts(up: &Fake) -> usize {
    log_count(up, "\"prompt\"")
}

fn stream_chat(s: &Server, key: &str) -> (u16, Vec<serde_json::Value>) {
    post(
        s,
        key,
        "/v1/chat/completions",
        serde_json::json!({"model": "default", "stream": true, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Draft a note about the parking rules."}]}),
    )
}

#[test]
fn a_stream_that_breaks_before_its_first_event_falls_back_to_the_local_model() {
    let dir = scratch("upstream-dropfirst");
    let up = fake(&dir, "dropfirst");
    write_policy(&dir, &policy(up.port, &dir.join("ca.pem")));
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let (code, events) = stream_chat(&s, &key);
    assert_eq!(code, 200);
    assert_eq!(received(&up), 1, "it was tried");
    assert_eq!(events[0]["model"], "smollm2", "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    assert!(!streamed_text(&events).contains("UPSTREAM"));
}

#[test]
fn a_stream_that_breaks_midway_ends_with_an_error_event_and_is_recorded() {
    let dir = scratch("upstream-drop");
    let up = fake(&dir, "drop");
    write_policy(&dir, &policy(up.port, &dir.join("ca.pem")));
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let (code, events) = stream_chat(&s, &key);
    assert_eq!(code, 200, "the status line had gone out");
    // What came before the break reached the client; then an error, and no [DONE].
    assert_eq!(streamed_text(&events), "UPSTREAM h", "{events:?}");
    let last = events.last().unwrap();
    assert_eq!(last["error"]["code"], "upstream_failed", "{events:?}");
    assert!(!events.iter().any(|e| e == "[DONE]"));
    assert_eq!(received(&up), 1, "no second try once the client had bytes");
    let dir = s.dir.clone();
    drop(s);
    let r = audit_records(&dir)
        .into_iter()
        .find(|r| r["action"] == "chat.completions")
        .unwrap();
    assert_eq!(r["status"], 502, "{r}");
    assert_eq!(r["error"], "upstream_failed", "{r}");
    assert_eq!(r["destination"], "cloud", "{r}");
}

#[test]
fn a_slow_upstream_times_out_and_the_request_falls_back() {
    let dir = scratch("upstream-slow");
    let up = fake(&dir, "slow");
    let p = policy(up.port, &dir.join("ca.pem")).replace("timeout_ms = 5000", "timeout_ms = 500");
    write_policy(&dir, &p);
    let s = Server::start_in(dir.clone(), &[], None, None);
    let key = s.key();
    let t0 = Instant::now();
    let (code, v) = chat(&s, &key, "Draft a note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "it waited for the slow upstream"
    );
}
