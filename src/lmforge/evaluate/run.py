"""Evaluate a model directory on tasks and write its report: what ``lmforge eval --tasks`` and the
pipeline's eval stage call (``evaluate_checkpoint``).

Knows the defaults a run gives (its data directory from the train_config.json beside the checkpoint,
the report beside a pipeline run's ``model/``), the ``--tasks`` shorthands (``default``, ``all``) and
how a report replaces an earlier one without losing it on a failure; knows nothing of how tasks are
scored (``harness``), rendered (``report``) or parsed from a command line (``_cli``).
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["evaluate_checkpoint", "task_names", "default_out", "run_data_dir", "TASK_SPLITS"]

TASK_SPLITS = ("test", "dev", "both")


def _usage(msg: str):
    from .._config import UsageError

    return UsageError(msg)


def run_data_dir(checkpoint) -> str | None:
    """The shards a checkpoint was trained on, from its train_config.json (None when there is none; an SFT
    run's: its ``data_dir``, else its base model's). A
    relative path there is relative to where training ran; when it is not found from here, the run's
    own ``data/`` beside the checkpoint (a pipeline run: <run>/model, <run>/data) is taken if it exists."""
    tc = Path(checkpoint) / "train_config.json"
    if not tc.exists():
        return None
    rec = json.loads(tc.read_text())
    if "sft" in rec and "train" not in rec:  # an SFT run: its data_dir, else the data of the model it tuned
        s = rec["sft"]
        if s.get("data_dir"):
            data = s["data_dir"]
        else:
            return run_data_dir(s["base"]) if s.get("base") and Path(s["base"]).is_dir() else None
    else:
        data = rec["train"]["data"] or str(Path(checkpoint) / "data")
    if not Path(data).exists() and not Path(data).is_absolute() and (Path(checkpoint).parent / "data").is_dir():
        return str(Path(checkpoint).parent / "data")
    return data


def task_names(spec: str, include_path: str | None = None) -> list[str]:
    """``--tasks``: a comma-separated list of names or paths; ``default`` is the built-in default set,
    ``all`` every built-in task and every task in ``include_path``. Order kept, duplicates dropped."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part == "default":
            from . import builtin

            names += list(builtin.DEFAULT_TASKS)
        elif part == "all":
            from . import builtin

            names += list(builtin.names())
            if include_path:
                from .task import load_task

                names += [t.name for t in load_task(include_path)]
        else:
            names.append(part)
    if not names:
        raise _usage(f"--tasks {spec!r}: no task named (give names separated by commas, 'default' or 'all'; "
                     "`lmforge eval tasks` lists them)")
    return list(dict.fromkeys(names))


def default_out(checkpoint) -> Path:
    """Where the report goes without --out: ``<run>/eval`` for a pipeline run's ``model/`` (a run.json
    beside it), else ``./eval-<checkpoint directory's name>``."""
    ck = Path(checkpoint).resolve()
    if (ck.parent / "run.json").exists():
        return ck.parent / "eval"
    return Path.cwd() / f"eval-{ck.name}"


