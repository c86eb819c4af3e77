"""Preference losses (lmforge.align.pref_loss) against TRL 1.16's own loss code, on random batches.

TRL's code runs itself, never a re-typed formula: ``DPOTrainer._compute_loss`` and ``compute_ref_log_probs``
and ``KTOTrainer._compute_loss`` are called unbound on a stand-in ``self`` (its config attributes, an
accelerator whose gather is the identity, metric dicts) and a stand-in model whose fused-head output carries
per-token log-probs built so that each sequence sums to the batch's log-prob (zeros off the completion, as
TRL's fused head returns); ORPO's and CPO's ``get_batch_loss_metrics`` run with their real
``concatenated_inputs`` / ``concatenated_forward`` / ``odds_ratio_loss`` / ``cpo_loss`` on a stand-in model
returning random logits, and lmforge's side gets the sums and counts taken from the same logits. Compared:
the loss, its gradient w.r.t. the inputs (the four log-prob tensors; the logits for ORPO/CPO) and the
metrics TRL logs, to 1e-6.
"""
from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch

from lmforge.align.pref_loss import (
    CPO_LOSSES, DPO_LOSSES, F_DIVERGENCE_LOSSES, F_DIVERGENCES, KTOLogps, PairLogps, PrefLossConfig,
    check_loss_config, kto_loss, ld_sum, preference_loss, wpo_weight,
)

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_kto = pytest.importorskip("trl.trainer.kto_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")

B = 6
TOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def autocast():
        import contextlib
        return contextlib.nullcontext()


def _g(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def _close(a, b, what):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert torch.allclose(a, b, rtol=TOL, atol=TOL), f"{what}: lmforge {a.tolist()} vs TRL {b.tolist()}"


def _batch(seed, dtype=torch.float64, *, scale=1.0):
    """Random sums for B pairs: lengths 2..9, mean per-token log-prob in (-2, -0.3), reference nearby."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 10, (2 * B,), generator=g).to(dtype)
    per_tok = -(0.3 + 1.7 * torch.rand(2 * B, generator=g, dtype=dtype))
    pol = lens * per_tok
    ref = pol + scale * torch.randn(2 * B, generator=g, dtype=dtype)
    return pol, ref, lens


def _layout(lens, seed):
    """completion_mask (2B, T) (position 0 is the prompt) and positive per-token fractions of each sum."""
    g = torch.Generator().manual_seed(seed + 1)
    t = int(lens.max()) + 2
    pos = torch.arange(t)
    mask = ((pos >= 1) & (pos <= lens.long().unsqueeze(1))).long()
    shift = mask[:, 1:].to(lens.dtype)
    frac = (0.5 + torch.rand(shift.shape, generator=g, dtype=lens.dtype)) * shift
    return mask, frac / frac.sum(1, keepdim=True)


def _train_model():
    m = torch.nn.Module()              # stands for the policy in `self.model` (mode, checkpointing, PEFT checks)
    m.is_gradient_checkpointing = False
    return m


def _dpo_self(cfg: PrefLossConfig):
    return types.SimpleNamespace(
        model=_train_model(), ref_model=None,
        accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True, beta=cfg.beta,
        loss_types=list(cfg.loss_type), loss_weights=cfg.loss_weights or [1.0] * len(cfg.loss_type),
        ld_alpha=cfg.ld_alpha, f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, label_smoothing=cfg.label_smoothing,
        use_weighting=cfg.use_weighting,
        args=types.SimpleNamespace(discopop_tau=cfg.discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)


def _fused_out(log_probs, lssp=None):
    z = torch.zeros_like(log_probs)
    return types.SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z, is_top1=z.bool(),
                                 log_sum_sq_probs=lssp)


def run_trl_dpo(cfg, per_token, ref, mask, lssp=None):
    """TRL's DPO loss on per-token policy log-probs (2B, T-1), precomputed reference sums (2B,)."""
    me = _dpo_self(cfg)
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask, "ref_chosen_logps": ref[:B], "ref_rejected_logps": ref[B:]}
    loss = trl_dpo.DPOTrainer._compute_loss(me, lambda **kw: _fused_out(per_token, lssp), inputs, False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def ours_pairs(pol, ref, lens, **kw):
    return PairLogps(chosen=pol[:B], rejected=pol[B:], chosen_tokens=lens[:B], rejected_tokens=lens[B:],
                     ref_chosen=ref[:B], ref_rejected=ref[B:], **kw)


def check_dpo(cfg, seed=0, dtype=torch.float64, weighting=False):
    check_loss_config(cfg)
    pol0, ref0, lens = _batch(seed, dtype)
    mask, frac = _layout(lens, seed)
    # TRL side
    pol_t, ref_t = pol0.clone().requires_grad_(), ref0.clone().requires_grad_()
    per_token = pol_t.unsqueeze(1) * frac
    lssp = None
    if weighting:
        g = torch.Generator().manual_seed(seed + 7)
        lssp = per_token.detach() - torch.rand(frac.shape, generator=g, dtype=dtype) * (frac > 0)
    loss_t, met_t = run_trl_dpo(cfg, per_token, ref_t, mask, lssp)
    loss_t.backward()
    # lmforge side
    pol_o, ref_o = pol0.clone().requires_grad_(), ref0.clone().requires_grad_()
    kw = {}
    if weighting:
        w = wpo_weight((pol_o.unsqueeze(1) * frac).detach(), lssp, frac > 0)
        kw = {"chosen_weight": w[:B], "rejected_weight": w[B:]}
    per_pair, met_o = preference_loss(cfg, ours_pairs(pol_o, ref_o, lens, **kw))
    assert per_pair.shape == (B,)
    per_pair.mean().backward()
    what = f"{cfg.loss_type} {cfg.f_divergence_type}"
    _close(per_pair.mean(), loss_t, f"loss {what}")
    _close(_g(pol_o), _g(pol_t), f"d loss / d policy logps {what}")
    _close(_g(ref_o), _g(ref_t), f"d loss / d ref logps {what}")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
              "logps/chosen", "logps/rejected"):
        assert met_o[k].shape == (B,) and not met_o[k].requires_grad
        _close(met_o[k].mean(), met_t[k], f"metric {k} {what}")
    assert pol_t.grad.abs().sum() > 0
    return per_pair


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_dpo_every_loss_type(loss_type, dtype):
    ls = 1e-3 if loss_type == "exo_pair" else 0.0
    check_dpo(PrefLossConfig(loss_type=[loss_type], beta=0.2, label_smoothing=ls), dtype=dtype)


