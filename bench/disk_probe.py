#!/usr/bin/env python3
"""What the data directory's disk gives the audit journal: 4 KiB `O_DIRECT | O_DSYNC`
overwrites (a journal frame's write, durable when it returns) by 1, 2, 3 and 4 threads
at once, each to blocks of its own in one preallocated file.

Per run: writes a second, p50/p99/p99.9 latency of one write, and the CPU a write
(`getrusage` of this process: almost all system time, the block layer and, in a VM, the
exits of the write and its cache flush). Runs alternate (1, 2, 3, 4 writers, then again)
so that they share the machine's noise. Whether a second write in flight raises the
rate (1.6-1.8x on one VM here, 1.0-1.3x on another) is what decides whether overlapping
group commits could pay; see docs/BENCHMARKS.md.

Usage: bench/disk_probe.py [--dir DIR] [--seconds 3] [--rounds 2] [--writers 1,2,3,4]
(DIR: a directory on the disk to measure, e.g. the appliance's data directory's file
system; it must allow O_DIRECT, which tmpfs does not.)
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import sys
import tempfile
import threading
import time

BLOCK = 4096
# Each writer overwrites its own run of blocks, as the journal's frames go forward.
BLOCKS_EACH = 64


def run(fd: int, writers: int, seconds: float) -> dict:
    counts = [0] * writers
    lat: list[list[float]] = [[] for _ in range(writers)]
    stop = time.monotonic() + seconds

    def writer(k: int):
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        buf.write(bytes([k + 1]) * BLOCK)
        i = 0
        while time.monotonic() < stop:
            at = (k * BLOCKS_EACH + i % BLOCKS_EACH) * BLOCK
            t = time.perf_counter()
            os.pwrite(fd, buf, at)
            lat[k].append(time.perf_counter() - t)
            counts[k] += 1
            i += 1

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    total = sum(counts)
    every = sorted(x for one in lat for x in one)
    pct = lambda q: every[min(len(every) - 1, int(len(every) * q))] * 1e6
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"writers": writers, "writes_per_s": round(total / seconds),
            "p50_us": round(pct(0.5)), "p99_us": round(pct(0.99)), "p999_us": round(pct(0.999)),
            "cpu_us_per_write": round(cpu / max(total, 1) * 1e6, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--writers", default="1,2,3,4")
    a = ap.parse_args()
    levels = [int(x) for x in a.writers.split(",")]
    path = os.path.join(a.dir, f"disk-probe-{os.getpid()}.bin")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT | os.O_DSYNC, 0o600)
    except OSError as e:
        sys.exit(f"disk_probe.py: {path}: {e} (O_DIRECT needs a disk file system, not tmpfs)")
    try:
        # Written once first: an overwrite changes no metadata, as in the journal.
        zeros = mmap.mmap(-1, BLOCK)
        for b in range(max(levels) * BLOCKS_EACH):
            os.pwrite(fd, zeros, b * BLOCK)
        for _ in range(a.rounds):
            for n in levels:
                r = run(fd, n, a.seconds)
                print(" ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main()
