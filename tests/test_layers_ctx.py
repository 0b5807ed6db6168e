"""NumPy layers never answer `backward` with another call's statistics (issue 15 item 3).

``out, ctx = layer.forward(q, k, v)`` and ``layer.backward(dout, ctx)`` work for any
number of calls; ``layer(q, k, v)`` then ``layer.backward(dout)`` works for one call and
raises after two.  Plus the layers' NaN rule (issue 19 item 2) and their reprs.
"""
import re

import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref

from conftest import assert_close


def _qkv(rng, shape, dtype=np.float64):
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def _routing_layer(rng, q, k, v, **kw):
    """A routing layer with centroids fixed by a first (untracked) call, in eval mode."""
    layer = ra.RoutingAttention(n_clusters=3, **kw)
    layer.forward(q, k, v)
    layer.training = False
    return layer


# Each layer: a builder of (layer, inputs of two calls), and the gradient of one call by
# the reference, from what the layer recorded about that call (its routing decisions).
def _combiner(rng):
    layer = ra.CombinerAttention("mixture", block=4, causal=True)
    return layer, [_qkv(rng, (2, 16, 4)) for _ in range(2)]


def _combiner_reference(layer, q, k, v, dout, decisions):
    return ref.combiner_attention_backward(dout, q, k, v, plan="mixture", block=4, causal=True)


def _clustered(rng):
    layer = ra.ClusteredAttention(3, bits=8, topk=4, seed=2)
    return layer, [_qkv(rng, (2, 16, 4)) for _ in range(2)]


def _clustered_reference(layer, q, k, v, dout, labels):
    return ref.improved_clustered_attention_backward(dout, q, k, v, labels, 3, 4)


def _routing(rng):
    calls = [_qkv(rng, (2, 2, 16, 4)) for _ in range(2)]
    return _routing_layer(rng, *calls[0], causal=True, merge="lse"), calls


def _routing_reference(layer, q, k, v, dout, members):
    return ref.routing_attention_backward(dout, q, k, v, *members, causal=True, merge="lse")


