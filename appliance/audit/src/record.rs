//! The audit record: what happened, never what was said.
//!
//! A record is stored and hashed as its canonical JSON text: the fields below in this
//! order, absent when unknown (never `null`), no whitespace, `seq` then `time` first. The
//! Merkle leaf is `SHA-256(0x00 || text)`, so a verifier needs nothing but the bytes.

use serde::{Deserialize, Serialize};

/// One audit record. Fields that a caller does not know are `None` / empty; the writer
/// fills `seq`, `time` and `node`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log, from 1; leaf index + 1.
    pub seq: u64,
    /// UTC, RFC 3339 with milliseconds; never decreases along the log.
    pub time: String,
    /// The appliance that wrote it.
    pub node: String,
    /// Actor: the tenant and key of an API request, or the admin user / local operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Where the request came from: an IP address, or `local` for the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What was done: `chat.completions`, `key.create`, `daemon.start`, ...
    pub action: String,
    /// What it was done to: a model, a key id, a tenant, a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Where the request was sent (a local model, an upstream) once routed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
    /// The jurisdiction (country or region) of an upstream destination, from the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jurisdiction: Option<String>,
    /// The policy's decision, the data classes it detected and the policy's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub classes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<String>,
    /// HTTP status of the answer (or the CLI's equivalent), and the error code if any.
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub latency_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Opt-in content evidence (a keyed HMAC or ciphertext); absent by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// A short machine-written detail for admin actions (never client text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Record {
    /// An admin or system action with an outcome.
    pub fn action(action: &str, status: u16) -> Record {
        Record {
            action: action.to_string(),
            status,
            ..Record::default()
        }
    }

    /// The canonical text that is stored and hashed.
    pub fn canonical(&self) -> String {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a stored record (and checks it is in canonical form: re-encoding gives the
    /// same bytes).
    pub fn parse(text: &str) -> Result<Record, String> {
        let r: Record = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if r.canonical() != text {
            return Err("not in canonical form".into());
        }
        Ok(r)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (
        if m <= 2 {
            yoe + era * 400 + 1
        } else {
            yoe + era * 400
        },
        m,
        d,
    )
}

/// Writes `2026-11-22T08:38:42.123Z` for unix milliseconds into `out` (no allocation;
/// years 0–9999).
pub fn write_time(unix_ms: i64, out: &mut [u8; 24]) {
    let days = unix_ms.div_euclid(86_400_000);
    let ms = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let fields: [(i64, usize); 7] = [
        (y.clamp(0, 9999), 4),
        (m as i64, 2),
        (d as i64, 2),
        (ms / 3_600_000, 2),
        (ms / 60_000 % 60, 2),
        (ms / 1000 % 60, 2),
        (ms % 1000, 3),
    ];
    let seps = [b'-', b'-', b'T', b':', b':', b'.', b'Z'];
    let mut at = 0;
    for ((v, width), sep) in fields.into_iter().zip(seps) {
        let mut v = v;
        for i in (0..width).rev() {
            out[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
        at += width;
        out[at] = sep;
        at += 1;
    }
}

/// `2026-11-22T08:38:42.123Z` for unix milliseconds.
pub fn format_time(unix_ms: i64) -> String {
    let days = unix_ms.div_euclid(86_400_000);
    let ms = unix_ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, min, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}.{milli:03}Z")
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS[.mmm]]Z` (UTC) into unix milliseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    let bad = || {
        format!("{s:?} is not a UTC time: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (e.g. 2026-11-22T08:00:00Z)")
    };
    let (date, rest) = match s.split_once('T') {
        Some((d, r)) => (d, Some(r.strip_suffix('Z').ok_or_else(bad)?)),
        None => (s, None),
    };
    let num = |x: &str| x.parse::<u32>().map_err(|_| bad());
    let parts: Vec<&str> = date.split('-').collect();
    if parts.len() != 3 || parts[0].len() != 4 {
        return Err(bad());
    }
    let (y, m, d) = (num(parts[0])? as i64, num(parts[1])?, num(parts[2])?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, m, d) * 86_400_000;
    if let Some(t) = rest {
        let (hms, frac) = t.split_once('.').unwrap_or((t, ""));
        let f: Vec<&str> = hms.split(':').collect();
        if !(2..=3).contains(&f.len()) {
            return Err(bad());
        }
        let (h, mi) = (num(f[0])?, num(f[1])?);
        let sec = if f.len() == 3 { num(f[2])? } else { 0 };
        if h > 23 || mi > 59 || sec > 60 {
            return Err(bad());
        }
        let milli = if frac.is_empty() {
            0
        } else {
            let digits: String = frac.chars().chain("000".chars()).take(3).collect();
            num(&digits)?
        };
        ms += (h as i64 * 3600 + mi as i64 * 60 + sec as i64) * 1000 + milli as i64;
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_text_is_stable_and_starts_with_seq() {
        let mut r = Record::action("key.create", 200);
        r.seq = 42;
        r.time = format_time(1_763_800_722_123);
        r.resource = Some("0123456789abcdef".into());
        let text = r.canonical();
        assert!(text.starts_with("{\"seq\":42,\"time\":\""), "{text}");
        assert!(!text.contains(' '), "{text}");
        assert!(!text.contains("null"), "unknown fields are absent: {text}");
        assert_eq!(Record::parse(&text).unwrap(), r);
        // The same record with fields reordered, spaced or with explicit nulls is not
        // canonical.
        let spaced = text.replace(",\"time\"", ", \"time\"");
        assert!(Record::parse(&spaced).is_err());
        let nulls = text.replace(",\"status\"", ",\"user\":null,\"status\"");
        assert!(Record::parse(&nulls).is_err());
    }

    #[test]
    fn times_round_trip() {
        let mut buf = [0u8; 24];
        for ms in [0i64, 951_782_400_000, 1_763_800_722_123, 4_102_444_799_999] {
            write_time(ms, &mut buf);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), format_time(ms));
        }
        assert_eq!(format_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0i64, 951_782_400_000, 1_763_800_722_123, 4_102_444_799_999] {
            assert_eq!(parse_time(&format_time(ms)).unwrap(), ms);
        }
        assert_eq!(
            parse_time("2026-11-22").unwrap(),
            parse_time("2026-11-22T00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2026-11-22T08:00:00Z").unwrap() - parse_time("2026-11-22").unwrap(),
            8 * 3_600_000
        );
        for bad in [
            "yesterday",
            "2026-13-01",
            "2026-11-22T08:00:00",
            "22-11-2026",
            "2026-11-22T25:00Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }
}
