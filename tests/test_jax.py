"""routing_attention.jax: custom-vjp attention methods and routing decisions under jit,
grad and vmap, against the NumPy API (the source of truth) and finite differences."""
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
if os.environ.get("RA_SANITIZED"):
    pytest.skip("the sanitizer job covers the kernels through the NumPy tests; the "
                "framework bridges are left out to keep its time",
                allow_module_level=True)
import jax.numpy as jnp  # noqa: E402
import jax.test_util  # noqa: E402

import routing_attention as ra  # noqa: E402
import routing_attention.jax as rj  # noqa: E402
from conftest import assert_close  # noqa: E402

N, D, E, B = 12, 4, 3, 2      # sequence, key/query features, value features, batch


@pytest.fixture(autouse=True, scope="module")
def x64():
    """Every test here runs with 64-bit JAX types unless it turns them off itself.  Set
    globally, not by the thread-local `jax.enable_x64` context: JAX may run a host callback
    on another thread, which would then check float64 results against 32-bit types."""
    before = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", before)


@pytest.fixture(autouse=True, scope="module")
def one_kernel_thread():
    """The shapes here are tiny: one kernel thread (the file's time is call overhead, and
    OpenMP workers spinning on a busy shared machine would multiply it)."""
    before = ra.get_num_threads()
    ra.set_num_threads(1)
    yield
    ra.set_num_threads(before)


def _rng():
    return np.random.default_rng(2026)


def _qkv(dtype, batch=(B,), n=N):
    rng = _rng()
    return tuple(rng.standard_normal(batch + (n, f)).astype(dtype) for f in (D, D, E))


def _members():
    """Balanced memberships (B, c=3, w=5) of queries and keys from random scores."""
    rng = _rng()
    q_idx = ra.top_members(rng.standard_normal((B, N, 3)), 5)
    k_idx = ra.top_members(rng.standard_normal((B, N, 3)), 6)
    return q_idx, k_idx


def _padded_members():
    """Member lists with empty (-1) slots before, between and after members, and one
    cluster without queries: (B, c=3, 7) queries, (B, 3, 9) keys."""
    q_idx, k_idx = _members()
    q_idx = np.insert(q_idx, [0, 3], -1, axis=-1)
    k_idx = np.insert(k_idx, [0, 2, 6], -1, axis=-1)
    q_idx[:, 2] = k_idx[:, 2, :6] = -1
    return q_idx, k_idx


def _labels():
    """Query labels (B, n) in [-1, 3): every cluster used, two padded queries."""
    labels = np.tile(np.arange(N) % 3, (B, 1))
    labels[0, 4] = labels[1, 7] = -1
    return labels


def _key_mask():
    mask = np.ones((B, N), bool)
    mask[0, [1, 5]] = mask[1, 0] = False
    return mask


# ------------------------------------------------------------------ the cases
# Each case: the keyword call as a function of (q, k, v) for the JAX module and for the
# NumPy API, and the NumPy backward for the same call.
def _case(name, **kw):
    """(jax_fn, numpy_fn, numpy_backward) of method `name` with keywords `kw`."""
    array_args = {
        "attention": (), "combiner_attention": (),
        "local_attention": (4,),
        "routing_attention": _members(),
        "routing_padded": _padded_members(),
        "clustered_attention": (_labels(), 3),
        "improved_clustered_attention": (_labels(), 3, 4),
    }[name]
    name = name.replace("_padded", "_attention")
    jax_fn, np_fn = getattr(rj, name), getattr(ra, name)
    np_bwd = getattr(ra, name + "_backward")
    return (lambda q, k, v: jax_fn(q, k, v, *array_args, **kw),
            lambda q, k, v: np_fn(q, k, v, *array_args, **kw),
            lambda dout, q, k, v: np_bwd(dout, q, k, v, *array_args, **kw))


