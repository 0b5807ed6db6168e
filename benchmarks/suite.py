"""The benchmark suite: every method, forward and backward, against the installed peers.

    PYTHONPATH=. python benchmarks/suite.py                 # full run (~15-20 min, 2 cores)
    PYTHONPATH=. python benchmarks/suite.py --quick         # a ~1 minute smoke run
    PYTHONPATH=. python benchmarks/suite.py --replot        # tables + plots from the saved JSON

Methods (ours): dense, local, routing, clustered, improved (clustered), and Combiner with
every plan (fixed, axial, logsparse, mixture); all non-causal, B=1, H=--heads, d=e=--d,
float32.  Peers, when installed: torch SDPA (dense), routing-transformer's KmeansAttention
(routing), local-attention's LocalAttention (local), pytorch-fast-transformers' clustered /
improved clustered attention.  A peer that is not installed is listed as "skipped (not
installed)".

Timing: for each n and thread count, every case (ours and the peers') runs once as a
warm-up, then `repeats` interleaved rounds (order reversed every other round, see
common.median_times); medians are reported.  Cases costing more than --round-budget
seconds per round get fewer rounds (never fewer than 3).  Dense O(n^2) cases (ours and
SDPA) above --max-dense-n are not run; their time is extrapolated as t(n0)·(n/n0)^2 from
the largest measured n0 and marked "extrap." in every table and plot.

Memory: each (method, n, forward | forward+backward) runs in a fresh subprocess; the peak
is VmHWM minus the RSS before the inputs were created (the peak is reset through
/proc/self/clear_refs after imports), compared with the bytes of the inputs + outputs.

Accuracy (--acc-n, both data sets): relative Frobenius error of each sparse method's output
against exact dense attention (float64), on (a) i.i.d. Gaussian q, k, v and (b) q and k
drawn around a few shared centroids; plus the mean fraction of each query's dense softmax
mass that falls on the keys the method computes exactly, next to the best possible
(the same number of top keys) and a random choice (count / n).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import routing_attention as ra  # noqa: E402
from routing_attention.routing import local_members  # noqa: E402

from common import (SUITE_MARKER, fp32_peak_gflops, machine_description, median_times,  # noqa: E402
                    set_threads, try_import_torch)
from bench_routing import fit_exponent, try_import_rt  # noqa: E402
from bench_clustered import try_fast_transformers  # noqa: E402

PLANS = ("fixed", "axial", "logsparse", "mixture")
OURS = ("dense", "local", "routing", "clustered", "improved") + tuple("combiner-" + p for p in PLANS)
PEERS = {  # peer -> (our method it is compared with, package)
    "sdpa": ("dense", "torch"),
    "rt-kmeans": ("routing", "routing-transformer"),
    "lr-local": ("local", "local-attention"),
    "ft-clustered": ("clustered", "pytorch-fast-transformers"),
    "ft-improved": ("improved", "pytorch-fast-transformers"),
}
DENSE = ("dense", "sdpa")
LOCAL_WINDOW = 256          # local attention: blocks of 256 queries see 3 blocks of keys
C_CLUSTERS, TOPK, BITS, ITERS = 100, 32, 32, 10   # clustered: the Fast Transformers setting
DEFAULT_JSON = os.path.join(HERE, "suite_results.json")
DEFAULT_MD = os.path.join(HERE, "RESULTS.md")
PLOT_DIR = os.path.join(HERE, "plots")
MARKER = SUITE_MARKER


# ----------------------------------------------------------------------------- peers
def peer_status():
    """{peer: None if usable else the reason it is skipped}."""
    torch = try_import_torch()
    st = {}
    st["sdpa"] = None if torch is not None else "skipped (torch not installed)"
    st["rt-kmeans"] = None if (torch is not None and try_import_rt() is not None) \
        else "skipped (routing-transformer not installed)"
    try:
        from local_attention import LocalAttention  # noqa: F401
        st["lr-local"] = None
    except Exception:
        st["lr-local"] = "skipped (local-attention not installed)"
    ft = None if torch is None else try_fast_transformers()
    for p in ("ft-clustered", "ft-improved"):
        st[p] = None if ft is not None else "skipped (pytorch-fast-transformers not installed)"
    return st


def routing_shape(n):
    c = int(round(np.sqrt(n)))
    return c, n // c


def make_data(n, heads, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((1, heads, n, d), dtype=np.float32) for _ in range(4))


def routing_layer(q, k, n):
    """RoutingAttention with centroids set to normalised random key rows (the layer's
    k-means++ initialisation is a one-off cost of minutes at n=65536 and not timed)."""
    c, w = routing_shape(n)
    layer = ra.RoutingAttention(n_clusters=c, w=w)
    rng = np.random.default_rng(1)
    rows = k[0][:, rng.choice(n, size=c, replace=False), :].astype(np.float32)
    layer.centroids = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
    return layer


def method_fns(name, q, k, v, dout):
    """(forward(), backward_setup(), backward(state)) for one of our methods or a peer."""
    n, heads, d = q.shape[-2], q.shape[-3], q.shape[-1]
    if name == "dense":
        out, lse = ra.attention(q, k, v, return_lse=True)
        return (lambda: ra.attention(q, k, v), lambda: None,
                lambda _: ra.attention_backward(dout, q, k, v, lse=lse, output=out))
    if name == "local":
        return (lambda: ra.local_attention(q, k, v, LOCAL_WINDOW), lambda: None,
                lambda _: ra.local_attention_backward(dout, q, k, v, LOCAL_WINDOW))
    if name == "routing":
        layer = routing_layer(q, k, n)
        return (lambda: layer(q, k, v), lambda: layer.forward(q, k, v)[1],
                lambda ctx: layer.backward(dout, ctx))
    if name in ("clustered", "improved"):
        layer = ra.ClusteredAttention(C_CLUSTERS, bits=BITS, iterations=ITERS,
                                      topk=TOPK if name == "improved" else None)
        return (lambda: layer(q, k, v), lambda: layer.forward(q, k, v)[1],
                lambda ctx: layer.backward(dout, ctx))
    if name.startswith("combiner-"):
        layer = ra.CombinerAttention(name.split("-", 1)[1], causal=False)
        return (lambda: layer(q, k, v), lambda: layer.forward(q, k, v)[1],
                lambda ctx: layer.backward(dout, ctx))
    # peers: torch modules, forward under no_grad, backward = autograd of a fresh forward
    torch = try_import_torch()
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tdout = torch.from_numpy(dout)
    if name == "sdpa":
        f = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)  # noqa: E731
    elif name == "rt-kmeans":
        c, w = routing_shape(n)
        mod = try_import_rt()(c, w, heads, d, causal=False)
        mod.train()
        f = lambda: mod(tq, tk, tv)[0]  # noqa: E731
    elif name == "lr-local":
        from local_attention import LocalAttention
        mod = LocalAttention(LOCAL_WINDOW, look_backward=1, look_forward=1, autopad=True,
                             use_rotary_pos_emb=False)
        f = lambda: mod(tq, tk, tv)  # noqa: E731
    elif name in ("ft-clustered", "ft-improved"):
        ClusteredAttention, ImprovedClusteredAttention, FullMask, LengthMask = try_fast_transformers()
        # fast-transformers takes (N, L, H, E)
        fq, fk, fv = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (tq, tk, tv))
        tq, tk, tv = fq, fk, fv
        tdout = tdout.transpose(1, 2).contiguous()
        am, lm = FullMask(n, device="cpu"), LengthMask(torch.tensor([n]), max_len=n)
        # no dropout (its default is 0.1): ours has none, and dropout is not attention work
        mod = (ClusteredAttention(C_CLUSTERS, iterations=ITERS, bits=BITS, attention_dropout=0.0)
               if name == "ft-clustered" else
               ImprovedClusteredAttention(C_CLUSTERS, iterations=ITERS, bits=BITS, topk=TOPK,
                                          attention_dropout=0.0))
        f = lambda: mod(fq, fk, fv, am, lm, lm)  # noqa: E731
    else:
        raise ValueError(name)

    def fwd():
        with torch.no_grad():
            return f()

    def bwd_setup():
        for t in (tq, tk, tv):
            t.grad = None
        return f()

    return fwd, bwd_setup, lambda o: o.backward(tdout)


# ----------------------------------------------------------------------------- FLOP model
def logits_count(name, n):
    """Number of (query, key-or-summary) logits one head evaluates: FLOPs = 4·d·count
    forward (q·k and p·v), 10·d·count backward (recompute + 4 products)."""
    if name in DENSE:
        return n * n
    if name in ("local", "lr-local"):
        q_idx, k_idx = local_members(n, n, LOCAL_WINDOW, False)
        return int(((q_idx >= 0).sum(1) * (k_idx >= 0).sum(1)).sum())
    if name in ("routing", "rt-kmeans"):
        c, w = routing_shape(n)
        return c * w * w
    if name in ("clustered", "ft-clustered"):
        return C_CLUSTERS * n
    if name in ("improved", "ft-improved"):
        return C_CLUSTERS * n + n * TOPK
    plan = name.split("-", 1)[1]
    if plan == "logsparse":     # self + one summary per dyadic span before and after
        i = np.arange(n, dtype=np.int64)
        pc = lambda x: np.array([bin(t).count("1") for t in x])  # noqa: E731
        return int(n + pc(i).sum() + pc(n - 1 - i).sum())
    s = int(np.ceil(np.sqrt(n)))
    rows = -(-n // s)
    if plan in ("fixed", "axial"):      # own block/row directly, one summary per other one
        return n * (s + rows - 1)
    return n * (s + rows - 1 + 2 * (s - 1) + 2 * (rows - 1))   # mixture: row + column + partial cells


# ----------------------------------------------------------------------------- timing
def time_group(n, threads, heads, d, names, repeats, budget, log):
    q, k, v, dout = make_data(n, heads, d)
    cases = []
    for name in names:
        fwd, setup, bwd = method_fns(name, q, k, v, dout)
        cases.append((name + " fwd", lambda: None, lambda _, f=fwd: f()))
        cases.append((name + " bwd", setup, bwd))
    set_threads(threads)
    t0 = time.perf_counter()
    median_times(cases, 1)                       # warm-up (lazy initialisations)
    cost = time.perf_counter() - t0
    reps = int(max(3, min(repeats, budget // max(cost, 1e-9))))
    log(f"n={n} threads={threads}: warm-up round {cost:.1f} s, {reps} timed rounds")
    return median_times(cases, reps), reps


# ----------------------------------------------------------------------------- memory
MEM_CHILD = r"""
import json, os, resource, sys
sys.path.insert(0, {here!r})
import suite
name, n, heads, d, mode = {name!r}, {n}, {heads}, {d}, {mode!r}
if name in suite.PEERS:
    import torch