@pytest.mark.parametrize("loss_type", ["robust", "exo_pair", "aot", "aot_unpaired"])
def test_dpo_label_smoothing(loss_type):
    check_dpo(PrefLossConfig(loss_type=[loss_type], beta=0.1, label_smoothing=0.2), seed=3)


@pytest.mark.parametrize("fdiv", [f for f in F_DIVERGENCES if f != "reverse_kl"])
@pytest.mark.parametrize("loss_type", F_DIVERGENCE_LOSSES)
def test_dpo_f_divergences(fdiv, loss_type):
    ls = 1e-2 if loss_type == "exo_pair" else 0.0
    cfg = PrefLossConfig(loss_type=[loss_type], beta=0.1, label_smoothing=ls, f_divergence_type=fdiv,
                         f_alpha_divergence_coef=0.5)
    # TRL's alpha-divergence clamp has no float64 entry: compare in float32 there
    check_dpo(cfg, seed=1, dtype=torch.float32 if fdiv == "alpha_divergence" else torch.float64)


def test_dpo_alpha_divergence_coef_one_is_reverse_kl():
    a = check_dpo(PrefLossConfig(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), seed=2)
    b = check_dpo(PrefLossConfig(), seed=2)
    assert torch.allclose(a, b)


def test_dpo_weighted_combination_mpo():
    # MPO: sigmoid + bco_pair + sft, weighted
    check_dpo(PrefLossConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.3), seed=4)
    check_dpo(PrefLossConfig(loss_type=["ipo", "hinge", "apo_zero", "discopop"], loss_weights=[1.0, 0.5, 2.0, 0.1]),
              seed=5)


@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["robust"], ["sigmoid", "nca_pair"]])
def test_dpo_wpo_weighting(loss_type):
    ls = 0.1 if "robust" in loss_type else 0.0
    check_dpo(PrefLossConfig(loss_type=loss_type, use_weighting=True, label_smoothing=ls), seed=6, weighting=True)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
