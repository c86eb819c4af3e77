"""Tensor parallel (Megatron-style, on DTensor), sequence parallel, and TP + FSDP2 on a 2-D mesh.

Knows how to split lmforge's decoder over the ranks of a tensor-parallel group from outside
(``apply_tp``), reading each component's ``tp_plan()`` (``model.layers`` lists the kinds), and the
two strategies the loop runs it under: ``TPStrategy`` ("tp": one group of every rank; they all read
the same batch) and ``TPFSDPStrategy`` ("tp+fsdp": a (dp, tp) mesh, TP inside each row, FSDP2 over
the columns). Knows nothing of any one component's math; it needs of the model only its skeleton
(``tok_emb``, ``pos_emb``, ``drop``, ``blocks[i].attn_norm / attn / mlp_norm / mlp``, ``norm_f``,
``lm_head``) and the components' facts (``tp_plan``, ``muon_splits``, ``tp_local_heads``).

**The split.** Attention: the fused [q; k; v] projection column-wise (each rank H/tp query and
K/tp key/value heads), the output projection row-wise (its partial sums all-reduced); the
component then computes only its heads (``tp_local_heads``). MLP: ``fc`` column-wise, ``proj``
row-wise (d_ff/tp hidden units per rank). One all-reduce forward and one backward per attention and
per MLP. Embeddings, the head, the norms, a MoE's router and its experts: replicated (a whole copy on
every rank; no vocabulary or expert parallelism). A MoE's shared expert is split like the MLP.

**The fused projections.** A plain Shard(0) of [q; k; v] would give rank 0 all of q and none of v
(and of SwiGLU's [gate; up] all gates, no ups). The rows are regrouped before the split, Megatron's
layout: [q_0; k_0; v_0; q_1; k_1; v_1; ...] (the parts are the component's ``muon_splits`` rows),
so rank r's contiguous Shard(0) slice is its heads' q, k, v (its units' gate and up) and the
forward is the component's own, unchanged. The regrouping is undone wherever the weights leave
this module: ``full_state_dict`` and ``dcp_state`` give full tensors in the model's own row order
(and ``load_dcp_state`` regroups them), and Muon (``TPMuon``) orthogonalizes q, k and v in the
model's order. The alternative, splitting ``qkv`` into three modules, would rename the parameters
(checkpoints would no longer load across strategies).

**Local tensors.** Every parameter becomes a DTensor on the tensor-parallel mesh (the optimizers'
foreach kernels refuse a mix of DTensors and tensors), but the modules compute on plain local
tensors: a replicated module reads its parameters' local copies (``to_local``, differentiable) for
the length of its forward, so lmforge's C kernels (``F.rms_norm``, the attention and cross-entropy
kernels) see ordinary tensors. A replicated parameter applied to a shard only ("replicate_partial":
a per-head norm; every norm under sequence parallelism) gets a partial gradient; the strategy sums
those over the group after the last micro-batch's backward (one all-reduce).

**Sequence parallel** (``sequence_parallel = True``): between the projections the residual stream
is a (B, T/tp, C) shard of the sequence, so the norms and dropout run on T/tp positions. The
embedding's output is sliced (its gradient all-gathered), each attention and MLP all-gathers its
input (``PrepareModuleInput``: its backward reduce-scatters) and its row-wise projection
reduce-scatters its output instead of all-reducing it; the final norm's output is gathered for the
head. RoPE and attention see the whole sequence (they run after the gather). T must divide by tp;
a MoE layer is refused (its router statistics need every token).

**Randomness.** Ranks seed alike, and the replicated regions (the embedding's and, without SP, the
blocks' dropout) draw the same masks on every rank, so the replicas never drift apart. Dropout on a
rank's own heads (attention) or, under SP, on its sequence shard draws from the rank's own stream
(``_rank_rng``: a seed from the run's stream plus the rank, in a forked RNG state).

**Optimizers.** AdamW is elementwise and runs on the local shards as they are. Muon needs whole
matrices: ``wrap_optimizers`` replaces it by ``TPMuon`` (gathers each matrix, puts it in the model's
row order, orthogonalizes q, k, v / gate, up apart as one process does, keeps this rank's slice).

**Per step** (a = b·s·h elements of a micro-batch's activations, L blocks, each all-reduce 2a(t-1)/t
per rank on a ring): TP moves 4L all-reduces of a per micro-batch (2 forward, 2 backward); SP turns
each into a reduce-scatter and an all-gather (the same volume) and adds the head's gather and the
embedding gradient's gather (2 more all-gathers of a); the partial gradients' sum is one small
all-reduce per step; Muon adds one all-gather of every split matrix per step.

``TPFSDPStrategy`` applies TP first (on the mesh's "tp" dimension), then ``parallel.fsdp.shard_model``
on "dp": FSDP2 shards each TP-local tensor's dim 0 over the data-parallel ranks (torch's 2-D
``_StridedShard``), reduce-scatters once per step (no-sync accumulation) and averages over "dp".
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .base import Strategy

PLAN_KINDS = ("colwise", "rowwise", "colwise_qkv", "colwise_gate_up", "replicate", "replicate_partial",
              "expert", "colwise_gate_up+rowwise")
_FUSED = ("colwise_qkv", "colwise_gate_up")


# ---- the plan ----

def _component_entries(prefix: str, comp: nn.Module, sp: bool) -> list[tuple[str, str, nn.Module]]:
    """(fqn, kind, owner) for every entry of ``comp``'s plan, nested plans expanded."""
    plan = comp.tp_plan() if hasattr(comp, "tp_plan") else {}
    kind_name = type(comp).__name__
    if not plan:
        raise ValueError(f"tensor parallel: {kind_name} at {prefix!r} has no tp_plan() (a component kind must say "
                         "how it splits; parallel = 'tp' cannot run it)")
    out = []
    for key, kind in plan.items():
        if kind not in PLAN_KINDS:
            raise ValueError(f"tensor parallel: {kind_name}.tp_plan() gives {key!r} the unknown kind {kind!r}; "
                             f"expected one of {', '.join(PLAN_KINDS)}")
        if kind == "expert" and sp:
            raise ValueError(f"sequence_parallel = true cannot run the MoE layer at {prefix!r} (its router "
                             "statistics need every token of the batch): set sequence_parallel = false")
        target = getattr(comp, key, None)
        if target is None:
            raise ValueError(f"tensor parallel: {kind_name}.tp_plan() names {key!r}, which it does not have")
        if kind == "colwise_gate_up+rowwise":
            out += _component_entries(f"{prefix}.{key}", target, sp)
        else:
            out.append((f"{prefix}.{key}", kind, comp))
    return out


