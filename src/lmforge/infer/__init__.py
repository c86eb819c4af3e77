"""Inference: KV cache (``cache``), paged cache with prefix caching (``paged``), continuous batching
(``engine``), sampling (``sampling``), the C decode step (``fastpath``) and the OpenAI-compatible
server (``server``, ``webchat``), and the Python API (``llm``: ``LM``, what ``lmforge.load`` returns).
Speculative decoding is not here yet.
"""
from .cache import KVCache
from .engine import Engine
from .llm import LM, Completion
from .sampling import SamplingParams

__all__ = ["KVCache", "Engine", "SamplingParams", "LM", "Completion"]
