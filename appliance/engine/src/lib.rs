//! Local inference on candle: GGUF loading, tokenizer, chat template, sampling, KV cache
//! and the continuous-batching scheduler.
//!
//! The engine knows nothing of tenants, policy, HTTP or processes: it turns prompts into
//! token streams. It never reads the environment, never touches the network and never
//! logs prompt or completion text.

pub mod engine;
pub mod error;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod pool;
pub mod sampling;
pub mod template;
pub mod tokenizer;

pub use engine::{
    Completion, DeviceSpec, Engine, EngineConfig, Event, FinishReason, GenerateRequest, ModelInfo,
    Prompt, RequestHandle,
};
pub use error::{EngineError, Result};
pub use sampling::SamplingParams;
pub use template::ChatMessage;
pub use tokenizer::{TokenId, Tokenizer};
