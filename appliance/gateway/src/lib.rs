//! The API listener: HTTPS (rustls, HTTP/1.1 and HTTP/2), authentication, per-key limits,
//! routing of OpenAI-compatible requests to the model workers, metrics, and drain.
//!
//! It runs the stages of a request in order and maps every failure to HTTP in one place
//! (`error.rs`). It knows nothing of SQL (the store does), of processes (the supervisor
//! does) or of inference (the workers do). It never logs or stores request content.

pub mod admin;
pub mod auth;
mod conn;
pub mod error;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod openai;
mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;

pub use server::{Gateway, GatewayConfig, Instance, ModelRoute};
