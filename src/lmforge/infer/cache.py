"""KV cache: keep every layer's keys and values so decoding reads, not recomputes, the past.

Knows tensors and positions, nothing about tokens or sampling. ``KVCache`` is the
contiguous cache for one batch of rows that advance together: per layer a
``(B, K, max_len, D)`` buffer for keys and one for values, and the number of
positions filled. The model's forward (``Transformer.forward(..., cache=c)``)
writes the new positions' keys and values and attends over everything so far.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, cfg, batch_size: int, max_len: int, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.max_len = max_len
        shape = (batch_size, cfg.kv_heads, max_len, cfg.hd)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.pos = 0  # positions filled (the next token's position)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write (B, K, T, D) keys/values at the current position; return all keys/values so far."""
        T = k.shape[2]
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, T: int) -> None:
        self.pos += T

    def reset(self) -> None:
        self.pos = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
