"""HF ``transformers`` directories, both ways: GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE.

Knows how each family names and shapes its tensors and config fields, what each
family can express of a ``ModelConfig`` (``check_exportable``, the one place
that knows), and how they map onto lmforge's one decoder; knows nothing about
training. Weights move as safetensors; ``transformers`` itself is not needed to
export or import (tests load the results with it to prove parity).

The weight names are data: each family (``FAMILIES``) is a table of ``Rule``s per
component kind (the model-wide tensors, the two norms of a block, each attention
kind, each feed-forward kind), and one function (``_walk``) applies them both ways,
layer by layer as ``cfg.layer_specs()`` says (a dense or a MoE feed-forward).
Mapping (lmforge name -> HF name, per layer i, expert e):

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

A MoE layer (``mlp.w_in`` (E, 2 d_e, C) = [gate; up] per expert, ``w_out`` (E, C, d_e)):

| lmforge | Mixtral | Qwen2-MoE |
| --- | --- | --- |
| blocks.i.mlp.router | block_sparse_moe.gate | mlp.gate |
| blocks.i.mlp.w_in[e] = [gate; up] | block_sparse_moe.experts.e.w1, w3 | mlp.experts.e.gate_proj, up_proj |
| blocks.i.mlp.w_out[e] | block_sparse_moe.experts.e.w2 | mlp.experts.e.down_proj |
| blocks.i.mlp.shared.fc, proj | - | mlp.shared_expert.gate_proj, up_proj; down_proj |
| blocks.i.mlp.shared_gate | - | mlp.shared_expert_gate |

The per-expert names are what ``save_pretrained`` of transformers 5.x writes (and 4.x
reads); the fused 5.x in-memory names (``mlp.experts.gate_up_proj`` (E, 2 d_e, C),
``mlp.experts.down_proj``, Mixtral's ``mlp.gate``) are read too. A Qwen2-MoE dense
layer (``mlp_only_layers``, ``decoder_sparse_step``) maps as the Llama family's MLP.

Two exact identities widen what exports:
* ReLU² is a gated ReLU MLP with the gate and up projections equal:
  relu(a) * a = relu(a)^2, so ``ffn.activation="relu2"`` (and ``moe.activation``)
  exports to the Llama family as ``hidden_act: "relu"`` with ``gate_proj =
  up_proj = fc`` (each expert's w1 = w3), and a checkpoint with ``hidden_act:
  "relu"`` whose gate and up projections are equal in every layer imports as
  ``relu2`` (a gated ReLU with different ones has no lmforge MLP kind and is refused).
* A bias lmforge lacks but the family always has (GPT-2's, Qwen2's and
  Qwen2-MoE's q/k/v, the Llama/Qwen3 ``attention_bias`` flag covering both q/k/v
  and o) is written as zeros; on import a bias that is zero in every layer is read
  as no bias, so an export imports back as the same config. (A freshly initialized
  HF model has zero biases too: it imports without them, with the same logits.)
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .config import make as make_config

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe")  # RMSNorm, RoPE, gated MLPs
MOE_FAMILIES = ("mixtral", "qwen2_moe")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM",
              "qwen2_moe": "Qwen2MoeForCausalLM"}
# ModelConfig.ffn.activation -> the family's activation name (transformers' ACT2FN keys)
GPT2_ACT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu2": "relu2"}
LLAMA_ACT = {"swiglu": "silu", "relu2": "relu"}  # relu2: relu(gate) * up with gate = up


# ---- the weight tables ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One lmforge tensor <-> one or more HF tensors. Names hold ``{i}`` (layer) and ``{e}`` (expert: the
    lmforge tensor is the experts stacked on dim 0, the HF ones are per expert). ``how``: "copy";
    "t" (transposed: GPT-2's Conv1D; the bias is copied); "qkv" ([q; k; v] rows); "gate_up" ([gate; up]
    rows for swiglu, gate = up = ours for relu2). ``bias``: which bias flag covers ``.bias`` next to
    ``.weight`` ("norm", "qkv", "out", "mlp"; None: never one). ``when``: the config has the tensor.
    ``fused``: the fused name (experts stacked, [gate; up] concatenated) read where the per-expert ones
    are missing."""
    ours: str
    theirs: tuple[str, ...]
    how: str = "copy"
    bias: str | None = None
    when: object = None  # cfg -> bool
    fused: str | None = None


