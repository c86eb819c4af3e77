"""The engine against HF ``generate`` on the exported model, token for token (C and PyTorch
decode steps, paged and contiguous caches, a request alone and inside a busy batch); paged
cache equals the contiguous cache; chunked prefill; preemption; aborts free blocks.

The models are random but moved off their init (``conftest.perturbed``), so that greedy
continuations differ from prompt to prompt; each reference comparison checks that first."""
import os

import pytest
import torch
from conftest import assert_informative, hf_greedy, load_hf, perturbed

from lmforge.infer.loop import generate
from lmforge.infer import fastpath
from lmforge.infer.engine import Engine
from lmforge.infer.sampling import SamplingParams
from lmforge.model import make_config
from lmforge.model.layers import KVSpec
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
    cfg = make_config(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=128, **ARCHS[arch])
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


# ---- one bad request cannot stop the others ----

def test_add_request_rejects_what_it_cannot_run_and_names_it():
    m = model("llama-gqa")  # rope: the context limit holds for every kind of position
    eng = Engine(m, num_blocks=32, block_size=4)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    cases = [
        ([999999], greedy, r"prompt token id 999999 at position 0 is outside the vocabulary \(0\.\.96\)"),
        ([1, 2, -1], greedy, r"prompt token id -1 at position 2"),
        ([1, 2.5], greedy, r"prompt token at position 1 is not an integer token id: 2\.5 \(float\)"),
        ([1, True], greedy, r"position 1 is not an integer"),
        ("hello", greedy, "got text"),
        ([], greedy, "empty"),
        ([1, 2], SamplingParams(max_tokens=-1), "max_tokens"),
        ([1] * 100, SamplingParams(max_tokens=29), r"maximum context length is 128 tokens, but 129 were requested "
                                                   r"\(100 in the prompt, 29 for the completion\)"),
        ([1, 2], SamplingParams(max_tokens=4, stop=["\n"]), "stop strings .* need a tokenizer"),
        ([1, 2], SamplingParams(max_tokens=4, stop_token_ids=[97]), r"stop_token_ids: token id 97 is outside"),
        ([1, 2], dict(max_tokens=3), "must be a SamplingParams"),
    ]
    for prompt, params, msg in cases:
        with pytest.raises(ValueError, match=msg):
            eng.add_request(prompt, params)
    assert not eng.has_work() and not eng.requests
    eng.add_request([1] * 100, SamplingParams(max_tokens=28))  # exactly the context (and the pool): accepted
    with pytest.raises(ValueError, match=r"needs 9 KV blocks \(33 tokens\); the pool has 8 of 4 tokens"):
        Engine(m, num_blocks=8, block_size=4).add_request([1] * 30, SamplingParams(max_tokens=3))
    with pytest.raises(ValueError, match="max_batch_tokens must be a positive integer, got 0"):
        Engine(m, max_batch_tokens=0)


class Faulty(torch.nn.Module):
    """A model that fails on rows holding the token ``bad``: raises before or after the real forward
    (after: the sequences were already advanced), or returns NaN logits for those rows."""

    def __init__(self, inner, bad, mode):
        super().__init__()
        self.inner, self.cfg, self.bad, self.mode = inner, inner.cfg, bad, mode

    def forward(self, idx, cache=None, logits_at=None):
        hit = (idx == self.bad).any(1)
        if self.mode == "raise-before" and hit.any():
            raise RuntimeError(f"boom: token {self.bad}")
        out = self.inner(idx, cache=cache, logits_at=logits_at)
        if self.mode == "raise-after" and hit.any():
            raise RuntimeError(f"boom: token {self.bad}")
        if self.mode == "nan":
            out = out.masked_fill(hit[:, None, None], float("nan"))
        return out


def faulty_fast_step(step, bad, mode):
    """The C step, failing the same way on rows whose token is ``bad``; with ``logits_rows`` (prefill
    chunks: the rows up to each returned one are its chunk), on the chunks holding ``bad``."""
    def run(tokens, positions, tables, logits_rows=None):
        if mode != "nan" and bad in tokens:
            raise RuntimeError(f"boom: token {bad}")
        out = step(tokens, positions, tables, logits_rows)
        rows = range(len(tokens)) if logits_rows is None else logits_rows
        first = 0
        for j, r in enumerate(rows):
            if bad in tokens[first:r + 1]:
                out[j] = float("nan")
            first = r + 1
        return out
    return run


