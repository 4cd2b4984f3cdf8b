//! Sovereignty policy: what is in a request ([`detect`], [`Policy::classify`]) and where
//! it may go ([`doc`]: the policy document; [`Policy::decide`]). Pure: no I/O, no HTTP;
//! the binary reads the files, the gateway applies decisions.

pub mod detect;
pub mod doc;
pub mod redact;

use std::collections::BTreeSet;

pub use doc::{parse, Action, ContentMode, Destination, Kind, Policy, Problem, Rule};

/// Something sensitive in a request: its class, the detector, which part of the request
/// (message index) and where (byte offsets in that part).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    pub class: String,
    pub detector: String,
    pub part: usize,
    pub start: usize,
    pub end: usize,
}

/// What the policy says about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    /// The rule that matched (`default: local only` when the policy has no rules).
    pub rule: String,
    /// The data classes found, sorted.
    pub classes: Vec<String>,
    /// Where the request may go, in order of preference; empty with `local_only`.
    pub destinations: Vec<String>,
    /// The preference tier of each destination: the rule's order, where destinations a
    /// rule lists together (`["a", "b"]`) share one tier and are ranked by load, latency
    /// and price when the request is sent.
    pub tiers: Vec<usize>,
    /// With no rules: any of the appliance's own models, nothing else.
    pub local_only: bool,
    pub version: String,
}

fn word_at(lower: &[u8], start: usize, len: usize) -> bool {
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    (start == 0 || !is_word(lower[start - 1]))
        && (start + len == lower.len() || !is_word(lower[start + len]))
}

impl Policy {
    /// Runs every enabled detector over each part of a request.
    pub fn classify(&self, parts: &[&str]) -> Vec<Detection> {
        let mut out = vec![];
        for (i, text) in parts.iter().enumerate() {
            let lower = text.to_ascii_lowercase();
            let builtins = detect::scan_lower(text, &lower);
            for f in builtins {
                if let Some(d) = self
                    .detectors
                    .iter()
                    .find(|d| d.name == f.detector && d.enabled)
                {
                    out.push(Detection {
                        class: d.class.clone(),
                        detector: d.name.clone(),
                        part: i,
                        start: f.start,
                        end: f.end,
                    });
                }
            }
            for d in self.detectors.iter().filter(|d| d.enabled) {
                if let Some(re) = &d.pattern {
                    for m in re.find_iter(text) {
                        out.push(Detection {
                            class: d.class.clone(),
                            detector: d.name.clone(),
                            part: i,
                            start: m.start(),
                            end: m.end(),
                        });
                    }
                }
                for k in d.keywords.iter().filter(|k| !k.is_empty()) {
                    for at in memchr::memmem::find_iter(lower.as_bytes(), k.as_bytes()) {
                        if word_at(lower.as_bytes(), at, k.len()) {
                            out.push(Detection {
                                class: d.class.clone(),
                                detector: d.name.clone(),
                                part: i,
                                start: at,
                                end: at + k.len(),
                            });
                        }
                    }
                }
            }
        }
        out.sort_by_key(|d| (d.part, d.start, d.end));
        out
    }

    /// The first rule (the tenant's own, then the global ones) that matches; no match
    /// is a denial. A policy without rules keeps every request on the appliance.
    pub fn decide(&self, tenant: &str, found: &[Detection]) -> Decision {
        let mut classes: BTreeSet<String> = found.iter().map(|d| d.class.clone()).collect();
        // A request in no class is `public`, where the policy has that class.
        if classes.is_empty() && self.classes.contains("public") {
            classes.insert("public".into());
        }
        let decision =
            |action, rule: &str, destinations: Vec<String>, tiers, local_only| Decision {
                action,
                rule: rule.to_string(),
                classes: classes.iter().cloned().collect(),
                destinations,
                tiers,
                local_only,
                version: self.version.clone(),
            };
        if self.rules.is_empty() {
            return decision(Action::Allow, "default: local only", vec![], vec![], true);
        }
        for r in &self.rules {
            if r.tenants.as_ref().is_some_and(|t| !t.contains(tenant)) {
                continue;
            }
            let matches = match &r.classes {
                None => true,
                Some(cs) => cs.iter().any(|c| classes.contains(c)),
            };
            if matches {
                return decision(
                    r.action,
                    &r.name,
                    r.destinations.clone(),
                    r.tiers.clone(),
                    false,
                );
            }
        }
        decision(Action::Deny, "no rule matched", vec![], vec![], false)
    }

    /// Whether `model` (a name the client asked for) may serve this decision: a local
    /// model that is one of its destinations (or any local model when `local_only`).
    /// Returns the local model to use: the model itself, or the first allowed local
    /// destination's model when the client named an alias.
    pub fn route_local(&self, d: &Decision, model: &str) -> Option<String> {
        if d.action == Action::Deny {
            return None;
        }
        let alias = self.aliases.get(model);
        if d.local_only {
            return match alias.and_then(|a| self.destinations.get(a)) {
                Some(dest) if dest.kind == Kind::Local => dest.model.clone(),
                Some(_) => None,
                None => Some(model.to_string()),
            };
        }
        let locals: Vec<&Destination> = d
            .destinations
            .iter()
            .filter_map(|n| self.destinations.get(n))
            .filter(|dest| dest.kind == Kind::Local)
            .collect();
        if alias.is_some() {
            // The client asked for "whatever the policy routes to": the first allowed.
            return locals.first().and_then(|dest| dest.model.clone());
        }
        locals
            .iter()
            .find(|dest| dest.model.as_deref() == Some(model))
            .and_then(|dest| dest.model.clone())
    }
}

#[cfg(test)]
mod tests;
