//! CPU matrix kernels the engine owns, for weight types where candle's are missing or
//! differ from llama.cpp's numerics.
//!
//! Q4_1 × Q8_1 follows ggml exactly: activations are quantized per 32-value block with
//! `d = amax / 127`, values `round_ties_even(x * 127 / amax)`, `d` stored as f16 and the
//! block sum `s = f16(d * Σq)`; a dot product is `Σ_blocks d_w·d_x·Σq_w q_x + m_w·s_x`.
//! Reproducing this keeps our logits within rounding of llama.cpp's, where candle's Q4_1
//! path (f16 block sums, scalar code) drifts by tenths and is several times slower.
//!
//! The other types follow ggml's x86 arithmetic the same way (Q4_0 and Q4_K that of its
//! repacked eight-row GEMMs, Q5_0, Q6_K and Q8_0 that of its `vec_dot`s). Weights are
//! regrouped at load sixteen rows at a time so that a kernel keeps one row per 32-bit
//! lane; each kernel exists portable, with AVX2 and with AVX-512 VNNI, chosen at run
//! time, all giving the same bits. A batched call quantizes every activation row once
//! and walks each weight group once per pass of one to four activation rows.

use std::sync::Mutex;

use half::f16;

use crate::pool::Pool;

mod plain;

#[cfg(test)]
/// ggml's Q4_1 block: 32 weights `d·q + m`, `q` in 0..16; low nibbles hold values 0..16,
/// high nibbles 16..32. Scales kept as f32 for the inner loop.
#[derive(Debug, Clone, Copy)]
struct BlockQ41 {
    d: f32,
    m: f32,
    qs: [u8; 16],
}

/// ggml's Q8_1 block for activations.
#[derive(Debug, Clone, Copy, Default)]
struct BlockQ81 {
    d: f32,
    s: f32,
    qs: [i8; 32],
}

const QK: usize = 32;
const Q41_BYTES: usize = 20;

/// Sixteen rows' Q4_1 blocks at one block index, laid out for kernels that keep one
/// row per 32-bit lane: the sixteen rows' f16 scales `d`, their mins `m`, then, for each
/// of a block's four 4-byte words of nibbles, that word of all sixteen rows. 320 bytes:
/// 20 per block, as in the file.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q41x16 {
    d: [u16; 16],
    m: [u16; 16],
    qs: [[u32; 16]; 4],
}

/// Sixteen rows' Q8_0 blocks at one block index: the f16 scales, then, for each of a
/// block's eight 4-byte words of signed quants, that word of all sixteen rows. 544
/// bytes: 34 per block, as in the file.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q80x16 {
    d: [u16; 16],
    qs: [[u32; 16]; 8],
}

/// Sixteen rows' Q5_0 blocks at one block index (weights `d·(q − 16)`, `q` five bits:
/// a nibble as in Q4_0 and a high bit from the block's 32-bit `qh`): the scales, the
/// nibble words as in [`Q40x16`], and the high bits regrouped as eight 64-bit masks, one
/// per 4-value word `j` of the block, bit `4r + b` the high bit of row `r`'s value
/// `4j + b` — the byte mask of that word of all sixteen rows. 352 bytes: 22 per block.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q50x16 {
    d: [u16; 16],
    hi: [u64; 8],
    qs: [[u32; 16]; 4],
}

/// Sixteen rows' Q6_K super-blocks (256 weights `d·sc_s·(q − 32)`, `q` six bits: four
/// from `ql`, two from `qh`; one signed scale `sc_s` per 16 weights) at one index: the
/// f16 scales, the sub-block scales `[sub][row]`, then `ql`'s 32 and `qh`'s 16 words
/// each for all sixteen rows. 3,360 bytes: 210 per super-block, as in the file.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q6Kx16 {
    d: [u16; 16],
    sc: [[i8; 16]; 16],
    ql: [[u32; 16]; 32],
    qh: [[u32; 16]; 16],
}

/// Sixteen rows' Q4_K super-blocks (256 weights `d·sc_s·q − dmin·m_s`, `q` a nibble,
/// eight sub-blocks `s` of 32 with six-bit scales and mins) at one index: the f16 `d`
/// and `dmin`, the unpacked scales and mins `[sub][row]`, then the 32 nibble words for
/// all sixteen rows. 2,368 bytes: 148 per super-block (the file's 144, its twelve
/// bytes of packed six-bit scales kept as sixteen).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q4Kx16 {
    d: [u16; 16],
    dmin: [u16; 16],
    sc: [[u8; 16]; 8],
    mn: [[u8; 16]; 8],
    qs: [[u32; 16]; 32],
}

