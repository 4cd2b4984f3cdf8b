//! The appliance's state, and all of its SQL: the pool, the embedded migrations, tenants
//! and API keys.
//!
//! SQLite through sqlx (WAL, foreign keys, busy timeout), so the CLI can change keys
//! while the daemon runs against the same file. This crate knows nothing of HTTP, key
//! formats or hashing: it stores what it is given. Times are unix seconds, passed in by
//! the caller.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;

pub mod audit;
pub mod json;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("database migration {version} ({description}): {source}")]
    Migration {
        version: i64,
        description: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("tenant {0:?} already exists")]
    TenantExists(String),
    #[error("no tenant named {0:?}")]
    NoSuchTenant(String),
    #[error("no API key with id {0:?}")]
    NoSuchKey(String),
    #[error("API key {0} was already rotated (replaced by {1}); rotate {1} instead")]
    KeyReplaced(String, String),
    #[error("a model named {0:?} is already in the registry (remove it first, or import under another --name)")]
    ModelExists(String),
    #[error("no model named {0:?} in the registry")]
    NoSuchModel(String),
    #[error("the audit log is missing record {0} (run `appliance audit verify`)")]
    AuditGap(u64),
    #[error("a user named {0:?} already exists")]
    UserExists(String),
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The embedded migrations, in order. Never edit one that has shipped: add a new one.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "tenants and API keys",
        include_str!("../migrations/0001_tenants_keys.sql"),
    ),
    (
        2,
        "model registry",
        include_str!("../migrations/0002_models.sql"),
    ),
    (
        3,
        "key scopes",
        include_str!("../migrations/0003_key_scope.sql"),
    ),
    (
        4,
        "console users",
        include_str!("../migrations/0004_console_users.sql"),
    ),
    (
        5,
        "usage accounting",
        include_str!("../migrations/0005_usage.sql"),
    ),
    (
        6,
        "model device pins",
        include_str!("../migrations/0006_model_devices.sql"),
    ),
];

/// Requests and tokens of one hour, tenant, key and model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Unix time / 3600.
    pub hour: i64,
    pub tenant: String,
    pub key_id: String,
    pub model: String,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
}

/// The console users' columns, in `user_from_row`'s order, then `$tail`.
macro_rules! user_select {
    ($tail:literal) => {
        concat!(
            "SELECT name, role, password_hash, disabled, created_at, last_login, failures, locked_until FROM console_users",
            $tail
        )
    };
}

/// A user of the web console.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleUser {
    pub name: String,
    /// `admin`, `operator` or `auditor`.
    pub role: String,
    /// Argon2id, PHC string format.
    pub password_hash: String,
    pub disabled: bool,
    pub created_at: i64,
    pub last_login: Option<i64>,
    /// Failed logins in a row.
    pub failures: i64,
    pub locked_until: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: i64,
    pub name: String,
    pub created_at: i64,
}

/// An API key as stored: everything but the secret, which is only a hash here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant_id: i64,
    pub tenant: String,
    pub secret_sha256: Vec<u8>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// Models this key may use; `None` = all.
    pub models: Option<Vec<String>>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub replaced_by: Option<String>,
    pub label: Option<String>,
    /// "inference" or "admin".
    pub scope: String,
}

impl KeyRecord {
    /// "active", "expired" or "revoked" at time `now`.
    /// The key that replaces this one on rotation: same tenant, models, limits, label
    /// and scope, and the same expiry (rotation never extends a key's life).
    pub fn successor(&self, id: String, secret_sha256: Vec<u8>) -> NewKey {
        NewKey {
            id,
            tenant: self.tenant.clone(),
            secret_sha256,
            expires_at: self.expires_at,
            models: self.models.clone(),
            rpm: self.rpm,
            tpm: self.tpm,
            max_concurrency: self.max_concurrency,
            label: self.label.clone(),
            scope: self.scope.clone(),
        }
    }

