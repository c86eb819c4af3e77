"""Preference losses: DPO and its family, KTO, ORPO, CPO and SimPO, as functions of log-probabilities.

Knows the formulas, their configuration and TRL 1.16's semantics for them (what each loss reads,
what it logs, under which names). Knows nothing about models, tokens, files or the training loop: the
caller (``align.pref_data.completion_logps``, the ``align.dpo`` stage) runs the forward passes and
hands in per-sequence log-probabilities; this module returns a per-pair loss whose mean is the
micro-batch's loss, and detached metrics.

Inputs. A micro-batch of B pairs is 2B sequences (chosen first, then rejected). ``PairLogps`` holds,
per pair, the SUM of the completion tokens' log-probs under the policy (with grad) and the reference
(no grad, absent for reference-free methods), and the completion lengths. Averages are derived here:

* DPO family: sums, except ``ipo`` and ``sigmoid_norm`` (the f-divergence scores divided by the
  completion length) and ``sft`` (the token mean of the chosen log-probs over the micro-batch).
* ORPO: length averages (its odds are of the per-token mean probability), plus an NLL on chosen.
  TRL's ORPO NLL covers the prompt AND the completion of the chosen rows (every attended token after
  the first); pass those sums/counts as ``PairLogps.nll_logps``/``nll_tokens`` to match it exactly,
  else the completion tokens are used.
* CPO: sums for ``sigmoid``/``hinge``, length averages for ``ipo``/``simpo``; NLL on the chosen
  completion tokens weighted by ``cpo_alpha``. ``alphapo`` is CPO's sugar for ``simpo`` with
  ``cpo_alpha = 0`` (set ``alpha != 0`` for its reward shape). Method ``simpo`` = CPO ``simpo`` with
  ``cpo_alpha = 0``.
* KTO: sums per example; the KL estimate comes from mismatched (prompt_i, completion_{i-1}) pairs,
  ``kl = mean(kl_logps - ref_kl_logps)`` detached and clamped at 0 (no KL: 0).

Batch-level terms (DPO ``sft``, ORPO/CPO NLL) are spread evenly over the B pairs, so ``mean()`` of the
per-pair loss is exactly TRL's micro-batch loss; sums over several micro-batches are the caller's.

TRL version notes (read in 1.16.0): DPO's ``sigmoid`` no longer takes label smoothing (0.x's
``dpo_loss`` made it cDPO, ``-(1-e) logsig(b d) - e logsig(-b d)``); label smoothing now acts in
``robust``, ``exo_pair`` (required > 0), ``aot``/``aot_unpaired`` and CPO's ``sigmoid``/``simpo``;
a setting it cannot reach is refused here rather than ignored (DPOConfig's docstring names only
robust and EXO for it; the code, followed here, also reads it in ``aot``/``aot_unpaired``). ``ipo`` and
``sigmoid_norm`` divide the scores by the completion length (0.x averaged the log-probs for ipo in the
forward instead, the same thing for reverse KL). 0.x's ``rpo_alpha`` (an NLL on chosen) is gone: use
``loss_type=["sigmoid", "sft"]`` with ``loss_weights``. ``loss_type`` is a list with weights (MPO).
ORPO and CPO moved to ``trl.experimental``; their NLL is a token mean (cross-entropy). In TRL's
alpha-divergence the clamp table has no float64 entry (it raises there); float64 is clamped as
float32 here. WPO weighting multiplies every loss term, ``sft`` included (TRL's in-place product
fails on ``sft``'s expanded tensor; here it is a plain product).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
KTO_LOSSES = ("kto", "apo_zero_unpaired")
CPO_LOSSES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")
METHODS = ("dpo", "kto", "orpo", "cpo", "simpo")
REFERENCE_FREE = ("orpo", "cpo", "simpo")

# which DPO losses accept a non-reverse-KL f-divergence (its log Z term cancels only in a difference)
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
# which losses read label_smoothing
_SMOOTHED_DPO = ("robust", "exo_pair", "aot", "aot_unpaired")
_SMOOTHED_CPO = ("sigmoid", "simpo", "alphapo")
_LN2 = math.log(2.0)


@dataclass
class PrefLossConfig:
    method: str = "dpo"
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    ld_alpha: float | None = None
    use_weighting: bool = False


# --------------------------------------------------------------------------------------------------
# config checks


def _bad(field_name, value, expected):
    return ValueError(f"PrefLossConfig.{field_name}: {value!r}: expected {expected}")


def _nearest(name, choices):
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _real(cfg, name, *, lo=None, hi=None, lo_open=False, hi_open=False, what=None):
    v = getattr(cfg, name)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        if what is None:
            lo_s = "" if lo is None else ("> " if lo_open else ">= ") + str(lo)
            hi_s = "" if hi is None else ("< " if hi_open else "<= ") + str(hi)
            what = "a finite number" + (" " + " and ".join(s for s in (lo_s, hi_s) if s) if lo_s or hi_s else "")
        raise _bad(name, v, what)


def _loss_types(cfg) -> list[str]:
    lt = cfg.loss_type
    if isinstance(lt, str) or not isinstance(lt, (list, tuple)) or not lt or \
            not all(isinstance(t, str) for t in lt):
        raise _bad("loss_type", lt, f"a non-empty list of names, e.g. [{lt!r}]" if isinstance(lt, str)
                   else "a non-empty list of names")
    return list(lt)


def check_loss_config(cfg: PrefLossConfig) -> None:
    """Refuse every bad or ineffective value with a ValueError naming the field, the value and what is
    expected. A setting the chosen method or loss would silently ignore is refused too."""
    if cfg.method not in METHODS:
        raise _bad("method", cfg.method, f"one of {list(METHODS)}{_nearest(cfg.method, METHODS)}")
    m = cfg.method
    lts = _loss_types(cfg)
    if m == "dpo":
        for t in lts:
            if t not in DPO_LOSSES:
                raise _bad("loss_type", lts, f"names from {list(DPO_LOSSES)}; {t!r} is not one"
                           f"{_nearest(t, DPO_LOSSES)}")
    elif m == "kto":
        if len(lts) != 1 or lts[0] not in KTO_LOSSES:
            bad = next((t for t in lts if t not in KTO_LOSSES), lts[0])
            raise _bad("loss_type", lts, f"exactly one of {list(KTO_LOSSES)} for method 'kto'"
                       f"{_nearest(bad, KTO_LOSSES)}")
    elif m == "cpo":
        if len(lts) != 1 or lts[0] not in CPO_LOSSES:
            bad = next((t for t in lts if t not in CPO_LOSSES), lts[0])
            raise _bad("loss_type", lts, f"exactly one of {list(CPO_LOSSES)} for method 'cpo'"
                       f"{_nearest(bad, CPO_LOSSES)}")
    elif m == "simpo":
        if lts not in (["sigmoid"], ["simpo"]):
            raise _bad("loss_type", lts, "['simpo'] (or the default) for method 'simpo' (CPO's simpo loss with "
                       "cpo_alpha 0; other CPO losses: method 'cpo')")
    elif m == "orpo":
        if lts != ["sigmoid"]:
            raise _bad("loss_type", lts, "the default ['sigmoid'] for method 'orpo' (ORPO has one loss: the "
                       "odds-ratio term plus the chosen NLL)")

    if cfg.loss_weights is not None:
        w = cfg.loss_weights
        if m != "dpo":
            raise _bad("loss_weights", w, f"None for method {m!r} (weights combine several DPO loss types)")
        if not isinstance(w, (list, tuple)) or len(w) != len(lts):
            raise _bad("loss_weights", w, f"a list of {len(lts)} weights, one per loss_type {lts}")
        for x in w:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                raise _bad("loss_weights", w, f"finite weights >= 0; {x!r} is not")

    _real(cfg, "beta", lo=0, lo_open=True, what="a finite number > 0 (the KL strength; ORPO's lambda)")
    _real(cfg, "label_smoothing", lo=0, hi=0.5, hi_open=True, what="a number in [0, 0.5)")
    ls = cfg.label_smoothing
    if m == "dpo":
        if "exo_pair" in lts and ls == 0:
            raise _bad("label_smoothing", ls, "> 0 with loss_type 'exo_pair' (its log(eps) term; the EXO paper "
                       "uses 1e-3)")
        if ls > 0 and not set(lts) & set(_SMOOTHED_DPO):
            raise _bad("label_smoothing", ls, f"0 with loss_type {lts}: in TRL 1.16 only {list(_SMOOTHED_DPO)} read "
                       "it (the label-smoothed 'sigmoid' of TRL 0.x is gone; 'robust' is the unbiased form)")
    elif m in ("cpo", "simpo"):
        eff = "simpo" if m == "simpo" else lts[0]
        if ls > 0 and eff not in _SMOOTHED_CPO:
            raise _bad("label_smoothing", ls, f"0 with CPO loss {eff!r} (only {list(_SMOOTHED_CPO)} read it)")
    elif ls > 0:
        raise _bad("label_smoothing", ls, f"0 for method {m!r} (it has no label smoothing)")

    if cfg.f_divergence_type not in F_DIVERGENCES:
        raise _bad("f_divergence_type", cfg.f_divergence_type,
                   f"one of {list(F_DIVERGENCES)}{_nearest(cfg.f_divergence_type, F_DIVERGENCES)}")
    if cfg.f_divergence_type != "reverse_kl":
        if m != "dpo":
            raise _bad("f_divergence_type", cfg.f_divergence_type, f"'reverse_kl' for method {m!r}")
        bad = [t for t in lts if t not in F_DIVERGENCE_LOSSES]
        if bad:
            raise _bad("f_divergence_type", cfg.f_divergence_type,
                       f"'reverse_kl' with loss_type {bad}: only {list(F_DIVERGENCE_LOSSES)} support another "
                       "f-divergence (the log Z term cancels only in the chosen-rejected difference)")
    _real(cfg, "f_alpha_divergence_coef")
    _real(cfg, "discopop_tau", lo=0, lo_open=True)
    _real(cfg, "desirable_weight", lo=0)
    _real(cfg, "undesirable_weight", lo=0)
    if cfg.desirable_weight == 0 and cfg.undesirable_weight == 0:
        raise _bad("undesirable_weight", 0, "> 0 when desirable_weight is 0 (the KTO loss would be 0)")
    _real(cfg, "cpo_alpha", lo=0)
    _real(cfg, "simpo_gamma")
    _real(cfg, "alpha")
    if cfg.ld_alpha is not None:
        _real(cfg, "ld_alpha", lo=0, hi=1, what="None or a number in [0, 1] (1: no down-weighting)")
        if m != "dpo":
            raise _bad("ld_alpha", cfg.ld_alpha, f"None for method {m!r} (LD-DPO weights DPO's summed log-probs)")
    if not isinstance(cfg.use_weighting, bool):
        raise _bad("use_weighting", cfg.use_weighting, "True or False")
    if cfg.use_weighting:
        if m != "dpo":
            raise _bad("use_weighting", True, f"False for method {m!r} (WPO weights DPO pairs)")
        bad = [t for t in lts if t in ("aot", "aot_unpaired")]
        if bad:
            raise _bad("use_weighting", True, f"False with loss_type {bad} (they sort the batch, which would "
                       "misalign the per-pair weights)")


# --------------------------------------------------------------------------------------------------
# helpers for the caller that sums per-token log-probs (align.pref_data)


def _check_2b(name, per_token, mask):
    if per_token.dim() != 2 or mask.shape != per_token.shape or per_token.size(0) % 2:
        raise ValueError(f"{name}: per-token log-probs {tuple(per_token.shape)} and completion mask "
                         f"{tuple(mask.shape)}: expected the same shape (2B, T), B chosen rows then B rejected")


def ld_sum(per_token_logps: Tensor, completion_mask: Tensor, ld_alpha: float | None) -> Tensor:
    """(2B, T) per-token log-probs and completion mask (rows: B chosen then B rejected, aligned with the
    log-probs) -> (2B,) sums. With ``ld_alpha`` (LD-DPO), the completion tokens up to the pair's shorter
    length count fully and those past it count ``ld_alpha`` times. Tokens outside the mask never count."""
    _check_2b("ld_sum", per_token_logps, completion_mask)
    mask = completion_mask.to(per_token_logps.dtype)
    if ld_alpha is None:
        return (per_token_logps * mask).sum(1)
    pos = mask.cumsum(1)                                    # 1, 2, ... at completion tokens
    lens = mask.sum(1)
    c, r = lens.chunk(2)
    shared = torch.minimum(c, r).repeat(2).unsqueeze(1)     # (2B, 1)
    inside = (pos <= shared).to(mask.dtype) * mask
    return (per_token_logps * inside).sum(1) + ld_alpha * (per_token_logps * (mask - inside)).sum(1)


@torch.no_grad()
def wpo_weight(per_token_logps: Tensor, log_sum_sq_probs: Tensor, completion_mask: Tensor) -> Tensor:
    """WPO's per-sequence weight (2B,) from per-token log-probs, log(sum_v p_v^2) at the same positions
    and the completion mask: exp of the mean over the completion of (log p - log sum p^2), no grad."""
    _check_2b("wpo_weight", per_token_logps, completion_mask)
    mask = completion_mask.to(per_token_logps.dtype)
    aligned = ((per_token_logps - log_sum_sq_probs) * mask).sum(1)
    return torch.exp(aligned / mask.sum(1).clamp(min=1))


# --------------------------------------------------------------------------------------------------
# paired methods


@dataclass
class PairLogps:
    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_weight: Tensor | None = None
    rejected_weight: Tensor | None = None
    # additive (not in the contract's first draft): per pair, the log-prob sum and token count of what
    # the NLL term covers (ORPO's, CPO's, DPO 'sft''s token mean over the micro-batch). To match TRL:
    # ORPO: every attended token of the chosen row but its first (prompt AND completion); DPO 'sft'
    # with ld_alpha: the chosen completion's unweighted sum. None: chosen / chosen_tokens.
    nll_logps: Tensor | None = None
    nll_tokens: Tensor | None = None


def _check_pairs(cfg, lp):
    b = lp.chosen.shape
    names = ["chosen", "rejected", "chosen_tokens", "rejected_tokens"]
    need_ref = cfg.method not in REFERENCE_FREE
    if need_ref:
        names += ["ref_chosen", "ref_rejected"]
    if cfg.use_weighting:
        names += ["chosen_weight", "rejected_weight"]
    for n in ("nll_logps", "nll_tokens"):
        if getattr(lp, n) is not None:
            names.append(n)
    if (lp.nll_logps is None) != (lp.nll_tokens is None):
        raise ValueError("PairLogps.nll_logps / nll_tokens: give both or neither")
    if len(b) != 1 or b[0] == 0:
        raise ValueError(f"PairLogps.chosen: shape {tuple(b)}: expected (B,) with B >= 1, one value per pair")
    for n in names:
        v = getattr(lp, n)
        if v is None:
            why = ("needs the reference log-probs" if n.startswith("ref_") else "needs WPO weights (use_weighting)")
            raise ValueError(f"PairLogps.{n}: None, but method {cfg.method!r} {why}")
        if not isinstance(v, Tensor) or v.shape != b:
            raise ValueError(f"PairLogps.{n}: {type(v).__name__} of shape {tuple(getattr(v, 'shape', ()))}: "
                             f"expected a tensor of shape {tuple(b)} like PairLogps.chosen")


def _f_scores(cfg, logratio: Tensor) -> Tensor:
    """The f-divergence's f'(pi/ref) as a function of log(pi/ref)."""
    f = cfg.f_divergence_type
    if f == "reverse_kl":
        return logratio
    if f == "forward_kl":                       # f'(t) = 1 - 1/t
        return -torch.expm1(-logratio)
    if f == "js_divergence":                    # f'(t) = log(2t / (1 + t))
        return _LN2 + F.logsigmoid(logratio)
    a = cfg.f_alpha_divergence_coef             # f'(t) = (t^(a-1) - 1) / (a - 1)
    if abs(a - 1.0) < 1e-6:
        return logratio
    x = (a - 1.0) * logratio
    cap = 11.0 if x.dtype == torch.float16 else 80.0
    wide = x.to(torch.promote_types(x.dtype, torch.float32)).clamp(max=cap)
    return (torch.exp(wide) - 1.0).to(x.dtype) / (a - 1.0)


def _rewards_metrics(c_rew, r_rew, c_logps, r_logps):
    c_rew, r_rew = c_rew.detach(), r_rew.detach()
    return {"rewards/chosen": c_rew, "rewards/rejected": r_rew, "rewards/margins": c_rew - r_rew,
            "rewards/accuracies": (c_rew > r_rew).to(c_rew.dtype),
            "logps/chosen": c_logps.detach(), "logps/rejected": r_logps.detach()}


def _nll(lp) -> Tensor:
    if lp.nll_logps is not None:
        s, n = lp.nll_logps, lp.nll_tokens
    else:
        s, n = lp.chosen, lp.chosen_tokens
    return -s.sum() / n.sum().clamp(min=1)


def _dpo(cfg, lp):
    beta, eps = cfg.beta, cfg.label_smoothing
    c_lr = lp.chosen - lp.ref_chosen
    r_lr = lp.rejected - lp.ref_rejected
    c_sc, r_sc = _f_scores(cfg, c_lr), _f_scores(cfg, r_lr)
    d = c_sc - r_sc
    c_len, r_len = lp.chosen_tokens.clamp(min=1), lp.rejected_tokens.clamp(min=1)
    weights = cfg.loss_weights or [1.0] * len(cfg.loss_type)
    total = torch.zeros_like(d)
    for name, w in zip(cfg.loss_type, weights):
        if name == "sigmoid":
            loss = -F.logsigmoid(beta * d)
        elif name == "hinge":
            loss = F.relu(1.0 - beta * d)
        elif name == "ipo":                           # length-normalized scores, squared distance to 1/(2 beta)
            loss = (c_sc / c_len - r_sc / r_len - 0.5 / beta) ** 2
        elif name == "sigmoid_norm":
            loss = -F.logsigmoid(beta * (c_sc / c_len - r_sc / r_len))
        elif name == "exo_pair":                      # KL(softmax(beta d) || [1 - eps, eps])
            z = beta * d
            loss = (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
                    + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))
        elif name == "nca_pair":
            zc, zr = beta * c_lr, beta * r_lr
            loss = -F.logsigmoid(zc) - 0.5 * (F.logsigmoid(-zc) + F.logsigmoid(-zr))
        elif name == "robust":                        # unbiased under a label flip rate eps
            z = beta * d
            loss = ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif name == "bco_pair":
            loss = -F.logsigmoid(beta * c_lr) - F.logsigmoid(-beta * r_lr)
        elif name == "sppo_hard":
            loss = (c_lr - 0.5 / beta) ** 2 + (r_lr + 0.5 / beta) ** 2
        elif name in ("aot", "aot_unpaired"):         # sorted (optimal transport) pairing over the batch
            if name == "aot":
                z = beta * ((lp.chosen - lp.rejected).sort().values - (lp.ref_chosen - lp.ref_rejected).sort().values)
            else:
                z = beta * (c_lr.sort().values - r_lr.sort().values)
            loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        elif name == "apo_zero":
            loss = (1 - torch.sigmoid(beta * c_lr)) + torch.sigmoid(beta * r_lr)
        elif name == "apo_down":
            loss = torch.sigmoid(beta * c_lr) + (1 - torch.sigmoid(beta * (c_lr - r_lr)))
        elif name == "discopop":                      # logistic/exponential blend gated by sigmoid(z / tau)
            z = beta * d
            gate = torch.sigmoid(z / cfg.discopop_tau)
            loss = -F.logsigmoid(z) * (1 - gate) + torch.exp(-z) * gate
        elif name == "sft":
            loss = _nll(lp).expand_as(d)
        else:  # check_loss_config refuses it first
            raise ValueError(f"PrefLossConfig.loss_type: {name!r}: expected one of {list(DPO_LOSSES)}")
        if cfg.use_weighting:
            loss = loss * (lp.chosen_weight * lp.rejected_weight)
        total = total + w * loss
    return total, _rewards_metrics(beta * c_lr, beta * r_lr, lp.chosen, lp.rejected)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    near = x > -_LN2
    return torch.where(near, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _wide(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _orpo(cfg, lp):
    beta = cfg.beta
    c = _wide(lp.chosen / lp.chosen_tokens.clamp(min=1))       # mean per-token log-prob
    r = _wide(lp.rejected / lp.rejected_tokens.clamp(min=1))
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))        # log odds(chosen) - log odds(rejected)
    ratio = F.logsigmoid(log_odds)
    nll = _nll(lp).expand_as(ratio)
    metrics = _rewards_metrics(beta * c, beta * r, c, r)
    metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()})
    return nll - beta * ratio, metrics


def _cpo(cfg, lp):
    beta, eps = cfg.beta, cfg.label_smoothing
    kind, cpo_alpha = cfg.loss_type[0], cfg.cpo_alpha
    if cfg.method == "simpo" or kind == "alphapo":
        kind, cpo_alpha = "simpo", 0.0
    if kind in ("ipo", "simpo"):
        c, r = lp.chosen / lp.chosen_tokens.clamp(min=1), lp.rejected / lp.rejected_tokens.clamp(min=1)
    else:
        c, r = lp.chosen, lp.rejected
    if cfg.alpha != 0.0:                                        # AlphaPO reward shape (1 - p^-alpha) / alpha
        c_rew, r_rew = -torch.expm1(-cfg.alpha * c) / cfg.alpha, -torch.expm1(-cfg.alpha * r) / cfg.alpha
    else:
        c_rew, r_rew = c, r
    z = c_rew - r_rew
    if kind == "simpo":
        z = z - cfg.simpo_gamma / beta
    if kind in ("simpo", "sigmoid"):
        loss = -(1 - eps) * F.logsigmoid(beta * z) - eps * F.logsigmoid(-beta * z)
    elif kind == "hinge":
        loss = F.relu(1 - beta * z)
    else:  # ipo
        loss = (z - 0.5 / beta) ** 2
    nll = _nll(lp).expand_as(loss) if cpo_alpha != 0 else torch.zeros_like(loss)
    metrics = _rewards_metrics(beta * c_rew, beta * r_rew, c, r)
    metrics["nll_loss"] = nll.detach()
    return loss + cpo_alpha * nll, metrics


def preference_loss(cfg: PrefLossConfig, lp: PairLogps) -> tuple[Tensor, dict[str, Tensor]]:
    """(per_pair (B,), metrics) for methods dpo/orpo/cpo/simpo; ``per_pair.mean()`` is TRL's micro-batch
    loss. Metrics are detached (B,) tensors under TRL's names; their means are TRL's logged values."""
    check_loss_config(cfg)
    if cfg.method == "kto":
        raise ValueError("PrefLossConfig.method: 'kto': expected a paired method here (dpo, orpo, cpo, simpo); "
                         "KTO takes unpaired examples: use kto_loss(cfg, KTOLogps(...))")
    _check_pairs(cfg, lp)
    if cfg.method == "dpo":
        return _dpo(cfg, lp)
    if cfg.method == "orpo":
        return _orpo(cfg, lp)
    return _cpo(cfg, lp)


# --------------------------------------------------------------------------------------------------
# KTO


@dataclass
class KTOLogps:
    logps: Tensor
    label: Tensor
    kl_logps: Tensor | None
    ref_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None


def kto_loss(cfg: PrefLossConfig, lp: KTOLogps) -> tuple[Tensor, dict[str, Tensor]]:
    """(per_example (B,), metrics) with ``per_example.mean()`` = TRL KTOTrainer's loss for the batch.
    Metrics are 0-d: "kl", and for the labels present "rewards/chosen", "logps/chosen",
    "rewards/rejected", "logps/rejected", and "rewards/margins" when both are present."""
    check_loss_config(cfg)
    if cfg.method != "kto":
        raise ValueError(f"PrefLossConfig.method: {cfg.method!r}: expected 'kto' for kto_loss "
                         "(paired methods: preference_loss)")
    b = lp.logps.shape
    if len(b) != 1 or b[0] == 0:
        raise ValueError(f"KTOLogps.logps: shape {tuple(b)}: expected (B,) with B >= 1")
    if lp.ref_logps is None:
        raise ValueError("KTOLogps.ref_logps: None, but KTO needs the reference log-probs")
    for n in ("label", "ref_logps") + (("kl_logps", "ref_kl_logps") if lp.kl_logps is not None else ()):
        v = getattr(lp, n)
        if v is None:
            raise ValueError(f"KTOLogps.{n}: None, but kl_logps is given (the KL estimate needs both)")
        if not isinstance(v, Tensor) or v.shape != b:
            raise ValueError(f"KTOLogps.{n}: shape {tuple(getattr(v, 'shape', ()))}: expected {tuple(b)}")
    beta = cfg.beta
    use_kl = cfg.loss_type[0] == "kto" and lp.kl_logps is not None
    if use_kl and b[0] < 2:
        raise ValueError("KTOLogps: a batch of 1 example with a KL estimate: expected B >= 2 (with one example "
                         "the mismatched completion is its own, and the KL term equals the implied reward)")
    if use_kl:
        kl = (lp.kl_logps - lp.ref_kl_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=lp.logps.dtype, device=lp.logps.device)
    label = lp.label.to(torch.bool)
    lr = lp.logps - lp.ref_logps
    if cfg.loss_type[0] == "kto":
        good = 1 - torch.sigmoid(beta * (lr - kl))
        bad = 1 - torch.sigmoid(beta * (kl - lr))
    else:  # apo_zero_unpaired
        good = 1 - torch.sigmoid(beta * lr)
        bad = torch.sigmoid(beta * lr)
    per_example = torch.where(label, cfg.desirable_weight * good, cfg.undesirable_weight * bad)
    metrics = {"kl": kl}
    rew = (beta * lr).detach()
    n_good, n_bad = int(label.sum()), int((~label).sum())
    if n_good:
        metrics["rewards/chosen"] = rew[label].sum() / n_good
        metrics["logps/chosen"] = lp.logps.detach()[label].sum() / n_good
    if n_bad:
        metrics["rewards/rejected"] = rew[~label].sum() / n_bad
        metrics["logps/rejected"] = lp.logps.detach()[~label].sum() / n_bad
    if n_good and n_bad:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return per_example, metrics
