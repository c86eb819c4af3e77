"""LLM-as-judge: pairwise comparison with position swap, single-answer grading with a rubric, and the judge's
agreement with a rule-checkable ground truth.

Knows the judge's prompts (written here; the idea of a strict verdict tag is
MT-Bench's), how a verdict is read from the judge's text, the swap rule, and
the summaries: win counts, how often a verdict flips with the swap (position
bias), grade means, and agreement with Cohen's kappa. A judge is any ``lm.LM``
that generates: ``openai_lm.OpenAILM`` (any endpoint, ``lmforge serve``
included), a local lmforge model (``local.LocalLM``: the prompt goes through
its chat template) or a scripted stand-in. Every prompt of a batch
goes to the judge in one ``generate_until`` call. Knows nothing of how the
judge computes its text, nor of tasks beyond a run's per-sample log.

* Verdicts. Pairwise: the judge ends with ``[[A]]`` (the first answer shown
  is better), ``[[B]]`` (the second) or ``[[C]]`` (a tie). Grading: ``Rating:
  [[N]]``. Correctness (for ``agreement``): ``[[CORRECT]]`` or ``[[INCORRECT]]``.
  Parsing is strict: tags are case-sensitive, a text with no tag or with two
  different tags is *unparsed* (counted, never guessed); the same tag repeated is
  one verdict. A rating outside the scale is clamped to it and counted.
* The swap rule. ``pairwise`` asks twice, answers in the order (a, b) and then
  (b, a). A wins only if it is preferred in both orders; both orders saying tie
  is a tie; any other pair of parsed verdicts is *inconsistent* (a flip with
  the swap), scored as a tie and counted. A judge that always names the first
  position therefore never produces a win. If either verdict is unparsed the
  item has no winner (``winner`` None).
* Agreement. Items carry a question, an answer and the true label (the answer
  is right or wrong, e.g. by exact match); the judge says correct or incorrect;
  ``agreement`` is the fraction of parsed items where they agree, ``cohen_kappa``
  corrects it for chance (None when chance agreement is 1: one class only).
* Rates (A's win rate with ties and flips as half, flip rate, mean grade,
  agreement, kappa) carry a 95% percentile bootstrap interval over items
  (``*_ci``, seeded).

How it can mislead: a judge rewards what it likes (length, confidence, its own
style) as well as what is right; the swap guards only against position bias, and
agreement on arithmetic says little about open-ended answers.

CLI face (``lmforge eval judge``, wired by the report): ``add_arguments(parser)``
and ``cmd(args)``; modes ``pairwise RUN_A RUN_B``, ``grade RUN`` and
``agreement RUN`` (or ``agreement --synthetic N``: addition problems answered
right and wrong here, checkable by rule). A RUN is a directory with the
harness's ``result.json`` and ``samples/<task>.jsonl`` (or one samples
``.jsonl`` file).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from .._io import read_jsonl
from . import lm

__all__ = ["pairwise", "grade", "judge_many", "agreement", "parse_verdict", "parse_rating", "parse_correct",
           "cohen_kappa", "pairwise_prompt", "grade_prompt", "check_prompt", "summarize", "addition_items",
           "make_judge", "run_samples", "run_cli", "add_arguments", "cmd", "GEN_KWARGS"]

GEN_KWARGS = {"until": [], "max_gen_toks": 512, "temperature": 0.0, "do_sample": False}
BOOTSTRAP = 1000  # resamples of items for the summaries' intervals
MODES = ("pairwise", "grade", "check")
_TAG = re.compile(r"\[\[([^\[\]\n]{0,32})\]\]")
_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*")

DEFAULT_PAIRWISE_RUBRIC = ("Prefer the answer that is correct; among correct answers, the one that answers the "
                           "question more directly and clearly.")


# ---- prompts ----------------------------------------------------------------------------------

def _block(title: str, text: str) -> str:
    return f"### {title}\n{text.strip()}\n\n"


def pairwise_prompt(question: str, first: str, second: str, rubric: str | None = None,
                    reference: str | None = None) -> str:
    """The judge's prompt for two answers shown as A (``first``) and B (``second``)."""
    return ("Two assistants answered the question below. Decide which answer is better.\n"
            f"Criteria: {(rubric or DEFAULT_PAIRWISE_RUBRIC).strip()}\n"
            "Do not let the order of the answers, their length or their tone sway you.\n\n"
            + _block("Question", question)
            + (_block("Reference answer", reference) if reference is not None else "")
            + _block("Answer A", first) + _block("Answer B", second)
            + "Give your reasons in a few sentences. Then write the verdict on its own line, exactly one of: "
              "[[A]] if answer A is better, [[B]] if answer B is better, [[C]] if they are equally good.\n")


