//! The audit log's files and commands: `DIR/audit/` holds `audit.db` (records, intents,
//! checkpoints), `signing.key` (0600, the checkpoint key, made on first start),
//! `public.key` (for auditors) and `node-id`. `appliance audit verify | export |
//! verify-export | checkpoint | public-key`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use appliance_audit::journal::{replay, Journal, JournalBackend};
use appliance_audit::merkle::Hash;
use appliance_audit::note::{Checkpoint, Signer, VerifierKey};
use appliance_audit::record::{format_time, parse_time};
use appliance_audit::verify::{verify_export, Exporter, Failure, LogVerifier, Row, Summary};
use appliance_audit::writer::{Batch, LogBackend, Resume, WriterConfig};
use appliance_audit::{Auditor, Record};
use appliance_store::audit::{AuditDb, NewAuditRow, PackedRows};
use clap::Subcommand;

use crate::config::AuditSection;
use crate::serve::{ask_daemon, DataDir};

/// Rows read per query when scanning the log.
const PAGE: u32 = 20_000;

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Re-hash every record, rebuild the tree and check every signed checkpoint; names
    /// the first bad record. Exit status 1 on any failure.
    Verify {
        #[command(flatten)]
        data: DataDir,
        /// The auditor's copy of the public key (file or key text); default: the data
        /// directory's.
        #[arg(long)]
        public_key: Option<String>,
        /// Older signed checkpoints kept elsewhere (files): the log must still match them.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
    },
    /// Write records (with inclusion proofs) and checkpoints (with consistency proofs)
    /// as JSON lines, for `verify-export` on another machine.
    Export {
        #[command(flatten)]
        data: DataDir,
        /// Records from this UTC time (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ).
        #[arg(long)]
        since: Option<String>,
        /// Records before this UTC time.
        #[arg(long)]
        until: Option<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Check an export file with nothing but the log's public key.
    VerifyExport {
        file: PathBuf,
        /// The log's public key: a file holding it, or its text.
        #[arg(long)]
        public_key: String,
    },
    /// Sign a checkpoint of the log now (through the running daemon if there is one).
    Checkpoint {
        #[command(flatten)]
        data: DataDir,
    },
    /// Make an auditor's key pair for `content = "encrypted"` policies: the private key
    /// goes to FILE (0600; keep it off the appliance), the public key line for the
    /// policy's `[audit] content_recipient` is printed.
    ContentKeygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Open the sealed request texts in an export (or any JSON-lines file of records)
    /// with the auditor's private key; prints one JSON line per record that has them.
    Decrypt {
        /// An export file (`appliance audit export`).
        file: PathBuf,
        /// The auditor's private key file (from `content-keygen`).
        #[arg(long)]
        key: PathBuf,
    },
    /// Print the log's public key (give it to auditors).
    PublicKey {
        #[command(flatten)]
        data: DataDir,
    },
    /// Benchmark: durable appends with group commit against one commit per record, and
    /// verification of a large log. Works in a scratch directory (on the disk to measure).
    #[command(hide = true)]
    Bench {
        /// A scratch directory (emptied first).
        #[arg(long)]
        dir: PathBuf,
        /// Concurrent writers for the group-commit run.
        #[arg(long, default_value_t = 256)]
        writers: usize,
        /// Seconds of the group-commit run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Records in the log to verify.
        #[arg(long, default_value_t = 1_000_000)]
        records: u64,
    },
}

pub fn dir(data: &Path) -> PathBuf {
    data.join("audit")
}

pub fn db_path(data: &Path) -> PathBuf {
    dir(data).join("audit.db")
}

/// The store as the writer's backend.
pub struct StoreBackend(pub AuditDb);

impl LogBackend for StoreBackend {
    async fn commit(&mut self, batch: &Batch) -> Result<(), String> {
        self.write(batch, true).await
    }

    async fn commit_deferred(&mut self, batch: &Batch) -> Result<(), String> {
        self.write(batch, false).await
    }

    async fn sync(&mut self) -> Result<(), String> {
        self.0.sync().await.map_err(|e| e.to_string())
    }