def test_ld_sum_against_trl(ld_alpha):
    """LD-DPO: lmforge's ld_sum of per-token log-probs vs TRL's shared/tail split, in the policy's loss and in
    TRL's reference pass (compute_ref_log_probs), sigmoid and sft (whose NLL uses the unweighted tokens)."""
    g = torch.Generator().manual_seed(11)
    _, _, lens = _batch(11)
    mask, frac = _layout(lens, 11)
    shift = mask[:, 1:]
    tok0 = -torch.rand(shift.shape, generator=g, dtype=torch.float64) * 3 * shift
    ref_tok = -torch.rand(shift.shape, generator=g, dtype=torch.float64) * 3 * shift
    # reference sums: TRL's own reference pass
    me = _dpo_self(PrefLossConfig(ld_alpha=ld_alpha))
    inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
              "completion_mask": mask}
    rc, rr = trl_dpo.DPOTrainer.compute_ref_log_probs(me, lambda **kw: _fused_out(ref_tok), inputs)
    ref_ours = ld_sum(ref_tok, shift, ld_alpha)
    _close(ref_ours, torch.cat([rc, rr]), f"reference ld_sum alpha={ld_alpha}")
    for loss_type, weights in ((["sigmoid"], None), (["sigmoid", "sft"], [1.0, 0.5])):
        cfg = PrefLossConfig(loss_type=loss_type, loss_weights=weights, ld_alpha=ld_alpha)
        tok_t = tok0.clone().requires_grad_()
        me = _dpo_self(cfg)
        inputs = dict(inputs, ref_chosen_logps=rc, ref_rejected_logps=rr)
        loss_t = trl_dpo.DPOTrainer._compute_loss(me, lambda **kw: _fused_out(tok_t), inputs, False)
        loss_t.backward()
        tok_o = tok0.clone().requires_grad_()
        s = ld_sum(tok_o, shift, ld_alpha)
        full = ld_sum(tok_o, shift, None)
        lp = ours_pairs(s, ref_ours, lens, nll_logps=full[:B], nll_tokens=lens[:B])
        per_pair, _ = preference_loss(cfg, lp)
        per_pair.mean().backward()
        _close(per_pair.mean(), loss_t, f"LD-DPO loss {loss_type} alpha={ld_alpha}")
        # on the completion tokens (TRL's masks pass gradient to the padding, whose log-probs its head zeroes)
        _close(tok_o.grad * shift, tok_t.grad * shift, f"LD-DPO d loss / d per-token {loss_type} alpha={ld_alpha}")
        assert torch.all(tok_o.grad[shift == 0] == 0)
    if ld_alpha == 1.0:
        assert torch.allclose(ref_ours, ld_sum(ref_tok, shift, None))
    elif ld_alpha == 0.0:   # only the shared prefix counts: equal lengths give equal token counts
        n = torch.minimum(lens[:B], lens[B:]).long()
        assert torch.allclose(ref_ours[:B], torch.stack([ref_tok[i, :n[i]].sum() for i in range(B)]))


# ---------------------------------------------------------------------------------------------- KTO


def run_kto(cfg, seed, with_kl, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 10, (B,), generator=g).to(dtype)
    label = torch.tensor([True, False, True, True, False, False])
    pol0 = -lens * (0.3 + torch.rand(B, generator=g, dtype=dtype))
    ref = pol0 + torch.randn(B, generator=g, dtype=dtype)
    # KL pairs: completions rotated by one, their log-probs a little above the reference's (KL > 0) or below
    kl_pol = -lens.roll(1) * (0.3 + torch.rand(B, generator=g, dtype=dtype))
    kl_ref = kl_pol - 0.3 * torch.randn(B, generator=g, dtype=dtype) - (0.5 if seed % 2 else -0.5)
    t = int(lens.max()) + 2
    pos = torch.arange(t)
    mask = ((pos >= 1) & (pos <= lens.long().unsqueeze(1))).long()
    kl_mask = ((pos >= 1) & (pos <= lens.roll(1).long().unsqueeze(1))).long()
    frac = mask[:, 1:].to(dtype) / lens.unsqueeze(1)
    kl_frac = kl_mask[:, 1:].to(dtype) / lens.roll(1).unsqueeze(1)

    # TRL
    pol_t, ref_t = pol0.clone().requires_grad_(), ref.clone().requires_grad_()
    me = types.SimpleNamespace(
        model=_train_model(), ref_model=None,
        accelerator=_Acc(), aux_loss_enabled=False, precompute_ref_logps=True, beta=cfg.beta,
        loss_type=cfg.loss_type[0], desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight, calculate_KL=with_kl,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    me._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, me)

    def model(input_ids, **kw):
        if int(input_ids[0, 0]) == 1:           # the KL (mismatched) rows
            return _fused_out(kl_pol.unsqueeze(1) * kl_frac)
        return _fused_out(pol_t.unsqueeze(1) * frac)

    batch = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": torch.ones_like(mask),
             "completion_mask": mask, "label": label, "ref_logps": ref_t}
    if with_kl:
        batch.update({"KL_input_ids": torch.ones(kl_mask.shape, dtype=torch.long),
                      "KL_attention_mask": torch.ones_like(kl_mask), "KL_completion_mask": kl_mask,
                      "ref_KL_logps": kl_ref})
    loss_t = trl_kto.KTOTrainer._compute_loss(me, model, batch, False)
    loss_t.backward()
    met_t = {k: v[-1] for k, v in me._metrics["train"].items()}

    # lmforge
    pol_o, ref_o = pol0.clone().requires_grad_(), ref.clone().requires_grad_()
    lp = KTOLogps(logps=pol_o, label=label, kl_logps=kl_pol if with_kl else None, ref_logps=ref_o,
                  ref_kl_logps=kl_ref if with_kl else None)
    per_ex, met_o = kto_loss(cfg, lp)
    per_ex.mean().backward()
    what = f"KTO {cfg.loss_type} kl={with_kl}"
    _close(per_ex.mean(), loss_t, f"loss {what}")
    _close(_g(pol_o), _g(pol_t), f"d loss / d logps {what}")
    _close(_g(ref_o), _g(ref_t), f"d loss / d ref logps {what}")
    for k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert met_o[k].dim() == 0
        _close(met_o[k], met_t[k], f"metric {k} {what}")
    return met_o


