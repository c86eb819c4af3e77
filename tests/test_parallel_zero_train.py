"""ZeRO-1/2/3 through the whole trainer (``lmforge.train.trainer.train`` on 2 gloo ranks): the losses in
metrics.jsonl, the validation losses and the saved model equal one process on the same global batch
(grad_accum 2, clipping that binds, evaluation and sampling on), and a run stopped at step 2 resumes
from its distributed checkpoint on 2 ranks under another stage, ending where the straight run ends.

The loop writes a checkpoint at the end of every run; a ZeRO rank holds only its pieces of the
optimizer state, so that needs ``lmforge.parallel.checkpoint`` (the distributed checkpoints): where
it is absent the module is skipped, saying so.
"""
import json

import pytest

from parallel_harness import run_ranks
from test_parallel_train import assert_same_run, base_cfg, metrics, text_file, train_rank  # noqa: F401

try:
    from lmforge.parallel import checkpoint as _ck

    HAVE_DCP = hasattr(_ck, "save_dist_checkpoint")
except ImportError:
    HAVE_DCP = False

pytestmark = pytest.mark.skipif(not HAVE_DCP, reason="lmforge.parallel.checkpoint (the distributed checkpoints) "
                                "is not on this branch: a ZeRO run's final checkpoint needs it")


def ranks_then(cfgs: list) -> list:
    """Several runs, one after the other, in these rank processes (one start-up for all)."""
    return [train_rank(c) for c in cfgs]


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory):
    from lmforge.train import TrainConfig, train

    d = tmp_path_factory.mktemp("zero_train")
    one = train(TrainConfig(**base_cfg(text_file, d / "one", optimizer="adamw")), quiet=True)
    one_muon = train(TrainConfig(**base_cfg(text_file, d / "one_muon", optimizer="muon")), quiet=True)
    cfgs = [base_cfg(text_file, d / s, optimizer="adamw", parallel=s, batch_size=4) for s in ("zero1", "zero2", "zero3")]
    cfgs.append(base_cfg(text_file, d / "zero3_muon", optimizer="muon", parallel="zero3", batch_size=4))
    # a run of 2 steps under zero3, resumed to 4 under zero2
    cfgs.append(base_cfg(text_file, d / "resumed", optimizer="adamw", parallel="zero3", batch_size=4, max_steps=2))
    cfgs.append(base_cfg(text_file, d / "resumed", optimizer="adamw", parallel="zero2", batch_size=4, resume=True))
    got = run_ranks(2, "test_parallel_zero_train:ranks_then", timeout=500, cfgs=cfgs)
    return {"dir": d, "one": one, "one_muon": one_muon, "got": got}


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3"])
def test_zero_pretrain_equals_one_process(runs, stage):
    d = runs["dir"]
    assert_same_run(d / "one", d / stage)
    assert all(r["grad_norm"] > 0.05 for r in metrics(d / "one") if "grad_norm" in r)  # clipping binds
    fin = json.loads((d / stage / "final.json").read_text())
    assert fin["parallel"]["strategy"] == stage and fin["parallel"]["world_size"] == 2
    assert abs(fin["val_loss"] - runs["one"]["val_loss"]) <= 1e-5 and fin["step"] == 4


def test_zero3_muon_pretrain_equals_one_process(runs):
    assert_same_run(runs["dir"] / "one_muon", runs["dir"] / "zero3_muon")


def test_zero3_checkpoint_resumes_under_zero2(runs):
    d = runs["dir"]
    resumed = [r for r in metrics(d / "resumed") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2, resumed
    assert_same_run(d / "one", d / "resumed")
