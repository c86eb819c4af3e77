"""Ctrl-C on a 2-rank run (SIGINT to the whole process group, as a terminal sends it; torchrun passes
it on too): the ranks agree on it with the step's loss, stop at the same step boundary and write one
collective checkpoint there; the job exits 130 (interrupted) and says how to continue."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_harness import ROOT
from test_parallel_launch import pretrain_args, text_file  # noqa: F401 (the fixture)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_stops_every_rank_at_one_step_with_one_checkpoint(text_file, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    p = subprocess.Popen([sys.executable, "-m", "lmforge", *pretrain_args(text_file, run, "--nproc", "2",
                                                                           "--max-steps", "100000",
                                                                           "--set", "log_every=1")],
                         env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    try:
        t0 = time.time()
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 10):
            assert p.poll() is None, p.communicate()[1][-3000:]
            assert time.time() - t0 < 180, "no 10 steps within 180 s"
            time.sleep(0.2)
        os.killpg(p.pid, signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err[-3000:]
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]
    assert latest["step"] == steps[-1] >= 10 and steps == list(range(1, steps[-1] + 1))
    ck = run / "checkpoints" / latest["path"]
    assert json.loads((ck / "trainer.json").read_text())["step"] == latest["step"]
    assert f"interrupted at step {latest['step']}; checkpoint" in err and "--resume" in err
