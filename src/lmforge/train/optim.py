"""Optimizers: AdamW with weight-decay groups, and Muon for the hidden matrices.

Knows which parameters get which treatment; knows nothing about the loop.

* AdamW: matrices (>= 2-D: linear weights and embeddings) decay, vectors
  (biases, norm scales) do not (decaying a norm's scale towards 0 fights the norm).
* Muon (Jordan et al. 2024, "MomentUm Orthogonalized by Newton-Schulz"): for each
  hidden 2-D weight, keep a Nesterov momentum of the gradient and replace it by
  the nearest semi-orthogonal matrix (its polar factor, approximated by five
  Newton-Schulz iterations), scaled by sqrt(max(1, rows/cols)); every direction of
  the update then has the same size. Embeddings, the output head, norms and
  biases stay on AdamW. Fused matrices (our [q; k; v] and [gate; up]) are
  orthogonalized part by part, as if they were separate.
"""
from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # a quintic that pushes singular values towards 1 quickly


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T (the polar factor), for a 2-D G."""
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if G.is_cuda else torch.float32  # bf16 crawls on CPUs without AVX-512
    X = G.to(dtype)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    X = X / (X.norm() + eps)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. ``splits[p]`` (optional) lists row counts of fused parts."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, splits: dict | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.splits = splits or {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(g)
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mom)
                g = g.lerp(buf, mom) if group["nesterov"] else buf
                parts = self.splits.get(p)
                if parts:
                    update = torch.cat([newton_schulz(x, group["ns_steps"]) * max(1, x.size(0) / x.size(1)) ** 0.5
                                        for x in g.split(parts, dim=0)])
                else:
                    update = newton_schulz(g, group["ns_steps"]) * max(1, g.size(0) / g.size(1)) ** 0.5
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
        return loss


def param_groups(model):
    """(hidden matrices, embedding/head matrices, vectors) of a Transformer."""
    hidden, embed, vectors = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            vectors.append((name, p))
        elif name.startswith(("tok_emb", "pos_emb", "lm_head")):
            embed.append((name, p))
        else:
            hidden.append((name, p))
    return hidden, embed, vectors


def fused_splits(model) -> dict:
    """Row counts of the fused matrices, so Muon treats q, k, v (and gate, up) separately."""
    cfg = model.cfg
    out = {}
    for block in model.blocks:
        a = block.attn
        out[a.qkv.weight] = [a.H * a.D, a.K * a.D, a.K * a.D]
        if cfg.mlp == "swiglu":
            out[block.mlp.fc.weight] = [cfg.ff, cfg.ff]
    return out


def _cpu_fused_adamw() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


def build_optimizers(model, kind: str = "adamw", lr: float = 6e-4, weight_decay: float = 0.1,
                     betas=(0.9, 0.95), eps: float = 1e-8, muon_lr: float = 0.02, muon_momentum: float = 0.95,
                     embed_lr: float | None = None, fused: bool | None = None) -> list[torch.optim.Optimizer]:
    """A list of optimizers that together cover every parameter once.

    ``adamw``: one AdamW, decayed matrices and undecayed vectors.
    ``muon``: Muon for hidden matrices (lr ``muon_lr``) + AdamW for the rest (lr ``embed_lr`` or ``lr``).
    """
    hidden, embed, vectors = param_groups(model)
    kw = dict(betas=tuple(betas), eps=eps)
    if fused is None:  # one kernel for all parameters: CUDA, and CPU since torch 2.4
        dev = next(model.parameters()).device.type
        fused = dev == "cuda" or (dev == "cpu" and _cpu_fused_adamw())
    if fused:
        kw["fused"] = True
    if kind == "adamw":
        groups = [{"params": [p for _, p in hidden + embed], "weight_decay": weight_decay, "name": "decay"},
                  {"params": [p for _, p in vectors], "weight_decay": 0.0, "name": "no_decay"}]
        return [torch.optim.AdamW(groups, lr=lr, **kw)]
    if kind == "muon":
        splits = {p: s for p, s in fused_splits(model).items()}
        muon = Muon([p for _, p in hidden], lr=muon_lr, momentum=muon_momentum, splits=splits)
        elr = embed_lr or lr
        groups = [{"params": [p for _, p in embed], "weight_decay": 0.0, "name": "embed"},
                  {"params": [p for _, p in vectors], "weight_decay": 0.0, "name": "vectors"}]
        return [muon, torch.optim.AdamW(groups, lr=elr, **kw)]
    raise ValueError(f"unknown optimizer {kind!r}; expected 'adamw' or 'muon'")
