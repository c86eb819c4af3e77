"""The engine against HF ``generate`` on the exported model, token for token (C and PyTorch
decode steps, paged and contiguous caches, a request alone and inside a busy batch); paged
cache equals the contiguous cache; chunked prefill; preemption; aborts free blocks.

The models are random but moved off their init (``conftest.perturbed``), so that greedy
continuations differ from prompt to prompt; each reference comparison checks that first."""
import os

import pytest
import torch
from conftest import assert_informative, hf_greedy, load_hf, perturbed

from lmforge.evaluate.perplexity import generate
from lmforge.infer import fastpath
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig
from lmforge.model.transformer import Transformer

# each exports to its HF family (GPT-2 untied: a tied random GPT-2 maps every token to itself)
ARCHS = {
    "gpt2": dict(tie_embeddings=False, arch="gpt2"),
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, arch="llama"),
    "mistral-window": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, sliding_window=6,
                           qkv_bias=False, out_bias=False, mlp_bias=False, arch="mistral"),
}
SCALE = {"gpt2": 0.5, "llama-gqa": 0.3, "mistral-window": 0.3}


def model(arch, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=128, **ARCHS[arch])
    return perturbed(Transformer(cfg), SCALE[arch], seed=1234 + seed)


def prompts(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_greedy_equals_alone_and_contiguous(arch):
    m = model(arch)
    ps = prompts(9)
    params = SamplingParams(max_tokens=12, temperature=0)
    alone = [Engine(m, num_blocks=64, block_size=4).generate([p], params)[0] for p in ps]
    busy = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=40).generate(ps, params)
    ref = [generate(m, p, 12, temperature=0) for p in ps]
    assert_informative(ref)
    assert busy == alone == ref


PS = prompts(8, seed=11)


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory):
    """arch -> (lmforge model, HF greedy continuations of PS: the same weights exported, loaded by
    ``transformers`` and run through its ``generate``)."""
    from lmforge.model.hf import export_hf

    cache = {}

    def get(arch):
        if arch not in cache:
            m = model(arch)
            hf = load_hf(export_hf(m, tmp_path_factory.mktemp(arch)))
            cache[arch] = m, [hf_greedy(hf, p, 16) for p in PS]
        return cache[arch]

    return get


@pytest.mark.parametrize("path", ["c", "pytorch"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_greedy_equals_hf_generate_alone_and_in_a_busy_batch(arch, path, hf_reference, monkeypatch):
    m, ref = hf_reference(arch)
    ps = PS
    assert_informative(ref)
    if path == "pytorch":
        monkeypatch.setattr(fastpath, "AVAILABLE", False)  # Engine and generate() both ask FastDecoder.supported
    elif not fastpath.AVAILABLE:
        assert os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1", "the lmforge.infer._decode extension did not build"
        pytest.skip("the C decode step is not built")
    greedy = SamplingParams(max_tokens=16, temperature=0)
    # alone: one request per engine (paged cache); and the contiguous cache of generate()
    for p, want in zip(ps, ref):
        eng = Engine(m, num_blocks=64, block_size=4)
        assert (eng.fast is not None) == (path == "c")
        assert eng.generate([p], greedy)[0] == want
        assert generate(m, p, 16, temperature=0) == want
    # busy: all of them at once, beside sampled requests of other lengths, with a token budget that
    # cuts prompts into chunks running beside other rows' decode steps; each stops at its own length
    lengths = [16, 5, 9, 16, 2, 12, 16, 7]
    params = [SamplingParams(max_tokens=n, temperature=0) for n in lengths]
    noise = prompts(4, seed=12)
    eng = Engine(m, num_blocks=96, block_size=4, max_batch_tokens=24)
    reqs = [eng.requests[eng.add_request(p, q)] for p, q in zip(ps, params)]
    for i, p in enumerate(noise):
        eng.add_request(p, SamplingParams(max_tokens=10 + 3 * i, temperature=1.0, top_p=0.9, seed=i))
    eng.run()
    assert eng.stats["max_sequences_in_step"] >= 6  # it really was a busy batch
    assert [r.output for r in reqs] == [r[:n] for r, n in zip(ref, lengths)]


def test_chunked_prefill_and_preemption_keep_outputs():
    m = model("llama-gqa")
    ps = prompts(6, seed=3)
    params = SamplingParams(max_tokens=20, temperature=0)
    ref = [generate(m, p, 20, temperature=0) for p in ps]
    eng = Engine(m, num_blocks=14, block_size=4, max_batch_tokens=8)  # tight: forces chunks and preemption
    out = eng.generate(ps, params)
    assert out == ref
    assert eng.stats["preemptions"] > 0
    assert eng.pool.available() == eng.pool.num_blocks  # everything given back


def test_seeded_sampling_does_not_depend_on_the_batch():
    m = model("gpt2")
    ps = prompts(5, seed=4)
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=100 + i) for i in range(5)]
    alone = [Engine(m).generate([p], q)[0] for p, q in zip(ps, params)]
    together = Engine(m).generate(ps, params)
    assert alone == together


def test_abort_frees_blocks_and_errors():
    m = model("gpt2")
    eng = Engine(m, num_blocks=32, block_size=4)
    rid = eng.add_request(prompts(1)[0], SamplingParams(max_tokens=50, temperature=0))
    eng.step()
    assert eng.pool.available() < 32
    eng.abort(rid)
    assert eng.pool.available() == 32 and not eng.has_work()
    with pytest.raises(ValueError, match="exceeds the model's context"):
        eng.add_request([1] * 100, SamplingParams(max_tokens=50))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())


def test_prefix_caching_reuses_blocks_and_keeps_outputs():
    m = model("llama-gqa")
    system = prompts(1, seed=9)[0] * 3  # a shared "system prompt" of several blocks
    ps = [system + p for p in prompts(6, seed=5)]
    params = SamplingParams(max_tokens=8, temperature=0)
    ref = [generate(m, p, 8, temperature=0) for p in ps]
    eng = Engine(m, num_blocks=64, block_size=4)
    out = [eng.generate([p], params)[0] for p in ps]  # one after another: later ones hit the cache
    assert out == ref
    hit = eng.prefix_hit_rate()
    full_blocks = (len(system) // 4) * 4
    assert hit > 0.5 * full_blocks * 5 / sum(len(p) for p in ps)
    assert eng.pool.available() == 64
    # eviction: a pool too small to keep everything still gives correct outputs
    eng = Engine(m, num_blocks=16, block_size=4)
    assert [eng.generate([p], params)[0] for p in ps] == ref
