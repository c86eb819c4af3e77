"""The engine: paged cache equals the contiguous cache; a request's greedy output does not
depend on the batch; chunked prefill; preemption; aborts free blocks."""
import pytest
import torch

from lmforge.evaluate.perplexity import generate
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import ModelConfig
from lmforge.model.transformer import Transformer

ARCHS = {
    "gpt2": dict(),
    "llama-gqa": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2),
    "mistral-window": dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, sliding_window=6),
}


def model(arch, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=128, **ARCHS[arch])
    return Transformer(cfg).eval()


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
    assert busy == alone == ref


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