impl GroupLayout for Q4Kx16 {
    const BLOCK_BYTES: usize = Q4K_BYTES;
    const ROWS: usize = 16;
    const BLOCK_VALUES: usize = 256;
    /// Row `r`'s super-block from ggml's bytes (`d`, `dmin`, 12 bytes of packed
    /// scales and mins, 128 bytes of nibbles), the scales unpacked as ggml's
    /// `get_scale_min_k4` does.
    fn put(&mut self, r: usize, b: &[u8]) {
        self.d[r] = u16::from_le_bytes([b[0], b[1]]);
        self.dmin[r] = u16::from_le_bytes([b[2], b[3]]);
        let q = &b[4..16];
        for j in 0..8 {
            let (sc, m) = if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                (
                    (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                    (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                )
            };
            self.sc[j][r] = sc;
            self.mn[j][r] = m;
        }
        for (k, w) in b[16..144].chunks_exact(4).enumerate() {
            self.qs[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
    }
}

impl Q4Kx16 {
    /// Row `r`'s nibble for value `e`: sub-blocks `2j` and `2j + 1` share bytes
    /// `32j..32j+32`, low and high nibbles.
    #[cfg(test)]
    fn value(&self, r: usize, e: usize) -> i32 {
        let (s, i) = (e / 32, e % 32);
        let word = self.qs[8 * (s / 2) + i / 4][r];
        ((word >> (8 * (i % 4) + 4 * (s % 2))) & 0xF) as i32
    }
}

/// Where value `e` (0..256) of a Q6_K super-block lives: `ql` word, its shift, `qh`
/// word, its shift (ggml's layout: per half of 128, `ql` low nibbles of bytes 0..64 then
/// high nibbles, `qh` two bits per value at 0, 2, 4, 6).
#[inline(always)]
fn q6k_place(e: usize) -> (usize, u32, usize, u32) {
    let (c, b) = (e / 32, e % 32);
    let (j, r) = (c / 4, c % 4);
    (
        (64 * j + 32 * (r & 1) + b) / 4,
        4 * (r as u32 >> 1),
        (32 * j + b) / 4,
        2 * r as u32,
    )
}

impl GroupLayout for Q6Kx16 {
    const BLOCK_BYTES: usize = Q6K_BYTES;
    const ROWS: usize = 16;
    const BLOCK_VALUES: usize = 256;
    /// Row `r`'s super-block from ggml's bytes (`ql`, `qh`, scales, `d`).
    fn put(&mut self, r: usize, b: &[u8]) {
        for (k, w) in b[..128].chunks_exact(4).enumerate() {
            self.ql[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
        for (k, w) in b[128..192].chunks_exact(4).enumerate() {
            self.qh[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
        for (s, &v) in b[192..208].iter().enumerate() {
            self.sc[s][r] = v as i8;
        }
        self.d[r] = u16::from_le_bytes([b[208], b[209]]);
    }
}

/// Sixteen rows' Q4_0 blocks at one block index (weights `d·(q − 8)`; in the file, low
/// nibbles hold values 0..16 and high nibbles 16..32), laid out for kernels that keep
/// one row per 32-bit lane: the sixteen f16 scales, then, for each of a block's four
/// 4-byte words of nibbles, that word of all sixteen rows. 288 bytes: 18 per block, as
/// in the file. This is the shape of llama.cpp's repacked Q4_0 (`block_q4_0x8`), whose
/// arithmetic the kernels follow (see [`Q40Matrix`]).
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
pub struct Q40x16 {
    d: [u16; 16],
    qs: [[u32; 16]; 4],
}

/// A group of rows' blocks of one ggml type (sixteen rows unless said otherwise).
pub trait GroupLayout: Default + Clone {
    /// Bytes of one ggml block (32 weights) in the file.
    const BLOCK_BYTES: usize;
    /// Rows per group.
    const ROWS: usize = 16;
    /// Weights per block (32; 256 for K-quants).
    const BLOCK_VALUES: usize = QK;
    /// Puts row `r`'s block, as ggml stores it, into the group.
    fn put(&mut self, r: usize, b: &[u8]);
}

impl GroupLayout for Q41x16 {
    const BLOCK_BYTES: usize = Q41_BYTES;
    const ROWS: usize = 16;
    /// Row `r`'s block from ggml's bytes (`d`, `m`, 16 bytes of nibbles).
    fn put(&mut self, r: usize, b: &[u8]) {
        self.d[r] = u16::from_le_bytes([b[0], b[1]]);
        self.m[r] = u16::from_le_bytes([b[2], b[3]]);
        for (k, w) in b[4..20].chunks_exact(4).enumerate() {
            self.qs[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
    }
}

impl GroupLayout for Q80x16 {
    const BLOCK_BYTES: usize = Q80_BYTES;
    const ROWS: usize = 16;
    /// Row `r`'s block from ggml's bytes (`d`, 32 signed bytes).
    fn put(&mut self, r: usize, b: &[u8]) {
        self.d[r] = u16::from_le_bytes([b[0], b[1]]);
        for (k, w) in b[2..34].chunks_exact(4).enumerate() {
            self.qs[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
    }
}

#[cfg(test)]
impl Q41x16 {
    /// Row `r`'s block, scales as f32.
    fn row(&self, r: usize) -> BlockQ41 {
        let mut qs = [0u8; 16];
        for (k, w) in qs.chunks_exact_mut(4).enumerate() {
            w.copy_from_slice(&self.qs[k][r].to_le_bytes());
        }
        BlockQ41 {
            d: f16::from_bits(self.d[r]).to_f32(),
            m: f16::from_bits(self.m[r]).to_f32(),
            qs,
        }
    }
}

impl Q80x16 {
    /// Row `r`'s block, scale as f32.
    fn row(&self, r: usize) -> BlockQ80 {
        let mut qs = [0i8; 32];
        for (k, w) in qs.chunks_exact_mut(4).enumerate() {
            for (q, b) in w.iter_mut().zip(self.qs[k][r].to_le_bytes()) {
                *q = b as i8;
            }
        }
        BlockQ80 {
            d: f16::from_bits(self.d[r]).to_f32(),
            o: [0; 8],
            o5: [0; 8],
            qs,
        }
    }
}

impl GroupLayout for Q50x16 {
    const BLOCK_BYTES: usize = Q50_BYTES;
    const ROWS: usize = 16;
    /// Row `r`'s block from ggml's bytes (`d`, `qh`, 16 bytes of nibbles).
    fn put(&mut self, r: usize, b: &[u8]) {
        self.d[r] = u16::from_le_bytes([b[0], b[1]]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for (j, m) in self.hi.iter_mut().enumerate() {
            let bits = (qh >> (4 * j)) & 0xF;
            *m = (*m & !(0xF << (4 * r))) | (u64::from(bits) << (4 * r));
        }
        for (k, w) in b[6..22].chunks_exact(4).enumerate() {
            self.qs[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
    }
}

#[cfg(test)]
impl Q50x16 {
    /// Row `r`'s block as signed values `q − 16` with its scale.
    fn row(&self, r: usize) -> BlockQ80 {
        let mut qs = [0i8; 32];
        for (i, q) in qs.iter_mut().enumerate() {
            let (j, b) = (i / 4, i % 4);
            let byte = self.qs[j % 4][r].to_le_bytes()[b];
            let nib = if j < 4 { byte & 15 } else { byte >> 4 };
            let high = ((self.hi[j] >> (4 * r + b)) & 1) as u8;
            *q = (nib | (high << 4)) as i8 - 16;
        }
        BlockQ80 {
            d: f16::from_bits(self.d[r]).to_f32(),
            o: [0; 8],
            o5: [0; 8],
            qs,
        }
    }
}

impl GroupLayout for Q40x16 {
    const BLOCK_BYTES: usize = Q40_BYTES;
    const ROWS: usize = 16;
    /// Row `r`'s block from ggml's bytes (`d`, 16 bytes of nibbles).
    fn put(&mut self, r: usize, b: &[u8]) {
        self.d[r] = u16::from_le_bytes([b[0], b[1]]);
        for (k, w) in b[2..18].chunks_exact(4).enumerate() {
            self.qs[k][r] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        }
    }
}

/// A weight matrix `[rows, cols]` (rows = outputs) stored as groups of `G::ROWS` rows.
#[derive(Debug)]
pub struct Grouped<G> {
    pub rows: usize,
    pub cols: usize,
    groups: Vec<G>,
}

impl<G: GroupLayout> Grouped<G> {
    /// From ggml's raw row-major blocks (`G::BLOCK_BYTES` per 32 weights).
    pub fn from_ggml_bytes(bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(G::BLOCK_VALUES)
            || bytes.len() != rows * (cols / G::BLOCK_VALUES) * G::BLOCK_BYTES
        {
            return None;
        }
        Self::read(&mut &bytes[..], rows, cols).ok()?
    }

    /// The same, read row by row from `r` (a GGUF file's tensor data: no copy of the
    /// whole tensor is ever held). `None` when `cols` is not a multiple of the block size.
    pub fn read(
        r: &mut impl std::io::Read,
        rows: usize,
        cols: usize,
    ) -> std::io::Result<Option<Self>> {
        if !cols.is_multiple_of(G::BLOCK_VALUES) {
            return Ok(None);
        }
        let kb = cols / G::BLOCK_VALUES;
        let mut groups = vec![G::default(); rows.div_ceil(G::ROWS) * kb];
        let mut row = vec![0u8; kb * G::BLOCK_BYTES];
        for i in 0..rows {
            r.read_exact(&mut row)?;
            for (b, blk) in row.chunks_exact(G::BLOCK_BYTES).enumerate() {
                groups[(i / G::ROWS) * kb + b].put(i % G::ROWS, blk);
            }
        }
        Ok(Some(Self { rows, cols, groups }))
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.groups.len() * std::mem::size_of::<G>()
    }
}

/// A Q4_1 weight matrix.
pub type Q41Matrix = Grouped<Q41x16>;

impl Q41Matrix {
    /// Row `r`'s block `b`, scales as f32.
    #[cfg(test)]
    fn block(&self, r: usize, b: usize) -> BlockQ41 {
        let g = &self.groups[(r / 16) * (self.cols / QK) + b];
        g.row(r % 16)
    }

    /// `x` is `[m, cols]` row-major; returns `[m, rows]` = `x · Wᵀ` (on the calling
    /// thread; the engine uses [`Q41Matrix::matmul_into`]).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * self.rows];
        self.matmul_into(x, m, &mut out, &Pool::new(1));
        out
    }

    /// `out[m, rows] = x[m, cols] · Wᵀ`, the rows spread over `pool`.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        matmul_many(&mut [(self, out)], x, m, pool);
    }
}

/// A weight group type whose matmul quantizes the activations one way for every row
/// (Q4_0, Q4_1, Q5_0, Q8_0): the activations' block type, the quantizer, the kernel
/// and how many activation rows one kernel call takes.
trait Plain: Sized + Sync {
    type X: Default + Clone + Send + Sync;
    fn quantize(x: &[f32], out: &mut [Self::X]);
    fn step() -> usize;
    fn kernel(w: &[Self], x: &[&[Self::X]], out: &mut [[f32; 4]; 16]);
}

/// `impl Plain` for a group type: activation block, quantizer, rows per call, kernel.
macro_rules! plain {
    ($g:ty, $x:ty, $quantize:expr, $step:expr, $kernel:expr) => {
        impl Plain for $g {
            type X = $x;
            fn quantize(x: &[f32], out: &mut [$x]) {
                $quantize(x, out)
            }
            fn step() -> usize {
                $step
            }
            fn kernel(w: &[Self], x: &[&[$x]], out: &mut [[f32; 4]; 16]) {
                $kernel(w, x, out)
            }
        }
    };
}
plain!(
    Q41x16,
    BlockQ81,
    quantize_row_q8_1,
    lanes_step(),
    dot_q41_group
);
plain!(
    Q80x16,
    BlockQ80,
    quantize_row_q8_0,
    lanes_step(),
    dot_q80_group
);
plain!(
    Q50x16,
    BlockQ80,
    quantize_row_q8_0,
    q50_step(),
    dot_q50_group
);
plain!(Q40x16, BlockQ80S, quantize_row_q8_0s, 4, dot_q40_group);

/// `out_k[m, rows_k] = x[m, cols] · W_kᵀ` for matrices of one type that read the same
/// input (a layer's Q, K and V projections; its gate and up): the input is quantized
/// once and all of their groups are spread over `pool` in one run (one split, one
/// wait), instead of one quantization and one run per matrix. Each dot product is the
/// one the matrix computes alone: same bits.
///
/// # Panics
/// When the matrices' column counts differ or an output is not `[m, rows]`.
#[allow(private_bounds)]
pub fn matmul_many<G: Plain + GroupLayout>(
    mats: &mut [(&Grouped<G>, &mut [f32])],
    x: &[f32],
    m: usize,
    pool: &Pool,
) {
    let Some(cols) = mats.first().map(|(w, _)| w.cols) else {
        return;
    };
    assert!(mats
        .iter()
        .all(|(w, o)| w.cols == cols && o.len() == m * w.rows));
    debug_assert_eq!(x.len(), m * cols);
    let kb = cols / QK;
    let mut xq = vec![G::X::default(); m * kb];
    quantize_rows(x, cols, &mut xq, kb, pool, G::quantize);
    let parts = mats
        .iter_mut()
        .map(|(w, o)| (&w.groups[..], w.rows, &mut **o))
        .collect();
    grouped_many(parts, &xq, kb, m, pool, G::step(), &G::kernel);
}

/// ggml's Q8_0 block of activations: 32 values `d·q`, scale kept as f32; `o[j]` is
/// `−128·Σ` of values `4j..4j+4` (for kernels that offset signed weights to unsigned),
/// `o5[j]` `−16·Σ` of them (Q5_0's `q − 16`; kept apart so a kernel broadcasts it
/// straight from memory).
#[derive(Debug, Clone, Copy, Default)]
struct BlockQ80 {
    d: f32,
    o: [i32; 8],
    o5: [i32; 8],
    qs: [i8; 32],
}

const Q80_BYTES: usize = 34;

/// A Q8_0 weight matrix: the output head of most GGUF files, and the layers of Q8_0
/// files. Activations are quantized to Q8_0 as ggml does and each dot product summed in
/// ggml's x86 order (as for Q4_1, without min terms).
pub type Q80Matrix = Grouped<Q80x16>;

impl Q80Matrix {
    /// `out[m, rows] = x[m, cols] · Wᵀ`, the rows spread over `pool`.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        matmul_many(&mut [(self, out)], x, m, pool);
    }

    /// Row `r` dequantized (`d·q`, as ggml's `dequantize_row_q8_0`): an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let kb = self.cols / QK;
        for (g, o) in self.groups[(r / 16) * kb..(r / 16 + 1) * kb]
            .iter()
            .zip(out.chunks_exact_mut(QK))
        {
            let b = g.row(r % 16);
            for (v, &q) in o.iter_mut().zip(&b.qs) {
                *v = b.d * q as f32;
            }
        }
    }
}

const Q40_BYTES: usize = 18;
const Q50_BYTES: usize = 22;
const Q6K_BYTES: usize = 210;
const Q4K_BYTES: usize = 144;
const QKK: usize = 256;

/// ggml's Q8_K block of activations (256 values, `d` kept as f32) with the sums of
/// each 16. `batch`: the row is one that llama.cpp multiplies in its batch order: for
/// Q6_K weights a row of a prompt of at least [`Q6K_BATCH_ROWS`] rows ([`Q6KMatrix`]),
/// for Q4_K one that its GEMM takes ([`Q4KMatrix`]).
#[derive(Debug, Clone, Copy)]
struct BlockQ8K {
    d: f32,
    bsums: [i32; 16],
    qs: [i8; 256],
    batch: bool,
}

impl Default for BlockQ8K {
    fn default() -> Self {
        Self {
            d: 0.0,
            bsums: [0; 16],
            qs: [0; 256],
            batch: false,
        }
    }
}

multiversion! {
    /// ggml's `quantize_row_q8_K_ref` (what x86 runs): the value of largest magnitude
    /// (the first, on ties) sets `iscale = −127/max`, values `min(127, round(iscale·x))`
    /// (half to even), `d = 1/iscale`; an all-zero block is zeros.
    fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        for (b, blk) in x.chunks_exact(QKK).zip(out.iter_mut()) {
            let (mut max, mut amax) = (0f32, 0f32);
            for &v in b {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            *blk = BlockQ8K::default();
            if amax == 0.0 {
                continue;
            }
            let iscale = -127.0 / max;
            for (q, &v) in blk.qs.iter_mut().zip(b) {
                *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
            }
            for (k, s) in blk.bsums.iter_mut().enumerate() {
                *s = blk.qs[16 * k..16 * k + 16].iter().map(|&q| q as i32).sum();
            }
            blk.d = 1.0 / iscale;
        }
    }
}

/// A Q6_K weight matrix (in Q4_K_M files, half the layers' FFN down projections):
/// activations quantized to Q8_K and each dot product in ggml's x86
/// `vec_dot_q6_K_q8_K` order: eight lanes, lane `l` the exact integer
/// `Σ_c sc·q·x` over values `32c + 4l..+4` of the super-block (`q` unsigned, 0..64)
/// less `32·(sc_{2l}·bsum_{2l} + sc_{2l+1}·bsum_{2l+1})` (ggml takes the offset of
/// `q − 32` from the 16-value sums, pairing them with lanes by position, not by the
/// values the lane holds), scaled by one FMA with `d_x·d_w` per super-block, the lanes
/// reduced as `hsum_float_8`.
///
/// That is llama.cpp's order for batches of fewer than [`Q6K_BATCH_ROWS`] rows (decode).
/// For larger ones (a prompt) it sums otherwise, measured against its `ggml_mul_mat`
/// through ctypes (every output equal): per super-block the whole exact integer
/// `Σ sc·(q − 32)·x`, converted and multiplied by `d_w`, then `acc = fma(d_x, ·, acc)`,
/// one chain per row from zero. Rows flagged as such (see [`Q6KMatrix::matmul_rows`])
/// take that order.
pub type Q6KMatrix = Grouped<Q6Kx16>;

/// The number of rows from which llama.cpp's CPU backend multiplies Q6_K weights in its
/// batch order (7 rows: per-row `vec_dot`; 8: the batch order).
pub const Q6K_BATCH_ROWS: usize = 8;

/// Where an activation row sits, for the weight types whose llama.cpp arithmetic
/// depends on the batch (Q6_K, Q4_K): `Some((i, l))` for row `i` of a prompt of `l`
/// rows (as llama.cpp runs that prompt alone), `None` for a decode or logits row.
pub type RowPlace = Option<(usize, usize)>;

/// `out[m, rows] = x[m, cols] · Wᵀ` for a K-quant matrix (activations quantized to
/// Q8_K), each row's `batch` flag set from its place by `batch(i, l)`.
#[allow(clippy::too_many_arguments)]
fn k_matmul<G: Sync>(
    w: &Grouped<G>,
    x: &[f32],
    m: usize,
    out: &mut [f32],
    pool: &Pool,
    places: &[RowPlace],
    batch: impl Fn(usize, usize) -> bool,
    kernel: &Group<'_, G, BlockQ8K, 16>,
) {
    let kb = w.cols / QKK;
    let mut xq = vec![BlockQ8K::default(); m * kb];
    quantize_rows(x, w.cols, &mut xq, kb, pool, quantize_row_q8_k);
    for (row, place) in xq.chunks_mut(kb).zip(places) {
        let b = place.is_some_and(|(i, l)| batch(i, l));
        for blk in row {
            blk.batch = b;
        }
    }
    grouped(&w.groups, &xq, kb, w.rows, m, out, pool, 1, kernel);
}

/// A Q4_K weight matrix (in Q4_K_M files, the other half of the FFN down
/// projections), computed as llama.cpp computes Q4_K on x86, where it repacks Q4_K into
/// eight-row tiles (`ggml_gemv/gemm_q4_K_8x8_q8_K`): activations quantized to Q8_K; per
/// row and super-block the exact integers `Σ_s sc_s·Σ q·x` and `Σ_s m_s·Σx`; the row's
/// result `acc − acc_min`, each the FMA chain over super-blocks of its integer times
/// `d_w·d_x` (resp. `dmin_w·d_x`). That is the GEMV, which llama.cpp runs for decode
/// rows and for the last `l % 4` rows of an `l`-row batch; its GEMM (the first
/// `4·⌊l/4⌋` rows, four at a time) has the same chains but one FMA per pair of
/// sub-blocks (64 values) instead of per super-block (`tests/oracle/q4k_order.py`,
/// every output equal).
pub type Q4KMatrix = Grouped<Q4Kx16>;

/// The K-quant group types whose llama.cpp order depends on a row's place.
trait KQuant: Sync + Sized + 'static {
    /// Whether row `i` of an `l`-row prompt takes llama.cpp's batch order.
    fn batch(i: usize, l: usize) -> bool;
    /// Sixteen weight rows × one activation row (see [`Levels::run`]).
    fn kernel(w: &[Self], x: &[&[BlockQ8K]], out: &mut [[f32; 4]; 16]);
}

impl KQuant for Q6Kx16 {
    fn batch(_: usize, l: usize) -> bool {
        l >= Q6K_BATCH_ROWS
    }
    fn kernel(w: &[Self], x: &[&[BlockQ8K]], out: &mut [[f32; 4]; 16]) {
        dot_q6k_group(w, x, out)
    }
}

impl KQuant for Q4Kx16 {
    /// llama.cpp's GEMM takes the first `4·⌊l/4⌋` rows.
    fn batch(i: usize, l: usize) -> bool {
        i < l - l % 4
    }
    fn kernel(w: &[Self], x: &[&[BlockQ8K]], out: &mut [[f32; 4]; 16]) {
        dot_q4k_group(w, x, out)
    }
}

#[allow(private_bounds)]
impl<G: KQuant> Grouped<G> {
    /// `out[m, rows] = x[m, cols] · Wᵀ`, the rows spread over `pool`, every row in the
    /// decode order.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        self.matmul_rows(x, m, out, pool, &[]);
    }

    /// As [`Grouped::matmul_into`], each row in the order llama.cpp gives it at its
    /// place (rows past `places`' end: decode order).
    pub fn matmul_rows(
        &self,
        x: &[f32],
        m: usize,
        out: &mut [f32],
        pool: &Pool,
        places: &[RowPlace],
    ) {
        k_matmul(self, x, m, out, pool, places, G::batch, &G::kernel);
    }
}

/// Q4_K × Q8_K (see [`Levels::run`]), one activation row at a time.
fn dot_q4k_group(w: &[Q4Kx16], x: &[&[BlockQ8K]], out: &mut [[f32; 4]; 16]) {
    Levels {
        #[cfg(target_arch = "x86_64")]
        zmm: Zmm::Rows(lanes::q4k_zmm),
        #[cfg(target_arch = "x86_64")]
        ymm: lanes::q4k_ymm,
        plain: plain::q4k_group,
    }
    .run(w, x, out)
}

/// One Q4_K row times one Q8_K row in llama.cpp's repacked order (see
/// [`Q4KMatrix`]); `q(b, e)` the nibble of value `e` of super-block `b`, `d(b)` and
/// `dmin(b)` its f16 scales as f32, `sm(b, s)` sub-block `s`'s scale and min: the tests'
/// reference (the portable kernel is [`plain::q4k_group`]).
#[cfg(test)]
fn dot_q4k_scalar(
    q: impl Fn(usize, usize) -> i32,
    d: impl Fn(usize) -> (f32, f32),
    sm: impl Fn(usize, usize) -> (i32, i32),
    x: &[BlockQ8K],
) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (b, xb) in x.iter().enumerate() {
        let (mut isum, mut imin) = (0i32, 0i32);
        let (dw, dmin) = d(b);
        // gemv: one FMA per super-block; gemm (batch rows): one per pair of sub-blocks.
        let every = if xb.batch { 2 } else { 8 };
        for s in 0..8 {
            let (sc, m) = sm(b, s);
            let dot: i32 = (32 * s..32 * s + 32)
                .map(|e| q(b, e) * xb.qs[e] as i32)
                .sum();
            isum += sc * dot;
            imin += m * (xb.bsums[2 * s] + xb.bsums[2 * s + 1]);
            if (s + 1) % every == 0 {
                acc = (isum as f32).mul_add(dw * xb.d, acc);
                acc_min = (imin as f32).mul_add(dmin * xb.d, acc_min);
                (isum, imin) = (0, 0);
            }
        }
    }
    acc - acc_min
}

/// [`dot_q4k_scalar`] for each row of a group.
#[cfg(test)]
fn dot_q4k_rows(w: &[Q4Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
    for (r, o) in out.iter_mut().enumerate() {
        *o = dot_q4k_scalar(
            |b, e| w[b].value(r, e),
            |b| {
                (
                    f16::from_bits(w[b].d[r]).to_f32(),
                    f16::from_bits(w[b].dmin[r]).to_f32(),
                )
            },
            |b, s| (w[b].sc[s][r] as i32, w[b].mn[s][r] as i32),
            x,
        );
    }
}

/// One Q6_K row (`w(b, e)` its value `e` of super-block `b` as unsigned `q`, `d(b)` and
/// `sc(b, s)` its scales) times one Q8_K row, in ggml's x86 order: the tests' reference
/// (the portable kernel is [`plain::q6k_group`]).
#[cfg(test)]
fn dot_q6k_scalar(
    w: impl Fn(usize, usize) -> i32,
    d: impl Fn(usize) -> f32,
    sc: impl Fn(usize, usize) -> i32,
    x: &[BlockQ8K],
) -> f32 {
    let mut acc = [0f32; 8];
    let mut chain = 0f32;
    for (b, xb) in x.iter().enumerate() {
        let mut lanes = [0i32; 8];
        for e in 0..QKK {
            lanes[(e % 32) / 4] += sc(b, e / 16) * w(b, e) * xb.qs[e] as i32;
        }
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane -= 32 * (sc(b, 2 * l) * xb.bsums[2 * l] + sc(b, 2 * l + 1) * xb.bsums[2 * l + 1]);
        }
        if xb.batch {
            // The whole super-block's exact integer, times `d_w`, then one FMA with `d_x`.
            let t = d(b) * lanes.iter().sum::<i32>() as f32;
            chain = xb.d.mul_add(t, chain);
            continue;
        }
        let dd = xb.d * d(b);
        for (a, l) in acc.iter_mut().zip(lanes) {
            *a = dd.mul_add(l as f32, *a);
        }
    }
    if x.first().is_some_and(|xb| xb.batch) {
        return chain;
    }
    let r = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let r = [r[0] + r[2], r[1] + r[3]];
    r[0] + r[1]
}

/// Q6_K × Q8_K (see [`Levels::run`]), one activation row at a time.
fn dot_q6k_group(w: &[Q6Kx16], x: &[&[BlockQ8K]], out: &mut [[f32; 4]; 16]) {
    Levels {
        #[cfg(target_arch = "x86_64")]
        zmm: Zmm::Rows(lanes::q6k_zmm),
        #[cfg(target_arch = "x86_64")]
        ymm: lanes::q6k_ymm,
        plain: plain::q6k_group,
    }
    .run(w, x, out)
}

/// A Q5_0 weight matrix (most layers of a Q4_K_M file whose rows are not a multiple of
/// 256): activations quantized to Q8_0 and each dot product in ggml's
/// `vec_dot_q5_0_q8_0` order, which is Q8_0's on the values `q − 16`.
pub type Q50Matrix = Grouped<Q50x16>;

impl Q50Matrix {
    /// `out[m, rows] = x[m, cols] · Wᵀ`, the rows spread over `pool`.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        matmul_many(&mut [(self, out)], x, m, pool);
    }
}

/// A Q4_0 weight matrix, computed as llama.cpp computes Q4_0 on x86 (where it repacks
/// Q4_0 into eight-row tiles: `ggml_gemv/gemm_q4_0_8x8_q8_0`): activations quantized to
/// Q8_0; per row and block the exact integer `Σ(q − 8)·x_q`; the row's result the FMA
/// chain `acc = f32(isum)·(d_w·d_x) + acc` over its blocks, from zero. Every (row,
/// sequence) pair has its own chain, so batching changes nothing.
pub type Q40Matrix = Grouped<Q40x16>;

/// Values `4k..4k+4` of an activation block as one little-endian word (a kernel
/// broadcasts it to every row's lane).
#[inline(always)]
fn word(qs: &[i8; 32], k: usize) -> i32 {
    let q = &qs[4 * k..4 * k + 4];
    i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
}

/// Q8_0 activations with the block's `−8·Σq` (the offset of Q4_0's `q − 8`, folded into
/// the integer sum before any rounding).
#[derive(Debug, Clone, Copy, Default)]
struct BlockQ80S {
    d: f32,
    s: i32,
    qs: [i8; 32],
}

multiversion! {
    /// [`quantize_row_q8_0`] keeping `−8·Σq` for Q4_0.
    fn quantize_row_q8_0s(x: &[f32], out: &mut [BlockQ80S]) {
        for (b, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, sum, qs) = quantize_block::<AVX2>(b);
            *blk = BlockQ80S {
                d: f16::from_f32(d).to_f32(),
                s: -8 * sum,
                qs,
            };
        }
    }
}

impl Q40Matrix {
    /// `out[m, rows] = x[m, cols] · Wᵀ`, the rows spread over `pool`.
    pub fn matmul_into(&self, x: &[f32], m: usize, out: &mut [f32], pool: &Pool) {
        matmul_many(&mut [(self, out)], x, m, pool);
    }
}

/// One block of 32 activations quantized as ggml's x86 `quantize_row_q8_0/1` do:
/// `d = amax/127`, `q = round_half_even(x·(127/amax))`; returns `d`, `Σq` and `q`.
#[inline(always)]
fn quantize_block<const AVX2: bool>(b: &[f32]) -> (f32, i32, [i8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` is true only in a build that enables AVX2 and FMA or in a
        // `multiversion!` twin, which runs after the CPU was seen to have them.
        #[allow(unsafe_code)]
        return unsafe { simd::quantize_block(b) };
    }
    quantize_block_portable(b)
}

/// [`quantize_block`] in plain code (the same values: the max and the integer sum are
/// exact, the product and rounding the same operations).
#[inline(always)]
fn quantize_block_portable(b: &[f32]) -> (f32, i32, [i8; 32]) {
    let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; 32];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(b) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (amax / 127.0, sum, qs)
}

multiversion! {
    /// ggml's `quantize_row_q8_0` on x86 (`d` kept as f16).
    fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ80]) {
        for (b, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, _, qs) = quantize_block::<AVX2>(b);
            let o: [i32; 8] = std::array::from_fn(|j| {
                -128 * qs[4 * j..4 * j + 4].iter().map(|&q| q as i32).sum::<i32>()
            });
            *blk = BlockQ80 {
                d: f16::from_f32(d).to_f32(),
                o,
                o5: o.map(|v| v / 8),
                qs,
            };
        }
    }
}

/// A group kernel: one group of `R` weight rows (`kb` groups of blocks) times one to
/// four activation rows; `out[row][i]`.
type Group<'a, G, X, const R: usize> = dyn Fn(&[G], &[&[X]], &mut [[f32; 4]; R]) + Sync + 'a;

/// The environment variable that caps the kernel level (`avx2`, `sse4` or `portable`;
/// unset, `auto` or `avx512`: the best this CPU has). A cap only ever lowers the level: a CPU
/// never runs kernels it lacks. For measuring or ruling out a kernel level on one box.
pub const KERNELS_ENV: &str = "APPLIANCE_KERNELS";

/// The levels the kernels come in, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Avx512,
    Avx2,
    /// The portable kernels compiled again for SSSE3 and SSE4.1 (x86-64-v2 CPUs without
    /// AVX2, FMA or F16C): same code, same bits.
    Sse4,
    Portable,
}

/// The level that runs: the best detected (`has512`, `has2`, `has4`) within what `asked`
/// caps it to; an unknown value asks for nothing (and is reported once by [`level`]).
fn choose(asked: Option<&str>, has512: bool, has2: bool, has4: bool) -> (Level, bool) {
    let detected = if has512 {
        Level::Avx512
    } else if has2 {
        Level::Avx2
    } else if has4 {
        Level::Sse4
    } else {
        Level::Portable
    };
    let cap = match asked.map(str::trim) {
        None | Some("") | Some("auto") | Some("avx512") => Some(Level::Avx512),
        Some("avx2") => Some(Level::Avx2),
        Some("sse4") => Some(Level::Sse4),
        Some("portable") => Some(Level::Portable),
        Some(_) => None,
    };
    (detected.max(cap.unwrap_or(Level::Avx512)), cap.is_some())
}

/// This machine's level, looked up once (the CPU's features, capped by [`KERNELS_ENV`]).
fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        // The AVX-512 kernels enable AVX2, FMA and F16C too.
        #[cfg(target_arch = "x86_64")]
        let has2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        #[cfg(target_arch = "x86_64")]
        let has512 = has2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni");
        // Every AVX2 CPU has SSSE3 and SSE4.1.
        #[cfg(target_arch = "x86_64")]
        let has4 = is_x86_feature_detected!("ssse3") && is_x86_feature_detected!("sse4.1");
        #[cfg(not(target_arch = "x86_64"))]
        let (has512, has2, has4) = (false, false, false);
        let asked = std::env::var(KERNELS_ENV).ok();
        let (level, known) = choose(asked.as_deref(), has512, has2, has4);
        if !known {
            log::warn!(
                "{KERNELS_ENV}={:?} is not one of auto, avx512, avx2, sse4, portable: ignored",
                asked.unwrap_or_default()
            );
        }
        level
    })
}

/// Whether the AVX-512 (BW, VNNI) kernels run.
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    #[cfg(test)]
    if tests::NO_AVX512.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    level() == Level::Avx512
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512() -> bool {
    false
}

/// Whether the AVX2, FMA and F16C kernels may run (see `multiversion!`): true on an
/// AVX-512 machine too.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[cfg(test)]
        if tests::NO_AVX2.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        level() <= Level::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The kernels this machine runs, for the benchmark's report.
pub fn kernel_level() -> &'static str {
    if avx512() {
        "avx512-vnni"
    } else if has_avx2_fma() {
        "avx2"
    } else {
        #[cfg(target_arch = "x86_64")]
        if sse4() {
            return "sse4";
        }
        "portable"
    }
}

/// Activation rows per pass of the Q5_0 kernels: two in 512-bit registers, four with
/// AVX2 (word by word, [`lanes::q50_ymm_words`]), one in plain code.
fn q50_step() -> usize {
    if avx512() {
        2
    } else if has_avx2_fma() {
        4
    } else {
        1
    }
}

/// Activation rows per pass of the Q4_1 and Q8_0 kernels (eight accumulators per
/// sequence): two in 512-bit registers (32 of them), one in 256-bit ones (16; two
/// rows' accumulators spill, and were slower: docs/BENCHMARKS.md).
fn lanes_step() -> usize {
    if avx512() {
        2
    } else {
        1
    }
}

/// `out[m, rows] = x · Wᵀ` over a matrix stored in groups of `R` rows: one task per
/// thread, each one contiguous run of groups (a thread that is free takes the next
/// task, so a late thread costs no more than its share); within a task, the activation
/// rows `step` at a time (each weight block read once for all of them). One long run
/// per thread streams from memory much better than many short ones: with eight tasks
/// per thread, decode on two threads was 25-35% slower (docs/BENCHMARKS.md). Every
/// (row, sequence) dot product keeps its own accumulators and order, so the result
/// does not depend on the grouping.
#[allow(clippy::too_many_arguments)]
fn grouped<G: Sync, X: Sync, const R: usize>(
    groups: &[G],
    xq: &[X],
    kb: usize,
    rows: usize,
    m: usize,
    out: &mut [f32],
    pool: &Pool,
    step: usize,
    kernel: &Group<'_, G, X, R>,
) {
    debug_assert_eq!(out.len(), m * rows);
    grouped_many(vec![(groups, rows, out)], xq, kb, m, pool, step, kernel);
}

/// One task's share of one matrix in [`grouped_many`]: its groups from `first`,
/// `n_rows` output rows, and those rows' slice of each activation row's output.
struct Piece<'a, G> {
    w: &'a [G],
    first: usize,
    n_rows: usize,
    dst: Vec<&'a mut [f32]>,
}

/// [`grouped`] over several matrices `(groups, rows, out[m, rows])` that take the same
/// activations: their groups one after another, cut into one contiguous run per thread
/// (a run may span the end of one matrix and the start of the next).
fn grouped_many<G: Sync, X: Sync, const R: usize>(
    mats: Vec<(&[G], usize, &mut [f32])>,
    xq: &[X],
    kb: usize,
    m: usize,
    pool: &Pool,
    step: usize,
    kernel: &Group<'_, G, X, R>,
) {
    debug_assert!((1..=4).contains(&step));
    let total: usize = mats.iter().map(|(_, rows, _)| rows.div_ceil(R)).sum();
    if total == 0 || m == 0 {
        return;
    }
    let tasks = pool.threads().min(total).max(1);
    let per = total.div_ceil(tasks);
    let x_rows: Vec<&[X]> = (0..m).map(|i| &xq[i * kb..(i + 1) * kb]).collect();
    let n_tasks = total.div_ceil(per);
    let mut split: Vec<Vec<Piece<'_, G>>> = (0..n_tasks).map(|_| Vec::new()).collect();
    // `base`: the global index of this matrix's first group.
    let mut base = 0;
    for (w, rows, out) in mats {
        let count = rows.div_ceil(R);
        if count == 0 {
            continue;
        }
        debug_assert_eq!(out.len(), m * rows);
        let (t0, t1) = (base / per, (base + count - 1) / per);
        for (t, pieces) in split.iter_mut().enumerate().take(t1 + 1).skip(t0) {
            let a = (t * per).max(base) - base;
            let b = ((t + 1) * per).min(base + count) - base;
            pieces.push(Piece {
                w,
                first: a,
                n_rows: (b * R).min(rows) - a * R,
                dst: Vec::with_capacity(m),
            });
        }
        for out_i in out.chunks_mut(rows) {
            let mut rest = out_i;
            for pieces in &mut split[t0..=t1] {
                let piece = pieces.last_mut().expect("a piece per overlapping task");
                let (head, tail) = std::mem::take(&mut rest).split_at_mut(piece.n_rows);
                piece.dst.push(head);
                rest = tail;
            }
        }
        base += count;
    }
    let parts: Vec<Mutex<Vec<Piece<'_, G>>>> = split.into_iter().map(Mutex::new).collect();
    pool.run(parts.len(), &|t, _| {
        let mut pieces = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        let mut acc = [[0f32; 4]; R];
        for p in pieces.iter_mut() {
            for gi in 0..p.n_rows.div_ceil(R) {
                let g = p.first + gi;
                let w = &p.w[g * kb..(g + 1) * kb];
                let live = (p.n_rows - gi * R).min(R);
                let mut i = 0;
                while i < m {
                    let n = (m - i).min(step);
                    kernel(w, &x_rows[i..i + n], &mut acc);
                    // Activation row by activation row: one bounds check per row, the
                    // group's outputs written contiguously.
                    for (k, d) in p.dst[i..i + n].iter_mut().enumerate() {
                        for (o, a) in d[gi * R..gi * R + live].iter_mut().zip(&acc) {
                            *o = a[k];
                        }
                    }
                    i += n;
                }
            }
        }
    });
}

/// Quantizes the `m` rows of `x` (`cols` each) into `xq` (`kb` blocks each), the rows
/// spread over `pool` when there are several.
fn quantize_rows<X: Send>(
    x: &[f32],
    cols: usize,
    xq: &mut [X],
    kb: usize,
    pool: &Pool,
    quantize: fn(&[f32], &mut [X]),
) {
    let m = x.len() / cols;
    if m < 4 {
        for (row, q) in x.chunks_exact(cols).zip(xq.chunks_exact_mut(kb)) {
            quantize(row, q);
        }
        return;
    }
    let per = m.div_ceil(pool.threads() * 2);
    let parts: Vec<Mutex<&mut [X]>> = xq.chunks_mut(per * kb).map(Mutex::new).collect();
    pool.run(parts.len(), &|t, _| {
        let mut q = parts[t].lock().unwrap_or_else(|e| e.into_inner());
        let rows = &x[t * per * cols..];
        for (row, qb) in rows.chunks_exact(cols).zip(q.chunks_exact_mut(kb)) {
            quantize(row, qb);
        }
    });
}

/// A pair kernel: sixteen weight rows times activation rows `x[0]` and `x[1]` (`N = 2`)
/// or `x[0]` alone (`N = 1`).
#[cfg(target_arch = "x86_64")]
type PairKernel<G, X> = unsafe fn(&[G], [&[X]; 2], &mut [[f32; 4]; 16]);
/// A row kernel: sixteen weight rows times one activation row.
/// Whether the portable kernels may run compiled for SSSE3 and SSE4.1 (`kernels/plain.rs`):
/// true on an AVX2 machine too.
#[cfg(target_arch = "x86_64")]
fn sse4() -> bool {
    #[cfg(test)]
    if tests::NO_SSE4.load(std::sync::atomic::Ordering::Relaxed) {
        return false;
    }
    level() <= Level::Sse4
}

#[cfg(target_arch = "x86_64")]
type RowKernel<G, X> = unsafe fn(&[G], &[X], &mut [f32; 16]);

/// One weight type's group kernels at each level; [`Levels::run`] picks one.
struct Levels<G: 'static, X: 'static> {
    /// AVX-512 VNNI: one pair kernel per `N` (`[1, 2]`), or a row kernel.
    #[cfg(target_arch = "x86_64")]
    zmm: Zmm<G, X>,
    /// AVX2 and FMA/F16C.
    #[cfg(target_arch = "x86_64")]
    ymm: RowKernel<G, X>,
    /// Plain code (safe; the reference the others are tested against).
    plain: fn(&[G], &[X], &mut [f32; 16]),
}

#[cfg(target_arch = "x86_64")]
enum Zmm<G: 'static, X: 'static> {
    Pairs([PairKernel<G, X>; 2]),
    Rows(RowKernel<G, X>),
}

impl<G, X> Levels<G, X> {
    /// One group of sixteen weight rows times one or two activation rows (`x`), with
    /// the best kernel this machine has (chosen at run time); every level gives the
    /// same bits.
    fn run(&self, w: &[G], x: &[&[X]], out: &mut [[f32; 4]; 16]) {
        debug_assert!((1..=2).contains(&x.len()));
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: each kernel runs only where the CPU was seen to have the features
            // it enables (`avx512()`, `has_avx2_fma()`).
            #[allow(unsafe_code)]
            unsafe {
                if avx512() {
                    match &self.zmm {
                        Zmm::Pairs(k) => k[x.len() - 1](w, [x[0], x[x.len() - 1]], out),
                        Zmm::Rows(k) => by_row(x, out, |xi, one| k(w, xi, one)),
                    }
                    return;
                }
                if has_avx2_fma() {
                    by_row(x, out, |xi, one| (self.ymm)(w, xi, one));
                    return;
                }
            }
        }
        by_row(x, out, |xi, one| (self.plain)(w, xi, one));
    }
}

/// `kernel` on each activation row in turn, its sixteen results into that row's column
/// of `out`.
#[inline(always)]
fn by_row<X>(x: &[&[X]], out: &mut [[f32; 4]; 16], mut kernel: impl FnMut(&[X], &mut [f32; 16])) {
    for (i, xi) in x.iter().enumerate() {
        let mut one = [0f32; 16];
        kernel(xi, &mut one);
        for (o, v) in out.iter_mut().zip(one) {
            o[i] = v;
        }
    }
}

/// Q4_1 × Q8_1 (see [`Levels::run`]); the bits of [`dot_q41_q81_scalar`].
fn dot_q41_group(w: &[Q41x16], x: &[&[BlockQ81]], out: &mut [[f32; 4]; 16]) {
    Levels {
        #[cfg(target_arch = "x86_64")]
        zmm: Zmm::Pairs([lanes::q41_zmm::<1>, lanes::q41_zmm::<2>]),
        #[cfg(target_arch = "x86_64")]
        ymm: lanes::q41_ymm,
        plain: plain::q41_group,
    }
    .run(w, x, out)
}

/// Groups whose rows read as signed-byte Q8_0 blocks (Q8_0 as stored, Q5_0 widened).
trait I8Rows {
    /// Row `r`'s scale, f16 bits.
    fn d_bits(&self, r: usize) -> u16;
    /// Row `r`'s values `4j..4j + 4` times the activations', summed (exact).
    fn lane_sum(&self, r: usize, j: usize, x: &BlockQ80) -> i32;
}

impl I8Rows for Q80x16 {
    #[inline(always)]
    fn d_bits(&self, r: usize) -> u16 {
        self.d[r]
    }
    #[inline(always)]
    fn lane_sum(&self, r: usize, j: usize, x: &BlockQ80) -> i32 {
        let q = self.qs[j][r].to_le_bytes();
        (0..4)
            .map(|b| q[b] as i8 as i32 * x.qs[4 * j + b] as i32)
            .sum()
    }
}

impl I8Rows for Q50x16 {
    #[inline(always)]
    fn d_bits(&self, r: usize) -> u16 {
        self.d[r]
    }
    /// The unsigned five-bit values `q` times the activations in 16 bits (four
    /// products of at most 31·128 fit), plus the block's `−16·Σx` for the `− 16`.
    #[inline(always)]
    fn lane_sum(&self, r: usize, j: usize, x: &BlockQ80) -> i32 {
        let word = self.qs[j % 4][r];
        let nibs = if j < 4 { word } else { word >> 4 } & 0x0F0F_0F0F;
        let h = (self.hi[j] >> (4 * r)) as u32;
        let fifth = ((h & 1) | ((h & 2) << 7) | ((h & 4) << 14) | ((h & 8) << 21)) << 4;
        let u = (nibs | fifth).to_le_bytes();
        let mut s = 0i16;
        for (&q, &xv) in u.iter().zip(&x.qs[4 * j..4 * j + 4]) {
            s += q as i16 * xv as i16;
        }
        s as i32 + x.o5[j]
    }
}

/// Q8_0 × Q8_0 (see [`Levels::run`]).
fn dot_q80_group(w: &[Q80x16], x: &[&[BlockQ80]], out: &mut [[f32; 4]; 16]) {
    Levels {
        #[cfg(target_arch = "x86_64")]
        zmm: Zmm::Pairs([lanes::q80_zmm::<1>, lanes::q80_zmm::<2>]),
        #[cfg(target_arch = "x86_64")]
        ymm: lanes::q80_ymm,
        plain: plain::i8_group,
    }
    .run(w, x, out)
}

/// Q5_0 × Q8_0 (see [`Levels::run`]): the bits of [`dot_q80_q80_scalar`] on `q − 16`.
fn dot_q50_group(w: &[Q50x16], x: &[&[BlockQ80]], out: &mut [[f32; 4]; 16]) {
    #[cfg(target_arch = "x86_64")]
    if x.len() > 1 && !avx512() && has_avx2_fma() {
        let xs = [
            x[0],
            x[x.len().min(2) - 1],
            x[x.len().min(3) - 1],
            x[x.len() - 1],
        ];
        // SAFETY: the CPU was seen to have every feature the kernel enables.
        #[allow(unsafe_code)]
        unsafe {
            match x.len() {
                2 => lanes::q50_ymm_words::<2>(w, xs, out),
                3 => lanes::q50_ymm_words::<3>(w, xs, out),
                _ => lanes::q50_ymm_words::<4>(w, xs, out),
            }
        }
        return;
    }
    Levels {
        #[cfg(target_arch = "x86_64")]
        zmm: Zmm::Pairs([lanes::q50_zmm::<1>, lanes::q50_zmm::<2>]),
        #[cfg(target_arch = "x86_64")]
        ymm: lanes::q50_ymm,
        plain: plain::i8_group,
    }
    .run(w, x, out)
}

/// One group of sixteen Q4_0 rows times one to four activation rows, with the best
/// kernel this machine has (chosen at run time, whatever the build targets); every
/// kernel gives the same bits.
fn dot_q40_group(w: &[Q40x16], x: &[&[BlockQ80S]], out: &mut [[f32; 4]; 16]) {
    let xs = [
        x[0],
        x[x.len().min(2) - 1],
        x[x.len().min(3) - 1],
        x[x.len() - 1],
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: each kernel runs only where the CPU was seen to have the features it
        // enables (`avx512()`, `has_avx2_fma()`).
        #[allow(unsafe_code)]
        unsafe {
            if avx512() {
                match x.len() {
                    1 => lanes::q40_zmm::<1>(w, xs, out),
                    2 => lanes::q40_zmm::<2>(w, xs, out),
                    3 => lanes::q40_zmm::<3>(w, xs, out),
                    _ => lanes::q40_zmm::<4>(w, xs, out),
                }
                return;
            }
            if has_avx2_fma() {
                match x.len() {
                    1 => lanes::q40_ymm::<1>(w, xs, out),
                    2 => lanes::q40_ymm::<2>(w, xs, out),
                    3 => lanes::q40_ymm::<3>(w, xs, out),
                    _ => lanes::q40_ymm::<4>(w, xs, out),
                }
                return;
            }
        }
    }
    plain::q40_group(w, &xs[..x.len()], out);
}

/// Kernels with one weight row per 32-bit lane (sixteen rows in a 512-bit register,
/// eight in a 256-bit one), compiled for their features whatever the build targets and
/// chosen at run time. A lane's `vpdpbusd` (or `maddubs` + `madd`) adds four products
/// of an unsigned nibble and a signed activation: exact, like every integer step here,
/// so a lane ends each block with exactly `Σ(q − 8)·x_q` and scales it by one FMA.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::needless_range_loop)]
mod lanes {
    use super::{
        q6k_place, word, BlockQ80, BlockQ80S, BlockQ81, BlockQ8K, Q40x16, Q41x16, Q4Kx16, Q50x16,
        Q6Kx16, Q80x16,
    };
    use std::arch::x86_64::*;

    /// ggml's `hsum_float_8` of eight accumulators lane by lane (lane `l` of the
    /// result reduces lane `l` of each): `(a0+a4, a1+a5, a2+a6, a3+a7)`, then
    /// `(0+2, 1+3)`, then `0+1`.
    #[inline(always)]
    unsafe fn hsum8_zmm(a: &[__m512; 8]) -> __m512 {
        // SAFETY (callers): AVX-512F is available.
        unsafe {
            let r: [__m512; 4] = std::array::from_fn(|l| _mm512_add_ps(a[l], a[l + 4]));
            let r = [_mm512_add_ps(r[0], r[2]), _mm512_add_ps(r[1], r[3])];
            _mm512_add_ps(r[0], r[1])
        }
    }

    /// [`hsum8_zmm`] for 256-bit registers.
    #[inline(always)]
    unsafe fn hsum8_ymm(a: &[__m256; 8]) -> __m256 {
        // SAFETY (callers): AVX is available.
        unsafe {
            let r: [__m256; 4] = std::array::from_fn(|l| _mm256_add_ps(a[l], a[l + 4]));
            let r = [_mm256_add_ps(r[0], r[2]), _mm256_add_ps(r[1], r[3])];
            _mm256_add_ps(r[0], r[1])
        }
    }

    /// Sixteen Q4_1 rows × `N` Q8_1 rows (`x[..N]`) in ggml's `vec_dot_q4_1_q8_1`
    /// arithmetic: accumulator `j` holds, per row, the FMA chain of ggml's float lane
    /// `j` (values `4j..4j+4` of each block: low nibbles of word `j`, then high
    /// nibbles), the min terms `m·s` summed apart, the lanes reduced as `hsum_float_8`.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW/VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q41_zmm<const N: usize>(
        w: &[Q41x16],
        x: [&[BlockQ81]; 2],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: features as documented; loads read inside a group (32 bytes of
        // scales or mins, 64 bytes per word row).
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut acc = [[_mm512_setzero_ps(); 8]; N];
            let mut summs = [_mm512_setzero_ps(); N];
            for (b, g) in w.iter().enumerate() {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let mw = _mm512_cvtph_ps(_mm256_loadu_si256(g.m.as_ptr() as *const __m256i));
                let mut dd = [_mm512_setzero_ps(); N];
                for i in 0..N {
                    let xb = &x[i][b];
                    dd[i] = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
                    summs[i] = _mm512_add_ps(summs[i], _mm512_mul_ps(mw, _mm512_set1_ps(xb.s)));
                }
                for k in 0..4 {
                    let raw = _mm512_loadu_si512(g.qs[k].as_ptr() as *const __m512i);
                    let q = [
                        _mm512_and_si512(raw, low),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low),
                    ];
                    for (h, qh) in q.iter().enumerate() {
                        let j = 4 * h + k;
                        for i in 0..N {
                            let xw = word(&x[i][b].qs, j);
                            let isum = _mm512_dpbusd_epi32(
                                _mm512_setzero_si512(),
                                *qh,
                                _mm512_set1_epi32(xw),
                            );
                            acc[i][j] = _mm512_fmadd_ps(dd[i], _mm512_cvtepi32_ps(isum), acc[i][j]);
                        }
                    }
                }
            }
            for i in 0..N {
                let mut v = [0f32; 16];
                _mm512_storeu_ps(v.as_mut_ptr(), _mm512_add_ps(hsum8_zmm(&acc[i]), summs[i]));
                for r in 0..16 {
                    out[r][i] = v[r];
                }
            }
        }
    }

    /// [`q41_zmm`] for one Q8_1 row with AVX2 (the sixteen rows as two halves).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q41_ymm(w: &[Q41x16], x: &[BlockQ81], out: &mut [f32; 16]) {
        // SAFETY: features as documented; loads read 16 bytes of scales or mins and 32
        // bytes of a word row inside the group.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut summs = _mm256_setzero_ps();
                for (g, xb) in w.iter().zip(x) {
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i));
                    let mw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.m[8 * h..].as_ptr() as *const __m128i));
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                    summs = _mm256_add_ps(summs, _mm256_mul_ps(mw, _mm256_set1_ps(xb.s)));
                    for k in 0..4 {
                        let raw = _mm256_loadu_si256(g.qs[k][8 * h..].as_ptr() as *const __m256i);
                        let q = [
                            _mm256_and_si256(raw, low),
                            _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low),
                        ];
                        for (hi, qh) in q.iter().enumerate() {
                            let j = 4 * hi + k;
                            let xw = _mm256_set1_epi32(word(&xb.qs, j));
                            let isum = _mm256_madd_epi16(_mm256_maddubs_epi16(*qh, xw), ones);
                            acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                        }
                    }
                }
                _mm256_storeu_ps(
                    out[8 * h..].as_mut_ptr(),
                    _mm256_add_ps(hsum8_ymm(&acc), summs),
                );
            }
        }
    }

    /// Sixteen Q8_0 rows × `N` Q8_0 rows in ggml's `vec_dot_q8_0_q8_0` arithmetic (as
    /// [`q41_zmm`], without min terms). `vpdpbusd` takes unsigned weights: each is
    /// offset by 128 (`w ^ 0x80`) and the activation's `−128·Σx` of the word starts the
    /// sum, which stays exact.
    ///
    /// # Safety
    /// As for [`q41_zmm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q80_zmm<const N: usize>(
        w: &[Q80x16],
        x: [&[BlockQ80]; 2],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: as for `q41_zmm`.
        unsafe {
            let flip = _mm512_set1_epi8(-128);
            let mut acc = [[_mm512_setzero_ps(); 8]; N];
            for (b, g) in w.iter().enumerate() {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let mut dd = [_mm512_setzero_ps(); N];
                for i in 0..N {
                    dd[i] = _mm512_mul_ps(dw, _mm512_set1_ps(x[i][b].d));
                }
                for j in 0..8 {
                    let u = _mm512_xor_si512(
                        _mm512_loadu_si512(g.qs[j].as_ptr() as *const __m512i),
                        flip,
                    );
                    for i in 0..N {
                        let xb = &x[i][b];
                        let isum = _mm512_dpbusd_epi32(
                            _mm512_set1_epi32(xb.o[j]),
                            u,
                            _mm512_set1_epi32(word(&xb.qs, j)),
                        );
                        acc[i][j] = _mm512_fmadd_ps(dd[i], _mm512_cvtepi32_ps(isum), acc[i][j]);
                    }
                }
            }
            for i in 0..N {
                let mut v = [0f32; 16];
                _mm512_storeu_ps(v.as_mut_ptr(), hsum8_zmm(&acc[i]));
                for r in 0..16 {
                    out[r][i] = v[r];
                }
            }
        }
    }

    /// Sixteen Q5_0 rows × `N` Q8_0 rows in ggml's `vec_dot_q5_0_q8_0` arithmetic (that
    /// of [`q80_zmm`] on `q − 16`): each word's five-bit values are its nibbles with
    /// `0x10` set under the word's high-bit mask, unsigned for `vpdpbusd`, and the
    /// activation's `−16·Σx` (its `o / 8`) starts the sum.
    ///
    /// # Safety
    /// As for [`q41_zmm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q50_zmm<const N: usize>(
        w: &[Q50x16],
        x: [&[BlockQ80]; 2],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: as for `q41_zmm`.
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let bit4 = _mm512_set1_epi8(0x10);
            let mut acc = [[_mm512_setzero_ps(); 8]; N];
            for (b, g) in w.iter().enumerate() {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let mut dd = [_mm512_setzero_ps(); N];
                for i in 0..N {
                    dd[i] = _mm512_mul_ps(dw, _mm512_set1_ps(x[i][b].d));
                }
                for k in 0..4 {
                    let raw = _mm512_loadu_si512(g.qs[k].as_ptr() as *const __m512i);
                    let nib = [
                        _mm512_and_si512(raw, low),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low),
                    ];
                    for (h, n) in nib.iter().enumerate() {
                        let j = 4 * h + k;
                        let u = _mm512_or_si512(*n, _mm512_maskz_mov_epi8(g.hi[j], bit4));
                        for i in 0..N {
                            let xb = &x[i][b];
                            let isum = _mm512_dpbusd_epi32(
                                _mm512_set1_epi32(xb.o5[j]),
                                u,
                                _mm512_set1_epi32(word(&xb.qs, j)),
                            );
                            acc[i][j] = _mm512_fmadd_ps(dd[i], _mm512_cvtepi32_ps(isum), acc[i][j]);
                        }
                    }
                }
            }
            for i in 0..N {
                let mut v = [0f32; 16];
                _mm512_storeu_ps(v.as_mut_ptr(), hsum8_zmm(&acc[i]));
                for r in 0..16 {
                    out[r][i] = v[r];
                }
            }
        }
    }

    /// The constants and steps the AVX2 Q5_0 kernels share.
    #[derive(Clone, Copy)]
    struct Q5Ymm {
        low: __m256i,
        bit4: __m256i,
        ones: __m256i,
        spread: __m256i,
        bits: __m256i,
    }

    impl Q5Ymm {
        /// # Safety
        /// AVX2 must be available.
        #[inline(always)]
        unsafe fn new() -> Self {
            // SAFETY: as documented.
            unsafe {
                Q5Ymm {
                    low: _mm256_set1_epi8(0x0F),
                    bit4: _mm256_set1_epi8(0x10),
                    ones: _mm256_set1_epi16(1),
                    spread: _mm256_setr_epi8(
                        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                        3, 3, 3, 3, 3, 3, 3,
                    ),
                    bits: _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64),
                }
            }
        }

        /// Rows `8h..8h + 8`'s scales.
        ///
        /// # Safety
        /// AVX and F16C must be available.
        #[inline(always)]
        unsafe fn scales(g: &Q50x16, h: usize) -> __m256 {
            // SAFETY: as documented; 8 scales from `8h` (h < 2) are inside `d`.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i)) }
        }

        /// Nibble word `k` of rows `8h..8h + 8` as the unsigned five-bit values of the two
        /// lanes it feeds, `k` (low nibbles) and `4 + k` (high), each with its fifth bit
        /// (the high-bit mask widened to bytes by a byte shuffle and a bit test).
        ///
        /// # Safety
        /// AVX2 must be available.
        #[inline(always)]
        unsafe fn values(&self, g: &Q50x16, h: usize, k: usize) -> [__m256i; 2] {
            // SAFETY: as documented; 8 words from `8h` (h < 2) are inside the row.
            unsafe {
                let raw = _mm256_loadu_si256(g.qs[k][8 * h..].as_ptr() as *const __m256i);
                let nib = [
                    _mm256_and_si256(raw, self.low),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(raw), self.low),
                ];
                std::array::from_fn(|hh| {
                    let m = _mm256_set1_epi32((g.hi[4 * hh + k] >> (32 * h)) as u32 as i32);
                    let sel = _mm256_and_si256(_mm256_shuffle_epi8(m, self.spread), self.bits);
                    let set = _mm256_cmpeq_epi8(sel, self.bits);
                    _mm256_or_si256(nib[hh], _mm256_and_si256(set, self.bit4))
                })
            }
        }

        /// `acc + dw·d_x·Σ(q − 16)·x` over lane `j`'s four values (`u`: their `q`), the
        /// integer sum exact (pairs of five-bit values × activations fit i16), one FMA.
        ///
        /// # Safety
        /// AVX2 and FMA must be available.
        #[inline(always)]
        unsafe fn add(
            &self,
            acc: __m256,
            dw: __m256,
            u: __m256i,
            xb: &BlockQ80,
            j: usize,
        ) -> __m256 {
            // SAFETY: as documented.
            unsafe {
                let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                let xw = _mm256_set1_epi32(word(&xb.qs, j));
                let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xw), self.ones);
                let isum = _mm256_add_epi32(pairs, _mm256_set1_epi32(xb.o5[j]));
                _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc)
            }
        }
    }

    /// Eight rows' eight lanes reduced (`hsum_float_8`), into `out[8h..8h + 8][i]`.
    ///
    /// # Safety
    /// AVX must be available.
    #[inline(always)]
    unsafe fn put_eight(lanes: &[__m256; 8], out: &mut [[f32; 4]; 16], h: usize, i: usize) {
        // SAFETY: as documented.
        unsafe {
            let mut v = [0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), hsum8_ymm(lanes));
            for r in 0..8 {
                out[8 * h + r][i] = v[r];
            }
        }
    }

    /// [`q50_zmm`] for one Q8_0 row with AVX2: block by block, a block's eight lanes in
    /// eight accumulators.
    ///
    /// # Safety
    /// As for [`q41_ymm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q50_ymm(w: &[Q50x16], x: &[BlockQ80], out: &mut [f32; 16]) {
        // SAFETY: as documented (the same features).
        unsafe {
            let q5 = Q5Ymm::new();
            let mut res = [[0f32; 4]; 16];
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (g, xb) in w.iter().zip(x) {
                    let dw = Q5Ymm::scales(g, h);
                    for k in 0..4 {
                        let u = q5.values(g, h, k);
                        for (hh, u) in u.into_iter().enumerate() {
                            let j = 4 * hh + k;
                            acc[j] = q5.add(acc[j], dw, u, xb, j);
                        }
                    }
                }
                put_eight(&acc, &mut res, h, 0);
            }
            for (o, r) in out.iter_mut().zip(res) {
                *o = r[0];
            }
        }
    }

    /// [`q50_ymm`] for two to four Q8_0 rows (`x[..N]`), word by word: each of a
    /// block's four nibble words feeds two lanes (`k` and `4 + k`), and those two lanes
    /// run over every block of the group before the next word's, so each row has two
    /// accumulators live instead of eight (eight a row would not fit AVX2's sixteen
    /// registers for more than two rows) while a word's five-bit values are still put
    /// together once for all the rows. Each lane's chain over the blocks, its products
    /// and the final reduction are those of [`q50_ymm`]: the same bits, row by row.
    ///
    /// # Safety
    /// As for [`q50_ymm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q50_ymm_words<const N: usize>(
        w: &[Q50x16],
        x: [&[BlockQ80]; 4],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: as for `q50_ymm`.
        unsafe {
            let q5 = Q5Ymm::new();
            for h in 0..2 {
                let mut lanes = [[_mm256_setzero_ps(); 8]; N];
                for k in 0..4 {
                    let mut acc = [[_mm256_setzero_ps(); 2]; N];
                    for (b, g) in w.iter().enumerate() {
                        let dw = Q5Ymm::scales(g, h);
                        let u = q5.values(g, h, k);
                        for (hh, u) in u.into_iter().enumerate() {
                            for i in 0..N {
                                acc[i][hh] = q5.add(acc[i][hh], dw, u, &x[i][b], 4 * hh + k);
                            }
                        }
                    }
                    for i in 0..N {
                        lanes[i][k] = acc[i][0];
                        lanes[i][4 + k] = acc[i][1];
                    }
                }
                for (i, l) in lanes.iter().enumerate() {
                    put_eight(l, out, h, i);
                }
            }
        }
    }

    /// Sixteen Q6_K rows × one Q8_K row in ggml's `vec_dot_q6_K_q8_K` order (see
    /// [`super::Q6KMatrix`]): per 4-value word, the six-bit values (unsigned) times the
    /// activations, scaled by each row's sub-block scale, summed into the word's lane;
    /// then each lane less its `32·sc·bsum` pair; all exact integers until one FMA per
    /// super-block.
    ///
    /// # Safety
    /// As for [`q41_zmm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q6k_zmm(w: &[Q6Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        // SAFETY: as for `q41_zmm` (16-byte scale rows, 64-byte word rows).
        unsafe {
            let m4 = _mm512_set1_epi8(0x0F);
            let m2 = _mm512_set1_epi8(0x03);
            let mut acc = [_mm512_setzero_ps(); 8];
            for (g, xb) in w.iter().zip(x) {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let dd = _mm512_mul_ps(_mm512_set1_ps(xb.d), dw);
                let mut isum = [_mm512_setzero_si512(); 8];
                for c in 0..8 {
                    let sc = [
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(
                            g.sc[2 * c].as_ptr() as *const __m128i
                        )),
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(
                            g.sc[2 * c + 1].as_ptr() as *const __m128i
                        )),
                    ];
                    for l in 0..8 {
                        let (lw, ls, hw, hs) = q6k_place(32 * c + 4 * l);
                        let ql = _mm512_loadu_si512(g.ql[lw].as_ptr() as *const __m512i);
                        let qh = _mm512_loadu_si512(g.qh[hw].as_ptr() as *const __m512i);
                        let lo = _mm512_and_si512(
                            _mm512_srl_epi16(ql, _mm_cvtsi32_si128(ls as i32)),
                            m4,
                        );
                        let hi = _mm512_and_si512(
                            _mm512_srl_epi16(qh, _mm_cvtsi32_si128(hs as i32)),
                            m2,
                        );
                        let u = _mm512_or_si512(lo, _mm512_slli_epi16::<4>(hi));
                        let wi = 8 * c + l;
                        let t = _mm512_dpbusd_epi32(
                            _mm512_setzero_si512(),
                            u,
                            _mm512_set1_epi32(word4(&xb.qs, wi)),
                        );
                        isum[l] = _mm512_add_epi32(isum[l], _mm512_mullo_epi32(t, sc[l / 4]));
                    }
                }
                for l in 0..8 {
                    let sc_at = |s: usize| {
                        _mm512_cvtepi8_epi32(_mm_loadu_si128(g.sc[s].as_ptr() as *const __m128i))
                    };
                    let pair = _mm512_add_epi32(
                        _mm512_mullo_epi32(sc_at(2 * l), _mm512_set1_epi32(xb.bsums[2 * l])),
                        _mm512_mullo_epi32(
                            sc_at(2 * l + 1),
                            _mm512_set1_epi32(xb.bsums[2 * l + 1]),
                        ),
                    );
                    isum[l] = _mm512_sub_epi32(isum[l], _mm512_slli_epi32::<5>(pair));
                }
                if xb.batch {
                    // Prompt order: the super-block's whole integer, times `d_w`, then
                    // one FMA with `d_x` into one chain (kept in `acc[0]`).
                    let mut all = isum[0];
                    for v in &isum[1..] {
                        all = _mm512_add_epi32(all, *v);
                    }
                    let t = _mm512_mul_ps(dw, _mm512_cvtepi32_ps(all));
                    acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(xb.d), t, acc[0]);
                    continue;
                }
                for l in 0..8 {
                    acc[l] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(isum[l]), acc[l]);
                }
            }
            if x.first().is_some_and(|xb| xb.batch) {
                _mm512_storeu_ps(out.as_mut_ptr(), acc[0]);
            } else {
                _mm512_storeu_ps(out.as_mut_ptr(), hsum8_zmm(&acc));
            }
        }
    }

    /// [`q6k_zmm`] with AVX2 (the sixteen rows as two halves; six-bit values × activation
    /// pairs fit i16).
    ///
    /// # Safety
    /// As for [`q41_ymm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_ymm(w: &[Q6Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        // SAFETY: as for `q41_ymm` (8-byte scale halves, 32-byte word halves).
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(0x03);
            let ones = _mm256_set1_epi16(1);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (g, xb) in w.iter().zip(x) {
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i));
                    let dd = _mm256_mul_ps(_mm256_set1_ps(xb.d), dw);
                    let mut isum = [_mm256_setzero_si256(); 8];
                    for c in 0..8 {
                        let sc = [
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                g.sc[2 * c][8 * h..].as_ptr() as *const __m128i
                            )),
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                g.sc[2 * c + 1][8 * h..].as_ptr() as *const __m128i,
                            )),
                        ];
                        for l in 0..8 {
                            let (lw, ls, hw, hs) = q6k_place(32 * c + 4 * l);
                            let ql =
                                _mm256_loadu_si256(g.ql[lw][8 * h..].as_ptr() as *const __m256i);
                            let qh =
                                _mm256_loadu_si256(g.qh[hw][8 * h..].as_ptr() as *const __m256i);
                            let lo = _mm256_and_si256(
                                _mm256_srl_epi16(ql, _mm_cvtsi32_si128(ls as i32)),
                                m4,
                            );
                            let hi = _mm256_and_si256(
                                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(hs as i32)),
                                m2,
                            );
                            let u = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                            let wi = 8 * c + l;
                            let xw = _mm256_set1_epi32(word4(&xb.qs, wi));
                            let t = _mm256_madd_epi16(_mm256_maddubs_epi16(u, xw), ones);
                            isum[l] = _mm256_add_epi32(isum[l], _mm256_mullo_epi32(t, sc[l / 4]));
                        }
                    }
                    for l in 0..8 {
                        let sc_at = |s: usize| {
                            _mm256_cvtepi8_epi32(_mm_loadl_epi64(
                                g.sc[s][8 * h..].as_ptr() as *const __m128i
                            ))
                        };
                        let pair = _mm256_add_epi32(
                            _mm256_mullo_epi32(sc_at(2 * l), _mm256_set1_epi32(xb.bsums[2 * l])),
                            _mm256_mullo_epi32(
                                sc_at(2 * l + 1),
                                _mm256_set1_epi32(xb.bsums[2 * l + 1]),
                            ),
                        );
                        isum[l] = _mm256_sub_epi32(isum[l], _mm256_slli_epi32::<5>(pair));
                    }
                    if xb.batch {
                        let mut all = isum[0];
                        for v in &isum[1..] {
                            all = _mm256_add_epi32(all, *v);
                        }
                        let t = _mm256_mul_ps(dw, _mm256_cvtepi32_ps(all));
                        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(xb.d), t, acc[0]);
                        continue;
                    }
                    for l in 0..8 {
                        acc[l] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum[l]), acc[l]);
                    }
                }
                if x.first().is_some_and(|xb| xb.batch) {
                    _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), acc[0]);
                } else {
                    _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), hsum8_ymm(&acc));
                }
            }
        }
    }

    /// Sixteen Q4_K rows × one Q8_K row in llama.cpp's repacked Q4_K arithmetic (see
    /// [`super::Q4KMatrix`]), one row per lane.
    ///
    /// # Safety
    /// As for [`q41_zmm`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q4k_zmm(w: &[Q4Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        // SAFETY: as for `q41_zmm` (16-byte scale rows, 64-byte word rows).
        unsafe {
            let m4 = _mm512_set1_epi8(0x0F);
            let (mut acc, mut acc_min) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for (g, xb) in w.iter().zip(x) {
                let da = _mm512_set1_ps(xb.d);
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let dm = _mm512_cvtph_ps(_mm256_loadu_si256(g.dmin.as_ptr() as *const __m256i));
                let mut isum = _mm512_setzero_si512();
                let mut imin = _mm512_setzero_si512();
                for s in 0..8 {
                    let mut t = _mm512_setzero_si512();
                    for k in 0..8 {
                        let raw =
                            _mm512_loadu_si512(g.qs[8 * (s / 2) + k].as_ptr() as *const __m512i);
                        let u = if s % 2 == 0 {
                            _mm512_and_si512(raw, m4)
                        } else {
                            _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4)
                        };
                        t = _mm512_dpbusd_epi32(t, u, _mm512_set1_epi32(word4(&xb.qs, 8 * s + k)));
                    }
                    let sc =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(g.sc[s].as_ptr() as *const __m128i));
                    let mn =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(g.mn[s].as_ptr() as *const __m128i));
                    isum = _mm512_add_epi32(isum, _mm512_mullo_epi32(t, sc));
                    let bs = _mm512_set1_epi32(xb.bsums[2 * s] + xb.bsums[2 * s + 1]);
                    imin = _mm512_add_epi32(imin, _mm512_mullo_epi32(mn, bs));
                    // gemv: one FMA per super-block; gemm (batch rows): per sub-block pair.
                    if (s + 1) % if xb.batch { 2 } else { 8 } == 0 {
                        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, da), acc);
                        acc_min = _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(imin),
                            _mm512_mul_ps(dm, da),
                            acc_min,
                        );
                        isum = _mm512_setzero_si512();
                        imin = _mm512_setzero_si512();
                    }
                }
            }
            _mm512_storeu_ps(out.as_mut_ptr(), _mm512_sub_ps(acc, acc_min));
        }
    }

    /// [`q4k_zmm`] with AVX2 (two halves of eight rows).
    ///
    /// # Safety
    /// As for [`q41_ymm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_ymm(w: &[Q4Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        // SAFETY: as for `q41_ymm` (8-byte scale halves, 32-byte word halves).
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for h in 0..2 {
                let (mut acc, mut acc_min) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                for (g, xb) in w.iter().zip(x) {
                    let da = _mm256_set1_ps(xb.d);
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i));
                    let dm = _mm256_cvtph_ps(_mm_loadu_si128(
                        g.dmin[8 * h..].as_ptr() as *const __m128i
                    ));
                    let mut isum = _mm256_setzero_si256();
                    let mut imin = _mm256_setzero_si256();
                    for s in 0..8 {
                        let mut t = _mm256_setzero_si256();
                        for k in 0..8 {
                            let raw = _mm256_loadu_si256(
                                g.qs[8 * (s / 2) + k][8 * h..].as_ptr() as *const __m256i
                            );
                            let u = if s % 2 == 0 {
                                _mm256_and_si256(raw, m4)
                            } else {
                                _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4)
                            };
                            let xw = _mm256_set1_epi32(word4(&xb.qs, 8 * s + k));
                            t = _mm256_add_epi32(
                                t,
                                _mm256_madd_epi16(_mm256_maddubs_epi16(u, xw), ones),
                            );
                        }
                        let sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            g.sc[s][8 * h..].as_ptr() as *const __m128i
                        ));
                        let mn = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                            g.mn[s][8 * h..].as_ptr() as *const __m128i
                        ));
                        isum = _mm256_add_epi32(isum, _mm256_mullo_epi32(t, sc));
                        let bs = _mm256_set1_epi32(xb.bsums[2 * s] + xb.bsums[2 * s + 1]);
                        imin = _mm256_add_epi32(imin, _mm256_mullo_epi32(mn, bs));
                        if (s + 1) % if xb.batch { 2 } else { 8 } == 0 {
                            acc = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(isum),
                                _mm256_mul_ps(dw, da),
                                acc,
                            );
                            acc_min = _mm256_fmadd_ps(
                                _mm256_cvtepi32_ps(imin),
                                _mm256_mul_ps(dm, da),
                                acc_min,
                            );
                            isum = _mm256_setzero_si256();
                            imin = _mm256_setzero_si256();
                        }
                    }
                }
                _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), _mm256_sub_ps(acc, acc_min));
            }
        }
    }

    /// Values `4k..4k+4` of a 256-value block as one little-endian word.
    #[inline(always)]
    fn word4(qs: &[i8; 256], k: usize) -> i32 {
        let q = &qs[4 * k..4 * k + 4];
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }

    /// [`q80_zmm`] for one Q8_0 row with AVX2: `|w|` times `x` with `w`'s sign, as
    /// ggml's `mul_sum_i8_pairs` (pairs within ±2·128·127: no i16 saturation).
    ///
    /// # Safety
    /// As for [`q41_ymm`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q80_ymm(w: &[Q80x16], x: &[BlockQ80], out: &mut [f32; 16]) {
        // SAFETY: as for `q41_ymm`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); 8];
                for (g, xb) in w.iter().zip(x) {
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i));
                    let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                    for j in 0..8 {
                        let q = _mm256_loadu_si256(g.qs[j][8 * h..].as_ptr() as *const __m256i);
                        let xw = _mm256_set1_epi32(word(&xb.qs, j));
                        let pairs =
                            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xw, q));
                        let isum = _mm256_madd_epi16(pairs, ones);
                        acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), acc[j]);
                    }
                }
                _mm256_storeu_ps(out[8 * h..].as_mut_ptr(), hsum8_ymm(&acc));
            }
        }
    }

    /// Sixteen Q4_0 rows × `N` Q8_0 rows (`x[..N]`), one row per lane.
    ///
    /// # Safety
    /// The CPU must have AVX-512F/BW/VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn q40_zmm<const N: usize>(
        w: &[Q40x16],
        x: [&[BlockQ80S]; 4],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: features as documented; every load reads inside a group (32 bytes
        // of scales, 64 bytes per word row).
        unsafe {
            let low = _mm512_set1_epi8(0x0F);
            let mut acc = [_mm512_setzero_ps(); N];
            for (b, g) in w.iter().enumerate() {
                let dw = _mm512_cvtph_ps(_mm256_loadu_si256(g.d.as_ptr() as *const __m256i));
                let mut q = [_mm512_setzero_si512(); 8];
                for k in 0..4 {
                    let raw = _mm512_loadu_si512(g.qs[k].as_ptr() as *const __m512i);
                    q[k] = _mm512_and_si512(raw, low);
                    q[4 + k] = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                }
                for i in 0..N {
                    let xb = &x[i][b];
                    let mut isum = _mm512_set1_epi32(xb.s);
                    for k in 0..8 {
                        isum = _mm512_dpbusd_epi32(isum, q[k], _mm512_set1_epi32(word(&xb.qs, k)));
                    }
                    let dd = _mm512_mul_ps(dw, _mm512_set1_ps(xb.d));
                    acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dd, acc[i]);
                }
            }
            for i in 0..N {
                let mut v = [0f32; 16];
                _mm512_storeu_ps(v.as_mut_ptr(), acc[i]);
                for r in 0..16 {
                    out[r][i] = v[r];
                }
            }
        }
    }

    /// [`q40_zmm`] with AVX2: the sixteen rows as two halves of eight.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q40_ymm<const N: usize>(
        w: &[Q40x16],
        x: [&[BlockQ80S]; 4],
        out: &mut [[f32; 4]; 16],
    ) {
        // SAFETY: features as documented; loads read 16 bytes of scales and 32 bytes
        // of a word row inside the group.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let ones = _mm256_set1_epi16(1);
            for h in 0..2 {
                let mut acc = [_mm256_setzero_ps(); N];
                for (b, g) in w.iter().enumerate() {
                    let dw =
                        _mm256_cvtph_ps(_mm_loadu_si128(g.d[8 * h..].as_ptr() as *const __m128i));
                    let mut q = [_mm256_setzero_si256(); 8];
                    for k in 0..4 {
                        let raw = _mm256_loadu_si256(g.qs[k][8 * h..].as_ptr() as *const __m256i);
                        q[k] = _mm256_and_si256(raw, low);
                        q[4 + k] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                    }
                    for i in 0..N {
                        let xb = &x[i][b];
                        let mut isum = _mm256_set1_epi32(xb.s);
                        for k in 0..8 {
                            // Pairs of nibble × activation fit an i16 (at most 2·15·128).
                            let pairs =
                                _mm256_maddubs_epi16(q[k], _mm256_set1_epi32(word(&xb.qs, k)));
                            isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                        }
                        let dd = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dd, acc[i]);
                    }
                }
                for i in 0..N {
                    let mut v = [0f32; 8];
                    _mm256_storeu_ps(v.as_mut_ptr(), acc[i]);
                    for r in 0..8 {
                        out[8 * h + r][i] = v[r];
                    }
                }
            }
        }
    }
}

