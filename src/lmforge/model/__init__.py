"""The model: ``ModelConfig``, presets, the ``Transformer`` decoder and its files.

An lmforge model directory holds ``config.json`` (``{"format": "lmforge.model",
"model": {...ModelConfig...}}``), ``model.safetensors`` and the tokenizer
(``tokenizer.lmforge.json``) with its special tokens' parts and chat template
(``config.json``'s ``"tokens"``, a ``lmforge.tokenize.special.TokenSpec``): the
model, its tokenizer, its special tokens and its config travel together. ``load(dir)`` also opens HF directories (GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import PRESETS, ModelConfig, describe, preset
from .config import make as make_config

__all__ = ["ModelConfig", "make_config", "PRESETS", "preset", "describe", "Transformer", "load", "save", "export_hf",
           "load_tokens"]

FORMAT = "lmforge.model"


def __getattr__(name):
    if name == "Transformer":
        from .transformer import Transformer

        return Transformer
    if name == "export_hf":
        from .hf import export_hf

        return export_hf
    raise AttributeError(name)


def save(model, directory: str | os.PathLike, tokenizer=None, extra: dict | None = None, tokens=None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ tokenizer and its ``TokenSpec``, inferred from the
    tokenizer unless ``tokens`` is given) atomically into ``directory``."""
    from safetensors.torch import save_file

    from .._io import write_json

    d = Path(directory)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{d}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.cfg.vocab_size} embeddings")
    d.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in sorted(model.state_dict().items())}  # a canonical file
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as tok_emb.weight
    tmp = d / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})  # one key: safetensors writes metadata in hash order
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, d / "model.safetensors")
    meta = {"format": FORMAT, "model": model.cfg.to_dict()}
    if tokenizer is not None:
        from ..tokenize.special import TokenSpec

        tokenizer.save(d / "tokenizer.lmforge.json")
        tokens = tokens or TokenSpec.for_tokenizer(tokenizer)
        tokens.check(tokenizer, model.cfg.vocab_size)
        meta["tokens"] = tokens.to_dict()
    write_json(d / "config.json", {**meta, **(extra or {})}, indent=1)
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    d = Path(directory)
    if d.is_file():
        raise NotADirectoryError(f"{d} is a file; a model's config is read from the model directory that holds "
                                 f"it ({d.parent})")
    p = d / "config.json"
    if not p.exists():
        raise FileNotFoundError(f"{d}: no config.json (not a model directory)")
    c = json.loads(p.read_text())
    if c.get("format") == FORMAT:
        return ModelConfig.from_dict(c["model"])
    from .hf import LazyTensors, config_from_hf

    return config_from_hf(c, LazyTensors(d))  # (the few tensors it asks for: ReLU², zero biases)


def load(directory: str | os.PathLike, device: str = "cpu", tokenizer: bool = True):
    """(model, tokenizer or None) from an lmforge or HF model directory."""
    import torch

    from .hf import import_hf, load_state, read_safetensors
    from .transformer import Transformer

    d = Path(directory)
    if d.is_file():
        raise NotADirectoryError(f"{d} is a file; a model is loaded from the model directory that holds it "
                                 f"({d.parent})")
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such model directory")
    c = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    if c.get("format") != FORMAT:
        model, tok = import_hf(d)
        return model.to(device), tok
    cfg = ModelConfig.from_dict(c["model"])
    sd = read_safetensors(d)
    if cfg.tie_embeddings and "tok_emb.weight" in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, sd, str(d))
    tok = None
    if tokenizer and (d / "tokenizer.lmforge.json").exists():
        from ..tokenize import load as load_tok

        tok = load_tok(d / "tokenizer.lmforge.json")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{d}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings")
    return model.to(device), tok


def load_tokens(directory: str | os.PathLike, tokenizer):
    """The ``TokenSpec`` of a model directory (lmforge: saved in ``config.json``, else inferred from the
    tokenizer; HF: from ``tokenizer_config.json`` and ``generation_config.json``)."""
    from ..tokenize.special import TokenSpec

    return TokenSpec.load(directory, tokenizer)
