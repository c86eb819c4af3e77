"""Tensor parallel (and sequence parallel) on 2 gloo ranks equals one process.

Each comparison trains the tiny model of ``parallel_harness`` a few steps (gradient accumulation 2,
clipping) under ``parallel = "tp"`` and in one process on the same global batch (with dp_size 1 every
rank reads the whole batch) and compares losses, gradient norms and every final parameter (1e-5).
To keep CI short, one 2-rank launch runs every case in turn (``_cases``); the bad-input cases are
``test_parallel_tp_bad.py`` (a launch of their own: an error there must not hang the others).
"""
from __future__ import annotations

import pytest
import torch

from parallel_harness import assert_same_training, mini_train, run_ranks, tiny_config

GPT2 = dict(arch="gpt2", norm="layernorm", mlp="gelu_tanh", pos="learned", tie_embeddings=True, qkv_bias=True,
            out_bias=True, mlp_bias=True, n_kv_head=4)
MOE = dict(moe=dict(n_experts=4, top_k=2, d_expert=32, n_shared=1, d_shared=32, shared_gate=True))

# name -> mini_train keywords (parallel "tp" on the ranks, "none" for the reference)
TRAIN = {
    "gqa_adamw": dict(optimizer="adamw", grad_clip=0.3),  # Llama-shaped: n_head 4, n_kv_head 2, SwiGLU
    "gqa_muon": dict(optimizer="muon", grad_clip=0.3),
    "mha_adamw": dict(optimizer="adamw", grad_clip=0.3, model=dict(n_kv_head=4)),
    "mha_qknorm_muon": dict(optimizer="muon", grad_clip=0.3, model=dict(n_kv_head=4, qk_norm=True)),
    "sp_gqa_adamw": dict(optimizer="adamw", grad_clip=0.3, cfg=dict(sequence_parallel=True)),
    "sp_gqa_muon": dict(optimizer="muon", grad_clip=0.3, cfg=dict(sequence_parallel=True)),
    # GPT-2-shaped: LayerNorm with biases, GELU, learned positions, tied embeddings. lr 1e-3: the key bias's
    # exact gradient is 0 (softmax ignores it), so its fp32 gradient is reduction-order noise, and Adam's first
    # steps turn any noise into +-lr; at lr 1e-2 that alone moves it past 1e-5, TP or not
    "sp_gpt2_adamw": dict(optimizer="adamw", lr=1e-3, grad_clip=0.3, model=GPT2, cfg=dict(sequence_parallel=True)),
    "moe_muon": dict(optimizer="muon", grad_clip=0.3, model=MOE),  # experts replicated, shared expert split
}


def _layout(tp_size: int = 2) -> dict:
    """Rank r's slices of the fused matrices are its heads' q, k, v rows and its units' gate and up rows."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig

    st = make_strategy(LoopConfig(parallel="tp"))
    torch.manual_seed(0)
    net = Transformer(tiny_config())
    full = {k: v.clone() for k, v in net.state_dict().items()}
    st.check(net)
    st.wrap(net)
    r, tp = st.tp_rank, st.tp_size
    attn, mlp = net.blocks[0].attn, net.blocks[0].mlp
    H, K, D, hid = attn.n_head, attn.n_kv_head, attn.D, mlp.hidden
    W = full["blocks.0.attn.qkv.weight"]
    q, k, v = W.split([H * D, K * D, K * D])
    Hl, Kl = H // tp, K // tp
    want_qkv = torch.cat([q[r * Hl * D:(r + 1) * Hl * D], k[r * Kl * D:(r + 1) * Kl * D], v[r * Kl * D:(r + 1) * Kl * D]])
    g, u = full["blocks.0.mlp.fc.weight"].split([hid, hid])
    h = hid // tp
    want_fc = torch.cat([g[r * h:(r + 1) * h], u[r * h:(r + 1) * h]])
    return {"qkv": (attn.qkv.weight.to_local() - want_qkv).abs().max().item(),
            "fc": (mlp.fc.weight.to_local() - want_fc).abs().max().item(),
            "proj_cols": tuple(attn.proj.weight.to_local().shape), "heads": (attn.H, attn.K),
            "placements": str(attn.qkv.weight.placements)}


def _logits(parallel: str = "none", sequence_parallel: bool = False, model: dict | None = None) -> torch.Tensor:
    """The forward's logits on a fixed batch, before any step."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig

    torch.set_num_threads(1)
    st = make_strategy(LoopConfig(parallel=parallel, sequence_parallel=sequence_parallel))
    torch.manual_seed(0)
    net = Transformer(tiny_config(**(model or {})))
    st.check(net)
    fwd = st.wrap(net)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return fwd(x).detach()


