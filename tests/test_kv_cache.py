"""KV cache: prefill then one-token decoding gives the logits of a full forward (1e-5, fp32)."""
import pytest
import torch

from lmforge.infer import KVCache
from lmforge.model import make_config
from lmforge.model.transformer import Transformer

CONFIGS = {
    "gpt2": dict(),
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=1, qkv_bias=False, out_bias=False),
    "mistral-window": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, sliding_window=5),
    "qwen3": dict(norm="rmsnorm", mlp="swiglu", pos="rope", qk_norm=True, head_dim=24, n_kv_head=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
    torch.manual_seed(0)
    from conftest import perturbed

    cfg = make_config(vocab_size=101, n_layer=3, n_head=4, d_model=64, max_seq_len=64, **CONFIGS[name])
    m = perturbed(Transformer(cfg), 0.1)  # every weight matters: a cache that drops a key shows in the logits
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        full = m(ids)
        cache = KVCache(cfg, 2, 32)
        out = [m(ids[:, :7], cache=cache)]  # prefill 7
        for t in range(7, 12):  # then one token at a time
            out.append(m(ids[:, t:t + 1], cache=cache))
        out.append(m(ids[:, 12:20], cache=cache))  # a chunk of 8 after the cache (chunked prefill)
        got = torch.cat(out, dim=1)
    assert cache.pos == 20
    assert (got - full).abs().max() < 1e-5


def test_cache_overflow_is_an_error():
    cfg = make_config(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    m = Transformer(cfg).eval()
    cache = KVCache(cfg, 1, 4)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        m(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_generate_with_cache_equals_greedy_without():
    from lmforge.infer.loop import generate

    from conftest import assert_informative, perturbed

    torch.manual_seed(1)
    cfg = make_config(vocab_size=61, n_layer=2, n_head=2, d_model=32, max_seq_len=40, tie_embeddings=False)
    m = perturbed(Transformer(cfg), 0.5)  # off its init: greedy output that depends on the prompt

    def greedy(seq, n):  # no cache: the whole sequence through the model for every token
        seq = list(seq)
        with torch.no_grad():
            for _ in range(n):
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        return seq[-n:]

    prompts = [[3, 14, 15, 9, 2], [2, 7, 1, 8], [60, 0, 33]]
    got = [generate(m, p, 20, temperature=0) for p in prompts]
    assert_informative(got)
    assert got == [greedy(p, 20) for p in prompts]
    # learned positions: a 35-token prompt and 20 new tokens do not fit in 40 positions, so the
    # prompt is cut to its last 20 tokens and all 20 new ones are generated from those
    long = list(range(35))
    assert generate(m, long, 20, temperature=0) == greedy(long[-20:], 20)


def test_caches_allocate_per_layer_from_the_specs_and_refuse_other_kinds():
    from lmforge.infer.paged import BlockPool
    from lmforge.model.layers import KVSpec

    specs = [KVSpec(2, 8), KVSpec(1, 16, window=4)]
    c = KVCache(specs, 3, 10)
    assert [tuple(t.shape) for t in c.k] == [(3, 2, 10, 8), (3, 1, 10, 16)] == [tuple(t.shape) for t in c.v]
    p = BlockPool(specs, num_blocks=5, block_size=4)
    assert [tuple(t.shape) for t in p.k] == [(5, 2, 4, 8), (5, 1, 4, 16)]
    cfg = make_config(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
    m = Transformer(cfg)
    # a model, its config or its specs: the same buffers
    shapes = {tuple(tuple(t.shape) for t in KVCache(src, 1, 8).k) for src in (m, cfg, m.cache_specs())}
    assert shapes == {((1, 2, 8, 8), (1, 2, 8, 8))}

    class LatentSpec(KVSpec):  # not exactly a KVSpec: another kind, refused rather than misread
        pass

    for make in (lambda s: KVCache(s, 1, 8), lambda s: BlockPool(s, 4)):
        with pytest.raises(ValueError, match=r"layer 1 has a LatentSpec spec"):
            make([KVSpec(2, 8), LatentSpec(2, 8)])
        with pytest.raises(ValueError, match=r"layer 0 has no cache spec \(None\)"):
            make([None])
