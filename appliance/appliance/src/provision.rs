//! The site seed (`appliance provision`): hostname, network, NTP servers, time zone, the
//! site's TLS certificate and the keys trusted to sign model bundles, from one TOML file
//! (on the image: `appliance-seed.toml` on a FAT file system labelled APPLSEED).
//!
//! `apply` checks all of a seed (every problem with its line and column) before it
//! changes anything, then stores the settings under `DATA/site/` (switched in as a whole)
//! and the certificate and trust file where the daemon reads them. The same seed again
//! changes nothing. `boot` puts the stored settings where this boot's networkd,
//! timesyncd and kernel read them (under /run: the image's root is read-only).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde::Deserialize;
use toml::Spanned;

use crate::serve::DataDir;

#[derive(Subcommand)]
pub enum ProvisionCmd {
    /// Check a seed file and, when all of it is valid, apply it (once: the same seed again
    /// changes nothing). Problems are listed as FILE:LINE:COLUMN and nothing is applied.
    Apply {
        #[arg(long)]
        seed: PathBuf,
        #[command(flatten)]
        data: DataDir,
        /// Only check the seed.
        #[arg(long)]
        check: bool,
    },
    /// Write this boot's settings from the applied seed: a networkd file and a timesyncd
    /// drop-in under RUN, and the kernel's hostname.
    Boot {
        #[command(flatten)]
        data: DataDir,
        #[arg(long, default_value = "/run")]
        run: PathBuf,
        /// Leave the kernel's hostname alone (for trying a seed on another machine).
        #[arg(long)]
        no_hostname: bool,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSeed {
    hostname: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    ntp: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    models: RawModels,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    mode: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    gateway: Option<Spanned<String>>,
    dns: Option<Spanned<Vec<String>>>,
    domains: Option<Spanned<Vec<String>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModels {
    trusted_signers: Option<Spanned<String>>,
}

/// A checked seed, everything read: what `apply` writes.
#[derive(Debug, Default, PartialEq)]
struct Site {
    hostname: Option<String>,
    timezone: Option<String>,
    /// The networkd file for a static address (none: DHCP, the image's default).
    network: Option<String>,
    /// The timesyncd drop-in naming the site's NTP servers.
    timesyncd: Option<String>,
    cert_pem: Option<Vec<u8>>,
    key_pem: Option<Vec<u8>>,
    trusted_signers: Option<Vec<u8>>,
    /// SHA-256 over the seed and every file it names: a seed applied is not applied again.
    digest: String,
}

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: impl std::fmt::Display) {
        let before = &self.text[..span.start.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
        self.problems
            .push(format!("{}:{line}:{col}: {message}", self.file.display()));
    }

    /// A file named by the seed: next to it, no directories.
    fn beside(&mut self, name: &Spanned<String>) -> Option<Vec<u8>> {
        let n = name.get_ref();
        if n.is_empty() || n.contains('/') || n.starts_with('.') {
            self.at(
                name.span(),
                format!("{n:?}: name a file next to the seed (no folders)"),
            );
            return None;
        }
        let path = self.file.parent().unwrap_or(Path::new(".")).join(n);
        match std::fs::read(&path) {
            Ok(b) => Some(b),
            Err(e) => {
                self.at(name.span(), format!("{n:?}: {e}"));
                None
            }
        }
    }
}

/// An RFC 1123 host name: labels of letters, digits and hyphens (not at either end).
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_ntp(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok() || valid_hostname(s)
}

/// `ADDRESS/PREFIX` with the prefix in range for the address family.
fn valid_cidr(s: &str) -> bool {
    let Some((a, p)) = s.split_once('/') else {
        return false;
    };
    match (a.parse::<IpAddr>(), p.parse::<u8>()) {
        (Ok(IpAddr::V4(_)), Ok(p)) => (1..=32).contains(&p),
        (Ok(IpAddr::V6(_)), Ok(p)) => (1..=128).contains(&p),
        _ => false,
    }
}

/// Checks a seed's text (its files read relative to `file`) against `zoneinfo`.
fn check(file: &Path, text: &str, zoneinfo: &Path) -> Result<Site, Vec<String>> {
    let raw: RawSeed = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let mut c = Checker {
                file,
                text,
                problems: vec![],
            };
            c.at(e.span().unwrap_or(0..0), e.message());
            return Err(c.problems);
        }
    };
    let mut c = Checker {
        file,
        text,
        problems: vec![],
    };
    let mut site = Site::default();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    digest.update(text.as_bytes());

