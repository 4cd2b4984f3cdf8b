//! Helpers for the end-to-end tests in `tests/tests/`: where the real binary and the
//! real model are, and a child process that is killed when dropped.

use std::path::PathBuf;
use std::process::{Child, Command};

pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The `appliance` binary of the same build profile as this test (built by the test
/// command before the tests run).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/appliance
    let p = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("appliance");
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build --release -p appliance; scripts/test does)",
        p.display()
    );
    p
}

pub fn model() -> PathBuf {
    let p = repo_root().join("models").join(MODEL_FILE);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch-model",
        p.display()
    );
    p
}

pub fn appliance() -> Command {
    let mut c = Command::new(binary());
    c.env("APPLIANCE_LOG", "info");
    c
}

/// A child process killed on drop, so a failing test leaves nothing behind.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("appliance-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}