def R(ours, *theirs, **kw) -> Rule:
    return Rule(ours, theirs, **kw)


def _untied(c):
    return not c.tie_embeddings


def _qk_norm(c):
    return c.attn.qk_norm


def _shared(c):
    return c.moe.n_shared > 0


def _shared_gate(c):
    return c.moe.n_shared > 0 and c.moe.shared_gate


@dataclass(frozen=True)
class Family:
    top: list  # model-wide tensors
    norms: list  # each block's two norms
    attention: dict  # LayerSpec.attention -> rules
    ffn: dict  # LayerSpec.ffn -> rules


_B = "blocks.{i}."
_GPT2_H = "transformer.h.{i}."
GPT2 = Family(
    top=[R("tok_emb.weight", "transformer.wte.weight"), R("pos_emb.weight", "transformer.wpe.weight"),
         R("norm_f.weight", "transformer.ln_f.weight", bias="norm"),
         R("lm_head.weight", "lm_head.weight", when=_untied)],
    norms=[R(_B + "attn_norm.weight", _GPT2_H + "ln_1.weight", bias="norm"),
           R(_B + "mlp_norm.weight", _GPT2_H + "ln_2.weight", bias="norm")],
    attention={"causal": [R(_B + "attn.qkv.weight", _GPT2_H + "attn.c_attn.weight", how="t", bias="qkv"),
                          R(_B + "attn.proj.weight", _GPT2_H + "attn.c_proj.weight", how="t", bias="out")]},
    ffn={"dense": [R(_B + "mlp.fc.weight", _GPT2_H + "mlp.c_fc.weight", how="t", bias="mlp"),
                   R(_B + "mlp.proj.weight", _GPT2_H + "mlp.c_proj.weight", how="t", bias="mlp")]})

