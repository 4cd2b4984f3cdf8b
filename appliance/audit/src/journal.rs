//! The journal in front of the log's store: what makes a commit durable.
//!
//! A commit is one frame written into a preallocated file, durably (a tenth to a quarter
//! of a millisecond): the writer answers its callers then. An indexer task moves
//! committed batches into the store (SQLite) behind it, as many batches per transaction
//! as have piled up; an intent resolved within what it moves never reaches the store.
//! The store is always a prefix of the log, at most a few milliseconds behind; whoever
//! must read everything first calls [`crate::Auditor::settle`].
//!
//! The indexer's transactions are visible at once but not flushed
//! ([`LogBackend::commit_deferred`]): the journal holds their batches durably, so the
//! store need only be durable before the journal lets go of them. The indexer keeps two
//! marks, *indexed* (in the store, visible) and *durable* (in the store, flushed), and
//! makes its next transaction durable, or flushes the store ([`LogBackend::sync`]),
//! whenever someone asks for a durable mark it has not reached: the writer before it
//! reuses a file (the file's batches must be durable in the store; the request for them
//! goes out when the writer leaves the file, so by the time it returns they long are),
//! and [`JournalBackend`]'s close before it empties the journal. A store flush per file
//! rather than per transaction keeps the store's fsyncs from queueing on the disk
//! behind, and in front of, the journal's writes on the request path.
//!
//! Two files, `journal.0` and `journal.1`, each [`FILE_BYTES`] of zeros at creation (so
//! an overwrite changes no file metadata and the flush writes data only). Where the file
//! system allows, frames are written with `O_DIRECT | O_DSYNC`: one write of the whole
//! 4 KiB blocks a frame touches (the first block's earlier bytes rewritten as they were,
//! the last block's rest zeros), durable when it returns, with no page cache to write
//! back (about a third less time than a buffered write and an `fdatasync` here);
//! elsewhere a buffered write and an `fdatasync`. A file in
//! use starts with a 32-byte header (magic, generation, a random 16-byte nonce), then
//! frames one after another; when the next frame does not fit, the writer moves to the
//! other file (waiting, if ever needed, until everything in it is in the store) and
//! starts a new generation there with a new nonce. A frame: a 32-byte header (length,
//! magic, generation, the first 16 bytes of the SHA-256 of the previous frame's digest,
//! or the file's nonce for the first, and of the rest of the header and the payload) and
//! the batch. A file is read from its header while frames are whole and chain from it,
//! so a torn last frame ends it, and so do the remains of any earlier use of the file
//! (they chain from another nonce).
//!
//! At start, before anything is appended, [`Journal::open`] returns the batches of both
//! files, older generation first; applying them to the store is idempotent (records the
//! store has are skipped, intents and checkpoints it has are kept, every resolution is
//! applied), and then [`Journal::reset`] empties both files, the older first, so that at
//! every moment what they hold is a contiguous tail of the log.

use std::collections::BTreeMap;
use std::fs::File;
use std::future::Future;
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
/// The unit of a direct write (a multiple of every device's logical block size).
const BLOCK: usize = 4096;
const MAGIC: u32 = 0x414a_4c31; // "AJL1", a frame
const FILE_MAGIC: u32 = 0x414a_4831; // "AJH1", a file in use
/// The indexer's transactions are at least this far apart.
const INDEX_EVERY: Duration = Duration::from_millis(10);
/// Most records the indexer moves in one transaction.
const INDEX_BATCH: usize = 16_384;

fn digest(prev: &[u8; 16], len: u32, generation: u64, payload: &[u8]) -> [u8; 16] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(prev);
    ctx.update(&len.to_le_bytes());
    ctx.update(&MAGIC.to_le_bytes());
    ctx.update(&generation.to_le_bytes());
    ctx.update(payload);
    let mut out = [0u8; 16];
    out.copy_from_slice(&ctx.finish().as_ref()[..16]);
    out
}

/// The frame of `batch`, its header left for [`Journal::append`] to fill.
pub fn encode(batch: &Batch) -> Vec<u8> {
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
    out
}

/// Fills the header of `frame` (from [`encode`]); returns its digest.
fn seal(frame: &mut [u8], generation: u64, prev: &[u8; 16]) -> [u8; 16] {
    let len = (frame.len() - HEADER) as u32;
    let d = digest(prev, len, generation, &frame[HEADER..]);
    frame[0..4].copy_from_slice(&len.to_le_bytes());
    frame[4..8].copy_from_slice(&MAGIC.to_le_bytes());
    frame[8..16].copy_from_slice(&generation.to_le_bytes());
    frame[16..32].copy_from_slice(&d);
    d
}

