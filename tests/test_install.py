"""`pip install` is the whole install: an sdist, a wheel built from that sdist, a fresh venv.

The wheel must carry every C extension built (so the sdist must carry every source and header)
and the recipes; the installed command must find both. torch comes from this machine's pip
(the CPU build, as the Makefile installs it) so the fresh venv does not pull a CUDA build.
"""
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**extra) -> dict:
    """The environment without this checkout on the path (pip would take it for an installed lmforge)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, **extra}


def run(cmd, env=None, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env or clean_env(), **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # the sdist from the source tree, then the wheel from the unpacked sdist (not from the tree)
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)])
    sdist = next(out.glob("lmforge-*.tar.gz"))
    with tarfile.open(sdist) as t:
        t.extractall(out / "src", filter="data")
    tree = next((out / "src").iterdir())
    run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(tree)],
        env=clean_env(LMFORGE_ALLOW_NO_NATIVE=""))
    return sdist, next(out.glob("lmforge-*.whl"))


def test_sdist_carries_sources_headers_recipes_license(built):
    sdist, _ = built
    names = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    for f in ("src/lmforge/tokenize/_unicode_tables.h", "src/lmforge/infer/_decode_kern.h",
              "src/lmforge/model/_parallel.h", "src/lmforge/tokenize/_native.c", "src/lmforge/recipes/default.toml",
              "LICENSE", "setup.py", "pyproject.toml"):
        assert f in names, f"{f} missing from the sdist"
    own = {str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*") if p.suffix in (".c", ".h")}
    assert own <= names, f"C sources missing from the sdist: {sorted(own - names)}"


def test_wheel_from_sdist_has_every_extension_and_the_recipes(built):
    _, wheel = built
    names = zipfile.ZipFile(wheel).namelist()
    for mod in ("tokenize/_native", "data/_dedup", "model/_kernels", "model/_attention", "infer/_decode"):
        assert any(n.startswith(f"lmforge/{mod}.") and n.endswith((".so", ".pyd")) for n in names), \
            f"the wheel lost the C extension lmforge/{mod}"
    assert "lmforge/recipes/default.toml" in names


def test_fresh_venv_install_runs(built, tmp_path):
    _, wheel = built
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py, exe = venv / "bin" / "python", venv / "bin" / "lmforge"
    import torch

    # the same torch as this environment (the CPU build here), then the wheel with its dependencies
    run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={torch.__version__.split('+')[0]}"])
    run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)])
    work = tmp_path / "elsewhere"  # not the source tree: nothing may come from the checkout
    work.mkdir()
    from lmforge.tokenize import train

    tok = train("bpe", ["to be or not to be, that is the question " * 50], 300, show_progress=False)
    tok.save(work / "tok.json")
    r = run([str(exe), "tokenizer", "encode", "--tokenizer", str(work / "tok.json"), "to be or not"], cwd=work)
    assert r.stdout.strip() and r.stdout.split()[0].strip("[,").isdigit()
    r = run([str(py), "-c", "import lmforge, lmforge.tokenize.native as n; print(n.AVAILABLE, lmforge.__file__)"],
            cwd=work)
    ok, where = r.stdout.split()
    assert ok == "True", "the installed tokenizer runs without its C extension"
    assert str(venv) in where
    r = run([str(exe), "run", "--print-config"], cwd=work)
    assert '"name": "default"' in r.stdout and "site-packages" in r.stdout
    r = run([str(py), "-m", "lmforge", "--version"], cwd=work)
    assert r.stdout.startswith("lmforge ")
