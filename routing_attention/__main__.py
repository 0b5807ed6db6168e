"""`python -m routing_attention`: a short demo of every method on built-in data.

The data are a long sequence (default n=8192, 4 heads, d=64, float32) whose queries and
keys are drawn around a few shared "topics" (centroids), the kind of structure
content-based sparse attention is built for.  Each method runs on it; the table shows its
forward time (median of a few calls), its speed-up over our exact dense attention, its
relative error against that dense output, the share of the dense attention mass its
queries reach directly, and its peak memory above the inputs.  Dense attention itself is
checked against the float64 NumPy reference on a slice.

    python -m routing_attention [--n 8192] [--heads 4] [--threads N]
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

import routing_attention as ra
from routing_attention import reference as ref

D = 64
TOPICS = 16


def builtin_data(n, heads, d=D, seed=0):
    """q, k around TOPICS shared centroids (so a query's large weights sit on the keys of
    its own topic, anywhere in the sequence), v Gaussian; float32 (1, heads, n, d)."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((heads, TOPICS, d))
    lq, lk = rng.integers(0, TOPICS, (2, heads, n))
    q = np.take_along_axis(mu, lq[..., None], axis=1) + 0.5 * rng.standard_normal((heads, n, d))
    k = np.take_along_axis(mu, lk[..., None], axis=1) + 0.5 * rng.standard_normal((heads, n, d))
    v = rng.standard_normal((heads, n, d))
    return tuple(x[None].astype(np.float32) for x in (q, k, v))