    pub fn status(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// What a new key is created with.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub id: String,
    pub tenant: String,
    pub secret_sha256: Vec<u8>,
    pub expires_at: Option<i64>,
    pub models: Option<Vec<String>>,
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub label: Option<String>,
    /// "inference" or "admin".
    pub scope: String,
}

/// A model in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRecord {
    pub name: String,
    pub sha256: String,
    pub size: i64,
    pub architecture: String,
    pub parameters: i64,
    pub quantization: String,
    pub context_length: i64,
    pub chat_template: bool,
    pub license: Option<String>,
    /// A JSON object.
    pub provenance: String,
    pub signed_by: Option<String>,
    pub imported_at: i64,
}

#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if missing) the database file and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        let open_err = |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        };
        let opts = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .map_err(open_err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Key hashes and tenant names: readable by the daemon's user only.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        let store = Store { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn applied_version(&self) -> Result<i64> {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn migrate(&self) -> Result<()> {
        let current = self.applied_version().await?;
        for &(version, description, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
            let apply = async {
                let mut tx = self.pool.begin().await?;
                sqlx::raw_sql(sql).execute(&mut *tx).await?;
                sqlx::query(
                    "INSERT INTO schema_migrations (version, description, applied_at)
                     VALUES (?, ?, strftime('%s','now'))",
                )
                .bind(version)
                .bind(description)
                .execute(&mut *tx)
                .await?;
                tx.commit().await
            };
            if let Err(source) = apply.await {
                // Another process (the CLI beside the daemon) may have applied it first.
                if self.applied_version().await? >= version {
                    continue;
                }
                return Err(StoreError::Migration {
                    version,
                    description,
                    source,
                });
            }
            log::info!("database: applied migration {version} ({description})");
        }
        Ok(())
    }

    /// The schema version now in the database.
    pub async fn schema_version(&self) -> Result<i64> {
        self.applied_version().await
    }

    pub async fn create_tenant(&self, name: &str, now: i64) -> Result<Tenant> {
        let r = sqlx::query("INSERT INTO tenants (name, created_at) VALUES (?, ?) RETURNING id")
            .bind(name)
            .bind(now)
            .fetch_one(&self.pool)
            .await;
        match r {
            Ok(row) => Ok(Tenant {
                id: row.get(0),
                name: name.to_string(),
                created_at: now,
            }),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::TenantExists(name.to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn tenants(&self) -> Result<Vec<Tenant>> {
        let rows = sqlx::query("SELECT id, name, created_at FROM tenants ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Tenant {
                id: r.get(0),
                name: r.get(1),
                created_at: r.get(2),
            })
            .collect())
    }

    async fn bump_keys(tx: &mut sqlx::SqliteConnection) -> Result<()> {
        sqlx::query("UPDATE change_counters SET value = value + 1 WHERE name = 'keys'")
            .execute(tx)
            .await?;
        Ok(())
    }

    /// Counts every change to the key table; a daemon reloads its keys when it moves.
    pub async fn keys_generation(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT value FROM change_counters WHERE name = 'keys'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn insert_key_row(
        tx: &mut sqlx::SqliteConnection,
        k: &NewKey,
        tenant_id: i64,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_sha256, created_at, expires_at, models,
                                   rpm, tpm, max_concurrency, label, scope)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&k.id)
        .bind(tenant_id)
        .bind(&k.secret_sha256)
        .bind(now)
        .bind(k.expires_at)
        .bind(k.models.as_ref().map(|m| m.join(",")))
        .bind(k.rpm.map(i64::from))
        .bind(k.tpm.map(i64::from))
        .bind(k.max_concurrency.map(i64::from))
        .bind(&k.label)
        .bind(if k.scope.is_empty() {
            "inference"
        } else {
            k.scope.as_str()
        })
        .execute(tx)
        .await?;
        Ok(())
    }

    pub async fn insert_key(&self, k: &NewKey, now: i64) -> Result<KeyRecord> {
        let mut tx = self.pool.begin().await?;
        let tenant_id: Option<i64> = sqlx::query_scalar("SELECT id FROM tenants WHERE name = ?")
            .bind(&k.tenant)
            .fetch_optional(&mut *tx)
            .await?;
        let tenant_id = tenant_id.ok_or_else(|| StoreError::NoSuchTenant(k.tenant.clone()))?;
        Self::insert_key_row(&mut tx, k, tenant_id, now).await?;
        Self::bump_keys(&mut tx).await?;
        tx.commit().await?;
        self.key(&k.id)
            .await?
            .ok_or_else(|| StoreError::NoSuchKey(k.id.clone()))
    }

    fn key_from_row(r: &sqlx::sqlite::SqliteRow) -> KeyRecord {
        let models: Option<String> = r.get(7);
        let u32_of = |i: usize| {
            r.get::<Option<i64>, _>(i)
                .map(|v| v.clamp(0, u32::MAX as i64) as u32)
        };
        KeyRecord {
            id: r.get(0),
            tenant_id: r.get(1),
            tenant: r.get(2),
            secret_sha256: r.get(3),
            created_at: r.get(4),
            expires_at: r.get(5),
            revoked_at: r.get(6),
            models: models.map(|m| {
                m.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }),
            rpm: u32_of(8),
            tpm: u32_of(9),
            max_concurrency: u32_of(10),
            replaced_by: r.get(11),
            label: r.get(12),
            scope: r.get(13),
        }
    }

    pub async fn key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let sql = const_format_key_by_id();
        let row = sqlx::query(sql).bind(id).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(Self::key_from_row))
    }

    /// All keys, or those of one tenant, oldest first.
    pub async fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>> {
        let rows = match tenant {
            Some(t) => {
                if !self.tenants().await?.iter().any(|x| x.name == t) {
                    return Err(StoreError::NoSuchTenant(t.to_string()));
                }
                sqlx::query(const_format_keys_of_tenant())
                    .bind(t)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(const_format_all_keys())
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        Ok(rows.iter().map(Self::key_from_row).collect())
    }

    /// Revokes a key at `now`. Revoking a revoked key is not an error (idempotent).
    pub async fn revoke_key(&self, id: &str, now: i64) -> Result<KeyRecord> {
        let mut tx = self.pool.begin().await?;
        let n =
            sqlx::query("UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n == 0 {
            return Err(StoreError::NoSuchKey(id.to_string()));
        }
        Self::bump_keys(&mut tx).await?;
        tx.commit().await?;
        self.key(id)
            .await?
            .ok_or_else(|| StoreError::NoSuchKey(id.to_string()))
    }

    /// Replaces key `old` by `new` (same tenant, allow-list and limits, given by the
    /// caller in `new`); `old` stays valid until `old_expires_at` (or its own earlier
    /// expiry). One transaction: either both changes happen or neither. A key already
    /// replaced is not rotated again ([`StoreError::KeyReplaced`]): its expiry is its
    /// grace period, which a second successor would inherit.
    pub async fn rotate_key(
        &self,
        old: &str,
        new: &NewKey,
        old_expires_at: i64,
        now: i64,
    ) -> Result<KeyRecord> {
        let mut tx = self.pool.begin().await?;
        let row: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT tenant_id, replaced_by FROM api_keys WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(old)
        .fetch_optional(&mut *tx)
        .await?;
        let (tenant_id, replaced_by) = row.ok_or_else(|| StoreError::NoSuchKey(old.to_string()))?;
        if let Some(by) = replaced_by {
            return Err(StoreError::KeyReplaced(old.to_string(), by));
        }
        Self::insert_key_row(&mut tx, new, tenant_id, now).await?;
        sqlx::query(
            "UPDATE api_keys SET replaced_by = ?,
                    expires_at = MIN(COALESCE(expires_at, ?), ?)
             WHERE id = ?",
        )
        .bind(&new.id)
        .bind(old_expires_at)
        .bind(old_expires_at)
        .bind(old)
        .execute(&mut *tx)
        .await?;
        Self::bump_keys(&mut tx).await?;
        tx.commit().await?;
        self.key(&new.id)
            .await?
            .ok_or_else(|| StoreError::NoSuchKey(new.id.clone()))
    }

    pub async fn insert_model(&self, m: &ModelRecord) -> Result<()> {
        let r = sqlx::query(
            "INSERT INTO models (name, sha256, size, architecture, parameters, quantization,
                                 context_length, chat_template, license, provenance, signed_by,
                                 imported_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&m.name)
        .bind(&m.sha256)
        .bind(m.size)
        .bind(&m.architecture)
        .bind(m.parameters)
        .bind(&m.quantization)
        .bind(m.context_length)
        .bind(m.chat_template)
        .bind(&m.license)
        .bind(&m.provenance)
        .bind(&m.signed_by)
        .bind(m.imported_at)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::ModelExists(m.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn model_from_row(r: &sqlx::sqlite::SqliteRow) -> ModelRecord {
        ModelRecord {
            name: r.get(0),
            sha256: r.get(1),
            size: r.get(2),
            architecture: r.get(3),
            parameters: r.get(4),
            quantization: r.get(5),
            context_length: r.get(6),
            chat_template: r.get(7),
            license: r.get(8),
            provenance: r.get(9),
            signed_by: r.get(10),
            imported_at: r.get(11),
        }
    }

    pub async fn models(&self) -> Result<Vec<ModelRecord>> {
        let rows = sqlx::query(const_concat_models_all())
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::model_from_row).collect())
    }

    async fn model_in(
        conn: &mut sqlx::SqliteConnection,
        name: &str,
    ) -> Result<Option<ModelRecord>> {
        let row = sqlx::query(const_concat_model_by_name())
            .bind(name)
            .fetch_optional(conn)
            .await?;
        Ok(row.as_ref().map(Self::model_from_row))
    }

    pub async fn model(&self, name: &str) -> Result<Option<ModelRecord>> {
        let mut conn = self.pool.acquire().await?;
        Self::model_in(&mut conn, name).await
    }

    /// Removes a model's record; returns it and whether another name still uses its file.
    pub async fn remove_model(&self, name: &str) -> Result<(ModelRecord, bool)> {
        let mut tx = self.pool.begin().await?;
        let m = Self::model_in(&mut tx, name)
            .await?
            .ok_or_else(|| StoreError::NoSuchModel(name.to_string()))?;
        sqlx::query("DELETE FROM models WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM models WHERE sha256 = ?")
            .bind(&m.sha256)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM model_devices WHERE name = ?")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok((m, others > 0))
    }

    /// The devices models are pinned to, by model name.
    pub async fn model_devices(&self) -> Result<std::collections::BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT name, device FROM model_devices ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Pins a registry model to a device (`None`: placed automatically again). The
    /// caller has checked the device's name.
    pub async fn set_model_device(&self, name: &str, device: Option<&str>, at: i64) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if Self::model_in(&mut tx, name).await?.is_none() {
            return Err(StoreError::NoSuchModel(name.to_string()));
        }
        match device {
            Some(d) => {
                sqlx::query(
                    "INSERT INTO model_devices (name, device, set_at) VALUES (?, ?, ?)
                     ON CONFLICT(name) DO UPDATE SET device = excluded.device, set_at = excluded.set_at",
                )
                .bind(name)
                .bind(d)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM model_devices WHERE name = ?")
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    fn user_from_row(r: &sqlx::sqlite::SqliteRow) -> ConsoleUser {
        ConsoleUser {
            name: r.get(0),
            role: r.get(1),
            password_hash: r.get(2),
            disabled: r.get::<i64, _>(3) != 0,
            created_at: r.get(4),
            last_login: r.get(5),
            failures: r.get(6),
            locked_until: r.get(7),
        }
    }

    pub async fn users(&self) -> Result<Vec<ConsoleUser>> {
        let rows = sqlx::query(user_select!(" ORDER BY name"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(Self::user_from_row).collect())
    }

    pub async fn user(&self, name: &str) -> Result<Option<ConsoleUser>> {
        let row = sqlx::query(user_select!(" WHERE name = ?"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(Self::user_from_row))
    }

    pub async fn user_count(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM console_users")
            .fetch_one(&self.pool)
            .await?)
    }

    pub async fn create_user(
        &self,
        name: &str,
        role: &str,
        password_hash: &str,
        now: i64,
    ) -> Result<ConsoleUser> {
        let r = sqlx::query(
            "INSERT INTO console_users (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(name)
        .bind(role)
        .bind(password_hash)
        .bind(now)
        .execute(&self.pool)
        .await;
        match r {
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                return Err(StoreError::UserExists(name.into()))
            }
            r => {
                r?;
            }
        }
        self.user(name)
            .await?
            .ok_or_else(|| StoreError::NoSuchUser(name.into()))
    }

    /// The first user, only while there is none (one transaction: two visitors of the
    /// setup link cannot both become admin).
    pub async fn create_first_user(
        &self,
        name: &str,
        password_hash: &str,
        now: i64,
    ) -> Result<Option<ConsoleUser>> {
        let r = sqlx::query(
            "INSERT INTO console_users (name, role, password_hash, created_at)
             SELECT ?, 'admin', ?, ? WHERE NOT EXISTS (SELECT 1 FROM console_users)",
        )
        .bind(name)
        .bind(password_hash)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Ok(None);
        }
        self.user(name).await
    }

    async fn update_user(
        &self,
        name: &str,
        sql: &'static str,
        bind: Option<&str>,
        now: Option<i64>,
    ) -> Result<()> {
        let mut q = sqlx::query(sql);
        if let Some(b) = bind {
            q = q.bind(b);
        }
        if let Some(n) = now {
            q = q.bind(n);
        }
        let r = q.bind(name).execute(&self.pool).await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NoSuchUser(name.into()));
        }
        Ok(())
    }

    pub async fn set_user_role(&self, name: &str, role: &str) -> Result<()> {
        self.update_user(
            name,
            "UPDATE console_users SET role = ? WHERE name = ?",
            Some(role),
            None,
        )
        .await
    }

    pub async fn set_user_disabled(&self, name: &str, disabled: bool) -> Result<()> {
        let sql = if disabled {
            "UPDATE console_users SET disabled = 1 WHERE name = ?"
        } else {
            "UPDATE console_users SET disabled = 0, failures = 0, locked_until = NULL WHERE name = ?"
        };
        self.update_user(name, sql, None, None).await
    }

    /// A new password hash; clears failures and any lock.
    pub async fn set_user_password(&self, name: &str, password_hash: &str) -> Result<()> {
        self.update_user(
            name,
            "UPDATE console_users SET password_hash = ?, failures = 0, locked_until = NULL WHERE name = ?",
            Some(password_hash),
            None,
        )
        .await
    }

    pub async fn user_logged_in(&self, name: &str, now: i64) -> Result<()> {
        self.update_user(
            name,
            "UPDATE console_users SET last_login = ?, failures = 0, locked_until = NULL WHERE name = ?",
            None,
            Some(now),
        )
        .await
    }

    /// Counts a failed login; at `max` failures in a row the user is locked until
    /// `now + lock_secs`. Returns whether this failure locked the user.
    pub async fn user_login_failed(
        &self,
        name: &str,
        now: i64,
        max: i64,
        lock_secs: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let failures: Option<i64> = sqlx::query_scalar(
            "UPDATE console_users SET failures = failures + 1 WHERE name = ? RETURNING failures",
        )
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let locked = match failures {
            Some(f) if f >= max => {
                sqlx::query(
                    "UPDATE console_users SET locked_until = ?, failures = 0 WHERE name = ?",
                )
                .bind(now + lock_secs)
                .bind(name)
                .execute(&mut *tx)
                .await?;
                true
            }
            _ => false,
        };
        tx.commit().await?;
        Ok(locked)
    }

    /// Adds counts to the hourly usage table (one transaction).
    pub async fn add_usage(&self, rows: &[Usage]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for u in rows {
            sqlx::query(
                "INSERT INTO usage_hourly (hour, tenant, key_id, model, requests, prompt_tokens, completion_tokens)
                 VALUES (?, ?, ?, ?, ?, ?, ?)
                 ON CONFLICT (hour, tenant, key_id, model) DO UPDATE SET
                   requests = requests + excluded.requests,
                   prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                   completion_tokens = completion_tokens + excluded.completion_tokens",
            )
            .bind(u.hour)
            .bind(&u.tenant)
            .bind(&u.key_id)
            .bind(&u.model)
            .bind(u.requests)
            .bind(u.prompt_tokens)
            .bind(u.completion_tokens)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Usage rows from `since_hour` on, oldest first.
    pub async fn usage(&self, since_hour: i64) -> Result<Vec<Usage>> {
        let rows = sqlx::query(
            "SELECT hour, tenant, key_id, model, requests, prompt_tokens, completion_tokens
             FROM usage_hourly WHERE hour >= ? ORDER BY hour, tenant, key_id, model",
        )
        .bind(since_hour)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| Usage {
                hour: r.get(0),
                tenant: r.get(1),
                key_id: r.get(2),
                model: r.get(3),
                requests: r.get(4),
                prompt_tokens: r.get(5),
                completion_tokens: r.get(6),
            })
            .collect())
    }

    /// A consistent copy of the database at `path` (SQLite `VACUUM INTO`), taken while
    /// others keep using it.
    pub async fn snapshot(&self, path: &Path) -> Result<()> {
        sqlx::query("VACUUM INTO ?")
            .bind(path.to_string_lossy().into_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

// sqlx takes `&'static str` queries; these are spelled out once each.
fn const_concat_models_all() -> &'static str {
    "SELECT name, sha256, size, architecture, parameters, quantization, context_length,
            chat_template, license, provenance, signed_by, imported_at
     FROM models ORDER BY name"
}

fn const_concat_model_by_name() -> &'static str {
    "SELECT name, sha256, size, architecture, parameters, quantization, context_length,
            chat_template, license, provenance, signed_by, imported_at
     FROM models WHERE name = ?"
}

fn const_format_key_by_id() -> &'static str {
    "SELECT k.id, k.tenant_id, t.name, k.secret_sha256, k.created_at, k.expires_at,
            k.revoked_at, k.models, k.rpm, k.tpm, k.max_concurrency, k.replaced_by, k.label,
            k.scope
     FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.id = ?"
}

fn const_format_keys_of_tenant() -> &'static str {
    "SELECT k.id, k.tenant_id, t.name, k.secret_sha256, k.created_at, k.expires_at,
            k.revoked_at, k.models, k.rpm, k.tpm, k.max_concurrency, k.replaced_by, k.label,
            k.scope
     FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE t.name = ?
     ORDER BY k.created_at, k.id"
}

