"""What the training loop asks of a parallel strategy, and the single-process answer ("none").

Knows the contract every strategy keeps (DDP, FSDP2, ZeRO-1/2/3, TP subclass it and override
what they change); knows nothing of any one of them. The loop, per step, on every rank:

    fwd  = strategy.wrap(model)                        # once, before the optimizers are built
    opts = strategy.wrap_optimizers(model, stage.optimizers(cfg))
    N    = strategy.all_sum([sum of the micro-batches' n])[0]    # the global loss normalizer
    for i, b in enumerate(micro_batches):
        with strategy.micro_batch(fwd, last=i == len(micro_batches) - 1):   # DDP: no_sync but the last
            loss = stage.loss(fwd, b)                   # the SUM over b's n units
            (loss * strategy.grad_scale / N).backward()  # gradient sync AVERAGES over dp ranks
    loss_val = strategy.all_sum([sum of loss.item()])[0] / N
    gnorm = strategy.clip_grad_norm(model, cfg.grad_clip)   # the global norm, equal on every rank
    strategy.step(opts); strategy.zero_grad(opts)

so every rank's gradient is the gradient of the global batch, exactly as one process holding it
all (``grad_scale`` is the number of data-parallel ranks). Ranks are placed on a mesh of
(data-parallel, tensor-parallel) positions: ``dp_rank`` / ``dp_size`` are the loader's ``rank`` /
``world_size`` (ranks of one tensor-parallel group read the same batch).

Every check that can fail is made before any collective and is the same on every rank
(``check``), so a bad setting raises the same ValueError everywhere instead of hanging.
"""
from __future__ import annotations

import contextlib

import torch


class Strategy:
    """One process, no wrapping (``parallel = "none"``); the base every strategy extends."""

    name = "none"
    shards_params = False  # parameters split across ranks (fsdp, zero3, tp): every rank runs every forward

    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.device = env.device

    # ---- places ----
    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    @property
    def dp_rank(self) -> int:  # the loader's rank
        return self.env.rank

    @property
    def dp_size(self) -> int:  # the loader's world_size
        return self.env.world_size

    @property
    def dp_group(self):  # the process group of the data-parallel ranks (None: the default, every rank)
        return None

    @property
    def grad_scale(self) -> float:
        return float(self.dp_size)

    def describe(self) -> dict:
        """What ran, for final.json and the report: strategy, ranks, mesh."""
        return {"strategy": self.name, "world_size": self.world_size, "dp_size": self.dp_size,
                "tp_size": self.world_size // self.dp_size}

    # ---- set-up ----
    def check(self, model) -> None:
        """Settings against the world and the model (heads, batch); a ValueError naming the setting,
        raised on every rank alike, before any collective."""
        if self.name == "none" and self.world_size > 1:
            raise ValueError(f"parallel = 'none' but this process is one of WORLD_SIZE={self.world_size} "
                             "(torchrun): set parallel = ddp, fsdp, zero1, zero2, zero3, tp or tp+fsdp")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Apply the strategy to ``model`` (in place where it can); returns what the loss calls."""
        return model

    def wrap_optimizers(self, model, opts: list) -> list:
        """The optimizers the loop steps (ZeRO: its own, over shards); built after ``wrap``."""
        return opts

    # ---- the step ----
    def micro_batch(self, fwd, last: bool):
        """Around one micro-batch's forward and backward: gradients synchronize only on the ``last``."""
        return contextlib.nullcontext()

    def all_sum(self, values: list[float]) -> list[float]:
        """The sums over the data-parallel ranks, the same on every rank (one all-reduce)."""
        import torch.distributed as dist

        if self.dp_size == 1 or not dist.is_initialized():
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.env.backend == "nccl" else "cpu")
        dist.all_reduce(t, group=self.dp_group)
        return t.tolist()

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank (a decision every rank must take alike: the time bound)."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_initialized():
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.env.backend == "nccl" else "cpu")
        dist.broadcast(t, src=0)
        return t.tolist()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def clip_grad_norm(self, model, max_norm: float) -> float:
        """Clip the trained parameters' gradients to ``max_norm`` (0: measure only); the global norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))

    def step(self, opts: list) -> None:
        for opt in opts:
            opt.step()

    def zero_grad(self, opts: list) -> None:
        for opt in opts:
            opt.zero_grad(set_to_none=True)

    def ema_params(self, model) -> list:
        """The tensors a weight average follows (ZeRO-3: this rank's shards)."""
        return [p for p in model.parameters() if p.requires_grad]

    # ---- state ----
    def memory_bytes(self, model, opts: list) -> dict:
        """Bytes this rank holds now: {"params", "grads", "optim"} (local shards of sharded tensors;
        measured on the tensors themselves). Call between backward and ``zero_grad`` to see gradients."""
        from .plan import measured_bytes

        return measured_bytes(model, opts)

    def dcp_state(self, model, opts: list) -> dict:
        """{"model": ..., "optim": ...} for ``torch.distributed.checkpoint`` (parameter-name keyed, so a
        checkpoint loads into any strategy and any world size)."""
        from .checkpoint import default_dcp_state

        return default_dcp_state(model, opts)

    def load_dcp_state(self, model, opts: list, state: dict) -> None:
        from .checkpoint import default_load_dcp_state

        default_load_dcp_state(model, opts, state)

    def full_state_dict(self, model) -> dict | None:
        """The whole model's state on rank 0 ({name: full CPU tensor}); None on the other ranks.
        Collective: every rank calls it."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()} if self.is_main else None

    def close(self) -> None:
        from .env import close_distributed

        close_distributed()
