"""`python -m routing_attention`: a short demo of every method on built-in data.

The data are a long sequence (default n=8192, 4 heads, d=64, float32) whose queries and
keys are drawn around a few shared "topics" (centroids), the kind of structure
content-based sparse attention is built for.  Each method runs on it; the table shows its
forward time (median of a few calls), its speed-up over our exact dense attention, its
relative error against that dense output, and its peak memory above the inputs.  Dense
attention itself is first checked against the float64 NumPy reference on a slice.

    python -m routing_attention [--n 8192] [--heads 4] [--threads 1]
"""
import argparse
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


def methods(n):
    """[(name, make)]: make(q, k, v) returns the forward callable (set-up untimed)."""
    c = max(1, int(round(np.sqrt(n))))
    window = max(1, min(256, n // 8))

    def routing(q, k, v):
        layer = ra.RoutingAttention(n_clusters=c, w=n // c, kmeans_iters=2)
        layer(q, k, v)                    # first call: spherical k-means initialisation
        layer.training = False            # then steady state: route with fixed centroids
        return lambda: layer(q, k, v)

    rows = [("dense (exact)", lambda q, k, v: (lambda: ra.attention(q, k, v))),
            (f"local (window {window})", lambda q, k, v: (lambda: ra.local_attention(q, k, v, window))),
            (f"routing (c={c}, w={n // c})", routing)]
    C = min(100, n)
    rows += [(f"clustered (C={C})",
              lambda q, k, v: (lambda layer=ra.ClusteredAttention(C): layer(q, k, v))),
             (f"improved clustered (C={C}, top-32)",
              lambda q, k, v: (lambda layer=ra.ClusteredAttention(C, topk=min(32, n)): layer(q, k, v)))]
    for plan in ("fixed", "axial", "logsparse", "mixture"):
        rows.append((f"combiner {plan}",
                     lambda q, k, v, plan=plan: (lambda: ra.combiner_attention(q, k, v, plan=plan,
                                                                               causal=False))))
    return rows


def run_demo(n=8192, heads=4, repeats=3, progress=True):
    """Run every method on the built-in data; returns (rows, dense_check_error) where each
    row is dict(name, seconds, speedup, rel_err, peak_bytes or None)."""
    q, k, v = builtin_data(n, heads)
    todo = methods(n)
    rows, dense_out, dense_t = [], None, None
    for i, (name, make) in enumerate(todo, 1):
        if progress:
            print(f"[{i}/{len(todo)}] {name} ...", end="", flush=True, file=sys.stderr)
        fn = make(q, k, v)
        with _PeakMemory() as mem:
            fn()                                          # warm-up, and the memory probe
        t, out = _median_time(fn, repeats)
        if dense_out is None:
            dense_out, dense_t = out, t
        rows.append(dict(name=name, seconds=t, speedup=dense_t / t,
                         rel_err=_rel_err(out, dense_out), peak_bytes=mem.extra,
                         out_bytes=out.nbytes))
        if progress:
            print(f" {t * 1e3:.1f} ms", file=sys.stderr, flush=True)
    s = slice(0, min(n, 256))                              # dense vs the float64 oracle
    check = _rel_err(dense_out[0, 0, s], ref.attention(q[0, 0, s], k[0, 0], v[0, 0]))
    return rows, check


def format_table(rows):
    lines = [f"{'method':<36}{'time [ms]':>11}{'× dense':>10}{'rel. error':>12}{'peak MiB':>10}"]
    for r in rows:
        mem = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        lines.append(f"{r['name']:<36}{r['seconds'] * 1e3:>11.1f}{r['speedup']:>10.3g}"
                     f"{r['rel_err']:>12.2e}{mem:>10}")
    return "\n".join(lines)


def main(argv=None, n=8192, heads=4):
    ap = argparse.ArgumentParser(prog="python -m routing_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=n, help="sequence length")
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--threads", type=int, default=1,
                    help="OpenMP threads (default 1: steady timings on a shared machine; every "
                         "method and the dense baseline use the same count)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = ap.parse_args([] if argv is None else argv)
    if args.threads:
        ra.set_num_threads(args.threads)
    info = ra.build_info()
    print(f"routing_attention {ra.__version__}: SIMD {info['simd']}, OpenMP {info['openmp']}, "
          f"{ra.get_num_threads()} threads")
    print(f"built-in data: {args.heads} heads × n={args.n} × d={D}, float32, non-causal; queries "
          f"and keys around {TOPICS} shared topics\n")
    t0 = time.perf_counter()
    rows, check = run_demo(args.n, args.heads, progress=not args.quiet)
    print(format_table(rows))
    print(f"\n× dense = dense time / method time; rel. error = ‖out − dense‖ / ‖dense‖ (Frobenius); "
          f"peak MiB = memory allocated above the inputs during one call (outputs {rows[0]['out_bytes'] / 2**20:.0f} MiB "
          f"included).")
    ok = check < 1e-4 and all(np.isfinite(r["rel_err"]) for r in rows)
    print(f"dense attention vs the float64 NumPy reference: relative error {check:.1e} -> "
          f"{'OK' if ok else 'FAILED'}  (demo took {time.perf_counter() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
