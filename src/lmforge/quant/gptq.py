"""GPTQ (Frantar et al., 2022): integer weight codes that minimise each linear's output error on calibration
activations, column by column, using second-order information.

Knows the algorithm and how to walk a decoder block by block; takes its codes' arithmetic from
``quant.formats`` (the same scales and rounding as round-to-nearest) and stores the result as an
``IntLinear`` (``IntLinear.from_codes``). Knows nothing about files or the command line.

For one linear with weight ``W`` (O, I) and calibration inputs ``X`` (n, I), the error is
``||W X^T - Q X^T||^2 = tr((W - Q) H (W - Q)^T) n / 2`` with ``H = 2 X^T X / n`` (I, I). GPTQ quantizes one
column j at a time and spreads its rounding error over the columns not yet quantized, in proportion to
``H^-1`` (the optimal brain surgeon update); with ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``),
column j's error ``e = (w_j - q_j) / U_jj`` updates the later columns by ``-e U_j,(j+1..)``. Done naively that is
a rank-1 update of the whole matrix per column; the lazy batch form applies it inside a block of
``block_size`` columns and once per block to the rest (the same numbers, less memory traffic).

What the code does, per linear (``gptq_quantize``):

- dead inputs (``H_jj == 0``: the feature is 0 on every calibration row) get ``H_jj = 1``; their column gets
  no update from the others and none to give (its row and column of ``H`` are 0), so it is plain RTN of the
  original weights. (The reference implementations set that column of ``W`` to 0 instead; equal on the
  calibration data, but a 0 column is wrong wherever the feature is not 0, so lmforge keeps the weights.)
- dampening: ``H += damp * mean(diag H) * I`` (``damp`` = 0.01 by default); if the Cholesky factorisation
  still fails (H not positive definite in float64), ``damp`` is multiplied by 10, up to 3 times, and the
  report records the dampening used.
- ``act_order``: columns are processed by decreasing ``H_jj`` (the most active inputs first, while the most
  later columns can absorb their error).
- groups (``granularity="group"``): a group's scales (and zero points) are chosen when the group's first
  column comes up, by RTN's rule from the group's *current* weights (the original ones plus every update from
  the columns already quantized). With ``act_order`` a group is ``group_size`` consecutive columns in the
  processing order, so the codes are stored in that order with ``in_perm`` (the permutation) and every group
  stays contiguous. ``static_groups``: every group's scales are chosen from the original weights before any
  update, over the original column ranges; with ``act_order`` the columns are still processed in the
  activation order, each with its own original group's scales, and the codes are stored in the original order
  (no ``in_perm``).
- channel / tensor granularity: the scales come from the original weights (the whole row / matrix), once.

Differences from the reference (AutoGPTQ / the GPTQ paper's code), deliberate:

- dead columns keep their weights (see above) instead of being zeroed;
- when a group starts inside a lazy block, the reference chooses its scales from ``W`` without the updates of
  the block's earlier columns (they are still pending in the block's copy); lmforge aligns blocks to groups
  (the block is a multiple of ``group_size``) and reads the updated copy, so the result does not depend on
  ``block_size`` (up to float rounding) and a group's scales always see the weights they quantize;
- scales and rounding are RTN's (``quant.formats``: symmetric ``s = absmax / (2**(b-1) - 0.5)``), so GPTQ with
  ``H = I`` and no dampening is RTN exactly;
- ``H`` is accumulated and inverted in float64 (the reference: float32).

``apply(model, cfg, calib)`` walks the model as the reference does with ``true_sequential``: block by block,
the inputs of block i being the outputs of the already quantized blocks < i; inside a block, each linear
(in the order the forward reaches them: qkv, attn proj, fc, mlp proj) gets its Hessian from the block with the
linears before it already quantized. The fused qkv and fc (gate, up) weights are one matrix each (their rows
share the same inputs). The head (``lm_head``) is quantized last, on the final-normed hidden states, when
``cfg.skip`` does not leave it out. A MoE block's router is an ``nn.Linear`` and is quantized like the
others unless skipped (``"*.router"``; a quantized router can flip a near-tie top-k choice, which moves
that token's output a lot: the reference leaves Mixtral's gate unquantized); batched expert weights are not
``nn.Linear`` modules and stay fp32. Other linears outside the blocks (none in today's models) are left
alone and listed in the report's ``"unquantized"``.
"""
from __future__ import annotations

