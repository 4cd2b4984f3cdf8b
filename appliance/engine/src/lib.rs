//! Local inference on candle: GGUF loading, tokenizer, chat template, sampling, KV cache
//! and the continuous-batching scheduler.
//!
//! The engine knows nothing of tenants, policy, HTTP or processes: it turns prompts into
//! token streams. It never reads the environment, never touches the network and never
//! logs prompt or completion text.

/// Defines `fn NAME(ARGS) -> R { BODY }` so that, in a build that does not target AVX2,
/// FMA and F16C (a portable build), `BODY` also runs compiled with them when the CPU has
/// them: `mul_add` is then one instruction and the loops vectorise. `BODY` and the
/// `#[inline(always)]` helpers it calls are inlined into a `#[target_feature]` twin; the
/// results are the same bits (IEEE operations, the same order). A build that targets the
/// features compiles `BODY` once. Inside `BODY` the constant `AVX2` says whether this copy
/// runs with AVX2, FMA and F16C, so it may call helpers written with their intrinsics.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($a: $t),*) $(-> $r)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<const AVX2: bool>($($a: $t),*) $(-> $r)? $body
            #[cfg(all(
                target_arch = "x86_64",
                not(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))
            ))]
            {
                #[target_feature(enable = "avx2,fma,f16c")]
                #[allow(unsafe_code, clippy::too_many_arguments)]
                unsafe fn twin($($a: $t),*) $(-> $r)? {
                    body::<true>($($a),*)
                }
                if crate::kernels::has_avx2_fma() {
                    // SAFETY: the CPU was seen to have every feature `twin` enables.
                    #[allow(unsafe_code)]
                    return unsafe { twin($($a),*) };
                }
            }
            body::<{
                cfg!(all(
                    target_arch = "x86_64",
                    target_feature = "avx2",
                    target_feature = "fma",
                    target_feature = "f16c"
                ))
            }>($($a),*)
        }
    };
}

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
