//! Durable appends with group commit.
//!
//! One writer task, on a thread of its own, owns the log: callers send it records and
//! wait; it takes everything waiting (up to [`MAX_BATCH`]), assigns sequence numbers and
//! times, hashes the leaves, commits the batch as one unit (in the appliance, one durable
//! write of a journal frame: [`crate::journal`]), and only then answers each caller. A
//! failed commit answers every waiting caller with an error and changes nothing: the
//! in-memory tree advances only with the log.
//!
//! Requests that reach a worker are recorded in two steps, still one record each: an
//! *intent* (the request's actor, action and resource) is committed before the worker is
//! called, and the record is committed (resolving the intent, in the same commit)
//! before the answer ends. An intent left behind by a crash becomes an `interrupted`
//! record at the next start, so a request that got any byte of an answer is in the log.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::merkle::{leaf_hash, Frontier, Hash};
use crate::note::{Checkpoint, Signer};
use crate::record::{format_time, Record};

/// Most records in one transaction.
pub const MAX_BATCH: usize = 4096;

/// A record as stored: its position, time, leaf hash and canonical text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub time_ms: i64,
    pub leaf: Hash,
    pub body: String,
}

/// A signed checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCheckpoint {
    pub size: u64,
    pub time_ms: i64,
    pub note: String,
}

/// What one transaction writes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Intents to store: (id, canonical text of the partial record).
    pub intents: Vec<(u64, String)>,
    pub records: Vec<StoredRecord>,
    /// Intents whose record is in this batch.
    pub resolved: Vec<u64>,
    pub checkpoint: Option<StoredCheckpoint>,
}

/// Where the log lives (the appliance's SQLite file; a vector in unit tests).
pub trait LogBackend: Send + 'static {
    /// Writes the whole batch durably, or nothing.
    fn commit(&mut self, batch: &Batch) -> impl Future<Output = Result<(), String>> + Send;
    /// Writes the whole batch, or nothing, visible to readers when it returns but
    /// perhaps durable only once [`LogBackend::sync`] (or a durable commit) has
    /// returned after it. Behind a journal that holds the batch durably meanwhile, this
    /// spares the store a flush per transaction.
    fn commit_deferred(
        &mut self,
        batch: &Batch,
    ) -> impl Future<Output = Result<(), String>> + Send {
        self.commit(batch)
    }
    /// Makes every batch committed so far durable. The default does nothing, which is
    /// right only with the default `commit_deferred` (a durable commit): a backend that
    /// overrides one overrides both.
    fn sync(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
    /// Drops the text of records older than `before_ms` (their leaf hashes stay);
    /// returns how many.
    fn prune(&mut self, before_ms: i64) -> impl Future<Output = Result<u64, String>> + Send;
    /// A future that ends when everything committed so far is where readers of the
    /// store look (a journal in front of the store: when the store has caught up). It
    /// borrows nothing: the writer goes on while someone waits for it.
    fn settle(&mut self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        async { Ok(()) }
    }
    /// At stop, after the last commit: leaves everything in the store (a journal in
    /// front of it: settles, then empties the journal).
    fn close(&mut self) -> impl Future<Output = Result<(), String>> + Send {
        async { Ok(()) }
    }
}

/// What the writer resumes from, read by the caller at start.
#[derive(Debug, Default)]
pub struct Resume {
    pub frontier: Frontier,
    pub last_time_ms: i64,
    pub last_checkpoint_size: u64,
    /// Intents left by a previous run: (id, partial record text).
    pub intents: Vec<(u64, String)>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    #[error("the audit log cannot be written: {0}")]
    Unavailable(String),
    #[error("the audit writer has stopped")]
    Stopped,
}

/// A record to append, the intent it resolves, and who waits for it (nobody: retried).
type Append = (
    Record,
    Option<u64>,
    Option<oneshot::Sender<Result<u64, AuditError>>>,
);

enum Msg {
    Append {
        record: Record,
        intent: Option<u64>,
        reply: Option<oneshot::Sender<Result<u64, AuditError>>>,
    },
    Intent {
        record: Record,
        reply: oneshot::Sender<Result<u64, AuditError>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<String, AuditError>>,
    },
    Settle {
        reply: oneshot::Sender<Result<(), AuditError>>,
    },
    Prune {
        before_ms: i64,
        reply: oneshot::Sender<Result<u64, AuditError>>,
    },
    Stop {
        last: Option<Record>,
        reply: oneshot::Sender<()>,
    },
}

