"""Builds lmforge's optional C extension (tokenizer and dedup hot loops).

If no C compiler is available the package still installs and runs on its
pure-Python paths; `lmforge.tokenize.native.AVAILABLE` tells which is in use.
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as e:  # pragma: no cover - depends on the machine
            print(f"warning: lmforge C extension not built ({e}); using pure Python", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # pragma: no cover
            print(f"warning: could not build {ext.name} ({e}); using pure Python", file=sys.stderr)


extra = ["-O3", "-std=c99"] if os.name != "nt" else []
# the model kernels run on PyTorch's OpenMP threads, found at run time (dlopen), else on pthreads
threaded = dict(depends=["src/lmforge/model/_parallel.h"],
                extra_link_args=["-pthread"] if os.name != "nt" else [],
                libraries=["dl"] if sys.platform.startswith("linux") else [])
pthread = ["-pthread"] if os.name != "nt" else []
setup(
    ext_modules=[
        Extension(
            "lmforge.tokenize._native",
            sources=["src/lmforge/tokenize/_native.c"],
            extra_compile_args=extra,
        ),
        Extension(
            "lmforge.model._kernels",
            sources=["src/lmforge/model/_kernels.c"],
            # lets gcc vectorize the clamps (NaN still propagates: the result is multiplied by x)
            extra_compile_args=extra + pthread + (["-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros",
                                                   "-fno-trapping-math"] if os.name != "nt" else []),
            **threaded,
        ),
        Extension("lmforge.model._attention", sources=["src/lmforge/model/_attention.c"],
                  extra_compile_args=extra + pthread, **threaded),
        Extension(
            "lmforge.infer._decode",
            sources=["src/lmforge/infer/_decode.c"],
            depends=["src/lmforge/infer/_decode_kern.h"],
            # contraction lets the AVX2 clone use FMA; -pthread for the worker threads
            extra_compile_args=extra + (["-ffp-contract=fast", "-pthread", "-Wno-psabi"] if os.name != "nt" else []),
            extra_link_args=["-pthread"] if os.name != "nt" else [],
        ),
        Extension(
            "lmforge.data._dedup",
            sources=["src/lmforge/data/_dedup.c"],
            extra_compile_args=extra,
        ),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
