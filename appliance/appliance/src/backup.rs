//! `appliance backup create|verify|restore`: the appliance's state without its models
//! (the key store, the audit log and its keys, TLS material, policy and credentials,
//! the config file) in one encrypted file.
//!
//! Format: `APPLBAK1`, a 16-byte salt, a 12-byte nonce, then AES-256-GCM (key: Argon2id
//! of the passphrase with the salt, m = 19456 KiB, t = 2, p = 1) of a tar holding
//! `manifest.json` (version, time, each file's SHA-256) and the files. Databases are
//! copied with SQLite's `VACUUM INTO`, so a running daemon is backed up consistently.
//! A backup verifies when it decrypts, every file matches the manifest, and its audit
//! log verifies against its own signed checkpoints (and, on restore, its audit key is
//! this appliance's unless `--new-appliance`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use appliance_audit::Record;
use clap::Subcommand;

use crate::serve::DataDir;

const MAGIC: &[u8; 8] = b"APPLBAK1";

/// What a backup holds, relative to the data directory (databases are snapshots).
const FILES: &[&str] = &[
    "appliance.toml",
    "tls/cert.pem",
    "tls/key.pem",
    "audit/signing.key",
    "audit/public.key",
    "audit/node-id",
    "audit/content.key",
    "policy/policy.toml",
    "policy/trusted-signers.toml",
];
const DATABASES: &[&str] = &["appliance.db", "audit/audit.db"];

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Write an encrypted backup (passphrase on stdin, at least 12 characters).
    Create {
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        data: DataDir,
    },
    /// Check a backup (passphrase on stdin): decrypts it, checks each file, verifies its
    /// audit log.
    Verify { file: PathBuf },
    /// Restore a backup into a data directory whose daemon is stopped (passphrase on
    /// stdin). The files it replaces are kept in DATA/pre-restore-TIME/.
    Restore {
        file: PathBuf,
        /// Restore onto another appliance (its audit key may differ from the backup's).
        #[arg(long)]
        new_appliance: bool,
        #[command(flatten)]
        data: DataDir,
    },
}

fn passphrase() -> Result<String> {
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    let s = s.trim_end_matches(['\r', '\n']).to_string();
    if s.chars().count() < 12 {
        bail!("the backup passphrase must be at least 12 characters (give it on stdin)");
    }
    Ok(s)
}

fn key_of(passphrase: &str, salt: &[u8]) -> Result<ring::aead::LessSafeKey> {
    let params =
        argon2::Params::new(19_456, 2, 1, Some(32)).map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    a.hash_password_into(passphrase.as_bytes(), salt, &mut key)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
    let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key)
        .map_err(|_| anyhow::anyhow!("AES key"))?;
    Ok(ring::aead::LessSafeKey::new(unbound))
}

/// 64 random bits as hex, for work folders no one can guess or share.
fn unique() -> String {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    appliance_gateway::keys::hex(&b)
}

/// Whether a backup may hold a file of this name (and restore may write it).
fn allowed(name: &str) -> bool {
    name == "manifest.json"
        || FILES.contains(&name)
        || DATABASES.contains(&name)
        || name.strip_prefix("policy/credentials/").is_some_and(|n| {
            !n.is_empty()
                && !n.starts_with('.')
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
        })
}

fn sha256_hex(b: &[u8]) -> String {
    appliance_gateway::keys::hex(&appliance_audit::merkle::sha256_of(b))
}