@pytest.mark.parametrize("mode", ["raise-before", "raise-after", "nan"])
def test_a_failing_request_ends_alone_and_the_others_are_unchanged(mode):
    m = model("llama-gqa")
    good = prompts(6, seed=21)
    greedy = SamplingParams(max_tokens=10, temperature=0)
    ref = Engine(m, num_blocks=64, block_size=4).generate(good, greedy)
    assert_informative(ref)
    used = {t for p in good for t in p} | {t for r in ref for t in r}
    bad = next(t for t in range(1, 97) if t not in used)
    eng = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=16)
    eng.model = Faulty(m, bad, mode)  # the PyTorch forward (prefill chunks) fails on rows holding `bad`
    if eng.fast is not None:
        eng.fast.step = faulty_fast_step(eng.fast.step, bad, mode)  # and so does the C decode step
    # a long prompt with `bad` in its second and last chunks, beside other rows; a one-token prompt
    # (a decode-shaped row: the C step when built), added while the good ones are decoding
    good_ids = [eng.add_request(p, greedy) for p in good[:3]]
    bad_ids = [eng.add_request(good[3][:3] * 6 + [bad] + good[3] + [bad], greedy)]
    outs = eng.step() + eng.step()
    bad_ids.append(eng.add_request([bad], greedy))
    good_ids += [eng.add_request(p, greedy) for p in good[3:]]
    while eng.has_work():
        outs += eng.step()
    got = {i: [o for o in outs if o.request_id == i] for i in good_ids + bad_ids}
    assert [[o.token for o in got[i]] for i in good_ids] == ref
    for i in bad_ids:
        (o,) = got[i]  # one output: the error (the bad prompt never produced a token)
        assert o.finished and o.finish_reason == "error" and o.token is None
        assert ("boom" in o.error) if mode != "nan" else ("NaN" in o.error)
    assert all(o.error is None for i in good_ids for o in got[i])
    assert eng.pool.available() == eng.pool.num_blocks and not eng.requests
    assert eng.stats["requests_errored"] == 2 and eng.stats["requests_finished"] == 6


def test_finished_requests_are_forgotten_and_counted():
    m = model("gpt2")
    eng = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=32)
    ps = prompts(100, seed=7)
    finals, aborted = {}, set()
    for k, p in enumerate(ps):
        rid = eng.add_request(p, SamplingParams(max_tokens=1 + k % 4, temperature=0.8, seed=k))
        if k % 10 == 9:
            eng.abort(rid)  # still waiting
            aborted.add(rid)
        if k % 3 == 0:
            for o in eng.step():
                if o.finished:
                    assert o.request_id not in finals and o.request_id not in eng.requests
                    finals[o.request_id] = o
    while eng.has_work():
        for o in eng.step():
            if o.finished:
                assert o.request_id not in finals and o.request_id not in eng.requests
                finals[o.request_id] = o
    assert len(eng.requests) == 0 and eng.pool.available() == eng.pool.num_blocks
    assert set(finals) | aborted == set(range(100)) and not set(finals) & aborted
    assert eng.stats["requests_finished"] == 90 and eng.stats["requests_aborted"] == 10
    assert eng.num_waiting() == eng.num_running() == 0 and eng.kv_usage() == 0.0
    eng.abort(5)  # forgotten: nothing to do


def test_liveness_helpers_follow_the_pool_and_queues():
    m = model("gpt2")
    eng = Engine(m, num_blocks=16, block_size=4, max_running=1)
    a = eng.add_request([1, 2, 3, 4, 5], SamplingParams(max_tokens=8, temperature=0))
    eng.add_request([6, 7], SamplingParams(max_tokens=8, temperature=0))
    assert (eng.num_waiting(), eng.num_running(), eng.kv_usage()) == (2, 0, 0.0)
    eng.step()
    assert (eng.num_waiting(), eng.num_running()) == (1, 1)
    assert eng.kv_usage() == pytest.approx(2 / 16)  # 6 positions of 4 per block
    eng.abort(a)
    assert eng.kv_usage() == 0.0 and eng.stats["requests_aborted"] == 1


# ---- prompt log-probabilities (scoring) ----

