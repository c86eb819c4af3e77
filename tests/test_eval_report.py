"""The evaluation report: result.json, the scorecard and its chart, load, compare (paired and unpaired).

Hand-made result objects (the schema of docs/evaluation.md / harness) with per-sample logs whose
numbers are known, so every figure the report prints can be checked."""
import json
import math
import sys

import pytest

from lmforge.evaluate import report


def _task_rows(task, correct, split="private", prompt=lambda i: f"Q{i}", metric="exact_match"):
    return [{"doc_id": i, "split": split, "doc": {"i": i}, "prompt": prompt(i), "target": "t",
             "requests": [[prompt(i), {}]], "responses": ["r"], "filtered": ["r"],
             "metrics": {metric: float(c)}, "truncated": False} for i, c in enumerate(correct)]


def make_result(correct, name="m", with_samples=True, prompt=lambda i: f"Q{i}"):
    """A result with three tasks: addition (generation, per-sample logs from ``correct``), choice
    (multiple choice with dev, gap and contamination) and ppl (bits per byte: unbounded)."""
    n = len(correct)
    v = sum(correct) / n
    se = math.sqrt(v * (1 - v) / n)
    res = {
        "lmforge_eval": 1,
        "model": {"name": name, "checkpoint": f"/runs/{name}/model", "params": 12345},
        "settings": {"tasks": ["addition", "choice", "ppl"], "limit": None, "num_fewshot": None,
                     "bootstrap": 1000, "seed": 0, "split": "both"},
        "tasks": {
            "addition": {"output_type": "generate_until", "split": "private", "n": n, "primary": "exact_match",
                         "metrics": {"exact_match": {"value": v, "ci": [v - 1.96 * se, v + 1.96 * se],
                                                     "stderr": se, "n": n}},
                         "random_baseline": 0.0, "centered": v, "truncated": 0, "skipped": 0,
                         "omitted": {"pass@5": "pass@5 needs n >= 5 samples per problem; 40 of 40 have fewer"}},
            "choice": {"output_type": "multiple_choice", "split": "private", "n": 200, "primary": "acc",
                       "metrics": {"acc": {"value": 0.41, "ci": [0.34, 0.48], "stderr": 0.035, "n": 200},
                                   "acc_norm": {"value": 0.38, "ci": [0.31, 0.45], "stderr": 0.035, "n": 200}},
                       "random_baseline": 0.25, "centered": (0.41 - 0.25) / 0.75,
                       "dev": {"split": "dev", "n": 200,
                               "metrics": {"acc": {"value": 0.43, "ci": [0.36, 0.5], "stderr": 0.035, "n": 200}}},
                       "gap": {"acc": {"value": -0.02, "ci": [-0.1, 0.06]}},
                       "contamination": {"clean": 190, "dirty": 10,
                                         "metrics_clean": {"acc": {"value": 0.4, "ci": [0.33, 0.47], "n": 190}}},
                       "truncated": 3, "skipped": 1},
            "ppl": {"output_type": "loglikelihood_rolling", "split": "test", "n": 5, "primary": "bits_per_byte",
                    "metrics": {"bits_per_byte": {"value": 2.1234, "ci": [2.0, 2.25], "stderr": 0.06, "n": 5}},
                    "random_baseline": None, "centered": None, "truncated": 0, "skipped": 0}},
        "aggregate": {"core": {"value": (v + (0.41 - 0.25) / 0.75) / 2, "ci": [0.1, 0.3],
                               "tasks": ["addition", "choice"]}},
        "elapsed_s": 12.3}
    samples = {"addition": _task_rows("addition", correct, prompt=prompt)} if with_samples else None
    return res, samples


A_CORRECT = [1] * 18 + [0] * 22          # 18/40 = 0.45
B_BETTER = [1] * 18 + [1] * 12 + [0] * 10  # the same 18 right and 12 more: 30/40 = 0.75