    async fn prune(&mut self, before_ms: i64) -> Result<u64, String> {
        self.0.prune(before_ms).await.map_err(|e| e.to_string())
    }

    async fn close(&mut self) -> Result<(), String> {
        self.0.close().await;
        Ok(())
    }
}

impl StoreBackend {
    async fn write(&mut self, batch: &Batch, durable: bool) -> Result<(), String> {
        let records: Vec<NewAuditRow> = batch
            .records
            .iter()
            .map(|r| NewAuditRow {
                seq: r.seq,
                time_ms: r.time_ms,
                leaf: &r.leaf,
                body: &r.body,
            })
            .collect();
        let intents: Vec<(u64, &str)> = batch
            .intents
            .iter()
            .map(|(id, b)| (*id, b.as_str()))
            .collect();
        let checkpoint = batch
            .checkpoint
            .as_ref()
            .map(|c| (c.size, c.time_ms, c.note.as_str()));
        self.0
            .commit(&records, &intents, &batch.resolved, checkpoint, durable)
            .await
            .map_err(|e| e.to_string())
    }
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// The node id and signing key, made on first use.
fn identity(data: &Path) -> Result<(String, Signer)> {
    let d = dir(data);
    std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    let node_path = d.join("node-id");
    if !node_path.exists() {
        let id = format!("node-{}", appliance_gateway::keys::random_hex::<6>());
        write_private(&node_path, &format!("{id}\n"))?;
    }
    let node = std::fs::read_to_string(&node_path)?.trim().to_string();
    let key_path = d.join("signing.key");
    let signer = if key_path.exists() {
        let text = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        Signer::from_text(&text).with_context(|| format!("{}", key_path.display()))?
    } else {
        let s = Signer::generate(&format!("appliance.audit/{node}"))?;
        write_private(&key_path, &format!("{}\n", s.to_text()))?;
        log::info!("audit: new checkpoint signing key {}", key_path.display());
        s
    };
    let public = d.join("public.key");
    let text = format!("{}\n", signer.verifier());
    if std::fs::read_to_string(&public).ok().as_deref() != Some(text.as_str()) {
        std::fs::write(&public, text)?;
    }
    Ok((node, signer))
}

/// Opens the log and reads where the writer resumes: the tree's right edge, the last
/// time, and intents left by a crash. The whole log is verified first, as `appliance
/// audit verify` does (every record's text re-hashed, its order, times and every signed
/// checkpoint): a log that does not verify is not appended to, and the daemon does not
/// start.
async fn resume(db: &AuditDb, key: &VerifierKey) -> Result<Resume> {
    let notes: Vec<String> = db.checkpoints().await?.into_iter().map(|c| c.2).collect();
    let summary = scan(db, key, &notes).await?.map_err(|f| {
        anyhow::anyhow!(
            "the audit log does not verify: {}; refusing to append (run `appliance audit verify`)",
            f.message
        )
    })?;
    Ok(Resume {
        last_time_ms: db.last().await?.map(|l| l.1).unwrap_or(0),
        last_checkpoint_size: summary.signed_size,
        intents: db.intents().await?,
        frontier: summary.frontier,
    })
}

/// Calls `f` with the leaf hash of each record 1..=`upto` (or all), in order, read in
/// packed pages (nothing kept); a missing record is an error naming it.
async fn each_leaf(db: &AuditDb, upto: u64, mut f: impl FnMut(Hash) -> Result<()>) -> Result<()> {
    let mut from = 1u64;
    while from <= upto {
        let Some((first, last, hex)) = db.packed_leaves(from, PACKED_PAGE * 4).await? else {
            break;
        };
        if first != from {
            bail!("the audit log is missing record {from} (run `appliance audit verify`)");
        }
        for (i, h) in hex.as_bytes().chunks(64).enumerate() {
            let seq = first + i as u64;
            if seq > upto {
                break;
            }
            f(hex32(h).with_context(|| format!("record {seq}"))?)?;
        }
        from = last + 1;
    }
    Ok(())
}

/// 32 bytes from 64 hex digits (leaf hashes, keys).
pub fn hex32(hex: &[u8]) -> Result<Hash> {
    if hex.len() != 64 {
        bail!("not 32 bytes of hex");
    }
    let mut hash = [0u8; 32];
    for (j, b) in hash.iter_mut().enumerate() {
        let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (digit(hex[2 * j]), digit(hex[2 * j + 1])) {
            (Some(h), Some(l)) => *b = h << 4 | l,
            _ => bail!("not hex"),
        }
    }
    Ok(hash)
}

/// The `[audit]` settings of `DIR/appliance.toml` (the defaults when there is none or
/// it does not parse: the daemon reports that), for commands that open the log
/// themselves while no daemon runs.
fn settings(data: &Path) -> AuditSection {
    std::fs::read_to_string(data.join("appliance.toml"))
        .ok()
        .and_then(|t| crate::config::parse(&t).ok())
        .map(|c| c.audit)
        .unwrap_or_default()
}

/// Opens the log and starts its writer.
pub async fn start(
    data: &Path,
    cfg: &AuditSection,
) -> Result<(Auditor, tokio::task::JoinHandle<()>)> {
    let (node, signer) = identity(data)?;
    let wait = Duration::from_millis(cfg.lock_timeout_ms);
    let db = AuditDb::open(&db_path(data), wait).await?;
    // What the journal holds that the store may not (a crash, a power cut) goes into the
    // store before anything else; then the journal starts empty.
    if !(16..=1 << 20).contains(&cfg.journal_kib) {
        bail!(
            "[audit] journal_kib = {}: must be 16 to 1048576 (KiB for each of the two journal files)",
            cfg.journal_kib
        );
    }
    // Opening may zero-fill up to two GiB and flushes: off the async threads.
    let (jdir, bytes) = (dir(data), cfg.journal_kib << 10);
    let (journal, held) = tokio::task::spawn_blocking(move || Journal::open_sized(&jdir, bytes))
        .await?
        .with_context(|| format!("opening the audit journal in {}", dir(data).display()))?;
    log::info!(
        "audit journal: {}",
        match journal.direct() {
            true => "direct synchronous writes",
            false => "buffered writes and fdatasync (the file system refuses direct writes)",
        }
    );
    let store_last = db.last().await?.map_or(0, |l| l.0);
    let mut store = StoreBackend(db);
    let added = replay(&mut store, held, store_last).await.map_err(|e| {
        anyhow::anyhow!(
            "applying the audit journal to {}: {e}",
            db_path(data).display()
        )
    })?;
    if added > 0 {
        log::warn!("audit: {added} record(s) from the journal were not yet in the store; added");
    }
    let journal = tokio::task::spawn_blocking(move || {
        let mut journal = journal;
        journal.reset().map(|()| journal)
    })
    .await?
    .with_context(|| format!("emptying the audit journal in {}", dir(data).display()))?;
    let db = store.0;
    let resume = resume(&db, &signer.verifier()).await?;
    if !resume.intents.is_empty() {
        log::warn!(
            "audit: {} request(s) were in progress when the daemon last stopped; recording them as interrupted",
            resume.intents.len()
        );
    }
    let wcfg = WriterConfig {
        origin: signer.name().to_string(),
        node,
        checkpoint_every: Duration::from_secs(cfg.checkpoint_interval_secs.max(1)),
    };
    let backend = JournalBackend::start(journal, StoreBackend(db), wait);
    Ok(Auditor::start(backend, resume, signer, wcfg))
}

/// The local operator, for records of command-line actions.
fn local_user() -> String {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => format!("uid:{uid}"),
    }
}

