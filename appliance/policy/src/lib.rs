//! Sovereignty policy. Today: the built-in detectors of sensitive data ([`detect`]).
//! Still to come (issue 6): policy documents, rules, destinations, routing decisions.

pub mod detect;

#[cfg(test)]
mod tests;