def grade_prompt(question: str, answer: str, rubric: str, scale: tuple = (1, 10),
                 reference: str | None = None) -> str:
    """The judge's prompt for grading one answer on ``scale`` with ``rubric``."""
    lo, hi = _scale(scale)
    return (f"Grade the answer to the question below on a scale from {lo:g} (worst) to {hi:g} (best).\n"
            f"Rubric: {rubric.strip()}\n\n"
            + _block("Question", question)
            + (_block("Reference answer", reference) if reference is not None else "")
            + _block("Answer", answer)
            + f"Explain your grade briefly. Then write the grade on its own line in exactly this form: Rating: [[N]] "
              f"where N is a whole number from {lo:g} to {hi:g}.\n")


def check_prompt(question: str, answer: str, rubric: str | None = None, reference: str | None = None) -> str:
    """The judge's prompt for deciding whether one answer is correct (``agreement``)."""
    return ("Decide whether the answer to the question below is correct.\n"
            + (f"Criteria: {rubric.strip()}\n" if rubric else "")
            + "\n" + _block("Question", question)
            + (_block("Reference answer", reference) if reference is not None else "")
            + _block("Answer", answer)
            + "Check the answer step by step. Then write the verdict on its own line, exactly one of: "
              "[[CORRECT]] or [[INCORRECT]].\n")


# ---- parsing ----------------------------------------------------------------------------------

def _only(values: list):
    """The one distinct value of ``values``, or None (none, or two that disagree)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else None


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "C" (tie) from the judge's text, or None: no ``[[A]]``/``[[B]]``/``[[C]]`` tag, or two
    different ones."""
    return _only([t for t in _TAG.findall(text or "") if t in ("A", "B", "C")])


def parse_correct(text: str) -> bool | None:
    """True for ``[[CORRECT]]``, False for ``[[INCORRECT]]``, None for neither or both."""
    return _only([t == "CORRECT" for t in _TAG.findall(text or "") if t in ("CORRECT", "INCORRECT")])


def parse_rating(text: str) -> float | None:
    """The number N of ``[[N]]`` in the judge's text (``Rating: [[7]]``), or None: no numeric tag, or two different."""
    nums = []
    for t in _TAG.findall(text or ""):
        m = _NUMBER.fullmatch(t)
        if m:
            nums.append(float(m.group(1)))
    return _only(nums)


def _scale(scale) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale: expected (low, high) numbers, got {scale!r}") from None
    if not lo < hi:
        raise ValueError(f"scale: low must be below high, got {scale!r}")
    return lo, hi


# ---- asking the judge -------------------------------------------------------------------------

def _ask(judge: lm.LM, prompts: list[str], gen_kwargs: dict | None) -> list[str]:
    """The judge's texts for ``prompts``, in one ``generate_until`` call. A judge that chats by itself
    (``chat`` true: an OpenAI chat endpoint) gets the prompt as the user's message; otherwise the prompt is one
    user turn of its chat template when it has one (``LocalLM``; the template's stop strings, a plain template's
    next turn, added to ``until``), else plain text."""
    if not isinstance(judge, lm.LM):
        raise TypeError(f"judge: expected an lmforge.evaluate.lm.LM, got {type(judge).__name__}")
    kw = {**GEN_KWARGS, **(gen_kwargs or {})}
    contexts = []
    for p in prompts:
        if not getattr(judge, "chat", False):
            try:
                p = judge.apply_chat_template([{"role": "user", "content": p}])
            except NotImplementedError:
                pass
            else:
                stops = getattr(getattr(judge, "tokens", None), "chat_stop", None) or []
                kw["until"] = list(kw.get("until") or []) + [s for s in stops if s not in (kw.get("until") or [])]
        contexts.append(p)
    out = judge.generate_until([(c, dict(kw)) for c in contexts]) if contexts else []
    if len(out) != len(contexts):
        raise RuntimeError(f"{judge.name}: generate_until returned {len(out)} texts for {len(contexts)} prompts")
    return [o if isinstance(o, str) else str(o) for o in out]


