"""The Python API (``lmforge.load`` -> ``LM``) and the terminal chat built on it.

References: HF transformers' own greedy ``generate`` on the same weights exported to
an HF directory; a stopped completion against the unstopped one cut where the stop
string starts; a batch against the same prompts one by one.
"""
import builtins
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import assert_informative, hf_greedy, load_hf

import lmforge
from lmforge.infer import LM

PROMPTS = ["To be, or not to be", "Hail, my lord! What news", "O Romeo, Romeo", "Now is the winter"]


def _tiny(directory, tok):
    from tiny_serve import tiny_llama

    from lmforge.model import save

    save(tiny_llama(tok), directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory, corpus_files):
    """A 256-context model whose tokenizer has lmforge's chat tokens."""
    from lmforge import tokenize
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    return _tiny(tmp_path_factory.mktemp("api") / "tiny-chat", tok)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, corpus_files):
    """A base model without chat tokens: the plain ``User: / Assistant:`` template."""
    from lmforge import tokenize

    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>"], show_progress=False)
    return _tiny(tmp_path_factory.mktemp("api") / "tiny-plain", tok)


@pytest.fixture(scope="module")
def lm(chat_dir):
    return lmforge.load(chat_dir)


@pytest.fixture(scope="module")
def hf(chat_dir, tmp_path_factory, lm):
    from lmforge.model.hf import export_hf

    return load_hf(export_hf(lm.model, tmp_path_factory.mktemp("hf"), tokenizer=lm.tokenizer))


def _strip_stop(lm, ids):
    return ids[:-1] if ids and ids[-1] in lm.tokens.stop else ids


def test_generate_matches_hf_greedy(lm, hf):
    """Greedy completions of a batch: HF's ids, and the text is those ids decoded (stop token left out)."""
    outs = lm.generate(PROMPTS, temperature=0, max_tokens=24)
    assert isinstance(outs, list) and len(outs) == len(PROMPTS)
    refs = [hf_greedy(hf, lm.encode(p), 24, eos=lm.tokens.stop) for p in PROMPTS]
    assert_informative(refs)
    for p, o, r in zip(PROMPTS, outs, refs):
        assert o.prompt_token_ids == lm.encode(p)
        assert o.token_ids == r, p
        assert o.text == lm.tokenizer.decode(_strip_stop(lm, r))
        assert o.finish_reason == ("stop" if r[-1] in lm.tokens.stop else "length")
    one = lm.generate(PROMPTS[0], temperature=0, max_tokens=24)  # a str gives one object
    assert one.token_ids == outs[0].token_ids and str(one) == one.text


def test_load_hf_directory(tmp_path, lm):
    """``lmforge.load`` opens the HF export too and generates the same."""
    from lmforge.model.hf import export_hf

    d = export_hf(lm.model, tmp_path / "hf", tokenizer=lm.tokenizer)
    other = lmforge.load(d)
    a = lm.generate(PROMPTS[:2], temperature=0, max_tokens=16)
    b = other.generate(PROMPTS[:2], temperature=0, max_tokens=16)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_batch_equals_one_by_one(lm):
    """A list runs as one continuous batch; each request's output is the one it gets alone (greedy and seeded)."""
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=7)):
        batch = lm.generate(PROMPTS, max_tokens=20, **kw)
        alone = [lm.generate(p, max_tokens=20, **kw) for p in PROMPTS]
        assert [o.token_ids for o in batch] == [o.token_ids for o in alone]
        assert [o.text for o in batch] == [o.text for o in alone]
    assert lm.engine.stats["max_sequences_in_step"] > 1
    assert not lm._runs and not lm.engine.has_work()


def _plain_spans(text: str, n: int) -> list[int]:
    """Where ``text`` has ``n`` printable ASCII characters in a row (a random model also makes stray bytes)."""
    return [m.start() for m in re.finditer(rf"(?=[ -~]{{{n}}})", text)]


