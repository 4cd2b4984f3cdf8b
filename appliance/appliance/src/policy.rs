//! The site's policy file (`DIR/policy/policy.toml`): loading it (at start, on SIGHUP),
//! `appliance policy check` and `appliance policy explain`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use appliance_audit::Record;
use appliance_gateway::server::{Evidence, PolicyState};
use appliance_policy::{ContentMode, Policy};
use clap::Subcommand;

use crate::serve::DataDir;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate a policy (a policy.toml, or a folder holding one): schema, references,
    /// patterns, unreachable rules. Each problem as FILE:LINE:COLUMN. Exit 1 if any.
    Check { path: PathBuf },
    /// What the policy would do with a request, sending nothing: classes found (with
    /// spans), the rule, the allowed destinations and the model it would run on.
    Explain {
        /// The tenant the request would come from.
        #[arg(long)]
        tenant: String,
        /// A chat/completions or completions request body (JSON).
        #[arg(long)]
        file: PathBuf,
        /// The policy to use (a file or folder); default: the data directory's.
        #[arg(long)]
        policy: Option<PathBuf>,
        #[command(flatten)]
        data: DataDir,
    },
    /// Store an upstream credential (read from standard input; never shown again).
    CredentialSet {
        /// The name destinations refer to with `credential = "NAME"`.
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Benchmark: classification throughput (MB/s, one thread) on a generated corpus.
    #[command(hide = true)]
    Bench {
        /// The policy to classify with (default: the built-in one).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Megabytes of text.
        #[arg(long, default_value_t = 32)]
        mb: usize,
    },
}

/// The policy file of a path: the file itself, or `policy.toml` in a folder.
fn file_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join("policy.toml")
    } else {
        path.to_path_buf()
    }
}

/// Reads and validates a policy file; the error lists every problem as FILE:LINE:COL.
pub fn load_file(path: &Path) -> Result<Policy> {
    let file = file_of(path);
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    appliance_policy::parse(&text).map_err(|problems| {
        let lines: Vec<String> = problems
            .iter()
            .map(|p| format!("{}:{p}", file.display()))
            .collect();
        anyhow::anyhow!(
            "{} problem(s) in the policy:\n{}",
            problems.len(),
            lines.join("\n")
        )
    })
}

/// The data directory's policy file.
pub fn site_file(data: &Path) -> PathBuf {
    data.join("policy").join("policy.toml")
}

/// The site's policy (the built-in local-only one when there is no file) with its
/// content-HMAC key when it asks for one (made on first use, 0600).
pub fn load_site(data: &Path) -> Result<PolicyState> {
    let file = site_file(data);
    let policy = if file.exists() {
        load_file(&file)?
    } else {
        Policy::builtin()
    };
    let content = match policy.content {
        ContentMode::None => Evidence::None,
        ContentMode::Hmac => Evidence::Hmac(content_key(data)?),
        ContentMode::Sealed { recipient } => Evidence::Sealed(recipient),
    };
    let credentials = load_credentials(data, &policy)?;
    Ok(PolicyState {
        policy,
        content,
        credentials,
    })
}

/// Where upstream credentials are kept: one file per name, 0600, the secret alone.
pub fn credentials_dir(data: &Path) -> PathBuf {
    data.join("policy").join("credentials")
}

/// The credentials the policy's destinations name. A missing one is a warning (the
/// destination will be refused by its server), a group- or world-readable one an error.
fn load_credentials(
    data: &Path,
    policy: &Policy,
) -> Result<std::collections::BTreeMap<String, String>> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    for d in policy.destinations.values() {
        let Some(name) = &d.credential else { continue };
        let path = credentials_dir(data).join(name);
        match std::fs::metadata(&path) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => bail!(
                "{}: readable by others; chmod 600 it (the credential of destination {:?})",
                path.display(),
                d.name
            ),
            Ok(_) => {
                let secret = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                out.insert(name.clone(), secret.trim().to_string());
            }
            Err(_) => log::warn!(
                "destination {:?}: no credential {:?} (appliance policy credential set {name})",
                d.name,
                name
            ),
        }
    }
    Ok(out)
}

