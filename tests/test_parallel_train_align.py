"""SFT and DPO on 2 DDP ranks equal one process on the same global batch (losses in metrics.jsonl and
the saved model, 1e-5): each rank builds its share of every global batch (align.sft.RankShare), a
last short batch included (a rank with no row runs a zero-weighted stand-in); the shares are disjoint
and together the one-process batch."""
import json
from pathlib import Path

import pytest
import torch

from parallel_harness import run_ranks
from test_align_sft import CONVS, tiny, write_jsonl  # noqa: F401
from test_dpo import pair_rows
from test_dpo import write_jsonl as write_rows

from lmforge import tokenize
from lmforge.model import save
from lmforge.tokenize.special import default_special_tokens


@pytest.fixture(scope="module")
def tok(corpus_files):
    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("pbase") / "base"
    save(tiny(tok), d, tokenizer=tok)
    return d


def run_stage(kind: str, cfg: dict) -> dict:
    torch.set_num_threads(1)
    if kind == "sft":
        from lmforge.align.sft import SFTConfig, sft

        return sft(SFTConfig(**cfg), quiet=True)
    from lmforge.align.dpo import DPOConfig, dpo

    return dpo(DPOConfig(**cfg), quiet=True)


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


def _same(one, two, atol=1e-5):
    from safetensors.torch import load_file

    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) and all(abs(x - y) <= atol * max(1, abs(x)) for x, y in zip(a, b)), (a, b)
    wa, wb = load_file(str(Path(one) / "model.safetensors")), load_file(str(Path(two) / "model.safetensors"))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() <= atol, k


def test_sft_on_two_ranks_equals_one_process(base, tmp_path):
    """7 conversations, global batch 6 (3 per rank), packing none: epochs of batches of 6 and 1 (rank 1's
    share of the 1 is empty); grad_accum 2, clipping."""
    data = write_jsonl(tmp_path / "c.jsonl", CONVS[:7])
    c = dict(base=str(base), sources=[{"path": str(data)}], val_frac=0.0, seq_len=128, max_steps=3, lr=3e-3,
             warmup_steps=0, eval_every=0, log_every=1, threads=1, device="cpu", export_hf=False, seed=7,
             packing="none", grad_accum=2, grad_clip=0.5)
    run_stage("sft", {**c, "out": str(tmp_path / "one"), "batch_size": 6})
    got = run_ranks(2, "test_parallel_train_align:run_stage", kind="sft",
                    cfg={**c, "out": str(tmp_path / "two"), "batch_size": 3, "parallel": "ddp"})
    _same(tmp_path / "one", tmp_path / "two")
    assert got[0]["parallel"]["world_size"] == 2
    assert json.loads((tmp_path / "two" / "final.json").read_text())["sft"]["batches_per_epoch"] == 2


def test_rank_shares_are_disjoint_and_cover_the_batch():
    from lmforge.align.sft import RankShare

    for k in range(0, 9):
        items = list(range(k))
        shares = [RankShare(None, r, 3).share(items) for r in range(3)]
        assert sum(shares, []) == items and max(map(len, shares)) - min(map(len, shares)) <= 1


def test_dpo_on_two_ranks_equals_one_process(base, tmp_path):
    data = write_rows(tmp_path / "p.jsonl", pair_rows()[:10])
    c = dict(base=str(base), data=[str(data)], val_frac=0.0, seq_len=96, max_steps=3, lr=1e-3, warmup_steps=0,
             eval_every=0, log_every=1, threads=1, device="cpu", export_hf=False, seed=3, shuffle=False,
             grad_accum=1)
    run_stage("dpo", {**c, "out": str(tmp_path / "one"), "batch_size": 4})
    run_ranks(2, "test_parallel_train_align:run_stage", kind="dpo",
              cfg={**c, "out": str(tmp_path / "two"), "batch_size": 2, "parallel": "ddp"})
    _same(tmp_path / "one", tmp_path / "two")