    if let Some(h) = &raw.hostname {
        if valid_hostname(h.get_ref()) {
            site.hostname = Some(h.get_ref().to_ascii_lowercase());
        } else {
            c.at(
                h.span(),
                format!(
                    "hostname {:?}: letters, digits and hyphens in labels of 1 to 63, dots between",
                    h.get_ref()
                ),
            );
        }
    }
    if let Some(tz) = &raw.timezone {
        let name = tz.get_ref();
        let plain = !name.is_empty()
            && !name.starts_with('/')
            && name
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b));
        if plain && zoneinfo.join(name).is_file() {
            site.timezone = Some(name.clone());
        } else {
            c.at(
                tz.span(),
                format!("timezone {name:?} is not in the tz database (e.g. \"Europe/Amsterdam\", \"UTC\")"),
            );
        }
    }
    if let Some(ntp) = &raw.ntp {
        let bad: Vec<&String> = ntp.get_ref().iter().filter(|s| !valid_ntp(s)).collect();
        if !bad.is_empty() {
            c.at(
                ntp.span(),
                format!("ntp: not a host name or address: {bad:?}"),
            );
        } else if ntp.get_ref().is_empty() {
            c.at(
                ntp.span(),
                "ntp: name at least one server (or leave ntp out for DHCP's)",
            );
        } else {
            site.timesyncd = Some(format!(
                "# From the site seed.\n[Time]\nNTP={}\n",
                ntp.get_ref().join(" ")
            ));
        }
    }

    let n = &raw.network;
    let mode = n.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span()));
    match mode {
        None | Some(("dhcp", _)) => {
            for (field, value) in [("address", &n.address), ("gateway", &n.gateway)] {
                if let Some(v) = value {
                    c.at(
                        v.span(),
                        format!("network.{field} is only for mode = \"static\""),
                    );
                }
            }
            for (field, value) in [("dns", &n.dns), ("domains", &n.domains)] {
                if let Some(v) = value {
                    c.at(
                        v.span(),
                        format!("network.{field} is only for mode = \"static\""),
                    );
                }
            }
        }
        Some(("static", span)) => {
            let mut file = String::from("# From the site seed: a static address.\n[Match]\nType=ether\n\n[Network]\nLinkLocalAddressing=ipv6\n");
            match &n.address {
                Some(a) if valid_cidr(a.get_ref()) => file += &format!("Address={}\n", a.get_ref()),
                Some(a) => c.at(
                    a.span(),
                    format!(
                        "network.address {:?} is not ADDRESS/PREFIX (e.g. 10.20.30.40/24)",
                        a.get_ref()
                    ),
                ),
                None => c.at(span.clone(), "mode = \"static\" needs network.address"),
            }
            match &n.gateway {
                Some(g) if g.get_ref().parse::<IpAddr>().is_ok() => {
                    file += &format!("Gateway={}\n", g.get_ref())
                }
                Some(g) => c.at(
                    g.span(),
                    format!("network.gateway {:?} is not an address", g.get_ref()),
                ),
                None => {}
            }
            if let Some(d) = &n.dns {
                let bad: Vec<&String> = d
                    .get_ref()
                    .iter()
                    .filter(|s| s.parse::<IpAddr>().is_err())
                    .collect();
                if bad.is_empty() {
                    for s in d.get_ref() {
                        file += &format!("DNS={s}\n");
                    }
                } else {
                    c.at(d.span(), format!("network.dns: not an address: {bad:?}"));
                }
            }
            if let Some(d) = &n.domains {
                let bad: Vec<&String> = d.get_ref().iter().filter(|s| !valid_hostname(s)).collect();
                if bad.is_empty() {
                    file += &format!("Domains={}\n", d.get_ref().join(" "));
                } else {
                    c.at(
                        d.span(),
                        format!("network.domains: not a domain name: {bad:?}"),
                    );
                }
            }
            site.network = Some(file);
        }
        Some((other, span)) => c.at(
            span,
            format!("network.mode {other:?} is not \"dhcp\" or \"static\""),
        ),
    }

    match (&raw.tls.cert, &raw.tls.key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let (cp, kp) = (c.beside(cert), c.beside(key));
            if let (Some(cp), Some(kp)) = (cp, kp) {
                match appliance_gateway::tls::certified_key(&cp, &kp, "the seed's certificate") {
                    Ok(_) => {
                        digest.update(&cp);
                        digest.update(&kp);
                        site.cert_pem = Some(cp);
                        site.key_pem = Some(kp);
                    }
                    Err(e) => c.at(cert.span(), e),
                }
            }
        }
        (Some(one), None) | (None, Some(one)) => {
            c.at(one.span(), "tls: give both cert and key (or neither)")
        }
    }
    if let Some(t) = &raw.models.trusted_signers {
        if let Some(bytes) = c.beside(t) {
            let path = file.parent().unwrap_or(Path::new(".")).join(t.get_ref());
            match appliance_registry::TrustPolicy::load(&path, true) {
                Ok(_) => {
                    digest.update(&bytes);
                    site.trusted_signers = Some(bytes);
                }
                Err(e) => c.at(t.span(), format!("{e:#}")),
            }
        }
    }
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    site.digest = appliance_gateway::keys::hex(digest.finish().as_ref());
    Ok(site)
}

