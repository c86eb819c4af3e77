"""Pre-training through ``lmforge.train.trainer.train`` on 2 ranks under tensor parallelism equals one
process: the losses in metrics.jsonl, the validation loss and the saved model (1e-5), with gradient
accumulation and clipping (``test_parallel_train``'s run: its checkpoints are distributed ones, the
saved model the consolidated weights in the model's own row order). TP + sequence parallel, and TP +
FSDP2 on a (1, 2) mesh."""
import json

import pytest

from parallel_harness import run_ranks
from test_parallel_train import assert_same_run, base_cfg, metrics, text_file  # noqa: F401  (a fixture)

GQA = {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "hf_family": "none"}


@pytest.fixture(scope="module")
def one(text_file, tmp_path_factory):
    from lmforge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tp_train") / "one"
    train(TrainConfig(**base_cfg(text_file, out, model=dict(GQA))), quiet=True)
    return out


@pytest.mark.parametrize("extra", [dict(parallel="tp", sequence_parallel=True), dict(parallel="tp+fsdp", tp_size=2)],
                         ids=["tp_sp", "tp_fsdp"])  # (plain TP: test_parallel_tp; each run here costs ~15 s)
def test_tp_pretrain_equals_one_process(text_file, one, tmp_path, extra):
    got = run_ranks(2, "test_parallel_train:train_rank", cfg=base_cfg(text_file, tmp_path / "r", model=dict(GQA),
                                                                      **extra))
    assert_same_run(one, tmp_path / "r")
    assert all(r["grad_norm"] > 0.05 for r in metrics(one) if "grad_norm" in r)  # clipping binds
    fin = json.loads((tmp_path / "r" / "final.json").read_text())
    assert fin["parallel"]["strategy"] == extra["parallel"] and fin["parallel"]["tp_size"] == 2
    assert fin["parallel"]["sequence_parallel"] == bool(extra.get("sequence_parallel"))
    steps = json.loads((one / "final.json").read_text())["step"]
    assert got[0]["step"] == got[1]["step"] == steps == base_cfg(text_file, one)["max_steps"]
