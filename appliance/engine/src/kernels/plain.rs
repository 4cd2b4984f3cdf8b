//! The plain (portable) level's group kernels: what a CPU without AVX2, FMA and F16C
//! runs. Same bits as every other level (the row-by-row reference dots in the parent
//! module are what they are tested against), written so that the compiler can keep the
//! sixteen rows of a group side by side in vector registers (SSE2 is part of x86-64)
//! and without a library call per multiply-add. On x86-64 each kernel is compiled a
//! second time for SSSE3 and SSE4.1 (the `sse4` level, every x86-64-v2 CPU), which runs
//! where the CPU has them: the same operations, so the same bits.

use super::{
    q6k_place, reduce8, BlockQ80, BlockQ80S, BlockQ81, BlockQ8K, I8Rows, Q40x16, Q41x16, Q4Kx16,
    Q6Kx16,
};

/// Defines a kernel `pub(super) fn NAME(ARGS) BODY` (generic over at most one type) that
/// runs `BODY` compiled for SSSE3 and SSE4.1 where the CPU has them and the level allows
/// ([`super::sse4`]), else as compiled for any x86-64 (any CPU elsewhere). `BODY` and
/// the `#[inline(always)]` helpers it calls are inlined into both copies; IEEE
/// operations in the same order give the same bits in each.
macro_rules! sse4_twin {
    ($(#[$m:meta])* pub(super) fn $name:ident $(<$g:ident: $b:path>)? ($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        pub(super) fn $name $(<$g: $b>)? ($($a: $t),*) {
            #[inline(always)]
            fn body $(<$g: $b>)? ($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            if super::sse4() {
                #[target_feature(enable = "ssse3,sse4.1")]
                #[allow(unsafe_code)]
                unsafe fn twin $(<$g: $b>)? ($($a: $t),*) {
                    body $(::<$g>)? ($($a),*)
                }
                // SAFETY: `sse4()` is true only where the CPU was seen to have SSSE3 and
                // SSE4.1, all that `twin` enables.
                #[allow(unsafe_code)]
                return unsafe { twin $(::<$g>)? ($($a),*) };
            }
            body $(::<$g>)? ($($a),*)
        }
    };
}

/// An f16's bits as f32 (exact), in plain code: the exponent rebased by one multiply by
/// 2^112 (which also turns f16 subnormals into f32 normals), infinities and NaNs (NaNs
/// quieted, payload kept, as F16C and `half` do) set apart.
#[inline(always)]
pub(super) fn widen_half(bits: u16) -> f32 {
    let h = bits as u32;
    let mag = h & 0x7fff;
    let sign = (h & 0x8000) << 16;
    let v = if mag >= 0x7c00 {
        let nan = if mag > 0x7c00 { 0x0040_0000 } else { 0 };
        0x7f80_0000 | nan | ((mag & 0x3ff) << 13)
    } else {
        (f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000)).to_bits()
    };
    f32::from_bits(v | sign)
}

/// Whether every build for this target has the fused multiply-add instruction, so that
/// `mul_add` is one instruction even in plain code: aarch64 (part of its base
/// instruction set), or an x86-64 build that targets FMA.
pub(super) const HW_FMA: bool = cfg!(any(target_arch = "aarch64", target_feature = "fma"));

/// Whether `t`, the f64 nearest the exact sum `p + c` (`err` away from it, as TwoSum
/// finds), rounds to the f32 nearest that sum: true unless `t` is inexact and lies
/// exactly halfway between two f32 (the only case where rounding twice can differ from
/// rounding once), or lies outside f32's normal range (where f32 has fewer digits; zero
/// excepted).
#[inline(always)]
fn rounds_as_once(t: f64, err: f64) -> bool {
    let bits = t.to_bits();
    let e = (bits >> 52) & 0x7ff;
    ((bits & 0x1fff_ffff != 0x1000_0000 || err == 0.0) & (0x381..0x47f).contains(&e)) | (t == 0.0)
}

/// `t = p + c` rounded to f64 and its rounding error (Knuth's TwoSum: exact).
#[inline(always)]
fn two_sum(p: f64, c: f64) -> (f64, f64) {
    let t = p + c;
    let pp = t - c;
    let cc = t - pp;
    (t, (p - pp) + (c - cc))
}

