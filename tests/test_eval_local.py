"""LocalLM against a naive reference: one full forward per request, no batching, log_softmax.

Log-likelihoods (mixed lengths, shared contexts, empty context, left truncation, batch sizes 1 and
many, rows split by the row cap), is_greedy, rolling windows (lm-eval's, every token once), greedy
generation token for token against ``lmforge.infer.loop.generate``, stop strings, seeded sampling.
The model is random but moved off its init (``conftest.perturbed``) so its predictions depend on
the input."""
import pytest
import torch
from conftest import perturbed

from lmforge.evaluate.local import LocalLM, rolling_windows
from lmforge.infer.loop import generate
from lmforge.model import make_config
from lmforge.model.transformer import Transformer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n")


@pytest.fixture(scope="module")
def tok(corpus_files):
    from lmforge import tokenize
    from lmforge.tokenize.special import default_special_tokens

    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


def make_model(tok, arch="llama", max_seq_len=48, seed=0):
    torch.manual_seed(seed)
    kw = dict(norm="rmsnorm", mlp="swiglu", pos="rope", n_kv_head=2, arch="llama") if arch == "llama" else \
        dict(tie_embeddings=False, arch="gpt2")
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, max_seq_len=max_seq_len, **kw)
    return perturbed(Transformer(cfg), 0.3 if arch == "llama" else 0.5, seed=1234 + seed)


@pytest.fixture(scope="module")
def lm(tok):
    return LocalLM(make_model(tok), tok)


@torch.no_grad()
def naive(model, ctx, cont, L):
    """(logprob, is_greedy) from one forward over (ctx + cont)[:-1], cut from the left to L tokens."""
    full = (ctx + cont)[-(L + 1):]
    lg = torch.log_softmax(model(torch.tensor([full[:-1]]))[0].float(), -1)[-len(cont):]
    c = torch.tensor(cont)
    return float(lg.gather(1, c[:, None]).sum()), bool((lg.argmax(-1) == c).all())


def requests():
    lines = [l for l in TEXT.splitlines() if l]
    out = []
    for k in range(1, 6):  # a context with four choices, as a multiple-choice question
        ctx = "\n".join(lines[:k]) + "\n"
        out += [(ctx, lines[j]) for j in (k, k + 1, 0, 3)]
    out += [("", "Speak, speak."), ("", "First"), ("You are all resolved ", "rather to die"),
            ("All:", " Resolved."), ("All:", " Resolved."), ("Before we proceed", " any further, hear me speak")]
    return out


def reference(lm, reqs):
    cache = {}
    return [naive(lm.model, *lm._encode_pair(c, x, cache), lm.max_length) for c, x in reqs]


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_loglikelihood_equals_naive(tok, lm, batch_size):
    reqs = requests()
    ref = reference(lm, reqs)
    assert len({round(r[0], 3) for r in ref}) > len(ref) // 2  # the model tells requests apart
    got = LocalLM(lm.model, tok, batch_size=batch_size).loglikelihood(reqs)
    assert [g[1] for g in got] == [r[1] for r in ref]
    assert max(abs(g[0] - r[0]) for g, r in zip(got, ref)) < 1e-4


def test_shared_context_packed_and_split_rows(tok, lm, monkeypatch):
    reqs = requests()
    x = LocalLM(lm.model, tok)
    x.loglikelihood(reqs)
    assert x.stats["tokens_requested"] < sum(
        len(c) + len(t) - 1 for c, t in (x._encode_pair(a, b, {}) for a, b in reqs))  # contexts run once
    assert x.stats["tokens_run"] <= x.stats["tokens_requested"] / (1 - LocalLM.pad_slack)  # little padding
    monkeypatch.setattr(LocalLM, "row_cap", 10)  # continuations of one context over several rows
    y = LocalLM(lm.model, tok)
    got, ref = y.loglikelihood(reqs), reference(lm, reqs)
    assert y._row_cap == 48 and max(abs(g[0] - r[0]) for g, r in zip(got, ref)) < 1e-4


def test_empty_context_and_encoding(lm):
    ctx, cont = lm._encode_pair("", "Speak", {})
    assert ctx == [lm.doc] and cont == lm.tokenizer.encode("Speak")
    ctx, cont = lm._encode_pair("All: ", "Speak", {})  # the trailing space moves to the continuation
    assert ctx == [lm.doc] + lm.tokenizer.encode("All:")
    assert ctx + cont == [lm.doc] + lm.tokenizer.encode("All: Speak")


def test_truncation_counted_and_equal(tok, lm):
    long_ctx = TEXT * 3  # far more than 48 tokens
    reqs = [(long_ctx, " Speak, speak."), (long_ctx, " Resolved."), ("All:", " Speak")]
    x = LocalLM(lm.model, tok)
    got = x.loglikelihood(reqs)
    assert x.stats["truncated"] == 2
    ref = reference(lm, reqs)
    assert max(abs(g[0] - r[0]) for g, r in zip(got, ref)) < 1e-4
    with pytest.raises(ValueError, match="longer than the model's context"):
        x.loglikelihood_tokens([([1], list(range(5, 60)))])


