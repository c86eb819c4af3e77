"""What a training run tells and leaves behind: the Ctrl-C message (the checkpoint that exists and a
command that really continues the run), the loss plot's series (the final validation point, short
runs), the model's place at the end, TensorBoard event files, and the messages going through logging."""
import json
import logging
import shlex
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.train import train
from lmforge.train.trainer import check_config, loss_series, plot_metrics

from test_train import cfg_for, text_file  # noqa: F401  (text_file: a fixture)


def step_records(out):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def test_ctrl_c_names_the_checkpoint_and_a_command_that_continues(text_file, tmp_path, caplog, capsys):
    out = tmp_path / "run"

    def die(step, rec):
        if step == 5:
            raise KeyboardInterrupt

    caplog.set_level(logging.INFO, logger="lmforge")
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(text_file, out, max_steps=10, eval_every=0), on_step=die, quiet=True)
    warn = [r for r in caplog.records if r.name == "lmforge.train" and r.levelno == logging.WARNING]
    assert len(warn) == 1
    msg = warn[0].getMessage()
    ck = out / "checkpoints" / "step-0000005"
    assert msg.startswith("interrupted at step 5; ") and f"checkpoint {ck} saved" in msg
    assert (ck / "model.safetensors").exists()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 5
    # the command it gives continues the run: from step 5 to the end, not from the beginning
    cmd = msg.split("continue with: ", 1)[1]
    argv = shlex.split(cmd)
    assert argv[:2] == ["lmforge", "pretrain"] and argv[-1] == "--resume"
    caplog.clear()
    assert main(argv[1:]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["resumed_from_step"] == 5 and final["step"] == 10 and final["steps_this_run"] == 5
    # the resume message went through logging, not print
    assert any(r.name == "lmforge.train" and "resuming from" in r.getMessage() for r in caplog.records)


def test_loss_plot_draws_the_final_validation_point(text_file, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="lmforge.train")
    final = train(cfg_for(text_file, out, max_steps=10, eval_every=4, final_eval_batches=3))
    # in-training evaluations at 4 and 8, then the final one at the last step, drawn in loss.png
    series = plot_metrics(out / "metrics.jsonl", tmp_path / "again.png")
    assert [s for s, _ in series["validation"]] == [4, 8, 10]
    assert series["validation"][-1][1] == final["val_loss"]
    in_training = {r["step"]: r["val_loss"] for r in step_records(out) if "val_loss" in r}
    assert dict(series["validation"][:2]) == in_training
    assert [s for s, _ in series["train"]] == list(range(1, 11))
    assert (out / "loss.png").stat().st_size > 0 and (tmp_path / "again.png").stat().st_size > 0
    # `lmforge pretrain` says where the model is (one line, logged at the end)
    saved = [r.getMessage() for r in caplog.records if r.getMessage().startswith("saved the model to")]
    assert saved == [f"saved the model to {out} (load it with lmforge.load({str(out)!r}) / "
                     f"lmforge generate --checkpoint {out})"]
    import lmforge

    assert lmforge.load(out) is not None


def test_a_run_too_short_to_evaluate_still_plots_validation(text_file, tmp_path):
    out = tmp_path / "short"
    final = train(cfg_for(text_file, out, max_steps=3, eval_every=0), quiet=True)
    series = loss_series(out / "metrics.jsonl", json.loads((out / "final.json").read_text()))
    assert series["validation"] == [(3, final["val_loss"])]
    # an in-training evaluation at the last step is replaced by the final one, not drawn twice
    recs = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(recs[-1])
    last["val_loss"] = 99.0
    (out / "metrics.jsonl").write_text("\n".join(recs[:-1] + [json.dumps(last)]) + "\n")
    assert loss_series(out / "metrics.jsonl", final)["validation"] == [(3, final["val_loss"])]
    assert loss_series(out / "metrics.jsonl")["validation"] == [(3, 99.0)]  # without final.json: as logged


def test_tensorboard_event_files_hold_the_metrics(text_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    final = train(cfg_for(text_file, out, max_steps=6, eval_every=3, log_every=2, report_to="tensorboard"),
                  quiet=True)
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "val/loss", "val/bpb"} <= tags
    recs = step_records(out)
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [r["step"] for r in recs]
    assert [v for _, v in loss] == pytest.approx([r["loss"] for r in recs], rel=1e-6)
    assert [e.step for e in acc.Scalars("train/tokens_per_s")] == [r["step"] for r in recs if "tokens_per_s" in r]
    val = [(e.step, e.value) for e in acc.Scalars("val/loss")]
    assert [s for s, _ in val][:2] == [3, 6] and val[-1] == (6, pytest.approx(final["val_loss"], rel=1e-6))
    assert acc.Scalars("val/bpb")[-1].value == pytest.approx(final["val_bpb"], rel=1e-6)


def test_report_to_is_checked(text_file, tmp_path, monkeypatch):
    from lmforge.pipeline import load_recipe

    with pytest.raises(ValueError, match="report_to: expected one of none, tensorboard, got 'wandb'"):
        check_config(cfg_for(text_file, tmp_path, report_to="wandb"))
    r, _ = load_recipe("default", ["train.report_to=tensorboard"])  # a recipe's [train] takes it
    assert r.train.report_to == "tensorboard"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    with pytest.raises(ValueError, match=r"pip install 'lmforge\[tensorboard\]'"):
        check_config(cfg_for(text_file, tmp_path, report_to="tensorboard"))
    assert not (tmp_path / "metrics.jsonl").exists()
