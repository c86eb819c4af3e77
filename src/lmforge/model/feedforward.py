"""Feed-forward components: ``dense`` (the MLP) and ``moe`` (a mixture of experts).

Knows the math of each kind and its facts (init, counts, Muon splits, TP
plan); knows nothing about the block around it. The MoE leaves its router
statistics in ``ctx.aux`` (one ``RouterStats`` per MoE layer); the model turns
them into the load-balancing and z losses (they need every layer at once, as
HF's ``load_balancing_loss_func`` has them) and the per-expert load metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ACTIVATION_FN, Component, Init, up_width
from .registry import register_feedforward


@register_feedforward("dense")
class DenseMLP(Component):
    """proj(act(fc(x))); for SwiGLU ``fc`` holds [gate; up] in one matrix."""

    def __init__(self, cfg, spec=None, hidden: int | None = None, activation: str | None = None,
                 bias: bool | None = None):
        super().__init__()
        self.activation = activation or cfg.ffn.activation
        self.hidden = hidden or cfg.ff
        bias = cfg.ffn.bias if bias is None else bias
        self.fc = nn.Linear(cfg.d_model, up_width(self.activation, self.hidden), bias=bias)
        self.proj = nn.Linear(self.hidden, cfg.d_model, bias=bias)
        self.act = ACTIVATION_FN[self.activation]

    def forward(self, x, ctx=None):
        return self.proj(self.act(self.fc(x)))

    def reset_parameters(self, init: Init) -> None:
        init.module(self.fc)
        init.module(self.proj, residual=True)

    def muon_splits(self) -> dict:
        return {self.fc.weight: [self.hidden, self.hidden]} if self.activation == "swiglu" else {}

    def tp_plan(self) -> dict:
        return {"fc": "colwise" if self.activation != "swiglu" else "colwise_gate_up", "proj": "rowwise"}


@dataclass
class RouterStats:
    """One MoE layer's routing of one forward: what the losses and metrics need."""
    logits: torch.Tensor  # (N, E) router logits of the N tokens
    probs: torch.Tensor  # (N, E) their scores (softmax), float32
    chosen: torch.Tensor  # (N, top_k) expert ids
    load: torch.Tensor  # (E,) tokens routed to each expert (detached)
    layer: int = 0