def _text(item: dict, key: str, where: str, optional: bool = False) -> str | None:
    v = item.get(key) if isinstance(item, dict) else None
    if v is None and optional:
        return None
    if not isinstance(v, str):
        got = "missing" if v is None else f"a {type(v).__name__}"
        raise ValueError(f"{where}: field {key!r} must be a string ({got})")
    return v


_SWAP = {"A": "B", "B": "A", "C": "C", None: None}


def _pairwise_result(v1: str | None, v2: str | None, texts: list[str]) -> dict:
    """One item's result from the verdict in order (a, b) and the verdict in order (b, a)."""
    prefer = [v1, _SWAP[v2]]  # in terms of the answers: A = answer_a, B = answer_b, C = tie
    unparsed = sum(v is None for v in (v1, v2))
    if unparsed:
        winner, consistent = None, None
    elif prefer[0] == prefer[1]:
        winner, consistent = {"A": "A", "B": "B", "C": "tie"}[prefer[0]], True
    else:
        winner, consistent = "tie", False
    return {"winner": winner, "consistent": consistent, "flipped": consistent is False,
            "verdicts": [v1, v2], "preferred": prefer, "unparsed": unparsed, "judgments": texts}


def _grade_result(text: str, scale: tuple[float, float]) -> dict:
    lo, hi = scale
    r = parse_rating(text)
    score = None if r is None else min(max(r, lo), hi)
    return {"score": score, "rating": r, "parsed": r is not None, "clamped": r is not None and score != r,
            "judgment": text}


def _check_result(text: str, label) -> dict:
    j = parse_correct(text)
    out = {"judged": j, "parsed": j is not None, "judgment": text}
    if label is not None:
        out["label"] = label
        out["agree"] = None if j is None else j == label
    return out


