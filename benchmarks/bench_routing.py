"""Routing attention (routing included) vs dense torch SDPA and lucidrains' routing-transformer.

    python benchmarks/bench_routing.py [--heads 4] [--repeats 5] [--output benchmarks/RESULTS_routing.md]
    python benchmarks/bench_routing.py --scaling     # the layer's 1 -> 2 thread speed-up only

For n in {4096, 16384, 65536}, d=64, c=sqrt(n), w=n/c, float32, batch 1:
  ours   = RoutingAttention layer call (normalise, centroid scores, balanced top-w
           membership, routing attention, EMA centroid update) and layer.backward;
  rt     = routing_transformer.KmeansAttention (training mode, same c and w), forward
           and autograd backward (skipped if the package is missing);
  sdpa   = dense torch.nn.functional.scaled_dot_product_attention (skipped above
           --max-dense-n: its O(n^2) time is then only extrapolated, and said so).
Timings are interleaved medians; the growth exponent is a least-squares fit of
log(time) on log(n).  Peak memory at the largest n is measured in a fresh subprocess
(high-water RSS over the call minus RSS before) for the kernel and for the whole
layer, as a multiple of inputs + outputs.
"""
import argparse
import json
import subprocess
import sys

import numpy as np

import routing_attention as ra

from common import machine_description, median_times, set_threads, try_import_torch


def try_import_rt():
    try:
        from routing_transformer.routing_transformer import KmeansAttention
        return KmeansAttention
    except Exception:          # missing package or incompatible torch
        return None


def cases_for(n, heads, d, torch, KmeansAttention, max_dense_n):
    c = int(round(np.sqrt(n)))
    w = n // c
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4))
    layer = ra.RoutingAttention(n_clusters=c, w=w, kmeans_iters=2)
    layer(q, k, v)                                   # centroids initialised, untimed
    cases = [("ours fwd", lambda: None, lambda _: layer(q, k, v)),
             ("ours bwd", lambda: layer.forward(q, k, v)[1], lambda ctx: layer.backward(dout, ctx))]
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
        tdout = torch.from_numpy(dout)
        if KmeansAttention is not None:
            rt = KmeansAttention(c, w, heads, d, causal=False)
            rt.train()

            def rt_fwd(_):
                with torch.no_grad():
                    rt(tq, tk, tv)

            cases += [("rt fwd", lambda: None, rt_fwd),
                      ("rt bwd", lambda: rt(tq, tk, tv)[0], lambda o: o.backward(tdout))]
        if n <= max_dense_n:
            sdpa = torch.nn.functional.scaled_dot_product_attention

            def sdpa_fwd(_):
                with torch.no_grad():
                    sdpa(tq, tk, tv)

            cases += [("sdpa fwd", lambda: None, sdpa_fwd),
                      ("sdpa bwd", lambda: sdpa(tq, tk, tv), lambda o: o.backward(tdout))]
    return cases


