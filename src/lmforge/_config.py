"""Configs are dataclasses: build them from dicts (JSON/TOML files) and apply
``key=value`` overrides, with errors that name the field and the expected type.

Knows nothing about any stage; every stage's config (and later the pipeline's
recipes) goes through these helpers.
"""
from __future__ import annotations


import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints


class UsageError(ValueError):
    """A mistake in how a command was called (``--set`` syntax, an unknown setting): exit status 2."""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp, where: str, text: bool = True) -> Any:
    """Convert ``value`` to type ``tp``. ``text=True``: a command-line string, parsed (``"10"`` -> 10);
    ``text=False``: a value from a JSON/TOML file, already typed, so a string where a number or a
    boolean belongs is an error (``max_steps = "10"``)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where, text)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if text and isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if origin in (list, tuple):
        if text and isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = get_args(tp)[:1] or (Any,)
        return [coerce(v, item, f"{where}[{i}]", text) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if text and isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value


def _hints(cls) -> dict:
    return get_type_hints(cls)


def known_fields(cls, d: dict, what: str | None = None) -> dict:
    """``d`` if every key is a field of dataclass ``cls``; else ValueError naming the unknown ones."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{what or cls.__name__}: unknown field(s) {sorted(unknown)}")
    return d


def _did_you_mean(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def from_dict(cls, d: dict, where: str = ""):
    """Build dataclass ``cls`` from ``d``; unknown keys are errors naming the field."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        key = f"{where}.{k}" if where else k
        if k not in names:
            raise UsageError(f"unknown field {key!r} (known: {', '.join(sorted(names))}){_did_you_mean(k, names)}")
        kwargs[k] = coerce(v, hints[k], key, text=False)
    return cls(**kwargs)


def set_path(obj, dotted: str, value: Any) -> None:
    """Set ``obj.a.b = value`` for ``dotted = "a.b"``, coercing to the field's type."""
    parts = dotted.split(".")
    target = obj
    for i, p in enumerate(parts):
        if isinstance(target, dict):  # a free-form table (train.model): merge the key ("attn.n_head" stays dotted)
            key = ".".join(parts[i:])
            try:
                target[key] = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                target[key] = value  # a bare string
            return
        if not dataclasses.is_dataclass(target):
            raise UsageError(f"unknown field {dotted!r}: {'.'.join(parts[:i])} is not a table")
        names = {f.name for f in dataclasses.fields(target)}
        if p not in names:
            where = ".".join(parts[:i]) or "the config"
            raise UsageError(f"unknown field {dotted!r} ({where} has: {', '.join(sorted(names))})"
                             f"{_did_you_mean(p, names)}")
        if i == len(parts) - 1:
            tp = _hints(type(target))[p]
            setattr(target, p, coerce(value, tp, dotted))
        else:
            target = getattr(target, p)


def apply_overrides(obj, overrides: list[str] | dict | None):
    """Apply ``["a.b=1", ...]`` (or ``{"a.b": 1}``) to dataclass ``obj`` in place."""
    if not overrides:
        return obj
    items = overrides.items() if isinstance(overrides, dict) else []
    if not isinstance(overrides, dict):
        items = []
        for o in overrides:
            if "=" not in o:
                raise UsageError(f"--set {o!r}: expected KEY=VALUE in one argument, e.g. --set "
                                 f"{o or 'train.max_time'}=VALUE")
            k, v = o.split("=", 1)
            items.append((k.strip(), v.strip()))
    for k, v in items:
        set_path(obj, k, v)
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def load_file(path: str | Path) -> dict:
    """Read a JSON or TOML config file into a dict, with errors naming the file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such config file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib

            return tomllib.loads(text)
        return json.loads(text)
    except Exception as e:
        raise ValueError(f"{p}: not a valid {'TOML' if p.suffix == '.toml' else 'JSON'} file: {e}") from None