def reference_prompt_logprobs(m, prompt, k):
    with torch.no_grad():
        lp = torch.log_softmax(m(torch.tensor([prompt]))[0].float(), -1)  # one plain full forward
    rows = lp[:-1]
    chosen = rows.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    top = torch.topk(rows, k, dim=-1)
    return chosen, top


@pytest.mark.parametrize("arch", ["gpt2", "llama-gqa"])
def test_prompt_logprobs_equal_a_full_forward_chunked_and_after_a_cache_hit(arch):
    m = model(arch)
    prompt = sum(prompts(4, seed=31), [])[:45]  # longer than max_batch_tokens: prefilled in chunks
    assert len(prompt) == 45
    chosen, top = reference_prompt_logprobs(m, prompt, 3)
    eng = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=16)
    eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0))  # its blocks are now cached
    hits = eng.stats["prefix_hit_tokens"]
    # scoring (max_tokens 0) beside a decoding request; then with generation
    other = eng.add_request(prompts(1, seed=32)[0], SamplingParams(max_tokens=6, temperature=0))
    score = eng.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=3))
    gen = eng.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0))
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert eng.stats["prefix_hit_tokens"] == hits  # the scored prompts did not skip cached blocks
    (s,) = [o for o in outs if o.request_id == score]
    assert s.finished and s.finish_reason == "length" and s.token is None
    g = [o for o in outs if o.request_id == gen]
    assert g[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in g[1:])
    assert [o.token for o in g] == generate(m, prompt, 4, temperature=0)
    assert all(o.prompt_logprobs is None for o in outs if o.request_id == other)
    for plp, k in ((s.prompt_logprobs, 3), (g[0].prompt_logprobs, 0)):
        assert len(plp) == len(prompt) and plp[0] == (None, [])
        got = torch.tensor([lp for lp, _ in plp[1:]])
        torch.testing.assert_close(got, chosen, atol=1e-5, rtol=0)
        if k:
            assert [[t for t, _ in alts] for _, alts in plp[1:]] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([[v for _, v in alts] for _, alts in plp[1:]]), top.values,
                                       atol=1e-5, rtol=0)
        else:
            assert all(alts == [] for _, alts in plp)
    assert eng.pool.available() == eng.pool.num_blocks


def test_prompt_logprobs_survive_preemption():
    m = model("llama-gqa")
    ps = prompts(6, seed=3)
    eng = Engine(m, num_blocks=14, block_size=4, max_batch_tokens=8)  # tight: forces chunks and preemption
    ids = [eng.add_request(p, SamplingParams(max_tokens=20, temperature=0, prompt_logprobs=1)) for p in ps]
    first = {}
    while eng.has_work():
        for o in eng.step():
            if o.prompt_logprobs is not None:
                assert o.request_id not in first
                first[o.request_id] = o.prompt_logprobs
    assert eng.stats["preemptions"] > 0
    for i, p in zip(ids, ps):
        chosen, _ = reference_prompt_logprobs(m, p, 1)
        torch.testing.assert_close(torch.tensor([lp for lp, _ in first[i][1:]]), chosen, atol=1e-5, rtol=1e-5)


# ---- text and stop strings in the engine ----

PIECES = [b"<s>", b"Hel", b"lo", b" wo", b"rld", b" \xe2\x82", b"\xac", b"5", b" an", b"d \xf0\x9f", b"\x99",
          b"\x82", b" ok", b"."]  # "Hello world €5 and 🙂 ok.": € split over two tokens, 🙂 over three


class PieceTok:
    def decode_bytes(self, ids):
        return b"".join(PIECES[i] for i in ids)


class Script(torch.nn.Module):
    """A model whose greedy continuation of token i is i + 1 (the last token repeats): prompt [0]
    reads PIECES out in order."""

    def __init__(self):
        super().__init__()
        self.cfg = make_config(vocab_size=len(PIECES), n_layer=1, n_head=1, d_model=8, max_seq_len=64)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.next = torch.tensor([min(i + 1, len(PIECES) - 1) for i in range(len(PIECES))])

    def cache_specs(self):
        return [KVSpec(1, 8)]

    def forward(self, idx, cache=None, logits_at=None):
        cache.advance(idx.shape[1])
        return torch.nn.functional.one_hot(self.next[idx.gather(1, logits_at)], len(PIECES)).float() * 10