@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("seed", [1, 2])
def test_kto_against_trl(with_kl, seed):
    met = run_kto(PrefLossConfig(method="kto", loss_type=["kto"], beta=0.3, desirable_weight=1.0,
                                 undesirable_weight=1.5), seed, with_kl)
    if with_kl:   # seed 1: the estimate is positive; seed 2: negative, clamped to 0
        assert (met["kl"] == 0) == (seed == 2)


def test_kto_apo_zero_unpaired_against_trl():
    run_kto(PrefLossConfig(method="kto", loss_type=["apo_zero_unpaired"], beta=0.2, desirable_weight=0.7),
            3, False)


def test_kto_kl_is_detached_and_clamped():
    logps = torch.tensor([-3.0, -4.0], requires_grad=True)
    kl_logps = torch.tensor([-2.0, -2.5], requires_grad=True)
    cfg = PrefLossConfig(method="kto", loss_type=["kto"])
    lp = KTOLogps(logps=logps, label=torch.tensor([True, False]), kl_logps=kl_logps,
                  ref_logps=torch.tensor([-3.5, -3.5]), ref_kl_logps=torch.tensor([-3.0, -3.0]))
    per, met = kto_loss(cfg, lp)
    assert abs(float(met["kl"]) - 0.75) < 1e-6
    per.sum().backward()
    assert kl_logps.grad is None and logps.grad.abs().sum() > 0
    lp.ref_kl_logps = torch.tensor([-1.0, -1.0])          # estimate -1.25: clamped to 0 = no KL at all
    per_c, met_c = kto_loss(cfg, lp)
    per_0, _ = kto_loss(cfg, KTOLogps(logps, lp.label, None, lp.ref_logps))
    assert float(met_c["kl"]) == 0.0 and torch.equal(per_c, per_0)


# ---------------------------------------------------------------------------------------------- ORPO / CPO


def _pref_batch(seed, dtype=torch.float64):
    """Chosen/rejected token rows with a shared prompt, right-padded to one width, and random logits."""
    g = torch.Generator().manual_seed(seed)
    v, t = 7, 12
    rows = {}
    for side in ("chosen", "rejected"):
        ids = torch.randint(1, v, (B, t), generator=g)
        att = torch.zeros(B, t, dtype=torch.long)
        lab = torch.full((B, t), -100)
        for i in range(B):
            p, c = 2 + i % 3, int(torch.randint(2, 7, (1,), generator=g))
            att[i, :p + c] = 1
            lab[i, p:p + c] = ids[i, p:p + c]
            ids[i, p + c:] = 0
        rows[f"{side}_input_ids"], rows[f"{side}_attention_mask"], rows[f"{side}_labels"] = ids, att, lab
    logits = torch.randn(2 * B, t, v, generator=g, dtype=dtype) * 1.5
    return rows, logits


