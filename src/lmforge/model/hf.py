"""HF ``transformers`` directories, both ways: GPT-2, Llama, Mistral, Qwen2, Qwen3.

Knows how each family names and shapes its tensors and config fields, and how
they map onto lmforge's one decoder; knows nothing about training. Weights move
as safetensors; ``transformers`` itself is not needed to export or import (tests
load the results with it to prove parity).

Mapping (lmforge name -> HF name, per layer i):

| lmforge | GPT-2 (Conv1D: stored transposed) | Llama family |
| --- | --- | --- |
| tok_emb | transformer.wte | model.embed_tokens |
| pos_emb | transformer.wpe | (RoPE) |
| blocks.i.attn_norm | transformer.h.i.ln_1 | model.layers.i.input_layernorm |
| blocks.i.attn.qkv = [q; k; v] | h.i.attn.c_attn | self_attn.q_proj, k_proj, v_proj |
| blocks.i.attn.proj | h.i.attn.c_proj | self_attn.o_proj |
| blocks.i.attn.q_norm, k_norm | - | self_attn.q_norm, k_norm (Qwen3) |
| blocks.i.mlp_norm | h.i.ln_2 | post_attention_layernorm |
| blocks.i.mlp.fc = [gate; up] | h.i.mlp.c_fc | mlp.gate_proj, mlp.up_proj |
| blocks.i.mlp.proj | h.i.mlp.c_proj | mlp.down_proj |
| norm_f | transformer.ln_f | model.norm |
| lm_head | lm_head (tied) | lm_head |
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .config import ModelConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _need(cond: bool, arch: str, field: str, what: str) -> None:
    if not cond:
        raise ValueError(f"cannot export as {arch}: ModelConfig.{field} must be {what}")


def check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Raise a ValueError naming the first field that ``arch`` cannot express."""
    if arch not in HF_CLASSES:
        raise ValueError(f"unknown HF architecture {arch!r}; lmforge exports {', '.join(HF_CLASSES)}")
    _need(cfg.logit_softcap is None, arch, "logit_softcap", "None")
    if arch == "gpt2":
        for f, v in (("norm", "layernorm"), ("mlp", "gelu_tanh"), ("pos", "learned")):
            _need(getattr(cfg, f) == v, arch, f, repr(v))
        for f in ("norm_bias", "qkv_bias", "out_bias", "mlp_bias"):
            _need(getattr(cfg, f), arch, f, "True")
        _need(cfg.kv_heads == cfg.n_head, arch, "n_kv_head", "None (GPT-2 has no GQA)")
        _need(not cfg.qk_norm, arch, "qk_norm", "False")
        _need(cfg.sliding_window is None, arch, "sliding_window", "None")
        _need(cfg.head_dim in (None, cfg.d_model // cfg.n_head), arch, "head_dim", "d_model // n_head")
        return
    for f, v in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("pos", "rope")):
        _need(getattr(cfg, f) == v, arch, f, repr(v))
    _need(arch == "qwen3" or not cfg.qk_norm, arch, "qk_norm", "False (only Qwen3 has it)")
    if arch == "qwen3":
        _need(cfg.qk_norm, arch, "qk_norm", "True")
    _need(arch == "llama" or not cfg.mlp_bias, arch, "mlp_bias", "False")
    if arch == "qwen2":
        _need(cfg.qkv_bias and not cfg.out_bias, arch, "qkv_bias/out_bias", "True/False (Qwen2's layout)")
    else:
        _need(cfg.qkv_bias == cfg.out_bias, arch, "out_bias", "equal to qkv_bias (one attention_bias flag)")
    if arch in ("llama", "qwen2", "qwen3"):
        _need(cfg.sliding_window is None, arch, "sliding_window", f"None ({arch} export has no sliding window)")
    if arch != "llama":
        _need(cfg.rope_scaling is None, arch, "rope_scaling", "None")


def hf_config(cfg: ModelConfig, arch: str, bos: int | None = None, eos: int | None = None) -> dict:
    check_exportable(cfg, arch)
    common = {"architectures": [HF_CLASSES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
              "bos_token_id": bos, "eos_token_id": eos}
    if arch == "gpt2":
        return {**common, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True, "use_cache": True}
    d = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
         "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
         "rope_theta": cfg.rope_theta, "attention_dropout": cfg.dropout, "use_cache": True,
         "initializer_range": cfg.init_std}
    if cfg.rope_scaling:
        rs = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        d["rope_scaling"] = {"rope_type": "llama3", **rs}
    if arch == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif arch == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    elif arch == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif arch == "qwen3":
        d.update(attention_bias=cfg.qkv_bias, use_sliding_window=False, sliding_window=None,
                 max_window_layers=cfg.n_layer)
    return d


def config_from_hf(d: dict) -> ModelConfig:
    """The ModelConfig of an HF ``config.json`` dict."""
    arch = d.get("model_type")
    if arch == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT-2 config: activation_function {act!r} is not supported (expected gelu_new)")
        return ModelConfig(vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
                           d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"],
                           max_seq_len=d.get("n_positions", 1024), norm_eps=d.get("layer_norm_epsilon", 1e-5),
                           tie_embeddings=d.get("tie_word_embeddings", True), arch="gpt2")
    if arch not in LLAMA_FAMILY:
        raise ValueError(f"HF model_type {arch!r} is not one lmforge imports ({', '.join(HF_CLASSES)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{arch} config: hidden_act {d.get('hidden_act')!r} is not supported (expected silu)")
    rp = d.get("rope_parameters") or {}
    theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
    rs = d.get("rope_scaling") or (rp if rp.get("rope_type") not in (None, "default") else None)
    scaling = None
    if rs:
        t = rs.get("rope_type", rs.get("type"))
        if t != "llama3":
            raise ValueError(f"{arch} config: rope scaling {t!r} is not supported (only llama3)")
        scaling = {"type": "llama3", **{k: rs[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                                             "original_max_position_embeddings")}}
    window = None
    if arch == "mistral":
        window = d.get("sliding_window")
    elif d.get("use_sliding_window"):
        raise ValueError(f"{arch} config: use_sliding_window=true is not supported")
    n_head = d["num_attention_heads"]
    bias = bool(d.get("attention_bias", False))
    return ModelConfig(
        vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
        head_dim=d.get("head_dim") or d["hidden_size"] // n_head, d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        norm_bias=False, mlp="swiglu", pos="rope", rope_theta=float(theta), rope_scaling=scaling,
        qk_norm=arch == "qwen3", qkv_bias=True if arch == "qwen2" else bias,
        out_bias=False if arch == "qwen2" else bias, mlp_bias=bool(d.get("mlp_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=window, arch=arch)


def to_hf_state(model, arch: str) -> dict[str, torch.Tensor]:
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.hd
    if arch == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"].t()  # Conv1D stores (in, out)
                out[h + theirs + ".bias"] = sd[b + ours + ".bias"]
        out["transformer.ln_f.weight"] = sd["norm_f.weight"]
        out["transformer.ln_f.bias"] = sd["norm_f.bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[b + "mlp_norm.weight"]
            q, k, v = sd[b + "attn.qkv.weight"].split([H * D, K * D, K * D])
            out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
            out[h + "self_attn.v_proj.weight"] = v
            if cfg.qkv_bias:
                q, k, v = sd[b + "attn.qkv.bias"].split([H * D, K * D, K * D])
                out[h + "self_attn.q_proj.bias"], out[h + "self_attn.k_proj.bias"] = q, k
                out[h + "self_attn.v_proj.bias"] = v
            out[h + "self_attn.o_proj.weight"] = sd[b + "attn.proj.weight"]
            if cfg.out_bias:
                out[h + "self_attn.o_proj.bias"] = sd[b + "attn.proj.bias"]
            if cfg.qk_norm:
                out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
                out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
            gate, up = sd[b + "mlp.fc.weight"].chunk(2)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = sd[b + "mlp.proj.weight"]
            if cfg.mlp_bias:
                gb, ub = sd[b + "mlp.fc.bias"].chunk(2)
                out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gb, ub
                out[h + "mlp.down_proj.bias"] = sd[b + "mlp.proj.bias"]
        out["model.norm.weight"] = sd["norm_f.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge state dict from HF tensors (missing tensors raise a KeyError naming them)."""
    def get(name):
        if name in hf:
            return hf[name]
        alt = name.removeprefix("transformer.")  # the original GPT-2 files have no prefix
        if alt in hf:
            return hf[alt]
        raise KeyError(f"the HF checkpoint has no tensor {name!r}")

    sd: dict[str, torch.Tensor] = {}
    if cfg.arch == "gpt2":
        sd["tok_emb.weight"] = get("transformer.wte.weight")
        sd["pos_emb.weight"] = get("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                sd[b + ours + ".weight"] = get(h + theirs + ".weight")
                sd[b + ours + ".bias"] = get(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                sd[b + ours + ".weight"] = get(h + theirs + ".weight").t()
                sd[b + ours + ".bias"] = get(h + theirs + ".bias")
        sd["norm_f.weight"] = get("transformer.ln_f.weight")
        sd["norm_f.bias"] = get("transformer.ln_f.bias")
    else:
        sd["tok_emb.weight"] = get("model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            sd[b + "attn_norm.weight"] = get(h + "input_layernorm.weight")
            sd[b + "mlp_norm.weight"] = get(h + "post_attention_layernorm.weight")
            sd[b + "attn.qkv.weight"] = torch.cat([get(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
            if cfg.qkv_bias:
                sd[b + "attn.qkv.bias"] = torch.cat([get(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
            sd[b + "attn.proj.weight"] = get(h + "self_attn.o_proj.weight")
            if cfg.out_bias:
                sd[b + "attn.proj.bias"] = get(h + "self_attn.o_proj.bias")
            if cfg.qk_norm:
                sd[b + "attn.q_norm.weight"] = get(h + "self_attn.q_norm.weight")
                sd[b + "attn.k_norm.weight"] = get(h + "self_attn.k_norm.weight")
            sd[b + "mlp.fc.weight"] = torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")])
            sd[b + "mlp.proj.weight"] = get(h + "mlp.down_proj.weight")
            if cfg.mlp_bias:
                sd[b + "mlp.fc.bias"] = torch.cat([get(h + "mlp.gate_proj.bias"), get(h + "mlp.up_proj.bias")])
                sd[b + "mlp.proj.bias"] = get(h + "mlp.down_proj.bias")
        sd["norm_f.weight"] = get("model.norm.weight")
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    return sd


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    try:
        if single.exists():
            return load_file(single)
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            out = {}
            for f in files:
                out.update(load_file(directory / f))
            return out
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ValueError(f"{directory}: cannot read the weights ({type(e).__name__}: {e}); "
                         "the file may be truncated or not safetensors") from None
    if list(directory.glob("*.bin")):
        raise ValueError(f"{directory}: only pickle (.bin) weights; lmforge reads safetensors only")
    raise FileNotFoundError(f"{directory}: no model.safetensors")


def export_hf(model, out: str | os.PathLike, arch: str | None = None, tokenizer=None, tokens=None) -> Path:
    """Write ``out/`` with ``config.json``, ``generation_config.json``, ``model.safetensors`` and (given one)
    the tokenizer: ``tokenizer.json`` (with a post-processor that prepends BOS when the spec does) and
    ``tokenizer_config.json`` (chat template, bos/eos/pad tokens). ``tokens``: the model's ``TokenSpec``
    (``lmforge.model.load_tokens``); inferred from the tokenizer when not given. The stop ids become
    ``eos_token_id`` (a list) in both configs, so ``transformers`` stops where lmforge does."""
    from safetensors.torch import save_file

    from .._io import write_json

    cfg: ModelConfig = model.cfg
    arch = arch or cfg.arch
    out = Path(out)
    files = None
    if tokenizer is not None:
        from ..tokenize.special import TokenSpec

        tokens = tokens or TokenSpec.for_tokenizer(tokenizer)
        tokens.check(tokenizer, cfg.vocab_size)
        files = tokens.hf_files(tokenizer, cfg.max_seq_len)
    elif tokens is not None:
        raise ValueError("export_hf: tokens given without the tokenizer they index")
    ids = files["ids"] if files else {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    conf = hf_config(cfg, arch, ids["bos_token_id"], ids["eos_token_id"])  # checks the arch before any write
    conf.update(ids)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state(model, arch)
    tmp = out / ".model.safetensors.tmp"  # written whole, then renamed
    save_file({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    write_json(out / "config.json", conf, indent=1)
    write_json(out / "generation_config.json", {k: v for k, v in ids.items() if v is not None}, indent=1)
    if files is not None:
        from ..tokenize.formats import save_hf

        save_hf(tokenizer, out / "tokenizer.json", post_processor=files["post_processor"])
        write_json(out / "tokenizer_config.json", files["tokenizer_config"], indent=1)
    return out


def import_hf(directory: str | os.PathLike):
    """(Transformer, tokenizer or None) from an HF model directory. Its special tokens and chat template
    (``tokenizer_config.json``, ``generation_config.json``): ``lmforge.model.load_tokens(directory, tok)``."""
    from .transformer import Transformer

    d = Path(directory)
    cpath = d / "config.json"
    if not cpath.exists():
        raise FileNotFoundError(f"{d}: no config.json")
    cfg = config_from_hf(json.loads(cpath.read_text()))
    sd = from_hf_state(read_safetensors(d), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, sd, str(d))
    tok = None
    if (d / "tokenizer.json").exists():
        from ..tokenize import load

        tok = load(d / "tokenizer.json")
    return model, tok


def load_state(model, sd: dict, where: str) -> None:
    """Copy ``sd`` into ``model`` with shape checks that name the tensor."""
    own = model.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{where}: unexpected tensor {k!r} for this architecture")
        if tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(v.shape)}, the config needs "
                             f"{tuple(own[k].shape)} (a checkpoint of another architecture?)")
    missing = [k for k in own if k not in sd and k != "lm_head.weight"]
    if missing:
        raise ValueError(f"{where}: missing tensors {missing[:5]}")
    model.load_state_dict(sd, strict=False)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    if getattr(model, "inv_freq", None) is not None:
        from .transformer import rope_frequencies

        model.inv_freq = rope_frequencies(model.cfg)
        model._rope_cache = None