/// Records a command-line action: through the running daemon (its writer owns the log),
/// or, with no daemon, directly under the data directory's lock. Fails when the record
/// cannot be written: the caller must not report success.
pub async fn record_cli(data: &Path, mut record: Record) -> Result<()> {
    record.user = Some(local_user());
    record.source = Some("local".into());
    for attempt in 0..3 {
        if let Some(reply) = ask_daemon(data, &format!("audit {}", record.canonical())).await {
            return match reply.strip_prefix("ok") {
                Some(_) => Ok(()),
                None => bail!("the audit record could not be written: {reply}"),
            };
        }
        match crate::serve::try_lock(data)? {
            Some(lock) => {
                let (auditor, task) = start(data, &settings(data)).await?;
                let result = auditor.record(record).await;
                auditor.stop(None).await;
                let _ = task.await;
                drop(lock);
                result.context("the audit record could not be written")?;
                return Ok(());
            }
            // A daemon is starting: ask it in a moment.
            None if attempt < 2 => tokio::time::sleep(Duration::from_millis(500)).await,
            None => {}
        }
    }
    bail!(
        "a daemon holds {} but does not answer; the audit record was not written",
        data.display()
    )
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn read_key(arg: &str) -> Result<VerifierKey> {
    if Path::new(arg).exists() {
        let text = std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))?;
        return VerifierKey::parse(&text).with_context(|| format!("public key file {arg}"));
    }
    VerifierKey::parse(arg).map_err(|e| {
        anyhow::anyhow!("public key {arg:?}: no such file, and not a key's text either ({e})")
    })
}