def script_run(max_tokens=13, eos=None, **kw):
    eng = Engine(Script(), num_blocks=16, block_size=4, eos_token_id=eos, tokenizer=PieceTok())
    rid = eng.add_request([0], SamplingParams(max_tokens=max_tokens, temperature=0, **kw))
    req = eng.requests[rid]
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert eng.pool.available() == 16 and not eng.requests
    assert "".join(o.text for o in outs) == req.text
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    return req, outs


def test_text_streams_whole_characters():
    req, outs = script_run()
    full = "Hello world €5 and 🙂 ok."
    assert req.text == full and req.output == list(range(1, 14)) and outs[-1].finish_reason == "length"
    texts = [o.text for o in outs]
    assert texts[4:6] == [" ", "€"] and texts[8:11] == ["d ", "", "🙂"]  # never half a character
    assert all("\ufffd" not in t for t in texts)


def test_stop_strings_cut_the_text_and_free_the_request():
    # spanning two tokens ("lo" + " w"): each "l" is held back until it is known not to start "lo w"
    req, outs = script_run(stop=["lo w"])
    assert [o.text for o in outs] == ["He", "l", ""] and req.output == [1, 2, 3]
    assert (outs[-1].finish_reason, outs[-1].stop_reason, req.text) == ("stop", "lo w", "Hel")
    req, outs = script_run(stop=["lo w"], include_stop_str_in_output=True)
    assert [o.text for o in outs] == ["He", "l", "lo w"] and req.text == "Hello w"
    # the output starts with the stop string: nothing is shown
    req, outs = script_run(stop=["xyz", "He"])
    assert [o.text for o in outs] == [""] and outs[0].stop_reason == "He"
    # inside a multi-byte character's token run
    req, outs = script_run(stop=["€5"])
    assert req.text == "Hello world " and req.output == [1, 2, 3, 4, 5, 6, 7]
    # min_tokens: a stop string ending within the first tokens does not count
    req, outs = script_run(max_tokens=4, stop=["Hel"], min_tokens=2)
    assert req.text == "Hello world" and outs[-1].finish_reason == "length"
    # the final text is always the decoded output cut at the first stop string
    full = PieceTok().decode_bytes(range(1, 14)).decode()
    for i in range(len(full)):
        for n in (1, 2, 4):
            stop = full[i:i + n]
            req, outs = script_run(stop=[stop])
            text = PieceTok().decode_bytes(req.output).decode("utf-8", errors="replace")
            assert stop in text and req.text == text[:text.find(stop)], stop
            assert outs[-1].stop_reason == stop


def test_stop_tokens_eos_min_tokens_and_ignore_eos():
    req, outs = script_run(stop_token_ids=[4])  # " rld" is not shown
    assert (req.text, req.output, outs[-1].stop_reason) == ("Hello wo", [1, 2, 3, 4], 4)
    req, outs = script_run(eos=4)
    assert (req.text, outs[-1].finish_reason, outs[-1].stop_reason) == ("Hello wo", "stop", None)
    req, outs = script_run(max_tokens=6, eos=4, ignore_eos=True)
    assert req.output == [1, 2, 3, 4, 5, 6] and outs[-1].finish_reason == "length"
    # min_tokens masks the eos (the argmax) at the 4th token: the next best, token 0, comes instead
    req, outs = script_run(max_tokens=10, eos=4, min_tokens=5)
    assert req.output == [1, 2, 3, 0, 1, 2, 3, 4] and outs[-1].finish_reason == "stop"


def test_package_exports_the_engine_interface():
    import lmforge.infer as infer
    from lmforge.infer.engine import StepOutput

    assert (infer.Engine, infer.SamplingParams, infer.StepOutput) == (Engine, SamplingParams, StepOutput)
    assert {"Engine", "KVCache", "SamplingParams", "StepOutput"} <= set(infer.__all__)
    assert all(getattr(infer, n) is not None for n in infer.__all__)  # every name listed resolves


# ---- layers of different kinds: the PyTorch path, caches by spec, prefill logits only where needed ----

def full_forward_greedy(m, prompt, n):
    """Greedy tokens and their log-probabilities with no cache: the whole sequence through the model."""
    seq, lps = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(m(torch.tensor([seq]))[0, -1].float(), -1)
            t = int(lp.argmax())
            seq.append(t)
            lps.append(float(lp[t]))
    return seq[len(prompt):], lps


