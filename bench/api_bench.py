#!/usr/bin/env python3
"""The daemon's overhead, measured side by side.

1. Tokens/s through the HTTPS API vs the bare engine in-process (`appliance bench-run
   --mode streams`), at 1 and 8 concurrent streams of the same prompt (token ids) and
   length, greedy, ignore_eos; decode rate measured the same way on both sides: from the
   moment every stream has its first token to the last token. Runs alternate (engine,
   API, engine, API, ...) so both see the same machine noise; medians are reported.
2. `GET /v1/models` with a valid key under load from wrk (HTTPS, keep-alive): requests/s
   and p50/p99 latency. The same against llama.cpp's OpenAI server (llama-cpp-python,
   `python -m llama_cpp.server` with TLS and an API key) when --peer-python is given,
   plus its single-stream decode rate through its API.
3. The daemon's RSS when idle without workers.

Needs: the release binary, the model, wrk, and httpx (tests/e2e/requirements.txt).
Usage: bench/api_bench.py --bin target/release/appliance --model models/X.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

TEXT = (
    "The appliance runs open-weight language models on the institution's own hardware. "
    "Every request is classified, routed only where policy allows, and recorded in a "
    "tamper-evident audit log. Hospitals use it to draft discharge letters, banks to "
    "summarise customer correspondence, and regional consortia to give member "
    "organisations a shared, sovereign service. Administrators manage workers, models, "
    "tenants, keys, policy and upstreams from a web console; auditors verify the log offline."
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Daemon:
    def __init__(self, bin_: str, models: list[str], threads: int, policy: str | None = None):
        self.dir = tempfile.mkdtemp(prefix="appliance-bench-")
        if policy is not None:
            os.makedirs(f"{self.dir}/policy")
            Path(f"{self.dir}/policy/policy.toml").write_text(policy)
        run = lambda *a: subprocess.run([bin_, *a, "--data-dir", self.dir], check=True,
                                        capture_output=True, text=True).stdout.strip()
        run("tenant", "create", "bench")
        self.key = run("key", "create", "--tenant", "bench")
        args = [bin_, "serve", "--data-dir", self.dir, "--api-listen", "127.0.0.1:0",
                "--worker-threads", str(threads)]
        for m in models:
            args += ["--model", m]
        env = dict(os.environ, APPLIANCE_LOG=os.environ.get("APPLIANCE_LOG", "info"))
        # The access log goes to a file, as it would to the journal: one line per request.
        self.log = open(f"{self.dir}/serve.log", "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)
        for line in self.proc.stdout:
            m = re.match(r"appliance: API\s+https://[^:]+:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                break
        else:
            raise SystemExit("serve did not start")
        self.url = f"https://127.0.0.1:{self.port}"
        self.ctx = ssl.create_default_context(cafile=f"{self.dir}/tls/cert.pem")

    def wait_ready(self):
        with httpx.Client(verify=self.ctx, trust_env=False) as c:
            for _ in range(600):
                try:
                    if c.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise SystemExit("daemon not ready")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        # Its data directory: an audit log of every benchmark request (hundreds of MB).
        shutil.rmtree(self.dir, ignore_errors=True)


async def one_stream(client, url, headers, body, times):
    async with client.stream("POST", url, headers=headers, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                # One chunk per token (empty partial-UTF-8 pieces aside, rare in English).
                if chunk["choices"] and chunk["choices"][0]["finish_reason"] is None:
                    times.append(time.perf_counter())


def aggregate(times: list[list[float]]) -> float:
    t0 = max(t[0] for t in times)
    t1 = max(t[-1] for t in times)
    after = sum(sum(1 for x in t if x > t0) for t in times)
    return after / (t1 - t0)


async def api_streams(url, ctx, key, ids, n, gen, model="bench", prompt=None):
    body = {"model": model, "prompt": prompt if prompt is not None else ids,
            "max_tokens": gen, "temperature": 0, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n + 2)
    async with httpx.AsyncClient(verify=ctx, trust_env=False, timeout=600, limits=limits) as c:
        times = [[] for _ in range(n)]
        await asyncio.gather(*(one_stream(c, f"{url}/v1/completions", headers, body, times[i])
                               for i in range(n)))
    return aggregate(times)


def wrk(url, key, seconds, conns=64, script=None):
    """wrk over keep-alive connections (2 threads, or 1 for one connection); `script`: a
    Lua file that sets the method, body and headers (it then carries the key)."""
    args = ["wrk", f"-t{min(2, conns)}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    args += ["-s", script] if script else ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": pct(50), "p99_ms": pct(99),
            "non_2xx": int(errors.group(1)) if errors else 0}


def h2load(url, seconds, conns, body_file, headers):
    """h2load (HTTP/1.1, keep-alive, one client thread) posting `body_file`; requests/s
    and latency percentiles from its per-request log (each request timed on a monotonic
    clock from its send to its last byte). `occupancy` is the summed latencies over
    connections x seconds: about 1 for a closed-loop client whose timings add up."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.tsv"
        args = ["h2load", "--h1", "-t1", f"-c{conns}", "-D", str(seconds),
                f"--log-file={log}", "-d", str(body_file)]
        for h in headers:
            args += ["-H", h]
        subprocess.run(args + [url], capture_output=True, text=True, check=True)
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    lat = sorted(int(r[2]) / 1000 for r in rows)
    if not lat:
        raise SystemExit(f"h2load: no request completed against {url}")
    pct = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))]
    return {"rps": round(len(lat) / seconds, 1), "p50_ms": round(pct(0.5), 3),
            "p99_ms": round(pct(0.99), 3), "p999_ms": round(pct(0.999), 3),
            "max_ms": round(lat[-1], 1),
            "occupancy": round(sum(lat) / 1000 / seconds / conns, 3),
            "non_2xx": sum(1 for r in rows if not r[1].startswith("2"))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--wrk-seconds", type=int, default=10)
    ap.add_argument("--peer-python", help="a Python with llama-cpp-python[server]")
    ap.add_argument("--json", help="write the results here too")
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]

    ids = json.loads(subprocess.run([a.bin, "tokenize", "--model", a.model, TEXT],
                                    check=True, capture_output=True, text=True).stdout)
    while len(ids) < a.prompt_tokens:
        ids += ids
    ids = ids[: a.prompt_tokens]
    ids_file = Path(tempfile.mkdtemp(prefix="appliance-bench-")) / "prompt.json"
    ids_file.write_text(json.dumps(ids))

    d = Daemon(a.bin, [f"bench={a.model}"], a.threads)
    d.wait_ready()
    report = {"threads": a.threads, "prompt_tokens": len(ids), "gen_tokens": a.gen_tokens}
    engine = {n: [] for n in streams}
    api = {n: [] for n in streams}
    for r in range(a.repeats):
        out = subprocess.run([a.bin, "bench-run", "--model", a.model, "--prompt-ids", str(ids_file),
                              "--threads", str(a.threads), "--mode", "streams",
                              "--gen-tokens", str(a.gen_tokens), "--streams", a.streams,
                              "--repeats", "1"], check=True, capture_output=True, text=True).stdout
        for p in json.loads(out.strip().splitlines()[-1])["streams"]:
            engine[p["streams"]].append(p["aggregate_tps"])
        for n in streams:
            api[n].append(asyncio.run(api_streams(d.url, d.ctx, d.key, ids, n, a.gen_tokens)))
        print(f"repeat {r + 1}: engine {[round(engine[n][-1], 1) for n in streams]} "
              f"api {[round(api[n][-1], 1) for n in streams]} tok/s", file=sys.stderr)
    # Each API run is paired with the engine run just before it; the ratio reported is
    # the median of those pairs (less sensitive to a noisy neighbour than two medians).
    report["streams"] = [
        {"streams": n, "engine_tps": statistics.median(engine[n]),
         "api_tps": statistics.median(api[n]),
         "pair_ratios": [x / y for x, y in zip(api[n], engine[n])],
         "ratio": statistics.median(x / y for x, y in zip(api[n], engine[n]))}
        for n in streams]
    report["models_endpoint"] = wrk(f"{d.url}/v1/models", d.key, a.wrk_seconds)
    report["daemon_rss_kib_after_load"] = rss_kib(d.proc.pid)
    d.stop()

    idle = Daemon(a.bin, [], a.threads)
    time.sleep(2)  # no models: never "ready"; let it settle
    report["daemon_rss_kib_idle_no_workers"] = rss_kib(idle.proc.pid)
    idle.stop()

    if a.peer_python:
        port = 18443
        cert, keyf = f"{d.dir}/tls/cert.pem", f"{d.dir}/tls/key.pem"
        peer_key = "peer-bench-key"
        peer = subprocess.Popen([a.peer_python, "-m", "llama_cpp.server", "--model", a.model,
                                 "--host", "127.0.0.1", "--port", str(port),
                                 "--n_threads", str(a.threads), "--n_ctx", "2048",
                                 "--ssl_certfile", cert, "--ssl_keyfile", keyf,
                                 "--api_key", peer_key],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=cert)
        try:
            with httpx.Client(verify=ctx, trust_env=False) as c:
                for _ in range(600):
                    try:
                        if c.get(f"{url}/v1/models",
                                 headers={"Authorization": f"Bearer {peer_key}"}).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.2)
            report["peer_models_endpoint"] = wrk(f"{url}/v1/models", peer_key, a.wrk_seconds)
            peer_tps = [asyncio.run(api_streams(url, ctx, peer_key, None, 1, a.gen_tokens,
                                                model=a.model, prompt=TEXT))
                        for _ in range(a.repeats)]
            report["peer_single_stream_api_tps"] = statistics.median(peer_tps)
        finally:
            peer.terminate()
            peer.wait(timeout=30)

    print(json.dumps(report, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