fn data_key(data: &Path) -> Result<VerifierKey> {
    let p = dir(data).join("public.key");
    if !p.exists() {
        bail!(
            "no audit log under {} ({} is missing; it is made when the daemon first starts)",
            data.display(),
            p.display()
        );
    }
    read_key(&p.display().to_string()).with_context(|| {
        format!(
            "no audit log under {} (it is made when the daemon first starts)",
            data.display()
        )
    })
}

pub fn run(cmd: AuditCmd) -> Result<()> {
    match cmd {
        AuditCmd::VerifyExport { file, public_key } => {
            let key = read_key(&public_key)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            match verify_export(&text, &key) {
                Ok(s) => {
                    println!(
                        "OK: {} records, each included in the checkpoint of size {} signed by {}; {} checkpoint(s) consistent",
                        s.records, s.anchor_size, key.name, s.checkpoints
                    );
                    Ok(())
                }
                Err(f) => bail!("{}: {f}", file.display()),
            }
        }
        AuditCmd::ContentKeygen { out } => {
            let k = appliance_audit::content::Opener::generate()?;
            crate::backup::write_private(&out, format!("{}\n", k.secret_text()).as_bytes())?;
            eprintln!(
                "private key written to {} (an auditor's secret: keep it off the appliance)",
                out.display()
            );
            println!("content_recipient = \"{}\"", k.recipient_text());
            Ok(())
        }
        AuditCmd::Decrypt { file, key } => decrypt(&file, &key),
        AuditCmd::PublicKey { data } => {
            let dir = data.prepare()?;
            println!("{}", data_key(&dir)?);
            Ok(())
        }
        AuditCmd::Verify {
            data,
            public_key,
            checkpoints,
        } => runtime()?.block_on(verify(data, public_key, checkpoints)),
        AuditCmd::Export {
            data,
            since,
            until,
            out,
        } => runtime()?.block_on(export(data, since, until, out)),
        AuditCmd::Bench {
            dir,
            writers,
            seconds,
            records,
        } => runtime()?.block_on(bench(dir, writers, seconds, records)),
        AuditCmd::Checkpoint { data } => runtime()?.block_on(async {
            let dir = data.prepare()?;
            let note = checkpoint(&dir).await?;
            print!("{note}");
            Ok(())
        }),
    }
}

/// Prints the opened texts of every record in `file` that carries sealed content; a
/// record that does not open is named with its line (and the others still printed).
fn decrypt(file: &Path, key: &Path) -> Result<()> {
    use appliance_audit::content::{Opener, SEALED};
    let opener = Opener::parse(
        &std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?,
    )
    .with_context(|| key.display().to_string())?;
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (mut opened, mut failed) = (0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
        let r = v.get("record").unwrap_or(&v);
        let Some(sealed) = r["content"].as_str().filter(|c| c.starts_with(SEALED)) else {
            continue;
        };
        let id = r["request_id"].as_str().unwrap_or_default();
        match opener.open(sealed, id) {
            Ok(texts) => {
                opened += 1;
                println!(
                    "{}",
                    serde_json::json!({"seq": r["seq"], "time": r["time"], "request_id": id, "texts": texts})
                );
            }
            Err(e) => {
                failed += 1;
                eprintln!("{}:{}: {e}", file.display(), n + 1);
            }
        }
    }
    eprintln!("{opened} record(s) opened, {failed} did not open");
    if failed > 0 {
        bail!(
            "{failed} sealed record(s) in {} did not open",
            file.display()
        );
    }
    Ok(())
}