/// A file's header: in use by `generation`, its frames chained from `nonce`.
fn file_header(generation: u64, nonce: &[u8; 16]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&FILE_MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..32].copy_from_slice(nonce);
    h
}

fn nonce() -> io::Result<[u8; 16]> {
    use ring::rand::SecureRandom;
    let mut n = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| io::Error::other("no randomness for the journal's nonce"))?;
    Ok(n)
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

/// The frames of one file: its generation (None when not in use) and batches, in order.
fn read_frames(file: &File) -> io::Result<(Option<u64>, Vec<Batch>)> {
    let end = file.metadata()?.len();
    let mut header = [0u8; HEADER];
    if end < HEADER as u64 {
        return Ok((None, vec![]));
    }
    file.read_exact_at(&mut header, 0)?;
    let word =
        |h: &[u8; HEADER], at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    let long = |h: &[u8; HEADER]| u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
    if word(&header, 0) != FILE_MAGIC {
        return Ok((None, vec![]));
    }
    let generation = long(&header);
    let mut prev: [u8; 16] = header[16..32].try_into().unwrap_or_default();
    let mut offset = HEADER as u64;
    let mut out = vec![];
    while offset + HEADER as u64 <= end {
        file.read_exact_at(&mut header, offset)?;
        let len = word(&header, 0);
        if len == 0 || word(&header, 4) != MAGIC || long(&header) != generation {
            break;
        }
        if offset + (HEADER + len as usize) as u64 > end {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, offset + HEADER as u64)?;
        let d = digest(&prev, len, generation, &payload);
        if d[..] != header[16..32] {
            break;
        }
        let Some(batch) = decode(&payload) else { break };
        prev = d;
        out.push(batch);
        offset += (HEADER + len as usize) as u64;
    }
    Ok((Some(generation), out))
}

/// The frames of `files`, older generation first; the generation after theirs; the
/// index of the file with the newest one.
fn held(files: &[File]) -> io::Result<(u64, usize, Vec<Batch>)> {
    let mut held = vec![];
    for (i, f) in files.iter().enumerate() {
        let (generation, batches) = read_frames(f)?;
        if let Some(g) = generation {
            held.push((g, i, batches));
        }
    }
    held.sort_by_key(|(g, _, _)| *g);
    let next = held.last().map_or(0, |(g, _, _)| *g) + 1;
    let newest = held.last().map_or(0, |(_, i, _)| *i);
    Ok((
        next,
        newest,
        held.into_iter().flat_map(|(_, _, b)| b).collect(),
    ))
}

/// The two files and where the next frame goes.
#[derive(Debug)]
pub struct Journal {
    paths: [PathBuf; 2],
    files: [File; 2],
    /// The file written (after open: the one holding the newest generation).
    active: usize,
    /// Where the next frame goes; 0: the file's header first.
    offset: u64,
    generation: u64,
    /// The active file's nonce, and the digest the next frame chains from.
    nonce: [u8; 16],
    prev: [u8; 16],
    file_bytes: u64,
    /// The file with the newest frames on disk (what `reset` empties last).
    newest: usize,
    /// The last append failed: its frame may be on disk, so the next one must go to
    /// the same place (overwriting it), whatever its size.
    unsure: bool,
    /// The files opened for direct, synchronous writes (None: buffered writes, then
    /// `fdatasync`).
    direct: Option<[File; 2]>,
    /// With `direct`: the active file's bytes from the start of the block holding
    /// `offset` up to it (what a direct write into that block must write again).
    tail: Vec<u8>,
    /// With `direct`: the block-aligned buffer a write is assembled in.
    scratch: Vec<u8>,
}

/// Opens `path` for writes of whole blocks that are durable when they return, if its file
/// system allows: a block of it is read and written back as it was to find out.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_DIRECT | nix::fcntl::OFlag::O_DSYNC;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags.bits())
        .open(path)
        .ok()?;
    let mut buf = vec![0u8; 2 * BLOCK];
    let block = aligned(&mut buf, BLOCK);
    let n = f.read_at(block, 0).ok()?;
    (n == BLOCK && f.write_at(block, 0).ok()? == BLOCK).then_some(f)
}

