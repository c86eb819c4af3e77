"""The end-to-end pipeline: a tiny recipe in seconds and recipe validation (a killed run that
resumes to the same artifacts: tests/test_resume.py)."""
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.pipeline import StageError, load_recipe, run_recipe


def tiny_sets(corpus_dir, steps=6):
    return [f"data.inputs={json.dumps([str(corpus_dir)])}", "data.workers=1", "data.shards.val_fraction=0.25",
            "tokenizer.vocab_size=300", f"train.max_steps={steps}", "train.max_time=0", "train.eval_every=0",
            "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=1", "train.peak_flops=1e11",
            'train.model={"mlp": "swiglu", "d_ff": 64, "arch": "qwen3", "d_model": 32, "n_head": 2, "n_layer": 1}',
            "eval.sample_tokens=5", "eval.limit=3", "eval.bootstrap=20", "demo.max_tokens=4",
            *TINY_SFT, *tiny_dpo(Path(corpus_dir).parent)]


# the sft stage in seconds: two trained synthetic tasks (addition is in the eval set), a few steps
TINY_SFT = ['sft.sources=[{"generator": "addition", "n": 24}, {"generator": "brackets", "n": 24}]',
            "sft.max_steps=3", "sft.max_time=0", "sft.batch_size=2", "sft.seq_len=64", "sft.eval_every=0",
            "sft.eval_batches=1", "sft.checkpoint_every=1", "sft.warmup_steps=1", "demo.chat_max_tokens=4",
            # a float sum depends on the thread count: an in-process run inherits whatever an earlier test set,
            # a subprocess starts at the machine's (results compared across the two must fix it)
            "sft.threads=2"]


# the dpo stage in seconds: pairs the SFT model makes (a barely trained model may make none: the small
# preference file beside the corpus keeps the stage training), a few steps
def tiny_dpo(where: Path, name: str = "tiny_prefs.jsonl") -> list[str]:
    f = where / name
    if not f.exists():
        rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                 "chosen": [{"role": "assistant", "content": str(a + b)}],
                 "rejected": [{"role": "assistant", "content": str(a + b + 1 + a % 3)}]}
                for a, b in [(3, 4), (12, 7), (25, 17), (8, 8), (40, 2), (6, 19), (31, 30), (9, 14)]]
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ['dpo.pairs={"n": 4, "k": 3, "max_new_tokens": 4, "seed": 0}', f'dpo.data={json.dumps([str(f)])}',
            "dpo.max_steps=2", "dpo.max_time=0", "dpo.batch_size=2", "dpo.seq_len=64", "dpo.eval_every=0",
            "dpo.eval_batches=1", "dpo.checkpoint_every=1", "dpo.warmup_steps=1", "dpo.val_frac=0.25",
            "dpo.threads=2"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):
    d = tmp_path_factory.mktemp("plays")
    for p in corpus_files[:4]:
        (d / p.name).write_text(p.read_text()[:30000])
    return d


def digests(run):
    from lmforge._io import file_sha256

    files = ["tokenizer/tokenizer.lmforge.json", "model/model.safetensors", "sft/model.safetensors", "eval.json",
             "sft_eval.json", "dpo/model.safetensors", "dpo_pairs/pairs.jsonl", "hf/model.safetensors", "demo.json",
             "chat.json"]
    shards = sorted(p.relative_to(run).as_posix() for p in (run / "data").glob("*-*.bin"))
    return {f: file_sha256(run / f) for f in files + shards}  # (the data manifest holds times and paths)