def rss():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
def hwm():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024
reset = True
try:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
except OSError:
    reset = False
base = rss()
q, k, v, dout = suite.make_data(n, heads, d)
if mode == 'fwd':          # the forward's inputs are q, k, v: drop dout and restart the peak
    dout = suite.np.zeros((1, 1, 1, d), suite.np.float32)
    if reset:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
fwd, setup, bwd = suite.method_fns(name, q, k, v, dout)
if mode == 'fwd':
    out = fwd()
    io = q.nbytes * 4
else:
    out = setup()
    grads = bwd(out)
    io = q.nbytes * 8      # q, k, v, dout, out, dq, dk, dv
peak = hwm() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(extra=peak - base, io=io, reset=reset)))
"""


def measure_memory(name, n, heads, d, mode, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code = MEM_CHILD.format(here=HERE, name=name, n=n, heads=heads, d=d, mode=mode)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "failed"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- accuracy
def clustered_data(n, heads, d, centres=16, spread=0.5, seed=0):
    """q and k drawn around `centres` shared random centroids (|μ|² ≈ d), v Gaussian."""
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal((heads, centres, d))
    lq, lk = rng.integers(0, centres, (2, heads, n))
    pick = lambda lab: np.take_along_axis(mu, lab[..., None], axis=1)  # noqa: E731
    q = pick(lq) + spread * rng.standard_normal((heads, n, d))
    k = pick(lk) + spread * rng.standard_normal((heads, n, d))
    v = rng.standard_normal((heads, n, d))
    return tuple(x[None].astype(np.float32) for x in (q, k, v))


def exact_key_sets(name, q, k, v):
    """(output, bool (heads, n, n) mask of the keys each query computes exactly, or None)."""
    heads, n = q.shape[1], q.shape[2]
    rows = np.arange(n)
    if name == "local":
        out = ra.local_attention(q, k, v, LOCAL_WINDOW)
        blk = rows // LOCAL_WINDOW
        return out, np.broadcast_to(np.abs(blk[:, None] - blk[None, :]) <= 1, (heads, n, n))
    if name == "routing":
        c, w = routing_shape(n)
        layer = ra.RoutingAttention(n_clusters=c, w=w, kmeans_iters=10)
        out = layer(q, k, v)
        mask = np.zeros((heads, n, n), bool)
        for h in range(heads):
            for qi, ki in zip(layer.q_idx[0, h], layer.k_idx[0, h]):
                qi, ki = qi[qi >= 0], ki[ki >= 0]
                mask[h][np.ix_(qi, ki)] = True
        return out, mask
    if name in ("clustered", "improved"):
        layer = ra.ClusteredAttention(C_CLUSTERS, bits=BITS, iterations=ITERS,
                                      topk=TOPK if name == "improved" else None)
        out = layer(q, k, v)
        if name == "clustered":
            return out, None        # every key weighted by its cluster's centroid, none exact
        mask = np.zeros((heads, n, n), bool)
        for h in range(heads):
            top, _ = ra.reference.improved_clustered_selection(q[0, h], k[0, h], layer.labels[0, h],
                                                               C_CLUSTERS, TOPK)
            mask[h] = top[layer.labels[0, h]]
        return out, mask
    plan = name.split("-", 1)[1]
    out = ra.combiner_attention(q, k, v, plan=plan, causal=False)
    s = int(np.ceil(np.sqrt(n)))
    if plan == "logsparse":
        m = np.eye(n, dtype=bool)
    elif plan in ("fixed", "axial"):
        m = (rows[:, None] // s) == (rows[None, :] // s)
    else:
        m = ((rows[:, None] // s) == (rows[None, :] // s)) | ((rows[:, None] % s) == (rows[None, :] % s))
    return out, np.broadcast_to(m, (heads, n, n))


def accuracy(n, heads, d, log):
    methods = ("local", "routing", "clustered", "improved") + tuple("combiner-" + p for p in PLANS)
    res = {}
    for data_name, data in (("random", make_data(n, heads, d, seed=3)[:3]),
                            ("clustered", clustered_data(n, heads, d))):
        q, k, v = data
        q64, k64, v64 = (x.astype(np.float64) for x in data)
        exact = ra.attention(q64, k64, v64)
        res.setdefault("scale", {})[data_name] = float(np.linalg.norm(exact) / np.linalg.norm(v64))
        sc = 1 / np.sqrt(d)
        probs = []
        for h in range(heads):            # dense softmax rows, one head at a time
            s = sc * (q64[0, h] @ k64[0, h].T)
            p = np.exp(s - s.max(1, keepdims=True))
            probs.append(p / p.sum(1, keepdims=True))
        for name in methods:
            log(f"accuracy: {data_name} data, {name}")
            out, mask = exact_key_sets(name, q, k, v)
            err = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
            row = {"rel_err": err}
            if mask is not None:
                mass, best, count = [], [], []
                for h in range(heads):
                    p, mk = probs[h], mask[h]
                    cnt = mk.sum(1)
                    mass.append((p * mk).sum(1))
                    srt = -np.sort(-p, axis=1).cumsum(1)
                    best.append(srt[rows_idx(n), np.maximum(cnt, 1) - 1] * (cnt > 0))
                    count.append(cnt)
                mass, best, count = map(np.concatenate, (mass, best, count))
                row.update(mass=float(mass.mean()), mass_p10=float(np.percentile(mass, 10)),
                           best=float(best.mean()), keys=float(count.mean()),
                           random=float(count.mean() / n))
            res.setdefault(data_name, {})[name] = row
    return res


def rows_idx(n):
    return np.arange(n)


# ----------------------------------------------------------------------------- report
def fmt_ms(x):
    return "—" if x is None else (f"{x * 1e3:.2f}" if x < 0.01 else f"{x * 1e3:.1f}" if x < 1 else f"{x * 1e3:.0f}")


def series(R, name, kind, threads):
    """(ns, times, extrapolated flags) of one case."""
    ns, ts, ex = [], [], []
    for n in R["ns"]:
        e = R["time"].get(f"{threads}|{n}|{name} {kind}")
        if e is not None:
            ns.append(n)
            ts.append(e["t"])
            ex.append(e.get("extrap", False))
    return ns, ts, ex


def render(R):
    L = []
    ns, thr = R["ns"], R["threads"]
    L += [MARKER, "", "# Benchmark suite: every method against the peers", "",
          f"Command: `{R['command']}`  ", f"Run: {R['date']}, {R['wall'] / 60:.1f} min wall time.", "",
          f"Machine: {R['machine']}.  torch {R['torch']}.", "",
          "Measured fp32 FMA peak: " + ", ".join(f"{t} thread(s) {R['peak'][str(t)]:.0f} GFLOP/s" for t in thr) + ".",
          "",
          f"Shapes: B=1, H={R['heads']}, d=e={R['d']}, float32, non-causal.  local: window {LOCAL_WINDOW} "
          f"(each block of {LOCAL_WINDOW} queries sees its own and both neighbouring blocks; local-attention "
          f"with look_backward=look_forward=1, no rotary embedding).  routing: c=round(√n) clusters, w=n//c "
          "members, RoutingAttention layer in training mode (normalise, centroid scores, balanced top-w "
          "membership, attention, EMA centroid update: routing decisions are timed) vs routing-transformer's "
          "KmeansAttention(c, w) in training mode; our centroids start from random key rows (the "
          "k-means++ initialisation is a one-off cost and not timed).  clustered / improved: "
          f"ClusteredAttention layer, C={C_CLUSTERS}, {BITS}-bit LSH + {ITERS} Hamming k-means iterations "
          f"(timed), top-k={TOPK}.  Combiner: default block ⌈√n⌉, causal=False.  Backward = gradients "
          "(dq, dk, dv) for a given dout after a forward that is not timed (ours: the layer's backward; "
          "torch: autograd `backward`; our dense backward gets the forward's lse and output as torch's "
          "autograd keeps them).", "",
          "Peers: " + "; ".join(f"{p} ({PEERS[p][1]}) vs {PEERS[p][0]}: "
                                 + (R['peers'].get(p, "not selected") or "run") for p in PEERS) + ".", "",
          "Timing: for each n and thread count all cases run once (warm-up), then interleaved rounds "
          "(ours and theirs alternate, order reversed every other round); medians.  "
          f"Dense O(n²) cases above n={R['max_dense_n']} are **extrapolated** as t(n₀)·(n/n₀)² from the "
          "largest measured n₀ and marked *extrap.*", ""]
    if R.get("note"):
        L += [R["note"], ""]
    # --- time tables
    for t in thr:
        L += [f"## Time at {t} thread(s), milliseconds (median; rounds per n: "
              + ", ".join(f"n={n}: {R['reps'].get(f'{t}|{n}', '—')}" for n in ns) + ")", "",
              "| method | " + " | ".join(f"fwd n={n}" for n in ns) + " | " + " | ".join(f"bwd n={n}" for n in ns)
              + " | exponent fwd / bwd |", "|---" * (2 * len(ns) + 2) + "|"]
        for name in R["names"]:
            cells = []
            expo = []
            for kind in ("fwd", "bwd"):
                for n in ns:
                    e = R["time"].get(f"{t}|{n}|{name} {kind}")
                    cells.append("—" if e is None else fmt_ms(e["t"]) + (" *extrap.*" if e.get("extrap") else ""))
                sn, st, sx = series(R, name, kind, t)
                real = [(a, b) for a, b, x in zip(sn, st, sx) if not x and a >= 4096]
                expo.append(f"{fit_exponent([a for a, _ in real], [b for _, b in real]):.2f}" if len(real) >= 2 else "—")
            label = name if name in OURS else f"{name} (peer)"
            L.append(f"| {label} | " + " | ".join(cells) + f" | {expo[0]} / {expo[1]} |")
        L += ["", "Exponent: least-squares slope of log t on log n over the measured (not extrapolated) "
              "n ≥ 4096.", ""]
    # --- speed-ups
    t2 = R.get("report_threads") or thr[0]
    L += [f"## Speed-up at {t2} thread(s) (the steadier thread count on a shared machine)", "",
          "Over dense torch SDPA (SDPA time / ours; *extrap.* where SDPA is extrapolated), and over the "
          "method's own peer where one ran (peer time / ours).  > 1 means ours is faster.", "",
          "| method | " + " | ".join(f"vs SDPA fwd / bwd n={n}" for n in ns) + " | vs peer fwd / bwd (n: ratio) |",
          "|---" * (len(ns) + 2) + "|"]
    for name in [x for x in R["names"] if x in OURS]:
        cells = []
        for n in ns:
            parts, ex = [], False
            for kind in ("fwd", "bwd"):
                a, b = R["time"].get(f"{t2}|{n}|{name} {kind}"), R["time"].get(f"{t2}|{n}|sdpa {kind}")
                if a is None or b is None:
                    parts.append("—")
                else:
                    parts.append(f"{b['t'] / a['t']:.1f}×")
                    ex |= bool(b.get("extrap") or a.get("extrap"))
            cells.append(" / ".join(parts) + (" *extrap.*" if ex else ""))
        peer = [p for p, (m, _) in PEERS.items()
                if m == name and p != "sdpa" and p in R["peers"]]
        pc = []
        for p in peer:
            if R["peers"][p]:
                pc.append(f"{p}: {R['peers'][p]}")
                continue
            for n in ns:
                a, b = R["time"].get(f"{t2}|{n}|{name} fwd"), R["time"].get(f"{t2}|{n}|{p} fwd")
                a2, b2 = R["time"].get(f"{t2}|{n}|{name} bwd"), R["time"].get(f"{t2}|{n}|{p} bwd")
                if a and b and a2 and b2:
                    pc.append(f"{p} n={n}: {b['t'] / a['t']:.1f}× / {b2['t'] / a2['t']:.1f}×")
        L.append(f"| {name} | " + " | ".join(cells) + " | " + ("; ".join(pc) or "—") + " |")
    if len(thr) > 1:
        L += ["", f"## Thread scaling: time at {thr[0]} thread / time at {thr[-1]} threads (same run)", "",
              "| method | " + " | ".join(f"fwd / bwd n={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
        for name in R["names"]:
            cells = []
            for n in ns:
                parts = []
                for kind in ("fwd", "bwd"):
                    a, b = R["time"].get(f"{thr[0]}|{n}|{name} {kind}"), R["time"].get(f"{thr[-1]}|{n}|{name} {kind}")
                    parts.append("—" if not a or not b or a.get("extrap") else f"{a['t'] / b['t']:.2f}")
                cells.append(" / ".join(parts))
            L.append(f"| {name} | " + " | ".join(cells) + " |")
    # --- GFLOP/s
    L += ["", f"## Throughput at {t2} thread(s), forward GFLOP/s (FLOP model below) and % of the measured peak", "",
          "FLOP model: 4·d·P per head forward (q·k and p·v, 2 FLOPs per multiply-add), where P is the number "
          "of logits the method evaluates: dense n²; local Σ_blocks |queries|·|keys| (≈ 3·256·n); routing "
          "c·w² (the cluster products; centroid scores, top-w selection and the EMA update are extra work "
          "not counted); clustered C·n (centroid queries × all keys; hashing and k-means not counted); "
          "improved C·n + n·topk; Combiner n·(direct keys + region summaries) per query (fixed/axial: "
          "√n + n/√n; logsparse: 1 + set bits of i and n−1−i; mixture ≈ 3(√n + n/√n)), region-internal "
          "softmaxes not counted.  Sparse figures are therefore *effective* rates of that model, not "
          "hardware counts; only the dense row is directly comparable with the peak.", "",
          "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
    pk = R["peak"][str(t2)]
    for name in R["names"]:
        cells = []
        for n in ns:
            e = R["time"].get(f"{t2}|{n}|{name} fwd")
            if e is None or e.get("extrap"):
                cells.append("—")
                continue
            gf = 4.0 * R["d"] * R["heads"] * logits_count(name, n) / e["t"] / 1e9
            cells.append(f"{gf:.0f} ({100 * gf / pk:.0f} %)")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    # --- memory
    if R.get("memory"):
        L += ["", "## Peak memory (fresh subprocess per case, 2 threads)", "",
              "Extra MiB = peak resident set (VmHWM, reset after the imports) minus the resident set before "
              "the inputs were made; ratio = extra / (inputs + outputs): forward q, k, v, out; "
              "forward+backward q, k, v, out, dout, dq, dk, dv.  A ratio near 1 means no working memory "
              "beyond the arrays themselves.", "",
              "| method | " + " | ".join(f"fwd n={n}" for n in ns) + " | " + " | ".join(f"fwd+bwd n={n}" for n in ns) + " |",
              "|---" * (2 * len(ns) + 1) + "|"]
        for name in R["names"]:
            cells = []
            for mode in ("fwd", "bwd"):
                for n in ns:
                    m = R["memory"].get(f"{n}|{name}|{mode}")
                    if m is None:
                        cells.append("not run")
                    elif "error" in m:
                        cells.append("failed")
                    else:
                        cells.append(f"{m['extra'] / 2**20:.0f} MiB ({m['extra'] / m['io']:.2f}×)")
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L += ["", f"Not run: dense O(n²) cases above n={R['max_dense_n']} (time), and peers not installed."]
    # --- accuracy
    if R.get("accuracy"):
        A = R["accuracy"]
        L += ["", f"## Accuracy against exact dense attention (n={R['acc_n']}, H={R['heads']}, d={R['d']})", "",
              "(a) random: q, k, v i.i.d. N(0, 1).  (b) clustered: q and k drawn around 16 shared centroids "
              "μ ~ N(0, I_d) with noise 0.5·N(0, I_d) (each query's large weights sit on the keys of its own "
              "centroid), v ~ N(0, 1).  Error = ‖O − O_dense‖_F / ‖O_dense‖_F, O_dense exact in float64.  "
              "Mass = mean over queries of the dense softmax mass on the keys the method computes exactly "
              "(routing: the keys of the clusters the query is in; local: its three blocks; improved: its "
              "cluster's top-k keys; Combiner: its direct keys; clustered: none, every key gets its cluster "
              "centroid's weight).  p10 = 10th percentile over queries.  Best = mass of the same number of "
              "the query's largest weights (an oracle); random = keys / n.  Routing uses the layer's own "
              "spherical k-means initialisation (10 iterations) here.  ‖O_dense‖_F / ‖V‖_F = "
              f"{A['scale']['random']:.3f} (random) and {A['scale']['clustered']:.3f} (clustered): on random "
              "data the exact output averages many values and is small, so an approximation that keeps a "
              "few keys can have a relative error above 1.", "",
              "| method | keys / query | error (a) random | mass (a) | p10 (a) | best (a) | random (a) | "
              "error (b) clustered | mass (b) | p10 (b) | best (b) | random (b) |", "|---" * 12 + "|"]
        for name in A["random"]:
            a, b = A["random"][name], A["clustered"][name]
            f = lambda r, key: "—" if key not in r else f"{r[key]:.3f}"  # noqa: E731
            keys = "all (approx.)" if "keys" not in a else f"{a['keys']:.0f}"
            L.append(f"| {name} | {keys} | {a['rel_err']:.3f} | {f(a, 'mass')} | {f(a, 'mass_p10')} | "
                     f"{f(a, 'best')} | {f(a, 'random')} | {b['rel_err']:.3f} | {f(b, 'mass')} | "
                     f"{f(b, 'mass_p10')} | {f(b, 'best')} | {f(b, 'random')} |")
    if R.get("plots"):
        L += ["", "## Plots", ""] + [f"![{p}](plots/{p})" for p in R["plots"]]
    return "\n".join(L) + "\n"


def plot(R, outdir):
    """The plots' file names, written into outdir; none without matplotlib (said on stderr:
    the tables need no plots)."""
    try:
        import matplotlib
    except ImportError:
        print("[suite] plots skipped: matplotlib is not installed (pip install -e \".[bench]\")",
              file=sys.stderr, flush=True)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(outdir, exist_ok=True)
    t = R.get("report_threads") or R["threads"][0]
    names = R["names"]
    cmap = plt.get_cmap("tab20")
    color = {nm: cmap(i % 20) for i, nm in enumerate(names)}
    style = lambda nm: "--" if nm in PEERS else "-"  # noqa: E731
    files = []

    # 1. time vs n
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), sharey=True)
    for ax, kind in zip(axes, ("fwd", "bwd")):
        for nm in names:
            ns, ts, ex = series(R, nm, kind, t)
            if not ns:
                continue
            real = [(a, b) for a, b, x in zip(ns, ts, ex) if not x and a >= 4096]
            p = fit_exponent([a for a, _ in real], [b for _, b in real]) if len(real) >= 2 else float("nan")
            lab = f"{nm}{' (peer)' if nm in PEERS else ''}  p={p:.2f}"
            ax.loglog(ns, np.array(ts) * 1e3, style(nm), marker="o", color=color[nm], label=lab)
            for a, b, x in zip(ns, ts, ex):
                if x:
                    ax.plot([a], [b * 1e3], marker="o", mfc="white", mec=color[nm], ms=10)
        ax.set_title(f"{'forward' if kind == 'fwd' else 'backward'}, {t} thread(s)")
        ax.set_xlabel("sequence length n")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left", title="time ∝ n^p (fit n ≥ 4096)", title_fontsize=8)
    axes[0].set_ylabel("time per call [ms]")
    fig.suptitle(f"Time vs n (B=1, H={R['heads']}, d={R['d']}, fp32; dashed = peer; "
                 "hollow ring = extrapolated O(n²))")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "time_vs_n.png"), dpi=110)
    plt.close(fig)
    files.append("time_vs_n.png")

    # 2. speed-up over SDPA
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    for ax, kind in zip(axes, ("fwd", "bwd")):
        sn, st, sx = series(R, "sdpa", kind, t)
        sd = dict(zip(sn, zip(st, sx)))
        for nm in names:
            if nm == "sdpa":
                continue
            ns, ts, ex = series(R, nm, kind, t)
            pts = [(n, sd[n][0] / tt, sd[n][1] or x) for n, tt, x in zip(ns, ts, ex) if n in sd]
            if not pts:
                continue
            ax.loglog([a for a, _, _ in pts], [b for _, b, _ in pts], style(nm), marker="o",
                      color=color[nm], label=nm + (" (peer)" if nm in PEERS else ""))
            for a, b, x in pts:
                if x:
                    ax.plot([a], [b], marker="o", mfc="white", mec=color[nm], ms=10)
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{'forward' if kind == 'fwd' else 'backward'}, {t} thread(s)")
        ax.set_xlabel("sequence length n")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7.5, loc="upper left")
    axes[0].set_ylabel("speed-up over torch SDPA (SDPA time / time)")
    fig.suptitle("Speed-up over dense torch SDPA (hollow ring: SDPA or dense time extrapolated as n²)")
    fig.tight_layout()
    fig.savefig(os.path.join(outdir, "speedup_vs_sdpa.png"), dpi=110)
    plt.close(fig)
    files.append("speedup_vs_sdpa.png")

    # 3. memory vs n
    if R.get("memory"):
        fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
        for ax, mode in zip(axes, ("fwd", "bwd")):
            io = {}
            for nm in names:
                pts = [(n, R["memory"][f"{n}|{nm}|{mode}"]) for n in R["ns"]
                       if "extra" in R["memory"].get(f"{n}|{nm}|{mode}", {})]
                if not pts:
                    continue
                for n, m in pts:
                    io[n] = m["io"]
                ax.loglog([n for n, _ in pts], [max(m["extra"], 1) / 2**20 for _, m in pts], style(nm),
                          marker="o", color=color[nm], label=nm + (" (peer)" if nm in PEERS else ""))
            if io:
                xs = sorted(io)
                ax.loglog(xs, [io[x] / 2**20 for x in xs], "k:", lw=2.5, label="inputs + outputs")
            ax.set_xscale("log", base=2)
            ax.set_title("forward" if mode == "fwd" else "forward + backward")
            ax.set_xlabel("sequence length n")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7.5, loc="upper left")
        axes[0].set_ylabel("peak memory above baseline [MiB]")
        fig.suptitle(f"Peak memory vs n (fresh process per case, B=1, H={R['heads']}, d={R['d']}, fp32)")
        fig.tight_layout()
        fig.savefig(os.path.join(outdir, "memory_vs_n.png"), dpi=110)
        plt.close(fig)
        files.append("memory_vs_n.png")
    return files


def write_markdown(R, path):
    head = ""
    if os.path.exists(path):
        with open(path) as f:
            head = f.read().split(MARKER)[0]
    with open(path, "w") as f:
        f.write(head.rstrip() + ("\n\n" if head.strip() else "") + render(R))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    ap.add_argument("--methods", nargs="+", default=list(OURS) + list(PEERS),
                    help="subset of: " + " ".join(OURS + tuple(PEERS)))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per group (at most)")
    ap.add_argument("--round-budget", type=float, default=30.0,
                    help="seconds of timed rounds per (n, threads) group; rounds >= 3")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--max-dense-n", type=int, default=16384)
    ap.add_argument("--acc-n", type=int, default=4096)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: n 1024 4096, 2 threads, 3 rounds, accuracy at n=1024, "
                         "memory at n=4096; writes into a temporary folder unless --json, "
                         "--output or --plots name places (the committed results stay as they are)")
    ap.add_argument("--json", default=None, help=f"raw results (default {DEFAULT_JSON})")
    ap.add_argument("--output", default=None, help="Markdown file, the part after the suite "
                    f"marker is replaced (default {DEFAULT_MD})")
    ap.add_argument("--plots", default=None, help=f"folder of the plots (default {PLOT_DIR})")
    ap.add_argument("--replot", action="store_true", help="only re-render tables and plots from --json")
    ap.add_argument("--note", default="", help="a remark printed under the header (e.g. machine load)")
    args = ap.parse_args(argv)
    if args.quick and not args.replot:
        # a smoke run never replaces the committed headline results
        scratch = tempfile.mkdtemp(prefix="ra-suite-quick-")
        defaults = dict(json=os.path.join(scratch, "suite_results.json"),
                        output=os.path.join(scratch, "RESULTS.md"),
                        plots=os.path.join(scratch, "plots"))
    else:
        defaults = dict(json=DEFAULT_JSON, output=DEFAULT_MD, plots=PLOT_DIR)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    log = lambda msg: print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    if args.replot:
        with open(args.json) as f:
            R = json.load(f)
        if args.note:
            R["note"] = args.note
        R["plots"] = plot(R, args.plots)
        write_markdown(R, args.output)
        log(f"wrote {args.output} and {R['plots']}")
        return 0

    if args.quick:
        args.ns, args.threads, args.repeats, args.acc_n = [1024, 4096], [2], 3, 1024
    bad = [m for m in args.methods if m not in OURS and m not in PEERS]
    if bad:
        ap.error(f"unknown methods {bad}")
    start = time.time()
    status = peer_status()
    torch = try_import_torch()
    names = [m for m in args.methods if m in OURS or status.get(m) is None]
    R = dict(command="PYTHONPATH=. python benchmarks/suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             date=time.strftime("%Y-%m-%d %H:%M"), machine=machine_description(),
             torch=torch.__version__ if torch else "not installed", ns=args.ns, threads=args.threads,
             heads=args.heads, d=args.d, max_dense_n=args.max_dense_n, acc_n=args.acc_n, note=args.note,
             peers={p: status[p] for p in PEERS if p in args.methods}, names=names, time={}, reps={},
             memory={}, accuracy=None)
    for p, why in R["peers"].items():
        if why:
            log(f"peer {p}: {why}")
    log("measuring the fp32 FMA peak")
    R["peak"] = {str(t): fp32_peak_gflops(t) for t in args.threads}
    for n in args.ns:
        for t in args.threads:
            run = [m for m in names if not (m in DENSE and n > args.max_dense_n)]
            med, reps = time_group(n, t, args.heads, args.d, run, args.repeats, args.round_budget, log)
            R["reps"][f"{t}|{n}"] = reps
            for key, val in med.items():
                R["time"][f"{t}|{n}|{key}"] = {"t": val}
            for m in names:
                if m in DENSE and n > args.max_dense_n:
                    for kind in ("fwd", "bwd"):
                        n0 = max([x for x in args.ns if x <= args.max_dense_n], default=None)
                        e = R["time"].get(f"{t}|{n0}|{m} {kind}")
                        if e is not None:
                            R["time"][f"{t}|{n}|{m} {kind}"] = {"t": e["t"] * (n / n0) ** 2, "extrap": True}
            log("  " + ", ".join(f"{k} {fmt_ms(v)}" for k, v in med.items()))
            with open(args.json, "w") as f:
                json.dump(R, f, indent=1)
    if not args.no_memory:
        mem_ns = [4096] if args.quick else args.ns
        for n in mem_ns:
            for m in names:
                if m in DENSE and n > args.max_dense_n:
                    continue
                for mode in ("fwd", "bwd"):
                    R["memory"][f"{n}|{m}|{mode}"] = r = measure_memory(m, n, args.heads, args.d, mode, 2)
                    log(f"memory n={n} {m} {mode}: " + (r.get("error") or f"{r['extra'] / 2**20:.0f} MiB"
                                                       f" ({r['extra'] / r['io']:.2f}× io)"))
        with open(args.json, "w") as f:
            json.dump(R, f, indent=1)
    if not args.no_accuracy:
        set_threads(max(args.threads))
        R["accuracy"] = accuracy(args.acc_n, args.heads, args.d, log)
    R["wall"] = time.time() - start
    with open(args.json, "w") as f:
        json.dump(R, f, indent=1)
    R["plots"] = plot(R, args.plots)
    write_markdown(R, args.output)
    log(f"done in {R['wall'] / 60:.1f} min; wrote {args.output}, {args.json} and {R['plots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