fn const_format_all_keys() -> &'static str {
    "SELECT k.id, k.tenant_id, t.name, k.secret_sha256, k.created_at, k.expires_at,
            k.revoked_at, k.models, k.rpm, k.tpm, k.max_concurrency, k.replaced_by, k.label,
            k.scope
     FROM api_keys k JOIN tenants t ON t.id = k.tenant_id
     ORDER BY k.created_at, k.id"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("appliance-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("appliance.db")
    }

    fn new_key(id: &str, tenant: &str) -> NewKey {
        NewKey {
            id: id.into(),
            tenant: tenant.into(),
            secret_sha256: vec![7; 32],
            models: Some(vec!["a".into(), "b".into()]),
            rpm: Some(10),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn tenants_keys_revoke_rotate() {
        let path = tmp("basic");
        let s = Store::open(&path).await.unwrap();
        assert_eq!(s.schema_version().await.unwrap(), 6);
        s.create_tenant("acme", 100).await.unwrap();
        assert!(matches!(
            s.create_tenant("acme", 101).await,
            Err(StoreError::TenantExists(_))
        ));
        assert!(matches!(
            s.insert_key(&new_key("k1", "nobody"), 100).await,
            Err(StoreError::NoSuchTenant(_))
        ));
        let g0 = s.keys_generation().await.unwrap();
        let k = s.insert_key(&new_key("k1", "acme"), 100).await.unwrap();
        assert_eq!(k.tenant, "acme");
        assert_eq!(
            k.models.as_deref(),
            Some(&["a".to_string(), "b".to_string()][..])
        );
        assert_eq!((k.rpm, k.tpm), (Some(10), None));
        assert!(s.keys_generation().await.unwrap() > g0);

        let r = s
            .rotate_key("k1", &new_key("k2", "acme"), 500, 200)
            .await
            .unwrap();
        assert_eq!(r.id, "k2");
        let old = s.key("k1").await.unwrap().unwrap();
        assert_eq!(old.expires_at, Some(500));
        assert_eq!(old.replaced_by.as_deref(), Some("k2"));
        assert_eq!(old.status(499), "active");
        assert_eq!(old.status(500), "expired");

        let rv = s.revoke_key("k2", 300).await.unwrap();
        assert_eq!(rv.status(300), "revoked");
        // Idempotent, and keeps the first revocation time.
        assert_eq!(s.revoke_key("k2", 400).await.unwrap().revoked_at, Some(300));
        assert!(matches!(
            s.revoke_key("nope", 1).await,
            Err(StoreError::NoSuchKey(_))
        ));
        // A key already rotated is not rotated again (its successor would inherit the
        // grace period as its expiry), and nothing changes.
        match s.rotate_key("k1", &new_key("k9", "acme"), 450, 250).await {
            Err(StoreError::KeyReplaced(id, by)) => {
                assert_eq!((id.as_str(), by.as_str()), ("k1", "k2"))
            }
            other => panic!("{other:?}"),
        }
        assert!(s.key("k9").await.unwrap().is_none());
        assert_eq!(s.key("k1").await.unwrap().unwrap().expires_at, Some(500));
        // A revoked key cannot be rotated.
        assert!(s
            .rotate_key("k2", &new_key("k3", "acme"), 1, 1)
            .await
            .is_err());
        assert_eq!(s.keys(Some("acme")).await.unwrap().len(), 2);
        assert!(s.keys(Some("zzz")).await.is_err());
        // Models: unique names, shared files.
        let m = ModelRecord {
            name: "a".into(),
            sha256: "f".repeat(64),
            size: 10,
            architecture: "llama".into(),
            parameters: 5,
            quantization: "Q4_1".into(),
            context_length: 8,
            chat_template: true,
            license: None,
            provenance: "{}".into(),
            signed_by: Some("it".into()),
            imported_at: 1,
        };
        s.insert_model(&m).await.unwrap();
        assert!(matches!(
            s.insert_model(&m).await,
            Err(StoreError::ModelExists(_))
        ));
        s.insert_model(&ModelRecord {
            name: "b".into(),
            ..m.clone()
        })
        .await
        .unwrap();
        assert_eq!(s.model("a").await.unwrap().as_ref(), Some(&m));
        let (gone, shared) = s.remove_model("a").await.unwrap();
        assert_eq!((gone.name.as_str(), shared), ("a", true));
        let (_, shared) = s.remove_model("b").await.unwrap();
        assert!(!shared);
        assert!(matches!(
            s.remove_model("b").await,
            Err(StoreError::NoSuchModel(_))
        ));

        s.close().await;

        // Reopening runs no migration twice and keeps the data.
        let s = Store::open(&path).await.unwrap();
        assert_eq!(s.keys(None).await.unwrap().len(), 2);
    }
}