LAYERS = {
    "CombinerAttention": (_combiner, _combiner_reference, lambda layer: None),
    "ClusteredAttention": (_clustered, _clustered_reference, lambda layer: layer.labels.copy()),
    "RoutingAttention": (_routing, _routing_reference,
                         lambda layer: (layer.q_idx.copy(), layer.k_idx.copy())),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_calls_with_contexts_give_each_calls_gradients(name):
    build, reference, decisions = LAYERS[name]
    rng = np.random.default_rng(1)
    layer, calls = build(rng)
    results = []
    for q, k, v in calls:
        out, ctx = layer.forward(q, k, v)
        results.append((out, ctx, decisions(layer)))
    for (q, k, v), (out, ctx, made) in reversed(list(zip(calls, results))):   # any order
        dout = rng.standard_normal(out.shape)
        got = layer.backward(dout, ctx)
        want = reference(layer, q, k, v, dout, made)
        for which, g, w in zip("qkv", got, want):
            assert_close(g, w, np.float64, f"{name} d{which} of one of two calls")
        for g, again in zip(got, layer.backward(dout, ctx)):
            assert np.array_equal(g, again), "a context may be used again"


@pytest.mark.parametrize("name", list(LAYERS))
def test_one_call_then_backward_keeps_working(name):
    build, reference, decisions = LAYERS[name]
    rng = np.random.default_rng(2)
    layer, calls = build(rng)
    for q, k, v in calls:               # a training loop: call, backward, call, backward
        out = layer(q, k, v)
        made = decisions(layer)
        dout = rng.standard_normal(out.shape)
        for which, g, w in zip("qkv", layer.backward(dout),
                               reference(layer, q, k, v, dout, made)):
            assert_close(g, w, np.float64, f"{name} d{which}")
        layer.backward(dout)            # the same call's backward again is unambiguous


@pytest.mark.parametrize("name", list(LAYERS))
def test_two_calls_then_backward_without_context_raises(name):
    build = LAYERS[name][0]
    rng = np.random.default_rng(3)
    layer, calls = build(rng)
    out = layer(*calls[0])
    layer(*calls[1])
    with pytest.raises(RuntimeError, match=r"called 2 times since the last backward.*"
                                           r"layer\.backward\(dout, ctx\)"):
        layer.backward(np.ones_like(out))
    with pytest.raises(RuntimeError, match="ambiguous"):           # and it stays refused
        layer.backward(np.ones_like(out))
    out3 = layer(*calls[0])
    with pytest.raises(RuntimeError, match="called 3 times"):
        layer.backward(np.ones_like(out3))


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_leaves_the_kept_call_alone(name):
    """layer(...) then layer.forward(...): backward(dout) is still the first call's."""
    build, reference, decisions = LAYERS[name]
    rng = np.random.default_rng(4)
    layer, calls = build(rng)
    out = layer(*calls[0])
    made = decisions(layer)
    layer.forward(*calls[1])
    dout = rng.standard_normal(out.shape)
    for which, g, w in zip("qkv", layer.backward(dout),
                           reference(layer, *calls[0], dout, made)):
        assert_close(g, w, np.float64, f"{name} d{which}")


@pytest.mark.parametrize("name", list(LAYERS))
def test_contexts_are_checked(name):
    build = LAYERS[name][0]
    rng = np.random.default_rng(5)
    layer, calls = build(rng)
    other, _ = build(rng)
    out, ctx = other.forward(*calls[0])
    with pytest.raises(ValueError, match="ctx comes from another layer"):
        layer.backward(np.ones_like(out), ctx)
    with pytest.raises(TypeError, match=f"ctx must be the context returned by {name}.forward"):
        layer.backward(np.ones_like(out), {"q": 1})
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        layer.backward(np.ones_like(out))
    assert name in repr(ctx)


@pytest.mark.parametrize("name", list(LAYERS))
def test_dout_has_exactly_the_calls_output_shape(name):
    """A layer knows its call's output shape: a dout with extra leading axes was summed
    over them (a stack of douts gave the gradient of their sum, silently), a smaller one
    broadcast.  Both raise.  dout's dtype stays as documented: cast to the call's dtype,
    which it does not decide; complex refused."""
    build, reference, decisions = LAYERS[name]
    rng = np.random.default_rng(10)
    layer, calls = build(rng)
    q, k, v = calls[0]
    out, ctx = layer.forward(q, k, v)
    made = decisions(layer)
    for shape in ((3,) + out.shape, (1,) + out.shape, out.shape[1:], out.shape[:-1] + (1,)):
        message = (f"dout must have shape {re.escape(str(out.shape))} like the layer call's "
                   f"output; got {re.escape(str(shape))}")
        with pytest.raises(ValueError, match=message):
            layer.backward(np.ones(shape), ctx)
        layer(q, k, v)
        with pytest.raises(ValueError, match=message):
            layer.backward(np.ones(shape))
    dout = rng.standard_normal(out.shape).astype(np.float32)
    want = reference(layer, q, k, v, dout.astype(np.float64), made)
    for given in (dout, dout.tolist()):
        for which, g, w in zip("qkv", layer.backward(given, ctx), want):
            assert_close(g, w, np.float64, f"{name} d{which} of a {type(given).__name__} dout")
    out32, ctx32 = layer.forward(*(x.astype(np.float32) for x in (q, k, v)))
    wide = rng.standard_normal(out32.shape)
    for which, g, w in zip("qkv", layer.backward(wide, ctx32),
                           layer.backward(wide.astype(np.float32), ctx32)):
        assert g.dtype == np.float32 and np.array_equal(g, w), f"{name} d{which}: dout cast"
    with pytest.raises(TypeError, match="dout has complex dtype"):
        layer.backward(out.astype(np.complex128), ctx)


def test_the_context_keeps_the_calls_options():
    """Changing a layer's attributes after a call does not change that call's gradient."""
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng, (16, 4))
    dout = rng.standard_normal((16, 4))
    layer = ra.CombinerAttention("fixed", block=4, causal=True, scale=0.4)
    _, ctx = layer.forward(q, k, v)
    layer(q, k, v)
    layer.causal, layer.block, layer.scale = False, 8, None
    want = ref.combiner_attention_backward(dout, q, k, v, plan="fixed", block=4, causal=True,
                                           scale=0.4)
    for x, w in zip(layer.backward(dout, ctx), want):
        assert_close(x, w, np.float64, "explicit context")
    for x, w in zip(layer.backward(dout), want):
        assert_close(x, w, np.float64, "kept context")
    routing = _routing_layer(rng, *_qkv(rng, (1, 2, 16, 4)), local_heads=1, window=4)
    q4, k4, v4 = _qkv(rng, (1, 2, 16, 4))
    out = routing(q4, k4, v4)
    g = rng.standard_normal(out.shape)
    before = routing.backward(g)
    routing.causal, routing.merge, routing.local_heads = True, "lse", 0
    for x, y in zip(routing.backward(g), before):
        assert np.array_equal(x, y)


