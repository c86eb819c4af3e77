"""The pipeline's dpo stage: a tiny recipe with dpo runs end to end (pairs made by the SFT model on the dev
split of the tasks [sft] trains, training from the SFT model, the eval stage scoring the DPO model beside the
SFT one, export and demo using the DPO model, the report's SFT vs DPO section), a rerun skips it, a changed
[dpo] setting reruns dpo and the later stages only (the pairs reused, the old DPO run kept aside), an
interrupted dpo resumes from its checkpoint, and a bad [dpo] field is refused before any work, naming it."""
import functools
import json

import pytest

from lmforge._io import file_sha256
from lmforge.cli import main
from lmforge.pipeline import load_recipe, run_recipe

from test_pipeline import tiny_sets

AFTER_SFT = ["dpo", "eval", "quantize", "export", "demo"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):
    d = tmp_path_factory.mktemp("plays")
    for p in corpus_files[:4]:
        (d / p.name).write_text(p.read_text()[:8000])  # small: the evaluations take little
    return d


def recipe(corpus, *more):
    # the eval set: addition (trained by TINY_SFT's sources, a pair task: DPO trains it) and reverse (not trained)
    r, _ = load_recipe("default", tiny_sets(corpus) + ['eval.tasks=["addition", "reverse"]',
                                                       "train.final_eval_batches=2", *more])
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
    """One finished tiny run with sft and dpo (shared by the tests that only read it); make_pairs' arguments
    are recorded on the way."""
    from lmforge.align import pairs as P

    run = tmp_path_factory.mktemp("dporun") / "run"
    calls, real = [], P.make_pairs

    @functools.wraps(real)  # (the recipe check reads make_pairs' signature)
    def spy(model, tok, tokens, tasks=P.PAIR_TASKS, **kw):
        calls.append({"weights": {k: v.clone() for k, v in model.state_dict().items()}, "tasks": list(tasks), **kw})
        return real(model, tok, tokens, tasks, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "make_pairs", spy)
        summary = run_recipe(recipe(small_corpus), run, quiet=True)
    return run, summary, calls


