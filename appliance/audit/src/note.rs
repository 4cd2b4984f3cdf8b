//! Signed checkpoints in the C2SP formats: `tlog-checkpoint` bodies inside `signed-note`
//! envelopes with Ed25519 signatures, so standard transparency-log tooling can read them.
//!
//! ```text
//! appliance.audit/node-3f9c0a1b          origin
//! 1234                                   tree size
//! 2h3Y…=                                 root hash, base64
//! time 2026-11-22T08:38:42.123Z          extension line: when it was signed
//!
//! — appliance.audit/node-3f9c0a1b q1Jx…  key hash (4 bytes) ‖ signature, base64
//! ```
//!
//! Keys use the signed-note text forms: the verifier key `name+hash+base64(0x01‖pub)`
//! and the signer key `PRIVATE+KEY+name+hash+base64(0x01‖seed)`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use crate::merkle::Hash;
use crate::record::{format_time, parse_time};

const ALG_ED25519: u8 = 0x01;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    Key(String),
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("no signature by {0} on the note")]
    Unsigned(String),
    #[error("the signature by {0} does not verify: the note was altered or signed by another key")]
    BadSignature(String),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(String),
}

fn key_hash(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[ALG_ED25519]);
    ctx.update(public);
    let d = ctx.finish();
    let mut h = [0u8; 4];
    h.copy_from_slice(&d.as_ref()[..4]);
    h
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('+')
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn hex4(h: &[u8; 4]) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checkpoint signing key.
pub struct Signer {
    name: String,
    hash: [u8; 4],
    seed: [u8; 32],
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({})", self.name)
    }
}

impl Signer {
    /// A fresh key named `name` (the log's origin).
    pub fn generate(name: &str) -> Result<Signer, NoteError> {
        let mut seed = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
            .map_err(|_| NoteError::Key("the system random source failed".into()))?;
        Signer::from_seed(name, seed)
    }

    fn from_seed(name: &str, seed: [u8; 32]) -> Result<Signer, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(format!("invalid key name {name:?}")));
        }
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|_| NoteError::Key("bad Ed25519 seed".into()))?;
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Ok(Signer {
            name: name.to_string(),
            hash: key_hash(name, &public),
            seed,
            pair,
        })
    }

    /// `PRIVATE+KEY+name+hash+base64(0x01‖seed)`.
    pub fn to_text(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(&self.seed);
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex4(&self.hash),
            B64.encode(raw)
        )
    }

    pub fn from_text(text: &str) -> Result<Signer, NoteError> {
        let text = text.trim();
        let rest = text
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| NoteError::Key("a signer key starts with PRIVATE+KEY+".into()))?;
        // Names hold no '+'; base64 may.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(hash), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::Key("expected PRIVATE+KEY+name+hash+key".into()));
        };
        let raw = B64
            .decode(b64)
            .map_err(|e| NoteError::Key(format!("key is not base64: {e}")))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::Key("not an Ed25519 signer key".into()));
        }
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&raw[1..]);
        let s = Signer::from_seed(name, seed)?;
        if hex4(&s.hash) != hash {
            return Err(NoteError::Key("the key hash does not match the key".into()));
        }
        Ok(s)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> VerifierKey {
        let mut public = [0u8; 32];
        public.copy_from_slice(self.pair.public_key().as_ref());
        VerifierKey {
            name: self.name.clone(),
            hash: self.hash,
            public,
        }
    }

    /// The signed note: `body` (which must end in a newline), a blank line, a signature.
    pub fn sign(&self, body: &str) -> String {
        debug_assert!(body.ends_with('\n'));
        let sig = self.pair.sign(body.as_bytes());
        let mut raw = self.hash.to_vec();
        raw.extend_from_slice(sig.as_ref());
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(raw))
    }
}

/// A public key that checks notes: `name+hash+base64(0x01‖public key)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierKey {
    pub name: String,
    hash: [u8; 4],
    public: [u8; 32],
}

impl std::fmt::Display for VerifierKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(&self.public);
        write!(f, "{}+{}+{}", self.name, hex4(&self.hash), B64.encode(raw))
    }
}