/// The first `len` bytes of `buf` from a `BLOCK`-aligned address (`buf` has at least
/// `len + BLOCK` bytes).
fn aligned(buf: &mut [u8], len: usize) -> &mut [u8] {
    let at = buf.as_ptr().align_offset(BLOCK).min(BLOCK);
    &mut buf[at..at + len]
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
        // Whole blocks: a direct write that ends the file does not grow it.
        let file_bytes = file_bytes.div_ceil(BLOCK as u64) * BLOCK as u64;
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
        let (generation, newest, held) = held(&files)?;
        let direct = match (open_direct(&paths[0]), open_direct(&paths[1])) {
            (Some(a), Some(b)) => Some([a, b]),
            _ => None,
        };
        let nonce = nonce()?;
        let journal = Journal {
            paths,
            files,
            active: newest,
            offset: 0,
            generation,
            nonce,
            prev: nonce,
            file_bytes,
            newest,
            unsure: false,
            direct,
            tail: vec![],
            scratch: vec![],
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
        Ok(held(&files)?.2)
    }

    /// Empties both files (their headers zeroed, durably; the older first, so a crash
    /// in between leaves the newer, a tail of the log): everything they held is in the
    /// store. The next frame starts a new generation at the start of the first file.
    pub fn reset(&mut self) -> io::Result<()> {
        let nonce = nonce()?;
        for i in [self.newest ^ 1, self.newest] {
            let f = &self.files[i];
            f.write_all_at(&[0u8; HEADER], 0)?;
            f.sync_data()?;
        }
        self.unsure = false;
        self.start_generation(0, nonce);
        Ok(())
    }

    fn start_generation(&mut self, file: usize, nonce: [u8; 16]) {
        self.active = file;
        self.offset = 0;
        self.generation += 1;
        self.nonce = nonce;
        self.prev = nonce;
    }

    /// Whether `len` more bytes fit in the active file (an empty file takes anything;
    /// after a failed append, the frame goes where that one went, whatever its size).
    fn fits(&self, len: usize) -> bool {
        self.offset == 0 || self.unsure || self.offset + len as u64 <= self.file_bytes
    }

    /// Moves to the other file, a new generation.
    fn switch(&mut self) -> io::Result<()> {
        let nonce = nonce()?;
        self.start_generation(self.active ^ 1, nonce);
        Ok(())
    }

    /// Writes a frame from [`encode`] at the end (after the file's header, for the first
    /// of a generation) and waits until it is on disk. On failure nothing counts as
    /// written, though the frame may be on disk: the next one goes to the same place,
    /// chained the same way, and replaces it ([`Journal::fits`]).
    fn append(&mut self, frame: Vec<u8>) -> io::Result<()> {
        let result = self.write(frame);
        self.unsure = result.is_err();
        result
    }

    fn write(&mut self, mut frame: Vec<u8>) -> io::Result<()> {
        let d = seal(&mut frame, self.generation, &self.prev);
        // From here this file may hold the newest frames (even if a write or flush fails).
        self.newest = self.active;
        let at = if self.offset == 0 {
            self.start_file()?;
            HEADER as u64
        } else {
            self.offset
        };
        self.durably_write(&frame, at)?;
        self.offset = at + frame.len() as u64;
        self.prev = d;
        Ok(())
    }

    /// Writes the active file's header for a new generation, durably, before any of its
    /// frames: written together, a torn write could leave the old header in place with
    /// a run of the old generation's frames after it that still chain, a stretch of the
    /// log already replaced (and applied) coming back. The header fits in one sector, so
    /// it is either old or new; it is written buffered, so the rest of its block stays
    /// as it was (the earlier frames there are what `open` reads if the header is old).
    fn start_file(&mut self) -> io::Result<()> {
        let header = file_header(self.generation, &self.nonce);
        let f = &self.files[self.active];
        f.write_all_at(&header, 0)?;
        f.sync_data()?;
        self.tail.clear();
        self.tail.extend_from_slice(&header);
        Ok(())
    }

    /// Writes frame `bytes` at `at` in the active file and waits until they are on disk.
    /// A direct write covers the whole blocks `bytes` touch: from the block holding `at`
    /// (its bytes before `at`, from `tail`, written again as they are: a torn write
    /// leaves each sector old or new, and its old bytes are the same) to the end of the
    /// block holding their end (zeros after them, over nothing that is read: the file's
    /// header is this generation's, so what follows the frame is the remains of earlier
    /// frames that do not chain).
    fn durably_write(&mut self, bytes: &[u8], at: u64) -> io::Result<()> {
        let Some(direct) = &self.direct else {
            let f = &self.files[self.active];
            f.write_all_at(bytes, at)?;
            return f.sync_data();
        };
        let start = at - self.tail.len() as u64;
        debug_assert_eq!(start % BLOCK as u64, 0, "the tail starts a block");
        let used = self.tail.len() + bytes.len();
        let len = used.div_ceil(BLOCK) * BLOCK;
        if self.scratch.len() < len + BLOCK {
            self.scratch.resize(len + BLOCK, 0);
        }
        let out = aligned(&mut self.scratch, len);
        out[..self.tail.len()].copy_from_slice(&self.tail);
        out[self.tail.len()..used].copy_from_slice(bytes);
        // Zeros after the frame (the buffer is reused: only this part is not written).
        out[used..].fill(0);
        let f = &direct[self.active];
        let mut done = 0;
        while done < len {
            match f.write_at(&out[done..], start + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                // A short direct write ends on a block boundary; anything else cannot be
                // continued.
                Ok(n) if n % BLOCK == 0 || done + n == len => done += n,
                Ok(_) => return Err(io::Error::other("a direct write ended inside a block")),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.tail.clear();
        if !used.is_multiple_of(BLOCK) {
            self.tail
                .extend_from_slice(&out[used / BLOCK * BLOCK..used]);
        }
        Ok(())
    }

    pub fn path(&self, i: usize) -> &Path {
        &self.paths[i]
    }

    /// Whether frames are written directly (durable when the write returns) rather than
    /// buffered and flushed.
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }
}

/// Applies the batches [`Journal::open`] returned to `store`, durably: records up to
/// `store_last_seq` are already there and skipped. Returns how many records it added.
pub async fn replay<B: LogBackend>(
    store: &mut B,
    batches: Vec<Batch>,
    store_last_seq: u64,
) -> Result<usize, String> {
    let mut added = 0;
    // Every resolution is applied: an intent the store already has may be resolved in
    // a batch merged with the one that brought it.
    let mut merged = Merged {
        replaying: true,
        ..Merged::default()
    };
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
        store.commit_deferred(&merged.finish()).await?;
    }
    added += merged.records;
    if !merged.is_empty() {
        store.commit_deferred(&merged.finish()).await?;
    }
    // Everything the journal held must be durable in the store before the journal is
    // emptied: what this added, and what the store showed but may not have flushed
    // before a crash (the page cache survives a crashed process, not a power cut).
    store.sync().await?;
    Ok(added)
}

