"""The pipeline's sft stage: a tiny recipe with sft runs end to end (the eval stage scores both models,
export and demo use the SFT model), a rerun skips it, a changed [sft] setting reruns sft and the later
stages only (the old SFT run kept aside), an interrupted sft resumes from its checkpoint to the weights
an uninterrupted run gives, and a bad [sft] field is refused before any work, naming the field."""
import json

import pytest

from lmforge._io import file_sha256
from lmforge.cli import main
from lmforge.pipeline import load_recipe, run_recipe

from test_pipeline import tiny_sets

AFTER_PRETRAIN = ["sft", "eval", "export", "demo"]
SFT_STAGES = ["fetch", "clean", "tokenizer", "shards", "pretrain", *AFTER_PRETRAIN]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):
    d = tmp_path_factory.mktemp("plays")
    for p in corpus_files[:4]:
        (d / p.name).write_text(p.read_text()[:8000])  # small: the evaluations take little
    return d


def recipe(corpus, *more, steps=3):
    # the eval set: addition (trained by TINY_SFT's sources) and reverse (synthetic, not trained: not in the table)
    # (no dpo stage: the sft-only chain, whose export and demo use the SFT model; with dpo: test_pipeline_dpo.py)
    r, _ = load_recipe("default", tiny_sets(corpus) + ['eval.tasks=["addition", "reverse"]', "train.final_eval_batches=2",
                                                       f"sft.max_steps={steps}", f"stages={json.dumps(SFT_STAGES)}", *more])
    return r


def manifest(run):
    return json.loads((run / "run.json").read_text())


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def same_weights(a, b) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.fixture(scope="module")
def finished(small_corpus, tmp_path_factory):
    """One finished tiny run with sft (shared by the tests that only read it)."""
    run = tmp_path_factory.mktemp("sftrun") / "run"
    summary = run_recipe(recipe(small_corpus), run, quiet=True)
    return run, summary


