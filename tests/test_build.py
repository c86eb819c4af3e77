"""setup.py's build_ext: no C compiler falls back to pure Python; a compiler that fails is a build error.

Runs setup.py's command class on one tiny extension in a temporary directory (a second
or so): a good module builds, a broken one fails the build (unless
LMFORGE_ALLOW_NO_NATIVE=1), and a missing compiler only warns.
"""
import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the compiler is found by its command name on POSIX")

ROOT = Path(__file__).resolve().parent.parent

GOOD = """#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "lmforge_probe", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_lmforge_probe(void) { return PyModule_Create(&mod); }
"""
BROKEN = GOOD + "int lmforge_probe_broken(void) { return not_declared_anywhere; }\n"


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("lmforge_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # not __main__: defines the command class without running setup()
    return mod


def have_cc() -> bool:
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc")
    return shutil.which(cc.split()[0]) is not None


def build(setup_py, tmp_path, monkeypatch, code: str) -> list[Path]:
    from setuptools import Distribution, Extension

    monkeypatch.chdir(tmp_path)
    Path("probe.c").write_text(code)
    dist = Distribution({"name": "probe", "ext_modules": [Extension("lmforge_probe", ["probe.c"],
                                                                    extra_compile_args=["-O0"])]})
    cmd = setup_py.NativeBuildExt(dist)
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    return sorted((tmp_path / "lib").glob("lmforge_probe*"))


@pytest.fixture
def compiler():
    if not have_cc():
        assert os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1", "no C compiler, and CI requires the native build"
        pytest.skip("no C compiler here")


def test_a_good_extension_builds(setup_py, tmp_path, monkeypatch, compiler):
    monkeypatch.delenv("LMFORGE_ALLOW_NO_NATIVE", raising=False)
    assert len(build(setup_py, tmp_path, monkeypatch, GOOD)) == 1


def test_a_compile_error_fails_the_build(setup_py, tmp_path, monkeypatch, compiler, capfd):
    from setuptools.errors import CompileError

    monkeypatch.delenv("LMFORGE_ALLOW_NO_NATIVE", raising=False)
    with pytest.raises(CompileError, match="(?s)lmforge_probe failed.*LMFORGE_ALLOW_NO_NATIVE=1"):
        build(setup_py, tmp_path, monkeypatch, BROKEN)
    assert "not_declared_anywhere" in capfd.readouterr().err  # the compiler's own message is shown
    assert not list(tmp_path.glob("lib/lmforge_probe*"))


def test_the_fallback_can_be_asked_for(setup_py, tmp_path, monkeypatch, compiler, capfd):
    monkeypatch.setenv("LMFORGE_ALLOW_NO_NATIVE", "1")
    assert build(setup_py, tmp_path, monkeypatch, BROKEN) == []
    assert "could not build lmforge_probe" in capfd.readouterr().err


def test_no_compiler_falls_back_with_a_warning(setup_py, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("LMFORGE_ALLOW_NO_NATIVE", raising=False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert build(setup_py, tmp_path, monkeypatch, BROKEN) == []  # not even tried
    err = capfd.readouterr().err
    assert "no C compiler" in err and "no-such-cc" in err and "pure-Python" in err
