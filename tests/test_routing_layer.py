"""The RoutingAttention layer: routing decisions, centroid updates, causality, gradients."""
import numpy as np
import pytest

import routing_attention as ra
from conftest import assert_close


def data(rng, shape=(2, 3, 64, 8), dtype=np.float64):
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def normalise(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1)


@pytest.mark.parametrize("membership", ["balanced", "argmax"])
@pytest.mark.parametrize("merge", ["mean", "lse"])
def test_output_is_routing_attention_on_its_memberships(rng, membership, merge):
    q, k, v = data(rng)
    layer = ra.RoutingAttention(n_clusters=4, local_heads=1, window=8, causal=True,
                                membership=membership, merge=merge)
    out = layer(q, k, v)
    assert out.shape == q.shape
    want_local = ra.local_attention(q[:, :1], k[:, :1], v[:, :1], 8, causal=True)
    assert np.array_equal(out[:, :1], want_local)
    want = ra.routing_attention(q[:, 1:], k[:, 1:], v[:, 1:], layer.q_idx, layer.k_idx,
                                causal=True, merge=merge)
    assert np.array_equal(out[:, 1:], want)
    assert layer.q_idx.shape[:3] == (2, 2, 4)
    if membership == "balanced":
        assert layer.q_idx.shape[-1] == 64 // 4
        assert np.all(np.diff(layer.q_idx, axis=-1) > 0), "balanced lists sorted by position"
    else:   # argmax: every token in exactly one cluster
        members = np.sort(layer.q_idx[layer.q_idx >= 0].reshape(2, 2, -1), axis=-1)
        assert np.array_equal(members, np.broadcast_to(np.arange(64), (2, 2, 64)))


def test_centroid_init_and_update_match_the_clustering_functions(rng):
    q, k, v = data(rng, (2, 2, 50, 6))
    key_mask = np.ones((2, 50), bool)
    key_mask[1, 40:] = False
    layer = ra.RoutingAttention(n_clusters=5, decay=0.9, seed=3)
    layer(q, k, v, key_mask=key_mask)
    pooled = np.concatenate([normalise(q), normalise(k)], axis=-2)            # (2, 2, 100, 6)
    pool_mask = np.concatenate([np.ones((2, 2, 50), bool),
                                np.broadcast_to(key_mask[:, None, :], (2, 2, 50))], axis=-1)
    per_head = np.moveaxis(pooled, 0, 1).reshape(2, 100 * 2, 6)
    mask_head = np.moveaxis(pool_mask, 0, 1).reshape(2, 200)
    init = ra.spherical_kmeans(per_head, 5, iters=10, seed=3, mask=mask_head)
    labels = ra.assign_clusters(pooled, init)
    want = ra.update_centroids(init, pooled, labels, decay=0.9, mask=pool_mask)
    assert_close(layer.centroids, want, np.float64, "updated centroids")
    assert_close(layer.commitment_loss, ra.commitment_loss(pooled, init, labels, mask=pool_mask),
                 np.float64, "commitment loss")
    # padded keys are in no key list
    assert not np.isin(np.arange(40, 50), layer.k_idx[1]).any()
    # a second call in eval mode leaves the centroids alone
    before = layer.centroids.copy()
    layer.training = False
    layer(q, k, v)
    assert np.array_equal(layer.centroids, before)


