"""The distributed checkpoints in the training loop (``lmforge pretrain --nproc``): an FSDP2 run on 2
ranks checkpoints at step 4 of 6; put back to that checkpoint (as after a crash), it resumes on 4 DDP
ranks with the same global batch, and steps 5 and 6 and the final weights equal the run that was never
interrupted; ``lmforge export`` takes the checkpoint directory as it is."""
from __future__ import annotations

import pytest
import json
import shutil

import torch

from test_parallel_launch import lmforge, pretrain_args, text_file  # noqa: F401 (the fixture)

FLAT = ["--set", "schedule=constant", "--set", "warmup_steps=0", "--set", "log_every=1"]

pytestmark = pytest.mark.slow  # the 4-rank resume through the loop; test_parallel_ckpt_world4 and test_parallel_train_resume stay in CI


def _losses(run) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_fsdp_2_ranks_checkpoint_resumes_on_4_ddp_ranks(text_file, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    p = lmforge(pretrain_args(text_file, whole, "--nproc", "2", "--set", "parallel=fsdp", "--max-steps", "6",
                              "--checkpoint-every", "4", *FLAT))
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-3000:]
    ck = whole / "checkpoints" / "step-0000004"
    assert (ck / "dcp" / ".metadata").exists() and not (ck / "model.safetensors").exists()
    tr = json.loads((ck / "trainer.json").read_text())
    assert tr["saved_by"]["strategy"] == "fsdp" and tr["saved_by"]["world_size"] == 2 and tr["step"] == 4
    shutil.copytree(whole, cut)  # back to step 4, as if the run had died after that checkpoint
    for d in (cut / "checkpoints").glob("step-*"):
        if d.name != ck.name:
            shutil.rmtree(d)
    (cut / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "path": ck.name}))
    p = lmforge([*pretrain_args(text_file, cut, "--nproc", "4", "--set", "parallel=ddp", "--set", "batch_size=2",
                                "--max-steps", "6", "--checkpoint-every", "4", *FLAT), "--resume"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    a, b = _losses(whole), _losses(cut)
    for s in (5, 6):
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])
    fin = json.loads((cut / "final.json").read_text())
    assert fin["resumed_from_step"] == 4 and fin["parallel"]["world_size"] == 4
    wa, wb = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert set(wa) == set(wb)
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= 1e-5, worst
    print(f"loop: fsdp 2 -> ddp 4 at step 4: losses {a[5]:.6f}/{b[5]:.6f}, {a[6]:.6f}/{b[6]:.6f}; weights {worst:.2g}")
    from lmforge.cli import main

    assert main(["export", "--checkpoint", str(ck), "--out", str(tmp_path / "hf")]) == 0
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert hf and all(torch.isfinite(t).all() for t in hf.values())
