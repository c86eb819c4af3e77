"""DeepSpeed JSON configs (written as DeepSpeed's documentation writes them) read as lmforge settings:
the mapping, DeepSpeed's batch-size rule, unknown keys as errors with their path, known-but-ignored
keys as warnings."""
from __future__ import annotations

import json
import logging

import pytest

from lmforge.parallel.deepspeed import deepspeed_warnings, from_deepspeed

# DeepSpeed's own examples' shape: ZeRO-2 with bf16, AdamW and a warmup-decay schedule
ZERO2 = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "steps_per_print": 100,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 3e-4,
                                                       "warmup_num_steps": 100, "total_num_steps": 1000,
                                                       "warmup_type": "linear"}},
    "zero_optimization": {"stage": 2, "contiguous_gradients": True, "overlap_comm": True,
                          "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8},
}

# ZeRO-3 with CPU offload and fp16 (ZeRO-Infinity's tutorial shape, CPU instead of NVMe)
ZERO3_OFFLOAD = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True},
                          "stage3_prefetch_bucket_size": 5e7, "stage3_param_persistence_threshold": 1e5,
                          "stage3_max_live_parameters": 1e9, "stage3_gather_16bit_weights_on_model_save": True},
    "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-4, "warmup_num_steps": 10}},
}


def test_zero2_config(tmp_path):
    p = tmp_path / "ds_config.json"
    p.write_text(json.dumps(ZERO2))
    s, warns = deepspeed_warnings(p, world_size=2)
    assert s == {"parallel": "zero2", "batch_size": 8, "grad_accum": 4, "global_batch_size": 64, "grad_clip": 1.0,
                 "dtype": "bf16", "optimizer": "adamw", "lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
                 "warmup_steps": 100, "max_steps": 1000, "schedule": "wsd", "min_lr_ratio": 0.0, "decay_frac": 0.9}
    assert sorted(w.split(":")[0] for w in warns) == sorted(
        ["steps_per_print", "zero_optimization.contiguous_gradients", "zero_optimization.overlap_comm",
         "zero_optimization.reduce_scatter", "zero_optimization.reduce_bucket_size",
         "zero_optimization.allgather_bucket_size"])
    # the settings are LoopConfig fields, and the mapped schedule is DeepSpeed's linear decay
    from lmforge.train.loop import LoopConfig
    from lmforge.train.schedule import lr_multiplier

    LoopConfig(**s)
    for step in (100, 400, 999):
        ds = (1000 - step) / (1000 - 100)
        assert lr_multiplier(step / 1000, step, "wsd", 100, 0.0, s["decay_frac"]) == pytest.approx(ds)