CASES = {
    "attention": ("attention", {}),
    "attention-causal": ("attention", dict(causal=True)),
    "attention-key_mask": ("attention", dict(key_mask=_key_mask(), scale=0.7)),
    "attention-causal-key_mask": ("attention", dict(causal=True, key_mask=_key_mask())),
    "local": ("local_attention", {}),
    "local-causal": ("local_attention", dict(causal=True, scale=0.5)),
    "routing-mean": ("routing_attention", {}),
    "routing-lse": ("routing_attention", dict(merge="lse")),
    "routing-causal": ("routing_attention", dict(causal=True)),
    "routing-exclude_self": ("routing_attention", dict(exclude_self=True, merge="lse")),
    "routing-causal-exclude_self": ("routing_attention", dict(causal=True, exclude_self=True)),
    "routing-padded-lse": ("routing_padded", dict(merge="lse")),
    "routing-padded-causal": ("routing_padded", dict(causal=True, exclude_self=True)),
    "clustered": ("clustered_attention", {}),
    "clustered-key_mask": ("clustered_attention", dict(key_mask=_key_mask(), scale=0.6)),
    "improved": ("improved_clustered_attention", {}),
    "improved-key_mask": ("improved_clustered_attention", dict(key_mask=_key_mask())),
    **{f"combiner-{plan}{'-causal' if causal else ''}":
       ("combiner_attention", dict(plan=plan, causal=causal))
       for plan in ("fixed", "axial", "logsparse", "mixture") for causal in (False, True)},
    "combiner-fixed-block5": ("combiner_attention", dict(plan="fixed", block=5, causal=True)),
}
# improved clustered attention holds m̂_c constant by definition: its gradient is not the
# derivative of its output, so finite differences do not apply (compared with NumPy instead)


def _fns(case):
    name, kw = CASES[case]
    return _case(name, **kw)


DIFFERENTIABLE = [key for key, (name, _) in CASES.items() if not name.startswith("improved")]


def _cotangent(shape, dtype):
    return np.random.default_rng(7).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_jit_equals_numpy(case, dtype):
    jax_fn, np_fn, _ = _fns(case)
    q, k, v = _qkv(dtype)
    got = jax.jit(jax_fn)(q, k, v)
    want = np_fn(q, k, v)
    assert got.dtype == want.dtype, f"{case}: dtype {got.dtype} != {want.dtype}"
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=case)


@pytest.mark.parametrize("case", DIFFERENTIABLE)
def test_check_grads(case):
    jax_fn, _, _ = _fns(case)
    jax.test_util.check_grads(jax_fn, _qkv(np.float64), order=1, modes=["rev"])


@pytest.mark.parametrize("case", CASES)
def test_grad_under_jit_equals_numpy_backward(case):
    jax_fn, np_fn, np_bwd = _fns(case)
    q, k, v = _qkv(np.float64)
    dout = _cotangent(np_fn(q, k, v).shape, np.float64)
    loss = lambda q, k, v: jnp.sum(jax_fn(q, k, v) * dout)     # noqa: E731
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for name, g, want in zip("qkv", got, np_bwd(dout, q, k, v)):
        assert_close(g, want, np.float64, f"{case}: d{name}")


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_an_extra_batch_axis(case):
    """vmap over a new leading axis of q equals NumPy broadcasting q (3, B, n, d) against
    k, v (B, ...); the gradient of k and v sums over the mapped axis as NumPy's does."""
    jax_fn, np_fn, np_bwd = _fns(case)
    q, k, v = _qkv(np.float64)
    qs = np.stack([q, 2 * q, -q])
    mapped = jax.vmap(jax_fn, in_axes=(0, None, None))
    want = np_fn(qs, k, v)
    np.testing.assert_array_equal(np.asarray(jax.jit(mapped)(qs, k, v)), want, err_msg=case)
    dout = _cotangent(want.shape, np.float64)
    got = jax.grad(lambda q, k, v: jnp.sum(mapped(q, k, v) * dout), argnums=(0, 1, 2))(qs, k, v)
    for name, g, w in zip("qkv", got, np_bwd(dout, qs, k, v)):
        assert_close(g, w, np.float64, f"{case}: d{name} under vmap")


def test_vmap_over_membership_and_labels():
    """Mapped index and label arrays (and a mapped key mask) broadcast like NumPy's."""
    q, k, v = _qkv(np.float64)
    q_idx, k_idx = _members()
    stacked = np.stack([q_idx, q_idx[::-1]]), np.stack([k_idx, k_idx[::-1]])
    got = jax.vmap(lambda a, b: rj.routing_attention(q, k, v, a, b, merge="lse"))(*stacked)
    np.testing.assert_array_equal(np.asarray(got), ra.routing_attention(q, k, v, *stacked,
                                                                        merge="lse"))
    labels = np.stack([_labels(), _labels()[:, ::-1]])
    masks = np.stack([_key_mask(), _key_mask()[::-1]])
    got = jax.vmap(lambda lab, m: rj.clustered_attention(q, k, v, lab, 3, key_mask=m))(labels,
                                                                                       masks)
    np.testing.assert_array_equal(np.asarray(got),
                                  ra.clustered_attention(q, k, v, labels, 3, key_mask=masks))


