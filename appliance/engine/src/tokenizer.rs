//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`).
//!
//! Two families: GPT-2 style byte-level BPE (`gpt2`) with the pre-tokenizer the file
//! declares in `tokenizer.ggml.pre`, and SentencePiece-style BPE over scores (`llama`).
//! The behaviour follows llama.cpp's, which is the reference the tests compare against:
//! special tokens are split out of the text first (longest first), then each plain
//! fragment is pre-tokenized and merged.

use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;
use fancy_regex::Regex;

use crate::error::{EngineError, Result};
use crate::gguf::{meta_bool, meta_str, meta_u64};

pub type TokenId = u32;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_i64(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    /// Byte-level BPE with merges (GPT-2, Llama 3, Qwen2, SmolLM).
    Bpe,
    /// SentencePiece BPE driven by token scores (Llama 2, Mistral).
    Spm,
}

/// A tokenizer for one model file. Immutable and cheap to share.
pub struct Tokenizer {
    model: Model,
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, TokenId>,
    merge_ranks: HashMap<String, u32>,
    pre_regexes: Vec<Regex>,
    /// The name of the pre-tokenizer in use (`tokenizer.ggml.pre`, or "default").
    pub pre_name: String,
    /// Special tokens matched in text when `parse_special` is on, longest first.
    special_sorted: Vec<TokenId>,
    byte_encoder: [char; 256],
    byte_decoder: HashMap<char, u8>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    /// Tokens that end a generation (EOS, end-of-turn and similar control tokens).
    pub eog: Vec<TokenId>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    ignore_merges: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("vocab", &self.tokens.len())
            .field("pre", &self.pre_name)
            .finish()
    }
}

/// Pre-tokenizer regexes per `tokenizer.ggml.pre`, as llama.cpp applies them: each
/// expression splits every piece produced by the previous one, keeping both the matches
/// and the text between them.
fn pre_tokenizer_regexes(pre: &str) -> Result<(Vec<&'static str>, bool)> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // (expressions, ignore_merges)
    let r = match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (vec![LLAMA3], true)
        }
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (vec![r"\p{N}", GPT2], false)
        }
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "mpt" | "olmo" | "jais" | "trillion" => {
            (vec![GPT2], false)
        }
        "qwen2" | "stablelm2" | "hunyuan" | "deepseek-r1-qwen" => (vec![QWEN2], false),
        "default" | "" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        other => {
            return Err(EngineError::Tokenizer(format!(
                "unsupported pre-tokenizer `{other}` (supported: llama3, llama-bpe, smollm, gpt-2, qwen2, starcoder, default)"
            )))
        }
    };
    Ok(r)
}

fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('?')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('?');
            n += 1;
            c
        };
    }
    table
}

fn string_array(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    match md.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(EngineError::MissingMetadata { key: key.into() }),
            })
            .collect(),
        _ => Err(EngineError::MissingMetadata { key: key.into() }),
    }
}

