"""Dask throughput: Combiner attention (fixed, causal) over a batch of long sequences on a
local cluster of 1 and of 2 worker processes (one thread each, kernels on one thread).

    python benchmarks/bench_dask.py [--batch 16] [--n 8192] [--output FILE]

Inputs are generated on the workers (dask.array.random), one problem group per chunk; the
result is reduced to one number per (batch, head) so little data returns.  Each cluster
size is timed `repeats` times after a warm-up; medians.
"""
import argparse
import os
import statistics
import time

import dask.array as da
import distributed
import numpy as np

import routing_attention as ra


def run(workers, B, H, n, d, repeats):
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.run(lambda: ra.set_num_threads(1))
        q, k, v = (da.random.default_rng(i).standard_normal((B, H, n, d), chunks=(1, H, n, d),
                                                            dtype=np.float32) for i in range(3))
        total = ra.combiner_attention(q, k, v, plan="fixed", causal=True).sum(axis=(-2, -1))
        client.compute(total).result()          # warm-up: workers import, pages faulted
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.compute(total).result()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output")
    args = ap.parse_args()
    B, H, n, d = args.batch, args.heads, args.n, 64
    load = os.getloadavg()[0]
    one = run(1, B, H, n, d, args.repeats)
    two = run(2, B, H, n, d, args.repeats)
    tokens = B * H * n
    lines = [f"Combiner fixed causal, float32, batch {B} x {H} heads x n={n}, d={d}: "
             f"1 worker {one:.2f} s ({tokens / one / 1e6:.2f} M head-tokens/s), 2 workers "
             f"{two:.2f} s ({tokens / two / 1e6:.2f} M head-tokens/s): x{one / two:.2f}. "
             f"Load average at start {load:.2f}; 2 cores; medians of {args.repeats}.",
             f"Command: `python benchmarks/bench_dask.py --batch {B} --heads {H} --n {n}`"]
    print("\n".join(lines))
    if args.output:
        with open(args.output, "a") as f:
            f.write("\n\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()
