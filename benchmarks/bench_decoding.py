"""Generation speed: a decoding cache's step against recomputing the full causal forward
for every new token, per method (float32, one sequence of H heads, d = 64).

    python benchmarks/bench_decoding.py [--n 1024] [--heads 8] [--threads 1] [--output FILE]

For each method, the time to produce the rows of tokens n-T .. n-1 (after a prefill of the
first n-T tokens) token by token: (a) cache.step, (b) the full causal forward over the
first t+1 tokens for each t (what a user without a cache must do).  Medians of interleaved
repeats; checks that both give the same rows.
"""
import argparse
import os
import platform
import statistics
import subprocess
import time

import numpy as np

import routing_attention as ra
from routing_attention import decoding


def methods(n, heads):
    block = int(np.ceil(np.sqrt(n)))
    layer = ra.RoutingAttention(n_clusters=int(round(np.sqrt(n))), membership="argmax",
                                causal=True, window=64, local_heads=heads // 2)
    return {
        "dense": (decoding.DenseCache, lambda q, k, v: ra.attention(q, k, v, causal=True)),
        "local (window 64)": (lambda: decoding.LocalCache(64),
                              lambda q, k, v: ra.local_attention(q, k, v, 64, causal=True)),
        "routing (argmax, half local)": (lambda: decoding.RoutingCache(layer),
                                         lambda q, k, v: layer(q, k, v)),
        f"combiner-fixed (block {block})": (
            lambda: decoding.CombinerCache("fixed", block=block),
            lambda q, k, v: ra.combiner_attention(q, k, v, plan="fixed",
                                                  block=min(block, q.shape[-2]), causal=True)),
        "combiner-logsparse": (lambda: decoding.CombinerCache("logsparse"),
                               lambda q, k, v: ra.combiner_attention(q, k, v, plan="logsparse",
                                                                     causal=True)),
    }, layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="sequence length")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16, help="tokens generated and timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", help="write the markdown table here")
    args = ap.parse_args()
    ra.set_num_threads(args.threads)
    n, H, d, T = args.n, args.heads, 64, args.tokens
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((H, n, d), dtype=np.float32) for _ in range(3))
    table, layer = methods(n, H)
    layer(q, k, v)
    layer.training = False
    rows = []
    load = os.getloadavg()[0]
    for name, (make, full) in table.items():
        step_times, full_times = [], []
        for _ in range(args.repeats):
            cache = make()
            cache.prefill(q[:, :n - T], k[:, :n - T], v[:, :n - T])
            t0 = time.perf_counter()
            got = [cache.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]) for t in range(n - T, n)]
            step_times.append((time.perf_counter() - t0) / T)
            t0 = time.perf_counter()
            want = [full(q[:, :t + 1], k[:, :t + 1], v[:, :t + 1])[:, t:t + 1]
                    for t in range(n - T, n)]
            full_times.append((time.perf_counter() - t0) / T)
        err = max(float(np.abs(a - b).max()) for a, b in zip(got, want))
        s, f = statistics.median(step_times), statistics.median(full_times)
        rows.append((name, s * 1e3, f * 1e3, f / s, err))
        print(f"{name:34s} step {s * 1e3:8.3f} ms  full forward {f * 1e3:8.3f} ms  "
              f"x{f / s:6.1f}  max |diff| {err:.1e}", flush=True)
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"],
                         capture_output=True, text=True).stdout.split(":")[-1].strip()
    lines = [f"Decoding, float32, H={H} heads, d={d}, tokens {n - T}..{n - 1} after a prefill, "
             f"{args.threads} thread(s), medians of {args.repeats}; machine: {cpu}, "
             f"{platform.python_version()}, load average at start {load:.2f}.",
             f"Command: `python benchmarks/bench_decoding.py --n {n} --heads {H} "
             f"--tokens {T} --threads {args.threads}`", "",
             "| method | cache step (ms/token) | full causal forward per token (ms) | speed-up | "
             "max abs diff |", "|---|---|---|---|---|"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.1f}x | {r[4]:.1e} |" for r in rows]
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
