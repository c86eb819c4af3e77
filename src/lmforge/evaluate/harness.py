"""Runs tasks on an ``LM`` and returns the result object: scores, intervals, gaps, per-sample logs.

Knows the order of an evaluation: for each task, build its requests (``task``), send them to
the model in one call per request kind (``lm.LM.run``; the model batches), score every document
(``metrics``), bootstrap every metric over documents, and write one JSONL line per document
(atomically, one file per task). With ``split="both"`` it also scores the public dev split and
reports the private-minus-dev gap with its interval (the Goodhart guard); with ``dirty`` it
scores the clean subset too (contamination). pass@k programs (prompt + completion + test) run
through ``sandbox.run_many`` (imported when a code task runs), under the limits the task's ``code``
field names; a program passes only if it exits 0 after printing a marker placed after its tests
(an ``exit()`` in a completion is ``exited_early``, a failure). A task's ``bootstrap_unit``
(document fields naming a cluster, e.g. the stretch of a play that corpus items come from) makes
every interval resample clusters instead of documents: each metric's, the dev/private gap's (each
split resampled by its own clusters) and the CORE aggregate's (tasks with the same unit share one
draw of clusters, so tasks drawn from the same stretches move together). A built-in task's entry
names its split by ``builtin.fingerprint`` (never the seed).

Knows nothing of how a model computes its answers, how documents are generated, how
contamination is detected, or how a result is rendered (``report``).
"""
from __future__ import annotations

import json
import math
import re
import secrets
import time
import zlib
from pathlib import Path

import numpy as np

from . import metrics as M
from .task import Task, TaskError, load_tasks

__all__ = ["evaluate", "score_split", "RESULT_VERSION"]

RESULT_VERSION = 1
_SPLITS = ("test", "dev", "both")


def _seed(seed: int, *parts) -> list[int]:
    return [int(seed)] + [zlib.crc32(str(p).encode()) for p in parts]


def sandbox_limits(code_cfg: dict):
    """The ``sandbox.Limits`` a task's ``code`` field names: ``timeout_s`` is the wall-clock limit
    (``wall_s``) and, unless ``cpu_s`` is given, the CPU limit too; every other ``Limits`` field it
    names passes as it is; the rest keep ``Limits``' defaults. A bad value is a ValueError naming it."""
    from . import sandbox

    code_cfg = code_cfg or {}
    want = {k: code_cfg[k] for k in ("wall_s", "cpu_s", "memory_mb", "fsize_mb", "nproc", "nofile", "output_bytes")
            if k in code_cfg}
    if "timeout_s" in code_cfg:
        t = float(code_cfg["timeout_s"])
        want.setdefault("wall_s", t)
        want.setdefault("cpu_s", t)
    elif "wall_s" in want:
        want.setdefault("cpu_s", float(want["wall_s"]))
    try:
        return sandbox.Limits(**want)
    except (TypeError, ValueError) as e:
        raise ValueError(f"code: {e}") from None


def _sandbox_check(task: Task, allow_network: bool) -> None:
    """Refuses a pass@k task before the model generates anything when the sandbox would refuse its
    programs (no namespaces here and no ``allow_network``), with the reason and the way out."""
    from . import sandbox

    why = sandbox.network_isolation()
    if why is not None and not allow_network:
        raise sandbox.SandboxUnavailable(
            f"{task.source}: task {task.name!r}: pass@k runs the generated programs, and the sandbox cannot "
            f"isolate them here: {why}. Pass allow_network=True (lmforge eval: --allow-network) to run them with "
            "only resource limits, a throwaway directory and an empty environment, or leave this task out")


