"""The processes of a run: torchrun's environment, the process group, the device of each rank.

Knows how a process learns its place (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` / ``MASTER_PORT``, as torchrun sets them), how it joins the
group (gloo on CPU, nccl on CUDA, with ``dist_timeout``), and how it leaves. A process with no
such environment is rank 0 of 1 and joins nothing. A rank that cannot meet the others within
``dist_timeout`` seconds raises ``RendezvousError`` naming that setting (never a silent hang). On CUDA
each rank takes the device of its ``LOCAL_RANK``. Knows nothing of models or strategies.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


class RendezvousError(RuntimeError):
    """The ranks did not all meet within ``dist_timeout`` (a node not started, a wrong address)."""


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str = ""  # "" when no process group was made (one process)
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r}: expected an integer (torchrun sets it)") from None


def dist_env() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment; (0, 1, 0, 1) without one."""
    world = _int_env("WORLD_SIZE", 1)
    rank = _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", rank)
    local_world = _int_env("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local_rank, local_world


def init_distributed(cfg) -> DistEnv:
    """Join the process group torchrun's environment describes (once per process; a second call returns
    the same place). The device: ``cuda:LOCAL_RANK`` when the run is on CUDA, else the CPU."""
    import torch.distributed as dist

    from ..train.loop import pick_device

    rank, world, local_rank, local_world = dist_env()
    dev = pick_device(cfg.device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    backend = cfg.dist_backend if cfg.dist_backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and not dist.is_initialized():
        if cfg.dist_timeout <= 0:
            raise ValueError(f"dist_timeout: must be > 0 seconds, got {cfg.dist_timeout}")
        try:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=cfg.dist_timeout))
        except (RuntimeError, TimeoutError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise RendezvousError(
                f"rank {rank} of {world} could not join the process group at {where} within dist_timeout = "
                f"{cfg.dist_timeout:g} s (--set dist_timeout=SECONDS): is every node started, and is "
                f"MASTER_ADDR reachable from here? ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from e
    return DistEnv(rank, world, local_rank, local_world, backend if world > 1 or dist.is_initialized() else "", dev)


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