#[cfg(test)]
/// One Q8_0 row times one Q8_0 row in ggml's x86 order: eight float lanes, lane `l`
/// accumulating (by FMA) the integer dot of values `4l..4l+4` of every block times
/// `d_w·d_x`, reduced as [`dot_q41_q81_scalar`] reduces.
fn dot_q80_q80_scalar(w: impl Iterator<Item = BlockQ80>, x: &[BlockQ80]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, xb) in w.zip(x) {
        let dd = wb.d * xb.d;
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4)
                .map(|j| wb.qs[j] as i32 * xb.qs[j] as i32)
                .sum();
            *a = dd.mul_add(s as f32, *a);
        }
    }
    reduce8(acc)
}

multiversion! {
    /// ggml's `quantize_row_q8_1` on x86 (`d` and the block sum `s = d·Σq` kept as f16).
    fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ81]) {
        for (b, blk) in x.chunks_exact(QK).zip(out.iter_mut()) {
            let (d, sum, qs) = quantize_block::<AVX2>(b);
            *blk = BlockQ81 {
                d: f16::from_f32(d).to_f32(),
                s: f16::from_f32(d * sum as f32).to_f32(),
                qs,
            };
        }
    }
}

#[cfg(test)]
/// One Q4_1 row times one Q8_1 row, summed in ggml's x86 order: eight float lanes,
/// lane `l` accumulating (by FMA) the integer dot of values `4l..4l+4` of every block
/// times `d_w·d_x`; the min terms summed separately; the lanes reduced pairwise. The
/// reference every level's group kernel is tested against; same arithmetic, same result.
fn dot_q41_q81_scalar(w: impl Iterator<Item = BlockQ41>, x: &[BlockQ81]) -> f32 {
    let mut acc = [0f32; 8];
    let mut summs = 0f32;
    for (wb, xb) in w.zip(x) {
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
    reduce8(acc) + summs
}

/// Eight lanes reduced as ggml's `hsum_float_8`: `(l + l+4)`, then pairs two apart,
/// then the last two.
#[inline(always)]
fn reduce8(acc: [f32; 8]) -> f32 {
    let r = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    let r = [r[0] + r[2], r[1] + r[3]];
    r[0] + r[1]
}

/// AVX2/FMA helpers, inlined into code that has the features: an AVX2 build, or a
/// `multiversion!` twin (`AVX2 = true`).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code, clippy::needless_range_loop, dead_code)]
mod simd {
    use std::arch::x86_64::*;

    /// ggml's `hsum_float_8`.
    ///
    /// # Safety
    /// AVX must be available.
    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        // SAFETY: as documented.
        unsafe {
            let r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
            let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
            let r = _mm_add_ss(r, _mm_movehdup_ps(r));
            _mm_cvtss_f32(r)
        }
    }

    /// [`super::f16_dot`] (`chain = false`: element `i` into register `(i/16)%4`) or
    /// [`super::f16_dot_chain`] (one 16-lane register) for lengths that are multiples
    /// of 16; a 16-lane register is two 8-lane halves, and the lane reduction
    /// (`t[i] = a[i+8] + a[i]`, then 4, 2, 1) is `hsum_float_8` of the halves' sum.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub(super) unsafe fn f16_dot<Y: Load8 + ?Sized>(x: &[f32], y: &Y, chain: bool) -> f32 {
        // SAFETY: features as documented; every load reads 8 floats inside `x` (a
        // multiple of 16 long, checked by the caller) and `load8` checks its own.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            for (c, xs) in x.chunks_exact(16).enumerate() {
                let j = if chain { 0 } else { c % 4 };
                for h in 0..2 {
                    let a = _mm256_loadu_ps(xs[8 * h..8 * h + 8].as_ptr());
                    let b = y.load8(16 * c + 8 * h);
                    acc[j][h] = _mm256_fmadd_ps(a, b, acc[j][h]);
                }
            }
            let r: [__m256; 2] = if chain {
                acc[0]
            } else {
                std::array::from_fn(|h| {
                    _mm256_add_ps(
                        _mm256_add_ps(acc[0][h], acc[2][h]),
                        _mm256_add_ps(acc[1][h], acc[3][h]),
                    )
                })
            };
            hsum(_mm256_add_ps(r[1], r[0]))
        }
    }

    /// Eight floats of a row: f32 as stored, or f16 bits widened (exact).
    pub(super) trait Load8 {
        /// Values `i..i + 8` (panics past the end).
        ///
        /// # Safety
        /// AVX (and F16C for f16 bits) must be available.
        unsafe fn load8(&self, i: usize) -> __m256;
    }

    impl Load8 for [f32] {
        #[inline(always)]
        unsafe fn load8(&self, i: usize) -> __m256 {
            // SAFETY: the slice holds the 8 values; features as documented.
            unsafe { _mm256_loadu_ps(self[i..i + 8].as_ptr()) }
        }
    }

    impl Load8 for [u16] {
        #[inline(always)]
        unsafe fn load8(&self, i: usize) -> __m256 {
            // SAFETY: the slice holds the 8 values; features as documented.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self[i..i + 8].as_ptr().cast())) }
        }
    }

    /// `acc[d] = a·y[d] + acc[d]`, fused, for `d` below `acc.len()` (a multiple of 8;
    /// `y` at least as long): [`f32::mul_add`] per value, eight at a time.
    ///
    /// # Safety
    /// AVX2, FMA (and F16C for f16 bits) must be available.
    #[inline(always)]
    pub(super) unsafe fn axpy<Y: Load8 + ?Sized>(acc: &mut [f32], a: f32, y: &Y) {
        // SAFETY: features as documented; each access is inside `acc` (chunks) or
        // checked by `load8`.
        unsafe {
            let a = _mm256_set1_ps(a);
            for (i, o) in acc.chunks_exact_mut(8).enumerate() {
                let r = _mm256_fmadd_ps(a, y.load8(8 * i), _mm256_loadu_ps(o.as_ptr()));
                _mm256_storeu_ps(o.as_mut_ptr(), r);
            }
        }
    }

    /// [`super::widen_f16`] eight values at a time.
    ///
    /// # Safety
    /// F16C and AVX must be available.
    #[inline(always)]
    pub(super) unsafe fn widen_f16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 8;
        // SAFETY: features as documented; each load reads 8 u16 and each store writes
        // 8 f32 below `whole`, inside both slices.
        unsafe {
            for i in (0..whole).step_by(8) {
                let h = _mm_loadu_si128(src.as_ptr().add(i).cast());
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
        }
        for i in whole..n {
            dst[i] = half::f16::from_bits(src[i]).to_f32();
        }
    }

    /// [`super::quantize_block`] in AVX2 registers.
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[inline(always)]
    pub(super) unsafe fn quantize_block(b: &[f32]) -> (f32, i32, [i8; 32]) {
        // SAFETY: features as documented; loads read 8 floats of the 32-value block,
        // stores write 8 i32 into a local array.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let v: [__m256; 4] =
                std::array::from_fn(|j| _mm256_loadu_ps(b[8 * j..8 * j + 8].as_ptr()));
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vj in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vj));
            }
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            let amax = _mm_cvtss_f32(m4);
            let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            let mut qs = [0i8; 32];
            let mut sum = 0i32;
            for (j, vj) in v.iter().enumerate() {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(*vj, id),
                );
                let mut ints = [0i32; 8];
                _mm256_storeu_si256(ints.as_mut_ptr() as *mut __m256i, _mm256_cvtps_epi32(r));
                for (k, &q) in ints.iter().enumerate() {
                    qs[8 * j + k] = q as i8;
                    sum += q;
                }
            }
            (amax / 127.0, sum, qs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with the kernels forced to each level in turn: the best this machine
    /// has, then AVX2, the portable code compiled for SSE4.1, then the portable code.
    fn at_each_level(mut f: impl FnMut(&str)) {
        for cap in [
            None,
            Some(Level::Avx2),
            Some(Level::Sse4),
            Some(Level::Portable),
        ] {
            force(cap);
            f(kernel_level());
            force(None);
        }
    }

    /// Caps the kernels at `cap` for the tests (`None`: the machine's best again).
    pub(super) fn force(cap: Option<Level>) {
        use std::sync::atomic::Ordering::Relaxed;
        let below = |l: Level| cap.is_some_and(|c| c > l);
        NO_AVX512.store(below(Level::Avx512), Relaxed);
        NO_AVX2.store(below(Level::Avx2), Relaxed);
        NO_SSE4.store(below(Level::Sse4), Relaxed);
    }

    /// Set by tests to run the AVX2/portable kernels on an AVX-512 machine too; every
    /// kernel gives the same bits, so tests running meanwhile are unaffected.
    pub(super) static NO_AVX512: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// The same for AVX2 (with `NO_AVX512`: the portable kernels).
    pub(super) static NO_AVX2: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);
    /// The same for the SSE4.1 build of the portable kernels (with the two above: the
    /// portable kernels as compiled for any x86-64).
    pub(super) static NO_SSE4: std::sync::atomic::AtomicBool =
        std::sync::atomic::AtomicBool::new(false);

    /// Q4_0 bytes as ggml's reference quantizer makes them (`d = max/−8`, by the value of
    /// largest magnitude).
    fn q40_bytes(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in w.chunks_exact(QK) {
            let max = b
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let q0 = ((b[j] * id + 8.5) as u8).min(15);
                let q1 = ((b[j + 16] * id + 8.5) as u8).min(15);
                out.push(q0 | (q1 << 4));
            }
        }
        out
    }

    /// Q5_0 bytes as ggml's reference quantizer makes them (`d = max/−16`).
    fn q50_bytes(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in w.chunks_exact(QK) {
            let max = b
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let d = max / -16.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut qh = 0u32;
            let mut qs = [0u8; 16];
            for j in 0..16 {
                let q0 = ((b[j] * id + 16.5) as u8).min(31);
                let q1 = ((b[j + 16] * id + 16.5) as u8).min(31);
                qs[j] = (q0 & 15) | ((q1 & 15) << 4);
                qh |= u32::from(q0 >> 4) << j;
                qh |= u32::from(q1 >> 4) << (j + 16);
            }
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&qh.to_le_bytes());
            out.extend_from_slice(&qs);
        }
        out
    }

    #[test]
    fn q5_0_follows_ggml_vec_dot_at_every_kernel_level() {
        let (rows, cols) = (37, 192);
        let kb = cols / QK;
        let mut rng = crate::sampling::Rng::new(50);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        let bytes = q50_bytes(&w);
        let mat = Q50Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        assert!(Q50Matrix::from_ggml_bytes(&bytes[1..], rows, cols).is_none());
        let pool = Pool::new(2);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        // The file's values, widened by hand: `(nibble | high bit << 4) − 16`.
        let value = |r: usize, c: usize| -> (f32, i8) {
            let blk = &bytes[(r * kb + c / QK) * Q50_BYTES..][..Q50_BYTES];
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            let j = c % QK;
            let nib = if j < 16 {
                blk[6 + j] & 15
            } else {
                blk[6 + j - 16] >> 4
            };
            let q = (nib | (((qh >> j) & 1) as u8) << 4) as i8 - 16;
            (f16::from_le_bytes([blk[0], blk[1]]).to_f32(), q)
        };
        for m in 1..=5 {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let mut want = vec![0f32; m * rows];
            for i in 0..m {
                let mut xq = vec![BlockQ80::default(); kb];
                quantize_row_q8_0(&x[i * cols..(i + 1) * cols], &mut xq);
                for r in 0..rows {
                    let row = (0..kb).map(|b| BlockQ80 {
                        d: value(r, b * QK).0,
                        o: [0; 8],
                        o5: [0; 8],
                        qs: std::array::from_fn(|j| value(r, b * QK + j).1),
                    });
                    want[i * rows + r] = dot_q80_q80_scalar(row, &xq);
                    let exact: f32 = (0..cols)
                        .map(|c| {
                            let (d, q) = value(r, c);
                            d * q as f32 * x[i * cols + c]
                        })
                        .sum();
                    let got = want[i * rows + r];
                    assert!((got - exact).abs() < 0.05, "row {r}: {got} vs {exact}");
                }
            }
            at_each_level(|level| {
                let mut got = vec![0f32; m * rows];
                mat.matmul_into(&x, m, &mut got, &pool);
                assert_eq!(bits(&got), bits(&want), "{level}, {m} rows");
            });
        }
    }

    #[test]
    fn q6_k_follows_ggml_vec_dot_at_every_kernel_level() {
        let (rows, cols) = (21, 512);
        let kb = cols / QKK;
        let mut rng = crate::sampling::Rng::new(66);
        let mut bytes = vec![0u8; rows * kb * Q6K_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = match i % Q6K_BYTES {
                208 => 0x00,
                209 => 0x1C + (rng.next_f32() * 3.0) as u8, // d: f16 around 0.004–0.03
                192..208 => (rng.next_f32() * 255.0) as u8 ^ 0x80,
                _ => (rng.next_f32() * 256.0) as u8,
            };
        }
        let mat = Q6KMatrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        assert!(Q6KMatrix::from_ggml_bytes(&bytes[1..], rows, cols).is_none());
        // ggml's `dequantize_row_q6_K` layout, decoded straight from the bytes.
        let blk = |r: usize, b: usize| &bytes[(r * kb + b) * Q6K_BYTES..][..Q6K_BYTES];
        let value = |r: usize, b: usize, e: usize| -> i32 {
            let x = blk(r, b);
            let (half, k) = (e / 128, e % 128);
            let (ql, qh) = (&x[64 * half..], &x[128 + 32 * half..]);
            let (part, l) = (k / 32, k % 32);
            let q = match part {
                0 => (ql[l] & 0xF) | ((qh[l] & 3) << 4),
                1 => (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
                2 => (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                _ => (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            };
            q as i32
        };
        let pool = Pool::new(2);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for m in 1..=3 {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let mut want = vec![0f32; m * rows];
            for i in 0..m {
                let mut xq = vec![BlockQ8K::default(); kb];
                quantize_row_q8_k(&x[i * cols..(i + 1) * cols], &mut xq);
                for r in 0..rows {
                    let d =
                        |b: usize| f16::from_le_bytes([blk(r, b)[208], blk(r, b)[209]]).to_f32();
                    let sc = |b: usize, s: usize| blk(r, b)[192 + s] as i8 as i32;
                    want[i * rows + r] = dot_q6k_scalar(|b, e| value(r, b, e), d, sc, &xq);
                    let terms: Vec<f32> = (0..cols)
                        .map(|c| {
                            let (b, e) = (c / QKK, c % QKK);
                            let xv = xq[b].d * xq[b].qs[e] as f32;
                            d(b) * sc(b, e / 16) as f32 * (value(r, b, e) - 32) as f32 * xv
                        })
                        .collect();
                    let exact: f32 = terms.iter().sum();
                    let scale: f32 = terms.iter().map(|t| t.abs()).sum();
                    // Against the quantized activations: only float rounding differs.
                    let got = want[i * rows + r];
                    assert!(
                        (got - exact).abs() < 1e-5 * scale,
                        "row {r}: {got} vs {exact} (Σ|terms| {scale})"
                    );
                }
            }
            at_each_level(|level| {
                let mut got = vec![0f32; m * rows];
                mat.matmul_into(&x, m, &mut got, &pool);
                assert_eq!(bits(&got), bits(&want), "{level}, {m} rows");
            });
            // Rows 0 and 2 in llama.cpp's batch order: per super-block the exact
            // integer, times d_w, one FMA with d_x, from zero.
            let flags: Vec<bool> = (0..m).map(|i| i % 2 == 0).collect();
            let places: Vec<RowPlace> = flags
                .iter()
                .map(|&f| f.then_some((0, Q6K_BATCH_ROWS)))
                .collect();
            let mut want_rows = want.clone();
            for i in (0..m).filter(|&i| flags[i]) {
                let mut xq = vec![BlockQ8K::default(); kb];
                quantize_row_q8_k(&x[i * cols..(i + 1) * cols], &mut xq);
                for r in 0..rows {
                    let d =
                        |b: usize| f16::from_le_bytes([blk(r, b)[208], blk(r, b)[209]]).to_f32();
                    let mut acc = 0f32;
                    for (b, xb) in xq.iter().enumerate() {
                        let isum: i32 = (0..QKK)
                            .map(|e| {
                                let sc = blk(r, b)[192 + e / 16] as i8 as i32;
                                sc * (value(r, b, e) - 32) * xb.qs[e] as i32
                            })
                            .sum();
                        acc = xb.d.mul_add(d(b) * isum as f32, acc);
                    }
                    assert_ne!(acc.to_bits(), 0);
                    want_rows[i * rows + r] = acc;
                }
            }
            at_each_level(|level| {
                let mut got = vec![0f32; m * rows];
                mat.matmul_rows(&x, m, &mut got, &pool, &places);
                assert_eq!(
                    bits(&got),
                    bits(&want_rows),
                    "{level}, {m} rows, batch order"
                );
            });
        }
    }

    #[test]
    fn q4_k_kernels_agree_at_every_level_and_with_the_dequantized_values() {
        let (rows, cols) = (19, 512);
        let kb = cols / QKK;
        let mut rng = crate::sampling::Rng::new(44);
        let mut bytes = vec![0u8; rows * kb * Q4K_BYTES];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = match i % Q4K_BYTES {
                0 | 2 => 0x00,
                1 => 0x1C + (rng.next_f32() * 3.0) as u8, // d, dmin: f16 around 0.004–0.03
                3 => 0x18 + (rng.next_f32() * 3.0) as u8,
                _ => (rng.next_f32() * 256.0) as u8,
            };
        }
        let mat = Q4KMatrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        assert!(Q4KMatrix::from_ggml_bytes(&bytes[1..], rows, cols).is_none());
        // ggml's `dequantize_row_q4_K` (`get_scale_min_k4`), straight from the bytes.
        let blk = |r: usize, b: usize| &bytes[(r * kb + b) * Q4K_BYTES..][..Q4K_BYTES];
        let weight = |r: usize, b: usize, e: usize| -> f32 {
            let x = blk(r, b);
            let q = &x[4..16];
            let j = e / 32;
            let (sc, m) = if j < 4 {
                (q[j] & 63, q[j + 4] & 63)
            } else {
                (
                    (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
                    (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                )
            };
            let byte = x[16 + 32 * (j / 2) + e % 32];
            let nib = if j.is_multiple_of(2) {
                byte & 0xF
            } else {
                byte >> 4
            };
            let d = f16::from_le_bytes([x[0], x[1]]).to_f32();
            let dmin = f16::from_le_bytes([x[2], x[3]]).to_f32();
            d * sc as f32 * nib as f32 - dmin * m as f32
        };
        let pool = Pool::new(2);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for m in 1..=3 {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let mut plain = vec![0f32; m * rows];
            for cap in [
                Some(Level::Portable),
                Some(Level::Sse4),
                Some(Level::Avx2),
                None,
            ] {
                force(cap);
                let level = kernel_level();
                let mut got = vec![0f32; m * rows];
                mat.matmul_into(&x, m, &mut got, &pool);
                force(None);
                if level == "portable" {
                    plain = got;
                } else {
                    assert_eq!(bits(&got), bits(&plain), "{level}, {m} rows");
                }
            }
            // The rows as llama.cpp's GEMM takes them (rows of a 4-row prompt): the same
            // bits at every level, the same value within rounding, other bits than GEMV.
            let places: Vec<RowPlace> = (0..m).map(|i| Some((i, 4))).collect();
            let mut gemm: Vec<Vec<u32>> = vec![];
            at_each_level(|_| {
                let mut got = vec![0f32; m * rows];
                mat.matmul_rows(&x, m, &mut got, &pool, &places);
                for (g, p) in got.iter().zip(&plain) {
                    assert!((g - p).abs() <= 1e-5 * p.abs().max(1.0), "{g} vs {p}");
                }
                gemm.push(bits(&got));
            });
            assert!(
                gemm.windows(2).all(|w| w[0] == w[1]),
                "{m} rows, GEMM order"
            );
            assert_ne!(
                gemm[0],
                bits(&plain),
                "{m} rows: GEMM and GEMV orders differ somewhere"
            );
            for i in 0..m {
                let mut xq = vec![BlockQ8K::default(); kb];
                quantize_row_q8_k(&x[i * cols..(i + 1) * cols], &mut xq);
                for r in 0..rows {
                    let terms: Vec<f32> = (0..cols)
                        .map(|c| {
                            let (b, e) = (c / QKK, c % QKK);
                            weight(r, b, e) * xq[b].d * xq[b].qs[e] as f32
                        })
                        .collect();
                    let exact: f32 = terms.iter().sum();
                    let scale: f32 = terms.iter().map(|t| t.abs()).sum();
                    let got = plain[i * rows + r];
                    assert!(
                        (got - exact).abs() < 1e-5 * scale,
                        "row {r}: {got} vs {exact} (Σ|terms| {scale})"
                    );
                }
            }
        }
    }

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
    fn log_sum_exp_is_accurate_at_every_kernel_level() {
        let mut rng = crate::sampling::Rng::new(9);
        at_each_level(|level| {
            for n in [1usize, 15, 16, 17, 1000, 49152] {
                let x: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 60.0).collect();
                let max = x
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
                let exact = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                let got = log_sum_exp(&x) as f64;
                assert!(
                    ((got - exact) / exact.abs().max(1.0)).abs() < 1e-5,
                    "{level}, {n} values: {got} vs {exact}"
                );
            }
            assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY, "{level}");
            assert_eq!(
                log_sum_exp(&[f32::NEG_INFINITY; 20]),
                f32::NEG_INFINITY,
                "{level}"
            );
            assert_eq!(
                log_sum_exp(&[1.0, f32::INFINITY, 2.0]),
                f32::INFINITY,
                "{level}"
            );
        });
    }

    #[test]
    fn matrices_taken_together_give_each_ones_own_bits() {
        // Row counts that are and are not multiples of sixteen, so that the threads'
        // runs start and end inside a matrix and across the end of one.
        let (cols, shapes) = (96, [40usize, 16, 7, 33]);
        let mut rng = crate::sampling::Rng::new(77);
        let q41: Vec<Q41Matrix> = shapes
            .iter()
            .map(|&rows| {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
                Q41Matrix::from_ggml_bytes(&q41_bytes(&w), rows, cols).unwrap()
            })
            .collect();
        let q40: Vec<Q40Matrix> = shapes
            .iter()
            .map(|&rows| {
                let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
                Q40Matrix::from_ggml_bytes(&q40_bytes(&w), rows, cols).unwrap()
            })
            .collect();
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        fn check<G: Plain + GroupLayout>(
            mats: &[Grouped<G>],
            x: &[f32],
            m: usize,
            pool: &Pool,
            bits: &dyn Fn(&[f32]) -> Vec<u32>,
        ) {
            let alone: Vec<Vec<f32>> = mats
                .iter()
                .map(|w| {
                    let mut o = vec![0f32; m * w.rows];
                    matmul_many(&mut [(w, &mut o[..])], x, m, &Pool::new(1));
                    o
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![f32::NAN; m * w.rows]).collect();
            let mut pairs: Vec<(&Grouped<G>, &mut [f32])> = mats
                .iter()
                .zip(outs.iter_mut())
                .map(|(w, o)| (w, &mut o[..]))
                .collect();
            matmul_many(&mut pairs, x, m, pool);
            for (k, (got, want)) in outs.iter().zip(&alone).enumerate() {
                assert_eq!(
                    bits(got),
                    bits(want),
                    "matrix {k}, m={m}, {} threads",
                    pool.threads()
                );
            }
        }
        for threads in 1..=3 {
            let pool = Pool::new(threads);
            for m in [1, 2, 3, 4, 5, 8, 9] {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
                check(&q41, &x, m, &pool, &bits);
                check(&q40, &x, m, &pool, &bits);
                check(&q41[1..2], &x, m, &pool, &bits);
            }
        }
    }

    #[test]
    fn vector_quantization_matches_the_plain_code() {
        let mut rng = crate::sampling::Rng::new(8);
        let mut x: Vec<f32> = (0..32 * 40).map(|_| (rng.next_f32() - 0.5) * 7.0).collect();
        // A zero block, ties and extremes.
        x[..32].fill(0.0);
        for (i, v) in x[32..64].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        // The AVX2 helper may only run where the CPU has AVX2 (every x86 CI machine).
        if cfg!(target_arch = "x86_64") && !has_avx2_fma() {
            return;
        }
        for b in x.chunks_exact(32) {
            let (p, q) = (quantize_block::<true>(b), quantize_block_portable(b));
            assert_eq!((p.0.to_bits(), p.1, p.2), (q.0.to_bits(), q.1, q.2));
        }
    }

    #[test]
    fn the_kernel_level_is_capped_by_the_environment_never_raised() {
        use super::{choose, Level::*};
        // Unset or auto: the best the CPU has.
        assert_eq!(choose(None, true, true, true), (Avx512, true));
        assert_eq!(choose(Some("auto"), false, true, true), (Avx2, true));
        assert_eq!(choose(None, false, false, true), (Sse4, true));
        assert_eq!(choose(None, false, false, false), (Portable, true));
        // A cap lowers the level...
        assert_eq!(choose(Some("avx2"), true, true, true), (Avx2, true));
        assert_eq!(choose(Some("sse4"), true, true, true), (Sse4, true));
        assert_eq!(
            choose(Some(" portable "), true, true, true),
            (Portable, true)
        );
        // ...and never raises it past what the CPU has.
        assert_eq!(choose(Some("avx512"), false, true, true), (Avx2, true));
        assert_eq!(choose(Some("avx2"), false, false, true), (Sse4, true));
        assert_eq!(choose(Some("sse4"), false, false, false), (Portable, true));
        // An unknown value is reported and asks for nothing.
        assert_eq!(choose(Some("sse9"), true, true, true), (Avx512, false));
    }

    #[test]
    fn every_kernel_level_gives_the_same_bits_for_any_batch() {
        let (rows, cols) = (30, 128);
        let mut rng = crate::sampling::Rng::new(21);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        let q41 = Q41Matrix::from_ggml_bytes(&q41_bytes(&w), rows, cols).unwrap();
        let mut q80_bytes = Vec::new();
        for b in w.chunks_exact(QK) {
            let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = f16::from_f32(amax / 127.0);
            q80_bytes.extend_from_slice(&d.to_le_bytes());
            for v in b {
                q80_bytes.push(((v / d.to_f32()).round() as i8) as u8);
            }
        }
        let q80 = Q80Matrix::from_ggml_bytes(&q80_bytes, rows, cols).unwrap();
        let q40 = Q40Matrix::from_ggml_bytes(&q40_bytes(&w), rows, cols).unwrap();
        let pool = Pool::new(2);
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            let run = |cap: Option<Level>| {
                force(cap);
                let mut a = vec![0f32; m * rows];
                let mut b = vec![0f32; m * rows];
                let mut c = vec![0f32; m * rows];
                q41.matmul_into(&x, m, &mut a, &pool);
                q80.matmul_into(&x, m, &mut b, &pool);
                q40.matmul_into(&x, m, &mut c, &pool);
                force(None);
                (a, b, c)
            };
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let fast = run(None);
            // The portable kernels are the plain reference dots, row by row.
            let plain = run(Some(Level::Portable));
            for (level, other) in [
                (kernel_level(), &fast),
                ("avx2", &run(Some(Level::Avx2))),
                ("sse4", &run(Some(Level::Sse4))),
            ] {
                assert_eq!(bits(&other.0), bits(&plain.0), "Q4_1, {m} rows, {level}");
                assert_eq!(bits(&other.1), bits(&plain.1), "Q8_0, {m} rows, {level}");
                assert_eq!(bits(&other.2), bits(&plain.2), "Q4_0, {m} rows, {level}");
            }
            // A row computed alone equals the same row in the batch.
            let single = q41.matmul(&x[(m - 1) * cols..], 1);
            assert_eq!(bits(&single), bits(&fast.0[(m - 1) * rows..]));
        }
    }

    #[test]
    fn q4_0_follows_llama_cpp_repacked_arithmetic_at_every_kernel_level() {
        // 42 rows: the last group of sixteen is partly empty; batches 1 to 9.
        let (rows, cols) = (42, 160);
        let kb = cols / QK;
        let mut rng = crate::sampling::Rng::new(40);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32() - 0.5).collect();
        let bytes = q40_bytes(&w);
        let mat = Q40Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        assert!(Q40Matrix::from_ggml_bytes(&bytes[1..], rows, cols).is_none());
        let pool = Pool::new(2);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for m in 1..=9 {
            let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
            // From the file's bytes: per block the exact Σ(q − 8)·x_q, then one FMA.
            let mut want = vec![0f32; m * rows];
            for i in 0..m {
                let mut xq = vec![BlockQ80::default(); kb];
                quantize_row_q8_0(&x[i * cols..(i + 1) * cols], &mut xq);
                for r in 0..rows {
                    let mut acc = 0f32;
                    for (b, xb) in xq.iter().enumerate() {
                        let blk = &bytes[(r * kb + b) * Q40_BYTES..][..Q40_BYTES];
                        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
                        let isum: i32 = (0..QK)
                            .map(|j| {
                                let n = if j < 16 {
                                    blk[2 + j] & 15
                                } else {
                                    blk[2 + j - 16] >> 4
                                };
                                (n as i32 - 8) * xb.qs[j] as i32
                            })
                            .sum();
                        acc = (isum as f32).mul_add(d * xb.d, acc);
                    }
                    want[i * rows + r] = acc;
                }
            }
            at_each_level(|level| {
                let mut got = vec![0f32; m * rows];
                mat.matmul_into(&x, m, &mut got, &pool);
                assert_eq!(bits(&got), bits(&want), "{level}, {m} rows");
            });
            // Close to the dequantized weights times the exact activations.
            for r in 0..rows {
                let blk = |b: usize| &bytes[(r * kb + b) * Q40_BYTES..][..Q40_BYTES];
                let exact: f32 = (0..cols)
                    .map(|c| {
                        let (b, j) = (blk(c / QK), c % QK);
                        let n = if j < 16 {
                            b[2 + j] & 15
                        } else {
                            b[2 + j - 16] >> 4
                        };
                        f16::from_le_bytes([b[0], b[1]]).to_f32() * (n as f32 - 8.0) * x[c]
                    })
                    .sum();
                assert!(
                    (want[r] - exact).abs() < 0.05,
                    "row {r}: {} vs {exact}",
                    want[r]
                );
            }
        }
    }

    #[test]
    fn matches_a_dequantized_reference_and_batches_consistently() {
        // 42 rows: the last group of four is half empty; 3 sequences: a pair and one.
        let (rows, cols, m) = (42, 96, 3);
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
                    let b = mat.block(r, c / QK);
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
        // The group kernels and the portable row-by-row dot agree bit for bit.
        for i in 0..m {
            let mut xq = vec![BlockQ81::default(); cols / QK];
            quantize_row_q8_1(&x[i * cols..(i + 1) * cols], &mut xq);
            for r in 0..rows {
                let wrow: Vec<BlockQ41> = (0..cols / QK).map(|b| mat.block(r, b)).collect();
                assert_eq!(
                    y[i * rows + r].to_bits(),
                    dot_q41_q81_scalar(wrow.iter().copied(), &xq).to_bits(),
                    "row {r} seq {i}"
                );
            }
        }
    }
}

