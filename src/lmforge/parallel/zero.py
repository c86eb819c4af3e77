"""ZeRO-1, -2 and -3 (Rajbhandari et al. 2020), written to be read: what FSDP does, in plain collectives.

Knows how to cut every parameter into equal pieces, one per data-parallel rank, and the three stages
of keeping those pieces: the optimizer state only (ZeRO-1), the gradients too (ZeRO-2), the
parameters too (ZeRO-3). Knows the optimizers it can step on pieces (elementwise ones, and Muon by
gathering its update matrix) and nothing of the model beyond ``model.blocks`` (ZeRO-3's units).

The partition (every stage). Each trained parameter of n elements is flattened and cut into N equal
pieces of s = ceil(n / N) elements; the last pieces are padded with zeros to N s elements, so rank r
owns elements [r s, (r + 1) s) of the padded flat tensor and every rank holds exactly
sum over parameters of ceil(n / N) elements of each sharded thing (padding counted: the planner's
figure). Equal pieces are what ``reduce_scatter`` and ``all_gather`` want; padding stays zero (zero
gradient, zero state, so an elementwise update leaves it zero). A per-parameter split (not one flat
buffer of the whole model cut in N) keeps each piece inside one tensor: an optimizer group, a
weight-decay rule and a Muon matrix stay whole, at the price of one collective per parameter.

What each rank keeps (fp32 here, no mixed precision: Ψ parameters, K = 8 bytes of AdamW state each):

    stage   parameters        gradients               optimizer state   per step, per micro-batch a
    ZeRO-1  full (padded)     full, all-reduced        1/N (its pieces)   all-reduce Ψ, all-gather Ψ
    ZeRO-2  full (padded)     1/N, reduce-scattered    1/N                reduce-scatter Ψ, all-gather Ψ
    ZeRO-3  1/N outside fwd   1/N, reduce-scattered    1/N                all-gather 2aΨ, reduce-scatter Ψ

(volumes in elements of the padded tensors handed to the collectives, counted in ``self.comm``;
a ring moves (N-1)/N of a reduce-scatter or all-gather and 2 (N-1)/N of an all-reduce per rank.)
ZeRO-1 here all-reduces as DDP does and then gathers the updated pieces: 3Ψ, one Ψ more than the
paper's "same as DP" (which reduce-scatters instead; that is exactly ZeRO-2's traffic). ZeRO-1/2
keep the full parameters in padded flat buffers (so a piece is a view, updated in place), hence
"padded" above: sum of N ceil(n / N) elements.

* ZeRO-1: after the last micro-batch's backward each gradient is all-reduced (summed, divided by N:
  the average, as DDP) into a padded flat buffer; the rank's optimizer steps its pieces (views of
  the parameters' buffers, so the update lands in place); each parameter is then all-gathered from
  the pieces, so every rank holds the whole updated model.
* ZeRO-2: as each parameter's gradient of the last micro-batch is complete in backward (a
  post-accumulate-grad hook), it is reduce-scattered (summed, / N) to its owners and the full
  gradient freed; a rank keeps only its pieces' gradients. Then as ZeRO-1.
* ZeRO-3: the parameters live as pieces (``nn.Parameter`` of s elements, what the optimizer steps);
  the model's own parameters keep their shapes but their storage is released (size 0). The units
  are each of ``model.blocks`` and the root (every other parameter: embeddings, final norm, head).
  Just before a block's forward its parameters are all-gathered into their own storage, after it
  they are released; a hook on the block's output gathers them again when backward reaches it, and
  each is released as soon as its gradient is accumulated (reduce-scattered to the owners on the
  last micro-batch). The root's parameters are gathered from the entry to the exit of ``forward``,
  ``hidden_states`` or ``compute_logits`` (callers use the latter two directly, and the model reads
  ``pos_emb.weight`` without calling its module), so they stay whole across the blocks' forward,
  as FSDP2's root does. No prefetch, no overlap: one unit at a time, readable.

Gradient accumulation: gradients synchronize only on the last micro-batch (``micro_batch``); before
it each rank sums its micro-batches' full gradients locally, so with grad_accum > 1 a ZeRO-2/3 rank
holds full gradients between micro-batches (communication once per step, as DDP's ``no_sync``; the
1/N gradient memory holds from the last backward on). ZeRO-3 still gathers parameters for every
micro-batch's forward and backward (2aΨ).

Optimizers (``wrap_optimizers``): an elementwise optimizer (lmforge's AdamW, torch's AdamW / Adam /
SGD, the weight average) steps the pieces as they are: its groups' parameters are replaced by the
pieces, its hyperparameters and group keys kept. Muon cannot: Newton-Schulz needs the whole matrix.
``ShardedMuon`` keeps the momentum per piece (1/N), forms the Nesterov update on the piece,
all-gathers that update matrix (Ψ_muon more per step), orthogonalizes it whole on every rank (the
fused q/k/v and gate/up parts apart, as Muon does), and applies its own piece. The Newton-Schulz work
is repeated on every rank (not divided); the result equals one process's Muon. Any other optimizer
is refused by name (a non-elementwise update needs its own sharded step, as Muon's here).

Gradient clipping takes the global norm: the sum of the squared norms of the rank's gradient pieces,
all-reduced (ZeRO-1: every rank holds the whole averaged gradient, so its local norm is the global
one, no collective). Checkpoints (``dcp_state``): full tensors keyed by parameter name, the form
``torch.distributed.checkpoint.state_dict`` gives for the unwrapped model and each of its optimizers
(``get_model_state_dict``; ``get_optimizer_state_dict``, one state per optimizer: a weight average
and AdamW name the same parameter), so a ZeRO checkpoint resumes under DDP, FSDP2, one process or
another ZeRO and world size; every rank materializes the whole model and optimizer state for it (fine at this scale; a
flat split is no DTensor placement of the original shapes, so it cannot be saved as pieces and
still reshard by name).

Limits: ZeRO-2/3 reduce each gradient when backward produces it, so every rank must produce the same
set of gradients in a backward (a parameter unused on one rank but used on another would pair the
per-parameter collectives wrongly; lmforge's MoE stacks its experts in one tensor, which always gets
a gradient); ZeRO-1 reduces every trained parameter after backward in one order (a rank without a
gradient sends zeros), so a parameter no rank used gets a zero gradient where one process would
skip it; ZeRO-3 parameters are only valid
inside their unit's forward and backward, so read the weights through ``full_state_dict`` (not
``model.state_dict()``) and do not move a wrapped model between devices.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from .base import Strategy

# ---- the partition ----


class Piece:
    """How one parameter is cut: n elements flattened, padded to N s, rank r owns [r s, (r + 1) s)."""

    def __init__(self, name: str, param: nn.Parameter, rank: int, world: int):
        self.name, self.param, self.rank, self.world = name, param, rank, world
        self.shape = tuple(param.shape)
        self.numel = param.numel()
        self.size = -(-self.numel // world)  # s = ceil(n / N)
        self.padded = self.size * world
        self.lo, self.hi = rank * self.size, (rank + 1) * self.size
        self.shard: nn.Parameter | None = None  # what the optimizer steps (a view of ``buf`` in ZeRO-1/2)
        self.buf: torch.Tensor | None = None  # ZeRO-1/2: the padded flat full parameter
        self.names = [name]  # every state-dict key that refers to this parameter (tied weights: several)

    def pad(self, t: torch.Tensor) -> torch.Tensor:
        """A padded flat copy (N s elements) of a tensor shaped like the parameter."""
        flat = t.detach().reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"{self.name}: {tuple(t.shape)} is not the parameter's shape {self.shape}")
        out = flat.new_zeros(self.padded)
        out[:self.numel] = flat
        return out

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's piece (s elements, a copy) of a tensor shaped like the parameter."""
        return self.pad(t)[self.lo:self.hi].clone()

    def unpad(self, flat: torch.Tensor) -> torch.Tensor:
        """A padded flat tensor (N s) back to the parameter's shape (a view)."""
        return flat[:self.numel].view(self.shape)


