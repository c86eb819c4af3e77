"""Resume: a rerun continues from the checkpoint, and the tests can tell that from a restart.

Training is seeded, so a run restarted from step 0 ends with the same weights as an
uninterrupted one; equal final weights prove little. These tests assert the resume
itself: the step the rerun started from is the checkpoint's, it executed only the
remaining optimizer steps, the metric lines up to the checkpoint are the interrupted
run's own bytes, the optimizer state its first step started from is the state the
uninterrupted run had at that step, and its first batch is the batch the uninterrupted
run drew at that step. Then: identical loss curve and bit-identical final weights.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.data.loader import ShardLoader
from lmforge.model import load
from lmforge.train import train
from lmforge.train import trainer as trainer_mod
from lmforge.train.checkpoint import file_state_summary

from test_pipeline import digests, small_corpus, tiny_sets  # noqa: F401  (small_corpus: a fixture)
from test_train import TINY, cfg_for, text_file  # noqa: F401  (text_file: a fixture)



def records(path):
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def step_lines(path):
    return [r for r in records(path) if "event" not in r]


def _opt_state(opts) -> dict:
    """Every optimizer's state, copied: (optimizer, parameter index, key) -> tensor or number."""
    out = {}
    for i, opt in enumerate(opts):
        for idx, st in opt.state_dict()["state"].items():
            for key, v in st.items():
                out[i, idx, key] = v.detach().clone() if torch.is_tensor(v) else v
    return out


class Spy:
    """Watches the train() calls made while it is installed, one record per call: the optimizer
    steps it executed (and the optimizers' state just before each), and the training batches
    it drew (with the loader's position before each draw)."""

    def __init__(self, monkeypatch):
        self.runs = []
        real_build, real_next = trainer_mod.build_optimizers, ShardLoader.next

        def build(*a, **kw):
            opts = real_build(*a, **kw)
            run = {"opt_steps": 0, "state_before_step": [], "batches": []}
            self.runs.append(run)
            first, real_step = opts[0], opts[0].step

            def step(*sa, **skw):  # every optimizer steps once per training step; count the first
                run["opt_steps"] += 1
                run["state_before_step"].append(_opt_state(opts))
                return real_step(*sa, **skw)

            first.step = step
            return opts

        def next_batch(loader):
            pos = loader.step
            b = real_next(loader)
            if loader.stream.split == "train" and self.runs:
                self.runs[-1]["batches"].append((pos, b.x.copy(), b.y.copy()))
            return b

        monkeypatch.setattr(trainer_mod, "build_optimizers", build)
        monkeypatch.setattr(ShardLoader, "next", next_batch)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def assert_resumed_metrics(run_dir, before: bytes, inode: int, ck_step: int, total: int, ck_copy, loader_step):
    """metrics.jsonl after the rerun: the interrupted run's lines up to the checkpoint, byte for byte and
    in the same file, then one ``resumed`` event naming the checkpoint and what was restored, then one
    line for each of the remaining steps."""
    path = run_dir / "metrics.jsonl"
    after = path.read_bytes()
    kept = b"".join(ln for ln in before.splitlines(keepends=True)
                    if ln.endswith(b"\n") and json.loads(ln)["step"] <= ck_step)
    assert [json.loads(ln)["step"] for ln in kept.splitlines()] == list(range(1, ck_step + 1))
    assert after.startswith(kept), "metric lines before the checkpoint were rewritten"
    assert os.stat(path).st_ino == inode, "metrics.jsonl was replaced, not continued"
    rest = [json.loads(ln) for ln in after[len(kept):].splitlines()]
    ev = rest[0]
    assert ev["event"] == "resumed" and ev["step"] == ck_step
    assert ev["checkpoint"] == f"checkpoints/step-{ck_step:07d}"
    assert ev["loader_step"] == loader_step  # the loader's position after loading, read off the loader
    saved = file_state_summary(ck_copy)  # what the checkpoint's files hold
    assert len(ev["optimizer_state"]) == len(saved)
    assert ev["optimizer_state"][0]["params_with_state"] > 0  # (a weight average may not have started yet)
    for live, disk in zip(ev["optimizer_state"], saved):
        assert live["params_with_state"] == disk["params_with_state"]
        assert (live["step"], live["sha256"]) == (disk["step"], disk["sha256"])
    for o in ev["optimizer_state"]:
        if o["name"] == "AdamW":  # AdamW counts its steps
            assert o["step"] == ck_step
    assert [r["step"] for r in rest[1:]] == list(range(ck_step + 1, total + 1))


def assert_same_weights(a_dir, b_dir):
    a, _ = load(a_dir)
    b, _ = load(b_dir)
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


