"""A DDP checkpoint saved on 2 ranks resumes on 4 with the same global batch (each rank reads 2 rows
instead of 4): the restored state is the saved one bit for bit, and the losses and final weights
continue the 2-rank run that was never interrupted (lmforge.parallel.checkpoint)."""
from __future__ import annotations

from parallel_harness import run_ranks
from test_parallel_ckpt import TOL, _ck, assert_restored, assert_resumed


def test_ddp_2_ranks_resumes_on_4(tmp_path):
    saved = run_ranks(2, "test_parallel_ckpt:ck_train", parallel="ddp", save_at=2, run_dir=str(tmp_path))[0]
    on4 = run_ranks(4, "test_parallel_ckpt:ck_train", parallel="ddp", resume=str(_ck(tmp_path)))
    for r in on4:  # every rank resumed at the saved step, with the same losses
        assert r["start"] == 2 and r["losses"] == on4[0]["losses"]
    assert_restored(saved, on4[0])
    print(f"ddp 2 -> 4 ranks: max difference {assert_resumed(saved, on4[0], 2, tol=TOL):.2g}")