def engine_greedy(eng, ps, n):
    """Each prompt's (tokens, logprobs) from one engine run of them all at once."""
    reqs = [eng.requests[eng.add_request(p, SamplingParams(max_tokens=n, temperature=0, logprobs=0))] for p in ps]
    got = {r.id: ([], []) for r in reqs}
    while eng.has_work():
        for o in eng.step():
            if o.token is not None:
                got[o.request_id][0].append(o.token)
                got[o.request_id][1].append(o.logprob)
    return [got[r.id] for r in reqs]


def test_moe_model_decodes_exactly_on_the_pytorch_path_batched_and_with_prefix_caching(caplog):
    import logging

    from lmforge.model import preset

    torch.manual_seed(0)
    # (at 0.2, float32 rounding alone, even one request at a time, moves logprobs by 1.5e-5)
    m = perturbed(Transformer(preset("tiny-mixtral", vocab_size=97, max_seq_len=128)), 0.1)
    system = prompts(1, seed=31)[0][:12]  # a shared prefix of 3 blocks
    ps = [system + p for p in prompts(5, seed=32)]
    n = 10
    ref = [full_forward_greedy(m, p, n) for p in ps]
    assert_informative([t for t, _ in ref])
    eng = Engine(m, num_blocks=96, block_size=4, max_batch_tokens=24)  # chunked prefill beside decodes
    assert eng.fast is None and eng.prefix_caching
    with caplog.at_level(logging.INFO, logger="lmforge.infer.engine"):
        first = engine_greedy(eng, ps[:1], n)  # fills the cache with the shared prefix
    said = [r.getMessage() for r in caplog.records if "decode path" in r.getMessage()]
    assert len(said) == 1 and "PyTorch" in said[0] and "MoE" in said[0]  # once, at the first step
    rest = engine_greedy(eng, ps[1:], n)  # all four at once, each starting from the cached prefix
    assert eng.stats["prefix_hit_tokens"] >= 4 * 12 and eng.stats["max_sequences_in_step"] >= 4
    for (tok, lp), (want, want_lp) in zip(first + rest, ref):
        assert tok == want
        assert lp == pytest.approx(want_lp, abs=1e-5)
    assert eng.pool.available() == eng.pool.num_blocks


