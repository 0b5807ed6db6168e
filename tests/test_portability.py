"""Portability: the kernel table reported by build_info() matches the machine, every table
agrees with the generic one at C level (tests/c/kernel_check.c), and — where the cross
tools are installed — the AArch64 tables agree under qemu (tools/cross_aarch64.sh)."""
import os
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest

import routing_attention as ra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_kernel_dumps  # noqa: E402

X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
TABLES = {"x86": {"avx512-vpopcnt", "avx512", "avx2", "generic"},
          "aarch64": {"neon", "generic"}}


def _simd_with(env_value):
    """build_info()['simd'] in a fresh interpreter with RA_SIMD set to env_value."""
    env = dict(os.environ, RA_SIMD=env_value)
    code = "import routing_attention as ra; print(ra.build_info()['simd'])"
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()


def test_build_info_names_a_table_of_this_architecture():
    simd = ra.build_info()["simd"]
    arch = "x86" if X86 else platform.machine().lower()
    assert simd in TABLES.get(arch, {"generic"}), f"{simd!r} on {platform.machine()}"


def test_rsimd_generic_selects_the_generic_table():
    assert _simd_with("generic") == "generic"


def _write_dump(path, records):
    with open(path, "wb") as f:
        for name, kind, values in records:
            f.write(name.encode().ljust(32, b"\0"))
            f.write(kind.encode())
            f.write(np.int64(len(values)).tobytes())
            f.write(np.asarray(values, np.float64).tobytes())


@pytest.mark.parametrize("change, message", [
    (None, None),
    (("a", 1, 1 + 1e-9), None),                         # float32 record: within 1e-5
    (("a", 1, 1 + 1e-4), "relative difference"),
    (("b", 0, 1 + 1e-9), "relative difference"),        # float64 record: beyond 1e-10
    (("c", 2, 8.0), "integers differ"),
    (("a", 0, np.nan), "NaN/inf"),
])
def test_compare_kernel_dumps_flags_differences(tmp_path, change, message):
    records = {"a": ["x", "f", [0.5, 1.0, -2.0]], "b": ["y", "d", [1.0, 0.25]],
               "c": ["z", "i", [3, -1, 7]]}
    _write_dump(tmp_path / "ref.bin", records.values())
    if change:
        key, at, value = change
        records[key][2] = list(records[key][2])
        records[key][2][at] = value
    _write_dump(tmp_path / "other.bin", records.values())
    problems = compare_kernel_dumps.compare(tmp_path / "ref.bin", tmp_path / "other.bin")
    if message is None:
        assert problems == []
    else:
        assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_every_native_table_agrees_with_generic_at_c_level(tmp_path):
    exe = tmp_path / "kernel_check"
    srcs = ["tests/c/kernel_check.c", *sorted(
        os.path.relpath(os.path.join(ROOT, "csrc", f), ROOT)
        for f in os.listdir(os.path.join(ROOT, "csrc")) if f.startswith("kernels") and f.endswith(".c")),
        "csrc/engine.c"]
    # the extension's own optimisation flags: -O3 vectorises loops -O2 leaves alone
    subprocess.run(["gcc", "-O3", "-fno-math-errno", "-std=gnu11", "-Wall", "-Werror",
                    "-Wno-unknown-pragmas", "-Icsrc", "-Itests/c", *srcs, "-lm", "-o", str(exe)],
                   cwd=ROOT, check=True)
    dumps = []
    for table in sorted(TABLES["x86"] | TABLES["aarch64"]):
        run = subprocess.run([str(exe), table, str(tmp_path / f"{table}.bin")],
                             capture_output=True, text=True)
        assert run.returncode in (0, 3), run.stderr     # 3: table absent on this machine
        if run.returncode == 0:
            dumps.append(tmp_path / f"{table}.bin")
    assert tmp_path / "generic.bin" in dumps and len(dumps) >= (2 if X86 else 1)
    for dump in dumps:
        assert compare_kernel_dumps.compare(tmp_path / "generic.bin", dump) == [], dump


@pytest.mark.slow
@pytest.mark.skipif(not (X86 and shutil.which("aarch64-linux-gnu-gcc")
                         and shutil.which("qemu-aarch64-static")),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user-static on x86")
def test_aarch64_tables_agree_under_qemu():
    run = subprocess.run(["tools/cross_aarch64.sh"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, RA_CROSS_NO_INSTALL="1", PYTHON=sys.executable))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "a64-neon.bin: agrees" in run.stdout and "a64-generic.bin: agrees" in run.stdout
