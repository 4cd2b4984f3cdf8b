//! The transformer: Llama-family and Qwen2 decoder blocks over quantized GGUF weights.
//!
//! One forward call runs a *ragged batch*: several sequences, each contributing any
//! number of new tokens (a prefill chunk or a single decode token), concatenated into
//! one `[tokens, hidden]` activation. Every linear layer therefore reads its weights once
//! per step for all sequences; only attention is done per sequence, against that
//! sequence's own KV cache.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{EngineError, Result};
use crate::gguf::{dtype_name, Architecture, GgufFile, ModelConfig};
use crate::pool::Pool;

/// A weight matrix: candle's quantized matmul, or the engine's own kernel for types
/// where candle's CPU path is missing, slow or numerically off llama.cpp (`kernels`).
struct Linear {
    kind: LinearKind,
    rows: usize,
    cols: usize,
}

enum LinearKind {
    Candle(QMatMul),
    Q41(crate::kernels::Q41Matrix),
    Q80(Arc<crate::kernels::Q80Matrix>),
    Q40(crate::kernels::Q40Matrix),
    Q50(crate::kernels::Q50Matrix),
    Q6K(crate::kernels::Q6KMatrix),
    Q4K(crate::kernels::Q4KMatrix),
}

impl Linear {
    /// Through candle's `QMatMul`: weight types or devices the engine has no kernel for
    /// (the loader reads the others straight into the engine's layout, see `own`).
    fn new(t: Arc<QTensor>) -> Result<Self> {
        let (rows, cols) = t.shape().dims2()?;
        Ok(Self {
            kind: LinearKind::Candle(QMatMul::from_arc(t)?),
            rows,
            cols,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.kind {
            LinearKind::Candle(m) => m.forward(x),
            // The engine's own kinds are made for the CPU, whose steps take the CPU path.
            _ => Err(candle_core::Error::Msg(
                "an engine kernel matrix outside the CPU path".into(),
            )),
        }
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ` on the CPU, spread over `pool`.
    /// `places[i]`: where activation row `i` sits in its prompt, for the weight types
    /// whose llama.cpp order depends on it ([`crate::kernels::RowPlace`]).
    fn forward_host(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        pool: &Pool,
        places: &[crate::kernels::RowPlace],
    ) -> candle_core::Result<()> {
        match &self.kind {
            LinearKind::Q41(w) => w.matmul_into(x, m, out, pool),
            LinearKind::Q80(w) => w.matmul_into(x, m, out, pool),
            LinearKind::Q40(w) => w.matmul_into(x, m, out, pool),
            LinearKind::Q50(w) => w.matmul_into(x, m, out, pool),
            LinearKind::Q6K(w) => w.matmul_rows(x, m, out, pool, places),
            LinearKind::Q4K(w) => w.matmul_rows(x, m, out, pool, places),
            LinearKind::Candle(w) => {
                let xt = Tensor::from_slice(x, (m, self.cols), &Device::Cpu)?;
                let y = w
                    .forward(&xt)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                out.copy_from_slice(&y);
            }
        }
        Ok(())
    }
}

/// Matrices that read the same input (`x[m, cols]`), each into its `outs[k]`: when
/// they are all of one engine kind with a plain quantizer (Q4_0, Q4_1, Q5_0, Q8_0), in
/// one pass ([`crate::kernels::matmul_many`]: one quantization, one parallel run);
/// otherwise one by one. The same bits either way.
fn forward_host_many(
    mats: &[&Linear],
    x: &[f32],
    m: usize,
    outs: &mut [&mut [f32]],
    pool: &Pool,
    places: &[crate::kernels::RowPlace],
) -> candle_core::Result<()> {
    macro_rules! together {
        ($kind:ident) => {
            together!($kind, |w| w)
        };
        ($kind:ident, $get:expr) => {
            let ws: Option<Vec<_>> = mats
                .iter()
                .map(|l| match &l.kind {
                    LinearKind::$kind(w) => Some($get(w)),
                    _ => None,
                })
                .collect();
            if let Some(ws) = ws {
                let mut pairs: Vec<_> = ws
                    .into_iter()
                    .zip(outs.iter_mut().map(|o| &mut **o))
                    .collect();
                crate::kernels::matmul_many(&mut pairs, x, m, pool);
                return Ok(());
            }
        };
    }
    together!(Q41);
    together!(Q40);
    together!(Q50);
    together!(Q80, Arc::as_ref);
    for (l, out) in mats.iter().zip(outs.iter_mut()) {
        l.forward_host(x, m, out, pool, places)?;
    }
    Ok(())
}

/// A callback receiving intermediate activations by llama.cpp's names.
type Trace<'a> = dyn FnMut(&str, &Tensor) + 'a;

/// Host copies of the small tensors, for the CPU path.
struct HostLayer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
}

/// What the CPU path needs besides the layers' matrices.
struct Host {
    layers: Vec<HostLayer>,
    output_norm: Vec<f32>,
    /// `[context, head_dim/2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The token embeddings when they are Q8_0 (looked up without candle).
    embd: Option<Arc<crate::kernels::Q80Matrix>>,
    pool: Pool,
    /// Attention scratch, one per compute thread.
    scratch: Vec<std::sync::Mutex<crate::kernels::AttentionScratch>>,
}

struct Layer {
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    bq: Option<Tensor>,
    bk: Option<Tensor>,
    bv: Option<Tensor>,
    ffn_norm: Tensor,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

/// Loaded model weights. Immutable after loading; sequences keep their state in
/// [`KvCache`]s.
pub struct Model {
    pub config: ModelConfig,
    pub device: Device,
    /// Positions the engine serves (the file's context length, possibly capped).
    pub context: usize,
    /// The embeddings as candle holds them (not kept when the CPU path has its own).
    tok_embd: Option<Arc<QTensor>>,
    layers: Vec<Layer>,
    output_norm: Tensor,
    output: Linear,
    /// The CPU path's own data (CPU device only).
    host: Option<Host>,
    cos: Tensor,
    sin: Tensor,
    /// Bytes of weights held by the model.
    pub weight_bytes: usize,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish()
    }
}

/// One sequence's keys and values for every layer, grown in chunks as the sequence
/// lengthens and freed when dropped. On the CPU each layer's keys (and values) are one
/// `[position, n_kv_heads·head_dim]` array that new tokens are appended to; on other
/// devices, tensors `[n_kv_heads, capacity, head_dim]`.
pub struct KvCache {
    store: KvStore,
    len: usize,
    capacity: usize,
}

enum KvStore {
    /// Per layer, `[position][kv_heads·head_dim]` as f16 bits (llama.cpp's default
    /// cache type: the values are f16 roundings, so nothing is lost).
    Host {
        k: Vec<Vec<u16>>,
        v: Vec<Vec<u16>>,
        row: usize,
    },
    Tensors {
        k: Vec<Tensor>,
        v: Vec<Tensor>,
    },
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

const KV_CHUNK: usize = 256;

impl KvCache {
    /// Tokens stored so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        match &self.store {
            KvStore::Host { k, v, .. } => k.iter().chain(v).map(|x| x.capacity() * 2).sum(),
            KvStore::Tensors { k, v } => k
                .iter()
                .chain(v.iter())
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
        }
    }

    fn reserve(&mut self, needed: usize, max: usize) -> Result<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = (needed.max(self.capacity * 2).div_ceil(KV_CHUNK) * KV_CHUNK)
            .min(max)
            .max(needed);
        match &mut self.store {
            KvStore::Host { k, v, row } => {
                for x in k.iter_mut().chain(v.iter_mut()) {
                    x.reserve_exact(new_cap * *row - x.len());
                }
            }
            KvStore::Tensors { k, v } => {
                for t in k.iter_mut().chain(v.iter_mut()) {
                    let (h, _, d) = t.dims3()?;
                    let fresh = Tensor::zeros((h, new_cap, d), t.dtype(), t.device())?;
                    if self.len > 0 {
                        fresh.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    }
                    *t = fresh;
                }
            }
        }
        self.capacity = new_cap;
        Ok(())
    }
}

/// One sequence's part of a forward step.
pub struct BatchItem<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Return logits for this sequence's last new token.
    pub want_logits: bool,
    /// These tokens are part of a prompt of two or more tokens. llama.cpp computes such
    /// rows as a matrix product (tinyBLAS) and single decode rows as dot products, which
    /// sum attention scores in different orders; the engine follows suit.
    pub prompt_rows: bool,
}

multiversion! {
    /// RMS normalisation as ggml computes it on the CPU, over rows of `n` values: squares
    /// in f32 summed in f64, the scale in f32, then the weight. Activations are quantized
    /// to 8 bits right after, so a last-bit difference here can flip a rounding there.
    fn rms_norm_rows(x: &[f32], w: &[f32], n: usize, eps: f32, out: &mut [f32]) {
        for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
            let sum: f64 = row.iter().map(|v| (v * v) as f64).sum();
            let mean = (sum / n as f64) as f32;
            let scale = 1.0 / (mean + eps).sqrt();
            for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
                *o = (v * scale) * g;
            }
        }
    }
}