def test_a_failing_call_leaves_nothing_to_backward():
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, (1, 2, 16, 4))
    layer = ra.RoutingAttention(n_clusters=2)
    out = layer(q, k, v)
    layer.backward(np.ones_like(out))
    with pytest.raises(ValueError):
        layer(q, k, v, key_mask=np.ones(5, bool))
    with pytest.raises(RuntimeError, match="needs a forward call first"):
        layer.backward(np.ones_like(out))


def test_a_failing_call_changes_no_state():
    """A bad scale is refused where it is given; a scale that overflows only the call's
    float32 is refused before the routing decisions move the centroids (a failed call
    used to move them and overwrite commitment_loss), and a failed clustered call keeps
    the previous labels."""
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, (2, 2, 16, 4))
    for make in (lambda s: ra.RoutingAttention(n_clusters=4, scale=s),
                 lambda s: ra.ClusteredAttention(4, scale=s),
                 lambda s: ra.CombinerAttention(scale=s)):
        with pytest.raises(ValueError, match="scale must be finite"):
            make(float("nan"))
        with pytest.raises(TypeError, match="scale must be a real number"):
            make("x")
    layer = ra.RoutingAttention(n_clusters=4, decay=0.5, scale=1e39)
    with pytest.raises(ValueError, match="overflows float32"):
        layer(*(x.astype(np.float32) for x in (q, k, v)))
    assert layer.centroids is None and layer.commitment_loss is None
    layer(q, k, v)
    before, loss = layer.centroids.copy(), layer.commitment_loss.copy()
    with pytest.raises(ValueError, match="overflows float32"):
        layer(*(x.astype(np.float32) for x in (q, k, v)))
    assert np.array_equal(layer.centroids, before) and np.array_equal(layer.commitment_loss, loss)
    clustered = ra.ClusteredAttention(4, bits=8)
    clustered(q, k, v)
    labels = clustered.labels.copy()
    with pytest.raises(ValueError, match="key_mask"):
        clustered(q[..., ::-1, :], k, v, key_mask=np.ones(5, bool))
    assert np.array_equal(clustered.labels, labels)


def test_centroids_a_user_sets_train_in_floating_point():
    """Integer centroids (say, an identity) became all zeros after one training step
    (the update was cast back to their dtype); float16 ones trained in float16."""
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, (1, 2, 16, 4))
    want = ra.RoutingAttention(n_clusters=4, decay=0.5)
    want.centroids = np.stack([np.eye(4)] * 2)
    want(q, k, v)
    for given in (np.stack([np.eye(4, dtype=np.int64)] * 2), np.stack([np.eye(4)] * 2).astype(np.float16)):
        layer = ra.RoutingAttention(n_clusters=4, decay=0.5)
        layer.centroids = given
        layer(q, k, v)
        assert layer.centroids.dtype == np.float64
        np.testing.assert_array_equal(layer.centroids, want.centroids)


