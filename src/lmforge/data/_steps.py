"""What the resumable steps of ``prepare`` share: the key that names a step's output, and its bar.

Knows how to hash a step's inputs and settings into a short key (a rerun with the
same key reuses the step's output) and how a step shows its progress on stderr;
knows nothing of what any step does (``prepare`` runs steps 1 and 2, ``shards`` step 3).
"""
from __future__ import annotations

import hashlib
import json
import sys


def step_hash(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode() if not isinstance(p, bytes) else p)
        h.update(b"\x00")
    return h.hexdigest()


def step_bar(total, desc, unit="B", quiet=False):
    from .._progress import bar as tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=quiet, file=sys.stderr,
                dynamic_ncols=True, leave=False)
