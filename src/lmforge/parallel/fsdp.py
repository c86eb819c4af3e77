"""FSDP2: torch's ``fully_shard`` on each transformer block, then on the root (``parallel = "fsdp"``).

Knows how to shard a ``Transformer`` from outside (``shard_model``): one FSDP unit per block
(``model.blocks``; its parameters all-gathered just before its forward and again before its
backward, freed after each, its gradients reduce-scattered as soon as its backward ends) and one
unit for the rest, the root (the embeddings, the final norm, the head: with tied embeddings
``tok_emb`` and ``lm_head`` share one parameter, and both modules are in the root's unit, so the
shared tensor is gathered once and its two gradients add up before the reduce-scatter). Every
parameter becomes a ``DTensor`` sharded on dim 0 over the data-parallel ranks (``Shard(0)``;
``torch.chunk``'s rule: when dim 0 does not divide, the last ranks hold fewer rows, and each rank's
storage is padded to ``ceil(dim0 / N)`` rows so the all-gather moves equal pieces).

Knows the options torch offers and what they mean here:

* ``fsdp_mixed_precision`` = bf16 | fp16: ``MixedPrecisionPolicy(param_dtype=..., reduce_dtype=fp32)``:
  the sharded parameters (the optimizer's) stay fp32; each all-gather casts them to bf16/fp16,
  forward and backward compute in it, the gradients are cast back and reduce-scattered in fp32.
  On a CPU it runs (bf16 matmuls without AVX-512 crawl: ``check`` warns) and is close to, not
  equal to, fp32.
* ``cpu_offload``: ``CPUOffloadPolicy``: the sharded parameters, their gradients and so the
  optimizer state and step live in CPU memory; each all-gather copies a unit's shard to the device
  first. Pinned memory only when the device is CUDA. On a CPU-only run the parameters are already
  in CPU memory: torch takes the offload path, its copies are no-ops, and the result equals the
  run without it (the setting is accepted and has no effect on memory there).
* ``reshard_after_forward``: True (the default) frees each block's gathered parameters after its
  forward and all-gathers them again for its backward (ZeRO-3's memory); False keeps them from
  forward to backward (one all-gather fewer per block, ZeRO-2-like memory). The root is not
  resharded after a training forward (the head's backward starts at once; its parameters are
  freed after the backward), but is after a forward without gradients (evaluation, sampling).
* Recompute (``train.recompute.apply_recompute``) is applied to the blocks before sharding (the
  trainer does so when it builds the model); the checkpointed forward runs inside the block's
  FSDP unit, so the recompute in backward sees the block's gathered parameters.
* Gradient accumulation: ``micro_batch`` turns the reduce-scatter off but on the last
  micro-batch (``set_requires_gradient_sync``): earlier micro-batches accumulate *unsharded*
  fp32 gradients (memory of one process's gradients until the step's last backward), the last
  reduce-scatters their sum once.

Knows nothing of the loop, the data or the model's math; tensor parallel (``parallel.tp``) calls
``shard_model`` with the data-parallel dimension of its 2-D mesh.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from .base import Strategy

logger = logging.getLogger("lmforge.parallel")

MIXED_PRECISION = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mp_dtype(name: str):
    if name not in MIXED_PRECISION:
        raise ValueError(f"fsdp_mixed_precision: expected one of none, bf16, fp16, got {name!r}")
    return MIXED_PRECISION[name]


def shard_model(model: torch.nn.Module, mesh=None, mixed_precision: str = "none", cpu_offload: bool = False,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` each of ``model.blocks``, then ``model`` itself (the root: embeddings, final norm,
    head, tied or not); in place, returns ``model`` (its class becomes torch's FSDP subclass of it;
    parameter names are unchanged). ``mesh``: a 1-D device mesh of the data-parallel ranks (None: every
    rank, on the device type of the model's parameters). Collective: every rank calls it alike."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    dtype = _mp_dtype(mixed_precision)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"fsdp: the model ({type(model).__name__}) has no transformer blocks (model.blocks) "
                         "to shard one by one")
    if mesh is None:
        mesh = data_parallel_mesh(next(model.parameters()).device.type)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    if cpu_offload:
        offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda")
    else:
        offload = OffloadPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp,
                    offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, offload_policy=offload)
    model.register_forward_hook(_reshard_after_no_grad_forward)
    return model


def _reshard_after_no_grad_forward(module, args, output):
    """The root keeps its gathered parameters from forward to backward; a forward without gradients
    (evaluation, sampling) has no backward to free them, and until freed the root's registered parameters
    are the whole tensors, not its DTensor shards (a checkpoint or state dict taken then would see them):
    free them now."""
    if not torch.is_grad_enabled():
        module.reshard()


def data_parallel_mesh(device_type: str):
    """A 1-D device mesh ("dp") over every rank of the default process group (a group of one when this
    process is alone and none exists yet: FSDP on one process is a legal, if pointless, run)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group("gloo" if device_type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the storage this rank holds); a plain tensor itself."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def allocated_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``' local shards: what is really allocated (FSDP2's
    padded shards, a unit's gradients sharing one reduce-scatter buffer, counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        s = local_tensor(t).untyped_storage()
        key = (s.data_ptr(), s.device)
        if s.nbytes() and key not in seen:
            seen.add(key)
            total += s.nbytes()
    return total


