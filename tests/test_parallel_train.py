"""Pre-training on 2 DDP ranks (gloo, this CPU) through ``lmforge.train.trainer.train``: equal to one
process on the same global batch (the losses in metrics.jsonl and the saved model, 1e-5), with
gradient accumulation and clipping, AdamW and Muon (global_batch_size and settings refused alike on
every rank: tests/test_parallel_train_settings.py; the loader's sharding and resume across world
sizes: tests/test_parallel_core.py)."""
import json
from pathlib import Path

import pytest
import torch

from parallel_harness import run_ranks

TINY = {"n_layer": 2, "n_head": 2, "d_model": 32}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory, corpus_texts):
    p = tmp_path_factory.mktemp("txt") / "plays.txt"
    p.write_text("".join(corpus_texts[:2])[:60_000])
    return p


def base_cfg(text_file, out, **kw):
    d = dict(out=str(out), text=str(text_file), tokenizer="char", preset="tiny", model=dict(TINY), batch_size=8,
             seq_len=32, grad_accum=2, max_steps=3, eval_every=2, eval_batches=2, final_eval_batches=2,
             warmup_steps=1, log_every=1, peak_flops=1e11, threads=1, grad_clip=0.05, lr=3e-3, dtype="fp32",
             device="cpu", sample_every=2, sample_tokens=4)
    d.update(kw)
    return d


def train_rank(cfg: dict) -> dict:
    """One rank of a run: ``train(TrainConfig(**cfg))``; its final dict."""
    from lmforge.train import TrainConfig, train

    torch.set_num_threads(1)
    return train(TrainConfig(**cfg), quiet=True)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def assert_same_run(ref_out, got_out, atol=1e-5):
    a, b = metrics(ref_out), metrics(got_out)
    la, lb = [r["loss"] for r in a if "loss" in r], [r["loss"] for r in b if "loss" in r]
    assert len(la) == len(lb) and la, (la, lb)
    for i, (x, y) in enumerate(zip(la, lb)):
        assert abs(x - y) <= atol * max(1.0, abs(x)), f"loss at step {i + 1}: one process {x}, 2 ranks {y}"
    for ra, rb in zip([r for r in a if "loss" in r], [r for r in b if "loss" in r]):
        assert ra["tokens"] == rb["tokens"]  # the global tokens, summed over the ranks
        if "val_loss" in ra:
            assert abs(ra["val_loss"] - rb["val_loss"]) <= atol
    wa, wb = weights(ref_out), weights(got_out)
    assert set(wa) == set(wb)
    for k in wa:
        err = (wa[k] - wb[k]).abs().max().item()
        assert err <= atol, f"{k}: max |difference| {err:.3g} from one process"


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_pretrain_equals_one_process(text_file, tmp_path, optimizer):
    """2 ranks of batch 4 (grad_accum 2, clipping on: the clip binds) = one process of batch 8."""
    from lmforge.train import TrainConfig, train

    ref = train(TrainConfig(**base_cfg(text_file, tmp_path / "one", optimizer=optimizer)), quiet=True)
    got = run_ranks(2, "test_parallel_train:train_rank",
                    cfg=base_cfg(text_file, tmp_path / "ddp", optimizer=optimizer, parallel="ddp", batch_size=4))
    assert_same_run(tmp_path / "one", tmp_path / "ddp")
    assert all(r["grad_norm"] > 0.05 for r in metrics(tmp_path / "one") if "grad_norm" in r)  # clipping binds
    fin = json.loads((tmp_path / "ddp" / "final.json").read_text())
    assert fin["parallel"]["strategy"] == "ddp" and fin["parallel"]["world_size"] == 2
    assert abs(fin["val_loss"] - ref["val_loss"]) <= 1e-5 and fin["step"] == ref["step"] == 3
    assert got[0]["step"] == got[1]["step"] == 3
    # rank 0 alone samples (every 2 steps) and writes the files
    assert [r["step"] for r in metrics(tmp_path / "ddp") if "sample" in r] == [2]
    assert (tmp_path / "ddp" / "loss.png").exists() and (tmp_path / "ddp" / "config.json").exists()
