//! Precision and recall of the built-in detectors on the labelled corpus
//! (`tests/corpus/detectors.jsonl`, made by `tests/corpus/make_corpus.py` with check
//! digits computed independently of this crate). A finding counts when its detector and
//! exact byte span match a label.

use std::collections::BTreeMap;

use appliance_policy::detect::scan;

#[derive(Default, Debug)]
struct Score {
    tp: u32,
    fp: u32,
    fn_: u32,
    near_miss_hits: u32,
    near_misses: u32,
}

#[test]
fn detectors_meet_their_precision_and_recall() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/corpus/detectors.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("the corpus (tests/corpus/make_corpus.py)");
    let mut scores: BTreeMap<String, Score> = BTreeMap::new();
    let mut mistakes = vec![];
    for line in text.lines() {
        let item: serde_json::Value = serde_json::from_str(line).unwrap();
        let t = item["text"].as_str().unwrap();
        let labels: Vec<(String, usize, usize)> = item["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                (
                    l["detector"].as_str().unwrap().to_string(),
                    l["start"].as_u64().unwrap() as usize,
                    l["end"].as_u64().unwrap() as usize,
                )
            })
            .collect();
        let found: Vec<(String, usize, usize)> = scan(t)
            .into_iter()
            .map(|f| (f.detector.to_string(), f.start, f.end))
            .collect();
        for l in &labels {
            let s = scores.entry(l.0.clone()).or_default();
            if found.contains(l) {
                s.tp += 1;
            } else {
                s.fn_ += 1;
                mistakes.push(format!("missed {}: {t}", l.0));
            }
        }
        for f in &found {
            if !labels.contains(f) {
                scores.entry(f.0.clone()).or_default().fp += 1;
                mistakes.push(format!("false {} {:?}: {t}", f.0, &t[f.1..f.2]));
            }
        }
        if let Some(d) = item["near_miss"].as_str() {
            let s = scores.entry(d.to_string()).or_default();
            s.near_misses += 1;
            if found.iter().any(|f| f.0 == d) {
                s.near_miss_hits += 1;
            }
        }
    }
    println!("| detector | labelled | found | precision | recall | near misses (wrong check digit) reported |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (d, s) in &scores {
        let precision = s.tp as f64 / (s.tp + s.fp).max(1) as f64;
        let recall = s.tp as f64 / (s.tp + s.fn_).max(1) as f64;
        println!(
            "| `{d}` | {} | {} | {:.3} | {:.3} | {} of {} |",
            s.tp + s.fn_,
            s.tp + s.fp,
            precision,
            recall,
            s.near_miss_hits,
            s.near_misses
        );
    }
    for m in mistakes.iter().take(30) {
        println!("{m}");
    }
    for (d, s) in &scores {
        let precision = s.tp as f64 / (s.tp + s.fp).max(1) as f64;
        let recall = s.tp as f64 / (s.tp + s.fn_).max(1) as f64;
        let checksum =
            ["card", "iban", "nhs_number", "bsn", "de_tax_id", "fr_nir"].contains(&d.as_str());
        if checksum {
            assert_eq!(recall, 1.0, "{d}: every valid number is found");
            assert_eq!(
                s.near_miss_hits, 0,
                "{d}: a wrong check digit is never reported"
            );
        }
        assert!(recall >= 0.95, "{d}: recall {recall:.3}");
        assert!(precision >= 0.95, "{d}: precision {precision:.3}");
    }
}
