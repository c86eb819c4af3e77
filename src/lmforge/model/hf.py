"""HF ``transformers`` directories, both ways: GPT-2, Llama, Mistral, Qwen2, Qwen3.

Knows how each family names and shapes its tensors and config fields, what each
family can express of a ``ModelConfig`` (``check_exportable``, the one place
that knows), and how they map onto lmforge's one decoder; knows nothing about
training. Weights move as safetensors; ``transformers`` itself is not needed to
export or import (tests load the results with it to prove parity).

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
| blocks.i.mlp.fc = [gate; up] (swiglu) | h.i.mlp.c_fc | mlp.gate_proj, mlp.up_proj |
| blocks.i.mlp.fc (relu2) | h.i.mlp.c_fc | mlp.gate_proj = mlp.up_proj (hidden_act relu) |
| blocks.i.mlp.proj | h.i.mlp.c_proj | mlp.down_proj |
| norm_f | transformer.ln_f | model.norm |
| lm_head | lm_head (tied) | lm_head |

Two exact identities widen what exports:
* ReLU² is a gated ReLU MLP with the gate and up projections equal:
  relu(a) * a = relu(a)^2, so ``mlp="relu2"`` exports to the Llama family as
  ``hidden_act: "relu"`` with ``gate_proj = up_proj = fc``, and a Llama-family
  checkpoint with ``hidden_act: "relu"`` whose gate and up projections are equal
  in every layer imports as ``relu2`` (a gated ReLU with different ones has no
  lmforge MLP kind and is refused).
* A bias lmforge lacks but the family always has (GPT-2's, Qwen2's q/k/v, the
  Llama/Qwen3 ``attention_bias`` flag covering both q/k/v and o) is written as
  zeros; on import a bias that is zero in every layer is read as no bias, so an
  export imports back as the same config. (A freshly initialized HF model has
  zero biases too: it imports without them, with the same logits.)
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import ModelConfig
from .config import make as make_config

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# ModelConfig.mlp -> the family's activation name (transformers' ACT2FN keys)
GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}
LLAMA_ACT = {"swiglu": "silu", "relu2": "relu"}  # relu2: relu(gate) * up with gate = up


def _need(cond: bool, arch: str, field: str, what: str) -> None:
    if not cond:
        raise ValueError(f"cannot export as {arch}: ModelConfig.{field} must be {what}")


def check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Raise a ValueError naming the first ModelConfig field that ``arch`` cannot express.

    Every field is accounted for. Any value exports in every family: vocab_size,
    n_layer, n_head, d_model, d_ff, max_seq_len, norm_eps, tie_embeddings; dropout,
    init_std and zero_init_proj (training only: the logits do not depend on them);
    arch (the default target, not a shape). norm_bias means nothing under rmsnorm
    (RMSNorm has no bias); rope_theta and rope_scaling mean nothing with learned
    positions. A bias lmforge lacks is written as zeros where the family has one.
    The rest is checked here.
    """
    if arch not in HF_CLASSES:
        why = " (arch 'none' means the model is not exported)" if arch == "none" else ""
        raise ValueError(f"unknown HF architecture {arch!r}{why}; lmforge exports {', '.join(HF_CLASSES)}")
    _need(cfg.logit_softcap is None, arch, "logit_softcap", "None (the family does not cap its logits)")
    if arch == "gpt2":
        _need(cfg.norm == "layernorm", arch, "norm", "'layernorm'")
        _need(cfg.ffn.activation in GPT2_ACT, arch, "mlp", f"one of {', '.join(GPT2_ACT)} (GPT-2's MLP is not gated)")
        _need(cfg.pos == "learned", arch, "pos", "'learned'")
        _need(cfg.kv_heads == cfg.n_head, arch, "n_kv_head", "None (GPT-2 has no GQA)")
        _need(not cfg.attn.qk_norm, arch, "qk_norm", "False")
        _need(cfg.attn.sliding_window is None, arch, "sliding_window", "None")
        _need(cfg.attn.head_dim in (None, cfg.d_model // cfg.n_head), arch, "head_dim", "d_model // n_head")
        return  # biases: any (a missing one is written as zeros)
    _need(cfg.norm == "rmsnorm", arch, "norm", "'rmsnorm'")
    _need(cfg.ffn.activation in LLAMA_ACT, arch, "mlp", f"one of {', '.join(LLAMA_ACT)} (the {arch} MLP is gated)")
    _need(cfg.pos == "rope", arch, "pos", "'rope'")
    if arch == "qwen3":
        _need(cfg.attn.qk_norm, arch, "qk_norm", "True (Qwen3 always normalizes queries and keys)")
    else:
        _need(not cfg.attn.qk_norm, arch, "qk_norm", "False (of these families only qwen3 has it)")
    if arch != "llama":
        _need(not cfg.ffn.bias, arch, "mlp_bias", f"False ({arch}'s MLP has no biases)")
    if arch == "mistral":
        _need(not cfg.attn.qkv_bias, arch, "qkv_bias", "False (Mistral's attention has no biases)")
        _need(not cfg.attn.out_bias, arch, "out_bias", "False (Mistral's attention has no biases)")
    if arch == "qwen2":
        _need(not cfg.attn.out_bias, arch, "out_bias", "False (Qwen2's o_proj has no bias)")
    if arch != "mistral":
        _need(cfg.attn.sliding_window is None, arch, "sliding_window", "None (only mistral exports one)")
    if arch != "llama":
        _need(cfg.rope_scaling is None, arch, "rope_scaling", "None (only llama exports it)")


def exportable_as(cfg: ModelConfig) -> list[str]:
    """The HF families that can express ``cfg`` exactly."""
    out = []
    for arch in HF_CLASSES:
        try:
            check_exportable(cfg, arch)
            out.append(arch)
        except ValueError:
            pass
    return out


def export_status(cfg: ModelConfig) -> dict:
    """What ``lmforge export`` does with ``cfg`` by default: ``{"arch", "hf_class", "exports" (bool),
    "why" (the reason it does not, or None), "expressible_as" (every family that could)}``."""
    why = None
    if cfg.hf_family == "none":
        why = "arch is 'none' (not exported)"
    else:
        try:
            check_exportable(cfg, cfg.hf_family)
        except ValueError as e:
            why = str(e)
    return {"arch": cfg.hf_family, "hf_class": HF_CLASSES.get(cfg.hf_family), "exports": why is None, "why": why,
            "expressible_as": exportable_as(cfg)}


def _attn_bias(cfg: ModelConfig, arch: str) -> tuple[bool, bool]:
    """Whether the HF checkpoint holds (q/k/v biases, an o_proj bias)."""
    if arch == "gpt2":
        return True, True
    if arch == "qwen2":
        return True, False
    if arch == "mistral":
        return False, False
    b = cfg.attn.qkv_bias or cfg.attn.out_bias  # llama, qwen3: one attention_bias flag for all four
    return b, b


def hf_config(cfg: ModelConfig, arch: str, bos: int | None = None, eos: int | None = None) -> dict:
    check_exportable(cfg, arch)
    common = {"architectures": [HF_CLASSES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
              "bos_token_id": bos, "eos_token_id": eos}
    if arch == "gpt2":
        return {**common, "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff,
                "activation_function": GPT2_ACT[cfg.ffn.activation], "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "scale_attn_weights": True, "use_cache": True}
    d = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
         "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": LLAMA_ACT[cfg.ffn.activation],
         "rope_theta": cfg.rope_theta, "attention_dropout": cfg.dropout, "use_cache": True,
         "initializer_range": cfg.init_std}
    if cfg.rope_scaling:
        rs = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        d["rope_scaling"] = {"rope_type": "llama3", **rs}
    if arch == "llama":
        d.update(attention_bias=_attn_bias(cfg, arch)[0], mlp_bias=cfg.ffn.bias)
    elif arch == "mistral":
        d.update(sliding_window=cfg.attn.sliding_window)
    elif arch == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif arch == "qwen3":
        d.update(attention_bias=_attn_bias(cfg, arch)[0], use_sliding_window=False, sliding_window=None,
                 max_window_layers=cfg.n_layer)
    return d


def _zero_everywhere(tensors: Mapping | None, names: list[str]) -> bool:
    """Whether every named bias is in ``tensors`` and all zero (GPT-2's also found without the
    ``transformer.`` prefix, as in the original files); False without tensors."""
    if tensors is None:
        return False
    for n in names:
        n = n if n in tensors else n.removeprefix("transformer.")
        if n not in tensors or tensors[n].any():
            return False
    return True


def config_from_hf(d: dict, tensors: Mapping | None = None) -> ModelConfig:
    """The ModelConfig of an HF ``config.json`` dict.

    ``tensors`` (the checkpoint's, by HF name; read lazily is fine) settles what the
    config alone cannot: ReLU² (``hidden_act: "relu"`` with gate_proj = up_proj) and
    biases that are zero in every layer (read as none). Without them ``hidden_act:
    "relu"`` is refused and every bias the family has is kept.
    """
    arch = d.get("model_type")

    def zero(names):
        return _zero_everywhere(tensors, names)

    if arch == "gpt2":
        act = d.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}.get(act)
        if mlp is None:
            raise ValueError(f"GPT-2 config: activation_function {act!r} is not supported "
                             "(expected gelu_new, gelu_pytorch_tanh, gelu or relu2)")
        L = d["n_layer"]
        h = [f"transformer.h.{i}." for i in range(L)]
        names = {"norm": [p + ln + ".bias" for p in h for ln in ("ln_1", "ln_2")] + ["transformer.ln_f.bias"],
                 "qkv": [p + "attn.c_attn.bias" for p in h], "out": [p + "attn.c_proj.bias" for p in h],
                 "mlp": [p + f"mlp.{m}.bias" for p in h for m in ("c_fc", "c_proj")]}
        return make_config(vocab_size=d["vocab_size"], n_layer=L, n_head=d["n_head"],
                           d_model=d["n_embd"], d_ff=d.get("n_inner") or 4 * d["n_embd"],
                           max_seq_len=d.get("n_positions", 1024), norm_eps=d.get("layer_norm_epsilon", 1e-5),
                           mlp=mlp, norm_bias=not zero(names["norm"]), qkv_bias=not zero(names["qkv"]),
                           out_bias=not zero(names["out"]), mlp_bias=not zero(names["mlp"]),
                           tie_embeddings=d.get("tie_word_embeddings", True), arch="gpt2")
    if arch not in LLAMA_FAMILY:
        raise ValueError(f"HF model_type {arch!r} is not one lmforge imports ({', '.join(HF_CLASSES)})")
    L = d["num_hidden_layers"]
    h = [f"model.layers.{i}." for i in range(L)]
    act = d.get("hidden_act", "silu")
    mlp_bias = arch == "llama" and bool(d.get("mlp_bias", False))
    if act == "silu":
        mlp = "swiglu"
    elif act == "relu":
        if tensors is None:
            raise ValueError(f"{arch} config: hidden_act 'relu' needs the weights to tell ReLU² "
                             "(gate_proj = up_proj) from a gated ReLU")
        for i, p in enumerate(h):
            for t in ("weight", "bias") if mlp_bias else ("weight",):
                if not torch.equal(tensors[p + f"mlp.gate_proj.{t}"], tensors[p + f"mlp.up_proj.{t}"]):
                    raise ValueError(f"{arch} config: hidden_act 'relu' with gate_proj.{t} != up_proj.{t} "
                                     f"(layer {i}) is a gated ReLU, which lmforge has no MLP kind for; "
                                     "lmforge reads relu only as ReLU² (gate_proj = up_proj)")
        mlp = "relu2"
    else:
        raise ValueError(f"{arch} config: hidden_act {act!r} is not supported "
                         "(expected silu, or relu with gate_proj = up_proj)")
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
    if arch == "qwen2":
        has_qkv, has_out = True, False
    elif arch == "mistral":
        has_qkv = has_out = False
    else:
        has_qkv = has_out = bool(d.get("attention_bias", False))
    qkv = [p + f"self_attn.{x}_proj.bias" for p in h for x in "qkv"]
    mlp_names = [p + f"mlp.{x}_proj.bias" for p in h for x in ("gate", "up", "down")]
    return make_config(
        vocab_size=d["vocab_size"], n_layer=L, n_head=n_head,
        n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
        head_dim=d.get("head_dim") or d["hidden_size"] // n_head, d_ff=d["intermediate_size"],
        max_seq_len=d.get("max_position_embeddings", 2048), norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
        norm_bias=False, mlp=mlp, pos="rope", rope_theta=float(theta), rope_scaling=scaling,
        qk_norm=arch == "qwen3", qkv_bias=has_qkv and not zero(qkv),
        out_bias=has_out and not zero([p + "self_attn.o_proj.bias" for p in h]),
        mlp_bias=mlp_bias and not zero(mlp_names),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)), sliding_window=window, arch=arch)