def test_reprs_and_docstrings():
    routing = ra.RoutingAttention(8, local_heads=2, window=16, causal=True, membership="argmax")
    clustered = ra.ClusteredAttention(10, bits=12, topk=5, seed=3)
    combiner = ra.CombinerAttention("axial", block=7)
    names = {"RoutingAttention": ra.RoutingAttention, "ClusteredAttention": ra.ClusteredAttention,
             "CombinerAttention": ra.CombinerAttention}
    for layer in (routing, clustered, combiner):
        text = repr(layer)
        assert text.startswith(type(layer).__name__ + "(")
        assert repr(eval(text, names)) == text, "the repr rebuilds the same layer"
        for method in ("__call__", "forward", "backward"):
            doc = getattr(type(layer), method).__doc__
            assert doc and "Call self as a function" not in doc, (type(layer).__name__, method)
    assert "membership='argmax'" in repr(routing) and "topk=5" in repr(clustered)


# ------------------------------------------------------------------ NaN rule (issue 19 item 2)
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("membership", ["argmax", "balanced"])
def test_a_non_finite_query_gives_a_nan_row(membership, value):
    """As in dense attention: the query's output row is NaN (it used to be 0), its
    gradient row too; the other rows of every head are finite, and with argmax
    membership (a token's cluster depends on itself alone) they are unchanged."""
    rng = np.random.default_rng(8)
    q, k, v = _qkv(rng, (2, 3, 24, 4))
    layer = _routing_layer(rng, q, k, v, local_heads=1, window=4, membership=membership)
    clean = layer(q, k, v)
    g = rng.standard_normal(clean.shape)
    hit = np.zeros(clean.shape[:-1], bool)
    hit[1, 2, 5] = True                     # batch 1, routing head 2, query 5
    clean_grads = layer.backward(np.where(hit[..., None], 0, g))    # without query 5's part
    bad = q.copy()
    bad[hit] = value
    with np.errstate(invalid="ignore"):
        out = layer(bad, k, v)
        grads = layer.backward(g)
        dense = ra.attention(bad, k, v)
    assert np.isnan(dense[1, 2, 5]).all(), "dense attention's rule"
    assert np.isnan(out[1, 2, 5]).all(), "the non-finite query's row"
    assert np.isfinite(out[~hit]).all(), "NaN reached another row"
    assert np.isnan(grads[0][1, 2, 5]).all(), "its gradient row"
    assert np.isfinite(grads[0][~hit]).all() and np.isfinite(grads[1]).all() \
        and np.isfinite(grads[2]).all(), "gradients of the other rows"
    if membership == "argmax":
        np.testing.assert_allclose(out[~hit], clean[~hit], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(grads[0][~hit], clean_grads[0][~hit], rtol=1e-12, atol=1e-12)
        for x, y in zip(grads[1:], clean_grads[1:]):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12)


def test_a_padded_non_finite_query_keeps_output_zero():
    rng = np.random.default_rng(9)
    q, k, v = _qkv(rng, (2, 2, 16, 4))
    layer = _routing_layer(rng, q, k, v)
    q[0, 1, 3] = np.nan
    qm = np.ones((2, 16), bool)
    qm[0, 3] = False
    with np.errstate(invalid="ignore"):
        out = layer(q, k, v, query_mask=qm)
        dq = layer.backward(np.ones_like(out))[0]
    assert not out[0, :, 3].any(), "a padded query's output is 0, finite or not"
    assert np.isfinite(out).all() and not dq[0, :, 3].any()
