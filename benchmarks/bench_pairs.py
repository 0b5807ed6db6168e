"""Cost of attention dropout and of a relative position bias inside the kernels (issue 22).

Dense causal attention, routing attention (64 random clusters of 64 queries and keys),
improved clustered attention (100 clusters of random labels, top-32) and causal Combiner
(fixed plan, block 64), fp32, d = e = 64, H = 4, n = 4096, 1 thread: forward and backward,
plain vs dropout_p = 0.1 vs an ALiBi + T5 rel_bias vs both, interleaved, medians.  Target: each term ≤ 15 % of the plain kernel's time; when
off, nothing (the plain call is the same code path with no pair terms).
Run: python benchmarks/bench_pairs.py [--repeats R]  (writes RESULTS_pairs.md)
"""
import argparse
import os
import pathlib

import numpy as np

import routing_attention as ra
from routing_attention.pairs import alibi_slopes, relative_bias

from common import median_times

N, D, H, C = 4096, 64, 4, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    ra.set_num_threads(1)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((H, N, D), dtype=np.float32) for _ in range(3))
    dout = rng.standard_normal((H, N, D), dtype=np.float32)
    bias = relative_bias(N, N, alibi=alibi_slopes(H),
                         table=rng.standard_normal((H, 32))).astype(np.float32)
    idx = np.stack([rng.permutation(N).reshape(C, N // C) for _ in range(H)])
    terms = {"plain": {}, "dropout": dict(dropout_p=0.1, dropout_seed=1),
             "bias": dict(rel_bias=bias), "both": dict(dropout_p=0.1, dropout_seed=1, rel_bias=bias)}
    labels = rng.integers(0, 100, (H, N))
    calls = {
        "dense forward": lambda kw: ra.attention(q, k, v, causal=True, **kw),
        "dense backward": lambda kw: ra.attention_backward(dout, q, k, v, causal=True, **kw),
        "routing forward": lambda kw: ra.routing_attention(q, k, v, idx, idx, causal=True, **kw),
        "routing backward": lambda kw: ra.routing_attention_backward(dout, q, k, v, idx, idx,
                                                                     causal=True, **kw),
        "improved clustered forward": lambda kw: ra.improved_clustered_attention(
            q, k, v, labels, 100, 32, **kw),
        "improved clustered backward": lambda kw: ra.improved_clustered_attention_backward(
            dout, q, k, v, labels, 100, 32, **kw),
        "combiner fixed forward": lambda kw: ra.combiner_attention(q, k, v, causal=True, **kw),
        "combiner fixed backward": lambda kw: ra.combiner_attention_backward(
            dout, q, k, v, causal=True, **kw),
    }
    rows = []
    for what, call in calls.items():
        cases = [(t, (lambda kw=kw: kw), call) for t, kw in terms.items()]
        med = median_times(cases, args.repeats)
        rows.append((what, med))
        print(what, {t: f"{s * 1e3:.1f} ms" for t, s in med.items()}, flush=True)
    lines = ["# Attention dropout and relative position bias: their cost in the kernels", "",
             f"fp32, n = {N}, d = e = {D}, H = {H}, 1 thread; dense, routing ({C} random clusters "
             f"of {N // C} queries and keys per head) and Combiner (fixed, block 64) causal; "
             "improved clustered: 100 clusters of random labels, top-32; medians of "
             f"{args.repeats} interleaved rounds; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')} "
             "(no BLAS peer here).  Target (issue 22): each term costs ≤ 15 % of the plain "
             "kernel.", "",
             "| kernel | plain | dropout 0.1 | ALiBi + T5 bias | both | dropout cost | bias cost | target |",
             "|---|---|---|---|---|---|---|---|"]
    for what, med in rows:
        base = med["plain"]
        dc, bc = med["dropout"] / base - 1, med["bias"] / base - 1
        ok = "met" if dc <= 0.15 and bc <= 0.15 else "missed"
        lines.append(f"| {what} | {base * 1e3:.1f} ms | {med['dropout'] * 1e3:.1f} ms | "
                     f"{med['bias'] * 1e3:.1f} ms | {med['both'] * 1e3:.1f} ms | {dc:+.0%} | "
                     f"{bc:+.0%} | {ok} |")
    out = pathlib.Path(__file__).with_name("RESULTS_pairs.md")
    marker = "\n## With both terms off"           # the A/B section below is kept
    kept = out.read_text().partition(marker) if out.exists() else ("", "", "")
    out.write_text("\n".join(lines) + "\n" + (kept[1] + kept[2] if kept[1] else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