def _sums_from_logits(rows, logits):
    """lmforge's side: per-token log-probs from the logits (torch, not TRL), summed per sequence."""
    ids = torch.cat([rows["chosen_input_ids"], rows["rejected_input_ids"]])
    lab = torch.cat([rows["chosen_labels"], rows["rejected_labels"]])[:, 1:]
    att = torch.cat([rows["chosen_attention_mask"], rows["rejected_attention_mask"]])[:, 1:]
    tok = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    comp = (lab != -100).to(logits.dtype)
    s, n = (tok * comp).sum(1), comp.sum(1)
    full = att.to(logits.dtype)
    return s, n, (tok * full).sum(1), full.sum(1)


def _trainer_self(cls, cfg, **extra):
    me = types.SimpleNamespace(accelerator=_Acc(), beta=cfg.beta, is_encoder_decoder=False, padding_value=0,
                               pad_token_id=0, aux_loss_enabled=False, label_smoothing=cfg.label_smoothing, **extra)
    me.concatenated_inputs = cls.concatenated_inputs
    me.get_batch_logps = cls.get_batch_logps
    me.concatenated_forward = types.MethodType(cls.concatenated_forward, me)
    return me


def _run_trainer_loss(cls, me, rows, logits):
    model = lambda input_ids, attention_mask=None, use_cache=None: types.SimpleNamespace(logits=logits)  # noqa
    return cls.get_batch_loss_metrics(me, model, rows, train_eval="train")


def test_orpo_against_trl():
    cfg = PrefLossConfig(method="orpo", beta=0.25)
    rows, logits0 = _pref_batch(21)
    lt = logits0.clone().requires_grad_()
    me = _trainer_self(trl_orpo.ORPOTrainer, cfg)
    me.odds_ratio_loss = types.MethodType(trl_orpo.ORPOTrainer.odds_ratio_loss, me)
    loss_t, met_t = _run_trainer_loss(trl_orpo.ORPOTrainer, me, rows, lt)
    loss_t.backward()
    lo = logits0.clone().requires_grad_()
    s, n, fs, fn = _sums_from_logits(rows, lo)
    lp = PairLogps(chosen=s[:B], rejected=s[B:], chosen_tokens=n[:B], rejected_tokens=n[B:],
                   nll_logps=fs[:B], nll_tokens=fn[:B])
    per_pair, met_o = preference_loss(cfg, lp)
    per_pair.mean().backward()
    _close(per_pair.mean(), loss_t, "ORPO loss")
    _close(lo.grad, lt.grad, "ORPO d loss / d logits")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        _close(met_o[k].mean(), met_t[k], f"ORPO metric {k}")
    # without the prompt tokens the NLL differs (TRL's ORPO NLL covers the prompt): the option matters
    per2, _ = preference_loss(cfg, PairLogps(chosen=s[:B], rejected=s[B:], chosen_tokens=n[:B],
                                             rejected_tokens=n[B:]))
    assert abs(float(per2.mean().detach()) - float(loss_t.detach())) > 1e-3


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated")
@pytest.mark.parametrize("loss_type", CPO_LOSSES)
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_cpo_against_trl(loss_type, alpha):
    from trl.experimental.cpo import CPOConfig

    ls = 0.1 if loss_type in ("sigmoid", "simpo", "alphapo") else 0.0
    cfg = PrefLossConfig(method="cpo", loss_type=[loss_type], beta=0.2, label_smoothing=ls, cpo_alpha=0.7,
                         simpo_gamma=0.4, alpha=alpha)
    targs = CPOConfig(output_dir="/tmp/unused-cpo", loss_type=loss_type, beta=cfg.beta, cpo_alpha=cfg.cpo_alpha,
                      simpo_gamma=cfg.simpo_gamma, alpha=alpha, label_smoothing=ls, report_to=[], bf16=False,
                      use_cpu=True)
    rows, logits0 = _pref_batch(31 + CPO_LOSSES.index(loss_type))
    lt = logits0.clone().requires_grad_()
    me = _trainer_self(trl_cpo.CPOTrainer, cfg, loss_type=targs.loss_type, cpo_alpha=targs.cpo_alpha,
                       simpo_gamma=targs.simpo_gamma, alpha=targs.alpha)
    me.cpo_loss = types.MethodType(trl_cpo.CPOTrainer.cpo_loss, me)
    loss_t, met_t = _run_trainer_loss(trl_cpo.CPOTrainer, me, rows, lt)
    loss_t.backward()
    lo = logits0.clone().requires_grad_()
    s, n, _, _ = _sums_from_logits(rows, lo)
    lp = PairLogps(chosen=s[:B], rejected=s[B:], chosen_tokens=n[:B], rejected_tokens=n[B:])
    per_pair, met_o = preference_loss(cfg, lp)
    per_pair.mean().backward()
    what = f"CPO {loss_type} alpha={alpha}"
    _close(per_pair.mean(), loss_t, f"{what} loss")
    _close(lo.grad, lt.grad, f"{what} d loss / d logits")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "nll_loss"):
        _close(met_o[k].mean(), met_t[k], f"{what} metric {k}")


