"""What routing_attention.torch adds over the NumPy call it wraps, and whether a training
step mixing torch ops and ours oversubscribes the cores.

    python benchmarks/bench_torch_overhead.py [--output benchmarks/RESULTS_torch.md]

Part 1, per function (B=1, H=8, d=64, float32, one thread for both torch and the kernels):
the NumPy call (forward; forward + backward given its saved statistics) against the torch
op (forward; forward + autograd backward), interleaved, medians of `repeats` rounds.
Targets (issue 15): overhead <= 30 us per call at n=64 and <= 5 % at n=4096.
Part 2: a small model step (linear layers + our attention + backward + SGD) at
torch.set_num_threads(1) and (2); the kernels follow torch's thread count.
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch

import routing_attention as ra
import routing_attention.torch as rt


def timed(fn, reps):
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def cases(n):
    rng = np.random.default_rng(0)
    q, k, v, g = (rng.standard_normal((1, 8, n, 64), dtype=np.float32) for _ in range(4))
    c = max(1, round(n ** 0.5))
    q_idx, k_idx = ra.routing.local_members(n, n, max(1, n // c), False)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    tg = torch.from_numpy(g)
    ti, tj = torch.from_numpy(q_idx), torch.from_numpy(k_idx)

    def np_pair(fwd, bwd):
        def both():
            out, saved = fwd(return_saved=True)
            bwd(g, **saved)
        return (lambda: fwd()), both

    def torch_pair(fwd):
        def both():
            torch.autograd.grad(fwd(), (tq, tk, tv), tg)
        return (lambda: fwd().detach()), both

    yield ("attention",
           np_pair(lambda **kw: ra.attention(q, k, v, causal=True, **kw),
                   lambda d, **s: ra.attention_backward(d, q, k, v, **s)),
           torch_pair(lambda: rt.attention(tq, tk, tv, causal=True)))
    yield ("routing_attention",
           np_pair(lambda **kw: ra.routing_attention(q, k, v, q_idx, k_idx, **kw),
                   lambda d, **s: ra.routing_attention_backward(d, q, k, v, q_idx, k_idx, **s)),
           torch_pair(lambda: rt.routing_attention(tq, tk, tv, ti, tj)))
    yield ("combiner_attention",
           np_pair(lambda **kw: ra.combiner_attention(q, k, v, causal=True, **kw),
                   lambda d, **s: ra.combiner_attention_backward(d, q, k, v, **s)),
           torch_pair(lambda: rt.combiner_attention(tq, tk, tv, causal=True)))


def overhead_table(repeats):
    lines = ["| function | n | NumPy fwd | torch fwd | overhead fwd | NumPy fwd+bwd | "
             "torch fwd+bwd | overhead fwd+bwd | target met |", "|---" * 9 + "|"]
    for n, reps in ((64, 200), (4096, 2)):
        for name, (np_f, np_b), (t_f, t_b) in cases(n):
            for f in (np_f, np_b, t_f, t_b):
                f()                                             # warm-up
            rounds = {key: [] for key in ("nf", "nb", "tf", "tb")}
            for _ in range(repeats):                            # interleaved
                for key, f in (("nf", np_f), ("tf", t_f), ("nb", np_b), ("tb", t_b)):
                    rounds[key].append(timed(f, reps))
            m = {key: statistics.median(v) for key, v in rounds.items()}
            of, ob = m["tf"] - m["nf"], m["tb"] - m["nb"]
            if n == 64:
                met = of <= 30e-6 and ob <= 60e-6
                fmt = lambda s: f"{s * 1e6:.1f} us"             # noqa: E731
                ov = lambda o, base: f"{o * 1e6:+.1f} us"       # noqa: E731
            else:
                met = of <= 0.05 * m["nf"] and ob <= 0.05 * m["nb"]
                fmt = lambda s: f"{s * 1e3:.2f} ms"             # noqa: E731
                ov = lambda o, base: f"{100 * o / base:+.1f} %"  # noqa: E731
            lines.append(f"| {name} | {n} | {fmt(m['nf'])} | {fmt(m['tf'])} | {ov(of, m['nf'])} | "
                         f"{fmt(m['nb'])} | {fmt(m['tb'])} | {ov(ob, m['nb'])} | "
                         f"{'yes' if met else 'no'} |")
            print(lines[-1], flush=True)
    return lines


class Block(torch.nn.Module):
    def __init__(self, dim=256, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        y = rt.combiner_attention(q, k, v, causal=True).transpose(1, 2).flatten(2)
        x = x + self.proj(y)
        return x + self.mlp(x)


def step_times(repeats):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block() for _ in range(2)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 2048, 256)

    def step():
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        step()
    times = {1: [], 2: []}
    for _ in range(repeats):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times[threads].append(timed(step, 1))
    for threads in (1, 2):
        out[threads] = statistics.median(times[threads])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--output")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    torch.set_num_threads(1)
    lines = overhead_table(args.repeats)
    steps = step_times(args.repeats)
    summary = (f"Training step (2 blocks, dim 256, 4 heads, batch 4 x 2048, Combiner causal "
               f"attention, SGD): 1 thread {steps[1] * 1e3:.0f} ms, 2 threads "
               f"{steps[2] * 1e3:.0f} ms: x{steps[1] / steps[2]:.2f}.")
    print(summary)
    if args.output:
        with open(args.output, "w") as f:
            f.write("# routing_attention.torch: wrapper overhead and threads\n\n"
                    "Command: `python benchmarks/bench_torch_overhead.py --output "
                    "benchmarks/RESULTS_torch.md`.  torch " + torch.__version__ +
                    f", float32, B=1, H=8, d=64, one thread; medians of {args.repeats} "
                    f"interleaved rounds; load average at start {load:.2f}; "
                    f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')}.\n\n"
                    + "\n".join(lines) + "\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
