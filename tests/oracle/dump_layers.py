#!/usr/bin/env python3
"""Dump llama.cpp's intermediate tensors for one prompt, for kernel-level comparisons.

Uses llama.cpp's eval callback (through llama-cpp-python's low-level API) to copy every
f32 tensor whose name ends in one of --layers (e.g. "-0" for layer 0: attn_norm-0,
Qcur-0, Kcur-0, Vcur-0, kq-0, kq_soft_max-0, kqv_out-0, ffn_out-0, l_out-0, ...) plus
result_norm, into an .npz file. Tensors that appear several times under one name (before
and after RoPE, say) get suffixes #2, #3 in order.

Usage: dump_layers.py MODEL.gguf OUT.npz --tokens 1,504,2365 [--layers 0,29]
Settings match the fixtures: f16 KV cache, no flash attention, 1 thread.
"""
import argparse
import ctypes

import llama_cpp
import numpy as np

# Offsets in struct ggml_tensor (ggml.h, 64-bit): type, ne[4], nb[4], data, name.
OFF_TYPE, OFF_NE, OFF_NB, OFF_DATA, OFF_NAME = 0, 16, 48, 248, 256


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--tokens", default="1")
    p.add_argument("--layers", default="0")
    a = p.parse_args()
    toks = [int(x) for x in a.tokens.split(",")]
    suffixes = tuple(f"-{l}" for l in a.layers.split(","))
    dump = {}

    def cb(t, ask, _ud):
        if ask:
            return True
        name = ctypes.string_at(t + OFF_NAME).decode(errors="replace")
        if not (name.endswith(suffixes) or name == "result_norm"):
            return True
        if ctypes.c_int32.from_address(t + OFF_TYPE).value != 0:  # f32 only
            return True
        ne = [ctypes.c_int64.from_address(t + OFF_NE + 8 * i).value for i in range(4)]
        nb0 = ctypes.c_size_t.from_address(t + OFF_NB).value
        data = ctypes.c_void_p.from_address(t + OFF_DATA).value
        n = ne[0] * ne[1] * ne[2] * ne[3]
        if data and nb0 == 4:
            key, i = name, 1
            while key in dump:
                i += 1
                key = f"{name}#{i}"
            arr = np.ctypeslib.as_array((ctypes.c_float * n).from_address(data)).copy()
            dump[key] = arr.reshape(ne[3], ne[2], ne[1], ne[0])
        return True

    cbf = llama_cpp.ggml_backend_sched_eval_callback(cb)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(a.model.encode(), llama_cpp.llama_model_default_params())
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = 256
    cp.n_threads = cp.n_threads_batch = 1
    cp.flash_attn_type = 0
    cp.cb_eval = cbf
    ctx = llama_cpp.llama_init_from_model(model, cp)
    b = llama_cpp.llama_batch_init(len(toks), 0, 1)
    b.n_tokens = len(toks)
    for i, t in enumerate(toks):
        b.token[i], b.pos[i], b.n_seq_id[i] = t, i, 1
        b.seq_id[i][0] = 0
        b.logits[i] = 1 if i == len(toks) - 1 else 0
    if llama_cpp.llama_decode(ctx, b) != 0:
        raise SystemExit("llama_decode failed")
    np.savez(a.out, **{k.replace("-", "_"): v for k, v in dump.items()})
    print(f"{len(dump)} tensors written to {a.out}")


if __name__ == "__main__":
    main()
