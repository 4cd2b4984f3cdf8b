#!/usr/bin/env python3
"""Which order llama.cpp sums a repacked Q4_K matmul in: its GEMV against its GEMM.

On x86 with AVX2, llama.cpp repacks Q4_K weights into eight-row tiles and multiplies
them with `ggml_gemv_q4_K_8x8_q8_K` (one activation row) or `ggml_gemm_q4_K_8x8_q8_K`
(four rows, quantized together by `ggml_quantize_mat_q8_K_4x8`). This repacks a random
Q4_K matrix with llama.cpp's own repack function (ctypes on the libggml-cpu that
llama-cpp-python ships), runs both kernels on the same four rows, and compares every
output with reconstructions from the quantized activations: two FMA chains
(`Σ sc·Σq·x` times `d_w·d_x`, `Σ m·bsum` times `dmin_w·d_x`, result their
difference) stepping once per super-block, or once per pair of sub-blocks (64 values).

Usage: VENV/bin/python tests/oracle/q4k_order.py   (VENV with llama-cpp-python, numpy)
On llama-cpp-python 0.3.36 (x86-64, AVX-512): GEMV 100% equal to the per-super-block
chains, GEMM 100% to the per-pair chains.
"""

import ctypes as C
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ggml_lib import InitParams, base, cpu  # noqa: E402

vp = C.c_void_p
# ggml::cpu::repack::repack<block_q4_K, 8, 8>(ggml_tensor *, const void *, size_t)
repack = getattr(cpu, "_ZN4ggml3cpu6repack6repackI10block_q4_KLl8ELl8EEEiP11ggml_tensorPKvm")
repack.restype, repack.argtypes = C.c_int, [vp, vp, C.c_size_t]
for name in ("ggml_gemv_q4_K_8x8_q8_K", "ggml_gemm_q4_K_8x8_q8_K"):
    getattr(cpu, name).argtypes = [C.c_int, vp, C.c_size_t, vp, vp, C.c_int, C.c_int]
cpu.ggml_quantize_mat_q8_K_4x8.argtypes = [vp, vp, C.c_int64]

TYPE_Q4_K = 12
ROWS, COLS = 64, 1536
NB, Q4K_BYTES, Q8K_BYTES = COLS // 256, 144, 292
F32, F64 = np.float32, np.float64

rng = np.random.default_rng(3)
blocks = np.frombuffer(rng.bytes(ROWS * NB * Q4K_BYTES), np.uint8).copy().reshape(-1, Q4K_BYTES)
blocks[:, 0:2] = np.frombuffer(np.float16(0.003).tobytes(), np.uint8)  # d
blocks[:, 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # dmin


def decode():
    """Nibbles (rows, NB, 256), sub-block scales and mins (rows, NB, 8), d, dmin."""
    d = blocks[:, 0:2].copy().view(np.float16)[:, 0].astype(F32)
    dmin = blocks[:, 2:4].copy().view(np.float16)[:, 0].astype(F32)
    s12, qs = blocks[:, 4:16].astype(np.int32), blocks[:, 16:144].astype(np.int32)
    sc = np.zeros((len(blocks), 8), np.int32)
    mn = np.zeros((len(blocks), 8), np.int32)
    for j in range(8):
        if j < 4:
            sc[:, j], mn[:, j] = s12[:, j] & 63, s12[:, j + 4] & 63
        else:
            sc[:, j] = (s12[:, j + 4] & 15) | ((s12[:, j - 4] >> 6) << 4)
            mn[:, j] = (s12[:, j + 4] >> 4) | ((s12[:, j] >> 6) << 4)
    q = np.zeros((len(blocks), 256), np.int32)
    for j in range(4):
        q[:, 64 * j:64 * j + 32] = qs[:, 32 * j:32 * j + 32] & 15
        q[:, 64 * j + 32:64 * j + 64] = qs[:, 32 * j:32 * j + 32] >> 4
    per_row = lambda a: a.reshape(ROWS, NB, *a.shape[1:])
    return per_row(q), per_row(sc), per_row(mn), d.reshape(ROWS, NB), dmin.reshape(ROWS, NB)


def chains(q, sc, mn, d, dmin, xs, xd, bsums, steps):
    """The two FMA chains, stepping `steps` times per super-block."""
    dots = (q * xs[None]).reshape(ROWS, NB, 8, 32).sum(-1) * sc
    mins = mn * bsums.reshape(NB, 8, 2).sum(-1)[None]
    per = 8 // steps
    acc, acc_min = np.zeros(ROWS, F32), np.zeros(ROWS, F32)
    fma = lambda a, b, c: (a.astype(F64) * b.astype(F64) + c.astype(F64)).astype(F32)
    for b in range(NB):
        dd, dm = (d[:, b] * xd[b]).astype(F32), (dmin[:, b] * xd[b]).astype(F32)
        for g in range(steps):
            acc = fma(dots[:, b, g * per:(g + 1) * per].sum(-1).astype(F32), dd, acc)
            acc_min = fma(mins[:, b, g * per:(g + 1) * per].sum(-1).astype(F32), dm, acc_min)
    return (acc - acc_min).astype(F32)


def main():
    ctx = base.ggml_init(InitParams(64 << 20, None, False))
    tensor = base.ggml_new_tensor_2d(ctx, TYPE_Q4_K, COLS, ROWS)
    src = C.create_string_buffer(blocks.tobytes(), blocks.nbytes)
    assert repack(tensor, src, blocks.nbytes) == 0
    weights = base.ggml_get_data(tensor)
    decoded = decode()
    x = (rng.standard_normal((4, COLS)) * 0.3).astype(F32)
    gemv = np.zeros((4, ROWS), F32)
    acts = []
    for j in range(4):
        xq = C.create_string_buffer(NB * Q8K_BYTES)
        row = np.ascontiguousarray(x[j])
        cpu.quantize_row_q8_K(row.ctypes.data, xq, COLS)
        cpu.ggml_gemv_q4_K_8x8_q8_K(COLS, gemv[j].ctypes.data, ROWS, weights, xq, 1, ROWS)
        raw = np.frombuffer(xq.raw, np.uint8).reshape(NB, Q8K_BYTES)
        acts.append((raw[:, 4:260].view(np.int8).astype(np.int32),
                     raw[:, 0:4].copy().view(F32)[:, 0],
                     raw[:, 260:292].copy().view(np.int16).astype(np.int32)))
    x4 = C.create_string_buffer(4 * NB * Q8K_BYTES)
    cpu.ggml_quantize_mat_q8_K_4x8(np.ascontiguousarray(x).ctypes.data, x4, COLS)
    gemm = np.zeros((4, ROWS), F32)
    cpu.ggml_gemm_q4_K_8x8_q8_K(COLS, gemm.ctypes.data, ROWS, weights, x4, 4, ROWS)
    for steps, what in ((1, "per super-block"), (4, "per pair of sub-blocks")):
        want = np.stack([chains(*decoded, *acts[j], steps) for j in range(4)])
        eq = lambda got: 100.0 * (got.view(np.uint32) == want.view(np.uint32)).mean()
        print(f"chains stepping {what}: GEMV {eq(gemv):5.1f}% equal, GEMM {eq(gemm):5.1f}%")


if __name__ == "__main__":
    main()