def test_vmap_of_an_argument_with_fewer_batch_axes():
    """A mapped argument with fewer batch axes than the others (k (n, d) per element, q
    (B, n, d)) lines its mapped axis up in front, as NumPy would broadcast ks[:, None]."""
    q, k, v = _qkv(np.float64)
    ks = np.stack([k[0], k[1], -k[0]])
    got = jax.vmap(lambda k: rj.attention(q, k, v[0], causal=True))(ks)
    np.testing.assert_array_equal(np.asarray(got),
                                  ra.attention(q, ks[:, None], v[0], causal=True))
    centroids = np.stack([ra.spherical_kmeans(q, 3, seed=s)[0] for s in range(3)])
    got = jax.vmap(lambda c: rj.assign_clusters(q, c))(centroids)
    np.testing.assert_array_equal(np.asarray(got), ra.assign_clusters(q, centroids[:, None]))


def test_vmap_over_the_key_mask_alone():
    """A mapped key_mask with unmapped q, k, v: each element masked as NumPy masks it
    (NumPy itself refuses a mask that adds batch axes; under vmap that is the point)."""
    q, k, v = _qkv(np.float64)
    masks = np.stack([_key_mask(), _key_mask()[::-1], np.ones((B, N), bool)])
    for name, call in [("attention", lambda m: rj.attention(q, k, v, causal=True, key_mask=m)),
                       ("clustered", lambda m: rj.clustered_attention(q, k, v, _labels(), 3,
                                                                      key_mask=m))]:
        got = jax.jit(jax.vmap(call))(masks)
        want = np.stack([np.asarray(call(m)) for m in masks])
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
    dout = _cotangent((len(masks), B, N, E), np.float64)
    got = jax.grad(lambda q: jnp.sum(jax.vmap(lambda m: rj.attention(q, k, v, key_mask=m))(masks)
                                     * dout))(q)
    want = sum(ra.attention_backward(dout[i], q, k, v, key_mask=m)[0] for i, m in enumerate(masks))
    assert_close(got, want, np.float64, "dq summed over the mapped masks")


def test_batch_axes_broadcast_like_numpy():
    """q with batch (2, B), k and v with batch (B,) or none: the NumPy shapes and values,
    and gradients summed back to each input's shape."""
    q, k, v = _qkv(np.float64)
    qs = np.stack([q, -q])
    out = rj.attention(qs, k[0], v, causal=True)
    np.testing.assert_array_equal(np.asarray(out), ra.attention(qs, k[0], v, causal=True))
    dout = _cotangent(out.shape, np.float64)
    got = jax.grad(lambda q, k, v: jnp.sum(rj.attention(q, k, v, causal=True) * dout),
                   argnums=(0, 1, 2))(qs, k[0], v)
    for name, g, w in zip("qkv", got, ra.attention_backward(dout, qs, k[0], v, causal=True)):
        assert g.shape == w.shape, f"d{name}: shape {g.shape} != {w.shape}"
        assert_close(g, w, np.float64, f"d{name}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_reduced_precision_computes_in_float32(dtype):
    q, k, v = (jnp.asarray(x).astype(dtype) for x in _qkv(np.float32))
    out = jax.jit(lambda q, k, v: rj.combiner_attention(q, k, v, causal=True))(q, k, v)
    assert out.dtype == dtype
    want = ra.combiner_attention(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v)),
                                 causal=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.asarray(want).astype(dtype)))
    grads = jax.grad(lambda q, k, v: jnp.sum(rj.attention(q, k, v).astype(jnp.float32)),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(g.dtype == dtype for g in grads), [g.dtype for g in grads]


def test_index_inputs_get_float0_cotangents():
    q, k, v = _qkv(np.float64)
    q_idx, k_idx = _members()
    _, vjp = jax.vjp(lambda q, a, b: rj.routing_attention(q, k, v, a, b), q, q_idx, k_idx)
    dq, da, db = vjp(jnp.ones((B, N, E)))
    assert da.dtype == db.dtype == jax.dtypes.float0
    assert dq.shape == q.shape


def test_without_x64_indices_are_int32():
    """Without jax_enable_x64: float32 attention with int32 member lists equals NumPy's;
    decisions return int32; more than 31 hash bits is refused."""
    q, k, v = _qkv(np.float32)
    q_idx, k_idx = _members()
    with jax.enable_x64(False):
        got = jax.jit(lambda q, k, v, a, b: rj.routing_attention(q, k, v, a, b, causal=True))(
            q, k, v, q_idx.astype(np.int32), k_idx.astype(np.int32))
        lab = rj.assign_clusters(q, k[:, :3])
        improved = rj.improved_clustered_attention(q, k, v, _labels(), 3, 4)
        with pytest.raises(ValueError, match="31 bits"):
            rj.lsh_hash(q, np.ones((40, D + 1), np.float32))
    np.testing.assert_array_equal(np.asarray(got),
                                  ra.routing_attention(q, k, v, q_idx, k_idx, causal=True))
    assert lab.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(lab), ra.assign_clusters(q, k[:, :3]))
    np.testing.assert_array_equal(np.asarray(improved),
                                  ra.improved_clustered_attention(q, k, v, _labels(), 3, 4))


