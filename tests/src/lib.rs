//! Helpers for the end-to-end tests in `tests/tests/`: where the real binary and the
//! real model are, and a child process that is killed when dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

/// Runs the appliance command with these arguments to its end.
pub fn run_appliance<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Output {
    appliance().args(args).output().unwrap()
}

/// Runs the appliance command, which must succeed; its standard output.
pub fn appliance_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = run_appliance(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    // Scratch directories of earlier runs whose process is gone (kept while it runs,
    // for a look after a failure): each holds a data directory with its audit journal.
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("appliance-e2e-")
                .and_then(|rest| rest.rsplit('-').next())
                .and_then(|p| p.split('.').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let path = e.path();
                let _ = match path.is_dir() {
                    true => std::fs::remove_dir_all(&path),
                    false => std::fs::remove_file(&path),
                };
            }
        }
    });
    let d = std::env::temp_dir().join(format!("appliance-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A running `appliance serve` on a scratch data directory, with tenant `acme`, the
/// real model as `smollm2`, and an ephemeral port; killed when dropped.
pub struct Server {
    pub guard: Guard,
    pub dir: PathBuf,
    pub port: u16,
    /// What `serve` printed before its data directory line (console address, setup link).
    pub banner: Vec<String>,
}

impl Server {
    pub fn start(name: &str, extra: &[&str]) -> Server {
        Server::start_with_config(name, extra, None)
    }

    pub fn start_with_config(name: &str, extra: &[&str], config: Option<&str>) -> Server {
        Server::start_in(scratch(name), extra, config, None)
    }

    /// Starts on `dir` (which may hold an earlier run's data); the daemon's log goes to
    /// `log` when given (else to this process's stderr).
    pub fn start_in(
        dir: PathBuf,
        extra: &[&str],
        config: Option<&str>,
        log: Option<&Path>,
    ) -> Server {
        if let Some(c) = config {
            std::fs::write(dir.join("appliance.toml"), c).unwrap();
        }
        if !dir.join("appliance.db").exists() {
            let out = appliance()
                .args(["tenant", "create", "acme", "--data-dir"])
                .arg(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut cmd = appliance();
        if let Some(log) = log {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            cmd.stderr(f);
        }
        let mut child = cmd
            .args(["serve", "--api-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .arg("--model")
            .arg(format!("smollm2={}", model().display()))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let guard = Guard(child);
        let mut lines = BufReader::new(stdout).lines();
        let mut banner = vec![];
        let port = loop {
            let line = lines
                .next()
                .expect("serve ended before printing its address")
                .unwrap();
            if let Some(url) = line.strip_prefix("appliance: API     https://") {
                let port = url.split(':').nth(1).unwrap().trim_end_matches("/v1");
                break port.parse().unwrap();
            }
        };
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.starts_with("appliance: data") {
                break;
            }
            banner.push(line);
        }
        // Keep draining stdout so the daemon never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        let s = Server {
            guard,
            dir,
            port,
            banner,
        };
        // Ready: every worker has finished starting (readyz needs only one ready), and
        // at least one is ready.
        let t0 = Instant::now();
        loop {
            let out = appliance()
                .args(["status", "--json", "--data-dir"])
                .arg(&s.dir)
                .output()
                .unwrap();
            let settled = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| {
                    let w = v["workers"].as_array()?.clone();
                    Some(
                        w.iter().any(|w| w["state"] == "ready")
                            && w.iter()
                                .all(|w| w["state"] != "starting" || w["restarts"] != 0),
                    )
                })
                .unwrap_or(false);
            if settled {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "not ready in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.guard.0.id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls/cert.pem")
    }

    /// Runs curl with the appliance's CA; returns (stdout, success).
    pub fn curl(&self, args: &[&str]) -> (String, bool) {
        let out = Command::new("curl")
            .args(["-sS", "--noproxy", "*", "--max-time", "120", "--cacert"])
            .arg(self.cert())
            .args(args)
            .output()
            .expect("curl");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            out.status.success(),
        )
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = appliance()
            .args(args)
            .arg("--data-dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    pub fn key(&self) -> String {
        self.cli(&["key", "create", "--tenant", "acme"])
    }

    pub fn chat(&self, key: &str, body: &str) -> (String, bool) {
        self.curl(&[
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            &self.url("/v1/chat/completions"),
        ])
    }

    /// A streaming curl whose output is read line by line.
    pub fn stream(
        &self,
        key: &str,
        body: &str,
    ) -> (Guard, std::io::Lines<BufReader<std::process::ChildStdout>>) {
        let mut c = Command::new("curl")
            .args(["-sS", "-N", "--noproxy", "*", "--cacert"])
            .arg(self.cert())
            .args(["-H", &format!("Authorization: Bearer {key}"), "-d", body])
            .arg(self.url("/v1/chat/completions"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = c.stdout.take().unwrap();
        (Guard(c), BufReader::new(out).lines())
    }

    /// A one-message chat completion: (HTTP status, JSON body).
    pub fn chat_status(
        &self,
        key: &str,
        model: &str,
        max_tokens: u32,
        text: &str,
    ) -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "model": model, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": text}],
        });
        let (code, text) = self.post_json(key, "/v1/chat/completions", &body);
        (code, serde_json::from_str(&text).unwrap_or_default())
    }

    /// POSTs a JSON body with a key: (HTTP status, the body as text, unbuffered so a
    /// stream comes whole).
    pub fn post_json(&self, key: &str, path: &str, body: &serde_json::Value) -> (u16, String) {
        let (out, _) = self.curl(&[
            "-N",
            "-w",
            "\n%{http_code}",
            "-H",
            &format!("Authorization: Bearer {key}"),
            "-H",
            "Content-Type: application/json",
            "-d",
            &body.to_string(),
            &self.url(path),
        ]);
        let (text, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), text.to_string())
    }

    pub fn metric(&self, prefix: &str) -> Option<f64> {
        let (text, _) = self.curl(&[&self.url("/metrics")]);
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

/// Every record of the log, through `audit export` (checked with `verify-export`).
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    let out = dir.join("export.jsonl");
    let (file, data) = (out.to_str().unwrap(), dir.to_str().unwrap());
    appliance_ok(&["audit", "export", "--out", file, "--data-dir", data]);
    let public = dir.join("audit/public.key");
    appliance_ok(&[
        "audit",
        "verify-export",
        file,
        "--public-key",
        public.to_str().unwrap(),
    ]);
    std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == "record")
        .map(|v| v["record"].clone())
        .collect()
}
