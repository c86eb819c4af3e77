"""Swapping modules from outside: ``replace_linear`` (for LoRA and quantized layers).

Knows module trees; knows nothing about what replaces what. The model's code
is never edited to add an adapter or a quantized layer: a later package
(``align/``, ``quant/``) calls ``replace_linear(model, make, where)``.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn


def replace_linear(model: nn.Module, make, where="*") -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name matches ``where`` (a glob such as
    ``"blocks.*.attn.qkv"``, a list of globs, or a predicate ``(name, module) -> bool``) by
    ``make(name, module)``; returns the replaced names. Tied weights stay tied only if ``make`` keeps
    the same Parameter."""
    if callable(where):
        match = where
    else:
        pats = [where] if isinstance(where, str) else list(where)

        def match(name, _):
            return any(fnmatch.fnmatchcase(name, p) for p in pats)
    todo = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and match(n, m)]
    for name, mod in todo:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make(name, mod)
        if not isinstance(new, nn.Module):
            raise TypeError(f"replace_linear: make({name!r}) returned {type(new).__name__}, not a module")
        setattr(parent, attr, new)
    return [n for n, _ in todo]