def judge_many(judge: lm.LM, items: list[dict], *, mode: str = "pairwise", rubric: str | None = None,
               scale: tuple = (1, 10), gen_kwargs: dict | None = None) -> dict:
    """Judge every item with one ``generate_until`` call -> ``{"mode", "items": [result, ...], "summary"}``.

    ``mode`` "pairwise": items ``{"question", "answer_a", "answer_b"}``; "grade": ``{"question", "answer"}`` (and
    ``rubric`` is required); "check": ``{"question", "answer"}`` and optionally ``"label"`` (bool). Any item may
    carry a ``"reference"`` answer shown to the judge. A result of a "pairwise" item is ``pairwise``'s dict, of a
    "grade" item ``grade``'s; ``summary`` is ``summarize(mode, results)``."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"items: expected a list of dicts, got {type(items).__name__}")
    if mode == "grade" and not (isinstance(rubric, str) and rubric.strip()):
        raise ValueError("grade: a rubric (non-empty text) is required")
    sc = _scale(scale)
    prompts: list[str] = []
    for k, it in enumerate(items):
        where = f"items[{k}]"
        if not isinstance(it, dict):
            raise ValueError(f"{where}: expected a dict, got {type(it).__name__}")
        q, ref = _text(it, "question", where), _text(it, "reference", where, optional=True)
        if mode == "pairwise":
            a, b = _text(it, "answer_a", where), _text(it, "answer_b", where)
            prompts += [pairwise_prompt(q, a, b, rubric, ref), pairwise_prompt(q, b, a, rubric, ref)]
        elif mode == "grade":
            prompts.append(grade_prompt(q, _text(it, "answer", where), rubric, sc, ref))
        else:
            label = it.get("label")
            if label is not None and not isinstance(label, bool) and label not in (0, 1):
                raise ValueError(f"{where}: field 'label' must be true or false (the answer is right), got {label!r}")
            prompts.append(check_prompt(q, _text(it, "answer", where), rubric, ref))
    texts = _ask(judge, prompts, gen_kwargs)
    if mode == "pairwise":
        results = [_pairwise_result(parse_verdict(texts[2 * k]), parse_verdict(texts[2 * k + 1]),
                                    texts[2 * k: 2 * k + 2]) for k in range(len(items))]
    elif mode == "grade":
        results = [_grade_result(t, sc) for t in texts]
    else:
        results = [_check_result(t, None if it.get("label") is None else bool(it["label"]))
                   for t, it in zip(texts, items)]
    return {"mode": mode, "judge": judge.name, "items": results, "summary": summarize(mode, results)}


def pairwise(judge: lm.LM, question: str, answer_a: str, answer_b: str, *, rubric: str | None = None,
             reference: str | None = None, gen_kwargs: dict | None = None) -> dict:
    """Which of two answers is better, asked in both orders -> ``{"winner": "A" | "B" | "tie" | None,
    "consistent", "flipped", "verdicts": [order (a, b), order (b, a)] as the judge named positions,
    "preferred": the same as answers ("A" = answer_a, "C" = tie), "unparsed": 0..2, "judgments": [text, text]}``."""
    item = {"question": question, "answer_a": answer_a, "answer_b": answer_b, "reference": reference}
    return judge_many(judge, [item], mode="pairwise", rubric=rubric, gen_kwargs=gen_kwargs)["items"][0]


def grade(judge: lm.LM, question: str, answer: str, *, rubric: str, scale: tuple = (1, 10),
          reference: str | None = None, gen_kwargs: dict | None = None) -> dict:
    """One answer graded on ``scale`` with ``rubric`` -> ``{"score": the rating clamped to the scale, or None
    when unparsed, "rating": as written, "parsed", "clamped", "judgment"}``."""
    item = {"question": question, "answer": answer, "reference": reference}
    return judge_many(judge, [item], mode="grade", rubric=rubric, scale=scale, gen_kwargs=gen_kwargs)["items"][0]


# ---- summaries --------------------------------------------------------------------------------

def cohen_kappa(confusion: dict) -> float | None:
    """Cohen's kappa of a confusion matrix ``{true label: {judged label: count}}`` (any labels); None when the
    chance agreement is 1 (both raters used one and the same class only) or the matrix is empty."""
    labels = sorted({*confusion, *(j for row in confusion.values() for j in row)}, key=str)
    n = sum(c for row in confusion.values() for c in row.values())
    if n == 0:
        return None
    po = sum(confusion.get(k, {}).get(k, 0) for k in labels) / n
    rows = {k: sum(confusion.get(k, {}).values()) / n for k in labels}
    cols = {k: sum(row.get(k, 0) for row in confusion.values()) / n for k in labels}
    pe = sum(rows[k] * cols[k] for k in labels)
    if pe >= 1.0:
        return None
    return (po - pe) / (1.0 - pe)


def _interval(values: list[float], iters: int = BOOTSTRAP, seed: int = 0) -> list[float] | None:
    """The 95% percentile bootstrap interval of the mean of ``values`` (``metrics.summarize``, seeded)."""
    from . import metrics

    return metrics.summarize(metrics.aggregate("acc", values), iters, seed)[0]["ci"] if values else None


def _kappa_interval(pairs: list[tuple[bool, bool]], iters: int = BOOTSTRAP, seed: int = 0) -> list[float] | None:
    """The 95% percentile bootstrap interval of Cohen's kappa over (true, judged) pairs (resamples where kappa is
    undefined are dropped)."""
    import numpy as np

    if len(pairs) < 2:
        return None
    a = np.asarray(pairs, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(a), size=(iters, len(a)))
    t, j = a[idx, 0], a[idx, 1]
    po = (t == j).mean(-1)
    pe = t.mean(-1) * j.mean(-1) + (1 - t.mean(-1)) * (1 - j.mean(-1))
    ok = pe < 1.0
    if ok.sum() < 2:
        return None
    k = (po[ok] - pe[ok]) / (1.0 - pe[ok])
    lo, hi = np.percentile(k, [2.5, 97.5])
    return [float(lo), float(hi)]


def summarize(mode: str, results: list[dict]) -> dict:
    """Counts and rates over one mode's item results (see ``judge_many``); rates carry a 95% bootstrap interval
    over items (``*_ci``, seeded: the same results give the same interval)."""
    n = len(results)
    if mode == "pairwise":
        both = [r for r in results if not r["unparsed"]]
        wins_a = sum(r["winner"] == "A" for r in results)
        wins_b = sum(r["winner"] == "B" for r in results)
        ties = sum(r["winner"] == "tie" and r["consistent"] for r in results)
        flips = sum(r["flipped"] for r in results)
        sided = [v for r in results for v in r["verdicts"] if v in ("A", "B")]
        score = [{"A": 1.0, "B": 0.0, "tie": 0.5}[r["winner"]] for r in both]
        return {"n": n, "wins_a": wins_a, "wins_b": wins_b, "ties": ties, "inconsistent": flips,
                "unparsed_items": n - len(both), "unparsed_verdicts": sum(r["unparsed"] for r in results),
                "win_rate_a": sum(score) / len(score) if score else None, "win_rate_a_ci": _interval(score),
                "flip_rate": flips / len(both) if both else None,
                "flip_rate_ci": _interval([float(r["flipped"]) for r in both]),
                "first_position_rate": sum(v == "A" for v in sided) / len(sided) if sided else None}
    if mode == "grade":
        scores = [r["score"] for r in results if r["parsed"]]
        hist: dict[str, int] = {}
        for s in sorted(scores):
            hist[f"{s:g}"] = hist.get(f"{s:g}", 0) + 1
        mean = sum(scores) / len(scores) if scores else None
        sd = (sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)) ** 0.5 if len(scores) > 1 else None
        return {"n": n, "parsed": len(scores), "unparsed": n - len(scores),
                "clamped": sum(r["clamped"] for r in results), "mean": mean, "mean_ci": _interval(scores),
                "stdev": sd, "histogram": hist}
    if mode == "check":
        parsed = [r for r in results if r["parsed"]]
        out = {"n": n, "unparsed": n - len(parsed),
               "judged_correct_rate": sum(r["judged"] for r in parsed) / len(parsed) if parsed else None}
        labelled = [r for r in parsed if "label" in r]
        if labelled or any("label" in r for r in results):
            name = {True: "correct", False: "incorrect"}
            conf = {"correct": {"correct": 0, "incorrect": 0}, "incorrect": {"correct": 0, "incorrect": 0}}
            for r in labelled:
                conf[name[r["label"]]][name[r["judged"]]] += 1
            out.update({"agreement": sum(r["agree"] for r in labelled) / len(labelled) if labelled else None,
                        "agreement_ci": _interval([float(r["agree"]) for r in labelled]),
                        "cohen_kappa": cohen_kappa(conf),
                        "cohen_kappa_ci": _kappa_interval([(r["label"], r["judged"]) for r in labelled]),
                        "confusion": conf,
                        "true_correct_rate": (sum(r["label"] for r in results if "label" in r)
                                              / sum("label" in r for r in results))})
        return out
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def agreement(judge: lm.LM, items: list[dict], *, rubric: str | None = None, gen_kwargs: dict | None = None,
              with_items: bool = False) -> dict:
    """The judge against a rule-checkable truth. ``items``: ``{"question", "answer", "label": bool (the answer is
    right)}`` (and optionally ``"reference"``) -> ``{"n", "agreement", "cohen_kappa", "unparsed", "confusion":
    {true: {judged: count}} over "correct"/"incorrect", "judged_correct_rate", "true_correct_rate"}``; with
    ``with_items`` also each item's result under ``"items"``."""
    for k, it in enumerate(items):
        if not isinstance(it, dict) or it.get("label") is None:
            raise ValueError(f"items[{k}]: field 'label' (true when the answer is right) is required for agreement")
    r = judge_many(judge, items, mode="check", rubric=rubric, gen_kwargs=gen_kwargs)
    out = dict(r["summary"])
    if with_items:
        out["items"] = r["items"]
    return out


