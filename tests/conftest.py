"""Shared test helpers: dtype tolerances and an array zoo."""
import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("RA_BITCHECK"):     # tools/bitcheck.py: record every _ext call's outputs
    import importlib.util
    _spec = importlib.util.spec_from_file_location(
        "bitcheck", os.path.join(os.path.dirname(__file__), "..", "tools", "bitcheck.py"))
    _bitcheck = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_bitcheck)
    _bitcheck.install(os.environ["RA_BITCHECK"])

RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def assert_close(actual, expected, dtype, what):
    """Relative closeness scaled by the largest reference entry, tolerance by dtype."""
    actual = np.asarray(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.dtype(dtype), f"{what}: dtype {actual.dtype}, expected {dtype}"
    rtol = RTOL[np.dtype(dtype)]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    err = float(np.max(np.abs(actual.astype(np.float64) - expected), initial=0.0))
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} × {scale:.3g}"


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() in each entry of x (changed in place and
    restored)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + eps
        hi = f()
        x[idx] = old - eps
        lo = f()
        x[idx] = old
        g[idx] = (hi - lo) / (2 * eps)
    return g


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def strided(a, kind):
    """The same values as `a` in an awkward memory layout."""
    if kind == "contiguous":
        return np.ascontiguousarray(a)
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "every_other":   # non-contiguous rows and columns
        big = np.zeros(a.shape[:-2] + (2 * a.shape[-2], 3 * a.shape[-1]), a.dtype)
        big[..., ::2, ::3] = a
        return big[..., ::2, ::3]
    if kind == "negative":      # negative strides on both core axes
        return np.ascontiguousarray(a[..., ::-1, ::-1])[..., ::-1, ::-1]
    raise ValueError(kind)


LAYOUTS = ["contiguous", "fortran", "every_other", "negative"]


# ---- hypothesis profiles (tests/test_properties.py): "fast" by default, keeping the
# normal suite quick; `pytest --hypothesis-profile=thorough` (or RA_HYPOTHESIS_PROFILE=
# thorough) for long runs.
try:
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile("fast", max_examples=30, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=1000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("RA_HYPOTHESIS_PROFILE", "fast"))
except ImportError:     # hypothesis is in the [test] extra; without it those tests skip
    settings = None


def run_with_simd(code, simd, timeout=300):
    """Run `code` in a fresh interpreter with the kernel table forced by RA_SIMD ("default":
    the one the CPU gets); asserts it succeeded and printed "ok", returns its stdout."""
    env = dict(os.environ)
    env.pop("RA_SIMD", None)
    if simd != "default":
        env["RA_SIMD"] = simd
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr
    return res.stdout