impl VerifierKey {
    pub fn parse(text: &str) -> Result<VerifierKey, NoteError> {
        let text = text.trim();
        let mut parts = text.splitn(3, '+');
        let (Some(name), Some(hash), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::Key(
                "expected name+hash+key (the text of an audit public key)".into(),
            ));
        };
        if !valid_name(name) {
            return Err(NoteError::Key(format!("invalid key name {name:?}")));
        }
        let raw = B64
            .decode(b64)
            .map_err(|e| NoteError::Key(format!("key is not base64: {e}")))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::Key("not an Ed25519 public key".into()));
        }
        let mut public = [0u8; 32];
        public.copy_from_slice(&raw[1..]);
        let k = VerifierKey {
            name: name.to_string(),
            hash: key_hash(name, &public),
            public,
        };
        if hex4(&k.hash) != hash {
            return Err(NoteError::Key("the key hash does not match the key".into()));
        }
        Ok(k)
    }

    /// Checks a signed note and returns its body.
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
        let body = &note[..split + 1];
        let sigs = &note[split + 2..];
        if !note.ends_with('\n') {
            return Err(NoteError::Malformed("does not end in a newline".into()));
        }
        let mut found = false;
        for line in sigs.lines() {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            let (name, b64) = rest
                .rsplit_once(' ')
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            if name != self.name {
                continue;
            }
            let raw = B64
                .decode(b64)
                .map_err(|_| NoteError::Malformed("signature is not base64".into()))?;
            if raw.len() != 68 || raw[..4] != self.hash {
                continue;
            }
            found = true;
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(body.as_bytes(), &raw[4..])
                .map_err(|_| NoteError::BadSignature(self.name.clone()))?;
        }
        if found {
            Ok(body)
        } else {
            Err(NoteError::Unsigned(self.name.clone()))
        }
    }
}

/// A tree head: the log `origin` had `size` records with root `root` at `time_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub time_ms: i64,
}

impl Checkpoint {
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\ntime {}\n",
            self.origin,
            self.size,
            B64.encode(self.root),
            format_time(self.time_ms)
        )
    }

    pub fn parse_body(body: &str) -> Result<Checkpoint, NoteError> {
        let bad = |m: &str| NoteError::Checkpoint(m.to_string());
        let mut lines = body.lines();
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad("no origin line"))?;
        let size = lines
            .next()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or_else(|| bad("the second line is not a tree size"))?;
        let root_raw = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .filter(|r| r.len() == 32)
            .ok_or_else(|| bad("the third line is not a base64 SHA-256 root"))?;
        let mut root = [0u8; 32];
        root.copy_from_slice(&root_raw);
        let mut time_ms = 0;
        for l in lines {
            if let Some(t) = l.strip_prefix("time ") {
                time_ms = parse_time(t).map_err(|e| NoteError::Checkpoint(e.to_string()))?;
            }
        }
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
            time_ms,
        })
    }

    /// Opens a signed checkpoint note with `key` and checks its origin is the key's name.
    pub fn open(note: &str, key: &VerifierKey) -> Result<Checkpoint, NoteError> {
        let c = Checkpoint::parse_body(key.open(note)?)?;
        if c.origin != key.name {
            return Err(NoteError::Checkpoint(format!(
                "origin {:?} is not the key's log {:?}",
                c.origin, key.name
            )));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_open_and_reject_alterations() {
        let s = Signer::generate("appliance.audit/node-1").unwrap();
        let round = Signer::from_text(&s.to_text()).unwrap();
        assert_eq!(round.verifier(), s.verifier());
        let vk = VerifierKey::parse(&s.verifier().to_string()).unwrap();
        let c = Checkpoint {
            origin: s.name().into(),
            size: 1234,
            root: [7u8; 32],
            time_ms: 1_763_800_722_123,
        };
        let note = s.sign(&c.body());
        assert!(
            note.contains("\n\n\u{2014} appliance.audit/node-1 "),
            "{note}"
        );
        assert_eq!(Checkpoint::open(&note, &vk).unwrap(), c);
        // Any change to the body breaks the signature.
        let altered = note.replacen("1234", "1235", 1);
        assert_eq!(
            Checkpoint::open(&altered, &vk),
            Err(NoteError::BadSignature("appliance.audit/node-1".into()))
        );
        // Another key (same name) does not open it.
        let other = Signer::generate("appliance.audit/node-1")
            .unwrap()
            .verifier();
        assert!(matches!(
            Checkpoint::open(&note, &other),
            Err(NoteError::Unsigned(_))
        ));
        // Tampered key text is refused.
        let text = vk.to_string();
        assert!(VerifierKey::parse(&text.replacen("+", "x+", 1)).is_err());
        assert!(VerifierKey::parse("not a key").is_err());
    }

    /// The key hash and signature layout of the signed-note format: the 4-byte key hash is
    /// SHA-256(name ‖ "\n" ‖ 0x01 ‖ public key)[..4], and Ed25519 is deterministic, so a
    /// fixed seed gives a fixed signature that a second implementation can check.
    #[test]
    fn known_answer_for_a_fixed_seed() {
        let s = Signer::from_seed("example.com/log", [1u8; 32]).unwrap();
        let vk = s.verifier();
        let mut pk = [0u8; 32];
        pk.copy_from_slice(&vk.public);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"example.com/log\n\x01");
        ctx.update(&pk);
        assert_eq!(&ctx.finish().as_ref()[..4], &vk.hash);
        let note = s.sign("example.com/log\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n");
        assert_eq!(
            note,
            s.sign("example.com/log\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n")
        );
        assert!(vk.open(&note).is_ok());
    }
}
