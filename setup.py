"""Builds lmforge's C extensions (tokenizer, dedup, model kernels, decode loops).

* No C compiler found (none installed, or none setuptools knows for this platform):
  a warning, and the package installs and runs on its pure-Python (and PyTorch) paths;
  ``lmforge.tokenize.native.AVAILABLE`` and its kind tell which is in use.
* A compiler present but an extension that fails to compile or link: the build fails
  with the compiler's error. A broken extension is a bug to see now, not a slower
  package to discover later.
* ``LMFORGE_ALLOW_NO_NATIVE=1`` opts back into the fallback: an extension that fails to
  build is skipped with a warning and the rest install.

CI (``.ci/run``) and ``make test`` run the tests with ``LMFORGE_REQUIRE_NATIVE=1``, which
fails (instead of skipping) the tests of any extension that is not built.
"""
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, CompileError, ExecError, PlatformError


def fallback_allowed() -> bool:
    return os.environ.get("LMFORGE_ALLOW_NO_NATIVE", "") not in ("", "0")


def _warn(msg: str) -> None:
    print(f"warning: {msg}; lmforge will use its pure-Python paths", file=sys.stderr)


def missing_compiler(compiler) -> str | None:
    """Why ``compiler`` cannot run here (the command not found), or None when it is present."""
    if compiler.compiler_type == "msvc":
        try:
            if not getattr(compiler, "initialized", True):
                compiler.initialize()
        except (PlatformError, ExecError, OSError) as e:
            return f"MSVC: {e}"
        return None
    cmd = getattr(compiler, "compiler_so", None) or getattr(compiler, "compiler", None)
    if cmd and shutil.which(cmd[0]) is None:
        return f"{cmd[0]!r} not found"
    return None


class NativeBuildExt(build_ext):
    """build_ext that tells "no compiler" (fall back, with a warning) from "the build is broken" (fail)."""

    def run(self):
        try:
            super().run()
        except PlatformError as e:  # setuptools found no C compiler for this platform
            _warn(f"no C compiler ({e}); lmforge's C extensions were not built")

    def build_extensions(self):
        why = missing_compiler(self.compiler)
        if why:
            _warn(f"no C compiler ({why}); lmforge's C extensions were not built")
            return
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, ExecError, PlatformError) as e:
            if fallback_allowed():
                _warn(f"could not build {ext.name} ({e}); skipped as LMFORGE_ALLOW_NO_NATIVE is set")
                return
            raise CompileError(f"building the C extension {ext.name} failed: {e}\n(a C compiler is present, so "
                               "this is a build error; fix it, or set LMFORGE_ALLOW_NO_NATIVE=1 to install "
                               "without the extension and run on pure Python)") from e


extra = ["-O3", "-std=c99"] if os.name != "nt" else []
# the model kernels run on PyTorch's OpenMP threads, found at run time (dlopen), else on pthreads
threaded = dict(depends=["src/lmforge/model/_parallel.h"],
                extra_link_args=["-pthread"] if os.name != "nt" else [],
                libraries=["dl"] if sys.platform.startswith("linux") else [])
pthread = ["-pthread"] if os.name != "nt" else []
EXTENSIONS = [
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
]

if __name__ == "__main__":  # (pip's build backend runs this file as __main__; tests import the class)
    setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": NativeBuildExt})
