"""The bridge to ``_decode`` (C): decode steps without PyTorch's per-operator overhead.

A decode step reads every weight once to produce one token per sequence, so it is
bound by memory bandwidth, and for small models by the fixed cost of each of the
~15 PyTorch operators per layer. ``FastDecoder`` runs the whole step of an
``lmforge.model.Transformer`` (eval mode, CPU, float32; every variant of
``ModelConfig``) as one C call that reads the weights where PyTorch keeps them
and the keys/values straight from the KV cache, contiguous or paged.

Both caches have the same shape per layer, ``(N, K, S, D)``: a contiguous
``KVCache`` is N rows of S = max_len positions; the paged pool is N blocks of
S = block_size positions. A sequence is a list of those (its block table); a
contiguous row ``b`` is the one-entry table ``[b]``.

``FastDecoder.supported(model)`` says whether the fast path applies (and
``LMFORGE_NO_NATIVE=1`` turns it off); the prefill stays in PyTorch, whose
matrix-matrix products are compute-bound and already fast.
"""
from __future__ import annotations


import numpy as np
import torch

from .._io import native_extension

_decode = native_extension("lmforge.infer._decode")

AVAILABLE = _decode is not None
_NORM = {"layernorm": 0, "rmsnorm": 1}
_MLP = {"gelu_tanh": 0, "gelu": 1, "swiglu": 2, "relu2": 3}
_POS = {"learned": 0, "rope": 1}


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class FastDecoder:
    @staticmethod
    def supported(model) -> bool:
        """True for an eval-mode lmforge Transformer on CPU in float32 built only of the standard blocks."""
        from ..model.attention import CausalSelfAttention as Attention
        from ..model.feedforward import DenseMLP as MLP
        from ..model.transformer import Block, Transformer

        if not AVAILABLE or type(model) is not Transformer or model.training:
            return False
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
            return False
        cfg = model.cfg
        if cfg.norm not in _NORM or cfg.ffn.activation not in _MLP or cfg.pos not in _POS:
            return False
        return all(type(b) is Block and type(b.attn) is Attention and type(b.mlp) is MLP for b in model.blocks)

    def __init__(self, model, threads: int | None = None):
        if not FastDecoder.supported(model):
            raise ValueError("the fast decode path needs an eval-mode lmforge Transformer, CPU float32, "
                             "and the compiled extension")
        self.model, self.cfg = model, model.cfg
        self.threads = threads or torch.get_num_threads()
        self._binding = None
        self._build(model.cfg.max_seq_len if model.cfg.pos == "rope" else 0)

    def _build(self, rope_len: int) -> None:
        m, cfg = self.model, self.cfg
        keep = []  # detached views keep every storage alive even if the module's tensors are replaced

        def a(t):
            if t is None:
                return 0
            t = t.detach()
            if not t.is_contiguous():
                raise ValueError("fast decode: a weight is not contiguous")
            keep.append(t)
            return _addr(t)

        cos = sin = None
        if cfg.pos == "rope":
            rope_len = max(rope_len, 256)
            m._rope(rope_len, torch.float32)
            cos, sin = (t.contiguous() for t in m._rope_cache[1])
            rope_len = cos.shape[2]
        ints = (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.hd, cfg.ff,
                _NORM[cfg.norm], _MLP[cfg.ffn.activation], _POS[cfg.pos], cfg.attn.sliding_window or 0, rope_len,
                cfg.max_seq_len if cfg.pos == "learned" else 1 << 30)
        floats = (float(cfg.norm_eps), float(cfg.logit_softcap or 0.0))
        nf = m.norm_f
        glob = (a(m.tok_emb.weight), a(m.pos_emb.weight) if cfg.pos == "learned" else 0, a(nf.weight),
                a(getattr(nf, "bias", None)), a(m.lm_head.weight), a(cos), a(sin))
        layers = []
        for b in m.blocks:
            at, mlp = b.attn, b.mlp
            layers.append((a(b.attn_norm.weight), a(getattr(b.attn_norm, "bias", None)), a(at.qkv.weight),
                           a(at.qkv.bias), a(at.q_norm.weight) if cfg.attn.qk_norm else 0,
                           a(at.k_norm.weight) if cfg.attn.qk_norm else 0, a(at.proj.weight), a(at.proj.bias),
                           a(b.mlp_norm.weight), a(getattr(b.mlp_norm, "bias", None)), a(mlp.fc.weight),
                           a(mlp.fc.bias), a(mlp.proj.weight), a(mlp.proj.bias)))
        self._keep = keep
        self.rope_len = rope_len
        self._model = _decode.new(ints, floats, glob, tuple(layers))
        if self._binding is not None:
            self.bind(*self._binding)

    def bind(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Use these per-layer ``(N, K, S, D)`` key and value buffers as the cache."""
        cfg = self.cfg
        for t in list(k) + list(v):
            if t.dim() != 4 or t.shape[1] != cfg.kv_heads or t.shape[3] != cfg.hd or not t.is_contiguous() \
                    or t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError("fast decode: the cache must be contiguous CPU float32 (N, K, S, D) buffers")
        self._binding = (list(k), list(v))
        N, K, S, D = k[0].shape
        self.n_slots, self.slot_len = N, S
        _decode.set_cache(self._model, tuple(t.data_ptr() for t in k), tuple(t.data_ptr() for t in v), K * S * D, S)

    def step(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> torch.Tensor:
        """Logits ``(B, vocab)`` of one new token per row: row ``b`` holds ``tokens[b]`` at position
        ``positions[b]`` of the sequence whose cache slots are ``tables[b]``; its key and value are written."""
        B = len(tokens)
        if self._binding is None:
            raise RuntimeError("fast decode: bind a cache first")
        if not (len(positions) == len(tables) == B) or B == 0:
            raise ValueError("fast decode: one position and one block table per token")
        top = max(positions)
        if self.cfg.pos == "rope" and top >= self.rope_len:
            self._build(2 * (top + 1))
        width = max(len(t) for t in tables)
        for p, t in zip(positions, tables):
            if p // self.slot_len >= len(t):
                raise ValueError(f"fast decode: position {p} is past the sequence's {len(t)} cache blocks")
        tab = np.zeros((B, width), dtype=np.int32)
        for i, t in enumerate(tables):
            tab[i, :len(t)] = t
        if tab.min() < 0 or tab.max() >= self.n_slots:
            raise ValueError("fast decode: a block table points outside the cache")
        tok = np.asarray(tokens, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int32)
        out = torch.empty(B, self.cfg.vocab_size)
        _decode.step(self._model, B, tok.ctypes.data, pos.ctypes.data, tab.ctypes.data, width, out.data_ptr(),
                     self.threads)
        return out
