//! `appliance model ...`: the air-gapped model registry. Import from a file, folder or
//! tar bundle with hash and signature checks against the site's trust policy
//! (`DATA/policy/trusted-signers.toml` by default), list, inspect, remove; and, for the
//! site's own models, signing keys and signed bundles.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use appliance_registry::{SigningKey, TrustPolicy};
use appliance_store::{ModelRecord, Store};
use clap::Subcommand;

use crate::config;
use crate::serve::DataDir;

#[derive(Subcommand)]
pub enum ModelCmd {
    /// Import a GGUF file, or a bundle (folder or tar with manifest.toml and the GGUF).
    Import {
        path: PathBuf,
        /// The name clients will use (default: the manifest's, or the file name).
        #[arg(long)]
        name: Option<String>,
        /// Where the site's trusted-signers.toml is (default: DATA/policy).
        #[arg(long)]
        policy_dir: Option<PathBuf>,
        /// Production profile: refuse unsigned models whatever the policy file says.
        #[arg(long, env = "APPLIANCE_PRODUCTION")]
        production: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List the registry's models.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Everything the registry knows about one model.
    Inspect {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Remove a model (refused while the running daemon serves it).
    Remove {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Pin a registry model to a device (`cpu`, `cuda:N`) or back to `auto`: it is
    /// placed there from its next load (`[devices]` in appliance.toml takes precedence).
    Pin {
        name: String,
        /// `cpu`, `cuda:N` or `auto`.
        device: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Load a registry model into the running daemon (placed by memory; waits until ready).
    Load {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Unload a model from the running daemon (its requests in flight finish first).
    Unload {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Create an Ed25519 signing key for the site's own models; prints its public key.
    Keygen {
        /// The private key file to create (0600).
        #[arg(long)]
        out: PathBuf,
    },
    /// Make a signed bundle (folder) from a GGUF file.
    Sign {
        gguf: PathBuf,
        /// The signing key (from `model keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The bundle folder to create.
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        license: Option<String>,
        /// Provenance facts, KEY=VALUE (repeatable), e.g. source=... approved_by=...
        #[arg(long = "provenance", value_parser = parse_kv)]
        provenance: Vec<(String, String)>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}

/// A progress bar on stderr when it is a terminal and the file is large.
fn progress(what: &str) -> impl FnMut(u64, u64) {
    let what = what.to_string();
    let mut bar: Option<indicatif::ProgressBar> = None;
    let tty = std::io::stderr().is_terminal();
    move |done, total| {
        if !tty || total < (64 << 20) {
            return;
        }
        let b = bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what.clone());
            b
        });
        b.set_position(done);
        if done >= total {
            b.finish_and_clear();
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn json_of(m: &ModelRecord) -> serde_json::Value {
    serde_json::json!({
        "name": m.name,
        "sha256": m.sha256,
        "size": m.size,
        "architecture": m.architecture,
        "parameters": m.parameters,
        "quantization": m.quantization,
        "context_length": m.context_length,
        "chat_template": m.chat_template,
        "license": m.license,
        "provenance": serde_json::from_str::<serde_json::Value>(&m.provenance).unwrap_or_default(),
        "signed_by": m.signed_by,
        "imported_at": m.imported_at,
    })
}

fn human_size(n: i64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{n} B"),
    }
}

fn human_params(n: i64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.0}M", n as f64 / 1e6),
        n => n.to_string(),
    }
}

/// The models a running daemon serves now (empty when none runs).
pub async fn served_models(dir: &Path) -> Vec<String> {
    crate::serve::daemon_models(dir).await.unwrap_or_default()
}

/// Sends `load NAME` or `unload NAME` to the running daemon.
fn change(verb: &str, name: &str, data: DataDir) -> Result<()> {
    runtime()?.block_on(async {
        let dir = data.prepare()?;
        let answer = crate::serve::ask_daemon_within(
            &dir,
            &format!("{verb} {name}"),
            std::time::Duration::from_secs(900),
        )
        .await
        .with_context(|| format!("no appliance daemon is running on {}", dir.display()))?;
        match answer.strip_prefix("ok ") {
            Some(msg) => {
                eprintln!("{msg}");
                Ok(())
            }
            None => bail!("{}", answer.strip_prefix("error ").unwrap_or(&answer)),
        }
    })
}

/// Runs a model command; the ones that change the appliance are recorded in the audit
/// log with their outcome (a success that cannot be recorded is reported as a failure).
pub fn run(cmd: ModelCmd) -> Result<()> {
    let audited = match &cmd {
        ModelCmd::Load { name, data } => Some(("model.load", name.clone(), data.clone())),
        ModelCmd::Unload { name, data } => Some(("model.unload", name.clone(), data.clone())),
        ModelCmd::Remove { name, data } => Some(("model.remove", name.clone(), data.clone())),
        ModelCmd::Pin { name, data, .. } => Some(("model.pin", name.clone(), data.clone())),
        ModelCmd::Import {
            name, path, data, ..
        } => Some((
            "model.import",
            name.clone().unwrap_or_else(|| path.display().to_string()),
            data.clone(),
        )),
        _ => None,
    };
    let result = run_inner(cmd);
    let Some((action, name, data)) = audited else {
        return result;
    };
    let mut r = appliance_audit::Record::action(action, if result.is_ok() { 200 } else { 400 });
    r.resource = Some(format!("model:{name}"));
    if let Err(e) = &result {
        r.error = Some("failed".into());
        r.detail = Some(format!("{e:#}").chars().take(200).collect());
    }
    let recorded =
        runtime()?.block_on(async { crate::audit::record_cli(&data.prepare()?, r).await });
    match (result, recorded) {
        (Ok(()), Err(e)) => Err(e.context(format!(
            "{action} {name} was done but could not be recorded"
        ))),
        (Err(e), Err(e2)) => {
            eprintln!("warning: the failed action could not be recorded: {e2:#}");
            Err(e)
        }
        (result, Ok(())) => result,
    }
}

/// Imports a model file or bundle into the registry (signature checked against the
/// site's trust policy) and records it in the store: the record and the registry's
/// warning, if any. Nothing is left behind on failure.
pub async fn import_model(
    dir: &Path,
    path: &Path,
    name: Option<&str>,
    policy_dir: Option<PathBuf>,
    production: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(ModelRecord, Option<String>)> {
    if let Some(n) = name {
        config::valid_name("model", n)?;
    }
    let store = Store::open(&DataDir::db(dir)).await?;
    let policy = policy_dir
        .unwrap_or_else(|| dir.join("policy"))
        .join("trusted-signers.toml");
    let trust = TrustPolicy::load(&policy, production)?;
    let registry = appliance_registry::Store::new(dir);
    // Refuse a taken name before copying gigabytes.
    if let Some(n) = name {
        if store.model(n).await?.is_some() {
            bail!("a model named {n:?} is already in the registry (remove it first, or import under another --name)");
        }
    }
    let imported = registry.import(path, name, &trust, progress)?;
    let unstore = |sha: &str, models: &[ModelRecord]| {
        // Another name may share the file; only drop it if nothing refers to it.
        if !models.iter().any(|m| m.sha256 == sha) {
            let _ = std::fs::remove_file(&imported.path);
        }
    };
    if let Err(e) = config::valid_name("model", &imported.name) {
        unstore(&imported.sha256, &store.models().await?);
        bail!("{e} (the bundle's manifest name; give --name)");
    }
    let record = ModelRecord {
        name: imported.name.clone(),
        sha256: imported.sha256.clone(),
        size: imported.size as i64,
        architecture: imported.facts.architecture.clone(),
        parameters: imported.facts.parameters as i64,
        quantization: imported.facts.quantization.clone(),
        context_length: imported.facts.context_length as i64,
        chat_template: imported.facts.chat_template,
        license: imported.license.clone(),
        provenance: serde_json::to_string(&imported.provenance)?,
        signed_by: imported.signed_by.clone(),
        imported_at: appliance_gateway::server::unix_now(),
    };
    if let Err(e) = store.insert_model(&record).await {
        unstore(&record.sha256, &store.models().await?);
        return Err(e.into());
    }
    Ok((record, imported.warning.clone()))
}

/// Removes a model that no running daemon serves from the store and, unless another
/// name shares its file, the file.
pub async fn remove_model(dir: &Path, name: &str) -> Result<()> {
    let store = Store::open(&DataDir::db(dir)).await?;
    let (m, shared) = store.remove_model(name).await?;
    if !shared {
        let path = appliance_registry::Store::new(dir).path_of(&m.sha256);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

/// Pins a registry model to a device, or (`None` or `auto`) unpins it: checked against
/// this build and machine. Returns a sentence saying what holds now.
pub async fn pin_model(dir: &Path, name: &str, device: Option<&str>) -> Result<String> {
    let device = device
        .map(str::trim)
        .filter(|d| !d.is_empty() && *d != "auto");
    if let Some(d) = device {
        use appliance_supervisor::placement::Device;
        match d.parse::<Device>().map_err(|e| anyhow::anyhow!(e))? {
            Device::Cpu => {}
            Device::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    bail!("cannot pin {name} to cuda:{i}: this build of the appliance has no CUDA");
                }
                let inv = appliance_supervisor::inventory::read(dir);
                if !inv.gpus.iter().any(|g| g.index == i) {
                    bail!("cannot pin {name} to cuda:{i}: this machine has no such GPU");
                }
            }
        }
    }
    let store = Store::open(&DataDir::db(dir)).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    store.set_model_device(name, device, now).await?;
    Ok(match device {
        Some(d) => format!("Model {name} pinned to {d}"),
        None => format!("Model {name} is placed automatically"),
    })
}

fn run_inner(cmd: ModelCmd) -> Result<()> {
    match cmd {
        ModelCmd::Load { name, data } => change("load", &name, data),
        ModelCmd::Unload { name, data } => change("unload", &name, data),
        ModelCmd::Keygen { out } => {
            let k = SigningKey::generate(&out)?;
            println!("{}", k.public_key());
            eprintln!(
                "wrote the private key to {} (keep it offline); add the public key above to the site's trusted-signers.toml:\n\n[[signer]]\nname = \"...\"\npublic_key = \"{}\"",
                out.display(),
                k.public_key()
            );
            Ok(())
        }
        ModelCmd::Sign {
            gguf,
            key,
            out,
            name,
            license,
            provenance,
        } => {
            config::valid_name("model", &name)?;
            let k = SigningKey::load(&key)?;
            let m = appliance_registry::make_bundle(
                &gguf,
                &out,
                &name,
                license,
                provenance.into_iter().collect::<BTreeMap<_, _>>(),
                &k,
                &mut progress("signing"),
            )?;
            eprintln!(
                "signed bundle {} (model {}, sha256 {}, signer {})",
                out.display(),
                m.name,
                m.sha256,
                k.public_key()
            );
            Ok(())
        }
        ModelCmd::Import {
            path,
            name,
            policy_dir,
            production,
            data,
        } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            let (record, warning) = import_model(
                &dir,
                &path,
                name.as_deref(),
                policy_dir,
                production,
                &mut progress("importing"),
            )
            .await?;
            if let Some(w) = &warning {
                eprintln!("warning: {w}");
            }
            eprintln!(
                "imported {} ({}, {} parameters, {}, context {}, {}){}",
                record.name,
                record.architecture,
                human_params(record.parameters),
                record.quantization,
                record.context_length,
                human_size(record.size),
                match &record.signed_by {
                    Some(s) => format!(", signed by {s}"),
                    None => ", unsigned".into(),
                }
            );
            println!("{}", record.sha256);
            Ok(())
        }),
        ModelCmd::List { json, data } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            let store = Store::open(&DataDir::db(&dir)).await?;
            let models = store.models().await?;
            let served = served_models(&dir).await;
            if json {
                let v: Vec<_> = models
                    .iter()
                    .map(|m| {
                        let mut j = json_of(m);
                        j["loaded"] = serde_json::json!(served.contains(&m.name));
                        j
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let rows: Vec<[String; 9]> = models
                    .iter()
                    .map(|m| {
                        [
                            m.name.clone(),
                            m.architecture.clone(),
                            human_params(m.parameters),
                            m.quantization.clone(),
                            m.context_length.to_string(),
                            human_size(m.size),
                            m.signed_by.clone().unwrap_or_else(|| "(unsigned)".into()),
                            if served.contains(&m.name) { "yes" } else { "no" }.into(),
                            m.sha256[..16].to_string(),
                        ]
                    })
                    .collect();
                let head = [
                    "NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "SIGNED BY", "LOADED",
                    "SHA-256",
                ]
                .map(String::from);
                print!("{}", table(&head, &rows, &[2, 4, 5]));
            }
            Ok(())
        }),
        ModelCmd::Inspect { name, data } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            let store = Store::open(&DataDir::db(&dir)).await?;
            let m = store
                .model(&name)
                .await?
                .with_context(|| format!("no model named {name:?} in the registry"))?;
            let mut j = json_of(&m);
            j["path"] = serde_json::json!(appliance_registry::Store::new(&dir).path_of(&m.sha256));
            j["loaded"] = serde_json::json!(served_models(&dir).await.contains(&m.name));
            println!("{}", serde_json::to_string_pretty(&j)?);
            Ok(())
        }),
        ModelCmd::Pin { name, device, data } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            let said = pin_model(&dir, &name, Some(&device)).await?;
            if served_models(&dir).await.contains(&name) {
                eprintln!("{said}; it moves there when it is next loaded (unload, then load)");
            } else {
                eprintln!("{said}");
            }
            Ok(())
        }),
        ModelCmd::Remove { name, data } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            if served_models(&dir).await.contains(&name) {
                bail!("model {name:?} is loaded by the running daemon; unload it (or stop the daemon) before removing it");
            }
            remove_model(&dir, &name).await?;
            eprintln!("removed model {name}");
            Ok(())
        }),
    }
}

/// Rows as aligned columns two spaces apart, each as wide as its widest cell; the columns
/// in `right` are right-aligned (numbers); the last column is not padded.
fn table<const N: usize>(head: &[String; N], rows: &[[String; N]], right: &[usize]) -> String {
    let mut width = [0usize; N];
    for row in std::iter::once(head).chain(rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(head).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = " ".repeat(width[i] - cell.chars().count());
            if i > 0 {
                line.push_str("  ");
            }
            if right.contains(&i) {
                line.push_str(&pad);
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < N {
                    line.push_str(&pad);
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::table;

    #[test]
    fn a_table_is_as_wide_as_its_widest_cells() {
        let s = |v: &[&str; 3]| v.map(String::from);
        let head = s(&["NAME", "SIZE", "NOTE"]);
        let rows = [
            s(&["a-rather-long-model-name-of-thirty", "1.2 GiB", "x"]),
            s(&["b", "88 MiB", "signed by the site"]),
        ];
        let t = table(&head, &rows, &[1]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME                                   SIZE  NOTE"
        );
        assert_eq!(lines[1], "a-rather-long-model-name-of-thirty  1.2 GiB  x");
        assert_eq!(
            lines[2],
            "b                                    88 MiB  signed by the site"
        );
    }
}
