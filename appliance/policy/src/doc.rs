//! The policy document (`policy.toml`): data classes, detectors, destinations, rules,
//! model aliases, audit settings and per-tenant rules. Parsing and validation report
//! every problem with its line and column; a valid document becomes a [`Policy`].

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::detect::BUILT_IN;

/// A problem in a policy document, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Line and column (1-based, columns in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..text.floor_char_boundary(offset)];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    name: Option<String>,
    #[serde(default)]
    classes: BTreeMap<String, RawClass>,
    #[serde(default)]
    detectors: BTreeMap<String, Spanned<RawDetector>>,
    #[serde(default)]
    destinations: BTreeMap<String, Spanned<RawDestination>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
    #[serde(default)]
    aliases: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    audit: RawAudit,
    #[serde(default)]
    tenants: BTreeMap<String, RawTenant>,
    #[serde(default)]
    classification: RawClassification,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClassification {
    budget_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDetector {
    class: Option<Spanned<String>>,
    pattern: Option<Spanned<String>>,
    keywords: Option<Vec<String>>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    kind: Spanned<String>,
    model: Option<String>,
    url: Option<Spanned<String>>,
    jurisdiction: Option<String>,
    provider: Option<String>,
    price_in_per_1k: Option<f64>,
    price_out_per_1k: Option<f64>,
    timeout_ms: Option<u64>,
    credential: Option<String>,
    ca_file: Option<String>,
    breaker_failures: Option<u32>,
    breaker_cooldown_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    tenants: Option<Vec<String>>,
    classes: Option<Spanned<Vec<String>>>,
    action: Spanned<String>,
    #[serde(default)]
    destinations: Vec<Spanned<RawDest>>,
}

/// A rule's destination: a name, or names listed together as equally preferred.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDest {
    One(String),
    Tier(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    content: Option<Spanned<String>>,
    content_recipient: Option<Spanned<String>>,
    retention_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

/// What a rule does with a request it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Redact,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Redact => "redact",
            Action::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of the appliance's own models.
    Local,
    /// An OpenAI-compatible server on the institution's network.
    OnPrem,
    /// A cloud service.
    External,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    pub name: String,
    pub kind: Kind,
    pub model: Option<String>,
    pub url: Option<String>,
    pub jurisdiction: Option<String>,
    pub provider: Option<String>,
    pub price_in_per_1k: f64,
    pub price_out_per_1k: f64,
    pub timeout_ms: u64,
    /// The name of the stored credential (`DATA/policy/credentials/NAME`), never a secret.
    pub credential: Option<String>,
    /// The CA bundle the destination's certificate must chain to (default: the system's).
    pub ca_file: Option<String>,
    /// Failures in a row that open the destination's circuit (default 3) ...
    pub breaker_failures: u32,
    /// ... and how long it stays open before one probe request is let through (ms).
    pub breaker_cooldown_ms: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// `rule N` (1-based, in evaluation order) or its name.
    pub name: String,
    /// None: every tenant.
    pub tenants: Option<BTreeSet<String>>,
    /// None: every request; else requests with any of these classes.
    pub classes: Option<BTreeSet<String>>,
    pub action: Action,
    pub destinations: Vec<String>,
    /// Each destination's preference tier (see [`crate::Decision::tiers`]).
    pub tiers: Vec<usize>,
}

/// How request content appears in audit records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// Never (the default).
    None,
    /// A keyed HMAC-SHA-256 of the request's text.
    Hmac,
    /// The request's texts sealed to an auditor's X25519 public key (the appliance
    /// cannot read them back).
    Sealed { recipient: [u8; 32] },
}

impl ContentMode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ContentMode::None => "none",
            ContentMode::Hmac => "hmac",
            ContentMode::Sealed { .. } => "encrypted",
        }
    }
}

/// 64 hex digits (after an optional `x25519:`) as 32 bytes.
fn x25519_key(text: &str) -> Option<[u8; 32]> {
    let t = text.trim();
    let t = t.strip_prefix("x25519:").unwrap_or(t).as_bytes();
    if t.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in t.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug, Clone)]
pub struct DetectorSpec {
    pub name: String,
    pub class: String,
    pub enabled: bool,
    pub pattern: Option<regex::Regex>,
    pub keywords: Vec<String>,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    /// `sha256:` and 16 hex digits of the document's bytes.
    pub version: String,
    pub classes: BTreeSet<String>,
    pub detectors: Vec<DetectorSpec>,
    pub destinations: BTreeMap<String, Destination>,
    /// Tenant rules first (for their tenant), then the global ones, in order.
    pub rules: Vec<Rule>,
    pub aliases: BTreeMap<String, String>,
    pub content: ContentMode,
    pub retention_days: Option<u32>,
    /// Classification taking longer than this (ms) counts as failed: the request may
    /// then only go to local destinations.
    pub classify_budget_ms: u64,
}