const ZONEINFO: &str = "/usr/share/zoneinfo";

/// Gives `path` the owner of the data directory (the daemon's user once it has run).
fn own_like(path: &Path, dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)?;
    if nix::unistd::geteuid().is_root() {
        nix::unistd::chown(
            path,
            Some(nix::unistd::Uid::from_raw(m.uid())),
            Some(nix::unistd::Gid::from_raw(m.gid())),
        )
        .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn apply(seed: &Path, dir: &Path, only_check: bool) -> Result<()> {
    let text =
        std::fs::read_to_string(seed).with_context(|| format!("reading {}", seed.display()))?;
    let site = check(seed, &text, Path::new(ZONEINFO)).map_err(|p| {
        anyhow::anyhow!(
            "{} problem(s) in the seed, nothing applied:\n{}",
            p.len(),
            p.join("\n")
        )
    })?;
    if only_check {
        println!("{}: OK", seed.display());
        return Ok(());
    }
    let site_dir = dir.join("site");
    let marker = site_dir.join("seed.sha256");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == site.digest) {
        println!("provision: this seed is already applied");
        return Ok(());
    }
    // Everything is staged first; the folder is switched in as a whole.
    let staged = dir.join("site.new");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged)?;
    let write = |name: &str, text: &[u8]| -> Result<()> {
        let p = staged.join(name);
        crate::backup::write_private(&p, text)?;
        own_like(&p, dir)
    };
    write("seed.toml", text.as_bytes())?;
    if let Some(h) = &site.hostname {
        write("hostname", format!("{h}\n").as_bytes())?;
    }
    if let Some(n) = &site.network {
        write("network", n.as_bytes())?;
    }
    if let Some(t) = &site.timesyncd {
        write("timesyncd.conf", t.as_bytes())?;
    }
    if let Some(tz) = &site.timezone {
        let link = staged.join("localtime");
        std::os::unix::fs::symlink(Path::new(ZONEINFO).join(tz), &link)?;
    }
    let mut applied = vec![];
    if let (Some(cert), Some(key)) = (&site.cert_pem, &site.key_pem) {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls)?;
        for (name, bytes) in [("key.pem", key), ("cert.pem", cert)] {
            let path = tls.join(name);
            if path.exists() {
                std::fs::copy(&path, tls.join(format!("{name}.previous")))?;
            }
            crate::backup::write_private(&path, bytes)?;
            own_like(&path, dir)?;
        }
        // The site's own from now on: never regenerated.
        let _ = std::fs::remove_file(tls.join("generated-for.txt"));
        applied.push("certificate");
    }
    if let Some(t) = &site.trusted_signers {
        let policy = dir.join("policy");
        std::fs::create_dir_all(&policy)?;
        let path = policy.join("trusted-signers.toml");
        crate::backup::write_private(&path, t)?;
        own_like(&path, dir)?;
        applied.push("trusted signers");
    }
    let old = dir.join("site.old");
    let _ = std::fs::remove_dir_all(&old);
    if site_dir.exists() {
        std::fs::rename(&site_dir, &old)?;
    }
    std::fs::rename(&staged, &site_dir)?;
    let _ = std::fs::remove_dir_all(&old);
    own_like(&site_dir, dir)?;
    // Last: a seed whose marker is written has been applied in full.
    crate::backup::write_private(&marker, format!("{}\n", site.digest).as_bytes())?;
    own_like(&marker, dir)?;
    for (what, set) in [
        ("hostname", site.hostname.is_some()),
        ("time zone", site.timezone.is_some()),
        ("static network", site.network.is_some()),
        ("NTP servers", site.timesyncd.is_some()),
    ] {
        if set {
            applied.push(what);
        }
    }
    println!(
        "provision: seed {} applied ({})",
        &site.digest[..16],
        if applied.is_empty() {
            "no settings".to_string()
        } else {
            applied.join(", ")
        }
    );
    Ok(())
}

