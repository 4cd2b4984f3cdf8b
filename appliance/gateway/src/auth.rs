//! The daemon's table of API keys: loaded from the store into memory, reloaded when the
//! store's key counter moves (checked on a timer and at once when the CLI says so through
//! the control socket). Authentication is a hash-map lookup by key id and a constant-time
//! comparison of secret hashes; limiter state survives reloads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use appliance_store::{KeyRecord, Store, StoreError};

use crate::error::ApiError;
use crate::keys;
use crate::limits::{Limiter, Limits};

#[derive(Debug)]
pub struct KeyEntry {
    pub id: String,
    pub tenant: String,
    secret_sha256: Vec<u8>,
    expires_at: Option<i64>,
    revoked: bool,
    /// `None`: every model.
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub limiter: Arc<Limiter>,
    /// An admin key: the admin API only.
    pub admin: bool,
}

impl KeyEntry {
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|m| m.iter().any(|x| x == model))
    }
}

pub struct KeyTable {
    store: Store,
    keys: RwLock<Arc<HashMap<String, Arc<KeyEntry>>>>,
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
    generation: Mutex<i64>,
    reload_lock: tokio::sync::Mutex<()>,
    /// Compared against when the key id is unknown, so both paths hash and compare.
    decoy: Vec<u8>,
}

impl KeyTable {
    pub async fn load(store: Store) -> Result<KeyTable, StoreError> {
        let t = KeyTable {
            store,
            keys: RwLock::new(Arc::new(HashMap::new())),
            limiters: Mutex::new(HashMap::new()),
            generation: Mutex::new(i64::MIN),
            reload_lock: tokio::sync::Mutex::new(()),
            decoy: keys::hash_secret(&keys::random_hex::<32>()),
        };
        t.reload().await?;
        Ok(t)
    }

    fn entry(&self, r: KeyRecord) -> KeyEntry {
        let limiter = self
            .limiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(r.id.clone())
            .or_default()
            .clone();
        KeyEntry {
            limits: Limits {
                rpm: r.rpm,
                tpm: r.tpm,
                max_concurrency: r.max_concurrency,
            },
            id: r.id,
            tenant: r.tenant,
            secret_sha256: r.secret_sha256,
            expires_at: r.expires_at,
            revoked: r.revoked_at.is_some(),
            admin: r.scope == "admin",
            models: r.models,
            limiter,
        }
    }

    /// Reloads every key from the store.
    pub async fn reload(&self) -> Result<usize, StoreError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let generation = self.store.keys_generation().await?;
        let records = self.store.keys(None).await?;
        let map: HashMap<_, _> = records
            .into_iter()
            .map(|r| (r.id.clone(), Arc::new(self.entry(r))))
            .collect();
        let n = map.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(map);
        *self.generation.lock().unwrap_or_else(|p| p.into_inner()) = generation;
        Ok(n)
    }

    /// Reloads if the store's key counter moved since the last load.
    pub async fn reload_if_changed(&self) -> Result<bool, StoreError> {
        let now = self.store.keys_generation().await?;
        if now == *self.generation.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(false);
        }
        self.reload().await?;
        Ok(true)
    }

    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks an `Authorization` header value at unix time `now`.
    pub fn authenticate(&self, header: Option<&[u8]>, now: i64) -> Result<Arc<KeyEntry>, ApiError> {
        let header = header.ok_or(ApiError::MissingKey)?;
        let text = std::str::from_utf8(header).map_err(|_| ApiError::InvalidKey)?;
        let (scheme, token) = text.trim().split_once(' ').ok_or(ApiError::InvalidKey)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::InvalidKey);
        }
        let (id, secret) = keys::parse(token.trim()).ok_or(ApiError::InvalidKey)?;
        let presented = keys::hash_secret(secret);
        let table = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let entry = table.get(id);
        let stored = entry
            .map(|e| e.secret_sha256.as_slice())
            .unwrap_or(&self.decoy);
        let matches = keys::hashes_equal(&presented, stored);
        let entry = match entry {
            Some(e) if matches => e,
            _ => return Err(ApiError::InvalidKey),
        };
        // Only a holder of the secret learns that the key is revoked or expired.
        if entry.revoked {
            return Err(ApiError::RevokedKey);
        }
        if entry.expires_at.is_some_and(|e| e <= now) {
            return Err(ApiError::ExpiredKey);
        }
        Ok(entry.clone())
    }
}