def sharded_bytes(tensors) -> int:
    """Bytes of ``tensors``' local shards as shaped (numel x element size, no padding, no sharing)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        loc = local_tensor(t)
        total += loc.numel() * loc.element_size()
    return total


def _unique_params(model):
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _optim_tensors(opts):
    for opt in opts:
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    yield v


class FSDPStrategy(Strategy):
    """FSDP2 over every rank (a 1-D data-parallel mesh): parameters, gradients and optimizer state
    sharded on dim 0; see the module's docstring for the options."""

    name = "fsdp"
    shards_params = True

    def __init__(self, cfg, env):
        super().__init__(cfg, env)
        self.mesh = None

    # ---- set-up ----
    def check(self, model) -> None:
        mp = getattr(self.cfg, "fsdp_mixed_precision", "none")
        _mp_dtype(mp)
        if self.name == "fsdp":
            if getattr(self.cfg, "tp_size", 0) > 1:
                raise ValueError(f"tp_size = {self.cfg.tp_size} applies to parallel = tp or tp+fsdp, "
                                 "not fsdp (set parallel = 'tp+fsdp' for tensor parallel with FSDP2)")
            if getattr(self.cfg, "sequence_parallel", False):
                raise ValueError("sequence_parallel applies to parallel = tp or tp+fsdp, not fsdp")
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, torch.nn.ModuleList) or len(blocks) == 0:
            raise ValueError(f"parallel = {self.name!r}: the model ({type(model).__name__}) has no transformer "
                             "blocks (model.blocks) to shard one by one")
        if mp in ("bf16", "fp16") and self.device.type == "cpu":
            logger.warning("fsdp_mixed_precision = %s on the CPU: it runs, but %s matrix products are slow on "
                           "most CPUs (fp32 is the CPU's fast path)", mp, mp)
        if mp == "fp16":
            logger.warning("fsdp_mixed_precision = fp16: FSDP2 casts parameters and compute to fp16 without loss "
                           "scaling; small gradients can underflow (bf16 has fp32's range)")
        if getattr(self.cfg, "cpu_offload", False) and self.device.type == "cpu":
            logger.info("cpu_offload on a CPU-only run: the parameters already live in CPU memory; the setting "
                        "changes nothing (torch's offload path runs, its copies are no-ops)")

    def wrap(self, model):
        cfg = self.cfg
        self.mesh = data_parallel_mesh(self.device.type)
        return shard_model(model, self.mesh, mixed_precision=getattr(cfg, "fsdp_mixed_precision", "none"),
                           cpu_offload=getattr(cfg, "cpu_offload", False))

    def describe(self) -> dict:
        return {**super().describe(), "mixed_precision": getattr(self.cfg, "fsdp_mixed_precision", "none"),
                "cpu_offload": bool(getattr(self.cfg, "cpu_offload", False)),
                "units": "one per transformer block + the root (embeddings, final norm, head)"}

    # ---- the step ----
    @contextlib.contextmanager
    def micro_batch(self, fwd, last: bool):
        """The reduce-scatter runs only in the last micro-batch's backward; earlier ones accumulate
        unsharded gradients locally."""
        if hasattr(fwd, "set_requires_gradient_sync"):
            fwd.set_requires_gradient_sync(last)
        yield

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """The global L2 norm of the (sharded) gradients, equal on every rank: each rank sums the squares
        of its shards, one all-reduce (through DTensor's Partial sum) adds them; then every shard is scaled
        by torch's rule min(1, max_norm / (norm + 1e-6)) (``max_norm`` 0: measure only)."""
        grads = [p.grad for p in _unique_params(model) if p.requires_grad and p.grad is not None]
        if not grads:
            return 0.0
        sharded, plain = None, torch.zeros((), dtype=torch.float32, device=local_tensor(grads[0]).device)
        for g in grads:
            s = g.detach().float().pow(2).sum()  # DTensor: Partial(sum) over the mesh dims it is sharded on
            if hasattr(s, "full_tensor"):
                sharded = s if sharded is None else sharded + s
            else:  # a parameter FSDP does not manage: the same whole tensor on every rank
                plain = plain + s.to(plain.device)
        if sharded is not None:
            plain = plain + sharded.full_tensor().to(plain.device)  # the one all-reduce
        norm = plain.sqrt()
        if max_norm and max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for g in grads:
                loc = local_tensor(g)
                loc.mul_(coef.to(loc.device, loc.dtype))
        return float(norm)

    # ---- state ----
    def memory_bytes(self, model, opts: list) -> dict:
        """Bytes this rank really holds: the storages behind its parameter shards (padded to
        ceil(dim0 / N) rows), its gradient shards (each unit's reduce-scatter output, one buffer, padded
        alike) and its optimizer state (``zeros_like`` of the unpadded local shards, plus the step
        counters); each storage counted once. ``*_unpadded``: the same tensors' numel x element size."""
        params = _unique_params(model)
        grads = [p.grad for p in params]
        optim = list(_optim_tensors(opts))
        return {"params": allocated_bytes(params), "grads": allocated_bytes(grads), "optim": allocated_bytes(optim),
                "params_unpadded": sharded_bytes(params), "grads_unpadded": sharded_bytes(grads),
                "optim_unpadded": sharded_bytes(optim)}

    def full_state_dict(self, model) -> dict | None:
        """Every parameter and buffer whole, on rank 0 (CPU tensors, the names of one process's
        ``state_dict``); None on the others. Collective: each sharded tensor is all-gathered in turn."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in sd.items()}
