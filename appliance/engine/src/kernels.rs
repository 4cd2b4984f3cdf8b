//! CPU matrix kernels the engine owns, for weight types where candle's are missing or
//! differ from llama.cpp's numerics.
//!
//! Q4_1 × Q8_1 follows ggml exactly: activations are quantized per 32-value block with
//! `d = amax / 127`, values `round_ties_even(x * 127 / amax)`, `d` stored as f16 and the
//! block sum `s = f16(d * Σq)`; a dot product is `Σ_blocks d_w·d_x·Σq_w q_x + m_w·s_x`.
//! Reproducing this keeps our logits within rounding of llama.cpp's, where candle's Q4_1
//! path (f16 block sums, scalar code) drifts by tenths and is several times slower.
//!
//! A batched call quantizes every activation row once and walks each weight row once
//! for all of them: the weights are read once per step, whatever the batch size.

use half::f16;
use rayon::prelude::*;

/// ggml's Q4_1 block: 32 weights `d·q + m`, `q` in 0..16; low nibbles hold values 0..16,
/// high nibbles 16..32. Scales kept as f32 for the inner loop.
#[derive(Debug, Clone, Copy)]
struct BlockQ41 {
    d: f32,
    m: f32,
    qs: [u8; 16],
}

/// ggml's Q8_1 block for activations.
#[derive(Debug, Clone, Copy)]
struct BlockQ81 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

const QK: usize = 32;
const Q41_BYTES: usize = 20;

/// A Q4_1 weight matrix `[rows, cols]` (rows = outputs).
#[derive(Debug)]
pub struct Q41Matrix {
    pub rows: usize,
    pub cols: usize,
    blocks: Vec<BlockQ41>,
}

impl Q41Matrix {
    /// From ggml's raw Q4_1 bytes (20 bytes per 32 weights, row-major).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(QK) || bytes.len() != rows * cols / QK * Q41_BYTES {
            return None;
        }
        let blocks = bytes
            .chunks_exact(Q41_BYTES)
            .map(|b| {
                let mut qs = [0u8; 16];
                qs.copy_from_slice(&b[4..20]);
                BlockQ41 {
                    d: f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    m: f16::from_le_bytes([b[2], b[3]]).to_f32(),
                    qs,
                }
            })
            .collect();
        Some(Self { rows, cols, blocks })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.blocks.len() * std::mem::size_of::<BlockQ41>()
    }

    /// `x` is `[m, cols]` row-major; returns `[m, rows]` = `x · Wᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let kb = self.cols / QK;
        debug_assert_eq!(x.len(), m * self.cols);
        let mut xq = vec![
            BlockQ81 {
                d: 0.0,
                s: 0.0,
                qs: [0; 32]
            };
            m * kb
        ];
        for (row, out) in x.chunks_exact(self.cols).zip(xq.chunks_exact_mut(kb)) {
            quantize_row_q8_1(row, out);
        }
        // Output computed transposed ([rows, m]) in parallel chunks of weight rows.
        const CHUNK: usize = 16;
        let mut out_t = vec![0f32; self.rows * m];
        out_t
            .par_chunks_mut(CHUNK * m)
            .enumerate()
            .for_each(|(ci, dst)| {
                let r0 = ci * CHUNK;
                for (ri, d_row) in dst.chunks_exact_mut(m).enumerate() {
                    let w = &self.blocks[(r0 + ri) * kb..(r0 + ri + 1) * kb];
                    for (i, slot) in d_row.iter_mut().enumerate() {
                        *slot = dot_q41_q81(w, &xq[i * kb..(i + 1) * kb]);
                    }
                }
            });
        if m == 1 {
            return out_t;
        }
        let mut out = vec![0f32; m * self.rows];
        for r in 0..self.rows {
            for i in 0..m {
                out[i * self.rows + r] = out_t[r * m + i];
            }
        }
        out
    }
}