def addition_items(n: int, *, digits: int = 3, seed: int = 0, wrong_rate: float = 0.5) -> list[dict]:
    """``n`` addition problems with an answer that is right or (with probability ``wrong_rate``) off by a small
    amount, labelled by rule: ``{"question", "answer", "label", "reference"}`` (the reference is the true sum)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive integer, got {n!r}")
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits: expected a positive integer, got {digits!r}")
    rng = random.Random(f"judge-addition-{seed}-{digits}")
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    items = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        right = a + b
        ans = right
        if rng.random() < wrong_rate:
            ans = right + rng.choice([-1, 1]) * rng.choice([1, 2, 10, 100][:digits + 1])
        items.append({"question": f"What is {a} + {b}?", "answer": str(ans), "label": ans == right,
                      "reference": str(right)})
    return items


# ---- runs' generations --------------------------------------------------------------------------

def run_samples(run, tasks: list[str] | None = None) -> dict[str, dict]:
    """``{task: {"primary", "output_type", "samples": [row, ...]}}`` of a run: a directory with ``result.json``
    (its tasks' ``samples`` paths) or one ``samples/<task>.jsonl`` file."""
    p = Path(run)
    if p.is_file() and p.suffix == ".jsonl":
        return {p.stem: {"primary": None, "output_type": None, "samples": read_jsonl(p)}}
    res = p / "result.json"
    if not res.is_file():
        raise ValueError(f"{run}: not a run (no result.json in it) nor a samples .jsonl file")
    try:
        result = json.loads(res.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{res}: not JSON ({e.msg}, line {e.lineno})") from None
    ts = result.get("tasks") if isinstance(result, dict) else None
    if not isinstance(ts, dict):
        raise ValueError(f"{res}: field 'tasks' must be an object of task results")
    if tasks:
        missing = [t for t in tasks if t not in ts]
        if missing:
            raise ValueError(f"{res}: no task {missing[0]!r} (it has {sorted(ts)})")
    out = {}
    for name in tasks or sorted(ts):
        t = ts[name]
        rel = t.get("samples") if isinstance(t, dict) else None
        if not isinstance(rel, str):
            if tasks:
                raise ValueError(f"{res}: tasks.{name}.samples: no per-sample log for task {name!r}")
            continue
        sp = p / rel
        if not sp.is_file():
            raise ValueError(f"{res}: tasks.{name}.samples names {rel!r}, which does not exist")
        out[name] = {"primary": t.get("primary"), "output_type": t.get("output_type"), "samples": read_jsonl(sp)}
    return out


def _answer(row: dict, where: str) -> str:
    resp = row.get("responses")
    while isinstance(resp, list) and resp:
        resp = resp[0]
    if not isinstance(resp, str):
        raise ValueError(f"{where}: field 'responses' holds no generated text (is this a generation task?)")
    return resp


def _question(row: dict, where: str) -> str:
    q = row.get("prompt")
    if not isinstance(q, str):
        raise ValueError(f"{where}: field 'prompt' must be the prompt text")
    return q


def _key(row: dict) -> tuple:
    return row.get("split"), row.get("doc_id")


def _gen_tasks(samples: dict, run) -> dict:
    keep = {t: s for t, s in samples.items() if s["output_type"] in (None, "generate_until")}
    if not keep:
        raise ValueError(f"{run}: no generation task (output_type generate_until) with a per-sample log")
    return keep


def _reference(row: dict) -> str:
    t = row.get("target")
    return t if isinstance(t, str) else json.dumps(t)


def _pairwise_items(run_a, run_b, tasks, limit, with_reference: bool = False) -> dict[str, list[dict]]:
    sa, sb = _gen_tasks(run_samples(run_a, tasks), run_a), _gen_tasks(run_samples(run_b, tasks), run_b)
    common = [t for t in sa if t in sb]
    if not common:
        raise ValueError(f"{run_a} and {run_b} share no generation task (tasks: {sorted(sa)} and {sorted(sb)})")
    out = {}
    for t in common:
        rb = {_key(r): r for r in sb[t]["samples"]}
        items = []
        for k, r in enumerate(sa[t]["samples"]):
            other = rb.get(_key(r))
            if other is None:
                continue
            where = f"{run_a} task {t} sample {k}"
            q = _question(r, where)
            if _question(other, f"{run_b} task {t} doc {r.get('doc_id')}") != q:
                raise ValueError(f"task {t}, doc {r.get('doc_id')}: the two runs asked different prompts "
                                 "(different task versions or few-shot settings); pairwise needs the same question")
            items.append({"question": q, "answer_a": _answer(r, where), "answer_b": _answer(other, where),
                          "doc_id": r.get("doc_id"), "split": r.get("split")})
            if with_reference:
                items[-1]["reference"] = _reference(r)
            if limit and len(items) >= limit:
                break
        if not items:
            raise ValueError(f"task {t}: the two runs have no document in common")
        out[t] = items
    return out


def _single_items(run, tasks, limit, with_label: bool, with_reference: bool) -> dict[str, list[dict]]:
    out = {}
    for t, s in _gen_tasks(run_samples(run, tasks), run).items():
        items = []
        for k, r in enumerate(s["samples"]):
            where = f"{run} task {t} sample {k}"
            it = {"question": _question(r, where), "answer": _answer(r, where), "doc_id": r.get("doc_id"),
                  "split": r.get("split")}
            if with_reference:
                it["reference"] = _reference(r)
            if with_label:
                m = r.get("metrics") if isinstance(r.get("metrics"), dict) else {}
                name = s["primary"] if s["primary"] in m else ("exact_match" if "exact_match" in m else None)
                if name is None or not isinstance(m[name], (int, float)) or m[name] not in (0, 1):
                    raise ValueError(f"{where}: no 0/1 metric to check the judge against (fields metrics."
                                     f"{s['primary'] or 'exact_match'}); agreement needs a rule-checked task")
                it["label"] = bool(m[name])
            items.append(it)
            if limit and len(items) >= limit:
                break
        out[t] = items
    return out


# ---- the CLI face ---------------------------------------------------------------------------------

def _common(p) -> None:
    g = p.add_argument_group("the judge")
    g.add_argument("--judge-url", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1)")
    g.add_argument("--judge-model", default=None, metavar="NAME",
                   help="the endpoint's model name (default: its only model)")
    g.add_argument("--judge-checkpoint", default=None, metavar="DIR",
                   help="a local lmforge or HF model directory as the judge")
    g.add_argument("--judge-completions", action="store_true",
                   help="send the prompt to /v1/completions as plain text (default: /v1/chat/completions)")
    g.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="the environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    g.add_argument("--judge-concurrency", type=int, default=4, metavar="N",
                   help="requests in flight to the endpoint")
    g.add_argument("--judge-timeout", type=float, default=120.0, metavar="S", help="seconds per request")
    g.add_argument("--max-tokens", type=int, default=512, metavar="N", help="tokens of judge output per verdict")
    p.add_argument("--rubric", default=None, metavar="TEXT", help="the criteria, as text")
    p.add_argument("--rubric-file", default=None, metavar="FILE", help="the criteria, from a UTF-8 file")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="at most this many documents per task")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the full result (every judgment) as JSON here")