def tp_plan_of(model, sequence_parallel: bool = False) -> dict[str, str]:
    """{module or parameter fqn: kind} for the whole model: the components' plans plus the skeleton."""
    plan = {"tok_emb": "replicate"}
    if getattr(model, "pos_emb", None) is not None:
        plan["pos_emb"] = "replicate"
    for i, block in enumerate(model.blocks):
        norm_kind = "replicate_partial" if sequence_parallel else "replicate"
        plan[f"blocks.{i}.attn_norm"] = norm_kind
        plan[f"blocks.{i}.mlp_norm"] = norm_kind
        for name in ("attn", "mlp"):
            for fqn, kind, _ in _component_entries(f"blocks.{i}.{name}", getattr(block, name), sequence_parallel):
                plan[fqn] = kind
    plan["norm_f"] = "replicate_partial" if sequence_parallel else "replicate"
    plan["lm_head"] = "replicate"
    return plan


def _covered(plan: dict, pname: str) -> str | None:
    """The plan entry a parameter falls under (the longest fqn prefix), or None."""
    best = None
    for fqn in plan:
        if (pname == fqn or pname.startswith(fqn + ".")) and (best is None or len(fqn) > len(best)):
            best = fqn
    return best


def check_tp(model, tp: int, sequence_parallel: bool = False) -> dict[str, str]:
    """Every setting TP needs of the model, as ValueErrors naming it (no collective); returns the plan."""
    cfg = model.cfg
    for block in model.blocks:
        attn = block.attn
        for attr, setting in (("n_head", "n_head"), ("n_kv_head", "n_kv_head")):
            n = getattr(attn, attr, None)
            if n is not None and n % tp:
                raise ValueError(f"tensor parallel: {setting}={n} is not divisible by tp_size={tp} (each rank "
                                 "computes whole heads): choose a tp_size that divides the heads")
        for name, m in block.mlp.named_modules():  # the split MLPs' hidden units (the block's, a shared expert's)
            hidden = getattr(m, "hidden", None)
            if hidden is not None and hasattr(m, "tp_plan") and hidden % tp:
                what = "d_ff" if not name else "the shared expert's hidden size (moe.n_shared x moe.d_shared)"
                raise ValueError(f"tensor parallel: {what}={hidden} is not divisible by tp_size={tp} (each rank "
                                 "computes d_ff / tp_size hidden units)")
    plan = tp_plan_of(model, sequence_parallel)
    mods = dict(model.named_modules())
    for fqn, kind in plan.items():
        if kind in ("colwise", "colwise_qkv", "colwise_gate_up", "rowwise"):
            lin = mods.get(fqn)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"tensor parallel: {fqn} is planned {kind!r} but is not a Linear")
            dim = lin.in_features if kind == "rowwise" else lin.out_features
            if dim % tp:
                raise ValueError(f"tensor parallel: {fqn} has {dim} {'input' if kind == 'rowwise' else 'output'} "
                                 f"features, not divisible by tp_size={tp} (d_ff / heads must divide)")
            if kind in _FUSED:
                owner = mods[fqn.rsplit(".", 1)[0]]
                parts = owner.muon_splits().get(lin.weight)
                if not parts or sum(parts) != lin.out_features:
                    raise ValueError(f"tensor parallel: {fqn} is planned {kind!r} but its component gives no "
                                     "row parts (muon_splits) that cover it")
                if any(p % tp for p in parts):
                    raise ValueError(f"tensor parallel: the parts {parts} of {fqn} are not each divisible by "
                                     f"tp_size={tp} (d_ff for [gate; up], heads for [q; k; v])")
    left = [n for n, _ in model.named_parameters() if _covered(plan, n) is None]
    if left:
        raise ValueError(f"tensor parallel: no plan covers {left[:4]} (a component's tp_plan() must name every "
                         "parameter it owns)")
    if sequence_parallel and getattr(cfg, "moe", None) is not None:
        raise ValueError("sequence_parallel = true cannot run a MoE model (its router statistics need every "
                         "token): set sequence_parallel = false")
    return plan


