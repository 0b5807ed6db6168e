"""Per-call overhead of small calls: each public function at n = 1 and n = 16 (d = 64,
float32, one thread), against the bare C gufunc it ends in (the arithmetic plus NumPy's
gufunc machinery) and torch's scaled_dot_product_attention on the same data.

    python benchmarks/bench_call_overhead.py [--output FILE]

Best of 7 repeats of 2000 calls each (the minimum: overhead, not noise, is measured).
The target (issue 23): a small call costs at most 5 us more than its arithmetic.
"""
import argparse
import math
import os
import timeit

import numpy as np

import routing_attention as ra
from routing_attention import _ext

try:
    import torch
except ImportError:           # the SDPA column is then left out
    torch = None


def per_call_us(fn, number=2000):
    return min(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def cases(n, d=64):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, d), dtype=np.float32) for _ in range(3))
    sc = np.float32(1 / math.sqrt(d))
    keys = np.broadcast_to(np.True_, (n,))
    c = max(1, int(round(math.sqrt(n))))
    q_idx, k_idx = ra.routing.local_members(n, n, max(1, n // c), False)
    labels = np.arange(n) % c
    cent = ra.spherical_kmeans(q, c)
    block = math.isqrt(n - 1) + 1
    yield ("attention", lambda: ra.attention(q, k, v),
           lambda: _ext._attention_forward(q, k, v, keys, False, sc, False))
    yield ("combiner_attention (fixed)", lambda: ra.combiner_attention(q, k, v),
           lambda: _ext._combiner_forward(q, k, v, 0, block, False, sc))
    yield ("routing_attention", lambda: ra.routing_attention(q, k, v, q_idx, k_idx),
           lambda: _ext._routing_forward(q, k, v, q_idx, k_idx, sc, False, False, False))
    yield ("local_attention", lambda: ra.local_attention(q, k, v, max(1, n // c)), None)
    yield ("clustered_attention", lambda: ra.clustered_attention(q, k, v, labels, c), None)
    yield ("assign_clusters", lambda: ra.assign_clusters(q, cent),
           lambda: _ext._assign_clusters(q, cent))
    if torch is not None:
        tq = torch.from_numpy(q)[None]
        yield ("torch SDPA (peer)",
               lambda: torch.nn.functional.scaled_dot_product_attention(tq, tq, tq), None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", help="write the markdown table here")
    args = ap.parse_args()
    ra.set_num_threads(1)
    if torch is not None:
        torch.set_num_threads(1)
    lines = ["| function | n | call (us) | bare gufunc (us) | overhead (us) | within 5 us |",
             "|---|---|---|---|---|---|"]
    for n in (1, 16):
        for name, call, bare in cases(n):
            t = per_call_us(call)
            b = per_call_us(bare) if bare is not None else None
            over = "" if b is None else f"{t - b:.1f}"
            ok = "" if b is None else ("yes" if t - b <= 5 else "no")
            lines.append(f"| {name} | {n} | {t:.1f} | {'' if b is None else f'{b:.1f}'} | "
                         f"{over} | {ok} |")
            print(lines[-1], flush=True)
    header = (f"Load average at start {os.getloadavg()[0]:.2f}; OPENBLAS_CORETYPE="
              f"{os.environ.get('OPENBLAS_CORETYPE', 'unset')}; torch "
              f"{torch.__version__ if torch else 'not installed'}.\n\n")
    if args.output:
        with open(args.output, "w") as f:
            f.write("# Per-call overhead of small calls\n\nCommand: `python benchmarks/"
                    "bench_call_overhead.py --output benchmarks/RESULTS_call_overhead.md`\n\n"
                    + header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
