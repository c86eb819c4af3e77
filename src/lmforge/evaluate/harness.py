"""Runs tasks on an ``LM`` and returns the result object: scores, intervals, gaps, per-sample logs.

Knows the order of an evaluation: for each task, build its requests (``task``), send them to
the model in one call per request kind (``lm.LM.run``; the model batches), score every document
(``metrics``), bootstrap every metric over documents, and write one JSONL line per document
(atomically, one file per task). With ``split="both"`` it also scores the public dev split and
reports the private-minus-dev gap with its interval (the Goodhart guard); with ``dirty`` it
scores the clean subset too (contamination). pass@k programs (prompt + completion + test) run
in ``sandbox.run_python`` (imported when a code task runs).

Knows nothing of how a model computes its answers, how documents are generated, how
contamination is detected, or how a result is rendered (``report``).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import metrics as M
from .task import Task, TaskError, load_tasks

__all__ = ["evaluate", "score_split", "RESULT_VERSION"]

RESULT_VERSION = 1
_SPLITS = ("test", "dev", "both")


def _seed(seed: int, *parts) -> list[int]:
    return [int(seed)] + [zlib.crc32(str(p).encode()) for p in parts]


def _sandbox_runner(code_cfg: dict, allow_network: bool = False):
    """``run(programs) -> [(passed, status)]`` through ``sandbox.run_python(code, limits)``: limits from the
    task's ``code`` field (``timeout_s`` -> wall-clock and CPU seconds, ``memory_mb``), two programs at a time.
    A sandbox that refuses to run (no namespaces, ``SandboxUnavailable``) raises: that is no sample's fault."""
    from . import sandbox  # another helper's module (eval-sandbox)

    t = float(code_cfg.get("timeout_s", 10))
    want = {"wall_s": t, "cpu_s": t}
    if "memory_mb" in code_cfg:
        want["memory_mb"] = int(code_cfg["memory_mb"])
    cls = getattr(sandbox, "Limits", None)
    limits = cls(**want) if cls is not None else want
    kw = {"allow_network": True} if allow_network else {}

    def one(program: str):
        o = sandbox.run_python(program, limits, **kw)
        return bool(o.passed), str(getattr(o, "status", "passed" if o.passed else "failed"))

    def run(programs: list[str]) -> list[tuple[bool, str]]:
        if len(programs) > 1:
            with ThreadPoolExecutor(max_workers=2) as ex:
                return list(ex.map(one, programs))
        return [one(p) for p in programs]

    return run


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)