fn content_key(data: &Path) -> Result<ring::hmac::Key> {
    let path = crate::audit::dir(data).join("content.key");
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let hex = appliance_gateway::keys::hex(&raw);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(format!("{hex}\n").as_bytes())?;
        f.sync_all()?;
    }
    let text = std::fs::read_to_string(&path)?;
    let raw = crate::audit::hex32(text.trim().as_bytes())
        .with_context(|| format!("{}: not a 32-byte hex key", path.display()))?;
    Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw))
}

/// The audit record of a policy put in force (or refused).
pub fn load_record(state: Option<&PolicyState>, error: Option<&str>) -> Record {
    let mut r = Record::action(
        if error.is_none() {
            "policy.load"
        } else {
            "policy.reject"
        },
        if error.is_none() { 200 } else { 400 },
    );
    r.source = Some("local".into());
    if let Some(s) = state {
        r.policy_version = Some(s.policy.version.clone());
        r.detail = Some(format!(
            "{}; {} rule(s); content {}",
            s.policy.name,
            s.policy.rules.len(),
            s.policy.content.as_str()
        ));
    }
    if let Some(e) = error {
        r.error = Some("invalid_policy".into());
        r.detail = Some(e.chars().take(200).collect());
    }
    r
}

/// A corpus of clinical, banking and office text with identifiers sprinkled in: about
/// one finding per 400 bytes, the rest ordinary prose with numbers that are not
/// identifiers (dates, amounts, versions, room numbers).
fn corpus(bytes: usize) -> Vec<String> {
    const PROSE: &[&str] = &[
        "The patient was seen in clinic on 2026-11-03 and reported improved mobility after physiotherapy. ",
        "Blood pressure 132/84, heart rate 72, temperature 36.8. Continue current medication for 14 days. ",
        "Please review the quarterly figures: revenue rose 4.2% to 1,250,000 while costs were flat. ",
        "Meeting moved to room B12 at 14:30; bring the v2.3.1 release notes and the 2026 budget. ",
        "Die Patientin berichtet über Schmerzen seit drei Wochen; Kontrolle in 6 Wochen empfohlen. ",
        "Le rendez-vous est fixé au 12 décembre, merci de confirmer avant vendredi 17h. ",
        "Graag ontvangen wij de getekende overeenkomst uiterlijk 15 januari retour. ",
    ];
    const SENSITIVE: &[&str] = &[
        "Contact jane.doe@example.org or +44 20 7946 0958. ",
        "Card 4111 1111 1111 1111 was declined. ",
        "IBAN DE89 3704 0044 0532 0130 00 for the refund. ",
        "NHS number 943 476 5919, DOB 12/03/1980. ",
        "Diagnosis: E11.9, follow-up for I25.10. ",
        "SSN 123-45-6789 on the form. ",
    ];
    let mut out = vec![];
    let mut total = 0;
    let mut i = 0usize;
    while total < bytes {
        // A request of ~4 KB: prose with two sensitive sentences.
        let mut doc = String::with_capacity(4200);
        while doc.len() < 4000 {
            doc.push_str(PROSE[i % PROSE.len()]);
            if i.is_multiple_of(5) {
                doc.push_str(SENSITIVE[(i / 5) % SENSITIVE.len()]);
            }
            i += 1;
        }
        total += doc.len();
        out.push(doc);
    }
    out
}