def test_stop_strings_cut_where_the_string_starts(lm):
    full = lm.generate(PROMPTS, temperature=0, max_tokens=60)
    for p, f in zip(PROMPTS, full):
        text = f.text
        spans = _plain_spans(text, 2)
        assert len(spans) >= 3, text
        for start in (spans[0], spans[len(spans) // 2], spans[-1]):
            s = text[start:start + 2]
            cut = text[:text.find(s)]  # the first occurrence: maybe before ``start``
            o = lm.generate(p, temperature=0, max_tokens=60, stop=s)
            assert o.text == cut, (s, text)
            assert o.finish_reason == "stop" and o.stop_reason == s
            assert o.token_ids == f.token_ids[:len(o.token_ids)]  # the same tokens, ended at the one completing s
            assert s in lm.tokenizer.decode(o.token_ids)
        # several stop strings: the one that occurs first wins
        s1, s2 = text[spans[1]:spans[1] + 2], text[spans[-1]:spans[-1] + 2]
        o = lm.generate(p, temperature=0, max_tokens=60, stop=[s2, s1])
        assert o.text == text[:min(text.find(s1), text.find(s2))]


def test_stream_joins_to_generate(lm):
    for p in PROMPTS:
        g = lm.generate(p, temperature=0, max_tokens=30)
        pieces = list(lm.stream(p, temperature=0, max_tokens=30))
        assert len(pieces) > 1 and all(pieces)
        assert "".join(pieces) == g.text
        k = _plain_spans(g.text, 3)[-1]
        s = g.text[k:k + 3]
        pieces = list(lm.stream(p, temperature=0, max_tokens=30, stop=[s]))
        assert "".join(pieces) == g.text[:g.text.find(s)]
        assert not any(s in x for x in pieces)


def _cycle_lm(tok, text: str):
    """An ``LM`` whose greedy output is ``text``'s bytes over and over, one byte token at a time: the blocks
    add nothing (output projections zero), so the last hidden state is the current token's embedding, and
    the head scores each byte's successor by that embedding. ``text``'s bytes must be distinct."""
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    byte_id = {tok.decode_bytes([i]): i for i in range(tok.vocab_size)}
    seq = [byte_id[bytes([b])] for b in text.encode("utf-8")]
    assert len(set(seq)) == len(seq)
    torch.manual_seed(0)
    m = Transformer(make_config(vocab_size=tok.vocab_size, n_layer=1, n_head=2, d_model=64, max_seq_len=256,
                                norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama", tie_embeddings=False))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                p.zero_()
        m.lm_head.weight.zero_()
        e = torch.nn.functional.normalize(m.tok_emb.weight, dim=-1)
        for a, b in zip(seq, seq[1:] + seq[:1]):
            m.lm_head.weight[b] = 20 * e[a]
    return LM(m.eval(), tok), seq


def test_stream_never_splits_utf8(lm):
    """Output bytes that make 2- and 3-byte characters one byte token at a time: every streamed piece is whole
    characters, and a stop string that starts inside a multi-byte run still cuts exactly."""
    cyc, seq = _cycle_lm(lm.tokenizer, "é→ab")
    prompt = [lm.tokens.bos, seq[-1]]  # after "b" comes "é"
    g = cyc.generate(prompt, temperature=0, max_tokens=len("é→ab".encode()) * 10)
    assert g.text == "é→ab" * 10 and g.token_ids == seq * 10
    pieces = list(cyc.stream(prompt, temperature=0, max_tokens=len(g.token_ids)))
    assert "".join(pieces) == g.text and "\ufffd" not in "".join(pieces)
    assert len(pieces) == len(g.text)  # one piece per character: its bytes are held until it is whole
    for stop, cut in (("→a", "é"), ("bé", "é→a"), ("→abé→", "é"), ("é→abx", "é→ab" * 10)):
        o = cyc.generate(prompt, temperature=0, max_tokens=len(g.token_ids), stop=stop)
        assert o.text == cut and o.stop_reason == (stop if cut != g.text else None)
        assert "".join(cyc.stream(prompt, temperature=0, max_tokens=len(g.token_ids), stop=stop)) == o.text


def test_interleaved_stream_and_generate(lm):
    """A stream that is half read while ``generate`` steps the engine loses nothing."""
    ref = lm.generate(PROMPTS[0], temperature=0, max_tokens=30).text
    it = lm.stream(PROMPTS[0], temperature=0, max_tokens=30)
    head = [next(it), next(it)]
    other = lm.generate(PROMPTS[1:], temperature=0, max_tokens=30)
    assert "".join(head + list(it)) == ref
    assert [o.token_ids for o in other] == [o.token_ids for o in lm.generate(PROMPTS[1:], temperature=0,
                                                                               max_tokens=30)]
    it = lm.stream(PROMPTS[0], temperature=0, max_tokens=30)
    next(it)
    it.close()  # a stream given up on is aborted: its blocks come back
    assert not lm._runs and not lm.engine.has_work()
    unread = lm.stream(PROMPTS[0], temperature=0, max_tokens=30)  # starts when first read
    assert not lm._runs and not lm.engine.has_work()
    assert "".join(unread) == ref
    with pytest.raises(ValueError, match="context"):  # but its arguments are checked at once
        lm.stream(PROMPTS[0], max_tokens=10_000)


def test_logprobs_match_hf(lm, hf):
    o = lm.generate(PROMPTS[0], temperature=0, max_tokens=10, logprobs=2)
    x = o.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([x + o.token_ids])).logits[0, len(x) - 1:-1].float(), -1)
    assert len(o.logprobs) == len(o.token_ids)
    for k, e in enumerate(o.logprobs):
        assert e["token_id"] == o.token_ids[k]
        assert e["logprob"] == pytest.approx(float(ref[k, e["token_id"]]), abs=1e-4)
        assert [t for t, _ in e["top_logprobs"]] == ref[k].topk(2).indices.tolist()


def test_max_tokens_default_and_errors(lm):
    o = lm.generate(PROMPTS[0], temperature=0)
    assert len(o.token_ids) == min(lm.default_max_tokens, lm.max_context - len(o.prompt_token_ids)) \
        or o.finish_reason == "stop"
    long = lm.encode(PROMPTS[0]) + list(range(10, 210))  # a prompt of token ids
    n = len(long)
    o = lm.generate(long, temperature=0)  # the default is what the context leaves
    assert o.finish_reason == "stop" or len(o.token_ids) == lm.max_context - n
    with pytest.raises(ValueError, match=r"exceeds the model's context of 256 tokens"):
        lm.generate(long, max_tokens=lm.max_context - n + 1)
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate(list(range(10, 10 + lm.max_context)))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'temprature'.*temperature"):
        lm.generate("x", temprature=0)
    with pytest.raises(ValueError, match="top_p"):
        lm.generate("x", top_p=0)
    with pytest.raises(TypeError, match="prompt"):
        lm.generate([{"text": "x"}])
    with pytest.raises(TypeError, match="stop"):
        lm.generate("x", stop=[1])
    small = LM(lm.model, lm.tokenizer, lm.tokens, num_blocks=4)  # 64 tokens of KV cache
    with pytest.raises(ValueError, match="num_blocks"):
        small.generate("x", max_tokens=100)
    assert not lm._runs and not lm.engine.has_work()


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, lmforge; assert callable(lmforge.load); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_chat_lmforge_template_matches_hf(lm, hf):
    from lmforge.tokenize.chat import render

    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hail, my lord!"}]
    ids = render(lm.tokenizer, conv, add_generation_prompt=True)[0]
    assert lm.encode_chat(conv) == ids
    ref = hf_greedy(hf, ids, 30, eos=lm.tokens.stop)
    r = lm.chat(conv, temperature=0, max_tokens=30)
    assert r.token_ids == ref
    assert r.text == lm.tokenizer.decode(_strip_stop(lm, ref)) and r.message == {"role": "assistant",
                                                                                  "content": r.text}
    assert lm.chat("Hail, my lord!", temperature=0, max_tokens=30).token_ids == \
        hf_greedy(hf, lm.encode_chat([conv[1]]), 30, eos=lm.tokens.stop)
    assert "".join(lm.chat(conv, stream=True, temperature=0, max_tokens=30)) == r.text
    assert "".join(lm.chat_stream(conv, temperature=0, max_tokens=30)) == r.text
    # the end-of-turn token stops a chat (forced here by a logit bias)
    end = lm.tokenizer.special_tokens["<|end|>"]
    r = lm.chat(conv, temperature=0, max_tokens=30, logit_bias={end: 100.0})
    assert r.token_ids == [end] and r.text == "" and r.finish_reason == "stop" and r.stop_reason == end


def test_chat_plain_template(plain_dir, tmp_path):
    """The plain template: ``User: ... / Assistant:`` after BOS, cut at the chat stop strings (the next turn)."""
    from lmforge.model.hf import export_hf
    from lmforge.tokenize.special import PLAIN_STOP

    m = lmforge.load(plain_dir)
    assert m.tokens.template == "plain" and m.tokens.chat_stop == list(PLAIN_STOP)
    eot = m.tokenizer.special_tokens["<|endoftext|>"]
    ids = [eot] + m.tokenizer.encode("User: Hail, my lord!\n\nAssistant:", disallowed_special=())
    assert m.encode_chat("Hail, my lord!") == ids
    hf = load_hf(export_hf(m.model, tmp_path / "hf", tokenizer=m.tokenizer))
    ref = m.tokenizer.decode(_strip_stop(m, hf_greedy(hf, ids, 40, eos=m.tokens.stop)))
    cuts = [ref.find(s) for s in PLAIN_STOP if s in ref]
    assert m.chat("Hail, my lord!", temperature=0, max_tokens=40).text == ref[:min(cuts, default=len(ref))]
    # a chat stop string that this model does produce: the reply ends where it starts
    k = _plain_spans(ref, 3)[1]
    s = ref[k:k + 3]
    m2 = LM(m.model, m.tokenizer, dataclasses.replace(m.tokens, chat_stop=[s]))
    r = m2.chat("Hail, my lord!", temperature=0, max_tokens=40)
    assert r.text == ref[:ref.find(s)] and r.stop_reason == s
    assert m2.generate(ids, temperature=0, max_tokens=40).text == ref  # chat stop strings are the chat's alone


def test_fit_messages(lm):
    sys_msg = {"role": "system", "content": "Be brief."}
    turns = []
    for k in range(12):
        turns += [{"role": "user", "content": f"Question {k}: what of the king and his sons?"},
                  {"role": "assistant", "content": f"Answer {k}: they rode to the city gates at dawn."}]
    conv = [sys_msg] + turns + [{"role": "user", "content": "And then?"}]
    fitted, dropped = lm.fit_messages(conv, reserve=64)
    assert dropped > 0 and fitted[0] == sys_msg and fitted[-1] == conv[-1]
    assert fitted[1:] == conv[1 + dropped:] and fitted[1]["role"] == "user"
    assert len(lm.encode_chat(fitted)) <= lm.max_context - 64
    # minimal: one more (user, assistant) pair back would not fit
    assert len(lm.encode_chat([sys_msg] + conv[1 + dropped - 2:])) > lm.max_context - 64
    assert lm.fit_messages(conv[-3:], reserve=64) == (conv[-3:], 0)
    with pytest.raises(ValueError, match="the last message needs"):
        lm.fit_messages("word " * 300, reserve=64)
    with pytest.raises(ValueError, match="reserve"):
        lm.fit_messages(conv, reserve=0)


# ---- lmforge chat ---------------------------------------------------------------------------

def _run_chat(monkeypatch, capsys, argv, lines):
    from lmforge.cli import main

    feed = iter(lines)

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    rc = main(["chat", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_terminal_chat_keeps_the_conversation_in_the_context(chat_dir, monkeypatch, capsys):
    lines = [f"Tell me of the king, and of his sons, and of the battle at the gates of city number {k}"
             for k in range(8)]
    seen = []
    real = LM.chat_stream

    def spy(self, messages, **kw):  # what each turn asks of the model
        seen.append((len(self.encode_chat(messages)), kw["max_tokens"], messages))
        return real(self, messages, **kw)

    monkeypatch.setattr(LM, "chat_stream", spy)
    rc, out, err = _run_chat(monkeypatch, capsys, ["--checkpoint", str(chat_dir), "--max-tokens", "60",
                                                   "--temperature", "0", "--system", "Be brief."], lines)
    assert rc == 0
    notices = re.findall(r"\(dropped (\d+) earlier turns? to fit the 256-token context\)", err)
    assert notices and "Traceback" not in err
    replies = out.split("model> ")[1:]
    assert len(replies) == len(lines) and all(r.strip() for r in replies)
    assert len(seen) == len(lines)
    for n, max_tokens, messages in seen:
        assert max_tokens == min(60, 256 - n) and max_tokens >= 60  # reserve: a full reply always fits
        assert messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["content"] for m in seen[-1][2] if m["role"] == "user"][-1] == lines[-1]


def test_terminal_chat_reports_errors_and_goes_on(chat_dir, monkeypatch, capsys):
    real = LM.chat_stream
    calls = []

    def flaky(self, messages, **kw):
        calls.append(messages)
        if len(calls) == 2:
            raise RuntimeError("the engine fell over")
        return real(self, messages, **kw)

    monkeypatch.setattr(LM, "chat_stream", flaky)
    lines = ["Hail!", "word " * 300, "Again?", "And now?"]
    rc, out, err = _run_chat(monkeypatch, capsys, ["--checkpoint", str(chat_dir), "--max-tokens", "20",
                                                   "--temperature", "0"], lines)
    assert rc == 0 and "Traceback" not in err
    assert "the last message needs" in err  # too long alone: said, and the chat goes on
    assert "error: RuntimeError: the engine fell over" in err
    # the failed turn is forgotten: the next prompt holds the first exchange and the new line only
    assert [m["content"] for m in calls[2] if m["role"] == "user"] == ["Hail!", "And now?"]


# ---- docs -----------------------------------------------------------------------------------

def test_docs_python_api_example_runs(chat_dir, capsys):
    """The fenced python block of docs/inference.md's "Python API" section, run against the tiny model."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "inference.md").read_text()
    section = doc[doc.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'lmforge.load("runs/pt")' in code
    exec(compile(code.replace('"runs/pt"', repr(str(chat_dir))), "docs/inference.md", "exec"), {})
    assert capsys.readouterr().out.strip()