#[cfg(test)]
mod q80_tests {
    use super::*;

    #[test]
    fn q8_0_rows_match_the_portable_dot_and_the_dequantized_values() {
        let (rows, cols, m) = (13, 64, 5);
        let mut rng = crate::sampling::Rng::new(3);
        let mut bytes = Vec::new();
        let mut w = Vec::new();
        for _ in 0..rows * cols / QK {
            let d = f16::from_f32(rng.next_f32() * 0.02 + 0.001);
            bytes.extend_from_slice(&d.to_le_bytes());
            for _ in 0..QK {
                let q = (rng.next_f32() * 254.0 - 127.0) as i8;
                bytes.push(q as u8);
                w.push(d.to_f32() * q as f32);
            }
        }
        let mat = Q80Matrix::from_ggml_bytes(&bytes, rows, cols).unwrap();
        assert!(Q80Matrix::from_ggml_bytes(&bytes[2..], rows, cols).is_none());
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            mat.dequantize_row(r, &mut row);
            assert_eq!(row, w[r * cols..(r + 1) * cols]);
        }
        let x: Vec<f32> = (0..m * cols).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
        let mut y = vec![0f32; m * rows];
        mat.matmul_into(&x, m, &mut y, &Pool::new(2));
        for i in 0..m {
            let mut xq = vec![BlockQ80::default(); cols / QK];
            quantize_row_q8_0(&x[i * cols..(i + 1) * cols], &mut xq);
            for r in 0..rows {
                let wrow: Vec<BlockQ80> = (0..cols / QK)
                    .map(|b| {
                        let mut qs = [0i8; 32];
                        for (j, q) in qs.iter_mut().enumerate() {
                            *q = bytes[(r * cols / QK + b) * Q80_BYTES + 2 + j] as i8;
                        }
                        BlockQ80 {
                            d: f16::from_le_bytes([
                                bytes[(r * cols / QK + b) * Q80_BYTES],
                                bytes[(r * cols / QK + b) * Q80_BYTES + 1],
                            ])
                            .to_f32(),
                            o: [0; 8],
                            o5: [0; 8],
                            qs,
                        }
                    })
                    .collect();
                let exact: f32 = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
                let got = y[i * rows + r];
                assert_eq!(
                    got.to_bits(),
                    dot_q80_q80_scalar(wrow.iter().copied(), &xq).to_bits()
                );
                assert!(
                    (got - exact).abs() < 0.02 * exact.abs().max(1.0),
                    "{got} vs {exact}"
                );
            }
        }
    }
}

