"""AWQ (activation-aware weight quantization, Lin et al. 2023): per-input-channel scales chosen from the
activations, folded into the operation before, then a clipping search, then round-to-nearest codes.

Knows the scaling pairs of lmforge's pre-norm block (which module's output channels feed which linears'
input columns), the grid searches and the fold; knows nothing about number formats (``quant.formats``
rounds, ``quant.linear.IntLinear`` stores), files, or how calibration windows are cut (``quant.calib``).

The idea. A linear ``y = W x`` equals ``(W diag(s)) (x / s)`` for any positive ``s``. Channels with large
mean activation ``|x_j|`` matter most to the output; scaling their columns up before rounding gives them
relatively finer steps (the group's step is set by its absmax, which grows less than the salient column),
and dividing the activation by ``s`` is free: it is folded into the operation that produced ``x`` (a norm's
weight and bias, or the rows of the linear before). Per block, in order, as in llm-awq's ``auto_scale``
for Llama-style blocks:

====================================  ===========================  ===================================
pair (prev op -> linears)             error measured on             condition
====================================  ===========================  ===================================
attn_norm -> attn.qkv (q, k, v)        the attention's output        always
v rows of attn.qkv -> attn.proj        attn.proj's output            K == H key/value heads (no GQA)
mlp_norm -> mlp.fc ([gate; up])        the feed-forward's output     dense feed-forward (not MoE)
up rows of mlp.fc -> mlp.proj          mlp.proj's output             swiglu (relu2: fc rows / sqrt(s))
====================================  ===========================  ===================================

Scale search (per pair): ``xm = mean over calibration tokens of |x|`` per input channel; for alpha in
``k / awq_grid`` (k = 0 .. awq_grid - 1), ``s = clamp(xm ** alpha, 1e-4)``, normalised to
``s / sqrt(max(s) min(s))``; each linear of the pair is replaced by ``RTN(W diag(s)) / s`` (the quantized
weight seen from the unscaled input) and the mean squared error of the inspected module's output against
its fp32 output is measured; the best alpha's ``s`` is folded. alpha = 0 is s = 1: plain RTN is always a
candidate, so the search never does worse than RTN on the calibration objective.

Clipping search (``awq_clip``, per linear after the fold): each group's range is shrunk to
``absmax * (1 - i / 20)``, i = 0 .. 9 (down to 0.55), the weight clamped to it and rounded, and per
(row, group) the ratio with the smallest mean squared partial output ``x_g . (q_g - w_g)`` over 512
calibration rows (evenly strided) is kept. q and k rows are not clipped (their errors pass through the
q.k product, which a per-group output error does not see), as llm-awq does; with ``granularity="tensor"``
one ratio is searched for the whole weight and qkv is not clipped. Final codes: RTN of the scaled,
clipped weight (``quant.formats.rtn_quantize``), stored by ``IntLinear.from_codes``.

Differences from llm-awq / AutoAWQ (stated):

* Sequential on quantized inputs: block i's calibration inputs come from the already quantized blocks
  < i (lmforge's contract for GPTQ and AWQ); llm-awq feeds every block the fp16 outputs of the blocks before.
* The v -> proj pair is applied whenever v's output channels are proj's input channels one to one
  (K == H), whatever d_model; llm-awq tests ``v_proj.weight.shape == o_proj.weight.shape``. With GQA
  (K < H) it is skipped and reported.
* RTN is lmforge's (``quant.formats``: sym step absmax / (2**(b-1) - 0.5), asym range including 0), the
  same function that writes the final codes; llm-awq's asym uses min/max without including 0.
* relu2 feed-forwards (relu(x / r)**2 = relu(x)**2 / r**2) get the fc -> proj pair with r = sqrt(s);
  gelu ones (not positively homogeneous) skip it; llm-awq wraps the activation in a scaling module.
* Linears in no pair (a MoE router and shared experts, the head when not skipped) get the clipping
  search and RTN only.

``apply(model, cfg, calib)`` quantizes in place and returns the report: per linear ``err`` and ``rtn_err``
(relative output error ``||XW^T - XQ^T||^2 / ||XW^T||^2`` on up to 512 calibration rows, in the original
coordinates, for AWQ's weight and for plain RTN of the original weight) and ``clip`` (mean clip ratio);
per pair the chosen ``alpha``, its loss and the loss at alpha = 0 (RTN); skipped pairs with the reason.
"""
from __future__ import annotations

