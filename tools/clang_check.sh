#!/usr/bin/env bash
# Clang job: build the extension with clang in a scratch copy of this tree (the in-place
# GCC build is left alone), once with OpenMP (LLVM's libomp) and once without
# (RA_NO_OPENMP=1: the build warns and runs single-threaded, as on Apple clang), and run
# the NumPy test suite against each build.
#
#   tools/clang_check.sh [extra pytest arguments]
#
# Needs clang and libomp-dev (Debian: apt-get install clang libomp-dev).
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
CLANG="${CLANG:-clang}"
command -v "$CLANG" >/dev/null || { echo "clang_check: $CLANG not found" >&2; exit 1; }
# setup.py reads pyproject.toml, whose SPDX license string needs setuptools >= 77
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
    2>/dev/null || "$PY" -m pip install --quiet --upgrade "setuptools>=77"
status=0
for openmp in yes no; do
    work="$(mktemp -d "${TMPDIR:-/tmp}/ra-clang.XXXXXX")"
    tar -C "$src" --exclude=./.git --exclude=./build --exclude='./.ci-venv' \
        --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' \
        --exclude='.hypothesis' --exclude='.pytest_cache' -cf - . | tar -C "$work" -xf -
    env_no_omp=""
    [ "$openmp" = no ] && env_no_omp="RA_NO_OPENMP=1"
    echo "clang_check: building with $CLANG (OpenMP: $openmp) in $work" >&2
    (cd "$work" && env $env_no_omp CC="$CLANG" "$PY" setup.py -q build_ext --inplace \
        >"$work/build.log" 2>&1) || { cat "$work/build.log" >&2; echo "clang_check: build failed" >&2; exit 1; }
    info="$(cd "$work" && PYTHONPATH="$work" "$PY" -c 'import routing_attention as r; print(r.__file__, r.build_info())')"
    echo "clang_check: $info" >&2
    case "$info" in "$work"/*[Cc]lang*) ;; *) echo "clang_check: not the clang build" >&2; exit 1;; esac
    set +e
    (cd "$work" && PYTHONPATH="$work" "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" \
        --ignore=tests/test_jax.py --ignore=tests/test_char_lm.py --ignore=tests/test_dask.py \
        --ignore-glob='tests/test_torch*' "$@")
    rc=$?
    set -e
    echo "clang_check: OpenMP $openmp: pytest status $rc" >&2
    [ "$rc" -ne 0 ] && status=$rc
    rm -rf "$work"
done
exit "$status"
