//! The appliance image, built and booted: `image/build --variant test` (the cloud
//! kernel; otherwise the shipped recipe), then qemu under TCG with the API and console
//! forwarded to loopback. One boot with a site seed checks READY, the console's setup
//! page, /readyz, the certificate the screen shows, the verified read-only root, the
//! firewall and the seed; a second boot of the same disk, grown by 4 GB, checks that
//! nothing is made again and that the data partition grew; a third boot of a copy with
//! one byte of the root changed must refuse.
//!
//! Needs root (mmdebstrap) and the image tools (`image/setup` installs them). Bounds:
//! 300 s for a boot to serve, 180 s for the altered image to give up.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use appliance_tests::*;

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The byte offset of the GPT partition named `label` in a disk image (512-byte sectors,
/// entries from the header at LBA 1).
fn partition_offset(image: &Path, label: &str) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image).unwrap();
    let mut header = [0u8; 512];
    f.seek(SeekFrom::Start(512)).unwrap();
    f.read_exact(&mut header).unwrap();
    assert_eq!(&header[..8], b"EFI PART", "no GPT in {}", image.display());
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let (entries, count, size) = (
        u64_at(&header, 72),
        u32_at(&header, 80) as usize,
        u32_at(&header, 84) as usize,
    );
    let mut table = vec![0u8; count * size];
    f.seek(SeekFrom::Start(entries * 512)).unwrap();
    f.read_exact(&mut table).unwrap();
    for e in table.chunks(size) {
        let name: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&c| c != 0)
            .collect();
        if String::from_utf16_lossy(&name) == label {
            return u64_at(e, 32) * 512;
        }
    }
    panic!("no partition {label} in {}", image.display());
}

struct Vm {
    guard: Guard,
    serial: PathBuf,
    api: u16,
    console: u16,
    started: Instant,
}