/// Batches merged into one transaction for the store.
#[derive(Default)]
struct Merged {
    batch: Batch,
    intents: BTreeMap<u64, String>,
    records: usize,
    /// Batches the store may already have: keep every resolution.
    replaying: bool,
}

impl Merged {
    /// Adds `b`; true when the merged batch should now be written (it holds a
    /// checkpoint, which a batch has at most one of, or is large).
    fn take(&mut self, b: Batch) -> bool {
        self.records += b.records.len();
        self.batch.records.extend(b.records);
        self.intents.extend(b.intents);
        for id in b.resolved {
            // Resolved within the merge: it never reaches the store (the indexer sees
            // each batch once; an intent it stored before is not in this map).
            if self.intents.remove(&id).is_none() || self.replaying {
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
    /// The indexer task (awaited at close: the store is closed when it ends), and
    /// what tells it to stop without catching up.
    indexer: Option<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
    /// The indexer's marks: the last batch in the store, and the last one flushed there.
    indexed: watch::Receiver<u64>,
    durable: watch::Receiver<u64>,
    /// The durable mark someone needs (the indexer flushes until it reaches it).
    want: watch::Sender<u64>,
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
        let (flushed, durable) = watch::channel(0);
        let (want, wanted) = watch::channel(0);
        let (stop, stopping) = watch::channel(false);
        let marks = Marks {
            indexed: done,
            durable: flushed,
            want: wanted,
        };
        let indexer = tokio::spawn(index(store, rx, marks, stopping));
        JournalBackend {
            journal: Arc::new(Mutex::new(journal)),
            to_index,
            indexer: Some(indexer),
            stop,
            indexed,
            durable,
            want,
            written: 0,
            last_in: [0, 0],
            wait,
        }
    }

    /// Waits (up to the backend's wait) until the store holds batch `n`; borrows
    /// nothing, so the writer need not wait itself.
    fn indexed(&self, n: u64) -> impl Future<Output = Result<(), String>> + Send + 'static {
        Self::reach(self.indexed.clone(), n, self.wait)
    }

    /// Asks the indexer to make the store durable up to batch `n`, without waiting.
    fn ask_durable(&self, n: u64) {
        self.want.send_if_modified(|w| {
            let raise = *w < n;
            if raise {
                *w = n;
            }
            raise
        });
    }

    /// Waits (up to the backend's wait) until batch `n` is durable in the store.
    fn durable(&self, n: u64) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.ask_durable(n);
        Self::reach(self.durable.clone(), n, self.wait)
    }

