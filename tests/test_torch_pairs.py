"""The torch bridge's attention dropout and relative position bias: torch's gradcheck, the
reference, the seed drawn from torch's generator."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import routing_attention.torch as rat                      # noqa: E402
from routing_attention import reference as ref             # noqa: E402
from routing_attention.pairs import alibi_slopes, relative_bias  # noqa: E402

H, N = 2, 10


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, c, generator=g, dtype=torch.float64, requires_grad=True)
               for c in (3, 3, 2))
    slopes = torch.tensor(alibi_slopes(H), requires_grad=True)
    table = torch.randn(H, 8, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v, slopes, table


def members():
    rng = np.random.default_rng(1)
    return torch.tensor(np.stack([np.stack([rng.permutation(N)[:5] for _ in range(3)])
                                  for _ in range(H)]))


CALLS = {
    "dense": lambda q, k, v, rb: rat.attention(q, k, v, causal=True, dropout_p=0.3,
                                               dropout_seed=5, rel_bias=rb),
    "routing": lambda q, k, v, rb: rat.routing_attention(q, k, v, members(), members(),
                                                         merge="lse", dropout_p=0.3,
                                                         dropout_seed=5, rel_bias=rb),
    "local": lambda q, k, v, rb: rat.local_attention(q, k, v, 4, causal=True, dropout_p=0.2,
                                                     dropout_seed=1, rel_bias=rb),
}
REFS = {
    "dense": lambda q, k, v, rb: ref.attention(q, k, v, causal=True, dropout_p=0.3,
                                               dropout_seed=5, rel_bias=rb),
    "routing": lambda q, k, v, rb: ref.routing_attention(q, k, v, members().numpy(),
                                                         members().numpy(), merge="lse",
                                                         dropout_p=0.3, dropout_seed=5,
                                                         rel_bias=rb),
    "local": lambda q, k, v, rb: ref.local_attention(q, k, v, 4, causal=True, dropout_p=0.2,
                                                     dropout_seed=1, rel_bias=rb),
}


@pytest.mark.parametrize("method", sorted(CALLS))
def test_gradcheck_through_alibi_and_table(method):
    q, k, v, slopes, table = leaves()

    def f(q, k, v, slopes, table):
        rb = rat.relative_bias(N, N, alibi=slopes, table=table, max_distance=16)
        return CALLS[method](q, k, v, rb)
    assert torch.autograd.gradcheck(f, (q, k, v, slopes, table))


@pytest.mark.parametrize("method", sorted(CALLS))
def test_matches_reference(method):
    q, k, v, slopes, table = leaves(2)
    rb = rat.relative_bias(N, N, alibi=slopes, table=table, max_distance=16)
    np_rb = relative_bias(N, N, alibi=slopes.detach().numpy(), table=table.detach().numpy(),
                          max_distance=16)
    np.testing.assert_allclose(rb.detach().numpy(), np_rb, rtol=1e-12)
    got = CALLS[method](q, k, v, rb).detach().numpy()
    want = REFS[method](*(x.detach().numpy() for x in (q, k, v)), np_rb)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_seed_from_torch_generator():
    q, k, v, *_ = leaves()
    a, b = rat.attention(q, k, v, dropout_p=0.5), rat.attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)                        # a new mask per call
    torch.manual_seed(3)
    a = rat.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = rat.attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    a.sum().backward()                                  # the backward regenerates that mask
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("method", sorted(CALLS))
def test_non_reentrant_checkpoint(method):
    """The pair op's backward unpacks its saved tensors once: under non-reentrant
    torch.utils.checkpoint every call with a bias or dropout used to fail in backward."""
    from torch.utils.checkpoint import checkpoint
    q, k, v, slopes, table = leaves(3)

    def f(q, k, v, slopes, table):
        rb = rat.relative_bias(N, N, alibi=slopes, table=table, max_distance=16)
        return CALLS[method](q, k, v, rb)
    inputs = (q, k, v, slopes, table)
    want = torch.autograd.grad(f(*inputs).square().sum(), inputs)
    got = torch.autograd.grad(checkpoint(f, *inputs, use_reentrant=False).square().sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_drawn_dropout_seed_compiles_with_fullgraph():
    """A seed drawn from torch's generator is a tensor operand, traced into the graph (it
    was read in Python: fullgraph=True failed on a data-dependent int); its backward
    regenerates the same mask."""
    q, k, v, *_ = leaves(4)
    layer = rat.CombinerAttention("fixed", causal=True, dropout=0.4).train()
    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(7)
    y = compiled(q, k, v)
    torch.manual_seed(7)
    seed = torch.randint(0, 2**62, ())                   # the same draw, made eagerly
    same = rat.combiner_attention(q, k, v, plan="fixed", causal=True, dropout_p=0.4,
                                  dropout_seed=int(seed))
    assert not torch.equal(y, layer.eval()(q, k, v))    # dropped
    torch.testing.assert_close(y, same, rtol=0, atol=0)  # the generator's draw, compiled
    grads = torch.autograd.grad(y.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(same.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lse_refused_with_pair_terms():
    q, k, v, *_ = leaves()
    with pytest.raises(ValueError, match="return_lse"):
        rat.attention(q, k, v, dropout_p=0.1, return_lse=True)


def test_clustered_gradcheck_and_reference():
    """Plain clustered with dropout; improved with topk > m (every weight exact, so the
    m̂-constant gradient is the true one) with dropout and a learned T5 table."""
    g = torch.Generator().manual_seed(4)
    n, m, C = 10, 12, 3
    q, k, v = (torch.randn(2, rows, c, generator=g, dtype=torch.float64, requires_grad=True)
               for rows, c in ((n, 3), (m, 3), (m, 2)))
    labels = torch.randint(0, C, (2, n), generator=g)
    table = torch.randn(8, generator=g, dtype=torch.float64, requires_grad=True)

    def plain(q, k, v):
        return rat.clustered_attention(q, k, v, labels, C, dropout_p=0.3, dropout_seed=2)

    def improved(q, k, v, table):
        return rat.improved_clustered_attention(
            q, k, v, labels, C, m + 1, dropout_p=0.3, dropout_seed=2,
            rel_bias=rat.relative_bias(n, m, table=table, max_distance=16))
    assert torch.autograd.gradcheck(plain, (q, k, v))
    assert torch.autograd.gradcheck(improved, (q, k, v, table))
    np_args = [x.detach().numpy() for x in (q, k, v)] + [labels.numpy(), C]
    want = ref.clustered_attention(*np_args, dropout_p=0.3, dropout_seed=2)
    np.testing.assert_allclose(plain(q, k, v).detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_layers_drop_only_while_training():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 32, 8) for _ in range(3))
    for layer in (rat.RoutingAttention(4, local_heads=2, window=8, causal=True, dropout=0.3),
                  rat.ClusteredAttention(4, topk=4, dropout=0.3),
                  rat.CombinerAttention("fixed", causal=True, dropout=0.3)):
        layer.eval()
        a, b = layer(q, k, v), layer(q, k, v)
        assert torch.equal(a, b)                         # eval: no dropout, deterministic
        layer.train()
        torch.manual_seed(5)
        c = layer(q, k, v)
        torch.manual_seed(5)
        d = layer(q, k, v)
        assert torch.equal(c, d) and not torch.allclose(a, c)


@pytest.mark.parametrize("plan", ["fixed", "axial", "logsparse", "mixture"])
def test_combiner_gradcheck(plan):
    q, k, v, slopes, table = leaves(6)
    block = None if plan == "logsparse" else 3

    def f(q, k, v, table):
        rb = rat.relative_bias(N, N, table=table, max_distance=16, bidirectional=False)
        return rat.combiner_attention(q, k, v, plan=plan, block=block, causal=True,
                                      dropout_p=0.3, dropout_seed=7, rel_bias=rb)
    assert torch.autograd.gradcheck(f, (q, k, v, table))
    rb = relative_bias(N, N, table=table.detach().numpy(), max_distance=16, bidirectional=False)
    want = ref.combiner_attention(*(x.detach().numpy() for x in (q, k, v)), plan=plan,
                                  block=block, causal=True, dropout_p=0.3, dropout_seed=7,
                                  rel_bias=rb)
    np.testing.assert_allclose(f(q, k, v, table).detach().numpy(), want, rtol=1e-10, atol=1e-12)
