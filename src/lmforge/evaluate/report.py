"""The evaluation's report: ``result.json``, the markdown scorecard with a chart, and ``compare``.

Knows the result object's shape (schema: ``lmforge_eval`` 1; see ``harness``), how to write
it (atomically, with its per-sample logs under ``samples/``), how to render it as a scorecard
(markdown for files, plain text for a terminal) and one bar chart of every task's primary
score with its 95% interval, and how to compare two runs: per task and metric, B - A with a
bootstrap interval of the difference, paired over the documents both runs scored (same
``doc_id`` and the same prompt) when both have per-sample logs, else unpaired from the two
runs' standard errors (labelled so). Knows nothing of how scores are computed (``harness``,
``metrics``) nor of models. matplotlib is optional: without it the chart is skipped, and
the scorecard says so.

A paired interval needs the metric's score to be the mean of its per-sample values (acc,
exact match, pass@k); for a corpus-level metric (perplexity, bits per byte) it is not, and
``compare`` falls back to the unpaired interval, saying so in ``method``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .._io import atomic_open, read_jsonl, write_json

__all__ = ["write", "load", "scorecard_markdown", "scorecard_text", "plot", "compare", "compare_markdown",
           "compare_text", "SCHEMA"]

logger = logging.getLogger("lmforge.evaluate")

SCHEMA = 1
Z95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


# ---------------------------------------------------------------- writing and loading

def write(result: dict, out_dir, samples: dict[str, list[dict]] | None = None, chart: bool = True) -> dict[str, Path]:
    """Write ``result`` into ``out_dir``: ``result.json`` (atomic), ``scorecard.md``, ``scorecard.png``
    (unless matplotlib is missing or ``chart`` is False) and, for every task with per-sample records,
    ``samples/<task>.jsonl``. Per-sample records come from ``samples`` ({task: [record, ...]}) or from a
    task entry whose ``"samples"`` is a list; the entry then holds the file's path relative to
    ``out_dir``. Returns {"result": path, "scorecard": path, "chart": path (when drawn), "samples/<task>": path}.
    ``result`` itself is not changed."""
    _check(result, "result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = json.loads(json.dumps(result))  # a copy (and a check that it is JSON)
    res.pop("_dir", None)  # (load's note of where a result was read from)
    res["tasks"] = dict(res["tasks"])
    paths: dict[str, Path] = {}
    recs = dict(samples or {})
    for name, t in res["tasks"].items():
        if isinstance(t.get("samples"), list):
            recs.setdefault(name, t["samples"])
    for name, rows in recs.items():
        if name not in res["tasks"]:
            raise ValueError(f"samples for task {name!r}: no such task in the result (tasks: "
                             f"{', '.join(res['tasks']) or 'none'})")
        rel = f"samples/{_safe(name)}.jsonl"
        with atomic_open(out / rel) as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        res["tasks"][name]["samples"] = rel
        paths[f"samples/{name}"] = out / rel
    write_json(out / "result.json", res, indent=1)
    paths["result"] = out / "result.json"
    png = out / "scorecard.png"
    note = None
    if chart:
        try:
            if plot(res, png):
                paths["chart"] = png
            else:
                note = "no chart: no task has a score to draw"
        except ImportError:
            note = "chart skipped: matplotlib is not installed (pip install 'lmforge[plot]')"
            logger.warning(f"no {png.name}: matplotlib is not installed; pip install 'lmforge[plot]'")
        except Exception as e:  # a chart is a convenience, never a failure
            note = f"chart skipped: {type(e).__name__}: {e}"
            logger.warning(f"no {png.name}: {type(e).__name__}: {e}")
    with atomic_open(out / "scorecard.md") as f:
        f.write(scorecard_markdown(res, chart=png.name if "chart" in paths else None, chart_note=note))
    paths["scorecard"] = out / "scorecard.md"
    return paths


def load(path) -> dict:
    """A result: ``path`` is a result.json or the directory that holds one. The loaded dict gets
    ``"_dir"`` (where its samples/ are) for ``compare``; that key is not part of the schema (``write``
    drops it)."""
    p = Path(path)
    f = p / "result.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"{path}: no result.json there (expected a directory written by "
                                f"`lmforge eval --tasks ...` or its result.json)")
    try:
        res = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    _check(res, str(f))
    res["_dir"] = str(f.parent)
    return res


def _check(res, where: str) -> None:
    if not isinstance(res, dict):
        raise ValueError(f"{where}: expected a result object (a JSON object), got {type(res).__name__}")
    if res.get("lmforge_eval") != SCHEMA:
        raise ValueError(f"{where}: field 'lmforge_eval' is {res.get('lmforge_eval')!r}, expected {SCHEMA} "
                         "(not an lmforge evaluation result, or one of another version)")
    if not isinstance(res.get("tasks"), dict):
        raise ValueError(f"{where}: field 'tasks' is missing or not an object")
    for name, t in res["tasks"].items():
        if not isinstance(t, dict) or not isinstance(t.get("metrics"), dict):
            raise ValueError(f"{where}: tasks.{name}: expected an object with 'metrics'")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------- the scorecard

def _decimals(v: float) -> int:
    """3 decimals for a score in [-1.5, 1.5] (accuracies, centered scores, gaps); else 4 significant digits."""
    if abs(v) <= 1.5:
        return 3
    return max(0, 3 - int(math.floor(math.log10(abs(v)))))


def _num(v, dec: int | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    if abs(v) >= 1e6:
        return f"{v:.3e}"
    return f"{v:.{_decimals(v) if dec is None else dec}f}"


def _ci(m: dict | None, dec: int | None = None) -> str:
    if not m or not m.get("ci"):
        return ""
    lo, hi = m["ci"]
    return f"[{_num(lo, dec)}, {_num(hi, dec)}]"


def _score(m: dict | None) -> str:
    """A value and its interval, both to the value's decimals."""
    if not m:
        return "-"
    v = m.get("value")
    dec = _decimals(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None
    return f"{_num(v, dec)} {_ci(m, dec)}".strip()


def _primary(t: dict) -> str | None:
    return t.get("primary") or next(iter(t.get("metrics") or {}), None)


def _rows(res: dict) -> list[dict]:
    """One row per task: the cells the summary table shows."""
    rows = []
    for name, t in res["tasks"].items():
        p = _primary(t)
        m = (t.get("metrics") or {}).get(p)
        dev = (t.get("dev") or {}).get("metrics", {}).get(p) if t.get("dev") else None
        gap = (t.get("gap") or {}).get(p)
        c = t.get("contamination")
        clean = (c or {}).get("metrics_clean", {}).get(p) if c else None
        rows.append({
            "task": name, "split": t.get("split", "-"), "n": _num(t.get("n")), "metric": p or "-",
            "score": _score(m), "centered": _num(t.get("centered")), "baseline": _num(t.get("random_baseline")),
            "dev": (f"{_score(dev)} ({t['dev'].get('split', 'dev')})" if dev else "-"),
            "gap": _score(gap) if gap else "-",
            "clean/dirty": f"{c.get('clean', '-')}/{c.get('dirty', '-')}" if c else "-",
            "clean score": _score(clean) if clean else "-",
            "truncated": _num(t.get("truncated")), "skipped": _num(t.get("skipped"))})
    return rows


_COLS = ["task", "split", "n", "metric", "score", "centered", "baseline", "dev", "gap", "clean/dirty",
         "clean score", "truncated", "skipped"]


def _table_md(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |",
            *("| " + " | ".join(r) + " |" for r in esc)]


def _core_line(res: dict) -> str:
    agg = (res.get("aggregate") or {}).get("core")
    if not agg or agg.get("value") is None:
        return "CORE (mean centered score): - (no task has a centered score)"
    tasks = agg.get("tasks") or []
    return (f"CORE (mean centered score over {len(tasks)} task{'s' * (len(tasks) != 1)}: {', '.join(tasks)}): "
            f"**{_num(agg['value'])}** {_ci(agg)}".rstrip())


def _model_line(res: dict) -> str:
    m = res.get("model") or {}
    s = res.get("settings") or {}
    bits = [f"model `{m.get('name', '?')}`"]
    if m.get("checkpoint"):
        bits.append(f"checkpoint `{m['checkpoint']}`")
    if m.get("params"):
        bits.append(f"{m['params']:,} parameters")
    opts = ", ".join(f"{k} {s[k]}" for k in ("split", "limit", "num_fewshot", "bootstrap", "seed") if k in s)
    line = "; ".join(bits) + (f". Settings: {opts}" if opts else "")
    if res.get("elapsed_s") is not None:
        line += f"; {res['elapsed_s']:.1f} s"
    return line + "."


def scorecard_markdown(res: dict, chart: str | None = None, chart_note: str | None = None, heading: int = 1,
                       base: str = "") -> str:
    """The scorecard as markdown: the model and settings, the CORE aggregate, one summary row per task,
    then per task every metric with its 95% interval (and its dev, gap and clean-subset values).
    ``chart``: an image path to embed; ``chart_note``: why there is none. ``heading``: the level of
    the title (2 inside a larger report); ``base``: the report directory as seen from the file the markdown
    goes into (``"eval/"`` in a run's report.md), put before the per-sample logs' paths."""
    h = "#" * heading
    L = [f"{h} Evaluation scorecard", "", _model_line(res), "", _core_line(res), "",
         "Scores are the primary metric on the reported split with a 95% bootstrap interval over documents; "
         "centered = (score - baseline) / (1 - baseline); gap = reported split minus dev.", ""]
    if res.get("left_out"):
        L += [f"Left out (failed to load or score; see the log): {', '.join(res['left_out'])}", ""]
    rows = _rows(res)
    L += _table_md(_COLS, [[r[c] for c in _COLS] for r in rows]) if rows else ["(no tasks)"]
    if chart:
        L += ["", f"![primary scores with 95% intervals]({chart})"]
    elif chart_note:
        L += ["", f"({chart_note})"]
    for name, t in res["tasks"].items():
        L += ["", f"{h}# {name}", ""]
        info = [f"output type {t.get('output_type', '?')}", f"split {t.get('split', '?')}", f"n {t.get('n', '?')}"]
        if t.get("split_fingerprint"):
            info[1] += f" (fingerprint {t['split_fingerprint']})"
        if t.get("bootstrap_unit"):
            unit = t["bootstrap_unit"]
            unit = "+".join(unit) if isinstance(unit, list) else unit
            info.append(f"intervals resample {t.get('clusters', '?')} clusters by {unit}")
        if t.get("samples") and isinstance(t["samples"], str):
            info.append(f"per-sample log `{base}{t['samples']}`")
        L += ["; ".join(info), ""]
        for mn, why in (t.get("omitted") or {}).items():
            L += [f"- {mn} not reported: {why}"]
        if t.get("omitted"):
            L += [""]
        dev = (t.get("dev") or {}).get("metrics") or {}
        gap = t.get("gap") or {}
        c = t.get("contamination") or {}
        clean = c.get("metrics_clean") or {}
        head = ["metric", "score [95% CI]", "stderr", "n"]
        if dev:
            head += [f"dev ({t['dev'].get('split', 'dev')}, n {t['dev'].get('n', '?')})", "gap"]
        if c:
            head += [f"clean subset ({c.get('clean', '?')} clean, {c.get('dirty', '?')} dirty)"]
        body = []
        for mn, m in (t.get("metrics") or {}).items():
            row = [mn + (" (primary)" if mn == _primary(t) else ""), _score(m), _num(m.get("stderr")), _num(m.get("n"))]
            if dev:
                row += [_score(dev.get(mn)), _score(gap.get(mn)) if gap.get(mn) else "-"]
            if c:
                row += [_score(clean.get(mn))]
            body.append(row)
        L += _table_md(head, body)
    return "\n".join(L) + "\n"


def scorecard_text(res: dict) -> str:
    """The summary table as aligned plain text (for a terminal), and the CORE line."""
    rows = _rows(res)
    cols = [c for c in _COLS if any(r[c] not in ("-", "") for r in rows) or c in ("task", "score")]
    cells = [cols] + [[r[c] for c in cols] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w[i]) for i, v in enumerate(row)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines + ["", _core_line(res).replace("**", "")]) + "\n"


