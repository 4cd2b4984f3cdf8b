//! Detector tests: numbers made here with valid check digits are found, the same numbers
//! with a wrong check digit are not, in several writings and languages.

use crate::detect::{scan, Finding};

fn found(text: &str) -> Vec<(&'static str, &str)> {
    scan(text)
        .into_iter()
        .map(
            |Finding {
                 detector,
                 start,
                 end,
             }| (detector, &text[start..end]),
        )
        .collect()
}

fn only(text: &str, detector: &str) -> Vec<String> {
    found(text)
        .into_iter()
        .filter(|(d, _)| *d == detector)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// Deterministic pseudo-random digits.
struct Rng(u64);
impl Rng {
    fn digit(&mut self) -> u8 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 10) as u8
    }
}

fn digits(d: &[u8]) -> String {
    d.iter().map(|x| (b'0' + x) as char).collect()
}

fn luhn_complete(prefix: &[u8]) -> Vec<u8> {
    for c in 0..10 {
        let mut d = prefix.to_vec();
        d.push(c);
        let sum: u32 = d
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &x)| {
                let v = x as u32 * if i % 2 == 1 { 2 } else { 1 };
                if v > 9 {
                    v - 9
                } else {
                    v
                }
            })
            .sum();
        if sum.is_multiple_of(10) {
            return d;
        }
    }
    unreachable!()
}

fn wrong_last(d: &[u8]) -> Vec<u8> {
    let mut w = d.to_vec();
    let l = w.len() - 1;
    w[l] = (w[l] + 1) % 10;
    w
}

#[test]
fn cards_pass_luhn_and_near_misses_do_not() {
    let mut rng = Rng(1);
    for len in [15usize, 16, 19] {
        for _ in 0..50 {
            let mut p = match len {
                15 => vec![3, 7],
                _ => vec![4],
            };
            while p.len() < len - 1 {
                p.push(rng.digit());
            }
            let valid = luhn_complete(&p);
            let s = digits(&valid);
            assert_eq!(only(&format!("card {s} exp"), "card"), [s.as_str()]);
            let grouped: Vec<String> = s
                .as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8(c.to_vec()).unwrap())
                .collect();
            let spaced = grouped.join(" ");
            if len == 16 {
                assert_eq!(
                    only(&format!("Paid with {spaced}."), "card"),
                    [spaced.as_str()]
                );
                assert_eq!(
                    only(&format!("Paid with {}.", grouped.join("-")), "card").len(),
                    1
                );
            }
            let bad = digits(&wrong_last(&valid));
            assert!(only(&format!("card {bad} exp"), "card").is_empty(), "{bad}");
        }
    }
    // A long number inside a word or an order id is not a card.
    assert!(only("order#4111111111111111x", "card").is_empty());
}

fn nhs(d9: &[u8]) -> Option<Vec<u8>> {
    let sum: u32 = d9
        .iter()
        .enumerate()
        .map(|(i, &x)| x as u32 * (10 - i as u32))
        .sum();
    let c = match 11 - sum % 11 {
        11 => 0,
        10 => return None,
        c => c,
    };
    let mut v = d9.to_vec();
    v.push(c as u8);
    Some(v)
}

#[test]
fn nhs_numbers_pass_mod_11() {
    let mut rng = Rng(2);
    let mut n = 0;
    while n < 60 {
        let d9: Vec<u8> = (0..9).map(|_| rng.digit()).collect();
        let Some(v) = nhs(&d9) else { continue };
        n += 1;
        let s = digits(&v);
        let spaced = format!("{} {} {}", &s[..3], &s[3..6], &s[6..]);
        assert_eq!(
            only(&format!("NHS number {spaced} on file"), "nhs_number"),
            [spaced.as_str()]
        );
        let bad = digits(&wrong_last(&v));
        let bad_spaced = format!("{} {} {}", &bad[..3], &bad[3..6], &bad[6..]);
        assert!(only(&format!("NHS number {bad_spaced}"), "nhs_number").is_empty());
    }
}

