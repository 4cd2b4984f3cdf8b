#!/usr/bin/env python3
"""The gateway's cost as a proxy to an upstream, side by side with LiteLLM's proxy.

One loopback upstream for both: nginx answering `POST /v1/chat/completions` with a fixed
chat.completion (plain HTTP, keep-alive). In front of it:

- the appliance (`appliance serve`, no local model): HTTPS, an API key, the hospital-style
  policy (every built-in detector classifies the request), the alias `bench` routed by a
  rule to an `on_prem` destination at the nginx URL, and the audit log on (an intent
  before the request leaves, a record before the answer: two durable appends, group
  committed);
- LiteLLM's proxy (`litellm --config`, PyPI `litellm[proxy]`) with the model `bench`
  pointing at the same URL (`openai/` provider), a master key, 2 workers,
  `LITELLM_LOCAL_MODEL_COST_MAP=True` so it reaches for no network;
- nginx alone, for the baseline of the added latency.

h2load (Debian's nghttp2-client, `--h1`, one client thread) drives each with the same
chat request (a 3 KB office text, no sensitive data, so it is allowed upstream) at
concurrency 1, 8, 32 and 64 (keep-alive connections) and reports requests/s and
p50/p99/p99.9 from its per-request log; the added latency is each proxy's percentile
minus nginx's at the same concurrency. Not wrk: on the VMs measured here wrk 4.1's
latency histogram at low concurrency sometimes sums to 1.3-4x the time its connections
had (a closed-loop client cannot wait longer than it ran), with p99 inflated 10-100x;
h2load's per-request timings add up (`occupancy` about 1, reported) and agree with
packet captures and the server's own access log. Targets, proxies and nginx alternate per concurrency level so they see
the same machine noise; with `--rounds N` each level runs N interleaved rounds and each
target's median round counts (the ratio of each round is kept too).

Usage: bench/proxy_bench.py --bin target/release/appliance --litellm VENV/bin/litellm [--rounds 3]
       [--compare OTHER_BUILD/appliance]   (a second build, interleaved the same way)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from api_bench import TEXT, Daemon, h2load  # noqa: E402

ANSWER = {
    "id": "chatcmpl-fixed", "object": "chat.completion", "created": 1, "model": "fixed",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "A fixed answer from the upstream."}}],
    "usage": {"prompt_tokens": 600, "completion_tokens": 8, "total_tokens": 608},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, seconds: float = 60):
    t0 = time.time()
    while time.time() - t0 < seconds:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listens on {port}")


def start_nginx(work: Path, port: int) -> subprocess.Popen:
    body = json.dumps(ANSWER).replace("'", "\\'")
    conf = work / "nginx.conf"
    conf.write_text(f"""
daemon off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {work}/nginx-body;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
""")
    p = subprocess.Popen(["nginx", "-p", str(work), "-c", str(conf)])
    wait_port(port)
    return p


def policy(port: int) -> str:
    return f"""
name = "proxy benchmark"

[destinations.onprem]
kind = "on_prem"
url = "http://127.0.0.1:{port}/v1"
model = "fixed"
timeout_ms = 10000

[[rules]]
name = "patient data"
classes = ["PHI"]
action = "deny"

[[rules]]
name = "the rest on-prem"
action = "allow"
destinations = ["onprem"]

[aliases]
bench = "onprem"
"""


def start_litellm(litellm: str, work: Path, up: int, port: int) -> subprocess.Popen:
    cfg = work / "litellm.yaml"
    cfg.write_text(f"""
model_list:
  - model_name: bench
    litellm_params:
      model: openai/fixed
      api_base: http://127.0.0.1:{up}/v1
      api_key: none
general_settings:
  master_key: sk-bench-master
litellm_settings:
  telemetry: false