/// ggml's `quantize_row_q8_1` (the SIMD path's arithmetic).
fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ81]) {
    for (b, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in blk.qs.iter_mut().zip(b) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        blk.d = f16::from_f32(d).to_f32();
        blk.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

/// One Q4_1 row times one Q8_1 row, summed in ggml's x86 order: eight float lanes,
/// lane `l` accumulating (by FMA) the integer dot of values `4l..4l+4` of every block
/// times `d_w·d_x`; the min terms summed separately; the lanes reduced pairwise.
#[inline]
fn dot_q41_q81(w: &[BlockQ41], x: &[BlockQ81]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    {
        simd::dot_q41_q81(w, x)
    }
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    {
        dot_q41_q81_scalar(w, x)
    }
}

/// The portable version of [`dot_q41_q81`]; same arithmetic, same result.
#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn dot_q41_q81_scalar(w: &[BlockQ41], x: &[BlockQ81]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, xb) in w.iter().zip(x) {
        summs += wb.m * xb.s;
        let dd = wb.d * xb.d;
        let mut lanes = [0i32; 8];
        for j in 0..16 {
            lanes[j / 4] += (wb.qs[j] & 0x0F) as i32 * xb.qs[j] as i32;
            lanes[4 + j / 4] += (wb.qs[j] >> 4) as i32 * xb.qs[j + 16] as i32;
        }
        for (a, s) in acc.iter_mut().zip(lanes) {
            *a = dd.mul_add(s as f32, *a);
        }
    }
    let r = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let r = [r[0] + r[2], r[1] + r[3]];
    (r[0] + r[1]) + summs
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
#[allow(unsafe_code)]
mod simd {
    use super::{BlockQ41, BlockQ81};
    use std::arch::x86_64::*;

    pub(super) fn dot_q41_q81(w: &[BlockQ41], x: &[BlockQ81]) -> f32 {
        // SAFETY: this module is compiled only when AVX2 and FMA are enabled for the
        // whole build, so every intrinsic used is available; the loads read exactly the
        // 16 and 32 bytes of `qs` arrays owned by the blocks (unaligned loads).
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            let mut summs = 0f32;
            for (wb, xb) in w.iter().zip(x) {
                summs += wb.m * xb.s;
                let dd = _mm256_set1_ps(wb.d * xb.d);
                let packed = _mm_loadu_si128(wb.qs.as_ptr() as *const __m128i);
                let qw = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed));
                let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                // u8 × i8 pairs to i16 (at most 2·15·127, no saturation), then to i32
                // lanes of four consecutive values: exact integers.
                let lanes = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qx), ones);
                acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(lanes), acc);
            }
            let r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            let r = _mm_add_ss(r, _mm_movehdup_ps(r));
            _mm_cvtss_f32(r) + summs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds Q4_1 bytes for a matrix the way ggml's reference quantizer does.
    fn q41_bytes(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in w.chunks_exact(QK) {
            let min = b.iter().copied().fold(f32::INFINITY, f32::min);
            let max = b.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let q0 = (((b[j] - min) * id + 0.5) as u8).min(15);
                let q1 = (((b[j + 16] - min) * id + 0.5) as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    #[test]
    fn matches_a_dequantized_reference_and_batches_consistently() {
        let (rows, cols, m) = (40, 96, 3);
        let mut rng = crate::sampling::Rng::new(9);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let bytes = q41_bytes(&w);
        let mat = Q41Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        let y = mat.matmul(&x, m);
        // Reference: dequantized weights times exact activations; activation rounding
        // (8 bits) bounds the difference.
        for i in 0..m {
            for r in 0..rows {
                let mut exact = 0f32;
                for (c, xv) in x[i * cols..(i + 1) * cols].iter().enumerate() {
                    let b = &mat.blocks[r * cols / QK + c / QK];
                    let j = c % QK;
                    let q = if j < 16 {
                        b.qs[j] & 15
                    } else {
                        b.qs[j - 16] >> 4
                    };
                    exact += (b.d * q as f32 + b.m) * xv;
                }
                let got = y[i * rows + r];
                assert!(
                    (got - exact).abs() < 0.05,
                    "row {r} seq {i}: {got} vs {exact}"
                );
            }
            // The same row alone gives the same result as in the batch.
            let single = mat.matmul(&x[i * cols..(i + 1) * cols], 1);
            assert_eq!(single, y[i * rows..(i + 1) * rows].to_vec());
        }
        assert!(Q41Matrix::from_ggml_bytes(&bytes[1..], rows, cols).is_none());
        // The SIMD and portable dot products agree bit for bit.
        let mut xq = vec![
            BlockQ81 {
                d: 0.0,
                s: 0.0,
                qs: [0; 32]
            };
            cols / QK
        ];
        quantize_row_q8_1(&x[..cols], &mut xq);
        for r in 0..rows {
            let wrow = &mat.blocks[r * cols / QK..(r + 1) * cols / QK];
            assert_eq!(
                dot_q41_q81(wrow, &xq).to_bits(),
                dot_q41_q81_scalar(wrow, &xq).to_bits()
            );
        }
    }
}

/// `exp(x)` computed as ggml's vectorised CPU path does (the AVX-512 variant of the
/// Arm optimized-routines algorithm: `x = n·ln2 + b`, a degree-5 polynomial in `b`,
/// scaled by `2^n`; max error about 1.5 ulp). Matching it keeps SiLU and softmax
/// roundings identical to llama.cpp's, which matters because the next matmul quantizes
/// its input to 8 bits.
pub fn ggml_expf(x: f32) -> f32 {
    const SHIFT: f32 = 12582912.0; // 0x1.8p23
    const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B); // 0x1.715476p+0
    const LN2_HI: f32 = f32::from_bits(0x3F31_7200); // 0x1.62e4p-1
    const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E); // 0x1.7f7d1cp-20
    const P1: f32 = f32::from_bits(0x3F7F_FFF6); // 0x1.ffffecp-1
    const P2: f32 = f32::from_bits(0x3EFF_FEDB); // 0x1.fffdb6p-2
    const P3: f32 = f32::from_bits(0x3E2A_AF33); // 0x1.555e66p-3
    const P4: f32 = f32::from_bits(0x3D2B_9F17); // 0x1.573e2ep-5
    const P5: f32 = f32::from_bits(0x3C07_2010); // 0x1.0e4020p-7
    let z = x.mul_add(LOG2E, SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = P5
        .mul_add(b, P4)
        .mul_add(u, P3.mul_add(b, P2))
        .mul_add(u, P1.mul_add(b, 1.0));
    scale_by_pow2(j, n as i32)
}

/// `j · 2^n` with a single rounding, as a hardware scale instruction does (the f64
/// product is exact).
fn scale_by_pow2(j: f32, n: i32) -> f32 {
    // |n| <= 192 here, well inside f64's exponent range: 2^n is built from its bits.
    let p = f64::from_bits(((n + 1023) as u64) << 52);
    ((j as f64) * p) as f32
}

/// SiLU(gate)·up, element-wise, with ggml's exp.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter()
        .zip(up)
        .map(|(&g, &u)| (g / (1.0 + ggml_expf(-g))) * u)
        .collect()
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn ggml_expf_is_accurate() {
        let mut worst = 0f64;
        let mut x = -80.0f32;
        while x < 80.0 {
            let ours = ggml_expf(x) as f64;
            let exact = (x as f64).exp();
            worst = worst.max(((ours - exact) / exact).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(ggml_expf(0.0), 1.0);
        assert_eq!(ggml_expf(-1000.0), 0.0);
        assert!(ggml_expf(1000.0).is_infinite());
        let mut r = [1.0f32, 2.0, f32::NEG_INFINITY, 3.0];
        softmax_row_chunked(&mut r);
        assert_eq!(r[2], 0.0);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

/// GCC's `_mm512_reduce_add_ps` order over 16 lanes.
fn reduce16(a: &[f32; 16]) -> f32 {
    let mut t3 = [0f32; 8];
    for i in 0..8 {
        t3[i] = a[i + 8] + a[i];
    }
    let t6 = [t3[4] + t3[0], t3[5] + t3[1], t3[6] + t3[2], t3[7] + t3[3]];
    let t8 = [t6[0] + t6[2], t6[1] + t6[3]];
    t8[0] + t8[1]
}

/// ggml's f16 dot product on AVX-512 (inputs already rounded to f16): element `i` goes
/// to register `(i/16)%4`, lane `i%16`, by FMA; registers are folded (0+2, 1+3, 0+1)
/// and the lanes reduced. Zero padding up to a multiple of 64 changes nothing, so any
/// length is handled as if padded.
pub fn f16_dot(x: &[f32], y: &[f32]) -> f32 {
    let mut sum = [[0f32; 16]; 4];
    for (i, (a, b)) in x.iter().zip(y).enumerate() {
        let s = &mut sum[(i / 16) % 4][i % 16];
        *s = a.mul_add(*b, *s);
    }
    let mut r = [0f32; 16];
    for l in 0..16 {
        let a = sum[0][l] + sum[2][l];
        let b = sum[1][l] + sum[3][l];
        r[l] = a + b;
    }
    reduce16(&r) as f64 as f32
}

/// The same dot as llamafile's tinyBLAS computes it on AVX-512 (llama.cpp's path for
/// f16 matrix products with two or more rows): one 16-lane accumulator, element `i`
/// FMA'd into lane `i%16` in order, then the lanes reduced.
pub fn f16_dot_chain(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (i, (a, b)) in x.iter().zip(y).enumerate() {
        let s = &mut acc[i % 16];
        *s = a.mul_add(*b, *s);
    }
    reduce16(&acc)
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Causal attention for one sequence as llama.cpp computes it without flash attention
/// and with an f16 KV cache: `q` is `[n_head, l, hd]` (new tokens at positions
/// `start..start+l`), `k`/`v` are `[n_kv, t, hd]` with `t = start + l`, all already
/// rounded to f16. Rows of a prompt use tinyBLAS's summation order, decode rows the
/// dot-product order. Returns `[l, n_head·hd]`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n_head: usize,
    n_kv: usize,
    l: usize,
    start: usize,
    hd: usize,
    scale: f32,
    prompt_rows: bool,
) -> Vec<f32> {
    let t = start + l;
    let group = n_head / n_kv;
    let dot: fn(&[f32], &[f32]) -> f32 = if prompt_rows { f16_dot_chain } else { f16_dot };
    // Heads are independent: computed in parallel, each into its own `[l, hd]` block.
    let per_head: Vec<Vec<f32>> = (0..n_head)
        .into_par_iter()
        .map(|h| {
            let kv = h / group;
            let kh = &k[kv * t * hd..(kv + 1) * t * hd];
            let vh = &v[kv * t * hd..(kv + 1) * t * hd];
            let mut p = vec![0f32; t];
            let mut slots = vec![0f32; hd * 64];
            let mut o = vec![0f32; l * hd];
            for r in 0..l {
                let qr = &q[(h * l + r) * hd..(h * l + r + 1) * hd];
                let visible = start + r + 1;
                for (c, pc) in p.iter_mut().enumerate() {
                    *pc = if c < visible {
                        dot(qr, &kh[c * hd..(c + 1) * hd]) * scale
                    } else {
                        f32::NEG_INFINITY
                    };
                }
                softmax_row_chunked(&mut p);
                for pc in p.iter_mut() {
                    *pc = f16_round(*pc);
                }
                weighted_values(
                    &p[..visible],
                    vh,
                    hd,
                    prompt_rows,
                    &mut o[r * hd..(r + 1) * hd],
                    &mut slots,
                );
            }
            o
        })
        .collect();
    let mut out = vec![0f32; l * n_head * hd];
    for (h, o) in per_head.iter().enumerate() {
        for r in 0..l {
            out[r * n_head * hd + h * hd..r * n_head * hd + (h + 1) * hd]
                .copy_from_slice(&o[r * hd..(r + 1) * hd]);
        }
    }
    out
}

/// `o[d] = Σ_c p[c]·v[c][d]` for every `d` at once, with each `d`'s sum accumulated in
/// exactly the order [`f16_dot_chain`] (prompt rows) or [`f16_dot`] (decode rows) would
/// use over positions: the loop runs over positions outside and dimensions inside, so
/// `v` is read row by row. `slots` is scratch of `hd·64` floats.
fn weighted_values(p: &[f32], v: &[f32], hd: usize, chain: bool, o: &mut [f32], slots: &mut [f32]) {
    slots.fill(0.0);
    if chain {
        // 16 accumulators per dimension: position c goes to slot c % 16.
        for (c, pc) in p.iter().enumerate() {
            let vr = &v[c * hd..(c + 1) * hd];
            let base = c % 16;
            for d in 0..hd {
                let s = &mut slots[d * 64 + base];
                *s = pc.mul_add(vr[d], *s);
            }
        }
        for (d, od) in o.iter_mut().enumerate() {
            let mut lanes = [0f32; 16];
            lanes.copy_from_slice(&slots[d * 64..d * 64 + 16]);
            *od = reduce16(&lanes);
        }
    } else {
        // 4 registers × 16 lanes per dimension: position c goes to slot 16·((c/16)%4) + c%16.
        for (c, pc) in p.iter().enumerate() {
            let vr = &v[c * hd..(c + 1) * hd];
            let slot = 16 * ((c / 16) % 4) + c % 16;
            for d in 0..hd {
                let s = &mut slots[d * 64 + slot];
                *s = pc.mul_add(vr[d], *s);
            }
        }
        for (d, od) in o.iter_mut().enumerate() {
            let sl = &slots[d * 64..d * 64 + 64];
            let mut r = [0f32; 16];
            for l in 0..16 {
                r[l] = (sl[l] + sl[32 + l]) + (sl[16 + l] + sl[48 + l]);
            }
            *od = reduce16(&r) as f64 as f32;
        }
    }
}

/// ggml's softmax on AVX-512: exp per 16-value chunk, each chunk's sum reduced in f32
/// (GCC's order) and accumulated in f64, then one multiplication by the f32 reciprocal.
pub fn softmax_row_chunked(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for chunk in row.chunks_mut(16) {
        let mut lanes = [0f32; 16];
        for (i, v) in chunk.iter_mut().enumerate() {
            *v = ggml_expf(*v - max);
            lanes[i] = *v;
        }
        sum += reduce16(&lanes) as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// RoPE on the CPU as ggml computes it. `x` is `[tokens, heads, hd]`, `cos`/`sin` are
/// `[tokens, hd/2]`. `neox` rotates `(i, i + hd/2)` pairs, otherwise adjacent pairs.
/// The rotations are fused multiply-adds, as GCC contracts ggml's expressions.
pub fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], heads: usize, hd: usize, neox: bool) {
    let half = hd / 2;
    for (t, tok) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (
            &cos[t * half..(t + 1) * half],
            &sin[t * half..(t + 1) * half],
        );
        for head in tok.chunks_exact_mut(hd) {
            for i in 0..half {
                let (a, b) = if neox {
                    (i, i + half)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0.mul_add(c[i], -(x1 * s[i]));
                head[b] = x0.mul_add(s[i], x1 * c[i]);
            }
        }
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;

    #[test]
    fn rope_rotates_pairs_by_the_angle() {
        // One token, one head of 4: pairs (0,1) and (2,3) rotated by 90° and 0°.
        let mut x = vec![1.0f32, 0.0, 0.5, 2.0];
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0], 1, 4, false);
        assert_eq!(x, vec![0.0, 1.0, 0.5, 2.0]);
        // NeoX pairs (0,2) and (1,3).
        let mut x = vec![1.0f32, 0.0, 0.0, 3.0];
        rope(&mut x, &[0.0, 0.0], &[1.0, 1.0], 1, 4, true);
        assert_eq!(x, vec![0.0, -3.0, 1.0, 0.0]);
    }

    #[test]
    fn attention_is_causal_softmax_weighted_values() {
        // 2 heads sharing 1 kv head, 3 positions, head dim 2; values chosen exact in f16.
        let (n_head, n_kv, hd, l) = (2, 1, 2, 3);
        let q = vec![
            1.0, 0.0, 0.0, 1.0, 1.0, 1.0, /* head 1 */ 0.0, 0.0, 1.0, 0.0, 0.5, 0.5,
        ];
        let k = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let v = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        for prompt_rows in [true, false] {
            let out = attention(&q, &k, &v, n_head, n_kv, l, 0, hd, 0.5, prompt_rows);
            // Row 0 sees only position 0: its output is v[0] for both heads.
            assert_eq!(&out[0..2], &[1.0, 2.0]);
            assert_eq!(&out[2..4], &[1.0, 2.0]);
            // Head 0, row 2: scores q·k·0.5 = [0.5, 0.5, 1.0], softmax by f64 reference.
            let s = [0.5f64, 0.5, 1.0];
            let e: Vec<f64> = s.iter().map(|x| (x - 1.0).exp()).collect();
            let z: f64 = e.iter().sum();
            let expect0: f64 = e.iter().zip([1.0, 3.0, 5.0]).map(|(a, b)| a / z * b).sum();
            let got = out[2 * n_head * hd] as f64;
            assert!((got - expect0).abs() < 2e-3, "{got} vs {expect0}");
        }
    }
}