def fused_row_order(parts: list[int], tp: int) -> torch.Tensor:
    """The permutation that regroups a fused matrix's rows [A; B; ...] (``parts`` rows each) as
    [A_0; B_0; ...; A_1; B_1; ...], so Shard(0) over ``tp`` ranks gives rank r its share of every part.
    ``W_tp = W[order]``; the model's order back: ``W_tp[argsort(order)]``."""
    starts = [sum(parts[:i]) for i in range(len(parts))]
    idx = []
    for r in range(tp):
        for s, n in zip(starts, parts):
            k = n // tp
            idx.append(torch.arange(s + r * k, s + (r + 1) * k))
    return torch.cat(idx)


# ---- local views of replicated parameters ----

def _local_view(module: nn.Module, names: list[str], at: nn.Module | None = None) -> None:
    """For the length of ``at``'s forward (``module``'s by default), ``module.<name>`` is the local
    tensor of its DTensor parameter (differentiable: the gradient reaches the DTensor), so the module's
    math (and lmforge's C kernels) run on plain tensors. Read at each call: FSDP2's pre-forward hook
    (prepended) has swapped the unsharded parameter in by then."""
    from torch.distributed.tensor import DTensor

    def pre(mod, args):
        for n in names:
            p = mod._parameters[n]
            mod.__dict__[n] = p.to_local() if isinstance(p, DTensor) else p

    def post(mod, args, out):
        for n in names:
            mod.__dict__.pop(n, None)

    at = module if at is None else at
    at.register_forward_pre_hook(lambda m, args: pre(module, args))
    at.register_forward_hook(lambda m, args, out: post(module, args, out), always_call=True)


def _replicate_params(module: nn.Module, mesh, done: dict) -> None:
    """Every parameter of ``module`` (and its children) a Replicate DTensor (rank 0's values), computed on
    through local views. ``done``: id(old parameter) -> new, so a tied weight stays one parameter."""
    from torch.distributed.tensor import Replicate, distribute_tensor

    for mod in module.modules():
        names = []
        for n, p in list(mod.named_parameters(recurse=False)):
            if id(p) not in done:
                done[id(p)] = nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]),
                                           requires_grad=p.requires_grad)
            mod.register_parameter(n, done[id(p)])
            names.append(n)
        if names:
            _local_view(mod, names)


