"""harness: a fake LM (log-probabilities by string hash) drives every output type end to end; the
result object against schema.md; dev/gap, contamination, truncation, pass@k through a fake sandbox;
scores equal to lm-eval's own scoring of the same answers."""
import contextlib
import hashlib
import io
import json
import re
import math
from pathlib import Path

import numpy as np
import pytest

from lmforge.evaluate import harness
from lmforge.evaluate.lm import LM
from lmforge.evaluate.task import load_task

DATA = Path(__file__).parent / "data" / "eval"


def h(s: str) -> float:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little") / 2**64


def fake_ll(c, x):
    return -10.0 * h(c + "|" + x) - 0.1 * len(x), h(x) > 0.5


def fake_roll(t):
    return -0.5 * len(t) * (0.5 + h(t))


def fake_gen(c, g):
    if "def " in c:  # code: a right body for seeds 0 and 1, a wrong one otherwise
        right = c.rstrip().endswith('"""') and g.get("seed", 0) in (0, 1)
        body = {"add": "a + b", "neg": "-x", "sq": "x * x"}[c.split("def ")[-1].split("(")[0]]
        return f"    return {body}\n" if right else "    return None\n"
    q = c.rsplit("Q: What is ", 1)[-1].split("?")[0]
    a, b = (int(v) for v in q.split(" + "))
    return f" {a + b if h(c) > 0.3 else a + b + 1}\nQ:"


class HashLM(LM):
    name = "hash"
    params = 123

    def __init__(self, max_chars=10**9):
        super().__init__()
        self.calls = []
        self.max_chars = max_chars

    def _trunc(self, ctx):
        if len(ctx) > self.max_chars:
            self.stats["truncated"] += 1

    def loglikelihood(self, reqs):
        self.calls.append(("loglikelihood", len(reqs)))
        for c, _ in reqs:
            self._trunc(c)
        return [fake_ll(c, x) for c, x in reqs]

    def loglikelihood_rolling(self, reqs):
        self.calls.append(("loglikelihood_rolling", len(reqs)))
        return [fake_roll(t) for t in reqs]

    def generate_until(self, reqs):
        self.calls.append(("generate_until", len(reqs)))
        out = []
        for c, g in reqs:
            self._trunc(c)
            s = fake_gen(c, g)
            for u in g.get("until") or []:
                s = s.split(u)[0]
            out.append(s)
        return out


def _tasks(*names):
    ts = {t.name: t for t in load_task(DATA)}
    return [ts[n] for n in names]


METRIC_KEYS = {"value", "ci", "stderr", "n"}


def _check_metric(m, n):
    assert set(m) == METRIC_KEYS and m["n"] == n
    assert m["ci"][0] <= m["value"] <= m["ci"][1] and m["stderr"] >= 0


