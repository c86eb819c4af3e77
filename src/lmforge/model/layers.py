"""What every component shares: norms, activations, RoPE, the one mask builder, cache specs, init.

Knows small pieces of math and the contract a component keeps (``Component``);
knows nothing about any one architecture.

**The component contract.** A component (an attention or feed-forward kind in
``model.registry``) is a ``torch.nn.Module`` built as ``Kind(cfg, spec)`` from the
``ModelConfig`` and its layer's ``LayerSpec``, called as ``module(x, ctx)`` with
``x`` (B, T, C) and the forward's shared ``Context``, returning (B, T, C). It owns
its facts, so nothing else restates them:

* ``reset_parameters(init)``: its initialization, written out (``Init`` records
  every parameter it touches; the model refuses to build if one is left out);
* ``active_params()``: the parameters one token multiplies (all, except a MoE's
  experts not chosen), and ``score_flops(T)``: FLOPs per token beyond 2 x weights
  (attention scores);
* ``cache_spec()`` (attention): what it keeps per layer for decoding (``KVSpec``);
* ``muon_splits()``: {parameter: row counts} of fused matrices Muon treats apart;
  ``adam_only()``: the matrices that stay on AdamW (a router);
* ``tp_plan()``: {submodule or parameter name: kind} for tensor parallelism
  (``lmforge.parallel.tp`` applies it; every parameter of the component must be
  covered). Kinds: "colwise" (output features split: weight rows, bias);
  "rowwise" (input features split; the outputs summed over the ranks);
  "colwise_qkv" / "colwise_gate_up" (colwise of a fused matrix whose parts,
  ``muon_splits()``'s rows, are each split: rank r holds [q_r; k_r; v_r]);
  "replicate" (a whole copy, run on the whole input); "replicate_partial" (a
  whole copy run on this rank's shard only, e.g. a per-head norm: its gradient
  is summed over the ranks); "expert" (a MoE's stacked experts: replicated);
  "colwise_gate_up+rowwise" (a nested MLP: its own plan). A component that
  splits heads says how in ``tp_local_heads(tp)``.

HF weight names are declared per family in ``model.hf`` next to each family's
config mapping (they are facts of the file format, keyed by component kind).

Shapes: B batch, T time, C = d_model, H query heads, K key/value heads, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import gelu_tanh

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


def make_norm(cfg, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.d_model
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias)


# ---- activations: name -> (function of the up projection's output, gated?) ----
def _swiglu(h):
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


ACTIVATION_FN = {
    "gelu_tanh": gelu_tanh,  # a C kernel on CPU (PyTorch's is slow there), F.gelu elsewhere
    "gelu": F.gelu,
    "swiglu": _swiglu,  # the projection holds [gate; up]
    "relu2": lambda h: F.relu(h).square(),
}


def up_width(activation: str, hidden: int) -> int:
    """Rows of the up projection for ``hidden`` units: [gate; up] for a gated activation."""
    return 2 * hidden if activation == "swiglu" else hidden


# ---- RoPE ----
def rope_frequencies(cfg) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with Llama-3 scaling of the long wavelengths if configured
    (computed on the CPU in float64, whatever the default device: on meta, torch.arange imports dynamo)."""
    D = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64, device="cpu") / D))
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


# ---- the one mask builder ----
def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
                key_valid: torch.Tensor | None = None, q_doc: torch.Tensor | None = None,
                k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B|1, 1, T, L) of the keys each query may see.

    ``q_pos`` (B|1, T) and ``k_pos`` (B|1, L) are positions in the sequence: key j is visible to query i
    when k_pos <= q_pos, within ``window`` (q_pos - k_pos < window), ``key_valid`` (B, L) (not padding)
    and in the same document (``q_doc`` (B, T), ``k_doc`` (B, L)). A query always sees its own position,
    so a padding query attends to itself instead of to nothing (NaN). Training, the contiguous cache and
    the paged engine all build their masks here."""
    q, k = q_pos[:, :, None], k_pos[:, None, :]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    if q_doc is not None:
        allowed = allowed & (q_doc[:, :, None] == k_doc[:, None, :])
    return (allowed | (k == q))[:, None]


# ---- cache specs ----
@dataclass(frozen=True)
class KVSpec:
    """A layer that caches keys and values, ``(kv_heads, head_dim)`` each, for every token; a query reads
    the last ``window`` of them (all when None). Token-indexed: a prefix's entries depend only on the
    prefix, so prefix caching applies.

    The interface the caches read is: ``token_indexed`` (bool), ``bytes_per_token(dtype_bytes)`` and, for
    token-indexed kinds, ``entry_shapes()``: the per-token tensors' shapes (here (K, D) for keys and
    (K, D) for values). A compressed latent (MLA) is another token-indexed spec with one entry of (latent
    dim,); a recurrent state (Mamba) is a spec with ``token_indexed = False`` and a fixed per-sequence
    ``state_shapes()``, which turns prefix caching off for the model (docs/model.md, "caches by spec")."""
    kv_heads: int
    head_dim: int
    window: int | None = None
    token_indexed = True

    def entry_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.kv_heads, self.head_dim), (self.kv_heads, self.head_dim)

    def bytes_per_token(self, dtype_bytes: int = 4) -> int:
        return 2 * self.kv_heads * self.head_dim * dtype_bytes


# ---- initialization, written out per component ----
class Init:
    """The recipe's initialization, applied by each component to its own parameters.

    ``normal(p)``: N(0, std); ``residual(p)``: a projection into the residual stream: N(0, std/sqrt(2 L))
    (GPT-2), or zero with ``zero_init_proj``; ``ones``/``zeros``. Every call records the parameter so the
    model can check that nothing was left with torch's default init."""

    def __init__(self, cfg):
        self.std, self.n_layer, self.zero_proj = cfg.init_std, cfg.n_layer, cfg.zero_init_proj
        self.done: set[int] = set()

    def _mark(self, p) -> bool:
        """Record ``p``; whether it holds data to write (a meta-device model, built to count or to be
        loaded into, only records: its coverage is checked all the same)."""
        self.done.add(id(p))
        return not p.is_meta

    def normal(self, p, std: float | None = None):
        if self._mark(p):
            p.normal_(0.0, self.std if std is None else std)

    def residual(self, p):
        if self.zero_proj:
            self.zeros(p)
        else:
            self.normal(p, self.std / math.sqrt(2 * self.n_layer))

    def ones(self, p):
        if self._mark(p):
            p.fill_(1.0)

    def zeros(self, p):
        if self._mark(p):
            p.zero_()

    def module(self, m: nn.Module, residual: bool = False):
        """A Linear (weight normal or residual, bias zero) or a norm (weight one, bias zero)."""
        if isinstance(m, nn.Linear):
            (self.residual if residual else self.normal)(m.weight)
        elif m.weight is not None:
            self.ones(m.weight)
        if getattr(m, "bias", None) is not None:
            self.zeros(m.bias)


class Component(nn.Module):
    """The defaults of the component contract (see the module docstring)."""

    kind = "?"

    def reset_parameters(self, init: Init) -> None:
        raise NotImplementedError(f"{type(self).__name__} must write out its initialization")

    def active_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def score_flops(self, seq_len: int) -> int:
        return 0

    def cache_spec(self):
        return None

    def muon_splits(self) -> dict:
        return {}

    def adam_only(self) -> list:
        return []

    def tp_plan(self) -> dict:
        return {}
