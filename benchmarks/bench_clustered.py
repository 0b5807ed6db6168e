"""Clustered / improved clustered attention: time vs n, against dense baselines.

    PYTHONPATH=. python benchmarks/bench_clustered.py [--sizes 1024 4096 ...] [--repeats 5]

Shapes follow the paper's setting: H=8 heads, d=e=64, C=100 clusters, topk=32, fp32,
batch 1.  Clustering (lsh_hash with 32 bits → hamming_kmeans, 10 iterations) is timed
separately and included in the "total" columns.  Where pytorch-fast-transformers runs
(n <= 4096), the totals and its times are measured head to head instead: whole pipelines,
clustering included, interleaved round by round (medians).  Baselines: our dense attention (the
same tile engine), torch's scaled_dot_product_attention when torch is importable, and
idiap's pytorch-fast-transformers (clustered / improved clustered) when installed.
The backward columns use the forward's saved statistics (``return_saved=True``, as the
ClusteredAttention layer does); their ratio to the forward is printed at the end.
Dense cases that would take minutes are skipped and reported as such.  Medians of
`repeats` runs; the growth exponent is a least-squares fit of log time on log n.
"""
import argparse
import statistics
import time

import numpy as np

import routing_attention as ra
from common import median_times

H, D, C, TOPK, BITS, ITERS = 8, 64, 100, 32, 32, 10
DENSE_MAX_N = 16384          # dense beyond this takes minutes per call on 2 cores


def median_time(fn, repeats):
    fn()                                         # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fit_exponent(ns, ts):
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def try_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None


def try_fast_transformers():
    try:
        from fast_transformers.attention import ClusteredAttention, ImprovedClusteredAttention
        from fast_transformers.masking import FullMask, LengthMask
        return ClusteredAttention, ImprovedClusteredAttention, FullMask, LengthMask
    except Exception:        # not installed, or its extensions failed to build/import
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch = try_torch()
    ft = try_fast_transformers()
    info = ra.build_info()
    print(f"routing_attention {ra.__version__}: simd={info['simd']} threads={info['num_threads']} "
          f"openmp={info['openmp']}; torch={'%s' % torch.__version__ if torch else 'not installed'}; "
          f"fast_transformers={'yes' if ft else 'not available'}")
    print(f"H={H} d={D} C={C} topk={TOPK} bits={BITS} kmeans_iters={ITERS} fp32 batch=1, "
          f"median of {args.repeats}; times in ms")
    cols = ["n", "cluster", "clus fwd", "clus bwd", "impr fwd", "impr bwd", "total clus",
            "total impr", "ra dense fwd", "torch sdpa fwd", "ft clus fwd", "ft impr fwd"]
    print(" | ".join(f"{c:>13}" for c in cols))
    rows = []
    rng = np.random.default_rng(0)
    planes = rng.standard_normal((BITS, D + 1)).astype(np.float32)
    for n in args.sizes:
        q, k, v = (rng.standard_normal((H, n, D), dtype=np.float32) for _ in range(3))
        dout = rng.standard_normal((H, n, D), dtype=np.float32)
        cluster = lambda: ra.hamming_kmeans(ra.lsh_hash(q, planes), C, iters=ITERS)
        labels = cluster()
        r = {"n": n, "cluster": median_time(cluster, args.repeats)}
        r["clus fwd"] = median_time(lambda: ra.clustered_attention(q, k, v, labels, C), args.repeats)
        _, saved = ra.clustered_attention(q, k, v, labels, C, return_saved=True)
        r["clus bwd"] = median_time(
            lambda: ra.clustered_attention_backward(dout, q, k, v, labels, C, **saved),
            args.repeats)
        r["impr fwd"] = median_time(
            lambda: ra.improved_clustered_attention(q, k, v, labels, C, TOPK), args.repeats)
        _, saved_i = ra.improved_clustered_attention(q, k, v, labels, C, TOPK, return_saved=True)
        r["impr bwd"] = median_time(
            lambda: ra.improved_clustered_attention_backward(dout, q, k, v, labels, C, TOPK,
                                                             **saved_i), args.repeats)
        r["total clus"] = r["cluster"] + r["clus fwd"]
        r["total impr"] = r["cluster"] + r["impr fwd"]
        dense_reps = max(1, args.repeats if n <= 4096 else 1)
        r["ra dense fwd"] = (median_time(lambda: ra.attention(q, k, v), dense_reps)
                             if n <= DENSE_MAX_N else None)
        if torch is not None and n <= DENSE_MAX_N:
            tq, tk, tv = (torch.from_numpy(x)[None] for x in (q, k, v))
            with torch.no_grad():
                r["torch sdpa fwd"] = median_time(
                    lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), dense_reps)
        if ft is not None and n <= 4096:
            ClusteredAttention, ImprovedClusteredAttention, FullMask, LengthMask = ft
            # fast-transformers takes (N, L, H, E)
            tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2)))[None]
                          for x in (q, k, v))
            am = FullMask(n, device="cpu")
            lm = LengthMask(torch.tensor([n]), max_len=n)
            fc = ClusteredAttention(C, iterations=ITERS, bits=BITS, attention_dropout=0.0)
            fi = ImprovedClusteredAttention(C, iterations=ITERS, bits=BITS, topk=TOPK,
                                            attention_dropout=0.0)
            # the head-to-head: both pipelines (clustering included) interleaved round by
            # round, so machine noise hits both alike; these totals replace the sums above
            none = lambda: None
            with torch.no_grad():
                med = median_times([
                    ("total clus", none, lambda _: ra.clustered_attention(q, k, v, cluster(), C)),
                    ("total impr", none,
                     lambda _: ra.improved_clustered_attention(q, k, v, cluster(), C, TOPK)),
                    ("ft clus fwd", none, lambda _: fc(tq, tk, tv, am, lm, lm)),
                    ("ft impr fwd", none, lambda _: fi(tq, tk, tv, am, lm, lm))],
                    args.repeats)
            r.update(med)
        rows.append(r)
        print(" | ".join(f"{'-' if r.get(c) is None else (r[c] if c == 'n' else '%.1f' % (1e3 * r[c])):>13}"
                         for c in cols), flush=True)
    if len(rows) >= 2:
        ns = [r["n"] for r in rows]
        for c in ("cluster", "clus fwd", "clus bwd", "impr fwd", "impr bwd", "total clus", "total impr"):
            print(f"growth exponent {c:>10}: {fit_exponent(ns, [r[c] for r in rows]):.2f}  (n = {ns[0]}..{ns[-1]})")
        big = [r for r in rows if r["n"] >= 4096]
        if len(big) >= 2:
            ns = [r["n"] for r in big]
            for c in ("total clus", "total impr"):
                print(f"growth exponent {c}, n >= 4096: "
                      f"{fit_exponent(ns, [r[c] for r in big]):.2f}")
    for r in rows:
        print(f"n={r['n']}: backward / forward = {r['clus bwd'] / r['clus fwd']:.2f} (clustered), "
              f"{r['impr bwd'] / r['impr fwd']:.2f} (improved)")
    for r in rows:
        for base in ("ra dense fwd", "torch sdpa fwd", "ft clus fwd", "ft impr fwd"):
            if r.get(base) is not None:
                mine = r["total clus"] if "clus" in base else r["total impr"]
                print(f"n={r['n']}: {base} / ours (clustering included, "
                      f"{'plain' if 'clus' in base else 'improved'}) = {r[base] / mine:.1f}x")


if __name__ == "__main__":
    main()