/// The encrypted backup of `dir` (works while the daemon runs).
pub async fn create_bytes(dir: &Path, passphrase: &str) -> Result<Vec<u8>> {
    let work = dir
        .join("run")
        .join(format!("backup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("audit"))?;
    let result = async {
        // A fresh signed checkpoint first: the backup's log is then signed to its end
        // (a restore refuses a log with unsigned records).
        crate::audit::checkpoint(dir).await?;
        let store = appliance_store::Store::open(&DataDir::db(dir)).await?;
        store.snapshot(&work.join("appliance.db")).await?;
        store.close().await;
        let audit = appliance_store::audit::AuditDb::open(
            &crate::audit::db_path(dir),
            Duration::from_secs(10),
        )
        .await?;
        audit.snapshot(&work.join("audit/audit.db")).await?;
        let mut entries: Vec<(String, Vec<u8>)> = vec![];
        for db in DATABASES {
            entries.push((db.to_string(), std::fs::read(work.join(db))?));
        }
        for f in FILES {
            if let Ok(b) = std::fs::read(dir.join(f)) {
                entries.push((f.to_string(), b));
            }
        }
        if let Ok(rd) = std::fs::read_dir(dir.join("policy/credentials")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && e.path().is_file() {
                    entries.push((format!("policy/credentials/{name}"), std::fs::read(e.path())?));
                }
            }
        }
        let manifest = serde_json::json!({
            "format": "appliance backup 1",
            "version": env!("CARGO_PKG_VERSION"),
            "created_ms": appliance_gateway::server::unix_now() * 1000,
            "files": entries.iter().map(|(n, b)| (n.clone(), sha256_hex(b))).collect::<BTreeMap<_, _>>(),
        });
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
            let mut h = tar::Header::new_gnu();
            h.set_size(bytes.len() as u64);
            h.set_mode(0o600);
            h.set_cksum();
            tar.append_data(&mut h, name, bytes)?;
            Ok(())
        };
        add("manifest.json", serde_json::to_string_pretty(&manifest)?.as_bytes())?;
        for (n, b) in &entries {
            add(n, b)?;
        }
        let mut plain = tar.into_inner()?;
        let rng = ring::rand::SystemRandom::new();
        let mut salt = [0u8; 16];
        let mut nonce = [0u8; 12];
        ring::rand::SecureRandom::fill(&rng, &mut salt).map_err(|_| anyhow::anyhow!("randomness"))?;
        ring::rand::SecureRandom::fill(&rng, &mut nonce).map_err(|_| anyhow::anyhow!("randomness"))?;
        key_of(passphrase, &salt)?
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(MAGIC),
                &mut plain,
            )
            .map_err(|_| anyhow::anyhow!("encryption failed"))?;
        let mut out = Vec::with_capacity(plain.len() + 36);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&salt);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&plain);
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Decrypts a backup and checks it; returns its files (name → bytes) and a summary.
/// The file's header: checked before a passphrase is asked for.
fn looks_like_backup(bytes: &[u8]) -> Result<()> {
    if bytes.len() < 36 + 16 || &bytes[..8] != MAGIC {
        bail!("not an appliance backup");
    }
    Ok(())
}

pub async fn open_verified(
    bytes: &[u8],
    passphrase: &str,
) -> Result<(BTreeMap<String, Vec<u8>>, String)> {
    looks_like_backup(bytes)?;
    let (salt, nonce) = (&bytes[8..24], &bytes[24..36]);
    let mut sealed = bytes[36..].to_vec();
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| anyhow::anyhow!("nonce"))?;
    let plain = key_of(passphrase, salt)?
        .open_in_place(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(MAGIC),
            &mut sealed,
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "the backup does not decrypt: a wrong passphrase, or the file was altered"
            )
        })?;
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(&plain[..]);
    for e in archive.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        if !allowed(&name) || !e.header().entry_type().is_file() {
            bail!("the backup holds {name:?}, which no backup holds");
        }
        let mut b = vec![];
        e.read_to_end(&mut b)?;
        files.insert(name, b);
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        files
            .get("manifest.json")
            .context("the backup has no manifest")?,
    )?;
    let listed = manifest["files"]
        .as_object()
        .context("the manifest lists no files")?;
    for (name, hash) in listed {
        let b = files
            .get(name)
            .with_context(|| format!("the backup lacks {name}"))?;
        if Some(sha256_hex(b).as_str()) != hash.as_str() {
            bail!("{name} does not match the manifest");
        }
    }
    if files.len() != listed.len() + 1 {
        bail!("the backup holds files its manifest does not list");
    }
    for db in DATABASES {
        if !files.contains_key(*db) {
            bail!("the backup lacks {db}");
        }
    }
    // Its signing key and public key belong together.
    if let (Some(sk), Some(pk)) = (
        files.get("audit/signing.key"),
        files.get("audit/public.key"),
    ) {
        let signer = appliance_audit::note::Signer::from_text(&String::from_utf8_lossy(sk))
            .map_err(|e| anyhow::anyhow!("the backup's audit signing key: {e}"))?;
        if String::from_utf8_lossy(pk).trim() != signer.verifier().to_string() {
            bail!("the backup's audit signing key and public key do not belong together");
        }
    }
    // Its audit log must verify against its own key and checkpoints.
    let tmp = std::env::temp_dir().join(format!("appliance-backup-check-{}", unique()));
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&tmp)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(tmp.join("audit"))?;
    }
    let check = async {
        for name in ["audit/audit.db", "audit/public.key"] {
            let b = files
                .get(name)
                .with_context(|| format!("the backup lacks {name}"))?;
            std::fs::write(tmp.join(name), b)?;
        }
        let key = crate::audit::public_key(&tmp)?;
        crate::audit::verify_report(&tmp, &key, vec![]).await
    }
    .await;
    let _ = std::fs::remove_dir_all(&tmp);
    let report =
        check?.map_err(|e| anyhow::anyhow!("the backup's audit log does not verify: {e}"))?;
    let summary = format!(
        "backup of appliance {} made {}: {} files; audit log {}",
        manifest["version"].as_str().unwrap_or("?"),
        appliance_audit::record::format_time(manifest["created_ms"].as_i64().unwrap_or(0)),
        listed.len(),
        report.lines().next().unwrap_or("")
    );
    Ok((files, summary))
}

