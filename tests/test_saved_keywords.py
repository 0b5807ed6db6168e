"""The saved-statistics contract (issue 15 item 3): no silent wrong gradient.

Every forward with ``return_saved=True`` records in ``saved["keywords"]`` each keyword
that shaped its result; a backward given ``**saved`` takes the keywords it is not given
from there, and refuses one that disagrees, naming it.  Each function is one row of
CASES: its forward and backward with non-default keywords, the reference backward, and
for each keyword a value that disagrees with the forward's.  The pair terms (dropout
and, where the function takes one, a relative position bias) are added to every row by
`_pairs`.
"""
import numpy as np
import pytest

import routing_attention as ra
from routing_attention import reference as ref

from conftest import assert_close

N, M, D, E = 12, 12, 4, 3


def _qkv(rng, dtype=np.float64):
    return tuple(rng.standard_normal((2,) + s).astype(dtype) for s in ((N, D), (M, D), (M, E)))


def _members(rng, c, w, length):
    idx = np.full((2, c, w), -1, np.int64)
    for b in range(2):
        for cl in range(c):
            take = rng.integers(1, w + 1)
            idx[b, cl, :take] = np.sort(rng.choice(length, take, replace=False))
    return idx


def _inputs(rng, dtype=np.float64):
    q, k, v = _qkv(rng, dtype)
    mask = rng.random((2, M)) < 0.8
    mask[:, 0] = True
    bias = rng.standard_normal((2, N + M - 1)).astype(dtype)
    return dict(q=q, k=k, v=v, mask=mask, other_mask=~mask | (np.arange(M) == 1),
                bias=bias, other_bias=bias + np.arange(N + M - 1) % 2,
                q_idx=_members(rng, 3, 5, N), k_idx=_members(rng, 3, 6, M),
                labels=rng.integers(-1, 3, (2, N)),
                dout=rng.standard_normal((2, N, E)).astype(dtype))


# name -> (forward args, forward keywords, backward args, reference backward,
#          keyword values that disagree with the forward's)
CASES = {
    "attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"]),
        forward=lambda a: dict(causal=True, key_mask=a["mask"], scale=0.3),
        reference=lambda a, g, **t: ref.attention_backward(g, a["q"], a["k"], a["v"], causal=True,
                                                      key_mask=a["mask"], scale=0.3, **t),
        wrong=lambda a: dict(causal=False, key_mask=a["other_mask"], scale=0.5)),
    "local_attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"]),
        forward=lambda a: dict(window=3, causal=True, scale=0.3),
        reference=lambda a, g, **t: ref.local_attention_backward(g, a["q"], a["k"], a["v"], 3,
                                                            causal=True, scale=0.3, **t),
        wrong=lambda a: dict(window=4, causal=False, scale=0.5)),
    "routing_attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"]),
        forward=lambda a: dict(causal=True, exclude_self=True, merge="lse", scale=0.3),
        reference=lambda a, g, **t: ref.routing_attention_backward(
            g, a["q"], a["k"], a["v"], a["q_idx"], a["k_idx"], causal=True, exclude_self=True,
            merge="lse", scale=0.3, **t),
        wrong=lambda a: dict(causal=False, exclude_self=False, merge="mean", scale=0.5)),
    "clustered_attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"], a["labels"]),
        forward=lambda a: dict(n_clusters=3, key_mask=a["mask"], scale=0.3),
        reference=lambda a, g, **t: ref.clustered_attention_backward(
            g, a["q"], a["k"], a["v"], a["labels"], 3, key_mask=a["mask"], scale=0.3, **t),
        wrong=lambda a: dict(n_clusters=4, key_mask=a["other_mask"], scale=0.5)),
    "improved_clustered_attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"], a["labels"]),
        forward=lambda a: dict(n_clusters=3, topk=4, key_mask=a["mask"], scale=0.3),
        reference=lambda a, g, **t: ref.improved_clustered_attention_backward(
            g, a["q"], a["k"], a["v"], a["labels"], 3, 4, key_mask=a["mask"], scale=0.3, **t),
        wrong=lambda a: dict(n_clusters=4, topk=5, key_mask=a["other_mask"], scale=0.5)),
    "combiner_attention": dict(
        args=lambda a: (a["q"], a["k"], a["v"]),
        forward=lambda a: dict(plan="axial", block=3, causal=True, scale=0.3),
        reference=lambda a, g, **t: ref.combiner_attention_backward(
            g, a["q"], a["k"], a["v"], plan="axial", block=3, causal=True, scale=0.3, **t),
        wrong=lambda a: dict(plan="fixed", block=4, causal=False, scale=0.5)),
}


def _pairs(name, a, wrong=False):
    """The pair terms of `name`'s forward (or values that disagree with them)."""
    terms = dict(dropout_p=0.3 if wrong else 0.2, dropout_seed=8 if wrong else 7)
    if name != "clustered_attention":
        terms["rel_bias"] = a["other_bias" if wrong else "bias"]
    return terms


