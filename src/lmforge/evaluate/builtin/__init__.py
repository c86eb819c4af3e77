"""The built-in tasks: their documents, made on demand, with a public dev split and a private test split.

Knows every built-in generator (``GENERATORS``), how many documents each gives by default, and the
YAML definitions shipped beside it (``evaluate/tasks/*.yaml``: prompts, metrics, few-shot); knows
nothing of models or scoring (``task`` turns a definition and these documents into requests).

``generate(name, split, n=None, data_dir=None, **kwargs)`` returns the documents of one split:

* ``"train"``: few-shot examples (and, later, SFT data), from a fixed public seed;
* ``"dev"``: the public split, from another fixed seed: tune on it;
* ``"private"``: the reported split, from a seed made on this machine at first use and never
  committed (see ``splits``: the Goodhart guard; ``fingerprint("private")`` names it in results).

Items of two splits never coincide (a hash of an item's content decides its split). ``n=None``
gives the generator's default (``default_n``); ``kwargs`` are the generator's own arguments
(``digits=4``, ``kind="numbers"``...), part of what the seeded stream depends on. Corpus tasks
(``CORPUS``) need ``data_dir``, a ``lmforge data prepare`` output: they read its test split only.

``names()`` lists the tasks defined in the YAML files (a generator can back several, e.g. ``sort``
and ``sort_numbers``); ``task_path(name)`` is a task's YAML file; ``DEFAULT_TASKS`` is the small
set the pipeline's eval stage runs, sized for about 30 s on two cores (dev and private together:
about 100k scored tokens; measured: 84 s for the demo's 0.8M-parameter model on two cores shared
with a load of 7, so roughly 25 s on idle ones).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from . import corpus, programs, synthetic
from .splits import SPLITS, check_split, fingerprint, private_seed, rng, seed_path

__all__ = ["generate", "names", "task_path", "tasks_dir", "DEFAULT_TASKS", "GENERATORS", "CORPUS", "SPLITS",
           "default_n", "fingerprint", "private_seed", "seed_path"]

GENERATORS = {
    "next_line": corpus.next_line,
    "speaker": corpus.speaker,
    "cloze": corpus.cloze,
    "addition": synthetic.addition,
    "subtraction": synthetic.subtraction,
    "letter_count": synthetic.letter_count,
    "reverse": synthetic.reverse,
    "sort": synthetic.sort,
    "brackets": synthetic.brackets,
    "python": programs.python,
}
CORPUS = ("next_line", "speaker", "cloze")
_DEFAULT_N = {"next_line": 150, "speaker": 150, "cloze": 200, "python": 50}
# the pipeline's set: cloze and next_line move for a small model trained on the plays, brackets and
# addition are there for fine-tuning to move (speaker, the costliest per document, is left out)
DEFAULT_TASKS = ["cloze", "next_line", "brackets", "addition"]


def default_n(name: str) -> int:
    _check_name(name)
    return _DEFAULT_N.get(name, 100)


def _check_name(name: str) -> None:
    if name not in GENERATORS:
        raise ValueError(f"unknown built-in generator {name!r}; known: {', '.join(GENERATORS)}")


def _arguments(name: str, kwargs: dict) -> dict:
    """The generator's own arguments, defaults filled in (what its seeded stream depends on: passing a
    default explicitly draws the same items as leaving it out)."""
    sig = inspect.signature(GENERATORS[name])
    allowed = [p for p in sig.parameters if p not in ("split", "n", "r", "data_dir")]
    bad = [k for k in kwargs if k not in allowed]
    if bad:
        raise ValueError(f"built-in generator {name!r}: unknown argument(s) {', '.join(map(repr, bad))}; "
                         f"it takes {', '.join(allowed) or 'none'}")
    for k, v in kwargs.items():
        if not isinstance(v, (int, float, str, bool)):
            raise ValueError(f"built-in generator {name!r}: argument {k}={v!r} must be a number, string or bool")
    return {p: kwargs.get(p, sig.parameters[p].default) for p in allowed}


def generate(name: str, split: str, n: int | None = None, data_dir=None, **kwargs) -> list[dict]:
    """The documents of built-in generator ``name`` for ``split`` (``train``, ``dev`` or ``private``)."""
    _check_name(name)
    check_split(split)
    args = _arguments(name, kwargs)
    if n is None:
        n = default_n(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"built-in generator {name!r}: n must be a non-negative integer, got {n!r}")
    salt = json.dumps(args, sort_keys=True)
    r = rng(name, split, salt)
    fn = GENERATORS[name]
    if name in CORPUS:
        return fn(split, n, r, data_dir=data_dir, **args)
    return fn(split, n, r, **args)  # synthetic: reads no data (a harness may pass data_dir to every task)


def tasks_dir() -> Path:
    """The folder of the built-in task definitions (package data)."""
    return Path(__file__).resolve().parent.parent / "tasks"


def names() -> list[str]:
    """The built-in tasks: the YAML definitions in ``tasks_dir()``, by name."""
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def task_path(name: str) -> Path:
    p = tasks_dir() / f"{name}.yaml"
    if not p.exists():
        raise ValueError(f"unknown built-in task {name!r}; known: {', '.join(names())}")
    return p