@register_feedforward("moe")
class MoE(Component):
    """Top-k routed experts (+ optional shared experts), Mixtral / Qwen2-MoE.

    The router scores every expert of each token (softmax of ``router(x)``), keeps the top ``k``
    (renormalized to sum to 1 with ``norm_topk_prob``), and the output is the weighted sum of those
    experts' SwiGLU MLPs. The experts are stacked 3-D weights, ``w_in`` (E, 2 d_e, C) = [gate; up] and
    ``w_out`` (E, C, d_e); the forward sorts the (token, expert) pairs by expert and runs one matrix
    product per expert over its tokens (no Python loop over tokens). Shared experts (one MLP of
    ``n_shared * d_shared`` units) run on every token, scaled by sigmoid(``shared_gate(x)``) if set."""

    def __init__(self, cfg, spec):
        super().__init__()
        m = cfg.moe
        self.layer = spec.index
        self.E, self.k, self.norm_topk = m.n_experts, m.top_k, m.norm_topk_prob
        self.activation, self.d_e = m.activation, cfg.d_expert
        self.act = ACTIVATION_FN[self.activation]
        C = cfg.d_model
        self.router = nn.Linear(C, self.E, bias=False)
        self.w_in = nn.Parameter(torch.empty(self.E, up_width(self.activation, self.d_e), C))
        self.w_out = nn.Parameter(torch.empty(self.E, C, self.d_e))
        self.shared = None
        if m.n_shared:
            self.shared = DenseMLP(cfg, hidden=m.n_shared * (m.d_shared or self.d_e), activation=self.activation,
                                   bias=False)
            self.shared_gate = nn.Linear(C, 1, bias=False) if m.shared_gate else None

    def forward(self, x, ctx=None):
        B, T, C = x.shape
        x = x.reshape(-1, C)
        logits = self.router(x)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, chosen = torch.topk(probs, self.k, dim=-1)  # (N, k)
        if self.norm_topk:
            w = w / w.sum(-1, keepdim=True)
        w = w.to(x.dtype)
        flat = chosen.reshape(-1)  # (N k,) the expert of each (token, slot) pair
        order = torch.argsort(flat, stable=True)
        load = torch.bincount(flat, minlength=self.E)
        token = order // self.k  # the token of each pair, grouped by expert
        # One gather of the tokens, then per expert a product pair on a contiguous slice of it, joined
        # by one cat. (Measured on CPU: writing each expert's rows into a preallocated buffer and
        # indexing ``w_in[e]`` made the backward copy the whole buffer and zero the whole stack once per
        # expert, 2x slower; torch._grouped_mm and a gather/sum-instead-of-scatter variant were slower too.)
        xs = x.index_select(0, token)
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)  # one stacked gradient each, not E
        parts = [self.act(xe @ w_in[e].t()) @ w_out[e].t()
                 for e, xe in enumerate(xs.split(load.tolist())) if xe.shape[0]]
        ys = (torch.cat(parts) if parts else xs) * w.reshape(-1)[order, None]
        out = x.new_zeros(x.shape).index_add(0, token, ys)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        if ctx is not None and ctx.aux is not None:
            ctx.aux.append(RouterStats(logits, probs, chosen, load.detach(), self.layer))
        return out.view(B, T, C)

    # ---- facts ----
    def reset_parameters(self, init: Init) -> None:
        init.module(self.router)
        init.normal(self.w_in)
        init.residual(self.w_out)
        if self.shared is not None:
            self.shared.reset_parameters(init)
            if self.shared_gate is not None:
                init.module(self.shared_gate)

    def active_params(self) -> int:
        per_expert = (self.w_in.numel() + self.w_out.numel()) // self.E
        n = self.router.weight.numel() + self.k * per_expert
        if self.shared is not None:
            n += sum(p.numel() for p in self.shared.parameters())
            n += self.shared_gate.weight.numel() if self.shared_gate is not None else 0
        return n

    def muon_splits(self) -> dict:
        # each expert is its own matrix; gate and up apart (Muon unbinds 3-D weights, then splits rows)
        out = {self.w_in: [self.d_e, self.d_e]} if self.activation == "swiglu" else {}
        if self.shared is not None:
            out.update(self.shared.muon_splits())
        return out

    def adam_only(self) -> list:
        return [self.router.weight] + ([self.shared_gate.weight] if self.shared is not None and
                                       self.shared_gate is not None else [])

    def tp_plan(self) -> dict:
        # experts: replicated (no expert parallelism: every rank runs every expert on the whole batch)
        plan = {"router": "replicate", "w_in": "expert", "w_out": "expert"}
        if self.shared is not None:
            plan["shared"] = "colwise_gate_up+rowwise"  # the shared MLP's own plan (fc [gate; up], proj)
            if self.shared_gate is not None:
                plan["shared_gate"] = "replicate"
        return plan


def router_losses(stats: list[RouterStats], n_experts: int, top_k: int,
                  token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) over all MoE layers of one forward.

    Load balancing (Switch Transformer, as Mixtral computes it): E * sum_e f_e P_e, where f_e is the
    fraction of (token, slot) choices that went to expert e and P_e the mean router probability of e,
    both over the tokens of every MoE layer together (HF's ``load_balancing_loss_func``: a uniform
    router scores top_k). ``token_mask`` (N,) leaves padding out. z-loss (ST-MoE): the mean of
    logsumexp(router logits)^2."""
    if not stats:
        z = torch.zeros(())
        return z, z
    probs = torch.cat([s.probs for s in stats])  # (L N, E)
    onehot = F.one_hot(torch.cat([s.chosen for s in stats]), n_experts).float()  # (L N, k, E)
    logits = torch.cat([s.logits for s in stats]).float()
    if token_mask is None:
        f = onehot.mean(0)  # (k, E)
        P = probs.mean(0)
        z = torch.logsumexp(logits, -1).square().mean()
    else:
        m = token_mask.float().repeat(len(stats))  # (L N,)
        f = (onehot * m[:, None, None]).sum(0) / m.sum()
        P = (probs * m[:, None]).sum(0) / m.sum()
        z = (torch.logsumexp(logits, -1).square() * m).sum() / m.sum()
    return n_experts * (f * P[None]).sum(), z
