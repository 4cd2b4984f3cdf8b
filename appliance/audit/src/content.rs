//! Sealed content evidence: a request's texts encrypted to an auditor's X25519 public
//! key, so that the appliance can write them but never read them back.
//!
//! A sealed value is `x25519-aes256gcm:` followed by base64 of the sender's one-time
//! public key (32 bytes) and the AES-256-GCM ciphertext with its tag. The key is
//! HKDF-SHA-256 of the X25519 shared secret, salted with both public keys; the nonce is
//! zero (every key is used once); the request id is the associated data, so a sealed
//! value moved to another record does not open. The plaintext is a JSON array of the
//! request's texts.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use x25519_dalek::{PublicKey, StaticSecret};

/// The prefix of a sealed value.
pub const SEALED: &str = "x25519-aes256gcm:";
const PUBLIC: &str = "x25519:";
const SECRET: &str = "x25519-secret:";
const INFO: &[u8] = b"appliance audit content v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContentError {
    #[error("not an {0} key: expected {1} and 64 hex digits")]
    BadKey(&'static str, &'static str),
    #[error("not a sealed value (expected {SEALED} and base64)")]
    NotSealed,
    #[error("does not open with this key (another recipient, another record, or altered)")]
    DoesNotOpen,
    #[error("the system random source failed")]
    Random,
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let t = text.trim().as_bytes();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in t.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses an auditor's public key: `x25519:` and 64 hex digits (the prefix may be left
/// out).
pub fn parse_recipient(text: &str) -> Result<[u8; 32], ContentError> {
    let t = text.trim();
    hex32(t.strip_prefix(PUBLIC).unwrap_or(t)).ok_or(ContentError::BadKey("X25519 public", PUBLIC))
}

/// An auditor's private key, as kept in its file (`x25519-secret:` and 64 hex digits).
pub struct Opener(StaticSecret);

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opener(..)")
    }
}

impl Opener {
    /// A new random key.
    pub fn generate() -> Result<Self, ContentError> {
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| ContentError::Random)?;
        Ok(Opener(StaticSecret::from(raw)))
    }

    pub fn parse(text: &str) -> Result<Self, ContentError> {
        let raw = text
            .trim()
            .strip_prefix(SECRET)
            .and_then(hex32)
            .ok_or(ContentError::BadKey("X25519 private", SECRET))?;
        Ok(Opener(StaticSecret::from(raw)))
    }

    /// The key's file text (a secret: keep it off the appliance).
    pub fn secret_text(&self) -> String {
        format!("{SECRET}{}", hex(self.0.as_bytes()))
    }

    /// The public key for the policy's `content_recipient`.
    pub fn recipient_text(&self) -> String {
        format!("{PUBLIC}{}", hex(PublicKey::from(&self.0).as_bytes()))
    }

    /// The texts sealed in `value` for the record of `request_id`.
    pub fn open(&self, value: &str, request_id: &str) -> Result<Vec<String>, ContentError> {
        let raw = value
            .strip_prefix(SEALED)
            .and_then(|b| B64.decode(b).ok())
            .ok_or(ContentError::NotSealed)?;
        if raw.len() < 32 + aead::AES_256_GCM.tag_len() {
            return Err(ContentError::NotSealed);
        }
        let (sender, sealed) = raw.split_at(32);
        let sender: [u8; 32] = sender.try_into().map_err(|_| ContentError::NotSealed)?;
        let ours = PublicKey::from(&self.0);
        let shared = self.0.diffie_hellman(&PublicKey::from(sender));
        if !shared.was_contributory() {
            return Err(ContentError::DoesNotOpen);
        }
        let key = derive(shared.as_bytes(), &sender, ours.as_bytes());
        let mut buf = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::from(request_id.as_bytes()),
                &mut buf,
            )
            .map_err(|_| ContentError::DoesNotOpen)?;
        serde_json::from_slice(plain).map_err(|_| ContentError::DoesNotOpen)
    }
}

fn derive(shared: &[u8; 32], sender: &[u8; 32], recipient: &[u8; 32]) -> LessSafeKey {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(sender);
    salt[32..].copy_from_slice(recipient);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &salt).extract(shared);
    let mut key = [0u8; 32];
    prk.expand(&[INFO], &aead::AES_256_GCM)
        .and_then(|okm| okm.fill(&mut key))
        .expect("32 bytes is a valid HKDF-SHA-256 output length");
    LessSafeKey::new(UnboundKey::new(&aead::AES_256_GCM, &key).expect("a 32-byte key"))
}

/// Seals `texts` for `recipient`, bound to `request_id`.
pub fn seal(
    recipient: &[u8; 32],
    request_id: &str,
    texts: &[&str],
) -> Result<String, ContentError> {
    let mut raw = [0u8; 32];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| ContentError::Random)?;
    let once = StaticSecret::from(raw);
    let sender = PublicKey::from(&once);
    let shared = once.diffie_hellman(&PublicKey::from(*recipient));
    if !shared.was_contributory() {
        return Err(ContentError::BadKey("X25519 public", PUBLIC));
    }
    let key = derive(shared.as_bytes(), sender.as_bytes(), recipient);
    let mut buf = serde_json::to_vec(texts).expect("strings serialise");
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([0; 12]),
        Aad::from(request_id.as_bytes()),
        &mut buf,
    )
    .map_err(|_| ContentError::Random)?;
    let mut out = Vec::with_capacity(32 + buf.len());
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&buf);
    Ok(format!("{SEALED}{}", B64.encode(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_texts_open_only_with_the_key_and_the_record() {
        let auditor = Opener::generate().unwrap();
        let recipient = parse_recipient(&auditor.recipient_text()).unwrap();
        let texts = ["Patient MRN 1234567", "second message"];
        let sealed = seal(&recipient, "req-1", &texts).unwrap();
        assert!(sealed.starts_with(SEALED));
        assert!(!sealed.contains("Patient"));
        assert_eq!(auditor.open(&sealed, "req-1").unwrap(), texts);
        // Each seal uses a fresh key: the same texts never give the same value.
        assert_ne!(sealed, seal(&recipient, "req-1", &texts).unwrap());
        // Another record's id, another auditor, or one flipped bit: nothing opens.
        assert_eq!(
            auditor.open(&sealed, "req-2"),
            Err(ContentError::DoesNotOpen)
        );
        let other = Opener::generate().unwrap();
        assert_eq!(other.open(&sealed, "req-1"), Err(ContentError::DoesNotOpen));
        let mut raw = B64.decode(&sealed[SEALED.len()..]).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        let flipped = format!("{SEALED}{}", B64.encode(raw));
        assert_eq!(
            auditor.open(&flipped, "req-1"),
            Err(ContentError::DoesNotOpen)
        );
        assert_eq!(
            auditor.open("hmac-sha256:00", "req-1"),
            Err(ContentError::NotSealed)
        );
    }

    #[test]
    fn keys_round_trip_through_their_text_and_bad_keys_are_named() {
        let k = Opener::generate().unwrap();
        let again = Opener::parse(&k.secret_text()).unwrap();
        assert_eq!(again.recipient_text(), k.recipient_text());
        let bare = k.recipient_text()[PUBLIC.len()..].to_string();
        assert_eq!(parse_recipient(&bare), parse_recipient(&k.recipient_text()));
        assert!(parse_recipient("x25519:abcd").is_err());
        assert!(Opener::parse(&k.recipient_text()).is_err());
        // A low-order point as the recipient is refused rather than sealing to nobody.
        assert!(seal(&[0u8; 32], "r", &["x"]).is_err());
    }
}