def test_lmforge_align_exports():
    import lmforge.align as align

    assert align.preference_loss is preference_loss and align.DPO_LOSSES is DPO_LOSSES


def test_simpo_method_is_cpo_simpo_without_nll():
    rows, logits = _pref_batch(41)
    s, n, _, _ = _sums_from_logits(rows, logits)
    lp = PairLogps(chosen=s[:B], rejected=s[B:], chosen_tokens=n[:B], rejected_tokens=n[B:])
    a, ma = preference_loss(PrefLossConfig(method="simpo", beta=2.0, simpo_gamma=0.5), lp)
    b, _ = preference_loss(PrefLossConfig(method="cpo", loss_type=["simpo"], beta=2.0, simpo_gamma=0.5,
                                          cpo_alpha=0.0), lp)
    c, _ = preference_loss(PrefLossConfig(method="cpo", loss_type=["simpo"], beta=2.0, simpo_gamma=0.5), lp)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.all(ma["nll_loss"] == 0)
    # length-averaged: the reward is beta times the mean per-token log-prob
    assert torch.allclose(ma["rewards/chosen"], 2.0 * s[:B] / n[:B])


# ---------------------------------------------------------------------------------------------- properties


def _pairs(c, r, rc=0.0, rr=0.0, n=4.0):
    t = lambda x: torch.as_tensor(x, dtype=torch.float64).reshape(-1)  # noqa
    c, r = t(c), t(r)
    return PairLogps(chosen=c, rejected=r, chosen_tokens=torch.full_like(c, n), rejected_tokens=torch.full_like(r, n),
                     ref_chosen=t(rc).expand_as(c), ref_rejected=t(rr).expand_as(r))


def test_sigmoid_at_equal_logps_is_log2_and_decreases_in_the_margin():
    per, met = preference_loss(PrefLossConfig(), _pairs([-5.0, -9.0], [-5.0, -9.0], [-4.0, -2.0], [-4.0, -2.0]))
    assert torch.allclose(per, torch.full((2,), 0.6931471805599453, dtype=torch.float64))
    assert torch.all(met["rewards/accuracies"] == 0) and torch.all(met["rewards/margins"] == 0)
    margins = torch.linspace(-20, 20, 41, dtype=torch.float64)
    for lt in (["sigmoid"], ["hinge"], ["ipo"], ["robust"], ["sigmoid_norm"], ["exo_pair"]):  # not discopop:
        # DiscoPOP's blend is non-monotonic near 0 by design
        cfg = PrefLossConfig(loss_type=lt, label_smoothing=0.1 if lt in (["robust"], ["exo_pair"]) else 0.0)
        per, _ = preference_loss(cfg, _pairs(-10 + margins / 2, -10 - margins / 2))
        d = per[1:] - per[:-1]
        # non-increasing everywhere (ipo only up to its target 1/(2 beta) per token), strictly somewhere
        upto = margins[1:] / 4 <= 1 / (2 * cfg.beta) if lt == ["ipo"] else torch.ones_like(d, dtype=torch.bool)
        assert torch.all(d[upto] <= 1e-12) and torch.any(d < 0), lt


def test_robust_at_zero_smoothing_is_sigmoid_and_label_smoothing_changes_it():
    pol, ref, lens = _batch(51)
    lp = ours_pairs(pol, ref, lens)
    sig, _ = preference_loss(PrefLossConfig(), lp)
    rob0, _ = preference_loss(PrefLossConfig(loss_type=["robust"]), lp)
    rob, _ = preference_loss(PrefLossConfig(loss_type=["robust"], label_smoothing=0.2), lp)
    aot0, _ = preference_loss(PrefLossConfig(loss_type=["aot_unpaired"]), lp)
    assert torch.allclose(sig, rob0) and not torch.allclose(sig, rob)
    # robust is unbiased: averaged over a flip with probability eps, it gives back the clean sigmoid loss
    flipped, _ = preference_loss(PrefLossConfig(loss_type=["robust"], label_smoothing=0.2),
                                 ours_pairs(torch.cat([pol[B:], pol[:B]]), torch.cat([ref[B:], ref[:B]]),
                                            torch.cat([lens[B:], lens[:B]])))
    assert torch.allclose(0.8 * rob + 0.2 * flipped, sig)
    # sorted pairing: the batch loss is a function of the sorted log-ratios only (permutation invariant)
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(0))
    aot_p, _ = preference_loss(PrefLossConfig(loss_type=["aot_unpaired"]),
                               ours_pairs(torch.cat([pol[:B], pol[B:][perm]]), torch.cat([ref[:B], ref[B:][perm]]),
                                          torch.cat([lens[:B], lens[B:][perm]])))
    assert torch.allclose(aot0.mean(), aot_p.mean())


