"""The plain generation loop: one sequence, a contiguous KV cache, no engine.

Knows how to continue one prompt token by token: one forward over the prompt,
then one step per token (in one C call where ``fastpath`` serves the model),
each next token drawn by the engine's own ``Sampler`` (so a seeded sample is the
one the same ``SamplingParams`` give anywhere), until a stop id or the length.
It is what the trainer's and the pipeline's eval samples use; knows nothing of
batching, paged blocks, stop strings or text (``engine`` and ``llm`` do those).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .sampling import Sampler, SamplingParams


@torch.inference_mode()
def generate(model, ids: list[int], max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 0, stop: int | Sequence[int] | None = None) -> list[int]:
    """Sample with a KV cache: one forward over the prompt, then one token per step, until a ``stop`` id
    (not returned) or ``max_new_tokens``. ``temperature`` 0 (or below) is greedy; ``top_k`` None or 0 is
    off. A model with learned positions keeps the prompt's last tokens that leave room for all
    ``max_new_tokens``."""
    from .cache import KVCache
    from .fastpath import FastDecoder

    stops = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
    sampler = Sampler(SamplingParams(max_tokens=max_new_tokens, temperature=max(0.0, temperature),
                                     top_k=top_k or 0, seed=seed))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    limit = model.cfg.max_seq_len if model.cfg.pos == "learned" else len(ids) + max_new_tokens
    ids = list(ids)[-max(1, limit - max_new_tokens):] if len(ids) + max_new_tokens > limit else list(ids)
    cache = KVCache(model, 1, min(limit, len(ids) + max_new_tokens), device=dev,
                    dtype=next(model.parameters()).dtype)
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    out: list[int] = []
    fast = None
    if FastDecoder.supported(model):  # decode steps in one C call each (prefill stays in PyTorch)
        fast = FastDecoder(model)
        fast.bind(cache.k, cache.v)
    for _ in range(max_new_tokens):
        if cache.pos + x.shape[1] > cache.max_len:
            break
        if fast is not None and cache.pos > 0:
            logits = fast.step([out[-1]], [cache.pos], [[0]])[0]
            cache.advance(1)
        else:
            logits = model(x, cache=cache, logits_at="last")[0, -1].float().cpu()  # the head at the last position only
        nxt = sampler.sample(logits).token
        if nxt in stops:
            break
        out.append(nxt)
        if fast is None:
            x = torch.tensor([[nxt]], device=dev)
        else:
            x = x[:, :1]  # the C step takes the token itself; x only sets how many positions the next step adds
    if was_training:
        model.train()
    return out