#[test]
fn bsn_passes_the_eleven_proof() {
    let mut rng = Rng(3);
    let mut n = 0;
    while n < 60 {
        let d: Vec<u8> = (0..9).map(|_| rng.digit()).collect();
        let sum: i32 = d[..8]
            .iter()
            .enumerate()
            .map(|(i, &x)| x as i32 * (9 - i as i32))
            .sum::<i32>()
            - d[8] as i32;
        let s = digits(&d);
        let hits = only(&format!("BSN {s}."), "bsn");
        if sum % 11 == 0 {
            n += 1;
            // A 9-digit number that is also valid under another scheme may be reported
            // as that; here none is.
            assert_eq!(hits, [s], "{sum}");
        } else {
            assert!(hits.is_empty(), "{s}");
        }
    }
}

#[test]
fn us_ssn_excludes_invalid_ranges() {
    assert_eq!(only("SSN 123-45-6789", "us_ssn"), ["123-45-6789"]);
    for bad in [
        "000-45-6789",
        "666-45-6789",
        "912-45-6789",
        "123-00-6789",
        "123-45-0000",
    ] {
        assert!(only(&format!("SSN {bad}"), "us_ssn").is_empty(), "{bad}");
    }
    // Without the dashes a 9-digit number is not taken for an SSN.
    assert!(only("ref 123456789", "us_ssn").is_empty());
}

fn iban_of(country: &str, bban: &str) -> String {
    let rearranged = format!("{bban}{country}00");
    let mut rem = 0u32;
    for c in rearranged.bytes() {
        let v = if c.is_ascii_digit() {
            (c - b'0') as u32
        } else {
            (c - b'A') as u32 + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    format!("{country}{:02}{bban}", 98 - rem)
}

#[test]
fn ibans_pass_mod_97() {
    for (c, bban) in [
        ("DE", "370400440532013000"),
        ("NL", "ABNA0417164300"),
        ("GB", "NWBK60161331926819"),
        ("FR", "20041010050500013M02606"),
    ] {
        let iban = iban_of(c, bban);
        assert_eq!(
            only(&format!("pay to {iban} please"), "iban"),
            [iban.as_str()]
        );
        let grouped: Vec<String> = iban
            .as_bytes()
            .chunks(4)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        let g = grouped.join(" ");
        assert_eq!(only(&format!("IBAN: {g}"), "iban"), [g.as_str()]);
        let mut bad = iban.clone().into_bytes();
        let l = bad.len() - 1;
        bad[l] = if bad[l] == b'9' { b'8' } else { bad[l] + 1 };
        let bad = String::from_utf8(bad).unwrap();
        assert!(only(&format!("pay to {bad}"), "iban").is_empty(), "{bad}");
    }
    // The textbook example.
    assert_eq!(only("GB82 WEST 1234 5698 7654 32", "iban").len(), 1);
}

fn de_tax(d10: &[u8]) -> Vec<u8> {
    let mut product = 10u32;
    for &x in d10 {
        let mut sum = (x as u32 + product) % 10;
        if sum == 0 {
            sum = 10;
        }
        product = (sum * 2) % 11;
    }
    let c = match 11 - product {
        10 => 0,
        c => c,
    };
    let mut v = d10.to_vec();
    v.push(c as u8);
    v
}

#[test]
fn german_tax_ids_pass_iso_7064() {
    for d10 in [
        [8u8, 6, 0, 9, 5, 7, 4, 2, 7, 1],
        [6, 5, 9, 2, 9, 9, 7, 0, 4, 3],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 1],
    ] {
        let v = de_tax(&d10);
        let s = digits(&v);
        assert_eq!(only(&format!("Steuer-ID {s}"), "de_tax_id"), [s.as_str()]);
        let bad = digits(&wrong_last(&v));
        assert!(only(&format!("Steuer-ID {bad}"), "de_tax_id").is_empty());
    }
    // Every digit different in the first ten: not a tax id.
    let v = de_tax(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 0]);
    assert!(only(&format!("Steuer-ID {}", digits(&v)), "de_tax_id").is_empty());
}

fn nir(body: &str) -> String {
    let n: u64 = body
        .replace("2A", "19")
        .replace("2B", "18")
        .parse()
        .unwrap();
    format!("{body}{:02}", 97 - n % 97)
}

