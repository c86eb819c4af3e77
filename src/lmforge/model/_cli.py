"""The ``lmforge model info`` and ``lmforge export`` subcommands.

Knows their arguments, help texts and how they print a model's sizes and HF
family, or write its HF or GGUF export; knows nothing of the model's code or file
formats (``config``, ``hf``, ``lmforge.quant.gguf_model``, imported only by
``export --format gguf``), nor of the other stages' subcommands. A distributed
training checkpoint (``lmforge.parallel.checkpoint``) is consolidated to a
temporary model directory first, then exported as any other.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import tempfile
from pathlib import Path

from .._cli_common import _checkpoint, _group


def _export_line(st: dict) -> str:
    if st["exports"]:
        others = [f for f in st["expressible_as"] if f != st["arch"]]
        return f"{st['arch']} ({st['hf_class']}" + (f"; also expressible as {', '.join(others)}" if others else "") + ")"
    also = f"; expressible as {', '.join(st['expressible_as'])} (--arch)" if st["expressible_as"] else ""
    return f"not by default: {st['why']}{also}"


def cmd_model_info(a) -> int:
    from . import PRESETS, describe, load_config, preset
    from .hf import export_status

    if a.name is None:  # every preset, one line each
        rows = []
        for name in PRESETS:
            cfg = preset(name)
            rows.append({"name": name, "params": cfg.num_params(), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                         "hf_export": export_status(cfg)})
        if a.json:
            print(json.dumps(rows))
            return 0
        print(f"{'preset':<16} {'params':>13}  {'layers x width':<15} HF family")
        for r in rows:
            st = r["hf_export"]
            fam = st["arch"] if st["exports"] else "- (" + (", ".join(st["expressible_as"]) or "none") + " with --arch)"
            print(f"{r['name']:<16} {r['params']:>13,}  {r['n_layer']:>3} x {r['d_model']:<9} {fam}")
        print("(vocabularies as the presets name them; `lmforge pretrain` sizes it to the tokenizer)")
        return 0
    if a.name in PRESETS:
        cfg = preset(a.name)
    elif Path(a.name).is_dir():
        cfg = load_config(a.name)
    else:
        from .._config import UsageError

        if Path(a.name).is_file():
            raise UsageError(f"{a.name} is a file; model info takes a preset or the model directory that holds it "
                             f"({Path(a.name).parent})")
        # a family name (gpt2, llama) means its first (smallest) preset; else the closest spelling
        close = [n for n in PRESETS if n.startswith(a.name.lower())][:1]
        close = close or difflib.get_close_matches(a.name.lower(), list(PRESETS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"{a.name!r} is neither a preset nor a model directory; {hint}presets: {', '.join(PRESETS)} "
                         "(`lmforge model info` lists them)")
    d = describe(cfg, a.seq_len)
    st = export_status(cfg)
    if a.json:
        print(json.dumps({"config": cfg.to_dict(), **d, "hf_export": st}))
        return 0
    print(f"{a.name}: {cfg.hf_family}-style, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), "
          f"d_model {cfg.d_model}, d_ff {cfg.ff}, vocab {cfg.vocab_size}, {cfg.pos} positions, {cfg.norm}, {cfg.ffn.activation}")
    print(f"parameters        {d['params']:,} ({d['params_non_embedding']:,} without embeddings)")
    if cfg.moe is not None:
        m, moe_layers = cfg.moe, sum(s.ffn == "moe" for s in cfg.layer_specs())
        shared = f", {m.n_shared} shared" if m.n_shared else ""
        print(f"experts           {m.n_experts} of {cfg.d_expert} in {moe_layers} of {cfg.n_layer} layers, top {m.top_k}"
              f"{shared}; {d['params_active']:,} parameters active per token")
    print(f"FLOPs/token       {d['flops_per_token_train']:,} training, {d['flops_per_token_forward']:,} forward "
          f"(at {d['seq_len']} tokens of context)")
    print(f"weights           {d['weights_mb_fp32']:,.1f} MB fp32, {d['weights_mb_bf16']:,.1f} MB bf16")
    print(f"training state    {d['train_state_mb_fp32_adamw']:,.1f} MB (fp32 weights, grads, AdamW moments)")
    print(f"KV cache          {d['kv_cache_bytes_per_token_bf16']:,} bytes/token in bf16")
    print(f"HF export         {_export_line(st)}")
    return 0


@contextlib.contextmanager
def _model_dir(path):
    """``path`` itself, or for a distributed training checkpoint (``dcp/`` shards) the model directory
    it consolidates to (temporary, removed after the export)."""
    from ..parallel.checkpoint import consolidate, is_dist_checkpoint

    if not is_dist_checkpoint(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-consolidated-") as d:
        yield str(consolidate(path, Path(d) / "model"))


def cmd_export(a) -> int:
    from .._config import UsageError

    _checkpoint(a.checkpoint)
    if a.format == "hf" and a.type is not None:
        raise UsageError("--type applies to --format gguf (an HF export is float32 safetensors)")
    with _model_dir(a.checkpoint) as ck:
        a.checkpoint = ck
        return _export_gguf(a) if a.format == "gguf" else _export_hf(a)


def _export_hf(a) -> int:
    from . import export_hf, load, load_tokens

    model, tok = load(a.checkpoint)
    out = export_hf(model, a.out, arch=a.arch, tokenizer=tok,
                    tokens=load_tokens(a.checkpoint, tok) if tok is not None else None)
    print(f"wrote {out} ({a.arch or model.cfg.hf_family}; load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _export_gguf(a) -> int:
    """``--format gguf``: one GGUF file (a quantized checkpoint is dequantized, then written as ``--type``)."""
    from .._config import UsageError
    from . import load, load_tokens

    if Path(a.out).is_dir():
        raise UsageError(f"--out {a.out} is a directory; a GGUF export is one file (e.g. {Path(a.out) / 'model.gguf'})")
    from ..quant import gguf_model

    try:
        from ..quant.checkpoint import is_quantized, load_quantized
    except ImportError:  # (the quantized checkpoint format not installed)
        is_quantized = None
    if is_quantized is not None and is_quantized(a.checkpoint):
        model, tok = load_quantized(a.checkpoint)
    else:
        model, tok = load(a.checkpoint)
    if tok is None:
        raise UsageError(f"{a.checkpoint}: no tokenizer; a GGUF for llama.cpp carries the model's tokenizer")
    kind = a.type or "f32"
    out = gguf_model.export_gguf(model, a.out, tok, tokens=load_tokens(a.checkpoint, tok), type=kind, arch=a.arch)
    size = out.stat().st_size
    print(f"wrote {out} ({gguf_model.resolve_arch(model.cfg, a.arch)}, {kind}, {size / 1e6:,.1f} MB; run it with "
          f"llama.cpp: llama-cli -m {out} -p 'Hello', or llama_cpp.Llama(model_path='{out}'))")
    return 0


def add_parser(sub) -> None:
    msub = _group(sub, "model", help="model: presets and sizes", description="Inspect model configurations.")
    mi = msub.add_parser("info", help="parameters, FLOPs per token, memory and HF family of a preset or checkpoint "
                         "(no name: every preset)",
                         description="Parameters, training/forward FLOPs per token, weight and training-state "
                         "memory, KV-cache size and the HF family `lmforge export` writes, of a preset (see "
                         "lmforge.model.PRESETS) or a model directory. With no name: a table of every preset.")
    mi.add_argument("name", nargs="?", default=None, help="a preset name or a model directory (none: list the presets)")
    mi.add_argument("--seq-len", type=int, default=None, help="context length for the attention FLOPs")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(fn=cmd_model_info)


def add_export_parser(sub) -> None:
    xp = sub.add_parser("export", help="write a checkpoint as an HF transformers directory or a GGUF file",
                        description="Export a model directory to HF format (config.json, model.safetensors, "
                        "tokenizer.json) that transformers.AutoModelForCausalLM loads, or (--format gguf) to one "
                        "GGUF file that llama.cpp runs (architectures llama, qwen2, qwen3; --type f32, f16, q8_0, "
                        "q4_0 or q4_k).")
    xp.add_argument("--checkpoint", required=True,
                    help="a model directory, or a training checkpoint (checkpoints/step-N; a distributed one, "
                    "with dcp/ shards, is consolidated first)")
    xp.add_argument("--format", choices=["hf", "gguf"], default="hf")
    xp.add_argument("--arch", default=None, choices=["gpt2", "llama", "mistral", "qwen2", "qwen3"],
                    help="HF family, or GGUF architecture (llama, qwen2, qwen3) (default: the config's arch)")
    xp.add_argument("--type", default=None, choices=["f32", "f16", "q8_0", "q4_0", "q4_k"],
                    help="--format gguf: the 2-D weights' tensor type (default f32; norms stay f32; q4_k rows "
                         "that are not a multiple of 256 are written q4_0)")
    xp.add_argument("--out", "-o", required=True, help="the HF directory, or the .gguf file")
    xp.set_defaults(fn=cmd_export)
