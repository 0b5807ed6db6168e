"""The torch.nn layers of routing_attention.torch against the NumPy layers, a pure-torch
reference on the same memberships, and torch's own machinery (state_dict, checkpoint)."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("RA_SANITIZED"):
    pytest.skip("the sanitizer job covers the kernels through the NumPy tests; the "
                "framework bridges are left out to keep its time",
                allow_module_level=True)

import routing_attention as ra                      # noqa: E402
import routing_attention.torch as rt                # noqa: E402
from torch.utils.checkpoint import checkpoint       # noqa: E402


def _qkv(shape=(2, 4, 48, 8), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, dtype=dtype, generator=g, requires_grad=True)
                 for _ in range(3))


def _np(t):
    return t.detach().numpy()


LAYER_OPTIONS = [
    dict(),
    dict(local_heads=2, causal=True),
    dict(local_heads=1, shared_qk=True, causal=True),
    dict(membership="argmax", merge="lse"),
    dict(n_clusters=5, w=12, merge="lse", decay=0.5),
]


@pytest.mark.parametrize("options", LAYER_OPTIONS, ids=str)
def test_routing_layer_equals_numpy_layer(options):
    q, k, v = _qkv()
    layer, twin = rt.RoutingAttention(**options), ra.RoutingAttention(**options)
    for step in range(2):       # first call (k-means) and a call with moved centroids
        y = layer(q, k, v)
        y_np = twin(_np(q), _np(k), _np(v))
        np.testing.assert_allclose(_np(y), y_np, rtol=0, atol=1e-12, err_msg=f"{options} step {step}")
        np.testing.assert_array_equal(_np(layer.centroids), twin.centroids)
        np.testing.assert_allclose(layer.commitment_loss.item(), twin.commitment_loss.mean(),
                                   rtol=1e-12)
        grads = torch.autograd.grad((y * y).sum(), (q, k, v), materialize_grads=True)
        for name, g, g_np in zip("qkv", grads, twin.backward(2 * y_np)):
            np.testing.assert_allclose(_np(g), g_np, rtol=0, atol=1e-11,
                                       err_msg=f"{options} step {step} d{name}")


def test_routing_layer_masks_equal_numpy_layer():
    q, k, v = _qkv()
    key_mask = np.ones((2, 48), bool)
    key_mask[0, -7:] = False
    query_mask = np.ones((2, 48), bool)
    query_mask[1, :5] = False
    layer, twin = rt.RoutingAttention(local_heads=1), ra.RoutingAttention(local_heads=1)
    y = layer(q, k, v, key_mask=torch.from_numpy(key_mask), query_mask=torch.from_numpy(query_mask))
    y_np = twin(_np(q), _np(k), _np(v), key_mask=key_mask, query_mask=query_mask)
    np.testing.assert_allclose(_np(y), y_np, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.sum(), (q, k, v))
    for g, g_np in zip(grads, twin.backward(np.ones_like(y_np))):
        np.testing.assert_allclose(_np(g), g_np, rtol=0, atol=1e-11)


def test_routing_layer_padding_content_changes_nothing():
    """Padded rows' content reaches no real query's output or gradient, through the
    balanced routing decisions too (padded rows take no cluster place)."""
    q, k, v = _qkv()
    pad = torch.ones(2, 48, dtype=torch.bool)
    pad[0, 36:], pad[1, :6] = False, False
    layer = rt.RoutingAttention(n_clusters=4, local_heads=1)
    layer(q, k, v, key_mask=pad, query_mask=pad)
    layer.eval()
    junk = (~pad)[:, None, :, None] * 40.0
    g = torch.Generator().manual_seed(1)
    outs, grads = [], []
    for shift in (0.0, 1.0):
        x = [(t.detach() + shift * junk * torch.randn(t.shape, dtype=t.dtype, generator=g))
             .requires_grad_() for t in (q, k, v)]
        y = layer(*x, key_mask=pad, query_mask=pad)
        outs.append(_np(y))
        grads.append([_np(t) for t in torch.autograd.grad((y * y).sum(), x)])
    np.testing.assert_array_equal(outs[1], outs[0])
    keep = pad.numpy()[:, None, :, None]
    assert not np.where(keep, 0, outs[0]).any(), "a padded query's output"
    for a, b in zip(*grads):
        np.testing.assert_array_equal(b, a)
        assert not np.where(keep, 0, a).any(), "a padded row's gradient"


def _routing_reference(q, k, v, q_idx, k_idx, scale):
    """Pure-torch routing attention with merge="mean" on given member lists: every
    (cluster, query) pair a softmax over the cluster's keys, averaged over a query's
    clusters; a query in no cluster gets 0.  q (B, H, n, d), idx (B, H, c, w)."""
    B, H, n, _ = q.shape
    out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)
    count = torch.zeros(q.shape[:-1], dtype=q.dtype)
    rows = []
    for b in range(B):
        for h in range(H):
            o_bh = torch.zeros(n, v.shape[-1], dtype=q.dtype)
            c_bh = torch.zeros(n, dtype=q.dtype)
            for qs, ks in zip(q_idx[b, h].tolist(), k_idx[b, h].tolist()):
                qs, ks = [i for i in qs if i >= 0], [j for j in ks if j >= 0]
                if not qs or not ks:
                    continue
                p = torch.softmax(scale * q[b, h, qs] @ k[b, h, ks].T, dim=-1)
                o_bh = o_bh.index_add(0, torch.tensor(qs), p @ v[b, h, ks])
                c_bh = c_bh.index_add(0, torch.tensor(qs), torch.ones(len(qs), dtype=q.dtype))
            rows.append(torch.where(c_bh[:, None] > 0, o_bh / c_bh.clamp(min=1)[:, None], 0))
    out = torch.stack(rows).reshape(B, H, n, -1)
    return out + 0 * count[..., None]


def test_layer_used_twice_in_one_graph_gets_exact_gradients():
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(n_clusters=4, decay=0.5)
    y1 = layer(q, k, v)
    idx1, cent1 = (layer.q_idx, layer.k_idx), layer.centroids.clone()
    y2 = layer(y1, k, v)            # the same layer again, on its own output
    idx2 = (layer.q_idx, layer.k_idx)
    assert not torch.equal(cent1, layer.centroids), "the second training call moves the centroids"
    scale = 8 ** -0.5
    r1 = _routing_reference(q, k, v, *idx1, scale)
    r2 = _routing_reference(r1, k, v, *idx2, scale)
    np.testing.assert_allclose(_np(y2), _np(r2), rtol=0, atol=1e-12)
    grads = torch.autograd.grad((y2 ** 2).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((r2 ** 2).sum(), (q, k, v))
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        np.testing.assert_allclose(_np(g), _np(g_ref), rtol=0, atol=1e-11, err_msg=f"d{name}")


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_updates_once_and_gives_exact_gradients(reentrant):
    q, k, v = _qkv(shape=(2, 3, 40, 8))
    plain = rt.RoutingAttention(local_heads=1, decay=0.5)
    checked = rt.RoutingAttention(local_heads=1, decay=0.5)
    for step in range(3):
        y = plain(q, k, v)
        loss = (y * y).sum()
        if not reentrant:          # the reentrant form runs the first forward without grad
            loss = loss + plain.commitment_loss
        expected = torch.autograd.grad(loss, (q, k, v))
        for t in (q, k, v):
            t.grad = None
        y = checkpoint(checked, q, k, v, use_reentrant=reentrant)
        loss = (y * y).sum() + (0 if reentrant else checked.commitment_loss)
        loss.backward()
        for name, t, g in zip("qkv", (q, k, v), expected):
            np.testing.assert_allclose(_np(t.grad), _np(g), rtol=0, atol=1e-12,
                                       err_msg=f"step {step} d{name}")
        # one EMA step per training forward: the recomputation did not move them again
        torch.testing.assert_close(checked.centroids, plain.centroids, rtol=0, atol=0)


def test_checkpointed_calls_on_identical_inputs_raise_instead_of_mixing_decisions():
    """Two training calls on the same inputs route differently (the centroids move between
    them); a recomputation cannot tell which it repeats.  It used to take the second
    call's decisions for both (gradients off by ~2, silently); now it raises."""
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(n_clusters=4, decay=0.5)
    y = (checkpoint(layer, q, k, v, use_reentrant=False)
         + checkpoint(layer, q, k, v, use_reentrant=False))
    with pytest.raises(RuntimeError, match="inputs of 2 training calls that routed differently"):
        y.sum().backward()
    layer.eval()                    # same decisions for both calls: nothing to tell apart
    y = (checkpoint(layer, q, k, v, use_reentrant=False)
         + checkpoint(layer, q, k, v, use_reentrant=False))
    y.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_functional_call_moves_the_centroids_it_is_given():
    """A training call moves the centroid tensor in place (as BatchNorm's statistics):
    torch.func.functional_call's tensor and outside references see the EMA step (the
    buffer used to be replaced, so functional_call lost every update)."""
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(n_clusters=4, decay=0.5)
    layer(q, k, v)                                  # fits the centroids
    held = layer.centroids
    before = held.clone()
    layer(q, k, v)
    assert layer.centroids is held and not torch.equal(held, before)
    given = {"centroids": before.clone()}
    torch.func.functional_call(layer, given, (q, k, v))
    assert not torch.equal(given["centroids"], before)


