//! The audit log's SQL: its own SQLite file (`audit.db`), in WAL mode. Its writes go
//! through one connection at `synchronous=NORMAL`: a commit is visible at once but
//! survives power loss only once a durable commit or [`AuditDb::sync`] (an fsync of the
//! WAL, which covers every commit before it) has returned, or a checkpoint has moved it
//! into the main file. The journal in front of the store is what makes each record
//! durable before its request is answered; it asks for the store's flush only when it
//! is about to overwrite what the store must then hold (rarely, off the request path),
//! so the store's fsyncs do not compete with the journal's writes for the disk on every
//! transaction. Writes wait at most the busy timeout for a lock held elsewhere, then
//! fail (and the gateway refuses the request).
//!
//! Tables: `audit_records(seq, time_ms, leaf, body)` (body NULL once pruned: the leaf hash
//! stays so the tree still verifies), `audit_intents(id, body)` (requests in progress),
//! `audit_checkpoints(size, time_ms, note)`.

use std::fmt::Write as _;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

use crate::{Result, StoreError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit_records (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    leaf BLOB NOT NULL,
    body TEXT
);
CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records(time_ms);
CREATE TABLE IF NOT EXISTS audit_intents (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    note TEXT NOT NULL,
    PRIMARY KEY (size, time_ms)
);
CREATE TABLE IF NOT EXISTS audit_sync (id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
";

/// A stored record row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    pub seq: u64,
    pub time_ms: i64,
    pub leaf: Vec<u8>,
    pub body: Option<String>,
}

/// A record to insert.
#[derive(Debug, Clone, Copy)]
pub struct NewAuditRow<'a> {
    pub seq: u64,
    pub time_ms: i64,
    pub leaf: &'a [u8],
    pub body: &'a str,
}

/// A page of rows as four texts (see [`AuditDb::packed_rows`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedRows {
    pub seqs: String,
    pub times: String,
    pub leaves: String,
    pub bodies: String,
}

/// What the console's audit page asks for; `None` matches anything.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    pub tenant: Option<String>,
    pub key_id: Option<String>,
    pub action: Option<String>,
    /// `ok` (status below 400) or `error`.
    pub outcome: Option<String>,
    /// Records before this one (paging back).
    pub before_seq: Option<u64>,
    pub limit: u32,
}

#[derive(Debug, Clone)]
pub struct AuditDb {
    pool: SqlitePool,
    writer: SqlitePool,
}

/// One batch in one call: a single statement text, so the whole transaction is one trip
/// to the connection's thread, however many rows. The rows travel as JSON arrays
/// (`?1` records `[seq, time_ms, leaf hex, body]`, `?2` intents `[id, body]`, `?3` the
/// intent ids to delete); `?4`-`?6` are the checkpoint, NULL when there is none. The
/// text never changes, so its prepared statements stay cached. An intent or checkpoint
/// already stored is kept (the journal's batches are applied again after a crash; their
/// records the store has are left out before).
const COMMIT: &str = "BEGIN IMMEDIATE;
INSERT INTO audit_records (seq, time_ms, leaf, body)
    SELECT value->>0, value->>1, unhex(value->>2), value->>3 FROM json_each(?1);
INSERT OR IGNORE INTO audit_intents (id, body) SELECT value->>0, value->>1 FROM json_each(?2);
DELETE FROM audit_intents WHERE id IN (SELECT value FROM json_each(?3));
INSERT OR IGNORE INTO audit_checkpoints (size, time_ms, note)
    SELECT ?4, ?5, ?6 WHERE ?4 IS NOT NULL;
COMMIT;";

