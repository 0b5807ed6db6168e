#!/usr/bin/env bash
# Check the kernels on AArch64 from an x86-64 machine: build tests/c/kernel_check.c with
# csrc/kernels*.c and csrc/engine.c natively and with Debian's gcc-aarch64-linux-gnu
# (static, so qemu needs no sysroot; also with clang --target=aarch64-linux-gnu and no
# OpenMP when clang is installed), run every kernel table under qemu-aarch64-static
# (neon and generic) and natively (generic and whatever this CPU has), then compare every
# dump with the native generic table's (tools/compare_kernel_dumps.py: integers equal,
# floats within 1e-5 / 1e-10 of each record's largest magnitude).
#   tools/cross_aarch64.sh            (installs gcc-aarch64-linux-gnu, qemu-user-static if missing)
# Set RA_CROSS_NO_INSTALL=1 to skip the apt-get step.  Exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
    if [ -z "${RA_CROSS_NO_INSTALL:-}" ]; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static) >/dev/null
    fi
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
noomp=(-O3 -std=gnu11 -fno-math-errno -Wall -Wno-unknown-pragmas -Werror -Icsrc -Itests/c)
flags=("${noomp[@]}" -fopenmp)
srcs=(tests/c/kernel_check.c csrc/kernels*.c csrc/engine.c)

gcc "${flags[@]}" "${srcs[@]}" -lm -o "$out/kc-x86"
aarch64-linux-gnu-gcc "${flags[@]}" -static "${srcs[@]}" -lm -o "$out/kc-a64"

dumps=()
for t in generic avx2 avx512 avx512-vpopcnt; do
    set +e
    "$out/kc-x86" "$t" "$out/x86-$t.bin"
    rc=$?
    set -e
    if [ "$rc" -eq 0 ]; then dumps+=("$out/x86-$t.bin");
    elif [ "$rc" -ne 3 ]; then echo "cross_aarch64: x86 table $t failed ($rc)" >&2; exit 1; fi
done
# clang, when installed: the AArch64 build without OpenMP (as Apple clang builds it)
if command -v clang >/dev/null; then
    clang --target=aarch64-linux-gnu "${noomp[@]}" -static "${srcs[@]}" -lm \
        -o "$out/kc-a64-clang"
fi
for t in neon generic; do
    qemu-aarch64-static "$out/kc-a64" "$t" "$out/a64-$t.bin"
    dumps+=("$out/a64-$t.bin")
    if [ -x "$out/kc-a64-clang" ]; then
        qemu-aarch64-static "$out/kc-a64-clang" "$t" "$out/a64-clang-$t.bin"
        dumps+=("$out/a64-clang-$t.bin")
    fi
done
"$PYTHON" tools/compare_kernel_dumps.py "$out/x86-generic.bin" "${dumps[@]}"
