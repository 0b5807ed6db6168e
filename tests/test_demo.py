"""The main job, `python -m routing_attention`, at a tiny size."""
import re
import time

import numpy as np

import routing_attention as ra

from routing_attention import __main__ as demo

METHODS = ["dense (exact)", "local", "routing", "clustered", "improved clustered",
           "combiner fixed", "combiner axial", "combiner logsparse", "combiner mixture"]


def parse_table(text):
    """{method name: (ms, × dense, rel. error, peak MiB or None)} from the printed table."""
    rows = {}
    pat = re.compile(r"^(.+?)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.e+-]+)\s+([0-9.]+|n/a)$")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            name, t, sp, err, mem = m.groups()
            rows[name.strip()] = (float(t), float(sp), float(err), None if mem == "n/a" else float(mem))
    return rows


def test_demo_main_prints_a_table_of_every_method(capsys):
    threads = ra.get_num_threads()
    t0 = time.perf_counter()
    try:     # one thread: quick and steady even when the other cores are busy
        code = demo.main(["--quiet", "--threads", "1"], n=256, heads=2)
    finally:
        ra.set_num_threads(threads)
    assert time.perf_counter() - t0 < 5
    assert code == 0
    out = capsys.readouterr().out
    assert "n=256" in out and "OK" in out
    rows = parse_table(out)
    names = list(rows)
    assert len(names) == len(METHODS)
    for want, got in zip(METHODS, names):
        assert got.startswith(want), (want, got)
    dense = rows[names[0]]
    assert dense[1] == 1.0 and dense[2] == 0.0            # dense is its own baseline
    for name, (ms, speedup, err, mem) in rows.items():
        assert ms > 0 and speedup > 0 and np.isfinite(err)
        assert mem is None or mem >= 0
    # improved clustered attention recomputes the top keys exactly: closer to dense than plain
    assert rows[names[4]][2] < rows[names[3]][2]
    # routing clusters the keys of each topic together: far better than chance on this data
    assert rows[names[2]][2] < 1.0


def test_run_demo_rows_agree_with_their_own_definitions():
    threads = ra.get_num_threads()
    ra.set_num_threads(1)
    try:
        rows, check = demo.run_demo(n=128, heads=1, repeats=1, progress=False)
    finally:
        ra.set_num_threads(threads)
    assert check < 1e-4
    base = rows[0]["seconds"]
    for r in rows:
        assert abs(r["speedup"] - base / r["seconds"]) < 1e-9
        assert r["rel_err"] >= 0
