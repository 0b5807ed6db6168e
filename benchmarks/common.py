"""Shared benchmark helpers: interleaved timing with medians, the machine's fp32 peak."""
import os
import platform
import time

import numpy as np

import routing_attention as ra
from routing_attention import _ext


# benchmarks/RESULTS.md: the dense section (bench_dense.py) comes first; everything after
# this line is written by suite.py, and each script keeps the other's part.
SUITE_MARKER = "<!-- suite: everything below is written by benchmarks/suite.py -->"


def median_times(cases, repeats):
    """Run every case once per round, `repeats` rounds (interleaved, so machine noise
    hits every case alike); returns {name: median seconds}.  A case is (name, setup,
    run): setup() builds the arguments untimed, run(args) is timed."""
    times = {name: [] for name, _, _ in cases}
    for r in range(repeats):
        order = cases if r % 2 == 0 else cases[::-1]
        for name, setup, run in order:
            args = setup()
            t0 = time.perf_counter()
            run(args)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def aligned_copy(x, alignment=64):
    """A copy of x whose data starts on an `alignment`-byte boundary, as torch's allocator
    places tensors.  NumPy's large arrays start 16 bytes past one (glibc's mmap header),
    so a 256-byte row of them spans five cache lines, not four."""
    raw = np.empty(x.nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    y = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    y[...] = x
    return y


def fp32_peak_gflops(threads, seconds=0.3):
    """Measured fp32 FMA peak of `threads` cores on the SIMD path in use (best of 5)."""
    iters = 1_000_000
    t0 = time.perf_counter()
    _ext._fma_peak(iters, threads)
    per_iter = (time.perf_counter() - t0) / iters
    iters = max(1, int(seconds / max(per_iter, 1e-12)))
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        flops, _ = _ext._fma_peak(iters, threads)
        best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def set_threads(n):
    ra.set_num_threads(n)
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def machine_description():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = ra.build_info()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"NumPy {np.__version__}, SIMD path {info['simd']}, OpenMP {info['openmp']}")


def try_import_torch():
    try:
        import torch
        return torch
    except ImportError:
        return None
