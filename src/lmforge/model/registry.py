"""The component registries: attention and feed-forward kinds by name.

Knows names and the classes registered under them; knows nothing about any
one component. ``ModelConfig.layer_specs()`` names a kind per layer; the
generic ``Block`` looks it up here. A new architecture adds a component (a
``torch.nn.Module`` with the methods ``model.components`` documents) and
registers it; nothing else in the model changes:

    @register_attention("mla")
    class MultiHeadLatentAttention(Component): ...
"""
from __future__ import annotations

ATTENTION: dict[str, type] = {}
FEEDFORWARD: dict[str, type] = {}
# lmforge's own kinds, known by name before their modules (and torch) are imported: a config validates
# without importing torch
BUILTIN = {"attention": ("causal",), "feed-forward": ("dense", "moe")}


def known(what: str) -> list[str]:
    """The names a config may use for ``what`` ("attention" | "feed-forward")."""
    table = ATTENTION if what == "attention" else FEEDFORWARD
    return list(dict.fromkeys([*BUILTIN[what], *table]))


def _register(table: dict, what: str):
    def deco(name: str):
        def add(cls):
            if name in table and table[name] is not cls:
                raise ValueError(f"{what} {name!r} is already registered ({table[name].__name__})")
            table[name] = cls
            cls.kind = name
            return cls
        return add
    return deco


register_attention = _register(ATTENTION, "attention")
register_feedforward = _register(FEEDFORWARD, "feed-forward")


_builtin_loaded = False


def ensure_builtin() -> None:
    """Import lmforge's own components (they register themselves on import)."""
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        from . import attention, feedforward  # noqa: F401