def test_centroids_fitted_under_inference_mode_train_later():
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(n_clusters=4, decay=0.5).eval()
    with torch.inference_mode():
        layer(q, k, v)                              # fits inference-mode centroids
    fitted = layer.centroids.clone()
    layer.train()(q, k, v)                          # could not move them in place
    assert not torch.equal(layer.centroids, fitted)


def test_deepcopy_after_a_call():
    import copy
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(n_clusters=4)
    layer(q, k, v)
    twin = copy.deepcopy(layer)                     # used to fail on the loss' graph
    assert torch.equal(twin.centroids, layer.centroids)
    assert not twin.commitment_loss.requires_grad
    assert layer.commitment_loss.requires_grad
    torch.testing.assert_close(twin.eval()(q, k, v), layer.eval()(q, k, v), rtol=0, atol=0)


def test_fresh_routing_layer_compiles():
    """The routing decisions (NumPy k-means on the first call) are a graph break, not a
    trace of NumPy code (a fresh layer used to fail under torch.compile)."""
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer, twin = rt.RoutingAttention(local_heads=1), rt.RoutingAttention(local_heads=1)
    y = torch.compile(layer)(q, k, v)
    torch.testing.assert_close(y, twin(q, k, v), rtol=0, atol=0)
    torch.testing.assert_close(layer.centroids, twin.centroids, rtol=0, atol=0)