""")
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False",
               NO_PROXY="*")
    log = open(work / "litellm.log", "w")
    p = subprocess.Popen([litellm, "--config", str(cfg), "--host", "127.0.0.1",
                          "--port", str(port), "--num_workers", "2"],
                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_port(port, 180)
    return p


def request_body(work: Path) -> Path:
    body = json.dumps({"model": "bench", "max_tokens": 64,
                       "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": (TEXT + " ") * 5}]})
    path = work / "request.json"
    path.write_text(body)
    return path


def check_route(d, name: str):
    """One request through daemon `d` (built from `name`) first: the route works and the policy sends it upstream."""
    check = subprocess.run(["curl", "-sS", "--cacert", f"{d.dir}/tls/cert.pem", "-H",
                            f"Authorization: Bearer {d.key}", "-H", "Content-Type: application/json",
                            "-d", json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}),
                            f"{d.url}/v1/chat/completions"], capture_output=True, text=True).stdout
    assert "A fixed answer" in check, f"{name}: {check}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--litellm", help="the litellm command of a venv with litellm[proxy]")
    ap.add_argument("--conns", default="1,8,32,64")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs of each target at each level, interleaved; the median counts")
    ap.add_argument("--json", help="write the results here too")
    ap.add_argument("--compare", metavar="BIN",
                    help="another appliance binary, run the same way beside --bin (target `compare`)")
    a = ap.parse_args()
    missing = [tool for tool in ("nginx", "h2load", "curl") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"proxy_bench.py: {', '.join(missing)} not found on PATH "
                 "(Debian: apt-get install nginx-light nghttp2-client curl)")
    work = Path(tempfile.mkdtemp(prefix="appliance-proxy-bench-"))
    (work / "nginx-body").mkdir()
    up = free_port()
    nginx = start_nginx(work, up)
    d = Daemon(a.bin, [], 1, policy=policy(up))
    time.sleep(1)
    gw_url = f"{d.url}/v1/chat/completions"
    check_route(d, a.bin)
    body = request_body(work)
    json_type = "Content-Type: application/json"
    targets = {"nginx": (f"http://127.0.0.1:{up}/v1/chat/completions", [json_type]),
               "appliance": (gw_url, [json_type, f"Authorization: Bearer {d.key}"])}
    other = None
    if a.compare:
        other = Daemon(a.compare, [], 1, policy=policy(up))
        time.sleep(1)
        check_route(other, a.compare)
        targets["compare"] = (f"{other.url}/v1/chat/completions",
                              [json_type, f"Authorization: Bearer {other.key}"])
    lite = None
    if a.litellm:
        lp = free_port()
        lite = start_litellm(a.litellm, work, up, lp)
        lurl = f"http://127.0.0.1:{lp}/v1/chat/completions"
        check = subprocess.run(["curl", "-sS", "-H", "Authorization: Bearer sk-bench-master",
                                "-H", "Content-Type: application/json", "-d",
                                json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}]}),
                                lurl], capture_output=True, text=True).stdout
        assert "A fixed answer" in check, check
        targets["litellm"] = (lurl, [json_type, "Authorization: Bearer sk-bench-master"])
    report = {"conns": {}}
    try:
        for c in [int(x) for x in a.conns.split(",")]:
            runs = {name: [] for name in targets}
            for _ in range(a.rounds):
                for name, (url, headers) in targets.items():
                    r = h2load(url, a.seconds, c, body, headers)
                    runs[name].append(r)
                    print(f"c={c} {name}: {r}", file=sys.stderr)
            # Each target's median round (by requests/s) stands for it.
            row = {name: dict(sorted(rs, key=lambda r: r["rps"])[len(rs) // 2]) for name, rs in runs.items()}
            for name, rs in runs.items():
                row[name]["rounds_rps"] = [r["rps"] for r in rs]
            if "litellm" in runs:
                row["ratio_rps_rounds"] = [x["rps"] / y["rps"] for x, y in zip(runs["appliance"], runs["litellm"])]
            for name in targets:
                if name != "nginx":
                    row[name]["added_p50_ms"] = row[name]["p50_ms"] - row["nginx"]["p50_ms"]
                    row[name]["added_p99_ms"] = row[name]["p99_ms"] - row["nginx"]["p99_ms"]
            if "litellm" in row:
                row["ratio_rps"] = row["appliance"]["rps"] / row["litellm"]["rps"]
            if "compare" in runs:
                row["vs_compare_rounds"] = [x["rps"] / y["rps"] for x, y in zip(runs["appliance"], runs["compare"])]
            report["conns"][c] = row
    finally:
        d.stop()
        if other:
            other.stop()
        if lite:
            os.killpg(lite.pid, signal.SIGTERM)
        nginx.send_signal(signal.SIGQUIT)
        nginx.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    out = json.dumps(report, indent=1)
    print(out)
    if a.json:
        Path(a.json).write_text(out)


if __name__ == "__main__":
    main()
