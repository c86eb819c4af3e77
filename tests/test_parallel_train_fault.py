"""Fault tolerance: a rank SIGKILLed mid-run ends the job (non-zero), the last checkpoint stays intact,
and ``--resume`` continues from exactly that step (the ``resumed`` line of metrics.jsonl and
final.json's ``resumed_from_step``), on 2 DDP ranks launched by ``lmforge pretrain --nproc 2``."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from test_parallel_launch import lmforge, pretrain_args, text_file  # noqa: F401 (the fixture)


def _children(pid: int) -> list[int]:
    out = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of the training process of ``rank`` among ``root``'s descendants."""
    todo = [root]
    while todo:
        p = todo.pop()
        try:
            env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            env = []
        if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env) and p != root:
            return p
        todo += _children(p)
    return None


def latest_step(run: Path) -> int | None:
    try:
        return json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the ranks through /proc")
def test_sigkill_a_rank_then_resume_exactly(text_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    args = pretrain_args(text_file, run, "--nproc", "2", "--checkpoint-every", "4", "--max-steps", "100000",
                         "--set", "log_every=1")
    p = lmforge(args)
    try:
        t0 = time.time()
        while (latest_step(run) or 0) < 8:
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < 180, "no checkpoint at step 8 within 180 s"
            time.sleep(0.2)
        victim = rank_pid(p.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, "the job must fail when a rank dies"
    assert p.returncode == 128 + signal.SIGKILL, (p.returncode, err[-2000:])  # the killed rank is the root cause
    step = latest_step(run)
    ck = run / "checkpoints" / f"step-{step:07d}"
    trainer = json.loads((ck / "trainer.json").read_text())  # intact: complete and readable
    assert trainer["step"] == step
    from lmforge.parallel.checkpoint import is_dist_checkpoint

    assert is_dist_checkpoint(ck) and (ck / "dcp" / ".metadata").exists()  # parallel = ddp: the DCP format
    # the restart continues from exactly that checkpoint
    p2 = lmforge([*pretrain_args(text_file, run, "--nproc", "2", "--checkpoint-every", "4", "--max-steps",
                                 str(step + 3), "--set", "log_every=1"), "--resume"])
    _, err2 = p2.communicate(timeout=240)
    assert p2.returncode == 0, err2[-3000:]
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    resumed = [r for r in recs if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == step and resumed[0]["world_size"] == 2
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, step + 4)), steps  # every step once: the killed run's later lines are gone
    fin = json.loads((run / "final.json").read_text())
    assert fin["resumed_from_step"] == step and fin["steps_this_run"] == 3 and fin["parallel"]["world_size"] == 2