/// `c[i] = a[i]·b[i] + c[i]` rounded once, for every lane: the value of
/// [`f32::mul_add`]. Plain code of a build without the FMA instruction would pay a
/// library call per `mul_add` (a quarter of a portable run), so each sum is formed in
/// f64 (the product of two f32 is exact there) and rounded from there; the rare sums
/// that [`rounds_as_once`] rejects take `mul_add`. In a shape the compiler vectorises.
/// `a` and `b` hold f32 values, widened once by the caller where a factor is used more
/// than once.
#[inline(always)]
pub(super) fn fused_lanes<const N: usize>(a: &[f64; N], b: &[f64; N], c: &mut [f32; N]) {
    if HW_FMA {
        // One instruction a lane (the f64 values are f32 values: narrowing is exact).
        for i in 0..N {
            c[i] = (a[i] as f32).mul_add(b[i] as f32, c[i]);
        }
        return;
    }
    // The f64 sums, their rounding errors (TwoSum) and checks side by side, branch
    // free (a halfway sum is common, one of few digits; an inexact one rare).
    let mut r = [0f32; N];
    let mut ok = [false; N];
    for i in 0..N {
        let (t, err) = two_sum(a[i] * b[i], c[i] as f64);
        r[i] = t as f32;
        ok[i] = rounds_as_once(t, err);
    }
    if !ok.iter().fold(true, |x, &y| x & y) {
        for i in 0..N {
            if !ok[i] {
                r[i] = (a[i] as f32).mul_add(b[i] as f32, c[i]);
            }
        }
    }
    *c = r;
}

/// f32 values widened to f64 (exact).
#[inline(always)]
pub(super) fn wide<const N: usize>(v: [f32; N]) -> [f64; N] {
    v.map(|x| x as f64)
}

/// The four-value integer dot of a word's low (`HIGH = false`) or high nibbles with four
/// signed activations.
#[inline(always)]
fn nibble_dot<const HIGH: bool>(word: u32, x: &[i8]) -> i16 {
    // In 16 bits (four products of at most 15·128 fit), which SSE2 multiplies eight
    // at a time.
    let mut s = 0i16;
    for (j, &xv) in x.iter().enumerate().take(4) {
        let b = (word >> (8 * j)) as u8;
        let q = if HIGH { b >> 4 } else { b & 15 };
        s += q as i16 * xv as i16;
    }
    s
}

