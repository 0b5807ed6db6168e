"""The operand table (tools/gen_gufuncs.py) is the one description of the extension's
gufuncs: the committed generated files must be what it generates, and the built
extension must register exactly what it declares."""
import importlib.util
import pathlib

import numpy as np
import pytest

from routing_attention import _ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gen_gufuncs", ROOT / "tools" / "gen_gufuncs.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)

CHAR = {"T32": "f", "T64": "d", "B": "?", "L": "l", "U": "L"}


def ufunc(name):
    """The extension's gufunc `name` (unwrapped when tools/bitcheck.py records calls)."""
    f = getattr(_ext, name)
    return getattr(f, "__wrapped__", f)


@pytest.mark.parametrize("path", ["csrc/gufuncs_gen.h", "routing_attention/_ext.pyi"])
def test_committed_files_are_what_the_table_generates(tmp_path, path):
    gen.write(tmp_path)
    assert (tmp_path / path).read_text() == (ROOT / path).read_text(), (
        f"{path} is stale: run python tools/gen_gufuncs.py")


@pytest.mark.parametrize("name,spec,doc", gen.GUFUNCS, ids=[g[0] for g in gen.GUFUNCS])
def test_built_gufunc_matches_its_table_entry(name, spec, doc):
    g = gen.describe(name, spec)
    uf = ufunc("_" + name)
    assert uf.signature == g["signature"]
    assert (uf.nin, uf.nout) == (g["nin"], g["nout"])
    loops = ["32", "64"] if g["floats"] else [None]
    expected = []
    for bits in loops:
        chars = [CHAR["T" + bits] if t == "T" else CHAR[t] for _, t, _ in g["operands"]]
        expected.append("".join(chars[:g["nin"]]) + "->" + "".join(chars[g["nin"]:]))
    assert uf.types == expected
    assert doc.split()[0] in uf.__doc__


def test_every_gufunc_of_the_extension_is_in_the_table():
    built = {n[1:] for n in dir(_ext) if isinstance(ufunc(n), np.ufunc)}
    assert built == {g[0] for g in gen.GUFUNCS}


def test_operand_indices_follow_numpys_layout():
    """args/steps hold the operands first, then each operand's core strides in order."""
    g = gen.describe("routing_forward", dict((n, s) for n, s, _ in gen.GUFUNCS)["routing_forward"])
    names = [o[0] for o in g["operands"]]
    assert names.index("slot_out") == 14 and g["core"][names.index("q")] == 17
    # core strides: q k v q_idx k_idx (2 each), bias (1), out (2), lse (1)
    assert g["core"][names.index("slot_out")] == 17 + 2 * 5 + 1 + 2 + 1
    assert g["dims"] == ["n", "d", "m", "e", "c", "w", "u", "r"]


def test_typed_names_index_is_current(tmp_path):
    """csrc/typed_names.txt (tools/typed_names.py) lists every name typed.h makes."""
    spec = importlib.util.spec_from_file_location("typed_names", ROOT / "tools" / "typed_names.py")
    tn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tn)
    assert tn.render() == (ROOT / "csrc" / "typed_names.txt").read_text(), (
        "csrc/typed_names.txt is stale: run python tools/typed_names.py")
    index = (ROOT / "csrc" / "typed_names.txt").read_text()
    for name in ("ra_routing_forward_f32", "gemm_f32_avx2", "hamming_assign64_avx512vp",
                 "ra_hamming_fit32", "RaKeys_f64", "ra_attend_backward_f32"):
        assert f"\n{name} " in index, name
