"""The pipeline keeps what it trained: a changed [train] setting moves the old run (finished or
interrupted) aside instead of deleting it, ``--from eval`` after such a change stops instead of
retraining, a Ctrl-C says how to continue, and the report's data throughput covers the whole
data stage."""
import json
import logging

import pytest

from lmforge._io import file_sha256
from lmforge.cli import main
from lmforge.pipeline import load_recipe, run_recipe
from lmforge.pipeline.report import data_throughput
from lmforge.pipeline.runner import OutOfDateError

from test_pipeline import tiny_sets

STAGES = ["fetch", "clean", "tokenizer", "shards", "pretrain", "eval"]  # no export/demo: faster


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_files):  # smaller than test_pipeline's: evaluations take little
    d = tmp_path_factory.mktemp("plays")
    for p in corpus_files[:4]:
        (d / p.name).write_text(p.read_text()[:8000])
    return d


# these plays are too short for the corpus tasks' dev split (the eval stage would leave them out with a
# warning); the tasks are tested in test_pipeline.py, not here
NO_TASKS = ["eval.tasks=[]"]


def recipe(corpus, steps, *more):
    r, _ = load_recipe("default", tiny_sets(corpus, steps) + [f"stages={json.dumps(STAGES)}",
                                                              "train.final_eval_batches=2", *NO_TASKS, *more])
    return r


def manifest(run):
    return json.loads((run / "run.json").read_text())


def test_a_changed_train_setting_never_deletes_a_trained_model(small_corpus, tmp_path, caplog, capsys,
                                                               monkeypatch):
    run = tmp_path / "run"
    run_recipe(recipe(small_corpus, 3), run, quiet=True)
    m0 = manifest(run)
    weights = file_sha256(run / "model" / "model.safetensors")
    old_key = m0["stages"]["pretrain"]["key"]

    # --from eval after a [train] change: an error naming pretrain, before anything is touched
    with pytest.raises(OutOfDateError, match=r"stage 'pretrain' is out of date .*settings.*--from pretrain"):
        run_recipe(recipe(small_corpus, 4), run, from_stage="eval", quiet=True)
    assert manifest(run) == m0 and file_sha256(run / "model" / "model.safetensors") == weights
    sets = sum((["--set", s] for s in tiny_sets(small_corpus, 4) + [f"stages={json.dumps(STAGES)}",
                                                                     "train.final_eval_batches=2", *NO_TASKS]), [])
    assert main(["run", "--runs", str(tmp_path), "--name", "run", "-q", "--from", "eval"] + sets) == 1
    assert "--from pretrain" in capsys.readouterr().err and manifest(run) == m0
    # --from eval with pretrain unchanged still redoes eval only
    run_recipe(recipe(small_corpus, 3), run, from_stage="eval", quiet=True)
    assert manifest(run)["stages"]["pretrain"] == m0["stages"]["pretrain"]
    # --from pretrain trains again (not a 0-step "resume" of the finished run), the old run kept aside
    run_recipe(recipe(small_corpus, 3), run, from_stage="pretrain", quiet=True)
    redo = manifest(run)
    assert redo["stages"]["pretrain"]["summary"].get("resumed_from_step") is None
    assert redo["stages"]["pretrain"]["started"] > m0["stages"]["pretrain"]["started"]
    assert [(k["key"], k["reason"]) for k in redo["kept_runs"]] == [(old_key, "--from asked to train again")]
    redone = run / redo["kept_runs"][0]["path"].split("/")[-1]
    assert file_sha256(redone / "model.safetensors") == weights
    import shutil

    shutil.rmtree(redone)  # (the rest of the test counts kept runs from here)
    redo["kept_runs"] = []
    (run / "run.json").write_text(json.dumps(redo))
    weights = file_sha256(run / "model" / "model.safetensors")  # seeded: the same weights again

    # without --from: the finished run is kept aside under its key, and a new one is trained
    run_recipe(recipe(small_corpus, 4), run, quiet=True)
    kept = run / f"model.prev-{old_key[:12]}"
    assert file_sha256(kept / "model.safetensors") == weights
    assert json.loads((kept / "final.json").read_text())["step"] == 3
    assert json.loads((run / "model" / "final.json").read_text())["step"] == 4
    m1 = manifest(run)
    assert [(k["path"], k["key"], k["finished"]) for k in m1["kept_runs"]] == [(str(kept), old_key, True)]
    assert f"is kept in {kept}" in (run / "run.log").read_text()

    # Ctrl-C in pretrain: the warning names the checkpoint that exists and how to continue
    import lmforge.train as train_pkg

    real = train_pkg.train

    def interrupted(cfg, **kw):
        def die(step, rec):
            if step == 2:
                raise KeyboardInterrupt
        return real(cfg, on_step=die, **kw)

    monkeypatch.setattr(train_pkg, "train", interrupted)
    caplog.set_level(logging.WARNING, logger="lmforge")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe(small_corpus, 6), run, quiet=True)
    msg = [r.getMessage() for r in caplog.records  # (the data stages warn about the tiny splits, too)
           if r.levelno == logging.WARNING and r.name in ("lmforge.train", "lmforge.pipeline")]
    ck = run / "model" / "checkpoints" / "step-0000002"
    assert (ck / "model.safetensors").exists()
    assert msg == [f"interrupted at step 2; checkpoint {ck} saved; rerun `lmforge run default --runs {tmp_path} "
                   "--name run` (with the same --set options) to continue"]
    assert manifest(run)["stages"]["pretrain"]["status"] == "interrupted"
    four = [k for k in manifest(run)["kept_runs"] if k["key"] == m1["stages"]["pretrain"]["key"]]
    assert len(four) == 1 and four[0]["finished"]  # the finished 4-step run went aside before the 6-step one began
    monkeypatch.setattr(train_pkg, "train", real)
    # --from eval now: pretrain did not finish, so it is an error too
    with pytest.raises(OutOfDateError, match="stage 'pretrain' is out of date .did not finish"):
        run_recipe(recipe(small_corpus, 6), run, from_stage="eval", quiet=True)

    # settings changed again: the interrupted run is kept aside as well (it could still be resumed by hand)
    partial_key = manifest(run)["stages"]["pretrain"]["key"]
    run_recipe(recipe(small_corpus, 5), run, quiet=True)
    kept2 = run / f"model.prev-{partial_key[:12]}"
    assert (kept2 / "checkpoints" / "step-0000002" / "model.safetensors").exists()
    assert not (kept2 / "final.json").exists()
    m2 = manifest(run)
    assert [(k["path"], k["finished"]) for k in m2["kept_runs"]] == \
        [(str(kept), True), (four[0]["path"], True), (str(kept2), False)]
    assert json.loads((run / "model" / "final.json").read_text())["step"] == 5
    assert file_sha256(kept / "model.safetensors") == weights

    # back to the 4-step settings: their kept run returns to model/ instead of a retrain
    four_weights = file_sha256(run / four[0]["path"].split("/")[-1] / "model.safetensors")
    run_recipe(recipe(small_corpus, 4), run, quiet=True)
    st = manifest(run)["stages"]["pretrain"]["summary"]
    assert st["step"] == 4 and st["resumed_from_step"] == 4 and st["steps_this_run"] == 0
    assert file_sha256(run / "model" / "model.safetensors") == four_weights
    assert not (run / four[0]["path"].split("/")[-1]).exists()
    assert [k["finished"] for k in manifest(run)["kept_runs"]] == [True, False, True]  # 3 steps, the partial 6, 5
    assert f"moved back to {run / 'model'}" in (run / "run.log").read_text()


