"""Scores: per-document metric values, their aggregation, and bootstrap confidence intervals.

Knows how lm-evaluation-harness scores a document and aggregates a task: multiple choice by
the argmax of summed log-likelihoods (``acc``), of log-likelihood per character of the choice
(``acc_norm``) or per UTF-8 byte (``acc_bytes``); generations by exact match after lm-eval's
filters (regex extraction, take_first, lowercase, ...) and its normalization options; code by
the unbiased pass@k estimator of Chen et al. (2021); rolling log-likelihood as word / byte
perplexity and bits per byte weighted over the whole corpus (sum of log-likelihoods over sum of
words or bytes, never a mean of per-document ratios). Also the centered score against a random
baseline, the CORE-style aggregate, and a seeded percentile bootstrap over documents for every
metric (ratio metrics resample documents and recompute the ratio), or over clusters of correlated
documents (``clusters``: every document of a drawn cluster; ``joint_bootstrap``: one draw of clusters
shared by several metrics, for an aggregate over tasks whose documents share clusters).

Knows nothing of models, prompts or files: the harness feeds it numbers and strings.
"""
from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "METRICS", "BOUNDED", "CORPUS", "is_metric", "check_metric", "pass_at_k_k",
    "mc_scores", "exact_match", "normalize_answer", "FILTERS", "check_filter", "apply_filters",
    "pass_at_k", "count_words", "count_bytes", "Aggregate", "aggregate", "bootstrap", "cluster_ids", "joint_bootstrap",
    "centered", "core", "summarize", "difference",
]

# Metrics of each kind. ``pass@K`` is a family (any K >= 1).
MEAN_METRICS = ("acc", "acc_norm", "acc_bytes", "exact_match")
CORPUS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
METRICS = MEAN_METRICS + CORPUS + ("pass@k",)
BOUNDED = MEAN_METRICS  # plus pass@K: scores in [0, 1] that a random baseline centers

_PASS = re.compile(r"^pass@(\d+)$")


def pass_at_k_k(name: str) -> int | None:
    """K of a ``pass@K`` metric name, or None for any other name."""
    m = _PASS.match(name)
    return int(m.group(1)) if m else None


def is_metric(name: str) -> bool:
    return name in MEAN_METRICS or name in CORPUS or (pass_at_k_k(name) or 0) >= 1


def is_bounded(name: str) -> bool:
    return name in BOUNDED or pass_at_k_k(name) is not None


