"""ZeRO through the whole trainer (``lmforge.train.trainer.train`` on 2 gloo ranks): a run of 2 steps under
zero3, resumed from its distributed checkpoint under zero1 to step 4, gives the losses in
metrics.jsonl, the validation losses and the saved model of one process's 4 steps on the same global
batch (Muon, grad_accum 2, clipping that binds, evaluation and sampling on). The stages one by one
against one process and DDP: tests/test_parallel_zero.py (the loop's step, reduced).

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


@pytest.fixture(scope="module")
def runs(text_file, tmp_path_factory):
    """One process, 4 steps; on 2 ranks: 2 steps under zero3, then resumed under zero1 to step 4 (each run its
    own processes: the loop closes its process group at the end)."""
    from lmforge.train import TrainConfig, train

    d = tmp_path_factory.mktemp("zero_train")
    one = train(TrainConfig(**base_cfg(text_file, d / "one", optimizer="muon")), quiet=True)
    first = run_ranks(2, "test_parallel_train:train_rank", timeout=240,
                      cfg=base_cfg(text_file, d / "zero", optimizer="muon", parallel="zero3", batch_size=4, max_steps=2))
    then = run_ranks(2, "test_parallel_train:train_rank", timeout=240,
                     cfg=base_cfg(text_file, d / "zero", optimizer="muon", parallel="zero1", batch_size=4, resume=True))
    return {"dir": d, "one": one, "first": first, "then": then}


def test_zero3_then_zero1_pretrain_equals_one_process(runs):
    """The losses of every step (2 under zero3, 2 under zero1 after the resume), the validation losses and the
    saved model equal one process's 4 steps (Muon, grad_accum 2, clipping that binds)."""
    d = runs["dir"]
    assert all(r["grad_norm"] > 0.05 for r in metrics(d / "one") if "grad_norm" in r)  # clipping binds
    resumed = [r for r in metrics(d / "zero") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2, resumed
    assert runs["first"][0]["step"] == 2 and runs["then"][0]["step"] == runs["then"][1]["step"] == 4
    assert_same_run(d / "one", d / "zero")
    fin = json.loads((d / "zero" / "final.json").read_text())
    assert fin["parallel"]["strategy"] == "zero1" and fin["parallel"]["world_size"] == 2
    assert abs(fin["val_loss"] - runs["one"]["val_loss"]) <= 1e-5
