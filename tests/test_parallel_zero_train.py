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
from test_parallel_train import base_cfg, metrics, text_file, weights  # noqa: F401

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
    kw = dict(optimizer="muon", schedule="constant", warmup_steps=0)  # (the rate does not depend on the bound)
    four = dict(max_steps=4)
    one = train(TrainConfig(**base_cfg(text_file, d / "one", **four, **kw)), quiet=True)
    first = run_ranks(2, "test_parallel_train:train_rank", timeout=240,
                      cfg=base_cfg(text_file, d / "zero", parallel="zero3", batch_size=4, max_steps=2, **kw))
    then = run_ranks(2, "test_parallel_train:train_rank", timeout=240,
                     cfg=base_cfg(text_file, d / "zero", parallel="zero1", batch_size=4, resume=True, **four, **kw))
    return {"dir": d, "one": one, "first": first, "then": then}


def test_zero3_then_zero1_pretrain_equals_one_process(runs):
    """The losses of every step (2 under zero3, 2 under zero1 after the resume), the validation losses and the
    saved model equal one process's 4 steps (Muon, grad_accum 2, clipping that binds)."""
    d = runs["dir"]
    assert all(r["grad_norm"] > 0.05 for r in metrics(d / "one") if "grad_norm" in r)  # clipping binds
    resumed = [r for r in metrics(d / "zero") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2, resumed
    assert runs["first"][0]["step"] == 2 and runs["then"][0]["step"] == runs["then"][1]["step"] == 4
    a = {r["step"]: r for r in metrics(d / "one") if "event" not in r}
    b = {r["step"]: r for r in metrics(d / "zero") if "event" not in r}  # (the resume's event line apart)
    assert sorted(a) == sorted(b) and len(a) >= 4, (sorted(a), sorted(b))
    for step, ra in a.items():
        for k in ("loss", "val_loss"):
            if k in ra:
                assert abs(ra[k] - b[step][k]) <= 1e-5 * max(1.0, abs(ra[k])), (step, k, ra[k], b[step][k])
        assert ra["tokens"] == b[step]["tokens"]
    wa, wb = weights(d / "one"), weights(d / "zero")
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= 1e-5, k
    fin = json.loads((d / "zero" / "final.json").read_text())
    assert fin["parallel"]["strategy"] == "zero1" and fin["parallel"]["world_size"] == 2
    assert abs(fin["val_loss"] - runs["one"]["val_loss"]) <= 1e-5
