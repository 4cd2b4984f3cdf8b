//! Offline verification: of the stored log (every record re-hashed, the tree rebuilt, every
//! signed checkpoint checked against it) and of an export file (JSON lines: records with
//! inclusion proofs, checkpoints with consistency proofs), with nothing but the public key.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rayon::prelude::*;
use serde::Deserialize;

use crate::merkle::{leaf_hash, verify_consistency, verify_inclusion, Frontier, Hash, Tree};
use crate::note::{Checkpoint, VerifierKey};
use crate::record::{format_time, write_time, Record};

/// A stored row as the verifier sees it; `body: None` is a pruned record.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub seq: u64,
    pub time_ms: i64,
    pub leaf: Hash,
    pub body: Option<&'a str>,
}

/// The checks of one row that need no other row: its text says it is this seq at this
/// time, and hashes to its stored leaf.
fn check_row(row: &Row<'_>) -> Result<(), Failure> {
    let Some(body) = row.body else { return Ok(()) };
    let seq = row.seq;
    let b = body.as_bytes();
    let mut digits = [0u8; 20];
    let mut n = seq;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let digits = &digits[i..];
    let head = b"{\"seq\":";
    let at = head.len() + digits.len();
    if !b.starts_with(head) || b.get(head.len()..at) != Some(digits) || b.get(at) != Some(&b',') {
        return fail(
            Some(seq),
            format!("record {seq}: the stored text is not record {seq}'s: records were swapped, inserted or renumbered"),
        );
    }
    let mut time = [0u8; 24];
    write_time(row.time_ms, &mut time);
    let t = at + 1 + b"\"time\":\"".len();
    if b.get(at + 1..t) != Some(b"\"time\":\"".as_slice())
        || b.get(t..t + 24) != Some(time.as_slice())
    {
        return fail(
            Some(seq),
            format!("record {seq}: its time does not match its text: the record was altered"),
        );
    }
    if leaf_hash(b) != row.leaf {
        return fail(
            Some(seq),
            format!("record {seq} was altered: its text does not hash to its leaf"),
        );
    }
    Ok(())
}

/// Why verification failed; `seq` is the first bad record when one can be named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub seq: Option<u64>,
    pub message: String,
}

fn fail<T>(seq: Option<u64>, message: String) -> Result<T, Failure> {
    Err(Failure { seq, message })
}

/// What a successful verification covered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub pruned: u64,
    pub checkpoints: usize,
    /// Size of the newest checkpoint; records after it are not yet signed.
    pub signed_size: u64,
    pub root: Hash,
    /// The tree's right edge after the last record (where a writer resumes).
    pub frontier: Frontier,
}

/// Rebuilds the tree from stored rows, in seq order, and checks every checkpoint.
pub struct LogVerifier {
    checkpoints: Vec<Checkpoint>,
    next_cp: usize,
    frontier: Frontier,
    last_time_ms: i64,
    last_good: u64,
    pruned: u64,
    /// The previous batch: its rows' own checks are done; its order, times and tree
    /// are applied while the next batch is hashed.
    pending: Vec<Checked>,
}

/// A row after its own checks, before the sequential ones.
struct Checked {
    seq: u64,
    time_ms: i64,
    leaf: Hash,
    pruned: bool,
    own: Result<(), Failure>,
}

impl LogVerifier {
    /// `notes`: the stored checkpoints plus any an auditor kept elsewhere. Each must be
    /// signed by `key`.
    pub fn new(key: &VerifierKey, notes: &[String]) -> Result<LogVerifier, Failure> {
        let mut checkpoints = vec![];
        for note in notes {
            let c = Checkpoint::open(note, key).map_err(|e| Failure {
                seq: None,
                message: format!("checkpoint {:?}: {e}", note.lines().nth(1).unwrap_or("?")),
            })?;
            checkpoints.push(c);
        }
        checkpoints.sort_by_key(|c| c.size);
        // Two signed heads of the same size must agree (a rebuilt log shows up here when
        // an old checkpoint is given back).
        for w in checkpoints.windows(2) {
            if w[0].size == w[1].size && w[0].root != w[1].root {
                return fail(
                    None,
                    format!(
                        "two signed checkpoints of size {} disagree: the log was rewritten",
                        w[0].size
                    ),
                );
            }
        }
        Ok(LogVerifier {
            checkpoints,
            next_cp: 0,
            frontier: Frontier::new(),
            last_time_ms: i64::MIN,
            last_good: 0,
            pruned: 0,
            pending: Vec::new(),
        })
    }