pub fn run(cmd: PolicyCmd) -> Result<()> {
    match cmd {
        PolicyCmd::CredentialSet { name, data } => {
            use std::io::Read;
            if name.is_empty()
                || name.starts_with('.')
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                bail!("credential names are letters, digits and . _ - (got {name:?})");
            }
            let dir = data.prepare()?;
            let mut secret = String::new();
            std::io::stdin().read_to_string(&mut secret)?;
            let secret = secret.trim();
            if secret.is_empty() {
                bail!("no secret on standard input");
            }
            let cdir = credentials_dir(&dir);
            std::fs::create_dir_all(&cdir)?;
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&cdir, std::fs::Permissions::from_mode(0o700))?;
            }
            crate::backup::write_private(&cdir.join(&name), secret.as_bytes())?;
            let mut r = Record::action("credential.set", 200);
            r.resource = Some(format!("credential:{name}"));
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(crate::audit::record_cli(&dir, r))?;
            eprintln!("stored credential {name}; send the daemon SIGHUP (or restart it) to use it");
            Ok(())
        }
        PolicyCmd::Bench { policy, mb } => {
            let p = match policy {
                Some(path) => load_file(&path)?,
                None => Policy::builtin(),
            };
            let docs = corpus(mb << 20);
            let bytes: usize = docs.iter().map(String::len).sum();
            let mut lat = Vec::with_capacity(docs.len());
            let mut found = 0;
            let t0 = std::time::Instant::now();
            for d in &docs {
                let t = std::time::Instant::now();
                found += p.classify(&[d.as_str()]).len();
                lat.push(t.elapsed());
            }
            let secs = t0.elapsed().as_secs_f64();
            lat.sort();
            let p99 = lat[(lat.len() - 1) * 99 / 100];
            println!(
                "classify: {:.1} MB in {:.2} s = {:.1} MB/s on one thread; {} findings; per ~4 KB request p50 {:.1} µs, p99 {:.1} µs",
                bytes as f64 / 1e6,
                secs,
                bytes as f64 / 1e6 / secs,
                found,
                lat[lat.len() / 2].as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            );
            // A 4k-token request (~16 KB): the decision latency the issue asks for.
            let big: String = docs.iter().take(4).map(String::as_str).collect();
            let mut lat = vec![];
            for _ in 0..200 {
                let t = std::time::Instant::now();
                let f = p.classify(&[big.as_str()]);
                let _ = p.decide("acme", &f);
                lat.push(t.elapsed());
            }
            lat.sort();
            println!(
                "decision for a {} KB request (classify + decide): p50 {:.0} µs, p99 {:.0} µs",
                big.len() / 1024,
                lat[100].as_secs_f64() * 1e6,
                lat[197].as_secs_f64() * 1e6
            );
            Ok(())
        }
        PolicyCmd::Check { path } => {
            let p = load_file(&path)?;
            println!(
                "OK: {} ({}): {} classes, {} detectors, {} destinations, {} rules, {} aliases",
                file_of(&path).display(),
                p.version,
                p.classes.len(),
                p.detectors.iter().filter(|d| d.enabled).count(),
                p.destinations.len(),
                p.rules.len(),
                p.aliases.len()
            );
            if p.rules.iter().all(|r| r.classes.is_some()) && !p.rules.is_empty() {
                println!("note: no rule matches every request: a request none matches is denied");
            }
            Ok(())
        }
        PolicyCmd::Explain {
            tenant,
            file,
            policy,
            data,
        } => {
            // A policy file alone may be tried before any appliance has a data directory.
            let alone = policy.is_some();
            let (p, dir) = match policy {
                Some(path) => (
                    load_file(&path)?,
                    std::fs::read_dir(&data.data_dir)
                        .is_ok()
                        .then(|| data.prepare())
                        .transpose()?,
                ),
                None => {
                    let dir = data.prepare()?;
                    (load_site(&dir)?.policy, Some(dir))
                }
            };
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let served = match &dir {
                Some(dir) => match site_facts(dir, &tenant) {
                    Ok(names) => Some(names),
                    Err(e) if alone && e.downcast_ref::<UnknownTenant>().is_none() => {
                        eprintln!(
                            "warning: {}: {e:#}; explained by the policy alone",
                            dir.display()
                        );
                        None
                    }
                    Err(e) => return Err(e),
                },
                None => None,
            };
            let cfg = appliance_gateway::GatewayConfig::default();
            let out = appliance_gateway::openai::explain(
                &p,
                &tenant,
                &body,
                &cfg,
                None,
                served.as_deref(),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}

/// A tenant the data directory's database does not have.
#[derive(Debug)]
struct UnknownTenant(String);

impl std::fmt::Display for UnknownTenant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no tenant named {:?} (appliance tenant list)", self.0)
    }
}

impl std::error::Error for UnknownTenant {}

/// Checks that `tenant` exists (when the data directory has a database) and returns the
/// models served here (`serve::served_models`).
fn site_facts(dir: &Path, tenant: &str) -> Result<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let db = DataDir::db(dir);
        let store = if db.exists() {
            let store = appliance_store::Store::open(&db).await?;
            if !store.tenants().await?.iter().any(|t| t.name == tenant) {
                return Err(UnknownTenant(tenant.to_string()).into());
            }
            Some(store)
        } else {
            None
        };
        crate::serve::served_models(dir, store.as_ref()).await
    })
}
