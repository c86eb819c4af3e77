"""Parallelism from outside the model: DDP, FSDP2, ZeRO-1/2/3, tensor and sequence parallel.

Knows the strategies by name and builds the one a run asks for (``make_strategy``); each lives
in its own module and wraps or swaps the model's modules from outside (the model never imports
this package). A strategy is a ``Strategy`` (``parallel.base``): what the training loop asks of
it (wrap the model and its optimizers, synchronize gradients, sum across ranks, clip, step,
checkpoint state, consolidate the weights) and nothing else. ``env`` knows the processes
(torchrun's environment, the process group); ``checkpoint`` the distributed checkpoints;
``plan`` the memory planner; ``comm`` counts what the collectives move; ``deepspeed`` maps a
DeepSpeed JSON config onto lmforge's settings; ``launch`` wraps torchrun.
"""
from __future__ import annotations

import importlib

# name -> "module:Class" (imported when asked for, so a single-process run imports no strategy)
STRATEGIES = {
    "none": "base:Strategy",
    "ddp": "ddp:DDPStrategy",
    "fsdp": "fsdp:FSDPStrategy",
    "zero1": "zero:Zero1Strategy",
    "zero2": "zero:Zero2Strategy",
    "zero3": "zero:Zero3Strategy",
    "tp": "tp:TPStrategy",
    "tp+fsdp": "tp:TPFSDPStrategy",
}


def strategy_class(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"parallel: unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    mod, cls = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)


def make_strategy(cfg, env=None):
    """The strategy ``cfg.parallel`` names, for this process (``env``: ``parallel.env.init_distributed(cfg)``
    when not given, which joins the process group torchrun's environment describes)."""
    from .env import init_distributed

    env = env if env is not None else init_distributed(cfg)
    return strategy_class(cfg.parallel)(cfg, env)
