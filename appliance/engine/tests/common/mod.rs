//! Shared helpers for the engine's tests against the real model.

use std::path::PathBuf;

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The real model, fetched by `scripts/fetch-model`. Missing → a clear failure.
/// `APPLIANCE_AGREEMENT_MODEL` (with `APPLIANCE_AGREEMENT_FIXTURE`) points the agreement
/// tests at another file and its fixture from `tests/oracle/make_fixtures.py`.
pub fn model_path() -> PathBuf {
    let p = match std::env::var_os("APPLIANCE_AGREEMENT_MODEL") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("models").join(MODEL_FILE),
    };
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model (the test command does it for you)",
        p.display()
    );
    p
}

pub fn fixture() -> serde_json::Value {
    let p = match std::env::var_os("APPLIANCE_AGREEMENT_FIXTURE") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("tests/fixtures/llamacpp_smollm2-135m-instruct-q4_1.json"),
    };
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