/// A flush with nothing else to write: one tiny write transaction at `synchronous=FULL`,
/// whose commit fsyncs the WAL (and with it every commit before).
const SYNC: &str = "PRAGMA synchronous = FULL;
INSERT INTO audit_sync (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1;
PRAGMA synchronous = NORMAL;";

/// `[[seq, time_ms, "leaf hex", "body"], ...]`.
fn records_json(records: &[NewAuditRow<'_>]) -> String {
    let mut out =
        String::with_capacity(2 + records.iter().map(|r| r.body.len() + 110).sum::<usize>());
    out.push('[');
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[{},{},\"", r.seq, r.time_ms);
        for b in r.leaf {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
        out.push_str("\",");
        crate::json::push_string(&mut out, r.body);
        out.push(']');
    }
    out.push(']');
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `[[id, "body"], ...]`.
fn intents_json(intents: &[(u64, &str)]) -> String {
    let mut out =
        String::with_capacity(2 + intents.iter().map(|(_, b)| b.len() + 30).sum::<usize>());
    out.push('[');
    for (i, (id, body)) in intents.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "[{id},");
        crate::json::push_string(&mut out, body);
        out.push(']');
    }
    out.push(']');
    out
}

/// The writer connection's `synchronous` mode; a connection that cannot be set back is
/// dropped (a fresh one opens at NORMAL).
async fn set_synchronous(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
    full: bool,
) -> Result<()> {
    let pragma = match full {
        true => "PRAGMA synchronous = FULL",
        false => "PRAGMA synchronous = NORMAL",
    };
    if let Err(e) = sqlx::raw_sql(pragma).execute(&mut **conn).await {
        conn.close_on_drop();
        return Err(e.into());
    }
    Ok(())
}

impl AuditDb {
    /// Opens (creating if needed) the audit database. Writes wait up to `busy` for a lock.
    pub async fn open(path: &Path, busy: Duration) -> Result<AuditDb> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        #[cfg(unix)]
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            // The log names tenants, keys and addresses: the daemon's user only.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(busy);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .acquire_timeout(busy + Duration::from_secs(5))
            .connect_with(opts.clone())
            .await
            .map_err(open_err)?;
        sqlx::raw_sql(SCHEMA)
            .execute(&pool)
            .await
            .map_err(open_err)?;
        // Commits go through one connection of their own, so its page cache stays warm
        // (a write through another connection would invalidate it every time).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(busy + Duration::from_secs(5))
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        Ok(AuditDb { pool, writer })
    }

    /// Writes one batch in one transaction. `durable`: its commit fsyncs the WAL, so it
    /// and every commit before it survive power loss when this returns; otherwise it is
    /// visible at once and durable after the next durable commit or [`AuditDb::sync`].
    pub async fn commit(
        &self,
        records: &[NewAuditRow<'_>],
        intents: &[(u64, &str)],
        resolved: &[u64],
        checkpoint: Option<(u64, i64, &str)>,
        durable: bool,
    ) -> Result<()> {
        // Plain BEGIN/COMMIT rather than sqlx's transaction: a COMMIT that fails with
        // SQLITE_FULL or SQLITE_BUSY leaves SQLite's transaction open, and the connection
        // must be rolled back and dropped, not reused inside it.
        let resolved = format!(
            "[{}]",
            resolved
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut conn = self.writer.acquire().await?;
        if durable {
            set_synchronous(&mut conn, true).await?;
        }
        let result = sqlx::query(COMMIT)
            .bind(records_json(records))
            .bind(intents_json(intents))
            .bind(resolved)
            .bind(checkpoint.map(|c| c.0 as i64))
            .bind(checkpoint.map(|c| c.1))
            .bind(checkpoint.map(|c| c.2))
            .execute(&mut *conn)
            .await;
        if let Err(e) = result {
            let _ = sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await;
            conn.close_on_drop();
            return Err(e.into());
        }
        // Committed: a connection that cannot be set back is closed (by
        // `set_synchronous`), and the batch is still reported written (a retry would
        // find its records there and fail for good).
        if durable {
            let _ = set_synchronous(&mut conn, false).await;
        }
        Ok(())
    }

    /// Makes every commit so far durable (survives power loss) when it returns.
    pub async fn sync(&self) -> Result<()> {
        let mut conn = self.writer.acquire().await?;
        if let Err(e) = sqlx::raw_sql(SYNC).execute(&mut *conn).await {
            // Whatever state it is in (a synchronous mode left at FULL), not reused.
            conn.close_on_drop();
            return Err(e.into());
        }
        Ok(())
    }

    /// The newest records matching `f` (whose text is kept), newest first: (seq, text).
    pub async fn search(&self, f: &AuditFilter) -> Result<Vec<(u64, String)>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM audit_records WHERE body IS NOT NULL
               AND (?1 IS NULL OR time_ms >= ?1) AND (?2 IS NULL OR time_ms < ?2)
               AND (?3 IS NULL OR json_extract(body, '$.tenant') = ?3)
               AND (?4 IS NULL OR json_extract(body, '$.key_id') = ?4)
               AND (?5 IS NULL OR json_extract(body, '$.action') = ?5)
               AND (?6 IS NULL
                    OR (?6 = 'ok' AND json_extract(body, '$.status') < 400)
                    OR (?6 = 'error' AND json_extract(body, '$.status') >= 400))
               AND (?7 IS NULL OR seq < ?7)
             ORDER BY seq DESC LIMIT ?8",
        )
        .bind(f.since_ms)
        .bind(f.until_ms)
        .bind(&f.tenant)
        .bind(&f.key_id)
        .bind(&f.action)
        .bind(&f.outcome)
        .bind(f.before_seq.map(|s| s as i64))
        .bind(i64::from(f.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<i64, _>(0) as u64, r.get::<String, _>(1)))
            .collect())
    }

    /// A consistent copy of the audit database at `path` (SQLite `VACUUM INTO`).
    pub async fn snapshot(&self, path: &std::path::Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(path.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Drops the text of records older than `before_ms`; returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<u64> {
        let r = sqlx::query(
            "UPDATE audit_records SET body = NULL WHERE time_ms < ? AND body IS NOT NULL",
        )
        .bind(before_ms)
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Up to `limit` rows with seq ≥ `from`, in seq order.
    pub async fn rows(&self, from: u64, limit: u32) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, leaf, body FROM audit_records WHERE seq >= ? ORDER BY seq LIMIT ?",
        )
        .bind(from as i64)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(AuditRow {
                    seq: r.try_get::<i64, _>(0)? as u64,
                    time_ms: r.try_get(1)?,
                    leaf: r.try_get(2)?,
                    body: r.try_get(3)?,
                })
            })
            .collect()
    }

    /// The rows with `from` ≤ seq < `from + limit` (in seq order: a rowid range scan),
    /// packed by SQLite into one row of four texts: the seqs and the times
    /// (comma-separated), the leaves (hex, 64 digits each) and the bodies
    /// (newline-separated, `-` when pruned; canonical record text has no raw newline).
    /// One row per page instead of one per record: reading is what bounds verification
    /// speed. The caller checks that the four agree.
    pub async fn packed_rows(&self, from: u64, limit: u32) -> Result<Option<PackedRows>> {
        let row = sqlx::query(
            "SELECT group_concat(seq, ','), group_concat(time_ms, ','), group_concat(hex(leaf), ''),
                    group_concat(ifnull(body, '-'), char(10))
             FROM audit_records WHERE seq >= ? AND seq < ?",
        )
        .bind(from as i64)
        .bind(from as i64 + limit as i64)
        .fetch_one(&self.pool)
        .await?;
        let seqs: Option<String> = row.try_get(0)?;
        let Some(seqs) = seqs else { return Ok(None) };
        Ok(Some(PackedRows {
            seqs,
            times: row.try_get(1)?,
            leaves: row.try_get(2)?,
            bodies: row.try_get(3)?,
        }))
    }

    /// The leaf hashes of records `from` ≤ seq < `from + limit`, as one hex text (64
    /// digits each, in seq order), with the first and last seq; None past the end.
    pub async fn packed_leaves(&self, from: u64, limit: u32) -> Result<Option<(u64, u64, String)>> {
        let row = sqlx::query(
            "SELECT min(seq), max(seq), count(*), group_concat(hex(leaf), '')
             FROM audit_records WHERE seq >= ? AND seq < ?",
        )
        .bind(from as i64)
        .bind(from as i64 + limit as i64)
        .fetch_one(&self.pool)
        .await?;
        let (first, last, n): (Option<i64>, Option<i64>, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let (Some(first), Some(last)) = (first, last) else {
            return Ok(None);
        };
        if last - first + 1 != n {
            // A gap: the caller reports the first missing seq.
            let missing: i64 = sqlx::query_scalar(
                "SELECT min(seq) + 1 FROM audit_records a WHERE seq >= ? AND seq < ?
                 AND NOT EXISTS (SELECT 1 FROM audit_records b WHERE b.seq = a.seq + 1)",
            )
            .bind(first)
            .bind(last)
            .fetch_one(&self.pool)
            .await?;
            return Err(StoreError::AuditGap(missing as u64));
        }
        Ok(Some((first as u64, last as u64, row.try_get(3)?)))
    }

    /// The last record's seq and time.
    pub async fn last(&self) -> Result<Option<(u64, i64)>> {
        let r = sqlx::query("SELECT seq, time_ms FROM audit_records ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(match r {
            Some(r) => Some((r.try_get::<i64, _>(0)? as u64, r.try_get(1)?)),
            None => None,
        })
    }

    /// Seq range [first, last] of records with since ≤ time < until.
    pub async fn seq_range(
        &self,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Result<Option<(u64, u64)>> {
        let r = sqlx::query(
            "SELECT MIN(seq), MAX(seq) FROM audit_records WHERE time_ms >= ? AND time_ms < ?",
        )
        .bind(since.unwrap_or(i64::MIN))
        .bind(until.unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        let (a, b): (Option<i64>, Option<i64>) = (r.try_get(0)?, r.try_get(1)?);
        Ok(a.zip(b).map(|(a, b)| (a as u64, b as u64)))
    }

    /// Every checkpoint: (size, time_ms, note), oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<(u64, i64, String)>> {
        let rows =
            sqlx::query("SELECT size, time_ms, note FROM audit_checkpoints ORDER BY size, time_ms")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)? as u64, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    /// Intents of requests in progress (or interrupted): (id, body).
    pub async fn intents(&self) -> Result<Vec<(u64, String)>> {
        let rows = sqlx::query("SELECT id, body FROM audit_intents ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| Ok((r.try_get::<i64, _>(0)? as u64, r.try_get(1)?)))
            .collect()
    }

    pub async fn close(&self) {
        self.writer.close().await;
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty audit database in a directory of its own.
    async fn fresh(name: &str) -> (std::path::PathBuf, AuditDb) {
        let dir = std::env::temp_dir().join(format!("{name}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = AuditDb::open(&dir.join("audit.db"), Duration::from_millis(200))
            .await
            .unwrap();
        (dir, db)
    }

    /// The writer connection's `PRAGMA synchronous` (1 NORMAL, 2 FULL).
    async fn writer_synchronous(db: &AuditDb) -> i64 {
        sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&db.writer)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn durable_commits_and_syncs_leave_the_writer_at_normal() {
        let (dir, db) = fresh("audit-db-sync-").await;
        assert_eq!(writer_synchronous(&db).await, 1);
        let leaf = [3u8; 32];
        let row = |seq| NewAuditRow {
            seq,
            time_ms: 0,
            leaf: &leaf,
            body: "{}",
        };
        db.commit(&[row(1)], &[], &[], None, true).await.unwrap();
        assert_eq!(writer_synchronous(&db).await, 1);
        db.commit(&[row(2)], &[], &[], None, false).await.unwrap();
        for _ in 0..3 {
            db.sync().await.unwrap();
        }
        assert_eq!(writer_synchronous(&db).await, 1);
        let n: i64 = sqlx::query_scalar("SELECT n FROM audit_sync")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 3, "each sync is a write transaction of its own");
        assert_eq!(db.last().await.unwrap(), Some((2, 0)));
        // A reopened store keeps its counter row (the schema is applied again).
        db.close().await;
        let db = AuditDb::open(&dir.join("audit.db"), Duration::from_millis(200))
            .await
            .unwrap();
        db.sync().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT n FROM audit_sync")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 4);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn texts_and_leaves_come_back_byte_for_byte() {
        let (dir, db) = fresh("audit-db-bytes-").await;
        let leaf: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
        let odd = "{\"q\":\"a \\\"quote\\\" \\\\ back\",\"u\":\"\u{e9}\u{1F600}\u{2028}\",\"t\":\"\t\u{7f}\"} ' -- ;";
        let row = NewAuditRow {
            seq: 1,
            time_ms: -5,
            leaf: &leaf,
            body: odd,
        };
        db.commit(&[row], &[(7, odd), (8, "")], &[], Some((1, 2, odd)), true)
            .await
            .unwrap();
        let got = db.rows(1, 1).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].leaf, leaf);
        assert_eq!(got[0].time_ms, -5);
        assert_eq!(got[0].body.as_deref(), Some(odd));
        assert_eq!(
            db.intents().await.unwrap(),
            vec![(7, odd.to_string()), (8, String::new())]
        );
        // Nothing at all is a valid batch too.
        db.commit(&[], &[], &[7, 8, 9], None, false).await.unwrap();
        assert!(db.intents().await.unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn batches_are_all_or_nothing() {
        let (dir, db) = fresh("audit-db-").await;
        let leaf = [1u8; 32];
        let rows: Vec<NewAuditRow> = (1..=5000)
            .map(|seq| NewAuditRow {
                seq,
                time_ms: seq as i64,
                leaf: &leaf,
                body: "{}",
            })
            .collect();
        db.commit(
            &rows,
            &[(1, "{\"a\":1}"), (2, "{}")],
            &[],
            Some((5000, 9, "note")),
            false,
        )
        .await
        .unwrap();
        assert_eq!(db.last().await.unwrap(), Some((5000, 5000)));
        assert_eq!(db.intents().await.unwrap().len(), 2);
        // A batch with a duplicate seq fails whole: the intent it resolves stays.
        let dup = [
            NewAuditRow {
                seq: 5001,
                time_ms: 1,
                leaf: &leaf,
                body: "x",
            },
            rows[0],
        ];
        assert!(db.commit(&dup, &[], &[1], None, true).await.is_err());
        // The failed durable commit's connection is gone; its replacement is at NORMAL.
        assert_eq!(writer_synchronous(&db).await, 1);
        assert_eq!(db.last().await.unwrap(), Some((5000, 5000)));
        assert_eq!(db.intents().await.unwrap().len(), 2);
        db.commit(
            &[NewAuditRow {
                seq: 5001,
                time_ms: 6000,
                leaf: &leaf,
                body: "y",
            }],
            &[(3, "{}")],
            &[1, 3],
            None,
            false,
        )
        .await
        .unwrap();
        assert_eq!(db.intents().await.unwrap(), vec![(2, "{}".to_string())]);
        assert_eq!(db.prune(100).await.unwrap(), 99);
        let r = db.rows(99, 3).await.unwrap();
        assert_eq!(
            r.iter().map(|r| r.body.is_some()).collect::<Vec<_>>(),
            [false, true, true]
        );
        assert_eq!(
            db.seq_range(Some(4999), Some(6001)).await.unwrap(),
            Some((4999, 5001))
        );
        assert_eq!(db.checkpoints().await.unwrap().len(), 1);
        let p = db.packed_rows(99, 3).await.unwrap().unwrap();
        assert_eq!(p.seqs, "99,100,101");
        assert_eq!(p.times, "99,100,101");
        assert_eq!(p.leaves, "01".repeat(96));
        assert_eq!(p.bodies, "-\n{}\n{}");
        assert_eq!(db.packed_rows(9000, 10).await.unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
