"""ZeRO's checkpoints through ``lmforge.parallel.checkpoint`` (DCP by parameter name, the weight average
included), on 2 gloo ranks: saved under one stage after step 2 of 4 and resumed under another, or
from a one-process checkpoint (DCP and the single-process format), every resumed run continues the
uninterrupted one-process run (losses, final weights, weight average, RNG; 1e-5); a checkpoint of
another model is refused on every rank."""
import pytest

from parallel_harness import run_ranks
from test_parallel_ckpt import _ck, assert_resumed, ck_train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero_ck")
    # (ck_train reads the weight average back by model parameter name: under zero3 it follows the pieces,
    # so the zero3 runs go without one; zero1/2 average the whole parameters and keep it)
    ref = {"adamw": ck_train("none", ema_start=None), "muon": ck_train("none", optimizer="muon", ema_start=None),
           "adamw+ema": ck_train("none")}  # 4 steps, never interrupted
    ck_train("none", save_at=2, run_dir=str(d / "one"))
    ck_train("none", save_at=2, run_dir=str(d / "single"), single=True, ema_start=None)
    plan = [dict(parallel="zero3", save_at=2, run_dir=str(d / "z3"), ema_start=None),
            dict(parallel="zero1", resume=str(d / "z3" / "checkpoints" / "step-0000002"), ema_start=None),
            dict(parallel="zero2", resume=str(_ck(d / "one"))),
            dict(parallel="zero3", resume=str(_ck(d / "single")), ema_start=None),
            dict(parallel="zero2", optimizer="muon", save_at=2, run_dir=str(d / "z2m"), ema_start=None),
            dict(parallel="zero3", optimizer="muon", resume=str(d / "z2m" / "checkpoints" / "step-0000002"),
                 ema_start=None),
            dict(parallel="zero3", resume=str(_ck(d / "one")), model={"d_ff": 96}, error=True)]
    got = run_ranks(2, "test_parallel_ckpt:sequence", timeout=300, runs=plan)[0]
    return {"ref": ref, "got": got}


@pytest.mark.parametrize("i,opt,what", [(1, "adamw", "zero3 -> zero1"), (2, "adamw+ema", "one process (DCP, weight average) -> zero2"),
                                        (3, "adamw", "one process (single format) -> zero3"),
                                        (5, "muon", "zero2 -> zero3")])
def test_zero_checkpoint_resumes(runs, i, opt, what):
    print(f"{what}: max difference {assert_resumed(runs['ref'][opt], runs['got'][i], 2, tol=1e-5):.2g}")  # the 1e-5


def test_zero_saving_run_equals_one_process(runs):
    for i, opt in ((0, "adamw"), (4, "muon")):
        ref, got = runs["ref"][opt], runs["got"][i]
        for a, b in zip(ref["losses"], got["losses"]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a))


def test_zero_refuses_a_checkpoint_of_another_model(runs):
    err = runs["got"][6]
    assert err is not None and "ValueError" in err and "d_ff" not in err.split(":")[0], err
    assert "shape" in err, err
