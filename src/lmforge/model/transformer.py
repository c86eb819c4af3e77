"""The decoder: one readable PyTorch module built from a ``ModelConfig``.

Knows the math of a decoder-only transformer (embeddings, pre-norm blocks of
attention and MLP, a final norm and the output head) and every variant the
config names; knows nothing about tokenizers, files, optimizers or
parallelism (those wrap it from outside).

Shapes: B batch, T time, C = d_model, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .kernels import causal_attention, cross_entropy, gelu_tanh


def _sdpa_has_gqa() -> bool:
    import inspect

    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a Python signature
        try:
            F.scaled_dot_product_attention(*(torch.zeros(1, 2, 1, 2),) * 1, torch.zeros(1, 1, 1, 2),
                                           torch.zeros(1, 1, 1, 2), enable_gqa=True)
            return True
        except TypeError:
            return False


_SDPA_GQA = _sdpa_has_gqa()
_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (as Llama, Mistral and Qwen do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _HAS_RMS_NORM and x.dtype == torch.float32:  # one fused operator, same numbers
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(cfg: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with Llama-3 scaling of the long wavelengths if configured."""
    D = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    s = cfg.rope_scaling
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths: slowed down
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen >= old / hi) & (wavelen <= old / lo)  # in between: interpolate
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+D/2}) by the position's angle (the "rotate half" layout of HF Llama)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.H, self.K, self.D = cfg.n_head, cfg.kv_heads, cfg.hd
        self.qkv = nn.Linear(cfg.d_model, (self.H + 2 * self.K) * self.D, bias=cfg.qkv_bias)
        self.proj = nn.Linear(self.H * self.D, cfg.d_model, bias=cfg.out_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.D, cfg.norm_eps)
            self.k_norm = RMSNorm(self.D, cfg.norm_eps)
        self.dropout = cfg.dropout

    def forward(self, x, rope=None, mask=None, cache=None, layer: int = 0):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.H * self.D, self.K * self.D, self.K * self.D], dim=-1)
        q = q.view(B, T, self.H, self.D)
        k = k.view(B, T, self.K, self.D)
        v = v.view(B, T, self.K, self.D).transpose(1, 2)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H|K, T, D)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = mask is None
        if cache is not None:  # append this step's keys/values, attend over all so far
            k, v = cache.update(layer, k, v)
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


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        ff = cfg.ff
        # SwiGLU keeps the gate and up projections in one matrix: [gate; up]
        self.fc = nn.Linear(cfg.d_model, 2 * ff if cfg.mlp == "swiglu" else ff, bias=cfg.mlp_bias)
        self.proj = nn.Linear(ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "swiglu":
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        elif self.kind == "gelu_tanh":
            h = gelu_tanh(h)  # a C kernel on CPU (PyTorch's is slow there), F.gelu elsewhere
        elif self.kind == "gelu":
            h = F.gelu(h)
        else:  # relu2
            h = F.relu(h).square()
        return self.proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.recompute: str | None = None  # set by lmforge.train.recompute.apply_recompute

    def forward(self, x, rope=None, mask=None, cache=None, layer: int = 0):
        x = x + self.drop(self.attn(self.attn_norm(x), rope, mask, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        else:
            self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 L) (or zero)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):
                    p.fill_(1.0)  # norm scales
                else:
                    p.zero_()
            elif name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                if self.cfg.zero_init_proj:
                    p.zero_()
                else:
                    p.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, std)
        if getattr(self, "inv_freq", None) is not None:
            self.inv_freq.copy_(rope_frequencies(self.cfg))
            self._rope_cache = None

    def _rope(self, T: int, dtype, position_ids=None):
        """(cos, sin) of each position's angles, (B|1, 1, T, D/2); cached for positions 0..T-1."""
        if position_ids is None:  # a table for positions 0..n-1 (n grows by doubling), sliced
            cache = getattr(self, "_rope_cache", None)
            if cache is None or cache[0][0] < T or cache[0][1:] != (dtype, self.inv_freq.device):
                n = max(T, 2 * cache[0][0] if cache is not None else T, 256)
                ang = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)[:, None] * self.inv_freq
                cache = ((n, dtype, self.inv_freq.device), (ang.cos().to(dtype)[None, None],
                                                            ang.sin().to(dtype)[None, None]))
                self._rope_cache = cache
            cos, sin = cache[1]
            return cos[:, :, :T], sin[:, :, :T]
        ang = position_ids[:, None, :, None].float() * self.inv_freq
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _mask(self, B, T, device, attention_mask, doc_ids):
        """None (plain causal, the fast path) or a boolean (B|1, 1, T, T) mask of allowed keys."""
        w = self.cfg.sliding_window
        if attention_mask is None and doc_ids is None and (w is None or w >= T):
            return None
        i = torch.arange(T, device=device)
        allowed = i[None, :] <= i[:, None]
        if w is not None:
            allowed = allowed & (i[:, None] - i[None, :] < w)
        allowed = allowed[None, None]
        if attention_mask is not None:  # 1 = real token, 0 = padding (keys)
            allowed = allowed & attention_mask.bool()[:, None, None, :]
        if doc_ids is not None:  # attend only inside one's own document
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        # a row with nothing to attend to (a padding query) attends to itself, not to NaN
        return allowed | torch.eye(T, dtype=torch.bool, device=device)[None, None]

    def _cache_mask(self, T: int, p: int, device, attention_mask=None):
        """Mask for T new queries at positions p.. over p+T keys: causal, sliding window, and
        ``attention_mask`` (B, p+T) over keys (0 = padding). None when everything is visible."""
        L = p + T
        w = self.cfg.sliding_window
        if attention_mask is None and T == 1 and (w is None or w >= L):
            return None
        if attention_mask is None and p == 0 and (w is None or w >= L):
            return None  # a plain causal prefill
        qpos = torch.arange(p, L, device=device)[:, None]
        kpos = torch.arange(L, device=device)[None, :]
        allowed = kpos <= qpos
        if w is not None:
            allowed = allowed & (qpos - kpos < w)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask.bool()[:, None, None, :L]
            allowed = allowed | (kpos == qpos)[None, None]  # padding queries attend to themselves
        return allowed

    def forward(self, idx, targets=None, attention_mask=None, position_ids=None, doc_ids=None,
                ignore_index: int = -100, cache=None):
        """Logits (B, T, vocab), and the mean cross-entropy if ``targets`` is given.

        ``attention_mask`` (B, T): 1 for tokens, 0 for padding; ``position_ids`` (B, T)
        default to 0..T-1; ``doc_ids`` (B, T) restricts attention to one's own document.
        ``cache`` (an ``lmforge.infer.KVCache``): ``idx`` continues the cached sequence
        (positions ``cache.pos ...``); its keys and values are added to the cache.
        """
        B, T = idx.shape
        if getattr(cache, "paged", False):  # rows of different sequences (lmforge.infer.paged)
            position_ids = cache.positions
            p = 0
        else:
            p = cache.pos if cache is not None else 0
        if p + T > self.cfg.max_seq_len and self.cfg.pos == "learned":
            raise ValueError(f"sequence of {p + T} tokens is longer than max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(idx)
        rope = None
        if self.cfg.pos == "learned":
            # positions p..p+T-1 (the common case) are a slice, not a gather
            x = x + (self.pos_emb.weight[p:p + T] if position_ids is None else self.pos_emb(position_ids))
        elif position_ids is None and p:
            cos, sin = self._rope(p + T, x.dtype)
            rope = (cos[:, :, p:], sin[:, :, p:])
        else:
            rope = self._rope(T, x.dtype, position_ids)
        x = self.drop(x)
        if cache is None:
            mask = self._mask(B, T, idx.device, attention_mask, doc_ids)
        elif getattr(cache, "paged", False):
            mask = cache.mask
        else:
            mask = self._cache_mask(T, p, idx.device, attention_mask)
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, rope, mask, cache, i)
            elif block.recompute and self.training and torch.is_grad_enabled():
                from ..train.recompute import run_block

                x = run_block(block, x, rope, mask)
            else:
                x = block(x, rope, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm_f(x)
        logits = self.lm_head(x)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        if targets is None:
            return logits
        loss = cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=ignore_index)  # a fused C kernel on CPU float32
        return logits, loss