@torch.no_grad()
def test_is_greedy(lm):
    ctx = [lm.doc] + lm.tokenizer.encode("First Citizen:\n")
    seq = list(ctx)
    for _ in range(6):  # the greedy continuation, one argmax at a time
        seq.append(int(lm.model(torch.tensor([seq]))[0, -1].argmax()))
    cont = seq[len(ctx):]
    other = cont[:-1] + [(cont[-1] + 1) % lm.vocab_size]
    (lp1, g1), (lp2, g2) = lm.loglikelihood_tokens([(ctx, cont), (ctx, other)])
    assert g1 and not g2 and lp1 > lp2


def test_rolling_windows_cover_every_token_once():
    toks = list(range(100, 237))
    for L in (8, 48, 137, 200):
        w = rolling_windows(toks, 1, L)
        assert [t for _, c in w for t in c] == toks
        assert all(len(c) + len(x) - 1 <= L for x, c in w)
        full = [1] + toks
        for x, c in w:  # the context is what comes right before the continuation
            s = toks.index(c[0]) + 1
            assert full[s - len(x):s] == x
        assert w[0][0] == [1]
        for x, c in w[1:]:  # as much left context as fits
            assert len(x) + len(c) - 1 == L
    lm_utils = pytest.importorskip("lm_eval.utils")
    ref = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(toks, 1, 48, 1)))
    assert rolling_windows(toks, 1, 48) == [(list(a), list(b)) for a, b in ref]


def test_rolling_equals_naive(tok, lm):
    texts = ["Speak, speak.", TEXT * 2]
    got = lm.loglikelihood_rolling(texts)
    for text, g in zip(texts, got):
        toks = tok.encode(text)
        ref = sum(naive(lm.model, x, c, lm.max_length)[0] for x, c in rolling_windows(toks, lm.doc, lm.max_length))
        assert abs(g - ref) < 1e-4
    short = tok.encode(texts[0])
    assert abs(got[0] - naive(lm.model, [lm.doc], short, lm.max_length)[0]) < 1e-4


def test_generation_equals_loop_greedy_and_stops(tok, lm):
    prompts = ["First Citizen:\n", "All:\nSpeak", "You are all", "Before"]
    outs = lm.generate_until([(p, {"max_gen_toks": 12, "until": []}) for p in prompts])
    refs = []
    for p in prompts:
        ids = generate(lm.model, [lm.doc] + tok.encode(p), 12, temperature=0, stop=lm.tokens.stop)
        refs.append(tok.decode(ids))
    assert len(set(refs)) == len(refs)
    assert outs == refs
    # a stop string taken from inside each output: cut before its first occurrence
    stops = [r[3:5] for r in refs]
    outs = lm.generate_until([(p, {"max_gen_toks": 12, "until": [s, "zzzq"]}) for p, s in zip(prompts, stops)])
    assert outs == [r[:r.index(s)] for r, s in zip(refs, stops)]
    # batch size 1 (one request in flight) gives the same
    one = LocalLM(lm.model, tok, batch_size=1).generate_until([(p, {"max_gen_toks": 12}) for p in prompts])
    assert one == refs


def test_generation_mixed_kwargs_in_one_call(tok, lm):
    """Requests with different lengths and stops run in one call, each as it would alone."""
    reqs = [("All:\n", {"max_gen_toks": 3}), ("Before", {"max_new_tokens": 9, "until": "\n"}),
            ("All:\n", {"max_gen_toks": 9, "until": ["zzzq"]})]
    got = lm.generate_until(reqs)
    alone = [lm.generate_until([r])[0] for r in reqs]
    assert got == alone
    ref = tok.decode(generate(lm.model, [lm.doc] + tok.encode("All:\n"), 9, temperature=0, stop=lm.tokens.stop))
    assert got[2] == ref and ref.startswith(got[0]) and len(got[0]) < len(ref)
    assert "\n" not in got[1]


def test_generation_truncates_context(tok, lm):
    x = LocalLM(lm.model, tok)
    out = x.generate_until([(TEXT * 3, {"max_gen_toks": 8, "until": []})])
    ids = ([lm.doc] + tok.encode(TEXT * 3))[-(48 - 8):]
    assert x.stats["truncated"] == 1
    assert out == [tok.decode(generate(lm.model, ids, 8, temperature=0, stop=lm.tokens.stop))]