def _state_order() -> dict:
    """The DCP-shaped state (torch's get_state_dict) in the model's row order, and back."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.parallel.tp import from_model_order, to_model_order
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import build_optimizers

    st = make_strategy(LoopConfig(parallel="tp"))
    torch.manual_seed(0)
    net = Transformer(tiny_config())
    st.check(net)
    st.wrap(net)
    opts = st.wrap_optimizers(net, build_optimizers(net, "adamw", lr=1e-2, fused=False))
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    _, loss = net(x[:, :-1], x[:, 1:])
    loss.backward()
    st.step(opts)
    msd, osd = get_state_dict(net, opts)
    state = {"model": msd, "optim": osd}
    full = st.full_state_dict(net)  # the model's order (collective)
    mo = to_model_order(state, st.layout.row_order, st._shapes(net))
    name = "blocks.1.attn.qkv.weight"
    p = net.get_parameter(name)
    avg = opts[0].state[p]["exp_avg"].full_tensor()[torch.argsort(st.layout.row_order[name])]
    back = from_model_order(mo, st.layout.row_order, dict(net.named_parameters()))
    out = {"back_model": max((back["model"][k].to_local() - v.to_local()).abs().max().item()
                             for k, v in msd.items() if hasattr(v, "to_local")),
           "back_optim": (back["optim"]["state"][name]["exp_avg"].to_local()
                          - osd["state"][name]["exp_avg"].to_local()).abs().max().item(),
           "optim_model_order": (mo["optim"]["state"][name]["exp_avg"] - avg).abs().max().item()}
    if full is not None:
        regrouped = list(st.layout.row_order)
        assert regrouped and all(k in mo["model"] for k in regrouped)
        out["model_order"] = max((mo["model"][k] - full[k]).abs().max().item() for k in regrouped)
    return out


COMM = {"comm_tp": dict(optimizer="adamw"), "comm_sp": dict(optimizer="adamw", cfg=dict(sequence_parallel=True)),
        "comm_muon_qknorm": dict(optimizer="muon", model=dict(qk_norm=True))}


def _with_recompute(policy: str, **kw) -> dict:
    """``mini_train("tp", ...)`` with the blocks under activation recompute (``train.recompute``), applied
    before the split as a trainer would."""
    from lmforge.parallel.tp import TPStrategy
    from lmforge.train.recompute import apply_recompute

    orig = TPStrategy.wrap

    def wrap(self, model):
        apply_recompute(model, policy)
        return orig(self, model)
    TPStrategy.wrap = wrap
    try:
        return mini_train("tp", **kw)
    finally:
        TPStrategy.wrap = orig


RECOMPUTE = {"recompute_full_sp": ("full", dict(grad_clip=0.3, cfg=dict(sequence_parallel=True))),
             "recompute_selective": ("selective", dict(grad_clip=0.3))}


def _cases() -> dict:
    """Every comparison's TP side, on this rank (one launch for all)."""
    out = {name: mini_train("tp", memory=True, **kw) for name, kw in TRAIN.items()}
    out.update({name: _with_recompute(pol, **kw) for name, (pol, kw) in RECOMPUTE.items()})
    out.update({name: mini_train("tp", comm=True, steps=1, **kw)["comm"] for name, kw in COMM.items()})
    out["logits"] = _logits("tp")
    out["logits_sp"] = _logits("tp", sequence_parallel=True)
    out["logits_gpt2_sp"] = _logits("tp", sequence_parallel=True, model=GPT2)
    out["layout"] = _layout()
    out["state_order"] = _state_order()
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(2, "test_parallel_tp:_cases", timeout=400)


@pytest.mark.parametrize("name", list(TRAIN))
def test_tp_training_equals_one_process(ranks, name):
    kw = TRAIN[name]
    ref = mini_train("none", **{k: v for k, v in kw.items() if k != "cfg"})
    if kw.get("grad_clip"):  # the clipping really clips (else the test would not test it)
        assert max(ref["gnorms"]) > kw["grad_clip"], ref["gnorms"]
    got = ranks[0][name]
    assert got["describe"]["strategy"] == "tp" and got["describe"]["tp_size"] == 2
    assert got["describe"]["dp_size"] == 1
    assert got["describe"]["sequence_parallel"] == bool(kw.get("cfg", {}).get("sequence_parallel"))
    assert ranks[1][name]["state"] is None  # the full state only on rank 0
    assert ranks[1][name]["losses"] == got["losses"]  # every rank reports the same numbers
    assert_same_training(ref, got)
    if name == "moe_muon":
        assert "blocks.0.mlp.w_in" in got["state"] and "blocks.0.mlp.shared.fc.weight" in got["state"]


