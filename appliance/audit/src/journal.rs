//! The journal in front of the log's store: what makes a commit durable.
//!
//! A commit is one frame written into a preallocated file and one `fdatasync` (about a
//! tenth of a millisecond): the writer answers its callers then. An indexer task moves
//! committed batches into the store (SQLite) behind it, as many batches per transaction
//! as have piled up; an intent resolved within what it moves never reaches the store.
//! The store is always a prefix of the log, at most a few milliseconds behind; whoever
//! must read everything first calls [`crate::Auditor::settle`].
//!
//! Two files, `journal.0` and `journal.1`, each [`FILE_BYTES`] of zeros at creation (so
//! an overwrite changes no file metadata and the `fdatasync` writes data only). Frames are
//! written one after another from offset 0; when the next one does not fit, the writer
//! moves to the other file (waiting, if ever needed, until everything in it is in the
//! store) and starts a new *generation* there. A frame: a 32-byte header (length, magic,
//! generation, the first 16 bytes of the SHA-256 of the rest of the header and the
//! payload) and the batch. A file is read from its start while frames are whole, valid
//! and of the first frame's generation, so a torn last frame or the remains of an older
//! generation end it.
//!
//! At start, before anything is appended, [`Journal::open`] returns the batches of both
//! files, older generation first; applying them to the store is idempotent (records the
//! store has are skipped, intents and checkpoints it has are kept), and then
//! [`Journal::reset`] makes both files empty.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::writer::{Batch, LogBackend, StoredCheckpoint, StoredRecord};

/// Bytes of zeros each journal file starts with (a frame that does not fit in an empty
/// file grows it).
pub const FILE_BYTES: u64 = 4 << 20;
/// The two files, in the log's directory.
pub const FILE_NAMES: [&str; 2] = ["journal.0", "journal.1"];
const HEADER: usize = 32;
const MAGIC: u32 = 0x414a_4c31; // "AJL1"
/// The indexer's transactions are at least this far apart.
const INDEX_EVERY: Duration = Duration::from_millis(10);
/// Most records the indexer moves in one transaction.
const INDEX_BATCH: usize = 16_384;

fn digest(len: u32, generation: u64, payload: &[u8]) -> [u8; 16] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&len.to_le_bytes());
    ctx.update(&MAGIC.to_le_bytes());
    ctx.update(&generation.to_le_bytes());
    ctx.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&ctx.finish().as_ref()[..16]);
    out
}

