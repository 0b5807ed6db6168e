"""Make examples/RESULTS.md's numbers and examples/plots/*.png: every attention of char_lm.py
trained for the same steps at one reduced configuration, then routing vs rt-lucidrains step
times at context 4096.  One command:

    python examples/run_results.py            # ~30-40 min on 2 cores
    python examples/run_results.py --report   # tables and plots again from examples/results/

Each run is its own process (so peak RSS is that run's), one after another.  The generated
part of RESULTS.md sits between the GENERATED markers; text outside them is kept.
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
SCRIPT = HERE / "char_lm.py"
OUT = HERE / "results"
PLOTS = HERE / "plots"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- BEGIN GENERATED (run_results.py) -->", "<!-- END GENERATED -->"

# label -> flags: every attention of char_lm.py, and routing with strictly causal (argmax)
# membership beside the paper's balanced clusters
RUNS = {a: ["--attention", a] for a in ("sdpa", "dense", "local", "routing", "combiner-fixed",
                                        "combiner-axial", "combiner-mixture", "rt-lucidrains")}
RUNS["routing-argmax"] = ["--attention", "routing", "--membership", "argmax"]
# the learning-curve runs: same model, data, seed and steps for every attention; one thread
# per run, because on 2 shared cores a 2-thread run stalls at every OpenMP barrier whenever
# another process holds a core (5-20x slower steps in trials)
TRAIN = ["--layers", "4", "--d-model", "128", "--heads", "4", "--context", "1024",
         "--window", "64", "--batch-size", "2", "--steps", "800", "--lr", "2e-3",
         "--warmup", "80", "--eval-every", "50", "--eval-windows", "16", "--log-every", "50",
         "--seed", "0", "--threads", "1", "--no-progress"]
# the speed check at context 4096: the script's default model (4 layers, d_model 256, 8 heads),
# window 128 = 32 clusters of 128; a few timed steps, routing and the peer alternated
TIMING = ["--context", "4096", "--window", "128", "--batch-size", "1", "--steps", "6",
          "--eval-every", "0", "--eval-windows", "1", "--log-every", "1000", "--threads", "1",
          "--no-progress"]
TIMING_PEERS = ("routing", "rt-lucidrains")
TIMING_ROUNDS = 2


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in
                pathlib.Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) \
        if pathlib.Path("/proc/cpuinfo").exists() else platform.processor()
    import torch
    return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, platform=platform.platform())


def load_average():
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run(flags, log):
    """One char_lm.py process; its output streams through; returns its JSON record."""
    cmd = [sys.executable, str(SCRIPT), *flags, "--log-json", str(log)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(log.read_text())


def train_all():
    meta = dict(machine=machine(), started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                load_before=load_average())
    for label, flags in RUNS.items():
        run(TRAIN + flags, OUT / f"{label}.json")
    for r in range(TIMING_ROUNDS):
        for attention in TIMING_PEERS:
            run(TIMING + ["--attention", attention], OUT / f"timing4096-{attention}-{r}.json")
    meta.update(finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                load_after=load_average())
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1))


def plot(records):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for attention, rec in records.items():
        evals = rec["evals"]
        bpc = [e["val_bpc"] for e in evals]
        style = dict(label=attention, lw=1.4, ls="--" if attention == "dense" else "-")
        by_step.plot([e["step"] for e in evals], bpc, **style)
        by_time.plot([e["train_seconds"] for e in evals], bpc, **style)
    by_step.set(xlabel="training step", ylabel="held-out bits / char", title="vs step")
    by_time.set(xlabel="training seconds (eval excluded; shared, loaded machine)",
                title="vs wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.suptitle("char_lm.py on the Python standard library: " + " ".join(TRAIN[:10]))
    fig.tight_layout()
    PLOTS.mkdir(exist_ok=True)
    fig.savefig(PLOTS / "learning_curves.png", dpi=110)


def timing_table():
    """Median step seconds per timing run, and the routing / peer speed ratio per round."""
    rows, ratios, attention_ratios = [], [], []
    for r in range(TIMING_ROUNDS):
        step, attention_s = {}, {}
        for attention in TIMING_PEERS:
            rec = json.loads((OUT / f"timing4096-{attention}-{r}.json").read_text())
            step[attention] = rec["median_step_seconds"]
            attention_s[attention] = statistics.median(rec["attention_seconds"][1:])
            rows.append(f"| {r + 1} | {attention} | {step[attention]:.2f} | "
                        f"{attention_s[attention]:.2f} | {rec['peak_rss_mib']:.0f} |")
        ratios.append(step["rt-lucidrains"] / step["routing"])
        attention_ratios.append(attention_s["rt-lucidrains"] / attention_s["routing"])
    return rows, ratios, attention_ratios


def report():
    records = {a: json.loads((OUT / f"{a}.json").read_text()) for a in RUNS
               if (OUT / f"{a}.json").exists()}
    meta = json.loads((OUT / "meta.json").read_text())
    plot(records)
    corpus = next(iter(records.values()))["corpus"]
    lines = [BEGIN, "", "Command: `python examples/run_results.py` (this file's tables, "
             "`plots/learning_curves.png`, and the JSON records in `results/`).", "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
             f"Python {meta['machine']['python']}, torch {meta['machine']['torch']}; run "
             f"{meta['started']} to {meta['finished']}.  **Shared and loaded**: other "
             "sessions ran builds and test suites on the same 2 cores (load average "
             f"{meta['load_before'][0]:.1f} before, {meta['load_after'][0]:.1f} after), so "
             "timings are indicative only; rates come from the median step.", "",
             f"Corpus: {corpus['train_files']} train files ({corpus['train_bytes']:,} bytes), "
             f"{corpus['val_files']} held-out files ({corpus['val_bytes']:,} bytes).", "",
             "Training configuration (every attention): `python examples/char_lm.py "
             + " ".join(TRAIN) + " --attention A` (float32, one process, one thread; "
             "`routing-argmax` adds `--membership argmax`).", "",
             "| attention | held-out bits/char at the end | best | tokens/s | peak RSS MiB "
             "(before step 1) | attention share of step |", "|---|---|---|---|---|---|"]
    for attention, rec in records.items():
        evals = rec["evals"]
        lines.append(f"| {attention} | {evals[-1]['val_bpc']:.4f} | "
                     f"{min(e['val_bpc'] for e in evals):.4f} | {rec['tokens_per_second']:,.0f} | "
                     f"{rec['peak_rss_mib']:.0f} ({rec['rss_before_training_mib']:.0f}) | "
                     f"{100 * rec['attention_share']:.0f} % |")
    if {"routing", "local"} <= records.keys():
        pairs = list(zip(records["routing"]["evals"], records["local"]["evals"]))
        wins = sum(r["val_bpc"] <= l["val_bpc"] for r, l in pairs)
        lines += ["", f"routing (half local, half routing heads) vs local: held-out bits/char "
                  f"lower or equal at {wins} of {len(pairs)} evaluations; at the end "
                  f"{pairs[-1][0]['val_bpc']:.4f} vs {pairs[-1][1]['val_bpc']:.4f}."]
    if {"dense", "sdpa"} <= records.keys():
        d = [abs(a["val_bpc"] - b["val_bpc"]) for a, b in
             zip(records["dense"]["evals"], records["sdpa"]["evals"])]
        lines += ["", f"dense vs sdpa: largest held-out difference {max(d):.2e} bits/char over "
                  f"{len(d)} evaluations (same seed, float32)."]
    rows, ratios, attention_ratios = timing_table()
    lines += ["", "Speed at context 4096: `python examples/char_lm.py " + " ".join(TIMING)
              + " --attention A` (4 layers, d_model 256, 8 heads: 4 local + 4 routing heads, "
              "32 clusters of 128), median of steps 2-6, rounds alternated:", "",
              "| round | attention | median step s | median attention s (fwd + bwd) | peak RSS MiB |",
              "|---|---|---|---|---|", *rows, "",
              "rt-lucidrains / routing, whole training step: "
              + ", ".join(f"{x:.2f}x" for x in ratios)
              + f"; attention alone: " + ", ".join(f"{x:.2f}x" for x in attention_ratios)
              + ".", "", END]
    generated = "\n".join(lines)
    text = RESULTS.read_text() if RESULTS.exists() else f"# char_lm.py results\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    RESULTS.write_text(head + generated + rest.split(END, 1)[1])
    print(generated)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true",
                   help="only rebuild the tables and plots from examples/results/")
    args = p.parse_args()
    OUT.mkdir(exist_ok=True)
    if not args.report:
        train_all()
    report()


if __name__ == "__main__":
    main()
