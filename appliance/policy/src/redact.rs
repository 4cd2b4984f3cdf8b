//! Redaction: detected spans are replaced with stable placeholders before a request
//! leaves the appliance, and the placeholders in the answer (whole or streamed) are
//! restored before the client sees it. The mapping lives only in the [`Redaction`] of
//! one request, in memory.

use std::collections::BTreeMap;

use crate::Detection;

/// The placeholders of one request and the values they stand for.
#[derive(Debug, Clone, Default)]
pub struct Redaction {
    /// placeholder → original text
    map: BTreeMap<String, String>,
    /// The longest placeholder (for holding back a partial one in a stream).
    longest: usize,
}

/// A marker no part of the request contains: `[CLASS_n]`, or `[[CLASS_n]]` etc. when the
/// text itself holds such brackets.
fn opener(parts: &[&str]) -> (String, String) {
    let mut open = "[".to_string();
    let mut close = "]".to_string();
    while parts.iter().any(|p| p.contains(open.as_str())) && open.len() < 8 {
        open.push('[');
        close.push(']');
    }
    (open, close)
}

/// Replaces every detected span of `parts` by a placeholder naming its class; the same
/// value gets the same placeholder everywhere in the request. Overlapping detections
/// are merged into the first.
pub fn redact(parts: &[&str], found: &[Detection]) -> (Vec<String>, Redaction) {
    let (open, close) = opener(parts);
    let mut r = Redaction::default();
    let mut by_value: BTreeMap<String, String> = BTreeMap::new();
    let mut counters: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = vec![];
    for (i, text) in parts.iter().enumerate() {
        let mut spans: Vec<&Detection> = found.iter().filter(|d| d.part == i).collect();
        spans.sort_by_key(|d| (d.start, std::cmp::Reverse(d.end)));
        let mut s = String::with_capacity(text.len());
        let mut at = 0;
        for d in spans {
            if d.start < at
                || d.end > text.len()
                || !text.is_char_boundary(d.start)
                || !text.is_char_boundary(d.end)
            {
                continue;
            }
            s.push_str(&text[at..d.start]);
            let value = &text[d.start..d.end];
            let placeholder = by_value
                .entry(value.to_string())
                .or_insert_with(|| {
                    let n = counters.entry(d.class.clone()).or_insert(0);
                    *n += 1;
                    let class: String = d
                        .class
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() {
                                c.to_ascii_uppercase()
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    format!("{open}{class}_{n}{close}")
                })
                .clone();
            r.longest = r.longest.max(placeholder.len());
            r.map.insert(placeholder.clone(), value.to_string());
            s.push_str(&placeholder);
            at = d.end;
        }
        s.push_str(&text[at..]);
        out.push(s);
    }
    (out, r)
}

impl Redaction {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many distinct values were replaced.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The placeholders used (never the values they stand for).
    pub fn placeholders(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    /// Puts the original values back into a whole answer.
    pub fn restore(&self, text: &str) -> String {
        let mut out = text.to_string();
        for (p, v) in &self.map {
            if out.contains(p.as_str()) {
                out = out.replace(p.as_str(), v);
            }
        }
        out
    }

    /// A restorer for an answer that arrives in pieces.
    pub fn stream(&self) -> StreamRestore<'_> {
        StreamRestore {
            r: self,
            pending: String::new(),
        }
    }
}

/// Restores placeholders in a streamed answer: text that could be the start of a
/// placeholder split across pieces is held back until it is known.
#[derive(Debug)]
pub struct StreamRestore<'a> {
    r: &'a Redaction,
    pending: String,
}

impl StreamRestore<'_> {
    /// The text that can be sent now, given the next piece.
    pub fn push(&mut self, piece: &str) -> String {
        self.pending.push_str(piece);
        if self.r.is_empty() {
            return std::mem::take(&mut self.pending);
        }
        // Hold back from the last '[' that might begin a placeholder still incomplete.
        let hold = match self.pending.rfind('[') {
            Some(i) => {
                // Walk back over a run of '[' (markers may be doubled).
                let mut start = i;
                while start > 0 && self.pending.as_bytes()[start - 1] == b'[' {
                    start -= 1;
                }
                let tail = &self.pending[start..];
                let could_be =
                    tail.len() < self.r.longest && self.r.map.keys().any(|p| p.starts_with(tail));
                if could_be {
                    start
                } else {
                    self.pending.len()
                }
            }
            None => self.pending.len(),
        };
        let ready: String = self.pending[..hold].to_string();
        self.pending.replace_range(..hold, "");
        self.r.restore(&ready)
    }

    /// Whatever is still held back, restored.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        self.r.restore(&rest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::scan;

    fn detections(parts: &[&str]) -> Vec<Detection> {
        let mut out = vec![];
        for (i, p) in parts.iter().enumerate() {
            for f in scan(p) {
                out.push(Detection {
                    class: if f.detector == "email" {
                        "PII".into()
                    } else {
                        "PHI".into()
                    },
                    detector: f.detector.into(),
                    part: i,
                    start: f.start,
                    end: f.end,
                });
            }
        }
        out
    }

    #[test]
    fn values_are_replaced_by_stable_placeholders_and_restored() {
        let parts = [
            "You are a clerk.",
            "Write to jane@example.org about NHS 943 476 5919; cc jane@example.org.",
        ];
        let (out, r) = redact(&parts, &detections(&parts));
        assert_eq!(out[0], parts[0]);
        assert_eq!(out[1], "Write to [PII_1] about NHS [PHI_1]; cc [PII_1].");
        assert_eq!(r.len(), 2);
        assert!(!out.concat().contains("jane@") && !out.concat().contains("943"));
        let answer = "Dear [PII_1], your number [PHI_1] is on file.";
        assert_eq!(
            r.restore(answer),
            "Dear jane@example.org, your number 943 476 5919 is on file."
        );
    }

    #[test]
    fn text_with_brackets_gets_markers_it_does_not_contain() {
        let parts = ["Keep [PII_1] as is; mail bob@example.org"];
        let (out, r) = redact(&parts, &detections(&parts));
        assert_eq!(out[0], "Keep [PII_1] as is; mail [[PII_1]]");
        assert_eq!(
            r.restore("to [[PII_1]] re [PII_1]"),
            "to bob@example.org re [PII_1]"
        );
    }

    #[test]
    fn streamed_answers_are_restored_whatever_the_split() {
        let parts = ["Mail jane@example.org and NHS 943 476 5919"];
        let (_, r) = redact(&parts, &detections(&parts));
        let answer = "Sent to [PII_1] (ref [PHI_1]) [not a marker] done [";
        let expected = r.restore(answer);
        for a in 0..answer.len() {
            for b in a..answer.len() {
                if !answer.is_char_boundary(a) || !answer.is_char_boundary(b) {
                    continue;
                }
                let mut s = r.stream();
                let mut got = s.push(&answer[..a]);
                got += &s.push(&answer[a..b]);
                got += &s.push(&answer[b..]);
                got += &s.finish();
                assert_eq!(got, expected, "split at {a}, {b}");
            }
        }
        // Nothing is held back longer than needed: plain text flows at once.
        let mut s = r.stream();
        assert_eq!(s.push("hello "), "hello ");
        assert_eq!(s.push("[PI"), "");
        assert_eq!(s.push("I_1] x"), "jane@example.org x");
    }
}
