"""Every argument check of the package lives in routing_attention/_checks.py.

A `raise ValueError(` / `raise TypeError(` anywhere else is a check written outside its
home.  The only exceptions, listed here with why:
- the framework bridges' checks of their framework's own objects (a torch tensor's type,
  device and dtype; JAX tracing needing static sizes; what Dask arrays cannot carry):
  `_checks.py` must not import torch, jax or dask;
- the NumPy reference (reference.py), an independent oracle that shares no code with the
  package it checks.
"""
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "routing_attention"

ALLOWED = {
    "torch.py": ["must be a torch.Tensor", "is on device", "must be a floating-point tensor",
                 "unsupported dtype", "must be an integer tensor", "must be a boolean tensor",
                 "scale must be a Python number, not a tensor"],
    "jax.py": ["members_from_labels needs max_size in routing_attention.jax",
               "rows (bits), but without jax_enable_x64"],
    "_dask.py": ["saved statistics (return_saved, **saved) and out= are not",
                 "update_centroids pools x's extra leading axes",
                 "members_from_labels with Dask arrays needs max_size",
                 "dropout_p > 0 is not supported with Dask arrays"],
    "reference.py": ["plan must be one of"],
}


def raises_outside_checks():
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_checks.py":
            continue
        text = path.read_text()
        for m in re.finditer(r"raise (?:ValueError|TypeError)\((.{0,200})", text, re.S):
            found.append((path.name, text[:m.start()].count("\n") + 1, m.group(1)))
    return found


def test_no_argument_check_outside_checks_py():
    stray = [(name, line, msg[:80]) for name, line, msg in raises_outside_checks()
             if not any(allowed in msg for allowed in ALLOWED.get(name, []))]
    assert not stray, f"argument checks outside _checks.py: {stray}"


def test_the_allow_list_is_not_stale():
    """Each allowed exception still exists (else it should leave the list)."""
    found = raises_outside_checks()
    for name, messages in ALLOWED.items():
        for allowed in messages:
            assert any(n == name and allowed in msg for n, _, msg in found), (name, allowed)
