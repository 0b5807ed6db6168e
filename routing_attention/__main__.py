"""`python -m routing_attention`: a short demo on built-in random data.

Runs each available method on one long sequence, checks it against the dense NumPy
reference (or exact dense attention), and prints a table of time, speed-up and error.
"""
import sys
import time

import numpy as np

import routing_attention as ra
from routing_attention import reference as ref


def _timed(fn, repeats=3):
    """Median wall time of `repeats` calls and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), result


def _rel_err(a, b):
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(1e-30, np.max(np.abs(b))))


def main(argv=None):
    heads, n, d = 4, 2048, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((heads, n, d)).astype(np.float32) for _ in range(3))
    dout = rng.standard_normal((heads, n, d)).astype(np.float32)
    info = ra.build_info()
    print(f"routing_attention {ra.__version__}: SIMD {info['simd']}, OpenMP {info['openmp']}, "
          f"{info['num_threads']} threads")
    print(f"built-in data: {heads} heads × n={n} × d={d}, float32, causal\n")

    rows = []
    steps = [
        ("NumPy reference (dense)", lambda: ref.attention(q, k, v, causal=True), None),
        ("attention forward", lambda: ra.attention(q, k, v, causal=True), "fwd"),
        ("attention backward", lambda: ra.attention_backward(dout, q, k, v, causal=True), "bwd"),
    ]
    results = {}
    for i, (name, fn, key) in enumerate(steps, 1):
        print(f"[{i}/{len(steps)}] {name} ...", end="", flush=True, file=sys.stderr)
        t, res = _timed(fn, repeats=1 if key is None else 3)
        print(f" {t * 1e3:.1f} ms", file=sys.stderr)
        results[name] = (t, res)
    t_ref, out_ref = results["NumPy reference (dense)"]
    t_fwd, out = results["attention forward"]
    t_bwd, grads = results["attention backward"]
    ref_grads = ref.attention_backward(dout[:1], q[:1], k[:1], v[:1], causal=True)
    flops = 4.0 * heads * n * n * d / 2          # causal: half of the n×n pairs
    rows.append(("dense reference (NumPy)", t_ref, 1.0, 0.0))
    rows.append(("attention (C engine)", t_fwd, t_ref / t_fwd, _rel_err(out, out_ref)))
    rows.append(("attention_backward", t_bwd, float("nan"),
                 max(_rel_err(g[:1], r) for g, r in zip(grads, ref_grads))))
    print(f"\n{'method':<28}{'time [ms]':>12}{'× reference':>14}{'rel. error':>13}")
    for name, t, speedup, err in rows:
        sp = "" if np.isnan(speedup) else f"{speedup:.1f}"
        print(f"{name:<28}{t * 1e3:>12.1f}{sp:>14}{err:>13.1e}")
    print(f"\nforward: {flops / t_fwd / 1e9:.0f} GFLOP/s; backward/forward time ratio "
          f"{t_bwd / t_fwd:.2f}")
    ok = _rel_err(out, out_ref) < 1e-4
    print("check against the reference:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