/// `exp(x)` computed as ggml's vectorised CPU path does (the AVX-512 variant of the
/// Arm optimized-routines algorithm: `x = n·ln2 + b`, a degree-5 polynomial in `b`,
/// scaled by `2^n`; max error about 1.5 ulp). Matching it keeps SiLU and softmax
/// roundings identical to llama.cpp's, which matters because the next matmul quantizes
/// its input to 8 bits.
#[inline(always)]
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

/// `ln Σ exp(x_i)` of a row of logits, for a token's log-probability: the maximum and
/// the exponentials sixteen at a time. A figure the engine reports, not part of
/// llama.cpp's arithmetic, so the summation order is the engine's own (f32 lanes, then
/// their sum): relative error about 1e-6. `-inf` for an empty row.
pub fn log_sum_exp(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: `avx512()` saw every feature the function enables.
        #[allow(unsafe_code)]
        return unsafe { att512::log_sum_exp(x) };
    }
    log_sum_exp_lanes(x)
}

multiversion! {
    /// [`log_sum_exp`] in plain code (sixteen lanes, ggml's `expf`).
    fn log_sum_exp_lanes(x: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; 16];
        for c in x.chunks(16) {
            for (a, &v) in m.iter_mut().zip(c) {
                *a = a.max(v);
            }
        }
        let max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return max;
        }
        let mut lanes = [0f32; 16];
        for c in x.chunks(16) {
            for (a, &v) in lanes.iter_mut().zip(c) {
                *a += ggml_expf(v - max);
            }
        }
        max + lanes.iter().sum::<f32>().ln()
    }
}

