"""Inference: KV cache (``cache``), paged cache with prefix caching (``paged``), continuous batching
(``engine``), sampling (``sampling``), the plain one-sequence loop (``loop``), the C decode step
(``fastpath``), the OpenAI-compatible server (``server``, ``webchat``) and the Python API (``llm``:
``LM``, what ``lmforge.load`` returns, and its ``Completion``). Speculative decoding is not here yet.

``KVCache``, ``Engine``, ``SamplingParams``, ``StepOutput``, ``LM`` and ``Completion`` are imported on
first use (``from lmforge.infer import Engine``), so importing the package (as the command line does for
its ``_cli`` module) loads nothing heavy.
"""
__all__ = ["Completion", "Engine", "KVCache", "LM", "SamplingParams", "StepOutput"]

_LAZY = {"KVCache": "cache", "Engine": "engine", "StepOutput": "engine", "SamplingParams": "sampling", "LM": "llm",
         "Completion": "llm"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
