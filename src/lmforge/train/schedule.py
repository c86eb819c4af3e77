"""Learning-rate schedules as a multiplier of the base rate, from training progress.

Knows the shapes; the trainer decides what progress means (steps, tokens or
wall-clock time, whichever bound comes first) and multiplies each group's base rate.

* ``cosine``: linear warmup, then cosine from 1 down to ``min_ratio``.
* ``wsd`` (warmup-stable-decay): linear warmup, a long flat stretch, then a
  linear decay to ``min_ratio`` over the last ``decay_frac`` of training. The
  flat part lets a run be extended or stopped early and decayed from any point.
* ``constant``: warmup, then flat.
"""
from __future__ import annotations

import math


def lr_multiplier(progress: float, step: int, kind: str = "cosine", warmup_steps: int = 0,
                  min_ratio: float = 0.1, decay_frac: float = 0.2) -> float:
    """``progress`` in [0, 1] over the whole run; ``step`` counts optimizer steps (for warmup)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if kind == "wsd":
        start = 1 - decay_frac
        if p < start:
            return 1.0
        return 1.0 - (1 - min_ratio) * (p - start) / max(decay_frac, 1e-9)
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {kind!r}; expected cosine, wsd or constant")
