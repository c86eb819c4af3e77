"""Inference: KV cache (``cache``), paged cache with prefix caching (``paged``), continuous batching
(``engine``), sampling (``sampling``), the C decode step (``fastpath``) and the OpenAI-compatible
server (``server``, ``webchat``). Speculative decoding is not here yet.
"""
from .cache import KVCache

__all__ = ["KVCache"]