fn boot(dir: &Path, run: &Path, set_hostname: bool) -> Result<()> {
    let site = dir.join("site");
    let put = |from: &str, to: PathBuf| -> Result<()> {
        match std::fs::read(site.join(from)) {
            Ok(bytes) => {
                std::fs::create_dir_all(to.parent().unwrap_or(run))?;
                std::fs::write(&to, bytes).with_context(|| format!("writing {}", to.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
            }
            Err(_) => {
                let _ = std::fs::remove_file(&to);
            }
        }
        Ok(())
    };
    put(
        "network",
        run.join("systemd/network/10-appliance-site.network"),
    )?;
    put(
        "timesyncd.conf",
        run.join("systemd/timesyncd.conf.d/50-appliance-site.conf"),
    )?;
    if let Ok(h) = std::fs::read_to_string(site.join("hostname")) {
        let h = h.trim();
        if !valid_hostname(h) {
            bail!("{}: not a host name", site.join("hostname").display());
        }
        if set_hostname {
            nix::unistd::sethostname(h).context("setting the hostname")?;
        }
        println!("provision: hostname {h}");
    }
    Ok(())
}

pub fn run(cmd: ProvisionCmd) -> Result<()> {
    match cmd {
        ProvisionCmd::Apply { seed, data, check } => apply(&seed, &data.prepare()?, check),
        ProvisionCmd::Boot {
            data,
            run,
            no_hostname,
        } => boot(&data.prepare()?, &run, !no_hostname),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("appliance-provision-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn zoneinfo(dir: &Path) -> PathBuf {
        let z = dir.join("zoneinfo");
        std::fs::create_dir_all(z.join("Europe")).unwrap();
        std::fs::write(z.join("Europe/Amsterdam"), "TZif").unwrap();
        std::fs::write(z.join("UTC"), "TZif").unwrap();
        z
    }

    #[test]
    fn a_good_seed_gives_the_settings_and_a_stable_digest() {
        let d = scratch("good");
        let text = "hostname = \"Ward-7\"\ntimezone = \"Europe/Amsterdam\"\nntp = [\"ntp.example.org\", \"10.0.0.1\"]\n[network]\nmode = \"static\"\naddress = \"10.20.30.40/24\"\ngateway = \"10.20.30.1\"\ndns = [\"10.20.30.53\"]\ndomains = [\"hospital.example\"]\n";
        let f = d.join("appliance-seed.toml");
        let site = check(&f, text, &zoneinfo(&d)).unwrap();
        assert_eq!(site.hostname.as_deref(), Some("ward-7"));
        assert_eq!(site.timezone.as_deref(), Some("Europe/Amsterdam"));
        let net = site.network.as_deref().unwrap();
        for line in [
            "Address=10.20.30.40/24",
            "Gateway=10.20.30.1",
            "DNS=10.20.30.53",
            "Domains=hospital.example",
        ] {
            assert!(net.contains(line), "{net}");
        }
        assert!(site
            .timesyncd
            .as_deref()
            .unwrap()
            .contains("NTP=ntp.example.org 10.0.0.1"));
        assert_eq!(site.digest, check(&f, text, &zoneinfo(&d)).unwrap().digest);
        // DHCP (the default) writes no network file.
        assert_eq!(check(&f, "", &zoneinfo(&d)).unwrap().network, None);
    }

    #[test]
    fn every_problem_is_named_with_its_line_and_column() {
        let d = scratch("bad");
        let f = d.join("appliance-seed.toml");
        let text = "hostname = \"-bad-\"\ntimezone = \"../etc/passwd\"\nntp = [\"ok.example\", \"not valid!\"]\n[network]\nmode = \"dhcp\"\naddress = \"10.0.0.2/24\"\n[tls]\ncert = \"missing.pem\"\n";
        let p = check(&f, text, &zoneinfo(&d)).unwrap_err();
        let want = [
            ":1:12: hostname \"-bad-\"",
            ":2:12: timezone \"../etc/passwd\"",
            ":3:7: ntp: not a host name or address: [\"not valid!\"]",
            ":6:11: network.address is only for mode = \"static\"",
            ":8:8: tls: give both cert and key",
        ];
        assert_eq!(p.len(), want.len(), "{p:#?}");
        for (got, w) in p.iter().zip(want) {
            assert!(
                got.starts_with(&f.display().to_string()) && got.contains(w),
                "{got} / {w}"
            );
        }
        let p = check(
            &f,
            "[network]\nmode = \"static\"\naddress = \"10.0.0.300/24\"\n",
            &zoneinfo(&d),
        )
        .unwrap_err();
        assert!(p[0].contains(":3:11: network.address"), "{p:?}");
        let p = check(&f, "[network]\nmode = \"static\"\n", &zoneinfo(&d)).unwrap_err();
        assert!(
            p[0].contains(":2:8: mode = \"static\" needs network.address"),
            "{p:?}"
        );
        let p = check(&f, "hostname = \"a\"\ncolour = \"blue\"\n", &zoneinfo(&d)).unwrap_err();
        assert!(
            p[0].contains(":2:1:") && p[0].contains("unknown field `colour`"),
            "{p:?}"
        );
        let p = check(
            &f,
            "[tls]\ncert = \"../x.pem\"\nkey = \"k.pem\"\n",
            &zoneinfo(&d),
        )
        .unwrap_err();
        assert!(
            p[0].contains(":2:8: \"../x.pem\": name a file next to the seed"),
            "{p:?}"
        );
    }

    #[test]
    fn a_certificate_that_does_not_match_its_key_is_refused() {
        let d = scratch("cert");
        let a = rcgen::generate_simple_self_signed(vec!["a.example".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b.example".into()]).unwrap();
        std::fs::write(d.join("cert.pem"), a.cert.pem()).unwrap();
        std::fs::write(d.join("key.pem"), b.signing_key.serialize_pem()).unwrap();
        let f = d.join("appliance-seed.toml");
        let text = "[tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";
        let p = check(&f, text, &zoneinfo(&d)).unwrap_err();
        assert!(p[0].contains(":2:8:"), "{p:?}");
        std::fs::write(d.join("key.pem"), a.signing_key.serialize_pem()).unwrap();
        let site = check(&f, text, &zoneinfo(&d)).unwrap();
        assert!(site.cert_pem.is_some() && site.key_pem.is_some());
    }

    #[test]
    fn apply_once_then_boot_writes_the_run_files() {
        let d = scratch("apply");
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        let seed = d.join("appliance-seed.toml");
        std::fs::write(&seed, "hostname = \"ward-7\"\nntp = [\"10.0.0.1\"]\n[network]\nmode = \"static\"\naddress = \"10.20.30.40/24\"\n").unwrap();
        apply(&seed, &data, false).unwrap();
        let marker = std::fs::read_to_string(data.join("site/seed.sha256")).unwrap();
        // The same seed again changes nothing.
        let before = std::fs::metadata(data.join("site/network"))
            .unwrap()
            .modified()
            .unwrap();
        apply(&seed, &data, false).unwrap();
        assert_eq!(
            before,
            std::fs::metadata(data.join("site/network"))
                .unwrap()
                .modified()
                .unwrap()
        );
        // A bad seed changes nothing either.
        std::fs::write(&seed, "hostname = \"ok\"\n[network]\nmode = \"bridge\"\n").unwrap();
        let e = apply(&seed, &data, false).unwrap_err().to_string();
        assert!(e.contains("nothing applied") && e.contains(":3:8:"), "{e}");
        assert_eq!(
            marker,
            std::fs::read_to_string(data.join("site/seed.sha256")).unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(data.join("site/hostname")).unwrap(),
            "ward-7\n"
        );

        let run = d.join("run");
        boot(&data, &run, false).unwrap();
        let net =
            std::fs::read_to_string(run.join("systemd/network/10-appliance-site.network")).unwrap();
        assert!(net.contains("Address=10.20.30.40/24"));
        let ntp =
            std::fs::read_to_string(run.join("systemd/timesyncd.conf.d/50-appliance-site.conf"))
                .unwrap();
        assert!(ntp.contains("NTP=10.0.0.1"));
        // A later seed without a static address takes the file away again.
        std::fs::write(&seed, "hostname = \"ward-7\"\n").unwrap();
        apply(&seed, &data, false).unwrap();
        boot(&data, &run, false).unwrap();
        assert!(!run
            .join("systemd/network/10-appliance-site.network")
            .exists());
        assert!(!run
            .join("systemd/timesyncd.conf.d/50-appliance-site.conf")
            .exists());
    }
}
