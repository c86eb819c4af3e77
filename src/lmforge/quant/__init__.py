"""Quantization: round-to-nearest integer and FP8 formats, LLM.int8(), SmoothQuant, GPTQ, AWQ; GGUF files.

Names are imported on first use (the ``_WHERE`` map), so importing the package (as the command line does for
``_cli``) loads nothing heavy. The model package never imports this one: quantized linears swap in from
outside through ``lmforge.model.surgery.replace_linear``.
"""

_WHERE = {
    **dict.fromkeys(("QuantConfig", "check_config", "METHODS"), "config"),
    **dict.fromkeys(("quantize", "model_bytes"), "api"),
    **dict.fromkeys(("QuantLinear", "IntLinear", "FP8Linear", "FORMATS", "register_format", "format_class"), "linear"),
    **dict.fromkeys(("save_quantized", "load_quantized", "is_quantized"), "checkpoint"),
    **dict.fromkeys(("rtn_quantize", "dequantize_codes", "pack_nibbles", "unpack_nibbles", "fp8_quantize"), "formats"),
    "LLMInt8Linear": "llm_int8", "W8A8Linear": "smoothquant", "smooth_model": "smoothquant",
    **dict.fromkeys(("GGMLType", "GGUFValueType", "read_gguf", "write_gguf"), "gguf"),
    **dict.fromkeys(("calibration_tokens", "capture_inputs", "block_inputs", "run_block"), "calib"),
    "gptq_quantize": "gptq",
    "export_gguf": "gguf_model", "import_gguf": "gguf_model",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