def test_sft_stage_end_to_end(finished, small_corpus, capsys):
    run, summary = finished
    m = manifest(run)
    assert list(m["stages"]) == ["fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "eval", "export", "demo"]
    assert all(s["status"] == "done" for s in m["stages"].values())
    st = m["stages"]["sft"]["summary"]
    assert st["step"] == 3 and st["trained_tokens"] > 0
    final = json.loads((run / "sft" / "final.json").read_text())
    assert final["step"] == 3 and (run / "sft" / "pipeline_key.txt").read_text().strip() == m["stages"]["sft"]["key"]
    # SFT trained: its weights moved away from the base model's
    assert not same_weights(run / "model" / "model.safetensors", run / "sft" / "model.safetensors")

    # the eval stage scored both models: bits per byte on plain text, each equal to `lmforge eval` on that model
    ev = json.loads((run / "eval.json").read_text())
    for d, bpb in (("model", ev["bits_per_byte"]), ("sft", ev["sft"]["bits_per_byte"])):
        assert main(["eval", "--checkpoint", str(run / d), "--data", str(run / "data"), "--split", "test",
                     "--seq-len", "32", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    assert ev["sft"]["bits_per_byte"] != ev["bits_per_byte"]
    assert summary["sft_bits_per_byte"] == ev["sft"]["bits_per_byte"]

    # the before/after table: only addition (the trained synthetic task of the eval set), each cell the
    # value and interval of the scorecard it came from: base few-shot plain, base and SFT zero-shot chat
    table = json.loads((run / "sft_eval.json").read_text())
    assert list(table["tasks"]) == ["addition"]
    row = table["tasks"]["addition"]
    few = json.loads((run / "eval" / "result.json").read_text())
    sft_res = json.loads((run / "eval-sft" / "result.json").read_text())
    base_chat = json.loads((run / "eval-base-chat" / "result.json").read_text())
    for res, cell, shots in ((few, row["base_fewshot"], 3), (base_chat, row["base_chat"], 0), (sft_res, row["sft_chat"], 0)):
        t = res["tasks"]["addition"]
        assert t["split"] == "private" and cell["split"] == "private" and cell["n"] == t["n"] == 3
        assert cell["value"] == t["metrics"]["exact_match"]["value"] and cell["ci"] == t["metrics"]["exact_match"]["ci"]
        assert cell["num_fewshot"] == shots
    for res in (sft_res, base_chat):
        assert res["settings"]["apply_chat_template"] is True and res["settings"]["num_fewshot"] == 0
        assert list(res["tasks"]) == ["addition"]
    assert "apply_chat_template" not in few["settings"]
    assert sft_res["model"]["checkpoint"] == str(run / "sft") and base_chat["model"]["checkpoint"] == str(run / "model")
    # the chat prompts went through the chat template (the samples log the rendered prompt)
    line = json.loads((run / "eval-sft" / sft_res["tasks"]["addition"]["samples"]).read_text().splitlines()[0])
    assert line["prompt"].startswith("<|bos|><|user|>Q: What is ") and line["prompt"].endswith("<|end|><|assistant|>")
    plain = json.loads((run / "eval" / few["tasks"]["addition"]["samples"]).read_text().splitlines()[0])
    assert "<|user|>" not in plain["prompt"] and plain["prompt"].count("Q: What is ") == 4  # 3 shots + the question

    # export and demo use the SFT model: the HF export holds its weights, the transcript is its greedy reply
    from lmforge.model import load

    hf_model, _ = load(run / "hf")
    sft_model, _ = load(run / "sft")
    hs, ss = hf_model.state_dict(), sft_model.state_dict()
    assert hs.keys() == ss.keys() and all(hs[k].equal(ss[k]) for k in hs)
    chat = json.loads((run / "chat.json").read_text())
    r = recipe(small_corpus)
    assert [m_["role"] for m_ in chat["messages"]] == ["user", "assistant"] * len(r.demo.chat)
    assert [m_["content"] for m_ in chat["messages"][::2]] == r.demo.chat
    import lmforge

    lm = lmforge.load(run / "sft")
    first = lm.chat([{"role": "user", "content": r.demo.chat[0]}], max_tokens=r.demo.chat_max_tokens, temperature=0.0)
    assert chat["messages"][1]["content"] == first.text

    # the report: the SFT section with the table, both bits per byte and the transcript
    report = (run / "report.md").read_text()
    sec = report.split("## Instruction tuning (SFT)")[1].split("\n## ")[0]
    assert "| addition | exact_match | 3 |" in sec and "base, 3-shot plain" in sec and "SFT, chat 0-shot" in sec
    assert "| reverse |" not in sec and "### reverse" in report  # (scored for the base model's scorecard)
    assert f"base **{ev['bits_per_byte']:.4f}**, SFT **{ev['sft']['bits_per_byte']:.4f}**" in sec
    assert f"assistant: {first.text}" in sec
    assert summary["sft_tasks"]["addition"]["sft_chat"] == row["sft_chat"]["value"]


def test_rerun_skips_and_a_changed_sft_setting_reruns_sft_and_later_stages(finished, small_corpus):
    run = finished[0]  # (after test_sft_stage_end_to_end, which reads it as it was)
    m0 = manifest(run)
    run_recipe(recipe(small_corpus), run, quiet=True)
    assert (run / "run.log").read_text().count("unchanged, skipped") == 9
    assert manifest(run)["stages"] == m0["stages"]

    weights = file_sha256(run / "sft" / "model.safetensors")
    old_key = m0["stages"]["sft"]["key"]
    run_recipe(recipe(small_corpus, "sft.lr=3e-3"), run, quiet=True)
    m1 = manifest(run)
    for name, s in m1["stages"].items():
        if name in AFTER_PRETRAIN:
            assert s["started"] > m0["stages"][name]["started"], name
        else:
            assert s == m0["stages"][name], name
    assert m1["stages"]["sft"]["key"] != old_key
    # the finished SFT run is kept aside under its key, not deleted or continued
    kept = run / f"sft.prev-{old_key[:12]}"
    assert file_sha256(kept / "model.safetensors") == weights
    assert [(k["path"], k["key"], k["finished"], k["stage"]) for k in m1["kept_runs"]] == \
        [(str(kept), old_key, True, "sft")]
    assert file_sha256(run / "sft" / "model.safetensors") != weights
    assert m1["stages"]["sft"]["summary"].get("resumed_from_step") is None


def test_interrupted_sft_resumes_to_the_uninterrupted_weights(small_corpus, tmp_path, monkeypatch):
    import importlib

    sft_mod = importlib.import_module("lmforge.align.sft")  # (the module: `lmforge.align.sft` is also a function)
    run = tmp_path / "run"
    real = sft_mod.sft

    def interrupted(cfg, **kw):
        def die(step, rec):
            if step == 2:
                raise KeyboardInterrupt
        return real(cfg, on_step=die, **kw)

    # (the stages up to sft: what follows is tested above)
    r = recipe(small_corpus, 'stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "sft"]', steps=4)
    monkeypatch.setattr(sft_mod, "sft", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, run, quiet=True)
    monkeypatch.setattr(sft_mod, "sft", real)
    m = manifest(run)
    assert m["stages"]["sft"]["status"] == "interrupted" and m["stages"]["pretrain"]["status"] == "done"
    assert "eval" not in m["stages"]
    assert (run / "sft" / "checkpoints" / "step-0000002" / "model.safetensors").exists()
    run_recipe(r, run, quiet=True)
    m1 = manifest(run)
    assert m1["stages"]["pretrain"] == m["stages"]["pretrain"]
    st = m1["stages"]["sft"]["summary"]
    assert st["resumed_from_step"] == 2 and st["step"] == 4 and st["steps_this_run"] == 2
    assert "sft: resuming the interrupted run" in (run / "run.log").read_text()
    # --from sft trains again from the start (the resumed run kept aside): the same weights
    resumed = file_sha256(run / "sft" / "model.safetensors")
    run_recipe(r, run, from_stage="sft", quiet=True)
    m2 = manifest(run)
    assert m2["stages"]["sft"]["summary"].get("resumed_from_step") is None and m2["stages"]["sft"]["summary"]["step"] == 4
    assert file_sha256(run / "sft" / "model.safetensors") == resumed
    assert [k["reason"] for k in m2["kept_runs"]] == ["--from asked to train again"]


@pytest.mark.parametrize("sets,msg", [
    (["sft.lr=fast"], "sft.lr: expected a number"),
    (["sft.nope=1"], "unknown field 'sft.nope'"),
    (["sft.packing=zigzag"], "sft.packing: expected one of bfd, none, padding_free"),  # (and more)
    (["sft.loss_norm=mean"], "sft.loss_norm: expected one of token, conversation, got 'mean'"),
    (["sft.truncation=drop"], "sft.truncation: expected one of truncate, skip, got 'drop'"),
    (["sft.base=/elsewhere"], "sft.base is set by the pipeline"),
    (["sft.max_steps=0", "sft.max_time=0", "sft.max_tokens=0"], "sft: give a bound"),
    (["sft.val_frac=1.5"], "sft.val_frac: expected a share in [0, 1), got 1.5"),
    (["sft.lora_r=-1"], "sft.lora_r: must be >= 0"),
    (["sft.lora_r=4", "sft.optimizer=muon"], "sft.optimizer: a LoRA run (lora_r = 4) trains its adapter with adamw"),
    (["sft.seq_len=100000"], "sft.seq_len: 100000 is longer than the model's context"),
    (['sft.sources=[{"generator": "additon", "n": 5}]'], "sft.sources[0].generator: unknown generator 'additon'"),
    (['sft.sources=[{"generator": "addition"}]'], "sft.sources[0] (generator 'addition'): n=None: expected an integer"),
    (['sft.sources=[{"path": "/no/such.jsonl"}]'], "sft.sources[0].path: no such file '/no/such.jsonl'"),
    (['sft.sources=[{"generator": "addition", "n": 5, "weight": -1}]'], "sft.sources[0]: weight=-1: expected a number >= 0"),
    (['sft.sources=[{"generator": "addition", "n": 5, "weight": 1}, {"generator": "sort", "n": 5}]'],
     "sft.sources[1]: no weight while other sources have one"),
    (['sft.sources=[]'], "sft.sources: no conversations to train on"),
    (["sft.lora_r=4", 'sft.lora_targets=["nothing_like_this"]'], "sft.lora_targets: "),
])
def test_bad_sft_settings_are_refused_before_any_work(sets, msg, tmp_path, capsys):
    argv = ["run", "--runs", str(tmp_path), "--name", "x"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not (tmp_path / "x").exists()


def test_a_bad_line_in_an_sft_data_file_is_refused_before_any_work(tmp_path, capsys):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    bad = {"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Beep."}]}
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    argv = ["run", "--runs", str(tmp_path), "--name", "x", "--set", f'sft.sources=[{{"path": "{f}"}}]']
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{f}:2" in err and "robot" in err, err
    assert not (tmp_path / "x").exists()


def test_an_sft_table_in_a_recipe_file_is_checked(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('name = "r"\n[train]\nmax_time = 5\n[sft]\nmax_steps = 5\nlearning_rate = 0.1\n')
    assert main(["run", str(tmp_path / "r.toml"), "--runs", str(tmp_path)]) == 2
    assert "unknown field 'sft.learning_rate'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_which_tasks_get_the_before_after_table(tmp_path):
    """Synthetic tasks of the eval set whose generator is a source of [sft]; corpus tasks and untrained
    synthetic tasks are left out; a recipe without sft in its stages needs none of it."""
    from lmforge.pipeline.runner import Runner

    r, _ = load_recipe("default", ['eval.tasks=["addition", "cloze", "sort", "reverse", "speaker"]',
                                   'sft.sources=[{"generator": "addition", "n": 5}, {"generator": "sort", "n": 5}, '
                                   '{"generator": "speaker", "n": 5}]'])
    assert Runner(r, tmp_path / "a", quiet=True).sft_tasks() == ["addition", "sort"]
    r2, _ = load_recipe("default", ['stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "eval"]'])
    assert "sft" not in r2.stages


def test_a_failing_chat_evaluation_leaves_the_table_out_not_the_stage(tmp_path, monkeypatch, caplog):
    from lmforge.evaluate import run as eval_run
    from lmforge.pipeline.runner import Runner

    def broken(checkpoint, tasks, **kw):
        assert kw["apply_chat_template"] is True and kw["num_fewshot"] == 0 and kw["split"] == "test"
        raise RuntimeError("the template broke")

    monkeypatch.setattr(eval_run, "evaluate_checkpoint", broken)
    r, _ = load_recipe("default", ['eval.tasks=["addition"]'])
    run = Runner(r, tmp_path / "run", quiet=True)
    outs, summary = run._eval_sft_tasks()
    assert outs == {} and summary == {"sft_tasks": 0, "sft_tasks_error": "RuntimeError: the template broke"}
    assert "the before/after table is left out" in caplog.text and not (tmp_path / "run" / "sft_eval.json").exists()
    assert "RuntimeError: the template broke" in (tmp_path / "run" / "run.log").read_text()
