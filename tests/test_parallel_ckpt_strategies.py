"""Distributed checkpoints across the sharding strategies (lmforge.parallel.checkpoint): tensor parallel
(fused projections regrouped per rank, undone in its dcp_state) and ZeRO-3 (flat per-parameter pieces,
whole tensors in its dcp_state) save on 2 ranks and resume in one process; a one-process checkpoint
resumes under TP and ZeRO-2 on 2 ranks. One set of 2 processes runs the 2-rank runs in turn."""
from __future__ import annotations

import pytest

from parallel_harness import run_ranks
from test_parallel_ckpt import _ck, assert_restored, assert_resumed, ck_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("strategies")
    one = ck_train("none", save_at=2, run_dir=str(d / "one"))
    seq = [dict(parallel="tp", save_at=2, run_dir=str(d / "tp")),
           dict(parallel="zero3", save_at=2, run_dir=str(d / "zero3")),
           dict(parallel="tp", resume=str(_ck(d / "one"))),
           dict(parallel="zero2", resume=str(_ck(d / "one")))]
    ranks = run_ranks(2, "test_parallel_ckpt:sequence", runs=seq)
    return {"dir": d, "one": one, "ranks": ranks[0]}


@pytest.mark.parametrize("parallel", ["tp", "zero3"])
def test_saved_on_2_ranks_resumes_on_1(runs, parallel):
    saved = runs["ranks"][["tp", "zero3"].index(parallel)]
    got = ck_train("none", resume=str(_ck(runs["dir"] / parallel)))
    assert_restored(saved, got)
    print(f"{parallel} 2 -> 1 process: max difference {assert_resumed(saved, got, 2):.2g}")


@pytest.mark.parametrize("parallel", ["tp", "zero2"])
def test_one_process_resumes_on_2_ranks(runs, parallel):
    got = runs["ranks"][2 + ["tp", "zero2"].index(parallel)]
    assert_restored(runs["one"], got)
    print(f"1 process -> {parallel} 2: max difference {assert_resumed(runs['one'], got, 2):.2g}")