def evaluate_checkpoint(checkpoint, tasks: list[str], *, include_path=None, limit=None, num_fewshot=None,
                        split="test", bootstrap=1000, seed=0, data_dir=None, decontaminate=False, out=None,
                        batch_size=None, progress=True, allow_network=False, sandbox_workers=2,
                        apply_chat_template=False) -> tuple[dict, dict]:
    """Score ``tasks`` (names or paths) on the model in ``checkpoint`` and write the report into ``out``
    (default: ``default_out``). Returns (result, {what: path}). What ``lmforge eval --tasks`` and the
    pipeline's eval stage call. ``data_dir`` (default: the run's own) is where corpus tasks draw their
    documents and, with ``decontaminate``, whose training shards documents are checked against.
    ``allow_network``, ``sandbox_workers``: the pass@k sandbox's opt-in where it cannot isolate
    programs from the network and filesystem, and how many programs run at once. ``apply_chat_template``:
    every prompt rendered as one user turn of the model's chat template (lm-eval's
    ``--apply_chat_template``), for a chat (SFT) model."""
    import time

    from . import harness, report
    from .local import LocalLM
    from .task import load_tasks

    if split not in TASK_SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(TASK_SPLITS)}")
    if data_dir is None:
        data_dir = run_data_dir(checkpoint)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data {data_dir}: no such directory (the run's shards: corpus tasks draw their "
                                "documents from its test split)")
    loaded = load_tasks(tasks, include_path=include_path)
    if isinstance(limit, int):
        _cap_generators(loaded, limit, num_fewshot)
    if data_dir is None:
        from . import builtin

        corpus = [t.name for t in loaded if (t.config or {}).get("generator") in builtin.CORPUS]
        if corpus:
            raise ValueError(f"task(s) {', '.join(corpus)} draw their documents from the test split of a run's data: "
                             "give --data DIR (a `lmforge data prepare` output; no train_config.json next to the "
                             "checkpoint names one)")
    dirty = None
    if decontaminate:
        if data_dir is None:
            raise ValueError("--decontaminate checks task documents against a run's training shards: give --data "
                             "DIR (no train_config.json next to the checkpoint names them)")
        from .contamination import NgramIndex

        t0 = time.perf_counter()
        index = NgramIndex.from_shards(data_dir)
        import logging

        logging.getLogger("lmforge.evaluate").info(
            f"contamination: 13-gram index of {data_dir}'s training shards in {time.perf_counter() - t0:.1f}s")

        def dirty(task_name, texts, _index=index):
            return _index.dirty(texts)
    out = Path(out) if out is not None else default_out(checkpoint)
    lm = LocalLM.from_checkpoint(checkpoint, batch_size=batch_size)
    # per-sample logs go to a fresh folder that replaces samples/ only once every task is scored: a failed
    # or interrupted evaluation leaves an earlier report in ``out`` as it was
    import os
    import shutil

    tmp = out / f".samples-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        result = harness.evaluate(lm, loaded, limit=limit, num_fewshot=num_fewshot, split=split,
                                  bootstrap=bootstrap, seed=seed, samples_dir=tmp, data_dir=data_dir, dirty=dirty,
                                  progress=progress, allow_network=allow_network, sandbox_workers=sandbox_workers,
                                  apply_chat_template=apply_chat_template)
        for t in result.get("tasks", {}).values():
            if isinstance(t.get("samples"), str) and t["samples"].startswith(tmp.name + "/"):
                t["samples"] = "samples/" + t["samples"][len(tmp.name) + 1:]
        old = out / f".samples-old-{os.getpid()}"
        if (out / "samples").exists():
            (out / "samples").rename(old)
        if tmp.exists():
            tmp.rename(out / "samples")
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    model = result.setdefault("model", {})
    model["checkpoint"] = str(checkpoint)
    if model.get("name") in (None, "", LocalLM.name):  # the run's name: <run>/model -> <run>
        ck = Path(checkpoint).resolve()
        model["name"] = ck.parent.name if ck.name == "model" else ck.name
    if not model.get("params"):
        model["params"] = sum(p.numel() for p in lm.model.parameters())
    _relative_samples(result, out)
    return result, report.write(result, out)


def _cap_generators(loaded, limit: int, num_fewshot) -> None:
    """With a limit, a built-in generator is asked for only as many documents as are scored (and few-shot
    needs), not its default n: a small corpus (a test split of one play) then still gives them. The
    harness's limit alone would generate the default n first and fail where the corpus has fewer."""
    from . import builtin

    for t in loaded:
        cfg = t.config or {}
        gen, gk = cfg.get("generator"), dict(cfg.get("generator_kwargs") or {})
        if gen not in builtin.GENERATORS or "n" in gk:
            continue
        k = t.num_fewshot if num_fewshot is None else num_fewshot
        n = max(limit, (k or 0) + 1)
        if n < builtin.default_n(gen):
            t.config = {**cfg, "generator_kwargs": {**gk, "n": n}}


def _relative_samples(result: dict, out: Path) -> None:
    """Per-sample log paths relative to the report directory (so the directory can move)."""
    for t in result.get("tasks", {}).values():
        s = t.get("samples")
        if isinstance(s, str):
            p = Path(s)
            try:
                t["samples"] = p.resolve().relative_to(out.resolve()).as_posix() if p.is_absolute() else s
            except ValueError:
                pass
