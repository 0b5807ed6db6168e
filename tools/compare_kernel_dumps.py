"""Compare kernel_check dumps (tests/c/kernel_check.c) of two kernel tables.

    python tools/compare_kernel_dumps.py REFERENCE.bin OTHER.bin [OTHER.bin ...]

Every record must be present in the same order with the same length.  Integer records
(labels, positions, codes, counts, Hamming results) must be equal; float records must
agree within 1e-5 (float32) / 1e-10 (float64) of the record's largest magnitude (tables
differ in summation order and in fused multiply-adds), with NaN and infinities in the
same places.  Exit status 1 on any difference, naming the record.
"""
import sys

import numpy as np

TOLERANCE = {"f": 1e-5, "d": 1e-10}


def read_dump(path):
    """Records of a dump as a list of (name, kind, float64 array)."""
    raw = open(path, "rb").read()
    records, at = [], 0
    while at < len(raw):
        name = raw[at:at + 32].split(b"\0", 1)[0].decode()
        kind = chr(raw[at + 32])
        n = int(np.frombuffer(raw, np.int64, 1, at + 33)[0])
        values = np.frombuffer(raw, np.float64, n, at + 41)
        records.append((name, kind, values))
        at += 41 + 8 * n
    return records


def compare(ref_path, other_path):
    """Differences between two dumps, as a list of messages (empty when they agree)."""
    ref, other = read_dump(ref_path), read_dump(other_path)
    if len(ref) != len(other):
        return [f"{other_path}: {len(other)} records, {ref_path} has {len(ref)}"]
    problems = []
    for i, ((name, kind, a), (name2, kind2, b)) in enumerate(zip(ref, other)):
        where = f"record {i} ({name})"
        if (name, kind, a.size) != (name2, kind2, b.size):
            problems.append(f"{where}: is {name2!r} kind {kind2} size {b.size}, expected "
                            f"{name!r} kind {kind} size {a.size}")
            continue
        if kind == "i":
            if not np.array_equal(a, b):
                problems.append(f"{where}: integers differ at {np.flatnonzero(a != b)[:8]}")
            continue
        finite = np.isfinite(a)
        if not np.array_equal(finite, np.isfinite(b)) or not np.array_equal(a[~finite], b[~finite],
                                                                            equal_nan=True):
            problems.append(f"{where}: NaN/inf in different places")
            continue
        if finite.any():
            scale = max(np.abs(a[finite]).max(), np.finfo(np.float64).tiny)
            err = np.abs(a[finite] - b[finite]).max() / scale
            if err > TOLERANCE[kind]:
                problems.append(f"{where}: relative difference {err:.3g} > {TOLERANCE[kind]:g}")
    return problems


def main(argv):
    """Command line: reference dump, then the dumps to check against it."""
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    failed = False
    for path in argv[2:]:
        problems = compare(argv[1], path)
        for p in problems:
            print(f"{path}: {p}")
        print(f"{path}: {'DIFFERS' if problems else 'agrees'} with {argv[1]} "
              f"({len(read_dump(path))} records)")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