/// Settings of the writer.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// The log's name in checkpoints (and the signer's key name).
    pub origin: String,
    /// This appliance, written into every record.
    pub node: String,
    /// A checkpoint is signed this often while the log grows.
    pub checkpoint_every: Duration,
}

/// The handle everyone records through. Cheap to clone.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::UnboundedSender<Msg>,
    node: Arc<str>,
}

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Auditor({})", self.node)
    }
}

/// A request between its intent and its record.
#[derive(Debug)]
pub struct Ticket {
    id: u64,
    auditor: Auditor,
    done: bool,
}

impl Ticket {
    /// Commits the request's record (and resolves its intent); returns its seq. On
    /// failure the ticket comes back, for a record of what the client got instead.
    pub async fn finish(mut self, record: Record) -> Result<u64, (AuditError, Ticket)> {
        self.done = true;
        let (id, auditor) = (self.id, self.auditor.clone());
        auditor.send_append(record, Some(id)).await.map_err(|e| {
            (
                e,
                Ticket {
                    id,
                    auditor: auditor.clone(),
                    done: false,
                },
            )
        })
    }

    /// Queues the request's record without waiting; the writer retries it until it is
    /// written (and a crash before that leaves the intent, which becomes a record).
    pub fn finish_later(mut self, record: Record) {
        self.done = true;
        let _ = self.auditor.tx.send(Msg::Append {
            record,
            intent: Some(self.id),
            reply: None,
        });
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            // Dropped without an outcome: keep the intent's facts, say so.
            log::warn!("audit intent {} dropped without an outcome", self.id);
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Auditor {
    /// Starts the writer on a thread of its own; the handle ends when it has stopped.
    pub fn start<B: LogBackend>(
        backend: B,
        resume: Resume,
        signer: Signer,
        cfg: WriterConfig,
    ) -> (Auditor, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let auditor = Auditor {
            tx,
            node: cfg.node.clone().into(),
        };
        let writer = Writer {
            backend,
            signer,
            frontier: resume.frontier,
            last_time_ms: resume.last_time_ms,
            last_checkpoint_size: resume.last_checkpoint_size,
            next_intent: resume
                .intents
                .iter()
                .map(|(id, _)| id + 1)
                .max()
                .unwrap_or(1),
            retry: VecDeque::new(),
            cfg,
            failing: false,
            main: tokio::runtime::Handle::current(),
        };
        // Intents of a previous run become records first.
        for (id, text) in resume.intents {
            let mut record: Record =
                serde_json::from_str(&text).unwrap_or_else(|_| Record::action("unknown", 500));
            record.status = 500;
            record.error = Some("interrupted".into());
            record.detail = Some("the daemon stopped before this request finished".into());
            let _ = auditor.tx.send(Msg::Append {
                record,
                intent: Some(id),
                reply: None,
            });
        }
        // The writer has a thread of its own: a commit is a wait for the disk, which
        // then blocks only it, and its turn never waits behind the gateway's tasks.
        let (ended, end) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(writer.run(rx)),
                    Err(e) => log::error!("audit: no runtime for the writer's thread: {e}"),
                }
                let _ = ended.send(());
            });
        if let Err(e) = thread {
            log::error!("audit: cannot start the writer's thread: {e}");
        }
        // Ends when the writer has; a panic there is one here too, as for a task.
        let handle = tokio::spawn(async move {
            if end.await.is_err() {
                panic!("the audit writer's thread panicked");
            }
        });
        (auditor, handle)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    async fn send_append(&self, record: Record, intent: Option<u64>) -> Result<u64, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Append {
                record,
                intent,
                reply: Some(reply),
            })
            .map_err(|_| AuditError::Stopped)?;
        rx.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Appends a record durably; returns its seq.
    pub async fn record(&self, record: Record) -> Result<u64, AuditError> {
        self.send_append(record, None).await
    }

    /// Queues a record without waiting; retried until written.
    pub fn record_later(&self, record: Record) {
        let _ = self.tx.send(Msg::Append {
            record,
            intent: None,
            reply: None,
        });
    }

    /// Durably notes that a request is about to be served.
    pub async fn intent(&self, record: Record) -> Result<Ticket, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Intent { record, reply })
            .map_err(|_| AuditError::Stopped)?;
        let id = rx.await.unwrap_or(Err(AuditError::Stopped))?;
        Ok(Ticket {
            id,
            auditor: self.clone(),
            done: false,
        })
    }

    /// Signs and stores a checkpoint of the log as it is now; returns the signed note.
    pub async fn checkpoint(&self) -> Result<String, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Checkpoint { reply })
            .map_err(|_| AuditError::Stopped)?;
        rx.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Waits until every record committed so far can be read from the store (the
    /// console's search, exports, backups read it; it trails the journal by
    /// milliseconds).
    pub async fn settle(&self) -> Result<(), AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Settle { reply })
            .map_err(|_| AuditError::Stopped)?;
        rx.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Prunes the text of records older than `before_ms`, then records that it did.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, AuditError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Prune { before_ms, reply })
            .map_err(|_| AuditError::Stopped)?;
        rx.await.unwrap_or(Err(AuditError::Stopped))
    }

    /// Writes what is queued, `last` (e.g. the daemon's stop), a last checkpoint, and
    /// stops the writer.
    pub async fn stop(&self, last: Option<Record>) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Stop { last, reply }).is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer<B> {
    backend: B,
    signer: Signer,
    frontier: Frontier,
    last_time_ms: i64,
    last_checkpoint_size: u64,
    next_intent: u64,
    /// Records that must be written but whose caller does not wait (retried).
    retry: VecDeque<(Record, Option<u64>)>,
    cfg: WriterConfig,
    failing: bool,
    /// The runtime that started the writer: what waits for the store runs there, and
    /// outlives the writer's own thread.
    main: tokio::runtime::Handle,
}

