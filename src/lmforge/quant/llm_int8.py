"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 matmul with the outlier input features in high precision.

Knows the vector-wise int8 arithmetic that it and SmoothQuant's W8A8 share (``vectorwise_quant``: one absmax
scale per row; ``int8_matmul``: the exact integer product, rescaled), the ``llm_int8`` format
(``LLMInt8Linear``) and the method (``apply``: every linear not in ``cfg.skip`` swapped). Knows nothing about
the model's structure beyond its ``nn.Linear`` names, about calibration (the method needs none; the
outlier columns are decided on each call), or about files (``quant.checkpoint``).

The algorithm, as bitsandbytes' ``Linear8bitLt`` (inference, ``has_fp16_weights=False``) runs it:

- weights, once: per output row ``absmax_o = max_i |W[o, i]|``, codes ``q = round(W * (127 / absmax_o))``
  in [-127, 127] (int8), stored with the step ``scales[o] = absmax_o / 127`` (fp32, (O, 1));
- activations, on every call, over the rows X (N, I) of that call (leading dims flattened, so a whole
  batch decides together): outliers are the elements with ``|x| >= threshold`` (6.0 by default); an
  outlier column is a column holding at least one. The row scale is the absmax of the row's remaining
  (non-outlier) elements, ``c = round(x * (127 / absmax_n))``, and the outlier columns are zeroed in c;
- output ``Y = (c @ q^T) * sx_n * sw_o  +  X[:, outl] @ (q[:, outl] * sw)^T  + bias``: the int8 part
  accumulates exactly (int32 in bitsandbytes; here fp32 products of the integer codes over slices of 1024
  columns, exact since every partial sum is an integer below 2**24, added in int32); the outlier part is
  an fp32 matmul against the dequantized weight columns (bitsandbytes dequantizes the int8 weight columns
  too: the weight is stored once, in int8).

Rounding: ``torch.round`` (half to even), as bitsandbytes' CPU path. A row (of W or X) that is all zero
gets scale 0 and codes 0 (bitsandbytes would divide by zero). Differences from bitsandbytes: fp32 instead
of fp16 inputs and outputs, the step (absmax/127) stored instead of the absmax, so the dequantization is
``acc * (sx * sw)`` instead of ``acc * (absmax_x * absmax_w) / 127**2`` (equal up to fp32 rounding).
"""
from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn

from .linear import QuantLinear, _need, register_format

QMAX = 127
_EXACT_COLS = 1024  # codes summed exactly in one fp32 matmul: 1024 * 127**2 < 2**24
NEEDS_CALIBRATION = False


# ---- vector-wise int8 arithmetic (shared with quant.smoothquant) ----
def vectorwise_quant(x: torch.Tensor, threshold: float | None = None):
    """Per-row absmax int8 codes of ``x`` (N, I).

    Returns ``(codes int8 (N, I), step fp32 (N, 1), outlier_cols int64 (k,) or None)``: ``x ~ codes * step``.
    With ``threshold``, the elements with ``|x| >= threshold`` are left out of each row's absmax, and the
    columns that hold one (``outlier_cols``) are zeroed in the codes (they go through the fp32 path)."""
    x = x.float()
    a = x.abs()
    cols = None
    if threshold is not None:
        out = a >= threshold
        if bool(out.any()):
            cols = torch.nonzero(out.any(0)).view(-1)
            a = a.masked_fill(out, 0.0)
    amax = a.amax(-1, keepdim=True) if x.shape[-1] else x.new_zeros(x.shape[0], 1)
    inv = torch.where(amax > 0, QMAX / amax, torch.zeros_like(amax))
    codes = torch.round(x * inv).clamp_(-QMAX, QMAX)
    if cols is not None:
        codes[:, cols] = 0
    return codes.to(torch.int8), amax / QMAX, cols


def int8_matmul(cx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """``(cx @ qw^T) * sx * sw^T``: int8 codes (N, I) x (O, I) with steps (N, 1) and (O, 1) -> fp32 (N, O).

    The integer accumulation is exact, the same numbers as an int32 accumulation: fp32 matmuls of the
    integer codes over slices of at most ``_EXACT_COLS`` = 1024 input columns (|c q| <= 127**2, so every
    partial sum is an integer of magnitude <= 1024 * 127**2 < 2**24: no rounding, whatever the summation
    order), the slices' sums added in int32 (int64 past 2**31); then one fp32 rescale. (No float64: MPS
    has none.)"""
    I = cx.shape[-1]
    if I <= _EXACT_COLS:
        acc = cx.float() @ qw.float().t()
    else:
        it = torch.int32 if I * QMAX * QMAX < 2 ** 31 else torch.int64
        acc = None
        for a in range(0, I, _EXACT_COLS):
            part = (cx[:, a:a + _EXACT_COLS].float() @ qw[:, a:a + _EXACT_COLS].float().t()).to(it)
            acc = part if acc is None else acc.add_(part)
    return acc.float() * (sx * sw.reshape(1, -1))


def quantize_weight(w: torch.Tensor):
    """Per-output-row symmetric int8 of a weight (O, I): ``(q int8 (O, I), step fp32 (O, 1))``."""
    q, s, _ = vectorwise_quant(w.detach())
    return q, s


def _check_threshold(t):
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"llm_int8: threshold: got {t!r}, expected a number > 0 (the outlier magnitude, 6.0 "
                         "by default)")
    return float(t)


@register_format("llm_int8")
class LLMInt8Linear(QuantLinear):
    """LLM.int8(): int8 per-row weights; on each call, per-row int8 activations except the outlier input
    columns (any ``|x| >= threshold``), which multiply the dequantized weight columns in fp32.

    Buffers: ``qweight`` int8 (O, I), ``scales`` fp32 (O, 1) (``w = qweight * scales``). ``last_outliers``
    holds the outlier column indices of the latest call (for inspection; not state)."""

    def __init__(self, in_features, out_features, threshold=6.0, bias=None):
        super().__init__(in_features, out_features, bias)
        self.threshold = _check_threshold(threshold)
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(self.out_features, 1))
        self.last_outliers: torch.Tensor | None = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, threshold=6.0):
        O, I = weight.shape
        m = cls(I, O, threshold, bias=bias).to(weight.device)
        q, s = quantize_weight(weight)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold=6.0):
        return cls.from_weight(linear.weight, linear.bias, threshold)

    @classmethod
    def empty(cls, q, in_features, out_features, bias):
        return cls(in_features, out_features, _need(q, "threshold", "llm_int8"),
                   bias=torch.zeros(out_features) if bias else None)

    def qconfig(self) -> dict:
        return {"format": "llm_int8", "bits": 8, "threshold": self.threshold}

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.float().reshape(-1, self.in_features)
        cx, sx, cols = vectorwise_quant(x, self.threshold)
        y = int8_matmul(cx, sx, self.qweight, self.scales)
        self.last_outliers = cols
        if cols is not None:
            w_out = self.qweight.index_select(1, cols).float() * self.scales  # (O, k) dequantized columns
            y = y.addmm(x.index_select(1, cols), w_out.t())
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    d = float(torch.linalg.vector_norm(b.float()))
    return float(torch.linalg.vector_norm((a - b).float())) / d if d > 0 else 0.0


def targets(model: nn.Module, skip) -> list[str]:
    """The ``nn.Linear`` names of ``model`` that no glob of ``skip`` matches."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(n, p) for p in skip)]