def assert_resumed_run(ref, cut, ref_run, rerun, ck_step, total, grad_accum=1):
    """What the rerun did, from the trainer's own record and from the spy."""
    final = json.loads((cut / "final.json").read_text())
    assert final["resumed_from_step"] == ck_step  # started from the checkpoint's step
    assert final["step"] == total and final["steps_this_run"] == total - ck_step
    assert rerun["opt_steps"] == total - ck_step  # optimizer steps actually executed
    assert json.loads((ref / "final.json").read_text())["resumed_from_step"] is None
    # the optimizer state the rerun's first step started from is the uninterrupted run's at that step
    assert _same_state(rerun["state_before_step"][0], ref_run["state_before_step"][ck_step]), \
        "optimizer state was not restored"
    # the loader continued where it stopped: the first batch is the one the uninterrupted run drew next
    pos, x, y = rerun["batches"][0]
    rpos, rx, ry = ref_run["batches"][ck_step * grad_accum]
    assert pos == rpos == ck_step * grad_accum, "loader position was not restored"
    assert len(rerun["batches"]) == (total - ck_step) * grad_accum
    assert (x == rx).all() and (y == ry).all(), "the first batch after resume differs"
    assert [r["loss"] for r in step_lines(cut / "metrics.jsonl")] == \
        [r["loss"] for r in step_lines(ref / "metrics.jsonl")]
    assert_same_weights(ref, cut)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_and_resumed_run_matches(text_file, tmp_path, optimizer, monkeypatch):
    # the muon run also keeps a weight average from step 4 on: the cut at 7 saves it mid-way
    kw = dict(optimizer=optimizer, model={**TINY, "dropout": 0.1})
    if optimizer == "muon":
        kw.update(ema=0.8, ema_start=0.3)
    spy = Spy(monkeypatch)
    ref = tmp_path / "ref"
    train(cfg_for(text_file, ref, **kw), quiet=True)
    cut = tmp_path / "cut"

    def die(step, rec):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(text_file, cut, **kw), on_step=die, quiet=True)
    assert json.loads((cut / "checkpoints" / "latest.json").read_text())["step"] == 7
    with pytest.raises(ValueError, match="--resume"):
        train(cfg_for(text_file, cut, **kw), quiet=True)
    before, inode = (cut / "metrics.jsonl").read_bytes(), os.stat(cut / "metrics.jsonl").st_ino
    ck_copy = shutil.copytree(cut / "checkpoints" / "step-0000007", tmp_path / "ck")
    n = len(spy.runs)
    train(cfg_for(text_file, cut, resume=True, **kw), quiet=True)
    assert len(spy.runs) == n + 1
    assert_resumed_run(ref, cut, spy.runs[0], spy.runs[-1], ck_step=7, total=12)
    assert_resumed_metrics(cut, before, inode, 7, 12, ck_copy, loader_step=7)
    names = [o["name"] for o in records(cut / "metrics.jsonl")[7]["optimizer_state"]]
    assert names == (["Muon", "AdamW", "WeightEMA"] if optimizer == "muon" else ["AdamW"])
    assert (ref / "loss.png").exists() and (cut / "loss.png").exists()  # the plot skips the event line
    assert json.loads((ref / "final.json").read_text())["ema"] == (optimizer == "muon")


def test_resume_from_periodic_checkpoint_after_a_crash(text_file, tmp_path, monkeypatch):
    """A crash between checkpoints (grad_accum 2): the rerun continues from the last one,
    drops the crashed run's lines after it and ends identical."""
    spy = Spy(monkeypatch)
    ref = tmp_path / "ref"
    train(cfg_for(text_file, ref, grad_accum=2), quiet=True)
    run = tmp_path / "run"

    def crash(step, rec):
        if step == 10:
            raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        train(cfg_for(text_file, run, checkpoint_every=4, grad_accum=2), on_step=crash, quiet=True)
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 8
    before, inode = (run / "metrics.jsonl").read_bytes(), os.stat(run / "metrics.jsonl").st_ino
    assert [r["step"] for r in records(run / "metrics.jsonl")] == list(range(1, 11))  # 9, 10: after the checkpoint
    ck_copy = shutil.copytree(run / "checkpoints" / "step-0000008", tmp_path / "ck")
    train(cfg_for(text_file, run, checkpoint_every=4, grad_accum=2, resume=True), quiet=True)
    assert_resumed_run(ref, run, spy.runs[0], spy.runs[-1], ck_step=8, total=12, grad_accum=2)
    assert_resumed_metrics(run, before, inode, 8, 12, ck_copy, loader_step=16)


