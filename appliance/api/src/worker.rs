//! The worker protocol, version 1.
//!
//! Newline-delimited JSON over a Unix stream socket. The client sends one [`Request`]
//! per line; the worker answers with one or more [`Response`] lines. A `generate`
//! streams `token` lines and ends with exactly one `done` or `error`. Requests on one
//! connection are served in order; to cancel a generation the client closes the
//! connection, and the worker frees the sequence at its next step.
//!
//! Every request carries `"v": 1`; a worker refuses versions it does not speak with an
//! `error` whose code is `unsupported_version`.

use serde::{Deserialize, Serialize};

/// The protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 1;

/// A line from client to worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Who are you? Answered by [`Response::Hello`].
    Hello,
    /// Liveness and load. Answered by [`Response::Health`].
    Health,
    /// Tokenize text with the model's tokenizer. Answered by [`Response::Tokens`].
    Tokenize {
        text: String,
        #[serde(default = "yes")]
        add_special: bool,
        #[serde(default)]
        parse_special: bool,
    },
    /// Generate. Answered by `token` lines then `done` (or one `error`).
    Generate {
        #[serde(default)]
        request_id: Option<String>,
        prompt: WirePrompt,
        #[serde(default)]
        params: WireParams,
    },
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WirePrompt {
    /// Chat messages, rendered with the model's chat template.
    Chat(Vec<WireMessage>),
    /// Raw text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMessage {
    pub role: String,
    pub content: String,
}

/// Sampling parameters; absent fields take the defaults (greedy, no penalties).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WireParams {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub repetition_penalty: f32,
    pub seed: Option<u64>,
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub logit_bias: Vec<(u32, f32)>,
    pub ignore_eos: bool,
}

impl Default for WireParams {
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

/// A line from worker to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Hello {
        protocol: u32,
        model: WireModelInfo,
    },
    Health {
        ok: bool,
        /// Sequences holding a KV cache now.
        active: u64,
        /// Requests waiting for a batch slot.
        queued: u64,
    },
    Tokens {
        ids: Vec<u32>,
    },
    /// Prompt accepted; generation queued.
    Started {
        prompt_tokens: usize,
    },
    Token {
        id: u32,
        text: String,
        logprob: f32,
    },
    Done {
        finish_reason: WireFinish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireFinish {
    Stop,
    Length,
}

/// Stable error codes, for the gateway to map onto HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line was not a request this worker understands.
    BadRequest,
    UnsupportedVersion,
    /// Parameters out of range, empty prompt, bad token id.
    InvalidRequest,
    /// Prompt plus max_tokens exceed the model's context.
    ContextOverflow,
    /// The engine failed.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireModelInfo {
    pub name: String,
    pub architecture: String,
    pub quantization: String,
    pub context: usize,
    pub vocab_size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_round_trip() {
        let line = r#"{"v":1,"op":"generate","prompt":{"chat":[{"role":"user","content":"hi"}]},"params":{"max_tokens":4,"seed":7}}"#;
        let r: Request = serde_json::from_str(line).unwrap();
        assert_eq!(r.v, 1);
        match &r.op {
            Op::Generate { prompt, params, .. } => {
                assert_eq!(params.max_tokens, Some(4));
                assert_eq!(params.seed, Some(7));
                assert_eq!(params.top_p, 1.0);
                assert!(matches!(prompt, WirePrompt::Chat(m) if m[0].content == "hi"));
            }
            other => panic!("{other:?}"),
        }
        let back: Request = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn unknown_params_are_rejected() {
        let line = r#"{"v":1,"op":"generate","prompt":{"text":"x"},"params":{"temprature":1}}"#;
        assert!(serde_json::from_str::<Request>(line).is_err());
    }

    #[test]
    fn responses_are_tagged() {
        let s = serde_json::to_string(&Response::Done {
            finish_reason: WireFinish::Length,
            prompt_tokens: 3,
            completion_tokens: 2,
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"type":"done","finish_reason":"length","prompt_tokens":3,"completion_tokens":2}"#
        );
    }
}