import fnmatch
import time

import torch
import torch.nn as nn

NEEDS_CALIBRATION = True


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` in float64 for inputs ``x`` (..., I)."""
    x = x.reshape(-1, x.shape[-1]).double()
    return 2.0 * (x.T @ x) / max(1, x.shape[0])


class _HessianSum:
    """Running ``sum X^T X`` (float64) and the row count, for a forward pre-hook."""

    def __init__(self, n_in: int, device):
        self.s = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        # one batch's X^T X in float32 (a few thousand rows: exact enough, and 3x cheaper than float64
        # on CPU), summed over batches in float64
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.s += (x.T @ x).double()
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        return 2.0 * self.s / max(1, self.n)


def _inverse_factor(H: torch.Tensor, damp: float):
    """(U upper Cholesky factor of (H + d I)^-1 in float64, the damp fraction used). H float64 (I, I)."""
    mean = float(H.diagonal().mean())
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for k in range(4):
        d = damp * 10 ** k
        L, info = torch.linalg.cholesky_ex(H + (d * mean) * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U, d
    raise ValueError(f"gptq: the Hessian is not positive definite even with damp={damp * 1000:g} "
                     f"(mean diagonal {mean:.3g}); check the calibration activations for inf/NaN")


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int, granularity: str = "group", group_size: int = 128,
                  sym: bool = True, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  static_groups: bool = False, name: str = "weight") -> dict:
    """GPTQ codes for a weight ``w`` (O, I) given the Hessian ``H`` (I, I) of its inputs.

    Returns ``{"codes": int32 (O, I) in stored column order (q units sym, u units asym), "scales": (O, G) or
    (1, 1), "zeros": like scales or None, "in_perm": int64 (I,) or None, "damp": the damp fraction used,
    "dead": number of dead input columns}``; ``IntLinear.from_codes`` takes them as they are. ``damp`` may be 0
    (then H itself must be positive definite)."""
    from . import formats as fm

    if w.dim() != 2:
        raise ValueError(f"gptq: {name}: expected a 2-d weight (out, in), got shape {tuple(w.shape)}")
    O, I = w.shape
    if tuple(H.shape) != (I, I):
        raise ValueError(f"gptq: {name}: Hessian shape {tuple(H.shape)} does not fit a ({O}, {I}) weight")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size: got {block_size!r}, expected an integer >= 1")
    qmin, qmax = fm.code_range(bits, sym)
    G = fm.n_groups(I, granularity, group_size, name, O)
    g = I // G if granularity == "group" else I  # columns per scale group
    wdt = torch.float64 if w.dtype == torch.float64 else torch.float32  # float64 in: float64 updates (tests)
    W0 = w.detach().to(wdt).clone()
    H = H.detach().to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0

    def params(cols: torch.Tensor):  # RTN's scales/zeros of a block of columns (O, k): (O, 1) each (or (1, 1))
        _, s, z = fm.rtn_quantize(cols, bits, "tensor" if granularity == "tensor" else "channel", cols.shape[1],
                                  sym, name=name)
        return s.reshape(-1, 1), (None if z is None else z.reshape(-1, 1))

    def quant(col: torch.Tensor, s: torch.Tensor, z):  # (O,) -> codes (O,), dequantized (O,): RTN's rounding
        s = s.reshape(-1)
        if z is None:
            q = torch.clamp(torch.round(col * (1.0 / s)), qmin, qmax)
            return q, q * s
        z = z.reshape(-1)
        q = torch.clamp(torch.round(col * (1.0 / s)) + z, qmin, qmax)
        return q, (q - z) * s

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else None
    # scales known before any update: channel / tensor (the whole row / matrix), static groups (original ranges)
    fixed = [params(W0)] if granularity != "group" else (
        [params(W0[:, k * g:(k + 1) * g]) for k in range(G)] if static_groups else None)
    W = W0 if perm is None else W0[:, perm].contiguous()
    if perm is not None:
        H = H[perm][:, perm]
    U, used = _inverse_factor(H, damp)
    U = U.to(wdt)

    dynamic = granularity == "group" and not static_groups
    B = g * max(1, block_size // g) if dynamic else block_size  # blocks aligned to groups (see the docstring)
    Q = torch.zeros(O, I, dtype=torch.int32)
    S, Z = [], []  # dynamic groups' scales/zeros in processing order
    cur = None
    for i1 in range(0, I, B):
        i2 = min(i1 + B, I)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros(O, i2 - i1, dtype=wdt)
        for i in range(i2 - i1):
            p = i1 + i  # processing position
            if dynamic:
                if p % g == 0:
                    cur = params(W1[:, i:i + g])
                    S.append(cur[0])
                    Z.append(cur[1])
            elif granularity == "group":
                cur = fixed[(int(perm[p]) if perm is not None else p) // g]
            else:
                cur = fixed[0]
            col = W1[:, i]
            q, deq = quant(col, *cur)
            Q[:, p] = q.to(torch.int32)
            e = (col - deq) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    in_perm = None
    if dynamic:
        scales = torch.cat(S, dim=1)
        zeros = None if sym else torch.cat(Z, dim=1)
        in_perm = perm  # stored column j is original column perm[j]; groups contiguous in stored order
    else:
        if perm is not None:  # back to the original column order (scales are per original group already)
            Qo = torch.empty_like(Q)
            Qo[:, perm] = Q
            Q = Qo
        if granularity == "group":
            scales = torch.cat([s for s, _ in fixed], dim=1)
            zeros = None if sym else torch.cat([z for _, z in fixed], dim=1)
        else:
            scales = fixed[0][0] if granularity == "channel" else fixed[0][0].reshape(1, 1)
            zeros = None if sym else (fixed[0][1] if granularity == "channel" else fixed[0][1].reshape(1, 1))
    return {"codes": Q, "scales": scales.contiguous(), "zeros": None if zeros is None else zeros.contiguous(),
            "in_perm": in_perm, "damp": used, "dead": int(dead.sum())}


def output_error(w: torch.Tensor, w_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Ŵ) H (W - Ŵ)^T) / tr(W H W^T)``: the relative output error ``||W X - Ŵ X||² / ||W X||²`` on the
    inputs H was made from (both weights (O, I) in the original column order)."""
    E = (w.double() - w_hat.double())
    W = w.double()
    H = H.double()
    den = float(((W @ H) * W).sum())
    return float(((E @ H) * E).sum()) / den if den > 0 else 0.0


def _linear_from(res: dict, cfg, bias) -> "nn.Module":
    from .linear import IntLinear

    return IntLinear.from_codes(res["codes"], res["scales"], res["zeros"], cfg.bits, cfg.granularity,
                                cfg.group_size, cfg.sym, bias=bias, in_perm=res["in_perm"])


def _skipped(name: str, skip) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in skip)


def apply(model: nn.Module, cfg, calib: torch.Tensor | None, progress: bool = True) -> dict:
    """Quantize every ``nn.Linear`` of ``model`` not matched by ``cfg.skip`` with GPTQ, in place, from the
    calibration tokens ``calib`` (S, T). Returns ``{"method": "gptq", "layers": {name: {"err", "rtn_err",
    "weight_err", "bytes", "damp", "dead", "shape", "seconds"}}, "calib": {...}, "unquantized": [...],
    "seconds", "err": <what err means>}`` where ``err`` / ``rtn_err`` are the relative output errors
    (``output_error``) of GPTQ's and RTN's weights on the calibration inputs that linear saw, and
    ``weight_err`` is ``||W - Q|| / ||W||`` (what RTN's report calls ``err``; GPTQ trades a larger weight
    error for a smaller output error)."""
    from . import formats as fm
    from .calib import _Stop, block_inputs, run_block
    from .._progress import bar
    from ..model.surgery import replace_linear

    if calib is None:
        raise ValueError("gptq: needs calibration tokens (pass calib, or data_dir to quantize)")
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gptq: calib: expected an integer (samples, seq_len) tensor, got "
                         f"{getattr(calib, 'dtype', type(calib).__name__)} {tuple(getattr(calib, 'shape', ()))}")
    skip = list(cfg.skip or [])
    per_block = []
    for i, blk in enumerate(model.blocks):
        per_block.append([(f"blocks.{i}.{n}", m) for n, m in blk.named_modules()
                          if isinstance(m, nn.Linear) and not _skipped(f"blocks.{i}.{n}", skip)])
    in_blocks = {n for lst in per_block for n, _ in lst}
    others = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith("blocks.")]
    head = [(n, m) for n, m in others if n == "lm_head" and not _skipped(n, skip)]
    unquantized = [n for n, m in others if not _skipped(n, skip) and n != "lm_head"]
    # every setting and shape checked before anything changes
    fm.code_range(cfg.bits, cfg.sym)
    if isinstance(cfg.block_size, bool) or not isinstance(cfg.block_size, int) or cfg.block_size < 1:
        raise ValueError(f"gptq: block_size: got {cfg.block_size!r}, expected an integer >= 1")
    for n, m in [x for lst in per_block for x in lst] + head:
        fm.n_groups(m.in_features, cfg.granularity, cfg.group_size, n, m.out_features)
    t_all = time.perf_counter()
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    layers: dict[str, dict] = {}
    n_lin = len(in_blocks) + len(head)
    pb = bar(total=n_lin, desc="gptq", unit="linear", disable=not progress)

    def quantize_one(name: str, mod: nn.Linear, H: torch.Tensor) -> None:
        t0 = time.perf_counter()
        w = mod.weight.detach().float().cpu()
        res = gptq_quantize(w, H.cpu(), cfg.bits, cfg.granularity, cfg.group_size, cfg.sym, cfg.damp,
                            cfg.block_size, cfg.act_order, cfg.static_groups, name=name)
        new = _linear_from(res, cfg, mod.bias).to(dev)
        rc, rs, rz = fm.rtn_quantize(w, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym, name=name)
        Hc = H.cpu()
        wq = new.dequantize().cpu()
        layers[name] = {"shape": [mod.out_features, mod.in_features],
                        "err": output_error(w, wq, Hc),
                        "rtn_err": output_error(w, fm.dequantize_codes(rc, rs, rz), Hc),
                        "weight_err": float((w - wq).norm() / w.norm().clamp_min(1e-30)),
                        "bytes": int(new.weight_bytes()),
                        "damp": res["damp"], "dead": res["dead"], "act_order": bool(cfg.act_order),
                        "seconds": round(time.perf_counter() - t0, 3)}
        replace_linear(model, lambda _n, _m: new, where=[name])
        pb.update(1)
        pb.set_postfix_str(f"{name} err {layers[name]['err']:.2e} (rtn {layers[name]['rtn_err']:.2e})")

    try:
        with torch.no_grad():
            hs = block_inputs(model, calib)
            for i, lst in enumerate(per_block):
                done: set[str] = set()
                while len(done) < len(lst):
                    # the next linear the forward reaches (its inputs depend on the ones quantized so far)
                    mods = dict(model.named_modules())
                    todo = [n for n, _ in lst if n not in done]
                    sums = {n: _HessianSum(mods[n].in_features, dev) for n in todo}
                    order: list[str] = []

                    def hook_for(n):
                        def hook(_m, args):
                            if n not in order:
                                order.append(n)
                            if order[0] == n:
                                sums[n].add(args[0])
                                raise _Stop
                        return hook

                    handles = [mods[n].register_forward_pre_hook(hook_for(n)) for n in todo]
                    try:
                        for h in hs:
                            try:
                                run_block(model, i, h)
                            except _Stop:
                                pass
                    finally:
                        for hd in handles:
                            hd.remove()
                    if not order:  # linears the forward never reaches (e.g. unused experts): RTN-equivalent
                        for n in todo:
                            quantize_one(n, mods[n], torch.zeros(mods[n].in_features, mods[n].in_features))
                            done.add(n)
                        break
                    quantize_one(order[0], mods[order[0]], sums[order[0]].value())
                    done.add(order[0])
                hs = [run_block(model, i, h) for h in hs]
            if head:
                n, m = head[0]
                hsum = _HessianSum(m.in_features, dev)
                for h in hs:
                    hsum.add(model.norm_f(h))
                quantize_one(n, model.get_submodule(n), hsum.value())
    finally:
        pb.close()
        model.train(was)
    return {"method": "gptq", "layers": layers,
            "calib": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
            "unquantized": unquantized, "seconds": round(time.perf_counter() - t_all, 3),
            "err": "relative output error ||WX - QX||^2 / ||WX||^2 on the calibration inputs"}
