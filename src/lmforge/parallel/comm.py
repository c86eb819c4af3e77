"""Counting what the collectives move: per kind, per rank, during a stretch of training.

Knows how to see every collective a step issues and how much a ring implementation moves for
each; knows nothing of any strategy (it sees their collectives, not their code).

**How it sees them.** ``count_comm()`` is a ``TorchDispatchMode``: in torch 2.13 every collective
reaches the dispatcher as an operator, and a dispatch mode sees it whoever issued it —
``torch.distributed.all_reduce`` and friends (lmforge's ZeRO; FSDP2's ``all_gather_single`` /
``reduce_scatter_single`` become ``c10d._allgather_base_`` / ``c10d._reduce_scatter_base_``),
DTensor's redistributions (TP: the functional ``_c10d_functional.all_reduce``, ...), and DDP's
reducer (C++: its bucket all-reduces call ``c10d.allreduce_`` through the dispatcher; checked on
gloo, 2 ranks: the mode sees one ``allreduce_`` per bucket). ``install_ddp_hook(ddp, counter)``
counts DDP's buckets a second, independent way (a DDP communication hook that records each
bucket, then averages it as DDP's default hook does), so a test can check the two agree. Only
the calls made while the mode is active are seen: on this thread, and in the backward, which on a
CPU runs on the calling thread (on CUDA autograd's device threads inherit the mode with the rest
of its thread-local state: not checked here, there was no GPU). A collective issued from a thread
of its own (an asynchronous checkpoint writer's) is not.

**The volume per rank** is what a ring implementation sends from each of the N ranks of the
collective's group, in elements (bytes: times the element size):

    all-reduce of n elements               2 n (N - 1) / N     (a reduce-scatter, then an all-gather)
    reduce-scatter of n (the input)          n (N - 1) / N
    all-gather of n (the output)             n (N - 1) / N
    all-to-all of n (the input)              n (N - 1) / N
    broadcast of n                           n                 (a pipelined chain: each rank passes n on)

``theoretical_volume`` gives the per-step figures the strategies should produce (Ψ the trained
parameters, per rank, times (N-1)/N). The ZeRO paper's (``paper=True``): DDP 2Ψ (one all-reduce
of the gradients); ZeRO-1/2 Ψ + Ψ (gradients reduce-scattered to their owners, updated parameters
all-gathered); ZeRO-3 3Ψ (parameters all-gathered for the forward and again for the backward,
gradients reduce-scattered). lmforge's, exactly (the default): DDP 2Ψ; ZeRO-1 2Ψ + Ψ (it
all-reduces as DDP does, then all-gathers the updated pieces: one Ψ more than the paper); ZeRO-2
Ψ + Ψ; ZeRO-3 2aΨ + Ψ and FSDP2 2a(Ψ - Ψ_root) + aΨ_root + Ψ over a step of a micro-batches
(parameters are gathered for every micro-batch, gradients reduced once, on the last; FSDP2's root
unit stays gathered from its forward to its backward, while ZeRO-3's root unit is gathered for
each); Muon adds an all-gather of its hidden matrices (Newton-Schulz needs them whole); TP: per
micro-batch, each column-wise / row-wise pair (attention's and the MLP's in a dense block) one
all-reduce of s·b·h activations forward and one backward. Ψ is padded as the strategy pads it
(``padded_params``).

Collectives of at most ``SMALL = 8`` elements (the loop's loss sums and normalizer, a global
gradient norm) are counted apart as ``small``, so the figures compare with the theory without
them. DDP's broadcast of the model's buffers (16 elements for the tests' rope table) is not small.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SMALL = 8  # elements: a collective this small is bookkeeping, not the strategy's traffic
KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "other")


@dataclass
class Call:
    kind: str  # one of KINDS
    op: str  # the operator, e.g. "c10d._reduce_scatter_base_"
    numel: int  # n: the all-reduced / reduce-scattered input / all-gathered output / broadcast elements
    itemsize: int
    group_size: int

    @property
    def volume(self) -> float:
        """Elements this rank sends, as a ring implementation moves them (the module docstring)."""
        N = self.group_size
        if N <= 1:
            return 0.0
        if self.kind == "all_reduce":
            return 2.0 * self.numel * (N - 1) / N
        if self.kind == "broadcast":
            return float(self.numel)
        return self.numel * (N - 1) / N

    @property
    def small(self) -> bool:
        return self.numel <= SMALL


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


def _itemsize(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.element_size()
    if isinstance(x, (list, tuple)):
        for v in x:
            s = _itemsize(v)
            if s:
                return s
    return 4


def _group_size(group) -> int:
    """The size of a process group given as the object or as its name."""
    if group is None:
        import torch.distributed as dist

        return dist.get_world_size() if dist.is_initialized() else 1
    size = getattr(group, "size", None)
    if callable(size):
        try:
            return int(size())
        except (TypeError, RuntimeError):
            pass
    from torch._C._distributed_c10d import ProcessGroup
    from torch.distributed.distributed_c10d import _resolve_process_group

    if isinstance(group, torch.ScriptObject):  # a c10d operator's argument: the group, boxed
        return ProcessGroup.unbox(group).size()
    return _resolve_process_group(group).size()


# operator name -> (kind, which argument holds n, where the group is: an argument index or a keyword)
_C10D = {
    "allreduce_": ("all_reduce", 0, 1), "allreduce_coalesced_": ("all_reduce", 0, 1),
    "_allgather_base_": ("all_gather", 0, 2), "allgather_": ("all_gather", 0, 2),
    "allgather_into_tensor_coalesced_": ("all_gather", 0, 2), "allgather_coalesced_": ("all_gather", 0, 2),
    "_reduce_scatter_base_": ("reduce_scatter", 1, 2), "reduce_scatter_": ("reduce_scatter", 1, 2),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1, 2),
    "alltoall_base_": ("all_to_all", 1, 2), "alltoall_": ("all_to_all", 1, 2),
    "broadcast_": ("broadcast", 0, 1),
    "reduce_": ("other", 0, 1), "gather_": ("other", 1, 2), "scatter_": ("other", 0, 2),
}
_FUNCTIONAL = {  # _c10d_functional: the group is the last argument
    "all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_reduce_coalesced": "all_reduce",
    "all_reduce_coalesced_": "all_reduce", "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_out": "all_gather", "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "all_to_all_single": "all_to_all", "broadcast": "broadcast", "broadcast_": "broadcast",
}


def classify(func, args, kwargs) -> Call | None:
    """The ``Call`` an operator is, or None when it is not a collective."""
    ns = getattr(func, "namespace", "")
    name = func._schema.name.split("::", 1)[-1] if hasattr(func, "_schema") else str(func)
    if ns == "c10d" and name in _C10D:
        kind, data, grp = _C10D[name]
        x = args[data] if len(args) > data else None
        return Call(kind, f"c10d.{name}", _numel(x), _itemsize(x), _group_size(args[grp] if len(args) > grp else None))
    if ns == "_c10d_functional" and name in _FUNCTIONAL:
        kind = _FUNCTIONAL[name]
        x = args[0]
        group = args[-1] if args else kwargs.get("group_name")
        N = _group_size(group)
        n = _numel(x) * (N if kind == "all_gather" else 1)  # an all-gather's n is its output
        return Call(kind, f"_c10d_functional.{name}", n, _itemsize(x), N)
    return None


class CommCounter(TorchDispatchMode):
    """Records every collective issued while active (``with CommCounter() as c:``); ``c.calls``,
    ``c.summary()``. ``hook_buckets``: the element counts a DDP hook (``install_ddp_hook``) saw."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []
        self.hook_buckets: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = classify(func, args, kwargs)
        if call is not None:
            self.calls.append(call)
        return func(*args, **kwargs)

    def reset(self) -> None:
        self.calls.clear()
        self.hook_buckets.clear()

    def summary(self, small: bool = False) -> dict:
        """{kind: {"calls", "elements", "volume", "volume_bytes"}} of the calls counted (``small``:
        those of at most SMALL elements instead), plus "total_volume" and "total_volume_bytes"."""
        out: dict = {}
        for c in self.calls:
            if c.small != small:
                continue
            k = out.setdefault(c.kind, {"calls": 0, "elements": 0, "volume": 0.0, "volume_bytes": 0.0})
            k["calls"] += 1
            k["elements"] += c.numel
            k["volume"] += c.volume
            k["volume_bytes"] += c.volume * c.itemsize
        out["total_volume"] = sum(v["volume"] for k, v in out.items() if isinstance(v, dict))
        out["total_volume_bytes"] = sum(v["volume_bytes"] for k, v in out.items() if isinstance(v, dict))
        return out

    def volume(self, kind: str | None = None) -> float:
        """Elements this rank sent (ring model), of one kind or all, small ones left out."""
        return sum(c.volume for c in self.calls if not c.small and (kind is None or c.kind == kind))