def _rank_rng(module: nn.Module, tp_rank: int) -> None:
    """Random numbers drawn in ``module``'s forward come from this rank's own stream: a seed drawn from
    the run's stream (the same on every rank, so the ranks' streams stay in step) plus the rank, in a
    forked RNG state (the run's state is restored after). For dropout on this rank's heads, or on its
    sequence shard: one stream for all ranks would drop the same units of every shard (Megatron keeps a
    separate tensor-parallel RNG for the same reason). The backward reuses the forward's masks; a
    recomputed forward (``torch.utils.checkpoint`` restores the run's state) draws the same seed."""
    inner = module.forward

    def forward(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        seed = int(torch.randint(0, 2 ** 62, (1,)))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + 7919 * (tp_rank + 1))
            return inner(*args, **kwargs)
    module.forward = forward


class TPLayout:
    """What ``apply_tp`` did, for the strategy: the mesh, the regrouped rows ({parameter fqn: order})
    and the parameters whose gradients are partial per rank (summed over the group)."""

    def __init__(self, mesh, sequence_parallel: bool):
        self.mesh, self.sequence_parallel = mesh, sequence_parallel
        self.row_order: dict[str, torch.Tensor] = {}
        self.partial: list[str] = []

    @property
    def tp(self) -> int:
        return self.mesh.size()