sse4_twin! {
    /// Q4_1 × Q8_1 for a group's sixteen rows at once: the bits of
    /// [`super::dot_q41_q81_scalar`] on each row (eight lanes a row, each lane's FMA chain
    /// over the blocks, the min terms summed apart, the lanes reduced the same way).
    pub(super) fn q41_group(w: &[Q41x16], x: &[BlockQ81], out: &mut [f32; 16]) {
        let mut acc = [[0f32; 16]; 8];
        let mut summs = [0f32; 16];
        for (g, xb) in w.iter().zip(x) {
            let mut dd = [0f32; 16];
            for r in 0..16 {
                summs[r] += widen_half(g.m[r]) * xb.s;
                dd[r] = widen_half(g.d[r]) * xb.d;
            }
            let dd = wide(dd);
            for k in 0..4 {
                let (lo_x, hi_x) = (&xb.qs[4 * k..4 * k + 4], &xb.qs[16 + 4 * k..20 + 4 * k]);
                let lo: [f64; 16] =
                    std::array::from_fn(|r| nibble_dot::<false>(g.qs[k][r], lo_x) as f64);
                let hi: [f64; 16] =
                    std::array::from_fn(|r| nibble_dot::<true>(g.qs[k][r], hi_x) as f64);
                fused_lanes(&dd, &lo, &mut acc[k]);
                fused_lanes(&dd, &hi, &mut acc[4 + k]);
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = reduce8(std::array::from_fn(|l| acc[l][r])) + summs[r];
        }
    }
}

sse4_twin! {
    /// Signed-byte rows (Q8_0, Q5_0 widened) × Q8_0 for a group's sixteen rows at once: the
    /// bits of [`super::dot_q80_q80_scalar`] on each row.
    pub(super) fn i8_group<G: I8Rows>(w: &[G], x: &[BlockQ80], out: &mut [f32; 16]) {
        let mut acc = [[0f32; 16]; 8];
        for (g, xb) in w.iter().zip(x) {
            let dd = wide(std::array::from_fn(|r| widen_half(g.d_bits(r)) * xb.d));
            for (j, a) in acc.iter_mut().enumerate() {
                let s: [f64; 16] = std::array::from_fn(|r| g.lane_sum(r, j, xb) as f64);
                fused_lanes(&dd, &s, a);
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = reduce8(std::array::from_fn(|l| acc[l][r]));
        }
    }
}

sse4_twin! {
    /// Q4_0 × Q8_0 (with its offset sums) for a group's sixteen rows and one to four
    /// activation rows: each row's exact integer sum a block, one FMA a block, as the SIMD
    /// levels chain them.
    pub(super) fn q40_group(w: &[Q40x16], x: &[&[BlockQ80S]], out: &mut [[f32; 4]; 16]) {
        for (i, xr) in x.iter().enumerate() {
            let mut acc = [0f32; 16];
            for (g, xb) in w.iter().zip(xr.iter()) {
                let mut isum = [xb.s; 16];
                for k in 0..4 {
                    let (lo_x, hi_x) = (&xb.qs[4 * k..4 * k + 4], &xb.qs[16 + 4 * k..20 + 4 * k]);
                    for (r, s) in isum.iter_mut().enumerate() {
                        let word = g.qs[k][r];
                        *s += nibble_dot::<false>(word, lo_x) as i32
                            + nibble_dot::<true>(word, hi_x) as i32;
                    }
                }
                let dd = wide(std::array::from_fn(|r| widen_half(g.d[r]) * xb.d));
                let isum = isum.map(|s| s as f64);
                fused_lanes(&isum, &dd, &mut acc);
            }
            for (o, a) in out.iter_mut().zip(acc) {
                o[i] = a;
            }
        }
    }
}

sse4_twin! {
    /// Q6_K × Q8_K for a group's sixteen rows at once: the bits of
    /// [`super::dot_q6k_scalar`] on each row. Each sub-block's four-value runs are summed in
    /// 16 bits (four products of at most 63·128 fit) across the rows, then scaled by the
    /// row's sub-block scale into the lane's exact i32 sum.
    pub(super) fn q6k_group(w: &[Q6Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        let mut acc = [[0f32; 16]; 8];
        let mut chain = [0f32; 16];
        let batch = x.first().is_some_and(|xb| xb.batch);
        for (g, xb) in w.iter().zip(x) {
            let mut lanes = [[0i32; 16]; 8];
            for sub in 0..16 {
                for run in 0..4 {
                    let e0 = 16 * sub + 4 * run;
                    let mut part = [0i16; 16];
                    for e in e0..e0 + 4 {
                        let (lw, ls, hw, hs) = q6k_place(e);
                        let shift = 8 * (e % 4) as u32;
                        let xv = xb.qs[e] as i16;
                        for (r, p) in part.iter_mut().enumerate() {
                            let lo = (g.ql[lw][r] >> (shift + ls)) & 0xF;
                            let hi = (g.qh[hw][r] >> (shift + hs)) & 0x3;
                            *p += (lo | (hi << 4)) as i16 * xv;
                        }
                    }
                    let lane = &mut lanes[(e0 % 32) / 4];
                    for r in 0..16 {
                        lane[r] += g.sc[sub][r] as i32 * part[r] as i32;
                    }
                }
            }
            for (l, lane) in lanes.iter_mut().enumerate() {
                for (r, v) in lane.iter_mut().enumerate() {
                    *v -= 32
                        * (g.sc[2 * l][r] as i32 * xb.bsums[2 * l]
                            + g.sc[2 * l + 1][r] as i32 * xb.bsums[2 * l + 1]);
                }
            }
            if batch {
                // The whole super-block's exact integer, times `d_w`, then one FMA with `d_x`.
                let t: [f32; 16] = std::array::from_fn(|r| {
                    widen_half(g.d[r]) * lanes.iter().map(|l| l[r]).sum::<i32>() as f32
                });
                fused_lanes(&[xb.d as f64; 16], &wide(t), &mut chain);
                continue;
            }
            let dd = wide(std::array::from_fn(|r| xb.d * widen_half(g.d[r])));
            for (a, lane) in acc.iter_mut().zip(&lanes) {
                fused_lanes(&dd, &wide(lane.map(|v| v as f32)), a);
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = if batch {
                chain[r]
            } else {
                reduce8(std::array::from_fn(|l| acc[l][r]))
            };
        }
    }
}

sse4_twin! {
    /// Q4_K × Q8_K for a group's sixteen rows at once: the bits of
    /// [`super::dot_q4k_scalar`] on each row. A sub-block's 32 nibbles (eight words, low or
    /// high nibbles) are dotted four at a time in 16 bits across the rows, summed exactly in
    /// 32 bits, times the row's six-bit scale; the min terms come from the activations'
    /// 16-value sums. One FMA a row per super-block (decode) or per pair of sub-blocks
    /// (rows llama.cpp's GEMM takes), for the scales and the mins apart.
    pub(super) fn q4k_group(w: &[Q4Kx16], x: &[BlockQ8K], out: &mut [f32; 16]) {
        let (mut acc, mut acc_min) = ([0f32; 16], [0f32; 16]);
        for (g, xb) in w.iter().zip(x) {
            let every = if xb.batch { 2 } else { 8 };
            let dd = wide(std::array::from_fn(|r| widen_half(g.d[r]) * xb.d));
            let dm = wide(std::array::from_fn(|r| widen_half(g.dmin[r]) * xb.d));
            let (mut isum, mut imin) = ([0i32; 16], [0i32; 16]);
            for s in 0..8 {
                let mut dot = [0i32; 16];
                for k in 0..8 {
                    let word = &g.qs[8 * (s / 2) + k];
                    let xs = &xb.qs[32 * s + 4 * k..32 * s + 4 * k + 4];
                    for (r, d) in dot.iter_mut().enumerate() {
                        *d += if s % 2 == 0 {
                            nibble_dot::<false>(word[r], xs)
                        } else {
                            nibble_dot::<true>(word[r], xs)
                        } as i32;
                    }
                }
                let bsum = xb.bsums[2 * s] + xb.bsums[2 * s + 1];
                for r in 0..16 {
                    isum[r] += g.sc[s][r] as i32 * dot[r];
                    imin[r] += g.mn[s][r] as i32 * bsum;
                }
                if (s + 1) % every == 0 {
                    fused_lanes(&wide(isum.map(|v| v as f32)), &dd, &mut acc);
                    fused_lanes(&wide(imin.map(|v| v as f32)), &dm, &mut acc_min);
                    (isum, imin) = ([0; 16], [0; 16]);
                }
            }
        }
        for (r, o) in out.iter_mut().enumerate() {
            *o = acc[r] - acc_min[r];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{
        dot_q41_q81_scalar, dot_q4k_rows, dot_q80_q80_scalar, quantize_row_q8_0,
        quantize_row_q8_0s, quantize_row_q8_1, quantize_row_q8_k, GroupLayout, Q50x16, Q80x16,
        Q40_BYTES, Q41_BYTES, Q50_BYTES, Q80_BYTES, QK, QKK,
    };
    use super::*;
    use crate::sampling::Rng;
    use half::f16;

    #[test]
    fn every_f16_widens_to_the_value_half_gives() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            assert_eq!(widen_half(bits).to_bits(), want.to_bits(), "{bits:#06x}");
        }
    }

    /// `fused_lanes`' value is `mul_add`'s, bit for bit.
    fn check(a: f32, b: f32, c: f32) {
        let want = a.mul_add(b, c);
        let same = |x: f32| x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan());
        let mut lanes = [c; 4];
        fused_lanes(&[a as f64; 4], &[b as f64; 4], &mut lanes);
        assert!(lanes.iter().all(|&x| same(x)), "lanes: {a:e}·{b:e} + {c:e}");
    }

    #[test]
    fn multiply_adds_without_the_instruction_round_once() {
        // f64 sums exactly halfway between two f32: a true tie (exact, broken to even)
        // and one that rounding to f64 made (the exact sum is just below the halfway
        // point, so rounding once goes down where rounding twice would go to even).
        check(1.0, 2f32.powi(-24), 1.0);
        check(1.0, 2f32.powi(-24), 1.0 + f32::EPSILON);
        let (a, b) = (2f32.powi(6) * (1.0 + f32::EPSILON), 1.0 - f32::EPSILON);
        let c = 2f32.powi(30) + 2f32.powi(7);
        assert_ne!(
            (a as f64 * b as f64 + c as f64) as f32,
            a.mul_add(b, c),
            "the case rounding twice gets wrong"
        );
        check(a, b, c);
        check(-a, b, -c);
        // Zeros, subnormals, overflow, infinities, NaN.
        for (a, b, c) in [
            (0.0, 5.0, 0.0),
            (-0.0, 5.0, 0.0),
            (-0.0, 5.0, -0.0),
            (3.0, -2.0, 6.0),
            (1e-30, 1e-10, 0.0),
            (1e-20, 1e-20, f32::MIN_POSITIVE),
            (f32::MIN_POSITIVE, -0.5, f32::MIN_POSITIVE),
            (1e30, 1e30, 1.0),
            (f32::MAX, 2.0, -f32::MAX),
            (f32::INFINITY, 0.0, 1.0),
            (f32::INFINITY, 1.0, f32::NEG_INFINITY),
            (f32::NAN, 1.0, 1.0),
        ] {
            check(a, b, c);
        }
        // Random bit patterns, and the kernels' own shape: a scale times a small integer
        // plus a running sum.
        let mut rng = Rng::new(91);
        for _ in 0..400_000 {
            let bits = rng.next_u64();
            let (a, b, c) = (
                f32::from_bits(bits as u32),
                f32::from_bits((bits >> 32) as u32),
                f32::from_bits(rng.next_u64() as u32),
            );
            check(a, b, c);
            let scale = f32::from_bits(0x3800_0000 | (bits as u32 & 0x00ff_ffff));
            let s = ((bits >> 40) as i32 % 8000) as f32;
            let acc = (rng.next_f32() - 0.5) * 2f32.powi((bits >> 60) as i32 * 2 - 12);
            check(scale, s, acc);
            check(scale, s.round() / 64.0, 0.0);
        }
    }

    /// Sixteen rows of random ggml blocks for `cols` weights (a small positive f16 at
    /// each offset of `scales`), as one group a block index.
    fn groups<G: GroupLayout>(rng: &mut Rng, cols: usize, scales: &[usize]) -> Vec<G> {
        let blocks = cols / G::BLOCK_VALUES;
        let mut g = vec![G::default(); blocks];
        for r in 0..16 {
            for gb in g.iter_mut() {
                let mut b: Vec<u8> = (0..G::BLOCK_BYTES).map(|_| rng.next_u64() as u8).collect();
                for &at in scales {
                    let f = f16::from_f32((rng.next_f32() + 0.01) * 0.05);
                    b[at..at + 2].copy_from_slice(&f.to_le_bytes());
                }
                gb.put(r, &b);
            }
        }
        g
    }

    fn activations(rng: &mut Rng, cols: usize) -> Vec<f32> {
        (0..cols).map(|_| (rng.next_f32() - 0.5) * 4.0).collect()
    }

    #[test]
    fn q4_1_groups_give_the_reference_dots_bits() {
        let mut rng = Rng::new(7);
        let cols = 8 * QK;
        for _ in 0..20 {
            let w: Vec<Q41x16> = groups(&mut rng, cols, &[0, 2]);
            let mut xq = vec![BlockQ81::default(); cols / QK];
            quantize_row_q8_1(&activations(&mut rng, cols), &mut xq);
            let mut out = [0f32; 16];
            q41_group(&w, &xq, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = dot_q41_q81_scalar(w.iter().map(|g| g.row(r)), &xq);
                assert_eq!(o.to_bits(), want.to_bits(), "row {r}");
            }
        }
        assert_eq!(Q41_BYTES, 20);
    }

    #[test]
    fn q8_0_and_q5_0_groups_give_the_reference_dots_bits() {
        let mut rng = Rng::new(8);
        let cols = 8 * QK;
        for _ in 0..20 {
            let mut xq = vec![BlockQ80::default(); cols / QK];
            quantize_row_q8_0(&activations(&mut rng, cols), &mut xq);
            let mut out = [0f32; 16];
            let w8: Vec<Q80x16> = groups(&mut rng, cols, &[0]);
            i8_group(&w8, &xq, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = dot_q80_q80_scalar(w8.iter().map(|g| g.row(r)), &xq);
                assert_eq!(o.to_bits(), want.to_bits(), "Q8_0 row {r}");
            }
            let w5: Vec<Q50x16> = groups(&mut rng, cols, &[0]);
            i8_group(&w5, &xq, &mut out);
            for (r, o) in out.iter().enumerate() {
                let want = dot_q80_q80_scalar(w5.iter().map(|g| g.row(r)), &xq);
                assert_eq!(o.to_bits(), want.to_bits(), "Q5_0 row {r}");
            }
        }
        assert_eq!((Q80_BYTES, Q50_BYTES), (34, 22));
    }

    #[test]
    fn q4_0_groups_give_one_fma_a_block_in_order() {
        let mut rng = Rng::new(9);
        let cols = 8 * QK;
        for n in 1..=4 {
            let w: Vec<Q40x16> = groups(&mut rng, cols, &[0]);
            let xs: Vec<Vec<BlockQ80S>> = (0..n)
                .map(|_| {
                    let mut xq = vec![BlockQ80S::default(); cols / QK];
                    quantize_row_q8_0s(&activations(&mut rng, cols), &mut xq);
                    xq
                })
                .collect();
            let x: Vec<&[BlockQ80S]> = xs.iter().map(|v| &v[..]).collect();
            let mut out = [[0f32; 4]; 16];
            q40_group(&w, &x, &mut out);
            for (r, o) in out.iter().enumerate() {
                for (i, xr) in x.iter().enumerate() {
                    // The arithmetic of llama.cpp's repacked Q4_0: the exact integer sum
                    // (offset included), then `acc = isum·(d_w·d_x) + acc` fused.
                    let mut acc = 0f32;
                    for (g, xb) in w.iter().zip(xr.iter()) {
                        let mut isum = xb.s;
                        for k in 0..4 {
                            for (j, byte) in g.qs[k][r].to_le_bytes().iter().enumerate() {
                                isum += (byte & 15) as i32 * xb.qs[4 * k + j] as i32
                                    + (byte >> 4) as i32 * xb.qs[16 + 4 * k + j] as i32;
                            }
                        }
                        let dd = f16::from_bits(g.d[r]).to_f32() * xb.d;
                        acc = (isum as f32).mul_add(dd, acc);
                    }
                    assert_eq!(o[i].to_bits(), acc.to_bits(), "row {r}, activation row {i}");
                }
            }
        }
        assert_eq!(Q40_BYTES, 18);
    }

    #[test]
    fn q4_k_groups_give_the_reference_dots_bits() {
        let mut rng = Rng::new(10);
        let cols = 3 * QKK;
        for round in 0..12 {
            let w: Vec<Q4Kx16> = groups(&mut rng, cols, &[0, 2]);
            let mut xq = vec![BlockQ8K::default(); cols / QKK];
            quantize_row_q8_k(&activations(&mut rng, cols), &mut xq);
            // Both orders: decode rows and rows of a prompt llama.cpp's GEMM takes.
            let batch = round % 2 == 1;
            xq.iter_mut().for_each(|b| b.batch = batch);
            let mut out = [0f32; 16];
            q4k_group(&w, &xq, &mut out);
            let mut want = [0f32; 16];
            dot_q4k_rows(&w, &xq, &mut want);
            for r in 0..16 {
                assert_eq!(
                    out[r].to_bits(),
                    want[r].to_bits(),
                    "row {r}, batch {batch}"
                );
            }
        }
    }
}
