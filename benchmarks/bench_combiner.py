"""Combiner attention speed: every plan, forward and backward, against dense attention.

    PYTHONPATH=. python benchmarks/bench_combiner.py [--sizes 4096 16384 65536] [--repeats 3]

B=1, H=1, d=e=64, float32, causal, arrays shaped (B, H, n, d).  Medians of `repeats` runs
after one warm-up.  Dense baselines: our dense engine (causal) and, when torch is
importable, torch's scaled_dot_product_attention (CPU, is_causal=True, on as many threads
as ours; 4-D inputs, so it takes its flash kernel).  Every backward is timed alone, given
what its forward keeps: ours the saved statistics (lse and output for dense attention),
torch's autograd graph of an untimed forward.  Dense cases whose estimated time
exceeds --dense-limit seconds are skipped (O(n²)).  The backward gets the forward's saved
statistics (``return_saved=True``), as the CombinerAttention layer does.  The growth exponent of every plan is
fitted by least squares on log(time) vs log(n).
"""
import argparse
import time

import numpy as np

import routing_attention as ra

try:
    import torch
except ImportError:   # torch is optional
    torch = None

PLANS = ("fixed", "axial", "logsparse", "mixture")


CPU = {}   # median process CPU seconds (all threads) of the last median_time call per fn


def median_time(fn, repeats, setup=lambda: None):
    """Median wall time of fn(setup()) (setup untimed); the median CPU time (process_time,
    all threads) goes to CPU["last"], a steadier figure when other jobs compete for the
    cores."""
    fn(setup())
    times, cpu = [], []
    for _ in range(repeats):
        state = setup()
        c = time.process_time()
        t = time.perf_counter()
        fn(state)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    CPU["last"] = float(np.median(cpu))
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--dense-limit", type=float, default=20.0,
                    help="skip a dense case predicted to take longer than this (s)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    info = ra.build_info()
    print(f"# threads={ra.get_num_threads()} simd={info['simd']} torch="
          f"{torch.__version__ if torch else 'not installed'} d={args.d} float32 causal")
    print(f"{'n':>6} {'method':>10} {'fwd ms':>10} {'bwd ms':>10}   {'fwd cpu':>8} {'bwd cpu':>8}"
          f" {'bwd/fwd':>7} {'(cpu)':>6}")
    rows, cpus = {}, {}
    dense_last = {}
    for n in args.sizes:
        q, k, v = (rng.standard_normal((1, 1, n, args.d)).astype(np.float32) for _ in range(3))
        g = rng.standard_normal((1, 1, n, args.d)).astype(np.float32)
        for plan in PLANS:
            f = median_time(lambda _: ra.combiner_attention(q, k, v, plan=plan, causal=True),
                            args.repeats)
            fc = CPU["last"]
            _, saved = ra.combiner_attention(q, k, v, plan=plan, causal=True, return_saved=True)
            b = median_time(lambda _: ra.combiner_attention_backward(g, q, k, v, plan=plan,
                                                                     **saved), args.repeats)
            bc = CPU["last"]
            rows[(plan, n)] = (f, b)
            cpus[(plan, n)] = (fc, bc)
            print(f"{n:>6} {plan:>10} {f * 1e3:>10.1f} {b * 1e3:>10.1f}   {fc * 1e3:>8.1f} "
                  f"{bc * 1e3:>8.1f} {b / f:>7.2f} {bc / fc:>6.2f}", flush=True)
        def ours_forward():
            out, lse = ra.attention(q, k, v, causal=True, return_lse=True)
            return dict(output=out, lse=lse)

        dense = {"ours-dense": (lambda _: ra.attention(q, k, v, causal=True), ours_forward,
                                lambda s: ra.attention_backward(g, q, k, v, causal=True, **s))}
        if torch is not None:
            torch.set_num_threads(ra.get_num_threads())
            tq, tk, tv = (torch.from_numpy(x).requires_grad_(True) for x in (q, k, v))
            tg = torch.from_numpy(g)
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def t_fwd(_):
                with torch.no_grad():
                    sdpa(tq, tk, tv, is_causal=True)

            dense["torch-sdpa"] = (t_fwd, lambda: sdpa(tq, tk, tv, is_causal=True),
                                   lambda out: out.backward(tg))
        for name, (fw, setup, bw) in dense.items():
            prev = dense_last.get(name)
            if prev is not None and (prev[1] * (n / prev[0]) ** 2) * (args.repeats + 1) * 4 > args.dense_limit:
                print(f"{n:>6} {name:>10} {'skipped (O(n^2), est. > limit)':>21}", flush=True)
                continue
            f = median_time(fw, args.repeats)
            b = median_time(bw, args.repeats, setup)
            dense_last[name] = (n, f + b)
            rows[(name, n)] = (f, b)
            print(f"{n:>6} {name:>10} {f * 1e3:>10.1f} {b * 1e3:>10.1f}", flush=True)
    print("\n# growth exponent p in time ∝ n^p (least squares over the sizes run)")
    for method in PLANS + ("ours-dense", "torch-sdpa"):
        ns = [n for n in args.sizes if (method, n) in rows]
        if len(ns) < 2:
            continue
        x = np.log(ns)
        fit = [np.polyfit(x, np.log([rows[(method, n)][i] for n in ns]), 1)[0] for i in (0, 1)]
        print(f"{method:>10}: forward {fit[0]:.2f}  backward {fit[1]:.2f}  (n = {ns})")
        if method in PLANS:
            fit = [np.polyfit(x, np.log([cpus[(method, n)][i] for n in ns]), 1)[0] for i in (0, 1)]
            print(f"{'(cpu time)':>10}: forward {fit[0]:.2f}  backward {fit[1]:.2f}")
    if torch is not None:
        print("\n# speed-up over torch SDPA (fwd, bwd)")
        for (method, n), (f, b) in rows.items():
            if method in PLANS and ("torch-sdpa", n) in rows:
                tf, tb = rows[("torch-sdpa", n)]
                print(f"{n:>6} {method:>10}  {tf / f:8.1f}x {tb / b:8.1f}x")


if __name__ == "__main__":
    main()