/// The frame of `batch` in generation `generation`.
pub fn encode(batch: &Batch, generation: u64) -> Vec<u8> {
    let size = HEADER
        + 16
        + batch
            .records
            .iter()
            .map(|r| 52 + r.body.len())
            .sum::<usize>()
        + batch
            .intents
            .iter()
            .map(|(_, b)| 12 + b.len())
            .sum::<usize>()
        + 8 * batch.resolved.len()
        + batch.checkpoint.as_ref().map_or(0, |c| 20 + c.note.len());
    let mut out = Vec::with_capacity(size);
    out.resize(HEADER, 0);
    let text = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    out.extend_from_slice(&(batch.records.len() as u32).to_le_bytes());
    for r in &batch.records {
        out.extend_from_slice(&r.seq.to_le_bytes());
        out.extend_from_slice(&r.time_ms.to_le_bytes());
        out.extend_from_slice(&r.leaf);
        text(&mut out, &r.body);
    }
    out.extend_from_slice(&(batch.intents.len() as u32).to_le_bytes());
    for (id, body) in &batch.intents {
        out.extend_from_slice(&id.to_le_bytes());
        text(&mut out, body);
    }
    out.extend_from_slice(&(batch.resolved.len() as u32).to_le_bytes());
    for id in &batch.resolved {
        out.extend_from_slice(&id.to_le_bytes());
    }
    match &batch.checkpoint {
        Some(c) => {
            out.push(1);
            out.extend_from_slice(&c.size.to_le_bytes());
            out.extend_from_slice(&c.time_ms.to_le_bytes());
            text(&mut out, &c.note);
        }
        None => out.push(0),
    }
    let len = (out.len() - HEADER) as u32;
    let d = digest(len, generation, &out[HEADER..]);
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&generation.to_le_bytes());
    out[16..32].copy_from_slice(&d);
    out
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn text(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

/// The batch of a frame's payload; None when it does not parse to its end.
fn decode(payload: &[u8]) -> Option<Batch> {
    let mut c = Cursor(payload);
    let mut batch = Batch::default();
    for _ in 0..c.u32()? {
        let seq = c.u64()?;
        let time_ms = c.u64()? as i64;
        let leaf = c.take(32)?.try_into().ok()?;
        let body = c.text()?;
        batch.records.push(StoredRecord {
            seq,
            time_ms,
            leaf,
            body,
        });
    }
    for _ in 0..c.u32()? {
        let id = c.u64()?;
        batch.intents.push((id, c.text()?));
    }
    for _ in 0..c.u32()? {
        batch.resolved.push(c.u64()?);
    }
    match c.take(1)? {
        [0] => {}
        [1] => {
            let size = c.u64()?;
            let time_ms = c.u64()? as i64;
            let note = c.text()?;
            batch.checkpoint = Some(StoredCheckpoint {
                size,
                time_ms,
                note,
            });
        }
        _ => return None,
    }
    c.0.is_empty().then_some(batch)
}

/// The frames of one file: its generation (None when empty) and batches, in order.
fn read_frames(file: &File) -> io::Result<(Option<u64>, Vec<Batch>)> {
    let mut offset = 0u64;
    let mut generation = None;
    let mut out = vec![];
    let end = file.metadata()?.len();
    let mut header = [0u8; HEADER];
    while offset + HEADER as u64 <= end {
        file.read_exact_at(&mut header, offset)?;
        let len = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
        let magic = u32::from_le_bytes(header[4..8].try_into().unwrap_or_default());
        let frame_gen = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        if len == 0 || magic != MAGIC || generation.is_some_and(|g| g != frame_gen) {
            break;
        }
        if offset + (HEADER + len as usize) as u64 > end {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, offset + HEADER as u64)?;
        if digest(len, frame_gen, &payload)[..] != header[16..32] {
            break;
        }
        let Some(batch) = decode(&payload) else { break };
        generation = Some(frame_gen);
        out.push(batch);
        offset += (HEADER + len as usize) as u64;
    }
    Ok((generation, out))
}

/// The frames of `files`, older generation first, and the generation after theirs.
fn held(files: &[File]) -> io::Result<(u64, Vec<Batch>)> {
    let mut held = vec![];
    for f in files {
        let (generation, batches) = read_frames(f)?;
        if let Some(g) = generation {
            held.push((g, batches));
        }
    }
    held.sort_by_key(|(g, _)| *g);
    let next = held.last().map_or(0, |(g, _)| *g) + 1;
    Ok((next, held.into_iter().flat_map(|(_, b)| b).collect()))
}

/// The two files and where the next frame goes.
#[derive(Debug)]
pub struct Journal {
    paths: [PathBuf; 2],
    files: [File; 2],
    active: usize,
    offset: u64,
    generation: u64,
    file_bytes: u64,
}

impl Journal {
    /// Opens (creating and zero-filling if needed) the journal in `dir`; returns it and
    /// the batches it holds, older generation first, for the store to apply before
    /// [`Journal::reset`].
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<Batch>)> {
        Journal::open_sized(dir, FILE_BYTES)
    }

    /// [`Journal::open`] with files of `file_bytes` each (what the log takes while its
    /// store cannot be written, before commits are refused).
    pub fn open_sized(dir: &Path, file_bytes: u64) -> io::Result<(Journal, Vec<Batch>)> {
        let paths = FILE_NAMES.map(|n| dir.join(n));
        let mut made = false;
        let mut open = |p: &Path| -> io::Result<File> {
            use std::os::unix::fs::OpenOptionsExt;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(p)?;
            let len = file.metadata()?.len();
            if len < file_bytes {
                let zeros = vec![0u8; 1 << 20];
                let mut at = len;
                while at < file_bytes {
                    let n = zeros.len().min((file_bytes - at) as usize);
                    file.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
                file.sync_all()?;
                made = true;
            }
            Ok(file)
        };
        let files = [open(&paths[0])?, open(&paths[1])?];
        if made {
            File::open(dir)?.sync_all()?;
        }
        let (generation, held) = held(&files)?;
        let journal = Journal {
            paths,
            files,
            active: 0,
            offset: 0,
            generation,
            file_bytes,
        };
        Ok((journal, held))
    }

    /// The batches the journal in `dir` holds, older generation first, read without
    /// changing anything (none when there is no journal): for a verification that
    /// wants to say what `audit.db` does not have yet.
    pub fn read(dir: &Path) -> io::Result<Vec<Batch>> {
        let mut files = vec![];
        for name in FILE_NAMES {
            match File::open(dir.join(name)) {
                Ok(f) => files.push(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(held(&files)?.1)
    }

    /// Empties both files (their first header zeroed, durably): everything they held is
    /// in the store. The next frame starts a new generation at the start of the first.
    pub fn reset(&mut self) -> io::Result<()> {
        for f in &self.files {
            f.write_all_at(&[0u8; HEADER], 0)?;
            f.sync_data()?;
        }
        self.active = 0;
        self.offset = 0;
        self.generation += 1;
        Ok(())
    }

    /// Whether `len` more bytes fit in the active file (an empty file takes anything).
    fn fits(&self, len: usize) -> bool {
        self.offset == 0 || self.offset + len as u64 <= self.file_bytes
    }

    /// Moves to the other file, a new generation.
    fn switch(&mut self) {
        self.active ^= 1;
        self.offset = 0;
        self.generation += 1;
    }

    /// Writes a frame (made with this journal's generation) at the end and waits until
    /// it is on disk. On failure nothing counts as written (the next frame goes to the
    /// same place).
    fn append(&mut self, frame: &[u8]) -> io::Result<()> {
        let f = &self.files[self.active];
        f.write_all_at(frame, self.offset)?;
        f.sync_data()?;
        self.offset += frame.len() as u64;
        Ok(())
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }
}

/// Applies the batches [`Journal::open`] returned to `store`: records up to
/// `store_last_seq` are already there and skipped. Returns how many records it added.
pub async fn replay<B: LogBackend>(
    store: &mut B,
    batches: Vec<Batch>,
    store_last_seq: u64,
) -> Result<usize, String> {
    let mut added = 0;
    let mut merged = Merged::default();
    let mut expect = store_last_seq + 1;
    for mut b in batches {
        b.records.retain(|r| r.seq > store_last_seq);
        if let Some(first) = b.records.first() {
            if first.seq != expect {
                return Err(format!(
                    "the journal continues the log at record {} but the store ends at record {store_last_seq} (records are missing from the store: restored from an older copy, or altered); refusing to append (run `appliance audit verify`)",
                    first.seq
                ));
            }
            expect = first.seq + b.records.len() as u64;
        }
        if !merged.take(b) {
            continue;
        }
        added += merged.records;
        store.commit(&merged.finish()).await?;
    }
    added += merged.records;
    if !merged.is_empty() {
        store.commit(&merged.finish()).await?;
    }
    Ok(added)
}

/// Batches merged into one transaction for the store.
#[derive(Default)]
struct Merged {
    batch: Batch,
    intents: BTreeMap<u64, String>,
    records: usize,
}

impl Merged {
    /// Adds `b`; true when the merged batch should now be written (it holds a
    /// checkpoint, which a batch has at most one of, or is large).
    fn take(&mut self, b: Batch) -> bool {
        self.records += b.records.len();
        self.batch.records.extend(b.records);
        self.intents.extend(b.intents);
        for id in b.resolved {
            // Resolved within the merge: it never reaches the store.
            if self.intents.remove(&id).is_none() {
                self.batch.resolved.push(id);
            }
        }
        if b.checkpoint.is_some() {
            self.batch.checkpoint = b.checkpoint;
        }
        self.batch.checkpoint.is_some() || self.records >= INDEX_BATCH
    }

    fn is_empty(&self) -> bool {
        self.batch.records.is_empty()
            && self.intents.is_empty()
            && self.batch.resolved.is_empty()
            && self.batch.checkpoint.is_none()
    }

    fn finish(&mut self) -> Batch {
        let mut batch = std::mem::take(&mut self.batch);
        batch.intents = std::mem::take(&mut self.intents).into_iter().collect();
        self.records = 0;
        batch
    }
}

enum ToIndex {
    Batch(u64, Batch),
    Prune(i64, oneshot::Sender<Result<u64, String>>),
}

/// The writer's backend: the journal, with the store behind it.
pub struct JournalBackend {
    journal: Arc<Mutex<Journal>>,
    to_index: mpsc::UnboundedSender<ToIndex>,
    /// The indexer task (awaited at close: the store is closed when it ends).
    indexer: Option<tokio::task::JoinHandle<()>>,
    indexed: watch::Receiver<u64>,
    /// Number of the last batch written, and of the last one in each file.
    written: u64,
    last_in: [u64; 2],
    /// How long a commit or [`LogBackend::settle`] waits for the store to catch up.
    wait: Duration,
}

impl JournalBackend {
    /// Starts the indexer (on the current runtime) in front of `store`. `journal` must be
    /// freshly [reset](Journal::reset).
    pub fn start<B: LogBackend>(journal: Journal, store: B, wait: Duration) -> JournalBackend {
        let (to_index, rx) = mpsc::unbounded_channel();
        let (done, indexed) = watch::channel(0);
        let indexer = tokio::spawn(index(store, rx, done));
        JournalBackend {
            journal: Arc::new(Mutex::new(journal)),
            to_index,
            indexer: Some(indexer),
            indexed,
            written: 0,
            last_in: [0, 0],
            wait,
        }
    }

    /// Waits until the store holds batch `n`.
    async fn indexed(&mut self, n: u64) -> Result<(), String> {
        let wait = self.wait;
        match tokio::time::timeout(wait, self.indexed.wait_for(|&i| i >= n)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the audit store's indexer stopped".into()),
            Err(_) => Err(format!(
                "the audit store (behind the journal) has not caught up within {} ms",
                wait.as_millis()
            )),
        }
    }
}

impl LogBackend for JournalBackend {
    async fn commit(&mut self, batch: &Batch) -> Result<(), String> {
        let (mut frame, fits, other) = {
            let j = self.journal.lock().map_err(poisoned)?;
            let frame = encode(batch, j.generation);
            let fits = j.fits(frame.len());
            (frame, fits, j.active ^ 1)
        };
        if !fits {
            // The other file is reused only once everything in it is in the store.
            self.indexed(self.last_in[other]).await?;
            let mut j = self.journal.lock().map_err(poisoned)?;
            j.switch();
            frame = encode(batch, j.generation);
        }
        let journal = self.journal.clone();
        let active = tokio::task::spawn_blocking(move || {
            let mut j = journal.lock().map_err(poisoned)?;
            j.append(&frame)
                .map_err(|e| format!("{}: {e}", j.path(j.active).display()))?;
            Ok::<_, String>(j.active)
        })
        .await
        .map_err(|e| e.to_string())??;
        self.written += 1;
        self.last_in[active] = self.written;
        // The indexer only stops when this backend is dropped.
        let _ = self
            .to_index
            .send(ToIndex::Batch(self.written, batch.clone()));
        Ok(())
    }

    async fn prune(&mut self, before_ms: i64) -> Result<u64, String> {
        let (reply, rx) = oneshot::channel();
        self.to_index
            .send(ToIndex::Prune(before_ms, reply))
            .map_err(|_| "the audit store's indexer stopped".to_string())?;
        rx.await
            .map_err(|_| "the audit store's indexer stopped".to_string())?
    }

    async fn settle(&mut self) -> Result<(), String> {
        self.indexed(self.written).await
    }

    async fn close(&mut self) -> Result<(), String> {
        self.settle().await?;
        let journal = self.journal.clone();
        tokio::task::spawn_blocking(move || {
            let mut j = journal.lock().map_err(poisoned)?;
            j.reset()
                .map_err(|e| format!("emptying the audit journal: {e}"))
        })
        .await
        .map_err(|e| e.to_string())??;
        // The indexer ends (closing the store) once nothing can reach it.
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.to_index, closed));
        if let Some(task) = self.indexer.take() {
            let _ = task.await;
        }
        Ok(())
    }
}

fn poisoned<T>(_: T) -> String {
    "the audit journal's lock is poisoned".to_string()
}

/// The indexer: moves committed batches into the store, as many per transaction as are
/// waiting; retries a failed transaction (the journal holds its batches meanwhile).
async fn index<B: LogBackend>(
    mut store: B,
    mut rx: mpsc::UnboundedReceiver<ToIndex>,
    done: watch::Sender<u64>,
) {
    let mut merged = Merged::default();
    let mut failing = false;
    let mut next: Option<ToIndex> = None;
    let mut last_commit: Option<tokio::time::Instant> = None;
    loop {
        let first = match next.take() {
            Some(m) => m,
            None => match rx.recv().await {
                Some(m) => m,
                None => {
                    let _ = store.close().await;
                    return;
                }
            },
        };
        // Under load, let batches pile up a little: one transaction per few
        // milliseconds costs the store far less than one per commit, and most intents
        // are resolved within it.
        if let Some(at) = last_commit {
            let due = at + INDEX_EVERY;
            if tokio::time::Instant::now() < due {
                tokio::time::sleep_until(due).await;
            }
        }
        let (mut last, b) = match first {
            ToIndex::Batch(n, b) => (n, b),
            ToIndex::Prune(before_ms, reply) => {
                let _ = reply.send(store.prune(before_ms).await);
                continue;
            }
        };
        // Everything waiting, up to a checkpoint or INDEX_BATCH records; a prune waits
        // for the batches before it.
        let mut full = merged.take(b);
        while !full {
            match rx.try_recv() {
                Ok(ToIndex::Batch(n, b)) => {
                    last = n;
                    full = merged.take(b);
                }
                Ok(prune) => {
                    next = Some(prune);
                    break;
                }
                Err(_) => break,
            }
        }
        let batch = merged.finish();
        loop {
            match store.commit(&batch).await {
                Ok(()) => {
                    if failing {
                        log::info!("the audit store is writable again");
                        failing = false;
                    }
                    let _ = done.send(last);
                    last_commit = Some(tokio::time::Instant::now());
                    break;
                }
                Err(e) => {
                    if !failing {
                        log::error!(
                            "the audit store cannot be written ({e}); its journal holds the records meanwhile"
                        );
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::tests::MemoryLog;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("journal-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Batch `i`: records `first..first+n`, an intent `i`, resolving intent `i - 1`.
    fn batch(i: u64, first: u64, n: u64) -> Batch {
        Batch {
            records: (first..first + n)
                .map(|seq| StoredRecord {
                    seq,
                    time_ms: 1_700_000_000_000 + seq as i64,
                    leaf: [seq as u8; 32],
                    body: format!(
                        "{{\"seq\":{seq},\"detail\":\"ünïcode {}\"}}",
                        "x".repeat(90)
                    ),
                })
                .collect(),
            intents: vec![(i, format!("{{\"intent\":{i}}}"))],
            resolved: if i > 1 { vec![i - 1] } else { vec![] },
            checkpoint: i.is_multiple_of(7).then(|| StoredCheckpoint {
                size: first + n - 1,
                time_ms: i as i64,
                note: format!("note {i}\n"),
            }),
        }
    }

    fn same(a: &Batch, b: &Batch) -> bool {
        a.records == b.records
            && a.intents == b.intents
            && a.resolved == b.resolved
            && a.checkpoint == b.checkpoint
    }

    #[test]
    fn frames_read_back_until_a_torn_or_older_frame() {
        let dir = scratch("frames");
        let (mut j, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert!(held.is_empty());
        j.reset().unwrap();
        let batches: Vec<Batch> = (1..=3).map(|i| batch(i, i * 10, 3)).collect();
        let mut ends = vec![];
        for b in &batches {
            j.append(&encode(b, j.generation)).unwrap();
            ends.push(j.offset);
        }
        drop(j);
        let (j, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert_eq!(held.len(), 3);
        assert!(held.iter().zip(&batches).all(|(a, b)| same(a, b)));
        // A torn last frame (one byte of its payload changed) ends the file there.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(j.path(0))
            .unwrap();
        f.write_all_at(b"?", ends[2] - 5).unwrap();
        drop(j);
        let (mut j, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert_eq!(held.len(), 2);
        assert!(same(&held[1], &batches[1]));
        assert_eq!(Journal::read(&dir).unwrap().len(), 2, "read sees the same");
        assert!(Journal::read(&dir.join("none")).unwrap().is_empty());
        // After a reset, a new generation over the old frames: only the new one counts.
        j.reset().unwrap();
        let (_, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert!(held.is_empty());
        let (mut j, _) = Journal::open_sized(&dir, 1 << 16).unwrap();
        j.reset().unwrap();
        let small = Batch {
            intents: vec![(9, "{}".into())],
            ..Batch::default()
        };
        j.append(&encode(&small, j.generation)).unwrap();
        drop(j);
        let (_, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert_eq!(held.len(), 1);
        assert!(same(&held[0], &small));
        // Nothing else parses as a batch.
        assert!(decode(&[1, 0, 0, 0]).is_none());
        let mut payload = encode(&batches[0], 1)[HEADER..].to_vec();
        payload.push(0);
        assert!(decode(&payload).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn merging_drops_intents_resolved_within_and_stops_at_a_checkpoint() {
        let mut m = Merged::default();
        assert!(!m.take(batch(1, 1, 2)));
        assert!(!m.take(batch(2, 3, 2)));
        let b = m.finish();
        assert_eq!(b.records.len(), 4);
        // Intent 1 came and went: neither stored nor deleted; intent 2 is stored.
        assert_eq!(b.intents, vec![(2, "{\"intent\":2}".to_string())]);
        assert!(b.resolved.is_empty());
        assert!(!m.take(batch(3, 5, 1)));
        assert!(m.take(batch(7, 6, 1)), "a checkpoint ends the merge");
        let b = m.finish();
        assert_eq!(b.resolved, vec![2, 6], "intents stored before are deleted");
        assert!(b.checkpoint.is_some());
        assert!(m.is_empty());
    }

    /// Commits batches 1..=n through a backend in front of `store`.
    async fn commit_all(backend: &mut JournalBackend, n: u64) -> Vec<Batch> {
        let mut out = vec![];
        for i in 1..=n {
            let b = batch(i, (i - 1) * 4 + 1, 4);
            backend.commit(&b).await.unwrap();
            out.push(b);
        }
        out
    }

    fn applied(batches: &[Batch]) -> MemoryLog {
        let log = MemoryLog::default();
        let mut g = log.inner.lock().unwrap();
        for b in batches {
            g.records.extend(b.records.iter().cloned());
            g.intents.extend(b.intents.iter().cloned());
            for id in &b.resolved {
                g.intents.remove(id);
            }
            g.checkpoints.extend(b.checkpoint.iter().cloned());
        }
        drop(g);
        log
    }

    fn assert_same_log(a: &MemoryLog, b: &MemoryLog) {
        let (a, b) = (a.inner.lock().unwrap(), b.inner.lock().unwrap());
        assert_eq!(a.records, b.records);
        assert_eq!(a.intents, b.intents);
        assert_eq!(a.checkpoints, b.checkpoints);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_store_catches_up_across_file_switches_and_replay_adds_nothing_twice() {
        let dir = scratch("switch");
        let (mut j, _) = Journal::open_sized(&dir, 4096).unwrap();
        j.reset().unwrap();
        let store = MemoryLog::default();
        let mut backend = JournalBackend::start(j, store.clone(), Duration::from_secs(10));
        // ~600 bytes a frame into 4 KiB files: a switch every few commits.
        let batches = commit_all(&mut backend, 60).await;
        backend.settle().await.unwrap();
        assert_same_log(&store, &applied(&batches));
        drop(backend);
        // What the files still hold is in the store: applying it again changes nothing.
        let (_, held) = Journal::open_sized(&dir, 4096).unwrap();
        assert!(!held.is_empty());
        let last = store.inner.lock().unwrap().records.last().unwrap().seq;
        let mut again = store.clone();
        assert_eq!(replay(&mut again, held.clone(), last).await.unwrap(), 0);
        assert_same_log(&store, &applied(&batches));
        // Onto a store that lacks the records before them (an older copy), they are
        // refused, not appended after a gap.
        let e = replay(&mut MemoryLog::default(), held, 0)
            .await
            .unwrap_err();
        assert!(e.contains("refusing to append"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_cannot_be_written_loses_nothing_and_the_journal_fails_closed() {
        let dir = scratch("crash");
        let (mut j, _) = Journal::open_sized(&dir, 1 << 20).unwrap();
        j.reset().unwrap();
        let store = MemoryLog::default();
        store.inner.lock().unwrap().fail = Some("disk full".into());
        let mut backend = JournalBackend::start(j, store.clone(), Duration::from_millis(300));
        let batches = commit_all(&mut backend, 20).await;
        // Committed (durable in the journal) though the store has none of it.
        assert!(store.inner.lock().unwrap().records.is_empty());
        assert!(
            backend.settle().await.is_err(),
            "settle says the store is behind"
        );
        drop(backend);
        // The next start: the journal's batches, applied to the store, are the log.
        let (_, held) = Journal::open_sized(&dir, 1 << 20).unwrap();
        let mut fresh = MemoryLog::default();
        assert_eq!(replay(&mut fresh, held, 0).await.unwrap(), 80);
        assert_same_log(&fresh, &applied(&batches));

        // With small files, the journal refuses a commit rather than overwrite what the
        // store does not have yet.
        let dir2 = scratch("closed");
        let (mut j, _) = Journal::open_sized(&dir2, 2048).unwrap();
        j.reset().unwrap();
        let store = MemoryLog::default();
        store.inner.lock().unwrap().fail = Some("disk full".into());
        let mut backend = JournalBackend::start(j, store.clone(), Duration::from_millis(200));
        let mut committed = vec![];
        let mut refused = None;
        for i in 1..=20 {
            let b = batch(i, i * 4, 4);
            match backend.commit(&b).await {
                Ok(()) => committed.push(b),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let e = refused.expect("a commit is refused");
        assert!(e.contains("has not caught up"), "{e}");
        // Once the store works again (the indexer retries every 200 ms), it catches up
        // and commits go through, file switches and all.
        store.inner.lock().unwrap().fail = None;
        let mut settled = Err(String::new());
        for _ in 0..20 {
            settled = backend.settle().await;
            if settled.is_ok() {
                break;
            }
        }
        settled.unwrap();
        for i in 100..120 {
            let b = batch(i, i * 4, 4);
            backend.commit(&b).await.unwrap();
            committed.push(b);
        }
        backend.settle().await.unwrap();
        assert_same_log(&store, &applied(&committed));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }
}
