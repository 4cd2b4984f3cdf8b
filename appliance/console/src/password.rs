//! Console passwords: Argon2id (m = 19456 KiB, t = 2, p = 1, the OWASP minimum) in PHC
//! string form, a length and common-password policy, and verification that costs the
//! same whether or not the user exists.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

pub const MIN_LENGTH: usize = 12;
pub const MAX_LENGTH: usize = 256;

fn argon2() -> Argon2<'static> {
    // The parameters are constants within Argon2's bounds.
    let params = Params::new(19_456, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// A new hash with a fresh 16-byte salt.
pub fn hash(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no randomness".to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches `stored`. With no stored hash (unknown user) a dummy
/// hash is checked, so the answer takes as long.
pub fn verify(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| hash("not a password of anyone").unwrap_or_default());
    let (text, real) = match stored {
        Some(s) => (s, true),
        None => (DUMMY.as_str(), false),
    };
    let Ok(parsed) = PasswordHash::new(text) else {
        return false;
    };
    argon2()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
        && real
}

/// Passwords seen most often in breaches (lower case): refused whatever their length.
const COMMON: &[&str] = &[
    "123456789012",
    "1234567890123",
    "12345678901234",
    "123123123123",
    "111111111111",
    "000000000000",
    "password1234",
    "password12345",
    "password123!",
    "passwordpassword",
    "qwertyuiopas",
    "qwertyuiop12",
    "qwerty123456",
    "qwertyqwerty",
    "1q2w3e4r5t6y",
    "1qaz2wsx3edc",
    "zaq12wsxcde3",
    "iloveyou1234",
    "letmein12345",
    "welcome12345",
    "welcome123456",
    "administrator",
    "administrator1",
    "adminadmin12",
    "admin1234567",
    "changeme1234",
    "changemenow!",
    "trustno1trustno1",
    "abcdefghijkl",
    "abcd1234abcd",
    "abc123abc123",
    "monkey123456",
    "dragon123456",
    "football1234",
    "baseball1234",
    "sunshine1234",
    "princess1234",
    "superman1234",
    "starwars1234",
    "whatever1234",
    "passw0rd1234",
    "p@ssw0rd1234",
    "p@ssword1234",
    "summer2024!!",
    "winter2024!!",
    "spring2025!!",
    "autumn2025!!",
    "hospital1234",
    "appliance123",
    "appliance1234",
    "correcthorsebatterystaple",
    "liverpool1234",
    "chelsea12345",
    "arsenal12345",
    "michael12345",
    "jennifer1234",
    "charlie12345",
    "computer1234",
    "internet1234",
    "mustang12345",
    "shadow123456",
    "master123456",
    "jordan231234",
    "hunter123456",
    "freedom12345",
    "secret123456",
    "qazwsxedcrfv",
    "asdfghjkl123",
    "zxcvbnm12345",
    "1234qwerasdf",
    "q1w2e3r4t5y6",
    "a1b2c3d4e5f6",
    "987654321098",
    "password2024",
    "password2025",
    "password2026",
    "welcome2024!",
    "welcome2025!",
    "welcome2026!",
];

/// Why `password` may not be used by `user`, if it may not.
pub fn weakness(user: &str, password: &str) -> Option<String> {
    let n = password.chars().count();
    if n < MIN_LENGTH {
        return Some(format!(
            "The password must be at least {MIN_LENGTH} characters long."
        ));
    }
    if n > MAX_LENGTH {
        return Some(format!(
            "The password may be at most {MAX_LENGTH} characters long."
        ));
    }
    let lower = password.to_lowercase();
    if COMMON.contains(&lower.as_str()) {
        return Some("That password is one of the most common ones; choose another.".into());
    }
    let distinct: std::collections::BTreeSet<char> = lower.chars().collect();
    if distinct.len() < 4 {
        return Some("The password repeats too few characters.".into());
    }
    // Runs such as "abcdefghijkl" or "123456789012".
    let bytes = lower.as_bytes();
    let stepping = bytes
        .windows(2)
        .filter(|w| w[1] as i16 - w[0] as i16 == 1 || w[0] as i16 - w[1] as i16 == 1)
        .count();
    if stepping + 1 >= bytes.len() {
        return Some("The password is a simple sequence.".into());
    }
    if !user.is_empty() && lower.contains(&user.to_lowercase()) {
        return Some("The password may not contain the user name.".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_with_the_owasp_parameters_and_verify() {
        let h = hash("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify("correct horse battery", Some(&h)));
        assert!(!verify("correct horse batterY", Some(&h)));
        assert!(!verify("correct horse battery", None));
        assert!(!verify("x", Some("not a hash")));
        assert_ne!(h, hash("correct horse battery").unwrap(), "salted");
    }

    #[test]
    fn weak_passwords_are_named() {
        assert!(weakness("ann", "short").unwrap().contains("at least 12"));
        assert!(weakness("ann", "Password1234").unwrap().contains("common"));
        assert!(weakness("ann", "aaaaaaaaaaaaaa")
            .unwrap()
            .contains("too few"));
        assert!(weakness("ann", "abcdefghijklmn")
            .unwrap()
            .contains("sequence"));
        assert!(weakness("annabel", "my-Annabel-2026-x")
            .unwrap()
            .contains("user name"));
        assert_eq!(weakness("ann", "tulip-gravel-41-orbit"), None);
    }
}