/// Rounds every value through f16 (see [`half_round`]), eight at a time where the CPU
/// converts in hardware (`half`'s slice conversions: the same roundings as one by one).
fn half_round_in_place(x: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    let mut h = [half::f16::ZERO; 256];
    for c in x.chunks_mut(256) {
        let h = &mut h[..c.len()];
        h.convert_from_f32_slice(c);
        h.convert_to_f32_slice(c);
    }
}

/// Appends `x` rounded to f16 (round half to even, as [`half_round_in_place`]) as bits
/// to `out`.
fn to_f16_bits(x: &[f32], out: &mut Vec<u16>) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    let start = out.len();
    out.resize(start + x.len(), 0);
    out[start..]
        .reinterpret_cast_mut::<half::f16>()
        .convert_from_f32_slice(x);
}

fn add_bias(x: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, c) in row.iter_mut().zip(b) {
                *v += c;
            }
        }
    }
}

/// Rounds through f16, as llama.cpp's default f16 KV cache does to keys, values, queries
/// and attention weights: keeps the two engines' numerics close.
fn half_round(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F16)?.to_dtype(DType::F32)
}

fn check_dtype(name: &str, t: &QTensor) -> Result<()> {
    if matches!(t.dtype(), GgmlDType::Q8_1) {
        return Err(EngineError::UnsupportedTensorType {
            tensor: name.to_string(),
            dtype: dtype_name(t.dtype()).into(),
        });
    }
    Ok(())
}

