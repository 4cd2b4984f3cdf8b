//! Built-in detectors of sensitive data, with validation (check digits, ranges, context),
//! not just patterns. Each scans text once and reports byte spans.
//!
//! Numbers are found as *numeric runs*: digit groups joined by single separators
//! (space, `-`, `.`, `/`), starting and ending at a word boundary. Each numeric detector
//! then decides whether a run is one of its numbers (a card number must pass Luhn, an NHS
//! number mod-11, ...), so a near-miss with a wrong check digit is not reported.

/// One finding: which detector, where (byte offsets into the scanned text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub detector: &'static str,
    pub start: usize,
    pub end: usize,
}

/// The built-in detectors and the data class each reports by default.
pub const BUILT_IN: &[(&str, &str)] = &[
    ("card", "PCI"),
    ("iban", "PII"),
    ("email", "PII"),
    ("phone", "PII"),
    ("ip", "PII"),
    ("us_ssn", "PII"),
    ("nhs_number", "PHI"),
    ("bsn", "PII"),
    ("de_tax_id", "PII"),
    ("fr_nir", "PII"),
    ("dob", "PHI"),
    ("icd10", "PHI"),
];

/// A vector of at most 48 small values, kept inline (a run is built for every number in
/// a text: no allocation per number).
#[derive(Debug, Clone, Copy)]
struct Small<T: Copy + Default> {
    len: usize,
    items: [T; 48],
}

impl<T: Copy + Default> Small<T> {
    fn new() -> Self {
        Small {
            len: 0,
            items: [T::default(); 48],
        }
    }

    fn push(&mut self, v: T) {
        if self.len < 48 {
            self.items[self.len] = v;
            self.len += 1;
        }
    }
}

impl<T: Copy + Default> std::ops::Deref for Small<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items[..self.len]
    }
}

impl<T: Copy + Default + PartialEq, const M: usize> PartialEq<[T; M]> for Small<T> {
    fn eq(&self, other: &[T; M]) -> bool {
        **self == other[..]
    }
}

/// A run of digit groups and where it is.
#[derive(Debug)]
struct Run {
    start: usize,
    end: usize,
    digits: Small<u8>,
    /// The separators between groups, in order (b' ', b'-', b'.', b'/').
    seps: Small<u8>,
    /// Digits per group.
    groups: Small<usize>,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The first ASCII digit of `text` at or after `from` (`text.len()` if none). Eight
/// bytes at a time: prose has few digits, and every number detector starts at one.
fn next_digit(text: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut i = from;
    while i + 8 <= text.len() {
        let w = u64::from_le_bytes(text[i..i + 8].try_into().unwrap_or_default());
        // XOR with '0' maps exactly the bytes '0'..='9' below 10; "any byte below 10".
        let x = w ^ (ONES * 0x30);
        if x.wrapping_sub(ONES * 10) & !x & HIGH != 0 {
            break;
        }
        i += 8;
    }
    while i < text.len() && !text[i].is_ascii_digit() {
        i += 1;
    }
    i
}

/// Every numeric run of `text`.
fn runs(text: &[u8]) -> Vec<Run> {
    let mut out = vec![];
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            i = next_digit(text, i);
            continue;
        }
        if i > 0 && is_word(text[i - 1]) {
            i += 1;
            continue;
        }
        let start = i;
        let mut run = Run {
            start,
            end: start,
            digits: Small::new(),
            seps: Small::new(),
            groups: Small::new(),
        };
        let mut group = 0;
        loop {
            while i < text.len() && text[i].is_ascii_digit() {
                run.digits.push(text[i] - b'0');
                group += 1;
                i += 1;
            }
            run.groups.push(group);
            group = 0;
            run.end = i;
            // A single separator followed by a digit continues the run.
            if i + 1 < text.len()
                && matches!(text[i], b' ' | b'-' | b'.' | b'/')
                && text[i + 1].is_ascii_digit()
                && run.digits.len() < 40
            {
                run.seps.push(text[i]);
                i += 1;
                continue;
            }
            break;
        }
        // A run glued to letters (e.g. "12ab") is not a number.
        if run.end < text.len() && is_word(text[run.end]) {
            while i < text.len() && is_word(text[i]) {
                i += 1;
            }
            continue;
        }
        out.push(run);
    }
    out
}

fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &x) in d.iter().rev().enumerate() {
        let mut v = x as u32;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// Whether the issuer prefix fits the length: Visa 4 (13, 16, 19), Mastercard 51–55 and
/// 2221–2720 (16), Amex 34/37 (15), Diners 36/38/300–305 (14), Discover 6011/644–649/65,
/// JCB 35, UnionPay 62, Maestro 50/56–69 (12–19).
fn card_prefix(d: &[u8]) -> bool {
    let p = |k: usize| d[..k].iter().fold(0u32, |a, &x| a * 10 + x as u32);
    let n = d.len();
    match d[0] {
        4 => matches!(n, 13 | 16 | 19),
        3 => match p(2) {
            34 | 37 => n == 15,
            36 | 38 => n == 14,
            30 => (300..=305).contains(&p(3)) && n == 14,
            35 => (16..=19).contains(&n),
            _ => false,
        },
        2 => (2221..=2720).contains(&p(4)) && n == 16,
        5 => match p(2) {
            51..=55 => n == 16,
            50 | 56..=59 => (12..=19).contains(&n),
            _ => false,
        },
        6 => (12..=19).contains(&n),
        _ => false,
    }
}

fn card(r: &Run) -> bool {
    let n = r.digits.len();
    (13..=19).contains(&n)
        && r.seps.iter().all(|&s| s == b' ' || s == b'-')
        && (r.seps.is_empty() || r.groups.iter().all(|&g| (3..=6).contains(&g)))
        && card_prefix(&r.digits)
        && luhn(&r.digits)
}

fn us_ssn(r: &Run) -> bool {
    if r.groups != [3, 2, 4] || !r.seps.iter().all(|&s| s == b'-' || s == b' ') {
        return false;
    }
    let d = &r.digits;
    let area = d[0] as u32 * 100 + d[1] as u32 * 10 + d[2] as u32;
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().fold(0u32, |a, &x| a * 10 + x as u32);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn nhs_number(r: &Run) -> bool {
    if r.digits.len() != 10 || !(r.groups == [10] || r.groups == [3, 3, 4]) {
        return false;
    }
    if !r.seps.iter().all(|&s| s == b' ' || s == b'-') {
        return false;
    }
    let sum: u32 = r.digits[..9]
        .iter()
        .enumerate()
        .map(|(i, &x)| x as u32 * (10 - i as u32))
        .sum();
    let check = match 11 - sum % 11 {
        11 => 0,
        10 => return false,
        c => c,
    };
    check == r.digits[9] as u32
}

fn bsn(r: &Run) -> bool {
    if r.digits.len() != 9 || !(r.groups == [9] || r.groups == [4, 2, 3] || r.groups == [3, 3, 3]) {
        return false;
    }
    let d = &r.digits;
    let sum: i32 = d[..8]
        .iter()
        .enumerate()
        .map(|(i, &x)| x as i32 * (9 - i as i32))
        .sum::<i32>()
        - d[8] as i32;
    sum % 11 == 0 && d.iter().any(|&x| x != 0)
}

/// German Steuer-IdNr: 11 digits, no leading 0, ISO 7064 MOD 11,10 check digit, and in
/// the first ten digits exactly one digit repeated (twice or three times).
fn de_tax_id(r: &Run) -> bool {
    let d = &r.digits;
    if d.len() != 11 || d[0] == 0 || !r.seps.iter().all(|&s| s == b' ') {
        return false;
    }
    let mut counts = [0u8; 10];
    for &x in &d[..10] {
        counts[x as usize] += 1;
    }
    let repeated: Vec<u8> = counts.iter().copied().filter(|&c| c > 1).collect();
    if repeated.len() != 1 || repeated[0] > 3 {
        return false;
    }
    let mut product = 10u32;
    for &x in &d[..10] {
        let mut sum = (x as u32 + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let check = match 11 - product {
        10 => 0,
        c => c,
    };
    check == d[10] as u32
}

fn ipv4(r: &Run) -> bool {
    r.groups.len() == 4
        && r.seps.iter().all(|&s| s == b'.')
        && r.groups.iter().all(|&g| (1..=3).contains(&g))
        && {
            let mut at = 0;
            r.groups.iter().all(|&g| {
                let v = r.digits[at..at + g]
                    .iter()
                    .fold(0u32, |a, &x| a * 10 + x as u32);
                let leading_zero = g > 1 && r.digits[at] == 0;
                at += g;
                v <= 255 && !leading_zero
            })
        }
}

/// A phone number: 8–15 digits, written with a leading `+` (international) or a leading
/// 0 / parentheses (national) and separators; a bare digit string is not taken for one.
fn phone(text: &[u8], r: &Run) -> Option<(usize, usize)> {
    let n = r.digits.len();
    let dotted = r.seps.contains(&b'.');
    if !(8..=15).contains(&n)
        || r.seps.contains(&b'/')
        || dotted && !(r.groups == [3, 3, 4] && r.seps.iter().all(|&s| s == b'.'))
    {
        return None;
    }
    let before = |k: usize| r.start.checked_sub(k).map(|i| text[i]);
    let plus = before(1) == Some(b'+');
    let paren = before(1) == Some(b'(');
    if plus {
        return Some((r.start - 1, r.end));
    }
    if paren {
        return Some((r.start - 1, r.end));
    }
    // "(555) 123-4567": the run starts after ") ".
    if r.digits[0] == 0 && !r.seps.is_empty() && r.groups.len() >= 2 {
        return Some((r.start, r.end));
    }
    None
}

/// US-style "(555) 123-4567": a parenthesised area code followed by a run.
fn paren_phone(text: &[u8], r: &Run) -> Option<(usize, usize)> {
    // r is the "123-4567" part; look back for "(ddd) ".
    if r.groups != [3, 4] || r.start < 6 {
        return None;
    }
    let s = r.start;
    let head = &text[s - 6..s];
    (head[0] == b'('
        && head[1..4].iter().all(u8::is_ascii_digit)
        && head[4] == b')'
        && head[5] == b' ')
        .then_some((s - 6, r.end))
}

fn valid_date(y: u32, m: u32, d: u32) -> bool {
    let dim = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400) => 29,
        2 => 28,
        _ => return false,
    };
    (1900..=2100).contains(&y) && (1..=dim).contains(&d)
}

/// A date in a numeric run: Y-M-D, D/M/Y, D.M.Y, D-M-Y or M/D/Y.
fn date(r: &Run) -> bool {
    if r.groups.len() != 3 || r.seps[0] != r.seps[1] || r.seps[0] == b' ' {
        return false;
    }
    let mut at = 0;
    let v: Vec<u32> = r
        .groups
        .iter()
        .map(|&g| {
            let x = r.digits[at..at + g]
                .iter()
                .fold(0u32, |a, &x| a * 10 + x as u32);
            at += g;
            x
        })
        .collect();
    match &*r.groups {
        [4, 1..=2, 1..=2] => valid_date(v[0], v[1], v[2]),
        [1..=2, 1..=2, 4] => valid_date(v[2], v[1], v[0]) || valid_date(v[2], v[0], v[1]),
        _ => false,
    }
}

const MONTHS: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "januar",
    "februar",
    "märz",
    "juni",
    "juli",
    "oktober",
    "dezember",
    "janvier",
    "février",
    "mars",
    "avril",
    "mai",
    "juin",
    "juillet",
    "août",
    "septembre",
    "octobre",
    "novembre",
    "décembre",
    "januari",
    "februari",
    "maart",
    "mei",
    "augustus",
];

/// Words that make a nearby date a date of birth.
const DOB_CONTEXT: &[&str] = &[
    "date of birth",
    "dob",
    "d.o.b",
    "born",
    "birth date",
    "birthdate",
    "geboren",
    "geburtsdatum",
    "geb.",
    "né le",
    "née le",
    "date de naissance",
    "geboortedatum",
];

/// Searchers for the birth-context words, built once.
static DOB_FINDERS: std::sync::LazyLock<Vec<memchr::memmem::Finder<'static>>> =
    std::sync::LazyLock::new(|| {
        DOB_CONTEXT
            .iter()
            .map(|w| memchr::memmem::Finder::new(w.as_bytes()))
            .collect()
    });

/// Dates of birth: a date (numeric, or "12 March 1980") within 40 bytes after a
/// birth-context word.
fn dob(text: &str, lower: &str, runs: &[Run]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    // Context is looked for only in the 40 bytes (plus the word) before a candidate.
    let near = |start: usize| {
        let from = lower.floor_char_boundary(start.saturating_sub(40 + 24));
        let Some(window) = lower.get(from..start) else {
            return false;
        };
        DOB_FINDERS.iter().any(|f| {
            let w = f.needle();
            f.find_iter(window.as_bytes()).any(|at| {
                let abs = from + at;
                let end = abs + w.len();
                (abs == 0 || !is_word(lower.as_bytes()[abs - 1]))
                    && start >= end
                    && start - end <= 40
            })
        })
    };
    for r in runs {
        if date(r) && near(r.start) {
            out.push((r.start, r.end));
        }
    }
    // "12 March 1980", "12. März 1980"
    let b = lower.as_bytes();
    for r in runs
        .iter()
        .filter(|r| r.digits.len() <= 2 && r.groups.len() == 1)
    {
        let mut at = r.end;
        if b.get(at) == Some(&b'.') {
            at += 1;
        }
        if b.get(at) != Some(&b' ') {
            continue;
        }
        at += 1;
        let Some(m) = MONTHS
            .iter()
            .filter(|m| lower[at..].starts_with(**m))
            .max_by_key(|m| m.len())
        else {
            continue;
        };
        at += m.len();
        if b.get(at) == Some(&b'.') {
            at += 1;
        }
        if b.get(at) != Some(&b' ') {
            continue;
        }
        at += 1;
        let year_ok = b.len() >= at + 4
            && b[at..at + 4].iter().all(u8::is_ascii_digit)
            && (at + 4 == b.len() || !is_word(b[at + 4]));
        if year_ok && near(r.start) && at + 4 <= text.len() {
            out.push((r.start, at + 4));
        }
    }
    out
}

fn iban_valid(s: &[u8]) -> bool {
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    let mut rem = 0u32;
    for &c in s[4..].iter().chain(&s[..4]) {
        let v = match c {
            b'0'..=b'9' => (c - b'0') as u32,
            b'A'..=b'Z' => (c - b'A') as u32 + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// IBANs: two capital letters, two digits, then 11–30 letters/digits, optionally in
/// groups of four separated by single spaces; mod-97 must give 1.
fn iban(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while i + 4 < text.len() {
        if !text[i + 2].is_ascii_digit() {
            // The third character of an IBAN is a digit: skip to where one can be.
            i = (next_digit(text, i + 2) - 2).max(i + 1);
            continue;
        }
        let starts = text[i].is_ascii_uppercase()
            && text[i + 1].is_ascii_uppercase()
            && text[i + 3].is_ascii_digit()
            && (i == 0 || !is_word(text[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let mut compact = Vec::with_capacity(34);
        let mut j = i;
        let mut end = i;
        while j < text.len() && compact.len() < 34 {
            let c = text[j];
            if c.is_ascii_uppercase() || c.is_ascii_digit() {
                compact.push(c);
                j += 1;
                end = j;
            } else if c == b' '
                && j + 1 < text.len()
                && (text[j + 1].is_ascii_uppercase() || text[j + 1].is_ascii_digit())
                && compact.len() % 4 == 0
            {
                j += 1;
            } else {
                break;
            }
        }
        if (end == text.len() || !is_word(text[end])) && iban_valid(&compact) {
            out.push((i, end));
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

/// French NIR (numéro de sécurité sociale): 13 digits (département 2A/2B for Corsica)
/// and a 2-digit key = 97 − (number mod 97); spaces allowed.
fn fr_nir(text: &[u8]) -> Vec<(usize, usize)> {
    let mut out = vec![];
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_digit() {
            i = next_digit(text, i);
            continue;
        }
        if !matches!(text[i], b'1' | b'2') || (i > 0 && is_word(text[i - 1])) {
            i += 1;
            continue;
        }
        let mut chars = Vec::with_capacity(15);
        let mut j = i;
        let mut end = i;
        while j < text.len() && chars.len() < 15 {
            let c = text[j];
            let corsica = chars.len() == 6 && chars[5] == b'2' && (c == b'A' || c == b'B');
            if c.is_ascii_digit() || corsica {
                chars.push(c);
                j += 1;
                end = j;
            } else if c == b' ' && j + 1 < text.len() && text[j + 1].is_ascii_alphanumeric() {
                j += 1;
            } else {
                break;
            }
        }
        if chars.len() == 15 && (end == text.len() || !is_word(text[end])) {
            let month = (chars[3] - b'0') * 10 + (chars[4] - b'0');
            // Corsica: département 2A counts as 19, 2B as 18.
            let mut digits = chars.clone();
            match digits[6] {
                b'A' => (digits[5], digits[6]) = (b'1', b'9'),
                b'B' => (digits[5], digits[6]) = (b'1', b'8'),
                _ => {}
            }
            let number = digits[..13]
                .iter()
                .fold(0u64, |a, &c| a * 10 + (c - b'0') as u64);
            let key = (chars[13] - b'0') as u64 * 10 + (chars[14] - b'0') as u64;
            let month_ok = (1..=12).contains(&month) || (20..=42).contains(&month) || month >= 50;
            if month_ok && 97 - number % 97 == key {
                out.push((i, end));
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// ICD-10 codes: a letter (not U), two digits, and a dotted subcode ("E11.9", "S72.001A");
/// a bare three-character code ("I10") only after a diagnosis word.
fn icd10(text: &[u8], lower: &str) -> Vec<(usize, usize)> {
    const CONTEXT: &[&str] = &["icd", "diagnos", "dx", "diagnose", "diagnostic"];
    let mut out = vec![];
    let mut i = 0;
    while i + 3 <= text.len() {
        if !text[i + 1].is_ascii_digit() {
            // A code's second character is a digit: skip to where one can be.
            i = (next_digit(text, i + 1) - 1).max(i + 1);
            continue;
        }
        let c = text[i];
        let ok = c.is_ascii_uppercase()
            && c != b'U'
            && text[i + 1].is_ascii_digit()
            && text[i + 2].is_ascii_digit()
            && (i == 0 || !is_word(text[i - 1]));
        if !ok {
            i += 1;
            continue;
        }
        let mut end = i + 3;
        let mut dotted = false;
        if end + 1 < text.len() && text[end] == b'.' && text[end + 1].is_ascii_alphanumeric() {
            let mut k = end + 1;
            while k < text.len() && text[k].is_ascii_alphanumeric() && k - end <= 4 {
                k += 1;
            }
            if k - end - 1 <= 4 {
                end = k;
                dotted = true;
            }
        }
        if end < text.len() && is_word(text[end]) {
            i += 1;
            continue;
        }
        let context = || {
            let from = i.saturating_sub(40);
            let window = lower.get(from..i).unwrap_or("");
            CONTEXT
                .iter()
                .any(|w| memchr::memmem::find(window.as_bytes(), w.as_bytes()).is_some())
        };
        if dotted || context() {
            out.push((i, end));
        }
        i = end;
    }
    out
}

/// Emails: local@domain.tld, the domain with at least one dot and a 2+ letter TLD.
fn email(text: &[u8]) -> Vec<(usize, usize)> {
    let local = |b: u8| b.is_ascii_alphanumeric() || b".!#$%&'*+/=?^_`{|}~-".contains(&b);
    let domain = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.';
    let mut out = vec![];
    for at in memchr::memchr_iter(b'@', text) {
        let mut s = at;
        while s > 0 && local(text[s - 1]) {
            s -= 1;
        }
        let mut e = at + 1;
        while e < text.len() && domain(text[e]) {
            e += 1;
        }
        while e > at + 1 && text[e - 1] == b'.' {
            e -= 1;
        }
        let dom = &text[at + 1..e];
        let Some(dot) = dom.iter().rposition(|&b| b == b'.') else {
            continue;
        };
        let tld = &dom[dot + 1..];
        if s < at && dot > 0 && tld.len() >= 2 && tld.iter().all(u8::is_ascii_alphabetic) {
            out.push((s, e));
        }
    }
    out
}

/// IPv6 addresses (with at least two colons), checked by the standard parser. A
/// candidate is a maximal run of hex digits, colons and dots, from its first position
/// that follows neither a word character nor a colon; only runs around a colon are
/// looked at.
fn ipv6(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let class = |c: u8| c.is_ascii_hexdigit() || c == b':' || c == b'.';
    let mut out = vec![];
    let mut resume = 0;
    for colon in memchr::memchr_iter(b':', b) {
        if colon < resume {
            continue;
        }
        let mut s = colon;
        while s > 0 && class(b[s - 1]) {
            s -= 1;
        }
        let mut e = colon + 1;
        while e < b.len() && class(b[e]) {
            e += 1;
        }
        resume = e;
        if memchr::memchr_iter(b':', &b[s..e]).nth(1).is_none() {
            continue;
        }
        let start = (s..e).find(|&p| {
            (b[p].is_ascii_hexdigit() || b[p] == b':')
                && (p == 0 || !(is_word(b[p - 1]) || b[p - 1] == b':'))
        });
        let Some(p) = start else { continue };
        let cand = text[p..e].trim_end_matches('.');
        if cand.matches(':').count() >= 2 && cand.parse::<std::net::Ipv6Addr>().is_ok() {
            out.push((p, p + cand.len()));
        }
    }
    out
}

/// Runs every built-in detector over `text`.
pub fn scan(text: &str) -> Vec<Finding> {
    scan_lower(text, &text.to_ascii_lowercase())
}

/// As [`scan`], given `text.to_ascii_lowercase()` (context words are matched in it; ASCII
/// lowercasing keeps byte offsets).
pub fn scan_lower(text: &str, lower: &str) -> Vec<Finding> {
    let b = text.as_bytes();
    let mut out = vec![];
    let mut push = |detector: &'static str, (start, end): (usize, usize)| {
        out.push(Finding {
            detector,
            start,
            end,
        })
    };
    let runs = runs(b);
    // A French NIR (15 digits) passes Luhn one time in ten: it is a NIR, not a card.
    let nirs = fr_nir(b);
    // "version 10.2.0.1" is a version, not an address.
    let versioned = |start: usize| {
        let from = lower.floor_char_boundary(start.saturating_sub(9));
        lower.get(from..start).is_some_and(|w| {
            let w = w.trim_end();
            w.ends_with("version")
                || w.ends_with("release")
                || w.ends_with(" v")
                || w.ends_with("build")
        })
    };
    for r in &runs {
        let span = (r.start, r.end);
        if nirs.contains(&span) {
            continue;
        }
        if card(r) {
            push("card", span);
        } else if us_ssn(r) {
            push("us_ssn", span);
        } else if nhs_number(r) {
            push("nhs_number", span);
        } else if bsn(r) {
            push("bsn", span);
        } else if de_tax_id(r) {
            push("de_tax_id", span);
        } else if ipv4(r) && !versioned(r.start) {
            push("ip", span);
        } else if let Some(s) = paren_phone(b, r).or_else(|| phone(b, r)) {
            push("phone", s);
        }
    }
    for s in dob(text, lower, &runs) {
        push("dob", s);
    }
    for s in iban(b) {
        push("iban", s);
    }
    for s in nirs {
        push("fr_nir", s);
    }
    for s in icd10(b, lower) {
        push("icd10", s);
    }
    for s in email(b) {
        push("email", s);
    }
    for s in ipv6(text) {
        push("ip", s);
    }
    out.sort_by_key(|f| (f.start, f.end));
    out
}

#[cfg(test)]
mod skip_tests {
    use super::next_digit;

    #[test]
    fn next_digit_agrees_with_a_byte_by_byte_search() {
        // Every byte value around every position of the 8-byte words.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let text: Vec<u8> = (0..len)
                .map(|k| {
                    let v = (state.rotate_left(k as u32 * 5) & 0xff) as u8;
                    // Mostly letters and high bytes, digits and any byte now and then.
                    if v.is_multiple_of(7) {
                        b'0' + v % 10
                    } else if v.is_multiple_of(3) {
                        v
                    } else {
                        v | 0x40
                    }
                })
                .collect();
            for from in 0..=len {
                let naive = (from..len)
                    .find(|&i| text[i].is_ascii_digit())
                    .unwrap_or(len);
                assert_eq!(next_digit(&text, from), naive, "{text:?} from {from}");
            }
        }
        assert_eq!(next_digit(b"abcdefgh/:ijklmno9", 0), 17);
        assert_eq!(next_digit(b"", 0), 0);
    }
}
