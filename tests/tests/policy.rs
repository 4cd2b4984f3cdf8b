//! The sovereignty policy in the running daemon: requests are classified, decided and
//! routed by the site's policy; the decision is in each audit record; a policy is reloaded
//! on SIGHUP, and an invalid one never replaces the one in force.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::*;

fn example(name: &str) -> String {
    std::fs::read_to_string(
        repo_root()
            .join("policy/examples")
            .join(name)
            .join("policy.toml"),
    )
    .unwrap()
}

fn with_policy(name: &str, policy: &str) -> PathBuf {
    let dir = scratch(name);
    std::fs::create_dir_all(dir.join("policy")).unwrap();
    std::fs::write(dir.join("policy/policy.toml"), policy).unwrap();
    dir
}

fn chat(s: &Server, key: &str, model: &str, text: &str) -> (u16, serde_json::Value) {
    s.chat_status(key, model, 2, text)
}

fn hup(s: &Server) {
    Command::new("kill")
        .args(["-HUP", &s.pid().to_string()])
        .status()
        .unwrap();
}

#[test]
fn requests_are_classified_decided_and_recorded() {
    // The example's upstreams, made unreachable at once (a closed loopback port): every
    // request the policy would send there falls back to the local model.
    let hospital = example("hospital")
        .replace("https://api.eu-cloud.example/v1", "https://127.0.0.1:9/v1")
        .replace(
            "https://vllm.hospital.internal/v1",
            "https://127.0.0.1:9/v1",
        );
    let dir = with_policy("policy-hospital", &hospital);
    let s = Server::start_in(dir, &[], None, None);
    let key = s.key();

    // Explain: the decision, sending nothing; admin keys only.
    let admin = s.cli(&["key", "create", "--tenant", "acme", "--admin"]);
    let body = serde_json::json!({
        "tenant": "research",
        "request": {"model": "gpt-4o", "messages": [
            {"role": "system", "content": "You are a clerk."},
            {"role": "user", "content": "Patient MRN-1234567, born 12/03/1980."}]},
    })
    .to_string();
    let explain = |key: &str| {
        let (out, _) = s.curl(&[
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-d",
            &body,
            &s.url("/v1/policy/explain"),
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = explain(&admin);
    assert_eq!(v["rule"], "patient data stays on the appliance", "{v}");
    assert_eq!(v["classes"], serde_json::json!(["PHI"]));
    assert_eq!(v["local_model"], "smollm2");
    let spans: Vec<(u64, u64, u64)> = v["detections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["part"].as_u64().unwrap(),
                d["start"].as_u64().unwrap(),
                d["end"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(spans, [(1, 8, 19), (1, 26, 36)], "{v}");
    assert_eq!(explain(&key)["error"]["code"], "wrong_key_scope");
    // The same from the command line: the tenant must exist, and a model is only said
    // to serve a request if it runs here.
    let cli_explain = |tenant: &str, model: &str| {
        let req = s.dir.join("explain.json");
        let body = serde_json::json!({"model": model, "messages": [
            {"role": "user", "content": "Patient MRN-1234567, born 12/03/1980."}]});
        std::fs::write(&req, body.to_string()).unwrap();
        appliance()
            .args(["policy", "explain", "--tenant", tenant, "--file"])
            .arg(&req)
            .arg("--data-dir")
            .arg(&s.dir)
            .output()
            .unwrap()
    };
    let out = cli_explain("acme", "gpt-4o");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["outcome"], "served by the local model smollm2", "{v}");
    let out = cli_explain("acme", "nonexistent");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chosen"], serde_json::Value::Null, "{v}");
    assert!(
        v["outcome"]
            .as_str()
            .unwrap()
            .contains("404 model_not_found"),
        "{v}"
    );
    let out = cli_explain("ghost", "smollm2");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no tenant named \"ghost\""), "{err}");

    // Patient data: allowed, on the appliance.
    let (code, v) = chat(
        &s,
        &key,
        "smollm2",
        "Summarise the discharge summary for MRN-1234567.",
    );
    assert_eq!(code, 200, "{v}");
    // Card data: refused by rule, without echoing it.
    let (code, v) = chat(
        &s,
        &key,
        "smollm2",
        "Charge 4111 1111 1111 1111 for the parking.",
    );
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["error"]["code"], "policy_denied");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("PCI") && !msg.contains("4111"), "{msg}");
    // An alias: the policy picks the first allowed local model.
    let (code, v) = chat(&s, &key, "gpt-4o", "Draft a note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    // A cloud destination's model, the cloud unreachable: the rule's local model answers;
    // an unknown model is unknown.
    let (code, v) = chat(&s, &key, "large-2", "Draft a note about the parking rules.");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    let (code, v) = chat(
        &s,
        &key,
        "nonexistent",
        "Draft a note about the parking rules.",
    );
    assert_eq!(code, 404, "{v}");

    // Reload: a new valid policy (card data now allowed locally) is put in force.
    let relaxed = hospital.replace(
        "name = \"card data is refused\"\nclasses = [\"PCI\"]\naction = \"deny\"",
        "name = \"card data locally\"\nclasses = [\"PCI\"]\naction = \"allow\"\ndestinations = [\"local\"]",
    );
    assert_ne!(relaxed, hospital);
    std::fs::write(s.dir.join("policy/policy.toml"), &relaxed).unwrap();
    hup(&s);
    let t0 = Instant::now();
    loop {
        let (code, _) = chat(&s, &key, "smollm2", "Charge 4111 1111 1111 1111 please.");
        if code == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new policy was not loaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An invalid policy is refused: the one in force stays, requests unaffected.
    std::fs::write(
        s.dir.join("policy/policy.toml"),
        relaxed.replace("action = \"redact\"", "action = \"refuse\""),
    )
    .unwrap();
    let out = appliance()
        .args(["policy", "check"])
        .arg(s.dir.join("policy"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.toml:") && err.contains("action \"refuse\""),
        "{err}"
    );
    hup(&s);
    std::thread::sleep(Duration::from_millis(500));
    let (code, _) = chat(&s, &key, "smollm2", "Charge 4111 1111 1111 1111 please.");
    assert_eq!(code, 200, "the refused policy replaced the good one");

    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let chats: Vec<&serde_json::Value> = all
        .iter()
        .filter(|r| r["action"] == "chat.completions")
        .collect();
    let first = appliance_policy_version(&hospital);
    assert_eq!(chats[0]["classes"], serde_json::json!(["PHI"]));
    assert_eq!(
        chats[0]["decision"],
        "allow: patient data stays on the appliance"
    );
    assert_eq!(chats[0]["policy_version"], first.as_str());
    assert_eq!(chats[1]["status"], 403);
    assert_eq!(chats[1]["classes"], serde_json::json!(["PCI"]));
    assert_eq!(chats[1]["decision"], "deny: card data is refused");
    assert_eq!(chats[2]["classes"], serde_json::json!(["public"]));
    assert_eq!(chats[2]["resource"], "smollm2");
    let last = chats.last().unwrap();
    assert_eq!(last["decision"], "allow: card data locally");
    assert_ne!(last["policy_version"], first.as_str());
    let actions: Vec<&str> = all.iter().filter_map(|r| r["action"].as_str()).collect();
    assert!(
        actions.iter().filter(|a| **a == "policy.load").count() >= 2,
        "{actions:?}"
    );
    assert!(actions.contains(&"policy.reject"), "{actions:?}");
    // No text of any request in any record.
    let text = std::fs::read_to_string(dir.join("export.jsonl")).unwrap();
    assert!(!text.contains("4111") && !text.contains("MRN-1234567"));
}

/// The version the appliance gives a policy text (sha256: + 16 hex digits).
fn appliance_policy_version(text: &str) -> String {
    let f = scratch("policy-version").join("policy.toml");
    std::fs::write(&f, text).unwrap();
    let out = appliance()
        .args(["policy", "check"])
        .arg(&f)
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    let at = s.find("(sha256:").unwrap();
    s[at + 1..at + 24].to_string()
}

#[test]
fn an_hmac_policy_records_a_checkable_digest_of_the_content_and_nothing_else() {
    let bank = example("bank").replace("model = \"qwen2.5-72b-instruct\"", "model = \"big\"");
    let dir = with_policy("policy-bank", &bank);
    let s = Server::start_in(dir, &[], None, None);
    let key = s.key();
    let text = "Summarise the merger memo for the board.";
    let (code, v) = chat(&s, &key, "smollm2", text);
    assert_eq!(code, 200, "{v}");
    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let r = all
        .iter()
        .find(|r| r["action"] == "chat.completions")
        .unwrap();
    assert_eq!(r["classes"], serde_json::json!(["confidential"]));
    let content = r["content"].as_str().unwrap();
    // An auditor holding the text and the site's key gets the same digest.
    let key_hex = std::fs::read_to_string(dir.join("audit/content.key")).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import hmac, hashlib; print('hmac-sha256:' + hmac.new(bytes.fromhex({:?}), {:?}.encode(), hashlib.sha256).hexdigest())",
            key_hex.trim(),
            text
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), content);
    let load = all.iter().find(|r| r["action"] == "policy.load").unwrap();
    assert!(
        load["detail"].as_str().unwrap().contains("content hmac"),
        "{load}"
    );
    let export = std::fs::read_to_string(dir.join("export.jsonl")).unwrap();
    assert!(!export.contains("merger memo"));
}