def plot(res: dict, png) -> bool:
    """One horizontal bar chart of every task's primary score with its 95% interval (bounded scores on
    one axis with the random baseline marked and the dev score as an open circle; perplexity-type scores
    on a second). Returns False when no task has a score. Raises ImportError without matplotlib."""
    items = [(n, t, _primary(t)) for n, t in res["tasks"].items()]
    items = [(n, t, p) for n, t, p in items if p and (t["metrics"].get(p) or {}).get("value") is not None]
    if not items:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bounded = [x for x in items if x[1].get("centered") is not None]
    other = [x for x in items if x[1].get("centered") is None]
    groups = [g for g in (bounded, other) if g]
    fig, axes = plt.subplots(len(groups), 1, squeeze=False,
                             figsize=(7, 0.9 + 0.42 * sum(len(g) for g in groups) + 0.5 * len(groups)),
                             gridspec_kw={"height_ratios": [max(len(g), 1) for g in groups]})
    for ax, g in zip(axes[:, 0], groups):
        ys = list(range(len(g)))[::-1]
        vals = [t["metrics"][p]["value"] for _, t, p in g]
        err = [[max(0.0, v - (t["metrics"][p].get("ci") or [v, v])[0]) for v, (_, t, p) in zip(vals, g)],
               [max(0.0, (t["metrics"][p].get("ci") or [v, v])[1] - v) for v, (_, t, p) in zip(vals, g)]]
        ax.barh(ys, vals, xerr=err, color="C0", alpha=0.8, capsize=3, label="score (95% CI)")
        ax.set_yticks(ys)
        ax.set_yticklabels([f"{n} ({p}, {t.get('split', '?')})" for n, t, p in g], fontsize=8)
        if g is bounded:
            base = [(y, t.get("random_baseline")) for y, (_, t, _) in zip(ys, g) if t.get("random_baseline") is not None]
            if base:
                ax.scatter([b for _, b in base], [y for y, _ in base], marker="|", s=300, color="C3", zorder=3,
                           label="random baseline")
            dev = [(y, t["dev"]["metrics"][p]["value"]) for y, (_, t, p) in zip(ys, g)
                   if (t.get("dev") or {}).get("metrics", {}).get(p, {}).get("value") is not None]
            if dev:
                ax.scatter([d for _, d in dev], [y for y, _ in dev], marker="o", facecolors="none",
                           edgecolors="C1", zorder=3, label="dev split")
            ax.set_xlim(0, max(1.0, max(v + e for v, e in zip(vals, err[1]))))
            ax.set_xlabel("score")
        else:
            ax.set_xlabel("score (perplexity-type: lower is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{(res.get('model') or {}).get('name', '')}: primary scores", fontsize=10)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(png, "wb", encoding=None) as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return True