@contextlib.contextmanager
def count_comm():
    """``with count_comm() as c: <a training step>``: ``c.summary()`` says what each kind moved."""
    counter = CommCounter()
    with counter:
        yield counter


def install_ddp_hook(ddp_module, counter: CommCounter) -> None:
    """A DDP communication hook that records each gradient bucket's element count in
    ``counter.hook_buckets`` and then does what DDP's default does: all-reduce the bucket and
    divide by the world size. Call it before the first backward (DDP accepts one hook)."""
    import torch.distributed as dist

    group = getattr(ddp_module, "process_group", None)

    def hook(state, bucket):
        buf = bucket.buffer()
        counter.hook_buckets.append(buf.numel())
        n = dist.get_world_size(group)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(n))

    ddp_module.register_comm_hook(None, hook)


def theoretical_volume(strategy: str, n_params: float, world: int, micro_batches: int = 1, root_params: float = 0.0,
                       act_elements: float = 0.0, n_layer: int = 0, muon_params: float = 0.0, n_tensors: int = 0,
                       tp: int = 1, tp_pairs: int | None = None,
                       paper: bool = False) -> dict:
    """The per-rank elements one optimizer step should move, by kind (ring volumes: the module
    docstring), for lmforge's implementation of ``strategy`` (``paper=True``: the ZeRO paper's
    headline figures instead: DDP 2Ψ, ZeRO-1/2 Ψ + Ψ, ZeRO-3 3Ψ, times (N-1)/N).

    ``n_params``: Ψ, the trained parameters as the strategy pads them for its collectives
    (``padded_params``; TP+FSDP: the TP-local ones); ``micro_batches``: the step's accumulation
    micro-batches (every strategy reduces gradients once per step, on the last; parameters are
    gathered for every micro-batch); ``root_params`` (FSDP2): those outside the blocks, which the
    root keeps gathered from its forward to its backward (one all-gather per micro-batch, not
    two); ``muon_params``: the hidden matrices Muon orthogonalizes whole, all-gathered once per
    step where they are sharded (ZeRO, FSDP2, TP); ``n_tensors`` (DDP with
    ``find_unused_parameters``, as lmforge runs a MoE model): the trained tensors, whose "was used"
    map DDP all-reduces once per step (0 otherwise).
    TP: ``act_elements`` = s·b·h of one micro-batch; each column-wise / row-wise pair
    (``tp_pairs``; default 2 per block of ``n_layer``: attention and MLP; a MoE's replicated experts
    make none) all-reduces once forward and once backward, over the ``tp`` ranks of a
    tensor-parallel group (``tp`` = ``world`` for "tp")."""
    a = micro_batches
    if strategy == "none":
        return {}
    t = world if strategy == "tp" else (tp if strategy == "tp+fsdp" else 1)
    if t < 1 or world % t:
        raise ValueError(f"theoretical_volume: tp {t} does not divide world {world}")
    dp = world // t
    f = (dp - 1) / dp  # a data-parallel collective's share
    ft = (t - 1) / t  # a tensor-parallel one's
    if paper:
        table = {"ddp": {"all_reduce": 2 * n_params * f},
                 "zero1": {"reduce_scatter": n_params * f, "all_gather": n_params * f},
                 "zero2": {"reduce_scatter": n_params * f, "all_gather": n_params * f},
                 "zero3": {"reduce_scatter": n_params * f, "all_gather": 2 * n_params * f},
                 "fsdp": {"reduce_scatter": n_params * f, "all_gather": 2 * n_params * f}}
        if strategy not in table:
            raise ValueError(f"theoretical_volume: the ZeRO paper has no figure for {strategy!r}")
        return table[strategy]
    if strategy == "ddp":
        return {"all_reduce": 2 * (n_params + n_tensors) * f}
    if strategy == "zero1":  # lmforge's ZeRO-1 all-reduces as DDP, then gathers the updated pieces
        return {"all_reduce": 2 * n_params * f, "all_gather": (n_params + muon_params) * f}
    if strategy == "zero2":
        return {"reduce_scatter": n_params * f, "all_gather": (n_params + muon_params) * f}
    if strategy == "zero3":
        return {"reduce_scatter": n_params * f, "all_gather": (2 * a * n_params + muon_params) * f}
    if strategy == "fsdp":
        gathers = 2 * a * (n_params - root_params) + a * root_params
        return {"reduce_scatter": n_params * f, "all_gather": (gathers + muon_params) * f}
    if strategy in ("tp", "tp+fsdp"):
        pairs = 2 * n_layer if tp_pairs is None else tp_pairs
        out = {"all_reduce": 2 * pairs * a * 2 * act_elements * ft}
        if muon_params:
            out["all_gather"] = muon_params * ft
        if strategy == "tp+fsdp" and dp > 1:
            fs = theoretical_volume("fsdp", n_params, dp, a, root_params)
            out["reduce_scatter"] = fs["reduce_scatter"]
            out["all_gather"] = out.get("all_gather", 0.0) + fs["all_gather"]
        return out
    raise ValueError(f"theoretical_volume: unknown strategy {strategy!r}")


