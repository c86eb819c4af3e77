"""Inference: KV cache (``cache``), and later paged cache, batching, sampling and serving."""
from .cache import KVCache

__all__ = ["KVCache"]