def test_argmax_membership_is_causal(rng):
    """Perturbing future tokens never changes past outputs under argmax membership."""
    q, k, v = data(rng, (1, 2, 80, 8))
    layer = ra.RoutingAttention(n_clusters=6, causal=True, membership="argmax", merge="lse",
                                local_heads=1, window=10)
    layer(q, k, v)                       # initialise the centroids
    layer.training = False
    base = layer(q, k, v)
    for t in (0, 17, 40, 79):
        q2, k2, v2 = (x.copy() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[..., t + 1:, :] = rng.standard_normal(x[..., t + 1:, :].shape) * 3
        out = layer(q2, k2, v2)
        assert np.array_equal(out[..., :t + 1, :], base[..., :t + 1, :]), f"future leaked into t<={t}"


def test_balanced_membership_is_not_causal_and_says_so(rng):
    """The documented caveat: top-w membership looks at the whole sequence."""
    assert "future tokens" in ra.RoutingAttention.__doc__
    q, k, v = data(rng, (1, 1, 64, 8))
    layer = ra.RoutingAttention(n_clusters=4, causal=True)
    layer(q, k, v)
    layer.training = False
    base = layer(q, k, v)
    changed = False
    for seed in range(10):
        r = np.random.default_rng(seed)
        q2, k2 = q.copy(), k.copy()
        q2[..., 40:, :] = r.standard_normal(q2[..., 40:, :].shape) * 5
        k2[..., 40:, :] = r.standard_normal(k2[..., 40:, :].shape) * 5
        changed |= not np.array_equal(layer(q2, k2, v)[..., :40, :], base[..., :40, :])
    assert changed, "balanced membership unexpectedly causal on this data"


@pytest.mark.parametrize("shared_qk", [False, True])
def test_backward_by_finite_differences(rng, shared_qk):
    q, k, v = data(rng, (1, 2, 24, 4))
    layer = ra.RoutingAttention(n_clusters=3, causal=True, shared_qk=shared_qk, local_heads=1,
                                window=6, merge="lse")
    layer.forward(q, k, v)          # initialises the centroids (its context is not kept)
    layer.training = False
    out = layer(q, k, v)
    idx = (layer.q_idx.copy(), layer.k_idx.copy())
    wts = rng.standard_normal(out.shape)
    grads = layer.backward(wts)
    for which, g in enumerate(grads):
        num = np.zeros_like(g)
        for pos in np.ndindex(g.shape):
            args = [q.copy(), k.copy(), v.copy()]
            args[which][pos] += 1e-6
            up = np.sum(wts * layer(*args))
            assert np.array_equal(layer.q_idx, idx[0]) and np.array_equal(layer.k_idx, idx[1])
            args[which][pos] -= 2e-6
            down = np.sum(wts * layer(*args))
            num[pos] = (up - down) / 2e-6
        err = np.max(np.abs(num - g))
        assert err < 1e-7, f"shared_qk={shared_qk} d{'qkv'[which]}: {err:.2e}"
    if shared_qk:
        assert np.all(grads[1] == 0), "shared-QK: the k argument is unused"


def test_repeated_calls_overwrite_the_saved_statistics(rng):
    """A call with the shapes of the last one writes its statistics into the last call's
    arrays: outputs and gradients are those of a fresh layer in the same state, and the
    output returned earlier is left alone."""
    q, k, v = data(rng, (2, 2, 32, 4))
    q2, k2, v2 = data(rng, (2, 2, 32, 4))
    g = rng.standard_normal(q.shape)
    first = ra.RoutingAttention(n_clusters=4, merge="lse", causal=True, local_heads=1, window=8)
    first.forward(q, k, v)
    first.training = False
    fresh = ra.RoutingAttention(n_clusters=4, merge="lse", causal=True, local_heads=1, window=8)
    fresh.centroids, fresh.training = first.centroids.copy(), False
    out1 = first(q, k, v)
    first.backward(g)
    kept = out1.copy()
    slots = first._kept["routed"][1]["slot_output"]
    out2 = first(q2, k2, v2)
    assert first._kept["routed"][1]["slot_output"] is slots, "same shapes: the arrays are reused"
    assert np.array_equal(out1, kept)
    assert np.array_equal(out2, fresh(q2, k2, v2))
    for name, x, y in zip("qkv", first.backward(g), fresh.backward(g)):
        assert np.array_equal(x, y), f"d{name}"
    first(q2[:, :, :16], k2[:, :, :16], v2[:, :, :16])    # new shapes: new arrays
    assert first._kept["routed"][1]["slot_output"] is not slots
    # a context handed out by forward is never overwritten by later calls
    out3, ctx = first.forward(q, k, v)
    held = ctx.data["routed"][1]["slot_output"].copy()
    first(q2, k2, v2)
    first(q2, k2, v2)
    # bit for bit: slot rows of one-cluster tokens are left unwritten (any bits, NaN too)
    assert ctx.data["routed"][1]["slot_output"].tobytes() == held.tobytes()


def test_changing_the_output_leaves_the_gradients(rng):
    """The backward reads its own copy of the routed output: a caller who changes the
    array it got, in place, gets the gradients of the unchanged call — on a call with new
    statistics arrays and on one that reuses the last call's."""
    q, k, v = data(rng, (2, 2, 32, 4))
    g = rng.standard_normal(q.shape)
    layer = ra.RoutingAttention(n_clusters=4)
    layer.forward(q, k, v)
    layer.training = False
    twin = ra.RoutingAttention(n_clusters=4)
    twin.centroids, twin.training = layer.centroids.copy(), False
    twin(q, k, v)
    want = twin.backward(g)
    for call in ("new arrays", "reused arrays"):
        out = layer(q, k, v)
        out *= -3.0
        for name, got, ref in zip("qkv", layer.backward(g), want):
            assert np.array_equal(got, ref), f"{call}: d{name}"


@pytest.mark.parametrize("shared_qk", [False, True])
def test_gradients_with_broadcast_batch_axes(rng, shared_qk):
    """v with a batch axis that q and k lack: the output broadcasts, and each gradient is
    summed over the axes its input was broadcast along (once: it used to be counted
    once per broadcast copy)."""
    q = rng.standard_normal((1, 2, 16, 4))
    k = rng.standard_normal((1, 2, 16, 4))
    v = rng.standard_normal((3, 2, 16, 4))
    layer = ra.RoutingAttention(n_clusters=2, local_heads=1, window=4, merge="lse",
                                shared_qk=shared_qk)
    layer.forward(q, k, v)
    layer.training = False
    out = layer(q, k, v)
    assert out.shape == (3, 2, 16, 4)
    g = rng.standard_normal(out.shape)
    grads = layer.backward(g)
    args = [q, k, v]
    for which, grad in enumerate(grads):
        assert grad.shape == args[which].shape
        for pos in [(0, 0, 3, 1), (0, 1, 9, 2), (0, 1, 15, 0)]:
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[which][pos] += 1e-6
            down[which][pos] -= 1e-6
            num = (np.sum(g * layer(*up)) - np.sum(g * layer(*down))) / 2e-6
            assert abs(num - grad[pos]) < 1e-7, f"d{'qkv'[which]}{pos}: {grad[pos]} vs {num}"


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("membership", ["balanced", "argmax"])
def test_masks_hide_padding_in_every_head(rng, shared_qk, membership):
    """Padding keys are invisible to local and routing heads alike (shared-QK too), and
    padding queries get output 0: changing the padded values changes nothing else."""
    q, k, v = data(rng, (2, 3, 16, 4))
    km = np.ones((2, 16), bool)
    km[0, 11:], km[1, :3] = False, False
    qm = np.ones(16, bool)
    qm[5] = False
    layer = ra.RoutingAttention(n_clusters=2, local_heads=1, window=4, shared_qk=shared_qk,
                                membership=membership)
    layer(q, k, v, key_mask=km, query_mask=qm)
    layer.training = False
    out = layer(q, k, v, key_mask=km, query_mask=qm)
    for b in range(2):
        listed = layer.k_idx[b][layer.k_idx[b] >= 0]
        assert listed.size and km[b, listed].all(), "a padding key in a routing list"
    assert not out[:, :, 5].any(), "a padding query's output"
    out2 = layer(q, k, v + 100.0 * (~km)[:, None, :, None], key_mask=km, query_mask=qm)
    np.testing.assert_allclose(out2, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_qk", [False, True])
@pytest.mark.parametrize("membership", ["balanced", "argmax"])
def test_padding_content_routes_nothing(rng, shared_qk, membership):
    """What padded rows hold changes no real query's output, through the routing
    decisions too: with balanced membership padded queries and keys compete for no
    cluster place (they once took places and moved real tokens out of clusters)."""
    q, k, v = data(rng, (2, 3, 48, 4))
    pad = np.ones((2, 48), bool)
    pad[0, 30:], pad[1, :9] = False, False           # padding as queries and as keys
    layer = ra.RoutingAttention(n_clusters=4, local_heads=1, window=6, shared_qk=shared_qk,
                                membership=membership)
    layer(q, k, v, key_mask=pad, query_mask=pad)
    layer.training = False
    out = layer(q, k, v, key_mask=pad, query_mask=pad)
    junk = (~pad)[:, None, :, None]
    q2, k2, v2 = (x + junk * 50.0 * rng.standard_normal(x.shape) for x in (q, k, v))
    out2 = layer(q2, k2, v2, key_mask=pad, query_mask=pad)
    np.testing.assert_array_equal(out2, out)
    assert not out[np.broadcast_to(junk, out.shape)].any(), "a padding query's output"


def test_broadcast_heads_and_batch_axes(rng):
    """A heads axis of 1 broadcasts across local and routing heads (its gradient summed
    over them); a local-only layer broadcasts k's batch axes like local_attention."""
    q, k, v = data(rng, (2, 3, 16, 4))
    layer = ra.RoutingAttention(n_clusters=2, local_heads=1, window=4)
    layer.forward(q, k, v[:, :1])
    layer.training = False
    out = layer(q, k, v[:, :1])
    g = rng.standard_normal(out.shape)
    grads = layer.backward(g)
    full = layer(q, k, np.repeat(v[:, :1], 3, axis=1))
    assert np.array_equal(out, full)
    want = layer.backward(g)
    assert grads[2].shape == (2, 1, 16, 4)
    np.testing.assert_allclose(grads[2], want[2].sum(axis=1, keepdims=True), rtol=1e-12, atol=1e-12)
    local = ra.RoutingAttention(local_heads=3, window=4)
    kb = np.stack([k, 2 * k, 3 * k])                       # (3, 2, 3, 16, 4): a batch axis more
    got = local(q, kb, v)
    assert got.shape == (3, 2, 3, 16, 4)
    np.testing.assert_array_equal(got, ra.local_attention(q, kb, v, 4))
    dq, dk, dv = local.backward(np.ones_like(got))
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, kb.shape, v.shape)


def test_shared_qk_local_heads_exclude_self_and_dk_shape(rng):
    """Shared-QK: a token's own value does not reach its output in local heads either
    (it is not alone in its window), and dk is zero with the shape of the k passed."""
    q, k, v = data(rng, (1, 2, 16, 4))
    kb = np.concatenate([k, k, k])                         # (3, 2, 16, 4): unused, broadcast
    layer = ra.RoutingAttention(n_clusters=2, local_heads=1, window=4, shared_qk=True)
    out, ctx = layer.forward(q, kb, v)
    v2 = v.copy()
    v2[0, 0, 6] += 10.0
    out2 = layer(q, kb, v2)
    assert np.array_equal(out2[:, 0, 6], out[:, 0, 6]), "token 6 attended to itself"
    assert not np.allclose(out2[:, 0, 5], out[:, 0, 5]), "its neighbour sees it"
    dq, dk, dv = layer.backward(np.ones_like(out), ctx)
    assert dk.shape == kb.shape and not dk.any()


def test_layer_masks_must_fit_the_batch(rng):
    q, k, v = data(rng, (1, 2, 8, 4))
    layer = ra.RoutingAttention(n_clusters=2)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        layer(q, k, v, key_mask=np.ones((3, 8), bool))
    with pytest.raises(ValueError, match="query_mask must have shape"):
        layer(q, k, v, query_mask=np.ones((2, 1, 8), bool))
    with pytest.raises(ValueError, match="same number of heads"):
        layer(q, k, v[:, :1].repeat(3, axis=1))
    with pytest.raises(ValueError, match="to match the queries"):
        layer(q, k, v, query_mask=np.ones(7, bool))
    out = layer(q, k, v)
    with pytest.raises(TypeError, match="dout has complex dtype"):
        layer.backward(out * (1 + 1j))
    with pytest.raises(ValueError, match="to match the queries"):
        ra.ClusteredAttention(2)(q[0], k[0], v[0], query_mask=np.ones(7, bool))


def test_float32_and_defaults(rng):
    q, k, v = data(rng, (2, 256, 16), np.float32)       # heads=2, no batch axis
    layer = ra.RoutingAttention()
    out = layer(q, k, v)
    assert out.dtype == np.float32 and out.shape == q.shape
    assert layer.centroids.shape == (2, 16, 16)          # c = sqrt(256)
    assert layer.q_idx.shape == (2, 16, 16)              # w = n / c
    dq, dk, dv = layer.backward(np.ones_like(out))
    assert dq.dtype == np.float32 and dq.shape == q.shape


@pytest.mark.parametrize("kwargs, message", [
    (dict(membership="random"), "membership must be"),
    (dict(merge="max"), "merge must be"),
    (dict(n_clusters=0), "n_clusters must be >= 1"),
    (dict(decay=1.5), "decay must lie in"),
    (dict(local_heads=-1), "local_heads must be >= 0"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ra.RoutingAttention(**kwargs)


def test_bad_arguments_of_other_kinds():
    with pytest.raises(TypeError, match="decay must be a number"):
        ra.RoutingAttention(decay="x")
    with pytest.raises(ValueError, match="seed must be >= 0"):
        ra.ClusteredAttention(4, seed=-1)


def test_bad_calls(rng):
    q, k, v = data(rng, (1, 2, 16, 4))
    with pytest.raises(ValueError, match="local_heads"):
        ra.RoutingAttention(local_heads=3)(q, k, v)
    with pytest.raises(RuntimeError, match="forward call first"):
        ra.RoutingAttention().backward(q)
    with pytest.raises(ValueError, match=r"q and k must have the same feature size d: q has 4"):
        ra.RoutingAttention()(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"k and v must have the same sequence length m"):
        ra.RoutingAttention()(q, k, v[..., :5, :])
    with pytest.raises(ValueError, match=r"q must have at least 3 dimensions \(\.\.\., heads, "):
        ra.RoutingAttention()(q[0, 0], k[0, 0], v[0, 0])
    layer = ra.RoutingAttention(n_clusters=2)
    layer(q, k, v)
    with pytest.raises(ValueError, match="routing heads"):
        layer(q[:, :1], k[:, :1], v[:, :1])
    # routing needs the queries and keys of the same batch rows; local heads alone do not
    k2 = np.concatenate([k, k])
    with pytest.raises(ValueError, match="q and k must have the same"):
        ra.RoutingAttention(n_clusters=2)(q, k2, np.concatenate([v, v]))
    out = ra.RoutingAttention(local_heads=2, window=4)(q, k2, np.concatenate([v, v]))
    assert out.shape == (2, 2, 16, 4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_normalisation_kernel(rng, dtype):
    """The C row normalisation behind the layer: x / |x| (zero and NaN rows divided by 1),
    |x| and |x̂|², strided input and output included, the same bits on 1 and 2 threads."""
    x = rng.standard_normal((3, 40, 9)).astype(dtype)[:, ::-1, :]        # negative stride
    x[0, 3] = 0
    x[1, 5, 2] = np.nan
    out = np.empty((3, 40, 12), dtype)[..., 1:10]                        # strided rows
    with np.errstate(invalid="ignore"):
        norm = np.linalg.norm(x.astype(np.float64), axis=-1)
        want = x / np.where(norm > 0, norm, 1)[..., None]
        xhat, got_norm, sq = ra._ext._normalize_rows(x, out=(out, None, None))
        tol = 1e-6 if dtype == np.float32 else 1e-14
        assert xhat is out
        np.testing.assert_allclose(xhat, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(got_norm, norm, rtol=tol)
        np.testing.assert_allclose(sq, (want.astype(np.float64) ** 2).sum(-1), rtol=tol, atol=tol)
        assert (xhat[0, 3] == 0).all() and sq[0, 3] == 0
        # a NaN row has a NaN norm: divided by 1, it passes through unchanged
        assert np.array_equal(xhat[1, 5], x[1, 5], equal_nan=True) and np.isnan(sq[1, 5])
        assert np.isfinite(np.delete(xhat[1], 5, 0)).all()
        ra.set_num_threads(1)
        try:
            one = ra._ext._normalize_rows(x)
            ra.set_num_threads(2)
            two = ra._ext._normalize_rows(x)
        finally:
            ra.set_num_threads(0)
        for a, b in zip(one, two):
            assert np.array_equal(a, b, equal_nan=True)
