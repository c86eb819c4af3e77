"""Distributed checkpoints of tensor-parallel runs (``parallel.checkpoint`` with ``TPStrategy``).

The regrouped fused rows ([q_0; k_0; v_0; q_1; ...], ``parallel.tp``) never reach a checkpoint: a TP
checkpoint holds the model's own row order, so it resumes under TP (bit for bit), under DDP on 2 ranks
and in one process, and consolidates to the model one process would have; DDP's and the single-process
checkpoints resume under TP. The runs are ``test_parallel_ckpt.ck_train`` (AdamW and a weight average,
or Muon), in one set of 2 processes (``sequence``).
"""
from __future__ import annotations

import json

import pytest
import torch

from parallel_harness import run_ranks
from test_parallel_ckpt import _ck, assert_restored, assert_resumed, ck_train


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("tpck")
    one = ck_train("none", run_dir=str(d / "one"))  # uninterrupted, one process
    one_muon = ck_train("none", optimizer="muon", ema_start=None)
    single = ck_train("none", save_at=2, run_dir=str(d / "single"), single=True)  # the single-process format
    runs = [dict(parallel="tp", save_at=2, run_dir=str(d / "tp")),  # 0
            dict(parallel="tp", resume=str(d / "tp" / "checkpoints" / "step-0000002")),  # 1
            dict(parallel="ddp", resume=str(d / "tp" / "checkpoints" / "step-0000002")),  # 2
            dict(parallel="ddp", save_at=2, run_dir=str(d / "ddp")),  # 3
            dict(parallel="tp", resume=str(d / "ddp" / "checkpoints" / "step-0000002")),  # 4
            dict(parallel="tp", resume=str(_ck(d / "single"))),  # 5
            dict(parallel="tp", save_at=2, run_dir=str(d / "tp_muon"), optimizer="muon", ema_start=None),  # 6
            dict(parallel="tp", resume=str(d / "tp_muon" / "checkpoints" / "step-0000002"), optimizer="muon",
                 ema_start=None)]  # 7
    ck_tp = str(d / "tp" / "checkpoints" / "step-0000002")
    runs += [dict(parallel="tp+fsdp", save_at=2, run_dir=str(d / "tpfsdp"), cfg=dict(tp_size=2)),  # 8: (1, 2)
             dict(parallel="ddp", resume=str(d / "tpfsdp" / "checkpoints" / "step-0000002")),  # 9
             dict(parallel="tp+fsdp", resume=ck_tp, cfg=dict(tp_size=2))]  # 10
    ranks = run_ranks(2, "test_parallel_ckpt:sequence", runs=runs, timeout=300)
    r = ranks[0]
    for i, kw in enumerate(runs):
        if kw["parallel"] in ("tp", "tp+fsdp"):
            _ema_in_model_order(r[i])
    return {"dir": d, "one": one, "one_muon": one_muon, "single": single, "r": r}


def _ema_in_model_order(res: dict) -> None:
    """``ck_train`` reads the weight average's DTensors itself (``full_tensor``): under TP their fused
    rows are regrouped, as the parameters they follow are; put them in the model's order to compare (the
    checkpoint itself holds the model's order: ``assert_restored`` compares what ``dcp_state`` gives)."""
    from lmforge.parallel.tp import fused_row_order

    from parallel_harness import tiny_config

    c = tiny_config()
    H, K, D, F = c.attn.n_head, c.kv_heads, c.hd, c.ff
    parts = {"attn.qkv.weight": [H * D, K * D, K * D], "mlp.fc.weight": [F, F]}
    for name, t in (res.get("ema") or {}).items():
        for suffix, sizes in parts.items():
            if name.endswith(suffix):
                res["ema"][name] = t[torch.argsort(fused_row_order(sizes, 2))]


def test_tp_run_equals_one_process(two):
    from parallel_harness import assert_same_training

    assert_same_training(two["one"], two["r"][0])
    assert_same_training(two["one_muon"], two["r"][6])


def test_tp_checkpoint_holds_the_models_row_order(two):
    """The saved weights and optimizer states are one process's at step 2 (it never saw a regrouped row)."""
    one_at2 = ck_train("none", save_at=2, run_dir=str(two["dir"] / "one2"))["at_save"]
    tp_at2 = two["r"][0]["at_save"]
    assert set(one_at2) == set(tp_at2)
    for k, t in one_at2.items():
        err = (tp_at2[k].float() - t.float()).abs().max().item()
        assert err <= 1e-5, f"{k}: {err:.3g} from one process"
    tr = json.loads((_ck(two["dir"] / "tp") / "trainer.json").read_text())
    assert tr["saved_by"]["strategy"] == "tp" and tr["saved_by"]["tp_size"] == 2


def test_tp_resumes_under_tp_bit_for_bit(two):
    saved, again = two["r"][0], two["r"][1]
    assert_restored(saved, again)
    assert_resumed(saved, again, 2, tol=0.0)
    assert_resumed(two["r"][6], two["r"][7], 2, tol=0.0)  # Muon's momentum too


def test_tp_checkpoint_resumes_under_ddp_and_in_one_process(two):
    saved = two["r"][0]
    ddp = two["r"][2]
    assert_restored(saved, ddp)
    assert_resumed(saved, ddp, 2, tol=1e-5)
    alone = ck_train("none", resume=str(_ck(two["dir"] / "tp")))
    assert_restored(saved, alone)
    assert_resumed(saved, alone, 2, tol=1e-5)


def test_ddp_and_single_process_checkpoints_resume_under_tp(two):
    ddp, tp = two["r"][3], two["r"][4]
    assert_restored(ddp, tp)
    assert_resumed(ddp, tp, 2, tol=1e-5)
    got = two["r"][5]
    assert got["info"]["saved_by"]["format"] == "single-process"
    assert_restored(two["single"], got)
    assert_resumed(two["single"], got, 2, tol=1e-5)


def test_tp_checkpoint_consolidates_to_the_model(two, tmp_path):
    from lmforge.model import load
    from lmforge.parallel.checkpoint import consolidate

    out = consolidate(_ck(two["dir"] / "tp"), tmp_path / "model")
    model, _ = load(out)
    at = two["r"][0]["at_save"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, at[f"model.{k}"]), k


def test_tp_fsdp_checkpoints_cross_strategies(two):
    """TP + FSDP2 (a (1, 2) mesh) saves the model's order too: DDP resumes it; it resumes a TP checkpoint."""
    r = two["r"]
    assert_resumed(two["one"], r[8], 0, tol=1e-5)  # the run itself equals one process
    assert_restored(r[8], r[9])
    assert_resumed(r[8], r[9], 2, tol=1e-5)
    assert_restored(r[0], r[10])
    assert_resumed(r[0], r[10], 2, tol=1e-5)
