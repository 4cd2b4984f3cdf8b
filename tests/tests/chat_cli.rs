//! `appliance chat` with the real model, as a person would run it.

use appliance_tests::*;

#[test]
fn one_shot_chat_prints_only_a_coherent_answer() {
    let out = appliance()
        .args(["chat", "--model"])
        .arg(model())
        .args([
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-tokens",
            "32",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer = String::from_utf8(out.stdout).unwrap();
    assert!(answer.contains("Paris"), "answer: {answer:?}");
    assert!(
        !answer.contains("<|im_end|>") && !answer.contains("<|im_start|>"),
        "{answer:?}"
    );
}

#[test]
fn same_seed_same_answer_different_seed_differs() {
    let run = |seed: &str| {
        let out = appliance()
            .args(["chat", "--model"])
            .arg(model())
            .args([
                "--prompt",
                "Invent a name for a cat.",
                "--temperature",
                "1.0",
                "--max-tokens",
                "24",
            ])
            .args([
                "--seed",
                seed,
                "--top-p",
                "1",
                "--min-p",
                "0",
                "--repetition-penalty",
                "1",
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    let a = run("7");
    assert_eq!(a, run("7"));
    let others: Vec<String> = ["8", "9", "10"].iter().map(|s| run(s)).collect();
    assert!(
        others.iter().any(|o| *o != a),
        "three other seeds all gave {a:?}"
    );
}

#[test]
fn interactive_chat_keeps_the_conversation() {
    use std::io::Write;
    let greedy = [
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--repetition-penalty",
        "1",
    ];
    let mut child = appliance()
        .args(["chat", "--model"])
        .arg(model())
        .args(greedy)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "What is the capital of France?").unwrap();
        writeln!(stdin, "And of Italy?").unwrap();
        writeln!(stdin).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(answers.len(), 2, "two answers expected: {text:?}");
    // The same follow-up asked on its own (greedy, so deterministic) gets another
    // answer: the interactive one was conditioned on the first turn.
    let one_shot = |question: &str| {
        let out = appliance()
            .args(["chat", "--model"])
            .arg(model())
            .args(greedy)
            .args(["--prompt", question])
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_ne!(
        one_shot("And of Italy?"),
        answers[1].trim(),
        "the second answer ignored the conversation"
    );
    // And the first answer equals the one-shot answer to the first question.
    assert_eq!(
        one_shot("What is the capital of France?"),
        answers[0].trim()
    );
}

#[test]
fn a_missing_or_bad_model_file_is_a_clear_error() {
    let out = appliance()
        .args([
            "chat",
            "--model",
            "/nonexistent/model.gguf",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let dir = scratch("badmodel");
    let bad = dir.join("bad.gguf");
    std::fs::write(&bad, b"this is not a gguf file at all").unwrap();
    let out = appliance()
        .args(["chat", "--model"])
        .arg(&bad)
        .args(["--prompt", "hi"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.gguf") && err.contains("GGUF"), "{err}");
}

#[test]
fn a_missing_model_file_is_named_once_with_its_cause() {
    for args in [
        &["chat", "--model", "/nonexistent/m.gguf", "--prompt", "hi"][..],
        &["tokenize", "--model", "/nonexistent/m.gguf", "hi"][..],
    ] {
        let out = appliance().args(args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("/nonexistent/m.gguf"), "{err}");
        assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    }
}
