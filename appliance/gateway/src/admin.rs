//! The admin API's link to the daemon: the gateway authenticates and routes
//! `/admin/v1/...`; what loading or unloading a model means is the daemon's business, behind
//! [`AdminOps`].

use std::future::Future;
use std::pin::Pin;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminError {
    NotFound(String),
    Conflict(String),
    Failed(String),
}

pub type AdminFuture = Pin<Box<dyn Future<Output = Result<String, AdminError>> + Send>>;

/// Model set changes the daemon carries out for the admin API.
pub trait AdminOps: Send + Sync {
    fn load(&self, model: String) -> AdminFuture;
    fn unload(&self, model: String) -> AdminFuture;
}
