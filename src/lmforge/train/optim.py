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

Sharded parameters (``torch.distributed.tensor.DTensor``: FSDP2 shards dim 0 over the
data-parallel ranks, tensor parallel dim 0 or 1 over its group). AdamW is elementwise: its
``torch._foreach_*`` and fused updates run on the local shards as they are. Muon is not:
Newton-Schulz needs the whole matrix, and orthogonalizing each shard alone would give a
different (wrong) update. lmforge chooses the *full matrix*: the momentum stays sharded, each
rank gathers the Nesterov-corrected momentum (``full_tensor()``, one all-gather per matrix),
orthogonalizes it exactly as one process does (same batching by shape, same ``splits``, so the
update equals one process's), and keeps only its own shard of the update (the rows or columns its
placements name). Every rank computes every Newton-Schulz: compute and transient memory are
those of one process, communication is one all-gather of each hidden matrix per step; a sharded
Newton-Schulz (distributing the stacks over the ranks) is not implemented.
"""
from __future__ import annotations

import torch

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # a quintic that pushes singular values towards 1 quickly


@torch.no_grad()
def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of G = U S V^T (the polar factor), for a 2-D G or a stack (n, rows, cols)."""
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if G.is_cuda else torch.float32  # bf16 crawls on CPUs without AVX-512
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters (and 3-D stacks of experts, each a matrix). ``splits[p]`` (optional) lists
    row counts of fused parts (of each expert's matrix for a stack).

    Matrices of the same shape (the parts of every layer) are orthogonalized together,
    as one batched Newton-Schulz: a few large matrix products instead of hundreds of
    small ones (on a small CPU model that was most of the optimizer's time).

    DTensor parameters (FSDP2, tensor parallel): the full-matrix choice (the module's docstring):
    the momentum stays sharded, the matrix is gathered whole for Newton-Schulz, and each rank
    applies its own shard of the update. Every rank must step (the gathers are collectives)."""

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
            params, parts = [], []  # parts[i]: the matrices (views) that make p's update
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
                if _is_dtensor(g):  # sharded: Newton-Schulz sees the whole matrix (the "full matrix" choice)
                    g = g.full_tensor()
                sp = self.splits.get(p)
                params.append(p)
                mats = list(g.unbind(0)) if g.dim() == 3 else [g]  # stacked experts: one matrix each
                parts.append([x for m in mats for x in (m.split(sp, dim=0) if sp else [m])])
            by_shape: dict = {}
            for i, ps in enumerate(parts):
                for j, x in enumerate(ps):
                    by_shape.setdefault((tuple(x.shape), x.device, x.dtype), []).append((i, j))
            for (shape, _, _), where in by_shape.items():
                X = torch.stack([parts[i][j] for i, j in where])
                O = newton_schulz(X, group["ns_steps"]) * max(1, shape[0] / shape[1]) ** 0.5
                for k, (i, j) in enumerate(where):
                    parts[i][j] = O[k]
            for p, ps in zip(params, parts):
                if wd:
                    p.mul_(1 - lr * wd)
                u = ps[0] if len(ps) == 1 else torch.cat(ps)
                if _is_dtensor(p):
                    _local(p).add_(_my_shard(u.view(p.shape), p), alpha=-lr)
                else:
                    p.add_(u.view_as(p), alpha=-lr)
        return loss


def _is_dtensor(t) -> bool:
    import sys

    if "torch.distributed.tensor" not in sys.modules:  # nothing can be a DTensor yet: no import
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(p: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the storage this rank updates in place)."""
    return p._local_tensor


def _my_shard(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of ``full`` (the global tensor of DTensor ``like``), placed as ``like`` is: a
    Replicate -> Shard redistribution, which slices locally (torch.chunk's rule, FSDP2's and tensor
    parallel's: uneven shards are smaller at the end) and moves nothing between ranks."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    rep = DTensor.from_local(full.to(like.dtype), mesh, [Replicate()] * mesh.ndim, run_check=False)
    out = rep.redistribute(mesh, like.placements).to_local()
    if out.shape != _local(like).shape:
        raise RuntimeError(f"Muon: this rank's shard of the update is {tuple(out.shape)} but the parameter's "
                           f"local shard is {tuple(_local(like).shape)} (placements {like.placements})")
    return out


class WeightEMA(torch.optim.Optimizer):
    """An exponential moving average of the weights (Polyak averaging): after each ``step()``,
    avg <- decay avg + (1 - decay) w; the first ``step()`` starts it at the current weights.

    It never changes the weights until ``copy_to_model()``. The trainer starts it late in a
    run (``ema_start``) and ends the run on the average. On the CPU recipe (a model that sees
    its 2k-token BPE text ~4 times) the last steps' batches moved the held-out score by
    +-0.02 bits/byte from run to run; the average over the last ~100 steps removed most of
    that and scored 0.03 lower. It is a torch Optimizer only so that checkpoints save and
    restore its state like the optimizers' (resume stays exact)."""

    def __init__(self, params, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        super().__init__(params, dict(decay=decay))

    def started(self) -> bool:
        return any("avg" in self.state[p] for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            ws, avgs = [], []
            for p in group["params"]:
                st = self.state[p]
                if "avg" not in st:
                    st["avg"] = p.detach().clone()
                else:
                    ws.append(p.detach())
                    avgs.append(st["avg"])
            if avgs:
                torch._foreach_lerp_(avgs, ws, 1.0 - group["decay"])

    @torch.no_grad()
    def copy_to_model(self):
        for group in self.param_groups:
            for p in group["params"]:
                if "avg" in self.state[p]:
                    p.copy_(self.state[p]["avg"])


def param_groups(model):
    """(hidden matrices, embedding/head matrices and the components' ``adam_only`` ones, vectors)."""
    hidden, embed, vectors = [], [], []
    seen = set()
    adam_only = {id(p) for p in model.adam_only()}  # matrices a component keeps off Muon (a router)
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            vectors.append((name, p))
        elif name.startswith(("tok_emb", "pos_emb", "lm_head")) or id(p) in adam_only:
            embed.append((name, p))
        else:
            hidden.append((name, p))
    return hidden, embed, vectors


def fused_splits(model) -> dict:
    """Row counts of the fused matrices, so Muon treats q, k, v (and gate, up) separately: each
    component says its own (``Component.muon_splits``)."""
    return model.muon_splits()


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``:

        m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2,   p = p (1 - lr wd)
        p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    ``fused=True`` runs PyTorch's fused kernel (one call per group: CUDA, and CPU
    since torch 2.4), otherwise the same update in ``torch._foreach_*`` operators.
    The state (``step``, ``exp_avg``, ``exp_avg_sq``) is torch's, so checkpoints of
    either load into the other. Unlike torch's, its ``step`` does not import
    ``torch._dynamo`` (~1.3 s at the start of every run on a laptop)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 fused: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamW: invalid hyperparameters lr={lr} betas={betas} eps={eps} "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused,
                                      amsgrad=False, maximize=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, m, v, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                steps.append(st["step"])
            if not params:
                continue
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            torch._foreach_add_(steps, 1)
            if group["fused"]:
                torch._fused_adamw_(params, grads, m, v, [], steps, amsgrad=False, lr=lr, beta1=b1, beta2=b2,
                                    weight_decay=wd, eps=eps, maximize=False, grad_scale=None, found_inf=None)
                continue
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(m, grads, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, grads, grads, 1 - b2)
            for t in sorted({float(s) for s in steps}):  # groups share a step count, except after surgery
                idx = [i for i, s in enumerate(steps) if float(s) == t]
                bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
                denom = torch._foreach_sqrt([v[i] for i in idx])
                torch._foreach_div_(denom, bc2 ** 0.5)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_([params[i] for i in idx], [m[i] for i in idx], denom, -lr / bc1)
        return loss


def skip_dynamo_import() -> bool:
    """Spare an eager run the ~1.3 s import of ``torch._dynamo``.

    ``torch.optim.Optimizer``'s ``add_param_group``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` are wrapped so that torch.compile never traces them; the
    wrapper imports ``torch._dynamo`` on its first call, even when nothing is
    compiled. When dynamo is not loaded yet, this records each wrapped method as
    its own "disabled" version, which is what the wrapper caches after that import.
    Call it only for runs that do not use torch.compile (the trainer does so);
    returns whether it applied (False on a torch without these wrappers)."""
    import sys

    if "torch._dynamo" in sys.modules:
        return False
    done = False
    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        fn = getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        if fn is not None and getattr(fn, "__dynamo_disable", None) is None:
            fn.__dynamo_disable = fn
            done = True
    return done


def _cpu_fused_adamw() -> bool:
    try:
        p = torch.nn.Parameter(torch.zeros(1))
        p.grad = torch.zeros(1)
        AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, AttributeError, NotImplementedError):
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
        return [AdamW(groups, lr=lr, **kw)]
    if kind == "muon":
        splits = {p: s for p, s in fused_splits(model).items()}
        muon = Muon([p for _, p in hidden], lr=muon_lr, momentum=muon_momentum, splits=splits)
        elr = embed_lr or lr
        groups = [{"params": [p for _, p in embed], "weight_decay": 0.0, "name": "embed"},
                  {"params": [p for _, p in vectors], "weight_decay": 0.0, "name": "vectors"}]
        return [muon, AdamW(groups, lr=elr, **kw)]
    raise ValueError(f"unknown optimizer {kind!r}; expected 'adamw' or 'muon'")