def apply_tp(model, tp_mesh, sequence_parallel: bool = False):
    """Split ``model`` (a ``model.transformer.Transformer``) over ``tp_mesh`` (1-D) in place, by its
    components' plans; returns the model (``model._tp_layout`` holds the ``TPLayout``)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                                   RowwiseParallel, parallelize_module)

    if getattr(model, "_tp_layout", None) is not None:
        raise ValueError("apply_tp: this model is already split (its fused rows are regrouped once)")
    tp = tp_mesh.size()
    plan = check_tp(model, tp, sequence_parallel)
    layout = TPLayout(tp_mesh, sequence_parallel)
    mods = dict(model.named_modules())
    styles, done = {}, {}
    # the block-level components: under SP their row-wise outputs reduce-scatter onto sequence shards
    top = {f"blocks.{i}.{name}" for i in range(len(model.blocks)) for name in ("attn", "mlp")}
    for fqn, kind in plan.items():
        if kind in ("colwise", "colwise_qkv", "colwise_gate_up"):
            if kind in _FUSED:  # regroup the rows: rank r's Shard(0) slice holds its share of every part
                lin = mods[fqn]
                parts = mods[fqn.rsplit(".", 1)[0]].muon_splits()[lin.weight]
                order = fused_row_order(parts, tp)
                with torch.no_grad():
                    for n, p in lin.named_parameters(recurse=False):
                        p.copy_(p[order])
                        layout.row_order[f"{fqn}.{n}"] = order
            styles[fqn] = ColwiseParallel()  # input: replicated (under SP a gathered DTensor); output local
        elif kind == "rowwise":
            sp_out = sequence_parallel and fqn.rsplit(".", 1)[0] in top
            styles[fqn] = RowwiseParallel(output_layouts=Shard(1) if sp_out else Replicate())
    # replicated entries: modules, or parameters of a component (a MoE's experts)
    for fqn, kind in plan.items():
        if kind not in ("replicate", "replicate_partial", "expert"):
            continue
        owner_fqn, _, leaf = fqn.rpartition(".")
        target = mods.get(fqn)
        if target is not None:
            _replicate_params(target, tp_mesh, done)
            names = [f"{fqn}.{n}" for n, _ in target.named_parameters()]
        else:  # a parameter of its component
            from torch.distributed.tensor import distribute_tensor

            owner = mods[owner_fqn]
            p = owner._parameters[leaf]
            new = nn.Parameter(distribute_tensor(p.data, tp_mesh, [Replicate()]), requires_grad=p.requires_grad)
            done[id(p)] = new
            owner.register_parameter(leaf, new)
            _local_view(owner, [leaf])
            names = [fqn]
        if kind == "replicate_partial":
            layout.partial += names
    if getattr(model, "pos_emb", None) is not None:  # the model reads pos_emb.weight[p:p+T] in its own forward
        _local_view(model.pos_emb, ["weight"], at=model)
    if model.cfg.tie_embeddings:  # one parameter, as before (the head was replicated through the same map)
        model.lm_head.weight = model.tok_emb.weight
    if sequence_parallel:
        styles["drop"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1))
        styles["norm_f"] = PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())
        for i in range(len(model.blocks)):
            for name in ("attn", "mlp"):  # gather the sequence for the projections (backward: reduce-scatter)
                styles[f"blocks.{i}.{name}"] = PrepareModuleInput(input_layouts=(Shard(1), None),
                                                                  desired_input_layouts=(Replicate(), None))

        def seq_check(mod, args, kwargs):
            T = (args[0] if args else kwargs["idx"]).shape[1]
            if T % tp:
                raise ValueError(f"sequence_parallel = true: the sequence length {T} is not divisible by "
                                 f"tp_size={tp} (each rank holds T/tp positions); choose seq_len accordingly")
        model.register_forward_pre_hook(seq_check, with_kwargs=True)
    parallelize_module(model, tp_mesh, styles)
    for block in model.blocks:
        if hasattr(block.attn, "tp_local_heads"):
            block.attn.tp_local_heads(tp)
    if model.cfg.dropout > 0:  # dropout on this rank's heads (and under SP its sequence shard): its own stream
        r = tp_mesh.get_local_rank()
        for block in model.blocks:
            _rank_rng(block.attn, r)
            if sequence_parallel:
                _rank_rng(block.drop, r)
    model._tp_layout = layout
    return model


# ---- the weights leaving the strategy: the model's own row order ----

def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _match(path: str, row_order: dict) -> str | None:
    p = f".{path}."
    for fqn in row_order:
        if f".{fqn}." in p:
            return fqn
    return None


def to_model_order(obj, row_order: dict, shapes: dict, path: str = ""):
    """A copy of a (nested) state whose tensors of regrouped parameters (and their optimizer states: the
    same shape, under a key naming the parameter) are full tensors in the model's row order. Collective
    (``full_tensor``): every rank calls it with the same structure."""
    if isinstance(obj, dict):
        return {k: to_model_order(v, row_order, shapes, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_model_order(v, row_order, shapes, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        fqn = _match(path, row_order)
        if fqn is not None and tuple(obj.shape) == shapes[fqn]:
            return _full(obj)[torch.argsort(row_order[fqn])].clone()
    return obj


def from_model_order(obj, row_order: dict, params: dict, path: str = ""):
    """The inverse of ``to_model_order``, for a state filled from a checkpoint: the tensors of regrouped
    parameters (and their optimizer states) hold the model's row order, whether ``to_model_order``'s
    whole tensors or DTensors the checkpoint's loader created like the parameter and filled by global
    index (their global content is then the model's order too); each is regrouped and distributed like
    its parameter. Collective where it meets such a DTensor (``full_tensor``): every rank calls it alike."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(obj, dict):
        return {k: from_model_order(v, row_order, params, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_model_order(v, row_order, params, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, torch.Tensor):
        fqn = _match(path, row_order)
        if fqn is not None and tuple(obj.shape) == tuple(params[fqn].shape):
            p = params[fqn]
            x = _full(obj)[row_order[fqn]].to(obj.dtype)
            return distribute_tensor(x, p.device_mesh, p.placements, src_data_rank=None) \
                if isinstance(p, DTensor) else x
    return obj


# ---- Muon over DTensor parameters ----

def _muon_class():
    from ..train.optim import Muon, newton_schulz

    class TPMuon(Muon):
        """Muon for DTensor parameters: each matrix's momentum-corrected gradient is gathered whole
        (``full_tensor``), put back in the model's row order (``row_order``: the regrouped fused
        matrices), split into its parts (``splits``, the model's rows), orthogonalized as one process
        would (batched by shape), regrouped, and each rank keeps its own slice of the update. Every rank
        computes the whole update: exact, and at this scale cheap. The momentum stays sharded."""

        row_order: dict = {}

        @torch.no_grad()
        def step(self, closure=None):
            from torch.distributed.tensor import DTensor, distribute_tensor

            loss = closure() if closure is not None else None
            for group in self.param_groups:
                lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
                params, parts = [], []
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
                    g = _full(g)
                    order = self.row_order.get(p)
                    if order is not None:
                        g = g[torch.argsort(order)]
                    sp = self.splits.get(p)
                    params.append(p)
                    mats = list(g.unbind(0)) if g.dim() == 3 else [g]
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
                    u = (ps[0] if len(ps) == 1 else torch.cat(ps)).reshape(p.shape)
                    order = self.row_order.get(p)
                    if order is not None:
                        u = u[order]
                    if isinstance(p, DTensor):
                        u = distribute_tensor(u.contiguous(), p.device_mesh, p.placements, src_data_rank=None)
                    if wd:
                        p.mul_(1 - lr * wd)
                    p.add_(u, alpha=-lr)
            return loss

    return Muon, TPMuon


# ---- the strategies ----

class TPStrategy(Strategy):
    """Tensor parallel over every rank (dp_size 1: every rank reads the same batch)."""

    name = "tp"
    shards_params = True

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.tp_size = self._tp_size()
        self._mesh = None
        self.layout: TPLayout | None = None

    def _tp_size(self) -> int:
        tp = getattr(self.cfg, "tp_size", 0) or self.world_size
        if tp != self.world_size:
            raise ValueError(f"parallel = 'tp' splits the model over every rank: tp_size={tp} but the world size "
                             f"is {self.world_size}; set tp_size = 0 (or {self.world_size}), or parallel = "
                             "'tp+fsdp' to add data parallelism")
        return tp

    @property
    def sequence_parallel(self) -> bool:
        return bool(getattr(self.cfg, "sequence_parallel", False))

    # ---- places: rank = dp_index * tp_size + tp_index (init_device_mesh's row-major order) ----
    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def mesh(self):
        if self._mesh is None:
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh

            dev = self.device.type
            if not dist.is_initialized() and self.world_size == 1:  # alone: a group of one (legal, pointless)
                dist.init_process_group("gloo" if dev == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                        world_size=1)
            self._mesh = init_device_mesh(dev, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))
        return self._mesh

    @property
    def tp_mesh(self):
        return self.mesh["tp"]

    @property
    def dp_group(self):
        return self.mesh["dp"].get_group() if self.dp_size > 1 else None

    def describe(self) -> dict:
        return {**super().describe(), "tp_size": self.tp_size, "sequence_parallel": self.sequence_parallel,
                "mesh": {"dp": self.dp_size, "tp": self.tp_size}}

    # ---- set-up ----
    def check(self, model) -> None:
        if self.world_size < 1 or self.world_size % self.tp_size:
            raise ValueError(f"parallel = {self.name!r}: tp_size={self.tp_size} does not divide the world size "
                             f"{self.world_size}")
        check_tp(model, self.tp_size, self.sequence_parallel)

    def wrap(self, model):
        self.check(model)
        apply_tp(model, self.tp_mesh, self.sequence_parallel)
        self.layout = model._tp_layout
        return model

    def wrap_optimizers(self, model, opts: list) -> list:
        Muon, TPMuon = _muon_class()
        params = dict(model.named_parameters())
        by_param = {params[f]: o for f, o in self.layout.row_order.items() if f in params} if self.layout else {}
        out = []
        for opt in opts:
            if type(opt) is Muon:
                new = TPMuon(opt.param_groups, **opt.defaults, splits=opt.splits)
                new.row_order = {p: o for p, o in by_param.items()}
                opt = new
            out.append(opt)
        return out

    # ---- the step ----
    @contextlib.contextmanager
    def micro_batch(self, fwd, last: bool):
        yield
        if last:
            self._sum_partial_grads(fwd)

    def _sum_partial_grads(self, model) -> None:
        """Sum over the tensor-parallel group the gradients of the replicated parameters that saw only this
        rank's shard (per-head norms; the norms under sequence parallelism): one all-reduce of them all."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        if self.layout is None or not self.layout.partial or self.tp_size == 1:
            return
        grads = []
        for fqn in self.layout.partial:
            g = model.get_parameter(fqn).grad
            if g is not None:
                grads.append(g.to_local() if isinstance(g, DTensor) else g)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self.tp_mesh.get_group())
        for g, x in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(x.view_as(g))

    def clip_grad_norm(self, model, max_norm: float) -> float:
        return clip_grad_norm(model, max_norm)

    # ---- state ----
    def _shapes(self, model) -> dict:
        params = dict(model.named_parameters())
        return {f: tuple(params[f].shape) for f in self.layout.row_order if f in params} if self.layout else {}

    def full_state_dict(self, model) -> dict | None:
        row_order = self.layout.row_order if self.layout else {}
        out = {}
        for k, v in model.state_dict().items():
            t = _full(v)  # collective: every rank, in the same order
            if k in row_order:
                t = t[torch.argsort(row_order[k])]
            if self.is_main:
                out[k] = t.detach().cpu().clone()
        return out if self.is_main else None

    def dcp_state(self, model, opts: list) -> dict:
        state = super().dcp_state(model, opts)
        if not self.layout or not self.layout.row_order:
            return state
        return to_model_order(state, self.layout.row_order, self._shapes(model))

    def load_dcp_state(self, model, opts: list, state: dict) -> None:
        if self.layout and self.layout.row_order:
            state = from_model_order(state, self.layout.row_order, dict(model.named_parameters()))
        super().load_dcp_state(model, opts, state)


class TPFSDPStrategy(TPStrategy):
    """TP inside each row of a (dp, tp) mesh, FSDP2 over its columns (``parallel.fsdp.shard_model``)."""

    name = "tp+fsdp"

    def _tp_size(self) -> int:
        tp = getattr(self.cfg, "tp_size", 0)
        if tp <= 0:
            raise ValueError(f"parallel = 'tp+fsdp' needs tp_size (the tensor-parallel degree; the world size "
                             f"{self.world_size} is split as world / tp_size data-parallel rows)")
        if self.world_size % tp:
            raise ValueError(f"parallel = 'tp+fsdp': tp_size={tp} does not divide the world size {self.world_size} "
                             "(the mesh is (world / tp_size, tp_size))")
        return tp

    @contextlib.contextmanager
    def micro_batch(self, fwd, last: bool):
        """As FSDP2 alone (``parallel.fsdp``): the reduce-scatter over the data-parallel ranks runs only in
        the last micro-batch's backward (earlier ones accumulate unsharded gradients); then the partial
        gradients are summed over the tensor-parallel group."""
        if hasattr(fwd, "set_requires_gradient_sync"):
            fwd.set_requires_gradient_sync(last)
        yield
        if last:
            self._sum_partial_grads(fwd)

    def wrap(self, model):
        super().wrap(model)
        try:
            from .fsdp import shard_model
        except ImportError:  # helper C1's module not merged yet: the same, by hand
            shard_model = _shard_model
        return shard_model(model, mesh=self.mesh["dp"], mixed_precision=getattr(self.cfg, "fsdp_mixed_precision", "none"),
                           cpu_offload=getattr(self.cfg, "cpu_offload", False))


def _shard_model(model, mesh=None, mixed_precision="none", cpu_offload=False, reshard_after_forward=True):
    from torch.distributed.fsdp import fully_shard

    if mixed_precision != "none" or cpu_offload:
        raise ValueError("tp+fsdp: fsdp_mixed_precision / cpu_offload need lmforge.parallel.fsdp")
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def clip_grad_norm(model, max_norm: float) -> float:
    """The global gradient norm over DTensor (and plain) gradients, equal on every rank, and the
    gradients scaled to ``max_norm`` (0: measure only) as ``torch.nn.utils.clip_grad_norm_`` does. Each
    local square sum is summed over the mesh dimensions its tensor is sharded on (one all-reduce per
    kind of layout), never over the ones it is replicated on."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    groups: dict = {}
    plain = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                g = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])
            # sharded on every dimension it is not replicated on (Shard, and FSDP2's _StridedShard under TP,
            # which is not is_shard())
            dims = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())
            key = (id(g.device_mesh), dims)
            if key not in groups:
                groups[key] = [g.device_mesh, dims, torch.zeros((), dtype=torch.float64)]
            groups[key][2] += g.to_local().double().pow(2).sum()
        else:
            plain += g.double().pow(2).sum()
    total = plain
    for mesh, dims, sq in groups.values():
        sq = sq.to(mesh.device_type) if mesh.device_type != "cpu" else sq
        for d in dims:
            dist.all_reduce(sq, group=mesh.get_group(d))
        total = total + sq.cpu()
    norm = float(total.sqrt())
    if max_norm and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads:
                (g.to_local() if isinstance(g, DTensor) else g).mul_(coef)
    return norm
