"""Quantization: round-to-nearest integer and FP8 formats, LLM.int8(), SmoothQuant, GPTQ, AWQ; GGUF files.

Names are imported on first use (the ``_WHERE`` map), so importing the package (as the command line does for
``_cli``) loads nothing heavy. The model package never imports this one: quantized linears swap in from
outside through ``lmforge.model.surgery.replace_linear``.
"""

_WHERE: dict[str, str] = {}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
