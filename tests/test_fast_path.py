"""The small-call fast path (plain NumPy float arrays, common keywords) gives exactly the
general path's results, and everything else still goes through the general checks."""
import math

import numpy as np
import pytest

import routing_attention as ra
from routing_attention import _checks


def _qkv(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("shape", [(1, 64), (3, 16, 8), (2, 2, 5, 1)])
def test_fast_path_equals_general_path(shape, scale, causal, dtype):
    q, k, v = _qkv(shape, dtype)
    assert _checks.plain_qkv(q, k, v)
    fast, fast_lse = ra.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    general, saved = ra.attention(q, k, v, causal=causal, scale=scale, return_saved=True)
    np.testing.assert_array_equal(fast_lse, saved["lse"])
    assert fast.dtype == dtype
    np.testing.assert_array_equal(fast, general)
    n = shape[-2]
    for plan in ("fixed", "axial", "logsparse", "mixture"):
        block = None if plan == "logsparse" else math.ceil(math.sqrt(n))
        fast = ra.combiner_attention(q, k, v, plan=plan, causal=causal, scale=scale)
        general = ra.combiner_attention(q, k, v, plan=plan, block=block, causal=causal,
                                        scale=scale, return_saved=True)[0]
        np.testing.assert_array_equal(fast, general, err_msg=plan)


def test_default_block_is_ceil_sqrt():
    from routing_attention.combiner import _default_block
    assert [_default_block(n) for n in (1, 2, 4, 5, 9, 10, 4096, 4097)] == \
        [1, 2, 2, 3, 3, 4, 64, 65]
    assert all(_default_block(n) == math.ceil(math.sqrt(n)) for n in range(1, 100000))


def test_what_the_fast_path_refuses():
    q, k, v = _qkv((2, 4, 3), np.float32)
    assert not _checks.plain_qkv(q.astype(np.float64), k, v)          # mixed dtypes
    assert not _checks.plain_qkv(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    assert not _checks.plain_qkv(q[None], k, v)                       # broadcasting
    assert not _checks.plain_qkv(q, k[..., :2], v)                    # d mismatch
    assert not _checks.plain_qkv(q, k, v[:, :3])                      # m mismatch
    assert not _checks.plain_qkv(q, k, v[0, 0])                       # v of rank 1
    assert not _checks.plain_qkv(q.tolist(), k, v)                    # not an ndarray
    assert _checks.plain_scale(float("nan"), 3, np.dtype(np.float32)) is None
    assert _checks.plain_scale(1e39, 3, np.dtype(np.float32)) is None
    assert _checks.plain_scale(2, 3, np.dtype(np.float32)) is None    # an int: general path
    # refused calls still get the general path's errors
    with pytest.raises(ValueError, match="scale"):
        ra.attention(q, k, v, scale=1e39)
    with pytest.raises(TypeError, match="causal"):
        ra.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="d"):
        ra.attention(q, k[..., :2], v)