@pytest.mark.parametrize("call, message", [
    (lambda q, k, v: rj.routing_attention(q, k, v, *_members(), merge="max"), "merge"),
    (lambda q, k, v: rj.combiner_attention(q, k, v, plan="diagonal"), "plan"),
    (lambda q, k, v: rj.attention(q, k[..., :2], v),
     rf"feature size d: q has {D} \(shape \({B}, {N}, {D}\)\), k has 2 \(shape \({B}, {N}, 2\)\)"),
    (lambda q, k, v: rj.clustered_attention(q, k, v, _labels(), 30), "n_clusters"),
    (lambda q, k, v: rj.attention(q, k, v, key_mask=np.ones((3, B, N), bool)),
     rf"key_mask .* got \(3, {B}, {N}\), which would change"),
    (lambda q, k, v: rj.attention(q[0], k[..., :2], v),     # the shapes given, not padded
     rf"q has {D} \(shape \({N}, {D}\)\), k has 2"),
])
def test_bad_arguments_raise_when_tracing(call, message):
    """Errors in shapes and keywords come from the NumPy API at trace time, naming them."""
    with pytest.raises(ValueError, match=message):
        jax.jit(call)(*_qkv(np.float64))


def test_a_traced_static_argument_says_how_to_mark_it_static():
    q, k, v = _qkv(np.float64)
    with pytest.raises(TypeError, match=r"window must be a Python int known when tracing.*"
                                        r"static_argnames=\('window',\)"):
        jax.jit(rj.local_attention)(q, k, v, 4)
    for name, call in (("causal", lambda: jax.jit(rj.attention)(q, k, v, causal=True)),
                       ("scale", lambda: jax.jit(rj.attention)(q, k, v, scale=0.5)),
                       ("exclude_self", lambda: jax.jit(rj.routing_attention)(
                           q, k, v, *_members(), exclude_self=True))):
        with pytest.raises(TypeError, match=rf"{name} must be .* known when tracing.*"
                                            rf"static_argnames=\('{name}',\)"):
            call()
    out = jax.jit(rj.local_attention, static_argnames="window")(q, k, v, window=4)
    np.testing.assert_array_equal(np.asarray(out), ra.local_attention(q, k, v, 4))


def test_bad_index_values_raise_when_run():
    """Index values are only known when the callback runs: JAX's runtime error carries the
    NumPy API's message naming the argument."""
    q, k, v = _qkv(np.float64)
    q_idx, k_idx = _members()
    q_idx[1, 2, 0] = N
    with pytest.raises(jax.errors.JaxRuntimeError, match="q_idx has entries outside"):
        jax.jit(rj.routing_attention)(q, k, v, q_idx, k_idx).block_until_ready()


# ------------------------------------------------------------------ routing decisions
def _x(rows=N, batch=(B,), seed=3):
    return np.random.default_rng(seed).standard_normal(batch + (rows, D))


def _planes(bits):
    return np.random.default_rng(bits).standard_normal((bits, D + 1))