def test_data_throughput_covers_clean_and_shards(small_corpus, tmp_path):
    assert data_throughput({"stages": {"clean": {"seconds": 2.0}, "shards": {"seconds": 1.0}}}, 6_000_000) == \
        {"seconds": {"clean": 2.0, "shards": 1.0, "total": 3.0}, "mb_per_s": 2.0}
    assert data_throughput({"stages": {"shards": {"seconds": 1.0}}}, 6_000_000) is None
    r, _ = load_recipe("default", tiny_sets(small_corpus, 1) + ['stages=["fetch", "clean", "tokenizer", "shards"]'])
    run = tmp_path / "run"
    summary = run_recipe(r, run, quiet=True)
    st = manifest(run)["stages"]
    bytes_in = json.loads((run / "data" / "report.json").read_text())["bytes_in"]
    expect = round(bytes_in / 1e6 / (st["clean"]["seconds"] + st["shards"]["seconds"]), 3)
    assert summary["data_mb_per_s"] == expect
    # the shards call alone (data/report.json) times less than the whole data stage
    own = json.loads((run / "data" / "report.json").read_text())
    assert own["seconds"]["total"] < st["clean"]["seconds"] + st["shards"]["seconds"]
    report = (run / "report.md").read_text()
    assert f"{expect} MB/s end to end" in report and "time: clean " in report


def test_ctrl_c_in_another_stage_says_how_to_continue(small_corpus, tmp_path, monkeypatch, caplog):
    from lmforge.pipeline.runner import Runner

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Runner, "stage_shards", stop)
    r, _ = load_recipe("default", tiny_sets(small_corpus, 1) + ['stages=["fetch", "clean", "tokenizer", "shards"]'])
    caplog.set_level(logging.WARNING, logger="lmforge")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(r, tmp_path / "x", quiet=True)
    assert [m.getMessage() for m in caplog.records if m.name in ("lmforge.train", "lmforge.pipeline")] == [
        f"interrupted in stage shards; finished stages are kept: rerun `lmforge run default --runs {tmp_path} "
        "--name x` (with the same --set options) to continue"]
    st = manifest(tmp_path / "x")["stages"]
    assert st["tokenizer"]["status"] == "done" and st["shards"]["status"] == "interrupted"


def test_a_new_lmforge_version_reruns_the_stages(small_corpus, tmp_path, monkeypatch):
    """Stage keys include the lmforge version: unchanged settings are skipped, a new version reruns."""
    import lmforge

    r, _ = load_recipe("default", tiny_sets(small_corpus, 1) + ['stages=["fetch", "clean"]'])
    run = tmp_path / "run"
    run_recipe(r, run, quiet=True)
    keys = {k: v["key"] for k, v in manifest(run)["stages"].items()}
    run_recipe(r, run, quiet=True)
    assert {k: v["key"] for k, v in manifest(run)["stages"].items()} == keys
    assert all("unchanged, skipped" in line for line in (run / "run.log").read_text().splitlines()[-2:])
    monkeypatch.setattr(lmforge, "__version__", lmforge.__version__ + ".post1")
    run_recipe(r, run, quiet=True)
    new = {k: v["key"] for k, v in manifest(run)["stages"].items()}
    assert all(new[k] != keys[k] for k in keys)
    assert json.loads((run / "recipe.json").read_text())["lmforge_version"].endswith(".post1")
