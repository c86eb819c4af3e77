"""``lmforge eval``: bits per byte as before, tasks with a report (--json: one object), compare, tasks, judge.

A tiny character-level model (untrained: the scores mean nothing, the plumbing is what is tested) and
hand-made results (tests/test_eval_report.py) for compare."""
import json

import pytest
import torch

from lmforge.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, corpus_files):
    from lmforge import tokenize
    from lmforge.model import make_config, save
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.special import default_special_tokens

    # byte-level: every task's text encodes
    tok = tokenize.train("bpe", [corpus_files[0].read_text()[:50000]], 300, special_tokens=default_special_tokens("bpe"),
                         show_progress=False)
    torch.manual_seed(0)
    m = Transformer(make_config(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=256))
    return save(m, tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=tok)


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge eval --checkpoint DIR [--tasks T1,T2|default|all] [options]\n"
                          "       lmforge eval {compare,judge,tasks,lm-eval} ...")
    for s in ("Without --tasks: loss (nats/token), perplexity", "With --tasks: score tasks", "tasks (with --tasks):",
              "bits per byte (without --tasks):", "--decontaminate", "--include-path DIR", "compare", "judge",
              "lm-eval", "lmforge eval compare runs/a/eval runs/b/eval"):
        assert s in out, s
    for sub in ("compare", "tasks", "judge"):
        with pytest.raises(SystemExit) as e:
            main(["eval", sub, "--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: lmforge eval {sub} ")


def test_bits_per_byte_still_works_and_task_options_need_tasks(ckpt, tmp_path, capsys, corpus_files):
    text = tmp_path / "t.txt"
    text.write_text(corpus_files[1].read_text()[:3000])
    assert main(["eval", "--checkpoint", str(ckpt), "--text", str(text), "--seq-len", "64", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out)
    assert out.count("\n") == 1 and r["bits_per_byte"] > 0 and r["bytes"] == len(text.read_bytes())
    assert main(["eval", "--checkpoint", str(ckpt), "--text", str(text), "--seq-len", "64"]) == 0
    assert f"{r['bits_per_byte']:.4f} bits/byte" in capsys.readouterr().out
    for argv, msg in [(["--text", str(text), "--split", "dev"],
                       "--split dev: without --tasks (bits per byte) the splits are val, test"),
                      (["--text", str(text), "--limit", "3"], "--limit is an option of task evaluation: give --tasks too"),
                      (["--text", str(text), "--decontaminate"], "--decontaminate is an option of task evaluation"),
                      (["--tasks", "addition", "--text", str(text)], "--text is for bits per byte of a text file"),
                      (["--tasks", "addition", "--split", "val"], "--split val: with --tasks the splits are test"),
                      (["--tasks", "addition", "--seq-len", "8"], "--seq-len is for bits per byte"),
                      (["--tasks", "addition", "--limit", "0"], "--limit 0: expected a positive integer"),
                      (["--text", str(text), "--allow-network"], "--allow-network is an option of task evaluation"),
                      (["--tasks", "python", "--sandbox-workers", "0"], "--sandbox-workers 0: expected a positive"),
                      (["--tasks", " , "], "no task named")]:
        assert main(["eval", "--checkpoint", str(ckpt), *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert main(["eval"]) == 2
    assert "give --checkpoint DIR" in capsys.readouterr().err


def _two_runs(tmp_path):
    from test_eval_report import A_CORRECT, B_BETTER, make_result

    from lmforge.evaluate import report

    for name, correct in (("a", A_CORRECT), ("b", B_BETTER)):
        res, samples = make_result(correct, name=name)
        report.write(res, tmp_path / name, samples=samples, chart=False)
    return tmp_path / "a", tmp_path / "b"


def test_compare_cli(tmp_path, capsys):
    a, b = _two_runs(tmp_path)
    assert main(["eval", "compare", str(a), str(b / "result.json"), "--json", "--out", str(tmp_path / "c.md")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    c = json.loads(out)
    e = c["tasks"]["addition"]["metrics"]["exact_match"]
    assert e["significant"] is True and e["diff"] == pytest.approx(0.3) and e["method"] == "paired bootstrap"
    assert c["tasks"]["choice"]["metrics"]["acc"]["significant"] is False
    assert "| addition | exact_match * | 0.450 | 0.750 | +0.300 |" in (tmp_path / "c.md").read_text()
    assert main(["eval", "compare", str(a), str(b)]) == 0
    txt = capsys.readouterr().out
    assert "excludes 0" in txt and txt.splitlines()[0] == f"A: a ({a})"
    assert main(["eval", "compare", str(a), str(tmp_path / "nope")]) == 1
    assert "no result.json there" in capsys.readouterr().err


def test_default_out(tmp_path, monkeypatch):
    from lmforge.evaluate.run import default_out

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert default_out(run / "model") == tmp_path / "eval-model"
    (run / "run.json").write_text("{}")  # a pipeline run: the report goes beside the model
    assert default_out(run / "model") == run / "eval"


def _task_dir(tmp_path):
    """Two small tasks with a test and a dev split: multiple choice and generation (lmforge's JSONL form)."""
    d = tmp_path / "tasks"
    d.mkdir()
    mc = [{"task": "tiny_mc", "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "choices",
           "doc_to_target": "{{gold}}", "test_split": "test", "validation_split": "dev"}]
    words = ["east", "west", "north", "south", "up", "down"]
    for i in range(12):
        mc.append({"q": f"Line {i}: the word is", "choices": [words[i % 6], words[(i + 1) % 6], words[(i + 2) % 6]],
                   "gold": i % 3, "split": "test" if i < 8 else "dev"})
    gen = [{"task": "tiny_gen", "output_type": "generate_until", "doc_to_text": "{{a}} plus {{b}} is",
            "doc_to_target": "{{c}}", "test_split": "test", "validation_split": "dev",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}]}]
    for i in range(8):
        gen.append({"a": i, "b": 2 * i, "c": str(3 * i), "split": "test" if i < 5 else "dev"})
    for name, rows in (("mc", mc), ("gen", gen)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_tasks_json_is_one_object_and_the_report_is_written(ckpt, tmp_path, capsys):
    tasks = _task_dir(tmp_path)
    out = tmp_path / "ev"
    argv = ["eval", "--checkpoint", str(ckpt), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(tasks),
            "--split", "both", "--bootstrap", "50", "--out", str(out)]
    assert main(argv + ["--json"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("\n") == 1  # one JSON object and nothing else on stdout
    res = json.loads(cap.out)
    assert res == json.loads((out / "result.json").read_text())
    assert res["model"]["checkpoint"] == str(ckpt) and res["model"]["name"] == "tiny" and res["model"]["params"] > 0
    assert res["settings"]["split"] == "both" and list(res["tasks"]) == ["tiny_mc", "tiny_gen"]
    mc = res["tasks"]["tiny_mc"]
    assert mc["n"] == 8 and mc["dev"]["n"] == 4 and "acc" in mc["gap"] and mc["samples"] == "samples/tiny_mc.jsonl"
    assert res["tasks"]["tiny_gen"]["n"] == 5 and res["tasks"]["tiny_gen"]["primary"] == "exact_match"
    rows = [json.loads(x) for x in (out / "samples" / "tiny_mc.jsonl").read_text().splitlines()]
    assert sorted(r["split"] for r in rows) == ["dev"] * 4 + ["test"] * 8
    acc = [r["metrics"]["acc"] for r in rows if r["split"] == "test"]
    assert mc["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / len(acc))
    md = (out / "scorecard.md").read_text()
    assert "| tiny_mc | test | 8 | acc |" in md and "## tiny_gen" in md
    assert "progress" not in cap.out and "report:" in cap.err  # where the report is: on stderr
    # without --json: the scorecard table on stdout; the same run compared with itself differs by nothing
    assert main(argv + ["--out", str(tmp_path / "ev2")]) == 0
    txt = capsys.readouterr().out
    assert txt.splitlines()[0].split()[:3] == ["task", "split", "n"] and "tiny_mc" in txt and "CORE" in txt
    c = report_compare(out, tmp_path / "ev2")
    e = c["tasks"]["tiny_mc"]["metrics"]["acc"]
    assert e["method"] == "paired bootstrap" and e["n_shared"] == 8 and e["diff"] == 0 and not e["significant"]


def report_compare(a, b):
    from lmforge.evaluate import report

    return report.compare(a, b)


def test_bad_task_input_is_a_clear_error(ckpt, tmp_path, capsys):
    tasks = _task_dir(tmp_path)
    argv = ["eval", "--checkpoint", str(ckpt), "--include-path", str(tasks), "--out", str(tmp_path / "o")]
    assert main(argv + ["--tasks", "tiny_mcc"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'tiny_mcc'" in err and "tiny_mc" in err
    assert not (tmp_path / "o").exists()
    assert main(argv[:-4] + ["--tasks", "tiny_mc", "--include-path", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert f"--include-path {tmp_path / 'nope'}: not a directory" in err
    assert main(["eval", "--checkpoint", str(ckpt), "--include-path", str(tasks), "--tasks", "tiny_mc",
                 "--decontaminate"]) == 1
    assert "--decontaminate checks task documents against a run's training shards: give --data" in capsys.readouterr().err


def test_eval_tasks_lists_the_built_in_tasks(tmp_path, capsys):
    from lmforge.evaluate import builtin

    assert builtin.names(), "no built-in task definitions (src/lmforge/evaluate/tasks/*.yaml)"
    assert main(["eval", "tasks", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in rows] == builtin.names()
    by = {r["task"]: r for r in rows}
    for r in rows:
        assert r["output_type"] in ("multiple_choice", "generate_until", "loglikelihood_rolling", "loglikelihood")
        assert r["description"] and isinstance(r["n"], int) and r["n"] > 0 and r["primary"] in r["metrics"]
        assert r["needs_data"] == (r["generator"] in builtin.CORPUS)
    assert set(builtin.DEFAULT_TASKS) <= set(by)
    assert main(["eval", "tasks", "--include-path", str(_task_dir(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["task", "output", "type", "n"]
    names = [l.split()[0] for l in lines[2:] if l.strip() and not l.startswith("*") and not l.startswith("(")]
    assert names[:len(rows)] == builtin.names() and names[len(rows):] == ["tiny_gen", "tiny_mc"]
    d = builtin.DEFAULT_TASKS[0]
    assert any(l.startswith(f"{d} *") for l in lines)


def test_corpus_tasks_without_data_are_a_clear_error(ckpt, tmp_path, capsys):
    from lmforge.evaluate import builtin

    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", builtin.CORPUS[0], "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert f"task(s) {builtin.CORPUS[0]} draw their documents from the test split of a run's data: give --data" in err


def test_judge_is_wired(ckpt, capsys):
    # the judge helper's own subcommand under `lmforge eval judge` (a tiny local judge: its verdicts are noise)
    assert main(["eval", "judge", "agreement", "--synthetic", "3", "--judge-checkpoint", str(ckpt),
                 "--max-tokens", "4", "--json"]) == 0
    out = capsys.readouterr().out
    r = json.loads(out)
    assert out.count("\n") == 1 and r["mode"] == "agreement"
    (summary,) = [t["summary"] for t in r["tasks"].values()]
    assert summary["n"] == 3


def test_a_failed_evaluation_leaves_the_earlier_report(ckpt, tmp_path, capsys, monkeypatch):
    tasks = _task_dir(tmp_path)
    out = tmp_path / "ev"
    argv = ["eval", "--checkpoint", str(ckpt), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(tasks),
            "--bootstrap", "10", "--out", str(out), "--json"]
    assert main(argv) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from lmforge.evaluate.local import LocalLM

    def broken(self, requests):  # generation fails after the multiple-choice task was scored and logged
        raise RuntimeError("the model broke")
    monkeypatch.setattr(LocalLM, "generate_until", broken)
    assert main(argv + ["--limit", "3"]) == 1  # (its tiny_mc log would have 3 lines, not 8)
    assert "the model broke" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