/// Puts a verified backup's files in place; what they replace (databases with their
/// WAL files) is moved to `DATA/pre-restore-<time>/`, not deleted. Returns that folder.
/// The daemon must not be running (the caller holds its lock).
pub fn apply(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<PathBuf> {
    let aside = dir.join(format!(
        "pre-restore-{}",
        appliance_gateway::server::unix_now()
    ));
    for name in files.keys().filter(|n| *n != "manifest.json") {
        let target = dir.join(name);
        if target.exists() {
            let keep = aside.join(name);
            std::fs::create_dir_all(keep.parent().unwrap_or(&aside))?;
            std::fs::rename(&target, &keep)?;
        }
        for suffix in ["-wal", "-shm"] {
            let side = PathBuf::from(format!("{}{suffix}", target.display()));
            if side.exists() {
                let keep = aside.join(format!("{name}{suffix}"));
                std::fs::create_dir_all(keep.parent().unwrap_or(&aside))?;
                std::fs::rename(&side, &keep)?;
            }
        }
    }
    // The journal belongs to the log being replaced (a crash may have left records in
    // it): aside too, or the next start would apply it to the restored log.
    for name in appliance_audit::journal::FILE_NAMES {
        let journal = crate::audit::dir(dir).join(name);
        if journal.exists() {
            let keep = aside.join("audit").join(name);
            std::fs::create_dir_all(aside.join("audit"))?;
            std::fs::rename(&journal, &keep)?;
        }
    }
    // The moves are made durable before anything is written in their place: after a
    // power cut, the replaced log's journal must not reappear beside the restored log.
    let mut touched = std::collections::BTreeSet::new();
    for name in files.keys().filter(|n| *n != "manifest.json") {
        for base in [dir, aside.as_path()] {
            // Every folder from the file's up to `base` (any of them may be new).
            let target = base.join(name);
            for p in target.ancestors().skip(1) {
                touched.insert(p.to_path_buf());
                if p == base {
                    break;
                }
            }
        }
    }
    touched.insert(crate::audit::dir(dir));
    touched.insert(aside.join("audit"));
    sync_dirs(&touched)?;
    for (name, b) in files.iter().filter(|(n, _)| *n != "manifest.json") {
        let target = dir.join(name);
        if let Some(p) = target.parent() {
            std::fs::create_dir_all(p)?;
        }
        write_private(&target, b)?;
    }
    sync_dirs(&touched)?;
    Ok(aside)
}

/// Flushes each existing folder of `dirs` (the names its entries were given or lost).
fn sync_dirs(dirs: &std::collections::BTreeSet<PathBuf>) -> Result<()> {
    for d in dirs.iter().filter(|d| d.is_dir()) {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("flushing {}", d.display()))?;
    }
    Ok(())
}

/// Where a restore staged from the console waits for the daemon's next start.
fn staged_dir(dir: &Path) -> PathBuf {
    dir.join("restore/staged")
}

/// Stages a verified backup's files (0600, in a 0700 folder; the manifest written last)
/// for [`apply_staged`] at the daemon's next start.
pub fn stage(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let staged = staged_dir(dir);
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&staged)
        .with_context(|| format!("creating {}", staged.display()))?;
    for (name, b) in files.iter().filter(|(n, _)| *n != "manifest.json") {
        let target = staged.join(name);
        if let Some(p) = target.parent() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(p)?;
        }
        write_private(&target, b)?;
    }
    let manifest = files
        .get("manifest.json")
        .context("the backup has no manifest")?;
    write_private(&staged.join("manifest.json"), manifest)
}

