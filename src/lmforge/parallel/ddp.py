"""Data parallel with torch's DistributedDataParallel: every rank holds the whole model and optimizer.

Knows how DDP wraps the model from outside (gloo on CPU with no ``device_ids``, nccl on the rank's
CUDA device), that gradient accumulation skips the all-reduce on every micro-batch but the last
(``no_sync``), and which settings make no sense for it. Each rank reads its own rows of the global
batch; DDP's backward all-reduces the gradients and divides them by the world size, so with the
loop's ``grad_scale = dp_size`` over the global normalizer every rank ends the step holding the
gradient one process would compute on the whole batch. Clipping, the optimizer step, the weight
average and the state dict are the base ``Strategy``'s (every rank holds the same full tensors).

Buffers are not broadcast at each forward (``broadcast_buffers=False``): lmforge's models keep only
derived buffers (rotary tables, masks) that every rank computes alike. A MoE model may leave experts
unused in a micro-batch, so DDP then looks for unused parameters (``find_unused_parameters``).
Knows nothing of sharding (``zero``, ``fsdp``) or of the loop.
"""
from __future__ import annotations

import contextlib

import torch

from .base import Strategy


class DDPStrategy(Strategy):
    name = "ddp"

    def check(self, model) -> None:
        cfg = self.cfg
        if getattr(cfg, "tp_size", 0) not in (0, 1):
            raise ValueError(f"parallel = 'ddp' replicates the whole model on every rank; tp_size = {cfg.tp_size} "
                             "asks for tensor parallelism: use parallel = 'tp' or 'tp+fsdp', or set tp_size = 0")
        if getattr(cfg, "sequence_parallel", False):
            raise ValueError("sequence_parallel = true needs tensor parallelism (parallel = 'tp' or 'tp+fsdp'); "
                             "parallel = 'ddp' has none")
        if getattr(cfg, "fsdp_mixed_precision", "none") != "none" or getattr(cfg, "cpu_offload", False):
            raise ValueError("fsdp_mixed_precision and cpu_offload are FSDP settings; parallel = 'ddp' takes neither "
                             "(use dtype = bf16 for mixed precision, or parallel = 'fsdp')")
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("parallel = 'ddp': the model has no trained parameter (requires_grad) to synchronize")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():  # one process: nothing to synchronize
            return model
        from torch.nn.parallel import DistributedDataParallel

        moe = getattr(getattr(model, "cfg", None), "moe", None) is not None
        import inspect

        dev = self.device
        params = inspect.signature(DistributedDataParallel).parameters
        # no buffer broadcast at each forward (newer torch names it forward_sync_buffers; both keep the sync at init)
        sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=moe, **sync)

    def micro_batch(self, fwd, last: bool):
        if last or not hasattr(fwd, "no_sync"):
            return contextlib.nullcontext()
        return fwd.no_sync()