impl Vm {
    fn boot(image: &Path, overlay: &Path, serial: PathBuf) -> Vm {
        let (api, console) = (free_port(), free_port());
        let _ = std::fs::remove_file(&serial);
        let child = Command::new(repo_root().join("image/boot"))
            .arg("--image")
            .arg(image)
            .arg("--overlay")
            .arg(overlay)
            .arg("--serial")
            .arg(&serial)
            .args([
                "--api-port",
                &api.to_string(),
                "--console-port",
                &console.to_string(),
            ])
            .spawn()
            .unwrap();
        Vm {
            guard: Guard(child),
            serial,
            api,
            console,
            started: Instant::now(),
        }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Waits until the serial console shows `what`; fails after `bound` with the log.
    fn wait_for(&self, what: &str, bound: Duration) -> Duration {
        loop {
            if self.log().contains(what) {
                return self.started.elapsed();
            }
            if self.started.elapsed() > bound {
                panic!(
                    "no {what:?} within {bound:?}; serial console:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn get(&self, port: u16, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// The SHA-256 fingerprint (lower-case hex) of the certificate the console presents,
    /// and its text form.
    fn served_certificate(&self) -> (String, String) {
        let get = format!(
            "openssl s_client -connect 127.0.0.1:{} </dev/null 2>/dev/null | openssl x509",
            self.console
        );
        let fp = sh(Command::new("sh")
            .arg("-c")
            .arg(format!("{get} -noout -fingerprint -sha256")));
        let fp = fp
            .trim()
            .rsplit_once('=')
            .unwrap()
            .1
            .replace(':', "")
            .to_ascii_lowercase();
        let text = sh(Command::new("sh")
            .arg("-c")
            .arg(format!("{get} -noout -text")));
        (fp, text)
    }

    /// The value after `label` on the banner's last such line.
    fn banner(&self, label: &str) -> String {
        self.log()
            .lines()
            .rev()
            .find_map(|l| l.split_once(label).map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {label:?} in the banner:\n{}", self.log()))
    }
}

/// "5.4G (5.1G free) on ..." → 5.4.
fn gigabytes(banner: &str) -> f64 {
    let size = banner.split_whitespace().next().unwrap_or_default();
    let (n, unit) = size.split_at(size.len().saturating_sub(1));
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("size {size:?}"));
    match unit {
        "T" => n * 1024.0,
        "G" => n,
        "M" => n / 1024.0,
        _ => panic!("size {size:?}"),
    }
}

#[test]
fn the_image_boots_serves_keeps_its_root_read_only_and_refuses_an_altered_root() {
    let out_dir = binary().parent().unwrap().join("image-test");
    let t0 = Instant::now();
    let built = Command::new(repo_root().join("image/build"))
        .args(["--variant", "test", "--out"])
        .arg(&out_dir)
        .env("APPLIANCE_BIN", binary())
        .status()
        .unwrap();
    assert!(built.success(), "image/build failed");
    let build_secs = t0.elapsed().as_secs();
    let facts = std::fs::read_to_string(out_dir.join("build.txt")).unwrap();
    eprintln!("image built in {build_secs} s:\n{facts}");
    // The daemon's unit as it is inside the image rates "OK" (below 2.0).
    let exposure: f64 = facts
        .lines()
        .find_map(|l| l.strip_prefix("unit_exposure="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure rating: {facts}"));
    assert!(exposure < 2.0, "unit exposure {exposure}");

    // A copy with a site seed on its seed partition.
    let work = scratch("image");
    let disk = work.join("seeded.raw");
    sh(Command::new("cp")
        .arg("--sparse=always")
        .arg(out_dir.join("appliance.raw"))
        .arg(&disk));
    let seed = work.join("appliance-seed.toml");
    std::fs::write(
        &seed,
        "hostname = \"ward-7-llm\"\ntimezone = \"Europe/Amsterdam\"\n[network]\nmode = \"dhcp\"\n",
    )
    .unwrap();
    let at = partition_offset(&disk, "seed");
    sh(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{at}", disk.display()))
        .arg(&seed)
        .arg("::/appliance-seed.toml"));

    let overlay = work.join("disk.qcow2");
    let bound = Duration::from_secs(300);
    let (fingerprint, first_token, data_size);
    {
        let vm = Vm::boot(&disk, &overlay, work.join("serial-1.log"));
        // The banner comes after the daemon's READY (it is ordered after the unit).
        let ready = vm.wait_for("firewall:", bound);
        eprintln!("first boot: READY and banner after {ready:?}");
        assert!(
            vm.banner("daemon:")
                .starts_with("active: Serving 1 of 1 model(s)"),
            "{}",
            vm.log()
        );
        let (code, body) = vm.get(vm.api, "/readyz");
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"ready\""), "{body}");
        let answered = vm.started.elapsed();
        eprintln!("first boot: /readyz answered 200 after {answered:?}");
        let log = vm.log();
        assert!(log.contains("provision: seed"), "{log}");
        assert!(log.contains(" on ward-7-llm"), "{log}");
        let system = vm.banner("system:");
        assert_eq!(
            system, "/dev/mapper/root erofs, read-only, dm-verity verified",
            "{log}"
        );
        assert!(vm.banner("firewall:").starts_with("on "), "{log}");
        assert!(!log.contains("Failed to start"), "{log}");
        // The console: setup page through the link on the screen, login otherwise.
        let link = vm.banner("setup:");
        let token = link.rsplit_once("token=").unwrap().1.to_string();
        let (code, body) = vm.get(vm.console, &format!("/setup?token={token}"));
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("Create the first administrator"), "{body}");
        let (code, _) = vm.get(vm.console, "/setup?token=0000");
        assert_ne!(code, 200);
        // The screen's fingerprint is the certificate served, made for the seed's name.
        let (fp, text) = vm.served_certificate();
        assert_eq!(fp, vm.banner("certificate SHA-256:"));
        assert!(text.contains("DNS:ward-7-llm"), "{text}");
        fingerprint = fp;
        first_token = token;
        data_size = gigabytes(&vm.banner("data:"));
    }
    // The disk grows between boots (as when an image is written to a bigger disk): the
    // data partition and its file system follow.
    sh(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&overlay)
        .arg("+4G"));
    {
        // The same disk again: nothing is made anew.
        let vm = Vm::boot(&disk, &overlay, work.join("serial-2.log"));
        let ready = vm.wait_for("firewall:", bound);
        eprintln!("second boot: READY and banner after {ready:?}");
        assert!(
            vm.banner("daemon:").starts_with("active: Serving"),
            "{}",
            vm.log()
        );
        let log = vm.log();
        assert!(log.contains("this seed is already applied"), "{log}");
        assert!(!log.contains("new checkpoint signing key"), "{log}");
        assert!(
            !log.contains("generated a self-signed certificate"),
            "{log}"
        );
        assert_eq!(vm.served_certificate().0, fingerprint);
        let grown = gigabytes(&vm.banner("data:"));
        assert!(
            grown > data_size + 3.0,
            "data partition {data_size} GB → {grown} GB"
        );
        // A new setup token each start until the first admin exists; the old one is dead.
        let token = vm
            .banner("setup:")
            .rsplit_once("token=")
            .unwrap()
            .1
            .to_string();
        assert_ne!(token, first_token);
        let (code, _) = vm.get(vm.console, &format!("/setup?token={first_token}"));
        assert_ne!(code, 200);
    }
    {
        // One byte of the root changed: verity refuses it and the machine never serves.
        let altered = work.join("altered.raw");
        sh(Command::new("cp")
            .arg("--sparse=always")
            .arg(out_dir.join("appliance.raw"))
            .arg(&altered));
        let at = partition_offset(&altered, "root-a") + 1024 + 64;
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&altered)
            .unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x01]).unwrap();
        drop(f);
        let mut vm = Vm::boot(
            &altered,
            &work.join("altered.qcow2"),
            work.join("serial-3.log"),
        );
        let t = Instant::now();
        let status = loop {
            if let Some(s) = vm.guard.0.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(180),
                "the altered image did not give up:\n{}",
                vm.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let log = vm.log();
        eprintln!(
            "altered root: qemu ended ({status}) after {:?}",
            t.elapsed()
        );
        assert!(log.contains("verity") && log.contains("corrupted"), "{log}");
        assert!(!log.contains("daemon:"), "{log}");
        assert_eq!(vm.get(vm.api, "/readyz").0, 0);
    }
    let _ = std::fs::remove_dir_all(&work);
}
