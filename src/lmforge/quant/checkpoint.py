"""Quantized model directories: ``save_quantized``, ``load_quantized``, ``is_quantized``.

A quantized checkpoint is an lmforge model directory (``lmforge.model.save``'s layout: config.json,
model.safetensors, tokenizer.lmforge.json) whose config.json also has
``"quantization_config": {"quant_method": "lmforge", "config": QuantConfig.to_dict() or null,
"modules": {linear name: module.qconfig()}}`` and whose safetensors holds every buffer of the quantized
linears (codes, scales, zero points, fp8 weights) beside the fp32 tensors. Loading rebuilds the Transformer from
its config, swaps each listed linear for ``format_class(q["format"]).empty(...)`` and loads the state strictly
(names, shapes and dtypes), so the loaded model's logits equal the saved model's exactly.

Knows the file layout and the QuantLinear protocol (``qconfig``/``empty``); knows nothing of how any format
computes or how codes were chosen.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .._io import read_json_object

QUANT_METHOD = "lmforge"


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every QuantLinear in ``model``."""
    from .linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` entry of config.json for ``model``."""
    mods = quantized_modules(model)
    if not mods:
        raise ValueError("save_quantized: the model has no quantized linear (run lmforge.quant.quantize first)")
    cfg = getattr(model, "quant_config", None)
    return {"quant_method": QUANT_METHOD, "config": cfg.to_dict() if cfg is not None else None,
            "modules": {n: m.qconfig() for n, m in mods.items()}}


def save_quantized(model, directory, tokenizer=None, tokens=None) -> Path:
    """Write a quantized model directory (see the module docstring). The files are written into a temporary
    directory beside ``directory`` and moved in one by one, config.json last, so a failure leaves what was
    there before untouched (and no partial file)."""
    from ..model import save

    d = Path(directory)
    extra = {"quantization_config": quantization_config(model)}
    json.dumps(extra)  # JSON-able, or fail before writing anything
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", suffix=".tmp", dir=d.parent))
    try:
        save(model, tmp, tokenizer=tokenizer, extra=extra, tokens=tokens)
        if model.cfg.tie_embeddings and not isinstance(model.lm_head, nn.Linear):
            # save() drops "lm_head.weight" of a tied model (it is tok_emb.weight); a quantized head's own
            # buffers (an fp8 "weight" among them) must stay
            from safetensors.torch import save_file

            sd = {k: v.detach().contiguous().cpu() for k, v in sorted(model.state_dict().items())}
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            with open(tmp / "model.safetensors", "rb") as f:
                os.fsync(f.fileno())
        d.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in [n for n in names if n != "config.json"] + ["config.json"]:
            os.replace(tmp / name, d / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d


def _read_config(directory: Path) -> dict:
    p = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model directory")
    if not p.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a model directory)")
    return read_json_object(p)


def is_quantized(directory) -> bool:
    """True when ``directory`` is an lmforge model directory with an lmforge ``quantization_config``."""
    try:
        c = _read_config(Path(directory))
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return False
    q = c.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD


def load_quantized(directory, device: str = "cpu"):
    """``(model, tokenizer or None)`` from a directory written by ``save_quantized``; ValueError naming the
    file and the field for anything missing or wrong."""
    from ..model import FORMAT
    from ..model.config import ModelConfig
    from ..model.hf import read_safetensors
    from ..model.transformer import Transformer, rope_frequencies
    from .config import QuantConfig
    from .linear import format_class

    d = Path(directory)
    c = _read_config(d)
    p = d / "config.json"
    if c.get("format") != FORMAT:
        raise ValueError(f"{p}: field 'format': got {c.get('format')!r}, expected {FORMAT!r} "
                         "(a quantized lmforge model directory)")
    q = c.get("quantization_config")
    if not isinstance(q, dict):
        raise ValueError(f"{p}: field 'quantization_config' missing or not an object (not a quantized checkpoint)")
    if q.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{p}: field 'quantization_config.quant_method': got {q.get('quant_method')!r}, "
                         f"expected {QUANT_METHOD!r}")
    mods = q.get("modules")
    if not isinstance(mods, dict) or not mods:
        raise ValueError(f"{p}: field 'quantization_config.modules': expected an object of linear name -> "
                         f"format fields, got {mods!r}")
    qcfg = None
    if q.get("config") is not None:
        try:
            qcfg = QuantConfig.from_dict(q["config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{p}: field 'quantization_config.config': {e}") from None
    if "model" not in c:
        raise ValueError(f"{p}: field 'model' missing")
    try:
        cfg = ModelConfig.from_dict(c["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{p}: field 'model': {e}") from None

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    for name, mq in mods.items():
        field = f"quantization_config.modules.{name}"
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{p}: field {field!r}: the model has no linear named {name!r}")
        if not isinstance(mq, dict) or "format" not in mq:
            raise ValueError(f"{p}: field {field!r}: expected an object with a 'format', got {mq!r}")
        try:
            new = format_class(mq["format"]).empty(mq, lin.in_features, lin.out_features, lin.bias is not None)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{p}: field {field!r}: {e}") from None
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)

    sd = read_safetensors(d)
    tied_head = cfg.tie_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied_head and "tok_emb.weight" in sd:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    own = model.state_dict()
    where = d / "model.safetensors"
    extra = sorted(set(sd) - set(own))
    missing = sorted(set(own) - set(sd))
    if extra:
        raise ValueError(f"{where}: unexpected tensors {extra[:5]} for this model and quantization_config")
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]} (config.json's quantization_config lists "
                         "modules the weights do not hold?)")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape) or v.dtype != own[k].dtype:
            raise ValueError(f"{where}: tensor {k!r} is {v.dtype} {tuple(v.shape)}, the config needs "
                             f"{own[k].dtype} {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=True)
    if tied_head:
        model.lm_head.weight = model.tok_emb.weight
    if getattr(model, "inv_freq", None) is not None:
        model.inv_freq = rope_frequencies(cfg)
        model._rope_cache = None
    model.quant_config = qcfg
    model.eval()
    tok = None
    if (d / "tokenizer.lmforge.json").exists():
        from ..tokenize import load as load_tok

        tok = load_tok(d / "tokenizer.lmforge.json")
        if tok.vocab_size > cfg.vocab_size:
            raise ValueError(f"{d}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings")
    return model.to(device), tok
