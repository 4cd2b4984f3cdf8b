//! The engine on tiny random-weight GGUF files the test writes itself: every supported
//! quantization, both architectures, both tokenizer families, the error paths, and the
//! scheduler (batching, chunked prefill, cancellation, context limits).

use std::path::{Path, PathBuf};

use appliance_engine::gguf::GgufFile;
use appliance_engine::model::{BatchItem, Model};
use appliance_engine::sampling::Rng;
use appliance_engine::{
    Engine, EngineConfig, EngineError, Event, FinishReason, GenerateRequest, Prompt,
    SamplingParams, Tokenizer,
};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const EMBD: usize = 256;
const FF: usize = 256;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HD: usize = EMBD / HEADS;
const LAYERS: usize = 2;

fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(256 + n).unwrap();
                n += 1;
                c
            }
        })
        .collect()
}

struct Spec {
    arch: &'static str,
    dtype: GgmlDType,
    bias: bool,
    spm: bool,
    context: u32,
    seed: u64,
    /// `general.file_type`, when the file names its type (llama.cpp's `LLAMA_FTYPE_*`).
    file_type: Option<u32>,
    /// `feed_forward_length` to write when it is not the tensors' (a broken file).
    ff_in_metadata: Option<usize>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            arch: "llama",
            dtype: GgmlDType::F32,
            bias: false,
            spm: false,
            context: 256,
            seed: 1,
            file_type: None,
            ff_in_metadata: None,
        }
    }
}

fn rand_tensor(rng: &mut Rng, shape: (usize, usize), scale: f32) -> Tensor {
    let v: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| (rng.next_f32() - 0.5) * 2.0 * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn vocab(spec: &Spec) -> (Vec<String>, Vec<i32>, Vec<f32>, Vec<String>) {
    let mut tokens = Vec::new();
    let mut types = Vec::new();
    let mut scores = Vec::new();
    let mut merges = Vec::new();
    if spec.spm {
        for (t, ty) in [("<unk>", 2), ("<s>", 3), ("</s>", 3)] {
            tokens.push(t.to_string());
            types.push(ty);
            scores.push(0.0);
        }
        for b in 0..256 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (t, s) in [
            ("\u{2581}", -1.0),
            ("t", -2.0),
            ("h", -2.0),
            ("e", -2.0),
            ("a", -2.0),
            ("c", -2.0),
            ("he", -3.0),
            ("\u{2581}t", -3.5),
            ("\u{2581}the", -1.5),
            ("\u{2581}c", -4.0),
            ("at", -4.0),
        ] {
            tokens.push(t.to_string());
            types.push(1);
            scores.push(s);
        }
    } else {
        for c in byte_chars() {
            tokens.push(c.to_string());
            types.push(1);
            scores.push(0.0);
        }
        for (a, b) in [
            ("Ġ", "t"),
            ("h", "e"),
            ("Ġt", "he"),
            ("c", "a"),
            ("ca", "t"),
        ] {
            merges.push(format!("{a} {b}"));
            tokens.push(format!("{a}{b}"));
            types.push(1);
            scores.push(0.0);
        }
        for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
            tokens.push(t.to_string());
            types.push(3);
            scores.push(0.0);
        }
    }
    (tokens, types, scores, merges)
}