/// A fresh checkpoint: from the daemon, or signed here when none runs.
pub(crate) async fn checkpoint(dir: &Path) -> Result<String> {
    if let Some(reply) = ask_daemon(dir, "checkpoint").await {
        let Some(json) = reply.strip_prefix("ok ") else {
            bail!("the daemon could not sign a checkpoint: {reply}");
        };
        return Ok(serde_json::from_str(json)?);
    }
    let Some(lock) = crate::serve::try_lock(dir)? else {
        bail!("a daemon holds {} but does not answer", dir.display());
    };
    let (auditor, task) = start(dir, &settings(dir)).await?;
    let note = auditor.checkpoint().await;
    auditor.stop(None).await;
    let _ = task.await;
    drop(lock);
    Ok(note?)
}

async fn open_read(dir: &Path) -> Result<AuditDb> {
    let path = db_path(dir);
    if !path.exists() {
        bail!(
            "no audit log at {} (it is made when the daemon first starts)",
            path.display()
        );
    }
    Ok(AuditDb::open(&path, Duration::from_secs(10)).await?)
}

async fn verify(data: DataDir, public_key: Option<String>, extra: Vec<PathBuf>) -> Result<()> {
    let dir = data.prepare()?;
    let key = match &public_key {
        Some(k) => read_key(k)?,
        None => data_key(&dir)?,
    };
    let mut notes = vec![];
    for p in &extra {
        notes.push(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?);
    }
    match verify_report(&dir, &key, notes).await? {
        Ok(text) => {
            println!("{text}");
            report_verify(&dir, true, text.lines().next().unwrap_or("")).await;
            Ok(())
        }
        Err(text) => {
            report_verify(&dir, false, &text).await;
            bail!("{text}")
        }
    }
}