const DEFAULT_CLASSES: &[&str] = &["PHI", "PII", "PCI", "confidential", "public"];

struct Checker<'a> {
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = line_col(self.text, span.start);
        self.problems.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }
}

/// Parses and validates a policy document; every problem found, in order of position.
pub fn parse(text: &str) -> Result<Policy, Vec<Problem>> {
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let (line, column) = line_col(text, e.span().map(|s| s.start).unwrap_or(0));
            return Err(vec![Problem {
                line,
                column,
                message: e.message().trim().to_string(),
            }]);
        }
    };
    let mut c = Checker {
        text,
        problems: vec![],
    };
    let classes: BTreeSet<String> = if raw.classes.is_empty() {
        DEFAULT_CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        raw.classes.keys().cloned().collect()
    };
    // Detectors: the built-in set, each configurable, plus the site's own.
    let mut detectors = vec![];
    for (name, default_class) in BUILT_IN {
        let own = raw.detectors.get(*name);
        let class = own
            .and_then(|d| d.get_ref().class.as_ref())
            .map(|s| s.get_ref().clone())
            .unwrap_or_else(|| default_class.to_string());
        detectors.push(DetectorSpec {
            name: name.to_string(),
            class,
            enabled: own.is_none_or(|d| d.get_ref().enabled),
            pattern: None,
            keywords: vec![],
        });
    }
    for (name, d) in &raw.detectors {
        let span = d.span();
        let d = d.get_ref();
        let built_in = BUILT_IN.iter().any(|(n, _)| n == name);
        if let Some(class) = &d.class {
            if !classes.contains(class.get_ref()) {
                c.at(
                    class.span(),
                    format!(
                        "detector {name:?}: unknown class {:?} (declared: {})",
                        class.get_ref(),
                        join(&classes)
                    ),
                );
            }
        } else if !built_in {
            c.at(span.clone(), format!("detector {name:?} needs a `class`"));
        }
        if built_in {
            if d.pattern.is_some() || d.keywords.is_some() {
                c.at(span, format!("{name:?} is a built-in detector: give it only `class` or `enabled`; site patterns need their own name"));
            }
            continue;
        }
        let pattern = match &d.pattern {
            Some(p) => match regex::Regex::new(p.get_ref()) {
                Ok(r) => Some(r),
                Err(e) => {
                    let msg = e.to_string();
                    let last = msg.lines().last().unwrap_or("").trim().to_string();
                    c.at(
                        p.span(),
                        format!("detector {name:?}: the pattern does not compile: {last}"),
                    );
                    None
                }
            },
            None => None,
        };
        let keywords: Vec<String> = d
            .keywords
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|k| k.to_ascii_lowercase())
            .filter(|k| !k.is_empty())
            .collect();
        if d.pattern.is_none() && keywords.is_empty() {
            c.at(
                span,
                format!("detector {name:?} needs a `pattern` or `keywords`"),
            );
        }
        detectors.push(DetectorSpec {
            name: name.clone(),
            class: d
                .class
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_default(),
            enabled: d.enabled,
            pattern,
            keywords,
        });
    }
    let mut destinations = BTreeMap::new();
    for (name, d) in &raw.destinations {
        let span = d.span();
        let d = d.get_ref();
        let kind = match d.kind.get_ref().as_str() {
            "local" => Kind::Local,
            "on_prem" => Kind::OnPrem,
            "external" => Kind::External,
            other => {
                c.at(d.kind.span(), format!("destination {name:?}: kind {other:?} is not one of local, on_prem, external"));
                continue;
            }
        };
        match kind {
            Kind::Local => {
                if d.model.is_none() {
                    c.at(
                        span.clone(),
                        format!("destination {name:?}: a local destination names its `model`"),
                    );
                }
                if d.url.is_some() {
                    c.at(
                        span.clone(),
                        format!("destination {name:?}: a local destination has no `url`"),
                    );
                }
            }
            Kind::OnPrem | Kind::External => {
                match &d.url {
                    None => c.at(span.clone(), format!("destination {name:?}: needs a `url`")),
                    Some(u) => {
                        let url = u.get_ref();
                        let https = url.starts_with("https://");
                        if kind == Kind::External && !https {
                            c.at(u.span(), format!("destination {name:?}: an external destination must use https://"));
                        } else if !https && !url.starts_with("http://") {
                            c.at(u.span(), format!("destination {name:?}: the url must start with https:// (or http:// on the LAN)"));
                        }
                    }
                }
            }
        }
        if let Some(cred) = &d.credential {
            let plain = !cred.is_empty()
                && !cred.starts_with('.')
                && cred
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
            if !plain {
                c.at(span.clone(), format!("destination {name:?}: credential {cred:?} must be a plain name (letters, digits, . _ -)"));
            }
        }
        if kind == Kind::External && d.jurisdiction.is_none() {
            c.at(span.clone(), format!("destination {name:?}: an external destination states its `jurisdiction` (e.g. \"EU\", \"US\")"));
        }
        for (what, v) in [
            ("price_in_per_1k", d.price_in_per_1k),
            ("price_out_per_1k", d.price_out_per_1k),
        ] {
            if v.is_some_and(|p| !(p >= 0.0 && p.is_finite())) {
                c.at(
                    span.clone(),
                    format!("destination {name:?}: {what} must be a price ≥ 0"),
                );
            }
        }
        destinations.insert(
            name.clone(),
            Destination {
                name: name.clone(),
                kind,
                model: d.model.clone(),
                url: d.url.as_ref().map(|u| u.get_ref().clone()),
                jurisdiction: d.jurisdiction.clone(),
                provider: d.provider.clone(),
                price_in_per_1k: d.price_in_per_1k.unwrap_or(0.0),
                price_out_per_1k: d.price_out_per_1k.unwrap_or(0.0),
                timeout_ms: d.timeout_ms.unwrap_or(60_000),
                credential: d.credential.clone(),
                ca_file: d.ca_file.clone(),
                breaker_failures: d.breaker_failures.unwrap_or(3).max(1),
                breaker_cooldown_ms: d.breaker_cooldown_ms.unwrap_or(30_000),
            },
        );
    }
    let mut rules = vec![];
    let mut seen: Vec<(Rule, Range<usize>)> = vec![];
    let tenant_rules = raw
        .tenants
        .iter()
        .flat_map(|(t, tr)| tr.rules.iter().map(move |r| (Some(t.clone()), r)));
    let global = raw.rules.iter().map(|r| (None, r));
    for (i, (tenant, r)) in tenant_rules.chain(global).enumerate() {
        let span = r.span();
        let raw_rule = r.get_ref();
        let name = raw_rule
            .name
            .clone()
            .unwrap_or_else(|| format!("rule {}", i + 1));
        // A bad action is one problem; the rest of the rule is still checked.
        let action = match raw_rule.action.get_ref().as_str() {
            "allow" => Some(Action::Allow),
            "redact" => Some(Action::Redact),
            "deny" => Some(Action::Deny),
            other => {
                c.at(
                    raw_rule.action.span(),
                    format!("{name}: action {other:?} is not one of allow, redact, deny"),
                );
                None
            }
        };
        let rule_classes = raw_rule.classes.as_ref().map(|cs| {
            for class in cs.get_ref() {
                if !classes.contains(class) {
                    c.at(
                        cs.span(),
                        format!(
                            "{name}: unknown class {class:?} (declared: {})",
                            join(&classes)
                        ),
                    );
                }
            }
            cs.get_ref().iter().cloned().collect::<BTreeSet<String>>()
        });
        if raw_rule
            .classes
            .as_ref()
            .is_some_and(|cs| cs.get_ref().is_empty())
        {
            c.at(span.clone(), format!("{name}: `classes = []` matches nothing; leave `classes` out to match every request"));
        }
        let mut names: Vec<String> = vec![];
        let mut tiers: Vec<usize> = vec![];
        for (tier, d) in raw_rule.destinations.iter().enumerate() {
            let listed: Vec<&String> = match d.get_ref() {
                RawDest::One(n) => vec![n],
                RawDest::Tier(ns) if ns.is_empty() => {
                    c.at(d.span(), format!("{name}: an empty list of destinations"));
                    vec![]
                }
                RawDest::Tier(ns) => ns.iter().collect(),
            };
            for n in listed {
                if !destinations.contains_key(n) {
                    c.at(d.span(), format!("{name}: unknown destination {n:?}"));
                } else if names.contains(n) {
                    c.at(
                        d.span(),
                        format!("{name}: destination {n:?} is listed twice"),
                    );
                }
                names.push(n.clone());
                tiers.push(tier);
            }
        }
        let Some(action) = action else {
            continue;
        };
        match action {
            Action::Deny if !raw_rule.destinations.is_empty() => c.at(
                span.clone(),
                format!("{name}: a deny rule has no destinations"),
            ),
            Action::Allow | Action::Redact if raw_rule.destinations.is_empty() => c.at(
                span.clone(),
                format!(
                    "{name}: an {} rule lists its destinations in order of preference",
                    action.as_str()
                ),
            ),
            _ => {}
        }
        let tenants = match (&tenant, &raw_rule.tenants) {
            (Some(t), _) => Some(BTreeSet::from([t.clone()])),
            (None, Some(ts)) => Some(ts.iter().cloned().collect()),
            (None, None) => None,
        };
        let rule = Rule {
            name,
            tenants,
            classes: rule_classes,
            action,
            destinations: names,
            tiers,
        };
        // Unreachable: every request this rule could match is taken by earlier rules
        // that apply to all of its tenants.
        let covering: Vec<&Rule> = seen
            .iter()
            .map(|(r, _)| r)
            .filter(|e| match (&e.tenants, &rule.tenants) {
                (None, _) => true,
                (Some(a), Some(b)) => b.is_subset(a),
                (Some(_), None) => false,
            })
            .collect();
        let shadowed_by = if let Some(all) = covering.iter().find(|e| e.classes.is_none()) {
            Some(format!("{} matches every request", all.name))
        } else if let Some(mine) = &rule.classes {
            let union: BTreeSet<&String> = covering
                .iter()
                .flat_map(|e| e.classes.iter().flatten())
                .collect();
            mine.iter().all(|c| union.contains(c)).then(|| {
                format!(
                    "every class it names is matched by an earlier rule ({})",
                    covering
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
        } else {
            None
        };
        if let Some(why) = shadowed_by {
            c.at(span.clone(), format!("{}: unreachable: {why}", rule.name));
        }
        seen.push((rule.clone(), span));
        rules.push(rule);
    }
    let mut aliases = BTreeMap::new();
    for (alias, target) in &raw.aliases {
        if !destinations.contains_key(target.get_ref()) {
            c.at(
                target.span(),
                format!(
                    "alias {alias:?}: unknown destination {:?}",
                    target.get_ref()
                ),
            );
        }
        aliases.insert(alias.clone(), target.get_ref().clone());
    }
    let recipient = raw.audit.content_recipient.as_ref().map(|r| {
        let key = x25519_key(r.get_ref());
        if key.is_none() {
            c.at(
                r.span(),
                "audit.content_recipient is not an X25519 public key (x25519: and 64 hex digits; appliance audit content-keygen makes one)".to_string(),
            );
        }
        (key, r.span())
    });
    let content = match raw
        .audit
        .content
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("none", _)) => ContentMode::None,
        Some(("hmac", _)) => ContentMode::Hmac,
        Some(("encrypted", span)) => match recipient {
            Some((Some(recipient), _)) => ContentMode::Sealed { recipient },
            Some((None, _)) => ContentMode::None,
            None => {
                c.at(
                    span,
                    "audit.content \"encrypted\" needs audit.content_recipient, the auditor's public key".to_string(),
                );
                ContentMode::None
            }
        },
        Some((other, span)) => {
            c.at(
                span,
                format!("audit.content {other:?} is not one of none, hmac, encrypted"),
            );
            ContentMode::None
        }
    };
    if let (Some((_, span)), false) = (&recipient, matches!(content, ContentMode::Sealed { .. })) {
        if c.problems.is_empty() {
            c.at(
                span.clone(),
                "audit.content_recipient is set but audit.content is not \"encrypted\"".to_string(),
            );
        }
    }
    if !c.problems.is_empty() {
        let mut p = c.problems;
        p.sort_by_key(|p| (p.line, p.column));
        return Err(p);
    }
    Ok(Policy {
        name: raw.name.unwrap_or_else(|| "policy".into()),
        version: version_of(text),
        classes,
        detectors,
        destinations,
        rules,
        aliases,
        content,
        retention_days: raw.audit.retention_days,
        classify_budget_ms: raw.classification.budget_ms.unwrap_or(100),
    })
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// A document's version: `sha256:` and the first 16 hex digits of its bytes' SHA-256.
pub fn version_of(text: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    d.as_ref()
        .iter()
        .take(8)
        .fold("sha256:".to_string(), |s, b| s + &format!("{b:02x}"))
}

impl Policy {
    /// The policy in force when a site has written none: every built-in detector, and
    /// every request allowed to the appliance's own models (nothing leaves the box).
    pub fn builtin() -> Policy {
        let text = "name = \"built-in: local only\"\n";
        let mut p = parse(text).expect("the built-in policy parses");
        p.version = "builtin".into();
        p
    }
}