RUN_HELP = "a run directory (result.json, samples/) or one samples .jsonl file"


def add_arguments(parser) -> None:
    """The ``lmforge eval judge`` arguments (modes as subcommands); sets ``fn=cmd``."""
    sub = parser.add_subparsers(dest="judge_mode", metavar="MODE")
    sub.required = True
    p = sub.add_parser("pairwise", help="compare two runs' generations (a win must survive the position swap)")
    p.add_argument("run_a", metavar="RUN_A", help=RUN_HELP + ": its answers are A")
    p.add_argument("run_b", metavar="RUN_B", help="the other run: its answers are B")
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="a generation task of both runs (repeatable; default: all they share)")
    p.add_argument("--with-reference", action="store_true", help="show the judge the task's target")
    _common(p)
    p = sub.add_parser("grade", help="grade one run's generations with a rubric")
    p.add_argument("run", metavar="RUN", help=RUN_HELP)
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="a generation task of the run (repeatable; default: all)")
    p.add_argument("--scale", type=float, nargs=2, default=(1, 10), metavar=("LOW", "HIGH"))
    p.add_argument("--with-reference", action="store_true", help="show the judge the task's target")
    _common(p)
    p = sub.add_parser("agreement", help="the judge against a rule-checked truth (exact match of a run, or "
                                         "synthetic addition)")
    p.add_argument("run", nargs="?", default=None, metavar="RUN",
                   help=RUN_HELP + "; each answer's 0/1 primary metric (exact match) is the truth")
    p.add_argument("--task", action="append", default=None, metavar="TASK",
                   help="a rule-checked generation task of the run (repeatable; default: all)")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="N addition problems answered right or wrong here, instead of a run")
    p.add_argument("--digits", type=int, default=3, help="digits of the synthetic problems' numbers")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic problems")
    p.add_argument("--with-reference", action="store_true", help="show the judge the true answer")
    _common(p)
    parser.set_defaults(fn=cmd)


