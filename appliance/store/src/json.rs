//! JSON string escaping for the hot paths that write JSON by hand (the audit index's
//! rows here, the gateway's upstream bodies): byte for byte what `serde_json` writes,
//! with runs of eight bytes that need no escape passed over at once.

/// The escape of each control character, as `serde_json` writes it.
const CONTROL: [&str; 32] = [
    "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007", "\\b",
    "\\t", "\\n", "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010", "\\u0011", "\\u0012",
    "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017", "\\u0018", "\\u0019", "\\u001a",
    "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
];

/// Calls `f` with the pieces of `s` as a JSON string's contents, in order: runs of `s`
/// itself and escapes (`\"`, `\\`, `\b \t \n \f \r`, `\u00xx` for the other control
/// characters; nothing else is escaped).
fn pieces<'a>(s: &'a str, mut f: impl FnMut(&'a str)) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // The high bit of each byte of `w` that is a control character, `"` or `\` (and
    // possibly of bytes above the lowest such one: only the lowest is used).
    fn special(w: u64) -> u64 {
        let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
        (w.wrapping_sub(ONES * 0x20) & !w & HIGH)
            | zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
    }
    let b = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if i + 8 <= b.len() {
            let w = u64::from_le_bytes(b[i..i + 8].try_into().expect("eight bytes"));
            let m = special(w);
            if m == 0 {
                i += 8;
                continue;
            }
            i += (m.trailing_zeros() / 8) as usize;
        }
        let esc = match b[i] {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            c @ 0..0x20 => CONTROL[usize::from(c)],
            _ => {
                i += 1;
                continue;
            }
        };
        // `i` is at an ASCII byte: a character boundary.
        f(&s[start..i]);
        f(esc);
        i += 1;
        start = i;
    }
    f(&s[start..]);
}

/// Appends `s` to `out` as a JSON string (quoted).
pub fn push_string(out: &mut String, s: &str) {
    out.push('"');
    pieces(s, |p| out.push_str(p));
    out.push('"');
}

/// Appends `s` to `out` as a JSON string (quoted).
pub fn push_string_bytes(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    pieces(s, |p| out.extend_from_slice(p.as_bytes()));
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut texts: Vec<String> = vec![
            String::new(),
            "plain ascii text of some length, more than eight bytes".into(),
            "«EMAIL_1» \"q\" \\ path\n\r\t\u{8}\u{c}\u{7f} é 漢字 🙂".into(),
            (0u8..0x80).map(char::from).collect(),
        ];
        // Every special byte at every offset of a 17-byte run (chunk edges included).
        for c in ['"', '\\', '\n', '\u{1}', '\u{1f}', ' ', 'é'] {
            for at in 0..17 {
                let mut t: Vec<char> = "abcdefghijklmnopq".chars().collect();
                t[at] = c;
                texts.push(t.into_iter().collect());
            }
        }
        for t in &texts {
            let want = serde_json::to_string(t).unwrap();
            let mut s = String::from("x");
            push_string(&mut s, t);
            assert_eq!(s[1..], want);
            let mut v = b"x".to_vec();
            push_string_bytes(&mut v, t);
            assert_eq!(v[1..], *want.as_bytes());
        }
    }
}