def check_metric(name, where: str = "") -> str:
    """``name`` if it is a known metric, else a ValueError naming ``where`` and the nearest name."""
    if isinstance(name, str) and is_metric(name):
        return name
    known = list(MEAN_METRICS + CORPUS) + ["pass@1", "pass@k"]
    near = difflib.get_close_matches(str(name), known, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ValueError(f"{where}unknown metric {name!r}{hint}; expected one of {', '.join(METRICS)} (pass@K, K >= 1)")


# ----------------------------------------------------------------------------------------------
# per-document scores

def mc_scores(lls: Sequence[float], choices: Sequence[str], gold, is_greedy: Sequence[bool] | None = None) -> dict:
    """lm-eval's multiple-choice scores of one document: ``gold`` is the index of the right choice
    (or a list of indices, any of which counts). acc_norm divides each log-likelihood by the
    number of characters of the choice (without the target delimiter), acc_bytes by its UTF-8 bytes."""
    lls = np.asarray(lls, dtype=np.float64)
    chars = np.array([float(len(c)) for c in choices])
    nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
    golds = list(gold) if isinstance(gold, (list, tuple)) else [gold]
    pred, pred_norm, pred_bytes = int(np.argmax(lls)), int(np.argmax(lls / chars)), int(np.argmax(lls / nbytes))
    out = {"acc": float(pred in golds), "acc_norm": float(pred_norm in golds), "acc_bytes": float(pred_bytes in golds)}
    if is_greedy is not None:
        out["exact_match"] = float(any(bool(is_greedy[g]) for g in golds))
    return out


def normalize_answer(s: str, *, ignore_case=False, ignore_punctuation=False, ignore_numbers=False,
                     ignore_whitespace=False, regexes_to_ignore=None) -> str:
    """The string exact_match compares, normalized in lm-eval's order: regexes removed, then case,
    punctuation and digits; ``ignore_whitespace`` (lmforge) removes all whitespace last."""
    for pat in regexes_to_ignore or ():
        s = re.sub(pat, "", s)
    if ignore_case:
        s = s.lower()
    if ignore_punctuation:
        s = s.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        s = s.translate(str.maketrans("", "", string.digits))
    if ignore_whitespace:
        s = "".join(s.split())
    return s


EXACT_MATCH_OPTIONS = ("ignore_case", "ignore_punctuation", "ignore_numbers", "ignore_whitespace", "regexes_to_ignore")


def exact_match(prediction: str, reference, **options) -> float:
    """1.0 when the normalized prediction equals the normalized reference (or any of a list)."""
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    p = normalize_answer(str(prediction), **options)
    return float(any(p == normalize_answer(str(r), **options) for r in refs))


# ----------------------------------------------------------------------------------------------
# filters (lm-eval's names): each maps one document's list of responses to a new list, or, for
# take_first / majority_vote, to the single response that the metrics score

def _regex(resps, regex_pattern=r"#### (\-?[0-9\.\,]+)", group_select=0, fallback="[invalid]"):
    rx = re.compile(regex_pattern)
    out = []
    for r in resps:
        found = rx.findall(r if isinstance(r, str) else "")
        if not found:
            out.append(fallback)
            continue
        try:
            m = found[group_select]
        except IndexError:
            out.append(fallback)
            continue
        if isinstance(m, tuple):
            m = next((g for g in m if g), None)
            if m is None:
                out.append(fallback)
                continue
        out.append(m.strip())
    return out


def _take_first_k(resps, k):
    if len(resps) < k:
        raise ValueError(f"filter take_first_k: needs at least k={k} responses per document, got {len(resps)} (raise repeats)")
    return list(resps[:k])


FILTERS: dict[str, Callable] = {
    "regex": _regex,
    "take_first": lambda resps: resps[0],
    "take_first_k": _take_first_k,
    "majority_vote": lambda resps: [Counter(resps).most_common(1)[0][0]],
    "lowercase": lambda resps: [r.lower() for r in resps],
    "uppercase": lambda resps: [r.upper() for r in resps],
    "remove_whitespace": lambda resps: [r.strip() for r in resps],
    "strip": lambda resps: [r.strip() for r in resps],  # lmforge alias of remove_whitespace
}
_FILTER_ARGS = {"regex": {"regex_pattern", "group_select", "fallback"}, "take_first_k": {"k"}}


def check_filter(step, where: str = "") -> tuple[str, dict]:
    """``(function, kwargs)`` of one filter step ``{function: NAME, ...}``, or a ValueError naming ``where``."""
    if not isinstance(step, dict) or "function" not in step:
        raise ValueError(f"{where}a filter step must be a mapping with a 'function' key, got {step!r}")
    name = step["function"]
    if name not in FILTERS:
        near = difflib.get_close_matches(str(name), list(FILTERS), n=1, cutoff=0.5)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"{where}unknown filter function {name!r}{hint}; expected one of {', '.join(FILTERS)}")
    kwargs = {k: v for k, v in step.items() if k != "function"}
    bad = set(kwargs) - _FILTER_ARGS.get(name, set())
    if bad:
        raise ValueError(f"{where}filter {name!r} takes no argument(s) {sorted(bad)}; "
                         f"it takes {sorted(_FILTER_ARGS.get(name, set())) or 'none'}")
    if name == "regex":
        try:
            re.compile(kwargs.get("regex_pattern", ""))
        except re.error as e:
            raise ValueError(f"{where}filter regex: bad regex_pattern {kwargs.get('regex_pattern')!r}: {e}") from None
    return name, kwargs


def apply_filters(responses: list[str], steps: Sequence[tuple[str, dict]]):
    """One document's responses through a filter pipeline: a list (several still kept) or a string
    (after take_first / majority_vote's single answer is taken)."""
    out = list(responses)
    for name, kwargs in steps:
        if isinstance(out, str):
            out = [out]
        out = FILTERS[name](out, **kwargs)
    return out