def test_write_files_and_scorecard_content(tmp_path):
    res, samples = make_result(A_CORRECT)
    paths = report.write(res, tmp_path / "ev", samples=samples)
    out = tmp_path / "ev"
    assert paths["result"] == out / "result.json" and paths["scorecard"] == out / "scorecard.md"
    back = json.loads((out / "result.json").read_text())
    assert back["tasks"]["addition"]["samples"] == "samples/addition.jsonl"  # the log's path, relative
    back["tasks"]["addition"].pop("samples")
    assert back == res and "samples" not in res["tasks"]["addition"]  # the caller's object is not changed
    lines = (out / "samples" / "addition.jsonl").read_text().splitlines()
    assert [json.loads(x)["metrics"]["exact_match"] for x in lines] == A_CORRECT
    md = (out / "scorecard.md").read_text()
    rows = {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[1:-1]] for l in md.splitlines()
            if l.startswith("| ") and not l.startswith("| task") and not l.startswith("| metric")}
    head = [c.strip() for c in next(l for l in md.splitlines() if l.startswith("| task")).split("|")[1:-1]]
    add = dict(zip(head, rows["addition"]))
    lo, hi = res["tasks"]["addition"]["metrics"]["exact_match"]["ci"]
    assert add["split"] == "private" and add["n"] == "40" and add["metric"] == "exact_match"
    assert add["score"] == f"0.450 [{lo:.3f}, {hi:.3f}]" and add["centered"] == "0.450" and add["baseline"] == "0.000"
    assert add["dev"] == "-" and add["clean/dirty"] == "-"
    ch = dict(zip(head, rows["choice"]))
    assert ch["score"] == "0.410 [0.340, 0.480]" and ch["centered"] == "0.213" and ch["baseline"] == "0.250"
    assert ch["dev"] == "0.430 [0.360, 0.500] (dev)" and ch["gap"] == "-0.020 [-0.100, 0.060]"
    assert ch["clean/dirty"] == "190/10" and ch["clean score"] == "0.400 [0.330, 0.470]"
    assert ch["truncated"] == "3" and ch["skipped"] == "1"
    pp = dict(zip(head, rows["ppl"]))
    assert pp["score"] == "2.123 [2.000, 2.250]" and pp["centered"] == "-" and pp["baseline"] == "-"
    core = res["aggregate"]["core"]["value"]
    assert f"CORE (mean centered score over 2 tasks: addition, choice): **{core:.3f}** [0.100, 0.300]" in md
    # per-task detail: every metric, the primary marked, the dev/gap/clean columns where present
    assert "| acc_norm | 0.380 [0.310, 0.450] | 0.035 | 200 | - | - | - |" in md
    assert "| acc (primary) | 0.410 [0.340, 0.480] | 0.035 | 200 | 0.430 [0.360, 0.500] |" in md
    assert "clean subset (190 clean, 10 dirty)" in md
    assert "- pass@5 not reported: pass@5 needs n >= 5 samples per problem" in md
    assert "model `m`; checkpoint `/runs/m/model`; 12,345 parameters. Settings: split both" in md