def test_dpo_stage_end_to_end(finished, small_corpus, capsys):
    run, summary, calls = finished
    m = manifest(run)
    assert list(m["stages"]) == ["fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo", "eval", "quantize", "export",
                                 "demo"]
    assert all(s["status"] == "done" for s in m["stages"].values())

    # the pairs: made once, by the SFT model (its weights), on the dev split, for the tasks [sft] trains
    assert len(calls) == 1
    c = calls[0]
    sft_w = tensors(run / "sft" / "model.safetensors")
    assert c["weights"].keys() == sft_w.keys() and all(c["weights"][k].equal(sft_w[k]) for k in sft_w)
    assert c["tasks"] == ["addition", "brackets"] and c["split"] == "dev"
    assert (c["n"], c["k"], c["max_new_tokens"], c["seed"]) == (4, 3, 4, 0)
    assert str(c["data_dir"]) == str(run / "data")
    stats = json.loads((run / "dpo_pairs" / "stats.json").read_text())
    assert set(stats["tasks"]) == {"addition", "brackets"}
    assert stats["args"]["split"] == "dev" and stats["args"]["tasks"] == ["addition", "brackets"]
    for t in stats["tasks"].values():
        assert t["prompts"] == 4 and t["samples"] == 12 and 0 <= t["pairs"] <= t["prompts"]
    from lmforge.align.pref_data import read_preferences

    for name, kind in (("pairs.jsonl", "paired"), ("unpaired.jsonl", "unpaired")):
        rows, st = read_preferences(run / "dpo_pairs" / name)
        assert len(rows) == stats[kind] and st["kept"] == stats[kind]
    assert stats["unpaired"] == sum(t["samples"] for t in stats["tasks"].values())  # every scored answer labelled

    # training: from the SFT model, into dpo/ (stamped with the stage's key), its weights moved away from SFT's
    st = m["stages"]["dpo"]["summary"]
    assert st["step"] == 2 and st["method"] == "dpo" and st["loss_type"] == "sigmoid"
    assert st["pairs_made"] == stats["paired"]
    # what it trained on: the made pairs and the recipe's file (8 pairs), split by prompt into train and val
    assert st["pairs"] + st["val_pairs"] == stats["paired"] + 8 and st["val_pairs"] >= 1
    final = json.loads((run / "dpo" / "final.json").read_text())
    assert final["step"] == 2 and (run / "dpo" / "pipeline_key.txt").read_text().strip() == m["stages"]["dpo"]["key"]
    assert final["dpo"]["method"] == "dpo" and final["dpo"]["loss_type"] == ["sigmoid"]
    assert not same_weights(run / "sft" / "model.safetensors", run / "dpo" / "model.safetensors")
    assert set(m["stages"]["dpo"]["outputs"]) >= {str(run / "dpo" / "model.safetensors"),
                                                   str(run / "dpo_pairs" / "pairs.jsonl")}

    # eval: the DPO model's bits per byte (as `lmforge eval` gives it) beside the base's and SFT's
    ev = json.loads((run / "eval.json").read_text())
    assert main(["eval", "--checkpoint", str(run / "dpo"), "--data", str(run / "data"), "--split", "test",
                 "--seq-len", "32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bits_per_byte"] == \
        pytest.approx(ev["dpo"]["bits_per_byte"], rel=1e-6)
    assert ev["dpo"]["bits_per_byte"] != ev["sft"]["bits_per_byte"]
    assert m["stages"]["eval"]["summary"]["dpo_test_bpb"] == ev["dpo"]["bits_per_byte"] == summary["dpo_bits_per_byte"]

    # the SFT vs DPO table: each trained task's dpo_chat cell is eval-dpo's scorecard (private split, zero-shot,
    # chat template), addition marked as trained by DPO, reverse not
    table = json.loads((run / "sft_eval.json").read_text())
    assert list(table["tasks"]) == ["addition"] and table["dpo_trained"] == ["addition"]
    res = json.loads((run / "eval-dpo" / "result.json").read_text())
    assert res["settings"]["apply_chat_template"] is True and res["settings"]["num_fewshot"] == 0
    assert res["model"]["checkpoint"] == str(run / "dpo")
    t, cell = res["tasks"]["addition"], table["tasks"]["addition"]["dpo_chat"]
    assert t["split"] == "private" and cell["split"] == "private" and cell["n"] == t["n"] == 3
    assert cell["value"] == t["metrics"]["exact_match"]["value"] and cell["ci"] == t["metrics"]["exact_match"]["ci"]
    assert table["bits_per_byte"]["dpo"] == ev["dpo"]["bits_per_byte"]

    # export and demo use the DPO model
    from lmforge.model import load

    hf_model, _ = load(run / "hf")
    dpo_model, _ = load(run / "dpo")
    hs, ds = hf_model.state_dict(), dpo_model.state_dict()
    assert hs.keys() == ds.keys() and all(hs[k].equal(ds[k]) for k in hs)
    chat = json.loads((run / "chat.json").read_text())
    assert chat["model"] == "dpo"
    import lmforge

    r = recipe(small_corpus)
    first = lmforge.load(run / "dpo").chat([{"role": "user", "content": r.demo.chat[0]}],
                                           max_tokens=r.demo.chat_max_tokens, temperature=0.0)
    assert chat["messages"][1]["content"] == first.text

    # the report: the pairs' yield, training, SFT vs DPO with intervals, both bits per byte, the transcript
    report = (run / "report.md").read_text()
    sec = report.split("## Preference optimization (DPO)")[1].split("\n## ")[0]
    for name, s in stats["tasks"].items():
        assert f"| {name} | 4 | 12 | {s['correct']} | {s['pairs']} | {s['pairs'] / 4:.2f} |" in sec
    a = table["tasks"]["addition"]["sft_chat"]
    row = f"| addition * | exact_match | 3 | {a['value']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] | " \
          f"{cell['value']:.3f} [{cell['ci'][0]:.3f}, {cell['ci'][1]:.3f}] | {cell['value'] - a['value']:+.3f} |"
    assert row in sec
    assert f"SFT **{ev['sft']['bits_per_byte']:.4f}**, DPO **{ev['dpo']['bits_per_byte']:.4f}**" in sec
    assert f"assistant: {first.text}" in sec and "Chat transcript (the DPO model" in sec
    sft_sec = report.split("## Instruction tuning (SFT)")[1].split("\n## ")[0]
    assert "### Chat transcript" not in sft_sec  # (one transcript: the final model's)
    if st.get("val_accuracy") is not None:
        assert f"accuracy **{st['val_accuracy']:.3f}**" in sec


def test_rerun_skips_and_a_changed_dpo_setting_reruns_dpo_and_later_stages(finished, small_corpus):
    run = finished[0]  # (after test_dpo_stage_end_to_end, which reads it as it was)
    m0 = manifest(run)
    run_recipe(recipe(small_corpus), run, quiet=True)
    assert (run / "run.log").read_text().count("unchanged, skipped") == 11
    assert manifest(run)["stages"] == m0["stages"]

    weights = file_sha256(run / "dpo" / "model.safetensors")
    pairs = file_sha256(run / "dpo_pairs" / "pairs.jsonl")
    old_key = m0["stages"]["dpo"]["key"]
    run_recipe(recipe(small_corpus, "dpo.beta=0.5"), run, quiet=True)
    m1 = manifest(run)
    for name, s in m1["stages"].items():
        if name in AFTER_SFT:
            assert s["started"] > m0["stages"][name]["started"], name
        else:
            assert s == m0["stages"][name], name
    assert m1["stages"]["dpo"]["key"] != old_key
    # the pairs depend on the SFT model and [dpo] pairs only: reused, not sampled again
    assert "dpo: the pairs in" in (run / "run.log").read_text() and file_sha256(run / "dpo_pairs" / "pairs.jsonl") == pairs
    # the finished DPO run is kept aside under its key, not deleted or continued
    kept = run / f"dpo.prev-{old_key[:12]}"
    assert file_sha256(kept / "model.safetensors") == weights
    assert [(k["path"], k["key"], k["finished"], k["stage"]) for k in m1["kept_runs"]] == \
        [(str(kept), old_key, True, "dpo")]
    assert file_sha256(run / "dpo" / "model.safetensors") != weights
    assert json.loads((run / "dpo" / "train_config.json").read_text()).get("beta", 0.5) == 0.5 \
        if (run / "dpo" / "train_config.json").exists() else True


def test_interrupted_dpo_resumes_to_the_uninterrupted_weights(small_corpus, tmp_path, monkeypatch):
    import importlib

    dpo_mod = importlib.import_module("lmforge.align.dpo")
    run = tmp_path / "run"
    real = dpo_mod.dpo

    def interrupted(cfg, **kw):
        def die(step, rec):
            if step == 2:
                raise KeyboardInterrupt
        return real(cfg, on_step=die, **kw)

    r = recipe(small_corpus, 'stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo"]',
               "dpo.max_steps=4")
    monkeypatch.setattr(dpo_mod, "dpo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, run, quiet=True)
    monkeypatch.setattr(dpo_mod, "dpo", real)
    m = manifest(run)
    assert m["stages"]["dpo"]["status"] == "interrupted" and m["stages"]["sft"]["status"] == "done"
    assert (run / "dpo" / "checkpoints" / "step-0000002" / "model.safetensors").exists()
    pairs = file_sha256(run / "dpo_pairs" / "pairs.jsonl")
    run_recipe(r, run, quiet=True)
    m1 = manifest(run)
    assert m1["stages"]["sft"] == m["stages"]["sft"]
    st = m1["stages"]["dpo"]["summary"]
    assert st["resumed_from_step"] == 2 and st["step"] == 4 and st["steps_this_run"] == 2
    log = (run / "run.log").read_text()
    assert "dpo: resuming the interrupted run" in log and "dpo: the pairs in" in log
    assert file_sha256(run / "dpo_pairs" / "pairs.jsonl") == pairs
    # --from dpo trains again from the start (the resumed run kept aside): the same weights
    resumed = file_sha256(run / "dpo" / "model.safetensors")
    run_recipe(r, run, from_stage="dpo", quiet=True)
    m2 = manifest(run)
    assert m2["stages"]["dpo"]["summary"].get("resumed_from_step") is None and m2["stages"]["dpo"]["summary"]["step"] == 4
    assert file_sha256(run / "dpo" / "model.safetensors") == resumed
    assert [k["reason"] for k in m2["kept_runs"]] == ["--from asked to train again"]


def test_no_pairs_made_and_no_files_is_a_clear_error(small_corpus, tmp_path, monkeypatch):
    from lmforge.align import pairs as P
    from lmforge.pipeline import StageError

    @functools.wraps(P.make_pairs)
    def none_made(model, tok, tokens, tasks=P.PAIR_TASKS, **kw):
        return [], [], {t: {"prompts": 4, "samples": 12, "correct": 0, "pairs": 0, "all_correct": 0, "all_wrong": 4,
                            "seconds": 0.0} for t in tasks}

    monkeypatch.setattr(P, "make_pairs", none_made)
    r = recipe(small_corpus, 'stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo"]',
               "dpo.data=[]", "sft.max_steps=1")
    with pytest.raises(StageError, match=r"stage 'dpo' failed: ValueError: dpo: the SFT model made no preference "
                                         r"pairs \(addition: 0 of 4 prompts \(0 all correct, 4 all wrong\)"):
        run_recipe(r, tmp_path / "run", quiet=True)
    assert manifest(tmp_path / "run")["stages"]["sft"]["status"] == "done"


def test_the_pairs_made_are_what_dpo_trains_on(small_corpus, tmp_path, monkeypatch):
    """A barely trained tiny model makes no pairs (the end-to-end test trains on the recipe's file): here
    make_pairs gives six, and they, alone, are the run's data, split into train and held-out pairs."""
    from lmforge.align import pairs as P

    rows = [{"id": f"addition:dev:{i}", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "chosen": [{"role": "assistant", "content": str(2 * i)}],
             "rejected": [{"role": "assistant", "content": str(2 * i + 1)}], "meta": {"task": "addition"}}
            for i in range(1, 7)]

    @functools.wraps(P.make_pairs)
    def six(model, tok, tokens, tasks=P.PAIR_TASKS, **kw):
        st = {t: {"prompts": 4, "samples": 12, "correct": 3, "pairs": 3 if t == "addition" else 0, "all_correct": 0,
                  "all_wrong": 1, "seconds": 0.0} for t in tasks}
        return rows, [], st

    monkeypatch.setattr(P, "make_pairs", six)
    r = recipe(small_corpus, 'stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "sft", "dpo"]',
               "dpo.data=[]", "sft.max_steps=1", "dpo.val_frac=0.34")
    run_recipe(r, tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    st = manifest(run)["stages"]["dpo"]["summary"]
    assert st["pairs_made"] == 6 and st["pairs"] + st["val_pairs"] == 6 and st["val_pairs"] >= 1
    final = json.loads((run / "dpo" / "final.json").read_text())
    assert list(final["dpo"]["data"]["read"]) == [str(run / "dpo_pairs" / "pairs.jsonl")]
    from lmforge.align.pref_data import read_preferences

    back, _ = read_preferences(run / "dpo_pairs" / "pairs.jsonl")
    assert [(b["prompt"], b["chosen"], b["rejected"]) for b in back] == [(x["prompt"], x["chosen"], x["rejected"])
                                                                          for x in rows]


@pytest.mark.parametrize("sets,msg", [
    (["dpo.beta=0"], "dpo.beta"),
    (["dpo.beta=fast"], "dpo.beta: expected a number"),
    (["dpo.label_smoothing=0.5"], "dpo.label_smoothing"),
    (["dpo.nope=1"], "unknown field 'dpo.nope'"),
    (["dpo.base=/elsewhere"], "dpo.base is set by the pipeline"),
    (["dpo.out=/elsewhere"], "dpo.out is set by the pipeline"),
    (['dpo.loss_type=["sigmod"]'], "dpo.loss_type"),
    (["dpo.method=ppo"], "dpo.method"),
    (["dpo.reference=frozen"], "dpo.reference"),
    (["dpo.max_steps=0", "dpo.max_time=0", "dpo.max_tokens=0"], "dpo: give a bound"),
    (["dpo.seq_len=100000"], "dpo.seq_len: 100000 is longer than the model's context"),
    (['dpo.pairs={"n": 4, "k": 3, "split": "test"}'], "dpo.pairs.split: expected 'dev'"),
    (['dpo.pairs={"n": 4, "k": 3, "model": "x"}'], "dpo.pairs.model is set by the pipeline"),
    (['dpo.pairs={"n": 4, "kk": 3}'], "dpo.pairs: unknown argument 'kk' of make_pairs"),
    (['dpo.pairs={"n": 4, "k": 1}'], "dpo.pairs.k: expected at least 2 answers a prompt"),
    (['dpo.pairs={"n": 0, "k": 3}'], "dpo.pairs.n: expected a positive integer, got 0"),
    (['dpo.pairs={"n": 4, "k": 3, "tasks": ["additon"]}'], "dpo.pairs.tasks: unknown task 'additon'"),
    (['dpo.pairs={}', "dpo.data=[]"], "dpo: no preference data"),
    (['dpo.data=["/no/such.jsonl"]'], "dpo.data[0]: no such file '/no/such.jsonl'"),
    (['stages=["fetch", "clean", "tokenizer", "shards", "pretrain", "dpo", "sft", "eval"]'], "must keep the order"),
])
def test_bad_dpo_settings_are_refused_before_any_work(sets, msg, tmp_path, capsys, monkeypatch):
    from lmforge.pipeline.runner import Runner

    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail(f"{sets} was not refused: the run started"))
    argv = ["run", "--runs", str(tmp_path), "--name", "x"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err, err
    assert not (tmp_path / "x").exists()


def test_a_bad_line_in_a_dpo_data_file_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from lmforge.pipeline.runner import Runner

    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail("not refused: the run started"))
    good = {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps(good) + "\n" + "{not json\n")
    argv = ["run", "--runs", str(tmp_path), "--name", "x", "--set", f'dpo.data=["{f}"]']
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{f}:2" in err, err
    assert not (tmp_path / "x").exists()


def test_a_dpo_table_in_a_recipe_file_is_checked(tmp_path, capsys):
    (tmp_path / "r.toml").write_text('name = "r"\n[train]\nmax_time = 5\n[dpo]\nmax_steps = 5\nbeta_dpo = 0.1\n')
    assert main(["run", str(tmp_path / "r.toml"), "--runs", str(tmp_path)]) == 2
    assert "unknown field 'dpo.beta_dpo'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_which_tasks_get_pairs(tmp_path):
    """[dpo] pairs' tasks, else the pair tasks among [sft]'s generators (in [sft]'s order); the eval set's tasks
    of those generators are the ones the table marks as trained."""
    from lmforge.pipeline.recipe import pair_tasks
    from lmforge.pipeline.runner import Runner

    srcs = 'sft.sources=[{"generator": "sort", "n": 5}, {"generator": "identity", "n": 5}, {"generator": "addition", "n": 5}]'
    r, _ = load_recipe("default", [srcs, 'eval.tasks=["addition", "reverse", "sort"]', 'dpo.pairs={"n": 4, "k": 3}'])
    assert pair_tasks(r) == ["sort", "sort_numbers", "identity", "addition"]
    assert Runner(r, tmp_path / "a", quiet=True).dpo_tasks() == ["addition", "sort"]
    r2, _ = load_recipe("default", [srcs, 'dpo.pairs={"n": 4, "k": 3, "tasks": ["reverse"]}'])
    assert pair_tasks(r2) == ["reverse"]
    r4, _ = load_recipe("default")  # the default recipe names the tasks that yield pairs at its size
    assert pair_tasks(r4) == ["brackets", "letter_count", "identity"]
    r3, _ = load_recipe("default", [srcs, "dpo.pairs={}", f'dpo.data=["{_prefs(tmp_path)}"]'])
    assert Runner(r3, tmp_path / "b", quiet=True).dpo_tasks() == []  # (files only: no task is DPO's own)


def _prefs(d):
    f = d / "p.jsonl"
    f.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n")
    return f


def test_a_recipe_without_preference_settings_makes_pairs_with_the_defaults(tmp_path):
    """A recipe with no [dpo] table, or one that names neither pairs nor data, still runs the dpo stage: the SFT
    model makes pairs with recipe.DEFAULT_PAIRS; one that names pairs keeps its own."""
    from lmforge.pipeline.recipe import DEFAULT_PAIRS

    bare = tmp_path / "bare.toml"
    bare.write_text('[train]\npreset = "shakespeare-cpu"\nmax_steps = 5\n')
    r, _ = load_recipe(str(bare))
    assert "dpo" in r.stages and r.dpo.pairs == DEFAULT_PAIRS
    table = tmp_path / "table.toml"
    table.write_text('[train]\npreset = "shakespeare-cpu"\nmax_steps = 5\n[dpo]\nbeta = 0.2\n')
    r, _ = load_recipe(str(table))
    assert r.dpo.beta == 0.2 and r.dpo.pairs == DEFAULT_PAIRS
    own = tmp_path / "own.toml"
    own.write_text('[train]\npreset = "shakespeare-cpu"\nmax_steps = 5\n[dpo]\npairs = { n = 8, k = 3 }\n')
    r, _ = load_recipe(str(own))
    assert r.dpo.pairs == {"n": 8, "k": 3}