fn write_model(path: &Path, spec: &Spec) {
    let (tokens, types, scores, merges) = vocab(spec);
    let n_vocab = tokens.len();
    let mut rng = Rng::new(spec.seed);
    let q = |t: &Tensor, d: GgmlDType| QTensor::quantize(t, d).unwrap();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    tensors.push((
        "token_embd.weight".into(),
        q(&rand_tensor(&mut rng, (n_vocab, EMBD), 1.0), spec.dtype),
    ));
    // A separate output head (the real model covers tied embeddings), small enough that
    // sampling at temperature 1 visits several tokens.
    tensors.push((
        "output.weight".into(),
        q(&rand_tensor(&mut rng, (n_vocab, EMBD), 0.1), spec.dtype),
    ));
    let ones = Tensor::ones(EMBD, candle_core::DType::F32, &Device::Cpu).unwrap();
    tensors.push(("output_norm.weight".into(), q(&ones, GgmlDType::F32)));
    for l in 0..LAYERS {
        let p = |s: &str| format!("blk.{l}.{s}");
        tensors.push((p("attn_norm.weight"), q(&ones, GgmlDType::F32)));
        tensors.push((p("ffn_norm.weight"), q(&ones, GgmlDType::F32)));
        for (name, shape) in [
            ("attn_q.weight", (EMBD, EMBD)),
            ("attn_k.weight", (KV_HEADS * HD, EMBD)),
            ("attn_v.weight", (KV_HEADS * HD, EMBD)),
            ("attn_output.weight", (EMBD, EMBD)),
            ("ffn_gate.weight", (FF, EMBD)),
            ("ffn_up.weight", (FF, EMBD)),
            ("ffn_down.weight", (EMBD, FF)),
        ] {
            tensors.push((p(name), q(&rand_tensor(&mut rng, shape, 0.08), spec.dtype)));
        }
        if spec.bias {
            for (name, n) in [
                ("attn_q.bias", EMBD),
                ("attn_k.bias", KV_HEADS * HD),
                ("attn_v.bias", KV_HEADS * HD),
            ] {
                let b = rand_tensor(&mut rng, (1, n), 0.5).reshape(n).unwrap();
                tensors.push((p(name), q(&b, GgmlDType::F32)));
            }
        }
    }
    let a = spec.arch;
    let s = |v: &str| Value::String(v.to_string());
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(a)),
        ("general.name".into(), s("tiny")),
        (format!("{a}.block_count"), Value::U32(LAYERS as u32)),
        (format!("{a}.context_length"), Value::U32(spec.context)),
        (format!("{a}.embedding_length"), Value::U32(EMBD as u32)),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(spec.ff_in_metadata.unwrap_or(FF) as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(HEADS as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(KV_HEADS as u32),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|t| Value::I32(*t)).collect()),
        ),
    ];
    if let Some(t) = spec.file_type {
        md.push(("general.file_type".into(), Value::U32(t)));
    }
    if spec.spm {
        md.push(("tokenizer.ggml.model".into(), s("llama")));
        md.push((
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.iter().map(|x| Value::F32(*x)).collect()),
        ));
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(1)));
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(2)));
    } else {
        md.push(("tokenizer.ggml.model".into(), s("gpt2")));
        md.push(("tokenizer.ggml.pre".into(), s("smollm")));
        md.push((
            "tokenizer.ggml.merges".into(),
            Value::Array(merges.iter().map(|m| s(m)).collect()),
        ));
        md.push((
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32((n_vocab - 1) as u32),
        ));
        md.push((
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32((n_vocab - 2) as u32),
        ));
    }
    let mut f = std::fs::File::create(path).unwrap();
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("engine-tiny-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn first_logits(path: &Path, prompt: &[u32]) -> Vec<f32> {
    let file = GgufFile::open(path).unwrap();
    let model = Model::load(&file, &Device::Cpu, None).unwrap();
    let mut cache = model.new_cache().unwrap();
    model
        .forward(&mut [BatchItem {
            tokens: prompt,
            cache: &mut cache,
            want_logits: true,
            prompt_rows: prompt.len() >= 2,
        }])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

fn correlation(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f32;
    let (ma, mb) = (a.iter().sum::<f32>() / n, b.iter().sum::<f32>() / n);
    let cov: f32 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f32 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f32 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va.sqrt() * vb.sqrt())
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_tokens: Some(n),
        ignore_eos: true,
        ..Default::default()
    }
}

fn run(engine: &Engine, prompt: Prompt, params: SamplingParams) -> Vec<u32> {
    engine
        .generate_blocking(GenerateRequest { prompt, params })
        .unwrap()
        .tokens
}

