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
the calls made while the mode is active, on this thread, are seen (a collective issued from a
thread of its own, such as an asynchronous checkpoint writer's, is not).

**The volume per rank** is what a ring implementation sends from each of the N ranks of the
collective's group, in elements (bytes: times the element size):

    all-reduce of n elements               2 n (N - 1) / N     (a reduce-scatter, then an all-gather)
    reduce-scatter of n (the input)          n (N - 1) / N
    all-gather of n (the output)             n (N - 1) / N
    all-to-all of n (the input)              n (N - 1) / N
    broadcast of n                           n                 (a pipelined chain: each rank passes n on)

``theoretical_volume`` gives the per-step figures the strategies should produce (Ψ the trained
parameters, per rank, times (N-1)/N): DDP 2Ψ (one all-reduce of the gradients); ZeRO-1/2 Ψ + Ψ
(gradients reduce-scattered to their owners, updated parameters all-gathered); ZeRO-3 and FSDP2
3Ψ (parameters all-gathered for the forward and again for the backward, gradients
reduce-scattered); TP: per block, forward and backward, two all-reduces of s·b·h activations.

Collectives of at most ``SMALL = 8`` elements (the loop's loss sums and normalizer, a global
gradient norm, DDP's broadcast of a rope table) are counted apart as ``small``, so the figures
compare with the theory without them.
"""
from __future__ import annotations

import contextlib
import threading
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
        self._hook_itemsize = 4
        self._thread = threading.get_ident()

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
        counter._hook_itemsize = buf.element_size()
        n = dist.get_world_size(group)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(n))

    ddp_module.register_comm_hook(None, hook)


def theoretical_volume(strategy: str, n_params: float, world: int, micro_batches: int = 1,
                       sync_every_micro_batch: bool = False, act_elements: float = 0.0, n_layer: int = 0,
                       root_params: float = 0.0) -> dict:
    """The per-rank elements one optimizer step should move, by kind (the module docstring's ring
    volumes). ``n_params``: Ψ, the trained parameters (for an exact comparison: as the strategy pads
    them, ``padded_params``). ``micro_batches``: the step's gradient-accumulation micro-batches;
    ``sync_every_micro_batch``: gradients are reduced after every micro-batch (ZeRO-2/3 and FSDP2 as
    lmforge runs them) rather than after the last only (DDP's ``no_sync``, ZeRO-1). ``root_params``
    (FSDP2): the parameters outside the blocks, which the root keeps gathered from its forward to
    its backward (one all-gather per micro-batch, not two). TP: ``act_elements`` = s·b·h of one
    micro-batch on one rank, ``n_layer`` blocks: two all-reduces per block forward and two backward."""
    N = world
    f = (N - 1) / N if N > 1 else 0.0
    reduces = micro_batches if sync_every_micro_batch else 1
    if strategy == "ddp":
        return {"all_reduce": 2 * n_params * f * reduces}
    if strategy in ("zero1", "zero2"):
        return {"reduce_scatter": n_params * f * reduces, "all_gather": n_params * f}
    if strategy in ("zero3", "fsdp"):
        gathers = (2 * (n_params - root_params) + root_params) * micro_batches
        return {"reduce_scatter": n_params * f * reduces, "all_gather": gathers * f}
    if strategy == "tp":
        return {"all_reduce": 4 * n_layer * 2 * act_elements * f * micro_batches}
    if strategy == "none":
        return {}
    raise ValueError(f"theoretical_volume: unknown strategy {strategy!r}")


def padded_params(model, strategy: str, world: int) -> dict:
    """The trained parameter elements as a strategy pads them for its collectives: {"all", "root"}
    (root: those outside ``model.blocks``). ZeRO: each parameter to a multiple of ``world``
    elements; FSDP2: each parameter's dim 0 to a multiple of ``world`` rows; DDP: unpadded."""
    total = root = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        n = p.numel()
        if strategy.startswith("zero"):
            n = -(-n // world) * world
        elif strategy == "fsdp":
            rows = p.shape[0] if p.dim() else 1
            n = -(-rows // world) * world * (n // max(rows, 1))
        total += n
        if not name.startswith("blocks."):
            root += n
    return {"all": total, "root": root}