# ---------------------------------------------------------------- compare

def _samples(res: dict, task: str, split: str | None) -> dict | None:
    """{doc_id: (prompt or doc, {metric: mean value over that doc's lines})} from a task's per-sample log,
    only the lines of ``split``; None when the run has no log for the task."""
    rel = (res["tasks"].get(task) or {}).get("samples")
    base = res.get("_dir")
    if not isinstance(rel, str) or base is None:
        return None
    p = Path(base) / rel
    if not p.exists():
        return None
    acc: dict = {}
    for r in read_jsonl(p):
        if split is not None and r.get("split", split) != split:
            continue
        key = r.get("doc_id")
        ident = json.dumps(r.get("prompt", r.get("doc")), sort_keys=True, ensure_ascii=False)
        ent = acc.setdefault(key, [ident, {}])
        for m, v in (r.get("metrics") or {}).items():
            if isinstance(v, (int, float)):  # (a bool counts as 0/1)
                ent[1].setdefault(m, []).append(float(v))
    return {k: (ident, {m: sum(v) / len(v) for m, v in ms.items()}) for k, (ident, ms) in acc.items()}


def _se(m: dict) -> float | None:
    if m.get("stderr") is not None:
        return float(m["stderr"])
    if m.get("ci"):
        return (m["ci"][1] - m["ci"][0]) / (2 * Z95)
    return None


