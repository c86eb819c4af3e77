"""Dropout under tensor and sequence parallelism (2 gloo ranks).

Dropout cannot equal one process draw for draw; what TP must keep is checked instead: the replicated
regions draw the same masks on every rank (the replicas never drift apart, the run's RNG stream stays
in step), the sharded ones (a rank's heads; under SP its sequence shard) draw their own.
"""
from __future__ import annotations

import torch

from parallel_harness import run_ranks, tiny_config


def _dropout(sequence_parallel: bool) -> dict:
    """Train with dropout 0.1 under TP; the replicated parameters' copies, the losses, and masks drawn by a
    shard's dropout (``block.drop`` under SP) and by a replicated one (the embedding's ``drop``)."""
    from torch.distributed.tensor import DTensor, Replicate

    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import build_optimizers

    torch.set_num_threads(1)
    st = make_strategy(LoopConfig(parallel="tp", sequence_parallel=sequence_parallel))
    torch.manual_seed(0)
    net = Transformer(tiny_config(dropout=0.1))
    st.wrap(net)
    opts = st.wrap_optimizers(net, build_optimizers(net, "adamw", lr=1e-2, fused=False))
    data = torch.randint(0, 64, (3, 4, 17), generator=torch.Generator().manual_seed(3))
    losses = []
    for x in data:
        with st.micro_batch(net, last=True):
            _, loss = net(x[:, :-1], x[:, 1:])
            loss.backward()
        losses.append(loss.item())
        st.clip_grad_norm(net, 1.0)
        st.step(opts)
        st.zero_grad(opts)
    ones = torch.ones(2, 8, 32)
    return {"losses": losses, "rng": torch.get_rng_state(),
            "replicated": {n: p.to_local().clone() for n, p in net.named_parameters()
                           if isinstance(p, DTensor) and p.placements == (Replicate(),)},
            "shard_mask": net.blocks[0].drop(ones) if sequence_parallel else None,
            "attn_out": net.blocks[0].attn.forward is not type(net.blocks[0].attn).forward,
            "replicated_mask": net.drop(ones)}


def _dropouts() -> dict:
    return {"tp": _dropout(False), "sp": _dropout(True)}


def test_dropout_keeps_replicas_in_step_and_shards_apart():
    """Dropout cannot equal one process draw for draw; what TP must keep: the replicated regions draw the
    same masks on every rank (so the replicas never drift), the sharded ones (heads; SP's sequence
    shards) draw their own."""
    r0, r1 = run_ranks(2, "test_parallel_tp_dropout:_dropouts", timeout=200)
    for mode in ("tp", "sp"):
        a, b = r0[mode], r1[mode]
        assert a["losses"] == b["losses"] and all(2 < x < 6 for x in a["losses"])
        assert set(a["replicated"]) and set(a["replicated"]) == set(b["replicated"])
        for n in a["replicated"]:
            assert torch.equal(a["replicated"][n], b["replicated"][n]), f"{mode}: {n} drifted apart"
        assert torch.equal(a["rng"], b["rng"]), mode  # the run's stream in step on every rank
        assert a["attn_out"]  # the attention draws from the rank's stream
    assert torch.equal(r0["tp"]["replicated_mask"], r1["tp"]["replicated_mask"])  # (under SP: sliced)
    assert not torch.equal(r0["sp"]["shard_mask"], r1["sp"]["shard_mask"])