def _sandbox_runner(task: Task, allow_network: bool = False, workers: int = 2):
    """``run(programs) -> [(passed, status)]`` through ``sandbox.run_many`` (``workers`` at a time) under
    the task's limits (``sandbox_limits``). Every program ends by printing a marker made for this run
    (after its tests): a program that exits 0 without printing it (an ``exit()`` in the completion, before
    the tests ran) is ``exited_early``, a failure, not a pass. ``SandboxUnavailable`` propagates, naming
    the task: that is no sample's fault."""
    from . import sandbox

    limits = sandbox_limits(task.code)
    marker = f"lmforge-tests-done-{secrets.token_hex(8)}"

    def run(programs: list[str]) -> list[tuple[bool, str]]:
        code = [p + f"\nprint({marker!r})\n" for p in programs]
        try:
            outs = sandbox.run_many(code, limits, workers=workers, allow_network=allow_network)
        except sandbox.SandboxUnavailable as e:
            raise sandbox.SandboxUnavailable(f"task {task.name!r}: {e}") from None
        res = []
        for o in outs:
            status = str(getattr(o, "status", "passed" if o.passed else "failed"))
            if o.passed and marker not in (getattr(o, "stdout", "") or ""):
                res.append((False, "exited_early"))
            else:
                res.append((bool(o.passed), status))
        return res

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
                allow_network: bool = False, apply_chat_template: bool = False, sandbox_workers: int = 2) -> dict:
    """Scores one split of one task. Returns ``{"split", "n", "metrics", "omitted", "reps", "aggs",
    "units", "clusters", "random_baseline", "truncated", "skipped", "lines", "contamination"?}``
    (``reps``: the bootstrap replicates of each metric, for gaps and the aggregate; ``aggs``: the
    per-document values behind them; ``units``: each document's bootstrap cluster key, or None when the
    task resamples documents; ``clusters``: how many distinct ones)."""
    if task.output_type == "loglikelihood_rolling" and any(m == "perplexity" for m, _ in task.metrics) \
            and not callable(getattr(lm, "count_tokens", None)):
        raise TaskError(f"{task.source}: task {task.name!r}: metric 'perplexity' of a rolling task is per token, and "
                        f"{getattr(lm, 'name', 'the model')} has no count_tokens(text); use word_perplexity, "
                        "byte_perplexity or bits_per_byte")
    if any(M.pass_at_k_k(m) is not None for m, _ in task.metrics):
        sandbox_limits(task.code)  # a bad limit, before the model runs
        _sandbox_check(task, allow_network)
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
        run = _sandbox_runner(task, allow_network, sandbox_workers)
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

    units = None if task.bootstrap_unit is None else [task.unit(dr.doc) for dr in drs]
    clusters = None if units is None else M.cluster_ids(units)
    names = [] if not per_doc else [k for k in per_doc[0]]
    summaries, reps, aggs = {}, {}, {}
    for m in names:
        if m in omitted:
            continue
        aggs[m] = agg = M.aggregate(m, [v[m] for v in per_doc])
        summaries[m], reps[m] = M.summarize(agg, bootstrap, _seed(seed, task.name, split, m), clusters=clusters)
    for m in (mm for mm, _ in task.metrics):  # no documents: the metric is there, without a value
        if m not in summaries and m not in omitted:
            summaries[m], reps[m] = {"value": None, "ci": None, "stderr": None, "n": 0}, np.zeros(0)

    rb = task.random_baseline
    if rb is None and task.output_type == "multiple_choice" and drs:
        rb = float(np.mean([1.0 / len(dr.choices) for dr in drs]))
    elif rb is None and task.output_type == "generate_until":
        rb = 0.0

    lines = []
    for j, (dr, v, lg) in enumerate(zip(drs, per_doc, logs)):
        line = {"doc_id": dr.doc_id, "split": split, "doc": dr.doc, "prompt": dr.prompt, "target": dr.target,
                "requests": [list(r.args) for r in dr.requests], "responses": lg["responses"],
                "filtered": lg["filtered"], "metrics": {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.items()},
                "truncated": False if truncated == 0 else None}
        if "passed" in lg:
            line["passed"], line["status"] = lg["passed"], lg["status"]
        if "filtered_by" in lg:
            line["filtered_by"] = lg["filtered_by"]
        if units is not None:
            line["unit"] = units[j]
        lines.append(line)
    out = {"split": split, "n": len(drs), "metrics": summaries, "omitted": omitted, "reps": reps, "aggs": aggs,
           "units": units, "clusters": None if units is None else len(set(units)), "sandbox": sandbox_status,
           "random_baseline": rb, "truncated": truncated, "skipped": int(task.skipped.get(split, 0)), "lines": lines}

    if check_dirty and dirty is not None:
        texts = [task.decontamination_text(dr.doc) for dr in drs]
        flags = list(dirty(task.name, texts))
        if len(flags) != len(texts):
            raise ValueError(f"dirty({task.name!r}, ...) returned {len(flags)} flags for {len(texts)} documents")
        flags = [bool(f) for f in flags]
        clean_idx = [i for i, f in enumerate(flags) if not f]
        mc = {}
        cl = None if units is None else M.cluster_ids([units[i] for i in clean_idx])
        for m in names:
            if m in omitted:
                continue
            agg = M.aggregate(m, [per_doc[i][m] for i in clean_idx])
            mc[m], _ = M.summarize(agg, bootstrap, _seed(seed, task.name, split, m, "clean"), clusters=cl)
        out["contamination"] = {"clean": len(clean_idx), "dirty": len(flags) - len(clean_idx), "metrics_clean": mc}
        for line, f in zip(lines, flags):
            line["dirty"] = f
    return out