def test_zero3_offload_fp16_config(caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge.parallel"):
        s = from_deepspeed(ZERO3_OFFLOAD, world_size=4)
    assert s["parallel"] == "fsdp" and s["cpu_offload"] is True
    assert s["dtype"] == "fp16" and s["fsdp_mixed_precision"] == "fp16"
    assert (s["batch_size"], s["grad_accum"], s["global_batch_size"]) == (4, 2, 32)
    assert s["schedule"] == "constant" and s["warmup_steps"] == 10 and s["lr"] == 1e-4
    text = caplog.text
    for k in ("fp16.loss_scale", "zero_optimization.offload_param.pin_memory",
              "zero_optimization.stage3_prefetch_bucket_size", "scheduler.params.warmup_type"):
        assert k in text
    with pytest.raises(ValueError, match="offload_optimizer.device: CPU offload needs"):
        from_deepspeed(ZERO3_OFFLOAD, world_size=4, stage3="zero3")  # lmforge's ZeRO-3 does not offload


def test_stages_map():
    for stage, name in ((0, "ddp"), (1, "zero1"), (2, "zero2"), (3, "fsdp")):
        assert from_deepspeed({"zero_optimization": {"stage": stage}}, world_size=1)["parallel"] == name
    assert from_deepspeed({"zero_optimization": {"stage": 3}}, world_size=1, stage3="zero3")["parallel"] == "zero3"
    assert from_deepspeed({}, world_size=1) == {"parallel": "ddp", "dtype": "fp32"}


def test_batch_rule_two_give_the_third():
    s = from_deepspeed({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    assert s["grad_accum"] == 4
    s = from_deepspeed({"train_batch_size": 32, "gradient_accumulation_steps": 2}, world_size=4)
    assert (s["batch_size"], s["grad_accum"]) == (4, 2)
    s = from_deepspeed({"train_micro_batch_size_per_gpu": 3}, world_size=2)
    assert (s["batch_size"], s["grad_accum"], s["global_batch_size"]) == (3, 1, 6)
    with pytest.raises(ValueError, match=r"64 != 8 x 4 x 4"):
        from_deepspeed(ZERO2, world_size=4)
    with pytest.raises(ValueError, match="not a multiple"):
        from_deepspeed({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4}, world_size=2)


def test_world_size_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert from_deepspeed(ZERO2)["batch_size"] == 8
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="world size 8"):
        from_deepspeed(ZERO2)


@pytest.mark.parametrize("cfg, path", [
    ({"zero_optimization": {"stagee": 2}}, "zero_optimization.stagee"),
    ({"train_batch": 8}, "train_batch"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "foo": 1}}}, "optimizer.params.foo"),
    ({"bf16": {"enabled": True, "loss_scale": 0}}, "bf16.loss_scale"),
    ({"scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 10}}}, "scheduler.params.total_num_steps"),
])
def test_unknown_keys_are_errors_with_their_path(cfg, path):
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        from_deepspeed(cfg, world_size=1)


@pytest.mark.parametrize("cfg, path, why", [
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
     "zero_optimization.offload_optimizer.device", "stage 3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/x"}}},
     "zero_optimization.offload_param", ""),
    ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type", "AdamW"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "optimizer.params.adam_w_mode", "L2"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "optimizer.params.eps", "1e-08"),
    ({"train_micro_batch_size_per_gpu": "auto"}, "train_micro_batch_size_per_gpu", "HF's Trainer"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu", "positive"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "fp16.enabled", "both"),
    ({"scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type", "WarmupLR"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}},
     "scheduler.params.total_num_steps", "needs it"),
    ({"gradient_clipping": "big"}, "gradient_clipping", "a number"),
])
def test_values_lmforge_cannot_honour(cfg, path, why):
    with pytest.raises(ValueError, match=path.replace(".", r"\.")) as e:
        from_deepspeed(cfg, world_size=1)
    assert why in str(e.value)


def test_cosine_and_files(tmp_path):
    s, warns = deepspeed_warnings({"scheduler": {"type": "WarmupCosineLR", "params": {
        "total_num_steps": 500, "warmup_num_steps": 50, "cos_min_ratio": 0.1, "warmup_type": "linear"}}}, 1)
    assert (s["schedule"], s["min_lr_ratio"], s["warmup_steps"], s["max_steps"]) == ("cosine", 0.1, 50, 500)
    assert any("whole run" in w for w in warns)
    with pytest.raises(FileNotFoundError, match="no such file"):
        from_deepspeed(tmp_path / "missing.json", world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a JSON DeepSpeed config"):
        from_deepspeed(bad, world_size=1)
    bad.write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        from_deepspeed(bad, world_size=1)
    (tmp_path / "tb.json").write_text(json.dumps({"tensorboard": {"enabled": True, "output_path": "x"}}))
    s, warns = deepspeed_warnings(tmp_path / "tb.json", 1)
    assert warns == ["tensorboard: ignored (lmforge's report_to = tensorboard)"]


def test_apply_deepspeed_to_a_loop_config(tmp_path):
    from lmforge.parallel.deepspeed import apply_deepspeed
    from lmforge.train.loop import LoopConfig

    p = tmp_path / "ds.json"
    p.write_text(json.dumps(ZERO2))
    cfg = LoopConfig(deepspeed=str(p), max_steps=5, lr=1e-3)
    got = apply_deepspeed(cfg, given={"seq_len"}, world_size=2)
    assert (got.parallel, got.batch_size, got.grad_accum, got.lr, got.schedule) == ("zero2", 8, 4, 3e-4, "wsd")
    assert cfg.parallel == "none"  # a copy
    with pytest.raises(ValueError, match=r"max_steps = 5 is set, and deepspeed = .* asks for 1000"):
        apply_deepspeed(cfg, given={"max_steps"}, world_size=2)
    assert apply_deepspeed(LoopConfig(max_steps=1)) == LoopConfig(max_steps=1)
