"""Byte-for-byte comparison of the C extension's outputs between two builds.

A refactor of csrc/ must not change one bit of any result.  This tool records, for every
call into routing_attention._ext, a digest of the inputs and a digest of the outputs;
two recordings (before and after a change) are then compared on the calls they share.
Keys are input digests, so the order of calls does not matter and calls with random
inputs that differ between runs are simply not compared; a call repeated with the same
inputs but different output bytes within one run is reported as VARIED.

    RA_BITCHECK=/tmp/before.json python -m pytest tests -q -p no:randomly   # the suite
    python tools/bitcheck.py shapes /tmp/before-shapes.json                 # benchmark shapes
    ... change and rebuild ...
    RA_BITCHECK=/tmp/after.json python -m pytest tests -q
    python tools/bitcheck.py shapes /tmp/after-shapes.json
    python tools/bitcheck.py compare /tmp/before.json /tmp/after.json

Set RA_SIMD (generic, avx2, avx512, ...) to record another kernel table.  To record a
build in another checkout (a git worktree), run from there with PYTHONPATH=<that checkout>:
`python tools/bitcheck.py` puts tools/, not the current directory, on sys.path.  tests/conftest.py
installs the recorder when RA_BITCHECK names an output file.
"""
import atexit
import hashlib
import json
import os
import sys

import numpy as np

NOT_RECORDED = {"build_info", "get_num_threads", "set_num_threads", "_fma_peak"}


def _digest(values):
    h = hashlib.sha256()
    for x in values:
        if isinstance(x, np.ndarray) or np.isscalar(x):
            a = np.asarray(x)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        else:
            h.update(repr(x).encode())
    return h.hexdigest()


def install(path):
    """Wrap every gufunc of routing_attention._ext; write the record to `path` at exit."""
    from routing_attention import _ext
    record, varied = {}, set()

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            result = fn(*args, **kwargs)
            inputs = [np.asarray(a) if hasattr(a, "__array__") else a for a in args]
            inputs += [(k, np.asarray(v) if hasattr(v, "__array__") else v)
                       for k, v in sorted(kwargs.items()) if k != "out"]
            # given outputs fix core sizes (a member list's width...): their shapes count
            given = kwargs.get("out", ())
            inputs += [("out", None if o is None else (o.shape, o.dtype.str))
                       for o in (given if isinstance(given, tuple) else (given,))]
            outputs = result if isinstance(result, tuple) else (result,)
            key = name + ":" + _digest([x for pair in inputs for x in
                                        (pair if isinstance(pair, tuple) else (pair,))])
            digest = _digest([np.asarray(o) for o in outputs])
            if record.setdefault(key, digest) != digest:
                varied.add(key)        # the same inputs gave different bytes in one run
            return result
        recorded.__wrapped__ = fn
        return recorded

    for name in dir(_ext):
        fn = getattr(_ext, name)
        if name.startswith("__") or name in NOT_RECORDED or not callable(fn):
            continue
        setattr(_ext, name, wrap(name, fn))

    def write():
        with open(path, "w") as f:
            json.dump({key: ("VARIED:" + value if key in varied else value)
                       for key, value in record.items()}, f)
    atexit.register(write)
    return record


def run_shapes():
    """Forward and backward of every method at the benchmark shapes (n = 4096, 16384)."""
    import routing_attention as ra
    rng = np.random.default_rng(7)
    for n in (4096, 16384):
        for dtype in (np.float32, np.float64):
            q, k, v = (rng.standard_normal((2, n, 64)).astype(dtype) for _ in range(3))
            dout = rng.standard_normal((2, n, 64)).astype(dtype)
            if n == 4096:
                for causal in (False, True):
                    *_, saved = ra.attention(q, k, v, causal=causal, return_saved=True)
                    ra.attention_backward(dout, q, k, v, **saved)
            *_, saved = ra.local_attention(q, k, v, window=128, causal=True, return_saved=True)
            ra.local_attention_backward(dout, q, k, v, **saved)
            c = n // 128
            labels = rng.integers(0, c, (2, n))
            idx = ra.members_from_labels(labels, c, max_size=160)
            for causal in (False, True):
                *_, saved = ra.routing_attention(q, k, v, idx, idx, causal=causal,
                                                 return_saved=True)
                ra.routing_attention_backward(dout, q, k, v, idx, idx, **saved)
            qlab = rng.integers(0, 100, (2, n))
            *_, saved = ra.clustered_attention(q, k, v, qlab, 100, return_saved=True)
            ra.clustered_attention_backward(dout, q, k, v, qlab, 100, **saved)
            *_, saved = ra.improved_clustered_attention(q, k, v, qlab, 100, 32,
                                                        return_saved=True)
            ra.improved_clustered_attention_backward(dout, q, k, v, qlab, 100, 32, **saved)
            for plan in ("fixed", "axial", "logsparse", "mixture"):
                for causal in (False, True):
                    *_, saved = ra.combiner_attention(q, k, v, plan=plan, causal=causal,
                                                      return_saved=True)
                    ra.combiner_attention_backward(dout, q, k, v, **saved)


def compare(a, b):
    """Exit status 1 if a call shared by the two records produced different bytes."""
    with open(a) as f:
        ra_ = json.load(f)
    with open(b) as f:
        rb = json.load(f)
    for name, rec in ((a, ra_), (b, rb)):
        varied = sorted(key for key, value in rec.items() if value.startswith("VARIED:"))
        for key in varied[:20]:
            print(f"VARIED within {name}: {key}")
        if varied:
            print(f"{len(varied)} calls of {name} gave different bytes for the same inputs")
    shared = sorted(set(ra_) & set(rb))
    bad = [key for key in shared if ra_[key] != rb[key]]
    names = sorted({key.split(":")[0] for key in shared})
    print(f"{len(shared)} calls in both records ({len(ra_)} / {len(rb)} recorded), "
          f"{len(names)} functions: {', '.join(names)}")
    for key in bad[:20]:
        print(f"DIFFERENT: {key}")
    by_function = {}
    for key in bad:
        by_function[key.split(":")[0]] = by_function.get(key.split(":")[0], 0) + 1
    per = ", ".join(f"{name} {count}" for name, count in sorted(by_function.items()))
    print(f"{len(bad)} differ" + (f" ({per})" if per else ""))
    return 1 if bad or not shared else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "shapes":
        install(sys.argv[2])
        run_shapes()
    elif len(sys.argv) == 4 and sys.argv[1] == "compare":
        sys.exit(compare(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(__doc__)