def test_end_to_end_every_output_type(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_PROGRESS", "off")
    lm = HashLM()
    tasks = _tasks("local_mc", "local_rolling", "local_addition", "inline_mc")
    r = harness.evaluate(lm, tasks, samples_dir=tmp_path / "samples", bootstrap=200)
    json.dumps(r, allow_nan=False)  # plain JSON
    assert r["lmforge_eval"] == 1 and set(r) == {"lmforge_eval", "model", "settings", "tasks", "aggregate", "elapsed_s"}
    assert r["model"] == {"name": "hash", "checkpoint": None, "params": 123}
    assert r["settings"] == {"tasks": ["local_mc", "local_rolling", "local_addition", "inline_mc"], "limit": None,
                             "num_fewshot": None, "bootstrap": 200, "seed": 0, "split": "test"}
    # one call per request kind per task (the LM batches)
    assert lm.calls == [("loglikelihood", 27), ("loglikelihood_rolling", 5), ("generate_until", 12), ("loglikelihood", 8)]

    # multiple choice, by hand: argmax of the fake log-likelihoods, and per character
    mc = r["tasks"]["local_mc"]
    assert set(mc) == {"output_type", "split", "n", "primary", "metrics", "random_baseline", "centered",
                       "truncated", "skipped", "samples"}
    docs = [json.loads(l) for l in (DATA / "mc_test.jsonl").read_text().splitlines()]
    acc, acc_norm = [], []
    for d in docs:
        ctx = f"Question: {d['question']}\nAnswer:"
        lls = [fake_ll(ctx, " " + c)[0] for c in d["choices"]]
        acc.append(float(np.argmax(lls) == d["label"]))
        acc_norm.append(float(np.argmax([ll / len(c) for ll, c in zip(lls, d["choices"])]) == d["label"]))
    assert mc["metrics"]["acc"]["value"] == pytest.approx(np.mean(acc))
    assert mc["metrics"]["acc_norm"]["value"] == pytest.approx(np.mean(acc_norm))
    for m in mc["metrics"].values():
        _check_metric(m, 8)
    rb = np.mean([1 / len(d["choices"]) for d in docs])
    assert mc["random_baseline"] == pytest.approx(rb)
    assert mc["centered"] == pytest.approx((np.mean(acc) - rb) / (1 - rb))

    # rolling: weighted over the corpus
    roll = r["tasks"]["local_rolling"]
    texts = [json.loads(l)["text"] for l in (DATA / "rolling_test.jsonl").read_text().splitlines()]
    lls = [fake_roll(t) for t in texts]
    nbytes = sum(len(t.encode()) for t in texts)
    words = sum(len(t.split()) for t in texts)
    assert roll["metrics"]["bits_per_byte"]["value"] == pytest.approx(-sum(lls) / nbytes / math.log(2))
    assert roll["metrics"]["byte_perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / nbytes))
    assert roll["metrics"]["word_perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / words))
    assert roll["centered"] is None and roll["random_baseline"] is None

    # generation: the regex filter takes the number, exact match against the answer
    gen = r["tasks"]["local_addition"]
    lines = [json.loads(l) for l in (tmp_path / "samples" / "local_addition.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and gen["samples"] == "samples/local_addition.jsonl"
    want = []
    for ln in lines:
        assert set(ln) >= {"doc_id", "split", "doc", "prompt", "target", "requests", "responses", "filtered", "metrics", "truncated"}
        assert ln["target"] == ln["doc"]["answer"] and ln["truncated"] is False and ln["split"] == "test"
        want.append(float(ln["filtered"][0] == ln["target"]))
        assert ln["filtered"][0] == ln["responses"][0].strip()
        assert ln["metrics"]["exact_match"] == want[-1]
    assert 0 < np.mean(want) < 1
    assert gen["metrics"]["exact_match"]["value"] == pytest.approx(np.mean(want))
    assert gen["random_baseline"] == 0.0 and gen["centered"] == pytest.approx(np.mean(want))

    # the aggregate: mean of centered over the tasks that have one
    cen = {k: v["centered"] for k, v in r["tasks"].items() if v["centered"] is not None}
    core = r["aggregate"]["core"]
    assert core["tasks"] == list(cen) and core["value"] == pytest.approx(np.mean(list(cen.values())))
    assert core["ci"][0] <= core["value"] <= core["ci"][1]
    assert r["tasks"]["inline_mc"]["random_baseline"] == 0.5  # from the definition


def test_deterministic_and_seeded(monkeypatch):
    t = _tasks("local_mc")
    a = harness.evaluate(HashLM(), t, progress=False, bootstrap=100, seed=3)
    b = harness.evaluate(HashLM(), t, progress=False, bootstrap=100, seed=3)
    c = harness.evaluate(HashLM(), t, progress=False, bootstrap=100, seed=4)
    strip = lambda r: {k: v for k, v in r.items() if k != "elapsed_s"}
    assert strip(a) == strip(b)
    assert a["tasks"]["local_mc"]["metrics"]["acc"]["stderr"] != c["tasks"]["local_mc"]["metrics"]["acc"]["stderr"]


def test_limit_fewshot_override_and_dev_split():
    lm = HashLM()
    r = harness.evaluate(lm, _tasks("local_addition"), limit=5, num_fewshot=0, progress=False)
    assert r["tasks"]["local_addition"]["n"] == 5 and lm.calls == [("generate_until", 5)]
    r = harness.evaluate(HashLM(), _tasks("local_mc"), limit=0.5, progress=False)
    assert r["tasks"]["local_mc"]["n"] == 4
    r = harness.evaluate(HashLM(), _tasks("inline_mc"), split="dev", progress=False)
    assert r["tasks"]["inline_mc"]["split"] == "dev" and r["tasks"]["inline_mc"]["n"] == 3


def test_split_both_reports_dev_and_gap(tmp_path):
    r = harness.evaluate(HashLM(), _tasks("inline_mc"), split="both", samples_dir=tmp_path / "s", progress=False)
    e = r["tasks"]["inline_mc"]
    assert e["split"] == "test" and e["n"] == 4 and e["dev"]["split"] == "dev" and e["dev"]["n"] == 3
    g = e["gap"]["acc"]
    assert g["value"] == pytest.approx(e["metrics"]["acc"]["value"] - e["dev"]["metrics"]["acc"]["value"])
    assert g["ci"][0] <= g["value"] <= g["ci"][1]
    lines = [json.loads(l) for l in (tmp_path / "s" / "inline_mc.jsonl").read_text().splitlines()]
    assert [l["split"] for l in lines] == ["test"] * 4 + ["dev"] * 3


def test_contamination_scores_the_clean_subset():
    seen = {}

    def dirty(name, texts):
        seen[name] = texts
        return [i % 3 == 0 for i in range(len(texts))]

    r = harness.evaluate(HashLM(), _tasks("local_mc"), dirty=dirty, progress=False, samples_dir=None)
    e = r["tasks"]["local_mc"]
    assert seen["local_mc"][0] == "Question: What colour is the sky on a clear day?\nAnswer:"
    assert e["contamination"]["clean"] == 5 and e["contamination"]["dirty"] == 3
    full = harness.score_split(HashLM(), _tasks("local_mc")[0], "test", bootstrap=0)
    clean = [l["metrics"]["acc"] for i, l in enumerate(full["lines"]) if i % 3 != 0]
    assert e["contamination"]["metrics_clean"]["acc"]["value"] == pytest.approx(np.mean(clean))
    assert e["contamination"]["metrics_clean"]["acc"]["n"] == 5
    with pytest.raises(ValueError, match="returned 1 flags for 8 documents"):
        harness.evaluate(HashLM(), _tasks("local_mc"), dirty=lambda n, t: [False], progress=False)


def test_truncation_counted_per_task(tmp_path):
    lm = HashLM(max_chars=30)
    r = harness.evaluate(lm, _tasks("local_addition", "inline_mc"), num_fewshot=0, samples_dir=tmp_path, progress=False)
    # "Q: What is NNN + NNN?\nA:" is 24 characters at most: no addition prompt is cut; 2-shot ones are
    assert r["tasks"]["local_addition"]["truncated"] == 0 and r["tasks"]["inline_mc"]["truncated"] == 0
    lm = HashLM(max_chars=30)
    r = harness.evaluate(lm, _tasks("local_addition", "inline_mc"), samples_dir=tmp_path, progress=False)
    assert r["tasks"]["local_addition"]["truncated"] == 12 and r["tasks"]["inline_mc"]["truncated"] == 0
    assert lm.stats["truncated"] == 12
    line = json.loads((tmp_path / "local_addition.jsonl").read_text().splitlines()[0])
    assert line["truncated"] is None  # some were cut, which ones the LM's counter does not say


class _Outcome:
    def __init__(self, passed, stdout=""):
        self.passed, self.stdout = passed, stdout


def _fake_sandbox(monkeypatch, ran, calls=None, isolation=None):
    """The real sandbox module with its runner replaced (patching sys.modules would not reach a module
    already imported as an attribute of lmforge.evaluate): programs exec here, fixture programs only."""
    from lmforge.evaluate import sandbox

    def run_python(code, limits, **kw):
        ran.append((code, limits, kw))
        env, out = {}, io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(code, "<sample>", "exec"), env)  # the fixture's own tiny programs only
            return _Outcome(True, out.getvalue())
        except SystemExit as e:  # as a process would: exit code 0 (or None) is a pass
            return _Outcome(e.code in (0, None), out.getvalue())
        except Exception:
            return _Outcome(False, out.getvalue())

    def run_many(codes, limits, workers=2, **kw):
        if calls is not None:
            calls.append((len(codes), limits, workers, kw))
        return [run_python(c, limits, **kw) for c in codes]

    monkeypatch.setattr(sandbox, "run_many", run_many)
    monkeypatch.setattr(sandbox, "run_python", run_python)
    monkeypatch.setattr(sandbox, "network_isolation", lambda: isolation)
    return sandbox


def test_pass_at_k_through_the_sandbox(monkeypatch, tmp_path):
    ran, calls = [], []
    sandbox = _fake_sandbox(monkeypatch, ran, calls)
    r = harness.evaluate(HashLM(), _tasks("local_code"), samples_dir=tmp_path, progress=False, allow_network=True,
                         sandbox_workers=3)
    e = r["tasks"]["local_code"]
    # 5 samples per problem, 2 right (seeds 0 and 1): pass@1 = 2/5, pass@5 = 1
    assert e["metrics"]["pass@1"]["value"] == pytest.approx(0.4)
    assert e["metrics"]["pass@5"]["value"] == pytest.approx(1.0)
    assert e["primary"] == "pass@1" and e["centered"] == pytest.approx(0.4)
    # each distinct program once, in one run_many call with the workers asked for and the task's
    # timeout_s (5) as the wall-clock and CPU limits: prompt + completion + "\n" + test
    lim = sandbox.Limits(wall_s=5.0, cpu_s=5.0)
    assert calls == [(6, lim, 3, {"allow_network": True})]
    assert len(ran) == 6
    # and then the run's marker, printed only once the tests are through
    progs = [c for c, li, kw in ran if li == lim and kw == {"allow_network": True}]
    assert any(re.fullmatch('def add\\(a, b\\):\n    """Return a \\+ b."""\n    return a \\+ b\n\nassert add\\(2, 3\\) == 5'
                            "\nprint\\('lmforge-tests-done-[0-9a-f]{16}'\\)\n", c) for c in progs)
    assert e["sandbox"] == {"passed": 3, "failed": 3}
    line = json.loads((tmp_path / "local_code.jsonl").read_text().splitlines()[0])
    assert line["passed"] == [True, True, False, False, False] and len(line["responses"]) == 5
    assert line["status"] == ["passed", "passed", "failed", "failed", "failed"]


def test_pass_at_k_omitted_where_n_is_below_k(monkeypatch):
    _fake_sandbox(monkeypatch, [])
    t = _tasks("local_code")[0]
    t.repeats = 3
    r = harness.evaluate(HashLM(), [t], progress=False)
    e = r["tasks"]["local_code"]
    assert "pass@5" not in e["metrics"] and "needs n >= 5" in e["omitted"]["pass@5"]
    assert e["metrics"]["pass@1"]["value"] == pytest.approx(2 / 3)


def test_scores_equal_lm_eval_scoring_of_the_same_answers(monkeypatch):
    """lm-eval's ConfigurableTask (its filters and process_results) on the fake LM's answers."""
    pytest.importorskip("lm_eval")
    import logging

    import yaml
    from lm_eval.api.task import ConfigurableTask

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(DATA)
    logging.disable(logging.WARNING)
    try:
        for name, fname in (("local_mc", "mc.yaml"), ("local_addition", "gen.yaml"), ("local_rolling", "rolling.yaml"),
                            ("local_wino", "wino.yaml")):
            lt = ConfigurableTask(config=yaml.safe_load((DATA / fname).read_text()))
            lt.set_fewshot_seed(1234)
            lt.build_all_requests(limit=None, rank=0, world_size=1)
            for inst in lt.instances:
                a = inst.arguments
                if inst.request_type == "loglikelihood":
                    inst.resps.append(fake_ll(*a))
                elif inst.request_type == "loglikelihood_rolling":
                    inst.resps.append(fake_roll(a[0]))
                else:
                    s = fake_gen(*a)
                    for u in a[1]["until"]:
                        s = s.split(u)[0]
                    inst.resps.append(s)
            lt.apply_filters()
            key = next(iter(lt.instances[0].filtered_resps))
            by_doc = {}
            for inst in lt.instances:
                by_doc.setdefault(inst.doc_id, []).append(inst)
            theirs = []
            for doc_id in sorted(by_doc):
                reqs = sorted(by_doc[doc_id], key=lambda i: i.idx)
                theirs.append(lt.process_results(reqs[0].doc, [i.filtered_resps[key] for i in reqs]))
            mine = harness.score_split(HashLM(), _tasks(name)[0], "test", bootstrap=0)["lines"]
            assert len(mine) == len(theirs)
            for m, t in zip(mine, theirs):
                for k, v in t.items():
                    if isinstance(v, tuple):  # (loglik, words or bytes)
                        assert m["metrics"][k] == pytest.approx(list(v), rel=1e-12), (name, k)
                    else:
                        assert m["metrics"][k] == float(v), (name, k)
    finally:
        logging.disable(logging.NOTSET)


def test_bad_arguments_and_a_failing_model_keep_earlier_logs(tmp_path):
    t = _tasks("local_mc")
    for kw, msg in (({"split": "private"}, "split: 'private'"), ({"limit": 0}, "limit"), ({"limit": 1.0}, "limit"), ({"bootstrap": -1}, "bootstrap"),
                    ({"num_fewshot": -2}, "num_fewshot"), ({"dirty": 3}, "dirty")):
        with pytest.raises(ValueError, match=msg):
            harness.evaluate(HashLM(), t, progress=False, **kw)
    with pytest.raises(ValueError, match="expected an lmforge.evaluate.lm.LM"):
        harness.evaluate(object(), t, progress=False)
    harness.evaluate(HashLM(), t, samples_dir=tmp_path, progress=False)
    before = (tmp_path / "local_mc.jsonl").read_bytes()

    class Broken(HashLM):
        def loglikelihood(self, reqs):
            return super().loglikelihood(reqs)[:-1]

    with pytest.raises(RuntimeError, match="answered 26 of 27 requests"):
        harness.evaluate(Broken(), t, samples_dir=tmp_path, progress=False)
    assert (tmp_path / "local_mc.jsonl").read_bytes() == before
    with pytest.raises(NotImplementedError, match="cannot generate"):
        harness.evaluate(LM(), _tasks("local_addition"), progress=False)


def _need_isolation(sandbox):
    why = sandbox.network_isolation()
    if why is not None:
        from conftest import in_ci

        if in_ci():  # CI runs the real sandbox or fails
            pytest.fail(f"sandbox unavailable here: {why}; CI does not skip the real-sandbox tests")
        pytest.skip(f"sandbox unavailable here: {why}")


def test_pass_at_k_in_the_real_sandbox_survives_a_loop():
    """Right bodies for seed 0, a wrong one for seeds 1-3, an endless loop for seed 4: the loop is
    stopped and scored as a failure, and the run goes on."""
    sandbox = pytest.importorskip("lmforge.evaluate.sandbox")
    _need_isolation(sandbox)

    class Oracle(HashLM):
        def generate_until(self, reqs):
            out = []
            for c, g in reqs:
                body = {"add": "a + b", "neg": "-x", "sq": "x * x"}[c.split("def ")[-1].split("(")[0]]
                seed = g.get("seed", 0)
                out.append(f"    return {body}\n" if seed == 0 else "    while True:\n        pass\n" if seed == 4
                           else "    return 0\n")
            return out

    t = _tasks("local_code")[0]
    t.code = {**t.code, "timeout_s": 1}
    r = harness.evaluate(Oracle(), [t], progress=False)
    e = r["tasks"]["local_code"]
    assert e["metrics"]["pass@1"]["value"] == pytest.approx(0.2)
    assert e["metrics"]["pass@5"]["value"] == pytest.approx(1.0)
    assert e["sandbox"]["passed"] == 3 and e["sandbox"]["failed"] == 3
    assert sum(v for k, v in e["sandbox"].items() if k in ("timeout", "cpu_limit")) == 3


def test_non_finite_log_likelihoods_stay_valid_json(tmp_path):
    class Inf(HashLM):
        def loglikelihood_rolling(self, reqs):
            return [float("-inf")] + [fake_roll(t) for t in reqs[1:]]

    r = harness.evaluate(Inf(), _tasks("local_rolling"), samples_dir=tmp_path, progress=False)
    json.dumps(r, allow_nan=False)
    assert r["tasks"]["local_rolling"]["metrics"]["bits_per_byte"] == {"value": None, "ci": None, "stderr": None, "n": 5}
    first = json.loads((tmp_path / "local_rolling.jsonl").read_text().splitlines()[0])
    assert first["responses"] == [None]


def test_rolling_token_perplexity_needs_token_counts():
    t = _tasks("local_rolling")[0]
    t.metrics = [("perplexity", {}), ("bits_per_byte", {})]
    t.primary_metric = "perplexity"
    lm = HashLM()
    with pytest.raises(ValueError, match="no count_tokens"):
        harness.evaluate(lm, [t], progress=False)
    assert lm.calls == []  # refused before the model ran

    class Counting(HashLM):
        def count_tokens(self, text):
            return len(text.split())

    r = harness.evaluate(Counting(), [t], progress=False, bootstrap=0)
    texts = [json.loads(l)["text"] for l in (DATA / "rolling_test.jsonl").read_text().splitlines()]
    want = math.exp(-sum(fake_roll(x) for x in texts) / sum(len(x.split()) for x in texts))
    assert r["tasks"]["local_rolling"]["metrics"]["perplexity"]["value"] == pytest.approx(want)


def test_apply_chat_template_renders_every_prompt(tmp_path):
    class Chat(HashLM):
        def apply_chat_template(self, messages):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"

    r = harness.evaluate(Chat(), _tasks("inline_mc"), apply_chat_template=True, samples_dir=tmp_path, progress=False)
    assert r["settings"]["apply_chat_template"] is True
    line = json.loads((tmp_path / "inline_mc.jsonl").read_text().splitlines()[0])
    assert line["prompt"] == "[user]Sun rises in the[assistant]"
    assert line["requests"] == [["[user]Sun rises in the[assistant]", "east"], ["[user]Sun rises in the[assistant]", "west"]]
    with pytest.raises(NotImplementedError, match="has no chat template"):
        harness.evaluate(HashLM(), _tasks("inline_mc"), apply_chat_template=True, progress=False)


# ---- clustered bootstrap through the harness ----

class YesLM(HashLM):
    """Answers "yes" to every question: right exactly on the documents of even clusters."""

    def generate_until(self, reqs):
        self.calls.append(("generate_until", len(reqs)))
        return [" yes" for _ in reqs]


def _cluster_task(tmp_path, name="clustered", unit='["grp"]', n_clusters=30, size=8, extra=""):
    rows = [{"task": name, "output_type": "generate_until", "doc_to_text": "Q{{grp}}.{{i}}:", "doc_to_target": "{{answer}}",
             "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4}, "test_split": "test", "validation_split": "dev",
             "filter_list": [{"name": "s", "filter": [{"function": "strip"}, {"function": "take_first"}]}]}]
    if unit is not None:
        rows[0]["bootstrap_unit"] = json.loads(unit)
    for split, off in (("test", 0), ("dev", 1000)):
        for g in range(n_clusters):
            for i in range(size):
                rows.append({"grp": off + g, "grp2": off + g, "i": i, "answer": "yes" if g % 2 == 0 else "no", "split": split})
    p = tmp_path / f"{name}.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return load_task(p)[0]


def test_bootstrap_unit_widens_every_interval(tmp_path):
    flat = _cluster_task(tmp_path, "flat", unit=None)
    clus = _cluster_task(tmp_path, "clus")
    dirty = lambda name, texts: [i % 4 == 0 for i in range(len(texts))]
    r = harness.evaluate(YesLM(), [flat, clus], split="both", bootstrap=2000, dirty=dirty, progress=False,
                         samples_dir=tmp_path / "s")
    f, c = r["tasks"]["flat"], r["tasks"]["clus"]
    assert "bootstrap_unit" not in f and c["bootstrap_unit"] == ["grp"] and c["clusters"] == 30 and c["dev"]["clusters"] == 30
    se = lambda e: e["metrics"]["exact_match"]["stderr"]
    width = lambda ci: ci[1] - ci[0]
    assert f["metrics"]["exact_match"]["value"] == c["metrics"]["exact_match"]["value"] == 0.5
    assert 2.2 < se(c) / se(f) < 3.5  # sqrt(8) = 2.8: 30 independent clusters, not 240 documents
    assert 2.2 < c["dev"]["metrics"]["exact_match"]["stderr"] / f["dev"]["metrics"]["exact_match"]["stderr"] < 3.5
    assert width(c["gap"]["exact_match"]["ci"]) > 2.2 * width(f["gap"]["exact_match"]["ci"])
    cm, fm = c["contamination"]["metrics_clean"]["exact_match"], f["contamination"]["metrics_clean"]["exact_match"]
    assert cm["n"] == fm["n"] == 180 and cm["stderr"] > 2 * fm["stderr"]
    line = json.loads((tmp_path / "s" / "clus.jsonl").read_text().splitlines()[0])
    assert line["unit"] == "[0]" and "unit" not in json.loads((tmp_path / "s" / "flat.jsonl").read_text().splitlines()[0])


def test_core_interval_draws_shared_clusters_jointly(tmp_path):
    """Two tasks on the same clusters (same unit): the CORE interval is as wide as one task's, as it must
    be when they are perfectly correlated; with different units (drawn apart) it is about sqrt(2) narrower."""
    a = _cluster_task(tmp_path, "a")
    b = _cluster_task(tmp_path, "b")
    b2 = _cluster_task(tmp_path, "b2", unit='["grp2"]')
    width = lambda ci: ci[1] - ci[0]
    r = harness.evaluate(YesLM(), [a, b], bootstrap=2000, progress=False)
    core = r["aggregate"]["core"]
    assert core["joint_clusters"] == [["a", "b"]] and core["value"] == pytest.approx(0.5)
    one = r["tasks"]["a"]["metrics"]["exact_match"]["ci"]
    assert width(core["ci"]) == pytest.approx(width(one), rel=0.2)
    r2 = harness.evaluate(YesLM(), [a, b2], bootstrap=2000, progress=False)
    assert "joint_clusters" not in r2["aggregate"]["core"]
    assert width(r2["aggregate"]["core"]["ci"]) < 0.85 * width(core["ci"])


def test_bootstrap_unit_bad_definitions(tmp_path):
    from lmforge.evaluate.task import TaskError

    for unit, msg in (("3", "bootstrap_unit': expected a document field name"), ("[]", "bootstrap_unit"),
                      ('["grp", 1]', "bootstrap_unit")):
        with pytest.raises(TaskError, match=msg):
            _cluster_task(tmp_path, "bad", unit=unit)
    t = _cluster_task(tmp_path, "missing", unit='["grpp"]')
    with pytest.raises(TaskError, match=r"missing.jsonl:2: .*bootstrap_unit: field 'grpp' missing.*did you mean 'grp'"):
        harness.evaluate(YesLM(), [t], progress=False)


def test_builtin_task_records_the_split_fingerprint_never_the_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    from lmforge.evaluate import builtin
    from lmforge.evaluate.task import load_tasks

    r = harness.evaluate(HashLM(), load_tasks(["addition"]) + _tasks("inline_mc"), split="both", limit=4,
                         bootstrap=50, samples_dir=tmp_path / "s", progress=False)
    e = r["tasks"]["addition"]
    fp = builtin.fingerprint("private")
    assert e["split"] == "private" and e["split_fingerprint"] == fp and len(fp) == 12
    assert e["dev"]["split_fingerprint"] == builtin.fingerprint("dev")
    assert "split_fingerprint" not in r["tasks"]["inline_mc"]  # its own documents: no seed behind them
    seed = builtin.private_seed()
    assert seed not in json.dumps(r) and seed not in (tmp_path / "s" / "addition.jsonl").read_text()
    # another machine's seed: another fingerprint
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home2"))
    r2 = harness.evaluate(HashLM(), load_tasks(["addition"]), limit=2, bootstrap=0, progress=False)
    assert r2["tasks"]["addition"]["split_fingerprint"] not in (fp, None)


# ---- pass@k: limits, workers, a sandbox that refuses ----

def test_sandbox_limits_from_the_code_field():
    from lmforge.evaluate import sandbox

    L = sandbox.Limits
    assert harness.sandbox_limits({"timeout_s": 3}) == L(wall_s=3.0, cpu_s=3.0)
    assert harness.sandbox_limits({"timeout_s": 3, "cpu_s": 1, "memory_mb": 256, "nproc": 4, "fsize_mb": 2}) == \
        L(wall_s=3.0, cpu_s=1, memory_mb=256, nproc=4, fsize_mb=2)
    assert harness.sandbox_limits({"wall_s": 7, "test_field": "t"}) == L(wall_s=7, cpu_s=7.0)
    assert harness.sandbox_limits({}) == L()
    with pytest.raises(ValueError, match="code: Limits.memory_mb=16"):
        harness.sandbox_limits({"memory_mb": 16})


def test_code_limits_reach_the_sandbox_and_bad_ones_are_task_errors(monkeypatch, tmp_path):
    from lmforge.evaluate.task import TaskError

    calls = []
    sandbox = _fake_sandbox(monkeypatch, [], calls)
    src = (DATA / "code.yaml").read_text()
    for code, msg in (("{test_field: test, timeout_s: 0}", "code.timeout_s': expected a positive number"),
                      ("{test_field: test, timeout_s: 2, wall_s: 3}", "timeout_s \\(2\\) and wall_s \\(3\\)"),
                      ("{test_field: test, timout_s: 2}", "unknown key\\(s\\) \\['timout_s'\\]")):
        p = tmp_path / "c.yaml"
        p.write_text(src.replace("code: {test_field: test, entry_point_field: entry_point, timeout_s: 5}", f"code: {code}")
                     .replace("docs: {test: code_test.jsonl}", f"docs: {{test: {DATA / 'code_test.jsonl'}}}"))
        with pytest.raises(TaskError, match=msg):
            load_task(p)
    t = _tasks("local_code")[0]
    t.code = {**t.code, "timeout_s": 2, "memory_mb": 300, "nproc": 3}
    harness.evaluate(HashLM(), [t], progress=False, bootstrap=0)
    assert calls == [(6, sandbox.Limits(wall_s=2.0, cpu_s=2.0, memory_mb=300, nproc=3), 2, {"allow_network": False})]
    with pytest.raises(ValueError, match="sandbox_workers"):
        harness.evaluate(HashLM(), [t], progress=False, sandbox_workers=0)


def test_a_sandbox_that_refuses_stops_the_task_before_the_model_runs(monkeypatch):
    calls = []
    sandbox = _fake_sandbox(monkeypatch, [], calls, isolation="user namespaces are disabled")
    lm = HashLM()
    with pytest.raises(sandbox.SandboxUnavailable, match=r"code.yaml: task 'local_code': pass@k .*user namespaces "
                                                         r"are disabled.*allow_network=True"):
        harness.evaluate(lm, _tasks("local_code"), progress=False)
    assert lm.calls == [] and calls == []  # nothing generated, nothing run
    r = harness.evaluate(HashLM(), _tasks("local_code"), progress=False, allow_network=True, bootstrap=0)  # the opt-in
    assert r["tasks"]["local_code"]["metrics"]["pass@1"]["value"] == pytest.approx(0.4)
    assert calls[0][3] == {"allow_network": True}

    def refuse(codes, limits, workers=2, **kw):  # refused mid-run (the probe said yes): named, not a sample's failure
        raise sandbox.SandboxUnavailable("refusing to run generated code: gone")

    monkeypatch.setattr(sandbox, "network_isolation", lambda: None)
    monkeypatch.setattr(sandbox, "run_many", refuse)
    with pytest.raises(sandbox.SandboxUnavailable, match="task 'local_code': refusing to run generated code: gone"):
        harness.evaluate(HashLM(), _tasks("local_code"), progress=False)


def test_a_completion_that_exits_before_the_tests_is_not_a_pass(monkeypatch):
    """``exit()`` after the body ends the program with status 0 before any assert ran: a failure."""
    ran = []
    _fake_sandbox(monkeypatch, ran)

    class Quitter(HashLM):
        def generate_until(self, reqs):
            return ["    return None\nraise SystemExit(0)\n" if g.get("seed", 0) < 3 else "    return None\n" for c, g in reqs]

    r = harness.evaluate(Quitter(), _tasks("local_code"), progress=False, allow_network=True, bootstrap=0)
    e = r["tasks"]["local_code"]
    assert e["metrics"]["pass@1"]["value"] == 0.0 and e["metrics"]["pass@5"]["value"] == 0.0
    assert e["sandbox"] == {"exited_early": 3, "failed": 3}


def test_exit_before_the_tests_in_the_real_sandbox():
    sandbox = pytest.importorskip("lmforge.evaluate.sandbox")
    _need_isolation(sandbox)
    t = _tasks("local_code")[0]
    d = t.docs("test")[0]
    run = harness._sandbox_runner(t)
    progs = [harness._program(t, d, c) for c in ("    return a + b\n", "    return 0\nimport sys; sys.exit(0)\n",
                                                 "    return 0\n")]
    assert run(progs) == [(True, "passed"), (False, "exited_early"), (False, "failed")]