fn value_i64(v: &Value) -> Option<i64> {
    Some(match v {
        Value::I8(x) => *x as i64,
        Value::U8(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I64(x) => *x,
        Value::U64(x) => *x as i64,
        _ => return None,
    })
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let model_name = meta_str(md, "tokenizer.ggml.model").unwrap_or("llama");
        let model = match model_name {
            "gpt2" => Model::Bpe,
            "llama" => Model::Spm,
            other => {
                return Err(EngineError::Tokenizer(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        let tokens = string_array(md, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let kinds: Vec<TokenKind> = match md.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| TokenKind::from_i64(value_i64(v).unwrap_or(1)))
                .collect(),
            _ => vec![TokenKind::Normal; n],
        };
        let scores: Vec<f32> = match md.get("tokenizer.ggml.scores") {
            Some(Value::Array(a)) if a.len() == n => a
                .iter()
                .map(|v| match v {
                    Value::F32(f) => *f,
                    Value::F64(f) => *f as f32,
                    _ => 0.0,
                })
                .collect(),
            _ => vec![0.0; n],
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(i as TokenId);
        }
        let mut merge_ranks = HashMap::new();
        let (pre_regexes, pre_name, ignore_merges) = if model == Model::Bpe {
            let merges = string_array(md, "tokenizer.ggml.merges")?;
            for (i, m) in merges.into_iter().enumerate() {
                // "left right"; the separator is the first space after position 0.
                if m.chars().skip(1).any(|c| c == ' ') {
                    merge_ranks.entry(m).or_insert(i as u32);
                }
            }
            let pre = meta_str(md, "tokenizer.ggml.pre")
                .unwrap_or("default")
                .to_string();
            let (exprs, ignore) = pre_tokenizer_regexes(&pre)?;
            let regexes = exprs
                .into_iter()
                .map(|e| {
                    Regex::new(e).map_err(|err| {
                        EngineError::Tokenizer(format!("pre-tokenizer regex: {err}"))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (regexes, pre, ignore)
        } else {
            (Vec::new(), "spm".to_string(), false)
        };
        let id = |k: &str| {
            meta_u64(md, k)
                .map(|v| v as TokenId)
                .filter(|&v| (v as usize) < n)
        };
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let (default_bos, default_space) = match model {
            Model::Bpe => (false, false),
            Model::Spm => (true, true),
        };
        let add_bos =
            meta_bool(md, "tokenizer.ggml.add_bos_token").unwrap_or(default_bos) && bos.is_some();
        let add_eos =
            meta_bool(md, "tokenizer.ggml.add_eos_token").unwrap_or(false) && eos.is_some();
        let add_space_prefix =
            meta_bool(md, "tokenizer.ggml.add_space_prefix").unwrap_or(default_space);

        let mut special_sorted: Vec<TokenId> = (0..n as TokenId)
            .filter(|&i| {
                matches!(
                    kinds[i as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !tokens[i as usize].is_empty()
            })
            .collect();
        special_sorted.sort_by(|a, b| tokens[*b as usize].len().cmp(&tokens[*a as usize].len()));

        let mut eog: Vec<TokenId> = Vec::new();
        for k in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(t) = id(k) {
                eog.push(t);
            }
        }
        const EOG_TEXTS: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|eom_id|>",
            "<EOT>",
            "<|end_of_text|>",
            "</s>",
        ];
        for (i, t) in tokens.iter().enumerate() {
            if kinds[i] == TokenKind::Control && EOG_TEXTS.contains(&t.as_str()) {
                eog.push(i as TokenId);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let byte_encoder = bytes_to_unicode();
        let byte_decoder = byte_encoder
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        Ok(Self {
            model,
            tokens,
            kinds,
            scores,
            token_to_id,
            merge_ranks,
            pre_regexes,
            pre_name,
            special_sorted,
            byte_encoder,
            byte_decoder,
            bos,
            eos,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            ignore_merges,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn token_text(&self, id: TokenId) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.token_to_id.get(text).copied()
    }

    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    pub fn is_control(&self, id: TokenId) -> bool {
        matches!(
            self.kinds.get(id as usize),
            Some(TokenKind::Control | TokenKind::Unknown)
        )
    }

    /// Tokenizes `text`. With `add_special`, BOS/EOS are added as the model asks;
    /// with `parse_special`, special-token texts (e.g. `<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let fragments = self.partition_special(text, parse_special);
        let mut prev_special = true;
        for frag in fragments {
            match frag {
                Fragment::Token(t) => {
                    out.push(t);
                    prev_special = true;
                }
                Fragment::Text(s) => {
                    match self.model {
                        Model::Bpe => self.encode_bpe_fragment(s, &mut out),
                        Model::Spm => {
                            let mut t = String::with_capacity(s.len() + 3);
                            if self.add_space_prefix && prev_special {
                                t.push(' ');
                            }
                            t.push_str(s);
                            self.encode_spm_fragment(&t.replace(' ', "\u{2581}"), &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            if let Some(e) = self.eos {
                out.push(e);
            }
        }
        out
    }

    fn partition_special<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &sid in &self.special_sorted {
            let kind = self.kinds[sid as usize];
            if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let needle = self.tokens[sid as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                match f {
                    Fragment::Text(s) if s.contains(needle) => {
                        let mut rest = s;
                        while let Some(pos) = rest.find(needle) {
                            if pos > 0 {
                                next.push(Fragment::Text(&rest[..pos]));
                            }
                            next.push(Fragment::Token(sid));
                            rest = &rest[pos + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    /// Splits text with the pre-tokenizer: every expression splits each current piece,
    /// keeping the matches and the unmatched text between them.
    pub fn pre_tokenize<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.pre_regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                let mut last = 0;
                for m in re.find_iter(p) {
                    let Ok(m) = m else { break };
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    if m.end() > m.start() {
                        next.push(&p[m.start()..m.end()]);
                    }
                    last = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }

    fn encode_bpe_fragment(&self, text: &str, out: &mut Vec<TokenId>) {
        for word in self.pre_tokenize(text) {
            let encoded: String = word
                .bytes()
                .map(|b| self.byte_encoder[b as usize])
                .collect();
            if self.ignore_merges {
                if let Some(&id) = self.token_to_id.get(&encoded) {
                    out.push(id);
                    continue;
                }
            }
            let mut symbols: Vec<String> = encoded.chars().map(String::from).collect();
            let mut key = String::new();
            loop {
                let mut best: Option<(u32, usize)> = None;
                for i in 0..symbols.len().saturating_sub(1) {
                    key.clear();
                    key.push_str(&symbols[i]);
                    key.push(' ');
                    key.push_str(&symbols[i + 1]);
                    if let Some(&r) = self.merge_ranks.get(&key) {
                        if best.is_none_or(|(br, _)| r < br) {
                            best = Some((r, i));
                        }
                    }
                }
                let Some((_, i)) = best else { break };
                let right = symbols.remove(i + 1);
                symbols[i].push_str(&right);
            }
            for s in symbols {
                if let Some(&id) = self.token_to_id.get(&s) {
                    out.push(id);
                } else {
                    // Not in the vocabulary: fall back to one token per character.
                    for c in s.chars() {
                        if let Some(&id) =
                            self.token_to_id.get(c.encode_utf8(&mut [0u8; 4]) as &str)
                        {
                            out.push(id);
                        }
                    }
                }
            }
        }
    }

    fn encode_spm_fragment(&self, text: &str, out: &mut Vec<TokenId>) {
        // Symbols as a doubly linked list over the text's characters.
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        #[derive(PartialEq)]
        struct Bigram {
            score: f32,
            left: usize,
            right: usize,
            size: usize,
        }
        impl Eq for Bigram {}
        impl PartialOrd for Bigram {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Bigram {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                // Highest score first; on a tie, the leftmost.
                self.score
                    .total_cmp(&o.score)
                    .then_with(|| o.left.cmp(&self.left))
            }
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if i > 0 {
                syms[i - 1].next = Some(i);
            }
        }
        let mut heap = BinaryHeap::new();
        let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &Vec<Sym>, l: usize, r: usize| {
            let s = &text[syms[l].start..syms[r].start + syms[r].len];
            if let Some(&id) = self.token_to_id.get(s) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size: s.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(&mut heap, &syms, i - 1, i);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(n) = syms[r].next {
                syms[n].prev = Some(l);
            }
            if let Some(p) = syms[l].prev {
                try_add(&mut heap, &syms, p, l);
            }
            if let Some(n) = syms[l].next {
                try_add(&mut heap, &syms, l, n);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(idx) = i {
            let s = &text[syms[idx].start..syms[idx].start + syms[idx].len];
            if let Some(&id) = self.token_to_id.get(s) {
                out.push(id);
            } else {
                for b in s.bytes() {
                    let name = format!("<0x{b:02X}>");
                    if let Some(&id) = self.token_to_id.get(&name) {
                        out.push(id);
                    } else if let Some(u) = self.kinds.iter().position(|k| *k == TokenKind::Unknown)
                    {
                        out.push(u as TokenId);
                    }
                }
            }
            i = syms[idx].next;
        }
    }

    /// The bytes a token stands for. Control tokens give nothing unless `special`.
    pub fn token_bytes(&self, id: TokenId, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            TokenKind::Control | TokenKind::Unknown => {
                if special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenKind::UserDefined => text.as_bytes().to_vec(),
            TokenKind::Unused => Vec::new(),
            TokenKind::Byte => {
                let hex = text.trim_start_matches("<0x").trim_end_matches('>');
                u8::from_str_radix(hex, 16)
                    .map(|b| vec![b])
                    .unwrap_or_default()
            }
            TokenKind::Normal => match self.model {
                Model::Bpe => text
                    .chars()
                    .map(|c| self.byte_decoder.get(&c).copied().unwrap_or(b'?'))
                    .collect(),
                Model::Spm => text.replace('\u{2581}', " ").into_bytes(),
            },
        }
    }

    /// Decodes a whole token sequence to text (invalid UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[TokenId], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| self.token_bytes(i, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(TokenId),
}

/// Turns a stream of token byte pieces into text without ever emitting a broken UTF-8
/// sequence: an incomplete trailing sequence waits for the next piece; bytes that can
/// never become valid are replaced by U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: the prefix was just validated.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        None => {
                            // Incomplete sequence at the end: keep it for later.
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Flushes what is left at the end of a stream.
    pub fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            return String::new();
        }
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_never_splits_a_character() {
        let text = "héllo 世界 🎉!";
        let bytes = text.as_bytes();
        let mut s = Utf8Stream::new();
        let mut out = String::new();
        for b in bytes {
            let piece = s.push(&[*b]);
            // Every emitted piece is valid UTF-8 by construction; check nothing partial leaks.
            assert!(!piece.contains('\u{FFFD}'));
            out.push_str(&piece);
        }
        out.push_str(&s.finish());
        assert_eq!(out, text);
    }

    #[test]
    fn utf8_stream_replaces_invalid_bytes() {
        let mut s = Utf8Stream::new();
        let out = s.push(&[b'a', 0xFF, b'b']);
        assert_eq!(out, "a\u{FFFD}b");
        let out = s.push(&[0xE4, 0xB8]);
        assert_eq!(out, "");
        assert_eq!(s.finish(), "\u{FFFD}");
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let mut seen = std::collections::HashSet::new();
        for c in t {
            assert!(seen.insert(c));
        }
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], '\u{120}');
    }
}
