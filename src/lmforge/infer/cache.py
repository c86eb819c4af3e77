"""KV cache: keep every layer's keys and values so decoding reads, not recomputes, the past.

Knows tensors, positions and the layers' cache specs (``model.cache_specs()``), nothing
about tokens or sampling. ``KVCache`` is the contiguous cache for one batch of rows that
advance together: per layer, as that layer's spec says (``KVSpec(kv_heads, head_dim,
window)``), a ``(B, kv_heads, max_len, head_dim)`` buffer for keys and one for values, and
the number of positions filled. The model's forward (``Transformer.forward(..., cache=c)``)
writes the new positions' keys and values and attends over everything so far (a windowed
layer keeps every position too: the mask, not the buffer, applies the window).

**Caches by spec.** ``kv_specs(source)`` reads the per-layer specs (from a list of specs, a
model or a ``ModelConfig``) and refuses, naming the layer and the kind, any spec that is not
exactly a ``KVSpec``: the one kind these caches implement. Other kinds plug in here without
changing the model's attention contract (``ctx.cache.update(layer, ...)``):

* a per-token latent (MLA): a token-indexed spec whose ``entry_shapes()`` is one ``(latent,)``
  entry; the cache would allocate per layer one ``(B, max_len, *shape)`` buffer per entry
  shape (instead of the fixed key and value pair) and ``update`` would write and return the
  entries the layer gave it;
* a fixed per-sequence state (Mamba: ``token_indexed = False``, ``state_shapes()``): per layer
  one ``(B, *shape)`` tensor per state shape, overwritten (not appended to) by each step, so
  its size does not grow with ``max_len``; ``pos`` still counts positions for the layers
  that are token-indexed.
"""
from __future__ import annotations

import torch

from ..model.layers import KVSpec


def kv_specs(source, who: str = "KV cache") -> list[KVSpec]:
    """The per-layer ``KVSpec`` list of ``source``: a list of specs, a model (``cache_specs()``) or a
    ``ModelConfig`` (its specs, read from a meta-device model). A ValueError names the first layer
    whose spec is another kind (these caches hold plain keys and values only)."""
    if isinstance(source, (list, tuple)):
        specs = list(source)
    elif hasattr(source, "cache_specs"):
        specs = source.cache_specs()
    elif hasattr(source, "layer_specs"):  # a ModelConfig
        specs = source._meta_model().cache_specs()
    else:
        raise TypeError(f"{who}: expected a list of cache specs, a model or a ModelConfig, "
                        f"got {type(source).__name__}")
    if not specs:
        raise ValueError(f"{who}: no layers to cache")
    for i, s in enumerate(specs):
        if type(s) is not KVSpec:
            kind = "no cache spec (None)" if s is None else f"a {type(s).__name__} spec"
            raise ValueError(f"{who}: layer {i} has {kind}; this cache implements only KVSpec (plain keys and "
                             "values per token)")
    return specs


class KVCache:
    """``KVCache(specs | model | cfg, batch_size, max_len)``: per layer, keys and values as its spec says."""

    def __init__(self, specs, batch_size: int, max_len: int, device="cpu", dtype=torch.float32):
        self.specs = kv_specs(specs, "KVCache")
        self.max_len = max_len
        self.k = [torch.zeros((batch_size, s.kv_heads, max_len, s.head_dim), device=device, dtype=dtype)
                  for s in self.specs]
        self.v = [torch.zeros_like(k) for k in self.k]
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