#[test]
fn french_nir_keys_and_corsica() {
    for body in [
        "1850578006084",
        "2690499350123",
        "1800620004001",
        "280122B012003",
    ] {
        let v = nir(body);
        assert_eq!(only(&format!("NIR {v} ."), "fr_nir"), [v.as_str()], "{v}");
        let mut bad = v.clone().into_bytes();
        let l = bad.len() - 1;
        bad[l] = if bad[l] == b'9' { b'0' } else { bad[l] + 1 };
        let bad = String::from_utf8(bad).unwrap();
        assert!(only(&format!("NIR {bad} ."), "fr_nir").is_empty(), "{bad}");
    }
}

#[test]
fn emails_phones_and_addresses() {
    assert_eq!(
        only("write to jane.doe+x@example-hospital.org.", "email"),
        ["jane.doe+x@example-hospital.org"]
    );
    assert!(only("not an email: a@b, x@localhost", "email").is_empty());
    for p in [
        "+44 20 7946 0958",
        "+1-202-555-0143",
        "+31 6 12345678",
        "020 7946 0958",
        "06-12345678",
    ] {
        assert_eq!(only(&format!("call {p} today"), "phone"), [p], "{p}");
    }
    assert_eq!(only("call (202) 555-0143 now", "phone"), ["(202) 555-0143"]);
    assert!(only(
        "version 1.2.3, 2026 results, 12345678, 01.02.03.04, 0612/345678",
        "phone"
    )
    .is_empty());
    assert_eq!(
        only("call 202.555.0143", "phone"),
        Vec::<String>::new(),
        "no leading 0 or +"
    );
    assert_eq!(only("call 020.555.0143", "phone"), ["020.555.0143"]);
    assert_eq!(
        only("from 192.168.10.254 and 10.0.0.1", "ip"),
        ["192.168.10.254", "10.0.0.1"]
    );
    assert!(only("version 1.2.300.4, 01.02.03.04", "ip").is_empty());
    assert_eq!(
        only("host 2001:db8::8a2e:370:7334 down", "ip"),
        ["2001:db8::8a2e:370:7334"]
    );
    assert!(only("at 12:30:45", "ip").is_empty());
}

#[test]
fn dates_of_birth_need_context() {
    assert_eq!(
        only("Patient, DOB 1980-03-12, admitted", "dob"),
        ["1980-03-12"]
    );
    assert_eq!(only("born on 12/03/1980 in Leeds", "dob"), ["12/03/1980"]);
    assert_eq!(only("geboren am 12.03.1980", "dob"), ["12.03.1980"]);
    assert_eq!(
        only("Date of birth: 12 March 1980.", "dob"),
        ["12 March 1980"]
    );
    assert_eq!(only("née le 3 avril 1975", "dob"), ["3 avril 1975"]);
    assert!(only("meeting on 2026-11-22", "dob").is_empty());
    assert!(only("DOB 1980-02-30", "dob").is_empty());
}

#[test]
fn icd10_codes() {
    assert_eq!(
        only("Assessment: E11.9 and I25.10.", "icd10"),
        ["E11.9", "I25.10"]
    );
    assert_eq!(only("Diagnosis: I10", "icd10"), ["I10"]);
    assert!(only("Room B12, flight A380, U07.1", "icd10").is_empty());
}

#[test]
fn spans_are_byte_offsets_into_unicode_text() {
    let t = "Größe: Herr Müller, geboren am 12.03.1980, IBAN DE89370400440532013000 — fin.";
    for (d, s) in found(t) {
        assert!(t.contains(s), "{d}: {s}");
    }
    assert_eq!(only(t, "iban"), ["DE89370400440532013000"]);
    assert_eq!(only(t, "dob"), ["12.03.1980"]);
}

mod documents {
    use crate::{parse, Action, ContentMode, Policy};

    const HOSPITAL: &str = include_str!("../../../policy/examples/hospital/policy.toml");
    const BANK: &str = include_str!("../../../policy/examples/bank/policy.toml");
    const CONSORTIUM: &str = include_str!("../../../policy/examples/consortium/policy.toml");