def test_reference_free_methods_ignore_the_reference():
    pol, ref, lens = _batch(61)
    for cfg in (PrefLossConfig(method="orpo"), PrefLossConfig(method="simpo"),
                PrefLossConfig(method="cpo", loss_type=["hinge"])):
        a, _ = preference_loss(cfg, ours_pairs(pol, ref, lens))
        b, _ = preference_loss(cfg, PairLogps(pol[:B], pol[B:], lens[:B], lens[B:]))
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- bad input


BAD = [
    (dict(method="dpp"), r"method: 'dpp': expected one of .* \(did you mean 'dpo'\?\)"),
    (dict(loss_type="sigmoid"), r"loss_type: 'sigmoid': expected a non-empty list of names, e.g. \['sigmoid'\]"),
    (dict(loss_type=[]), r"loss_type: \[\]: expected a non-empty list"),
    (dict(loss_type=["sigmod"]), "'sigmod' is not one.*did you mean 'sigmoid'"),
    (dict(loss_type=["ipo", "bco"]), "'bco' is not one.*did you mean 'bco_pair'"),
    (dict(method="kto", loss_type=["sigmoid"]), r"exactly one of \['kto', 'apo_zero_unpaired'\]"),
    (dict(method="kto", loss_type=["kto", "kto"]), "exactly one of"),
    (dict(method="cpo", loss_type=["nca_pair"]), "exactly one of .*'alphapo'.* for method 'cpo'"),
    (dict(method="simpo", loss_type=["hinge"]), "for method 'simpo'"),
    (dict(method="orpo", loss_type=["ipo"]), "for method 'orpo'"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), r"a list of 2 weights, one per loss_type"),
    (dict(loss_weights=[-1.0]), "finite weights >= 0; -1.0 is not"),
    (dict(loss_weights=[float("nan")]), "finite weights >= 0; nan is not"),
    (dict(method="cpo", loss_weights=[1.0]), "None for method 'cpo'"),
    (dict(beta=0.0), r"beta: 0.0: expected a finite number > 0"),
    (dict(beta=-0.1), r"beta: -0.1: expected a finite number > 0"),
    (dict(beta="0.1"), r"beta: '0.1': expected a finite number > 0"),
    (dict(beta=float("inf")), r"beta: inf: expected"),
    (dict(label_smoothing=0.5, loss_type=["robust"]), r"label_smoothing: 0.5: expected a number in \[0, 0.5\)"),
    (dict(label_smoothing=-0.1, loss_type=["robust"]), r"label_smoothing: -0.1: expected a number in \[0, 0.5\)"),
    (dict(label_smoothing=0.1), r"label_smoothing: 0.1: expected 0 with loss_type \['sigmoid'\]: in TRL 1.16"),
    (dict(loss_type=["exo_pair"]), "label_smoothing: 0.0: expected > 0 with loss_type 'exo_pair'"),
    (dict(method="cpo", loss_type=["hinge"], label_smoothing=0.1), "0 with CPO loss 'hinge'"),
    (dict(method="kto", loss_type=["kto"], label_smoothing=0.1), "0 for method 'kto'"),
    (dict(f_divergence_type="kl"), "f_divergence_type: 'kl': expected one of"),
    (dict(f_divergence_type="forward_kl", loss_type=["bco_pair"]),
     r"'reverse_kl' with loss_type \['bco_pair'\]: only"),
    (dict(f_divergence_type="js_divergence", loss_type=["sigmoid", "apo_zero"]), r"\['apo_zero'\]"),
    (dict(method="orpo", f_divergence_type="forward_kl"), "'reverse_kl' for method 'orpo'"),
    (dict(f_alpha_divergence_coef=float("nan")), "f_alpha_divergence_coef: nan"),
    (dict(discopop_tau=0.0), "discopop_tau: 0.0: expected a finite number > 0"),
    (dict(method="kto", loss_type=["kto"], desirable_weight=-1.0), "desirable_weight: -1.0: expected"),
    (dict(method="kto", loss_type=["kto"], desirable_weight=0.0, undesirable_weight=0.0), "undesirable_weight"),
    (dict(method="cpo", loss_type=["sigmoid"], cpo_alpha=-1.0), "cpo_alpha: -1.0"),
    (dict(method="cpo", loss_type=["simpo"], simpo_gamma=float("nan")), "simpo_gamma: nan"),
    (dict(ld_alpha=1.5), r"ld_alpha: 1.5: expected None or a number in \[0, 1\]"),
    (dict(method="orpo", ld_alpha=0.5), "ld_alpha: 0.5: expected None for method 'orpo'"),
    (dict(use_weighting=1), "use_weighting: 1: expected True or False"),
    (dict(use_weighting=True, loss_type=["aot"]), r"use_weighting: True: expected False with loss_type \['aot'\]"),
    (dict(method="kto", loss_type=["kto"], use_weighting=True), "False for method 'kto'"),
]


