//! API key material: generation, parsing and hashing.
//!
//! A key reads `sk-appl-<id>_<secret>`: `id` is 16 hex digits (64 random bits, public,
//! shown in listings and logs), `secret` 64 hex digits (256 bits from the OS CSPRNG).
//! Only SHA-256(secret) is stored; a 256-bit random secret needs no slow hash. Hashes
//! are compared in constant time.

use ring::rand::{SecureRandom, SystemRandom};

pub const PREFIX: &str = "sk-appl-";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 64;

/// A freshly made key: the text to show once, its id, and the hash to store.
#[derive(Debug)]
pub struct NewSecret {
    pub text: String,
    pub id: String,
    pub sha256: Vec<u8>,
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(H[(b >> 4) as usize] as char);
        s.push(H[(b & 15) as usize] as char);
    }
    s
}

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the operating system's random number generator failed");
    b
}

pub fn random_hex<const N: usize>() -> String {
    hex(&random_bytes::<N>())
}

pub fn generate() -> NewSecret {
    let id = hex(&random_bytes::<8>());
    let secret = hex(&random_bytes::<32>());
    NewSecret {
        text: format!("{PREFIX}{id}_{secret}"),
        sha256: hash_secret(&secret),
        id,
    }
}

pub fn hash_secret(secret: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, secret.as_bytes())
        .as_ref()
        .to_vec()
}

/// Splits a presented key into (id, secret) if it has the right shape.
pub fn parse(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let is_hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (id.len() == ID_HEX && secret.len() == SECRET_HEX && is_hex(id) && is_hex(secret))
        .then_some((id, secret))
}

/// Whether an id has the shape of a key id (for CLI arguments).
pub fn is_key_id(id: &str) -> bool {
    id.len() == ID_HEX
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Constant-time equality of two hashes.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let k = generate();
        let (id, secret) = parse(&k.text).unwrap();
        assert_eq!(id, k.id);
        assert!(hashes_equal(&hash_secret(secret), &k.sha256));
        let other = generate();
        assert_ne!(other.text, k.text);
        assert!(!hashes_equal(&hash_secret(secret), &other.sha256));
        assert!(is_key_id(&k.id));
    }

    #[test]
    fn malformed_keys_are_refused() {
        let k = generate().text;
        for bad in [
            "",
            "sk-appl-",
            &k[1..],
            &k[..k.len() - 1],
            &k.replace('_', "-"),
            &k.to_uppercase(),
            &format!("{k}0"),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
