"""A/B timing of two builds of the extension: every method's forward and backward at
n = 4096 and 16384 (fp32, d = e = 64, batch 2), for a refactor that must not change speed.

    python benchmarks/bench_engine_ab.py --other /path/to/other/checkout [--pairs 3]

Runs this checkout's build (A) and the other checkout's (B) in alternating subprocesses
(A B A B ...), each timing every case as the median of `--repeats` calls, and prints per
case the median over pairs of the ratio A/B (< 1: A faster).  Both run with the machine's
environment as is (OPENBLAS_CORETYPE included; no BLAS is involved) and all cores.
"""
import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent.parent


def cases():
    """(name, setup) pairs; setup() returns (forward, backward) callables."""
    import numpy as np
    import routing_attention as ra

    rng = np.random.default_rng(3)

    def data(n):
        return [rng.standard_normal((2, n, 64)).astype(np.float32) for _ in range(4)]

    def make(fwd, bwd):
        def setup(n):
            q, k, v, dout = data(n)
            state = {}

            def forward():
                state["saved"] = fwd(q, k, v)

            def backward():
                bwd(dout, q, k, v, state["saved"])
            return forward, backward
        return setup

    def routing(n, causal):
        labels = rng.integers(0, n // 128, (2, n))
        idx = ra.members_from_labels(labels, n // 128, max_size=160)
        return make(lambda q, k, v: ra.routing_attention(q, k, v, idx, idx, causal=causal,
                                                         return_saved=True)[-1],
                    lambda g, q, k, v, s: ra.routing_attention_backward(g, q, k, v, idx, idx,
                                                                        **s))

    def clustered(n, topk):
        labels = rng.integers(0, 100, (2, n))
        if topk:
            return make(lambda q, k, v: ra.improved_clustered_attention(
                            q, k, v, labels, 100, topk, return_saved=True)[-1],
                        lambda g, q, k, v, s: ra.improved_clustered_attention_backward(
                            g, q, k, v, labels, 100, topk, **s))
        return make(lambda q, k, v: ra.clustered_attention(q, k, v, labels, 100,
                                                           return_saved=True)[-1],
                    lambda g, q, k, v, s: ra.clustered_attention_backward(g, q, k, v, labels,
                                                                          100, **s))

    def dense(causal):
        return make(lambda q, k, v: ra.attention(q, k, v, causal=causal, return_saved=True)[-1],
                    lambda g, q, k, v, s: ra.attention_backward(g, q, k, v, **s))

    def combiner(plan, causal):
        return make(lambda q, k, v: ra.combiner_attention(q, k, v, plan=plan, causal=causal,
                                                          return_saved=True)[-1],
                    lambda g, q, k, v, s: ra.combiner_attention_backward(g, q, k, v, **s))

    def local():
        return make(lambda q, k, v: ra.local_attention(q, k, v, 128, causal=True,
                                                       return_saved=True)[-1],
                    lambda g, q, k, v, s: ra.local_attention_backward(g, q, k, v, **s))

    out = []
    for n in (4096, 16384):
        if n == 4096:
            out.append((f"dense n={n}", n, dense(False)))
        out.append((f"dense causal n={n}", n, dense(True)))
        out.append((f"local causal w=128 n={n}", n, local()))
        out.append((f"routing n={n}", n, routing(n, False)))
        out.append((f"routing causal n={n}", n, routing(n, True)))
        out.append((f"clustered C=100 n={n}", n, clustered(n, 0)))
        out.append((f"improved top-32 n={n}", n, clustered(n, 32)))
        for plan in ("fixed", "axial", "mixture"):
            out.append((f"combiner {plan} causal n={n}", n, combiner(plan, True)))
    return out


def run_once(repeats):
    """Time every case in this process -> {case: seconds} (median of repeats)."""
    result = {}
    for name, n, setup in cases():
        reps = repeats if n <= 4096 or "dense" not in name else 1
        forward, backward = setup(n)
        forward()
        backward()                              # warm-up: allocations, first touch
        for what, fn in (("forward", forward), ("backward", backward)):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            result[f"{name} {what}"] = statistics.median(times)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", help="checkout holding build B (its own built extension)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_once(args.repeats)))
        return
    if not args.other:
        ap.error("--other is required")
    runs = {"A": [], "B": []}
    for _ in range(args.pairs):
        for label, root in (("A", HERE), ("B", pathlib.Path(args.other).resolve())):
            env = dict(os.environ, PYTHONPATH=str(root))
            proc = subprocess.run([sys.executable, __file__, "--child", "--repeats",
                                   str(args.repeats)], env=env, cwd=root, check=True,
                                  capture_output=True, text=True)
            runs[label].append(json.loads(proc.stdout))
    print(f"{'case':44s} {'A ms':>9s} {'B ms':>9s} {'A/B':>6s}  (median over {args.pairs} pairs)")
    for key in runs["A"][0]:
        ratio = statistics.median(a[key] / b[key] for a, b in zip(runs["A"], runs["B"]))
        a_ms = 1e3 * statistics.median(r[key] for r in runs["A"])
        b_ms = 1e3 * statistics.median(r[key] for r in runs["B"])
        print(f"{key:44s} {a_ms:9.2f} {b_ms:9.2f} {ratio:6.3f}")


if __name__ == "__main__":
    main()