def test_recomputation_that_matches_no_call_raises():
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention()
    layer(q, k, v)

    class Recompute(torch.autograd.Function):       # a forward run during a backward pass
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            layer(q.detach() + 1, k.detach(), v.detach())
            return g

    x = torch.ones(1, requires_grad=True)
    with pytest.raises(RuntimeError, match="recomputed during backward"):
        Recompute.apply(x).sum().backward()


def test_centroids_buffer_state_dict_to_eval():
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(decay=0.5)
    assert "centroids" in layer.state_dict()
    layer(q, k, v)
    trained = layer.centroids.clone()
    assert trained.shape == (2, round(32 ** 0.5) - 0, 8) or trained.shape[0] == 2
    fresh = rt.RoutingAttention(decay=0.5)
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh.centroids, trained, rtol=0, atol=0)
    fresh.eval()
    y_eval = fresh(q, k, v)
    torch.testing.assert_close(fresh.centroids, trained, rtol=0, atol=0)   # eval: no update
    fresh.train()
    fresh(q, k, v)
    assert not torch.equal(fresh.centroids, trained)                      # train: one update
    assert fresh.to(torch.float32).centroids.dtype == torch.float32
    assert y_eval.shape == q.shape


def test_commitment_loss_is_differentiable():
    q, k, v = _qkv(shape=(1, 2, 32, 8))
    layer = rt.RoutingAttention(local_heads=1)
    layer(q, k, v)
    loss = layer.commitment_loss
    assert loss.requires_grad and loss.dim() == 0
    gq, gk = torch.autograd.grad(loss, (q, k))
    assert float(gq[:, 1:].abs().sum()) > 0 and float(gk[:, 1:].abs().sum()) > 0
    assert float(gq[:, :1].abs().sum()) == 0           # local heads are not routed