def _fingerprint(task: Task, split: str):
    """``builtin.fingerprint(split)`` for a built-in task's split (None for a task with its own documents)."""
    if "generator" not in (task.config or {}):
        return None
    from . import builtin

    return builtin.fingerprint(split) if split in builtin.SPLITS else None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "task"


def _check_args(lm, split, bootstrap, limit, num_fewshot, dirty, sandbox_workers=2):
    if isinstance(sandbox_workers, bool) or not isinstance(sandbox_workers, int) or sandbox_workers < 1:
        raise ValueError(f"sandbox_workers: expected an integer >= 1 (pass@k programs run at once), got {sandbox_workers!r}")
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
             allow_network: bool = False, apply_chat_template: bool = False, sandbox_workers: int = 2) -> dict:
    """Scores ``tasks`` (Task objects, names or paths; see ``task.load_tasks``) on ``lm``; returns the
    result object (schema: ``lmforge_eval`` 1). ``split``: "test" (each task's test_split), "dev"
    (its validation_split) or "both" (test, plus "dev" and the test-minus-dev "gap" for every task
    that has a validation split other than its test split; the others report test alone).
    ``samples_dir``: one ``<task>.jsonl`` per task (its path in the result is relative to the
    folder that holds ``samples_dir``). ``dirty(task_name, doc_texts) -> [bool]``: adds the
    "contamination" entry for the reported split. ``allow_network``: pass@k programs run even where the
    sandbox has no network namespace (its opt-in; otherwise it refuses and the error propagates).
    ``apply_chat_template``: every prompt rendered by ``lm.apply_chat_template`` as lm-eval's
    ``--apply_chat_template`` renders it (examples and question in one user turn). ``sandbox_workers``:
    how many pass@k programs run at once. A pass@k task that the sandbox would refuse raises
    ``sandbox.SandboxUnavailable`` before the model generates anything for it."""
    _check_args(lm, split, bootstrap, limit, num_fewshot, dirty, sandbox_workers)
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
    centered_by, reps_by, joint = {}, {}, {}
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
                           apply_chat_template=apply_chat_template, sandbox_workers=sandbox_workers)
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
        if task.bootstrap_unit is not None:  # the intervals resample clusters of documents, not documents
            entry["bootstrap_unit"] = list(task.bootstrap_unit)
            entry["clusters"] = main["clusters"]
        fp = _fingerprint(task, main_split)
        if fp is not None:  # which private split this is (a hash of its seed; the seed itself never leaves)
            entry["split_fingerprint"] = fp
        lines = main["lines"]
        dev_split = task.validation_split
        if split == "both" and dev_split is not None and dev_split != main_split:
            dev = score_split(lm, task, dev_split, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir,
                              bootstrap=bootstrap, seed=seed + 1, allow_network=allow_network,
                              apply_chat_template=apply_chat_template, sandbox_workers=sandbox_workers)
            entry["dev"] = {"split": dev_split, "n": dev["n"], "metrics": dev["metrics"]}
            if dev["clusters"] is not None:
                entry["dev"]["clusters"] = dev["clusters"]
            fp = _fingerprint(task, dev_split)
            if fp is not None:
                entry["dev"]["split_fingerprint"] = fp
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
            if task.bootstrap_unit is not None and primary in main["aggs"]:
                joint.setdefault((task.bootstrap_unit, main_split), {})[task.name] = (main["aggs"][primary], main["units"], rb)
    # tasks whose documents share clusters (the corpus tasks draw from the same stretches): one joint draw
    # of clusters for all of them, so the CORE interval sees their correlation
    groups = []
    for (unit, sp), parts in joint.items():
        if len(parts) < 2:
            continue
        jr = M.joint_bootstrap({t: (a, u) for t, (a, u, _) in parts.items()}, bootstrap, _seed(seed, "core", *unit, sp))
        for t, (_, _, rb) in parts.items():
            reps_by[t] = (jr[t] - rb) / (1.0 - rb)
        groups.append(sorted(parts))
    core = M.core(centered_by, reps_by)
    if groups:
        core["joint_clusters"] = groups
    params = getattr(lm, "params", None)
    result = {
        "lmforge_eval": RESULT_VERSION,
        "model": {"name": getattr(lm, "name", type(lm).__name__), "checkpoint": _jsonable(getattr(lm, "checkpoint", None)),
                  "params": int(params) if isinstance(params, (int, np.integer)) else params},
        "settings": {"tasks": [t.name for t in loaded], "limit": limit, "num_fewshot": num_fewshot,
                     "bootstrap": bootstrap, "seed": seed, "split": split,
                     **({"apply_chat_template": True} if apply_chat_template else {})},
        "tasks": result_tasks,
        "aggregate": {"core": core},
        "elapsed_s": round(time.perf_counter() - t_start, 3),
    }
    return _jsonable(result)
