"""The trainer under the strategies that shard the parameters (FSDP2, ZeRO-3, TP) on 2 ranks equals
one process on the same global batch (losses, validation loss, saved model, 1e-5): the loop's rules for
them — every rank in each forward (evaluation included), no sampling, distributed checkpoints, the
full state gathered into a plain model on rank 0 for the model directory. (Each strategy's own
numerics: tests/test_parallel_fsdp.py, _zero.py, _tp.py.)"""
import json

import pytest

from parallel_harness import run_ranks
from test_parallel_train import TINY, assert_same_run, base_cfg, metrics, text_file, train_rank  # noqa: F401

ROPE = {**TINY, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "arch": "llama"}


@pytest.fixture(scope="module")
def one(text_file, tmp_path_factory):  # noqa: F811
    from lmforge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("one") / "run"
    train(TrainConfig(**base_cfg(text_file, out, model=ROPE)), quiet=True)
    return out


@pytest.mark.parametrize("parallel,batch", [("fsdp", 4), ("zero3", 4), ("tp", 8)])
def test_sharded_strategies_through_the_trainer(text_file, one, tmp_path, parallel, batch):  # noqa: F811
    got = run_ranks(2, "test_parallel_train:train_rank",
                    cfg=base_cfg(text_file, tmp_path / "run", model=ROPE, parallel=parallel, batch_size=batch))
    assert_same_run(one, tmp_path / "run")
    fin = json.loads((tmp_path / "run" / "final.json").read_text())
    assert fin["parallel"]["strategy"] == parallel and fin["parallel"]["world_size"] == 2
    assert got[0]["val_loss"] == pytest.approx(json.loads((one / "final.json").read_text())["val_loss"], abs=1e-5)
    assert not any("sample" in r for r in metrics(tmp_path / "run"))  # sharded: no sampling
    from lmforge.parallel.checkpoint import is_dist_checkpoint

    assert is_dist_checkpoint(tmp_path / "run" / "checkpoints" / "step-0000003")