class _PeakMemory:
    """Peak memory of a block: the larger of the rise of the resident high-water mark
    (Linux: VmHWM, reset through /proc/self/clear_refs) and the peak of the NumPy/Python
    allocations traced by tracemalloc (which sees arrays that reuse memory already
    resident, but not the C kernels' scratch)."""

    @staticmethod
    def _read(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(field)

    def __enter__(self):
        tracemalloc.start()
        tracemalloc.reset_peak()
        self.traced0 = tracemalloc.get_traced_memory()[0]
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._read("VmRSS")
        except OSError:
            self.start = None
        self.extra = None
        return self

    def __exit__(self, *exc):
        traced = tracemalloc.get_traced_memory()[1] - self.traced0
        tracemalloc.stop()
        if self.start is not None:
            try:
                self.extra = max(traced, self._read("VmHWM") - self.start)
            except OSError:
                self.extra = traced
        else:
            self.extra = traced
        return False


def _median_time(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _local_reach(n, window):
    """reach(h, i): the keys query i attends directly in local attention (own and
    neighbouring blocks)."""
    def reach(h, i):
        b = i // window
        return np.arange(max(0, (b - 1) * window), min(n, (b + 2) * window))
    return reach


def _routing_reach(layer):
    """reach(h, i): the keys query i meets in the routing layer's last call (the union over
    the clusters it belongs to; none if it is in no cluster)."""
    q_idx, k_idx = layer.q_idx[0], layer.k_idx[0]                  # (heads, c, w), (heads, c, u)
    def reach(h, i):
        clusters = np.flatnonzero((q_idx[h] == i).any(axis=-1))
        keys = k_idx[h][clusters].ravel()
        return np.unique(keys[keys >= 0])
    return reach


def mass_kept(q, k, reach, sample=128):
    """Mean over a sample of queries (all heads) of the dense softmax mass on the keys a
    method attends directly: how much of exact attention the method's sparsity pattern
    keeps.  1 for methods that reach every key (directly or through summaries)."""
    heads, n, d = q.shape[-3:]
    rows = np.linspace(0, n - 1, min(sample, n)).astype(int)
    kept = []
    for h in range(heads):
        logits = (q[0, h, rows].astype(np.float64) @ k[0, h].T.astype(np.float64)) / np.sqrt(d)
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        kept += [p[r, reach(h, i)].sum() for r, i in enumerate(rows)]
    return float(np.mean(kept))


def methods(n):
    """[(name, make, reach)]: make(q, k, v) returns the forward callable (set-up untimed);
    reach() gives the keys each query attends directly (None: every key is reached)."""
    c = max(1, int(round(np.sqrt(n))))
    window = max(1, min(256, n // 8))

    layers = {}

    def routing(q, k, v):
        layer = layers["routing"] = ra.RoutingAttention(n_clusters=c, w=max(1, n // c),
                                                        kmeans_iters=2)
        layer(q, k, v)                    # first call: spherical k-means initialisation
        layer.training = False            # then steady state: route with fixed centroids
        return lambda: layer(q, k, v)

    rows = [("dense (exact)", lambda q, k, v: (lambda: ra.attention(q, k, v)), None),
            (f"local (window {window})",
             lambda q, k, v: (lambda: ra.local_attention(q, k, v, window)), _local_reach(n, window)),
            (f"routing (c={c}, w={max(1, n // c)})", routing,
             lambda: _routing_reach(layers["routing"]))]
    C = min(100, n)
    rows += [(f"clustered (C={C})",
              lambda q, k, v: (lambda layer=ra.ClusteredAttention(C): layer(q, k, v)), None),
             (f"improved clustered (C={C}, top-{min(32, n)})",
              lambda q, k, v: (lambda layer=ra.ClusteredAttention(C, topk=min(32, n)):
                               layer(q, k, v)), None)]
    for plan in ("fixed", "axial", "logsparse", "mixture"):
        rows.append((f"combiner {plan}",
                     lambda q, k, v, plan=plan: (lambda: ra.combiner_attention(q, k, v, plan=plan,
                                                                               causal=False)),
                     None))
    return rows


def run_demo(n=8192, heads=4, repeats=3, progress=True):
    """Run every method on the built-in data; returns (rows, dense_check_error) where each
    row is dict(name, seconds, speedup, rel_err, peak_bytes or None)."""
    q, k, v = builtin_data(n, heads)
    todo = methods(n)
    rows, dense_out, dense_t = [], None, None
    for i, (name, make, reach) in enumerate(todo, 1):
        if progress:
            print(f"[{i}/{len(todo)}] {name} ...", end="", flush=True, file=sys.stderr)
        fn = make(q, k, v)
        with _PeakMemory() as mem:
            fn()                                          # warm-up, and the memory probe
        t, out = _median_time(fn, repeats)
        if dense_out is None:
            dense_out, dense_t = out, t
        if callable(reach) and reach.__name__ == "<lambda>":
            reach = reach()                             # made from the method's own state
        kept = 1.0 if reach is None else mass_kept(q, k, reach)
        rows.append(dict(name=name, seconds=t, speedup=dense_t / t,
                         rel_err=_rel_err(out, dense_out), peak_bytes=mem.extra,
                         out_bytes=out.nbytes, mass_kept=kept))
        if progress:
            print(f" {t * 1e3:.1f} ms", file=sys.stderr, flush=True)
    s = slice(0, min(n, 256))                              # dense vs the float64 oracle
    check = _rel_err(dense_out[0, 0, s], ref.attention(q[0, 0, s], k[0, 0], v[0, 0]))
    return rows, check


def format_table(rows):
    lines = [f"{'method':<36}{'time [ms]':>11}{'× dense':>10}{'mass kept':>11}"
             f"{'differs from dense':>20}{'peak MiB':>10}"]
    for r in rows:
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(f"{r['name']:<36}{r['seconds'] * 1e3:>11.1f}{r['speedup']:>10.3g}"
                     f"{100 * r['mass_kept']:>10.1f}%{100 * r['rel_err']:>19.1f}%{mem:>10}")
    return "\n".join(lines)


LEGEND = """\
time: median of 3 calls.  × dense: dense time / method time.
mass kept: of each query's exact (dense) attention weights, the share on the keys the
  method attends directly (mean over 128 queries per head).  Local and routing attention
  see only their window / clusters; clustered attention and Combiner reach every key
  (through a centroid row or region summaries), so they show 100 %.
differs from dense: ‖out − dense‖ / ‖dense‖.  Local, routing and Combiner are different
  attention models, not approximations of dense attention, so a large value is not an
  error: it says how differently the method mixes the values.  Each is exact for its own
  definition (checked against routing_attention.reference by the test suite).
routing (c, w): c = round(√n) clusters per head, each taking the w = n / c best queries
  and keys (balanced top-w membership), centroids fitted by spherical k-means first.
clustered (C, top-k): queries hashed (32-bit LSH) and grouped into C clusters by Hamming
  k-means; one attention row per cluster; the improved form recomputes exact weights on
  each cluster's top-k keys.
combiner: block ⌈√n⌉; every key reachable, directly or through region summaries.
peak MiB: memory allocated above the inputs during one call (outputs included)."""


def _positive(flag, low, high=None):
    """An argparse type: an int in [low, high], with a message naming the flag."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes an integer; got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{flag} must be {bound}; got {value}")
        return value
    return parse


def main(argv=None, n=8192, heads=4):
    ap = argparse.ArgumentParser(prog="python -m routing_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = os.cpu_count() or 1
    ap.add_argument("--n", type=_positive("--n", 16), default=n,
                    help=f"sequence length, at least 16 (default {n})")
    ap.add_argument("--heads", type=_positive("--heads", 1), default=heads,
                    help=f"attention heads, each its own problem (default {heads})")
    ap.add_argument("--threads", type=_positive("--threads", 1, cores), default=cores,
                    help=f"OpenMP threads, 1..{cores} (default: all {cores} cores; every method "
                         "and the dense baseline use the same count)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--version", action="version", version=f"routing_attention {ra.__version__}")
    args = ap.parse_args([] if argv is None else argv)
    ra.set_num_threads(args.threads)
    info = ra.build_info()
    print(f"routing_attention {ra.__version__}: SIMD {info['simd']}, OpenMP {info['openmp']}, "
          f"{ra.get_num_threads()} threads")
    print(f"built-in data: {args.heads} heads × n={args.n} × d={D}, float32, non-causal; queries "
          f"and keys around {TOPICS} shared topics\n")
    t0 = time.perf_counter()
    rows, check = run_demo(args.n, args.heads, progress=not args.quiet)
    print(format_table(rows))
    print("\n" + LEGEND)
    ok = check < 1e-4 and all(np.isfinite(r["rel_err"]) for r in rows)
    print(f"dense attention vs the float64 NumPy reference: relative error {check:.1e} -> "
          f"{'OK' if ok else 'FAILED'}  (demo took {time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