    async fn reach(mut mark: watch::Receiver<u64>, n: u64, wait: Duration) -> Result<(), String> {
        match tokio::time::timeout(wait, mark.wait_for(|&i| i >= n)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err("the audit store's indexer stopped".into()),
            Err(_) => Err(format!(
                "the audit store (behind the journal) has not caught up within {} ms",
                wait.as_millis()
            )),
        }
    }

    /// Stops the indexer: it ends (closing the store) once nothing can reach it, or,
    /// when `now`, as soon as it is between transactions (it may be retrying a store
    /// that cannot be written: the journal keeps what the store lacks).
    async fn stop_indexer(&mut self, now: bool) {
        if now {
            let _ = self.stop.send(true);
        }
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.to_index, closed));
        if let Some(task) = self.indexer.take() {
            let _ = task.await;
        }
    }
}

impl LogBackend for JournalBackend {
    async fn commit(&mut self, batch: &Batch) -> Result<(), String> {
        let frame = encode(batch);
        let (fits, other) = {
            let j = self.journal.lock().map_err(poisoned)?;
            (j.fits(frame.len()), j.active ^ 1)
        };
        if !fits {
            // The other file is reused only once everything in it is durable in the
            // store (asked for when the writer left it: long done, as a rule).
            self.durable(self.last_in[other]).await?;
            let mut j = self.journal.lock().map_err(poisoned)?;
            j.switch()
                .map_err(|e| format!("starting the audit journal's next file: {e}"))?;
            drop(j);
            // The file just left: its batches must be durable in the store before the
            // writer comes back to it.
            self.ask_durable(self.last_in[other ^ 1]);
        }
        // The writer runs on a thread of its own (`Auditor::start`): waiting for the
        // disk here blocks nothing else.
        let active = {
            let mut j = self.journal.lock().map_err(poisoned)?;
            j.append(frame)
                .map_err(|e| format!("{}: {e}", j.path(j.active).display()))?;
            j.active
        };
        self.written += 1;
        self.last_in[active] = self.written;
        // The indexer only stops when this backend is dropped.
        let _ = self
            .to_index
            .send(ToIndex::Batch(self.written, batch.clone()));
        Ok(())
    }

    async fn prune(&mut self, before_ms: i64) -> Result<u64, String> {
        let stopped = || "the audit store's indexer stopped".to_string();
        // The store must first catch up (bounded, as every wait for it): then nothing
        // is ahead of the prune, whose own time SQLite bounds (a long UPDATE on a big
        // log must not be reported as not done while it runs).
        self.indexed(self.written)
            .await
            .map_err(|e| format!("{e}; not pruned"))?;
        let (reply, rx) = oneshot::channel();
        self.to_index
            .send(ToIndex::Prune(before_ms, reply))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    fn settle(&mut self) -> impl Future<Output = Result<(), String>> + Send + 'static {
        self.indexed(self.written)
    }

