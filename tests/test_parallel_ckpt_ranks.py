"""Distributed checkpoints on 2 ranks (lmforge.parallel.checkpoint): a DDP checkpoint of 2 ranks
resumes on 2 (bit for bit) and under FSDP2; a single-process checkpoint resumes under FSDP2 on 2
ranks; damaged and foreign checkpoints give the same ValueError on every rank (no hang). (On 4
ranks: test_parallel_ckpt_world4.py.)

The runs are ``test_parallel_ckpt.ck_train``; one set of 2 processes runs them in turn
(``sequence``), so the module starts processes once.
"""
from __future__ import annotations

import json

import pytest

from parallel_harness import run_ranks
from test_parallel_ckpt import _ck, _damaged_copies, assert_restored, assert_resumed, ck_train


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    one = ck_train("none", save_at=2, run_dir=str(d / "one"))  # a one-process DCP checkpoint (to damage)
    single = ck_train("none", save_at=2, run_dir=str(d / "single"), single=True)  # the single-process format
    bad = _damaged_copies(_ck(d / "one"), d / "bad")
    runs = [dict(parallel="ddp", save_at=2, run_dir=str(d / "ddp")),
            dict(parallel="ddp", resume=str(d / "ddp" / "checkpoints" / "step-0000002")),
            dict(parallel="fsdp", resume=str(d / "ddp" / "checkpoints" / "step-0000002")),
            dict(parallel="fsdp", resume=str(_ck(d / "single"))),
            dict(parallel="fsdp", resume=str(bad["truncated"]), error=True),
            dict(parallel="ddp", resume=str(bad["missing"]), error=True),
            dict(parallel="fsdp", resume=str(bad["metadata"]), error=True),
            dict(parallel="fsdp", resume=str(_ck(d / "one")), model={"d_ff": 96}, error=True),
            dict(parallel="ddp", resume=str(_ck(d / "one")), optimizer="muon", ema_start=None, error=True)]
    ranks = run_ranks(2, "test_parallel_ckpt:sequence", runs=runs)
    return {"dir": d, "one": one, "single": single, "ranks": ranks, "bad": bad}


def test_ddp_resumes_on_2_ranks_bit_for_bit(two):
    saved, again = two["ranks"][0][:2]
    ck = _ck(two["dir"] / "ddp")
    tr = json.loads((ck / "trainer.json").read_text())
    assert tr["saved_by"]["strategy"] == "ddp" and tr["saved_by"]["world_size"] == 2
    assert_restored(saved, again)
    assert_resumed(saved, again, 2, tol=0.0)


def test_ddp_checkpoint_resumes_under_fsdp(two):
    saved, _, fsdp = two["ranks"][0][:3]
    assert_restored(saved, fsdp)
    print(f"ddp 2 -> fsdp 2: max difference {assert_resumed(saved, fsdp, 2):.2g}")


def test_single_process_checkpoint_into_fsdp_2_ranks(two):
    got = two["ranks"][0][3]
    assert got["info"]["saved_by"]["format"] == "single-process"
    assert_restored(two["single"], got)
    print(f"single process -> fsdp 2: max difference {assert_resumed(two['single'], got, 2):.2g}")


def test_bad_checkpoints_raise_on_every_rank(two):
    r0, r1 = (r[4:] for r in two["ranks"])
    assert r0 == r1  # the same error, on both ranks
    truncated, missing, metadata, other, optim = r0
    one = str(_ck(two["dir"] / "one"))
    assert truncated.startswith("ValueError") and "dcp/__0_0.distcp is truncated" in truncated
    assert missing.startswith("ValueError") and "dcp/__0_0.distcp is missing" in missing
    assert metadata.startswith("ValueError") and "cannot read dcp/.metadata" in metadata
    assert other == (f"ValueError: {one}: parameter 'blocks.0.mlp.fc.weight' has shape (128, 32) in the checkpoint, "
                     "(192, 32) in this model (a checkpoint of another model configuration)"), other
    assert optim.startswith(f"ValueError: {one}: optimizer 0 (AdamW in the checkpoint, Muon here)"), optim