#[test]
fn an_encrypted_policy_seals_the_texts_for_the_auditor_alone() {
    // The auditor makes a key pair away from the appliance; only the public half goes
    // into the policy.
    let keys = scratch("policy-sealed-keys");
    std::fs::create_dir_all(&keys).unwrap();
    let auditor_key = keys.join("auditor.key");
    let key_file = auditor_key.to_str().unwrap();
    let out = appliance_ok(&["audit", "content-keygen", "--out", key_file]);
    let line = out.trim().to_string();
    assert!(line.starts_with("content_recipient = \"x25519:"), "{line}");
    let secret = std::fs::read_to_string(keys.join("auditor.key")).unwrap();
    assert!(!secret.contains(&line[21..line.len() - 1]));
    let policy = example("consortium").replace(
        "[audit]\n",
        &format!("[audit]\ncontent = \"encrypted\"\n{line}\n"),
    );
    // Without its recipient, or with a bad one, the policy does not validate.
    for (broken, problem) in [
        (policy.replace(&line, ""), "needs audit.content_recipient"),
        (
            policy.replace(&line, "content_recipient = \"x25519:00ff\""),
            "not an X25519 public key",
        ),
    ] {
        let f = scratch("policy-sealed-broken").join("policy.toml");
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, &broken).unwrap();
        let out = appliance()
            .args(["policy", "check"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("policy.toml:") && err.contains(problem),
            "{err}"
        );
    }

    let dir = with_policy("policy-sealed", &policy);
    let s = Server::start_in(dir, &[], None, None);
    let key = s.key();
    let texts = [
        "Draft a note on the consortium budget.",
        "Member meeting moved to Thursday.",
    ];
    for t in texts {
        let (code, v) = chat(&s, &key, "smollm2", t);
        assert_eq!(code, 200, "{v}");
    }
    let dir = s.dir.clone();
    drop(s);
    let all = audit_records(&dir);
    let load = all.iter().find(|r| r["action"] == "policy.load").unwrap();
    assert!(
        load["detail"]
            .as_str()
            .unwrap()
            .contains("content encrypted"),
        "{load}"
    );
    let export = std::fs::read_to_string(dir.join("export.jsonl")).unwrap();
    for t in texts {
        assert!(!export.contains(t), "the text is in the export");
    }
    // Nothing on the appliance opens them: no content key was made.
    assert!(!dir.join("audit/content.key").exists());
    let export_file = dir.join("export.jsonl");
    let decrypt = |file: &std::path::Path| {
        run_appliance(&[
            "audit",
            "decrypt",
            file.to_str().unwrap(),
            "--key",
            key_file,
        ])
    };
    let out = decrypt(&export_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let opened: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<&str> = opened
        .iter()
        .map(|o| o["texts"][0].as_str().unwrap())
        .collect();
    assert_eq!(got, texts);
    // A sealed value copied onto another record does not open there; the command
    // names the line and fails.
    let mut lines: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let sealed: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i]["record"]["content"].is_string())
        .collect();
    let first = lines[sealed[0]]["record"]["content"].clone();
    lines[sealed[1]]["record"]["content"] = first;
    let moved = dir.join("moved.jsonl");
    std::fs::write(
        &moved,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    let out = decrypt(&moved);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("moved.jsonl:{}:", sealed[1] + 1)) && err.contains("does not open"),
        "{err}"
    );
}
