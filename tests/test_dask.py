"""Dask arrays: every public function gives a lazy Dask array equal to the NumPy result,
on chunked batch and core axes, locally and on a two-process cluster."""
import os
import pathlib
import re

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
if os.environ.get("RA_SANITIZED"):
    pytest.skip("the sanitizer job covers the kernels through the NumPy tests; the Dask "
                "layer is left out to keep its time", allow_module_level=True)

import dask                                      # noqa: E402

import routing_attention as ra                   # noqa: E402


def _arrays(shape=(4, 3, 40, 8), seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape) for _ in range(3))


def _lazy(*arrays, chunks=(2, 3, 13, -1)):
    """Dask copies split across batch AND sequence axes (the core axis must be merged)."""
    return tuple(da.from_array(a, chunks=chunks[:a.ndim]) for a in arrays)


def _same(lazy, eager, what):
    assert isinstance(lazy, da.Array), f"{what}: not lazy"
    np.testing.assert_array_equal(lazy.compute(), eager, err_msg=what)


@pytest.fixture(autouse=True)
def _single_threaded_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


def test_attention_methods_equal_numpy():
    q, k, v = _arrays()
    Q, K, V = _lazy(q, k, v)
    mask = np.ones((4, 1, 40), bool)
    mask[1, 0, -5:] = False
    _same(ra.attention(Q, K, V, causal=True), ra.attention(q, k, v, causal=True), "attention")
    _same(ra.attention(Q, K, V, key_mask=da.from_array(mask, chunks=(1, 1, 7))),
          ra.attention(q, k, v, key_mask=mask), "attention key_mask")
    out, lse = ra.attention(Q, K, V, return_lse=True)
    _same(lse, ra.attention(q, k, v, return_lse=True)[1], "attention lse")
    _same(ra.local_attention(Q, K, V, 6, causal=True),
          ra.local_attention(q, k, v, 6, causal=True), "local")
    cent = ra.spherical_kmeans(q, 5)
    _, _, members = ra.assign_top_members(q, cent, 8)
    _same(ra.routing_attention(Q, K, V, members, members, merge="lse"),
          ra.routing_attention(q, k, v, members, members, merge="lse"), "routing")
    labels = np.arange(40) % 6
    _same(ra.clustered_attention(Q, K, V, labels, 6), ra.clustered_attention(q, k, v, labels, 6),
          "clustered")
    _same(ra.improved_clustered_attention(Q, K, V, labels, 6, 5),
          ra.improved_clustered_attention(q, k, v, labels, 6, 5), "improved")
    for plan in ("fixed", "axial", "logsparse", "mixture"):
        _same(ra.combiner_attention(Q, K, V, plan=plan, causal=True),
              ra.combiner_attention(q, k, v, plan=plan, causal=True), plan)


def test_backwards_equal_numpy_and_sum_broadcast_axes():
    q, k, v = _arrays()
    dout = _arrays(seed=1)[0]
    Q, K, V, D = _lazy(q, k, v, dout)
    grads = ra.attention_backward(D, Q, K, V, causal=True)
    for name, g, g_np in zip("qkv", grads, ra.attention_backward(dout, q, k, v, causal=True)):
        _same(g, g_np, f"d{name}")
    # q shared by the batch: its gradient is summed over the broadcast axis (lazily)
    grads = ra.combiner_attention_backward(D, Q[:1], K, V, plan="fixed")
    expected = ra.combiner_attention_backward(dout, q[:1], k, v, plan="fixed")
    assert grads[0].shape == (1, 3, 40, 8)
    for name, g, g_np in zip("qkv", grads, expected):
        np.testing.assert_allclose(g.compute(), g_np, rtol=1e-12, atol=1e-12, err_msg=f"d{name}")