@pytest.mark.parametrize("topk", [None, 5])
def test_clustered_layer_equals_numpy_layer_and_compiles(topk):
    q, k, v = _qkv(shape=(2, 3, 40, 8))
    layer, twin = rt.ClusteredAttention(6, topk=topk), ra.ClusteredAttention(6, topk=topk)
    y = layer(q, k, v)
    y_np = twin(_np(q), _np(k), _np(v))
    np.testing.assert_array_equal(_np(y), y_np)
    np.testing.assert_array_equal(_np(layer.labels), twin.labels)
    for g, g_np in zip(torch.autograd.grad(y.sum(), (q, k, v)), twin.backward(np.ones_like(y_np))):
        np.testing.assert_array_equal(_np(g), g_np)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), y, rtol=0, atol=0)
    assert "planes" in layer.state_dict()


@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
def test_combiner_layer_matches_function(plan):
    q, k, v = _qkv(shape=(1, 2, 30, 4))
    layer = rt.CombinerAttention(plan, causal=True)
    # compiling is slow: one plan is enough to show the layer traces without graph breaks
    y = torch.compile(layer, fullgraph=True)(q, k, v) if plan == "fixed" else layer(q, k, v)
    y_np = ra.combiner_attention(_np(q), _np(k), _np(v), plan=plan, causal=True)
    np.testing.assert_allclose(_np(y), y_np, rtol=0, atol=1e-14)
    assert torch.autograd.gradcheck(layer, (q, k, v), fast_mode=True)


