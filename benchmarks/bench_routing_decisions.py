"""Routing decisions vs the routing attention they serve.

For n in {4096, 16384, 65536}, d = 64, c = sqrt(n) clusters, w = n / c members each:
  assign   = assign_clusters(x, centroids)          (argmax membership, GEMM + argmax)
  scores   = x @ centroidsᵀ  (NumPy/BLAS matmul, input of top_members)
  top-w    = top_members(scores, w)                 (balanced membership)
  attn     = routing_attention(q, k, v, idx, idx)   (the forward these decisions feed:
             c clusters of w queries × w keys, q = k = v-shaped (n, 64), idx = top-w output)
Every case runs once per round, rounds interleaved (machine noise hits all alike);
medians of `repeats` rounds, float32, one process.  Ratios are within one run.

    python benchmarks/bench_routing_decisions.py [--threads T] [--repeats R] [--sizes N ...]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_times  # noqa: E402

import routing_attention as ra  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="0 = OpenMP default")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--sizes", type=int, nargs="*", default=[4096, 16384, 65536])
    args = ap.parse_args()
    ra.set_num_threads(args.threads)
    info = ra.build_info()
    print(f"routing_attention {ra.__version__}  threads={ra.get_num_threads()}  "
          f"simd={info['simd']}  float32, d=64, c=sqrt(n), w=n/c, median of {args.repeats}")
    print("attn = routing_attention(q, k, v, idx, idx), idx = top_members(x @ centroidsᵀ, w)")
    hdr = (f"{'n':>6} {'c':>4} {'w':>4} | {'assign ms':>9} {'scores ms':>9} {'top-w ms':>9} "
           f"{'attn ms':>8} | {'assign/attn':>11} {'top-w/attn':>10} {'(assign+scores+top-w)/attn':>27}")
    print(hdr)
    print("-" * len(hdr))
    g = np.random.default_rng(0)
    d = 64
    for n in args.sizes:
        c = int(round(np.sqrt(n)))
        w = n // c
        x = g.standard_normal((n, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        mu = ra.spherical_kmeans(x[: min(n, 4096)], c, iters=2, seed=0)
        scores = x @ mu.T
        idx = ra.top_members(scores, w)
        q = g.standard_normal((n, d)).astype(np.float32)
        k = g.standard_normal((n, d)).astype(np.float32)
        v = g.standard_normal((n, d)).astype(np.float32)
        ra.routing_attention(q, k, v, idx, idx)                  # warm-up
        ra.top_members(scores, w)
        none = lambda: None                                      # noqa: E731
        t = median_times([
            ("assign", none, lambda _: ra.assign_clusters(x, mu)),
            ("scores", none, lambda _: x @ mu.T),
            ("top", none, lambda _: ra.top_members(scores, w)),
            ("attn", none, lambda _: ra.routing_attention(q, k, v, idx, idx)),
        ], args.repeats)
        ta, ts, tt, tr = t["assign"], t["scores"], t["top"], t["attn"]
        print(f"{n:>6} {c:>4} {w:>4} | {ta * 1e3:9.3f} {ts * 1e3:9.3f} "
              f"{tt * 1e3:9.3f} {tr * 1e3:8.3f} | {ta / tr:11.2f} "
              f"{tt / tr:10.2f} {(ta + ts + tt) / tr:27.2f}", flush=True)


if __name__ == "__main__":
    main()