def test_per_layer_windows_engine_and_contiguous_cache_equal_the_full_forward():
    from lmforge.infer.cache import KVCache

    torch.manual_seed(0)
    cfg = make_config(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=128,
                      norm="rmsnorm", mlp="swiglu", pos="rope", sliding_window=4, window_layers=[0])
    m = perturbed(Transformer(cfg), 0.1)  # (at 0.3 float32 rounding alone reaches 1e-5 in the logits)
    assert [s.window for s in m.cache_specs()] == [4, None]
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the contiguous cache: prefill, single steps, a chunk
        full = m(ids)
        cache = KVCache(m, 2, 24)
        got = [m(ids[:, :7], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(7, 12)]
        got.append(m(ids[:, 12:], cache=cache))
    assert (torch.cat(got, 1) - full).abs().max() < 1e-5
    ps = prompts(5, seed=33)
    ref = [full_forward_greedy(m, p, 12) for p in ps]
    assert_informative([t for t, _ in ref])
    eng = Engine(m, num_blocks=96, block_size=4, max_batch_tokens=16)
    assert eng.fast is None  # the C step takes one window for every layer: declined
    for (tok, lp), (want, want_lp) in zip(engine_greedy(eng, ps, 12), ref):
        assert tok == want
        assert lp == pytest.approx(want_lp, abs=1e-5)


def test_prefill_computes_logits_only_at_each_rows_last_position_unless_scoring(monkeypatch):
    m = model("llama-gqa")
    monkeypatch.setattr(fastpath, "AVAILABLE", False)
    eng = Engine(m, num_blocks=64, block_size=4, max_batch_tokens=64)
    rows = []
    head = m.compute_logits
    monkeypatch.setattr(m, "compute_logits", lambda h: rows.append(h.shape[:2]) or head(h))
    eng.add_request(list(range(1, 12)), SamplingParams(max_tokens=1))
    eng.add_request(list(range(20, 27)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    eng.add_request(list(range(40, 45)), SamplingParams(max_tokens=1))
    eng.step()  # three prefills in one forward: (3 rows, 7 positions: the scoring row's) through the head
    assert rows == [(3, 7)]
    eng.run()
    rows.clear()
    eng.add_request(list(range(1, 12)), SamplingParams(max_tokens=1))
    eng.add_request(list(range(40, 45)), SamplingParams(max_tokens=1))
    eng.step()  # no row scoring: one position per row
    assert rows == [(2, 1)]


def test_a_cache_spec_the_pool_does_not_implement_is_refused_naming_the_layer(monkeypatch):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class StateSpec:  # a fixed per-sequence state (a Mamba layer's)
        width: int
        token_indexed = False

    m = model("gpt2")
    specs = m.cache_specs()
    monkeypatch.setattr(m, "cache_specs", lambda: [specs[0], StateSpec(8)])
    with pytest.raises(ValueError, match=r"BlockPool: layer 1 has a StateSpec spec"):
        Engine(m, num_blocks=8, block_size=4)


# ---- the C step runs prefill chunks; greedy rows take one argmax over the batch ----

def _needs_c():
    if not fastpath.AVAILABLE:
        assert os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1", "the lmforge.infer._decode extension did not build"
        pytest.skip("the C decode step is not built")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_c_prefill_chunks_write_the_cache_and_logits_of_the_pytorch_prefill(arch, monkeypatch):
    """Prompts prefilled in chunks beside each other through the C step (rows of one sequence, no padding, the
    head at each chunk's last row) leave the same keys/values in the pool as the PyTorch prefill, and their
    last-position logits equal a plain full forward."""
    _needs_c()
    m = model(arch)
    ps = [p * 2 for p in prompts(4, seed=41)]  # 6..58 tokens: several chunks of the 16-token budget
    calls = []

    def run(fast):
        eng = Engine(m, num_blocks=96, block_size=4, max_batch_tokens=16)
        if fast:
            assert eng.fast is not None
            eng.c_prefill_padding = 0  # every chunk through C, however little padding PyTorch would add
            step = eng.fast.step
            eng.fast.step = lambda t, p, tab, rows=None: calls.append((len(t), rows)) or step(t, p, tab, rows)
        else:
            eng.fast = None  # every chunk and decode row through the PyTorch forward
        reqs = [eng.requests[eng.add_request(p, SamplingParams(max_tokens=1, temperature=0))] for p in ps]
        lgs = {}
        adv = eng._advance
        eng._advance = lambda req, n, lg, tok=None: lgs.__setitem__(req.id, lg[-1].clone()) or adv(req, n, lg, tok)
        blocks = {}
        rel = eng.pool.release
        eng.pool.release = lambda b: blocks.setdefault(len(blocks), [(eng.pool.k[0][i].clone(),
                                                                       eng.pool.v[-1][i].clone()) for i in b]) \
            or rel(b)
        eng.run()
        return [r.output for r in reqs], lgs, blocks

    out_c, lg_c, kv_c = run(True)
    out_t, lg_t, kv_t = run(False)
    assert any(n > 1 and rows is not None and len(rows) < n for n, rows in calls)  # chunks went through C
    with torch.no_grad():
        full = [m(torch.tensor([p]))[0, -1] for p in ps]
    for i in range(len(ps)):
        torch.testing.assert_close(lg_c[i], full[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lg_c[i], lg_t[i], atol=1e-4, rtol=1e-4)
    assert out_c == out_t == [[int(f.argmax())] for f in full]
    assert kv_c.keys() == kv_t.keys() and len(kv_c) == len(ps)
    for j in kv_c:
        for (kc, vc), (kt, vt) in zip(kv_c[j], kv_t[j]):
            torch.testing.assert_close(kc, kt, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(vc, vt, atol=1e-4, rtol=1e-4)


def test_fast_step_logits_rows_are_the_rows_of_the_full_step_and_bad_rows_are_refused():
    _needs_c()
    m = model("llama-gqa")
    eng = Engine(m, num_blocks=16, block_size=4)
    toks, pos, tabs = [5, 6, 7, 8, 9], [0, 1, 2, 3, 4], [[0, 1]] * 5
    full = eng.fast.step(toks, pos, tabs)  # writes positions 0..4 of blocks 0, 1
    again = eng.fast.step(toks, pos, tabs, [4, 1])  # the same writes again: the same numbers
    assert again.shape == (2, m.cfg.vocab_size)
    assert torch.equal(again, full[[4, 1]])
    for bad in ([], [5], [-1]):
        with pytest.raises(ValueError, match="logits_rows"):
            eng.fast.step(toks, pos, tabs, bad)


def test_greedy_rows_take_one_batched_argmax_and_outputs_equal_each_alone(monkeypatch):
    """Plain greedy rows skip their Sampler's per-row work (one max over the batch); greedy with logprobs, a
    penalty, a logit bias or min_tokens, and seeded sampling, still sample alone: every output is unchanged."""
    from lmforge.infer.sampling import Sampler

    m = model("llama-gqa")
    ps = prompts(7, seed=51)
    params = [SamplingParams(max_tokens=9, temperature=0),
              SamplingParams(max_tokens=9, temperature=0, stop_token_ids=[3]),
              SamplingParams(max_tokens=9, temperature=0, logprobs=2),
              SamplingParams(max_tokens=9, temperature=0, repetition_penalty=1.3),
              SamplingParams(max_tokens=9, temperature=0, logit_bias={7: 2.5}),
              SamplingParams(max_tokens=9, temperature=0, min_tokens=4, stop_token_ids=[0, 1, 2]),
              SamplingParams(max_tokens=9, temperature=0.9, seed=5)]
    alone = [Engine(m, num_blocks=64, block_size=4).generate([p], q)[0] for p, q in zip(ps, params)]
    assert_informative(alone)
    sampled = {}
    orig = Sampler.sample
    monkeypatch.setattr(Sampler, "sample", lambda self, x: sampled.__setitem__(id(self), sampled.get(id(self), 0) + 1)
                        or orig(self, x))
    eng = Engine(m, num_blocks=64, block_size=4)
    reqs = [eng.requests[eng.add_request(p, q)] for p, q in zip(ps, params)]
    eng.run()
    assert [r.output for r in reqs] == alone
    n = [sampled.get(id(r.sampler), 0) for r in reqs]
    assert n[0] == 0 and n[1] == 0  # plain greedy: the batched argmax only
    assert n[2:5] == [len(r.output) for r in reqs[2:5]] and n[6] == len(reqs[6].output)
    assert n[5] == min(4, len(reqs[5].output))  # greedy again once min_tokens stop masking the stop ids
    # logprobs are still reported where asked
    eng = Engine(m, num_blocks=64, block_size=4)
    rid = eng.add_request(ps[2], params[2])
    outs = [o for step in iter(eng.step, []) for o in step if o.request_id == rid]
    assert all(o.logprob is not None and len(o.top_logprobs) == 2 for o in outs)


def test_batched_argmax_picks_the_token_each_sampler_would_even_with_ties_and_leaves_nan_rows_to_it():
    from types import SimpleNamespace as NS

    from lmforge.infer.sampling import Sampler

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (6, 50), generator=g).float()  # many tied maxima
    x[1, 40:] = 9.0
    x[2, 7] = float("nan")
    params = SamplingParams(max_tokens=4, temperature=0)
    reqs = [NS(done_tokens=1, tokens=[1, 2], params=params, sampler=Sampler(params, [1, 2], 50)) for _ in x]
    plan = [(r, 1) for r in reqs]
    got = Engine._greedy_tokens(plan, [row[None] for row in x])
    assert got[2] is None  # NaN: its own sampler raises, naming the NaN
    want = [Sampler(params, [1, 2], 50).sample(row).token for k, row in enumerate(x) if k != 2]
    assert [t for k, t in enumerate(got) if k != 2] == want and got[1] == 40


def test_prefill_chunks_go_through_c_only_when_padding_would_cost_pytorch_more():
    _needs_c()
    m = model("llama-gqa")
    for lengths, want_c in (([20, 20, 20], False), ([4, 30, 5, 6], True)):  # padded/real: 1.0; 120/45 = 2.7
        eng = Engine(m, num_blocks=96, block_size=4, max_batch_tokens=256)
        calls, step = [], eng.fast.step
        eng.fast.step = lambda t, p, tab, rows=None: calls.append(len(t)) or step(t, p, tab, rows)
        ps = [list(range(1, n + 1)) for n in lengths]
        out = eng.generate(ps, SamplingParams(max_tokens=3, temperature=0))
        assert (calls[0] == sum(lengths)) == want_c  # the first step: every prompt's chunk, in C or not at all
        assert out == [generate(m, p, 3, temperature=0) for p in ps]