def test_clustered_layer_checks_its_query_mask():
    """A torch-style (B, 1, 1, n) query mask for q (B, H, n, d) used to broadcast the
    result to (B, B, H, n, e); it is refused as by the NumPy layer."""
    q, k, v = _qkv(shape=(2, 3, 24, 8))
    layer = rt.ClusteredAttention(4)
    with pytest.raises(ValueError, match=r"query_mask must have shape \(\.\.\., 24\) with "
                                         r"leading axes that broadcast.*got \(2, 1, 1, 24\)"):
        layer(q, k, v, query_mask=torch.ones(2, 1, 1, 24, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"query_mask must have shape \(\.\.\., 24\) to match "
                                         "the queries"):
        layer(q, k, v, query_mask=torch.ones(2, 3, 20, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"rel_bias needs the improved form \(topk\)"):
        layer(q, k, v, rel_bias=torch.zeros(47, dtype=q.dtype))
    mask = torch.ones(2, 1, 24, dtype=torch.bool)
    mask[:, :, 20:] = False
    assert layer(q, k, v, query_mask=mask).shape == (2, 3, 24, 8)


def test_layer_rejects_bad_options_and_inputs():
    with pytest.raises(ValueError, match="membership"):
        rt.RoutingAttention(membership="nearest")
    with pytest.raises(ValueError, match="plan"):
        rt.CombinerAttention("diagonal")
    layer = rt.RoutingAttention(local_heads=5)
    q, k, v = _qkv(shape=(1, 2, 16, 4))
    with pytest.raises(ValueError, match="local_heads"):
        layer(q, k, v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        rt.RoutingAttention()(_np(q), k, v)
    with pytest.raises(ValueError, match=r"q and k must have the same feature size d: q has 4"):
        rt.RoutingAttention()(q, k[..., :3], v)
    with pytest.raises(ValueError, match=r"k and v must have the same sequence length m"):
        rt.RoutingAttention()(q, k, v[..., :5, :])


def test_readme_pytorch_snippet_runs():
    """The README's "With PyTorch" example, executed as written."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## With PyTorch", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md (With PyTorch)", "exec"), namespace)
    block = namespace["block"]
    assert block.attn.centroids.shape[0] == 2          # the routing heads' centroids
    assert all(p.grad is not None for p in block.parameters())


def test_decoding_caches_for_tensors():
    """The tensor caches decode the torch layer and functions row for row."""
    q, k, v = (t.detach() for t in _qkv(shape=(2, 3, 20, 8)))
    layer = rt.RoutingAttention(n_clusters=3, membership="argmax", causal=True, window=4,
                                local_heads=1)
    layer(q, k, v)
    layer.eval()
    rows = rt.RoutingCache(layer).prefill(q, k, v)
    assert rows.dtype == torch.float64
    for t in (0, 7, 19):
        full = layer(q[..., :t + 1, :], k[..., :t + 1, :], v[..., :t + 1, :])
        torch.testing.assert_close(rows[..., t, :], full[..., t, :], rtol=0, atol=1e-12)
    cache = rt.CombinerCache("fixed", block=5)
    rows = cache.prefill(q.float(), k.float(), v.float())
    full = rt.combiner_attention(q.float(), k.float(), v.float(), plan="fixed", block=5, causal=True)
    torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-6)
    assert cache.lengths.tolist() == [20] * 6


def test_nan_query_row_gives_nan_output_row_like_numpy_layer():
    q, k, v = (t.detach().clone() for t in _qkv(shape=(1, 2, 32, 8)))
    q[0, 1, 5] = float("nan")
    layer, twin = rt.RoutingAttention(), ra.RoutingAttention()
    with np.errstate(invalid="ignore"):
        y = layer(q, k, v)
        y_np = twin(_np(q), _np(k), _np(v))
    assert torch.isnan(y[0, 1, 5]).all()
    np.testing.assert_array_equal(_np(y), y_np)        # NaN in the same places, same values


@pytest.mark.parametrize("dtype, huge, tiny", [(torch.float64, 1e200, 1e-160),
                                               (torch.float32, 1e20, 1e-25)], ids=["f64", "f32"])
def test_huge_and_tiny_rows_normalised_like_numpy_layer(dtype, huge, tiny):
    """Finite rows whose squares overflow or underflow: the shared-QK keys and the
    commitment loss's unit rows are those of the same rows at ordinary size (the plain
    norm made a huge row's key zero and left a tiny row's unnormalised), and the layer
    equals the NumPy layer (whose C normalisation scales such rows)."""
    q, k, v = (t.detach().clone() for t in _qkv(shape=(1, 2, 32, 8), dtype=dtype))
    q[0, :, 3] *= huge
    q[0, :, 7] *= tiny
    unit = rt._unit_rows(q)
    plain = q.clone()
    plain[0, :, 3] /= huge
    plain[0, :, 7] /= tiny
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(unit, rt._unit_rows(plain), rtol=0, atol=4 * eps)
    torch.testing.assert_close(torch.linalg.vector_norm(unit, dim=-1),
                               torch.ones(unit.shape[:-1], dtype=dtype), rtol=0, atol=4 * eps)
    options = dict(local_heads=1, shared_qk=True)
    layer, twin = rt.RoutingAttention(**options), ra.RoutingAttention(**options)
    y = layer(q, k, v)
    y_np = twin(_np(q), _np(k), _np(v))
    assert torch.isfinite(y).all() and torch.isfinite(layer.commitment_loss)
    np.testing.assert_allclose(_np(y), y_np, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-5)