def to_hf_state(model, arch: str) -> dict[str, torch.Tensor]:
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.hd

    def bias(name, n):  # lmforge's bias, or zeros where the family has one and lmforge not
        return sd[name] if name in sd else torch.zeros(n, dtype=sd["tok_emb.weight"].dtype)

    if arch == "gpt2":
        out["transformer.wte.weight"] = sd["tok_emb.weight"]
        out["transformer.wpe.weight"] = sd["pos_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"] = sd[b + ours + ".weight"]
                out[h + theirs + ".bias"] = bias(b + ours + ".bias", cfg.d_model)
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                w = sd[b + ours + ".weight"]
                out[h + theirs + ".weight"] = w.t()  # Conv1D stores (in, out)
                out[h + theirs + ".bias"] = bias(b + ours + ".bias", w.shape[0])
        out["transformer.ln_f.weight"] = sd["norm_f.weight"]
        out["transformer.ln_f.bias"] = bias("norm_f.bias", cfg.d_model)
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    else:
        has_qkv, has_out = _attn_bias(cfg, arch)
        out["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[b + "mlp_norm.weight"]
            q, k, v = sd[b + "attn.qkv.weight"].split([H * D, K * D, K * D])
            out[h + "self_attn.q_proj.weight"], out[h + "self_attn.k_proj.weight"] = q, k
            out[h + "self_attn.v_proj.weight"] = v
            if has_qkv:
                q, k, v = bias(b + "attn.qkv.bias", (H + 2 * K) * D).split([H * D, K * D, K * D])
                out[h + "self_attn.q_proj.bias"], out[h + "self_attn.k_proj.bias"] = q, k
                out[h + "self_attn.v_proj.bias"] = v
            out[h + "self_attn.o_proj.weight"] = sd[b + "attn.proj.weight"]
            if has_out:
                out[h + "self_attn.o_proj.bias"] = bias(b + "attn.proj.bias", cfg.d_model)
            if cfg.attn.qk_norm:
                out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
                out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
            # swiglu: fc = [gate; up]; relu2: gate = up = fc, as relu(a) * a = relu(a)^2
            fc = sd[b + "mlp.fc.weight"]
            gate, up = fc.chunk(2) if cfg.ffn.activation == "swiglu" else (fc, fc)
            out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
            out[h + "mlp.down_proj.weight"] = sd[b + "mlp.proj.weight"]
            if cfg.ffn.bias:
                fb = sd[b + "mlp.fc.bias"]
                gb, ub = fb.chunk(2) if cfg.ffn.activation == "swiglu" else (fb, fb)
                out[h + "mlp.gate_proj.bias"], out[h + "mlp.up_proj.bias"] = gb, ub
                out[h + "mlp.down_proj.bias"] = sd[b + "mlp.proj.bias"]
        out["model.norm.weight"] = sd["norm_f.weight"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state(hf: Mapping, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge state dict from HF tensors (missing tensors raise a KeyError naming them).

    Only the tensors ``cfg`` has are read: a zero bias that ``config_from_hf`` read as
    no bias, and the up projection of ReLU² (equal to the gate), are left out."""
    def get(name):
        if name in hf:
            return hf[name]
        alt = name.removeprefix("transformer.")  # the original GPT-2 files have no prefix
        if alt in hf:
            return hf[alt]
        raise KeyError(f"the HF checkpoint has no tensor {name!r}")

    sd: dict[str, torch.Tensor] = {}
    if cfg.hf_family == "gpt2":
        has = {"attn.qkv": cfg.attn.qkv_bias, "attn.proj": cfg.attn.out_bias, "mlp.fc": cfg.ffn.bias, "mlp.proj": cfg.ffn.bias}
        sd["tok_emb.weight"] = get("transformer.wte.weight")
        sd["pos_emb.weight"] = get("transformer.wpe.weight")
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                sd[b + ours + ".weight"] = get(h + theirs + ".weight")
                if cfg.norm_bias:
                    sd[b + ours + ".bias"] = get(h + theirs + ".bias")
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                sd[b + ours + ".weight"] = get(h + theirs + ".weight").t()
                if has[ours]:
                    sd[b + ours + ".bias"] = get(h + theirs + ".bias")
        sd["norm_f.weight"] = get("transformer.ln_f.weight")
        if cfg.norm_bias:
            sd["norm_f.bias"] = get("transformer.ln_f.bias")
    else:
        sd["tok_emb.weight"] = get("model.embed_tokens.weight")
        gated = cfg.ffn.activation == "swiglu"
        for i in range(cfg.n_layer):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            sd[b + "attn_norm.weight"] = get(h + "input_layernorm.weight")
            sd[b + "mlp_norm.weight"] = get(h + "post_attention_layernorm.weight")
            sd[b + "attn.qkv.weight"] = torch.cat([get(h + f"self_attn.{p}_proj.weight") for p in "qkv"])
            if cfg.attn.qkv_bias:
                sd[b + "attn.qkv.bias"] = torch.cat([get(h + f"self_attn.{p}_proj.bias") for p in "qkv"])
            sd[b + "attn.proj.weight"] = get(h + "self_attn.o_proj.weight")
            if cfg.attn.out_bias:
                sd[b + "attn.proj.bias"] = get(h + "self_attn.o_proj.bias")
            if cfg.attn.qk_norm:
                sd[b + "attn.q_norm.weight"] = get(h + "self_attn.q_norm.weight")
                sd[b + "attn.k_norm.weight"] = get(h + "self_attn.k_norm.weight")
            parts = ("gate", "up") if gated else ("gate",)  # relu2: up_proj = gate_proj
            sd[b + "mlp.fc.weight"] = torch.cat([get(h + f"mlp.{p}_proj.weight") for p in parts])
            sd[b + "mlp.proj.weight"] = get(h + "mlp.down_proj.weight")
            if cfg.ffn.bias:
                sd[b + "mlp.fc.bias"] = torch.cat([get(h + f"mlp.{p}_proj.bias") for p in parts])
                sd[b + "mlp.proj.bias"] = get(h + "mlp.down_proj.bias")
        sd["norm_f.weight"] = get("model.norm.weight")
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else get("lm_head.weight")
    return sd


class LazyTensors(Mapping):
    """A safetensors directory's tensors by name, each read when asked for (what
    ``config_from_hf`` needs of a large checkpoint without loading all of it)."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if (d / "model.safetensors").exists():
            from safetensors import safe_open

            with safe_open(str(d / "model.safetensors"), "pt") as f:
                self._file = dict.fromkeys(f.keys(), d / "model.safetensors")
        elif index.exists():
            self._file = {k: d / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self._file = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._file[name]), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self):
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


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
    arch = arch or cfg.hf_family
    check_exportable(cfg, arch)  # before anything is written
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
    hf = read_safetensors(d)
    cfg = config_from_hf(json.loads(cpath.read_text()), hf)
    sd = from_hf_state(hf, cfg)
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