@pytest.mark.parametrize("name", ["gqa_adamw", "gqa_muon", "moe_muon", "sp_gpt2_adamw"])
def test_tp_bytes_equal_the_planner(ranks, name):
    """Per rank, the parameters', gradients' and optimizer states' bytes allocated (after the last backward)
    equal ``parallel.plan.state_bytes`` for TP on 2 ranks, exactly."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.plan import state_bytes

    kw = TRAIN[name]
    net = Transformer(tiny_config(**kw.get("model", {})))
    want = state_bytes(net, "tp", 2, optimizer=kw["optimizer"], tp=2)
    full = state_bytes(net, "none", 1, optimizer=kw["optimizer"])
    for r in ranks:
        assert r[name]["memory"] == want, (r[name]["memory"], want)
    assert want["params"] < full["params"]  # the split is real


def test_tp_communication_per_step(ranks):
    """What one step's collectives move per rank (counted by ``parallel.comm``), against the arithmetic:
    a = b·s·h activation elements of a micro-batch (8·16·32), L = 2 blocks, M = 2 micro-batches, f = 1/2.
    TP: per block 2 all-reduces of a forward (the row-wise outputs) and 2 backward (the column-wise inputs'
    gradients). SP: each all-reduce becomes a reduce-scatter + an all-gather (the same volume), plus the
    head's gather of the final norm's output and the gather of the embedding's gradient; the norms'
    partial gradients are summed once per step. Muon gathers each split matrix once per step; the per-head
    norms' gradients are summed once per step."""
    from lmforge.parallel.comm import theoretical_volume

    a, L, M, f, C, D = 8 * 16 * 32, 2, 2, 0.5, 32, 8
    tp = ranks[0]["comm_tp"]["summary"]
    assert tp["all_reduce"]["calls"] == 4 * L * M and set(tp) == {"all_reduce", "total_volume", "total_volume_bytes"}
    assert tp["all_reduce"]["volume"] == theoretical_volume("tp", 0, 2, micro_batches=M, act_elements=a,
                                                            n_layer=L)["all_reduce"]
    sp = ranks[0]["comm_sp"]["summary"]
    assert sp["reduce_scatter"]["volume"] == 4 * L * a * f * M
    assert sp["all_gather"]["volume"] == (4 * L + 2) * a * f * M
    assert sp["all_reduce"] == {"calls": 1, "elements": (2 * L + 1) * C, "volume": 2 * (2 * L + 1) * C * f,
                                "volume_bytes": 4 * 2 * (2 * L + 1) * C * f}
    mu = ranks[0]["comm_muon_qknorm"]["summary"]
    split = L * (64 * 32 + 32 * 32 + 128 * 32 + 32 * 64)  # qkv, attn proj, fc, mlp proj per block
    assert mu["all_gather"]["volume"] == split * f
    assert mu["all_reduce"]["volume"] == 8 * L * a * f * M + 2 * (2 * L * D) * f  # + the qk-norms' gradients
    for r in ranks:
        assert r["comm_tp"]["small"]["all_reduce"]["calls"] == 1  # the gradient norm


@pytest.mark.parametrize("name", list(RECOMPUTE))
def test_tp_with_recompute_equals_one_process(ranks, name):
    _, kw = RECOMPUTE[name]
    assert_same_training(mini_train("none", **{k: v for k, v in kw.items() if k != "cfg"}), ranks[0][name])


@pytest.mark.parametrize("key,sp,model", [("logits", False, None), ("logits_sp", True, None),
                                          ("logits_gpt2_sp", True, GPT2)])
def test_tp_forward_logits_equal_one_process(ranks, key, sp, model):
    ref = _logits("none", model=model)
    for r in ranks:
        err = (r[key] - ref).abs().max().item()
        assert r[key].shape == ref.shape and err <= 1e-5, err


def test_fused_rows_regrouped_per_rank(ranks):
    for r in ranks:
        lay = r["layout"]
        assert lay["qkv"] == 0 and lay["fc"] == 0, lay
        assert lay["heads"] == (2, 1)  # H/tp query heads, K/tp key/value heads
        assert lay["proj_cols"] == (32, 16)  # row-wise: this rank's heads' columns
        assert "Shard(dim=0)" in lay["placements"]


def test_state_leaves_in_the_models_row_order(ranks):
    for r in ranks:
        s = r["state_order"]
        assert s["back_model"] == 0 and s["back_optim"] == 0, s
        assert s["optim_model_order"] == 0, s
    assert ranks[0]["state_order"]["model_order"] == 0


def test_fused_row_order():
    from lmforge.parallel.tp import fused_row_order

    order = fused_row_order([4, 2, 2], 2)  # q 4 rows, k 2, v 2 over 2 ranks
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert fused_row_order([3, 3], 1).tolist() == list(range(6))


def test_plan_covers_every_parameter():
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.tp import check_tp

    for over in ({}, dict(n_kv_head=4, qk_norm=True), GPT2, MOE):
        net = Transformer(tiny_config(**over))
        plan = check_tp(net, 2)
        assert plan["blocks.0.attn.qkv"] == "colwise_qkv" and plan["blocks.1.attn.proj"] == "rowwise"
    assert check_tp(Transformer(tiny_config(**MOE)), 2)["blocks.0.mlp.shared.fc"] == "colwise_gate_up"
    assert check_tp(Transformer(tiny_config()), 2, sequence_parallel=True)["norm_f"] == "replicate_partial"

