"""A TP+FSDP2 checkpoint (4 ranks on a (2, 2) mesh, Muon + AdamW + the weight average): the same mesh
resumes bit for bit, one process resumes with the state restored bit for bit and the same subsequent
losses, weights and optimizer states (lmforge.parallel.checkpoint over 2-D DTensor placements)."""
from __future__ import annotations

import pytest

from parallel_harness import run_ranks
from test_parallel_ckpt import _ck, assert_restored, assert_resumed, ck_train

pytestmark = pytest.mark.slow  # 4 ranks; test_parallel_tp_ckpt.py's TP+FSDP2 checkpoints stay in CI


def test_tp_fsdp_4_ranks_resumes_on_the_same_mesh_and_on_1(tmp_path):
    kw = dict(parallel="tp+fsdp", cfg={"tp_size": 2}, optimizer="muon")
    runs = [dict(kw, save_at=2, run_dir=str(tmp_path)), dict(kw, resume=str(tmp_path / "checkpoints" / "step-0000002"))]
    saved, again = run_ranks(4, "test_parallel_ckpt:sequence", runs=runs)[0]
    assert_restored(saved, again)
    assert_resumed(saved, again, 2, tol=0.0)
    got = ck_train("none", resume=str(_ck(tmp_path)), optimizer="muon")
    assert_restored(saved, got)
    print(f"tp+fsdp (2 x 2) -> 1 process: max difference {assert_resumed(saved, got, 2):.2g}")
