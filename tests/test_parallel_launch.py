"""Launching: ``lmforge pretrain --nproc 2`` really runs 2 ranks through torchrun; a node whose peer
never comes fails within ``dist_timeout`` with an error naming it (no hang). Two "nodes" on loopback:
tests/test_parallel_launch_nodes.py; killing a rank mid-run and resuming:
tests/test_parallel_train_fault.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_harness import ROOT, free_port


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_texts):
    p = tmp_path_factory.mktemp("txt") / "plays.txt"
    p.write_text("".join(corpus_texts[:2])[:40_000])
    return p


def pretrain_args(text_file, out, *extra):
    return ["pretrain", "--text", str(text_file), "--tokenizer", "char", "--preset", "tiny", "--out", str(out),
            "--device", "cpu", "--max-steps", "3", "--set", "model.n_layer=2", "--set", "model.n_head=2",
            "--set", "model.d_model=32", "--set", "batch_size=4", "--set", "seq_len=32", "--set", "eval_every=0",
            "--set", "final_eval_batches=1", "--set", "threads=1", "--set", "peak_flops=1e11", *extra]


def lmforge(args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return subprocess.Popen([sys.executable, "-m", "lmforge", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_nproc_2_runs_two_ranks(text_file, tmp_path):
    p = lmforge(pretrain_args(text_file, tmp_path / "run", "--nproc", "2"))
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    fin = json.loads((tmp_path / "run" / "final.json").read_text())
    assert fin["parallel"] == {"strategy": "ddp", "world_size": 2, "dp_size": 2, "tp_size": 1}
    assert fin["tokens"] == 3 * 2 * 4 * 32  # steps x ranks x batch x seq_len: each rank read its own rows
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 3  # rank 0 alone prints the result
    assert "running parallel = 'ddp'" in err  # --nproc with parallel = none: DDP, and said so
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]
    assert cfg["parallel"] == "ddp" and cfg["nproc"] == 2


def test_a_missing_node_fails_within_dist_timeout(text_file, tmp_path):
    """nnodes 2, only node 1 started: the rendezvous times out after dist_timeout (3 s), the job fails
    (non-zero) with an error naming the setting, and nothing was trained."""
    port = str(free_port())
    p = lmforge(pretrain_args(text_file, tmp_path / "run", "--nproc", "1", "--nnodes", "2", "--node-rank", "1",
                              "--master-port", port, "--set", "dist_timeout=3"))
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert "did not complete within dist_timeout = 3 s" in err, err[-3000:]
    assert not (tmp_path / "run" / "final.json").exists()


def test_a_rank_that_cannot_join_names_dist_timeout(tmp_path):
    """A rank started with torchrun's variables whose master never comes (no launcher in between):
    init_distributed raises RendezvousError naming dist_timeout."""
    code = ("from lmforge.parallel.env import init_distributed; from lmforge.train.loop import LoopConfig\n"
            "try:\n    init_distributed(LoopConfig(dist_timeout=2))\nexcept Exception as e:\n"
            "    print(type(e).__name__, e)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "RendezvousError" in r.stdout and "dist_timeout = 2 s" in r.stdout, r.stdout + r.stderr[-2000:]
