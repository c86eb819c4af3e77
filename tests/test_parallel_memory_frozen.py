"""Frozen parameters (a LoRA run's base weights) on 2 ranks: every strategy's measured bytes equal the
planner's exact figures, where a frozen tensor counts as weights only (no gradient, no optimizer state;
whole under DDP and ZeRO-1/2, a piece under ZeRO-3, FSDP2's and TP's shards)."""
from __future__ import annotations

from parallel_harness import run_ranks
from test_parallel_memory import _available

FREEZE = ("blocks.0.", "tok_emb")


def test_frozen_parameters_measured_equals_planned():
    names = _available()
    got = run_ranks(2, "test_parallel_memory:survey", timeout=300, strategies=names, optimizer="adamw",
                    freeze=FREEZE)
    for name in names:
        for rank, r in enumerate(got):
            res = r[name]
            assert "error" not in res, res.get("error")
            assert res["memory"] == res["want"], f"{name}, rank {rank}: measured {res['memory']}, planned {res['want']}"
        # the frozen tensors hold no gradient: fewer gradient bytes than parameter bytes on every strategy
        assert got[0][name]["memory"]["grads"] < got[0][name]["memory"]["params"] or name == "zero3"
