//! The audit log: a tamper-evident, content-free record of every request and admin action.
//!
//! - [`record`]: the record and its canonical text (the Merkle leaf is its hash);
//! - [`merkle`]: RFC 6962 / RFC 9162 §2.1 tree hashes, inclusion and consistency proofs;
//! - [`note`]: signed checkpoints (C2SP tlog-checkpoint in a signed-note, Ed25519);
//! - [`writer`]: the one writer task, durable group commit, intents, checkpoints, pruning;
//! - [`journal`]: where a commit becomes durable (a preallocated file, one `fdatasync`),
//!   and the indexer that moves committed batches into the store behind it;
//! - [`verify`]: offline verification of the stored log and of export files.
//!
//! No SQL and no HTTP here: the store implements [`writer::LogBackend`] (behind the
//! [`journal::JournalBackend`]), the gateway and
//! the command line record through [`writer::Auditor`].

pub mod content;
pub mod journal;
pub mod merkle;
pub mod note;
pub mod record;
pub mod verify;
pub mod writer;

pub use note::{Checkpoint, NoteError, Signer, VerifierKey};
pub use record::Record;
pub use writer::{AuditError, Auditor, Ticket};