DECISIONS = {
    "spherical_kmeans": (lambda mod, x, c: mod.spherical_kmeans(x, 3, iters=4, seed=5)),
    "spherical_kmeans-mask-init": (lambda mod, x, c: mod.spherical_kmeans(
        x, 3, mask=_key_mask(), init=c)),
    "assign_clusters": (lambda mod, x, c: mod.assign_clusters(x, c)),
    "assign_clusters-scores": (lambda mod, x, c: mod.assign_clusters(x, c, return_scores=True)),
    "assign_top_members": (lambda mod, x, c: mod.assign_top_members(x, c, 5)),
    "top_members": (lambda mod, x, c: mod.top_members(x @ np.swapaxes(c, -1, -2), 4)),
    "members_from_labels": (lambda mod, x, c: mod.members_from_labels(
        mod.assign_clusters(x, c), 3, max_size=6)),
    "update_centroids": (lambda mod, x, c: mod.update_centroids(
        c, x, mod.assign_clusters(x, c), decay=0.5, mask=_key_mask())),
    "update_centroids-pooled": (lambda mod, x, c: mod.update_centroids(
        c[0], x, mod.assign_clusters(x, c[0]), decay=0.5)),
    "lsh_hash-40bits": (lambda mod, x, c: mod.lsh_hash(x, _planes(40))),
    "hamming_kmeans": (lambda mod, x, c: mod.hamming_kmeans(
        mod.lsh_hash(x, _planes(20)), 3, iters=3, seed=1, return_centroids=True)),
    "hamming_kmeans-mask": (lambda mod, x, c: mod.hamming_kmeans(
        mod.lsh_hash(x, _planes(20)), 3, mask=_key_mask())),
}


def _as_tuple(r):
    return r if isinstance(r, tuple) else (r,)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", DECISIONS)
def test_decisions_under_jit_equal_numpy(case, dtype):
    x = _x().astype(dtype)
    c = ra.spherical_kmeans(x, 3, seed=1)
    got = _as_tuple(jax.jit(lambda x, c: DECISIONS[case](rj, x, c))(x, c))
    want = _as_tuple(DECISIONS[case](ra, x, c))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype, f"{case}: dtype {g.dtype} != {w.dtype}"
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=case)


@pytest.mark.parametrize("case", DECISIONS)
def test_decisions_under_vmap_equal_numpy(case):
    """vmap over a new leading axis of x equals the NumPy call on the stacked x."""
    x = _x()
    c = ra.spherical_kmeans(x, 3, seed=1)
    xs = np.stack([x, x[:, ::-1], -x])
    got = _as_tuple(jax.vmap(lambda x: DECISIONS[case](rj, x, c))(xs))
    want = [np.stack(w) for w in zip(*(_as_tuple(DECISIONS[case](ra, xi, c)) for xi in xs))]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), w, err_msg=case)


def test_no_gradient_flows_through_decisions():
    """A loss through routing decisions differentiates as if the decisions were constants,
    and a loss of a decision alone has zero gradient."""
    q, k, v = _qkv(np.float64)
    centroids = ra.spherical_kmeans(q, 3, seed=0)

    def routed(q, k, v):
        _, _, members = rj.assign_top_members(q, centroids, 4)
        return jnp.sum(rj.routing_attention(q, k, v, members, members) ** 2)

    members = ra.assign_top_members(q, centroids, 4)[2]
    fixed = lambda q, k, v: jnp.sum(rj.routing_attention(q, k, v, members, members) ** 2)  # noqa
    got = jax.jit(jax.grad(routed, argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(fixed, argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"d{name}")
    dx = jax.grad(lambda x: jnp.sum(rj.spherical_kmeans(x, 3)))(q)
    np.testing.assert_array_equal(np.asarray(dx), np.zeros_like(q))


def test_members_from_labels_needs_max_size():
    with pytest.raises(TypeError, match="max_size"):
        rj.members_from_labels(_labels(), 3, max_size=None)


# ------------------------------------------------------------------ packaging and README
def test_import_routing_attention_does_not_import_jax():
    code = "import sys, routing_attention; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def _readme_block(heading):
    """The first ```python block under the README's `## heading`."""
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_with_jax_snippet_runs():
    exec(compile(_readme_block("With JAX"), "README.md (With JAX)", "exec"), {})