    fn problems(text: &str) -> Vec<String> {
        parse(text)
            .err()
            .unwrap_or_default()
            .iter()
            .map(|p| p.to_string())
            .collect()
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        for (name, text) in [
            ("hospital", HOSPITAL),
            ("bank", BANK),
            ("consortium", CONSORTIUM),
        ] {
            let p = parse(text).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(
                p.version.starts_with("sha256:") && p.version.len() == 23,
                "{}",
                p.version
            );
        }
        assert_eq!(parse(BANK).unwrap().content, ContentMode::Hmac);
        assert_eq!(parse(HOSPITAL).unwrap().retention_days, Some(2555));
    }

    #[test]
    fn problems_are_reported_with_line_and_column() {
        let text = "name = \"x\"\n[destinations.cloud]\nkind = \"external\"\nurl = \"http://cloud.example/v1\"\njurisdiction = \"US\"\n";
        assert_eq!(
            problems(text),
            ["4:7: destination \"cloud\": an external destination must use https://"]
        );
        let text = "[detectors.mrn]\nclass = \"PHI\"\npattern = 'MRN(\\d{7}'\n";
        let p = problems(text);
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("3:11: detector \"mrn\": the pattern does not compile"),
            "{p:?}"
        );
        let text = "[detectors.x]\nclass = \"secret\"\nkeywords = [\"a\"]\n";
        assert!(problems(text)[0].starts_with("2:9: detector \"x\": unknown class \"secret\""));
        let text = "[[rules]]\naction = \"allow\"\ndestinations = [\"nowhere\"]\n";
        assert_eq!(
            problems(text),
            ["3:17: rule 1: unknown destination \"nowhere\""]
        );
        let text = "[[rules]]\naction = \"maybe\"\n";
        assert!(problems(text)[0].starts_with("2:10: rule 1: action \"maybe\""));
        // Every problem of a rule, not only the first.
        let text =
            "[[rules]]\naction = \"maybe\"\nclasses = [\"PHX\"]\ndestinations = [\"nowhere\"]\n";
        let p = problems(text);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[1].starts_with("3:11: rule 1: unknown class \"PHX\""),
            "{p:?}"
        );
        assert_eq!(p[2], "4:17: rule 1: unknown destination \"nowhere\"");
        // Syntax and unknown keys come from the TOML parser, located too.
        let p = problems("name = \n");
        assert!(p[0].starts_with("1:"), "{p:?}");
        let p = problems("[audit]\nkeep = 3\n");
        assert!(p[0].starts_with("2:1: unknown field `keep`"), "{p:?}");
    }

    #[test]
    fn destinations_listed_together_share_a_tier() {
        let text = r#"
[destinations.local]
kind = "local"
model = "m"
[destinations.a]
kind = "external"
url = "https://a.example/v1"
jurisdiction = "EU"
[destinations.b]
kind = "on_prem"
url = "https://b.lan/v1"
[[rules]]
action = "allow"
destinations = [["a", "b"], "local"]
"#;
        let p = parse(text).unwrap();
        let d = p.decide("t", &[]);
        assert_eq!(d.destinations, ["a", "b", "local"]);
        assert_eq!(d.tiers, [0, 0, 1]);
        let bad = text.replace(r#"[["a", "b"], "local"]"#, r#"[["a", "nowhere"], [], "a"]"#);
        assert_eq!(
            problems(&bad),
            [
                "14:17: rule 1: unknown destination \"nowhere\"",
                "14:35: rule 1: an empty list of destinations",
                "14:39: rule 1: destination \"a\" is listed twice",
            ]
        );
    }

    #[test]
    fn unreachable_rules_are_refused() {
        let text = r#"
[destinations.local]
kind = "local"
model = "m"

[[rules]]
classes = ["PHI", "PII"]
action = "allow"
destinations = ["local"]

[[rules]]
classes = ["PII"]
action = "deny"

[[rules]]
action = "allow"
destinations = ["local"]

[[rules]]
classes = ["PCI"]
action = "deny"
"#;
        let p = problems(text);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with(
                "11:1: rule 2: unreachable: every class it names is matched by an earlier rule"
            ),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("19:1: rule 4: unreachable: rule 3 matches every request"),
            "{p:?}"
        );
    }

    #[test]
    fn decisions_follow_the_first_matching_rule() {
        let p = parse(HOSPITAL).unwrap();
        let decide = |tenant: &str, text: &str| {
            let found = p.classify(&[text]);
            p.decide(tenant, &found)
        };
        let d = decide(
            "acme",
            "Discharge summary for MRN-1234567: metastasis found.",
        );
        assert_eq!(
            (d.action, d.rule.as_str()),
            (Action::Allow, "patient data stays on the appliance")
        );
        assert_eq!(d.classes, ["PHI"]);
        assert_eq!(d.destinations, ["local"]);
        assert_eq!(d.version, p.version);
        let d = decide("acme", "Charge card 4111 1111 1111 1111 please");
        assert_eq!(d.action, Action::Deny);
        assert_eq!(d.classes, ["PCI"]);
        let d = decide("acme", "Email jane@example.org about the rota");
        assert_eq!(
            (d.action, d.destinations.clone()),
            (
                Action::Redact,
                vec!["onprem-vllm".to_string(), "local".into()]
            )
        );
        let d = decide("acme", "Draft a polite note about the parking rules.");
        assert_eq!(d.classes, ["public"]);
        assert_eq!(d.destinations, ["eu-cloud", "onprem-vllm", "local"]);
        // The research tenant's own rule comes first.
        let d = decide("research", "Draft a polite note about the parking rules.");
        assert_eq!(d.rule, "research stays on premises");
        // Local routing: an alias picks the first allowed local model; a named model
        // must be allowed.
        assert_eq!(p.route_local(&d, "default").as_deref(), Some("smollm2"));
        assert_eq!(p.route_local(&d, "smollm2").as_deref(), Some("smollm2"));
        assert_eq!(p.route_local(&d, "other-model"), None);
        let denied = decide("acme", "card 4111 1111 1111 1111");
        assert_eq!(p.route_local(&denied, "smollm2"), None);
        // Site detectors can be switched off: the hospital does not count IP addresses.
        assert!(p.classify(&["ping 10.0.0.1"]).is_empty());
        // Keywords match whole words, case-insensitively; spans point into the part.
        let found = p.classify(&["x", "Start CHEMOTHERAPY now; chemotherapyx no"]);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].part, found[0].start, found[0].end), (1, 6, 18));
    }

    #[test]
    fn without_a_policy_everything_stays_local() {
        let p = Policy::builtin();
        let found = p.classify(&["My card is 4111 1111 1111 1111"]);
        assert_eq!(found[0].class, "PCI");
        let d = p.decide("acme", &found);
        assert_eq!((d.action, d.local_only), (Action::Allow, true));
        assert_eq!(d.version, "builtin");
        assert_eq!(p.route_local(&d, "smollm2").as_deref(), Some("smollm2"));
    }
}

#[test]
fn context_windows_cut_inside_multibyte_text() {
    // The window before the date starts inside "é" and "ü" bytes.
    let t = "ééééééééééééééééééééééééééééééüüüü geboren am 12.03.1980";
    assert_eq!(only(t, "dob"), ["12.03.1980"]);
}

#[test]
fn a_luhn_valid_number_with_a_wrong_issuer_prefix_is_not_a_card() {
    // 15 digits passing Luhn (a NIR with a wrong key) but not an Amex prefix.
    for t in ["NIR : 238097502936842 (assuré).", "Numéro 299075922132453."] {
        assert!(found(t).is_empty(), "{:?}", found(t));
    }
    // A NIR that also passes Luhn is reported as a NIR only.
    let nir = "1850578006084";
    let n: u64 = nir.parse().unwrap();
    let full = format!("{nir}{:02}", 97 - n % 97);
    assert!(found(&format!("NIR {full}"))
        .iter()
        .all(|f| f.0 == "fr_nir"));
    // Amex (15 digits, 34/37) and Mastercard 2-series are cards.
    assert_eq!(only("Amex 378282246310005 ok", "card"), ["378282246310005"]);
    assert_eq!(only("MC 2223003122003222 ok", "card"), ["2223003122003222"]);
}
