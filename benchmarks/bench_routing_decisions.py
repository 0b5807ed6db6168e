"""Routing decisions vs the attention they serve.

For n in {4096, 16384, 65536}, d = 64, c = sqrt(n) clusters, w = n / c members each:
  assign   = assign_clusters(x, centroids)          (argmax membership, GEMM + argmax)
  scores   = x @ centroidsᵀ  (NumPy/BLAS matmul, input of top_members)
  top-w    = top_members(scores, w)                 (balanced membership)
and, as a stand-in for the routing attention these decisions feed (the routing
attention kernel does not exist yet), dense routing_attention.attention on c
independent cluster-sized problems (c, w, d) — the same arithmetic a routing
attention forward performs.  Medians of repeats, float32, one process.

    python benchmarks/bench_routing_decisions.py [--threads T] [--repeats R]
"""
import argparse
import time

import numpy as np

import routing_attention as ra


def median_time(fn, repeats):
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
    print("NOTE: the routing attention kernel does not exist yet; 'attn' is dense "
          "routing_attention.attention on c cluster-sized problems (c, w, 64) as a stand-in.")
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
        q = g.standard_normal((c, w, d)).astype(np.float32)
        k = g.standard_normal((c, w, d)).astype(np.float32)
        v = g.standard_normal((c, w, d)).astype(np.float32)
        t_assign = median_time(lambda: ra.assign_clusters(x, mu), args.repeats)
        t_scores = median_time(lambda: x @ mu.T, args.repeats)
        t_top = median_time(lambda: ra.top_members(scores, w), args.repeats)
        t_attn = median_time(lambda: ra.attention(q, k, v), args.repeats)
        print(f"{n:>6} {c:>4} {w:>4} | {t_assign * 1e3:9.3f} {t_scores * 1e3:9.3f} "
              f"{t_top * 1e3:9.3f} {t_attn * 1e3:8.3f} | {t_assign / t_attn:11.2f} "
              f"{t_top / t_attn:10.2f} {(t_assign + t_scores + t_top) / t_attn:27.2f}")


if __name__ == "__main__":
    main()
