"""metrics: hand-computed values, lm-eval's own metric functions, pass@k by enumeration, bootstrap sanity."""
import itertools
import math
import random

import numpy as np
import pytest

from lmforge.evaluate import metrics as M


# ---------------------------------------------------------------- multiple choice

def test_mc_scores_hand_computed():
    # lls: argmax -> 0; per char: -1/1, -2/4=-0.5, -1.5/2=-0.75 -> 1; bytes same as chars (ASCII)
    s = M.mc_scores([-1.0, -2.0, -1.5], ["a", "bbbb", "cc"], gold=1, is_greedy=[True, False, True])
    assert s == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0, "exact_match": 0.0}
    # characters and bytes disagree: "éé" is 2 chars, 4 bytes; "abc" 3 chars, 3 bytes
    # lls -2.2 / -3.0: per char -1.1 vs -1.0 -> choice 1; per byte -0.55 vs -1.0 -> choice 0
    s = M.mc_scores([-2.2, -3.0], ["éé", "abc"], gold=0)
    assert (s["acc"], s["acc_norm"], s["acc_bytes"]) == (1.0, 0.0, 1.0)
    # a list of golds: any counts
    assert M.mc_scores([-3.0, -1.0, -2.0], ["x", "y", "z"], gold=[0, 1])["acc"] == 1.0
    assert M.mc_scores([-3.0, -1.0, -2.0], ["x", "y", "z"], gold=[0, 2])["acc"] == 0.0