def test_chart_is_a_png_or_its_absence_is_said(tmp_path, monkeypatch):
    res, _ = make_result(A_CORRECT, with_samples=False)
    try:
        import matplotlib  # noqa: F401
        have = True
    except ImportError:
        have = False
    if have:
        paths = report.write(res, tmp_path / "a")
        png = paths["chart"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
        assert "![primary scores with 95% intervals](scorecard.png)" in (tmp_path / "a" / "scorecard.md").read_text()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    paths = report.write(res, tmp_path / "b")
    assert "chart" not in paths and not (tmp_path / "b" / "scorecard.png").exists()
    assert "chart skipped: matplotlib is not installed" in (tmp_path / "b" / "scorecard.md").read_text()


def test_bad_results_are_refused_and_leave_what_was_written(tmp_path):
    res, _ = make_result(A_CORRECT, with_samples=False)
    report.write(res, tmp_path)
    before = (tmp_path / "result.json").read_bytes()
    with pytest.raises(ValueError, match="'lmforge_eval' is None, expected 1"):
        report.write({"tasks": {}}, tmp_path)
    with pytest.raises(ValueError, match=r"tasks\.x: expected an object with 'metrics'"):
        report.write({"lmforge_eval": 1, "tasks": {"x": {"n": 3}}}, tmp_path)
    with pytest.raises(ValueError, match="samples for task 'nope': no such task"):
        report.write(res, tmp_path, samples={"nope": []})
    assert (tmp_path / "result.json").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no result.json there"):
        report.load(tmp_path / "missing")
    (tmp_path / "bad.json").write_text('{"lmforge_eval": 1,\n "tasks": }')
    with pytest.raises(ValueError, match=r"bad.json: not JSON \(line 2"):
        report.load(tmp_path / "bad.json")


def test_load_round_trip_and_text_table(tmp_path):
    res, samples = make_result(A_CORRECT)
    report.write(res, tmp_path, samples=samples)
    back = report.load(tmp_path)
    assert back["_dir"] == str(tmp_path) and back["tasks"]["choice"] == res["tasks"]["choice"]
    assert report.load(tmp_path / "result.json")["tasks"].keys() == res["tasks"].keys()
    txt = report.scorecard_text(back)
    head, rule, *rows = txt.splitlines()[:5]
    assert head.split()[:4] == ["task", "split", "n", "metric"] and set(rule) <= {"-", " "}
    assert rows[0].split()[:5] == ["addition", "private", "40", "exact_match", "0.450"]
    # rewriting a loaded result does not write load's note into result.json
    report.write(back, tmp_path / "again")
    assert "_dir" not in json.loads((tmp_path / "again" / "result.json").read_text())


def _write(tmp_path, name, correct, **kw):
    res, samples = make_result(correct, name=name, **kw)
    report.write(res, tmp_path / name, samples=samples, chart=False)
    return tmp_path / name


def test_compare_identical_runs_is_zero_and_not_flagged(tmp_path):
    a, b = _write(tmp_path, "a", A_CORRECT), _write(tmp_path, "b", A_CORRECT)
    c = report.compare(a, b)
    e = c["tasks"]["addition"]["metrics"]["exact_match"]
    assert e["method"] == "paired bootstrap" and e["n_shared"] == 40
    assert e["diff"] == 0 and e["ci"] == [0.0, 0.0] and e["significant"] is False
    for t in ("choice", "ppl"):  # no per-sample logs for these: unpaired, labelled, and not flagged
        for m in c["tasks"][t]["metrics"].values():
            assert m["method"].startswith("unpaired") and m["diff"] == 0 and m["significant"] is False
            assert m["why_unpaired"] == "no per-sample logs in both runs"
    assert c["aggregate"]["core"]["significant"] is False and not c["only_a"] and not c["only_b"]


def test_compare_flags_a_real_difference_paired_tighter_than_unpaired(tmp_path):
    a, b = _write(tmp_path, "a", A_CORRECT), _write(tmp_path, "b", B_BETTER)
    c = report.compare(a, b, bootstrap=4000, seed=1)
    e = c["tasks"]["addition"]["metrics"]["exact_match"]
    assert e["method"] == "paired bootstrap" and e["diff"] == pytest.approx(0.30)
    assert e["significant"] is True and 0 < e["ci"][0] < 0.3 < e["ci"][1]
    # per-document differences: +1 on 12 of 40, 0 elsewhere; the bootstrap's std is the binomial one
    assert e["stderr"] == pytest.approx(math.sqrt(0.3 * 0.7 / 40), rel=0.1)
    # without the logs the same two scores give the unpaired interval: wider (pairing removes the 18
    # documents both got right from the noise), and exactly diff +- 1.96 sqrt(se_a² + se_b²)
    ra, rb = report.load(a), report.load(b)
    for r in (ra, rb):
        r["tasks"]["addition"].pop("samples")
    u = report.compare(ra, rb)["tasks"]["addition"]["metrics"]["exact_match"]
    sa = ra["tasks"]["addition"]["metrics"]["exact_match"]["stderr"]
    sb = rb["tasks"]["addition"]["metrics"]["exact_match"]["stderr"]
    half = 1.959963984540054 * math.hypot(sa, sb)
    assert u["method"].startswith("unpaired") and u["ci"] == pytest.approx([0.3 - half, 0.3 + half])
    assert u["ci"][1] - u["ci"][0] > 1.3 * (e["ci"][1] - e["ci"][0])
    md = report.compare_markdown(c)
    row = next(l for l in md.splitlines() if l.startswith("| addition | exact_match *"))
    assert "| 0.450 | 0.750 | +0.300 |" in row and "| yes | paired bootstrap, 40 shared docs |" in row
    assert "| choice | acc * | 0.410 | 0.410 | +0.000 | [-0.097, +0.097] | no | unpaired" in md
    assert "exact_match" in report.compare_text(c)


def test_compare_every_document_better_has_a_point_interval(tmp_path):
    c = report.compare(_write(tmp_path, "a", [0] * 10), _write(tmp_path, "b", [1] * 10))
    e = c["tasks"]["addition"]["metrics"]["exact_match"]
    assert e["diff"] == 1.0 and e["ci"] == [1.0, 1.0] and e["significant"] is True


def test_compare_pairs_only_the_same_documents(tmp_path):
    # another machine's private split: the same doc_ids, other documents -> nothing to pair
    a = _write(tmp_path, "a", A_CORRECT)
    b = _write(tmp_path, "b", B_BETTER, prompt=lambda i: f"other {i}")
    e = report.compare(a, b)["tasks"]["addition"]["metrics"]["exact_match"]
    assert e["method"].startswith("unpaired") and e["why_unpaired"] == "only 0 document(s) in common"
    assert e["diff"] == pytest.approx(0.3) and e["significant"] is True  # 0.45 vs 0.75 at n=40 is still clear


def test_compare_a_corpus_level_metric_is_unpaired(tmp_path):
    # bits per byte over a corpus is not the mean of per-document values: no paired interval
    a = _write(tmp_path, "a", A_CORRECT)
    rows = _task_rows("ppl", [1.5, 2.5, 2.0, 2.2, 3.0], split="test", metric="bits_per_byte")
    res = report.load(a)
    report.write(res, tmp_path / "a2", samples={"ppl": rows}, chart=False)
    res_b = report.load(tmp_path / "a2")
    res_b["tasks"]["ppl"]["metrics"]["bits_per_byte"]["value"] = 2.0
    e = report.compare(report.load(tmp_path / "a2"), res_b)["tasks"]["ppl"]["metrics"]["bits_per_byte"]
    assert e["method"].startswith("unpaired") and e["why_unpaired"] == "the score is not a mean of per-sample values"
    assert e["diff"] == pytest.approx(2.0 - 2.1234)


def test_compare_lists_tasks_only_one_run_has(tmp_path):
    ra, _ = make_result(A_CORRECT, with_samples=False)
    rb = json.loads(json.dumps(ra))
    rb["tasks"].pop("ppl")
    rb["tasks"]["extra"] = ra["tasks"]["choice"]
    c = report.compare(ra, rb)
    assert c["only_a"] == ["ppl"] and c["only_b"] == ["extra"] and set(c["tasks"]) == {"addition", "choice"}
    assert "- only in A: ppl" in report.compare_markdown(c)


def test_scorecard_names_the_private_fingerprint_and_the_bootstrap_clusters():
    res, _ = make_result([1, 0, 1, 1], with_samples=False)
    task = next(iter(res["tasks"].values()))
    task.update(split_fingerprint="0123456789ab", bootstrap_unit=["play", "stretch"], clusters=3)
    md = report.scorecard_markdown(res)
    assert "split private (fingerprint 0123456789ab)" in md
    assert "intervals resample 3 clusters by play+stretch" in md