import fnmatch
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats as fm

NEEDS_CALIBRATION = True
CLIP_GRID = 20  # the clip ratios are 1 - i / CLIP_GRID ...
CLIP_MAX_SHRINK = 0.5  # ... for i < CLIP_MAX_SHRINK * CLIP_GRID (llm-awq: 20 and 0.5)
CLIP_ROWS = 512  # calibration rows the clipping search and the reported errors use (llm-awq: 512 tokens)
ERR_ROWS = 512


@dataclass
class Pair:
    """One scaling pair: the output channels of ``prev`` (a norm, or ``rows`` of a linear) feed the input
    columns of ``linears``. Folding ``s``: prev's channels / s**power, the linears' columns * s."""
    name: str
    prev: str  # module name (a norm or a linear)
    linears: list[str]
    inspect: str  # "attn" | "mlp" | "linear": whose output error the alpha search measures
    rows: tuple[int, int] | None = None  # prev linear's rows [a, b) (v of qkv, up of fc); None: all of prev
    power: float = 1.0  # prev's channels are divided by s**power (relu2: 0.5)


def block_pairs(model: nn.Module, i: int) -> tuple[list[Pair], dict[str, str]]:
    """Block ``i``'s scaling pairs, in search order, and {pair name: why it is skipped}."""
    p = f"blocks.{i}"
    block = model.blocks[i]
    pairs, skipped = [], {}
    attn, mlp = block.attn, block.mlp
    if isinstance(getattr(attn, "qkv", None), nn.Linear) and hasattr(attn, "proj"):
        pairs.append(Pair(f"{p}.attn_norm->{p}.attn.qkv", f"{p}.attn_norm", [f"{p}.attn.qkv"], "attn"))
        H, K, D = attn.H, attn.K, attn.D
        name = f"{p}.attn.qkv[v]->{p}.attn.proj"
        if K == H:
            pairs.append(Pair(name, f"{p}.attn.qkv", [f"{p}.attn.proj"], "linear", rows=((H + K) * D, (H + 2 * K) * D)))
        else:
            skipped[name] = (f"grouped-query attention ({H} query heads, {K} key/value heads): v's {K * D} "
                             f"channels are not proj's {H * D} inputs one to one")
    else:
        skipped[f"{p}.attn"] = f"attention kind {type(attn).__name__} has no fused qkv/proj linears"
    fc, proj = getattr(mlp, "fc", None), getattr(mlp, "proj", None)
    if isinstance(fc, nn.Linear) and isinstance(proj, nn.Linear) and hasattr(mlp, "activation"):
        pairs.append(Pair(f"{p}.mlp_norm->{p}.mlp.fc", f"{p}.mlp_norm", [f"{p}.mlp.fc"], "mlp"))
        act, hidden = mlp.activation, mlp.hidden
        name = f"{p}.mlp.fc->{p}.mlp.proj"
        if act == "swiglu":
            pairs.append(Pair(f"{p}.mlp.fc[up]->{p}.mlp.proj", f"{p}.mlp.fc", [f"{p}.mlp.proj"], "linear",
                              rows=(hidden, 2 * hidden)))
        elif act == "relu2":
            pairs.append(Pair(name, f"{p}.mlp.fc", [f"{p}.mlp.proj"], "linear", power=0.5))
        else:
            skipped[name] = f"activation {act!r} is not positively homogeneous: a scale cannot pass through it"
    else:
        skipped[f"{p}.mlp_norm->{p}.mlp"] = (f"feed-forward kind {type(mlp).__name__}: mlp_norm also feeds weights "
                                             "that are not linears (experts), so no scale is folded into it")
    return pairs, skipped


@torch.no_grad()
def fold(model: nn.Module, pair: Pair, s: torch.Tensor) -> None:
    """Fold per-channel scales ``s`` (positive) into a pair: exact in fp32 arithmetic up to rounding."""
    s = s.float()
    prev = model.get_submodule(pair.prev)
    d = s if pair.power == 1.0 else s.pow(pair.power)
    if isinstance(prev, nn.Linear):
        a, b = pair.rows if pair.rows is not None else (0, prev.out_features)
        prev.weight[a:b].div_(d[:, None])
        if prev.bias is not None:
            prev.bias[a:b].div_(d)
    else:  # a norm: RMSNorm (weight) or LayerNorm (weight, bias)
        prev.weight.div_(d)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(d)
    for name in pair.linears:
        model.get_submodule(name).weight.mul_(s[None, :])