def _outlier_stats(model, names, tokens, threshold, batch_size=8) -> dict:
    """Per linear, over ``tokens`` run in batches as the quantized forward would see them: the mean and the
    largest number of outlier columns per call, and the share of input columns ever an outlier."""
    from .calib import _batches

    mods = dict(model.named_modules())
    st = {n: {"calls": 0, "sum": 0, "max": 0, "ever": torch.zeros(mods[n].in_features, dtype=torch.bool)}
          for n in names}

    def hook_for(n):
        def hook(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            cols = (x.abs() >= threshold).any(0)
            k = int(cols.sum())
            s = st[n]
            s["calls"] += 1
            s["sum"] += k
            s["max"] = max(s["max"], k)
            s["ever"] |= cols.cpu()
        return hook

    hs = [mods[n].register_forward_pre_hook(hook_for(n)) for n in names]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            for b in _batches(tokens, batch_size):
                model(b.to(dev))
    finally:
        for h in hs:
            h.remove()
    return {n: {"outlier_cols_mean": s["sum"] / max(1, s["calls"]), "outlier_cols_max": s["max"],
                "outlier_cols_frac": float(s["ever"].float().mean()) if s["ever"].numel() else 0.0}
            for n, s in st.items()}


@torch.no_grad()
def apply(model: nn.Module, cfg, calib: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Swap every ``nn.Linear`` not matched by ``cfg.skip`` for an ``LLMInt8Linear`` (threshold
    ``cfg.threshold``), in place. No calibration is needed (outliers are found per call); given ``calib``
    tokens, the report also counts each layer's outlier columns on them (before the swap, fp32 model).

    Report: {"method", "threshold", "layers": {name: {"shape": [O, I], "err": ||W - deq(W)||/||W||, "bytes",
    and with calib "outlier_cols_mean", "outlier_cols_max", "outlier_cols_frac"}}, "unquantized": [the linears cfg.skip
    left in fp32]}."""
    from ..model.surgery import replace_linear

    if cfg.bits != 8:
        raise ValueError(f"llm_int8: bits: got {cfg.bits!r}, expected 8 (LLM.int8() is an int8 method)")
    threshold = _check_threshold(cfg.threshold)
    names = targets(model, cfg.skip)
    unquantized = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]
    stats = _outlier_stats(model, names, calib, threshold) if calib is not None and names else {}
    layers: dict[str, dict] = {}

    def make(name, lin):
        q = LLMInt8Linear.from_linear(lin, threshold)
        layers[name] = {"shape": [q.out_features, q.in_features], "err": _rel_err(q.dequantize(), lin.weight.detach()),
                        "bytes": q.weight_bytes(), **stats.get(name, {})}
        return q

    keep = set(names)
    replace_linear(model, make, lambda n, _m: n in keep)
    return {"method": "llm_int8", "threshold": threshold, "layers": layers, "unquantized": unquantized}