def _dumps(obj) -> str:
    """One JSON line; non-finite numbers become null, other objects their str (the slow path only then)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, default=_np_default)
    except (ValueError, TypeError):
        return json.dumps(_jsonable(obj), ensure_ascii=False, allow_nan=False)


def _np_default(x):
    if isinstance(x, (np.floating, np.integer)) and np.isfinite(x):
        return x.item()
    raise TypeError(type(x).__name__)


def _per_doc(task: Task, dr, answers: list, lm, pass_cache: dict) -> tuple[dict, dict]:
    """(metric -> per-document value or (loglik, count) pair, log fields) of one document."""
    wanted = [m for m, _ in task.metrics]
    opts = dict(task.metrics)
    ot = task.output_type
    vals: dict = {}
    log: dict = {"responses": None, "filtered": None}
    if ot == "multiple_choice":
        lls = [float(a[0]) for a in answers]
        greedy = [bool(a[1]) for a in answers]
        s = M.mc_scores(lls, dr.choices, dr.target, greedy)
        vals = {m: s[m] for m in wanted}
        log["responses"] = [[ll, g] for ll, g in zip(lls, greedy)]
    elif ot == "loglikelihood":
        ll, g = float(answers[0][0]), bool(answers[0][1])
        for m in wanted:
            vals[m] = (ll, 1.0) if m == "perplexity" else float(g)
        log["responses"] = [[ll, g]]
    elif ot == "loglikelihood_rolling":
        ll = float(answers[0])
        text = dr.prompt
        for m in wanted:
            if m == "word_perplexity":
                vals[m] = (ll, float(M.count_words(text)))
            elif m in ("byte_perplexity", "bits_per_byte"):
                vals[m] = (ll, float(M.count_bytes(text)))
            elif m == "perplexity":
                vals[m] = (ll, float(lm.count_tokens(text)))  # checked before the model ran
        log["responses"] = [ll]
    else:  # generate_until
        resps = [a if isinstance(a, str) else "" for a in answers]
        log["responses"] = resps
        filtered_all = {}
        for fi, (fname, steps) in enumerate(task.filters or [("none", [])]):
            filt = M.apply_filters(resps, steps)
            filtered_all[fname] = filt
            suffix = "" if fi == 0 else f",{fname}"
            as_list = [filt] if isinstance(filt, str) else list(filt)
            for m in wanted:
                k = M.pass_at_k_k(m)
                if k is None:  # exact_match on the (first) filtered answer, as lm-eval
                    pred = as_list[0] if as_list else ""
                    vals[m + suffix] = M.exact_match(pred, dr.target, **opts[m])
                else:
                    if fi != 0:
                        continue
                    keys = [(dr.doc_id, comp) for comp in as_list]
                    for key in keys:
                        pass_cache.setdefault(key, None)  # run in the sandbox after every document is read
                    vals[m] = ("pass", k, len(as_list), keys)
        first = next(iter(filtered_all.values()))
        log["filtered"] = [first] if isinstance(first, str) else list(first)
        if len(filtered_all) > 1:
            log["filtered_by"] = {k: ([v] if isinstance(v, str) else list(v)) for k, v in filtered_all.items()}
    return vals, log


def _program(task: Task, doc: dict, completion: str) -> str:
    code = task.code or {}
    pf = code.get("prompt_field")
    prompt = str(doc[pf]) if pf else str(task.text(doc))
    return prompt + completion + "\n" + str(doc[code.get("test_field", "test")])


def score_split(lm, task: Task, split: str, *, limit=None, num_fewshot=None, data_dir=None,
                bootstrap: int = 1000, seed: int = 0, dirty=None, check_dirty: bool = False,
                allow_network: bool = False, apply_chat_template: bool = False) -> dict:
    """Scores one split of one task. Returns ``{"split", "n", "metrics", "omitted", "reps",
    "random_baseline", "truncated", "skipped", "lines", "contamination"?}`` (``reps``: the
    bootstrap replicates of each metric, for gaps and the aggregate)."""
    if task.output_type == "loglikelihood_rolling" and any(m == "perplexity" for m, _ in task.metrics) \
            and not callable(getattr(lm, "count_tokens", None)):
        raise TaskError(f"{task.source}: task {task.name!r}: metric 'perplexity' of a rolling task is per token, and "
                        f"{getattr(lm, 'name', 'the model')} has no count_tokens(text); use word_perplexity, "
                        "byte_perplexity or bits_per_byte")
    chat = lm.apply_chat_template if apply_chat_template else None
    drs = task.requests(split, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir, chat=chat)
    stats = getattr(lm, "stats", None) or {}
    t0 = int(stats.get("truncated", 0))
    reqs = [r for dr in drs for r in dr.requests]
    answers = lm.run(reqs) if reqs else []
    answered = sum(a is not None for a in answers)
    if len(answers) != len(reqs) or answered != len(reqs):
        raise RuntimeError(f"task {task.name!r}: the model answered {answered} of {len(reqs)} requests")
    truncated = int((getattr(lm, "stats", None) or {}).get("truncated", 0)) - t0
    per_doc, logs, pos = [], [], 0
    pass_cache: dict = {}
    for dr in drs:
        a = answers[pos:pos + len(dr.requests)]
        pos += len(dr.requests)
        v, lg = _per_doc(task, dr, a, lm, pass_cache)
        per_doc.append(v)
        logs.append(lg)

    # pass@k: run every distinct (document, completion) program in the sandbox, a few at a time
    sandbox_status: dict = {}
    status_of: dict = {}
    if pass_cache:
        run = _sandbox_runner(task.code or {}, allow_network)
        keys = list(pass_cache)
        programs = [_program(task, drs[d].doc, comp) for d, comp in keys]
        for key, (ok, status) in zip(keys, run(programs)):
            pass_cache[key] = ok
            status_of[key] = status
            sandbox_status[status] = sandbox_status.get(status, 0) + 1
    omitted = {}
    for m, _ in task.metrics:
        k = M.pass_at_k_k(m)
        if k is None:
            continue
        ns = [v[m][2] for v in per_doc]
        short = [i for i, n in enumerate(ns) if n < k]
        if short:
            omitted[m] = (f"{m} needs n >= {k} samples per problem; {len(short)} of {len(ns)} problems have "
                          f"fewer (min n = {min(ns)}; raise repeats)")
        for i, v in enumerate(per_doc):
            _, kk, n, keys = v[m]
            c = sum(bool(pass_cache[key]) for key in keys)
            logs[i].setdefault("passed", [bool(pass_cache[key]) for key in keys])
            logs[i].setdefault("status", [status_of[key] for key in keys])
            v[m] = None if m in omitted else M.pass_at_k(n, c, kk)

    names = [] if not per_doc else [k for k in per_doc[0]]
    summaries, reps = {}, {}
    for m in names:
        if m in omitted:
            continue
        agg = M.aggregate(m, [v[m] for v in per_doc])
        summaries[m], reps[m] = M.summarize(agg, bootstrap, _seed(seed, task.name, split, m))
    for m in (mm for mm, _ in task.metrics):  # no documents: the metric is there, without a value
        if m not in summaries and m not in omitted:
            summaries[m], reps[m] = {"value": None, "ci": None, "stderr": None, "n": 0}, np.zeros(0)

    rb = task.random_baseline
    if rb is None and task.output_type == "multiple_choice" and drs:
        rb = float(np.mean([1.0 / len(dr.choices) for dr in drs]))
    elif rb is None and task.output_type == "generate_until":
        rb = 0.0

    lines = []
    for dr, v, lg in zip(drs, per_doc, logs):
        line = {"doc_id": dr.doc_id, "split": split, "doc": dr.doc, "prompt": dr.prompt, "target": dr.target,
                "requests": [list(r.args) for r in dr.requests], "responses": lg["responses"],
                "filtered": lg["filtered"], "metrics": {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
                "truncated": False if truncated == 0 else None}
        if "passed" in lg:
            line["passed"], line["status"] = lg["passed"], lg["status"]
        if "filtered_by" in lg:
            line["filtered_by"] = lg["filtered_by"]
        lines.append(line)
    out = {"split": split, "n": len(drs), "metrics": summaries, "omitted": omitted, "reps": reps, "sandbox": sandbox_status,
           "random_baseline": rb, "truncated": truncated, "skipped": int(task.skipped.get(split, 0)), "lines": lines}

    if check_dirty and dirty is not None:
        texts = [task.decontamination_text(dr.doc) for dr in drs]
        flags = list(dirty(task.name, texts))
        if len(flags) != len(texts):
            raise ValueError(f"dirty({task.name!r}, ...) returned {len(flags)} flags for {len(texts)} documents")
        flags = [bool(f) for f in flags]
        clean_idx = [i for i, f in enumerate(flags) if not f]
        mc = {}
        for m in names:
            if m in omitted:
                continue
            agg = M.aggregate(m, [per_doc[i][m] for i in clean_idx])
            mc[m], _ = M.summarize(agg, bootstrap, _seed(seed, task.name, split, m, "clean"))
        out["contamination"] = {"clean": len(clean_idx), "dirty": len(flags) - len(clean_idx), "metrics_clean": mc}
        for line, f in zip(lines, flags):
            line["dirty"] = f
    return out


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "task"


def _check_args(lm, split, bootstrap, limit, num_fewshot, dirty):
    if split not in _SPLITS:
        raise ValueError(f"split: {split!r}; expected one of {', '.join(_SPLITS)}")
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap: expected an integer >= 0 (replicates; 0 = no intervals), got {bootstrap!r}")
    if limit is not None:
        ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0) or \
             (isinstance(limit, float) and 0 < limit < 1)
        if not ok:
            raise ValueError(f"limit: expected a positive integer (documents) or a fraction in (0, 1), got {limit!r}")
    if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise ValueError(f"num_fewshot: expected an integer >= 0, got {num_fewshot!r}")
    if dirty is not None and not callable(dirty):
        raise ValueError("dirty: expected a callable(task_name, doc_texts) -> list[bool]")
    if not callable(getattr(lm, "run", None)):
        raise ValueError(f"lm: expected an lmforge.evaluate.lm.LM (with run()), got {type(lm).__name__}")


def evaluate(lm, tasks, *, limit=None, num_fewshot=None, split: str = "test", bootstrap: int = 1000,
             seed: int = 0, samples_dir=None, data_dir=None, dirty=None, progress: bool = True,
             allow_network: bool = False, apply_chat_template: bool = False) -> dict:
    """Scores ``tasks`` (Task objects, names or paths; see ``task.load_tasks``) on ``lm``; returns the
    result object (schema: ``lmforge_eval`` 1). ``split``: "test" (each task's test_split), "dev"
    (its validation_split) or "both" (test, plus "dev" and the test-minus-dev "gap" for every task
    that has a validation split other than its test split; the others report test alone).
    ``samples_dir``: one ``<task>.jsonl`` per task (its path in the result is relative to the
    folder that holds ``samples_dir``). ``dirty(task_name, doc_texts) -> [bool]``: adds the
    "contamination" entry for the reported split. ``allow_network``: pass@k programs run even where the
    sandbox has no network namespace (its opt-in; otherwise it refuses and the error propagates).
    ``apply_chat_template``: every prompt rendered by ``lm.apply_chat_template`` as lm-eval's
    ``--apply_chat_template`` renders it (examples and question in one user turn)."""
    _check_args(lm, split, bootstrap, limit, num_fewshot, dirty)
    t_start = time.perf_counter()
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    loaded: list[Task] = []
    for t in tasks:
        loaded.extend([t] if isinstance(t, Task) else load_tasks([t]))
    seen = set()
    for t in loaded:
        if t.name in seen:
            raise ValueError(f"task {t.name!r} given twice")
        seen.add(t.name)
    result_tasks: dict = {}
    centered_by, reps_by = {}, {}
    it = loaded
    if progress:
        from .._progress import bar
        it = bar(loaded, desc="eval", unit="task")
    for task in it:
        if progress and hasattr(it, "set_postfix_str"):
            it.set_postfix_str(task.name)
        main_split = task.split_for("dev" if split == "dev" else "test")
        main = score_split(lm, task, main_split, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir,
                           bootstrap=bootstrap, seed=seed, dirty=dirty, check_dirty=True, allow_network=allow_network,
                           apply_chat_template=apply_chat_template)
        primary = task.primary_metric
        pval = (main["metrics"].get(primary) or {}).get("value")
        rb = main["random_baseline"]
        cen = M.centered(primary, pval, rb)
        entry = {"output_type": task.output_type, "split": main_split, "n": main["n"], "primary": primary,
                 "metrics": main["metrics"], "random_baseline": rb, "centered": cen}
        if main["omitted"]:
            entry["omitted"] = main["omitted"]
        if main["sandbox"]:  # how the programs ended: {"passed": 40, "failed": 55, "timeout": 5}
            entry["sandbox"] = main["sandbox"]
        lines = main["lines"]
        dev_split = task.validation_split
        if split == "both" and dev_split is not None and dev_split != main_split:
            dev = score_split(lm, task, dev_split, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir,
                              bootstrap=bootstrap, seed=seed + 1, allow_network=allow_network,
                              apply_chat_template=apply_chat_template)
            entry["dev"] = {"split": dev_split, "n": dev["n"], "metrics": dev["metrics"]}
            if dev["omitted"]:
                entry["dev"]["omitted"] = dev["omitted"]
            entry["dev"]["truncated"] = dev["truncated"]
            entry["gap"] = {m: M.difference(main["metrics"][m], main["reps"][m], dev["metrics"][m], dev["reps"][m])
                            for m in main["metrics"] if m in dev["metrics"]}
            lines = lines + dev["lines"]
        if "contamination" in main:
            entry["contamination"] = main["contamination"]
        entry["truncated"] = main["truncated"]
        entry["skipped"] = main["skipped"]
        entry["samples"] = None
        if samples_dir is not None:
            sd = Path(samples_dir)
            path = sd / f"{_safe_name(task.name)}.jsonl"
            from .._io import atomic_open
            with atomic_open(path, "w") as f:
                for line in lines:
                    f.write(_dumps(line) + "\n")
            entry["samples"] = f"{sd.name}/{path.name}"
        result_tasks[task.name] = entry
        centered_by[task.name] = cen
        r = main["reps"].get(primary)
        if cen is not None and r is not None and len(r):
            reps_by[task.name] = (r - rb) / (1.0 - rb)
    params = getattr(lm, "params", None)
    result = {
        "lmforge_eval": RESULT_VERSION,
        "model": {"name": getattr(lm, "name", type(lm).__name__), "checkpoint": _jsonable(getattr(lm, "checkpoint", None)),
                  "params": int(params) if isinstance(params, (int, np.integer)) else params},
        "settings": {"tasks": [t.name for t in loaded], "limit": limit, "num_fewshot": num_fewshot,
                     "bootstrap": bootstrap, "seed": seed, "split": split,
                     **({"apply_chat_template": True} if apply_chat_template else {})},
        "tasks": result_tasks,
        "aggregate": {"core": M.core(centered_by, reps_by)},
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }
    return _jsonable(result)
