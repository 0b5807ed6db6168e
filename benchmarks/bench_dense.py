"""Dense attention: our C engine vs torch SDPA and the NumPy reference.

    python benchmarks/bench_dense.py [--repeats 7] [--output benchmarks/RESULTS.md]

Times forward and backward (backward given the forward's saved lse and output, as
torch's autograd does), interleaved, medians of repeats, at 1 and 2 threads, and
reports GFLOP/s and the fraction of the fp32 FMA peak measured by this script.
"""
import argparse
import sys

import numpy as np

import routing_attention as ra
from routing_attention import reference as ref

from common import (SUITE_MARKER, fp32_peak_gflops, machine_description, median_times, set_threads,
                    try_import_torch)


def run(heads, n, d, causal, threads, repeats, torch, with_reference):
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4))
    out, lse = ra.attention(q, k, v, causal=causal, return_lse=True)
    cases = [
        ("ours fwd", lambda: None, lambda _: ra.attention(q, k, v, causal=causal)),
        ("ours bwd", lambda: None,
         lambda _: ra.attention_backward(dout, q, k, v, causal=causal, lse=lse, output=out)),
    ]
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        tdout = torch.from_numpy(dout)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def torch_fwd(_):
            with torch.no_grad():
                sdpa(tq, tk, tv, is_causal=causal)

        def torch_bwd_setup():
            for t in (tq, tk, tv):
                t.grad = None
            return sdpa(tq, tk, tv, is_causal=causal)

        cases += [("torch fwd", lambda: None, torch_fwd),
                  ("torch bwd", torch_bwd_setup, lambda o: o.backward(tdout))]
    set_threads(threads)
    res = median_times(cases, repeats)
    if with_reference:
        res["numpy fwd"] = median_times(
            [("numpy fwd", lambda: None, lambda _: ref.attention(q, k, v, causal=causal))], 1)["numpy fwd"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output", default=None, help="write a Markdown report here")
    args = ap.parse_args(argv)
    torch = try_import_torch()
    lines = [f"Machine: {machine_description()}",
             f"torch: {torch.__version__ if torch else 'not installed - SDPA columns skipped'}", ""]
    peaks = {t: fp32_peak_gflops(t) for t in (1, 2)}
    lines.append("Measured fp32 FMA peak: " + ", ".join(f"{t} thread(s) {p:.0f} GFLOP/s" for t, p in peaks.items()))
    lines.append("")
    lines.append(f"B=1, H={args.heads}, n={args.n}, d={args.d}, float32; medians of {args.repeats} "
                 "interleaved repeats; backward timed given the forward's saved statistics.")
    lines.append("")
    lines.append("| causal | threads | ours fwd ms | torch fwd ms | fwd speed-up | ours bwd ms | torch bwd ms | bwd speed-up | bwd/fwd | fwd GFLOP/s | % of peak | NumPy ref fwd ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for causal in (False, True):
        for threads in (1, 2):
            r = run(args.heads, args.n, args.d, causal, threads, args.repeats, torch,
                    with_reference=(threads == 2))
            flops = 4.0 * args.heads * args.n * args.n * args.d * (0.5 if causal else 1.0)
            gf = flops / r["ours fwd"] / 1e9
            tf, tb = r.get("torch fwd"), r.get("torch bwd")
            fmt = lambda x: f"{x * 1e3:.1f}" if x is not None else "skipped"
            ratio = lambda a, b: f"{b / a:.2f}×" if b is not None else "skipped"
            lines.append(
                f"| {causal} | {threads} | {fmt(r['ours fwd'])} | {fmt(tf)} | {ratio(r['ours fwd'], tf)} | "
                f"{fmt(r['ours bwd'])} | {fmt(tb)} | {ratio(r['ours bwd'], tb)} | "
                f"{r['ours bwd'] / r['ours fwd']:.2f} | {gf:.0f} | {100 * gf / peaks[threads]:.0f} % | "
                f"{fmt(r.get('numpy fwd'))} |")
            print(lines[-1], flush=True)
    lines.append("")
    lines.append("Speed-up = torch time / our time (> 1 means we are faster). The NumPy reference "
                 "(float64, explicit n×n matrix) is timed once, at the default BLAS threading.")
    report = "\n".join(lines)
    print(report)
    if args.output:
        # keep the suite's part of the file (benchmarks/suite.py writes after its marker)
        tail = ""
        try:
            with open(args.output) as f:
                text = f.read()
            if SUITE_MARKER in text:
                tail = "\n" + SUITE_MARKER + text.split(SUITE_MARKER, 1)[1]
        except OSError:
            pass
        with open(args.output, "w") as f:
            f.write("# Dense attention benchmark\n\nCommand: `python benchmarks/bench_dense.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + report + "\n" + tail)


if __name__ == "__main__":
    main()
