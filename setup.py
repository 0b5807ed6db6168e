"""Build the single C extension ``routing_attention._ext``.

Flags are portable and IEEE-exact: ``-O3`` only, no native-architecture or fast-math flags.
The SIMD tile kernels come from one source (GCC vector extensions, ``csrc/kernels_body.h``)
compiled once per table and chosen at import (``build_info()["simd"]``): on x86-64 three
times (AVX-512, AVX2+FMA, baseline SSE2) through a target pragma inside
``csrc/kernels_*.c`` (``csrc/kernels_target.h``: GCC's ``#pragma GCC target`` or clang's
``#pragma clang attribute``); on AArch64 twice (NEON, generic; NEON is part of the base
architecture, so no flag); elsewhere once (generic).  The x86 sources compile to nothing
off x86, so the same flags serve every architecture and compiler.  ``CC=clang`` builds
too.  Tested: GCC and clang on x86-64 (the suite), GCC and clang cross-built for AArch64
and run under qemu (``tools/cross_aarch64.sh``: every kernel and the engine at C level).
OpenMP is used when the compiler accepts ``-fopenmp``; otherwise the build goes on
single-threaded with a warning (``RA_NO_OPENMP=1`` forces that, for testing).  Set
``RA_SANITIZE=1`` for an ASan/UBSan build.
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler, flags, source="int main(void){return 0;}\n"):
    tmp = tempfile.mkdtemp()
    saved_stderr = os.dup(2)            # a refused flag is an answer, not an error to show
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=flags)
        return True
    except Exception:
        return False
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        shutil.rmtree(tmp, ignore_errors=True)


OPENMP_PROBE = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler
        compile_args = ["-O3", "-std=gnu11", "-fno-math-errno", "-fvisibility=hidden",
                        "-Wall", "-Wno-unknown-pragmas"]
        link_args = []
        if os.environ.get("RA_SANITIZE"):
            san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
            compile_args = [a.replace("-O3", "-O1") for a in compile_args] + san
            link_args += san
        # clang: keep floating-point comparisons and products where they are written, so
        # a NaN compared quietly raises no FP flag (GCC's default behaviour already)
        if _compiler_accepts(cc, ["-ffp-exception-behavior=maytrap"]):
            compile_args.append("-ffp-exception-behavior=maytrap")
        if not os.environ.get("RA_NO_OPENMP") and _compiler_accepts(cc, ["-fopenmp"], OPENMP_PROBE):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        else:
            warnings.warn("routing_attention: OpenMP is unavailable (no -fopenmp support, or RA_NO_OPENMP set); "
                          "building a single-threaded extension.")
            print("WARNING: OpenMP not found; routing_attention will run single-threaded.",
                  file=sys.stderr)
        for ext in self.extensions:
            ext.extra_compile_args = compile_args
            ext.extra_link_args = link_args
        super().build_extensions()


ext = Extension(
    "routing_attention._ext",
    sources=sorted(glob.glob("csrc/*.c")),
    include_dirs=[np.get_include(), "csrc"],
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    depends=sorted(glob.glob("csrc/*.h")),
)

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExt})
