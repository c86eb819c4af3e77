"""The ``lmforge model info`` and ``lmforge export`` subcommands.

Knows their arguments, help texts and how they print a model's sizes and HF
family, or write its HF export; knows nothing of the model's code or file formats
(``config``, ``hf``), nor of the other stages' subcommands.
"""
from __future__ import annotations

import difflib
import json
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


def cmd_export(a) -> int:
    from . import export_hf, load, load_tokens

    _checkpoint(a.checkpoint)
    model, tok = load(a.checkpoint)
    out = export_hf(model, a.out, arch=a.arch, tokenizer=tok,
                    tokens=load_tokens(a.checkpoint, tok) if tok is not None else None)
    print(f"wrote {out} ({a.arch or model.cfg.hf_family}; load it with transformers.AutoModelForCausalLM.from_pretrained)")
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
    xp = sub.add_parser("export", help="write a checkpoint as an HF transformers directory",
                        description="Export a model directory to HF format (config.json, model.safetensors, "
                        "tokenizer.json) that transformers.AutoModelForCausalLM loads.")
    xp.add_argument("--checkpoint", required=True)
    xp.add_argument("--format", choices=["hf"], default="hf")
    xp.add_argument("--arch", default=None, choices=["gpt2", "llama", "mistral", "qwen2", "qwen3"],
                    help="HF family (default: the config's arch)")
    xp.add_argument("--out", "-o", required=True)
    xp.set_defaults(fn=cmd_export)
