"""``quantize(model, cfg)``: one entry point for every method. Checks the config, puts the model in eval mode,
finds calibration tokens when the method needs them (the training shards of ``data_dir``, never the test
split), calls the method module's ``apply`` and records ``model.quant_config``. Also ``model_bytes``, the
storage of a (possibly quantized) model for the size table.

Knows the method table (``config.METHODS``) and the method modules' contract (``apply(model, cfg, calib,
progress) -> report``, ``NEEDS_CALIBRATION``); knows nothing of how any method quantizes.
"""
from __future__ import annotations

import importlib

import torch

from .config import METHODS, QuantConfig, check_config


def method_module(method: str):
    """The module implementing ``method`` (``config.METHODS``)."""
    if method not in METHODS:
        check_config(QuantConfig(method=method))  # the error with the nearest name
    try:
        return importlib.import_module(METHODS[method])
    except ModuleNotFoundError as e:
        if e.name != METHODS[method]:
            raise
        raise ValueError(f"quantize: method {method!r}: its module {METHODS[method]} is not part of this "
                         "installation") from None


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the model's state dict, a tied tensor counted once (codes, scales and zero
    points of quantized linears; fp32 embeddings, norms and skipped linears)."""
    seen, n = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        n += t.numel() * t.element_size()
    return n


def quantize(model, cfg: QuantConfig, calib: torch.Tensor | None = None, data_dir=None, progress: bool = True) -> dict:
    """Quantize ``model`` in place with ``cfg``; returns the method's report plus ``"config"`` and
    ``"bytes"`` (before/after). Calibration tokens: ``calib`` (LongTensor (N, T)), else ``cfg.calib_samples``
    windows of ``cfg.calib_seq_len`` tokens from ``data_dir``'s train split; a method that needs them and
    gets neither is a ValueError."""
    check_config(cfg)
    mod = method_module(cfg.method)
    model.eval()
    if getattr(mod, "NEEDS_CALIBRATION", False) and calib is None:
        if data_dir is None:
            raise ValueError(f"quantize: method {cfg.method} needs calibration tokens: pass calib or data_dir "
                             "(the token shards of `lmforge data prepare`; --data on the command line)")
        from .calib import calibration_tokens

        calib = calibration_tokens(data_dir, n_samples=cfg.calib_samples, seq_len=cfg.calib_seq_len,
                                   seed=cfg.seed, split="train")
    if calib is not None:
        calib = torch.as_tensor(calib)
        if calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"quantize: calib: expected an integer token tensor (n_samples, seq_len), got "
                             f"{calib.dtype} of shape {tuple(calib.shape)}")
        calib = calib.long()
    before = model_bytes(model)
    report = mod.apply(model, cfg, calib, progress=progress)
    model.quant_config = cfg
    report = dict(report)
    report.setdefault("method", cfg.method)
    report["config"] = cfg.to_dict()
    report["bytes"] = {"before": before, "after": model_bytes(model)}
    return report
