//! Reading a GGUF file: metadata, the architecture's hyper-parameters, tensor inventory.
//!
//! Tensor data itself is read by `model`; this module only knows the file's header.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;

use crate::error::{EngineError, Result};

/// Model families whose GGUF layout the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, Mistral (GGUF arch `llama` or `mistral`); interleaved RoPE.
    Llama,
    /// Qwen2 / Qwen2.5: Llama layout plus q/k/v biases, NeoX RoPE.
    Qwen2,
}

impl Architecture {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }
}

/// Hyper-parameters read from `<arch>.*` metadata keys.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    /// The `general.architecture` string as written in the file.
    pub architecture_name: String,
    pub name: Option<String>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_dim: usize,
    pub rope_freq_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

/// An opened GGUF file: its header, parsed configuration and path.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub config: ModelConfig,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}

pub(crate) fn dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// ggml's type numbering, for naming types the engine cannot load.
fn ggml_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return format!("ggml type {t}"),
    };
    name.to_string()
}

impl GgufFile {
    /// Opens and validates a GGUF file's header. Fails with a message naming the file and
    /// the problem: not GGUF, unsupported architecture, unsupported tensor type.
    pub fn open(path: &Path) -> Result<Self> {
        let p = path.display().to_string();
        let file = File::open(path).map_err(|err| EngineError::Io {
            path: p.clone(),
            err,
        })?;
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(c) => c,
            Err(e) => {
                // candle stops at the first tensor of a type it does not know without
                // naming it: find it ourselves so the message is useful.
                if let Ok(Some((tensor, t))) = scan_for_unknown_type(path) {
                    return Err(EngineError::UnsupportedTensorType {
                        tensor,
                        dtype: ggml_type_name(t),
                    });
                }
                return Err(EngineError::BadGguf {
                    path: p,
                    reason: crate::error::reason(&e),
                });
            }
        };
        let config = ModelConfig::from_metadata(&content.metadata)?;
        for (name, info) in &content.tensor_infos {
            if matches!(info.ggml_dtype, GgmlDType::Q8_1) {
                return Err(EngineError::UnsupportedTensorType {
                    tensor: name.clone(),
                    dtype: dtype_name(info.ggml_dtype).to_string(),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            config,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Parameters: the elements of every tensor.
    pub fn parameter_count(&self) -> u64 {
        self.content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum()
    }

    /// The file's quantization, e.g. "Q4_1": what `general.file_type` names where the
    /// file says (llama.cpp's `LLAMA_FTYPE_*`: a "Q4_K_M" file is mostly Q5_0, Q4_K and
    /// Q6_K when its rows are not multiples of 256, and a "Q6_K" one mostly Q8_0 when
    /// only one matrix in seven has rows of a multiple of 256), else the dominant type of
    /// its 2-D weights.
    pub fn quantization(&self) -> String {
        let named = match meta_u64(self.metadata(), "general.file_type") {
            Some(0) => Some("F32"),
            Some(1) => Some("F16"),
            Some(2) => Some("Q4_0"),
            Some(3) => Some("Q4_1"),
            Some(7) => Some("Q8_0"),
            Some(8) => Some("Q5_0"),
            Some(9) => Some("Q5_1"),
            Some(10) => Some("Q2_K"),
            Some(18) => Some("Q6_K"),
            Some(32) => Some("BF16"),
            Some(11) => Some("Q3_K_S"),
            Some(12) => Some("Q3_K_M"),
            Some(13) => Some("Q3_K_L"),
            Some(14) => Some("Q4_K_S"),
            Some(15) => Some("Q4_K_M"),
            Some(16) => Some("Q5_K_S"),
            Some(17) => Some("Q5_K_M"),
            _ => None,
        };
        if let Some(name) = named {
            return name.to_string();
        }
        let mut counts: HashMap<&'static str, usize> = HashMap::new();
        for info in self.content.tensor_infos.values() {
            if info.shape.rank() == 2 {
                *counts.entry(dtype_name(info.ggml_dtype)).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|(n, c)| (*c, *n))
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| "none".to_string())
    }
}

pub(crate) fn meta_u64(md: &HashMap<String, Value>, key: &str) -> Option<u64> {
    match md.get(key)? {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) if *v >= 0 => Some(*v as u64),
        Value::I16(v) if *v >= 0 => Some(*v as u64),
        Value::I32(v) if *v >= 0 => Some(*v as u64),
        Value::I64(v) if *v >= 0 => Some(*v as u64),
        _ => None,
    }
}

pub(crate) fn meta_f32(md: &HashMap<String, Value>, key: &str) -> Option<f32> {
    match md.get(key)? {
        Value::F32(v) => Some(*v),
        Value::F64(v) => Some(*v as f32),
        _ => meta_u64(md, key).map(|v| v as f32),
    }
}

pub(crate) fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    match md.get(key)? {
        Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

pub(crate) fn meta_bool(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match md.get(key)? {
        Value::Bool(b) => Some(*b),
        _ => None,
    }
}

impl ModelConfig {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let arch_name = meta_str(md, "general.architecture")
            .ok_or_else(|| EngineError::MissingMetadata {
                key: "general.architecture".into(),
            })?
            .to_string();
        let architecture = Architecture::parse(&arch_name)?;
        let req = |k: &str| -> Result<usize> {
            let key = format!("{arch_name}.{k}");
            meta_u64(md, &key)
                .map(|v| v as usize)
                .ok_or(EngineError::MissingMetadata { key })
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(EngineError::MissingMetadata {
                key: format!("{arch_name}.attention.head_count"),
            });
        }
        let n_head_kv = meta_u64(md, &format!("{arch_name}.attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_head);
        let head_dim = meta_u64(md, &format!("{arch_name}.attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(n_embd / n_head);
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::MissingMetadata {
                key: format!("{arch_name}.attention.head_count_kv"),
            });
        }
        let rope_dim = meta_u64(md, &format!("{arch_name}.rope.dimension_count"))
            .map(|v| v as usize)
            .unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(EngineError::InvalidRequest(format!(
                "partial rotary embeddings (rope dimension {rope_dim} < head dimension {head_dim}) are not supported"
            )));
        }
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => req("vocab_size")?,
        };
        Ok(Self {
            architecture,
            name: meta_str(md, "general.name").map(str::to_string),
            n_layer: req("block_count")?,
            n_embd,
            n_ff: req("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim,
            rope_dim,
            rope_freq_base: meta_f32(md, &format!("{arch_name}.rope.freq_base"))
                .unwrap_or(10_000.0),
            rms_eps: meta_f32(md, &format!("{arch_name}.attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            context_length: req("context_length")?,
            vocab_size,
            architecture_name: arch_name,
        })
    }
}

/// Walks the GGUF header (v2/v3) to find the first tensor whose ggml type candle cannot
/// load. Only used to produce a precise error message.
fn scan_for_unknown_type(path: &Path) -> std::io::Result<Option<(String, u32)>> {
    let mut r = BufReader::new(File::open(path)?);
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    if &b4 != b"GGUF" {
        return Ok(None);
    }
    r.read_exact(&mut b4)?;
    let version = u32::from_le_bytes(b4);
    if version < 2 {
        return Ok(None);
    }
    fn read_u32(r: &mut BufReader<File>) -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_u64(r: &mut BufReader<File>) -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    let n_tensors = read_u64(&mut r)?;
    let n_kv = read_u64(&mut r)?;
    fn skip_value(r: &mut BufReader<File>, t: u32) -> std::io::Result<()> {
        let size: i64 = match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => read_u64(r)? as i64,
            9 => {
                let at = read_u32(r)?;
                let n = read_u64(r)?;
                for _ in 0..n {
                    skip_value(r, at)?;
                }
                0
            }
            _ => return Err(std::io::Error::other("bad metadata type")),
        };
        r.seek(SeekFrom::Current(size))?;
        Ok(())
    }
    for _ in 0..n_kv {
        let klen = read_u64(&mut r)?;
        r.seek(SeekFrom::Current(klen as i64))?;
        let t = read_u32(&mut r)?;
        skip_value(&mut r, t)?;
    }
    for _ in 0..n_tensors {
        let nlen = read_u64(&mut r)? as usize;
        if nlen > 1 << 16 {
            return Ok(None);
        }
        let mut name = vec![0u8; nlen];
        r.read_exact(&mut name)?;
        let nd = read_u32(&mut r)?;
        r.seek(SeekFrom::Current(8 * nd as i64))?;
        let t = read_u32(&mut r)?;
        let _offset = read_u64(&mut r)?;
        let known = matches!(t, 0..=3 | 6..=15 | 30);
        if !known {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), t)));
        }
    }
    Ok(None)
}
