//! The engine's error type: every failure names what it was about.

/// Errors from loading a model or running it.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    // The cause in the message, not as `source`: callers print the chain, which
    // would repeat it.
    #[error("cannot read model file {path}: {err}")]
    Io { path: String, err: std::io::Error },
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf { path: String, reason: String },
    #[error("unsupported model architecture `{0}` (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture(String),
    #[error("unsupported tensor type {dtype} for tensor `{tensor}` (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, Q8_K)")]
    UnsupportedTensorType { tensor: String, dtype: String },
    #[error("model metadata key `{key}` is missing or has the wrong type")]
    MissingMetadata { key: String },
    #[error("model tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{}", overflow(*prompt, *max_tokens, *context))]
    ContextOverflow {
        prompt: usize,
        max_tokens: usize,
        context: usize,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("tensor computation failed: {}", reason(.0))]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// A candle error's message without the backtrace candle attaches when
/// `RUST_BACKTRACE` is set: one line for a log or an API error, not fifty.
pub fn reason(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => reason(inner),
        candle_core::Error::Context { inner, context } => format!("{context}: {}", reason(inner)),
        e => e.to_string(),
    }
}

fn overflow(prompt: usize, max_tokens: usize, context: usize) -> String {
    match max_tokens {
        0 => format!("prompt is {prompt} tokens, but the model's context is {context} tokens (and at least one token must be left to generate)"),
        m => format!("prompt is {prompt} tokens and max_tokens is {m}, but the model's context is {context} tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_candle_backtrace_stays_out_of_the_message() {
        let e = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("unsupported magic".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(e.to_string().contains('\n'), "candle prints it: {e}");
        assert_eq!(reason(&e), "unsupported magic");
        let e = EngineError::Candle(e.context("tensor blk.0"));
        assert_eq!(
            e.to_string(),
            "tensor computation failed: tensor blk.0: unsupported magic"
        );
    }
}