def _paired(xa: list[float], xb: list[float], bootstrap: int, seed: int) -> tuple[float, list[float], float]:
    import numpy as np

    d = np.asarray(xb, dtype=float) - np.asarray(xa, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(bootstrap, len(d)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(d.mean()), [float(lo), float(hi)], float(means.std(ddof=1)) if bootstrap > 1 else 0.0


def compare(a, b, bootstrap: int = 2000, seed: int = 0) -> dict:
    """B - A per task (on the split each run reported) and metric. ``a``, ``b``: result dicts (``load``'s,
    whose ``_dir`` locates the per-sample logs) or paths to a result directory / result.json.

    Paired (``method`` "paired bootstrap"): both runs have per-sample logs and at least 2 documents in
    common (same doc_id, same prompt), and the metric's score is the mean of its per-sample values in
    both runs; the difference is the mean over the shared documents, its interval the 2.5/97.5
    percentiles of ``bootstrap`` resamples of them (seeded). Otherwise "unpaired normal": the
    difference of the two scores, +- 1.96 sqrt(se_a² + se_b²) from the runs' stderrs (or their
    intervals' widths). ``significant``: the interval excludes 0. Tasks only one run has are listed."""
    ra = a if isinstance(a, dict) else load(a)
    rb = b if isinstance(b, dict) else load(b)
    _check(ra, "run A")
    _check(rb, "run B")
    out: dict = {"a": _who(ra), "b": _who(rb), "bootstrap": bootstrap, "seed": seed, "tasks": {},
                 "only_a": [t for t in ra["tasks"] if t not in rb["tasks"]],
                 "only_b": [t for t in rb["tasks"] if t not in ra["tasks"]]}
    for name, ta in ra["tasks"].items():
        tb = rb["tasks"].get(name)
        if tb is None:
            continue
        entry: dict = {"split": [ta.get("split"), tb.get("split")], "primary": _primary(tb), "metrics": {}}
        if ta.get("split") != tb.get("split"):
            entry["note"] = f"different splits: A {ta.get('split')}, B {tb.get('split')}"
        sa, sb = _samples(ra, name, ta.get("split")), _samples(rb, name, tb.get("split"))
        shared = []
        if sa is not None and sb is not None:
            shared = sorted((k for k in sa if k in sb and sa[k][0] == sb[k][0]), key=str)
        for mn, ma in (ta.get("metrics") or {}).items():
            mb = (tb.get("metrics") or {}).get(mn)
            if mb is None or ma.get("value") is None or mb.get("value") is None:
                continue
            e = _diff(mn, ma, mb, sa, sb, shared, bootstrap, seed)
            entry["metrics"][mn] = e
        out["tasks"][name] = entry
    ca, cb = (ra.get("aggregate") or {}).get("core"), (rb.get("aggregate") or {}).get("core")
    if ca and cb and ca.get("value") is not None and cb.get("value") is not None:
        out["aggregate"] = {"core": _unpaired(ca, cb)}
    return out


def _who(r: dict) -> dict:
    m = r.get("model") or {}
    return {"name": m.get("name"), "checkpoint": m.get("checkpoint"), "path": r.get("_dir")}


def _unpaired(ma: dict, mb: dict) -> dict:
    va, vb = float(ma["value"]), float(mb["value"])
    d = vb - va
    e = {"a": va, "b": vb, "diff": d, "ci": None, "method": "unpaired normal (from the runs' stderrs)",
         "significant": None}
    sa, sb = _se(ma), _se(mb)
    if sa is not None and sb is not None:
        half = Z95 * math.hypot(sa, sb)
        e["ci"] = [d - half, d + half]
        e["significant"] = bool(d - half > 0 or d + half < 0)
    else:
        e["method"] = "none (a run has neither stderr nor interval)"
    return e


def _diff(mn, ma, mb, sa, sb, shared, bootstrap, seed) -> dict:
    def mean_is_score(s, m) -> bool:  # the score is the mean of the per-sample values (not corpus-level)
        vals = [v[1][mn] for v in s.values() if mn in v[1]]
        return len(vals) == len(s) and bool(vals) and abs(sum(vals) / len(vals) - float(m["value"])) <= 1e-6 + 1e-6 * abs(m["value"])

    if len(shared) >= 2 and mean_is_score(sa, ma) and mean_is_score(sb, mb):
        d, ci, se = _paired([sa[k][1][mn] for k in shared], [sb[k][1][mn] for k in shared], bootstrap, seed)
        return {"a": float(ma["value"]), "b": float(mb["value"]), "diff": d, "ci": ci, "stderr": se,
                "method": "paired bootstrap", "n_shared": len(shared),
                "significant": bool(ci[0] > 0 or ci[1] < 0)}
    e = _unpaired(ma, mb)
    if sa is not None and sb is not None:
        e["why_unpaired"] = (f"only {len(shared)} document(s) in common" if len(shared) < 2 else
                             "the score is not a mean of per-sample values")
    else:
        e["why_unpaired"] = "no per-sample logs in " + ("both runs" if sa is None and sb is None else
                                                        "run A" if sa is None else "run B")
    return e


def _signed(v: float, ref: float) -> str:
    return f"{v:+.{_decimals(ref) if ref else 3}f}"


def _cmp_cells(name: str, metric: str, e: dict) -> list[str]:
    ref = max(abs(e["a"]), abs(e["b"]))
    flag = "yes" if e["significant"] else ("no" if e["significant"] is not None else "?")
    method = e["method"] + (f", {e['n_shared']} shared docs" if "n_shared" in e else "")
    ci = f"[{_signed(e['ci'][0], ref)}, {_signed(e['ci'][1], ref)}]" if e["ci"] else "-"
    return [name, metric, _num(e["a"]), _num(e["b"]), _signed(e["diff"], ref), ci, flag, method]


def _compare_rows(c: dict) -> list[list[str]]:
    rows = [_cmp_cells(name, mn + (" *" if mn == t.get("primary") else ""), e)
            for name, t in c["tasks"].items() for mn, e in t["metrics"].items()]
    if c.get("aggregate"):
        rows.append(_cmp_cells("CORE", "centered mean", c["aggregate"]["core"]))
    return rows


_CMP_COLS = ["task", "metric", "A", "B", "B - A", "95% CI", "excludes 0", "method"]


def _cmp_head(c: dict) -> list[str]:
    def who(x):
        return f"{x.get('name') or '?'}" + (f" ({x['path']})" if x.get("path") else "")

    L = [f"A: {who(c['a'])}", f"B: {who(c['b'])}"]
    if c["only_a"]:
        L.append(f"only in A: {', '.join(c['only_a'])}")
    if c["only_b"]:
        L.append(f"only in B: {', '.join(c['only_b'])}")
    for n, t in c["tasks"].items():
        if t.get("note"):
            L.append(f"{n}: {t['note']}")
    return L


def compare_markdown(c: dict) -> str:
    """``compare``'s result as markdown: who A and B are, then one row per task and metric (* = primary)."""
    L = ["# Evaluation comparison (B - A)", "", *(f"- {x}" for x in _cmp_head(c)), ""]
    L += _table_md(_CMP_COLS, _compare_rows(c))
    L += ["", "Paired: a bootstrap over the documents both runs scored; unpaired: a normal interval from "
              "the two runs' standard errors (wider, and blind to which documents each got right)."]
    return "\n".join(L) + "\n"


def compare_text(c: dict) -> str:
    """``compare``'s result as aligned plain text."""
    cells = [_CMP_COLS] + _compare_rows(c)
    w = [max(len(r[i]) for r in cells) for i in range(len(_CMP_COLS))]
    lines = ["  ".join(v.ljust(w[i]) for i, v in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(_cmp_head(c) + [""] + lines) + "\n"