#[test]
fn every_supported_quantization_loads_and_tracks_f32() {
    let prompt: Vec<u32> = (10..40).collect();
    let reference = tmp("f32.gguf");
    write_model(&reference, &Spec::default());
    let ref_logits = first_logits(&reference, &prompt);
    for (dtype, name, min_corr) in [
        (GgmlDType::F16, "F16", 0.999),
        (GgmlDType::Q8_0, "Q8_0", 0.99),
        (GgmlDType::Q6K, "Q6_K", 0.98),
        (GgmlDType::Q5K, "Q5_K", 0.95),
        (GgmlDType::Q4K, "Q4_K", 0.9),
        (GgmlDType::Q4_0, "Q4_0", 0.9),
        (GgmlDType::Q4_1, "Q4_1", 0.9),
    ] {
        let p = tmp(&format!("{dtype:?}.gguf"));
        write_model(
            &p,
            &Spec {
                dtype,
                ..Default::default()
            },
        );
        let file = GgufFile::open(&p).unwrap();
        assert_eq!(file.quantization(), name);
        if dtype == GgmlDType::Q8_0 {
            // A file that names its type is that type, whatever most matrices are (a
            // "Q6_K" file of a model whose rows are not multiples of 256 is mostly Q8_0).
            let named = tmp("named-q6k.gguf");
            write_model(
                &named,
                &Spec {
                    dtype,
                    file_type: Some(18),
                    ..Default::default()
                },
            );
            assert_eq!(GgufFile::open(&named).unwrap().quantization(), "Q6_K");
        }
        let l = first_logits(&p, &prompt);
        let c = correlation(&l, &ref_logits);
        assert!(c > min_corr, "{dtype:?}: correlation with f32 logits {c}");
        let engine = Engine::load(&p, EngineConfig::default()).unwrap();
        let a = run(&engine, Prompt::Tokens(prompt.clone()), greedy(6));
        assert_eq!(a.len(), 6);
        assert_eq!(
            a,
            run(&engine, Prompt::Tokens(prompt.clone()), greedy(6)),
            "{dtype:?} greedy not deterministic"
        );
    }
}

#[test]
fn qwen2_architecture_uses_its_biases() {
    let prompt: Vec<u32> = (5..25).collect();
    let with = tmp("qwen2-bias.gguf");
    write_model(
        &with,
        &Spec {
            arch: "qwen2",
            bias: true,
            ..Default::default()
        },
    );
    let without = tmp("qwen2-nobias.gguf");
    write_model(
        &without,
        &Spec {
            arch: "qwen2",
            bias: false,
            ..Default::default()
        },
    );
    let a = first_logits(&with, &prompt);
    let b = first_logits(&without, &prompt);
    assert!(
        a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3),
        "biases had no effect"
    );
    let engine = Engine::load(&with, EngineConfig::default()).unwrap();
    assert_eq!(engine.info().architecture, "qwen2");
    assert_eq!(run(&engine, Prompt::Tokens(prompt), greedy(4)).len(), 4);
}

#[test]
fn unsupported_architecture_and_tensor_type_are_named() {
    let p = tmp("mamba.gguf");
    write_model(
        &p,
        &Spec {
            arch: "mamba",
            ..Default::default()
        },
    );
    let e = GgufFile::open(&p).unwrap_err();
    assert!(
        matches!(e, EngineError::UnsupportedArchitecture(ref a) if a == "mamba"),
        "{e}"
    );
    assert!(e.to_string().contains("mamba"));

    // Rewrite one tensor's type field to IQ2_XXS (16), which the engine cannot load.
    let p = tmp("iq2.gguf");
    write_model(&p, &Spec::default());
    let mut bytes = std::fs::read(&p).unwrap();
    let name = b"blk.1.ffn_up.weight";
    let pos = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let ndims = u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
    let tpos = pos + 4 + 8 * ndims;
    bytes[tpos..tpos + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("IQ2_XXS"),
        "{e}"
    );

    // Settings that disagree with a matrix's shape: refused at load, the tensor named.
    for dtype in [GgmlDType::F32, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let p = tmp("bad-ff.gguf");
        write_model(
            &p,
            &Spec {
                dtype,
                ff_in_metadata: Some(FF + 32),
                ..Default::default()
            },
        );
        let e = Engine::load(&p, EngineConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.ffn_gate.weight") && e.contains(&format!("{FF} x {EMBD}")),
            "{dtype:?}: {e}"
        );
    }

    let p = tmp("garbage.gguf");
    std::fs::write(&p, b"GGUF but not really").unwrap();
    let e = GgufFile::open(&p).unwrap_err().to_string();
    assert!(e.contains("garbage.gguf"), "{e}");
}