WRONG = [(name, key) for name, case in CASES.items()
         for key in dict(case["wrong"](_inputs(np.random.default_rng(0))),
                         **_pairs(name, _inputs(np.random.default_rng(0)), wrong=True))]


def _run(name, dtype=np.float64, seed=1):
    """Inputs, the forward's keywords, and its saved dict."""
    a = _inputs(np.random.default_rng(seed), dtype)
    case = CASES[name]
    kw = dict(case["forward"](a), **_pairs(name, a))
    out, saved = getattr(ra, name)(*case["args"](a), **kw, return_saved=True)
    return a, kw, out, saved


def _backward(name, a, **kw):
    return getattr(ra, name + "_backward")(a["dout"], *CASES[name]["args"](a), **kw)


def _resolved(value):
    return float(value) if isinstance(value, float) else value


@pytest.mark.parametrize("name", list(CASES))
def test_saved_records_every_keyword_resolved(name):
    a, kw, _, saved = _run(name)
    recorded = saved["keywords"]
    for key, value in kw.items():
        if isinstance(value, np.ndarray):
            assert recorded[key] is not value and np.array_equal(recorded[key], value), key
        else:
            assert recorded[key] == _resolved(value), (key, recorded[key], value)
    default = getattr(ra, name)(*CASES[name]["args"](a), **{k: v for k, v in kw.items()
                                                           if k in ("window", "n_clusters", "topk")},
                                return_saved=True)[1]["keywords"]
    assert default["scale"] == 1 / np.sqrt(D), "scale None is recorded as the 1/sqrt(d) used"
    assert default.get("causal", False) is False, "causal defaults to False everywhere"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_takes_its_keywords_from_saved(name, dtype):
    """X_backward(dout, inputs, **saved) without keywords = with them = the reference."""
    a, kw, _, saved = _run(name, dtype)
    bare = _backward(name, a, **saved)
    explicit = _backward(name, a, **kw, **saved)
    recomputed = _backward(name, a, **kw)
    pairs = _pairs(name, a)
    want = CASES[name]["reference"](a, a["dout"], **pairs)
    assert len(bare) == len(explicit) == len(recomputed) == len(want) == 3 + ("rel_bias" in pairs)
    for which, x, y, z, w in zip(("q", "k", "v", "rel_bias"), bare, explicit, recomputed, want):
        assert np.array_equal(x, y), f"{name} d{which}: saved keywords vs explicit ones"
        assert np.array_equal(x, z), f"{name} d{which}: saved statistics vs recomputed"
        assert_close(x, w, dtype, f"{name} d{which} vs reference")


@pytest.mark.parametrize("name, key", WRONG)
def test_a_disagreeing_keyword_raises_naming_it(name, key):
    a, kw, _, saved = _run(name)
    wrong = dict(CASES[name]["wrong"](a), **_pairs(name, a, wrong=True))[key]
    with pytest.raises(ValueError, match=rf"{name}_backward: {key}=.* disagrees with the forward"):
        _backward(name, a, **dict(kw, **{key: wrong}), **saved)
    with pytest.raises(ValueError, match=rf"{key}=.* disagrees"):      # alone, too
        _backward(name, a, **{key: wrong}, **saved)


def test_the_issue_scenario_raises():
    """Issue 15: a causal Combiner forward, its statistics, and causal=False in the
    backward used to return gradients off by hundreds, silently."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 4, 64, 8)) for _ in range(3))
    dout = rng.standard_normal((2, 4, 64, 8))
    _, saved = ra.combiner_attention(q, k, v, causal=True, return_saved=True)
    with pytest.raises(ValueError, match="causal=False disagrees with the forward call, which "
                                         "used causal=True"):
        ra.combiner_attention_backward(dout, q, k, v, causal=False, **saved)
    got = ra.combiner_attention_backward(dout, q, k, v, **saved)
    want = ref.combiner_attention_backward(dout, q, k, v, causal=True)
    for x, w in zip(got, want):
        assert_close(x, w, np.float64, "causal Combiner backward from saved keywords")


@pytest.mark.parametrize("name", list(CASES))
def test_without_saved_the_defaults_apply(name):
    """No saved statistics: a keyword left at None is the forward's default."""
    a = _inputs(np.random.default_rng(4))
    needed = {k: v for k, v in CASES[name]["forward"](a).items()
              if k in ("window", "n_clusters", "topk")}
    _, saved = getattr(ra, name)(*CASES[name]["args"](a), **needed, return_saved=True)
    for x, y in zip(_backward(name, a, **needed), _backward(name, a, **saved)):
        assert np.array_equal(x, y)