def peak_memory(n, heads, d):
    """Peak extra memory of one layer forward and of the routing_attention kernel alone,
    measured in a fresh subprocess as the high-water RSS (reset through
    /proc/self/clear_refs just before the call) minus the RSS before it; inputs exist
    already, so the figure is what the call adds (outputs included).  The layer twice: a
    repeated call (it overwrites the statistics its previous call kept) and a layer's first
    call after the k-means initialisation (it allocates them: centroids copied in)."""
    code = f"""
import json, numpy as np, routing_attention as ra
def rss():
    with open('/proc/self/status') as f:
        d = dict(line.split(':', 1) for line in f)
    return int(d['VmRSS'].split()[0]) * 1024, int(d['VmHWM'].split()[0]) * 1024
def peak_of(call):
    before = rss()[0]
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    result = call()
    return rss()[1] - before, result
n, h, d = {n}, {heads}, {d}
c = int(round(np.sqrt(n)))
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, h, n, d), dtype=np.float32) for _ in range(3))
layer = ra.RoutingAttention(n_clusters=c, w=n // c, kmeans_iters=2)
layer(q, k, v)                                  # the one-off k-means initialisation
fresh = ra.RoutingAttention(n_clusters=c, w=n // c)
fresh.centroids = layer.centroids.copy()
first_peak, out = peak_of(lambda: fresh(q, k, v))
del out, fresh
layer_peak, out = peak_of(lambda: layer(q, k, v))
del out
kernel_peak, out = peak_of(lambda: ra.routing_attention(q, k, v, layer.q_idx, layer.k_idx))
print(json.dumps(dict(layer=layer_peak, first=first_peak, kernel=kernel_peak, io=4 * q.nbytes)))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def thread_scaling(ns, heads, d):
    """Layer forward and backward on 1 and 2 threads, alternating call by call in one
    process, so that a busy machine slows both thread counts alike; medians."""
    import time
    for n in ns:
        c = int(round(np.sqrt(n)))
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4))
        layer = ra.RoutingAttention(n_clusters=c, w=n // c, kmeans_iters=2)
        layer.forward(q, k, v)              # centroids initialised (a context, not a pending call)
        times = {(t, m): [] for t in (1, 2) for m in ("fwd", "bwd")}
        for _ in range(15 if n <= 16384 else 5):
            for t in (1, 2):
                set_threads(t)
                for m, call in (("fwd", lambda: layer(q, k, v)), ("bwd", lambda: layer.backward(dout))):
                    start = time.perf_counter()
                    call()
                    times[(t, m)].append(time.perf_counter() - start)
        for m in ("fwd", "bwd"):
            one, two = np.median(times[(1, m)]) * 1e3, np.median(times[(2, m)]) * 1e3
            print(f"n={n} {m}: 1 thread {one:.1f} ms, 2 threads {two:.1f} ms, speed-up {one / two:.2f}×",
                  flush=True)


def fit_exponent(ns, ts):
    ok = [(n, t) for n, t in zip(ns, ts) if t is not None]
    if len(ok) < 2:
        return float("nan")
    x, y = np.log([n for n, _ in ok]), np.log([t for _, t in ok])
    return float(np.polyfit(x, y, 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--ns", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--max-dense-n", type=int, default=16384)
    ap.add_argument("--output", default=None)
    ap.add_argument("--scaling", action="store_true",
                    help="only the layer's 2-thread speed-up, threads alternating in one process")
    args = ap.parse_args(argv)
    if args.scaling:
        thread_scaling(args.ns, args.heads, args.d)
        return
    torch, KA = try_import_torch(), try_import_rt()
    lines = [f"Machine: {machine_description()}",
             f"torch: {torch.__version__ if torch else 'not installed: SDPA and routing-transformer skipped'}; "
             f"routing-transformer: {'installed' if KA else 'not installed: skipped'}", "",
             f"B=1, H={args.heads}, d={args.d}, c=round(sqrt(n)), w=n//c, float32, medians of "
             f"{args.repeats} interleaved repeats; routing decisions included on both sides.", "",
             "| threads | n | ours fwd ms | ours bwd ms | bwd/fwd | rt fwd ms | rt bwd ms | vs rt (fwd / bwd) | SDPA fwd ms | SDPA bwd ms | vs SDPA (fwd / bwd) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: "skipped" if x is None else f"{x * 1e3:.1f}"
    for threads in args.threads:
        set_threads(threads)
        series = {}
        for n in args.ns:
            r = median_times(cases_for(n, args.heads, args.d, torch, KA, args.max_dense_n), args.repeats)
            for key in ("ours fwd", "ours bwd", "rt fwd", "rt bwd", "sdpa fwd", "sdpa bwd"):
                series.setdefault(key, []).append(r.get(key))
            sp = lambda a, b: "skipped" if r.get(b) is None else f"{r[b] / r[a]:.1f}×"
            lines.append(f"| {threads} | {n} | {fmt(r['ours fwd'])} | {fmt(r['ours bwd'])} | "
                         f"{r['ours bwd'] / r['ours fwd']:.2f} | {fmt(r.get('rt fwd'))} | {fmt(r.get('rt bwd'))} | "
                         f"{sp('ours fwd', 'rt fwd')} / {sp('ours bwd', 'rt bwd')} | {fmt(r.get('sdpa fwd'))} | "
                         f"{fmt(r.get('sdpa bwd'))} | {sp('ours fwd', 'sdpa fwd')} / {sp('ours bwd', 'sdpa bwd')} |")
            print(lines[-1], flush=True)
        lines.append("")
        lines.append(f"Growth exponents at {threads} thread(s) (fit of log t on log n over {args.ns}): " +
                     ", ".join(f"{key} {fit_exponent(args.ns, ts):.2f}" for key, ts in series.items()
                               if any(t is not None for t in ts)))
        lines.append("")
    mem = peak_memory(max(args.ns), args.heads, args.d)
    total = lambda extra: (mem["io"] + extra) / mem["io"]
    lines.append(f"Peak memory at n={max(args.ns)} (inputs + outputs: {mem['io'] / 2**20:.0f} MiB): "
                 f"routing_attention kernel adds {mem['kernel'] / 2**20:.0f} MiB (outputs included) -> "
                 f"total {total(mem['kernel'] - mem['io'] / 4):.2f}× inputs plus outputs; the whole layer "
                 f"(routing decisions included) adds {mem['layer'] / 2**20:.0f} MiB on a repeated call "
                 f"-> {total(mem['layer'] - mem['io'] / 4):.2f}×, {mem['first'] / 2**20:.0f} MiB on its "
                 f"first call -> {total(mem['first'] - mem['io'] / 4):.2f}×.")
    report = "\n".join(lines)
    print(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write("# Routing attention benchmark\n\nCommand: `python benchmarks/bench_routing.py "
                    + " ".join(argv if argv is not None else sys.argv[1:]) + "`\n\n" + report + "\n")


if __name__ == "__main__":
    main()
