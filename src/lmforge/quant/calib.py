"""Calibration data for the methods that look at activations (GPTQ, AWQ, SmoothQuant).

Knows how to cut seeded token windows out of the shards ``lmforge data prepare`` writes (the train or
validation split, never the test split: that one is for reporting), how to record the inputs a model's
linears see on them (forward pre-hooks), and how to run the decoder one block at a time (the methods that
quantize block by block feed block i the outputs of the already quantized blocks < i). Knows nothing
about any quantization method or format.

* ``calibration_tokens(data_dir, n_samples, seq_len, seed, split)`` -> (n_samples, seq_len) int64:
  disjoint windows of the split's token stream (one token stream per split, documents run across
  windows), at a seeded random offset, in a seeded random order.
* ``capture_inputs(model, tokens, names)`` -> {name: (N, in_features) fp32}: the rows each named linear
  multiplies, in eval mode without gradients.
* ``block_inputs(model, tokens)`` -> [(B, T, C)] per batch: the hidden states entering block 0
  (embeddings, positions and dropout as the model's own forward makes them).
* ``run_block(model, i, h)`` -> block i's output for hidden states h (B, T, C) at positions 0..T-1 with
  a plain causal mask (a block's sliding window, if it has one, applied as the model applies it).

Shapes: N rows (= batch x time), B batch, T time, C = d_model.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


def calibration_tokens(data_dir: str | os.PathLike, n_samples: int = 128, seq_len: int = 256, seed: int = 0,
                       split: str = "train") -> torch.LongTensor:
    """``n_samples`` windows of ``seq_len`` tokens from ``split`` ("train" or "val") of the shards in
    ``data_dir``: disjoint, seeded (the same arguments give the same windows). The test split is refused
    (it is for reporting, not for choosing weights); a split with fewer than ``n_samples * seq_len``
    tokens is an error naming the directory, the split and how many tokens it has and needs."""
    from ..data.loader import TokenStream

    if split == "test":
        raise ValueError(f"calibration: split 'test' of {data_dir} is for reporting only; calibrate on "
                         "'train' (the default) or 'val'")
    if split not in ("train", "val"):
        raise ValueError(f"calibration: split: got {split!r}, expected 'train' or 'val'")
    for field, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"calibration: {field}: got {v!r}, expected an integer >= 1")
    stream = TokenStream(data_dir, split)
    need = n_samples * seq_len
    if stream.n < need:
        raise ValueError(f"calibration: {Path(data_dir)}: split {split!r} has {stream.n} tokens, fewer than the "
                         f"{need} asked for ({n_samples} samples x {seq_len} tokens); ask for fewer samples or "
                         "shorter windows, or prepare more data")
    rng = np.random.default_rng([seed, n_samples, seq_len])
    slack = stream.n - need
    offset = int(rng.integers(min(slack, seq_len - 1) + 1))
    n_windows = (stream.n - offset) // seq_len  # >= n_samples since offset <= slack
    starts = offset + rng.permutation(n_windows)[:n_samples] * seq_len
    out = np.stack([stream.read(int(s), seq_len) for s in starts])
    return torch.from_numpy(out)


def _batches(tokens: torch.Tensor, batch_size: int):
    if tokens.dim() != 2:
        raise ValueError(f"calibration: tokens: expected a (samples, seq_len) tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"calibration: batch_size: got {batch_size}, expected >= 1")
    for s in range(0, tokens.shape[0], batch_size):
        yield tokens[s:s + batch_size]


class _Stop(Exception):
    pass


def _device(model: nn.Module):
    return next(model.parameters()).device


def capture_inputs(model: nn.Module, tokens: torch.Tensor, names: list[str], batch_size: int = 8,
                   max_rows: int | None = None) -> dict[str, torch.Tensor]:
    """The inputs of the named modules (linears) over ``tokens`` (S, T): {name: (N, in_features) fp32},
    N = S * T rows in token order (or the first ``max_rows`` of them). Eval mode, no gradients; the
    model's training flag is restored after."""
    mods = dict(model.named_modules())
    missing = [n for n in names if n not in mods]
    if missing:
        linears = [n for n, m in mods.items() if isinstance(m, nn.Linear)]
        near = {n: fnmatch.filter(linears, "*" + n.rsplit(".", 1)[-1]) for n in missing}
        raise ValueError(f"capture_inputs: no module named {', '.join(repr(n) for n in missing)} in the model "
                         f"(linears like it: {', '.join(sorted(set(sum(near.values(), []))))[:300] or 'none'})")
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    rows = {n: 0 for n in names}

    def hook_for(name):
        def hook(_mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if max_rows is not None:
                x = x[: max(0, max_rows - rows[name])]
            if x.shape[0]:
                got[name].append(x.cpu())
                rows[name] += x.shape[0]
            if max_rows is not None and all(r >= max_rows for r in rows.values()):
                raise _Stop
        return hook

    handles = [mods[n].register_forward_pre_hook(hook_for(n)) for n in names]
    was = model.training
    model.eval()
    dev = _device(model)
    try:
        with torch.no_grad():
            for x in _batches(tokens, batch_size):
                try:
                    model(x.to(dev))
                except _Stop:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {n: torch.cat(v) if v else torch.zeros(0, mods[n].in_features if hasattr(mods[n], "in_features") else 0)
            for n, v in got.items()}


def block_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> list[torch.Tensor]:
    """The hidden states entering block 0, one (B, T, C) tensor per batch of ``tokens`` (the model's own
    embedding code makes them: token and learned-position embeddings, dropout in eval = identity)."""
    out: list[torch.Tensor] = []

    def grab(_mod, args):
        out.append(args[0].detach())
        raise _Stop

    h = model.blocks[0].register_forward_pre_hook(grab)
    was = model.training
    model.eval()
    dev = _device(model)
    try:
        with torch.no_grad():
            for x in _batches(tokens, batch_size):
                try:
                    model.hidden_states(x.to(dev))
                except _Stop:
                    pass
    finally:
        h.remove()
        model.train(was)
    return out


def run_block(model: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
    """Block ``i``'s output for hidden states ``h`` (B, T, C) at positions 0..T-1, plain causal attention
    (what ``model.hidden_states`` does for that block, without a cache or padding). No gradients."""
    from ..model.transformer import Context

    n = len(model.blocks)
    if not 0 <= i < n:
        raise ValueError(f"run_block: block {i}: the model has blocks 0..{n - 1}")
    if h.dim() != 3:
        raise ValueError(f"run_block: h: expected (B, T, C) hidden states, got shape {tuple(h.shape)}")
    T = h.shape[1]
    rope = None if model.cfg.pos == "learned" else model._rope(T, h.dtype)
    ctx = Context(rope, None, model._mask_fn(T, 0, h.device, None, None, None), None)
    with torch.no_grad():
        return model.blocks[i](h, ctx)