def test_required_values_without_saved():
    a = _inputs(np.random.default_rng(5))
    with pytest.raises(TypeError, match="local_attention_backward needs window"):
        ra.local_attention_backward(a["dout"], a["q"], a["k"], a["v"])
    with pytest.raises(TypeError, match="needs n_clusters"):
        ra.clustered_attention_backward(a["dout"], a["q"], a["k"], a["v"], a["labels"])
    with pytest.raises(TypeError, match="needs topk"):
        ra.improved_clustered_attention_backward(a["dout"], a["q"], a["k"], a["v"], a["labels"], 3)


def test_saved_statistics_of_another_function_are_refused():
    a = _inputs(np.random.default_rng(6))
    q, k, v, g = a["q"], a["k"], a["v"], a["dout"]
    _, dense = ra.attention(q, k, v, return_saved=True)          # output and lse, as Combiner's
    with pytest.raises(ValueError, match="saved statistics come from another function"):
        ra.combiner_attention_backward(g, q, k, v, **dense)
    _, plain = ra.clustered_attention(q, k, v, a["labels"], 3, return_saved=True)
    _, improved = ra.improved_clustered_attention(q, k, v, a["labels"], 3, 4, return_saved=True)
    with pytest.raises(ValueError, match="come from clustered_attention .*use "
                                         "clustered_attention_backward"):
        ra.improved_clustered_attention_backward(g, q, k, v, a["labels"], **plain)
    with pytest.raises(ValueError, match="come from improved_clustered_attention"):
        ra.clustered_attention_backward(g, q, k, v, a["labels"], **improved)
    with pytest.raises(TypeError, match="keywords must be the dict"):
        ra.attention_backward(g, q, k, v, **dict(dense, keywords=("causal", True)))


def test_saved_arrays_must_match_the_call():
    a, kw, _, saved = _run("attention")
    with pytest.raises(ValueError, match=r"lse must have shape \(\.\.\., 12\) = \(2, 12\)"):
        _backward("attention", a, **dict(saved, lse=saved["lse"][:1]))
    with pytest.raises(ValueError, match=r"output must have shape \(2, 12, 3\)"):
        _backward("attention", a, **dict(saved, output=saved["output"][None]))


def test_key_mask_is_compared_by_shape_and_content():
    """saved['keywords']['key_mask'] is a copy of the forward's mask: the backward compares
    an explicit mask with it element by element (shape included), and a mask the caller
    edits in place after the forward does not change what the backward uses."""
    a, kw, _, saved = _run("attention")
    mask = a["mask"]
    with pytest.raises(ValueError, match="key_mask=an array of shape .*disagrees"):
        _backward("attention", a, key_mask=mask[:1] | True, **saved)
    _, shared = ra.attention(a["q"], a["k"], a["v"], key_mask=mask[0], return_saved=True)
    with pytest.raises(ValueError, match=r"key_mask=an array of shape \(1, 12\) disagrees"):
        _backward("attention", a, key_mask=mask[:1], **shared)       # same elements, new axis
    want = _backward("attention", a, **kw)
    mask[:] = True                                                  # the caller reuses it
    for x, w in zip(_backward("attention", a, **saved), want):
        assert np.array_equal(x, w)


def test_rel_bias_is_recorded_as_a_copy():
    """A bias the caller edits in place after the forward (a training step's update) does
    not change what a backward from the saved statistics uses; passed again, the edited
    bias disagrees."""
    a, kw, _, saved = _run("routing_attention")
    want = _backward("routing_attention", a, **kw)
    a["bias"] += 1.0
    for x, w in zip(_backward("routing_attention", a, **saved), want):
        assert np.array_equal(x, w)
    with pytest.raises(ValueError, match="rel_bias=an array of shape .*disagrees"):
        _backward("routing_attention", a, rel_bias=a["bias"], **saved)


def test_float32_scale_agrees_with_the_value_passed():
    """The saved scale is the float32 value used; passing the same Python float agrees."""
    a, kw, _, saved = _run("combiner_attention", np.float32)
    assert saved["keywords"]["scale"] == float(np.float32(0.3))
    for x, y in zip(_backward("combiner_attention", a, scale=0.3, **saved),
                    _backward("combiner_attention", a, **saved)):
        assert np.array_equal(x, y)


def test_logsparse_records_no_block():
    a = _inputs(np.random.default_rng(7))
    _, saved = ra.combiner_attention(a["q"], a["k"], a["v"], plan="logsparse", return_saved=True)
    assert saved["keywords"] == dict(plan="logsparse", block=None, causal=False,
                                     scale=1 / np.sqrt(D), dropout_p=0.0, dropout_seed=None,
                                     rel_bias=None)
    with pytest.raises(ValueError, match="block is not used by plan='logsparse'"):
        ra.combiner_attention_backward(a["dout"], a["q"], a["k"], a["v"], block=2, **saved)