    async fn close(&mut self) -> Result<(), String> {
        // Emptying the journal lets go of everything: the store must hold it durably.
        if let Err(e) = self.durable(self.written).await {
            // The journal keeps what the store lacks, for the next start.
            self.stop_indexer(true).await;
            return Err(e);
        }
        let journal = self.journal.clone();
        let reset = tokio::task::spawn_blocking(move || {
            let mut j = journal.lock().map_err(poisoned)?;
            j.reset()
                .map_err(|e| format!("emptying the audit journal: {e}"))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        self.stop_indexer(false).await;
        reset
    }
}

fn poisoned<T>(_: T) -> String {
    "the audit journal's lock is poisoned".to_string()
}

/// The indexer's side of its marks.
struct Marks {
    indexed: watch::Sender<u64>,
    durable: watch::Sender<u64>,
    want: watch::Receiver<u64>,
}

/// One write to the store: a batch (flushed or not), or a flush.
async fn write<B: LogBackend>(
    store: &mut B,
    batch: Option<&Batch>,
    durable: bool,
) -> Result<(), String> {
    match batch {
        Some(b) if durable => store.commit(b).await,
        Some(b) => store.commit_deferred(b).await,
        None => store.sync().await,
    }
}

/// The indexer: moves committed batches into the store, as many per transaction as are
/// waiting, and flushes the store when a durable mark is wanted; retries a failed write
/// (the journal holds its batches meanwhile).
async fn index<B: LogBackend>(
    mut store: B,
    mut rx: mpsc::UnboundedReceiver<ToIndex>,
    mut marks: Marks,
    mut stopping: watch::Receiver<bool>,
) {
    let mut merged = Merged::default();
    let mut failing = false;
    let mut next: Option<ToIndex> = None;
    let mut last_commit: Option<tokio::time::Instant> = None;
    let (mut indexed, mut durable) = (0u64, 0u64);
    loop {
        let wanted = |marks: &mut Marks, durable: u64| *marks.want.borrow_and_update() > durable;
        let first = match next.take() {
            Some(m) => Some(m),
            None => match rx.try_recv() {
                Ok(m) => Some(m),
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    let _ = store.close().await;
                    return;
                }
                // Nothing to move: flush if that is wanted and not yet done, else wait
                // for a batch or a wish.
                Err(mpsc::error::TryRecvError::Empty) => {
                    if wanted(&mut marks, durable) && indexed > durable {
                        None
                    } else {
                        tokio::select! {
                            m = rx.recv() => match m {
                                Some(m) => Some(m),
                                None => {
                                    let _ = store.close().await;
                                    return;
                                }
                            },
                            Ok(()) = marks.want.changed() => continue,
                        }
                    }
                }
            },
        };
        let (last, batch) = match first {
            None => (indexed, None),
            Some(ToIndex::Prune(before_ms, reply)) => {
                // Its caller may have given up waiting (the store was failing). What it
                // reports done is flushed.
                if !reply.is_closed() {
                    let mut r = store.prune(before_ms).await;
                    if let Ok(n) = r {
                        r = store.sync().await.map(|()| n);
                        if r.is_ok() {
                            durable = indexed;
                            let _ = marks.durable.send(durable);
                        }
                    }
                    let _ = reply.send(r);
                }
                continue;
            }
            Some(ToIndex::Batch(n, b)) => {
                // Under load, let batches pile up a little: one transaction per few
                // milliseconds costs the store far less than one per commit, and most
                // intents are resolved within it. Not while a durable mark is awaited.
                if let Some(at) = last_commit {
                    let due = at + INDEX_EVERY;
                    if tokio::time::Instant::now() < due && !wanted(&mut marks, durable) {
                        tokio::time::sleep_until(due).await;
                    }
                }
                // Everything waiting, up to a checkpoint or INDEX_BATCH records; a
                // prune waits for the batches before it.
                let mut last = n;
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
                (last, Some(merged.finish()))
            }
        };
        // Flushed with this write when a durable mark beyond what is flushed is wanted.
        let flush = wanted(&mut marks, durable);
        loop {
            match write(&mut store, batch.as_ref(), flush).await {
                Ok(()) => {
                    if failing {
                        log::info!("the audit store is writable again");
                        failing = false;
                    }
                    indexed = last;
                    let _ = marks.indexed.send(indexed);
                    if flush {
                        durable = last;
                        let _ = marks.durable.send(durable);
                    }
                    if batch.is_some() {
                        last_commit = Some(tokio::time::Instant::now());
                    }
                    break;
                }
                Err(e) => {
                    if !failing {
                        log::error!(
                            "the audit store cannot be written ({e}); its journal holds the records meanwhile"
                        );
                        failing = true;
                    }
                    // Told to stop (or the backend is gone): the journal keeps the
                    // batches for the next start.
                    let stop = tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => false,
                        _ = stopping.changed() => true,
                    };
                    if stop {
                        let _ = store.close().await;
                        return;
                    }
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
            j.append(encode(b)).unwrap();
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
        j.append(encode(&small)).unwrap();
        drop(j);
        let (_, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert_eq!(held.len(), 1);
        assert!(same(&held[0], &small));
        // An earlier use's frames right where the new ones end (same sizes, and the same
        // generation number: it restarts after a reset) chain from another nonce.
        let fresh = |dir: &Path| {
            // Emptied, closed, opened and emptied again: the generation numbers restart.
            let (mut j, _) = Journal::open_sized(dir, 1 << 16).unwrap();
            j.reset().unwrap();
            drop(j);
            let (mut j, held) = Journal::open_sized(dir, 1 << 16).unwrap();
            assert!(held.is_empty());
            j.reset().unwrap();
            j
        };
        let mut j = fresh(&dir);
        let generation = j.generation;
        j.append(encode(&batches[0])).unwrap();
        j.append(encode(&batches[1])).unwrap();
        drop(j);
        let mut j = fresh(&dir);
        assert_eq!(j.generation, generation, "the generation number repeats");
        j.append(encode(&batches[0])).unwrap();
        drop(j);
        let (_, held) = Journal::open_sized(&dir, 1 << 16).unwrap();
        assert_eq!(held.len(), 1, "only this use's frame");
        // Nothing else parses as a batch.
        assert!(decode(&[1, 0, 0, 0]).is_none());
        let mut payload = encode(&batches[0])[HEADER..].to_vec();
        payload.push(0);
        assert!(decode(&payload).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn frames_of_every_size_read_back_whether_written_directly_or_buffered() {
        // One intent of `n` bytes: a frame of 57 + n bytes.
        let sized = |id: u64, n: usize| Batch {
            intents: vec![(id, "i".repeat(n))],
            ..Batch::default()
        };
        for direct in [true, false] {
            let dir = scratch(&format!("sizes-{direct}"));
            let (mut j, _) = Journal::open_sized(&dir, 1 << 20).unwrap();
            if !direct {
                j.direct = None;
            } else if !j.direct() {
                eprintln!(
                    "{}: direct writes refused here, both passes buffered",
                    dir.display()
                );
            }
            j.reset().unwrap();
            // The first frame ends the first block exactly (after the file's header),
            // the next starts one; then frames across one and several blocks.
            let mut batches = vec![sized(1, BLOCK - HEADER - 57), sized(2, 10)];
            batches.extend((3..40).map(|i| sized(i, (i as usize * 997) % (3 * BLOCK))));
            for b in &batches {
                j.append(encode(b)).unwrap();
                assert!(j.offset <= 1 << 20);
                if j.direct() {
                    assert_eq!(j.tail.len() as u64, j.offset % BLOCK as u64);
                }
            }
            drop(j);
            let (_, held) = Journal::open_sized(&dir, 1 << 20).unwrap();
            assert_eq!(held.len(), batches.len(), "direct: {direct}");
            assert!(held.iter().zip(&batches).all(|(a, b)| same(a, b)));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_new_header_leaves_the_rest_of_its_block_as_it_was() {
        // Should the header's write not reach the disk, the file's old frames must
        // still be there behind the old header, all of them.
        let dir = scratch("header");
        let (mut j, _) = Journal::open_sized(&dir, 1 << 16).unwrap();
        j.reset().unwrap();
        for i in 1..=4 {
            j.append(encode(&batch(i, i * 10, 3))).unwrap();
        }
        let block = |j: &Journal| {
            let mut b = vec![0u8; BLOCK];
            j.files[0].read_exact_at(&mut b, 0).unwrap();
            b
        };
        let before = block(&j);
        j.switch().unwrap();
        j.append(encode(&batch(5, 50, 3))).unwrap();
        j.switch().unwrap();
        assert_eq!(j.active, 0);
        j.start_file().unwrap();
        let after = block(&j);
        assert_ne!(after[..HEADER], before[..HEADER], "a new header");
        assert_eq!(after[HEADER..], before[HEADER..], "the rest as it was");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn replay_applies_every_resolution_even_of_intents_it_brings_again() {
        // The store has intent 1 (from batch 1) but not batch 2, which resolves it.
        let store = MemoryLog::default();
        let (b1, b2) = (batch(1, 1, 2), batch(2, 3, 2));
        store
            .inner
            .lock()
            .unwrap()
            .records
            .extend(b1.records.clone());
        store
            .inner
            .lock()
            .unwrap()
            .intents
            .extend(b1.intents.clone());
        let mut s = store.clone();
        assert_eq!(
            replay(&mut s, vec![b1.clone(), b2.clone()], 2)
                .await
                .unwrap(),
            2
        );
        assert_same_log(&store, &applied(&[b1, b2]));
        let intents = store.inner.lock().unwrap().intents.clone();
        assert_eq!(
            intents.keys().collect::<Vec<_>>(),
            vec![&2],
            "intent 1 resolved"
        );
    }

    #[test]
    fn after_a_failed_append_the_next_frame_replaces_it_whatever_its_size() {
        let dir = scratch("unsure");
        let (mut j, _) = Journal::open_sized(&dir, 4096).unwrap();
        j.reset().unwrap();
        j.append(encode(&batch(1, 1, 2))).unwrap();
        // A frame that reached the file though its append failed (the flush did).
        let (offset, prev) = (j.offset, j.prev);
        let mut lost = encode(&batch(2, 3, 2));
        seal(&mut lost, j.generation, &prev);
        j.files[0].write_all_at(&lost, offset).unwrap();
        j.unsure = true;
        // The retry is larger than what is left of the file: it still goes there.
        let retry = batch(2, 3, 40);
        assert!(offset + encode(&retry).len() as u64 > 4096);
        assert!(j.fits(encode(&retry).len()));
        j.append(encode(&retry)).unwrap();
        assert!(!j.unsure);
        drop(j);
        let (_, held) = Journal::open_sized(&dir, 4096).unwrap();
        assert_eq!(held.len(), 2);
        assert!(same(&held[1], &retry), "the retry replaced the frame");
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

    /// A backend over fresh journal files of `bytes` each in `dir`, in front of `store`.
    fn started<B: LogBackend>(dir: &Path, bytes: u64, store: B, wait: Duration) -> JournalBackend {
        let (mut j, _) = Journal::open_sized(dir, bytes).unwrap();
        j.reset().unwrap();
        JournalBackend::start(j, store, wait)
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
        let store = MemoryLog::default();
        let mut backend = started(&dir, 4096, store.clone(), Duration::from_secs(10));
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

    /// A store whose deferred commits are visible but not flushed: `durable` is what a
    /// power cut would leave of it (copied from `visible` by each flush).
    #[derive(Clone, Default)]
    struct Lagging {
        visible: MemoryLog,
        durable: MemoryLog,
        flushes: Arc<Mutex<u32>>,
    }

    impl Lagging {
        fn flush(&self) {
            let v = self.visible.inner.lock().unwrap();
            let mut d = self.durable.inner.lock().unwrap();
            d.records = v.records.clone();
            d.intents = v.intents.clone();
            d.checkpoints = v.checkpoints.clone();
            *self.flushes.lock().unwrap() += 1;
        }
    }

    impl LogBackend for Lagging {
        async fn commit(&mut self, batch: &Batch) -> Result<(), String> {
            self.visible.commit(batch).await?;
            self.flush();
            Ok(())
        }
        async fn commit_deferred(&mut self, batch: &Batch) -> Result<(), String> {
            self.visible.commit(batch).await
        }
        async fn sync(&mut self) -> Result<(), String> {
            self.flush();
            Ok(())
        }
        async fn prune(&mut self, before_ms: i64) -> Result<u64, String> {
            self.visible.prune(before_ms).await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_power_cut_loses_nothing_the_store_had_not_flushed() {
        let dir = scratch("power");
        let store = Lagging::default();
        let mut backend = started(&dir, 4096, store.clone(), Duration::from_secs(10));
        // A switch every few commits: each reuse of a file waits for its batches to be
        // flushed in the store, not only visible there.
        let batches = commit_all(&mut backend, 60).await;
        backend.settle().await.unwrap();
        assert_same_log(&store.visible, &applied(&batches));
        let flushes = *store.flushes.lock().unwrap();
        assert!(
            (1..40).contains(&flushes),
            "flushed per file, not per transaction: {flushes}"
        );
        // The power cut: the store is what it had flushed; the journal holds the rest.
        drop(backend);
        let (_, held) = Journal::open_sized(&dir, 4096).unwrap();
        let mut after = Lagging {
            visible: store.durable.clone(),
            ..Lagging::default()
        };
        let last = store
            .durable
            .inner
            .lock()
            .unwrap()
            .records
            .last()
            .map_or(0, |r| r.seq);
        replay(&mut after, held, last).await.unwrap();
        assert_same_log(&after.visible, &applied(&batches));
        // Replay flushes what it applied before the journal may be emptied.
        assert_same_log(&after.durable, &applied(&batches));

        // A close flushes the store before it empties the journal.
        let dir2 = scratch("power-close");
        let store = Lagging::default();
        let mut backend = started(&dir2, 1 << 20, store.clone(), Duration::from_secs(10));
        let batches = commit_all(&mut backend, 30).await;
        backend.close().await.unwrap();
        let (_, held) = Journal::open_sized(&dir2, 1 << 20).unwrap();
        assert!(held.is_empty(), "the journal is empty after a close");
        assert_same_log(&store.durable, &applied(&batches));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_store_that_cannot_be_written_loses_nothing_and_the_journal_fails_closed() {
        let dir = scratch("crash");
        let store = MemoryLog::default();
        store.inner.lock().unwrap().fail = Some("disk full".into());
        let mut backend = started(&dir, 1 << 20, store.clone(), Duration::from_millis(300));
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
        let store = MemoryLog::default();
        store.inner.lock().unwrap().fail = Some("disk full".into());
        let mut backend = started(&dir2, 2048, store.clone(), Duration::from_millis(200));
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
        // A prune waits for the store no longer than a commit does.
        let e = backend.prune(0).await.unwrap_err();
        assert!(e.contains("not pruned"), "{e}");
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