_L = "model.layers.{i}."
_DENSE = [R(_B + "mlp.fc.weight", _L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight", how="gate_up", bias="mlp"),
          R(_B + "mlp.proj.weight", _L + "mlp.down_proj.weight", bias="mlp")]
LLAMA = Family(
    top=[R("tok_emb.weight", "model.embed_tokens.weight"), R("norm_f.weight", "model.norm.weight"),
         R("lm_head.weight", "lm_head.weight", when=_untied)],
    norms=[R(_B + "attn_norm.weight", _L + "input_layernorm.weight"),
           R(_B + "mlp_norm.weight", _L + "post_attention_layernorm.weight")],
    attention={"causal": [
        R(_B + "attn.qkv.weight", *(_L + f"self_attn.{x}_proj.weight" for x in "qkv"), how="qkv", bias="qkv"),
        R(_B + "attn.proj.weight", _L + "self_attn.o_proj.weight", bias="out"),
        R(_B + "attn.q_norm.weight", _L + "self_attn.q_norm.weight", when=_qk_norm),
        R(_B + "attn.k_norm.weight", _L + "self_attn.k_norm.weight", when=_qk_norm)]},
    ffn={"dense": _DENSE})

_M = _L + "block_sparse_moe."
MIXTRAL = Family(LLAMA.top, LLAMA.norms, LLAMA.attention, {"moe": [
    R(_B + "mlp.router.weight", _M + "gate.weight", fused=_L + "mlp.gate.weight"),
    R(_B + "mlp.w_in", _M + "experts.{e}.w1.weight", _M + "experts.{e}.w3.weight", how="gate_up",
      fused=_L + "mlp.experts.gate_up_proj"),
    R(_B + "mlp.w_out", _M + "experts.{e}.w2.weight", fused=_L + "mlp.experts.down_proj")]})

_Q = _L + "mlp."
QWEN2_MOE = Family(LLAMA.top, LLAMA.norms, LLAMA.attention, {"dense": _DENSE, "moe": [
    R(_B + "mlp.router.weight", _Q + "gate.weight"),
    R(_B + "mlp.w_in", _Q + "experts.{e}.gate_proj.weight", _Q + "experts.{e}.up_proj.weight", how="gate_up",
      fused=_Q + "experts.gate_up_proj"),
    R(_B + "mlp.w_out", _Q + "experts.{e}.down_proj.weight", fused=_Q + "experts.down_proj"),
    R(_B + "mlp.shared.fc.weight", _Q + "shared_expert.gate_proj.weight", _Q + "shared_expert.up_proj.weight",
      how="gate_up", when=_shared),
    R(_B + "mlp.shared.proj.weight", _Q + "shared_expert.down_proj.weight", when=_shared),
    R(_B + "mlp.shared_gate.weight", _Q + "shared_expert_gate.weight", when=_shared_gate)]})

FAMILIES = {"gpt2": GPT2, "llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA,
            "mixtral": MIXTRAL, "qwen2_moe": QWEN2_MOE}


def _our_biases(cfg: ModelConfig) -> set[str]:
    flags = {"norm": cfg.norm == "layernorm" and cfg.norm_bias, "qkv": cfg.attn.qkv_bias,
             "out": cfg.attn.out_bias, "mlp": cfg.ffn.bias}
    return {k for k, v in flags.items() if v}


def _hf_biases(arch: str, cfg: ModelConfig | None = None, d: dict | None = None) -> set[str]:
    """The biases the HF checkpoint holds: of ``cfg`` when exporting, of the config dict ``d`` importing."""
    if arch == "gpt2":
        return {"norm", "qkv", "out", "mlp"}
    if arch in ("qwen2", "qwen2_moe"):  # q/k/v always (Qwen2-MoE: unless its 5.x qkv_bias flag says not)
        return {"qkv"} if d is None or d.get("qkv_bias", True) else set()
    if arch in ("llama", "qwen3"):  # one attention_bias flag for q/k/v and o
        attn = cfg.attn.qkv_bias or cfg.attn.out_bias if d is None else bool(d.get("attention_bias", False))
        mlp = arch == "llama" and (cfg.ffn.bias if d is None else bool(d.get("mlp_bias", False)))
        return ({"qkv", "out"} if attn else set()) | ({"mlp"} if mlp else set())
    return set()  # mistral, mixtral


def _act(cfg: ModelConfig, group: str) -> str:
    return cfg.moe.activation if group == "moe" else cfg.ffn.activation


def _fill(name: str, i: int, e: int | None = None) -> str:
    return name.replace("{i}", str(i)).replace("{e}", "" if e is None else str(e))


def _walk(cfg: ModelConfig, arch: str):
    """Every (rule, layer, activation of its group) that ``cfg`` has in ``arch``: the model-wide tensors
    (layer 0: their names have no ``{i}``), then per layer its norms, its attention kind and its
    feed-forward kind."""
    fam = FAMILIES[arch]
    for r in fam.top:
        if r.when is None or r.when(cfg):
            yield r, 0, cfg.ffn.activation
    for s in cfg.layer_specs():
        for group, rules in (("norm", fam.norms), ("attn", fam.attention[s.attention]), (s.ffn, fam.ffn[s.ffn])):
            for r in rules:
                if r.when is None or r.when(cfg):
                    yield r, s.index, _act(cfg, group)


def _bias(name: str) -> str:
    return name.removesuffix(".weight") + ".bias"


def _export_one(r: Rule, t: torch.Tensor, act: str, cfg: ModelConfig, weight: bool) -> list[torch.Tensor]:
    """One lmforge tensor (one expert's, for an expert rule) -> the HF tensors of ``r.theirs``, in order."""
    if r.how == "t":
        return [t.t() if weight else t]
    if r.how == "qkv":
        H, K, D = cfg.n_head, cfg.kv_heads, cfg.hd
        return list(t.split([H * D, K * D, K * D]))
    if r.how == "gate_up":
        return list(t.chunk(2)) if act == "swiglu" else [t, t]  # relu2: gate = up
    return [t]


def _import_one(r: Rule, parts: list[torch.Tensor], act: str, weight: bool) -> torch.Tensor:
    if r.how == "t":
        return parts[0].t() if weight else parts[0]
    if r.how == "gate_up" and act != "swiglu":
        return parts[0]  # relu2: up = gate (config_from_hf checked)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def to_hf_state(model, arch: str) -> dict[str, torch.Tensor]:
    """The HF tensors of ``model`` as ``arch`` names them (per-expert names for the experts)."""
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    hf_b = _hf_biases(arch, cfg)
    out: dict[str, torch.Tensor] = {}
    for r, i, act in _walk(cfg, arch):
        ours = _fill(r.ours, i)
        w = sd[ours]
        if "{e}" in r.theirs[0]:
            for e in range(w.shape[0]):
                for name, t in zip(r.theirs, _export_one(r, w[e], act, cfg, True)):
                    out[_fill(name, i, e)] = t
            continue
        for name, t in zip(r.theirs, _export_one(r, w, act, cfg, True)):
            out[_fill(name, i)] = t
        if r.bias in hf_b:  # lmforge's bias, or zeros where the family has one and lmforge not
            b = sd.get(_bias(ours), torch.zeros(w.shape[0], dtype=w.dtype))
            for name, t in zip(r.theirs, _export_one(r, b, act, cfg, False)):
                out[_bias(_fill(name, i))] = t
    return {k: v.contiguous().clone() for k, v in out.items()}


def _getter(hf: Mapping):
    def get(name):
        if name in hf:
            return hf[name]
        alt = name.removeprefix("transformer.")  # the original GPT-2 files have no prefix
        if alt in hf:
            return hf[alt]
        raise KeyError(f"the HF checkpoint has no tensor {name!r}")
    return get


def _parts(r: Rule, i: int, get, n_experts: int | None = None, weight: bool = True):
    """The HF tensors of rule ``r`` in layer ``i``: a list (one per name), or for an expert rule a list
    per expert (from the per-expert names, else from the fused ones)."""
    names = [_fill(n, i) if weight else _bias(_fill(n, i)) for n in r.theirs]
    if "{e}" not in r.theirs[0]:
        try:
            return [get(n) for n in names]
        except KeyError:
            if r.fused is None:
                raise
            return [get(_fill(r.fused, i))]
    try:
        return [[get(_fill(n, i, e)) for n in r.theirs] for e in range(n_experts)]
    except KeyError:
        if r.fused is None:
            raise
        try:
            fused = get(_fill(r.fused, i))
        except KeyError:
            raise KeyError(f"the HF checkpoint has no tensor {_fill(r.theirs[0], i, 0)!r} "
                           f"(nor the fused {_fill(r.fused, i)!r})") from None
        return [list(x.chunk(len(r.theirs))) for x in fused.unbind(0)]


def from_hf_state(hf: Mapping, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """lmforge state dict from HF tensors (missing tensors raise a KeyError naming them).

    Only the tensors ``cfg`` has are read: a zero bias that ``config_from_hf`` read as
    no bias, and the up projection of ReLU² (equal to the gate), are left out."""
    get = _getter(hf)
    ours_b = _our_biases(cfg)
    E = cfg.moe.n_experts if cfg.moe else None
    sd: dict[str, torch.Tensor] = {}
    for r, i, act in _walk(cfg, cfg.hf_family):
        ours = _fill(r.ours, i)
        if "{e}" in r.theirs[0]:
            sd[ours] = torch.stack([_import_one(r, p, act, True) for p in _parts(r, i, get, E)])
            continue
        sd[ours] = _import_one(r, _parts(r, i, get), act, True)
        if r.bias in ours_b:
            sd[_bias(ours)] = _import_one(r, _parts(r, i, get, weight=False), act, False)
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


# ---- what each family expresses --------------------------------------------------------------------

def _need(cond: bool, arch: str, field: str, what: str) -> None:
    if not cond:
        raise ValueError(f"cannot export as {arch}: ModelConfig.{field} must be {what}")


def check_exportable(cfg: ModelConfig, arch: str) -> None:
    """Raise a ValueError naming the first ModelConfig field that ``arch`` cannot express.

    Every field is accounted for. Any value exports in every family: vocab_size,
    n_layer, attn.n_head, d_model, ffn.d_ff, max_seq_len, norm_eps, tie_embeddings;
    dropout, init_std, zero_init_proj and moe.z_loss_coef (training only: the logits
    do not depend on them; no family has a z-loss field, so it is dropped and imports
    as 0); hf_family (the default target, not a shape). norm_bias means nothing under
    rmsnorm (RMSNorm has no bias); rope_theta and rope_scaling mean nothing with
    learned positions; ffn.* means nothing when every layer is a MoE (Mixtral). A
    bias lmforge lacks is written as zeros where the family has one. The rest is
    checked here.
    """
    if arch not in HF_CLASSES:
        why = " (hf_family 'none' means the model is not exported)" if arch == "none" else ""
        raise ValueError(f"unknown HF architecture {arch!r}{why}; lmforge exports {', '.join(HF_CLASSES)}")
    _need(cfg.logit_softcap is None, arch, "logit_softcap", "None (the family does not cap its logits)")
    specs = cfg.layer_specs()
    _need(all(s.attention == "causal" for s in specs), arch, "attn.kind", "'causal'")
    moe_layers = [s.index for s in specs if s.ffn == "moe"]
    dense = len(moe_layers) < cfg.n_layer
    if arch not in MOE_FAMILIES:
        _need(not moe_layers, arch, "moe", f"None (no MoE layers: {arch} has none; mixtral and qwen2_moe do)")
    if arch == "gpt2":
        _need(cfg.norm == "layernorm", arch, "norm", "'layernorm'")
        _need(cfg.ffn.activation in GPT2_ACT, arch, "ffn.activation",
              f"one of {', '.join(GPT2_ACT)} (GPT-2's MLP is not gated)")
        _need(cfg.pos == "learned", arch, "pos", "'learned'")
        _need(cfg.kv_heads == cfg.n_head, arch, "attn.n_kv_head", "None (GPT-2 has no GQA)")
        _need(not cfg.attn.qk_norm, arch, "attn.qk_norm", "False")
        _need(cfg.attn.sliding_window is None, arch, "attn.sliding_window", "None")
        _need(cfg.attn.head_dim in (None, cfg.d_model // cfg.n_head), arch, "attn.head_dim", "d_model // n_head")
        return  # biases: any (a missing one is written as zeros)
    _need(cfg.norm == "rmsnorm", arch, "norm", "'rmsnorm'")
    if dense:
        _need(cfg.ffn.activation in LLAMA_ACT, arch, "ffn.activation",
              f"one of {', '.join(LLAMA_ACT)} (the {arch} MLP is gated)")
    _need(cfg.pos == "rope", arch, "pos", "'rope'")
    if arch == "qwen3":
        _need(cfg.attn.qk_norm, arch, "attn.qk_norm", "True (Qwen3 always normalizes queries and keys)")
    else:
        _need(not cfg.attn.qk_norm, arch, "attn.qk_norm", "False (of these families only qwen3 has it)")
    if arch != "llama" and dense:
        _need(not cfg.ffn.bias, arch, "ffn.bias", f"False ({arch}'s MLP has no biases)")
    if arch in ("mistral", "mixtral"):
        _need(not cfg.attn.qkv_bias, arch, "attn.qkv_bias", f"False ({arch}'s attention has no biases)")
        _need(not cfg.attn.out_bias, arch, "attn.out_bias", f"False ({arch}'s attention has no biases)")
    if arch in ("qwen2", "qwen2_moe"):
        _need(not cfg.attn.out_bias, arch, "attn.out_bias", f"False ({arch}'s o_proj has no bias)")
    if arch in ("mistral", "mixtral"):
        windows = {s.window for s in specs}
        _need(len(windows) == 1, arch, "window_layers", f"'all' when attn.sliding_window is set ({arch} "
                                                        "windows every layer or none)")
    elif arch != "qwen2_moe":
        _need(cfg.attn.sliding_window is None, arch, "attn.sliding_window",
              "None (only mistral, mixtral and qwen2_moe export one)")
    if arch != "llama":
        _need(cfg.rope_scaling is None, arch, "rope_scaling", "None (only llama exports it)")
    if arch in MOE_FAMILIES:
        _need(cfg.moe is not None, arch, "moe", f"set ({arch} is a mixture of experts)")
        m = cfg.moe
        _need(m.activation in LLAMA_ACT, arch, "moe.activation", f"one of {', '.join(LLAMA_ACT)}")
        if dense:
            _need(cfg.ffn.activation == m.activation, arch, "ffn.activation",
                  f"moe.activation ({m.activation!r}: {arch} has one hidden_act)")
    if arch == "mixtral":
        _need(not dense, arch, "moe_layers", "'all' (every Mixtral layer is a MoE)")
        _need(m.norm_topk_prob, arch, "moe.norm_topk_prob", "True (Mixtral renormalizes the top-k weights)")
        _need(m.n_shared == 0, arch, "moe.n_shared", "0 (Mixtral has no shared experts)")
    if arch == "qwen2_moe":
        _need(m.n_shared >= 1, arch, "moe.n_shared", ">= 1 (every Qwen2-MoE MoE layer has a shared expert)")
        _need(m.shared_gate, arch, "moe.shared_gate", "True (Qwen2-MoE always gates its shared expert)")


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


# ---- config.json, both ways ---------------------------------------------------------------------

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
    act = cfg.moe.activation if arch == "mixtral" else cfg.ffn.activation
    d = {**common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff, "num_hidden_layers": cfg.n_layer,
         "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.hd,
         "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": LLAMA_ACT[act],
         "rope_theta": cfg.rope_theta, "attention_dropout": cfg.dropout, "use_cache": True,
         "initializer_range": cfg.init_std}
    if cfg.rope_scaling:
        rs = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        d["rope_scaling"] = {"rope_type": "llama3", **rs}
    m = cfg.moe
    if arch in MOE_FAMILIES:
        d.update(num_experts_per_tok=m.top_k, router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False)
    if arch == "llama":
        d.update(attention_bias="qkv" in _hf_biases(arch, cfg), mlp_bias=cfg.ffn.bias)
    elif arch in ("mistral", "mixtral"):
        d.update(sliding_window=cfg.attn.sliding_window)
    elif arch == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    elif arch == "qwen3":
        d.update(attention_bias="qkv" in _hf_biases(arch, cfg), use_sliding_window=False, sliding_window=None,
                 max_window_layers=cfg.n_layer)
    if arch == "mixtral":
        d.update(intermediate_size=cfg.d_expert, num_local_experts=m.n_experts, router_jitter_noise=0.0)
    elif arch == "qwen2_moe":
        specs = cfg.layer_specs()
        if cfg.moe_layers == "all" or (isinstance(cfg.moe_layers, str) and cfg.moe_layers.startswith("every:")):
            step, only = (1 if cfg.moe_layers == "all" else int(cfg.moe_layers.split(":")[1])), []
        else:
            step, only = 1, [s.index for s in specs if s.ffn == "dense"]
        windowed = [s.window is not None for s in specs]
        d.update(num_experts=m.n_experts, moe_intermediate_size=cfg.d_expert, norm_topk_prob=m.norm_topk_prob,
                 shared_expert_intermediate_size=m.n_shared * (m.d_shared or cfg.d_expert),
                 decoder_sparse_step=step, mlp_only_layers=only, qkv_bias=True,
                 use_sliding_window=any(windowed), sliding_window=cfg.attn.sliding_window if any(windowed) else None,
                 max_window_layers=cfg.n_layer,
                 layer_types=["sliding_attention" if w else "full_attention" for w in windowed])
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


def _gpt2_fields(d: dict) -> dict:
    act = d.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}.get(act)
    if mlp is None:
        raise ValueError(f"GPT-2 config: activation_function {act!r} is not supported "
                         "(expected gelu_new, gelu_pytorch_tanh, gelu or relu2)")
    return dict(vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"], d_model=d["n_embd"],
                d_ff=d.get("n_inner") or 4 * d["n_embd"], max_seq_len=d.get("n_positions", 1024),
                norm_eps=d.get("layer_norm_epsilon", 1e-5), mlp=mlp, tie_embeddings=d.get("tie_word_embeddings", True))


def _rope_fields(arch: str, d: dict) -> dict:
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
    return dict(rope_theta=float(theta), rope_scaling=scaling)


def _window_fields(arch: str, d: dict) -> dict:
    L = d["num_hidden_layers"]
    if arch in ("mistral", "mixtral"):
        return dict(sliding_window=d.get("sliding_window"))
    if arch == "qwen2_moe" and d.get("use_sliding_window"):
        types = d.get("layer_types") or [  # transformers' rule when the file has no layer_types
            "sliding_attention" if (i + 1) % 2 and i < d.get("max_window_layers", L) else "full_attention"
            for i in range(L)]
        windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
        if windowed:
            return dict(sliding_window=d["sliding_window"], window_layers="all" if len(windowed) == L else windowed)
        return {}
    if d.get("use_sliding_window"):
        raise ValueError(f"{arch} config: use_sliding_window=true is not supported")
    return {}


def _moe_fields(arch: str, d: dict) -> dict:
    L = d["num_hidden_layers"]
    moe = dict(top_k=d["num_experts_per_tok"], aux_loss_coef=float(d.get("router_aux_loss_coef", 0.001)))
    if arch == "mixtral":
        moe.update(n_experts=d["num_local_experts"], d_expert=d["intermediate_size"], norm_topk_prob=True)
        return dict(moe=moe, moe_layers="all")
    moe.update(n_experts=d["num_experts"], d_expert=d["moe_intermediate_size"],
               norm_topk_prob=bool(d.get("norm_topk_prob", False)), n_shared=1,  # (n, d) exports as n * d
               d_shared=d["shared_expert_intermediate_size"], shared_gate=True)
    step, only = d.get("decoder_sparse_step", 1), d.get("mlp_only_layers") or []
    if not only:
        layers = "all" if step == 1 else f"every:{step}"
    else:
        layers = [i for i in range(L) if i not in only and (i + 1) % step == 0]
    return dict(moe=moe, moe_layers=layers)


def config_from_hf(d: dict, tensors: Mapping | None = None) -> ModelConfig:
    """The ModelConfig of an HF ``config.json`` dict.

    ``tensors`` (the checkpoint's, by HF name; read lazily is fine) settles what the
    config alone cannot: ReLU² (``hidden_act: "relu"`` with gate_proj = up_proj) and
    biases that are zero in every layer (read as none). Without them ``hidden_act:
    "relu"`` is refused and every bias the family has is kept.
    """
    arch = d.get("model_type")
    if arch == "gpt2":
        kw = _gpt2_fields(d)
    elif arch in LLAMA_FAMILY:
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "relu"):
            raise ValueError(f"{arch} config: hidden_act {act!r} is not supported "
                             "(expected silu, or relu with gate_proj = up_proj)")
        if act == "relu" and tensors is None:
            raise ValueError(f"{arch} config: hidden_act 'relu' needs the weights to tell ReLU² "
                             "(gate_proj = up_proj) from a gated ReLU")
        mlp = "swiglu" if act == "silu" else "relu2"
        n_head = d["num_attention_heads"]
        kw = dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"], n_head=n_head,
                  n_kv_head=d.get("num_key_value_heads") or n_head, d_model=d["hidden_size"],
                  head_dim=d.get("head_dim") or d["hidden_size"] // n_head, d_ff=d["intermediate_size"],
                  max_seq_len=d.get("max_position_embeddings", 2048), norm="rmsnorm",
                  norm_eps=d.get("rms_norm_eps", 1e-6), norm_bias=False, mlp=mlp, pos="rope",
                  qk_norm=arch == "qwen3", tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                  **_rope_fields(arch, d), **_window_fields(arch, d))
        if arch in MOE_FAMILIES:
            kw.update(_moe_fields(arch, d))
            kw["moe"]["activation"] = mlp
            if arch == "mixtral":
                kw["d_ff"] = None  # intermediate_size is the experts'; no dense layer
    else:
        raise ValueError(f"HF model_type {arch!r} is not one lmforge imports ({', '.join(HF_CLASSES)})")
    # biases: the family's, each read as none where it is zero in every layer
    has = _hf_biases(arch, d=d)
    flags = {"norm": "norm_bias", "qkv": "qkv_bias", "out": "out_bias", "mlp": "mlp_bias"}
    kw.update({f: k in has for k, f in flags.items() if k != "norm" or arch == "gpt2"})  # (RMSNorm: none)
    kw["arch"] = arch
    pre = make_config(**kw)
    names: dict[str, list[str]] = {}
    for r, i, _ in _walk(pre, arch):
        if r.bias in has:
            names.setdefault(r.bias, []).extend(_bias(_fill(n, i)) for n in r.theirs)
    for k in has:
        kw[flags[k]] = not _zero_everywhere(tensors, names.get(k, []))
    cfg = make_config(**kw)
    if arch != "gpt2" and kw["mlp"] == "relu2":
        _check_relu2(cfg, arch, tensors)
    return cfg


def _check_relu2(cfg: ModelConfig, arch: str, tensors: Mapping) -> None:
    """hidden_act relu reads as ReLU² only with gate = up in every gated rule of every layer (and expert)."""
    get = _getter(tensors)
    E = cfg.moe.n_experts if cfg.moe else None
    for r, i, _ in _walk(cfg, arch):
        if r.how != "gate_up":
            continue
        expert = "{e}" in r.theirs[0]
        kinds = [("weight", True)] + ([("bias", False)] if r.bias in _our_biases(cfg) else [])
        for t, weight in kinds:
            per = _parts(r, i, get, E, weight) if expert else [_parts(r, i, get, weight=weight)]
            for e, (gate, up) in enumerate(per):
                if not torch.equal(gate, up):
                    g, u = (n.split(".")[-2] for n in r.theirs)
                    where = f"layer {i}, expert {e}" if expert else f"layer {i}"
                    raise ValueError(f"{arch} config: hidden_act 'relu' with {g}.{t} != {u}.{t} ({where}) is a "
                                     "gated ReLU, which lmforge has no MLP kind for; lmforge reads relu only as "
                                     "ReLU² (gate_proj = up_proj)")


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
