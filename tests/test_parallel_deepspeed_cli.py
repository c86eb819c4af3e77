"""A DeepSpeed JSON config given to ``lmforge pretrain`` (``--set deepspeed=FILE``) sets the run's settings:
what the run records in train_config.json is the config's batch, accumulation, clipping and optimizer;
a flag that contradicts the file is a usage error naming both."""
import json

from lmforge.cli import main


def test_deepspeed_config_sets_the_run(tmp_path, corpus_files):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                              "train_batch_size": 8, "gradient_clipping": 0.5,
                              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": 0.01}}}))
    out = tmp_path / "r"
    assert main(["pretrain", "--text", str(corpus_files[0]), "--max-steps", "1", "--out", str(out), "-q",
                 "--set", f"deepspeed={ds}", "--set", "seq_len=32", "--set", "eval_every=0"]) == 0
    t = json.loads((out / "train_config.json").read_text())["train"]
    assert (t["batch_size"], t["grad_accum"], t["grad_clip"], t["lr"], t["weight_decay"]) == (4, 2, 0.5, 3e-4, 0.01)
    assert t["optimizer"] == "adamw"


def test_a_flag_that_contradicts_the_config_is_refused(tmp_path, corpus_files, capsys):
    ds = tmp_path / "ds_config.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    rc = main(["pretrain", "--text", str(corpus_files[0]), "--max-steps", "1", "--out", str(tmp_path / "r"), "-q",
               "--set", f"deepspeed={ds}", "--set", "batch_size=2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "batch_size" in err and "deepspeed" in err, err