def test_rel_bias_is_an_operand_blocked_with_the_batch():
    """A per-head bias (heads, 2n - 1) with q, k, v chunked one block per (batch, head):
    each block gets its own rows of the bias, and a backward returns the bias gradient
    summed over the batch (three gradients and the bias' used to come back, the bias
    whole in every block)."""
    q, k, v = _arrays()
    dout = _arrays(seed=1)[0]
    bias = np.random.default_rng(2).standard_normal((3, 79))
    Q, K, V, D = _lazy(q, k, v, dout, chunks=(1, 1, 13, -1))
    B = da.from_array(bias, chunks=(2, 40))
    labels = np.arange(40) % 6
    members = np.arange(40).reshape(4, 10)
    calls = {"attention": (), "local_attention": (6,), "routing_attention": (members, members),
             "improved_clustered_attention": (labels, 6, 5), "combiner_attention": ()}
    for name, extra in calls.items():
        forward, backward = getattr(ra, name), getattr(ra, name + "_backward")
        kw = dict(causal=True) if name != "improved_clustered_attention" else {}
        lazy = forward(Q, K, V, *extra, rel_bias=B, **kw)
        assert lazy.shape == q.shape
        _same(lazy, forward(q, k, v, *extra, rel_bias=bias, **kw), name)
        grads = backward(D, Q, K, V, *extra, rel_bias=bias, **kw)
        want = backward(dout, q, k, v, *extra, rel_bias=bias, **kw)
        assert len(grads) == len(want) == 4 and grads[3].shape == bias.shape, name
        for which, g, w in zip(("q", "k", "v", "rel_bias"), grads, want):
            np.testing.assert_allclose(g.compute(), w, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name} d{which}")


def test_declared_dtype_is_the_computed_one():
    """An int64 q with float32 k, v computes in float64 (NumPy's promotion); a float64
    bias or dout does not decide the dtype.  The lazy result says so before computing."""
    q, k, v = _arrays()
    qi = np.round(q).astype(np.int64)
    k32, v32 = k.astype(np.float32), v.astype(np.float32)
    lazy = ra.attention(_lazy(qi)[0], k32, v32)
    assert lazy.dtype == lazy.compute().dtype == ra.attention(qi, k32, v32).dtype == np.float64
    q32 = q.astype(np.float32)
    lazy = ra.attention(_lazy(q32)[0], k32, v32, rel_bias=np.zeros(79))
    assert lazy.dtype == lazy.compute().dtype == np.float32
    for g in ra.attention_backward(_lazy(q)[0], q32, k32, v32):
        assert g.dtype == g.compute().dtype == np.float32
    cent = ra.spherical_kmeans(q, 5).astype(np.float32)
    lazy = ra.commitment_loss(_lazy(qi)[0], cent, ra.assign_clusters(q, cent))
    assert lazy.dtype == lazy.compute().dtype == np.float64


def test_routing_decisions_equal_numpy():
    q, _, _ = _arrays()
    (Q,) = _lazy(q)
    planes = np.random.default_rng(5).standard_normal((16, 9))
    cent = ra.spherical_kmeans(q, 5)
    _same(ra.spherical_kmeans(Q, 5), cent, "spherical_kmeans")
    _same(ra.assign_clusters(Q, cent), ra.assign_clusters(q, cent), "assign_clusters")
    for got, want in zip(ra.assign_top_members(Q, cent, 8), ra.assign_top_members(q, cent, 8)):
        _same(got, want, "assign_top_members")
    codes = ra.lsh_hash(q, planes)
    _same(ra.lsh_hash(Q, planes), codes, "lsh_hash")
    _same(ra.hamming_kmeans(da.from_array(codes, chunks=(1, 3, 11)), 4),
          ra.hamming_kmeans(codes, 4), "hamming_kmeans")
    labels = ra.assign_clusters(q, cent)
    _same(ra.members_from_labels(da.from_array(labels), 5, max_size=40),
          ra.members_from_labels(labels, 5, max_size=40), "members_from_labels")
    _same(ra.update_centroids(cent, Q, labels, decay=0.5),
          ra.update_centroids(cent, q, labels, decay=0.5), "update_centroids")


def test_signatures_work_with_apply_gufunc():
    q, k, v = _arrays()
    Q, K, V = _lazy(q, k, v)
    assert ra.attention.signature == "(n,d),(m,d),(m,e)->(n,e)"
    out = da.apply_gufunc(ra.attention, ra.attention.signature, Q, K, V, causal=True,
                          allow_rechunk=True)
    _same(out, ra.attention(q, k, v, causal=True), "apply_gufunc")
    for name in ra.__all__:
        f = getattr(ra, name)
        if callable(f) and not isinstance(f, type) and hasattr(f, "signature"):
            assert "->" in f.signature, name