/// Applies a staged restore, if there is one whose files all match its manifest (a
/// partial or altered staging is refused and left for the operator). Returns what was
/// done, for the log and the audit record.
pub fn apply_staged(dir: &Path) -> Result<Option<String>> {
    let staged = staged_dir(dir);
    let Ok(manifest_bytes) = std::fs::read(staged.join("manifest.json")) else {
        return Ok(None);
    };
    let refuse = |why: String| {
        anyhow::anyhow!(
            "the restore staged in {} is not applied: {why}; remove that folder to start without it",
            staged.display()
        )
    };
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| refuse(format!("its manifest: {e}")))?;
    let listed = manifest["files"]
        .as_object()
        .ok_or_else(|| refuse("its manifest lists no files".into()))?;
    let mut files = BTreeMap::new();
    for (name, hash) in listed {
        if !allowed(name) {
            return Err(refuse(format!("it holds {name:?}")));
        }
        let b = std::fs::read(staged.join(name)).map_err(|e| refuse(format!("{name}: {e}")))?;
        if Some(sha256_hex(&b).as_str()) != hash.as_str() {
            return Err(refuse(format!("{name} does not match its manifest")));
        }
        files.insert(name.clone(), b);
    }
    files.insert("manifest.json".into(), manifest_bytes);
    let aside = apply(dir, &files)?;
    std::fs::remove_dir_all(&staged).with_context(|| format!("removing {}", staged.display()))?;
    if let Some(parent) = staged.parent() {
        sync_dirs(&[parent.to_path_buf()].into())?;
    }
    Ok(Some(format!(
        "restored the backup of {} staged from the console; the replaced files are in {}",
        appliance_audit::record::format_time(manifest["created_ms"].as_i64().unwrap_or(0)),
        aside.display()
    )))
}

fn record(dir: &Path, action: &str, status: u16, detail: String) {
    let mut r = Record::action(action, status);
    r.detail = Some(detail.chars().take(200).collect());
    if status >= 400 {
        r.error = Some("failed".into());
    }
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        if let Err(e) = rt.block_on(crate::audit::record_cli(dir, r)) {
            eprintln!("warning: {action} could not be recorded: {e:#}");
        }
    }
}

pub fn run(cmd: BackupCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cmd {
        BackupCmd::Create { out, data } => {
            let dir = data.prepare()?;
            let pass = passphrase()?;
            record(&dir, "backup.create", 200, format!("to {}", out.display()));
            let bytes = rt.block_on(create_bytes(&dir, &pass))?;
            write_private(&out, &bytes)?;
            eprintln!(
                "wrote {} ({} bytes); keep the passphrase: without it the backup cannot be read",
                out.display(),
                bytes.len()
            );
            Ok(())
        }
        BackupCmd::Verify { file } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            looks_like_backup(&bytes).with_context(|| format!("{}", file.display()))?;
            let pass = passphrase()?;
            let (_, summary) = rt
                .block_on(open_verified(&bytes, &pass))
                .with_context(|| format!("{}", file.display()))?;
            println!("OK: {summary}");
            Ok(())
        }
        BackupCmd::Restore {
            file,
            new_appliance,
            data,
        } => {
            let dir = data.prepare()?;
            let Some(lock) = crate::serve::try_lock(&dir)? else {
                bail!(
                    "the daemon is running on {}; stop it before restoring",
                    dir.display()
                );
            };
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            looks_like_backup(&bytes).with_context(|| format!("{}: refused", file.display()))?;
            let pass = passphrase()?;
            let (files, summary) = rt
                .block_on(open_verified(&bytes, &pass))
                .with_context(|| format!("{}: refused", file.display()))?;
            if !new_appliance {
                if let Ok(current) = std::fs::read(dir.join("audit/public.key")) {
                    if files.get("audit/public.key") != Some(&current) {
                        bail!("{}: refused: its audit key is not this appliance's (give --new-appliance to restore onto another one)", file.display());
                    }
                }
            }
            let aside = apply(&dir, &files)?;
            drop(lock);
            record(&dir, "backup.restore", 200, summary.clone());
            println!(
                "restored: {summary}; the replaced files are in {}",
                aside.display()
            );
            Ok(())
        }
    }
}

/// Writes a file only the daemon's user may read (0600), atomically (a temporary file,
/// synced, then renamed).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // Hidden while partial: folders read as a whole (credentials) skip dot files.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_appliances_own_files_may_be_in_a_backup() {
        for ok in [
            "manifest.json",
            "appliance.db",
            "audit/audit.db",
            "tls/key.pem",
            "policy/credentials/cloud",
        ] {
            assert!(allowed(ok), "{ok}");
        }
        for bad in [
            "models/sha256/ab",
            "run/control.sock",
            "../etc/passwd",
            "policy/credentials/../../x",
            "policy/credentials/.hidden",
            "policy/credentials/",
            "audit/audit.db-wal",
        ] {
            assert!(!allowed(bad), "{bad}");
        }
    }
}