def test_metric_lines_are_cut_in_place(tmp_path):
    """Lines after the checkpoint go (a half-written last one too); the lines before keep their bytes."""
    from lmforge.train.trainer import _truncate_metrics

    p = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    p.write_text("".join(lines) + '{"step": 6, "lo')
    inode = os.stat(p).st_ino
    _truncate_metrics(p, 5)
    assert p.read_text() == "".join(lines) and os.stat(p).st_ino == inode
    _truncate_metrics(p, 3)
    assert p.read_text() == "".join(lines[:3]) and os.stat(p).st_ino == inode
    _truncate_metrics(p, 0)
    assert p.read_bytes() == b""


def test_killed_run_resumes_to_the_same_artifacts(small_corpus, tmp_path):  # noqa: F811
    """A pipeline killed (SIGKILL) in the middle of pre-training: the rerun skips the finished stages,
    pre-training continues from the last checkpoint (run.json and run.log say so), and every artifact
    is identical to an uninterrupted run's."""
    from lmforge.pipeline import load_recipe, run_recipe

    sets = tiny_sets(small_corpus, steps=40)
    r, _ = load_recipe("default", sets)
    run_recipe(r, tmp_path / "ref", quiet=True)
    cmd = [sys.executable, "-m", "lmforge.cli", "run", "--runs", str(tmp_path), "--name", "cut", "-q"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = tmp_path / "cut" / "model"
    ck = model / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ck.exists() and json.loads(ck.read_text())["step"] >= 5:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    m = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert m["stages"]["pretrain"]["status"] == "running"  # killed in the middle of training
    ck_step = json.loads(ck.read_text())["step"]
    assert 5 <= ck_step < 40
    ck_copy = shutil.copytree(model / "checkpoints" / f"step-{ck_step:07d}", tmp_path / "ck")
    loader_step = json.loads((ck_copy / "trainer.json").read_text())["loader"]["step"]
    before, inode = (model / "metrics.jsonl").read_bytes(), os.stat(model / "metrics.jsonl").st_ino
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    pre = json.loads((tmp_path / "cut" / "run.json").read_text())["stages"]["pretrain"]
    assert pre["status"] == "done"
    assert pre["summary"]["resumed_from_step"] == ck_step and pre["summary"]["steps_this_run"] == 40 - ck_step
    assert "resumed_from_step" not in json.loads((tmp_path / "ref" / "run.json").read_text())["stages"]["pretrain"][
        "summary"]
    log = (tmp_path / "cut" / "run.log").read_text()
    assert "clean: unchanged, skipped" in log
    assert f"from its checkpoint step-{ck_step:07d}" in log
    assert f"pretrain: resumed from step {ck_step}, ran {40 - ck_step} more steps" in log
    assert_resumed_metrics(model, before, inode, ck_step, 40, ck_copy, loader_step=loader_step)
    assert loader_step == ck_step  # one micro-batch a step
    final = json.loads((model / "final.json").read_text())
    assert final["resumed_from_step"] == ck_step and final["steps_this_run"] == 40 - ck_step
    assert digests(tmp_path / "cut") == digests(tmp_path / "ref")


def test_resume_with_larger_bounds_keeps_the_schedule_continuous(text_file, tmp_path):
    """Interrupted at step 7 of 12, resumed with max_steps=24: the learning rate goes on from where it was
    (no jump back up to the cosine's early values) and still ends at the schedule's minimum."""
    cut = tmp_path / "cut"

    def die(step, rec):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(text_file, cut, schedule="cosine", min_lr_ratio=0.1), on_step=die, quiet=True)
    train(cfg_for(text_file, cut, schedule="cosine", min_lr_ratio=0.1, max_steps=24, resume=True), quiet=True)
    lrs = {r["step"]: r["lr"] for r in step_lines(cut / "metrics.jsonl")}
    assert sorted(lrs) == list(range(1, 25))
    ev = next(r for r in records(cut / "metrics.jsonl") if r.get("event") == "resumed")
    assert ev["schedule"] == {"progress_at_checkpoint": round(7 / 12, 6), "share_of_new_bounds": round(7 / 24, 6)}
    # the first step after the resume runs at the rate the uninterrupted 12-step run had there
    ref = tmp_path / "ref"
    train(cfg_for(text_file, ref, schedule="cosine", min_lr_ratio=0.1, max_steps=12), quiet=True)
    ref_lrs = {r["step"]: r["lr"] for r in step_lines(ref / "metrics.jsonl")}
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([ref_lrs[s] for s in range(1, 9)], rel=1e-9)
    assert all(lrs[s + 1] <= lrs[s] + 1e-12 for s in range(7, 24))  # decays on, never back up
    assert lrs[24] == pytest.approx(min(lrs.values()), rel=1e-6)