impl Model {
    /// Loads the weights of an opened GGUF file onto `device`. `max_context` caps the
    /// positions served (and so the RoPE tables and the largest KV cache).
    pub fn load(file: &GgufFile, device: &Device, max_context: Option<usize>) -> Result<Self> {
        let cfg = file.config.clone();
        let path = file.path.display().to_string();
        let f = File::open(&file.path).map_err(|err| EngineError::Io {
            path: path.clone(),
            err,
        })?;
        let reader = std::cell::RefCell::new(BufReader::new(f));
        let weight_bytes = std::cell::Cell::new(0usize);
        let load_q = |name: &str| -> Result<QTensor> {
            if !file.content.tensor_infos.contains_key(name) {
                return Err(EngineError::MissingTensor(name.to_string()));
            }
            let t = file
                .content
                .tensor(&mut *reader.borrow_mut(), name, device)
                .map_err(|e| EngineError::BadGguf {
                    path: path.clone(),
                    reason: format!("tensor `{name}`: {}", crate::error::reason(&e)),
                })?;
            check_dtype(name, &t)?;
            weight_bytes.set(weight_bytes.get() + t.storage_size_in_bytes());
            Ok(t)
        };
        // On the CPU, the weight types the engine has kernels for are read from the file
        // straight into their grouped layout, row by row: no second copy of a tensor is
        // ever held, so loading peaks at what the model keeps.
        let own = |name: &str| -> Result<Option<Linear>> {
            use crate::kernels::{
                Q40Matrix, Q41Matrix, Q4KMatrix, Q50Matrix, Q6KMatrix, Q80Matrix,
            };
            use std::io::{Seek, SeekFrom};
            let Some(info) = file.content.tensor_infos.get(name) else {
                return Err(EngineError::MissingTensor(name.to_string()));
            };
            let Ok((rows, cols)) = info.shape.dims2() else {
                return Ok(None);
            };
            if !device.is_cpu()
                || !matches!(
                    info.ggml_dtype,
                    GgmlDType::Q4_1
                        | GgmlDType::Q4_0
                        | GgmlDType::Q5_0
                        | GgmlDType::Q6K
                        | GgmlDType::Q4K
                        | GgmlDType::Q8_0
                )
            {
                return Ok(None);
            }
            let io = |err: std::io::Error| EngineError::Io {
                path: path.clone(),
                err,
            };
            let mut r = reader.borrow_mut();
            r.seek(SeekFrom::Start(
                file.content.tensor_data_offset + info.offset,
            ))
            .map_err(io)?;
            let kind = match info.ggml_dtype {
                GgmlDType::Q4_1 => Q41Matrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(LinearKind::Q41),
                GgmlDType::Q4_0 => Q40Matrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(LinearKind::Q40),
                GgmlDType::Q5_0 => Q50Matrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(LinearKind::Q50),
                GgmlDType::Q6K => Q6KMatrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(LinearKind::Q6K),
                GgmlDType::Q4K => Q4KMatrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(LinearKind::Q4K),
                _ => Q80Matrix::read(&mut *r, rows, cols)
                    .map_err(io)?
                    .map(|m| LinearKind::Q80(Arc::new(m))),
            };
            let Some(kind) = kind else { return Ok(None) };
            let bytes = rows * cols / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            weight_bytes.set(weight_bytes.get() + bytes);
            Ok(Some(Linear { kind, rows, cols }))
        };
        let linear = |name: &str| -> Result<Linear> {
            match own(name)? {
                Some(l) => Ok(l),
                None => Linear::new(Arc::new(load_q(name)?)),
            }
        };
        let has = |name: &str| file.content.tensor_infos.contains_key(name);

        let tied = !has("output.weight");
        // Embeddings: the engine's own Q8_0 rows on the CPU (one copy with a tied output
        // head), else candle's tensor.
        let embd_own = own("token_embd.weight")?;
        let embd: Option<Arc<crate::kernels::Q80Matrix>> = match &embd_own {
            Some(Linear {
                kind: LinearKind::Q80(m),
                ..
            }) => Some(m.clone()),
            _ => None,
        };
        let tok_embd = if embd.is_some() {
            None
        } else {
            Some(Arc::new(load_q("token_embd.weight")?))
        };
        let output = match (tied, embd_own, &tok_embd) {
            (false, _, _) => linear("output.weight")?,
            (true, Some(l), _) => l,
            (true, None, Some(t)) => Linear::new(t.clone())?,
            (true, None, None) => {
                return Err(EngineError::MissingTensor("token_embd.weight".into()))
            }
        };
        let output_norm = load_q("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = |s: &str| format!("blk.{i}.{s}");
            let opt_bias = |s: &str| -> Result<Option<Tensor>> {
                if has(&p(s)) {
                    Ok(Some(load_q(&p(s))?.dequantize(device)?))
                } else {
                    Ok(None)
                }
            };
            let (bq, bk, bv) = (
                opt_bias("attn_q.bias")?,
                opt_bias("attn_k.bias")?,
                opt_bias("attn_v.bias")?,
            );
            let mm = |name: String| linear(&name);
            layers.push(Layer {
                attn_norm: load_q(&p("attn_norm.weight"))?.dequantize(device)?,
                wq: mm(p("attn_q.weight"))?,
                wk: mm(p("attn_k.weight"))?,
                wv: mm(p("attn_v.weight"))?,
                wo: mm(p("attn_output.weight"))?,
                bq,
                bk,
                bv,
                ffn_norm: load_q(&p("ffn_norm.weight"))?.dequantize(device)?,
                w_gate: mm(p("ffn_gate.weight"))?,
                w_up: mm(p("ffn_up.weight"))?,
                w_down: mm(p("ffn_down.weight"))?,
            });
        }
        // Every matrix in the shape the file's settings imply: a file that says otherwise
        // is refused here, the tensor named, instead of failing inside a step.
        let (e, ff) = (cfg.n_embd, cfg.n_ff);
        let (qd, kvd) = (cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim);
        let shapes = layers.iter().enumerate().flat_map(|(i, l)| {
            [
                ("attn_q", &l.wq, qd, e),
                ("attn_k", &l.wk, kvd, e),
                ("attn_v", &l.wv, kvd, e),
                ("attn_output", &l.wo, e, qd),
                ("ffn_gate", &l.w_gate, ff, e),
                ("ffn_up", &l.w_up, ff, e),
                ("ffn_down", &l.w_down, e, ff),
            ]
            .map(|(n, w, r, c)| (format!("blk.{i}.{n}.weight"), w, r, c))
        });
        for (name, w, rows, cols) in shapes.chain([(
            "the output head (output.weight or token_embd.weight)".to_string(),
            &output,
            output.rows,
            e,
        )]) {
            if (w.rows, w.cols) != (rows, cols) {
                return Err(EngineError::BadGguf {
                    path: path.clone(),
                    reason: format!(
                        "{name} is {} x {}, the file's settings (embedding {e}, \
                         feed-forward {ff}, {} heads of {}, {} KV heads) need {rows} x {cols}",
                        w.rows, w.cols, cfg.n_head, cfg.head_dim, cfg.n_head_kv
                    ),
                });
            }
        }
        let context = max_context
            .map(|m| m.min(cfg.context_length))
            .unwrap_or(cfg.context_length)
            .max(1);
        // RoPE tables, with Llama 3.1-style per-frequency factors when the file has them.
        let half = cfg.head_dim / 2;
        let factors: Option<Vec<f32>> = if has("rope_freqs.weight") {
            Some(
                load_q("rope_freqs.weight")?
                    .dequantize(&Device::Cpu)?
                    .flatten_all()?
                    .to_vec1()?,
            )
        } else {
            None
        };
        // Angles as ggml builds its RoPE cache: theta starts at the position and is
        // multiplied by base^(-2/d) per pair, in f32 (bit-for-bit agreement with
        // llama.cpp depends on these roundings).
        let theta_scale = cfg.rope_freq_base.powf(-2.0 / cfg.head_dim as f32);
        let mut cos = Vec::with_capacity(context * half);
        let mut sin = Vec::with_capacity(context * half);
        for pos in 0..context {
            let mut theta = pos as f32;
            for i in 0..half {
                let ff = match &factors {
                    Some(fs) if i < fs.len() && fs[i] > 0.0 => fs[i],
                    _ => 1.0,
                };
                let t = theta / ff;
                cos.push(t.cos());
                sin.push(t.sin());
                theta *= theta_scale;
            }
        }
        let host = if device.is_cpu() {
            let threads = rayon::current_num_threads().max(1);
            let v = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let ov = |t: &Option<Tensor>| t.as_ref().map(v).transpose();
            let host_layers = layers
                .iter()
                .map(|l| {
                    Ok(HostLayer {
                        attn_norm: v(&l.attn_norm)?,
                        ffn_norm: v(&l.ffn_norm)?,
                        bq: ov(&l.bq)?,
                        bk: ov(&l.bk)?,
                        bv: ov(&l.bv)?,
                    })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Host {
                layers: host_layers,
                output_norm: v(&output_norm)?,
                cos: cos.clone(),
                sin: sin.clone(),
                embd,
                scratch: (0..threads).map(|_| Default::default()).collect(),
                pool: Pool::new(threads),
            })
        } else {
            None
        };
        let cos = Tensor::from_vec(cos, (context, half), device)?;
        let sin = Tensor::from_vec(sin, (context, half), device)?;
        Ok(Self {
            config: cfg,
            device: device.clone(),
            context,
            tok_embd,
            layers,
            output_norm,
            output,
            host,
            cos,
            sin,
            weight_bytes: weight_bytes.get(),
        })
    }

    /// A new, empty cache for one sequence.
    pub fn new_cache(&self) -> Result<KvCache> {
        let n = self.config.n_layer;
        let mk = || {
            Tensor::zeros(
                (self.config.n_head_kv, 0, self.config.head_dim),
                DType::F32,
                &self.device,
            )
        };
        let store = if self.host.is_some() {
            KvStore::Host {
                k: vec![Vec::new(); n],
                v: vec![Vec::new(); n],
                row: self.config.n_head_kv * self.config.head_dim,
            }
        } else {
            KvStore::Tensors {
                k: (0..n).map(|_| mk()).collect::<candle_core::Result<_>>()?,
                v: (0..n).map(|_| mk()).collect::<candle_core::Result<_>>()?,
            }
        };
        Ok(KvCache {
            store,
            len: 0,
            capacity: 0,
        })
    }

    /// Bytes of KV cache one token occupies.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.config.n_layer * self.config.n_head_kv * self.config.head_dim * 4
    }

