//! The systemd side: the shipped unit file passes `systemd-analyze verify` and rates at
//! most 2.0 ("OK") in `systemd-analyze security`; the daemon speaks sd_notify (READY,
//! WATCHDOG, STOPPING) and keeps systemd's variables away from its workers.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use appliance_tests::*;

fn unit_for_test(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(repo_root().join("provisioning/systemd/appliance.service"))
        .unwrap();
    assert!(text.contains("ExecStart=/usr/bin/appliance serve"));
    // verify checks that the program exists: point it at the one just built.
    let text = text.replace("/usr/bin/appliance", binary().to_str().unwrap());
    let path = dir.join("appliance.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_unit_file_verifies_and_is_rated_ok() {
    let dir = scratch("unit");
    let unit = unit_for_test(&dir);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (scripts/setup-e2e installs systemd)");
    assert!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for appliance.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 2.0, "exposure {level} > 2.0:\n{text}");
}

#[test]
fn sd_notify_ready_watchdog_stopping() {
    let dir = scratch("sdnotify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut child = appliance()
        .args(["serve", "--api-listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--model")
        .arg(format!("smollm2={}", model().display()))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let mut daemon = Guard(child);
    std::thread::spawn(move || for _ in BufReader::new(out).lines() {});
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    // READY=1 comes once the model is ready; watchdog pings every 0.2 s meanwhile.
    let t0 = Instant::now();
    let ready = loop {
        let m = recv();
        if m.starts_with("READY=1") {
            break m;
        }
        assert!(m == "WATCHDOG=1", "{m}");
        assert!(t0.elapsed() < Duration::from_secs(60));
    };
    assert!(ready.contains("STATUS=Serving 1 of 1 model(s)"), "{ready}");
    let t1 = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        assert_eq!(recv(), "WATCHDOG=1");
        pings += 1;
    }
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "pings too slow: {:?}",
        t1.elapsed()
    );
    // Workers never see systemd's variables (only the main process may notify).
    let worker = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| {
                    s[s.rfind(')').unwrap() + 2..].split(' ').nth(1)
                        == Some(&daemon.0.id().to_string())
                })
                .unwrap_or(false)
        })
        .expect("a worker");
    let env = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&env).contains("NOTIFY_SOCKET"));
    // SIGTERM: STOPPING=1, then a clean exit.
    Command::new("kill")
        .args(["-TERM", &daemon.0.id().to_string()])
        .status()
        .unwrap();
    loop {
        let m = recv();
        if m.starts_with("STOPPING=1") {
            break;
        }
        assert_eq!(m, "WATCHDOG=1");
    }
    assert_eq!(daemon.0.wait().unwrap().code(), Some(0));
}
