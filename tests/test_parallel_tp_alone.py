"""Tensor parallel on a single process: a mesh of one (legal, pointless), the same numbers as no strategy."""
from __future__ import annotations

from parallel_harness import assert_same_training, mini_train, run_ranks


def _alone() -> dict:
    """"tp" (with sequence parallel) and "tp+fsdp" on a single process: a mesh of one, the same numbers."""
    return {"tp": mini_train("tp", grad_clip=0.3, cfg=dict(sequence_parallel=True)),
            "tp+fsdp": mini_train("tp+fsdp", grad_clip=0.3, optimizer="muon", cfg=dict(tp_size=1))}


def test_tp_on_one_process():
    got = run_ranks(1, "test_parallel_tp_alone:_alone", timeout=200)[0]
    assert_same_training(mini_train("none", grad_clip=0.3), got["tp"])
    assert_same_training(mini_train("none", grad_clip=0.3, optimizer="muon"), got["tp+fsdp"])
    assert got["tp"]["describe"]["mesh"] == {"dp": 1, "tp": 1}