#[test]
fn bpe_and_spm_tokenizers_from_metadata() {
    let p = tmp("bpe.gguf");
    write_model(&p, &Spec::default());
    let f = GgufFile::open(&p).unwrap();
    let tok = Tokenizer::from_gguf_metadata(f.metadata()).unwrap();
    let ids = tok.encode("the cat 42", false, false);
    let pieces: Vec<&str> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
    // smollm pre-tokenizer: digits split one by one; merges build "Ġthe" and "cat".
    assert_eq!(pieces, ["t", "he", "Ġ", "cat", "Ġ", "4", "2"]);
    let ids = tok.encode(" the", false, false);
    assert_eq!(
        ids.iter()
            .map(|&i| tok.token_text(i).unwrap())
            .collect::<Vec<_>>(),
        ["Ġthe"]
    );
    assert_eq!(
        tok.decode(&tok.encode("the cat 42", false, false), false),
        "the cat 42"
    );
    let with_special = tok.encode("<|im_start|>the<|im_end|>", false, true);
    assert_eq!(with_special.len(), 4); // <|im_start|> t he <|im_end|>
    assert_eq!(tok.decode(&with_special, false), "the");
    assert_eq!(tok.decode(&with_special, true), "<|im_start|>the<|im_end|>");

    let p = tmp("spm.gguf");
    write_model(
        &p,
        &Spec {
            spm: true,
            ..Default::default()
        },
    );
    let f = GgufFile::open(&p).unwrap();
    let tok = Tokenizer::from_gguf_metadata(f.metadata()).unwrap();
    let ids = tok.encode("the cat é", true, false);
    let pieces: Vec<&str> = ids.iter().map(|&i| tok.token_text(i).unwrap()).collect();
    // BOS, the highest-scoring merges, and byte fallback for the unknown 'é'.
    assert_eq!(
        pieces,
        [
            "<s>",
            "\u{2581}the",
            "\u{2581}c",
            "at",
            "\u{2581}",
            "<0xC3>",
            "<0xA9>"
        ]
    );
    assert_eq!(tok.decode(&ids, false), " the cat é");
}

