"""Attention components. ``causal``: softmax self-attention with MHA, GQA or MQA heads.

Knows the math of one attention kind and its facts (init, counts, cache spec,
Muon splits, TP plan); knows nothing about the block around it, the cache's
layout (it calls ``ctx.cache.update``) or how masks are built (``ctx.mask``).

``causal`` covers GPT-2, Llama, Mistral, Qwen2/3 and Mixtral: fused [q; k; v]
projection (optional biases), optional per-head RMSNorm of queries and keys
(Qwen3), RoPE or none (learned positions are added at the embedding), a
per-layer sliding window (``LayerSpec.window``).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from .kernels import causal_attention
from .layers import Component, Init, KVSpec, RMSNorm, apply_rope
from .registry import register_attention


def _sdpa_has_gqa() -> bool:
    import inspect

    import torch

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a Python signature
        try:
            z = [torch.zeros(1, h, 1, 2, device="cpu") for h in (2, 1, 1)]  # (cpu even inside a meta-device
            F.scaled_dot_product_attention(*z, enable_gqa=True)  # context: SDPA on meta imports torch._dynamo)
            return True
        except TypeError:
            return False


_SDPA_GQA = _sdpa_has_gqa()


@register_attention("causal")
class CausalSelfAttention(Component):
    def __init__(self, cfg, spec):
        super().__init__()
        a = cfg.attn
        self.layer, self.window = spec.index, spec.window
        self.n_head, self.n_kv_head = a.n_head, cfg.kv_heads  # the model's heads (facts: splits, FLOPs)
        self.H, self.K, self.D = a.n_head, cfg.kv_heads, cfg.hd  # the heads this forward computes (tensor
        # parallel sets H, K to this rank's share, H/tp and K/tp, after splitting the projections)
        self.qkv = nn.Linear(cfg.d_model, (self.H + 2 * self.K) * self.D, bias=a.qkv_bias)
        self.proj = nn.Linear(self.H * self.D, cfg.d_model, bias=a.out_bias)
        self.qk_norm = a.qk_norm
        if a.qk_norm:
            self.q_norm = RMSNorm(self.D, cfg.norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, ctx):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.D, self.K * self.D, self.K * self.D], dim=-1)
        q = q.view(B, T, self.H, self.D)
        k = k.view(B, T, self.K, self.D)
        v = v.view(B, T, self.K, self.D).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H|K, T, D)
        if ctx.rope is not None:
            cos, sin = ctx.rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = ctx.mask(self.window)
        causal = mask is None
        if ctx.cache is not None:  # append this step's keys/values, attend over all so far
            k, v = ctx.cache.update(self.layer, k, v)
            causal = mask is None and k.shape[2] == T  # (decode with no mask: every cached key is visible)
        kw = {}
        if self.K != self.H:  # GQA/MQA: each key/value head serves H/K query heads
            if _SDPA_GQA and not self.training:
                kw["enable_gqa"] = True  # no copies of the (cached) keys and values
            else:
                k = k.repeat_interleave(self.H // self.K, dim=1)
                v = v.repeat_interleave(self.H // self.K, dim=1)
        if causal and not kw and (self.dropout == 0 or not self.training) and k.shape[2] == T:
            y = causal_attention(q, k, v)  # a C kernel on CPU (2-3x PyTorch's there), SDPA elsewhere
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               dropout_p=self.dropout if self.training else 0.0, **kw)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.H * self.D))

    # ---- facts ----
    def reset_parameters(self, init: Init) -> None:
        init.module(self.qkv)
        init.module(self.proj, residual=True)
        if self.qk_norm:
            init.module(self.q_norm)
            init.module(self.k_norm)

    def score_flops(self, seq_len: int) -> int:
        T = min(seq_len, self.window) if self.window else seq_len
        return 12 * self.n_head * self.D * T  # QK^T and AV, forward and backward (the PaLM accounting)

    def cache_spec(self) -> KVSpec:
        return KVSpec(self.K, self.D, self.window)

    def muon_splits(self) -> dict:
        return {self.qkv.weight: [self.n_head * self.D, self.n_kv_head * self.D, self.n_kv_head * self.D]}

    def tp_plan(self) -> dict:
        # heads split across ranks: the fused projection column-wise (each rank its q, k, v heads: the parts
        # are muon_splits' rows), proj row-wise; the per-head norms see only this rank's heads
        plan = {"qkv": "colwise_qkv", "proj": "rowwise"}
        if self.qk_norm:
            plan.update(q_norm="replicate_partial", k_norm="replicate_partial")
        return plan

    def tp_local_heads(self, tp: int) -> None:
        """This rank computes H/tp query and K/tp key/value heads (its share of the split projections)."""
        self.H, self.K = self.n_head // tp, self.n_kv_head // tp