    /// Runs one step over a ragged batch. Appends the new tokens to each sequence's cache
    /// and returns, per item, the logits of its last token when it asked for them.
    pub fn forward(&self, items: &mut [BatchItem<'_>]) -> Result<Vec<Option<Vec<f32>>>> {
        self.forward_impl(items, &mut |_, _| {}, false)
    }

    /// [`Model::forward`], calling `trace(name, tensor)` with intermediate activations
    /// named as llama.cpp names them (`attn_norm-0`, `Vcur-0`, `kqv_out-0`, `ffn_out-0`,
    /// `l_out-0`, …, `result_norm`), for kernel-level comparisons.
    pub fn forward_traced(
        &self,
        items: &mut [BatchItem<'_>],
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Vec<Option<Vec<f32>>>> {
        self.forward_impl(items, trace, true)
    }

    fn forward_impl(
        &self,
        items: &mut [BatchItem<'_>],
        trace: &mut dyn FnMut(&str, &Tensor),
        tracing: bool,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let cfg = &self.config;
        let (n_head, n_kv, hd) = (cfg.n_head, cfg.n_head_kv, cfg.head_dim);
        let group = n_head / n_kv;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut spans = Vec::with_capacity(items.len());
        for it in items.iter_mut() {
            let start = it.cache.len;
            let l = it.tokens.len();
            if l == 0 {
                return Err(EngineError::InvalidRequest("empty batch item".into()));
            }
            if start + l > self.context {
                return Err(EngineError::ContextOverflow {
                    prompt: start + l,
                    max_tokens: 0,
                    context: self.context,
                });
            }
            spans.push((ids.len(), l, start));
            ids.extend_from_slice(it.tokens);
            positions.extend((start..start + l).map(|p| p as u32));
            it.cache.reserve(start + l, self.context)?;
        }
        if let Some(host) = &self.host {
            let tracer = tracing.then_some(trace);
            return self.forward_host(host, items, &spans, &ids, tracer);
        }
        let total = ids.len();
        let ids_t = Tensor::from_vec(ids, total, &self.device)?;
        let pos_t = Tensor::from_vec(positions, total, &self.device)?;
        let cos = self
            .cos
            .index_select(&pos_t, 0)?
            .reshape((total, 1, hd / 2))?;
        let sin = self
            .sin
            .index_select(&pos_t, 0)?
            .reshape((total, 1, hd / 2))?;
        let rope = |x: Tensor| -> candle_core::Result<Tensor> {
            match cfg.architecture {
                Architecture::Llama => candle_nn::rotary_emb::rope_i(&x, &cos, &sin),
                Architecture::Qwen2 => candle_nn::rotary_emb::rope(&x, &cos, &sin),
            }
        };
        let scale = 1.0 / (hd as f64).sqrt();
        let tok_embd = self.tok_embd.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest("token embeddings are not held for this device".into())
        })?;
        let mut x = tok_embd.embedding(&ids_t)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, cfg.rms_eps)?;
            trace(&format!("attn_norm-{li}"), &h);
            let add_bias = |t: Tensor, b: &Option<Tensor>| -> candle_core::Result<Tensor> {
                match b {
                    Some(b) => t.broadcast_add(b),
                    None => Ok(t),
                }
            };
            let q = add_bias(layer.wq.forward(&h)?, &layer.bq)?;
            let k = add_bias(layer.wk.forward(&h)?, &layer.bk)?;
            let v = add_bias(layer.wv.forward(&h)?, &layer.bv)?;
            trace(&format!("Qcur-{li}"), &q);
            trace(&format!("Kcur-{li}"), &k);
            trace(&format!("Vcur-{li}"), &v);
            let q = rope(q.reshape((total, n_head, 1, hd))?)?;
            let k = rope(k.reshape((total, n_kv, 1, hd))?)?;
            trace(&format!("Qcur-{li}#3"), &q);
            trace(&format!("Kcur-{li}#3"), &k);
            let v = v.reshape((total, n_kv, hd))?;
            let mut outs = Vec::with_capacity(items.len());
            for (it, &(s, l, start)) in items.iter_mut().zip(&spans) {
                let qi = half_round(
                    &q.narrow(0, s, l)?
                        .reshape((l, n_head, hd))?
                        .transpose(0, 1)?
                        .contiguous()?,
                )?;
                let ki = half_round(
                    &k.narrow(0, s, l)?
                        .reshape((l, n_kv, hd))?
                        .transpose(0, 1)?
                        .contiguous()?,
                )?;
                let vi = half_round(&v.narrow(0, s, l)?.transpose(0, 1)?.contiguous()?)?;
                let KvStore::Tensors { k: ck, v: cv } = &mut it.cache.store else {
                    return Err(EngineError::InvalidRequest(
                        "a cache made for another device".into(),
                    ));
                };
                ck[li].slice_set(&ki, 1, start)?;
                cv[li].slice_set(&vi, 1, start)?;
                let t_all = start + l;
                let k_all = ck[li].narrow(1, 0, t_all)?;
                let v_all = cv[li].narrow(1, 0, t_all)?;
                let qg = qi.reshape((n_kv, group * l, hd))?;
                let mut att = (qg.matmul(&k_all.t()?)? * scale)?;
                if l > 1 {
                    let mut mask = Vec::with_capacity(l * t_all);
                    for r in 0..l {
                        for c in 0..t_all {
                            mask.push(if c <= start + r {
                                0f32
                            } else {
                                f32::NEG_INFINITY
                            });
                        }
                    }
                    let mask = Tensor::from_vec(mask, (l, t_all), &self.device)?;
                    att = att
                        .reshape((n_kv, group, l, t_all))?
                        .broadcast_add(&mask)?
                        .reshape((n_kv, group * l, t_all))?;
                }
                let att = half_round(&candle_nn::ops::softmax_last_dim(&att)?)?;
                let o = att.matmul(&v_all.contiguous()?)?; // [n_kv, group*l, hd]
                let o = o
                    .reshape((n_head, l, hd))?
                    .transpose(0, 1)?
                    .reshape((l, n_head * hd))?;
                outs.push(o);
            }
            let attn = if outs.len() == 1 {
                outs.pop().expect("one output")
            } else {
                Tensor::cat(&outs, 0)?
            };
            trace(&format!("kqv_out-{li}"), &attn);
            let attn_out = layer.wo.forward(&attn)?;
            trace(&format!("attn_out-{li}"), &attn_out);
            x = (x + attn_out)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, cfg.rms_eps)?;
            trace(&format!("ffn_norm-{li}"), &h);
            let gate = layer.w_gate.forward(&h)?;
            let up = layer.w_up.forward(&h)?;
            trace(&format!("ffn_gate-{li}"), &gate);
            trace(&format!("ffn_up-{li}"), &up);
            let swiglu = (candle_nn::ops::silu(&gate)? * up)?;
            trace(&format!("ffn_swiglu-{li}"), &swiglu);
            let ffn_out = layer.w_down.forward(&swiglu)?;
            trace(&format!("ffn_out-{li}"), &ffn_out);
            x = (x + ffn_out)?;
            trace(&format!("l_out-{li}"), &x);
        }
        for (it, &(_, l, _)) in items.iter_mut().zip(&spans) {
            it.cache.len += l;
        }
        // Logits only for the rows that need them.
        let rows: Vec<u32> = items
            .iter()
            .zip(&spans)
            .filter(|(it, _)| it.want_logits)
            .map(|(_, &(s, l, _))| (s + l - 1) as u32)
            .collect();
        let mut result = vec![None; items.len()];
        if rows.is_empty() {
            return Ok(result);
        }
        let n_rows = rows.len();
        let sel = Tensor::from_vec(rows, n_rows, &self.device)?;
        let last = x.index_select(&sel, 0)?;
        let last = candle_nn::ops::rms_norm(&last, &self.output_norm, cfg.rms_eps)?;
        trace("result_norm", &last);
        let logits = self.output.forward(&last)?.to_dtype(DType::F32)?;
        let mut logits = logits.to_vec2::<f32>()?.into_iter();
        for (slot, it) in result.iter_mut().zip(items.iter()) {
            if it.want_logits {
                *slot = logits.next();
            }
        }
        Ok(result)
    }

    /// The CPU path of [`Model::forward`]: plain arrays, the engine's kernels (llama.cpp's
    /// CPU arithmetic) and its compute team; no tensors, no per-operation allocations,
    /// no thread hand-off per operation. Other devices take the candle path below.
    fn forward_host(
        &self,
        host: &Host,
        items: &mut [BatchItem<'_>],
        spans: &[(usize, usize, usize)],
        ids: &[u32],
        mut trace: Option<&mut Trace<'_>>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let cfg = &self.config;
        let (n_head, n_kv, hd, e, ff) = (
            cfg.n_head,
            cfg.n_head_kv,
            cfg.head_dim,
            cfg.n_embd,
            cfg.n_ff,
        );
        let (qd, kvd, group, half) = (n_head * hd, n_kv * hd, n_head / n_kv, hd / 2);
        let total = ids.len();
        let pool = &host.pool;
        let mut tr = |name: &str, data: &[f32], cols: usize| {
            if let Some(t) = trace.as_mut() {
                if let Ok(x) = Tensor::from_slice(data, (data.len() / cols, cols), &Device::Cpu) {
                    t(name, &x);
                }
            }
        };
        let mut x = vec![0f32; total * e];
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(EngineError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary ({})",
                cfg.vocab_size
            )));
        }
        match (&host.embd, &self.tok_embd) {
            (Some(m), _) => {
                for (t, &id) in ids.iter().enumerate() {
                    m.dequantize_row(id as usize, &mut x[t * e..(t + 1) * e]);
                }
            }
            (None, Some(q)) => {
                let idt = Tensor::from_slice(ids, total, &Device::Cpu)?;
                x = q.embedding(&idt)?.flatten_all()?.to_vec1::<f32>()?;
            }
            (None, None) => {
                return Err(EngineError::InvalidRequest("no token embeddings".into()));
            }
        }
        let (mut cos, mut sin) = (
            Vec::with_capacity(total * half),
            Vec::with_capacity(total * half),
        );
        for &(_, l, start) in spans {
            for p in start..start + l {
                cos.extend_from_slice(&host.cos[p * half..(p + 1) * half]);
                sin.extend_from_slice(&host.sin[p * half..(p + 1) * half]);
            }
        }
        let neox = cfg.architecture == Architecture::Qwen2;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        // Each row's place in its prompt (decode rows: none): llama.cpp's order for
        // Q6_K and Q4_K weights depends on it (what it does for that prompt alone).
        let places: Vec<crate::kernels::RowPlace> = items
            .iter()
            .zip(spans)
            .flat_map(|(it, &(_, l, _))| (0..l).map(move |i| it.prompt_rows.then_some((i, l))))
            .collect();
        let mut h = vec![0f32; total * e];
        let mut q = vec![0f32; total * qd];
        let mut k = vec![0f32; total * kvd];
        let mut v = vec![0f32; total * kvd];
        let mut heads = vec![0f32; total * qd];
        let mut att = vec![0f32; total * qd];
        let mut o = vec![0f32; total * e];
        let mut gate = vec![0f32; total * ff];
        let mut up = vec![0f32; total * ff];
        let layers = (|| -> Result<()> {
            for (li, (layer, hl)) in self.layers.iter().zip(&host.layers).enumerate() {
                rms_norm_rows(&x, &hl.attn_norm, e, cfg.rms_eps, &mut h);
                tr(&format!("attn_norm-{li}"), &h, e);
                forward_host_many(
                    &[&layer.wq, &layer.wk, &layer.wv],
                    &h,
                    total,
                    &mut [&mut q[..], &mut k[..], &mut v[..]],
                    pool,
                    &places,
                )?;
                add_bias(&mut q, &hl.bq);
                add_bias(&mut k, &hl.bk);
                add_bias(&mut v, &hl.bv);
                tr(&format!("Qcur-{li}"), &q, qd);
                tr(&format!("Kcur-{li}"), &k, kvd);
                tr(&format!("Vcur-{li}"), &v, kvd);
                crate::kernels::rope(&mut q, &cos, &sin, n_head, hd, neox);
                crate::kernels::rope(&mut k, &cos, &sin, n_kv, hd, neox);
                tr(&format!("Qcur-{li}#3"), &q, qd);
                tr(&format!("Kcur-{li}#3"), &k, kvd);
                half_round_in_place(&mut q);
                for (it, &(s, l, _)) in items.iter_mut().zip(spans) {
                    if let KvStore::Host { k: ck, v: cv, .. } = &mut it.cache.store {
                        to_f16_bits(&k[s * kvd..(s + l) * kvd], &mut ck[li]);
                        to_f16_bits(&v[s * kvd..(s + l) * kvd], &mut cv[li]);
                    }
                }
                // Attention: one task per (sequence, head), each writing its own
                // `[l, hd]` block of `heads`, laid out sequence by sequence.
                let caches: Vec<(&[u16], &[u16])> = items
                    .iter()
                    .map(|it| match &it.cache.store {
                        KvStore::Host { k: ck, v: cv, .. } => (&ck[li][..], &cv[li][..]),
                        KvStore::Tensors { .. } => (&[][..], &[][..]),
                    })
                    .collect();
                {
                    let mut parts: Vec<std::sync::Mutex<&mut [f32]>> =
                        Vec::with_capacity(items.len() * n_head);
                    let mut rest = &mut heads[..];
                    for &(_, l, _) in spans {
                        for _ in 0..n_head {
                            let (a, b) = rest.split_at_mut(l * hd);
                            parts.push(std::sync::Mutex::new(a));
                            rest = b;
                        }
                    }
                    let q = &q;
                    let prompt_rows: Vec<bool> = items.iter().map(|it| it.prompt_rows).collect();
                    // With enough of them, one task per (sequence, KV head): the query
                    // heads that share a KV head run one after another on one thread, so
                    // its keys and values come from memory once, then from that core's
                    // cache. Few sequences: one task per query head (balance first).
                    let per_kv = items.len() * n_kv >= 4 * pool.threads();
                    let (units, width) = if per_kv { (n_kv, group) } else { (n_head, 1) };
                    pool.run(items.len() * units, &|task, thread| {
                        let (i, u) = (task / units, task % units);
                        let (s, l, start) = spans[i];
                        let (ck, cv) = caches[i];
                        if ck.len() < (start + l) * kvd {
                            return;
                        }
                        let mut scratch = host.scratch[thread]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        for hh in u * width..(u + 1) * width {
                            let mut out = parts[i * n_head + hh]
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            crate::kernels::attention_head(
                                &q[s * qd + hh * hd..],
                                qd,
                                ck,
                                cv,
                                kvd,
                                (hh / group) * hd,
                                l,
                                start,
                                hd,
                                scale,
                                prompt_rows[i],
                                &mut out,
                                &mut scratch,
                            );
                        }
                    });
                }
                for &(s, l, _) in spans {
                    for hh in 0..n_head {
                        for r in 0..l {
                            let src = s * qd + hh * l * hd + r * hd;
                            let dst = (s + r) * qd + hh * hd;
                            att[dst..dst + hd].copy_from_slice(&heads[src..src + hd]);
                        }
                    }
                }
                tr(&format!("kqv_out-{li}"), &att, qd);
                layer.wo.forward_host(&att, total, &mut o, pool, &places)?;
                tr(&format!("attn_out-{li}"), &o, e);
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                rms_norm_rows(&x, &hl.ffn_norm, e, cfg.rms_eps, &mut h);
                tr(&format!("ffn_norm-{li}"), &h, e);
                forward_host_many(
                    &[&layer.w_gate, &layer.w_up],
                    &h,
                    total,
                    &mut [&mut gate[..], &mut up[..]],
                    pool,
                    &places,
                )?;
                tr(&format!("ffn_gate-{li}"), &gate, ff);
                tr(&format!("ffn_up-{li}"), &up, ff);
                crate::kernels::swiglu_in_place(&mut gate, &up);
                tr(&format!("ffn_swiglu-{li}"), &gate, ff);
                layer
                    .w_down
                    .forward_host(&gate, total, &mut o, pool, &places)?;
                tr(&format!("ffn_out-{li}"), &o, e);
                for (a, b) in x.iter_mut().zip(&o) {
                    *a += b;
                }
                tr(&format!("l_out-{li}"), &x, e);
            }
            Ok(())
        })();
        if let Err(err) = layers {
            // Nothing of this step stays in the caches.
            for it in items.iter_mut() {
                let len = it.cache.len;
                if let KvStore::Host { k, v, row } = &mut it.cache.store {
                    for c in k.iter_mut().chain(v.iter_mut()) {
                        c.truncate(len * *row);
                    }
                }
            }
            return Err(err);
        }
        for (it, &(_, l, _)) in items.iter_mut().zip(spans) {
            it.cache.len += l;
        }
        let rows: Vec<usize> = items
            .iter()
            .zip(spans)
            .filter(|(it, _)| it.want_logits)
            .map(|(_, &(s, l, _))| s + l - 1)
            .collect();
        let mut result = vec![None; items.len()];
        if rows.is_empty() {
            return Ok(result);
        }
        let n_rows = rows.len();
        let mut last = vec![0f32; n_rows * e];
        for (i, &r) in rows.iter().enumerate() {
            rms_norm_rows(
                &x[r * e..(r + 1) * e],
                &host.output_norm,
                e,
                cfg.rms_eps,
                &mut last[i * e..(i + 1) * e],
            );
        }
        tr("result_norm", &last, e);
        let vocab = self.output.rows;
        let mut logits = vec![0f32; n_rows * vocab];
        // Logit rows are one per sequence, as in llama.cpp's output matmul: never a batch.
        self.output
            .forward_host(&last, n_rows, &mut logits, pool, &[])?;
        let mut chunks = logits.chunks_exact(vocab);
        for (slot, it) in result.iter_mut().zip(items.iter()) {
            if it.want_logits {
                *slot = chunks.next().map(|c| c.to_vec());
            }
        }
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_slices_round_as_one_value_at_a_time() {
        let mut rng = crate::sampling::Rng::new(21);
        let mut x: Vec<f32> = (0..1000)
            .map(|i| (rng.next_f32() - 0.5) * [1e-7, 1e-3, 1.0, 3e4, 1e5][i % 5])
            .collect();
        // Ties, both zeros, infinities, NaN, subnormal halves, overflow.
        x.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1.0 + 1.0 / 2048.0,
            1.0 + 3.0 / 2048.0,
            6.0e-8,
            65520.0,
            -70000.0,
        ]);
        let one_by_one: Vec<u16> = x
            .iter()
            .map(|&v| half::f16::from_f32(v).to_bits())
            .collect();
        let mut bits = vec![7u16; 3];
        to_f16_bits(&x, &mut bits);
        assert_eq!(&bits[..3], &[7, 7, 7], "appends");
        assert_eq!(&bits[3..], &one_by_one[..]);
        let mut r = x.clone();
        half_round_in_place(&mut r);
        let want: Vec<u32> = one_by_one
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32().to_bits())
            .collect();
        assert_eq!(r.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want);
    }
}
