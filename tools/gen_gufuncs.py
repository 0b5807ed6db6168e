"""The one operand table of the C extension's gufuncs, and what is generated from it.

Each gufunc is declared once, below: its operands in order (name, NumPy type, core
dimensions), inputs then outputs, and its docstring.  From that this script writes

  csrc/gufuncs_gen.h           per gufunc: an enum naming each operand's index in
                               args/steps (<g>_<operand>), the index of its first core
                               stride in steps (<g>_<operand>_core) and of each core
                               dimension in dims (<g>_dim_<name>); and the registration
                               table rows (signature, counts, type arrays, docstring)
  routing_attention/_ext.pyi   the type stub

so module.c's adapters address operands by name (MAT(g, q), DIM(g, n)) and never by a
counted index.  Run `python tools/gen_gufuncs.py` after editing the table; the test
tests/test_ext_table.py regenerates into a temporary folder and fails when the committed
files differ, and checks the built extension against the table.

Types: T = the loop's float type (float32 in the first loop, float64 in the second),
B = bool, L = int64, U = uint64.  A gufunc whose operands are all integer has one loop.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The pair terms (engine.h RaPairs) that attention gufuncs take after their own operands:
# drop = dropout threshold out of 2^24, drop_key = the problem's dropout stream, bias = the
# relative position bias (r = n + m - 1 entries, or r = 0 for none); backwards add dbias.
GUFUNCS = [
    ("attention_forward",
     "q:T(n,d) k:T(m,d) v:T(m,e) key_mask:B(m) use_mask:B() scale:T() causal:B()"
     " drop:L() drop_key:U() bias:T(r) -> out:T(n,e) lse:T(n)",
     "Low-level gufunc behind routing_attention.attention; use that instead."),
    ("attention_backward",
     "dout:T(n,e) q:T(n,d) k:T(m,d) v:T(m,e) key_mask:B(m) use_mask:B() out:T(n,e) lse:T(n)"
     " scale:T() causal:B() drop:L() drop_key:U() bias:T(r)"
     " -> dq:T(n,d) dk:T(m,d) dv:T(m,e) dbias:T(r)",
     "Low-level gufunc behind routing_attention.attention_backward."),
    ("routing_forward",
     "q:T(n,d) k:T(m,d) v:T(m,e) q_idx:L(c,w) k_idx:L(c,u) scale:T() causal:B()"
     " exclude_self:B() merge_lse:B() drop:L() drop_key:U() bias:T(r)"
     " -> out:T(n,e) lse:T(n) slot_out:T(c,w,e) slot_lse:T(c,w) slot_self:B(c,w)",
     "Low-level gufunc behind routing_attention.routing_attention."),
    ("routing_backward",
     "dout:T(n,e) q:T(n,d) k:T(m,d) v:T(m,e) q_idx:L(c,w) k_idx:L(c,u) out:T(n,e) lse:T(n)"
     " slot_out:T(c,w,e) slot_lse:T(c,w) slot_self:B(c,w) use_saved:B() scale:T() causal:B()"
     " exclude_self:B() merge_lse:B() drop:L() drop_key:U() bias:T(r)"
     " -> dq:T(n,d) dk:T(m,d) dv:T(m,e) dbias:T(r)",
     "Low-level gufunc behind routing_attention.routing_attention_backward."),
    ("combiner_forward",
     "q:T(n,d) k:T(n,d) v:T(n,e) plan:L() block:L() causal:B() scale:T() drop:L() drop_key:U()"
     " bias:T(r) -> out:T(n,e) lse:T(n)",
     "plan: 0 fixed, 1 axial, 2 logsparse, 3 mixture.  Low-level gufunc behind "
     "routing_attention.combiner_attention; use that instead."),
    ("engine_masked",
     "q:T(n,d) k:T(m,d) v:T(m,e) mask:B(n,m) dout:T(n,e)"
     " -> out:T(n,e) lse:T(n) dq:T(n,d) dk:T(m,d) dv:T(m,e)",
     "Test hook: dense attention (logits q·k) under an explicit boolean mask, through the "
     "engine's visibility bitmap, single-threaded."),
    ("combiner_backward",
     "dout:T(n,e) q:T(n,d) k:T(n,d) v:T(n,e) out:T(n,e) lse:T(n) use_saved:B() plan:L()"
     " block:L() causal:B() scale:T() drop:L() drop_key:U() bias:T(r)"
     " -> dq:T(n,d) dk:T(n,d) dv:T(n,e) dbias:T(r)",
     "Low-level gufunc behind routing_attention.combiner_attention_backward."),
    ("clustered_forward",
     "q:T(n,d) k:T(m,d) v:T(m,e) labels:L(n) key_mask:B(m) use_mask:B() n_clusters:L()"
     " topk:L() scale:T() drop:L() drop_key:U() bias:T(r)"
     " -> out:T(n,e) centroid_out:T(c,e) centroid_lse:T(c)"
     " topk_index:L(c,k) topk_weight:T(c,k)",
     "Low-level gufunc behind routing_attention.clustered_attention (topk = 0) and "
     "improved_clustered_attention (topk >= 1); use those instead.  The out tuple must be "
     "given: c = n_clusters and k = min(topk, m) come from it."),
    ("clustered_backward",
     "dout:T(n,e) q:T(n,d) k:T(m,d) v:T(m,e) labels:L(n) key_mask:B(m) centroid_out:T(c,e)"
     " centroid_lse:T(c) topk_index:L(c,k) topk_weight:T(c,k) use_mask:B() use_saved:B()"
     " n_clusters:L() topk:L() scale:T() drop:L() drop_key:U() bias:T(r)"
     " -> dq:T(n,d) dk:T(m,d) dv:T(m,e) dbias:T(r)",
     "Low-level gufunc behind the clustered attention backward functions."),
    ("spherical_kmeans",
     "x:T(n,d) mask:B(n) init:T(c,d) use_init:B() iters:L() seed:U() -> centroids:T(c,d)",
     "Low-level gufunc behind routing_attention.spherical_kmeans; use that instead."),
    ("assign_clusters", "x:T(n,d) centroids:T(c,d) -> labels:L(n)",
     "Low-level gufunc behind routing_attention.assign_clusters."),
    ("assign_scores", "x:T(n,d) centroids:T(c,d) -> labels:L(n) scores:T(n,c) best:T(n)",
     "Low-level gufunc behind routing_attention.assign_clusters(..., return_scores=True)."),
    ("assign_best", "x:T(n,d) centroids:T(c,d) -> labels:L(n) best:T(n)",
     "Labels and each row's best score (NaN where the label is -1), without the scores; "
     "behind the RoutingAttention layer's argmax membership."),
    ("update_centroids",
     "centroids:T(c,d) x:T(n,d) labels:L(n) mask:B(n) decay:T() -> updated:T(c,d)",
     "Low-level gufunc behind routing_attention.update_centroids."),
    ("commitment_loss", "x:T(n,d) centroids:T(c,d) labels:L(n) mask:B(n) -> loss:T()",
     "Low-level gufunc behind routing_attention.commitment_loss."),
    ("top_members", "scores:T(n,c) -> idx:L(c,w)",
     "Low-level gufunc behind routing_attention.top_members."),
    ("assign_top", "x:T(n,d) centroids:T(c,d) -> labels:L(n) best:T(n) idx:L(c,w)",
     "Low-level gufunc behind routing_attention.assign_top_members."),
    ("normalize_rows", "x:T(n,d) -> xhat:T(n,d) norm:T(n) sq:T(n)",
     "Rows scaled to unit L2 norm (a row whose norm is not > 0 is divided by 1), their norms "
     "and |xhat|²; behind the RoutingAttention layer."),
    ("lsh_hash", "x:T(n,d) planes:T(b,e) -> codes:L(n)",
     "Low-level gufunc behind routing_attention.lsh_hash."),
    ("members_from_labels", "labels:L(n) -> members:L(c,s)",
     "Low-level gufunc behind routing_attention.members_from_labels."),
    ("hamming_kmeans", "codes:L(n) mask:B(n) iters:L() seed:U() -> labels:L(n) centroids:L(c)",
     "Low-level gufunc behind routing_attention.hamming_kmeans."),
]

NPY = {"B": "NPY_BOOL", "L": "NPY_INT64", "U": "NPY_UINT64"}


def parse(spec):
    """'a:T(n,d) b:B() -> c:T(n)' -> ([(name, type, dims)], n_inputs)."""
    ins, outs = spec.split("->")
    operands = []
    for part in (ins, outs):
        for token in part.split():
            m = re.fullmatch(r"(\w+):([TBLU])\(([\w,]*)\)", token)
            if not m:
                raise ValueError(f"bad operand {token!r}")
            operands.append((m.group(1), m.group(2), [x for x in m.group(3).split(",") if x]))
    return operands, len(ins.split())


def describe(name, spec):
    operands, nin = parse(spec)
    sig = ",".join(f"({','.join(d)})" for _, _, d in operands[:nin]) + "->" + \
        ",".join(f"({','.join(d)})" for _, _, d in operands[nin:])
    dims = []
    for _, _, d in operands:
        for x in d:
            if x not in dims:
                dims.append(x)
    core, at = [], len(operands)
    for _, _, d in operands:
        core.append(at)
        at += len(d)
    floats = any(t == "T" for _, t, _ in operands)
    return dict(name=name, operands=operands, nin=nin, nout=len(operands) - nin,
                signature=sig, dims=dims, core=core, floats=floats)


def c_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def header():
    out = ["/* gufuncs_gen.h — GENERATED by tools/gen_gufuncs.py from its operand table; do not",
           " * edit.  Per gufunc <g>: <g>_<operand> is the operand's index in args and steps,",
           " * <g>_<operand>_core the index in steps of its first core stride, <g>_dim_<name> the",
           " * index in dims of a core dimension; RA_GUFUNC_ROWS is the registration table. */",
           "#ifndef RA_GUFUNCS_GEN_H", "#define RA_GUFUNCS_GEN_H", ""]
    rows = []
    for name, spec, doc in GUFUNCS:
        g = describe(name, spec)
        names = [o[0] for o in g["operands"]]
        out.append(f"/* _{name}({', '.join(names[:g['nin']])}) -> "
                   f"({', '.join(names[g['nin']:])})  {g['signature']} */")
        entries = [f"{name}_{o} = {i}" for i, o in enumerate(names)]
        entries += [f"{name}_{o}_core = {c}" for o, c in zip(names, g["core"])]
        entries += [f"{name}_dim_{x} = {i + 1}" for i, x in enumerate(g["dims"])]
        out.append("enum {")
        line = "   "
        for e in entries:
            if len(line) + len(e) + 2 > 94:
                out.append(line.rstrip())
                line = "   "
            line += f" {e},"
        out.append(line.rstrip())
        out.append("};")
        types = []
        for loop_type in (["NPY_FLOAT", "NPY_DOUBLE"] if g["floats"] else [None]):
            types += [loop_type if t == "T" else NPY[t] for _, t, _ in g["operands"]]
        loops = (f"{{{name}_loop_f32, {name}_loop_f64}}" if g["floats"]
                 else f"{{{name}_loop, NULL}}")
        text = (f"_{name}({', '.join(names[:g['nin']])}) -> ({', '.join(names[g['nin']:])})"
                f"\n\n{doc}")
        rows.append(f"    {{\"_{name}\", \"{g['signature']}\", {g['nin']}, {g['nout']}, {loops},\n"
                    f"     (char[]){{{', '.join(types)}}},\n"
                    f"     {c_string(text)}, {0 if g['floats'] else 1}}},")
        out.append("")
    out.append("#define RA_GUFUNC_ROWS \\")
    out.append(" \\\n".join(rows).replace("\n     ", " \\\n     ") + "")
    out += ["", "#endif /* RA_GUFUNCS_GEN_H */", ""]
    return "\n".join(out)


def stub():
    out = ['"""Type stub of the C extension, GENERATED by tools/gen_gufuncs.py from its operand',
           "table (one entry per gufunc: its signature, then its operands as name:type(core",
           "dims), T = float32 or float64 (one loop each), B = bool, L = int64, U = uint64).",
           'Every gufunc takes the usual ufunc keywords (out=, ...)."""',
           "from typing import Any", "import numpy as np", ""]
    for name, spec, _ in GUFUNCS:
        out.append(f"_{name}: np.ufunc  # {describe(name, spec)['signature']}")
        out.append(f"#   {' '.join(spec.split())}")
    out += ["", "def build_info() -> dict[str, Any]: ...",
            "def set_num_threads(n: int) -> None: ...",
            "def get_num_threads() -> int: ...",
            "def _fma_peak(iters: int, threads: int) -> tuple[float, float]: ...", ""]
    return "\n".join(out)


def write(root=ROOT):
    root = pathlib.Path(root)
    (root / "csrc").mkdir(parents=True, exist_ok=True)
    (root / "routing_attention").mkdir(parents=True, exist_ok=True)
    (root / "csrc" / "gufuncs_gen.h").write_text(header())
    (root / "routing_attention" / "_ext.pyi").write_text(stub())


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else ROOT)