def split_sizes(numel: int, world: int) -> tuple[int, int]:
    """(piece size s, padded size N s) of a tensor of ``numel`` elements cut in ``world`` pieces."""
    s = -(-numel // world)
    return s, s * world


# ---- the collectives (counted) ----


class Collectives:
    """The three collectives ZeRO needs over the data-parallel group, each counted in ``elements``
    (the size of the whole padded tensor handed over: the all-reduced buffer, the reduce-scatter's
    input, the all-gather's output). One rank: copies, nothing counted. Gloo (torch 2.13) has
    ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` (now ``*_single``): nothing emulated."""

    KINDS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast")

    def __init__(self, world: int, group=None):
        self.world, self.group = world, group
        self.elements = dict.fromkeys(self.KINDS, 0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def reset(self) -> None:
        self.elements = dict.fromkeys(self.KINDS, 0)
        self.calls = dict.fromkeys(self.KINDS, 0)

    def _count(self, kind: str, n: int) -> None:
        self.elements[kind] += n
        self.calls[kind] += 1

    def all_reduce_mean(self, t: torch.Tensor) -> None:
        """In place: the average over ranks (sum, then / N: gloo has no AVG)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        self._count("all_reduce", t.numel())
        dist.all_reduce(t, group=self.group)
        t.div_(self.world)

    def reduce_scatter_mean(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (s) = this rank's piece of the average over ranks of ``inp`` (N s)."""
        if self.world == 1:
            out.copy_(inp)
            return
        import torch.distributed as dist

        self._count("reduce_scatter", inp.numel())
        fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        fn(out, inp, group=self.group)
        out.div_(self.world)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        """``out`` (N s) = every rank's ``inp`` (s), rank order."""
        if self.world == 1:
            out.copy_(inp)
            return
        import torch.distributed as dist

        self._count("all_gather", out.numel())
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, inp.contiguous(), group=self.group)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        self._count("broadcast", t.numel())
        dist.broadcast(t, src=src, group=self.group)

    def sum_scalar(self, x: torch.Tensor) -> torch.Tensor:
        """A small all-reduce (norms, flags): not counted as the model's traffic."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def gather_full(self, piece: Piece, t: torch.Tensor) -> torch.Tensor:
        """The whole tensor (the parameter's shape) from every rank's piece ``t`` (s elements)."""
        out = t.new_empty(piece.padded)
        self.all_gather(out, t)
        return piece.unpad(out)


# ---- optimizers over pieces ----


def _elementwise_optimizers() -> tuple:
    from ..train.optim import AdamW, WeightEMA

    return (AdamW, WeightEMA, torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def _shard_state(state: dict, piece: Piece) -> dict:
    """An optimizer's per-parameter state, its tensors shaped like the parameter cut to this rank's piece."""
    return {k: (piece.mine(v) if torch.is_tensor(v) and tuple(v.shape) == piece.shape and v.dim() else v)
            for k, v in state.items()}


class ShardedMuon(torch.optim.Optimizer):
    """Muon over pieces: the momentum is kept per piece (1/N); the Nesterov update of each matrix is
    all-gathered whole, orthogonalized by ``train.optim.newton_schulz`` (fused parts apart, stacked
    experts one matrix each, same-shaped matrices batched, as ``train.optim.Muon``), and each rank
    applies its own piece of it. Equal to ``Muon`` on the whole matrices; state keys are Muon's."""

    def __init__(self, groups: list, defaults: dict, pieces: dict, splits: dict, comm: Collectives):
        super().__init__(groups, defaults)
        self.pieces, self.splits, self.comm = pieces, splits, comm  # shard -> Piece; shard -> row counts

    @torch.no_grad()
    def step(self, closure=None):
        from ..train.optim import newton_schulz

        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            shards, parts = [], []
            for s in group["params"]:
                if s.grad is None:
                    continue
                state = self.state[s]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(s.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(s.grad, 1 - mom)
                u = s.grad.lerp(buf, mom) if group["nesterov"] else buf  # this rank's piece of the update
                full = self.comm.gather_full(self.pieces[s], u)  # the whole matrix (all-gather)
                sp = self.splits.get(s)
                mats = list(full.unbind(0)) if full.dim() == 3 else [full]
                shards.append(s)
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
            for s, ps in zip(shards, parts):
                piece = self.pieces[s]
                u = ps[0] if len(ps) == 1 else torch.cat(ps)
                if wd:
                    s.mul_(1 - lr * wd)
                s.add_(piece.mine(u.reshape(piece.shape)), alpha=-lr)
        return loss


# ---- the strategies ----


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view and its base counted once; a released
    ZeRO-3 parameter counts 0)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes(), t.device)
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


class _Zero(Strategy):
    """What the three stages share: the partition, the optimizer wrapping, clipping, state."""

    stage = 0

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.comm = Collectives(self.dp_size, self.dp_group)
        self.pieces: list[Piece] = []
        self._by_param: dict[int, Piece] = {}  # id(original parameter) -> Piece
        self._by_shard: dict[int, Piece] = {}  # id(shard) -> Piece
        self._model = None
        self._sync = True  # this backward's gradients are the step's (the last micro-batch)
        self._synced = False  # ZeRO-1: this step's gradients were all-reduced

    # ---- set-up ----
    def check(self, model) -> None:
        import torch.distributed as dist

        cfg = self.cfg
        if getattr(cfg, "tp_size", 0) > 1:
            raise ValueError(f"parallel = {self.name!r} is data-parallel only: tp_size = {cfg.tp_size} needs "
                             "parallel = tp or tp+fsdp")
        if getattr(cfg, "cpu_offload", False):
            raise ValueError(f"cpu_offload = true is not supported by lmforge's {self.name} (use parallel = fsdp)")
        if getattr(cfg, "fsdp_mixed_precision", "none") not in ("none", ""):
            raise ValueError(f"fsdp_mixed_precision = {cfg.fsdp_mixed_precision!r} applies to parallel = fsdp only; "
                             f"{self.name} trains in the model's dtype (set it to 'none')")
        if self.world_size > 1 and not dist.is_initialized():
            raise ValueError(f"parallel = {self.name!r} with WORLD_SIZE={self.world_size}: no process group "
                             "(make the strategy with parallel.make_strategy, which joins it)")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"parallel = {self.name!r}: the model has no trained parameter")

    def describe(self) -> dict:
        return {**super().describe(), "zero_stage": self.stage,
                "partition": "flat per parameter, N equal padded pieces"}

    def _make_pieces(self, model, trained_only: bool) -> None:
        if self._model is not None:
            raise RuntimeError(f"{self.name}: wrap() was already called (once per model)")
        self._model = model
        for name, p in model.named_parameters():  # shared parameters appear once
            if trained_only and not p.requires_grad:
                continue
            pc = Piece(name, p, self.dp_rank, self.dp_size)
            self.pieces.append(pc)
            self._by_param[id(p)] = pc
        for name, t in model.state_dict(keep_vars=True).items():  # the other names of tied parameters
            pc = self._by_param.get(id(t))
            if pc is not None and name not in pc.names:
                pc.names.append(name)

    @torch.no_grad()
    def _broadcast_model(self, model) -> None:
        """Every rank starts from rank 0's weights (as DDP does), so pieces of one model are put together."""
        for p in model.parameters():
            self.comm.broadcast(p.data)
        for b in model.buffers():
            self.comm.broadcast(b.data)
        self.comm.reset()

    def wrap_optimizers(self, model, opts: list) -> list:
        """Each optimizer over this rank's pieces (see the module docstring); refuses what it cannot shard."""
        from ..train.optim import Muon, WeightEMA

        elementwise = _elementwise_optimizers()
        for opt in opts:  # every check first, the same on every rank, before anything changes
            if not isinstance(opt, (Muon, *elementwise)):
                kind = f"{type(opt).__module__}.{type(opt).__qualname__}"
                raise ValueError(
                    f"parallel = {self.name!r} cannot shard the optimizer {kind}: its update is not "
                    "elementwise, so a rank cannot step its piece alone. Supported: lmforge's AdamW and Muon "
                    "(optimizer = adamw | muon), torch.optim.AdamW / Adam / SGD, the weight average; or use "
                    "parallel = ddp or fsdp")
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) not in self._by_param and id(p) not in self._by_shard:
                        raise ValueError(f"{self.name}: an optimizer holds a tensor of shape {tuple(p.shape)} that "
                                         "is not a trained parameter of the wrapped model (build the optimizers "
                                         "after wrap(), from the same model)")
        out = []
        for opt in opts:
            if isinstance(opt, WeightEMA) and self.stage < 3:
                out.append(opt)  # the full parameters are on every rank after each step: average them whole
                continue
            if isinstance(opt, Muon):
                groups = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [self._shard_of(p) for p in g["params"]]} for g in opt.param_groups]
                splits = {self._shard_of(p): s for p, s in opt.splits.items() if id(p) in self._by_param}
                new = ShardedMuon(groups, dict(opt.defaults), {pc.shard: pc for pc in self.pieces}, splits,
                                  self.comm)
                for p, st in opt.state.items():
                    if st and id(p) in self._by_param:
                        new.state[self._shard_of(p)] = _shard_state(st, self._by_param[id(p)])
                out.append(new)
                continue
            state = {}
            for g in opt.param_groups:  # elementwise: the same optimizer, its groups now over the pieces
                for p in g["params"]:
                    if opt.state.get(p):
                        state[self._shard_of(p)] = (_shard_state(opt.state[p], self._by_param[id(p)])
                                                    if id(p) in self._by_param else opt.state[p])
                g["params"] = [self._shard_of(p) for p in g["params"]]
            opt.state.clear()
            opt.state.update(state)
            out.append(opt)
        return out

    def _shard_of(self, p):
        if id(p) in self._by_shard:
            return p
        return self._by_param[id(p)].shard

    # ---- the step ----
    def micro_batch(self, fwd, last: bool):
        @contextlib.contextmanager
        def ctx():
            self._sync = last
            try:
                yield
                if last:
                    self._after_last_backward()
            finally:
                self._sync = True
        return ctx()

    def _after_last_backward(self) -> None:
        """Called when the step's last backward is done (ZeRO-1 all-reduces here)."""

    def _grad_pieces(self) -> list[torch.Tensor]:
        return [pc.shard.grad for pc in self.pieces if pc.shard.grad is not None]

    @torch.no_grad()
    def clip_grad_norm(self, model, max_norm: float) -> float:
        """The global norm of the step's gradient (sum of squared piece norms, all-reduced); clips the pieces."""
        grads = self._grad_pieces()
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for g in grads:
            sq += g.double().pow(2).sum()
        total = math.sqrt(float(self.comm.sum_scalar(sq)))
        self._scale_grads(max_norm, total)
        return total

    def _scale_grads(self, max_norm: float, total: float) -> None:
        if max_norm and max_norm > 0:
            coef = max_norm / (total + 1e-6)  # as torch.nn.utils.clip_grad_norm_
            if coef < 1.0:
                for g in self._scaled_tensors():
                    g.mul_(coef)

    def _scaled_tensors(self) -> list[torch.Tensor]:
        return self._grad_pieces()

    def step(self, opts: list) -> None:
        from ..train.optim import WeightEMA

        for opt in opts:
            if not isinstance(opt, WeightEMA):
                opt.step()
        self._after_step()
        for opt in opts:
            if isinstance(opt, WeightEMA):
                opt.step()

    def _after_step(self) -> None:
        """ZeRO-1/2: all-gather the updated pieces into every rank's full parameters."""

    def zero_grad(self, opts: list) -> None:
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        for pc in self.pieces:
            pc.param.grad = None
            pc.shard.grad = None
        self._synced = False

    def ema_params(self, model) -> list:
        return super().ema_params(model)

    # ---- state ----
    def memory_bytes(self, model, opts: list) -> dict:
        """What this rank's storages hold now (a view and its base once; released parameters 0): the
        model's parameters (ZeRO-1/2: the padded flat buffers; ZeRO-3: the pieces and any unit gathered
        at the moment), gradients (full ones and pieces), every optimizer's state tensors."""
        params = list(model.parameters()) + [pc.shard for pc in self.pieces]
        grads = [p.grad for p in params]
        optim = [v for opt in opts for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        return {"params": _storage_bytes(params), "grads": _storage_bytes(grads), "optim": _storage_bytes(optim)}

    def _full_param(self, pc: Piece) -> torch.Tensor:
        """The whole parameter (a tensor shaped like it; collective in ZeRO-3)."""
        return pc.param.detach()

    def _names(self, model) -> dict:
        """id(tensor an optimizer holds) -> (parameter name, its Piece or None)."""
        out = {}
        for pc in self.pieces:
            out[id(pc.shard)] = (pc.name, pc)
            out[id(pc.param)] = (pc.name, pc)
        for name, p in model.named_parameters():
            out.setdefault(id(p), (name, None))
        return out

    @torch.no_grad()
    def dcp_state(self, model, opts: list) -> dict:
        """{"model": {name: full tensor}, "optim": [per optimizer {"state": {name: {key: full tensor | scalar}},
        "param_groups": [{..., "params": [names]}]}]}: for each optimizer, ``get_optimizer_state_dict``'s form
        for the unwrapped model (one entry per optimizer: a weight average and the optimizer that steps the
        same parameter would collide in one merged dict). Whole tensors on every rank (collective in
        ZeRO-3 and for sharded state). An optimizer without state (before its first step) gives no entries:
        it is not stepped at lr 0 to make some, as ``get_state_dict`` does, which would count a step."""
        model_sd = {}
        for name, t in model.state_dict(keep_vars=True).items():
            pc = self._by_param.get(id(t))
            model_sd[name] = self._full_param(pc) if pc is not None else t.detach()
        names = self._names(model)
        osd = []
        for opt in opts:
            sd = opt.state_dict()
            one = {"state": {}, "param_groups": []}
            flat = [p for g in opt.param_groups for p in g["params"]]
            for i, p in enumerate(flat):
                name, pc = names[id(p)]
                st = sd["state"].get(i)
                if st is None:
                    continue
                one["state"][name] = {k: (self.comm.gather_full(pc, v).clone() if pc is not None and p is pc.shard
                                          and torch.is_tensor(v) and v.dim() and v.numel() == pc.size else v)
                                      for k, v in st.items()}
            for g in sd["param_groups"]:
                one["param_groups"].append({**g, "params": [names[id(flat[i])][0] for i in g["params"]]})
            osd.append(one)
        return {"model": model_sd, "optim": osd}

    @torch.no_grad()
    def load_dcp_state(self, model, opts: list, state: dict) -> None:
        """Load ``dcp_state``'s form (from any strategy and world size): each rank keeps its pieces."""
        msd = state.get("model", {})
        own = model.state_dict(keep_vars=True)
        missing, extra = sorted(set(own) - set(msd)), sorted(set(msd) - set(own))
        if missing or extra:
            raise ValueError(f"{self.name}: the checkpoint is not of this model: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        for name, t in own.items():
            src = msd[name]
            if tuple(src.shape) != tuple(t.shape):
                raise ValueError(f"{self.name}: checkpoint tensor {name!r} has shape {tuple(src.shape)}, "
                                 f"the model's is {tuple(t.shape)} (a checkpoint of another model?)")
            pc = self._by_param.get(id(t))
            if pc is not None:
                self._load_param(pc, src)
            else:
                t.data.copy_(src.to(t.device, t.dtype))
        osd = state.get("optim")
        if not osd:
            return
        names = self._names(model)
        if isinstance(osd, dict):  # the merged form (get_state_dict's): split by each optimizer's group count
            groups, at, per = list(osd.get("param_groups", [])), 0, []
            for opt in opts:
                mine = groups[at:at + len(opt.param_groups)]
                at += len(opt.param_groups)
                per.append({"state": osd.get("state", {}), "param_groups": mine})
            osd = per
        if len(osd) != len(opts):
            raise ValueError(f"{self.name}: the checkpoint has {len(osd)} optimizer states, the run {len(opts)} "
                             "optimizers (another optimizer setting, or ema switched on or off?)")
        for opt, one in zip(opts, osd):
            mine = list(one.get("param_groups", []))
            if len(mine) != len(opt.param_groups):
                raise ValueError(f"{self.name}: an optimizer of the checkpoint has {len(mine)} parameter groups, "
                                 f"the run's {type(opt).__name__} {len(opt.param_groups)} (another optimizer setting?)")
            sd_state, sd_groups, idx = {}, [], 0
            for g, saved in zip(opt.param_groups, mine):
                own_names = [names[id(p)][0] for p in g["params"]]
                if sorted(own_names) != sorted(saved["params"]):
                    raise ValueError(f"{self.name}: optimizer group {saved.get('name', '?')!r} of the checkpoint "
                                     f"holds {saved['params'][:3]}..., the run's {own_names[:3]}... (another model "
                                     "or optimizer setting?)")
                ids = []
                for p, name in zip(g["params"], own_names):
                    st = one.get("state", {}).get(name)
                    if st is not None:
                        pc = names[id(p)][1]
                        sharded = pc is not None and p is pc.shard
                        sd_state[idx] = {k: (pc.mine(v) if sharded and torch.is_tensor(v) and v.dim()
                                             and tuple(v.shape) == pc.shape else
                                             v.detach().clone() if torch.is_tensor(v) else v)  # never alias
                                         for k, v in st.items()}
                    ids.append(idx)
                    idx += 1
                sd_groups.append({**saved, "params": ids})
            opt.load_state_dict({"state": sd_state, "param_groups": sd_groups})

    def _load_param(self, pc: Piece, src: torch.Tensor) -> None:
        pc.param.data.copy_(src.to(pc.param.device, pc.param.dtype))

    @torch.no_grad()
    def full_state_dict(self, model) -> dict | None:
        out = {}
        for name, t in model.state_dict(keep_vars=True).items():
            pc = self._by_param.get(id(t))
            full = self._full_param(pc) if pc is not None else t.detach()
            if self.is_main:
                out[name] = full.cpu().clone()
        return out if self.is_main else None


class _ReplicatedParams(_Zero):
    """ZeRO-1 and -2: every rank holds the full parameters, in padded flat buffers its pieces are views of."""

    @torch.no_grad()
    def wrap(self, model):
        self._make_pieces(model, trained_only=True)
        self._broadcast_model(model)
        for pc in self.pieces:
            p = pc.param
            pc.buf = pc.pad(p.data)
            p.data = pc.unpad(pc.buf)  # the parameter now lives in the padded buffer
            pc.shard = nn.Parameter(pc.buf[pc.lo:pc.hi])  # a view: the optimizer's update lands in place
            self._by_shard[id(pc.shard)] = pc
        return model

    @torch.no_grad()
    def _after_step(self) -> None:
        for pc in self.pieces:
            self.comm.all_gather(pc.buf, pc.buf[pc.lo:pc.hi].clone())

    def _load_param(self, pc: Piece, src: torch.Tensor) -> None:
        # (``src`` may be the parameter itself: dcp_state hands out the live tensors, which DCP fills in place)
        pc.buf[:pc.numel].copy_(src.reshape(-1).to(pc.buf.device, pc.buf.dtype))
        pc.buf[pc.numel:].zero_()


class Zero1Strategy(_ReplicatedParams):
    """ZeRO-1: optimizer state partitioned; gradients all-reduced whole, as DDP; parameters all-gathered."""

    name = "zero1"
    stage = 1

    @torch.no_grad()
    def _after_last_backward(self) -> None:
        if self._synced:
            return
        for pc in self.pieces:  # every rank reduces every parameter, in one order: no rank can wait alone
            g = pc.param.grad
            buf = pc.pad(g) if g is not None else pc.param.new_zeros(pc.padded)  # (no gradient here: zeros)
            self.comm.all_reduce_mean(buf)
            pc.param.grad = pc.unpad(buf)  # the full averaged gradient, on every rank
            pc.shard.grad = buf[pc.lo:pc.hi]  # this rank's piece of it (a view)
        self._synced = True

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """Every rank holds the whole averaged gradient: the local norm is the global one (no collective)."""
        self._after_last_backward()
        with torch.no_grad():
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for pc in self.pieces:
                if pc.param.grad is not None:
                    sq += pc.param.grad.double().pow(2).sum()
            total = math.sqrt(float(sq))
            self._scale_grads(max_norm, total)
        return total

    def _scaled_tensors(self) -> list[torch.Tensor]:  # the padded buffers behind both views
        return [pc.param.grad for pc in self.pieces if pc.param.grad is not None]

    def step(self, opts: list) -> None:
        self._after_last_backward()
        super().step(opts)


class Zero2Strategy(_ReplicatedParams):
    """ZeRO-2: as ZeRO-1, but each gradient is reduce-scattered to its owners as backward produces it."""

    name = "zero2"
    stage = 2

    def wrap(self, model):
        super().wrap(model)
        for pc in self.pieces:
            pc.param.register_post_accumulate_grad_hook(lambda p, pc=pc: self._grad_ready(pc))
        return model

    @torch.no_grad()
    def _grad_ready(self, pc: Piece) -> None:
        if not self._sync:
            return  # an earlier micro-batch: keep summing locally
        out = pc.param.new_empty(pc.size)
        self.comm.reduce_scatter_mean(out, pc.pad(pc.param.grad))
        pc.shard.grad = out
        pc.param.grad = None  # the full gradient is freed: a rank keeps its piece only


class Zero3Strategy(_Zero):
    """ZeRO-3: parameters partitioned too, gathered per unit for its forward and again for its backward."""

    name = "zero3"
    stage = 3
    shards_params = True

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.units: list[tuple[nn.Module, list[Piece]]] = []
        self._held: dict[int, int] = {}  # id(Piece) -> how many open uses keep it gathered
        self._bwd_holds: dict[int, int] = {}  # id(Piece) -> holds taken for this backward, not yet released
        self._callback_queued = False
        self._root_depth = 0  # nested calls of the root's methods in progress

    @torch.no_grad()
    def wrap(self, model):
        self._make_pieces(model, trained_only=False)  # frozen parameters are gathered too (not stepped)
        self._broadcast_model(model)
        for pc in self.pieces:
            p = pc.param
            p.data = p.data.clone(memory_format=torch.contiguous_format)  # its own storage, to release
            pc.shard = nn.Parameter(pc.mine(p.data), requires_grad=p.requires_grad)
            self._by_shard[id(pc.shard)] = pc
            self._held[id(pc)] = 0
            self._release_storage(pc)
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda _p, pc=pc: self._grad_ready(pc))
        blocks = list(getattr(model, "blocks", []))
        in_blocks = set()
        for module in blocks:
            ps = list({id(self._by_param[id(p)]): self._by_param[id(p)] for p in module.parameters()}.values())
            self.units.append((module, ps))
            in_blocks.update(id(pc) for pc in ps)
            module.register_forward_pre_hook(lambda m, args, ps=ps: self._acquire(ps))
            module.register_forward_hook(lambda m, args, out, ps=ps: self._after_forward(ps, out))
        root = [pc for pc in self.pieces if id(pc) not in in_blocks]  # embeddings, final norm, head
        if root:
            self.units.append((model, root))
            for name in self.ROOT_METHODS:  # entry points: forward, and the ones callers use directly
                fn = getattr(model, name, None)
                if callable(fn):
                    setattr(model, name, self._root_method(fn, root))
        return model

    # the root's methods that gather its own parameters (the embeddings, final norm and head): a unit's
    # module hooks would miss a caller of ``hidden_states`` / ``compute_logits`` and a parameter read
    # directly (``pos_emb.weight[p:p + T]``), so the root's parameters are one unit, held from the
    # entry to the exit of any of these (nested calls count once) and gathered again for backward
    ROOT_METHODS = ("forward", "hidden_states", "compute_logits")

    def _root_method(self, fn, pieces):
        def method(*args, **kwargs):
            self._acquire(pieces)
            self._root_depth += 1
            try:
                out = fn(*args, **kwargs)
            except BaseException:
                for pc in pieces:
                    self._release(pc)
                raise
            finally:
                self._root_depth -= 1
            if self._root_depth:  # a nested call (forward -> hidden_states): the outermost one hooks backward
                for pc in pieces:
                    self._release(pc)
            else:
                self._after_forward(pieces, out)
            return out
        method.__wrapped__ = fn
        method.__doc__ = fn.__doc__
        return method

    # ---- gather / release ----
    @staticmethod
    def _release_storage(pc: Piece) -> None:
        pc.param.untyped_storage().resize_(0)

    @torch.no_grad()
    def _gather(self, pc: Piece) -> None:
        p = pc.param
        p.untyped_storage().resize_(pc.numel * p.element_size())
        if pc.padded == pc.numel:
            self.comm.all_gather(p.data.view(-1), pc.shard.data)  # straight into the parameter's storage
        else:
            out = p.new_empty(pc.padded)
            self.comm.all_gather(out, pc.shard.data)
            p.data.view(-1).copy_(out[:pc.numel])  # through .data: autograd's saved tensors see no change

    def _acquire(self, pieces) -> None:
        for pc in pieces:
            if self._held[id(pc)] == 0:
                self._gather(pc)
            self._held[id(pc)] += 1

    def _release(self, pc: Piece) -> None:
        self._held[id(pc)] -= 1
        if self._held[id(pc)] == 0:
            self._release_storage(pc)

    def _after_forward(self, pieces, out) -> None:
        for pc in pieces:
            self._release(pc)
        if not torch.is_grad_enabled():
            return
        outs = [t for t in (out if isinstance(out, (tuple, list)) else (out,))
                if torch.is_tensor(t) and t.requires_grad]
        if not outs:
            return
        if len(outs) == 1:
            outs[0].register_hook(lambda g: self._before_backward(pieces))
        else:
            torch.autograd.graph.register_multi_grad_hook(outs, lambda gs: self._before_backward(pieces), mode="any")

    def _before_backward(self, pieces) -> None:
        """Backward reached the unit: gather its parameters again (autograd's saved tensors are them)."""
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            self._callback_queued = True
        self._acquire(pieces)
        for pc in pieces:
            self._bwd_holds[id(pc)] = self._bwd_holds.get(id(pc), 0) + 1

    @torch.no_grad()
    def _grad_ready(self, pc: Piece) -> None:
        """The parameter's gradient of this backward is complete: reduce-scatter it (last micro-batch) and
        release the parameter (no later backward node needs it)."""
        if self._sync:
            out = pc.shard.new_empty(pc.size)
            self.comm.reduce_scatter_mean(out, pc.pad(pc.param.grad))
            pc.shard.grad = out if pc.shard.grad is None else pc.shard.grad.add_(out)
            pc.param.grad = None
        for _ in range(self._bwd_holds.pop(id(pc), 0)):
            self._release(pc)

    def _end_backward(self) -> None:
        """The end of a backward: release what no gradient released (frozen or unused parameters)."""
        self._callback_queued = False
        for pc in self.pieces:
            for _ in range(self._bwd_holds.pop(id(pc), 0)):
                self._release(pc)

    # ---- the rest of the contract ----
    def ema_params(self, model) -> list:
        """The pieces (what the optimizer steps): the weight average follows this rank's share."""
        return [pc.shard for pc in self.pieces if pc.shard.requires_grad]

    @torch.no_grad()
    def _full_param(self, pc: Piece) -> torch.Tensor:
        return self.comm.gather_full(pc, pc.shard.data).clone()

    def _load_param(self, pc: Piece, src: torch.Tensor) -> None:
        pc.shard.data.copy_(pc.mine(src.to(pc.shard.device, pc.shard.dtype)))

    def memory_bytes(self, model, opts: list) -> dict:
        return super().memory_bytes(model, opts)
