"""routing_attention.torch's functional ops: torch's own checkers (opcheck, gradcheck),
equality with the NumPy API, compile/export, dtypes, devices and threads."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("RA_SANITIZED"):
    pytest.skip("the sanitizer job covers the kernels through the NumPy tests; the "
                "framework bridges are left out to keep its time", allow_module_level=True)

import routing_attention as ra                     # noqa: E402
import routing_attention.torch as rt               # noqa: E402

OPS = torch.ops.routing_attention
N, D = 12, 4


def _qkv(batch=(2,), n=N, d=D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch + (n, d), dtype=dtype, generator=g, requires_grad=True)
                 for _ in range(3))


# member lists with -1 slots before real members, every token a query and a key somewhere
Q_IDX = torch.tensor([[0, -1, 3, 5, 8, 10], [1, 2, 4, 6, 7, 9], [11, -1, -1, -1, -1, -1]])
K_IDX = torch.tensor([[0, 3, -1, 5, 9, 11], [1, 2, 4, 7, -1, -1], [11, 10, 0, -1, -1, -1]])
LABELS = torch.tensor([i % 3 for i in range(N)])
MASK = torch.tensor([True] * (N - 3) + [False] * 3)


def _op_cases():
    q, k, v = (t.detach() for t in _qkv())
    x = q[0]
    cent = rt.spherical_kmeans(x, 3)
    scores = x @ cent.T
    planes = torch.randn(10, D + 1, dtype=torch.float64)
    codes = rt.lsh_hash(x, planes)
    cases = {
        "attention": (OPS.attention, (q, k, v, MASK, True, None)),
        "attention-plain": (OPS.attention, (q, k, v, None, False, 0.7)),
        "routing-mean": (OPS.routing_attention, (q, k, v, Q_IDX, K_IDX, True, False, "mean", None)),
        "routing-lse-self": (OPS.routing_attention, (q, k, v, Q_IDX, K_IDX, False, True, "lse", None)),
        "local": (OPS.local_attention, (q, k, v, 4, True, None)),
        "clustered": (OPS.clustered_attention, (q, k, v, LABELS, 3, 0, MASK, None)),
        "improved": (OPS.clustered_attention, (q, k, v, LABELS, 3, 4, None, None)),
        "spherical_kmeans": (OPS.spherical_kmeans, (x, 3, 5, 1, None, None)),
        "assign_clusters": (OPS.assign_clusters, (x, cent)),
        "assign_scores": (OPS.assign_scores, (x, cent)),
        "assign_top_members": (OPS.assign_top_members, (x, cent, 4)),
        "top_members": (OPS.top_members, (scores, 4)),
        "members_from_labels": (OPS.members_from_labels, (LABELS, 3, None)),
        "update_centroids": (OPS.update_centroids, (cent, x, LABELS, 0.9, None)),
        "lsh_hash": (OPS.lsh_hash, (x, planes)),
        "hamming_kmeans": (OPS.hamming_kmeans, (codes, 3, 5, 0, None)),
    }
    for plan in ("fixed", "axial", "logsparse", "mixture"):
        cases[f"combiner-{plan}"] = (OPS.combiner_attention,
                                     (q, k, v, plan, None, plan != "mixture", None))
    return cases


CASES = _op_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    op, args = CASES[name]
    # the differentiable ops get inputs that require grad, so the autograd tests run too
    differentiable = name.split("-")[0] in ("attention", "routing", "local", "clustered",
                                            "improved", "combiner")
    args = tuple(a.clone().requires_grad_(True) if differentiable and isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args)
    torch.library.opcheck(op, args)


def test_opcheck_backward_ops():
    q, k, v = (t.detach() for t in _qkv())
    out, lse = OPS.attention(q, k, v, MASK, True, None)
    dout = torch.randn_like(out)
    torch.library.opcheck(OPS.attention_backward,
                          (dout, torch.randn_like(lse), q, k, v, MASK, True, None, out, lse))
    stats = OPS.routing_attention(q, k, v, Q_IDX, K_IDX, False, False, "mean", None)
    torch.library.opcheck(OPS.routing_attention_backward,
                          (dout, None, q, k, v, Q_IDX, K_IDX, False, False, "mean", None, *stats))
    out, lse = OPS.combiner_attention(q, k, v, "axial", None, True, None)
    torch.library.opcheck(OPS.combiner_attention_backward,
                          (dout, None, q, k, v, "axial", None, True, None, out, lse))


GRAD_CASES = {
    "attention": lambda q, k, v: rt.attention(q, k, v),
    "attention-causal-mask": lambda q, k, v: rt.attention(q, k, v, causal=True, key_mask=MASK),
    "attention-lse": lambda q, k, v: rt.attention(q, k, v, causal=True, return_lse=True),
    "local": lambda q, k, v: rt.local_attention(q, k, v, 4),
    "local-causal": lambda q, k, v: rt.local_attention(q, k, v, 5, causal=True),
    "routing-mean": lambda q, k, v: rt.routing_attention(q, k, v, Q_IDX, K_IDX),
    "routing-causal": lambda q, k, v: rt.routing_attention(q, k, v, Q_IDX, K_IDX, causal=True),
    "routing-lse-self": lambda q, k, v: rt.routing_attention(
        q, k, v, Q_IDX, K_IDX, merge="lse", exclude_self=True, return_lse=True),
    "routing-mean-lse-out": lambda q, k, v: rt.routing_attention(q, k, v, Q_IDX, K_IDX,
                                                                 return_lse=True),
    "clustered": lambda q, k, v: rt.clustered_attention(q, k, v, LABELS, 3, key_mask=MASK),
    "broadcast-batch": lambda q, k, v: rt.attention(q, k[:1], v[:1], causal=True),
}
for _plan in ("fixed", "axial", "logsparse", "mixture"):
    for _causal in (False, True):
        GRAD_CASES[f"combiner-{_plan}-{_causal}"] = (
            lambda q, k, v, p=_plan, c=_causal: rt.combiner_attention(q, k, v, plan=p, causal=c))
GRAD_CASES["combiner-fixed-block"] = lambda q, k, v: rt.combiner_attention(q, k, v, block=5)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradcheck_float64(name):
    assert torch.autograd.gradcheck(GRAD_CASES[name], _qkv())


def test_improved_clustered_gradients_equal_numpy_backward():
    """m̂_c is a constant of the backward by definition: compared with the NumPy backward,
    not with finite differences."""
    q, k, v = _qkv()
    out = rt.improved_clustered_attention(q, k, v, LABELS, 3, 4, key_mask=MASK)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = ra.improved_clustered_attention_backward(
        dout.numpy(), *(t.detach().numpy() for t in (q, k, v)), LABELS.numpy(), 3, 4,
        key_mask=MASK.numpy())
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(g.numpy(), e)


def test_results_and_gradients_equal_the_numpy_api():
    q, k, v = _qkv(dtype=torch.float32)
    qn, kn, vn = (t.detach().numpy() for t in (q, k, v))
    out = rt.routing_attention(q, k, v, Q_IDX, K_IDX, causal=True)
    np.testing.assert_array_equal(out.detach().numpy(), ra.routing_attention(
        qn, kn, vn, Q_IDX.numpy(), K_IDX.numpy(), causal=True))
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    expected = ra.routing_attention_backward(dout.numpy(), qn, kn, vn, Q_IDX.numpy(),
                                             K_IDX.numpy(), causal=True)
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(g.numpy(), e)
    np.testing.assert_array_equal(rt.combiner_attention(q, k, v, plan="mixture").detach().numpy(),
                                  ra.combiner_attention(qn, kn, vn, plan="mixture"))


def test_tensors_are_shared_with_numpy(monkeypatch):
    """The NumPy function receives views of the tensors' memory, not copies."""
    from routing_attention import dense
    seen = {}
    original = dense.attention

    def spy(q, k, v, **kw):
        seen["q"] = q
        return original(q, k, v, **kw)

    monkeypatch.setattr(dense, "attention", spy)
    q, k, v = (t.detach() for t in _qkv(dtype=torch.float32))
    rt.attention(q, k, v)
    assert np.shares_memory(seen["q"], q.numpy())


