"""Activation recompute (gradient checkpointing): trade compute for memory.

Knows how to wrap blocks of a Transformer from outside (the model never
imports this): a wrapped block runs under ``torch.utils.checkpoint``
(non-reentrant), so its activations are dropped after the forward and
recomputed in the backward.

Policies:

* ``none``: keep everything (fastest, most memory).
* ``full``: every block keeps only its input; the whole block is recomputed.
* ``every:K``: blocks 0, K, 2K, ... are recomputed (a middle ground).
* ``selective``: every block, but the outputs of matrix multiplies (the
  expensive part) are saved and only attention, norms and activation functions
  are recomputed (Korthikanti et al. 2022's "selective recomputation").
"""
from __future__ import annotations

import torch


def parse_policy(policy: str, n_layer: int) -> list[str | None]:
    if policy in ("none", "", None):
        return [None] * n_layer
    if policy == "full":
        return ["full"] * n_layer
    if policy == "selective":
        return ["selective"] * n_layer
    if policy.startswith("every:"):
        try:
            k = int(policy.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"recompute policy {policy!r}: expected every:K with K >= 1")
        return ["full" if i % k == 0 else None for i in range(n_layer)]
    raise ValueError(f"unknown recompute policy {policy!r}; expected none, full, every:K or selective")


def apply_recompute(model, policy: str) -> None:
    """Wrap each block the policy names so its forward runs under ``torch.utils.checkpoint``
    (non-reentrant); the model's code knows nothing of it (the block's ``forward`` is replaced on the
    instance, so parameter names and checkpoints are unchanged). ``none`` removes the wrappers."""
    for block, mode in zip(model.blocks, parse_policy(policy, len(model.blocks))):
        block.__dict__.pop("forward", None)  # back to the class's forward
        block.recompute = mode
        if mode is not None:
            block.forward = _checkpointed(block, mode)


def _checkpointed(block, mode: str):
    inner = type(block).forward.__get__(block)

    def forward(x, ctx):
        if not (block.training and torch.is_grad_enabled()):
            return inner(x, ctx)
        from torch.utils.checkpoint import checkpoint

        kw = {"context_fn": _selective_context} if mode == "selective" else {}
        return checkpoint(inner, x, ctx, use_reentrant=False, **kw)
    return forward


_SAVE_OPS = None


def _selective_context():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    global _SAVE_OPS
    if _SAVE_OPS is None:
        aten = torch.ops.aten
        _SAVE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
