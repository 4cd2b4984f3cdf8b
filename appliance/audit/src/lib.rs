//! The audit log's tamper evidence. Today: the Merkle tree of RFC 6962 / RFC 9162 §2.1 —
//! leaf and node hashes with domain separation, tree heads, inclusion and consistency
//! proofs and their verification. Pure functions over hashes; no storage, no HTTP.
//!
//! Still to come (issue 5): the record schema, durable appends with group commit, signed
//! checkpoints in the C2SP note format, `appliance audit verify|export|verify-export`.

pub mod merkle;
