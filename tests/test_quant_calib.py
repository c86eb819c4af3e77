"""lmforge.quant.calib: calibration windows from shards, captured linear inputs, block-by-block runs."""
import json

import numpy as np
import pytest
import torch

from conftest import perturbed
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.quant.calib import block_inputs, calibration_tokens, capture_inputs, run_block


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU: no oversubscription (and the same reductions every run)
    yield
    torch.set_num_threads(n)



def write_shards(d, splits: dict[str, np.ndarray], shard_tokens: int = 1000):
    """A shards directory in the format ``lmforge data prepare`` writes (manifest, .bin, .idx.json)."""
    d.mkdir(parents=True, exist_ok=True)
    man = {"format": "lmforge.shards", "version": 1, "complete": True, "dtype": "uint16", "splits": {}}
    for sp, toks in splits.items():
        shards = []
        for k, s in enumerate(range(0, len(toks), shard_tokens)):
            part = toks[s:s + shard_tokens].astype("<u2")
            (d / f"{sp}-{k:05d}.bin").write_bytes(part.tobytes())
            (d / f"{sp}-{k:05d}.idx.json").write_text(json.dumps({"starts": [0], "ids": [f"{sp}{k}"]}))
            shards.append({"file": f"{sp}-{k:05d}.bin", "index": f"{sp}-{k:05d}.idx.json", "tokens": len(part)})
        man["splits"][sp] = {"shards": shards, "documents": len(shards), "bytes": len(toks), "tokens": len(toks)}
    (d / "manifest.json").write_text(json.dumps(man))
    return d


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    # token value == position (mod 60000), so a window's tokens say where it came from
    return write_shards(d / "data", {"train": np.arange(5000), "val": np.arange(20000, 21200),
                                     "test": np.arange(40000, 41000)})


def test_windows_are_disjoint_seeded_and_from_the_split(shards):
    t = calibration_tokens(shards, n_samples=12, seq_len=100, seed=3)
    assert t.shape == (12, 100) and t.dtype == torch.int64
    # contiguous pieces of the stream (crossing shard files of 1000 tokens is seamless)
    assert (t[:, 1:] - t[:, :-1] == 1).all()
    assert t.min() >= 0 and t.max() < 5000
    starts = t[:, 0].tolist()
    assert len({s % 100 for s in starts}) == 1  # one offset, stride seq_len: no two windows overlap
    assert len(set(starts)) == 12
    assert torch.equal(t, calibration_tokens(shards, n_samples=12, seq_len=100, seed=3))
    assert not torch.equal(t, calibration_tokens(shards, n_samples=12, seq_len=100, seed=4))
    v = calibration_tokens(shards, n_samples=3, seq_len=400, split="val")
    assert v.min() >= 20000 and v.max() < 21200


def test_exactly_enough_tokens_and_too_few(shards):
    t = calibration_tokens(shards, n_samples=50, seq_len=100)  # all 5000 tokens
    assert sorted(t[:, 0].tolist()) == list(range(0, 5000, 100))
    with pytest.raises(ValueError) as e:
        calibration_tokens(shards, n_samples=51, seq_len=100)
    msg = str(e.value)
    assert str(shards) in msg and "'train'" in msg and "5000" in msg and "5100" in msg
    with pytest.raises(ValueError, match=r"'val' has 1200 tokens.*1600"):
        calibration_tokens(shards, n_samples=4, seq_len=400, split="val")


def test_test_split_and_bad_arguments_refused(shards, tmp_path):
    with pytest.raises(ValueError, match="'test'.*reporting"):
        calibration_tokens(shards, n_samples=1, seq_len=10, split="test")
    with pytest.raises(ValueError, match="split: got 'dev'"):
        calibration_tokens(shards, split="dev")
    with pytest.raises(ValueError, match="seq_len: got 0"):
        calibration_tokens(shards, seq_len=0)
    with pytest.raises(FileNotFoundError):
        calibration_tokens(tmp_path / "nope")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(Transformer(preset("tiny-llama", vocab_size=97, n_layer=2, d_model=64, n_head=4,
                                        n_kv_head=2, max_seq_len=64)), 0.05)


def test_capture_inputs_are_what_the_linears_multiply(model):
    toks = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(1))
    names = ["blocks.0.attn.qkv", "blocks.1.mlp.proj", "lm_head"]
    x = capture_inputs(model, toks, names, batch_size=2)
    fc = model.blocks[1].mlp.proj
    assert x["blocks.1.mlp.proj"].shape == (80, fc.in_features)
    # the head's input is the final-normed hidden state: its product is the model's logits
    with torch.no_grad():
        logits = model(toks)
        h0 = model.blocks[0].attn_norm(model.tok_emb(toks))
    assert torch.allclose(model.lm_head(x["lm_head"]), logits.reshape(80, -1), atol=1e-5)
    assert torch.allclose(x["blocks.0.attn.qkv"], h0.reshape(80, -1), atol=1e-6)
    few = capture_inputs(model, toks, names, batch_size=2, max_rows=20)
    assert all(v.shape[0] == 20 for v in few.values())
    assert torch.equal(few["lm_head"], x["lm_head"][:20])
    with pytest.raises(ValueError, match="'blocks.0.attn.qkvv'"):
        capture_inputs(model, toks, ["blocks.0.attn.qkvv"])


def test_blocks_one_at_a_time_equal_the_whole_forward(model):
    toks = torch.randint(0, 97, (5, 16), generator=torch.Generator().manual_seed(2))
    hs = block_inputs(model, toks, batch_size=2)
    assert [h.shape for h in hs] == [(2, 16, 64), (2, 16, 64), (1, 16, 64)]
    out = []
    for h in hs:
        for i in range(len(model.blocks)):
            h = run_block(model, i, h)
        out.append(model.compute_logits(model.norm_f(h)))
    with torch.no_grad():
        ref = model(toks)
    assert torch.allclose(torch.cat(out), ref, atol=1e-5)
    with pytest.raises(ValueError, match="block 2: the model has blocks 0..1"):
        run_block(model, 2, hs[0])