/// `j · 2^n` with a single rounding, as a hardware scale instruction does (the f64
/// product is exact).
#[inline(always)]
fn scale_by_pow2(j: f32, n: i32) -> f32 {
    // |n| <= 192 here, well inside f64's exponent range: 2^n is built from its bits.
    let p = f64::from_bits(((n + 1023) as u64) << 52);
    ((j as f64) * p) as f32
}

/// SiLU(gate)·up into `gate`, element-wise, with ggml's exp (sixteen lanes at a time
/// where the CPU has AVX-512, as ggml's `ggml_v_silu`; the same bits).
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: `avx512()` saw every feature the function enables.
        #[allow(unsafe_code)]
        unsafe {
            att512::swiglu(gate, up)
        };
        return;
    }
    swiglu_plain(gate, up);
}

multiversion! {
    /// [`swiglu_in_place`] in plain code.
    fn swiglu_plain(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = (*g / (1.0 + ggml_expf(-*g))) * u;
        }
    }
}

#[cfg(test)]
mod exp_tests {
    use super::*;

    #[test]
    fn f16_widening_in_registers_is_the_exact_conversion() {
        // Every f16 bit pattern, at a length that leaves a tail of seven after the
        // eight-wide part.
        let src: Vec<u16> = (0..=u16::MAX).chain(0..7).collect();
        let mut plain = vec![0f32; src.len()];
        widen_f16::<false>(&src, &mut plain);
        for (&b, &f) in src.iter().zip(&plain) {
            let want = f16::from_bits(b).to_f32();
            assert!(f.to_bits() == want.to_bits() || (f.is_nan() && want.is_nan()));
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            let mut fast = vec![1f32; src.len()];
            // SAFETY: the CPU has F16C and AVX (checked above).
            #[allow(unsafe_code)]
            unsafe {
                simd::widen_f16(&src, &mut fast)
            };
            for (i, (&f, &p)) in fast.iter().zip(&plain).enumerate() {
                assert!(
                    f.to_bits() == p.to_bits() || (f.is_nan() && p.is_nan()),
                    "{:#06x}",
                    src[i]
                );
            }
        }
    }

