//! Agreement with llama.cpp on the real SmolLM2-135M-Instruct Q4_1 file.
//!
//! The expected values come from `tests/oracle/make_fixtures.py`, which runs llama.cpp
//! (llama-cpp-python) on the same file; re-run it to refresh them.

mod common;

use appliance_engine::gguf::GgufFile;
use appliance_engine::model::{BatchItem, Model};
use appliance_engine::template::ChatMessage;
use appliance_engine::{Engine, EngineConfig, GenerateRequest, Prompt, SamplingParams, Tokenizer};
use candle_core::Device;
use common::*;

fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn tokenizer_matches_llama_cpp_and_round_trips() {
    let file = GgufFile::open(&model_path()).unwrap();
    let tok = Tokenizer::from_gguf_metadata(file.metadata()).unwrap();
    assert_eq!(tok.pre_name, "smollm");
    let fx = fixture();
    let cases = fx["tokenizer_cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let plain = tok.encode(text, true, false);
        if plain != ids(&c["ids"]) {
            failures.push(format!("{text:?}\n  ours  {plain:?}\n  llama {:?}", ids(&c["ids"])));
        }
        let special = tok.encode(text, true, true);
        if special != ids(&c["ids_special"]) {
            failures.push(format!(
                "(special) {text:?}\n  ours  {special:?}\n  llama {:?}",
                ids(&c["ids_special"])
            ));
        }
        // Decoding gives back the text exactly (this vocabulary is byte-level).
        assert_eq!(tok.decode(&plain, true), text, "round trip of {text:?}");
    }
    assert!(failures.is_empty(), "tokenization differs from llama.cpp:\n{}", failures.join("\n"));
}

#[test]
fn chat_template_renders_like_jinja2() {
    let engine = Engine::load(&model_path(), EngineConfig::default()).unwrap();
    assert!(engine.info().chat_template_from_file);
    for c in fixture()["greedy_cases"].as_array().unwrap() {
        let msgs = messages(&c["messages"]);
        let text = engine.template().render(&msgs, true).unwrap();
        assert_eq!(text, c["prompt_text"].as_str().unwrap());
        let ids_ours = engine.tokenize_prompt(&Prompt::Chat(msgs)).unwrap();
        assert_eq!(ids_ours, ids(&c["prompt_ids"]));
    }
}

