"""Methods ``rtn`` (round-to-nearest integer codes, ``IntLinear``) and ``fp8`` (``FP8Linear``): no calibration,
each weight quantized on its own (``quant.formats`` has the arithmetic).

Knows which linears to swap (every ``nn.Linear`` not matched by ``cfg.skip``) and the per-layer error report;
knows nothing of files or of the calibrated methods.
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from . import formats as fm
from .config import QuantConfig
from .linear import FP8Linear, IntLinear

NEEDS_CALIBRATION = False


def targets(model: nn.Module, skip: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``(name, nn.Linear)`` pairs to quantize: every linear whose name matches no glob in ``skip``."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in skip)]


def check_shapes(model: nn.Module, cfg: QuantConfig) -> None:
    """Every target's in_features divides by the group size (granularity "group"), before anything changes:
    ValueError naming the linear and its shape."""
    if cfg.granularity != "group":
        return
    for n, m in targets(model, cfg.skip):
        fm.n_groups(m.in_features, "group", cfg.group_size, n, m.out_features)


def layer_stats(w: torch.Tensor, wq: torch.Tensor, module) -> dict:
    """Reconstruction error of one weight: relative Frobenius error, max abs error, storage."""
    w, wq = w.detach().float(), wq.detach().float()
    d = (w - wq)
    return {"shape": list(w.shape), "err": float(d.norm() / w.norm().clamp_min(1e-30)),
            "max_abs_err": float(d.abs().max()) if d.numel() else 0.0, "bytes": int(module.weight_bytes())}


def make_module(linear: nn.Linear, cfg: QuantConfig, name: str = "weight"):
    if cfg.method == "fp8":
        m = FP8Linear.from_linear(linear, cfg.fp8_format, cfg.fp8_scale, cfg.activations)
    else:
        m = IntLinear.from_linear(linear, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym, name=name)
    return m.to(linear.weight.device)


@torch.no_grad()
def apply(model: nn.Module, cfg: QuantConfig, calib=None, progress: bool = True) -> dict:
    """Swap every target linear for its RTN (``cfg.method == "rtn"``) or FP8 module, in place; the report
    has each layer's error and storage."""
    from ..model.surgery import replace_linear

    if cfg.method not in ("rtn", "fp8"):
        raise ValueError(f"quantize: method: got {cfg.method!r}, expected rtn or fp8 for lmforge.quant.rtn")
    check_shapes(model, cfg)
    names = [n for n, _ in targets(model, cfg.skip)]
    layers = {}

    def make(name, lin):
        q = make_module(lin, cfg, name)
        layers[name] = layer_stats(lin.weight, q.dequantize(), q)
        return q

    from .._progress import bar

    with bar(total=len(names), desc=f"quantize {cfg.method}", unit="layer", disable=not progress) as pb:
        def make_and_tick(name, lin):
            out = make(name, lin)
            pb.update(1)
            return out

        wanted = set(names)
        replace_linear(model, make_and_tick, lambda n, _: n in wanted)
    return {"method": cfg.method, "layers": layers}
