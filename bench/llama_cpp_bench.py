#!/usr/bin/env python3
"""llama.cpp side of `appliance bench`, through llama-cpp-python's low-level API.

Measures exactly what the appliance's own benchmark child measures, on the same GGUF
file, prompt token ids and thread count, and prints one JSON line:

  --mode single:  prefill tok/s for the prompt, decode tok/s over --gen-tokens (greedy)
  --mode streams: aggregate decode tok/s with N sequences decoded together in one batch
                  per step (what llama.cpp's server does with N parallel slots)

Greedy sampling is a numpy argmax over the logits on both sides.
"""
import argparse
import json
import statistics
import time

import llama_cpp
import numpy as np


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Runner:
    def __init__(self, model_path, threads, n_seq, n_ctx):
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_seq_max = n_seq
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.batch = llama_cpp.llama_batch_init(512, 0, n_seq)

    def clear(self):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, items):
        """items: list of (token, pos, seq, want_logits). Returns row indices with logits."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        rc = llama_cpp.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(self, i):
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))

    def prefill(self, ids, seq=0):
        # One batch per 512 tokens, logits for the last one.
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            last = start + len(chunk) == len(ids)
            self.decode([(t, start + j, seq, last and j == len(chunk) - 1) for j, t in enumerate(chunk)])
        return self.argmax(-1)


def single(args, ids):
    r = Runner(args.model, args.threads, 1, len(ids) + args.gen_tokens + 16)
    r.clear(); r.prefill(ids[:8])  # warm-up
    pre, dec = [], []
    for _ in range(args.repeats):
        r.clear()
        t0 = time.perf_counter()
        tok = r.prefill(ids)
        t1 = time.perf_counter()
        pos = len(ids)
        for _ in range(args.gen_tokens - 1):
            r.decode([(tok, pos, 0, True)])
            tok = r.argmax(-1)
            pos += 1
        t2 = time.perf_counter()
        pre.append(len(ids) / (t1 - t0))
        dec.append((args.gen_tokens - 1) / (t2 - t1))
    return {"prefill_tps": statistics.median(pre), "decode_tps": statistics.median(dec), "peak_rss_bytes": peak_rss()}


def streams(args, ids):
    counts = [int(x) for x in args.streams.split(",")]
    n_max = max(counts)
    r = Runner(args.model, args.threads, n_max, n_max * (len(ids) + args.gen_tokens + 16))
    out = []
    for n in counts:
        r.clear()
        # Prefill every sequence (one batch), then decode all of them together.
        items = []
        for s in range(n):
            items += [(t, j, s, j == len(ids) - 1) for j, t in enumerate(ids)]
        toks = []
        for start in range(0, len(items), 512):
            chunk = items[start:start + 512]
            r.decode(chunk)
            for k, it in enumerate(chunk):
                if it[3]:
                    toks.append(r.argmax(k))
        pos = len(ids)
        t0 = time.perf_counter()
        for _ in range(args.gen_tokens - 1):
            r.decode([(toks[s], pos, s, True) for s in range(n)])
            toks = [r.argmax(s) for s in range(n)]
            pos += 1
        t1 = time.perf_counter()
        out.append({"streams": n, "aggregate_tps": n * (args.gen_tokens - 1) / (t1 - t0)})
    return {"streams": out, "peak_rss_bytes": peak_rss()}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-ids", required=True, help="JSON file with the prompt token ids")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--mode", choices=["single", "streams"], required=True)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--streams", default="1,4,8,16")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with open(args.prompt_ids) as f:
        ids = json.load(f)
    res = single(args, ids) if args.mode == "single" else streams(args, ids)
    res["engine"] = "llama.cpp " + llama_cpp.__version__
    print(json.dumps(res))


if __name__ == "__main__":
    main()