def test_tiny_recipe_end_to_end_and_rerun(small_corpus, tmp_path, capsys):
    r, _ = load_recipe("default", tiny_sets(small_corpus))
    summary = run_recipe(r, tmp_path / "run", quiet=True)
    assert summary["bits_per_byte"] > 0 and summary["params"] > 0
    run = tmp_path / "run"
    for f in ("report.md", "summary.json", "run.json", "recipe.json", "run.log", "loss.png", "hf/config.json"):
        assert (run / f).exists(), f
    m = json.loads((run / "run.json").read_text())
    assert r.stages[5:7] == ["sft", "dpo"] and [m["stages"][s]["status"] for s in r.stages] == ["done"] * 11
    report = (run / "report.md").read_text()
    assert "bits/byte" in report and "near-duplicate" not in report.split("## Data")[0]
    # the reported number is on test; validation (what settings are chosen on) is given next to it
    ev = json.loads((run / "eval.json").read_text())
    assert ev["split"] == "test" and summary["split"] == "test" and summary["bits_per_byte"] == ev["bits_per_byte"]
    assert ev["val"]["bits_per_byte"] != ev["bits_per_byte"] and summary["val_bits_per_byte"] == ev["val"]["bits_per_byte"]
    assert report.splitlines()[2] == (f"Test bits per byte: **{ev['bits_per_byte']:.4f}** "
                                      f"(validation: {ev['val']['bits_per_byte']:.4f})")
    assert "Test split (held-out documents never used to choose settings" in report
    assert "Validation split" in report and "test:" in report.split("## Data")[1]
    assert set(m["stages"]["eval"]["summary"]) >= {"test_bpb", "test_loss", "val_bpb", "core", "tasks", "tasks_s",
                                                    "sft_test_bpb", "sft_tasks", "sft_tasks_s",
                                                    "dpo_test_bpb"}  # (tests/test_pipeline_sft.py, _dpo.py)
    # the default task set and letter_count (a task [sft] trains): the private and dev splits, contamination against the run's training shards,
    # the scorecard in report.md and in eval/
    from lmforge.evaluate import builtin

    res = json.loads((run / "eval" / "result.json").read_text())
    assert list(res["tasks"]) == builtin.DEFAULT_TASKS + ["letter_count"] and res["settings"]["split"] == "both"
    for name, t in res["tasks"].items():
        assert t["n"] == 3 and t["dev"]["n"] == 3 and t["primary"] in t["gap"], name
        assert t["contamination"]["clean"] + t["contamination"]["dirty"] == 3, name
        assert (run / "eval" / t["samples"]).exists()
    assert summary["core"] == res["aggregate"]["core"]["value"] == m["stages"]["eval"]["summary"]["core"]
    c = res["aggregate"]["core"]
    assert report.splitlines()[4].startswith(f"Tasks: CORE (mean centered score over {len(c['tasks'])} tasks) "
                                             f"**{c['value']:.3f}** [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]")
    assert "## Evaluation scorecard" in report and "### next_line" in report and "CORE (mean centered score" in report
    assert (run / "eval" / "scorecard.md").exists() and "![primary scores" in report
    final = json.loads((run / "model" / "final.json").read_text())
    assert final["test_bpb"] == pytest.approx(ev["bits_per_byte"], rel=1e-4)  # both over the whole test split
    d = json.loads((run / "data" / "report.json").read_text())
    assert d["output"]["test"]["documents"] == ev["documents"] == 1 and d["output"]["val"]["documents"] == 1
    # `lmforge eval --split test` gives the same number
    assert main(["eval", "--checkpoint", str(run / "model"), "--split", "test", "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"] == \
        pytest.approx(ev["bits_per_byte"], rel=1e-6)
    before = digests(run)
    # a rerun skips everything; --from eval redoes eval, export and demo only
    rc = main(["run", "--runs", str(tmp_path), "--name", "run", "-q"] + sum((["--set", s] for s in tiny_sets(small_corpus)), []))
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bits_per_byte"] == summary["bits_per_byte"]
    log = (run / "run.log").read_text()
    assert log.count("unchanged, skipped") == 11
    m1 = json.loads((run / "run.json").read_text())
    assert m1["stages"]["pretrain"]["started"] == m["stages"]["pretrain"]["started"]
    run_recipe(r, run, from_stage="eval", quiet=True)
    m2 = json.loads((run / "run.json").read_text())
    assert m2["stages"]["pretrain"]["started"] == m["stages"]["pretrain"]["started"]
    assert m2["stages"]["eval"]["started"] > m["stages"]["eval"]["started"]
    assert digests(run) == before
    # a changed training setting reruns pretrain and what follows, not the data stages
    r2, _ = load_recipe("default", tiny_sets(small_corpus, steps=7))
    run_recipe(r2, run, quiet=True)
    m3 = json.loads((run / "run.json").read_text())
    assert m3["stages"]["shards"]["started"] == m["stages"]["shards"]["started"]
    assert m3["stages"]["pretrain"]["started"] > m["stages"]["pretrain"]["started"]
    # ... as a new run (not a continuation of the finished one), even where the checkpoint's shape
    # differs (a weight average switched on adds a state set)
    assert m3["stages"]["pretrain"]["summary"]["step"] == 7
    assert "is kept in" in (run / "run.log").read_text()  # the finished 6-step run is moved aside, not deleted
    r3, _ = load_recipe("default", tiny_sets(small_corpus, steps=7) + ["train.ema=0.9"])
    run_recipe(r3, run, quiet=True)
    m4 = json.loads((run / "run.json").read_text())
    assert m4["stages"]["pretrain"]["status"] == "done" and m4["stages"]["pretrain"]["summary"]["step"] == 7


@pytest.mark.parametrize("sets,msg", [
    (["stages=[\"fetch\", \"bake\"]"], "unknown stage(s) ['bake']"),
    (["train.lr=fast"], "train.lr: expected a number"),
    (["train.nope=1"], "unknown field 'train.nope'"),
    (["tokenizer.kind=sentencepiece"], "tokenizer.kind"),
    (["train.max_time=0", "train.max_steps=0", "train.max_tokens=0"], "train: give a bound"),
    (["stages=[\"eval\", \"fetch\"]"], "must keep the order"),
    (['eval.tasks=["additon"]'], "eval.tasks: unknown task 'additon' (not a built-in task nor a file"),
    (["eval.bootstrap=-1"], "eval.bootstrap: expected a number of resamples >= 0, got -1"),
    (["eval.limit=0"], "eval.limit: expected a positive number of documents or none, got 0"),
])
def test_bad_recipes_are_rejected_before_any_work(sets, msg, tmp_path, capsys):
    argv = ["run", "--runs", str(tmp_path), "--name", "x"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_field_in_a_recipe_file(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('name = "r"\n[train]\nmax_time = 5\nlearning_rate = 0.1\n')
    assert main(["run", str(tmp_path / "r.toml"), "--runs", str(tmp_path)]) == 2
    assert "unknown field 'train.learning_rate'" in capsys.readouterr().err


def test_a_failing_stage_names_itself_and_keeps_earlier_artifacts(small_corpus, tmp_path, monkeypatch):
    from lmforge.pipeline.runner import Runner

    def boom(self):
        raise RuntimeError("out of cheese")

    monkeypatch.setattr(Runner, "stage_pretrain", boom)
    r, _ = load_recipe("default", tiny_sets(small_corpus))
    with pytest.raises(StageError, match="stage 'pretrain' failed: RuntimeError: out of cheese .*run.log"):
        run_recipe(r, tmp_path / "run", quiet=True)
    m = json.loads((tmp_path / "run" / "run.json").read_text())
    assert m["stages"]["shards"]["status"] == "done" and m["stages"]["pretrain"]["status"] == "failed"
    assert (tmp_path / "run" / "data" / "manifest.json").exists()


def test_eval_stage_leaves_out_a_failing_task_and_scores_the_rest(tmp_path, monkeypatch, caplog):
    # the scoring itself is faked (a hand-made result per call): what is tested is the stage's handling
    from test_eval_report import A_CORRECT, make_result

    from lmforge.evaluate import report, run as eval_run
    from lmforge.pipeline.runner import Runner

    calls = []

    def fake(checkpoint, tasks, **kw):
        calls.append(list(tasks))
        if "brackets" in tasks:
            raise ValueError("brackets: the generator broke")
        res, _ = make_result(A_CORRECT)
        res["tasks"] = {t: res["tasks"]["addition"] for t in tasks}
        return res, report.write(res, kw["out"], chart=False)

    monkeypatch.setattr(eval_run, "evaluate_checkpoint", fake)
    r, _ = load_recipe("default", ['eval.tasks=["addition", "brackets", "cloze"]'])
    run = Runner(r, tmp_path / "run", quiet=True)
    outs, summary = run._eval_tasks()
    assert calls == [["addition", "brackets", "cloze"], ["addition"], ["brackets"], ["cloze"], ["addition", "cloze"]]
    res = json.loads(outs["eval_result"].read_text())
    assert list(res["tasks"]) == ["addition", "cloze"] and res["left_out"] == ["brackets"]
    assert summary["tasks"] == 2 and "Left out (failed to load or score; see the log): brackets" in \
        outs["scorecard"].read_text()
    assert "eval: task brackets left out: ValueError: brackets: the generator broke" in caplog.text
    assert not (tmp_path / "run" / "eval.check").exists()
    # every task failing fails the stage
    monkeypatch.setattr(eval_run, "evaluate_checkpoint", lambda *a, **k: (_ for _ in ()).throw(ValueError("all broke")))
    with pytest.raises(ValueError, match="all broke"):
        run._eval_tasks()
