"""Pre-training's parallel settings on 2 ranks: global_batch_size sets the per-rank batch (and one that
does not divide is refused, naming both settings); an unknown strategy, parallel = "none" under
torchrun's WORLD_SIZE=2, and tp_size with ddp are refused alike on every rank (no hang)."""
import json

import pytest

from parallel_harness import run_ranks
from test_parallel_train import base_cfg, text_file, train_rank  # noqa: F401 (the fixture)


def test_global_batch_size_sets_the_per_rank_batch(text_file, tmp_path):  # noqa: F811
    """global_batch_size 16 = 2 ranks x grad_accum 2 x batch 4: the same run as batch 8 on one process
    with grad_accum 2; one that does not divide is refused, naming both settings, on every rank."""
    got = run_ranks(2, "test_parallel_train:train_rank",
                    cfg=base_cfg(text_file, tmp_path / "g", parallel="ddp", batch_size=999, global_batch_size=16,
                                 max_steps=2, sample_every=0))
    tc = json.loads((tmp_path / "g" / "train_config.json").read_text())["train"]
    assert tc["batch_size"] == 4 and tc["global_batch_size"] == 16 and got[1]["step"] == 2
    with pytest.raises(AssertionError, match=r"global_batch_size = 10 is not a multiple .*grad_accum"):
        run_ranks(2, "test_parallel_train:train_rank",
                  cfg=base_cfg(text_file, tmp_path / "bad", parallel="ddp", global_batch_size=10))


def bad_rank(cfg: dict) -> str:
    """The error this rank raises for ``cfg`` (every rank must raise it, none may hang)."""
    try:
        train_rank(cfg)
    except ValueError as e:
        return str(e)
    return "no error"


def test_bad_settings_fail_alike_on_every_rank(text_file, tmp_path):  # noqa: F811
    from lmforge.train import TrainConfig, train

    with pytest.raises(ValueError, match="parallel: unknown strategy 'dpp'"):
        train(TrainConfig(**base_cfg(text_file, tmp_path / "u", parallel="dpp")), quiet=True)
    errs = run_ranks(2, "test_parallel_train_settings:bad_rank", timeout=120,
                     cfg=base_cfg(text_file, tmp_path / "n", parallel="none"))
    assert all("parallel = 'none' but this process is one of WORLD_SIZE=2" in e for e in errs), errs
    errs = run_ranks(2, "test_parallel_train_settings:bad_rank", timeout=120,
                     cfg=base_cfg(text_file, tmp_path / "t", parallel="ddp", tp_size=2))
    assert all("tp_size = 2" in e for e in errs), errs
