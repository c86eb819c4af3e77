"""The decoder: one generic block, components from the registries, a separate output head.

Knows the math of a decoder-only transformer (embeddings, pre-norm blocks of
an attention and a feed-forward component, a final norm and the output head)
and how one forward's shared state (``Context``: RoPE angles, masks per
window, the cache, the router statistics) reaches every layer; knows nothing
about any one component's math (``model.attention``, ``model.feedforward``),
tokenizers, files, optimizers or parallelism (those wrap or swap its modules
from outside: ``lmforge.train.recompute``, ``lmforge.model.surgery``).

``hidden_states(idx, ...)`` runs the embeddings and blocks and returns the final-normed hidden
states (B, T, C); ``compute_logits(h)`` applies the head; ``forward`` is the two composed (logits
at every position, or only at ``logits_at``), plus the loss when ``targets`` are given.

Shapes: B batch, T time, C = d_model, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig
from .kernels import cross_entropy
from .layers import Init, causal_mask, make_norm, rope_frequencies
from .registry import ATTENTION, FEEDFORWARD, ensure_builtin


class Context:
    """What every layer of one forward shares. ``mask(window)`` is built once per distinct window (None
    means plain causal: the fast kernels apply); ``aux`` collects the MoE layers' router statistics."""

    def __init__(self, rope=None, cache=None, mask_fn=None, aux: list | None = None):
        self.rope, self.cache, self.aux = rope, cache, aux
        self._mask_fn, self._masks = mask_fn, {}

    def mask(self, window: int | None):
        if self._mask_fn is None:
            return None
        if window not in self._masks:
            self._masks[window] = self._mask_fn(window)
        return self._masks[window]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec):
        super().__init__()
        self.spec = spec
        self.attn_norm = make_norm(cfg)
        self.attn = ATTENTION[spec.attention](cfg, spec)
        self.mlp_norm = make_norm(cfg)
        self.mlp = FEEDFORWARD[spec.ffn](cfg, spec)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, ctx: Context):
        x = x + self.drop(self.attn(self.attn_norm(x), ctx))
        return x + self.drop(self.mlp(self.mlp_norm(x), ctx))

    def components(self):
        return self.attn, self.mlp


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ensure_builtin()
        cfg.validate()
        self.cfg = cfg
        # (``_weight``: no init of torch's own here; reset_parameters writes it. On the meta device torch's
        # normal_ would import torch._dynamo, seconds, for a model built only to be counted or loaded into)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model, _weight=torch.empty(cfg.max_seq_len, cfg.d_model))
        else:
            dev = self.tok_emb.weight.device
            inv = rope_frequencies(cfg)
            self.register_buffer("inv_freq", torch.empty(inv.shape, device="meta") if dev.type == "meta"
                                 else inv.to(dev), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, spec) for spec in cfg.layer_specs())
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.router_metrics: dict = {}  # the last training forward's MoE losses and per-expert load
        self.reset_parameters()

    # ---- init and facts ----
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The model's own parameters (embeddings N(0, std), norms one), then each component's
        (``Component.reset_parameters``). A parameter nobody initialized is an error, not a default."""
        init = Init(self.cfg)
        init.normal(self.tok_emb.weight)
        if self.cfg.pos == "learned":
            init.normal(self.pos_emb.weight)
        for block in self.blocks:
            init.module(block.attn_norm)
            init.module(block.mlp_norm)
            for c in block.components():
                c.reset_parameters(init)
        init.module(self.norm_f)
        if not self.cfg.tie_embeddings:
            init.normal(self.lm_head.weight)
        left = [n for n, p in self.named_parameters() if id(p) not in init.done]
        if left:
            raise RuntimeError(f"no initialization for {left[:5]}: a component's reset_parameters must "
                               "cover every parameter it owns")
        if getattr(self, "inv_freq", None) is not None and not self.inv_freq.is_meta:
            self.inv_freq.copy_(rope_frequencies(self.cfg))
            self._rope_cache = None

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.tok_emb.weight.numel() + (self.pos_emb.weight.numel() if self.cfg.pos == "learned" else 0)
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def num_active_params(self, embeddings: bool = True) -> int:
        """Parameters one token multiplies: the components' ``active_params`` (a MoE's top-k experts)."""
        total = self.num_params(embeddings)
        for block in self.blocks:
            for c in block.components():
                total -= sum(p.numel() for p in c.parameters()) - c.active_params()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x (active non-embedding parameters + the head) + attention scores."""
        n = self.num_active_params(embeddings=False) + self.cfg.vocab_size * self.cfg.d_model
        return 6 * n + sum(b.attn.score_flops(seq_len) for b in self.blocks)

    def cache_specs(self) -> list:
        """What each layer keeps for decoding (``layers.KVSpec`` and, later, other kinds)."""
        return [b.attn.cache_spec() for b in self.blocks]

    def muon_splits(self) -> dict:
        out = {}
        for block in self.blocks:
            for c in block.components():
                out.update(c.muon_splits())
        return out

    def adam_only(self) -> list:
        return [p for b in self.blocks for c in b.components() for p in c.adam_only()]

    # ---- the forward ----
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

    def _mask_fn(self, T: int, p: int, device, attention_mask, doc_ids, cache):
        """The Context's mask builder for this forward: ``window -> mask or None`` (None: plain causal)."""
        if getattr(cache, "paged", False):
            return cache.mask  # window -> mask: the paged batch's rows (built by the same causal_mask)
        L = p + T
        plain = attention_mask is None and doc_ids is None

        def build(window):
            if plain and (window is None or window >= L) and (p == 0 or T == 1):
                return None  # causal prefill, or a decode step that sees every cached key
            q = torch.arange(p, L, device=device)[None]
            k = torch.arange(L, device=device)[None]
            key_valid = None if attention_mask is None else attention_mask[:, :L]
            return causal_mask(q, k, window, key_valid, doc_ids, doc_ids)
        return build

    def hidden_states(self, idx, attention_mask=None, position_ids=None, doc_ids=None, cache=None,
                      aux: list | None = None) -> torch.Tensor:
        """The final-normed hidden states (B, T, C).

        ``attention_mask`` (B, T): 1 for tokens, 0 for padding (with a contiguous cache, (B, p+T) over
        every cached key); ``position_ids`` (B, T) default to p..p+T-1; ``doc_ids`` (B, T) restricts
        attention to one's own document. ``cache`` (an ``lmforge.infer`` cache): ``idx`` continues the
        cached sequence; its keys and values are added. ``aux``: a list that receives the MoE layers'
        ``RouterStats``."""
        B, T = idx.shape
        if getattr(cache, "paged", False):  # rows of different sequences (lmforge.infer.paged)
            position_ids = cache.positions
            p = 0
        else:
            p = cache.pos if cache is not None else 0
        if self.cfg.pos == "learned":  # the furthest position embedded must exist (restarting position_ids:
            last = p + T if position_ids is None else int(position_ids.max()) + 1  # packed rows may be longer)
            if last > self.cfg.max_seq_len:
                raise ValueError(f"position {last - 1} is past the model's max_seq_len={self.cfg.max_seq_len} "
                                 "(learned positions)")
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
        ctx = Context(rope, cache, self._mask_fn(T, p, idx.device, attention_mask, doc_ids, cache), aux)
        for block in self.blocks:
            x = block(x, ctx)
        if cache is not None:
            cache.advance(T)
        return self.norm_f(x)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The output head over hidden states (..., C) -> (..., V)."""
        logits = self.lm_head(h)
        if self.cfg.logit_softcap:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward(self, idx, targets=None, attention_mask=None, position_ids=None, doc_ids=None,
                ignore_index: int = -100, cache=None, logits_at=None):
        """Logits (B, T, V), and the loss if ``targets`` is given: the mean cross-entropy plus, for a
        MoE, the load-balancing (and z-) losses weighted by their coefficients (``router_metrics``
        holds each part and the per-expert load). ``logits_at``: "last" for (B, 1, V) at the last
        position only (a prefill that samples), or an index tensor of positions (B, n)."""
        aux = [] if self.cfg.moe is not None and targets is not None else None
        h = self.hidden_states(idx, attention_mask, position_ids, doc_ids, cache, aux)
        if isinstance(logits_at, str):
            if logits_at != "last":
                raise ValueError(f"logits_at: expected 'last' or a tensor of positions, got {logits_at!r}")
            h = h[:, -1:]
        elif logits_at is not None:
            h = h.gather(1, logits_at[..., None].expand(-1, -1, h.shape[-1]))
        logits = self.compute_logits(h)
        if targets is None:
            return logits
        loss = cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=ignore_index)  # a fused C kernel on CPU float32
        if aux:
            loss = loss + self._router_loss(aux, loss, attention_mask)
        return logits, loss

    def _router_loss(self, aux, ce, attention_mask):
        from .feedforward import router_losses

        m = self.cfg.moe
        mask = None if attention_mask is None else attention_mask.reshape(-1)
        lb, z = router_losses(aux, m.n_experts, m.top_k, mask)
        load = torch.stack([s.load for s in aux]).float()  # (MoE layers, E)
        self.router_metrics = {"ce": ce.detach(), "aux_loss": lb.detach(), "z_loss": z.detach(),
                               "expert_load": (load / load.sum(1, keepdim=True)).detach()}
        return m.aux_loss_coef * lb + m.z_loss_coef * z
