//! `appliance worker`: the Unix-socket protocol, streaming, cancellation and shutdown.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use appliance_tests::*;
use serde_json::{json, Value};

fn start_worker(dir: &Path) -> (Guard, std::path::PathBuf) {
    let sock = dir.join("w.sock");
    let child = appliance()
        .args(["worker", "--model"])
        .arg(model())
        .arg("--socket")
        .arg(&sock)
        .args(["--grace", "20"])
        .spawn()
        .unwrap();
    let g = Guard(child);
    let t0 = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "worker did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (g, sock)
}

struct Conn {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Conn {
    fn new(sock: &Path) -> Self {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        Self {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }
    fn send(&mut self, v: &Value) {
        writeln!(self.w, "{v}").unwrap();
    }
    fn send_raw(&mut self, s: &str) {
        writeln!(self.w, "{s}").unwrap();
    }
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }
    /// Reads a generation to its end: (text, number of tokens, final line).
    fn collect(&mut self) -> (String, usize, Value) {
        let started = self.recv();
        assert_eq!(started["type"], "started", "{started}");
        let (mut text, mut n) = (String::new(), 0);
        loop {
            let v = self.recv();
            match v["type"].as_str().unwrap() {
                "token" => {
                    n += 1;
                    text.push_str(v["text"].as_str().unwrap());
                }
                _ => return (text, n, v),
            }
        }
    }
}

#[test]
fn worker_speaks_the_protocol() {
    let dir = scratch("worker");
    let (_g, sock) = start_worker(&dir);
    let mode = std::fs::metadata(&sock).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.unwrap(), 0o600);

    let mut c = Conn::new(&sock);
    c.send(&json!({"v": 1, "op": "hello"}));
    let h = c.recv();
    assert_eq!(h["type"], "hello");
    assert_eq!(h["protocol"], 1);
    assert_eq!(h["model"]["architecture"], "llama");
    assert_eq!(h["model"]["quantization"], "Q4_1");

    c.send(&json!({"v": 1, "op": "tokenize", "text": "Hello world"}));
    let t = c.recv();
    assert_eq!(t["ids"], json!([19556, 905]));

    // Streaming chat generation, greedy, stops at end of turn (this prompt's greedy
    // answer is 14 tokens and <|im_end|>, as llama.cpp also produces).
    c.send(&json!({"v": 1, "op": "generate",
        "prompt": {"chat": [{"role": "user", "content": "What is 12 times 12?"}]},
        "params": {"max_tokens": 40}}));
    let (text, n, done) = c.collect();
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "stop", "{text:?}");
    assert_eq!(done["completion_tokens"], n);
    assert!(n < 40 && text.contains("12"), "{n} tokens: {text:?}");
    assert!(!text.contains("<|im_end|>"), "{text:?}");

    // max_tokens → finish_reason length; stop sequences cut the text.
    c.send(
        &json!({"v": 1, "op": "generate", "prompt": {"text": "1, 2, 3, 4,"},
        "params": {"max_tokens": 5, "ignore_eos": true}}),
    );
    let (_, n, done) = c.collect();
    assert_eq!((n, done["finish_reason"].as_str().unwrap()), (5, "length"));
    c.send(
        &json!({"v": 1, "op": "generate", "prompt": {"text": "1, 2, 3, 4, 5, 6,"},
        "params": {"max_tokens": 30, "stop": [" 9"]}}),
    );
    let (text, _, done) = c.collect();
    assert_eq!(done["finish_reason"], "stop", "{text:?}");
    assert!(!text.contains('9') && text.contains('8'), "{text:?}");

    // Errors: bad version, bad JSON, out-of-range parameter, context overflow.
    c.send(&json!({"v": 2, "op": "hello"}));
    assert_eq!(c.recv()["code"], "unsupported_version");
    c.send_raw("{not json");
    assert_eq!(c.recv()["code"], "bad_request");
    c.send(&json!({"v": 1, "op": "generate", "prompt": {"text": "x"}, "params": {"top_p": 7}}));
    let e = c.recv();
    assert_eq!(e["code"], "invalid_request");
    assert!(e["message"].as_str().unwrap().contains("top_p"), "{e}");
    c.send(&json!({"v": 1, "op": "generate", "prompt": {"text": "x"}, "params": {"max_tokens": 100000}}));
    let e = c.recv();
    assert_eq!(e["code"], "context_overflow", "{e}");
    // The connection still works after errors.
    c.send(&json!({"v": 1, "op": "health"}));
    assert_eq!(c.recv()["ok"], true);
}

#[test]
fn disconnect_cancels_and_concurrent_streams_progress_together() {
    let dir = scratch("cancel");
    let (mut g, sock) = start_worker(&dir);

    // A long generation whose caller goes away after a few tokens.
    let mut gone = Conn::new(&sock);
    gone.send(
        &json!({"v": 1, "op": "generate", "prompt": {"text": "Once upon a time"},
        "params": {"max_tokens": 2000, "ignore_eos": true}}),
    );
    assert_eq!(gone.recv()["type"], "started");
    for _ in 0..3 {
        assert_eq!(gone.recv()["type"], "token");
    }
    drop(gone);
    // The worker frees the sequence: no active sequence remains.
    let mut probe = Conn::new(&sock);
    let t0 = Instant::now();
    loop {
        probe.send(&json!({"v": 1, "op": "health"}));
        let h = probe.recv();
        if h["active"] == 0 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "cancelled sequence still active: {h}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Four streams at once all finish, and interleave (continuous batching): each
    // produces its first token before any of them is done.
    let mut conns: Vec<Conn> = (0..4).map(|_| Conn::new(&sock)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(
            &json!({"v": 1, "op": "generate", "prompt": {"text": format!("List {i}:")},
            "params": {"max_tokens": 24, "ignore_eos": true}}),
        );
    }
    let handles: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                assert_eq!(c.recv()["type"], "started");
                assert_eq!(c.recv()["type"], "token");
                let first = Instant::now();
                let mut n = 1;
                loop {
                    let v = c.recv();
                    if v["type"] == "token" {
                        n += 1;
                    } else {
                        assert_eq!(v["type"], "done");
                        return (first, Instant::now(), n);
                    }
                }
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let last_first = results.iter().map(|r| r.0).max().unwrap();
    let first_done = results.iter().map(|r| r.1).min().unwrap();
    assert!(results.iter().all(|r| r.2 == 24));
    assert!(
        last_first < first_done,
        "streams ran one after another, not together"
    );

    // SIGTERM: exits 0 and removes its socket.
    let pid = g.0.id();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t0 = Instant::now();
    loop {
        if let Some(status) = g.0.try_wait().unwrap() {
            assert!(status.success(), "worker exit status {status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "worker did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!sock.exists(), "socket left behind");
}