# ----------------------------------------------------------------------------------------------
# pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples with c passing
    (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as the stable product prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n} c={c}")
    if k < 1 or k > n:
        raise ValueError(f"pass@k: need 1 <= k <= n, got n={n} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------
# rolling log-likelihood counts, as lm-eval counts them

def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def count_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# aggregation and bootstrap

def _ratio_value(name: str, num: np.ndarray, den: np.ndarray):
    """Corpus metric from summed log-likelihoods ``num`` and summed counts ``den`` (arrays alike)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        r = num / den
        if name == "bits_per_byte":
            return -r / math.log(2)
        return np.exp(-r)


@dataclass
class Aggregate:
    """One metric over a set of documents: per-document ``values`` (mean metrics) or ``(loglik,
    count)`` pairs (corpus metrics: perplexity with count 1 per document for lm-eval's
    ``loglikelihood`` perplexity, tokens for rolling perplexity, words, bytes)."""
    name: str
    values: np.ndarray  # (n,) or (n, 2)

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def corpus(self) -> bool:
        return self.name in CORPUS

    def value(self, idx: np.ndarray | None = None):
        """The metric over all documents, or over resampled rows ``idx`` ((n,) or (B, n))."""
        v = self.values if idx is None else self.values[idx]
        if self.corpus:
            return _ratio_value(self.name, v[..., 0].sum(-1), v[..., 1].sum(-1))
        return v.mean(-1)


def aggregate(name: str, per_doc: Sequence) -> Aggregate:
    arr = np.asarray(per_doc, dtype=np.float64)
    if name in CORPUS:
        arr = arr.reshape(-1, 2)
    else:
        arr = arr.reshape(-1)
    return Aggregate(name, arr)


def cluster_ids(keys: Sequence) -> np.ndarray:
    """Each document's cluster as an int, numbered in order of first appearance (``keys``: any hashable
    per document, e.g. the (play, stretch) it comes from)."""
    ids: dict = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def _weighted_value(agg: Aggregate, w: np.ndarray) -> np.ndarray:
    """The metric under document weights ``w`` (B, n): a weighted mean, or for a corpus metric the ratio
    of weighted sums (a document drawn twice counts twice, as in a resample)."""
    v = agg.values
    with np.errstate(divide="ignore", invalid="ignore"):
        if agg.corpus:
            return _ratio_value(agg.name, w @ v[:, 0], w @ v[:, 1])
        return (w @ v) / w.sum(-1)


def _cluster_counts(rng, n_clusters: int, b: int) -> np.ndarray:
    """(b, n_clusters): how often each cluster is drawn in each of ``b`` resamples of ``n_clusters`` clusters."""
    idx = rng.integers(0, n_clusters, size=(b, n_clusters))
    flat = (idx + n_clusters * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * n_clusters).reshape(b, n_clusters).astype(np.float64)


def bootstrap(agg: Aggregate, iters: int = 1000, seed: int = 0, chunk: int = 200, clusters=None) -> np.ndarray:
    """``iters`` bootstrap replicates of the metric: documents resampled with replacement by a
    generator seeded with ``seed`` (the same seed and documents give the same replicates).
    ``clusters`` ((n,) ints, see ``cluster_ids``): resample whole clusters instead (every document of a
    drawn cluster, as often as it is drawn), for documents that are correlated within a cluster; each
    document its own cluster gives exactly the per-document replicates."""
    n = agg.n
    if n == 0 or iters <= 0:
        return np.zeros(0)
    rng = np.random.default_rng(seed)
    if clusters is not None:
        clusters = np.asarray(clusters, dtype=np.int64).reshape(-1)
        if clusters.shape[0] != n:
            raise ValueError(f"bootstrap: {clusters.shape[0]} cluster ids for {n} documents")
        c = int(clusters.max()) + 1
        if c == n and np.array_equal(clusters, np.arange(n)):
            clusters = None  # singletons in document order: the per-document draws
    reps = []
    for s in range(0, iters, chunk):
        b = min(chunk, iters - s)
        if clusters is None:
            reps.append(np.asarray(agg.value(rng.integers(0, n, size=(b, n))), dtype=np.float64))
        else:
            reps.append(np.asarray(_weighted_value(agg, _cluster_counts(rng, c, b)[:, clusters]), dtype=np.float64))
    return np.concatenate(reps)


def joint_bootstrap(parts: dict, iters: int = 1000, seed: int = 0, chunk: int = 200) -> dict:
    """Replicates of several metrics whose documents share clusters (``parts``: name -> (Aggregate,
    per-document cluster keys)): each replicate draws, with replacement, as many clusters as the union
    of every part's keys holds, and every part is scored on the documents of the drawn clusters, so
    parts that share a cluster (three tasks drawn from the same stretch of a play) move together, as
    they would on a new sample of clusters. Returns name -> replicates (NaN where a part drew no document)."""
    ids: dict = {}
    cols = {name: np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64) for name, (_, keys) in parts.items()}
    for name, (agg, _) in parts.items():
        if len(cols[name]) != agg.n:
            raise ValueError(f"joint_bootstrap: {name!r}: {len(cols[name])} cluster keys for {agg.n} documents")
    out = {name: [] for name in parts}
    c = len(ids)
    if c == 0 or iters <= 0:
        return {name: np.zeros(0) for name in parts}
    rng = np.random.default_rng(seed)
    for s in range(0, iters, chunk):
        b = min(chunk, iters - s)
        counts = _cluster_counts(rng, c, b)
        for name, (agg, _) in parts.items():
            out[name].append(np.asarray(_weighted_value(agg, counts[:, cols[name]]), dtype=np.float64))
    return {name: np.concatenate(v) for name, v in out.items()}


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(agg: Aggregate, iters: int = 1000, seed: int = 0, clusters=None) -> tuple[dict, np.ndarray]:
    """``({"value", "ci", "stderr", "n"}, replicates)``: the 95% percentile interval and the
    bootstrap standard deviation (null when there are fewer than two documents, fewer than two
    ``clusters`` (see ``bootstrap``), or no bootstrap)."""
    if agg.n == 0:
        return {"value": None, "ci": None, "stderr": None, "n": 0}, np.zeros(0)
    value = _finite(agg.value())
    if value is None:  # a -inf log-likelihood (or 0/0): no score, and no interval around it
        return {"value": None, "ci": None, "stderr": None, "n": agg.n}, np.zeros(0)
    units = agg.n if clusters is None else len(set(np.asarray(clusters).reshape(-1).tolist()))
    reps = bootstrap(agg, iters, seed, clusters=clusters) if units > 1 else np.zeros(0)
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        return {"value": value, "ci": None, "stderr": None, "n": agg.n}, reps
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"value": value, "ci": [float(lo), float(hi)], "stderr": float(np.std(reps, ddof=1)), "n": agg.n}, reps


def difference(a: dict, reps_a: np.ndarray, b: dict, reps_b: np.ndarray) -> dict:
    """``a - b`` with a percentile interval from independent replicates of each (same count)."""
    if a.get("value") is None or b.get("value") is None:
        return {"value": None, "ci": None}
    value = a["value"] - b["value"]
    m = min(len(reps_a), len(reps_b))
    if m < 2:
        return {"value": value, "ci": None}
    d = reps_a[:m] - reps_b[:m]
    lo, hi = np.percentile(d, [2.5, 97.5])
    return {"value": value, "ci": [float(lo), float(hi)]}


def centered(name: str, value, baseline) -> float | None:
    """(value - baseline) / (1 - baseline) for a bounded metric; None for perplexity-type metrics,
    a missing value or baseline, or a baseline of 1."""
    if value is None or baseline is None or not is_bounded(name) or baseline >= 1:
        return None
    return (value - baseline) / (1.0 - baseline)


def core(centered_by_task: dict[str, float | None], reps_by_task: dict[str, np.ndarray] | None = None) -> dict:
    """The CORE-style aggregate: the mean of the centered scores of the tasks that have one, with a
    percentile interval from the mean of the tasks' centered bootstrap replicates (replicate i of every
    task together: independent draws per task, or one joint draw of shared clusters, see ``joint_bootstrap``)."""
    names = [t for t, v in centered_by_task.items() if v is not None]
    if not names:
        return {"value": None, "ci": None, "tasks": []}
    value = float(np.mean([centered_by_task[t] for t in names]))
    ci = None
    if reps_by_task and all(len(reps_by_task.get(t, ())) >= 2 for t in names):
        m = min(len(reps_by_task[t]) for t in names)
        mean_reps = np.mean([reps_by_task[t][:m] for t in names], axis=0)
        mean_reps = mean_reps[np.isfinite(mean_reps)]  # a joint replicate in which a task drew no document
        if len(mean_reps) >= 2:
            lo, hi = np.percentile(mean_reps, [2.5, 97.5])
            ci = [float(lo), float(hi)]
    return {"value": value, "ci": ci, "tasks": names}
