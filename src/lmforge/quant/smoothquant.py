"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights, then W8A8.

Knows the smoothing (per input channel j of a linear, ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)``
from calibration activations: the linear's input is divided by s and its weight columns multiplied by s,
which leaves the product unchanged), where in lmforge's decoder block such a division can be folded for
free, the ``w8a8`` format (``W8A8Linear``) and the method (``apply``). Knows nothing about calibration
data files (``quant.calib``), checkpoints (``quant.checkpoint``) or other methods.

Where the division by s goes (exact: the fp32 model's function is unchanged up to rounding):

- ``attn_norm -> attn.qkv``, ``mlp_norm -> mlp.fc`` (and ``norm_f -> lm_head`` when the head is quantized and
  not tied to the embedding): the norm's weight (and bias) divided by s.
- ``attn.qkv`` (its v rows) ``-> attn.proj``: attention output channel (h, d) is a convex combination of v
  channel (kv(h), d), so dividing v's rows (and bias) by s divides proj's input by s. With grouped heads
  (GQA/MQA) the H/K query heads that share a kv head must share the scale: s is computed per (kv head, d)
  from the largest activation and weight over the group (tied), then repeated over the group.
- ``mlp.fc`` (SwiGLU's up rows) ``-> mlp.proj``: ``silu(g) * (u / s) = (silu(g) * u) / s``. ReLU²:
  ``relu(a / sqrt(s))**2 = relu(a)**2 / s`` for s > 0, so fc's rows (and bias) are divided by sqrt(s).
- not folded (reported in ``skipped`` with the reason, then quantized W8A8 unsmoothed): mlp.proj after a
  GELU (not homogeneous), the MoE feed-forward's linears (mlp_norm also feeds the router and the experts'
  3-D weights), attention kinds other than ``causal``, a tied lm_head, a linear whose predecessor is no
  longer an ``nn.Linear`` / norm with a weight.

All scales of a block are computed from the original weights and the calibration statistics, then folded.
A channel whose activation or weight maximum is 0 keeps s = 1.

W8A8 (``W8A8Linear``, format "w8a8"): weights int8 symmetric per output channel (step absmax/127, the
SmoothQuant repository's per-channel weight quantizer); activations int8 symmetric per token, dynamic
(each row's absmax/127 on every call: SmoothQuant's finest "O1" setting, chosen because it needs no static
activation range and is what the per-token kernels run); the product accumulates exactly in integers
(``llm_int8.int8_matmul``), then is rescaled by the two steps. ``LLMInt8Linear`` with no outliers is
exactly this format.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .linear import QuantLinear, register_format
from .llm_int8 import _rel_err, int8_matmul, quantize_weight, targets, vectorwise_quant

NEEDS_CALIBRATION = True


@register_format("w8a8")
class W8A8Linear(QuantLinear):
    """int8 per-channel weights x int8 per-token dynamic activations, exact integer accumulation.

    Buffers: ``qweight`` int8 (O, I), ``scales`` fp32 (O, 1) (``w = qweight * scales``)."""

    def __init__(self, in_features, out_features, bias=None):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.zeros(self.out_features, self.in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.zeros(self.out_features, 1))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None):
        O, I = weight.shape
        m = cls(I, O, bias=bias).to(weight.device)
        q, s = quantize_weight(weight)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear):
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def empty(cls, q, in_features, out_features, bias):
        return cls(in_features, out_features, bias=torch.zeros(out_features) if bias else None)

    def qconfig(self) -> dict:
        return {"format": "w8a8", "bits": 8, "activations": "token"}

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales

    def forward(self, x):
        lead = x.shape[:-1]
        cx, sx, _ = vectorwise_quant(x.float().reshape(-1, self.in_features))
        y = int8_matmul(cx, sx, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


# ---- where the smoothing folds ----
def _check_alpha(alpha):
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha: got {alpha!r}, expected a number in [0, 1] (the migration "
                         "strength, 0.5 by default)")
    return float(alpha)


def _is_norm(m) -> bool:
    from ..model.layers import RMSNorm

    return isinstance(m, (RMSNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None


def smoothing_plan(model: nn.Module, names=None) -> tuple[list[dict], list[dict]]:
    """Which linears (of ``names``, default every ``nn.Linear``) get a folded smoothing, and how.

    Returns ``(folds, skipped)``: folds ``{"linear", "into", "kind"}`` with kind "norm" (divide the norm
    ``into``), "v" (divide the v rows of ``into`` = the block's qkv; ``"tied"``: the kv-group size when the
    heads are grouped), "up" (SwiGLU's up rows of ``into`` = the block's fc) or "relu2" (fc's rows by
    sqrt(s)); skipped ``{"linear", "why"}``."""
    from ..model.attention import CausalSelfAttention
    from ..model.feedforward import DenseMLP

    want = None if names is None else set(names)
    folds, skipped = [], []

    def wanted(n):
        return want is None or n in want

    def lin(m):
        return isinstance(m, nn.Linear)

    for i, b in enumerate(model.blocks):
        p = f"blocks.{i}"
        a, f = b.attn, b.mlp
        if isinstance(a, CausalSelfAttention):
            if wanted(f"{p}.attn.qkv") and lin(a.qkv):
                if _is_norm(b.attn_norm):
                    folds.append({"linear": f"{p}.attn.qkv", "into": f"{p}.attn_norm", "kind": "norm"})
                else:
                    skipped.append({"linear": f"{p}.attn.qkv", "why": "attn_norm has no weight to fold into"})
            if wanted(f"{p}.attn.proj") and lin(a.proj):
                if lin(a.qkv):
                    fold = {"linear": f"{p}.attn.proj", "into": f"{p}.attn.qkv", "kind": "v"}
                    if a.H != a.K:
                        fold["tied"] = a.H // a.K
                    folds.append(fold)
                else:
                    skipped.append({"linear": f"{p}.attn.proj",
                                    "why": "attn.qkv is no longer an nn.Linear: its v rows cannot absorb the scales"})
        else:
            for n, m in a.named_modules():
                if lin(m) and wanted(f"{p}.attn.{n}"):
                    skipped.append({"linear": f"{p}.attn.{n}",
                                    "why": f"attention kind {type(a).__name__}: no smoothing fold known"})
        if isinstance(f, DenseMLP) and lin(f.fc):
            if wanted(f"{p}.mlp.fc"):
                if _is_norm(b.mlp_norm):
                    folds.append({"linear": f"{p}.mlp.fc", "into": f"{p}.mlp_norm", "kind": "norm"})
                else:
                    skipped.append({"linear": f"{p}.mlp.fc", "why": "mlp_norm has no weight to fold into"})
            if wanted(f"{p}.mlp.proj") and lin(f.proj):
                if f.activation == "swiglu":
                    folds.append({"linear": f"{p}.mlp.proj", "into": f"{p}.mlp.fc", "kind": "up"})
                elif f.activation == "relu2":
                    folds.append({"linear": f"{p}.mlp.proj", "into": f"{p}.mlp.fc", "kind": "relu2"})
                else:
                    skipped.append({"linear": f"{p}.mlp.proj",
                                    "why": f"activation {f.activation} is not homogeneous: a scale on fc's "
                                           "rows does not pass through it"})
        else:
            for n, m in f.named_modules():
                if lin(m) and wanted(f"{p}.mlp.{n}"):
                    skipped.append({"linear": f"{p}.mlp.{n}",
                                    "why": f"feed-forward {type(f).__name__}: mlp_norm also feeds what is not "
                                           "this linear (router, experts): no exact fold"})
    if wanted("lm_head") and lin(getattr(model, "lm_head", None)):
        if model.lm_head.weight is model.tok_emb.weight:
            skipped.append({"linear": "lm_head", "why": "lm_head is tied to the token embedding"})
        elif _is_norm(model.norm_f):
            folds.append({"linear": "lm_head", "into": "norm_f", "kind": "norm"})
        else:
            skipped.append({"linear": "lm_head", "why": "norm_f has no weight to fold into"})
    return folds, skipped


def activation_absmax(model: nn.Module, tokens: torch.Tensor, names: list[str], batch_size: int = 8,
                      keep_rows: int = 0) -> tuple[dict, dict]:
    """Per named linear, the largest |input| of each input channel over ``tokens`` (S, T), and up to
    ``keep_rows`` input rows spread evenly over the batches (for error reports). One pass of the model:
    ``calib.capture_inputs`` on one batch at a time, reduced at once (memory: one batch's rows).
    Returns ``({name: (I,)}, {name: (<=keep_rows, I)})``."""
    from .calib import capture_inputs

    amax: dict[str, torch.Tensor] = {}
    kept: dict[str, list] = {n: [] for n in names}
    n_batches = -(-tokens.shape[0] // batch_size)
    per = -(-keep_rows // n_batches) if keep_rows else 0
    for start in range(0, tokens.shape[0], batch_size):
        got = capture_inputs(model, tokens[start:start + batch_size], names, batch_size=batch_size)
        for n, x in got.items():
            m = x.abs().amax(0)
            amax[n] = m if n not in amax else torch.maximum(amax[n], m)
            if per:
                idx = torch.linspace(0, x.shape[0] - 1, min(per, x.shape[0])).round().long()
                kept[n].append(x.index_select(0, idx))
        del got
    rows = {n: torch.cat(v)[:keep_rows] for n, v in kept.items() if v}
    return amax, rows


def smoothing_scales(act_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = act_max**alpha / w_max**(1 - alpha)`` per channel; 1 where either maximum is 0."""
    act_max, w_max = act_max.double(), w_max.double()
    ok = (act_max > 0) & (w_max > 0)
    s = act_max.clamp_min(1e-30).pow(alpha) / w_max.clamp_min(1e-30).pow(1.0 - alpha)
    return torch.where(ok, s, torch.ones_like(s)).float()


def _scales_for(model, fold, act_max, alpha) -> torch.Tensor:
    """The fold's scale vector over its linear's input columns (tied per kv group for "v")."""
    mods = dict(model.named_modules())
    w = mods[fold["linear"]].weight.detach().abs().amax(0)  # (I,) max |W_j| over output rows
    x = act_max[fold["linear"]].to(w.device)
    g = fold.get("tied")
    if fold["kind"] == "v" and g:
        attn = mods[fold["into"].rsplit(".", 1)[0]]
        K, D = attn.K, attn.D
        s_kv = smoothing_scales(x.view(K, g, D).amax(1), w.view(K, g, D).amax(1), alpha)  # (K, D)
        return s_kv[:, None, :].expand(K, g, D).reshape(-1)
    return smoothing_scales(x, w, alpha)


@torch.no_grad()
def _fold(model, fold, s: torch.Tensor) -> None:
    mods = dict(model.named_modules())
    target, into = mods[fold["linear"]], mods[fold["into"]]
    s = s.to(target.weight.device)
    kind = fold["kind"]
    if kind == "norm":
        into.weight.div_(s)
        if getattr(into, "bias", None) is not None:
            into.bias.div_(s)
    elif kind == "v":
        attn = mods[fold["into"].rsplit(".", 1)[0]]
        H, K, D = attn.H, attn.K, attn.D
        sv = s.view(K, H // K, D)[:, 0, :].reshape(-1, 1)  # (K*D, 1): one scale per v channel
        rows = slice((H + K) * D, (H + 2 * K) * D)
        into.weight[rows].div_(sv)
        if into.bias is not None:
            into.bias[rows].div_(sv[:, 0])
    elif kind in ("up", "relu2"):
        hidden = mods[fold["into"].rsplit(".", 1)[0]].hidden
        rows = slice(hidden, 2 * hidden) if kind == "up" else slice(0, hidden)
        d = s if kind == "up" else s.sqrt()
        into.weight[rows].div_(d[:, None])
        if into.bias is not None:
            into.bias[rows].div_(d)
    else:  # pragma: no cover - the plan makes only the kinds above
        raise ValueError(f"smoothquant: unknown fold kind {kind!r}")
    target.weight.mul_(s[None, :])


def fold_smoothing(model: nn.Module, folds: list[dict], act_max: dict, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Compute every fold's scales (from the current weights and ``act_max``), then fold them all, in place.
    Returns ``{linear name: s}`` (its input is now ``x / s``)."""
    alpha = _check_alpha(alpha)
    scales = {f["linear"]: _scales_for(model, f, act_max, alpha) for f in folds}
    for f in folds:
        _fold(model, f, scales[f["linear"]])
    return scales


def smooth_model(model: nn.Module, tokens: torch.Tensor, alpha: float = 0.5, names=None,
                 batch_size: int = 8) -> dict:
    """SmoothQuant's smoothing alone, on an fp32 model, in place (its function is unchanged up to fp32
    rounding): statistics over ``tokens`` (S, T), scales with migration strength ``alpha``, folded where
    exact (see the module docstring). ``names``: the linears to smooth (default every ``nn.Linear``).
    Returns {"alpha", "folds": [...], "skipped": [...], "scales": {linear: s}}."""
    alpha = _check_alpha(alpha)
    was = model.training
    model.eval()
    folds, skipped = smoothing_plan(model, names)
    act_max, _ = activation_absmax(model, tokens, [f["linear"] for f in folds], batch_size)
    scales = fold_smoothing(model, folds, act_max, alpha)
    model.train(was)
    return {"alpha": alpha, "folds": folds, "skipped": skipped, "scales": scales}


def _need_calib(calib):
    if calib is None:
        raise ValueError("smoothquant: needs calibration tokens (the smoothing scales come from activation "
                         "maxima): pass calib=(samples, seq_len) tokens or data_dir= (shards of lmforge data "
                         "prepare; the train split is used)")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.numel() == 0:
        raise ValueError(f"smoothquant: calib: expected a non-empty (samples, seq_len) LongTensor, got "
                         f"{getattr(calib, 'shape', type(calib).__name__)}")


def _fp32(x, w, b):
    return x @ w.t() + (b if b is not None else 0)


@torch.no_grad()
def apply(model: nn.Module, cfg, calib: torch.Tensor | None, progress: bool = True) -> dict:
    """SmoothQuant W8A8, in place: the smoothing (``cfg.alpha``) folded where exact, then every ``nn.Linear``
    not matched by ``cfg.skip`` swapped for a ``W8A8Linear``.

    Report: {"method", "alpha", "layers": {name: {"shape", "err", "err_unsmoothed", "smoothed", "act_max",
    "act_max_smoothed", "bytes"}}, "folds", "skipped"}; ``err`` is the relative output error
    ||Y_q - Y||/||Y|| of the quantized layer against the same (smoothed) layer in fp32 on up to 1024
    calibration rows (in-sample), ``err_unsmoothed`` the same for plain W8A8 of the original weight.
    ``unquantized``: the linears ``cfg.skip`` left in fp32."""
    from ..model.surgery import replace_linear

    if cfg.bits != 8:
        raise ValueError(f"smoothquant: bits: got {cfg.bits!r}, expected 8 (W8A8)")
    alpha = _check_alpha(cfg.alpha)
    _need_calib(calib)
    was = model.training
    model.eval()
    names = targets(model, cfg.skip)
    folds, skipped = smoothing_plan(model, names)
    mods = dict(model.named_modules())
    orig = {n: (mods[n].weight.detach().clone(), None if mods[n].bias is None else mods[n].bias.detach().clone())
            for n in names}
    if progress:
        print(f"  smoothquant: activation maxima of {len(names)} linears over {calib.shape[0]} x {calib.shape[1]} "
              "calibration tokens", flush=True)
    act_max, rows = activation_absmax(model, calib, names, keep_rows=1024)
    scales = fold_smoothing(model, folds, act_max, alpha)
    if progress:
        print(f"  smoothquant: alpha {alpha}, {len(folds)} smoothings folded, {len(skipped)} linears not "
              f"smoothable", flush=True)
    layers: dict[str, dict] = {}
    keep = set(names)

    def make(name, lin):
        q = W8A8Linear.from_linear(lin)
        w0, b0 = orig[name]
        x = rows[name].to(w0.device)  # the fp32 model's inputs of this linear, before smoothing
        s = scales.get(name)
        s = None if s is None else s.to(w0.device)
        xs = x / s if s is not None else x  # its inputs now (the folds divide them by s)
        plain = W8A8Linear.from_weight(w0, b0)
        # each against its own fp32 layer (a fold into this linear's rows changes its output on purpose)
        am = act_max[name].to(w0.device)
        layers[name] = {"shape": [q.out_features, q.in_features], "err": _rel_err(q(xs), lin(xs)),
                        "err_unsmoothed": _rel_err(plain(x), _fp32(x, w0, b0)), "smoothed": s is not None,
                        "act_max": float(am.max()), "act_max_smoothed": float((am if s is None else am / s).max()),
                        "bytes": q.weight_bytes()}
        return q

    replace_linear(model, make, lambda n, _m: n in keep)
    model.train(was)
    unq = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in keep]
    return {"method": "smoothquant", "alpha": alpha, "layers": layers, "folds": folds, "skipped": skipped,
            "unquantized": unq}
