#!/usr/bin/env bash
# Sanitizer job: build the extension with AddressSanitizer + UBSan (RA_SANITIZE=1) in a
# scratch copy of this tree, so the normal in-place build is left alone, then run the
# whole test suite under it with the sanitizer runtimes preloaded.  Exits non-zero on a
# failing test or on any sanitizer report.
#
#   tools/sanitize.sh [extra pytest arguments]
#
# Needs gcc (for libasan/libubsan), Python with numpy, setuptools, pytest, hypothesis.
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/ra-sanitize.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# ---- 1. copy the sources (no build products, venvs or git metadata)
tar -C "$src" --exclude=./.git --exclude=./build --exclude='./.ci-venv' \
    --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' \
    --exclude='.hypothesis' --exclude='.pytest_cache' -cf - . | tar -C "$work" -xf -

# ---- 2. sanitizer build, in place inside the copy
cd "$work"
# setup.py reads pyproject.toml, whose SPDX license string needs setuptools >= 77
"$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" \
    2>/dev/null || "$PY" -m pip install --quiet --upgrade "setuptools>=77"
echo "sanitize: building with RA_SANITIZE=1 in $work" >&2
RA_SANITIZE=1 "$PY" setup.py -q build_ext --inplace >"$work/build.log" 2>&1 || {
    cat "$work/build.log" >&2; echo "sanitize: build failed" >&2; exit 1; }

libasan="$(gcc -print-file-name=libasan.so)"
libubsan="$(gcc -print-file-name=libubsan.so)"
for lib in "$libasan" "$libubsan"; do
    [ -e "$lib" ] || { echo "sanitize: runtime $lib not found" >&2; exit 1; }
done

# The tests must import this build, and it must really be instrumented.
so="$(PYTHONPATH="$work" LD_PRELOAD="$libasan:$libubsan" ASAN_OPTIONS=detect_leaks=0 \
      "$PY" -c 'import routing_attention._ext as e; print(e.__file__)')"
case "$so" in "$work"/*) ;; *) echo "sanitize: imported $so, not the sanitizer build" >&2; exit 1;; esac
# (not `ldd | grep -q`: under pipefail, grep quitting early can kill ldd with SIGPIPE and
# fail the check at random)
case "$(ldd "$so")" in *libasan*) ;; *) echo "sanitize: $so is not linked to libasan" >&2; exit 1;; esac

# ---- 3. the whole suite under the sanitizers
# detect_leaks=0: CPython itself keeps interned objects alive at exit (not our leaks; the
# leak tests in tests/test_hardening.py measure ours).  allocator_may_return_null=1: a
# huge request returns NULL (-> MemoryError) as with glibc, instead of aborting.
log="$work/pytest.log"
# Reports go to files (log_path): pytest captures fd 2, and an aborting process would
# take a report on stderr down with it.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$work/report:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$work/report:${UBSAN_OPTIONS:-}"
export PYTHONMALLOC=malloc            # let ASan see every Python-side allocation too
export RA_SANITIZED=1                 # tests may skip what cannot run under ASan
start=$(date +%s)
set +e
PYTHONPATH="$work" LD_PRELOAD="$libasan:$libubsan" \
    "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "sanitize: test run took $(( $(date +%s) - start )) s, pytest status $status" >&2

# Any report (also from a child process, or a check that did not halt) fails the job.
# (huge requests that fail as tests expect only leave "WARNING: ... failed to allocate")
reports=$(grep -lE "ERROR:|runtime error|SUMMARY:" "$work"/report.* 2>/dev/null | sort || true)
if [ -n "$reports" ] || grep -qE "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$log"; then
    for r in $reports; do echo "==== $r" >&2; cat "$r" >&2; done
    echo "sanitize: sanitizer report found" >&2
    exit 1
fi
echo "sanitize: no sanitizer reports" >&2
exit "$status"