def padded_params(model, strategy: str, world: int, tp: int = 1, optimizer: str = "adamw") -> dict:
    """The trained parameter elements as ``strategy`` pads them for its collectives: {"all", "root"
    (those outside ``model.blocks``), "muon" (the hidden matrices, when ``optimizer`` is muon),
    "tensors" (how many), "shared" (those reached under several names: tied embeddings), "tp_pairs"
    (TP: the row-wise layers, each closing a column-wise / row-wise pair: attention's, the MLP's)}. ZeRO: each
    parameter to a multiple of ``world`` elements; FSDP2: each
    parameter's dim 0 to a multiple of the data-parallel ranks' rows; TP: the local shards (TP+FSDP2:
    those, then FSDP2's rows); DDP: unpadded."""
    from .plan import _tp_kinds, _tp_local_shape

    hidden = set()
    if optimizer == "muon":
        from ..train.optim import param_groups

        hidden = {id(p) for _, p in param_groups(model)[0]}
    t = world if strategy == "tp" else (tp if strategy == "tp+fsdp" else 1)
    dp = world // t
    kinds = _tp_kinds(model) if t > 1 else {}
    out = {"all": 0, "root": 0, "muon": 0, "tensors": 0, "shared": 0,
           "tp_pairs": len({n.rsplit(".", 1)[0] for n, k in kinds.items() if k == "rowwise"})}
    names: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        shape = _tp_local_shape(p.shape, kinds.get(name), name.endswith(".bias"), t)
        n = 1
        for d in shape:
            n *= d
        if strategy.startswith("zero"):
            n = -(-n // world) * world
        elif strategy in ("fsdp", "tp+fsdp"):
            rows = shape[0] if shape else 1
            n = -(-rows // dp) * dp * (n // max(rows, 1))
        out["all"] += n
        out["tensors"] += 1
        if not name.startswith("blocks."):
            out["root"] += n
        if id(p) in hidden:
            if t > 1:  # TP gathers the matrices it splits, whole (a replicated one is whole already)
                out["muon"] += p.numel() if kinds.get(name) else 0
            else:
                out["muon"] += n
        if names[id(p)] > 1:
            out["shared"] += n
    return out
