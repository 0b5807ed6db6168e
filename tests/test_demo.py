"""The main job, `python -m routing_attention`, at a tiny size."""
import re
import time

import numpy as np

import routing_attention as ra

from routing_attention import __main__ as demo

METHODS = ["dense (exact)", "local", "routing", "clustered", "improved clustered",
           "combiner fixed", "combiner axial", "combiner logsparse", "combiner mixture"]


def parse_table(text):
    """{method name: (ms, × dense, difference from dense, peak MiB or None, mass kept)} from
    the printed table (percentages as fractions)."""
    rows = {}
    pat = re.compile(r"^(.+?)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)%\s+([0-9.]+)%\s+([0-9.]+|n/a)$")
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            name, t, sp, kept, err, mem = m.groups()
            rows[name.strip()] = (float(t), float(sp), float(err) / 100,
                                  None if mem == "n/a" else float(mem), float(kept) / 100)
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
    for name, (ms, speedup, err, mem, kept) in rows.items():
        assert ms > 0 and speedup > 0 and np.isfinite(err) and 0 < kept <= 1
        assert mem is None or mem >= 0
    assert rows[names[1]][4] < 1 and rows[names[2]][4] < 1     # local, routing: sparse
    assert "mass kept:" in out and "routing (c, w):" in out    # the legend explains them
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


def test_mass_kept_is_the_dense_mass_on_the_reached_keys():
    rng = np.random.default_rng(0)
    q, k = (rng.standard_normal((1, 1, 64, 8)) for _ in range(2))
    everything = demo.mass_kept(q, k, lambda h, i: np.arange(64))
    nothing = demo.mass_kept(q, k, lambda h, i: np.arange(0))
    assert abs(everything - 1) < 1e-12 and nothing == 0
    half = demo.mass_kept(q, k, lambda h, i: np.arange(32), sample=64)
    p = ra.reference.attention(q, k, np.eye(64)[None, None])[0, 0]   # rows of weights
    assert abs(half - p[:, :32].sum(-1).mean()) < 1e-12


def test_cli_rejects_bad_arguments(capsys):
    import pytest
    for argv in (["--n", "-5"], ["--n", "0"], ["--heads", "0"], ["--threads", "100000"],
                 ["--n", "many"]):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv)
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error: argument" in err and "Traceback" not in err, (argv, err)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--version"])
    assert exc.value.code == 0 and ra.__version__ in capsys.readouterr().out