def test_double_backward_raises():
    q, k, v = _qkv()
    (g,) = torch.autograd.grad(rt.attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        rt.attention(q, k.detach().numpy(), v)
    with pytest.raises(TypeError, match="q must be a floating-point"):
        rt.attention(torch.ones(2, 3, dtype=torch.int64), k, v)
    with pytest.raises(TypeError, match="q_idx must be an integer"):
        rt.routing_attention(q, k, v, Q_IDX.double(), K_IDX)

    class OnAccelerator(torch.Tensor):          # what a CUDA tensor reports, on a CPU box
        @property
        def device(self):
            return torch.device("cuda", 0)

    fake = torch.Tensor._make_subclass(OnAccelerator, q.detach())
    with pytest.raises(ValueError, match="q is on device cuda:0"):
        rt._check_tensors(q=fake)


def test_meta_tensors_infer_shapes_but_never_mix_with_cpu_ones():
    """All-meta calls give meta results of the right shape; a CPU call with one meta
    tensor raises naming it (it once returned uninitialised memory)."""
    q, k, v = (t.detach() for t in _qkv())
    meta = [t.to("meta") for t in (q, k, v)]
    out = rt.attention(*meta)
    assert out.device.type == "meta" and out.shape == rt.attention(q, k, v).shape
    out = rt.routing_attention(*meta, Q_IDX.to("meta"), K_IDX.to("meta"))
    assert out.device.type == "meta" and out.shape == q.shape[:-1] + v.shape[-1:]
    with pytest.raises(ValueError, match="k is on device meta but q on cpu"):
        rt.attention(q, meta[1], v)
    with pytest.raises(ValueError, match="v is on device meta"):
        rt.local_attention(q, k, meta[2], 4)
    with pytest.raises(ValueError, match="q_idx is on device meta"):
        rt.routing_attention(q, k, v, Q_IDX.to("meta"), K_IDX)
    with pytest.raises(ValueError, match="on device meta"):
        rt.clustered_attention(q, meta[1], v, torch.zeros(q.shape[:-1], dtype=torch.int64), 2)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_computed_in_float32(half):
    q, k, v = (t.detach().to(half) for t in _qkv(dtype=torch.float32))
    out = rt.combiner_attention(q, k, v, causal=True)
    assert out.dtype == half
    expected = rt.combiner_attention(q.float(), k.float(), v.float(), causal=True).to(half)
    assert torch.equal(out, expected)


def test_compile_fullgraph_and_export_match_eager():
    q, k, v = _qkv()
    planes = torch.randn(8, D + 1, dtype=torch.float64)

    def model(q, k, v):
        labels = rt.hamming_kmeans(rt.lsh_hash(q, planes), 3)
        a = rt.attention(q, k, v, causal=True)
        b = rt.routing_attention(a, k, v, Q_IDX, K_IDX)
        c = rt.local_attention(b, k, v, 4)
        d = rt.clustered_attention(c, k, v, labels, 3)
        e = rt.improved_clustered_attention(d, k, v, labels, 3, 4)
        return rt.combiner_attention(e, k, v, plan="axial")

    eager = model(q, k, v)
    compiled = torch.compile(model, fullgraph=True)(q, k, v)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip(torch.autograd.grad(eager.sum(), (q, k, v)),
                    torch.autograd.grad(compiled.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    class Model(torch.nn.Module):
        def forward(self, q, k, v):
            return model(q, k, v)

    exported = torch.export.export(Model(), (q, k, v))
    torch.testing.assert_close(exported.module()(q, k, v), eager, rtol=0, atol=0)


def test_threads_follow_torch_unless_set():
    saved_torch, saved_ra = torch.get_num_threads(), ra.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert rt.get_num_threads() == 1
        rt.attention(*(t.detach() for t in _qkv()))
        assert ra.get_num_threads() == 1, "the op ran on torch's thread count"
        rt.set_num_threads(2)
        assert rt.get_num_threads() == 2
        rt.attention(*(t.detach() for t in _qkv()))
        assert ra.get_num_threads() == 2
        rt.set_num_threads(None)
        assert rt.get_num_threads() == 1
    finally:
        rt.set_num_threads(None)
        torch.set_num_threads(saved_torch)
        ra.set_num_threads(saved_ra)


def test_routing_op_slot_outputs_are_a_function_of_the_inputs():
    """The kernel leaves the slot rows of one-cluster tokens unwritten; the op zeroes
    them (and the empty slots), and keeps the per-cluster rows of tokens in two clusters."""
    q, k, v = (t.detach() for t in _qkv(batch=()))
    q_idx = torch.tensor([[0, -1, 3, 5], [5, 1, 2, -1]])        # token 5 in both clusters
    _, _, slot_out, _, _ = OPS.routing_attention(q, k, v, q_idx, q_idx, False, False, "mean", None)
    # slot (cl, r) is the r-th listed query: cluster 0 lists 0, 3, 5; cluster 1 lists 5, 1, 2
    assert (slot_out[0, :2] == 0).all() and (slot_out[1, 1:] == 0).all()
    for cl, r in ((0, 2), (1, 0)):
        own = rt.routing_attention(q, k, v, q_idx[cl:cl + 1], q_idx[cl:cl + 1])[5]
        torch.testing.assert_close(slot_out[cl, r], own, rtol=1e-10, atol=1e-12)
