#!/usr/bin/env python3
"""Produce the llama.cpp oracle fixtures the engine's agreement tests compare against.

Runs llama.cpp (through the PyPI package llama-cpp-python, which builds it from source)
on the same GGUF file the tests use and writes tests/fixtures/llamacpp_<model>.json:

- tokenizer cases: a varied text set (accents, CJK, emoji, code, digits, whitespace
  runs, special-token text) tokenized by llama.cpp, with and without special parsing;
- greedy cases: ten chat prompts rendered with the file's own chat template (jinja2),
  tokenized by llama.cpp, then 16 greedily decoded token ids and the first step's
  top-64 logits.

Usage: python3 tests/oracle/make_fixtures.py MODEL.gguf [OUT.json]
Anyone can re-run it; the output is deterministic for a given llama.cpp version.
"""
import json
import os
import sys

import jinja2
import llama_cpp
import numpy as np

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "multiple   spaces\tand\ttabs\n\nand newlines\r\n",
    "Café naïve résumé façade Ångström über straße",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "Emoji: 🎉🚀👍🏽 and flags 🇫🇷🇩🇪 and ZWJ 👨‍👩‍👧",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 1 + 2); }  // comment",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e10 2024-11-22",
    "Phone +1 (555) 010-9999, IBAN DE89 3704 0044 0532 0130 00",
    "I'm sure you'll see they've done it, we'd say it's OK.",
    "UPPER lower MiXeD CamelCaseWord snake_case_word kebab-case-word",
    "    indented\n        more indented\n",
    "Ünïcödé ẞ ǅ ﬁ ligature ½ ² ③ Ⅻ",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "a\u00a0b\u2003c\u200bd",
    "!!!??? ... --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "https://example.org/path?query=1&other=two#frag user@example.com",
    "",
    " ",
    "\n",
    "   \n   ",
    "The patient, born 1957-03-14, was admitted with acute chest pain.",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain what a hash function is in one sentence."}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "List three primary colors."}],
    [{"role": "user", "content": "Translate 'good morning' into German."}],
    [{"role": "user", "content": "What is 12 times 12?"}],
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "Give me a tip for staying focused."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"}, {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    [{"role": "user", "content": "Summarize the plot of Romeo and Juliet in two sentences."}],
]

N_GEN = 16
TOP_LOGITS = 64


def last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float32).copy()


def main():
    model_path = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else None
    kv = os.environ.get("ORACLE_KV", "f16")  # llama.cpp's default
    kv_type = {"f32": 0, "f16": 1}[kv]
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=1024, n_batch=512, n_threads=2,
                          type_k=kv_type, type_v=kv_type, flash_attn=False,
                          logits_all=False, verbose=False)
    template_src = llm.metadata.get("tokenizer.chat_template")
    env = jinja2.Environment()
    template = env.from_string(template_src)

    def tok(text, special):
        return llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)

    tokenizer_cases = []
    for t in TEXTS:
        tokenizer_cases.append({
            "text": t,
            "ids": tok(t, False),
            "ids_special": tok(t, True),
        })

    greedy_cases = []
    for msgs in CHATS:
        prompt = template.render(messages=msgs, add_generation_prompt=True, bos_token="", eos_token="")
        ids = tok(prompt, True)
        llm.reset()
        llm.eval(ids)
        logits = last_logits(llm)
        first = logits.copy()
        gen = []
        for _ in range(N_GEN):
            t = int(np.argmax(logits))
            gen.append(t)
            llm.eval([t])
            logits = last_logits(llm)
        top = np.argsort(-first)[:TOP_LOGITS]
        greedy_cases.append({
            "messages": msgs,
            "prompt_text": prompt,
            "prompt_ids": ids,
            "generated_ids": gen,
            "first_logits_top": [[int(i), float(first[i])] for i in top],
            "first_logsumexp": float(np.log(np.sum(np.exp(first - first.max()))) + first.max()),
        })

    data = {
        "generator": "tests/oracle/make_fixtures.py",
        "llama_cpp_python": llama_cpp.__version__,
        "model_file": os.path.basename(model_path),
        "kv_cache_type": kv,
        "tokenizer_cases": tokenizer_cases,
        "greedy_cases": greedy_cases,
    }
    text = json.dumps(data, ensure_ascii=False, indent=1)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
