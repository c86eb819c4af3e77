"""The C decode step (lmforge.infer.fastpath) against the PyTorch forward it replaces."""
import multiprocessing as mp
import os

import pytest
import torch

from lmforge.infer import fastpath
from lmforge.infer.cache import KVCache
from lmforge.infer.engine import Engine
from lmforge.infer.fastpath import FastDecoder
from lmforge.infer.paged import BlockPool
from lmforge.infer.sampling import SamplingParams
from lmforge.model import make_config
from lmforge.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE and os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1",
                                reason="the C extension is not built")

VARIANTS = {
    "gpt2": dict(),
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, qkv_bias=False, out_bias=False,
                      mlp_bias=False, tie_embeddings=False),
    "mistral-window-mqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1, sliding_window=5,
                               qkv_bias=False, mlp_bias=False),
    "qwen3-qknorm-headdim": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, qk_norm=True, head_dim=24,
                                 qkv_bias=False, out_bias=False, mlp_bias=False),
    "relu2-softcap": dict(norm="rmsnorm", mlp="relu2", pos="rope", qk_norm=True, logit_softcap=15.0),
    "gelu-odd-width": dict(mlp="gelu", norm_bias=False, d_model=100, n_head=4),
    "llama3-rope-scaling": dict(norm="rmsnorm", mlp="swiglu", pos="rope", rope_scaling={"type": "llama3",
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def model_for(name, **over):
    cfg = dict(vocab_size=97, n_layer=3, n_head=4, d_model=64, max_seq_len=64)
    cfg.update(VARIANTS[name])
    cfg.update(over)
    torch.manual_seed(0)
    m = Transformer(make_config(**cfg)).eval()
    with torch.no_grad():  # move off the init (ones, zeros) so every weight matters
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_contiguous_cache_matches_full_forward(name):
    m = model_for(name)
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)[0]
        cache = KVCache(m.cfg, 1, 40)
        m(ids[:, :6], cache=cache)
        fd = FastDecoder(m)
        fd.bind(cache.k, cache.v)
        for t in range(6, 24):
            lg = fd.step([int(ids[0, t])], [t], [[0]])
            assert torch.allclose(lg[0], full[t], atol=1e-5, rtol=0), (name, t, (lg[0] - full[t]).abs().max())


def test_paged_rows_of_different_lengths_and_batch_invariance():
    m = model_for("llama-gqa")
    pool = BlockPool(m.cfg, num_blocks=32, block_size=4)
    fd = FastDecoder(m)
    fd.bind(pool.k, pool.v)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (9, 3, 14)]
    tables = [[5, 1, 7, 30], [2], [3, 4, 6, 8]]
    # fill each sequence's cache one token at a time, all three rows in every step where they have tokens
    logits = {i: [] for i in range(3)}
    for t in range(14):
        rows = [i for i in range(3) if t < len(seqs[i])]
        lg = fd.step([seqs[i][t] for i in rows], [t] * len(rows), [tables[i] for i in rows])
        for j, i in enumerate(rows):
            logits[i].append(lg[j])
    with torch.no_grad():
        for i, s in enumerate(seqs):
            full = m(torch.tensor([s]))[0]
            assert torch.allclose(torch.stack(logits[i]), full, atol=1e-5, rtol=0)
    # a row's logits do not depend on the rest of the batch: bit for bit
    alone = fd.step([seqs[2][13]], [13], [tables[2]])
    busy = fd.step([seqs[0][3], seqs[2][13], seqs[1][0]], [3, 13, 0], [tables[0], tables[2], tables[1]])
    assert torch.equal(alone[0], busy[1])


def test_engine_fast_and_pytorch_paths_agree():
    from conftest import assert_informative, perturbed

    m = perturbed(model_for("qwen3-qknorm-headdim"), 0.3)  # (at 0.05 each greedy row repeats one token)
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], list(range(10, 30))]
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    runs = []
    for use_fast in (True, False):
        eng = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=16)  # chunked prefill beside decodes
        if not use_fast:
            eng.fast = None
        assert (eng.fast is not None) == use_fast
        for p in prompts:
            eng.add_request(p, params)
        got = {}
        while eng.has_work():
            for o in eng.step():
                got.setdefault(o.request_id, []).append((o.token, o.logprob))
        runs.append(got)
    fast, slow = runs
    assert_informative([[t for t, _ in fast[i]] for i in fast])
    assert [[t for t, _ in fast[i]] for i in fast] == [[t for t, _ in slow[i]] for i in slow]
    for i in fast:
        assert [lp for _, lp in fast[i]] == pytest.approx([lp for _, lp in slow[i]], abs=1e-4)