/// Verifies the log of `dir` against `key`, its own checkpoints and `extra` ones: the
/// report (`OK: ...`), or why it fails (`FAILED at record N: ...`). Outer error: the
/// log could not be read.
pub async fn verify_report(
    dir: &Path,
    key: &VerifierKey,
    extra: Vec<String>,
) -> Result<Result<String, String>> {
    let db = open_read(dir).await?;
    let mut notes: Vec<String> = db.checkpoints().await?.into_iter().map(|c| c.2).collect();
    notes.extend(extra);
    let started = std::time::Instant::now();
    let s = match scan(&db, key, &notes).await? {
        Ok(s) => s,
        Err(f) => {
            return Ok(Err(match f.seq {
                Some(s) => format!("FAILED at record {s}: {f}"),
                None => format!("FAILED: {f}"),
            }))
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let mut text = format!(
        "OK: {} records ({} pruned to their hashes), {} signed checkpoint(s) match, verified in {:.2} s ({:.0} records/s)",
        s.records,
        s.pruned,
        s.checkpoints,
        secs,
        s.records as f64 / secs.max(1e-9)
    );
    // After a crash the journal may hold records audit.db does not have yet.
    let pending: Vec<u64> = Journal::read(&self::dir(dir))
        .unwrap_or_default()
        .iter()
        .flat_map(|b| b.records.iter().map(|r| r.seq))
        .filter(|&seq| seq > s.records)
        .collect();
    if let (Some(first), Some(last)) = (pending.iter().min(), pending.iter().max()) {
        text.push_str(&format!(
            "\nnote: records {first}..{last} are in the journal but not yet in audit.db (the daemon stopped without applying them, or is running); it applies them when it next starts"
        ));
    }
    if s.records > s.signed_size {
        text.push_str(&format!(
            "\nnote: records {}..{} are after the newest checkpoint (size {}) and not yet signed; `appliance audit checkpoint` signs them",
            s.signed_size + 1,
            s.records,
            s.signed_size
        ));
    }
    Ok(Ok(text))
}

/// The data directory's audit public key.
pub fn public_key(dir: &Path) -> Result<VerifierKey> {
    data_key(dir)
}

/// Re-hashes every stored record, rebuilds the tree and checks every checkpoint.
/// Outer error: the database could not be read; inner: the log does not verify.
async fn scan(
    db: &AuditDb,
    key: &VerifierKey,
    notes: &[String],
) -> Result<Result<Summary, Failure>> {
    let mut v = match LogVerifier::new(key, notes) {
        Ok(v) => v,
        Err(f) => return Ok(Err(f)),
    };
    // Pages by seq range, up to the last stored seq (a gap is the verifier's to find);
    // the next page is read while this one is checked.
    let end = db.last().await?.map(|l| l.0).unwrap_or(0);
    let fetch = |from: u64| {
        let db = db.clone();
        tokio::spawn(async move { db.packed_rows(from, PACKED_PAGE).await })
    };
    let mut from = 1;
    let mut next = fetch(from);
    while from <= end {
        let page = next.await??;
        from += PACKED_PAGE as u64;
        next = fetch(from);
        let Some(text) = page else { continue };
        let rows = match unpack(&text) {
            Ok(rows) => rows,
            Err(f) => return Ok(Err(f)),
        };
        if let Err(f) = v.push_batch(&rows) {
            return Ok(Err(f));
        }
    }
    Ok(v.finish())
}

/// Rows per packed page when verifying.
const PACKED_PAGE: u32 = 4000;

/// Splits a packed page (see `AuditDb::packed_rows`) into rows.
fn unpack(p: &PackedRows) -> Result<Vec<Row<'_>>, Failure> {
    let bad = |seq: Option<u64>, message: String| Failure { seq, message };
    let mut seqs = p.seqs.split(',');
    let mut times = p.times.split(',');
    let mut bodies = p.bodies.split('\n');
    let leaves = p.leaves.as_bytes();
    let mut rows = Vec::with_capacity(leaves.len() / 64);
    for (i, hex) in leaves.chunks(64).enumerate() {
        let (Some(seq), Some(time), Some(body)) = (seqs.next(), times.next(), bodies.next()) else {
            return Err(bad(None, format!("a stored page is malformed (row {i})")));
        };
        let seq: u64 = seq
            .parse()
            .map_err(|_| bad(None, format!("a stored seq is not a number: {seq:?}")))?;
        let hash = hex32(hex).map_err(|e| bad(Some(seq), format!("record {seq}: {e}")))?;
        rows.push(Row {
            seq,
            time_ms: time
                .parse()
                .map_err(|_| bad(Some(seq), format!("record {seq}: its time is not a number")))?,
            leaf: hash,
            body: (body != "-").then_some(body),
        });
    }
    if seqs.next().is_some() || bodies.next().is_some() {
        // A body with a raw newline (not canonical) shifts the rest: name where.
        let at = rows
            .iter()
            .find(|r| r.body.is_some_and(|b| !b.ends_with('}')))
            .or(rows.first())
            .map(|r| r.seq);
        return Err(bad(
            at,
            "the stored rows do not line up (a record's text holds a raw newline): the log was altered".into(),
        ));
    }
    Ok(rows)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn bench(dir: PathBuf, writers: usize, seconds: u64, records: u64) -> Result<()> {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let sample = |i: usize| {
        let mut r = Record::action("chat.completions", 200);
        r.tenant = Some("acme".into());
        r.key_id = Some("0123456789abcdef".into());
        r.source = Some("10.1.2.3".into());
        r.resource = Some("smollm2".into());
        r.destination = Some("local/cpu".into());
        r.prompt_tokens = 40;
        r.completion_tokens = 120;
        r.latency_ms = 812;
        r.request_id = Some(format!("req_bench{i:012}"));
        r
    };
    // 1. One commit (one fsync) per record: the baseline.
    let one = AuditDb::open(&dir.join("one.db"), Duration::from_secs(5)).await?;
    let n_one = 2000;
    let mut lat = Vec::with_capacity(n_one);
    let t0 = std::time::Instant::now();
    for i in 0..n_one {
        let body = sample(i).canonical();
        let leaf = appliance_audit::merkle::leaf_hash(body.as_bytes());
        let t = std::time::Instant::now();
        one.commit(
            &[NewAuditRow {
                seq: i as u64 + 1,
                time_ms: 0,
                leaf: &leaf,
                body: &body,
            }],
            &[],
            &[],
            None,
            true,
        )
        .await?;
        lat.push(t.elapsed());
    }
    let one_rate = n_one as f64 / t0.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "per-record commit (synchronous=FULL), 1 writer: {:.0} appends/s, p50 {:.3} ms, p99 {:.3} ms",
        one_rate,
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99))
    );
    one.close().await;

    // 2. Group commit through the writer, `writers` concurrent callers, and 1 caller.
    let data = dir.join("data");
    for (label, callers, secs) in [
        ("1 writer", 1usize, seconds.min(3)),
        ("concurrent", writers, seconds),
    ] {
        let _ = std::fs::remove_dir_all(&data);
        let (auditor, task) = start(&data, &AuditSection::default()).await?;
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        let mut tasks = vec![];
        for w in 0..callers {
            let a = auditor.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = vec![];
                let mut i = w * 10_000_000;
                while std::time::Instant::now() < until {
                    let t = std::time::Instant::now();
                    a.record(sample(i)).await.map_err(anyhow::Error::from)?;
                    lat.push(t.elapsed());
                    i += 1;
                }
                Ok::<_, anyhow::Error>(lat)
            }));
        }
        let mut lat = vec![];
        for t in tasks {
            lat.extend(t.await??);
        }
        auditor.stop(None).await;
        let _ = task.await;
        lat.sort();
        println!(
            "group commit, {label} ({callers} callers): {:.0} appends/s, p50 {:.3} ms, p99 {:.3} ms ({} appends; {:.1}x the per-record commit)",
            lat.len() as f64 / secs as f64,
            ms(percentile(&lat, 0.5)),
            ms(percentile(&lat, 0.99)),
            lat.len(),
            lat.len() as f64 / secs as f64 / one_rate
        );
    }

    // 3. Verification of a log of `records` records.
    let _ = std::fs::remove_dir_all(&data);
    let (auditor, task) = start(&data, &AuditSection::default()).await?;
    let t0 = std::time::Instant::now();
    for i in 0..records as usize {
        auditor.record_later(sample(i));
        if i % 100_000 == 99_999 {
            auditor.checkpoint().await?;
        }
    }
    auditor.checkpoint().await?;
    auditor.stop(None).await;
    let _ = task.await;
    println!(
        "filled {records} records in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let db = open_read(&data).await?;
    let key = data_key(&data)?;
    let notes: Vec<String> = db.checkpoints().await?.into_iter().map(|c| c.2).collect();
    // Reading alone (the floor), then checking alone, then the two overlapped.
    let t1 = std::time::Instant::now();
    let mut pages = vec![];
    let mut from = 1;
    while let Some(text) = db.packed_rows(from, PACKED_PAGE).await? {
        from += PACKED_PAGE as u64;
        pages.push(text);
    }
    let read_secs = t1.elapsed().as_secs_f64();
    let bytes: usize = pages.iter().map(|p| p.bodies.len()).sum();
    let t1 = std::time::Instant::now();
    let mut v = LogVerifier::new(&key, &notes).map_err(|f| anyhow::anyhow!("{f}"))?;
    for p in &pages {
        let rows = unpack(p).map_err(|f| anyhow::anyhow!("{f}"))?;
        v.push_batch(&rows).map_err(|f| anyhow::anyhow!("{f}"))?;
    }
    v.finish().map_err(|f| anyhow::anyhow!("{f}"))?;
    let check_secs = t1.elapsed().as_secs_f64();
    drop(pages);
    let t0 = std::time::Instant::now();
    let s = scan(&db, &key, &notes)
        .await?
        .map_err(|f| anyhow::anyhow!("{f}"))?;
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "verify: {} records ({:.0} MB of text), {} checkpoints in {:.2} s = {:.0} records/s (reading alone {:.2} s, checking alone {:.2} s)",
        s.records,
        bytes as f64 / 1e6,
        s.checkpoints,
        secs,
        s.records as f64 / secs,
        read_secs,
        check_secs
    );
    Ok(())
}

