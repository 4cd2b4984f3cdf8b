//! Sampling: turning a step's logits into the next token.
//!
//! Order of operations: logit bias → repetition, frequency and presence penalties →
//! (temperature 0: argmax) → temperature → top-k → top-p → min-p → draw.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::tokenizer::TokenId;

/// How many recent tokens the repetition penalty looks at.
pub const REPETITION_WINDOW: usize = 64;

/// Per-request sampling settings. `Default` is greedy with no limits but `max_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 0 disables min-p.
    pub min_p: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// 1.0 disables the repetition penalty.
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    /// `None`: until the end of the model's context.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub logit_bias: Vec<(TokenId, f32)>,
    /// Keep generating past end-of-generation tokens (for tests and benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty: 1.0,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            logit_bias: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Rejects values no sampler can honour, naming the field.
    pub fn validate(&self, vocab_size: usize) -> Result<()> {
        let bad = |m: String| Err(EngineError::InvalidRequest(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(format!(
                "frequency_penalty must be in [-2, 2], got {}",
                self.frequency_penalty
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(format!(
                "presence_penalty must be in [-2, 2], got {}",
                self.presence_penalty
            ));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if self.max_tokens == Some(0) {
            return bad("max_tokens must be at least 1".into());
        }
        if self.stop.len() > 16 || self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop: at most 16 non-empty sequences".into());
        }
        for (t, b) in &self.logit_bias {
            if *t as usize >= vocab_size {
                return bad(format!(
                    "logit_bias: token {t} is outside the vocabulary of {vocab_size}"
                ));
            }
            if !(-100.0..=100.0).contains(b) {
                return bad(format!(
                    "logit_bias: bias {b} for token {t} is outside [-100, 100]"
                ));
            }
        }
        Ok(())
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Per-sequence sampler state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Occurrence counts of generated tokens (for frequency/presence penalties).
    counts: std::collections::HashMap<TokenId, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, fallback_seed: u64) -> Self {
        let seed = params.seed.unwrap_or(fallback_seed);
        Self {
            params,
            rng: Rng::new(seed),
            counts: Default::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether [`Sampler::sample`] changes the logits it is given (biases, penalties).
    pub fn changes_logits(&self) -> bool {
        let p = &self.params;
        !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
    }

    /// Records a generated token (for the frequency/presence penalties).
    pub fn accept(&mut self, t: TokenId) {
        *self.counts.entry(t).or_default() += 1;
    }

    /// Picks the next token. `recent` is the tail of the sequence so far (prompt and
    /// generated) for the repetition penalty. `logits` is modified in place.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[TokenId]) -> TokenId {
        let p = &self.params;
        for (t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(*t as usize) {
                *l += *b;
            }
        }
        if p.repetition_penalty != 1.0 {
            let start = recent.len().saturating_sub(REPETITION_WINDOW);
            let mut seen = std::collections::HashSet::new();
            for &t in &recent[start..] {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= c as f32 * p.frequency_penalty + p.presence_penalty;
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates (id, logit), reduced step by step.
        let mut cands: Vec<(TokenId, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as TokenId, l / p.temperature))
            .collect();
        if cands.is_empty() {
            return argmax(logits);
        }
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(p.top_k);
        }
        let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(TokenId, f32)> =
            cands.iter().map(|&(i, l)| (i, (l - max).exp())).collect();
        let sum: f32 = probs.iter().map(|c| c.1).sum();
        for c in &mut probs {
            c.1 /= sum;
        }
        if p.top_p < 1.0 {
            probs.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, c) in probs.iter().enumerate() {
                acc += c.1;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let top = probs.iter().map(|c| c.1).fold(0.0, f32::max);
            let floor = top * p.min_p;
            probs.retain(|c| c.1 >= floor);
        }
        let total: f32 = probs.iter().map(|c| c.1).sum();
        let mut r = self.rng.next_f32() * total;
        for c in &probs {
            r -= c.1;
            if r <= 0.0 {
                return c.0;
            }
        }
        probs.last().map(|c| c.0).unwrap_or_else(|| argmax(logits))
    }
}

multiversion! {
    /// The index of the largest logit, the first one on a tie as llama.cpp's greedy
    /// sampler takes it (NaN is never chosen; a
    /// row of nothing but `-inf` or NaN gives 0): the maximum sixteen lanes at a time,
    /// then the first position holding it.
    pub fn argmax(logits: &[f32]) -> TokenId {
        let mut m = [f32::NEG_INFINITY; 16];
        for c in logits.chunks(16) {
            for (a, &v) in m.iter_mut().zip(c) {
                *a = if v > *a { v } else { *a };
            }
        }
        let max = m
            .iter()
            .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
        if max == f32::NEG_INFINITY {
            return 0;
        }
        for (k, c) in logits.chunks(16).enumerate() {
            // `==` also matches the other zero, as `>` treated it as equal.
            if c.iter().fold(false, |hit, &v| hit | (v == max)) {
                let i = c.iter().position(|&v| v == max).unwrap_or(0);
                return (k * 16 + i) as TokenId;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition [`argmax`] keeps: the first index whose value beats all before it.
    fn argmax_plain(logits: &[f32]) -> TokenId {
        let mut best = 0usize;
        let mut best_v = f32::NEG_INFINITY;
        for (i, &v) in logits.iter().enumerate() {
            if v > best_v {
                best_v = v;
                best = i;
            }
        }
        best as TokenId
    }

    #[test]
    fn argmax_is_the_first_largest() {
        let mut rng = Rng::new(3);
        for n in [0usize, 1, 5, 16, 17, 100, 49152] {
            let mut x: Vec<f32> = (0..n).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
            assert_eq!(argmax(&x), argmax_plain(&x), "{n} values");
            if n > 3 {
                // Ties, NaN, infinities and both zeros.
                x[n / 2] = 50.0;
                x[n - 1] = 50.0;
                assert_eq!(argmax(&x), argmax_plain(&x));
                x[1] = f32::NAN;
                assert_eq!(argmax(&x), argmax_plain(&x));
                x[n - 2] = f32::INFINITY;
                assert_eq!(argmax(&x), argmax_plain(&x));
                let zeros: Vec<f32> = (0..n)
                    .map(|i| if i % 3 == 0 { -0.0 } else { 0.0 })
                    .collect();
                assert_eq!(argmax(&zeros), argmax_plain(&zeros));
            }
        }
        for row in [vec![f32::NEG_INFINITY; 20], vec![f32::NAN; 20]] {
            assert_eq!(argmax(&row), 0);
            assert_eq!(argmax_plain(&row), 0);
        }
    }

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_picks_the_max() {
        let mut s = Sampler::new(SamplingParams::default(), 1);
        assert_eq!(s.sample(&mut logits(), &[]), 1);
    }

    #[test]
    fn logit_bias_changes_the_choice() {
        let p = SamplingParams {
            logit_bias: vec![(3, 10.0)],
            ..Default::default()
        };
        let mut s = Sampler::new(p, 1);
        assert_eq!(s.sample(&mut logits(), &[]), 3);
    }

    #[test]
    fn repetition_penalty_discourages_recent_tokens() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 1);
        // 3.0/2 = 1.5 < 2.9: token 4 wins.
        assert_eq!(s.sample(&mut logits(), &[1]), 4);
    }

    #[test]
    fn frequency_and_presence_penalties_apply_to_generated_tokens() {
        let p = SamplingParams {
            presence_penalty: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 1);
        s.accept(1);
        assert_eq!(s.sample(&mut logits(), &[]), 4);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 7);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits(), &[]), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // With top_p tiny only the best token survives.
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.01,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 3);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits(), &[]), 1);
        }
        // min_p 0.95 keeps tokens within 95% of the top probability: 1 and 4 (e^-0.1≈0.905 → only 1).
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.95,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 3);
        for _ in 0..50 {
            assert_eq!(s.sample(&mut logits(), &[]), 1);
        }
    }

    #[test]
    fn same_seed_same_draws_and_sampling_is_spread() {
        let p = SamplingParams {
            temperature: 1.0,
            seed: Some(42),
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), 0);
            (0..200)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&p);
        assert_eq!(a, draw(&p));
        let distinct: std::collections::HashSet<_> = a.iter().collect();
        assert!(
            distinct.len() >= 3,
            "temperature 1 should visit several tokens"
        );
        let other = SamplingParams {
            seed: Some(43),
            ..p
        };
        assert_ne!(a, draw(&other));
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(p.validate(10).unwrap_err().to_string().contains("top_p"));
        let p = SamplingParams {
            logit_bias: vec![(99, 1.0)],
            ..Default::default()
        };
        assert!(p
            .validate(10)
            .unwrap_err()
            .to_string()
            .contains("logit_bias"));
    }
}