/// Tolerance on the first step's top-64 logits (magnitude 20-35).
///
/// Justification, measured on this file: llama.cpp disagrees with *itself* by up to
/// 0.77 on the top logit when only its precision settings change (f16 vs f32 KV cache,
/// flash attention on or off), because on a 135M-parameter Q4_1 model the rounding of
/// activations to 8 bits and of keys/values to 16 bits moves every logit coherently.
/// Our engine lands inside that spread (largest difference seen: about 0.5). 1.0 still
/// catches any real defect: a wrong RoPE, norm, head layout or mask moves logits by
/// several units and reorders the top tokens.
const TOL_LOGIT: f32 = 1.0;
/// The top token's log-probability (shift-invariant) must agree more tightly.
const TOL_LOGPROB: f32 = 0.15;
#[test]
fn first_step_logits_agree_within_tolerance() {
    let file = GgufFile::open(&model_path()).unwrap();
    let model = Model::load(&file, &Device::Cpu, Some(2048)).unwrap();
    let mut worst = 0f32;
    for c in fixture()["greedy_cases"].as_array().unwrap() {
        let prompt = ids(&c["prompt_ids"]);
        let mut cache = model.new_cache().unwrap();
        let logits = model
            .forward(&mut [BatchItem {
                tokens: &prompt,
                cache: &mut cache,
                want_logits: true,
            }])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let lse_ref = c["first_logsumexp"].as_f64().unwrap() as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        for pair in c["first_logits_top"].as_array().unwrap() {
            let id = pair[0].as_u64().unwrap() as usize;
            let expected = pair[1].as_f64().unwrap() as f32;
            let diff = (logits[id] - expected).abs();
            worst = worst.max(diff);
            assert!(diff < TOL_LOGIT, "token {id}: ours {} llama.cpp {expected}", logits[id]);
        }
        let top = c["first_logits_top"][0][0].as_u64().unwrap() as usize;
        let lp_ours = logits[top] - lse;
        let lp_ref = c["first_logits_top"][0][1].as_f64().unwrap() as f32 - lse_ref;
        assert!((lp_ours - lp_ref).abs() < TOL_LOGPROB, "log p of top token: ours {lp_ours} llama.cpp {lp_ref}");
    }
    eprintln!("largest top-64 logit difference: {worst}");
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

#[test]
fn greedy_decode_matches_llama_cpp_sequential_and_batched() {
    let engine = Engine::load(&model_path(), EngineConfig::default()).unwrap();
    let cases: Vec<_> = fixture()["greedy_cases"].as_array().unwrap().clone();
    assert_eq!(cases.len(), 10);
    let expected: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["generated_ids"])).collect();

    // One at a time.
    let mut seq_out = Vec::new();
    for c in &cases {
        let out = engine
            .generate_blocking(GenerateRequest {
                prompt: Prompt::Chat(messages(&c["messages"])),
                params: greedy(16),
            })
            .unwrap();
        assert_eq!(out.tokens.len(), 16);
        seq_out.push(out.tokens);
    }
    let agree = seq_out.iter().zip(&expected).filter(|(a, b)| a == b).count();
    for (i, (a, b)) in seq_out.iter().zip(&expected).enumerate() {
        if a != b {
            eprintln!("case {i} differs:\n  ours  {a:?}\n  llama {b:?}");
        }
    }
    eprintln!("free-running greedy: {agree}/10 continuations equal llama.cpp's over 16 tokens");
    // llama.cpp itself, with only its KV-cache precision changed (f32 instead of f16),
    // reproduces 4/10 of its own default continuations on this file: the small Q4_1
    // model is full of near-ties. The per-step check below is the strict one.
    assert!(agree >= 4, "only {agree}/10 greedy continuations equal llama.cpp's");

    // All ten at once: continuous batching must not change what a sequence computes
    // beyond rounding (the batched kernels sum in another order).
    let handles: Vec<_> = cases
        .iter()
        .map(|c| {
            engine
                .submit(GenerateRequest {
                    prompt: Prompt::Chat(messages(&c["messages"])),
                    params: greedy(16),
                })
                .unwrap()
        })
        .collect();
    let mut batched = Vec::new();
    for mut h in handles {
        let mut toks = Vec::new();
        while let Some(ev) = h.events.blocking_recv() {
            match ev {
                appliance_engine::Event::Token { id, .. } => toks.push(id),
                appliance_engine::Event::Done { completion_tokens, .. } => {
                    assert_eq!(completion_tokens, 16);
                    break;
                }
                appliance_engine::Event::Error(e) => panic!("{e}"),
            }
        }
        batched.push(toks);
    }
    let same = batched.iter().zip(&seq_out).filter(|(a, b)| a == b).count();
    assert!(same >= 9, "batched decoding changed {} of 10 continuations", 10 - same);
}

/// Teacher-forced agreement: feed llama.cpp's own 16 greedy tokens after each prompt and
/// check, at every one of the 160 steps, that our argmax is llama.cpp's token, or that
/// llama.cpp's token is a near-tie in our logits (within NEAR_TIE of our best). This does not
/// compound divergences, so it checks every step's computation, not just the first.
const NEAR_TIE: f32 = 0.5;

#[test]
fn every_greedy_step_agrees_with_llama_cpp_when_teacher_forced() {
    let file = GgufFile::open(&model_path()).unwrap();
    let model = Model::load(&file, &Device::Cpu, Some(2048)).unwrap();
    let (mut exact, mut steps, mut worst, mut far) = (0, 0, 0f32, 0);
    for c in fixture()["greedy_cases"].as_array().unwrap() {
        let prompt = ids(&c["prompt_ids"]);
        let gen = ids(&c["generated_ids"]);
        let mut cache = model.new_cache().unwrap();
        let mut input = prompt.clone();
        for &expected in &gen {
            let logits = model
                .forward(&mut [BatchItem {
                    tokens: &input,
                    cache: &mut cache,
                    want_logits: true,
                }])
                .unwrap()
                .pop()
                .unwrap()
                .unwrap();
            let best = appliance_engine::sampling::argmax(&logits);
            steps += 1;
            if best == expected {
                exact += 1;
            }
            let margin = logits[best as usize] - logits[expected as usize];
            worst = worst.max(margin);
            if margin >= NEAR_TIE {
                eprintln!("step {steps}: llama.cpp chose {expected}, we prefer {best} by {margin}");
                far += 1;
            }
            input = vec![expected];
        }
    }
    eprintln!("teacher-forced: {exact}/{steps} steps with the same argmax; largest near-tie margin {worst}");
    assert!(exact * 100 >= steps * 95, "only {exact}/{steps} steps agree");
    assert_eq!(far, 0, "{far} steps where llama.cpp's token is no near-tie for us");
}