def test_bad_input_is_refused():
    m = model_for("gpt2")
    cache = KVCache(m.cfg, 1, 8)
    fd = FastDecoder(m)
    with pytest.raises(RuntimeError, match="bind"):
        fd.step([1], [0], [[0]])
    fd.bind(cache.k, cache.v)
    with pytest.raises(ValueError, match="vocabulary"):
        fd.step([97], [0], [[0]])
    with pytest.raises(ValueError, match="past the sequence"):
        fd.step([1], [8], [[0]])
    with pytest.raises(ValueError, match="outside the cache"):
        fd.step([1], [0], [[3]])
    big = KVCache(m.cfg, 1, 80)
    fd.bind(big.k, big.v)
    with pytest.raises(ValueError, match="beyond"):
        fd.step([1], [64], [[0]])  # learned positions end at max_seq_len
    with pytest.raises(ValueError, match="contiguous"):
        fd.bind([t.transpose(1, 2) for t in cache.k], cache.v)
    m.train()
    assert not FastDecoder.supported(m)
    assert not FastDecoder.supported(model_for("gpt2").double())


def _child(q):
    m = model_for("gpt2")
    cache = KVCache(m.cfg, 1, 8)
    fd = FastDecoder(m, threads=2)
    fd.bind(cache.k, cache.v)
    q.put(fd.step([3], [0], [[0]]).sum().item())


def test_works_in_a_forked_child_after_the_parent_started_its_threads():
    m = model_for("gpt2")
    cache = KVCache(m.cfg, 1, 8)
    fd = FastDecoder(m, threads=2)
    fd.bind(cache.k, cache.v)
    want = fd.step([3], [0], [[0]]).sum().item()  # the parent's worker threads are running now
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q,))
    p.start()
    got = q.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and got == pytest.approx(want, rel=1e-6)


def test_thread_count_does_not_change_the_numbers():
    m = model_for("llama-gqa", d_model=96, n_head=4, vocab_size=211)  # O not a multiple of the 4-row tile
    out = []
    for threads in (1, 2, 3):
        pool = BlockPool(m.cfg, num_blocks=8, block_size=8)
        fd = FastDecoder(m, threads=threads)
        fd.bind(pool.k, pool.v)
        rows = [fd.step([t % 211, (5 * t) % 211], [t, t], [[0, 1], [2, 3]]) for t in range(12)]
        out.append(torch.stack(rows))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


# ---- it fails closed: anything it does not implement exactly is declined, with the reason ----

def test_a_moe_model_is_declined_naming_the_moe():
    from lmforge.model import preset

    m = Transformer(preset("tiny-mixtral", vocab_size=97)).eval()
    why = FastDecoder.why_not(m)
    assert why is not None and "MoE" in why
    assert not FastDecoder.supported(m)
    with pytest.raises(ValueError, match="MoE"):
        FastDecoder(m)


def test_per_layer_windows_that_differ_are_declined_and_one_window_for_all_is_not():
    m = model_for("mistral-window-mqa", window_layers=[0], sliding_window=4)
    why = FastDecoder.why_not(m)
    assert why is not None and "windows differ" in why
    same = model_for("mistral-window-mqa", window_layers=[0, 1, 2], sliding_window=4)
    assert FastDecoder.why_not(same) is None
    none = model_for("mistral-window-mqa", window_layers="none", sliding_window=4)  # no layer windowed
    assert FastDecoder.why_not(none) is None
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = none(ids)[0]
        cache = KVCache(none, 1, 16)
        none(ids[:, :3], cache=cache)
    fd = FastDecoder(none)  # the C step's one window is the layers' (None here), not attn.sliding_window
    fd.bind(cache.k, cache.v)
    for t in range(3, 16):
        assert torch.allclose(fd.step([int(ids[0, t])], [t], [[0]])[0], full[t], atol=1e-5, rtol=0)


def test_a_swapped_module_a_hook_or_an_unknown_setting_is_declined(monkeypatch):
    from lmforge.model.surgery import replace_linear

    class MyLinear(torch.nn.Linear):  # e.g. an adapter: same weights, another forward
        pass

    def swap(name, mod):
        new = MyLinear(mod.in_features, mod.out_features, bias=mod.bias is not None)
        new.load_state_dict(mod.state_dict())
        return new

    m = model_for("llama-gqa")
    assert FastDecoder.why_not(m) is None
    assert replace_linear(m, swap, "blocks.1.attn.qkv") == ["blocks.1.attn.qkv"]
    why = FastDecoder.why_not(m)
    assert why is not None and "blocks.1.attn.qkv" in why and "MyLinear" in why
    m = model_for("llama-gqa")
    m.blocks[0].mlp.register_forward_hook(lambda *a: None)
    assert "hooks" in FastDecoder.why_not(m)
    # a config field the C step does not know, away from its default, declines (here: pretend softcap is one)
    monkeypatch.setitem(fastpath._HANDLED, "", fastpath._HANDLED[""] - {"logit_softcap"})
    assert FastDecoder.why_not(model_for("llama-gqa")) is None  # at its default: fine
    assert "logit_softcap=15.0" in FastDecoder.why_not(model_for("relu2-softcap"))