/// Audit reads are themselves audited (best effort for verification: a failed record of
/// a read must not hide the read's result).
async fn report_verify(dir: &Path, ok: bool, detail: &str) {
    let mut r = Record::action("audit.verify", if ok { 200 } else { 409 });
    r.detail = Some(detail.chars().take(200).collect());
    if let Err(e) = record_cli(dir, r).await {
        eprintln!("warning: the verification itself could not be recorded: {e:#}");
    }
}

async fn export(
    data: DataDir,
    since: Option<String>,
    until: Option<String>,
    out: PathBuf,
) -> Result<()> {
    let dir = data.prepare()?;
    let summary = export_to(&dir, since, until, &out, true).await?;
    println!("{summary}");
    Ok(())
}

/// Writes an export to `out`; `record`: write the `audit.export` record here (the
/// console writes its own, naming the user). Returns a one-line summary.
pub async fn export_to(
    dir: &Path,
    since: Option<String>,
    until: Option<String>,
    out: &Path,
    record: bool,
) -> Result<String> {
    let dir = dir.to_path_buf();
    let since_ms = since
        .as_deref()
        .map(parse_time)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let until_ms = until
        .as_deref()
        .map(parse_time)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let key = data_key(&dir)?;
    // The export is recorded before it is written, and then signed into a checkpoint
    // that covers everything exported.
    if record {
        let mut r = Record::action("audit.export", 200);
        r.detail = Some(format!(
            "since {} until {} to {}",
            since_ms.map(format_time).unwrap_or_else(|| "-".into()),
            until_ms.map(format_time).unwrap_or_else(|| "-".into()),
            out.display()
        ));
        record_cli(&dir, r).await?;
    }
    let anchor_note = checkpoint(&dir).await?;
    let anchor = Checkpoint::open(&anchor_note, &key)?;
    let db = open_read(&dir).await?;
    let mut leaves: Vec<Hash> = Vec::with_capacity(anchor.size as usize);
    each_leaf(&db, anchor.size, |l| {
        leaves.push(l);
        Ok(())
    })
    .await?;
    let ex = Exporter::new(leaves, anchor.clone()).map_err(anyhow::Error::msg)?;
    let tmp = out.with_extension("partial");
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    writeln!(w, "{}", ex.header(&key, since_ms, until_ms, now))?;
    let in_range = |t: i64| since_ms.is_none_or(|s| t >= s) && until_ms.is_none_or(|u| t < u);
    let mut cps = 0;
    for (size, time_ms, note) in db.checkpoints().await? {
        if size <= anchor.size && (in_range(time_ms) || note == anchor_note) {
            writeln!(w, "{}", ex.checkpoint(size, &note))?;
            cps += 1;
        }
    }
    let mut n = 0u64;
    let mut pruned = 0u64;
    if let Some((first, last)) = db.seq_range(since_ms, until_ms).await? {
        let last = last.min(anchor.size);
        let mut from = first;
        while from <= last {
            let page = db.rows(from, PAGE).await?;
            let Some(l) = page.last() else { break };
            from = l.seq + 1;
            for r in page
                .into_iter()
                .filter(|r| r.seq <= last && in_range(r.time_ms))
            {
                match &r.body {
                    Some(b) => {
                        writeln!(w, "{}", ex.record(r.seq, b))?;
                        n += 1;
                    }
                    None => pruned += 1,
                }
            }
        }
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(format!(
        "exported {n} records ({pruned} in range already pruned) and {cps} checkpoint(s) to {}; check it with: appliance audit verify-export {} --public-key '{key}'",
        out.display(),
        out.display()
    ))
}