def make_judge(a) -> lm.LM:
    """The judge the arguments name: an endpoint (``--judge-url``) or a local model (``--judge-checkpoint``)."""
    import os

    if bool(a.judge_url) == bool(a.judge_checkpoint):
        raise ValueError("name the judge: --judge-url URL (an OpenAI-compatible endpoint) or --judge-checkpoint DIR "
                         "(one of them)")
    if a.judge_url:
        from .openai_lm import OpenAILM

        return OpenAILM(a.judge_url, a.judge_model, api_key=os.environ.get(a.judge_api_key_env) or None,
                        chat=not a.judge_completions, timeout=a.judge_timeout, concurrency=a.judge_concurrency)
    if not Path(a.judge_checkpoint).is_dir():
        raise ValueError(f"--judge-checkpoint {a.judge_checkpoint}: not a directory")
    from .local import LocalLM

    j = LocalLM.from_checkpoint(a.judge_checkpoint)
    j.name = f"lmforge:{a.judge_checkpoint}"
    return j


def _rubric(a) -> str | None:
    if a.rubric and a.rubric_file:
        raise ValueError("give --rubric or --rubric-file, not both")
    if a.rubric_file:
        from .._io import read_text_file

        return read_text_file(a.rubric_file)
    return a.rubric


def run_cli(a, judge: lm.LM | None = None) -> dict:
    """What ``cmd`` computes, as one JSON-able object (``judge`` given: instead of the arguments' judge)."""
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit: expected a positive integer, got {a.limit}")
    rubric = _rubric(a)
    mode = a.judge_mode
    if mode == "pairwise":
        per_task = _pairwise_items(a.run_a, a.run_b, a.task, a.limit, a.with_reference)
    elif mode == "grade":
        if not rubric:
            raise ValueError("grade: give the rubric (--rubric TEXT or --rubric-file FILE)")
        per_task = _single_items(a.run, a.task, a.limit, False, a.with_reference)
    else:
        if (a.run is None) == (a.synthetic is None):
            raise ValueError("agreement: give a RUN (its exact-match verdicts are the truth) or --synthetic N")
        if a.synthetic is not None:
            items = addition_items(a.synthetic, digits=a.digits, seed=a.seed)
            if not a.with_reference:
                items = [{k: v for k, v in it.items() if k != "reference"} for it in items]
            per_task = {f"addition_{a.digits}d_synthetic": items}
        else:
            per_task = _single_items(a.run, a.task, a.limit, True, a.with_reference)
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens: expected a positive integer, got {a.max_tokens}")
    judge = judge if judge is not None else make_judge(a)
    if judge.max_length and a.max_tokens >= judge.max_length:
        raise ValueError(f"--max-tokens {a.max_tokens}: the judge's context is {judge.max_length} tokens; leave room "
                         "for the prompt (e.g. --max-tokens " f"{max(1, judge.max_length // 4)})")
    gen = {"max_gen_toks": a.max_tokens}
    out = {"mode": mode, "judge": judge.name, "rubric": rubric, "tasks": {}}
    kind = {"pairwise": "pairwise", "grade": "grade", "agreement": "check"}[mode]
    for t, items in per_task.items():
        r = judge_many(judge, items, mode=kind, rubric=rubric, scale=getattr(a, "scale", (1, 10)), gen_kwargs=gen)
        for it, res in zip(items, r["items"]):
            res.update({k: it[k] for k in ("doc_id", "split") if k in it})
        out["tasks"][t] = {"summary": r["summary"], "items": r["items"]}
    return out


