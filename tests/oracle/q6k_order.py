#!/usr/bin/env python3
"""Which order llama.cpp's CPU backend sums a Q6_K matmul in, by batch size.

Builds one `ggml_mul_mat` of a random Q6_K matrix (576 × 1536, the shape of SmolLM2's
FFN down projection) with N activation rows through ggml's own C API (ctypes on the
libggml-base/libggml-cpu that llama-cpp-python ships), and compares every output with
two reconstructions from the same quantized activations (`quantize_row_q8_K`):

- `vec_dot`: llama.cpp's `ggml_vec_dot_q6_K_q8_K`, called per (row, column);
- `batch`: per super-block the exact integer `Σ sc·(q − 32)·x`, converted and times
  `d_w`, then `acc = fma(d_x, ·, acc)` from zero (computed here in numpy, the FMA in
  float64 and rounded once, which is exact for these magnitudes).

Usage: VENV/bin/python tests/oracle/q6k_order.py   (VENV with llama-cpp-python, numpy)
Prints, per N, the share of outputs equal bit for bit to each. On llama-cpp-python
0.3.36 (x86-64, AVX-512): N ≤ 7 all `vec_dot`, N ≥ 8 all `batch`.
"""

import ctypes as C
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ggml_lib import InitParams, base, cpu  # noqa: E402

vp = C.c_void_p
cpu.ggml_vec_dot_q6_K_q8_K.argtypes = [C.c_int, vp, C.c_size_t, vp, C.c_size_t, vp, C.c_size_t, C.c_int]

TYPE_F32, TYPE_Q6_K = 0, 14
ROWS, COLS = 576, 1536
NB = COLS // 256
Q6K_BYTES, Q8K_BYTES = 210, 292  # block_q8_K: f32 d, 256 × i8, 16 × i16

rng = np.random.default_rng(1)
blocks = np.frombuffer(rng.bytes(ROWS * NB * Q6K_BYTES), np.uint8).copy().reshape(-1, Q6K_BYTES)
blocks[:, 208:210] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)  # d finite


def decode():
    """q − 32 (rows, NB, 256), scales (rows, NB, 16), d (rows, NB) as ggml lays them out."""
    ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    q = np.zeros((len(blocks), 256), np.int32)
    for h in range(2):
        lo, hi = ql[:, 64 * h:64 * h + 64], qh[:, 32 * h:32 * h + 32]
        for i in range(32):
            q[:, 128 * h + i] = (lo[:, i] & 15) | (hi[:, i] & 3) << 4
            q[:, 128 * h + i + 32] = (lo[:, i + 32] & 15) | ((hi[:, i] >> 2) & 3) << 4
            q[:, 128 * h + i + 64] = (lo[:, i] >> 4) | ((hi[:, i] >> 4) & 3) << 4
            q[:, 128 * h + i + 96] = (lo[:, i + 32] >> 4) | ((hi[:, i] >> 6) & 3) << 4
    sc = blocks[:, 192:208].view(np.int8).astype(np.int32)
    d = blocks[:, 208:210].copy().view(np.float16)[:, 0].astype(np.float32)
    return (q - 32).reshape(ROWS, NB, 256), sc.reshape(ROWS, NB, 16), d.reshape(ROWS, NB)


def ggml_mul_mat(x):
    ctx = base.ggml_init(InitParams(512 << 20, None, False))
    a = base.ggml_new_tensor_2d(ctx, TYPE_Q6_K, COLS, ROWS)
    b = base.ggml_new_tensor_2d(ctx, TYPE_F32, COLS, len(x))
    C.memmove(base.ggml_get_data(a), blocks.tobytes(), blocks.nbytes)
    C.memmove(base.ggml_get_data(b), x.tobytes(), x.nbytes)
    c = base.ggml_mul_mat(ctx, a, b)
    graph = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(graph, c)
    cpu.ggml_graph_compute_with_ctx(ctx, graph, 2)
    out = np.ctypeslib.as_array(C.cast(base.ggml_get_data(c), C.POINTER(C.c_float)),
                                shape=(len(x) * ROWS,)).copy().reshape(len(x), ROWS)
    base.ggml_free(ctx)
    return out


def main():
    q, sc, d = decode()
    weights = C.create_string_buffer(blocks.tobytes(), blocks.nbytes)
    for n in (1, 4, 7, 8, 9, 37):
        x = (rng.standard_normal((n, COLS)) * 0.3).astype(np.float32)
        got = ggml_mul_mat(x)
        vec_dot = np.zeros_like(got)
        batch = np.zeros_like(got)
        for j in range(n):
            xq = C.create_string_buffer(NB * Q8K_BYTES)
            row = np.ascontiguousarray(x[j])
            cpu.quantize_row_q8_K(row.ctypes.data, xq, COLS)
            s = C.c_float()
            for r in range(ROWS):
                cpu.ggml_vec_dot_q6_K_q8_K(COLS, C.addressof(s), 0,
                                           C.addressof(weights) + r * NB * Q6K_BYTES, 0, xq, 0, 1)
                vec_dot[j, r] = s.value
            raw = np.frombuffer(xq.raw, np.uint8).reshape(NB, Q8K_BYTES)
            xs = raw[:, 4:260].view(np.int8).astype(np.int32)
            xd = raw[:, 0:4].copy().view(np.float32)[:, 0]
            isum = ((q * xs[None]).reshape(ROWS, NB, 16, 16).sum(-1) * sc).sum(-1)
            acc = np.zeros(ROWS, np.float32)
            for bi in range(NB):
                t = (d[:, bi] * isum[:, bi].astype(np.float32)).astype(np.float32)
                acc = (np.float64(xd[bi]) * t.astype(np.float64) + acc.astype(np.float64)).astype(np.float32)
            batch[j] = acc
        eq = lambda a: 100.0 * (a.view(np.uint32) == got.view(np.uint32)).mean()
        print(f"N={n:3}: equal to vec_dot {eq(vec_dot):5.1f}%, to the batch order {eq(batch):5.1f}%")


if __name__ == "__main__":
    main()
