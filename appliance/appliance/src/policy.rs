//! The site's policy file (`DIR/policy/policy.toml`): loading it (at start, on SIGHUP),
//! `appliance policy check` and `appliance policy explain`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use appliance_audit::Record;
use appliance_gateway::server::PolicyState;
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
    let content_key = match policy.content {
        ContentMode::None => None,
        ContentMode::Hmac => Some(content_key(data)?),
    };
    Ok(PolicyState {
        policy,
        content_key,
    })
}

fn content_key(data: &Path) -> Result<ring::hmac::Key> {
    let path = crate::audit::dir(data).join("content.key");
    if !path.exists() {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut raw = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
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
    let hex = text.trim();
    if hex.len() != 64 {
        bail!("{}: not a 32-byte hex key", path.display());
    }
    let raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not hex", path.display()))?;
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
            match s.policy.content {
                ContentMode::None => "none",
                ContentMode::Hmac => "hmac",
            }
        ));
    }
    if let Some(e) = error {
        r.error = Some("invalid_policy".into());
        r.detail = Some(e.chars().take(200).collect());
    }
    r
}

pub fn run(cmd: PolicyCmd) -> Result<()> {
    match cmd {
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
            let p = match policy {
                Some(path) => load_file(&path)?,
                None => {
                    let dir = data.prepare()?;
                    load_site(&dir)?.policy
                }
            };
            let body =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let cfg = appliance_gateway::GatewayConfig::default();
            let (model, parts) = appliance_gateway::openai::request_parts(&body, &cfg)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            let found = p.classify(&refs);
            let d = p.decide(&tenant, &found);
            let route = p.route_local(&d, &model);
            let detections: Vec<serde_json::Value> = found
                .iter()
                .map(|f| {
                    serde_json::json!({
                        "class": f.class, "detector": f.detector, "part": f.part,
                        "start": f.start, "end": f.end,
                    })
                })
                .collect();
            let out = serde_json::json!({
                "policy": p.name,
                "policy_version": d.version,
                "tenant": tenant,
                "requested_model": model,
                "detections": detections,
                "classes": d.classes,
                "rule": d.rule,
                "action": d.action.as_str(),
                "allowed_destinations": if d.local_only { vec!["(any local model)".to_string()] } else { d.destinations.clone() },
                "local_model": route,
                "outcome": match (&route, d.action) {
                    (_, appliance_policy::Action::Deny) => "refused: 403 policy_denied".to_string(),
                    (Some(m), _) => format!("served by the local model {m}"),
                    (None, _) => "refused: no allowed destination is available here (403 policy_denied or 503 no_allowed_destination)".to_string(),
                },
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
            Ok(())
        }
    }
}