@pytest.mark.parametrize("kw,msg", BAD, ids=[str(i) for i in range(len(BAD))])
def test_check_loss_config_refuses(kw, msg):
    import re

    with pytest.raises(ValueError) as e:
        check_loss_config(PrefLossConfig(**kw))
    assert str(e.value).startswith("PrefLossConfig.") and re.search(msg, str(e.value)), str(e.value)


def test_good_configs_pass():
    for kw in (dict(), dict(loss_type=list(DPO_LOSSES), label_smoothing=0.1), dict(method="kto", loss_type=["kto"]),
               dict(method="orpo"), dict(method="simpo"), dict(method="simpo", loss_type=["simpo"]),
               dict(method="cpo", loss_type=["alphapo"], alpha=0.5), dict(ld_alpha=0.0), dict(use_weighting=True),
               dict(f_divergence_type="alpha_divergence", loss_type=["ipo", "sft"])):
        check_loss_config(PrefLossConfig(**kw))


def test_bad_logps_refused():
    pol, ref, lens = _batch(71)
    with pytest.raises(ValueError, match="PairLogps.ref_chosen: None, but method 'dpo' needs the reference"):
        preference_loss(PrefLossConfig(), PairLogps(pol[:B], pol[B:], lens[:B], lens[B:]))
    with pytest.raises(ValueError, match="PairLogps.chosen_weight: None.*use_weighting"):
        preference_loss(PrefLossConfig(use_weighting=True), ours_pairs(pol, ref, lens))
    with pytest.raises(ValueError, match=r"PairLogps.rejected: Tensor of shape \(5,\): expected .* \(6,\)"):
        preference_loss(PrefLossConfig(), PairLogps(pol[:B], pol[B:-1], lens[:B], lens[B:], ref[:B], ref[B:]))
    with pytest.raises(ValueError, match=r"PairLogps.chosen: shape \(2, 3\)"):
        preference_loss(PrefLossConfig(), PairLogps(*(x.reshape(2, 3) for x in (pol[:B], pol[B:], lens[:B],
                                                                                 lens[B:], ref[:B], ref[B:]))))
    with pytest.raises(ValueError, match="use kto_loss"):
        preference_loss(PrefLossConfig(method="kto", loss_type=["kto"]), ours_pairs(pol, ref, lens))
    with pytest.raises(ValueError, match="expected 'kto' for kto_loss"):
        kto_loss(PrefLossConfig(), KTOLogps(pol, pol > -5, None, ref))
    with pytest.raises(ValueError, match="KTOLogps.ref_logps: None"):
        kto_loss(PrefLossConfig(method="kto", loss_type=["kto"]), KTOLogps(pol, pol > -5, None))
    with pytest.raises(ValueError, match="KTOLogps.ref_kl_logps: None, but kl_logps is given"):
        kto_loss(PrefLossConfig(method="kto", loss_type=["kto"]), KTOLogps(pol, pol > -5, pol, ref))
    with pytest.raises(ValueError, match="a batch of 1 example with a KL estimate"):
        kto_loss(PrefLossConfig(method="kto", loss_type=["kto"]), KTOLogps(pol[:1], pol[:1] > 0, pol[:1], ref[:1],
                                                                           ref[:1]))
    with pytest.raises(ValueError, match=r"ld_sum: per-token log-probs \(3, 4\)"):
        ld_sum(torch.zeros(3, 4), torch.ones(3, 4), 0.5)