def test_mc_scores_equal_lm_eval_process_results():
    """Same numbers through lm-eval's ConfigurableTask.process_results on random log-likelihoods."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.task import ConfigurableTask

    rng = random.Random(3)

    class _T:  # only what process_results reads
        OUTPUT_TYPE = "multiple_choice"
        multiple_input = 0
        multiple_target = 0
        _metric_fn_list = {"acc": None, "acc_norm": None, "acc_bytes": None, "exact_match": None}
        config = type("C", (), {"process_results": None})()

        def doc_to_choice(self, doc):
            return doc["choices"]

        def doc_to_target(self, doc):
            return doc["label"]

    t = _T()
    for _ in range(200):
        k = rng.randint(2, 5)
        choices = ["".join(rng.choice("abcdé ü") for _ in range(rng.randint(1, 6))) for _ in range(k)]
        lls = [-rng.uniform(0.1, 20) for _ in range(k)]
        greedy = [rng.random() < 0.3 for _ in range(k)]
        doc = {"choices": choices, "label": rng.randrange(k)}
        theirs = ConfigurableTask.process_results(t, doc, list(zip(lls, greedy)))
        ours = M.mc_scores(lls, choices, doc["label"], greedy)
        assert ours == {k2: float(v) for k2, v in theirs.items()}, (doc, lls)


# ---------------------------------------------------------------- exact match and filters

CASES = [
    ("1,234", "1234", {"regexes_to_ignore": [","]}),
    ("Hello!", "hello", {"ignore_case": True, "ignore_punctuation": True}),
    ("Hello!", "hello", {"ignore_case": True}),
    ("a1b2", "ab", {"ignore_numbers": True}),
    ("The Answer", "the answer", {}),
    ("x", "x", {}),
    (" 42", "42", {}),
]


@pytest.mark.parametrize("pred,ref,opts", CASES)
def test_exact_match_equals_lm_eval(pred, ref, opts):
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    theirs = lm_metrics.exact_match_hf_evaluate(predictions=[pred], references=[ref], **opts)["exact_match"]
    assert M.exact_match(pred, ref, **opts) == float(theirs)


def test_exact_match_whitespace_and_lists():
    assert M.exact_match(" 4 2\n", "42", ignore_whitespace=True) == 1.0
    assert M.exact_match(" 42", "42") == 0.0
    assert M.exact_match("b", ["a", "b"]) == 1.0 and M.exact_match("c", ["a", "b"]) == 0.0


def test_filters_equal_lm_eval_regex():
    ext = pytest.importorskip("lm_eval.filters.extraction")
    resps = [["The answer is 12 or 13", "none here", " -7 apples"], ["(a) x", "b"]]
    for kw in ({"regex_pattern": r"(-?\d+)"}, {"regex_pattern": r"(-?\d+)", "group_select": -1},
               {"regex_pattern": r"(\d+)|(\w)", "fallback": "??"}, {"regex_pattern": r"\((\w)\)"}):
        theirs = ext.RegexFilter(**kw).apply(resps, None)
        ours = [M.apply_filters(r, [("regex", kw)]) for r in resps]
        assert ours == [list(x) for x in theirs], kw


def test_regex_filter_fallbacks():
    kw = {"regex_pattern": r"(-?\d+)", "group_select": 1, "fallback": "[none]"}
    assert M.apply_filters(["only 7", "8 and 9", "no digits"], [("regex", kw)]) == ["[none]", "9", "[none]"]


def test_filter_pipeline_and_checks():
    steps = [M.check_filter({"function": "remove_whitespace"}), M.check_filter({"function": "lowercase"}),
             M.check_filter({"function": "take_first"})]
    assert M.apply_filters(["  ABC ", "x"], steps) == "abc"
    assert M.apply_filters(["a", "b", "a"], [M.check_filter({"function": "majority_vote"})]) == ["a"]
    with pytest.raises(ValueError, match="did you mean 'take_first'"):
        M.check_filter({"function": "take_frist"})
    with pytest.raises(ValueError, match="takes no argument"):
        M.check_filter({"function": "regex", "pattern": "x"})
    with pytest.raises(ValueError, match="bad regex_pattern"):
        M.check_filter({"function": "regex", "regex_pattern": "(unclosed"})
    with pytest.raises(ValueError, match="did you mean 'acc_norm'"):
        M.check_metric("acc_nrom")


# ---------------------------------------------------------------- pass@k

def _brute(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert M.pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_stable_and_bad_args():
    # closed form with exact integers: 1 - C(n-c, k)/C(n, k)
    n, c, k = 200, 13, 10
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert M.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    assert M.pass_at_k(5, 0, 1) == 0.0 and M.pass_at_k(5, 5, 5) == 1.0
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        M.pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        M.pass_at_k(3, 4, 1)


# ---------------------------------------------------------------- corpus metrics

def test_corpus_metrics_equal_lm_eval_aggregations():
    lm_metrics = pytest.importorskip("lm_eval.api.metrics")
    rng = random.Random(0)
    items = [(-rng.uniform(5, 100), float(rng.randint(3, 60))) for _ in range(40)]
    for name, fn in (("word_perplexity", lm_metrics.weighted_perplexity),
                     ("byte_perplexity", lm_metrics.weighted_perplexity),
                     ("bits_per_byte", lm_metrics.bits_per_byte)):
        assert M.aggregate(name, items).value() == pytest.approx(fn(items), rel=1e-12)
    lls = [ll for ll, _ in items]
    assert M.aggregate("perplexity", [(ll, 1.0) for ll in lls]).value() == pytest.approx(lm_metrics.perplexity(lls), rel=1e-12)
    # weighted, not a mean of per-document ratios
    mean_of_ratios = np.mean([-ll / w / math.log(2) for ll, w in items])
    assert abs(M.aggregate("bits_per_byte", items).value() - mean_of_ratios) > 1e-3


def test_counts_as_lm_eval():
    assert M.count_words("a  b\nc") == 3 and M.count_bytes("é") == 2


# ---------------------------------------------------------------- bootstrap, centered, core

def test_bootstrap_contains_value_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    widths = []
    for n in (40, 2000):
        vals = (rng.random(n) < 0.3).astype(float)
        s, reps = M.summarize(M.aggregate("acc", vals), iters=1000, seed=5)
        assert s["ci"][0] <= s["value"] <= s["ci"][1]
        assert s["n"] == n and len(reps) == 1000
        # bootstrap stderr of a mean is close to the analytic sqrt(p(1-p)/n)
        p = vals.mean()
        assert s["stderr"] == pytest.approx(math.sqrt(p * (1 - p) / n), rel=0.15)
        widths.append(s["ci"][1] - s["ci"][0])
        s2, reps2 = M.summarize(M.aggregate("acc", vals), iters=1000, seed=5)
        assert s2 == s and np.array_equal(reps2, reps)
        _, reps3 = M.summarize(M.aggregate("acc", vals), iters=1000, seed=6)
        assert not np.array_equal(reps3, reps)
    assert widths[1] < widths[0] / 3


def test_bootstrap_of_ratio_recomputes_the_ratio():
    items = np.array([(-10.0, 5.0), (-40.0, 10.0), (-3.0, 1.0)])
    agg = M.aggregate("bits_per_byte", items)
    idx = np.array([[0, 0, 2], [1, 1, 1]])
    got = agg.value(idx)
    assert got[0] == pytest.approx(23.0 / 11.0 / math.log(2))
    assert got[1] == pytest.approx(4.0 / math.log(2))
    s, reps = M.summarize(agg, iters=500, seed=0)
    assert s["ci"][0] <= s["value"] <= s["ci"][1]
    # a ratio of sums lies between the smallest and largest per-document ratio (2 and 4 nats per byte)
    assert reps.min() >= 2.0 / math.log(2) - 1e-9 and reps.max() <= 4.0 / math.log(2) + 1e-9


def test_summaries_of_tiny_sets():
    assert M.summarize(M.aggregate("acc", []))[0] == {"value": None, "ci": None, "stderr": None, "n": 0}
    s, _ = M.summarize(M.aggregate("acc", [1.0]))
    assert s["value"] == 1.0 and s["ci"] is None
    s, _ = M.summarize(M.aggregate("acc", [1.0, 0.0]), iters=0)
    assert s["value"] == 0.5 and s["ci"] is None


def test_centered_core_and_difference():
    assert M.centered("acc", 0.625, 0.25) == pytest.approx(0.5)
    assert M.centered("pass@1", 0.3, 0.0) == pytest.approx(0.3)
    assert M.centered("bits_per_byte", 1.2, 0.0) is None
    assert M.centered("acc", None, 0.25) is None
    c = M.core({"a": 0.5, "b": None, "c": 0.1}, {"a": np.full(10, 0.5), "c": np.full(10, 0.1)})
    assert c["value"] == pytest.approx(0.3) and c["tasks"] == ["a", "c"] and c["ci"] == [pytest.approx(0.3)] * 2
    assert M.core({"x": None})["value"] is None
    d = M.difference({"value": 0.6}, np.array([0.5, 0.7, 0.6]), {"value": 0.5}, np.array([0.5, 0.5, 0.5]))
    assert d["value"] == pytest.approx(0.1) and d["ci"][0] <= 0.1 <= d["ci"][1]


# ---- clustered bootstrap ----

def _correlated(n_clusters=40, size=9):
    """Clusters whose documents all agree (all right or all wrong): the effective sample is the clusters."""
    cl = np.repeat(np.arange(n_clusters), size)
    return cl, (cl % 2 == 0).astype(float)


def test_clustered_bootstrap_is_wider_by_about_sqrt_cluster_size():
    cl, v = _correlated(40, 9)
    agg = M.aggregate("acc", v)
    doc, _ = M.summarize(agg, 2000, 1)
    clu, _ = M.summarize(agg, 2000, 1, clusters=cl)
    assert doc["value"] == clu["value"] == 0.5
    ratio = clu["stderr"] / doc["stderr"]
    assert 2.5 < ratio < 3.5, ratio  # sqrt(9) = 3
    assert clu["ci"][1] - clu["ci"][0] > 2.5 * (doc["ci"][1] - doc["ci"][0])
    # the per-cluster standard error, by formula: sd of the 40 cluster means / sqrt(40)
    assert clu["stderr"] == pytest.approx(0.5 / np.sqrt(40), rel=0.1)
    # the cluster ids may come in any order and be any labels: only the grouping matters
    perm = np.random.default_rng(0).permutation(len(v))
    keys = [f"play{c}|s" for c in cl[perm]]
    clu2, _ = M.summarize(M.aggregate("acc", v[perm]), 2000, 1, clusters=M.cluster_ids(keys))
    assert clu2["stderr"] == pytest.approx(clu["stderr"], rel=0.1)


def test_singleton_clusters_give_the_per_document_bootstrap():
    v = (np.random.default_rng(3).random(200) < 0.3).astype(float)
    agg = M.aggregate("exact_match", v)
    a, ra = M.summarize(agg, 500, 7)
    b, rb = M.summarize(agg, 500, 7, clusters=M.cluster_ids(range(200)))
    assert a == b and np.array_equal(ra, rb)


def test_clustered_bootstrap_of_a_corpus_metric_and_edge_cases():
    cl, v = _correlated(30, 8)
    pairs = np.stack([-(1.0 + v) * 100, np.full_like(v, 100.0)], 1)  # (loglik, bytes): whole clusters good or bad
    agg = M.aggregate("bits_per_byte", pairs)
    doc, _ = M.summarize(agg, 1000, 0)
    clu, _ = M.summarize(agg, 1000, 0, clusters=cl)
    assert clu["value"] == pytest.approx(doc["value"]) and clu["stderr"] > 2.2 * doc["stderr"]
    one, reps = M.summarize(agg, 1000, 0, clusters=np.zeros(len(v), dtype=int))  # one cluster: no interval
    assert one["value"] == pytest.approx(doc["value"]) and one["ci"] is None and len(reps) == 0
    with pytest.raises(ValueError, match="3 cluster ids for 240 documents"):
        M.bootstrap(agg, 10, 0, clusters=[0, 1, 2])


def test_joint_bootstrap_moves_tasks_that_share_clusters_together():
    cl, v = _correlated(40, 6)
    keys = [f"s{c}" for c in cl]
    a = M.aggregate("acc", v)
    joint = M.joint_bootstrap({"x": (a, keys), "y": (a, keys)}, 1000, 5)
    assert np.array_equal(joint["x"], joint["y"])  # the same clusters drawn for both
    together = M.core({"x": 0.5, "y": 0.5}, joint)
    # drawn apart (independent replicates), the mean of two perfectly correlated tasks looks sqrt(2) surer
    apart = M.core({"x": 0.5, "y": 0.5}, {"x": M.bootstrap(a, 1000, 1, clusters=cl), "y": M.bootstrap(a, 1000, 2, clusters=cl)})
    w = lambda c: c["ci"][1] - c["ci"][0]
    single = M.summarize(a, 1000, 5, clusters=cl)[0]
    assert w(together) == pytest.approx(w(single), rel=0.15)
    assert w(apart) < 0.85 * w(together)
    # tasks with disjoint clusters: each part is its own clustered bootstrap (sd about the same)
    other = [f"t{c}" for c in cl]
    dj = M.joint_bootstrap({"x": (a, keys), "y": (a, other)}, 2000, 5)
    assert np.std(dj["x"]) == pytest.approx(single["stderr"], rel=0.2)
    assert abs(np.corrcoef(dj["x"], dj["y"])[0, 1]) < 0.15
    with pytest.raises(ValueError, match="2 cluster keys for 240 documents"):
        M.joint_bootstrap({"x": (a, ["a", "b"])}, 10, 0)