enum Reply {
    Seq(Option<oneshot::Sender<Result<u64, AuditError>>>, u64),
    Checkpoint(oneshot::Sender<Result<String, AuditError>>),
}

impl<B: LogBackend> Writer<B> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_checkpoint_at = tokio::time::Instant::now();
        loop {
            let mut msgs = Vec::new();
            let mut want_checkpoint = false;
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => msgs.push(m),
                    None => return,
                },
                _ = tick.tick() => {
                    want_checkpoint = self.frontier.size() > self.last_checkpoint_size
                        && last_checkpoint_at.elapsed() >= self.cfg.checkpoint_every;
                    if self.retry.is_empty() && !want_checkpoint {
                        continue;
                    }
                }
            }
            while msgs.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => msgs.push(m),
                    Err(_) => break,
                }
            }
            let mut stop = None;
            let mut prunes = vec![];
            let mut appends = vec![];
            let mut intents = vec![];
            let mut checkpoints = vec![];
            let mut settles = vec![];
            for m in msgs {
                match m {
                    Msg::Append {
                        record,
                        intent,
                        reply,
                    } => appends.push((record, intent, reply)),
                    Msg::Intent { record, reply } => intents.push((record, reply)),
                    Msg::Checkpoint { reply } => checkpoints.push(reply),
                    Msg::Settle { reply } => settles.push(reply),
                    Msg::Prune { before_ms, reply } => prunes.push((before_ms, reply)),
                    Msg::Stop { last, reply } => {
                        appends.extend(last.map(|r| (r, None, None)));
                        stop = Some(reply);
                    }
                }
            }
            let sign = want_checkpoint || !checkpoints.is_empty() || stop.is_some();
            self.commit(appends, intents, checkpoints, sign).await;
            if sign && !self.failing {
                last_checkpoint_at = tokio::time::Instant::now();
            }
            if !settles.is_empty() {
                let settled = self.backend.settle();
                self.main.spawn(async move {
                    let settled = settled.await.map_err(AuditError::Unavailable);
                    for reply in settles {
                        let _ = reply.send(settled.clone());
                    }
                });
            }
            for (before_ms, reply) in prunes {
                let result = self.prune(before_ms).await;
                let _ = reply.send(result);
            }
            if let Some(reply) = stop {
                if let Err(e) = self.backend.close().await {
                    log::error!(
                        "closing the audit log: {e} (its journal is applied at the next start)"
                    );
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    async fn prune(&mut self, before_ms: i64) -> Result<u64, AuditError> {
        let n = self
            .backend
            .prune(before_ms)
            .await
            .map_err(AuditError::Unavailable)?;
        let mut r = Record::action("audit.prune", 200);
        r.source = Some("local".into());
        r.detail = Some(format!(
            "pruned the text of {n} records older than {}",
            format_time(before_ms)
        ));
        let (reply, rx) = oneshot::channel();
        self.commit(vec![(r, None, Some(reply))], vec![], vec![], true)
            .await;
        rx.await.unwrap_or(Err(AuditError::Stopped))?;
        Ok(n)
    }

    async fn commit(
        &mut self,
        appends: Vec<Append>,
        intents: Vec<(Record, oneshot::Sender<Result<u64, AuditError>>)>,
        checkpoints: Vec<oneshot::Sender<Result<String, AuditError>>>,
        sign: bool,
    ) {
        let mut batch = Batch::default();
        let mut frontier = self.frontier.clone();
        let mut time = self.last_time_ms.max(now_ms());
        let mut replies: Vec<Reply> = vec![];
        let mut kept: Vec<(Record, Option<u64>)> = vec![];
        let retried: Vec<_> = self.retry.drain(..).map(|(r, i)| (r, i, None)).collect();
        for (mut record, intent, reply) in retried.into_iter().chain(appends) {
            let seq = frontier.size() + 1;
            kept.push((record.clone(), intent));
            record.seq = seq;
            record.time = format_time(time);
            record.node = self.cfg.node.clone();
            let body = record.canonical();
            let leaf = leaf_hash(body.as_bytes());
            frontier.push(leaf);
            batch.records.push(StoredRecord {
                seq,
                time_ms: time,
                leaf,
                body,
            });
            if let Some(id) = intent {
                batch.resolved.push(id);
            }
            replies.push(Reply::Seq(reply, seq));
        }
        let mut intent_replies = vec![];
        for (mut record, reply) in intents {
            let id = self.next_intent;
            self.next_intent += 1;
            record.node = self.cfg.node.clone();
            batch.intents.push((id, record.canonical()));
            intent_replies.push((reply, id));
        }
        if sign && (frontier.size() > self.last_checkpoint_size || !checkpoints.is_empty()) {
            let c = Checkpoint {
                origin: self.cfg.origin.clone(),
                size: frontier.size(),
                root: frontier.root(),
                time_ms: time,
            };
            batch.checkpoint = Some(StoredCheckpoint {
                size: c.size,
                time_ms: time,
                note: self.signer.sign(&c.body()),
            });
        }
        for r in checkpoints {
            replies.push(Reply::Checkpoint(r));
        }
        if batch.records.is_empty() && batch.intents.is_empty() && batch.checkpoint.is_none() {
            return answer(replies, intent_replies, Ok(None), Ok(()));
        }
        time = time.max(self.last_time_ms);
        match self.backend.commit(&batch).await {
            Ok(()) => {
                if self.failing {
                    log::info!("the audit log is writable again");
                    self.failing = false;
                }
                self.frontier = frontier;
                self.last_time_ms = time;
                if let Some(c) = &batch.checkpoint {
                    self.last_checkpoint_size = c.size;
                }
                let note = batch.checkpoint.map(|c| c.note);
                // Whoever asked for a checkpoint reads the store next (a backup): they
                // get it once the store has it; the writer goes on meanwhile.
                let (asked, replies): (Vec<_>, Vec<_>) = replies
                    .into_iter()
                    .partition(|r| matches!(r, Reply::Checkpoint(_)));
                if !asked.is_empty() {
                    let settled = self.backend.settle();
                    let note = note.clone();
                    self.main.spawn(async move {
                        let settled = match note.is_some() {
                            true => settled.await.map_err(AuditError::Unavailable),
                            false => Ok(()),
                        };
                        answer(asked, vec![], Ok(note), settled);
                    });
                }
                answer(replies, intent_replies, Ok(note), Ok(()));
            }
            Err(e) => {
                if !self.failing {
                    log::error!("audit log write failed ({e}): refusing requests until it works");
                    self.failing = true;
                }
                // Records nobody waits for must still be written: keep them.
                for ((record, intent), reply) in kept.into_iter().zip(&replies) {
                    if matches!(reply, Reply::Seq(None, _)) {
                        self.retry.push_back((record, intent));
                    }
                }
                answer(
                    replies,
                    intent_replies,
                    Err(AuditError::Unavailable(e)),
                    Ok(()),
                );
            }
        }
    }
}

/// Answers the callers of a commit (`settled`: whether a checkpoint is in the store).
fn answer(
    replies: Vec<Reply>,
    intent_replies: Vec<(oneshot::Sender<Result<u64, AuditError>>, u64)>,
    outcome: Result<Option<String>, AuditError>,
    settled: Result<(), AuditError>,
) {
    for r in replies {
        match r {
            Reply::Seq(Some(tx), seq) => {
                let _ = tx.send(outcome.as_ref().map(|_| seq).map_err(Clone::clone));
            }
            Reply::Seq(None, _) => {}
            Reply::Checkpoint(tx) => {
                let _ = tx.send(match (&outcome, &settled) {
                    (Ok(Some(_)), Err(e)) => Err(e.clone()),
                    (Ok(Some(note)), _) => Ok(note.clone()),
                    (Ok(None), _) => Err(AuditError::Unavailable("nothing to sign".into())),
                    (Err(e), _) => Err(e.clone()),
                });
            }
        }
    }
    for (tx, id) in intent_replies {
        let _ = tx.send(outcome.as_ref().map(|_| id).map_err(Clone::clone));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A log in memory, for unit tests of code that records.
    #[derive(Debug, Default, Clone)]
    pub struct MemoryLog {
        pub inner: Arc<std::sync::Mutex<MemoryInner>>,
    }

    #[derive(Debug, Default)]
    pub struct MemoryInner {
        pub records: Vec<StoredRecord>,
        pub intents: std::collections::BTreeMap<u64, String>,
        pub checkpoints: Vec<StoredCheckpoint>,
        /// While set, every commit fails with this message.
        pub fail: Option<String>,
    }

    impl LogBackend for MemoryLog {
        fn commit(&mut self, batch: &Batch) -> impl Future<Output = Result<(), String>> + Send {
            let result = (|| {
                let mut g = self.inner.lock().map_err(|_| "poisoned".to_string())?;
                if let Some(e) = &g.fail {
                    return Err(e.clone());
                }
                g.records.extend(batch.records.iter().cloned());
                for (id, text) in &batch.intents {
                    g.intents.insert(*id, text.clone());
                }
                for id in &batch.resolved {
                    g.intents.remove(id);
                }
                // As the store: a checkpoint already there is kept once.
                if let Some(c) = &batch.checkpoint {
                    if !g.checkpoints.contains(c) {
                        g.checkpoints.push(c.clone());
                    }
                }
                Ok(())
            })();
            std::future::ready(result)
        }

        fn prune(&mut self, before_ms: i64) -> impl Future<Output = Result<u64, String>> + Send {
            let mut n = 0;
            if let Ok(mut g) = self.inner.lock() {
                for r in g.records.iter_mut().filter(|r| r.time_ms < before_ms) {
                    if !r.body.is_empty() {
                        r.body.clear();
                        n += 1;
                    }
                }
            }
            std::future::ready(Ok(n))
        }
    }
    use crate::merkle::root;
    use crate::note::Checkpoint;

    fn start(log: &MemoryLog) -> (Auditor, tokio::task::JoinHandle<()>, Signer) {
        let signer = Signer::generate("test/log").unwrap();
        let key = Signer::from_text(&signer.to_text()).unwrap();
        let (a, h) = Auditor::start(
            log.clone(),
            Resume::default(),
            signer,
            WriterConfig {
                origin: "test/log".into(),
                node: "node-1".into(),
                checkpoint_every: Duration::from_secs(3600),
            },
        );
        (a, h, key)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_get_distinct_contiguous_seqs_and_a_signed_root() {
        let log = MemoryLog::default();
        let (a, _h, key) = start(&log);
        let mut tasks = vec![];
        for i in 0..500u64 {
            let a = a.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = Record::action("chat.completions", 200);
                r.request_id = Some(format!("req_{i}"));
                a.record(r).await.unwrap()
            }));
        }
        let mut seqs = vec![];
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        seqs.sort();
        assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
        let note = a.checkpoint().await.unwrap();
        let c = Checkpoint::open(&note, &key.verifier()).unwrap();
        let g = log.inner.lock().unwrap();
        assert_eq!(c.size, 500);
        let leaves: Vec<Hash> = g
            .records
            .iter()
            .map(|r| leaf_hash(r.body.as_bytes()))
            .collect();
        assert_eq!(c.root, root(&leaves));
        for (i, r) in g.records.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
            let parsed = Record::parse(&r.body).unwrap();
            assert_eq!(parsed.seq, r.seq);
            assert_eq!(parsed.node, "node-1");
        }
        assert!(g.records.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
    }

    #[tokio::test]
    async fn a_failed_commit_refuses_and_changes_nothing_then_recovers() {
        let log = MemoryLog::default();
        let (a, _h, key) = start(&log);
        a.record(Record::action("one", 200)).await.unwrap();
        log.inner.lock().unwrap().fail = Some("disk full".into());
        let e = a.record(Record::action("two", 200)).await.unwrap_err();
        assert_eq!(e, AuditError::Unavailable("disk full".into()));
        assert!(a.intent(Record::action("three", 0)).await.is_err());
        // A record nobody waits for is kept and written once the log works again.
        a.record_later(Record::action("later", 499));
        assert_eq!(log.inner.lock().unwrap().records.len(), 1);
        log.inner.lock().unwrap().fail = None;
        let seq = a.record(Record::action("four", 200)).await.unwrap();
        let actions: Vec<String> = log
            .inner
            .lock()
            .unwrap()
            .records
            .iter()
            .map(|r| Record::parse(&r.body).unwrap().action)
            .collect();
        assert_eq!(actions, ["one", "later", "four"]);
        assert_eq!(seq, 3);
        let c = Checkpoint::open(&a.checkpoint().await.unwrap(), &key.verifier()).unwrap();
        assert_eq!(c.size, 3);
    }

    #[tokio::test]
    async fn pruning_keeps_the_tree_verifiable_and_is_itself_recorded() {
        let log = MemoryLog::default();
        let (a, _h, key) = start(&log);
        for i in 0..5 {
            a.record(Record::action(&format!("a{i}"), 200))
                .await
                .unwrap();
        }
        a.checkpoint().await.unwrap();
        let cutoff = log.inner.lock().unwrap().records[2].time_ms + 1;
        let n = a.prune(cutoff).await.unwrap();
        assert!(n >= 3, "{n}");
        a.checkpoint().await.unwrap();
        let g = log.inner.lock().unwrap();
        let last = Record::parse(&g.records.last().unwrap().body).unwrap();
        assert_eq!(last.action, "audit.prune");
        assert!(last.detail.unwrap().contains(&format!("{n} records")));
        let rows: Vec<crate::verify::Row> = g
            .records
            .iter()
            .map(|r| crate::verify::Row {
                seq: r.seq,
                time_ms: r.time_ms,
                leaf: r.leaf,
                body: (!r.body.is_empty()).then_some(r.body.as_str()),
            })
            .collect();
        let notes: Vec<String> = g.checkpoints.iter().map(|c| c.note.clone()).collect();
        let mut v = crate::verify::LogVerifier::new(&key.verifier(), &notes).unwrap();
        v.push_batch(&rows).unwrap();
        let s = v.finish().unwrap();
        assert_eq!((s.records, s.pruned), (6, n));
    }

    #[tokio::test]
    async fn an_intent_is_resolved_by_its_record_and_survives_until_then() {
        let log = MemoryLog::default();
        let (a, _h, _key) = start(&log);
        let mut r = Record::action("chat.completions", 0);
        r.request_id = Some("req_x".into());
        let t = a.intent(r.clone()).await.unwrap();
        assert_eq!(log.inner.lock().unwrap().intents.len(), 1);
        assert!(log.inner.lock().unwrap().records.is_empty());
        r.status = 200;
        t.finish(r).await.map_err(|e| e.0).unwrap();
        let g = log.inner.lock().unwrap();
        assert!(g.intents.is_empty());
        assert_eq!(g.records.len(), 1);
    }

    #[tokio::test]
    async fn intents_of_a_previous_run_become_interrupted_records() {
        let log = MemoryLog::default();
        let mut partial = Record::action("completions", 0);
        partial.request_id = Some("req_lost".into());
        log.inner
            .lock()
            .unwrap()
            .intents
            .insert(7, partial.canonical());
        let signer = Signer::generate("test/log").unwrap();
        let (a, _h) = Auditor::start(
            log.clone(),
            Resume {
                intents: vec![(7, partial.canonical())],
                ..Resume::default()
            },
            signer,
            WriterConfig {
                origin: "test/log".into(),
                node: "n".into(),
                checkpoint_every: Duration::from_secs(3600),
            },
        );
        a.checkpoint().await.unwrap();
        let g = log.inner.lock().unwrap();
        assert!(g.intents.is_empty());
        let r = Record::parse(&g.records[0].body).unwrap();
        assert_eq!(r.request_id.as_deref(), Some("req_lost"));
        assert_eq!(r.error.as_deref(), Some("interrupted"));
        assert_eq!(r.status, 500);
    }
}