    /// Checks a run of rows (in seq order). The rows' own checks (and their hashing) run
    /// in parallel, overlapped with the sequential checks (order, time, the tree) of the
    /// previous run.
    pub fn push_batch(&mut self, rows: &[Row<'_>]) -> Result<(), Failure> {
        let previous = std::mem::take(&mut self.pending);
        let (checked, applied) = rayon::join(
            || {
                rows.par_iter()
                    .map(|r| Checked {
                        seq: r.seq,
                        time_ms: r.time_ms,
                        leaf: r.leaf,
                        pruned: r.body.is_none(),
                        own: check_row(r),
                    })
                    .collect::<Vec<_>>()
            },
            || self.apply(previous),
        );
        applied?;
        self.pending = checked;
        Ok(())
    }

    fn apply(&mut self, rows: Vec<Checked>) -> Result<(), Failure> {
        for row in rows {
            self.push_one(row)?;
        }
        Ok(())
    }

    fn push_one(&mut self, row: Checked) -> Result<(), Failure> {
        let expected = self.frontier.size() + 1;
        if row.seq != expected {
            return fail(
                Some(expected),
                format!(
                    "record {expected} is missing (the next stored record is {}): records were deleted or renumbered",
                    row.seq
                ),
            );
        }
        let seq = row.seq;
        if row.time_ms < self.last_time_ms {
            return fail(
                Some(seq),
                format!("record {seq} is older than the record before it: records were reordered or inserted"),
            );
        }
        self.last_time_ms = row.time_ms;
        row.own?;
        if row.pruned {
            self.pruned += 1;
        }
        self.frontier.push(row.leaf);
        while let Some(c) = self.checkpoints.get(self.next_cp) {
            if c.size != self.frontier.size() {
                break;
            }
            if c.root != self.frontier.root() {
                return fail(
                    Some(self.last_good + 1),
                    format!(
                        "the records up to {} do not match the checkpoint signed at {} (size {}): a record after {} was rewritten together with its hash, or the log was rebuilt",
                        c.size,
                        format_time(c.time_ms),
                        c.size,
                        self.last_good
                    ),
                );
            }
            self.last_good = c.size;
            self.next_cp += 1;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<Summary, Failure> {
        let last = std::mem::take(&mut self.pending);
        self.apply(last)?;
        let n = self.frontier.size();
        if let Some(c) = self.checkpoints.get(self.next_cp) {
            return fail(
                Some(n + 1),
                format!(
                    "the log has {n} records but a checkpoint signed at {} covers {}: records were removed from the end",
                    format_time(c.time_ms),
                    c.size
                ),
            );
        }
        Ok(Summary {
            records: n,
            pruned: self.pruned,
            checkpoints: self.checkpoints.len(),
            signed_size: self.checkpoints.last().map(|c| c.size).unwrap_or(0),
            root: self.frontier.root(),
            frontier: self.frontier,
        })
    }
}

fn b64_list(hashes: &[Hash]) -> String {
    let items: Vec<String> = hashes
        .iter()
        .map(|h| format!("\"{}\"", B64.encode(h)))
        .collect();
    format!("[{}]", items.join(","))
}

/// Writes the lines of an export against one anchor checkpoint.
pub struct Exporter {
    tree: Tree,
    anchor: Checkpoint,
}

impl Exporter {
    /// `leaves`: every leaf up to (at least) the anchor's size.
    pub fn new(mut leaves: Vec<Hash>, anchor: Checkpoint) -> Result<Exporter, String> {
        if (leaves.len() as u64) < anchor.size {
            return Err(format!(
                "the log has {} records, fewer than its checkpoint ({})",
                leaves.len(),
                anchor.size
            ));
        }
        leaves.truncate(anchor.size as usize);
        let tree = Tree::new(leaves);
        if tree.root() != anchor.root {
            return Err("the stored leaves do not match the newest checkpoint: run `appliance audit verify`".into());
        }
        Ok(Exporter { tree, anchor })
    }

    pub fn anchor_size(&self) -> u64 {
        self.anchor.size
    }

    pub fn header(
        &self,
        key: &VerifierKey,
        since: Option<i64>,
        until: Option<i64>,
        now_ms: i64,
    ) -> String {
        serde_json::json!({
            "type": "export",
            "format": 1,
            "origin": self.anchor.origin,
            "public_key": key.to_string(),
            "since": since.map(format_time),
            "until": until.map(format_time),
            "exported_at": format_time(now_ms),
        })
        .to_string()
    }

    /// A checkpoint line; for one older than the anchor, with its consistency proof.
    pub fn checkpoint(&self, size: u64, note: &str) -> String {
        let proof = self.tree.consistency_proof(
            size.min(self.anchor.size) as usize,
            self.anchor.size as usize,
        );
        format!(
            "{{\"type\":\"checkpoint\",\"size\":{size},\"note\":{},\"consistency\":{}}}",
            serde_json::Value::String(note.to_string()),
            b64_list(&proof)
        )
    }

    /// A record line with its inclusion proof in the anchor.
    pub fn record(&self, seq: u64, body: &str) -> String {
        let proof = self
            .tree
            .inclusion_proof(seq as usize - 1, self.anchor.size as usize);
        format!(
            "{{\"type\":\"record\",\"seq\":{seq},\"record\":{body},\"proof\":{}}}",
            b64_list(&proof)
        )
    }
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(rename = "type")]
    kind: String,
    note: Option<String>,
    consistency: Option<Vec<String>>,
    seq: Option<u64>,
    #[serde(borrow)]
    record: Option<&'a serde_json::value::RawValue>,
    proof: Option<Vec<String>>,
    public_key: Option<String>,
}

fn hashes(list: &[String]) -> Option<Vec<Hash>> {
    list.iter()
        .map(|s| {
            let v = B64.decode(s).ok()?;
            <[u8; 32]>::try_from(v.as_slice()).ok()
        })
        .collect()
}

/// What an export proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    pub records: u64,
    pub checkpoints: usize,
    pub anchor_size: u64,
}

/// Checks an export: every checkpoint signed by `key` and consistent with the newest
/// (the anchor), every record canonical and included in the anchor. Errors name the line.
pub fn verify_export(text: &str, key: &VerifierKey) -> Result<ExportSummary, Failure> {
    let mut lines: Vec<(usize, Line)> = vec![];
    for (i, l) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let parsed: Line = serde_json::from_str(l).map_err(|e| Failure {
            seq: None,
            message: format!("line {}: not an export line: {e}", i + 1),
        })?;
        lines.push((i + 1, parsed));
    }
    match lines.first() {
        Some((_, h)) if h.kind == "export" => {
            if h.public_key.as_deref().map(str::trim) != Some(&key.to_string()) {
                eprintln!(
                    "note: the export names another public key than the one given; checking with the one given"
                );
            }
        }
        _ => {
            return fail(
                None,
                "line 1: not an audit export (no export header)".into(),
            )
        }
    }
    let mut cps = vec![];
    for (n, l) in lines.iter().filter(|(_, l)| l.kind == "checkpoint") {
        let note = l.note.as_deref().unwrap_or("");
        let c = Checkpoint::open(note, key).map_err(|e| Failure {
            seq: None,
            message: format!("line {n}: checkpoint: {e}"),
        })?;
        let proof = hashes(l.consistency.as_deref().unwrap_or(&[])).ok_or_else(|| Failure {
            seq: None,
            message: format!("line {n}: malformed consistency proof"),
        })?;
        cps.push((*n, c, proof));
    }
    let Some(anchor) = cps.iter().map(|(_, c, _)| c.clone()).max_by_key(|c| c.size) else {
        return fail(None, "the export has no checkpoint".into());
    };
    for (n, c, proof) in &cps {
        if !verify_consistency(c.size, anchor.size, proof, &c.root, &anchor.root) {
            return fail(
                None,
                format!(
                    "line {n}: checkpoint of size {} is not consistent with the newest (size {}): the log was rewritten between them",
                    c.size, anchor.size
                ),
            );
        }
    }
    let mut records = 0;
    let mut last_seq = 0;
    for (n, l) in lines.iter().filter(|(_, l)| l.kind == "record") {
        let seq = l.seq.unwrap_or(0);
        let bad = |m: String| Failure {
            seq: Some(seq),
            message: format!("line {n}: record {seq}: {m}"),
        };
        if seq <= last_seq {
            return Err(bad("records out of order or repeated".into()));
        }
        last_seq = seq;
        let raw = l
            .record
            .map(|r| r.get())
            .ok_or_else(|| bad("no record".into()))?;
        let parsed =
            Record::parse(raw).map_err(|e| bad(format!("not a canonical record ({e})")))?;
        if parsed.seq != seq {
            return Err(bad(format!("the record says it is {}", parsed.seq)));
        }
        let proof = hashes(l.proof.as_deref().unwrap_or(&[]))
            .ok_or_else(|| bad("malformed inclusion proof".into()))?;
        if seq > anchor.size
            || !verify_inclusion(
                seq - 1,
                anchor.size,
                &leaf_hash(raw.as_bytes()),
                &proof,
                &anchor.root,
            )
        {
            return Err(bad(format!(
                "not included in the signed checkpoint of size {}: the record was altered",
                anchor.size
            )));
        }
        records += 1;
    }
    Ok(ExportSummary {
        records,
        checkpoints: cps.len(),
        anchor_size: anchor.size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::note::Signer;

    /// A row that owns its text, for building logs to tamper with.
    #[derive(Debug, Clone)]
    struct Owned {
        seq: u64,
        time_ms: i64,
        leaf: Hash,
        body: Option<String>,
    }

    fn log(n: u64, signer: &Signer, every: u64) -> (Vec<Owned>, Vec<String>) {
        let mut rows = vec![];
        let mut notes = vec![];
        let mut f = Frontier::new();
        for seq in 1..=n {
            let time_ms = 1_763_800_000_000 + seq as i64 * 10;
            let mut r = Record::action("chat.completions", 200);
            r.seq = seq;
            r.time = format_time(time_ms);
            r.tenant = Some("acme".into());
            let body = r.canonical();
            let leaf = leaf_hash(body.as_bytes());
            f.push(leaf);
            rows.push(Owned {
                seq,
                time_ms,
                leaf,
                body: Some(body),
            });
            if seq % every == 0 || seq == n {
                let c = Checkpoint {
                    origin: signer.name().into(),
                    size: seq,
                    root: f.root(),
                    time_ms,
                };
                notes.push(signer.sign(&c.body()));
            }
        }
        (rows, notes)
    }

    fn check(rows: &[Owned], notes: &[String], key: &VerifierKey) -> Result<Summary, Failure> {
        let mut v = LogVerifier::new(key, notes)?;
        let rows: Vec<Row> = rows
            .iter()
            .map(|r| Row {
                seq: r.seq,
                time_ms: r.time_ms,
                leaf: r.leaf,
                body: r.body.as_deref(),
            })
            .collect();
        for chunk in rows.chunks(7) {
            v.push_batch(chunk)?;
        }
        v.finish()
    }

    #[test]
    fn tampering_is_found_at_the_first_bad_record() {
        let s = Signer::generate("t/log").unwrap();
        let key = s.verifier();
        let (rows, notes) = log(100, &s, 10);
        let ok = check(&rows, &notes, &key).unwrap();
        assert_eq!((ok.records, ok.checkpoints, ok.signed_size), (100, 10, 100));

        // A changed field.
        let mut r = rows.clone();
        r[41].body = Some(r[41].body.clone().unwrap().replace("acme", "evil"));
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(42));
        // A changed field with its hash recomputed: the checkpoint after it catches it.
        let mut r = rows.clone();
        let b = r[41].body.clone().unwrap().replace("acme", "evil");
        r[41].leaf = leaf_hash(b.as_bytes());
        r[41].body = Some(b);
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(41));
        // A deleted row.
        let mut r = rows.clone();
        r.remove(9);
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(10));
        // Two rows' contents swapped (seq kept).
        let mut r = rows.clone();
        let (a, b) = (r[20].clone(), r[21].clone());
        r[20] = Owned { seq: 21, ..b };
        r[21] = Owned { seq: 22, ..a };
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(21));
        // A row inserted (the rest renumbered).
        let mut r = rows.clone();
        let mut extra = r[5].clone();
        extra.seq = 7;
        r.insert(6, extra);
        for (i, row) in r.iter_mut().enumerate().skip(7) {
            row.seq = i as u64 + 1;
        }
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(7));
        // Truncated: the last checkpoint covers more than is left.
        let r = rows[..95].to_vec();
        assert_eq!(check(&r, &notes, &key).unwrap_err().seq, Some(96));
        // Truncated and rebuilt with new records signed by the same key: the old
        // checkpoint an auditor kept does not match.
        let (mut rebuilt, mut new_notes) = log(120, &s, 10);
        rebuilt[60].body = Some(rebuilt[60].body.clone().unwrap().replace("acme", "acmf"));
        let mut f = Frontier::new();
        new_notes.clear();
        for row in rebuilt.iter_mut() {
            row.leaf = leaf_hash(row.body.as_ref().unwrap().as_bytes());
            f.push(row.leaf);
        }
        let c = Checkpoint {
            origin: "t/log".into(),
            size: 120,
            root: f.root(),
            time_ms: 0,
        };
        new_notes.push(s.sign(&c.body()));
        assert!(
            check(&rebuilt, &new_notes, &key).is_ok(),
            "self-consistent on its own"
        );
        let mut with_old = new_notes.clone();
        with_old.push(notes[9].clone());
        let e = check(&rebuilt, &with_old, &key).unwrap_err();
        assert_eq!(e.seq, Some(1), "{e}");
        // A pruned record still verifies through its kept leaf.
        let mut r = rows.clone();
        r[3].body = None;
        assert_eq!(check(&r, &notes, &key).unwrap().pruned, 1);
        // A checkpoint signed by another key is refused.
        let other = Signer::generate("t/log").unwrap();
        assert!(LogVerifier::new(&other.verifier(), &notes).is_err());
    }

    #[test]
    fn exports_verify_and_alterations_name_the_line() {
        let s = Signer::generate("t/log").unwrap();
        let key = s.verifier();
        let (rows, notes) = log(50, &s, 16);
        let anchor = Checkpoint::open(notes.last().unwrap(), &key).unwrap();
        let ex = Exporter::new(rows.iter().map(|r| r.leaf).collect(), anchor).unwrap();
        let mut out = vec![ex.header(&key, None, None, 0)];
        for n in &notes {
            let c = Checkpoint::open(n, &key).unwrap();
            out.push(ex.checkpoint(c.size, n));
        }
        for r in &rows[10..30] {
            out.push(ex.record(r.seq, r.body.as_ref().unwrap()));
        }
        let text = out.join("\n") + "\n";
        let sum = verify_export(&text, &key).unwrap();
        assert_eq!((sum.records, sum.checkpoints, sum.anchor_size), (20, 4, 50));
        let altered = text.replacen("\"tenant\":\"acme\"", "\"tenant\":\"evil\"", 1);
        let e = verify_export(&altered, &key).unwrap_err();
        assert_eq!(e.seq, Some(11), "{e}");
        assert!(e.message.starts_with("line 6:"), "{e}");
        let other = Signer::generate("t/log").unwrap().verifier();
        assert!(verify_export(&text, &other).is_err());
    }
}