    #[test]
    fn dots_and_multiply_adds_straight_from_f16_bits_match_the_widened_ones() {
        #[cfg(target_arch = "x86_64")]
        if has_avx2_fma() {
            let mut rng = crate::sampling::Rng::new(11);
            for n in [16usize, 64, 128, 256] {
                for _ in 0..200 {
                    // Queries are f16 values (the contract of `f16_dot`).
                    let x: Vec<f32> = (0..n).map(|_| f16_round(rng.next_f32() - 0.5)).collect();
                    let bits: Vec<u16> = (0..n)
                        .map(|_| f16::from_f32(rng.next_f32() * 4.0 - 2.0).to_bits())
                        .collect();
                    let mut y = vec![0f32; n];
                    widen_f16::<false>(&bits, &mut y);
                    let a = f16_round(rng.next_f32());
                    let acc: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked above); lengths
                    // are multiples of 16.
                    #[allow(unsafe_code)]
                    let (dot, chain, fused) = unsafe {
                        let mut fused = acc.clone();
                        simd::axpy(&mut fused, a, &bits[..]);
                        (
                            simd::f16_dot(&x, &bits[..], false),
                            simd::f16_dot(&x, &bits[..], true),
                            fused,
                        )
                    };
                    // Plain code with `mul_add` and with the multiply-add formed without
                    // the instruction.
                    for (d, c) in [
                        (
                            f16_dot_portable::<true>(&x, &y),
                            f16_dot_chain_portable::<true>(&x, &y),
                        ),
                        (
                            f16_dot_portable::<false>(&x, &y),
                            f16_dot_chain_portable::<false>(&x, &y),
                        ),
                    ] {
                        assert_eq!(dot.to_bits(), d.to_bits(), "{n}");
                        assert_eq!(chain.to_bits(), c.to_bits(), "{n}");
                    }
                    for ((f, &c), &v) in fused.iter().zip(&acc).zip(&y) {
                        assert_eq!(f.to_bits(), a.mul_add(v, c).to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn multiply_adds_of_f16_values_need_no_fusing() {
        // Every finite f16 times a spread of others, plus an f32 running sum of any size:
        // the unfused sum is `mul_add`'s value bit for bit.
        let mut rng = crate::sampling::Rng::new(12);
        let finite = |b: u16| f16::from_bits(b).is_finite();
        for a in (0..=u16::MAX).filter(|&b| finite(b)) {
            for _ in 0..24 {
                let b = rng.next_u64() as u16;
                if !finite(b) {
                    continue;
                }
                let (a, b) = (f16::from_bits(a).to_f32(), f16::from_bits(b).to_f32());
                let c = f32::from_bits(rng.next_u64() as u32);
                let c = if c.is_finite() { c } else { 1.5 };
                let want = a.mul_add(b, c);
                let got = f16_mul_add::<false>(a, b, c);
                assert!(got.to_bits() == want.to_bits(), "{a:e}·{b:e} + {c:e}");
                let c = c * 2f32.powi(-100) * (a * b).abs().max(1e-30);
                assert_eq!(
                    f16_mul_add::<false>(a, b, c).to_bits(),
                    a.mul_add(b, c).to_bits()
                );
            }
        }
    }

    #[test]
    fn vector_dots_and_weighted_sums_match_the_plain_ones() {
        let mut rng = crate::sampling::Rng::new(5);
        for n in [16usize, 48, 64, 128, 200, 7, 37] {
            let x: Vec<f32> = (0..n).map(|_| f16_round(rng.next_f32() - 0.5)).collect();
            let y: Vec<f32> = (0..n).map(|_| f16_round(rng.next_f32() - 0.5)).collect();
            let (dot, chain) = (f16_dot(&x, &y).to_bits(), f16_dot_chain(&x, &y).to_bits());
            assert_eq!(dot, f16_dot_portable::<true>(&x, &y).to_bits(), "{n}");
            assert_eq!(dot, f16_dot_portable::<false>(&x, &y).to_bits(), "{n}");
            assert_eq!(
                chain,
                f16_dot_chain_portable::<true>(&x, &y).to_bits(),
                "{n}"
            );
            assert_eq!(
                chain,
                f16_dot_chain_portable::<false>(&x, &y).to_bits(),
                "{n}"
            );
        }
        // Weighted values: each dimension's sum over positions in the dot orders.
        let (hd, t) = (64usize, 150usize);
        let p: Vec<f32> = (0..t)
            .map(|_| f16_round(rng.next_f32() / t as f32))
            .collect();
        let v: Vec<f32> = (0..t * hd)
            .map(|_| f16_round(rng.next_f32() - 0.5))
            .collect();
        for (chain, fma) in [(false, true), (true, true), (false, false), (true, false)] {
            let mut o = vec![0f32; hd];
            let mut slots = Vec::new();
            weighted_rows(&p, hd, chain, &mut o, &mut slots, |c, pc, acc| {
                let row = &v[c * hd..(c + 1) * hd];
                if fma {
                    add_row::<true>(acc, pc, row)
                } else {
                    add_row::<false>(&mut acc[..hd - 3], pc, row);
                    add_row::<false>(&mut acc[hd - 3..], pc, &row[hd - 3..]);
                }
            });
            for d in 0..hd {
                let col: Vec<f32> = (0..t).map(|c| v[c * hd + d]).collect();
                let want = if chain {
                    f16_dot_chain_portable::<true>(&p, &col)
                } else {
                    f16_dot_portable::<true>(&p, &col)
                };
                assert_eq!(
                    o[d].to_bits(),
                    want.to_bits(),
                    "chain {chain} fma {fma} d {d}"
                );
            }
        }
    }

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
#[inline(always)]
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
/// length is handled as if padded. Written over whole 16-lane chunks so that the
/// compiler vectorises it; lanes keep their own order, so the result is the same.
#[inline(always)]
pub fn f16_dot(x: &[f32], y: &[f32]) -> f32 {
    f16_dot_at::<BUILD_FMA>(x, y)
}

/// Whether the build targets the FMA instruction (then `mul_add` is one instruction in
/// any code).
const BUILD_FMA: bool = cfg!(target_feature = "fma");

/// [`f16_dot`] in code that runs where `mul_add` is one instruction (`FMA`: a
/// `multiversion!` twin) or not.
#[inline(always)]
fn f16_dot_at<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if x.len() == y.len() && x.len().is_multiple_of(16) {
        // SAFETY: the build enables AVX2 and FMA.
        #[allow(unsafe_code)]
        return unsafe { simd::f16_dot(x, y, false) };
    }
    f16_dot_portable::<FMA>(x, y)
}

/// `a·b + c` for f16 values `a` and `b` (widened to f32): `mul_add`'s value whether the
/// two steps are fused or not, because the product of two f16 values is exact in f32
/// (11-bit significands; magnitudes from 2^-48 to 2^32, normal in f32). Fused where that
/// is one instruction (`FMA`: a `multiversion!` twin or a build that targets FMA; or
/// [`plain::HW_FMA`]); in other code two instructions rather than a library call.
#[inline(always)]
fn f16_mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA || plain::HW_FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`f16_dot`] in plain code (`FMA` as for [`f16_mul_add`]; `x` and `y` hold f16 values).
#[inline(always)]
fn f16_dot_portable<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut sum = [[0f32; 16]; 4];
    let whole = n / 16;
    for c in 0..whole {
        let (xs, ys) = (&x[c * 16..c * 16 + 16], &y[c * 16..c * 16 + 16]);
        let s = &mut sum[c % 4];
        for l in 0..16 {
            s[l] = f16_mul_add::<FMA>(xs[l], ys[l], s[l]);
        }
    }
    for i in whole * 16..n {
        let s = &mut sum[(i / 16) % 4][i % 16];
        *s = f16_mul_add::<FMA>(x[i], y[i], *s);
    }
    let mut r = [0f32; 16];
    for l in 0..16 {
        let a = sum[0][l] + sum[2][l];
        let b = sum[1][l] + sum[3][l];
        r[l] = a + b;
    }
    reduce16(&r)
}

/// The same dot as llamafile's tinyBLAS computes it on AVX-512 (llama.cpp's path for
/// f16 matrix products with two or more rows): one 16-lane accumulator, element `i`
/// FMA'd into lane `i%16` in order, then the lanes reduced.
#[inline(always)]
pub fn f16_dot_chain(x: &[f32], y: &[f32]) -> f32 {
    f16_dot_chain_at::<BUILD_FMA>(x, y)
}

/// [`f16_dot_chain`] as [`f16_dot_at`] is [`f16_dot`].
#[inline(always)]
fn f16_dot_chain_at<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    if x.len() == y.len() && x.len().is_multiple_of(16) {
        // SAFETY: the build enables AVX2 and FMA.
        #[allow(unsafe_code)]
        return unsafe { simd::f16_dot(x, y, true) };
    }
    f16_dot_chain_portable::<FMA>(x, y)
}

/// [`f16_dot_chain`] in plain code (as [`f16_dot_portable`]).
#[inline(always)]
fn f16_dot_chain_portable<const FMA: bool>(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = [0f32; 16];
    let whole = n / 16;
    for c in 0..whole {
        let (xs, ys) = (&x[c * 16..c * 16 + 16], &y[c * 16..c * 16 + 16]);
        for l in 0..16 {
            acc[l] = f16_mul_add::<FMA>(xs[l], ys[l], acc[l]);
        }
    }
    for i in whole * 16..n {
        acc[i % 16] = f16_mul_add::<FMA>(x[i], y[i], acc[i % 16]);
    }
    reduce16(&acc)
}

/// `dst[i] = src[i]` as f32 (f16 bits; exact), for the `min` of the two lengths.
#[inline(always)]
fn widen_f16<const AVX2: bool>(src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` is true only in a build that enables AVX2, FMA and F16C or in
        // a `multiversion!` twin, which runs after the CPU was seen to have them.
        #[allow(unsafe_code)]
        unsafe {
            simd::widen_f16(src, dst)
        };
        return;
    }
    for (d, &b) in dst.iter_mut().zip(src) {
        *d = plain::widen_half(b);
    }
}

#[inline(always)]
fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Scratch for [`attention_head`]: scores, partial sums and (plain code) the head's
/// keys and values widened to f32, reused between calls.
#[derive(Debug, Default)]
pub struct AttentionScratch {
    p: Vec<f32>,
    slots: Vec<f32>,
    kf: Vec<f32>,
    vf: Vec<f32>,
}

multiversion! {
    /// One query head of one sequence, as llama.cpp computes causal attention without flash
    /// attention and with an f16 KV cache. `q` holds the sequence's `l` new rows with
    /// `q_stride` floats between rows (the head's `hd` values first); `k`/`v` are the
    /// sequence's cache for this layer, `[t, kv_stride]` with `t >= start + l`, this head's
    /// kv head at `kv_offset`, stored as f16 bits (llama.cpp's default cache type); `q`
    /// already rounded to f16. Prompt rows sum scores in tinyBLAS's order, decode rows in
    /// the dot-product order. Writes `out` as `[l, hd]`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_head(
        q: &[f32],
        q_stride: usize,
        k: &[u16],
        v: &[u16],
        kv_stride: usize,
        kv_offset: usize,
        l: usize,
        start: usize,
        hd: usize,
        scale: f32,
        prompt_rows: bool,
        out: &mut [f32],
        scratch: &mut AttentionScratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        if avx512() && hd.is_multiple_of(16) && hd <= 256 {
            // SAFETY: `avx512()` saw every feature the function enables.
            #[allow(unsafe_code)]
            unsafe {
                // The common head sizes (64, 128) and both orders with their counts fixed,
                // so the score loop is unrolled; any other size with them read at run time.
                macro_rules! go {
                    ($ch:literal, $chain:literal) => {
                        att512::attention_head::<$ch, $chain>(
                            q, q_stride, k, v, kv_stride, kv_offset, l, start, hd, scale,
                            prompt_rows, out, scratch,
                        )
                    };
                }
                match (hd, prompt_rows) {
                    (64, false) => go!(4, false),
                    (64, true) => go!(4, true),
                    (128, false) => go!(8, false),
                    (128, true) => go!(8, true),
                    _ => go!(0, false),
                }
            }
            return;
        }
        let AttentionScratch { p, slots, kf, vf } = scratch;
        #[cfg(target_arch = "x86_64")]
        if AVX2 && l == 1 && hd.is_multiple_of(16) {
            // One row (a decode step): each key and value is read once, so it is widened
            // as it is used, in registers, rather than into rows that are stored, read
            // back and used once (a third of the attention's time on AVX2). Same values
            // (widening is exact), same order, same bits.
            let qr = &q[..hd];
            let row = |c: usize| c * kv_stride + kv_offset..c * kv_stride + kv_offset + hd;
            let dot = |c: usize| {
                // SAFETY: `AVX2` is true only in a build that enables AVX2, FMA and F16C
                // or in a `multiversion!` twin, which runs after the CPU was seen to have
                // them; `qr` is a multiple of 16 long and the key row as long.
                #[allow(unsafe_code)]
                unsafe {
                    simd::f16_dot(qr, &k[row(c)], prompt_rows)
                }
            };
            let add = |c: usize, pc: f32, acc: &mut [f32]| {
                // SAFETY: as above; `acc` is `hd` long, the value row too.
                #[allow(unsafe_code)]
                unsafe {
                    simd::axpy(acc, pc, &v[row(c)])
                };
            };
            let (chain, o) = (prompt_rows, &mut out[..hd]);
            return attend_row(start + 1, scale, hd, chain, p, slots, o, dot, add);
        }
        // This head's keys and values as f32 rows of `hd` (exact: they are f16 values),
        // eight at a time in F16C registers where the CPU has them (one by one through
        // `half` it was a function call per value, 40% of a decode step on AVX2).
        kf.resize((start + l) * hd, 0.0);
        vf.resize((start + l) * hd, 0.0);
        for c in 0..start + l {
            let o = c * kv_stride + kv_offset;
            let row = c * hd..(c + 1) * hd;
            widen_f16::<AVX2>(&k[o..o + hd], &mut kf[row.clone()]);
            widen_f16::<AVX2>(&v[o..o + hd], &mut vf[row]);
        }
        let (k, v) = (&kf[..], &vf[..]);
        for r in 0..l {
            let qr = &q[r * q_stride..r * q_stride + hd];
            let dot = |c: usize| {
                let kc = &k[c * hd..(c + 1) * hd];
                if prompt_rows {
                    f16_dot_chain_at::<AVX2>(qr, kc)
                } else {
                    f16_dot_at::<AVX2>(qr, kc)
                }
            };
            let add = |c: usize, pc: f32, acc: &mut [f32]| add_row::<AVX2>(acc, pc, &v[c * hd..]);
            let o = &mut out[r * hd..(r + 1) * hd];
            // Positions past this row's own are masked (weight exactly 0): leaving them
            // out of the softmax and the weighted sum changes no bit of either.
            attend_row(start + r + 1, scale, hd, prompt_rows, p, slots, o, dot, add);
        }
    }
}

/// One query row over its first `visible` positions: the scores (`dot(c)` times
/// `scale`), their softmax rounded through f16, and the weighted sum of the values
/// (`add(c, p_c, acc)` multiply-adds position `c`'s value row into `acc`) into `o`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_row(
    visible: usize,
    scale: f32,
    hd: usize,
    chain: bool,
    p: &mut Vec<f32>,
    slots: &mut Vec<f32>,
    o: &mut [f32],
    dot: impl Fn(usize) -> f32,
    add: impl FnMut(usize, f32, &mut [f32]),
) {
    p.clear();
    // A plain loop: through an iterator adapter the closure (and the intrinsics in
    // it) stopped being inlined into the kernel-level twin.
    for c in 0..visible {
        p.push(dot(c) * scale);
    }
    softmax_row_chunked(p);
    for pc in p.iter_mut() {
        *pc = f16_round(*pc);
    }
    weighted_rows(p, hd, chain, o, slots, add);
}

/// `acc[d] = pc·v[d] + acc[d]`, rounded once, for every `d` of `acc` (`pc` and `v` f16
/// values, `FMA` as for [`f16_mul_add`]).
#[inline(always)]
fn add_row<const FMA: bool>(acc: &mut [f32], pc: f32, v: &[f32]) {
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = f16_mul_add::<FMA>(pc, x, *a);
    }
}

/// `o[d] = Σ_c p[c]·v[c][d]` for every `d` at once, with each `d`'s sum accumulated in
/// exactly the order [`f16_dot_chain`] (prompt rows) or [`f16_dot`] (decode rows) would
/// use over positions: the loop runs over positions outside and dimensions inside, so
/// `v` is read row by row and the inner loop vectorises. `add(c, p_c, acc)` does
/// position `c`'s fused multiply-adds (`acc[d] = p_c·v[c][d] + acc[d]`, as [`add_row`]).
/// `slots` holds `[slot][hd]` partial sums (16 slots for the chain order, 64 for the dot
/// order).
#[inline(always)]
fn weighted_rows(
    p: &[f32],
    hd: usize,
    chain: bool,
    o: &mut [f32],
    slots: &mut Vec<f32>,
    mut add: impl FnMut(usize, f32, &mut [f32]),
) {
    // Position `c` goes to lane `c % 16` of register `(c / 16) % 4` (dot order), that
    // is to slot `c % 64`; or to slot `c % 16` (chain order).
    let n_slots = if chain { 16 } else { 64 };
    slots.clear();
    slots.resize(n_slots * hd, 0.0);
    for (c, &pc) in p.iter().enumerate() {
        let s = c % n_slots;
        add(c, pc, &mut slots[s * hd..(s + 1) * hd]);
    }
    reduce_slots(slots, hd, chain, o);
}

/// The lane reductions of [`f16_dot`] / [`f16_dot_chain`] over `slots` (`[slot][hd]`,
/// 64 or 16 slots) for every dimension at once, into `o`.
#[inline(always)]
fn reduce_slots(slots: &mut [f32], hd: usize, chain: bool, o: &mut [f32]) {
    // The lane reductions of [`f16_dot`] / [`f16_dot_chain`] for every `d` at once:
    // each step pairs the same slots as the scalar reduction, over whole rows of `d`.
    let (r, rest) = slots.split_at_mut(16 * hd);
    if !chain {
        let (s16, s32) = rest.split_at(16 * hd);
        let (s32, s48) = s32.split_at(16 * hd);
        for l in 0..16 {
            let row = &mut r[l * hd..(l + 1) * hd];
            let (a, b, c) = (&s16[l * hd..], &s32[l * hd..], &s48[l * hd..]);
            for d in 0..hd {
                row[d] = (row[d] + b[d]) + (a[d] + c[d]);
            }
        }
    }
    // reduce16: t[i] = a[i + w] + a[i] for w = 8, 4, 2, 1.
    for w in [8usize, 4, 2, 1] {
        for i in 0..w {
            let (lo, hi) = r.split_at_mut((i + w) * hd);
            let (dst, src) = (&mut lo[i * hd..(i + 1) * hd], &hi[..hd]);
            for d in 0..hd {
                // a[i + w] + a[i]: IEEE addition is commutative, the bits are the same.
                dst[d] += src[d];
            }
        }
    }
    o.copy_from_slice(&r[..hd]);
}

/// [`attention_head`] in 512-bit registers for head sizes that are multiples of 16 (up
/// to 256): sixteen positions' scores at a time, their lane reductions done together
/// by a transposing add tree that pairs exactly the lanes `reduce16` pairs; the
/// weighted values one slot at a time with its partial sums in registers. The same
/// operations in the same order per value as the plain code: the same bits.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod att512 {
    use super::{reduce16, reduce_slots, AttentionScratch};
    use std::arch::x86_64::*;

    /// ggml's `ggml_v_expf` (AVX-512): [`super::ggml_expf`] in sixteen lanes, the same
    /// operations (`vscalefps` is its single-rounding scale by `2^n`).
    ///
    /// # Safety
    /// AVX-512F and FMA must be available.
    #[inline(always)]
    pub(super) unsafe fn exp16(x: __m512) -> __m512 {
        // SAFETY (callers): as documented.
        unsafe {
            let r = _mm512_set1_ps(12582912.0);
            let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3FB8_AA3B)), r);
            let n = _mm512_sub_ps(z, r);
            let b = _mm512_fnmadd_ps(
                n,
                _mm512_set1_ps(f32::from_bits(0x35BF_BE8E)),
                _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3F31_7200)), x),
            );
            let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
            let u = _mm512_mul_ps(b, b);
            let j = _mm512_fmadd_ps(
                _mm512_fmadd_ps(
                    _mm512_fmadd_ps(
                        _mm512_set1_ps(f32::from_bits(0x3C07_2010)),
                        b,
                        _mm512_set1_ps(f32::from_bits(0x3D2B_9F17)),
                    ),
                    u,
                    _mm512_fmadd_ps(
                        _mm512_set1_ps(f32::from_bits(0x3E2A_AF33)),
                        b,
                        _mm512_set1_ps(f32::from_bits(0x3EFF_FEDB)),
                    ),
                ),
                u,
                _mm512_fmadd_ps(
                    _mm512_set1_ps(f32::from_bits(0x3F7F_FFF6)),
                    b,
                    _mm512_set1_ps(1.0),
                ),
            );
            let res = _mm512_scalef_ps(j, n);
            let le0 = _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, _mm512_setzero_ps());
            let alt = _mm512_mask_blend_ps(le0, _mm512_set1_ps(f32::INFINITY), _mm512_setzero_ps());
            _mm512_mask_blend_ps(d, res, alt)
        }
    }

    /// [`super::swiglu_in_place`] sixteen values at a time.
    ///
    /// # Safety
    /// AVX-512F and FMA must be available.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
        // SAFETY: as documented; masked loads and stores touch only the slices' values.
        unsafe {
            let one = _mm512_set1_ps(1.0);
            for (g, u) in gate.chunks_mut(16).zip(up.chunks(16)) {
                let n = g.len().min(u.len());
                let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
                let x = _mm512_maskz_loadu_ps(m, g.as_ptr());
                let uv = _mm512_maskz_loadu_ps(m, u.as_ptr());
                let neg = _mm512_xor_ps(x, _mm512_set1_ps(-0.0));
                let silu = _mm512_div_ps(x, _mm512_add_ps(one, exp16(neg)));
                _mm512_mask_storeu_ps(g.as_mut_ptr(), m, _mm512_mul_ps(silu, uv));
            }
        }
    }

    /// [`super::log_sum_exp`] with [`exp16`].
    ///
    /// # Safety
    /// The CPU must have AVX-512F and FMA.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn log_sum_exp(x: &[f32]) -> f32 {
        // SAFETY: features as documented; masked loads read only the chunk's own values.
        unsafe {
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut vm = ninf;
            for c in x.chunks(16) {
                let m: __mmask16 = if c.len() == 16 {
                    0xFFFF
                } else {
                    (1u16 << c.len()) - 1
                };
                vm = _mm512_max_ps(_mm512_mask_loadu_ps(vm, m, c.as_ptr()), vm);
            }
            let max = _mm512_reduce_max_ps(vm);
            if !max.is_finite() {
                return max;
            }
            let vmax = _mm512_set1_ps(max);
            let mut sum = _mm512_setzero_ps();
            for c in x.chunks(16) {
                let m: __mmask16 = if c.len() == 16 {
                    0xFFFF
                } else {
                    (1u16 << c.len()) - 1
                };
                let v = _mm512_mask_loadu_ps(ninf, m, c.as_ptr());
                sum = _mm512_add_ps(sum, exp16(_mm512_sub_ps(v, vmax)));
            }
            max + _mm512_reduce_add_ps(sum).ln()
        }
    }

    /// [`super::softmax_row_chunked`] with [`exp16`]: the same values, the same sums.
    ///
    /// # Safety
    /// As for [`exp16`].
    #[inline(always)]
    pub(super) unsafe fn softmax(row: &mut [f32]) {
        // SAFETY: as documented; masked loads read only the chunk's own values.
        unsafe {
            // The maximum sixteen at a time (`max` is exact; a NaN is passed over as
            // `f32::max` does, since `_mm512_max_ps` returns its second operand then;
            // which zero wins between +0 and -0 may differ, which changes nothing:
            // `x - (±0)` is `x` for `x ≠ 0`, and exp of either zero is exactly 1).
            let mut vm = _mm512_set1_ps(f32::NEG_INFINITY);
            for chunk in row.chunks(16) {
                let n = chunk.len();
                let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
                vm = _mm512_max_ps(_mm512_mask_loadu_ps(vm, m, chunk.as_ptr()), vm);
            }
            let vmax = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
            let mut sum = 0f64;
            for chunk in row.chunks_mut(16) {
                let n = chunk.len();
                let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
                let x = _mm512_maskz_loadu_ps(m, chunk.as_ptr());
                let e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(x, vmax)));
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), e);
                chunk.copy_from_slice(&lanes[..n]);
                sum += reduce16(&lanes) as f64;
            }
            let inv = (1.0 / sum) as f32;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }

    /// `reduce16` of each of sixteen registers: lane `c` of the result is `t[c]`'s.
    #[inline(always)]
    unsafe fn reduce16x16(t: &[__m512; 16]) -> __m512 {
        // SAFETY (callers): AVX-512F is available.
        unsafe {
            // w = 8: quarters (0,1) + (2,3) of each register, two registers per result.
            let b: [__m512; 8] = std::array::from_fn(|i| {
                let (x, y) = (t[2 * i], t[2 * i + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0xEE>(x, y),
                    _mm512_shuffle_f32x4::<0x44>(x, y),
                )
            });
            // w = 4: quarter 1 + quarter 0 of each half; quarter k of c[i] is register 4i+k.
            let c: [__m512; 4] = std::array::from_fn(|i| {
                let (x, y) = (b[2 * i], b[2 * i + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_f32x4::<0xDD>(x, y),
                    _mm512_shuffle_f32x4::<0x88>(x, y),
                )
            });
            // w = 2 and w = 1 within quarters.
            let d: [__m512; 2] = std::array::from_fn(|i| {
                let (x, y) = (c[2 * i], c[2 * i + 1]);
                _mm512_add_ps(
                    _mm512_shuffle_ps::<0xEE>(x, y),
                    _mm512_shuffle_ps::<0x44>(x, y),
                )
            });
            let e = _mm512_add_ps(
                _mm512_shuffle_ps::<0xDD>(d[0], d[1]),
                _mm512_shuffle_ps::<0x88>(d[0], d[1]),
            );
            // Lane 4k + j of `e` holds register 4j + k.
            let idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
            _mm512_permutexvar_ps(idx, e)
        }
    }

    /// Slot `l` of the weighted values for `NJ` sixteen-dimension chunks from `o`: the
    /// positions `l + 16q + 16Qk` summed per quarter `q < Q` (`Q` 4: decode rows' 64
    /// slots, whose quarters are then summed as `reduce_slots` pairs them, `(q0 + q2) +
    /// (q1 + q3)`; `Q` 1: prompt rows' 16 slots), stored to `dst`.
    ///
    /// # Safety
    /// As for [`super::attention_head`]; `v` holds every position below `p.len()` at `o` +
    /// `16 * NJ` values, `dst` at least `16 * NJ` floats.
    #[inline(always)]
    unsafe fn slot_sums<const Q: usize, const NJ: usize>(
        p: &[f32],
        v: &[u16],
        kv_stride: usize,
        o: usize,
        l: usize,
        dst: &mut [f32],
    ) {
        // SAFETY: as documented; every load is of a bounds-checked slice.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); NJ]; Q];
            for (q, acc_q) in acc.iter_mut().enumerate() {
                for c in (l + 16 * q..p.len()).step_by(16 * Q) {
                    let at = c * kv_stride + o;
                    let vr = &v[at..at + 16 * NJ];
                    let pc = _mm512_set1_ps(p[c]);
                    for (j, a) in acc_q.iter_mut().enumerate() {
                        let x = _mm512_cvtph_ps(_mm256_loadu_si256(
                            vr[16 * j..].as_ptr() as *const __m256i
                        ));
                        *a = _mm512_fmadd_ps(pc, x, *a);
                    }
                }
            }
            let dst = &mut dst[..16 * NJ];
            for j in 0..NJ {
                let sum = if Q == 1 {
                    acc[0][j]
                } else {
                    _mm512_add_ps(
                        _mm512_add_ps(acc[0][j], acc[2][j]),
                        _mm512_add_ps(acc[1][j], acc[3][j]),
                    )
                };
                _mm512_storeu_ps(dst[16 * j..].as_mut_ptr(), sum);
            }
        }
    }

    /// How many positions ahead the score loop asks for keys.
    const KEYS_AHEAD: usize = 16;

    /// Asks for the cache lines of `n` f16 values at `p` (a hint: no fault, no effect on
    /// any value).
    #[inline(always)]
    fn prefetch_row(p: *const u16, n: usize) {
        for b in (0..n * 2).step_by(64) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>((p as *const i8).wrapping_add(b)) };
        }
    }

    /// [`super::attention_head`] for `CH` chunks of sixteen per head in the order `CHAIN`
    /// (`CH` 0: `hd` and `chain` as passed).
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX2, FMA and F16C; `hd` a multiple of 16, at most
    /// 256; the slices as for [`super::attention_head`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn attention_head<const CH: usize, const CHAIN: bool>(
        q: &[f32],
        q_stride: usize,
        k: &[u16],
        v: &[u16],
        kv_stride: usize,
        kv_offset: usize,
        l: usize,
        start: usize,
        hd: usize,
        scale: f32,
        chain: bool,
        out: &mut [f32],
        scratch: &mut AttentionScratch,
    ) {
        let (chunks, chain) = if CH > 0 {
            (CH, CHAIN)
        } else {
            (hd / 16, chain)
        };
        let hd = 16 * chunks;
        // SAFETY: features as documented; every load reads 16 floats of a row slice
        // bounds-checked by the slicing below.
        unsafe {
            for r in 0..l {
                let qr = &q[r * q_stride..r * q_stride + hd];
                let qv: [__m512; 16] = std::array::from_fn(|j| {
                    if j < chunks {
                        _mm512_loadu_ps(qr[16 * j..].as_ptr())
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                let visible = start + r + 1;
                scratch.p.clear();
                scratch.p.resize(visible.next_multiple_of(16), 0.0);
                for c0 in (0..visible).step_by(16) {
                    // A plain loop rather than `array::from_fn`: its closure was not
                    // inlined (a call per key).
                    let mut t = [_mm512_setzero_ps(); 16];
                    for (i, ti) in t.iter_mut().enumerate() {
                        let c = c0 + i;
                        if c >= visible {
                            break;
                        }
                        let o = c * kv_stride + kv_offset;
                        let kc = &k[o..o + hd];
                        // The weighted sum below visits positions out of order (by
                        // slot), which the hardware prefetcher does not follow: ask for
                        // this position's values now, and for the keys `KEYS_AHEAD`
                        // positions on.
                        prefetch_row(v.as_ptr().wrapping_add(o), hd);
                        if c + KEYS_AHEAD < visible {
                            prefetch_row(k.as_ptr().wrapping_add(o + KEYS_AHEAD * kv_stride), hd);
                        }
                        let mut acc = [_mm512_setzero_ps(); 4];
                        for j in 0..chunks {
                            let a = if chain { 0 } else { j % 4 };
                            let kj = _mm512_cvtph_ps(_mm256_loadu_si256(
                                kc[16 * j..].as_ptr() as *const __m256i
                            ));
                            acc[a] = _mm512_fmadd_ps(qv[j], kj, acc[a]);
                        }
                        *ti = if chain {
                            acc[0]
                        } else {
                            _mm512_add_ps(
                                _mm512_add_ps(acc[0], acc[2]),
                                _mm512_add_ps(acc[1], acc[3]),
                            )
                        };
                    }
                    let dots = _mm512_mul_ps(reduce16x16(&t), _mm512_set1_ps(scale));
                    _mm512_storeu_ps(scratch.p[c0..].as_mut_ptr(), dots);
                }
                scratch.p.truncate(visible);
                softmax(&mut scratch.p);
                // The weights through f16, sixteen at a time (round to nearest even, as
                // `f16_round`).
                for ch in scratch.p.chunks_mut(16) {
                    let m: __mmask16 = if ch.len() == 16 {
                        0xFFFF
                    } else {
                        (1u16 << ch.len()) - 1
                    };
                    let x = _mm512_maskz_loadu_ps(m, ch.as_ptr());
                    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                    _mm512_mask_storeu_ps(ch.as_mut_ptr(), m, _mm512_cvtph_ps(h));
                }
                // Weighted values: slot `s` takes positions `s, s + n, s + 2n, ...` (`n`
                // 16 for prompt rows, 64 for decode rows). With 64, slots `l`, `l + 16`,
                // `l + 32`, `l + 48` are summed in registers as `reduce_slots` pairs them,
                // `(s_l + s_{l+32}) + (s_{l+16} + s_{l+48})`, four dimensions' chunks at a
                // time, so only sixteen slots are stored; then the sixteen-lane tree.
                scratch.slots.clear();
                scratch.slots.resize(16 * hd, 0.0);
                let (p, slots) = (&scratch.p[..], &mut scratch.slots[..]);
                for l in 0..16 {
                    for j0 in (0..chunks).step_by(4) {
                        let dst = &mut slots[l * hd + 16 * j0..(l + 1) * hd];
                        let o = kv_offset + 16 * j0;
                        // Fixed counts, so that the sixteen accumulators stay in registers.
                        match (chain, chunks - j0) {
                            (false, 4..) => slot_sums::<4, 4>(p, v, kv_stride, o, l, dst),
                            (false, 3) => slot_sums::<4, 3>(p, v, kv_stride, o, l, dst),
                            (false, 2) => slot_sums::<4, 2>(p, v, kv_stride, o, l, dst),
                            (false, _) => slot_sums::<4, 1>(p, v, kv_stride, o, l, dst),
                            (true, 4..) => slot_sums::<1, 4>(p, v, kv_stride, o, l, dst),
                            (true, 3) => slot_sums::<1, 3>(p, v, kv_stride, o, l, dst),
                            (true, 2) => slot_sums::<1, 2>(p, v, kv_stride, o, l, dst),
                            (true, _) => slot_sums::<1, 1>(p, v, kv_stride, o, l, dst),
                        }
                    }
                }
                reduce_slots(&mut scratch.slots, hd, true, &mut out[r * hd..(r + 1) * hd]);
            }
        }
    }
}

/// ggml's softmax on AVX-512: exp per 16-value chunk, each chunk's sum reduced in f32
/// (GCC's order) and accumulated in f64, then one multiplication by the f32 reciprocal.
#[inline(always)]
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

multiversion! {
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
}

#[cfg(test)]
mod attention_tests {
    use super::*;

    #[test]
    fn avx512_exp_and_softmax_match_the_plain_ones() {
        if !avx512() {
            return;
        }
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn both(xs: &[f32; 16]) -> [f32; 16] {
            let mut out = [0f32; 16];
            // SAFETY: `avx512()` saw the features; 16 floats in, 16 out.
            unsafe {
                use std::arch::x86_64::*;
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    att512::exp16(_mm512_loadu_ps(xs.as_ptr())),
                );
            }
            out
        }
        let mut rng = crate::sampling::Rng::new(5);
        for round in 0..400 {
            let spread = [1.0, 30.0, 150.0, 400.0][round % 4];
            let mut xs: [f32; 16] = std::array::from_fn(|_| (rng.next_f32() - 0.8) * spread);
            xs[0] = [0.0, -0.0, -88.7, 88.7][round % 4];
            #[allow(unsafe_code)]
            // SAFETY: checked above.
            let got = unsafe { both(&xs) };
            for (g, x) in got.iter().zip(xs) {
                assert_eq!(g.to_bits(), ggml_expf(x).to_bits(), "exp({x})");
            }
        }
        #[allow(unsafe_code)]
        #[target_feature(enable = "avx512f,fma")]
        unsafe fn soft(row: &mut [f32]) {
            // SAFETY: `avx512()` saw the features.
            unsafe { att512::softmax(row) }
        }
        for n in [1usize, 7, 16, 33, 150] {
            let g: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 30.0).collect();
            let u: Vec<f32> = (0..n).map(|_| rng.next_f32() - 0.5).collect();
            let (mut a, mut b) = (g.clone(), g);
            swiglu_plain(&mut a, &u);
            swiglu_in_place(&mut b, &u);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "SwiGLU, {n} values"
            );
            let row: Vec<f32> = (0..n).map(|_| (rng.next_f32() - 0.5) * 20.0).collect();
            let (mut a, mut b) = (row.clone(), row);
            softmax_row_chunked(&mut a);
            #[allow(unsafe_code)]
            // SAFETY: checked above.
            unsafe {
                soft(&mut b)
            };
            assert_eq!(a, b, "{n} values");
        }
    }

    #[test]
    fn attention_gives_the_same_bits_with_and_without_avx512() {
        let mut rng = crate::sampling::Rng::new(77);
        let kv_stride = 3 * 128;
        for hd in [64usize, 128, 16] {
            for (l, start, chain) in [
                (1, 0, false),
                (1, 150, false),
                (1, 63, false),
                (37, 0, true),
                (5, 80, true),
            ] {
                let t = start + l;
                let q: Vec<f32> = (0..l * 2 * hd).map(|_| rng.next_f32() - 0.5).collect();
                let k: Vec<u16> = (0..t * kv_stride)
                    .map(|_| f16::from_f32(rng.next_f32() * 2.0 - 1.0).to_bits())
                    .collect();
                let v: Vec<u16> = (0..t * kv_stride)
                    .map(|_| f16::from_f32(rng.next_f32() - 0.5).to_bits())
                    .collect();
                let run = |no512: bool| {
                    tests::NO_AVX512.store(no512, std::sync::atomic::Ordering::Relaxed);
                    let mut out = vec![0f32; l * hd];
                    attention_head(
                        &q[hd..],
                        2 * hd,
                        &k,
                        &v,
                        kv_stride,
                        hd,
                        l,
                        start,
                        hd,
                        0.125,
                        chain,
                        &mut out,
                        &mut AttentionScratch::default(),
                    );
                    tests::NO_AVX512.store(false, std::sync::atomic::Ordering::Relaxed);
                    out.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
                };
                assert_eq!(
                    run(false),
                    run(true),
                    "hd {hd}, l {l}, start {start}, chain {chain}"
                );
            }
        }
    }

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
        let bits = |x: &[f32]| {
            x.iter()
                .map(|&v| f16::from_f32(v).to_bits())
                .collect::<Vec<_>>()
        };
        let k = bits(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let v = bits(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let _ = n_kv;
        for prompt_rows in [true, false] {
            // Output as [l, n_head·hd], each head computed on its own.
            let mut out = vec![0f32; l * n_head * hd];
            let mut scratch = AttentionScratch::default();
            for h in 0..n_head {
                let mut o = vec![0f32; l * hd];
                attention_head(
                    &q[h * l * hd..],
                    hd,
                    &k,
                    &v,
                    hd,
                    0,
                    l,
                    0,
                    hd,
                    0.5,
                    prompt_rows,
                    &mut o,
                    &mut scratch,
                );
                for r in 0..l {
                    out[r * n_head * hd + h * hd..r * n_head * hd + (h + 1) * hd]
                        .copy_from_slice(&o[r * hd..(r + 1) * hd]);
                }
            }
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