# ---- helpers ---------------------------------------------------------------------------------------
class _Stop(Exception):
    pass


def _fake_quant(w: torch.Tensor, cfg, name: str) -> torch.Tensor:
    codes, sc, z = fm.rtn_quantize(w, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym, name=name)
    return fm.dequantize_codes(codes, sc, z)


def _skipped(name: str, skip: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in skip)


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most n rows, evenly strided (llm-awq's ``input_feat[0::N // n]``)."""
    return x if x.shape[0] <= n else x[:: x.shape[0] // n][:n]


def _submodule_out(model, i: int, h: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``module``'s output while block i runs on h (the rest of the block is cut short)."""
    from .calib import run_block

    got = {}

    def hook(_m, _args, out):
        got["y"] = out
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        run_block(model, i, h)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got["y"]


def _capture_block(model, i: int, hs: list[torch.Tensor], names: list[str]) -> tuple[dict, list]:
    """Inputs (N, in) of the named linears of block i and the attention's outputs per batch."""
    from .calib import run_block

    got = {n: [] for n in names}
    attn_out = []
    hooks = []
    for n in names:
        def pre(_m, args, n=n):
            got[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        hooks.append(model.get_submodule(n).register_forward_pre_hook(pre))
    hooks.append(model.blocks[i].attn.register_forward_hook(lambda _m, _a, out: attn_out.append(out.detach())))
    try:
        for h in hs:
            run_block(model, i, h)
    finally:
        for k in hooks:
            k.remove()
    return {n: torch.cat(v) for n, v in got.items()}, attn_out


def _grid_scales(xm: torch.Tensor, alpha: float) -> torch.Tensor:
    s = xm.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


# ---- the searches ----------------------------------------------------------------------------------
@torch.no_grad()
def _search_scale(model, i, pair: Pair, x: torch.Tensor, hs, attn_ref, cfg, quantized: set) -> tuple:
    """(best s, best alpha, best loss, loss at alpha 0) for one pair."""
    block = model.blocks[i]
    lins = [model.get_submodule(n) for n in pair.linears]
    orig = [lin.weight.detach().clone() for lin in lins]
    xm = x.abs().mean(0)

    if pair.inspect == "attn":
        ref = attn_ref

        def run():
            return [_submodule_out(model, i, h, block.attn) for h in hs]
    elif pair.inspect == "mlp":
        ref = [block.mlp(x)]

        def run():
            return [block.mlp(x)]
    else:
        lin0 = lins[0]
        ref = [F.linear(x, orig[0], lin0.bias)]

        def run():
            return [F.linear(x, lin0.weight, lin0.bias)]

    count = sum(r.numel() for r in ref)
    best = (math.inf, None, None)
    loss0 = None
    try:
        for k in range(cfg.awq_grid):
            alpha = k / cfg.awq_grid
            s = _grid_scales(xm, alpha)
            for lin, w, n in zip(lins, orig, pair.linears):
                if n in quantized:
                    lin.weight.copy_(_fake_quant(w * s[None, :], cfg, n) / s[None, :])
            loss = sum(float((a - b).pow(2).sum()) for a, b in zip(run(), ref)) / count  # (fp32 sums: pairwise)
            if k == 0:
                loss0 = loss
            if loss < best[0]:
                best = (loss, s, alpha)
    finally:
        for lin, w in zip(lins, orig):
            lin.weight.copy_(w)
    return best[1], best[2], best[0], loss0


@torch.no_grad()
def _search_clip(w: torch.Tensor, x: torch.Tensor, cfg, name: str, rows: tuple[int, int] | None = None):
    """The clipped weight and its mean clip ratio. ``rows``: only those rows are clipped (qkv's v)."""
    O, I = w.shape
    a, b = rows if rows is not None else (0, O)
    sub = w[a:b]
    ratios = [1 - k / CLIP_GRID for k in range(int(CLIP_MAX_SHRINK * CLIP_GRID))]
    if cfg.granularity == "tensor":
        amax = sub.abs().amax()
        ref = x @ sub.t()
        errs = []
        for r in ratios:
            q = _fake_quant(sub.clamp(-amax * r, amax * r), cfg, name)
            errs.append(float((x @ q.t() - ref).pow(2).mean()))
        r = ratios[min(range(len(ratios)), key=errs.__getitem__)]
        out = w.clone()
        out[a:b] = sub.clamp(-amax * r, amax * r)
        return out, r
    gs = cfg.group_size if cfg.granularity == "group" else I
    G = I // gs
    wg = sub.reshape(-1, G, gs)
    amax = wg.abs().amax(-1, keepdim=True)  # (R, G, 1)
    xg = x.reshape(-1, G, gs)  # (n, G, gs)
    best_err = torch.full((wg.shape[0], G), math.inf, device=w.device)
    best_r = torch.ones(wg.shape[0], G, device=w.device)
    for r in ratios:
        m = amax * r
        cw = torch.maximum(torch.minimum(wg, m), -m)
        q = _fake_quant(cw.reshape(-1, I), cfg, name).reshape(-1, G, gs)
        d = q - wg  # against the unclipped weight
        err = torch.einsum("ngk,rgk->nrg", xg, d).pow(2).mean(0)  # (R, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    m = amax * best_r[..., None]
    out = w.clone()
    out[a:b] = torch.maximum(torch.minimum(wg, m), -m).reshape(-1, I)
    return out, float(best_r.mean())


def _rel_err(x, w, q) -> float:
    ref = x @ w.t()
    return float((x @ q.t() - ref).pow(2).sum() / ref.pow(2).sum().clamp(min=1e-30))


# ---- the method ------------------------------------------------------------------------------------
@torch.no_grad()
def apply(model: nn.Module, cfg, calib: torch.Tensor | None, progress: bool = True,
          scales_out: dict | None = None) -> dict:
    """AWQ in place: block by block, search and fold the pairs' scales, clip, swap each linear (not in
    ``cfg.skip``) for an ``IntLinear``. Returns the JSON-able report (module docstring). ``scales_out``
    (additive to the method contract): a dict that receives {linear name: (s_in | None, s_out | None)}, the
    factors that map each quantized linear back to the original coordinates:
    ``W_original ~ s_out[:, None] * Q.dequantize() / s_in[None, :]``."""
    from .calib import block_inputs, run_block
    from .config import check_config
    from .linear import IntLinear
    from ..model.surgery import replace_linear

    check_config(cfg)
    if calib is None:
        raise ValueError("awq: calibration tokens are required (calib=None); pass a (samples, seq_len) token "
                         "tensor or quantize(..., data_dir=...) with the shards to calibrate on")
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"awq: calib: expected a (samples, seq_len) integer token tensor, got "
                         f"{type(calib).__name__} {tuple(getattr(calib, 'shape', ()))}")
    V = model.cfg.vocab_size
    if calib.numel() and (int(calib.min()) < 0 or int(calib.max()) >= V):
        raise ValueError(f"awq: calib: token ids {int(calib.min())}..{int(calib.max())} outside the model's "
                         f"vocabulary 0..{V - 1}")
    todo = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, cfg.skip)]
    for n in todo:  # every shape checked before anything is modified
        lin = model.get_submodule(n)
        fm.n_groups(lin.in_features, cfg.granularity, cfg.group_size, n, lin.out_features)
    odd = [n for n in todo if not n.startswith("blocks.") and n != "lm_head"]
    if odd:
        raise ValueError(f"awq: linear(s) {', '.join(odd)} are outside the blocks and not the head: AWQ does not "
                         "know their inputs; add them to skip")
    quantized = set(todo)
    model.eval()
    t0 = time.time()
    report = {"method": "awq", "bits": cfg.bits, "granularity": cfg.granularity, "group_size": cfg.group_size,
              "sym": cfg.sym, "calib_tokens": int(calib.numel()), "layers": {}, "pairs": {}, "skipped_pairs": {}}

    def quantize_linear(name, w_scaled, x_scaled, w_orig, x_orig, s_in, s_out, clip_rows):
        lin = model.get_submodule(name)
        xs = _rows(x_scaled, CLIP_ROWS)
        clip = 1.0
        if cfg.awq_clip and clip_rows is not False:
            w_scaled, clip = _search_clip(w_scaled, xs, cfg, name, clip_rows)
        codes, sc, z = fm.rtn_quantize(w_scaled, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym, name=name)
        q = IntLinear.from_codes(codes, sc, z, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym,
                                 bias=lin.bias).to(lin.weight.device)
        eff = q.dequantize()
        if s_in is not None:
            eff = eff / s_in[None, :]
        if s_out is not None:
            eff = eff * s_out[:, None]
        xo = _rows(x_orig, ERR_ROWS)
        report["layers"][name] = {"err": _rel_err(xo, w_orig, eff),
                                  "rtn_err": _rel_err(xo, w_orig, _fake_quant(w_orig, cfg, name)),
                                  "clip": clip, "shape": [lin.out_features, lin.in_features]}
        if scales_out is not None:
            scales_out[name] = (s_in, s_out)
        return q

    hs = block_inputs(model, calib)
    n_blocks = len(model.blocks)
    it = range(n_blocks)
    if progress:
        from .._progress import bar

        it = bar(it, desc="awq", unit="block")
    for i in it:
        block_lin = [n for n, m in model.blocks[i].named_modules() if isinstance(m, nn.Linear)]
        block_lin = [f"blocks.{i}.{n}" for n in block_lin]
        mine = [n for n in block_lin if n in quantized]
        pairs, skipped = block_pairs(model, i)
        report["skipped_pairs"].update(skipped)
        if not mine:
            hs = [run_block(model, i, h) for h in hs]
            continue
        xs, attn_ref = _capture_block(model, i, hs, block_lin)
        w_orig = {n: model.get_submodule(n).weight.detach().clone() for n in mine}
        x_orig = {n: _rows(xs[n], ERR_ROWS).clone() for n in mine}
        s_in: dict[str, torch.Tensor] = {}
        s_out: dict[str, torch.Tensor] = {}
        found = []
        for pair in pairs:  # every search on the block's unscaled weights, then every fold (as llm-awq)
            if not any(n in quantized for n in pair.linears):
                report["skipped_pairs"][pair.name] = "its linears are not quantized (cfg.skip)"
                continue
            s, alpha, loss, loss0 = _search_scale(model, i, pair, xs[pair.linears[0]], hs, attn_ref, cfg, quantized)
            found.append((pair, s))
            report["pairs"][pair.name] = {"alpha": alpha, "loss": loss, "loss_rtn": loss0}
        for pair, s in found:
            fold(model, pair, s)
            for n in pair.linears:
                s_in[n] = s
                xs[n] = xs[n] / s[None, :]
            d = s if pair.power == 1.0 else s.pow(pair.power)
            if pair.prev in w_orig:  # the prev linear's rows: its output is divided by d
                prev = model.get_submodule(pair.prev)
                out = s_out.get(pair.prev, torch.ones(prev.out_features, device=s.device))
                a, b = pair.rows if pair.rows is not None else (0, prev.out_features)
                out[a:b] = out[a:b] * d
                s_out[pair.prev] = out
        made = {}
        for n in mine:
            lin = model.get_submodule(n)
            clip_rows = None
            if n == f"blocks.{i}.attn.qkv":
                a = model.blocks[i].attn
                clip_rows = False if cfg.granularity == "tensor" else ((a.H + a.K) * a.D, (a.H + 2 * a.K) * a.D)
            made[n] = quantize_linear(n, lin.weight.detach().clone(), xs[n], w_orig[n], x_orig[n],
                                      s_in.get(n), s_out.get(n), clip_rows)
        replace_linear(model, lambda name, _m: made[name], list(made))
        del xs, attn_ref
        hs = [run_block(model, i, h) for h in hs]
    # linears outside the blocks (the head, when not skipped): clipping search + RTN on norm_f's outputs
    rest = [n for n in todo if not n.startswith("blocks.")]
    if rest:
        x = _rows(torch.cat([model.norm_f(h).reshape(-1, h.shape[-1]) for h in hs]), CLIP_ROWS)
        w = model.lm_head.weight.detach().clone()
        q = quantize_linear("lm_head", w.clone(), x, w, x, None, None, None)
        replace_linear(model, lambda _n, _m: q, ["lm_head"])
    report["seconds"] = round(time.time() - t0, 3)
    return report
