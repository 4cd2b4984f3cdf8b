//! `appliance tenant ...` and `appliance key ...`: tenants and API keys, against the
//! data directory's database. They work while `serve` runs: each change is committed to
//! the database, then the daemon is told to reload its keys (control socket).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use appliance_gateway::keys;
use appliance_store::{KeyRecord, NewKey, Store};
use clap::Subcommand;

use crate::config::{self, parse_duration};
use appliance_audit::Record;

use crate::audit::record_cli;
use crate::serve::{notify_keys_changed, DataDir};

#[derive(Subcommand)]
pub enum TenantCmd {
    /// Create a tenant (a member organisation or department).
    Create {
        name: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// List tenants.
    List {
        #[command(flatten)]
        data: DataDir,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Create an API key; prints the secret (alone, once) on stdout.
    Create {
        #[arg(long)]
        tenant: String,
        /// Lifetime, e.g. 15m, 12h, 90d (default: no expiry).
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
        /// Comma-separated models this key may use (default: all).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Requests per minute.
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
        rpm: Option<u32>,
        /// Tokens (prompt + completion) per minute.
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
        tpm: Option<u32>,
        /// Requests in progress at once.
        #[arg(long, allow_negative_numbers = true, value_parser = clap::value_parser!(u32).range(1..))]
        max_concurrency: Option<u32>,
        /// A note for the listing (e.g. the application using it).
        #[arg(long)]
        label: Option<String>,
        /// An admin key: the admin API only (status, model load/unload), no inference.
        #[arg(long, conflicts_with_all = ["models", "rpm", "tpm", "max_concurrency"])]
        admin: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        data: DataDir,
    },
    /// Revoke a key at once.
    Revoke {
        id: String,
        #[command(flatten)]
        data: DataDir,
    },
    /// Replace a key by a new one with the same tenant, models and limits; prints the new
    /// secret. The old key keeps working for the grace period.
    Rotate {
        id: String,
        /// How long the old key stays valid (default 24h).
        #[arg(long, value_parser = parse_duration, default_value = "24h")]
        grace: Duration,
        #[command(flatten)]
        data: DataDir,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn now() -> i64 {
    appliance_gateway::server::unix_now()
}

async fn open(data: &DataDir) -> Result<(std::path::PathBuf, Store)> {
    let dir = data.prepare()?;
    let store = Store::open(&DataDir::db(&dir)).await?;
    Ok((dir, store))
}

fn limit(v: Option<u32>, what: &str) -> Result<Option<u32>> {
    match v {
        Some(0) => bail!("--{what} must be at least 1"),
        v => Ok(v),
    }
}

/// Records a failed admin action (best effort: the failure itself is reported anyway).
async fn record_failure(data: &DataDir, action: &str, tenant: Option<&str>, e: &anyhow::Error) {
    let Ok(dir) = data.prepare() else { return };
    let mut r = Record::action(action, 400);
    if let Some(t) = tenant.filter(|t| config::valid_name("tenant", t).is_ok()) {
        r.tenant = Some(t.to_string());
        r.resource = Some(format!("tenant:{t}"));
    }
    r.error = Some("failed".into());
    r.detail = Some(format!("{e:#}").chars().take(200).collect());
    if let Err(e2) = record_cli(&dir, r).await {
        eprintln!("warning: the failed action could not be recorded: {e2:#}");
    }
}

pub fn tenant(cmd: TenantCmd) -> Result<()> {
    let audited = match &cmd {
        TenantCmd::Create { data, name } => Some(("tenant.create", data.clone(), name.clone())),
        _ => None,
    };
    let rt = runtime()?;
    let result = rt.block_on(tenant_inner(cmd));
    if let (Err(e), Some((action, data, name))) = (&result, audited) {
        rt.block_on(record_failure(&data, action, Some(&name), e));
    }
    result
}

async fn tenant_inner(cmd: TenantCmd) -> Result<()> {
    {
        match cmd {
            TenantCmd::Create { name, data } => {
                config::valid_name("tenant", &name)?;
                let (dir, store) = open(&data).await?;
                if store.tenants().await?.iter().any(|t| t.name == name) {
                    return Err(appliance_store::StoreError::TenantExists(name).into());
                }
                // The record first: a tenant the log cannot tell of is not created.
                let mut r = Record::action("tenant.create", 200);
                r.tenant = Some(name.clone());
                r.resource = Some(format!("tenant:{name}"));
                record_cli(&dir, r)
                    .await
                    .context("the tenant was not created")?;
                let t = store.create_tenant(&name, now()).await?;
                eprintln!("created tenant {} (id {})", t.name, t.id);
            }
            TenantCmd::List { data, json } => {
                let (_, store) = open(&data).await?;
                let ts = store.tenants().await?;
                if json {
                    let v: Vec<_> = ts
                        .iter()
                        .map(|t| serde_json::json!({"id": t.id, "name": t.name, "created_at": t.created_at}))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    for t in ts {
                        println!("{}", t.name);
                    }
                }
            }
        }
        Ok(())
    }
}

fn key_json(k: &KeyRecord, now: i64) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "tenant": k.tenant,
        "status": k.status(now),
        "created_at": k.created_at,
        "expires_at": k.expires_at,
        "revoked_at": k.revoked_at,
        "models": k.models,
        "rpm": k.rpm,
        "tpm": k.tpm,
        "max_concurrency": k.max_concurrency,
        "replaced_by": k.replaced_by,
        "label": k.label,
        "scope": k.scope,
    })
}

fn when(t: Option<i64>, now: i64) -> String {
    match t {
        None => "-".into(),
        Some(t) if t > now => format!("in {}", human(t - now)),
        Some(t) => format!("{} ago", human(now - t)),
    }
}

fn human(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

pub fn key(cmd: KeyCmd) -> Result<()> {
    let audited = match &cmd {
        KeyCmd::Create { data, tenant, .. } => {
            Some(("key.create", data.clone(), Some(tenant.clone())))
        }
        KeyCmd::Revoke { data, .. } => Some(("key.revoke", data.clone(), None)),
        KeyCmd::Rotate { data, .. } => Some(("key.rotate", data.clone(), None)),
        KeyCmd::List { .. } => None,
    };
    let rt = runtime()?;
    let result = rt.block_on(key_inner(cmd));
    if let (Err(e), Some((action, data, tenant))) = (&result, audited) {
        rt.block_on(record_failure(&data, action, tenant.as_deref(), e));
    }
    result
}

async fn key_inner(cmd: KeyCmd) -> Result<()> {
    {
        match cmd {
            KeyCmd::Create {
                tenant,
                expires_in,
                models,
                rpm,
                tpm,
                max_concurrency,
                label,
                admin,
                data,
            } => {
                let models = models.map(|m| {
                    m.into_iter()
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>()
                });
                if let Some(ms) = &models {
                    if ms.is_empty() {
                        bail!("--models is empty; leave it out to allow every model");
                    }
                    for m in ms {
                        config::valid_name("model", m)?;
                    }
                }
                let (dir, store) = open(&data).await?;
                if let Some(ms) = &models {
                    // A name no model here has is most likely a typo: said, not refused
                    // (a model may be imported or named with --model later).
                    // The registry's names are added below: not read twice.
                    let mut known = crate::serve::served_models(&dir, None)
                        .await
                        .unwrap_or_else(|e| {
                            eprintln!("warning: the models served here are not known: {e:#}");
                            vec![]
                        });
                    known.extend(store.models().await.into_iter().flatten().map(|m| m.name));
                    if let Ok(p) = crate::policy::load_site(&dir) {
                        known.extend(p.policy.aliases.keys().cloned());
                        known.extend(
                            p.policy
                                .destinations
                                .values()
                                .filter_map(|d| d.model.clone()),
                        );
                    }
                    for m in ms.iter().filter(|m| !known.contains(m)) {
                        eprintln!(
                            "warning: --models {m}: no model of that name is served, registered or named by the policy here; the key can use it only once one is"
                        );
                    }
                }
                let secret = keys::generate();
                let t = now();
                let rec = store
                    .insert_key(
                        &NewKey {
                            id: secret.id.clone(),
                            tenant,
                            secret_sha256: secret.sha256.clone(),
                            expires_at: expires_in.map(|d| t + d.as_secs() as i64),
                            models,
                            rpm: limit(rpm, "rpm")?,
                            tpm: limit(tpm, "tpm")?,
                            max_concurrency: limit(max_concurrency, "max-concurrency")?,
                            label,
                            scope: if admin { "admin" } else { "inference" }.into(),
                        },
                        t,
                    )
                    .await?;
                // Recorded before the secret is shown; unrecorded, the key is withdrawn.
                let mut r = Record::action("key.create", 200);
                r.tenant = Some(rec.tenant.clone());
                r.resource = Some(format!("key:{}", rec.id));
                r.detail = Some(format!("scope {}", rec.scope));
                if let Err(e) = record_cli(&dir, r).await {
                    let _ = store.revoke_key(&rec.id, now()).await;
                    return Err(e.context("the new key was revoked"));
                }
                notify_keys_changed(&dir).await;
                println!("{}", secret.text);
                eprintln!(
                    "created key {} for tenant {} (expires: {}); the secret above is shown only once",
                    rec.id,
                    rec.tenant,
                    when(rec.expires_at, t)
                );
            }
            KeyCmd::List { tenant, json, data } => {
                let (_, store) = open(&data).await?;
                let ks = store.keys(tenant.as_deref()).await?;
                let t = now();
                if json {
                    let v: Vec<_> = ks.iter().map(|k| key_json(k, t)).collect();
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    println!(
                        "{:<16}  {:<16}  {:<9}  {:<8}  {:<10}  {:<10}  {:<20}  LIMITS",
                        "ID", "TENANT", "SCOPE", "STATUS", "CREATED", "EXPIRES", "MODELS"
                    );
                    for k in &ks {
                        let limits = [
                            k.rpm.map(|v| format!("rpm={v}")),
                            k.tpm.map(|v| format!("tpm={v}")),
                            k.max_concurrency.map(|v| format!("concurrency={v}")),
                        ]
                        .into_iter()
                        .flatten()
                        .collect::<Vec<_>>()
                        .join(" ");
                        println!(
                            "{:<16}  {:<16}  {:<9}  {:<8}  {:<10}  {:<10}  {:<20}  {}",
                            k.id,
                            k.tenant,
                            k.scope,
                            k.status(t),
                            when(Some(k.created_at), t),
                            when(k.expires_at, t),
                            k.models
                                .as_ref()
                                .map(|m| m.join(","))
                                .unwrap_or_else(|| "all".into()),
                            if limits.is_empty() {
                                "-".into()
                            } else {
                                limits
                            }
                        );
                    }
                }
            }
            KeyCmd::Revoke { id, data } => {
                let id = key_id(&id)?;
                let (dir, store) = open(&data).await?;
                let t = now();
                let k = store.revoke_key(&id, t).await?;
                notify_keys_changed(&dir).await;
                let mut r = Record::action("key.revoke", 200);
                r.tenant = Some(k.tenant.clone());
                r.resource = Some(format!("key:{}", k.id));
                record_cli(&dir, r).await?;
                match k.revoked_at {
                    // Idempotent: the first revocation's time stands.
                    Some(at) if at < t => eprintln!(
                        "key {} of tenant {} was already revoked, {} ago",
                        k.id,
                        k.tenant,
                        human(t - at)
                    ),
                    _ => eprintln!("revoked key {} of tenant {}", k.id, k.tenant),
                }
            }
            KeyCmd::Rotate { id, grace, data } => {
                let id = key_id(&id)?;
                let (dir, store) = open(&data).await?;
                let old = store
                    .key(&id)
                    .await?
                    .with_context(|| format!("no API key with id {id:?}"))?;
                let t = now();
                if old.status(t) != "active" {
                    bail!(
                        "key {id} is {}; only an active key can be rotated",
                        old.status(t)
                    );
                }
                let secret = keys::generate();
                let new = old.successor(secret.id.clone(), secret.sha256.clone());
                let rec = store
                    .rotate_key(&id, &new, t + grace.as_secs() as i64, t)
                    .await?;
                // The old key's own earlier expiry, if it had one, still holds.
                let left = old
                    .expires_at
                    .map_or(grace.as_secs() as i64, |e| {
                        (e - t).min(grace.as_secs() as i64)
                    })
                    .max(0);
                let mut r = Record::action("key.rotate", 200);
                r.tenant = Some(rec.tenant.clone());
                r.resource = Some(format!("key:{}", rec.id));
                r.detail = Some(format!("replaces key:{id}; old key valid {left}s more"));
                if let Err(e) = record_cli(&dir, r).await {
                    let _ = store.revoke_key(&rec.id, now()).await;
                    return Err(e.context("the new key was revoked"));
                }
                notify_keys_changed(&dir).await;
                println!("{}", secret.text);
                eprintln!(
                    "rotated key {id} -> {} (tenant {}); the old key stays valid for {}",
                    rec.id,
                    rec.tenant,
                    human(left)
                );
            }
        }
        Ok(())
    }
}

/// Accepts a key id, or a whole key (from which the id is taken; the secret is ignored).
fn key_id(s: &str) -> Result<String> {
    let s = s.trim();
    if keys::is_key_id(s) {
        return Ok(s.to_string());
    }
    if let Some((id, _)) = keys::parse(s) {
        return Ok(id.to_string());
    }
    bail!("{s:?} is not a key id (16 hex digits, as `appliance key list` shows)")
}
