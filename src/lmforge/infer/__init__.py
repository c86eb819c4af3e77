"""Inference: KV cache (``cache``), paged cache with prefix caching (``paged``), continuous batching
(``engine``), sampling (``sampling``), the C decode step (``fastpath``) and the OpenAI-compatible
server (``server``, ``webchat``). Speculative decoding is not here yet.

``Engine``, ``SamplingParams`` and ``StepOutput`` are imported on first use (``from lmforge.infer
import Engine``), so importing the package loads only the contiguous cache.
"""
from .cache import KVCache

__all__ = ["Engine", "KVCache", "SamplingParams", "StepOutput"]

_LAZY = {"Engine": "engine", "StepOutput": "engine", "SamplingParams": "sampling"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
