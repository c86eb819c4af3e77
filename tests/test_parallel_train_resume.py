"""Resume across world sizes through the trainer: 2 steps on 2 DDP ranks (batch 4 each, a distributed
checkpoint), then 2 more resumed in one process (batch 8): the losses and the final weights equal an
uninterrupted one-process run of 4 steps (1e-5), and the resumed line records the step. A resume whose
global rows per step differ is refused, naming both."""
import json

import pytest

from parallel_harness import run_ranks
from test_parallel_train import assert_same_run, base_cfg, metrics, text_file, train_rank  # noqa: F401


def test_two_ranks_then_one_process_equals_one_process(text_file, tmp_path):  # noqa: F811
    from lmforge.train import TrainConfig, train

    common = dict(schedule="constant", warmup_steps=0, sample_every=0, eval_every=0)
    train(TrainConfig(**base_cfg(text_file, tmp_path / "one", max_steps=4, **common)), quiet=True)
    run_ranks(2, "test_parallel_train:train_rank",
              cfg=base_cfg(text_file, tmp_path / "run", max_steps=2, parallel="ddp", batch_size=4, **common))
    fin = train(TrainConfig(**base_cfg(text_file, tmp_path / "run", max_steps=4, parallel="ddp", resume=True,
                                       **common)), quiet=True)
    assert fin["resumed_from_step"] == 2 and fin["steps_this_run"] == 2
    resumed = [r for r in metrics(tmp_path / "run") if r.get("event") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] == 2 and resumed[0]["loader_step"] == 4  # 2 steps x accum 2
    assert_same_run(tmp_path / "one", tmp_path / "run")
    # 2 ranks x 4 rows per step cannot resume as one process of 4 rows
    with pytest.raises(ValueError, match=r"world_size=2 x batch_size=4 = 8 rows per step.*world_size=1 x "
                                         r"batch_size=4 = 4"):
        run_dir = tmp_path / "run2"
        run_ranks(2, "test_parallel_train:train_rank",
                  cfg=base_cfg(text_file, run_dir, max_steps=1, parallel="ddp", batch_size=4, **common))
        train(TrainConfig(**base_cfg(text_file, run_dir, max_steps=2, parallel="ddp", batch_size=4, resume=True,
                                     **common)), quiet=True)
    assert json.loads((tmp_path / "run" / "final.json").read_text())["parallel"]["world_size"] == 1