def test_what_dask_cannot_do_is_a_clear_error():
    q, k, v = _arrays()
    Q, K, V = _lazy(q, k, v)
    with pytest.raises(ValueError, match="return_saved"):
        ra.attention(Q, K, V, return_saved=True)
    with pytest.raises(ValueError, match="max_size"):
        ra.members_from_labels(da.zeros((2, 10), dtype=np.int64, chunks=1), 3)
    with pytest.raises(ValueError, match="same leading axes"):
        ra.update_centroids(np.zeros((3, 4, 8)), Q, np.zeros((4, 3, 40), np.int64))
    with pytest.raises(ValueError, match="same leading axes"):        # pooled by labels' axes
        ra.update_centroids(np.zeros((4, 8)), Q[0, 0], da.zeros((2, 40), np.int64, chunks=1))
    for name, extra in (("attention", ()), ("combiner_attention", ())):
        with pytest.raises(ValueError, match="dropout_p > 0 is not supported with Dask"):
            getattr(ra, name)(Q, K, V, *extra, dropout_p=0.1, dropout_seed=3)
    with pytest.raises(ValueError, match="dropout_p > 0 is not supported with Dask"):
        ra.attention_backward(Q, Q, K, V, dropout_p=0.1, dropout_seed=3)


def test_bad_shapes_and_keywords_raise_before_computing_naming_them():
    """A lazy call checks its shapes and keywords at once, with the NumPy function's own
    messages (the real shapes quoted, not the empty stand-ins')."""
    q, k, v = _arrays()
    Q, K, V = _lazy(q, k, v)
    with pytest.raises(ValueError, match=r"q and k must have the same feature size d: q has 8 "
                                         r"\(shape \(4, 3, 40, 8\)\), k has 4"):
        ra.attention(Q, K[..., :4], V)
    with pytest.raises(ValueError, match="k and v must have the same sequence length m"):
        ra.clustered_attention_backward(Q, Q, K, V[..., :5, :], np.zeros((4, 3, 40), np.int64), 3)
    with pytest.raises(ValueError, match="plan must be one of"):
        ra.combiner_attention(Q, K, V, plan="diagonal")
    with pytest.raises(ValueError, match=r"q has 8 \(shape \(40, 8\)\), k has 4"):
        ra.attention(Q[0, 0], K[..., :4], V)                         # q's own shape quoted
    with pytest.raises(ValueError, match=r"key_mask .* got \(2, 4, 3, 40\), which would"):
        ra.attention(Q, K, V, key_mask=np.ones((2, 4, 3, 40), bool))


def test_readme_dask_snippet_runs():
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Beyond one machine (Dask)", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Dask)", "exec"), {})


@pytest.fixture(scope="module")
def cluster_client():
    distributed = pytest.importorskip("distributed")
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           host="127.0.0.1", memory_limit="300MiB",
                                           dashboard_address=None)
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()


def test_two_worker_processes_and_a_batch_larger_than_a_worker(cluster_client):
    """~1 GiB of float32 inputs, workers limited to 300 MiB each: computed block by
    block (each block 16 MiB) into a per-problem reduction."""
    B, H, n, d = 192, 8, 1024, 64
    Q, K, V = (da.random.default_rng(i).standard_normal((B, H, n, d), chunks=(1, 8, n, d),
                                                        dtype=np.float32) for i in range(3))
    assert 3 * Q.nbytes > 2**30
    total = ra.combiner_attention(Q, K, V, causal=True).sum(axis=(-2, -1))
    got = cluster_client.compute(total).result()
    # the first problem again, in this process, in NumPy
    q, k, v = (np.asarray(x[:1].compute()) for x in (Q, K, V))
    want = ra.combiner_attention(q, k, v, causal=True).sum(axis=(-2, -1))
    np.testing.assert_array_equal(got[:1], want)
    assert got.shape == (B, H) and np.isfinite(got).all()