def test_seeded_sampling_reproducible(lm):
    kw = lambda s: {"max_gen_toks": 16, "until": [], "do_sample": True, "temperature": 1.0, "seed": s}  # noqa: E731
    a = lm.generate_until([("All:\n", kw(s)) for s in range(4)])
    b = lm.generate_until([("All:\n", kw(s)) for s in (3, 2, 1, 0)])
    assert a == b[::-1]
    assert len(set(a)) > 1
    greedy = lm.generate_until([("All:\n", {"max_gen_toks": 16, "until": [], "temperature": 0.7,
                                            "do_sample": False})] * 2)
    assert greedy[0] == greedy[1] == lm.generate_until([("All:\n", {"max_gen_toks": 16, "until": []})])[0]


def test_chat_template(tok, lm):
    from lmforge.tokenize.chat import render

    msgs = [{"role": "user", "content": "Speak <|end|> speak"}]
    s = lm.apply_chat_template(msgs)
    ids = render(tok, msgs, add_generation_prompt=True)[0]
    assert isinstance(s, str) and s.endswith("<|assistant|>")
    assert lm.tok_encode(s) == ids
    assert lm.tok_encode(s + " Hi") == ids + tok.encode(" Hi")
    assert lm.tok_encode("<|end|>") == [lm.doc] + tok.encode("<|end|>", disallowed_special=())  # text stays text


def test_bad_input(lm):
    with pytest.raises(ValueError, match="unknown gen_kwargs key 'beams'"):
        lm.generate_until([("x", {"beams": 2})])
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([("x", {"max_gen_toks": 48})])
    with pytest.raises(ValueError, match="request 1: the continuation ''"):
        lm.loglikelihood([("a", "b"), ("a", "")])
    with pytest.raises(ValueError, match="request 0: expected"):
        lm.loglikelihood([("a",)])
    with pytest.raises(ValueError, match="max_length"):
        LocalLM(lm.model, lm.tokenizer, max_length=1000)


def test_from_checkpoint_and_learned_positions(tmp_path, tok):
    from lmforge.model import save

    m = make_model(tok, arch="gpt2", max_seq_len=32)
    save(m, tmp_path / "m", tokenizer=tok)
    x = LocalLM.from_checkpoint(tmp_path / "m", batch_size=2)
    assert x._row_cap == 32
    reqs = requests()[:12] + [(TEXT * 2, " Speak")]
    got, ref = x.loglikelihood(reqs), reference(x, reqs)
    assert max(abs(g[0] - r[0]) for g, r in zip(got, ref)) < 1e-4


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_hf_import_starts_contexts_as_hflm(tmp_path, family):
    """An HF model: contexts start with BOS only where its tokenizer adds one (Llama-3), as HFLM's do; the
    prefix token of empty contexts and rolling windows is BOS, else EOS (Qwen2's <|im_end|>)."""
    pytest.importorskip("transformers")
    from hf_fixtures import make_tiny_hf_chat_model

    x = LocalLM.from_checkpoint(make_tiny_hf_chat_model(tmp_path, family))
    st, enc = x.tokenizer.special_tokens, x.tokenizer.encode("Speak, speak.")
    if family == "llama3":
        assert x.add_bos and x.doc == st["<|begin_of_text|>"] and x.tok_encode("Speak, speak.") == [x.doc] + enc
    else:
        assert not x.add_bos and x.doc == st["<|im_end|>"] and x.tok_encode("Speak, speak.") == enc
    assert x._encode_pair("", "Speak, speak.", {}) == ([x.doc], enc)
    reqs = requests()[:8] + [("", "Speak, speak."), ("  ", "Speak")]
    got, ref = x.loglikelihood(reqs), reference(x, reqs)
    assert max(abs(g[0] - r[0]) for g, r in zip(got, ref)) < 1e-4
    (r,) = x.loglikelihood_rolling(["Speak, speak."])
    assert abs(r - naive(x.model, [x.doc], enc, x.max_length)[0]) < 1e-4


@pytest.mark.parametrize("switch", ["share_contexts", "head_only"])
def test_ablations_give_the_same_answers(tok, lm, monkeypatch, switch):
    reqs = requests()
    want = LocalLM(lm.model, tok).loglikelihood(reqs)
    monkeypatch.setattr(LocalLM, switch, False)
    x = LocalLM(lm.model, tok)
    got = x.loglikelihood(reqs)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert max(abs(g[0] - w[0]) for g, w in zip(got, want)) < 1e-4
    if switch == "share_contexts":  # every request its own row: more tokens run
        monkeypatch.setattr(LocalLM, switch, True)
        y = LocalLM(lm.model, tok)
        y.loglikelihood(reqs)
        items = set()
        for c, t in (x._encode_pair(a, b, {}) for a, b in reqs):
            inp = (c + t)[-(x.max_length + 1):-1]
            items.add((tuple(inp[:len(inp) - len(t) + 1]), tuple(inp[len(inp) - len(t) + 1:])))
        assert x.stats["tokens_requested"] == sum(len(p) + len(b) for p, b in items)
        assert y.stats["tokens_requested"] == sum(len(p) for p in {p for p, _ in items}) + sum(len(b) for _, b in items)
        assert y.stats["tokens_requested"] < x.stats["tokens_requested"]