#[test]
fn batched_chunked_decoding_equals_one_at_a_time() {
    let p = tmp("batch.gguf");
    write_model(&p, &Spec::default());
    let prompts: Vec<Vec<u32>> = vec![
        (3..90).collect(),
        vec![7, 8, 9],
        (40..61).collect(),
        vec![100],
    ];
    let one = Engine::load(&p, EngineConfig::default()).unwrap();
    let expected: Vec<Vec<u32>> = prompts
        .iter()
        .map(|pr| run(&one, Prompt::Tokens(pr.clone()), greedy(12)))
        .collect();
    // Tiny prefill chunks and step budget: the long prompt is prefilled over many steps
    // while the short ones already decode.
    let cfg = EngineConfig {
        prefill_chunk: 5,
        step_tokens: 8,
        ..Default::default()
    };
    let batched = Engine::load(&p, cfg).unwrap();
    let handles: Vec<_> = prompts
        .iter()
        .map(|pr| {
            batched
                .submit(GenerateRequest {
                    prompt: Prompt::Tokens(pr.clone()),
                    params: greedy(12),
                })
                .unwrap()
        })
        .collect();
    for (mut h, exp) in handles.into_iter().zip(expected) {
        let mut got = Vec::new();
        while let Some(ev) = h.events.blocking_recv() {
            match ev {
                Event::Token { id, .. } => got.push(id),
                Event::Done { .. } => break,
                Event::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, exp);
    }
}

#[test]
fn cancellation_frees_the_sequence_and_context_limits_hold() {
    let p = tmp("ctx.gguf");
    write_model(
        &p,
        &Spec {
            context: 64,
            ..Default::default()
        },
    );
    let engine = Engine::load(&p, EngineConfig::default()).unwrap();
    // Prompt + max_tokens beyond the context: a clear error, not a panic.
    let e = engine
        .submit(GenerateRequest {
            prompt: Prompt::Tokens((0..40).collect()),
            params: greedy(30),
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::ContextOverflow {
                prompt: 40,
                max_tokens: 30,
                context: 64
            }
        ),
        "{e}"
    );
    let e = engine
        .submit(GenerateRequest {
            prompt: Prompt::Tokens((0..64).collect()),
            params: SamplingParams {
                max_tokens: None,
                ..greedy(1)
            },
        })
        .unwrap_err();
    assert!(matches!(e, EngineError::ContextOverflow { .. }));
    // Without max_tokens, generation stops at the end of the context with `length`.
    let out = engine
        .generate_blocking(GenerateRequest {
            prompt: Prompt::Tokens((0..40).collect()),
            params: SamplingParams {
                max_tokens: None,
                ..greedy(1)
            },
        })
        .unwrap();
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(out.prompt_tokens + out.tokens.len(), 64);
    // Bad token ids and bad parameters are refused up front.
    assert!(engine
        .submit(GenerateRequest {
            prompt: Prompt::Tokens(vec![999_999]),
            params: greedy(1)
        })
        .is_err());
    assert!(engine
        .submit(GenerateRequest {
            prompt: Prompt::Tokens(vec![1]),
            params: SamplingParams {
                temperature: -1.0,
                ..greedy(1)
            }
        })
        .is_err());

    // A dropped handle cancels: the sequence leaves the batch.
    let h = engine
        .submit(GenerateRequest {
            prompt: Prompt::Tokens(vec![1, 2, 3]),
            params: SamplingParams {
                max_tokens: None,
                ..greedy(1)
            },
        })
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(h);
    let t0 = std::time::Instant::now();
    while engine
        .stats()
        .active
        .load(std::sync::atomic::Ordering::Relaxed)
        != 0
    {
        assert!(
            t0.elapsed().as_secs() < 10,
            "cancelled sequence never freed"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_stop_sequences_cut() {
    let p = tmp("seed.gguf");
    write_model(&p, &Spec::default());
    let engine = Engine::load(&p, EngineConfig::default()).unwrap();
    let params = |seed| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..greedy(16)
    };
    let a = run(&engine, Prompt::Text("the cat".into()), params(5));
    assert_eq!(a, run(&engine, Prompt::Text("the cat".into()), params(5)));
    let others: Vec<Vec<u32>> = (6..12)
        .map(|s| run(&engine, Prompt::Text("the cat".into()), params(s)))
        .collect();
    assert!(others.iter().any(|o| *o != a), "{a:?} {others:?}");
    // A stop sequence made of the text of generated tokens 3..5 ends the output before it.
    let full = engine
        .generate_blocking(GenerateRequest {
            prompt: Prompt::Text("the cat".into()),
            params: greedy(16),
        })
        .unwrap();
    let stop_text = engine.tokenizer().decode(&full.tokens[3..5], false);
    if !stop_text.trim().is_empty() && !stop_text.contains('\u{FFFD}') {
        let cut = engine
            .generate_blocking(GenerateRequest {
                prompt: Prompt::Text("the cat".into()),
                params: SamplingParams {
                    stop: vec![stop_text.clone()],
                    ..greedy(16)
                },
            })
            .unwrap();
        assert_eq!(cut.finish_reason, FinishReason::Stop);
        assert!(!cut.text.contains(&stop_text));
        assert!(full.text.starts_with(&cut.text));
    }
}