def _fmt(x, pct: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}%" if pct else (f"{x:.3f}" if isinstance(x, float) else str(x))


def _ci(ci, pct: bool = False) -> str:
    return f" [{_fmt(ci[0], pct)}, {_fmt(ci[1], pct)}]" if ci else ""


def cmd(a) -> int:
    """``lmforge eval judge MODE ...``: prints a summary per task, or with ``--json`` the whole result (every
    judgment); ``--out FILE`` writes that result too."""
    out = run_cli(a)
    if a.out:
        from .._io import write_json

        write_json(a.out, out, indent=1)
    if a.json:
        print(json.dumps(out))
        return 0
    print(f"judge: {out['judge']}")
    for t, r in out["tasks"].items():
        s = r["summary"]
        if a.judge_mode == "pairwise":
            print(f"{t}: n {s['n']}, A wins {s['wins_a']}, B wins {s['wins_b']}, ties {s['ties']}, "
                  f"flipped with the swap {s['inconsistent']} ({_fmt(s['flip_rate'], True)}), unparsed "
                  f"{s['unparsed_items']}; A's win rate {_fmt(s['win_rate_a'], True)}{_ci(s['win_rate_a_ci'], True)} "
                  f"(ties and flips count half); first position chosen {_fmt(s['first_position_rate'], True)} "
                  "of sided verdicts")
        elif a.judge_mode == "grade":
            print(f"{t}: n {s['n']}, mean grade {_fmt(s['mean'])}{_ci(s['mean_ci'])} (sd {_fmt(s['stdev'])}), "
                  f"unparsed {s['unparsed']}, clamped {s['clamped']}")
        else:
            print(f"{t}: n {s['n']}, agreement {_fmt(s['agreement'], True)}{_ci(s['agreement_ci'], True)}, "
                  f"Cohen's kappa {_fmt(s['cohen_kappa'])}{_ci(s['cohen_kappa_ci'])}, unparsed {s['unparsed']}; "
                  f"confusion (true -> judged) {json.dumps(s['confusion'])}")
    if a.out:
        print(f"every judgment: {a.out}")
    return 0
