"""Sampling controls and streaming text."""
import pytest
import torch

from lmforge.infer.sampling import Sampler, SamplingParams, TextStream


def logits():
    torch.manual_seed(0)
    return torch.randn(50)


def draw(params, n=200, x=None):
    s = Sampler(params)
    x = logits() if x is None else x
    return [s.sample(x).token for _ in range(n)]


def test_greedy_and_degenerate_truncations_are_argmax():
    x = logits()
    top = int(x.argmax())
    assert set(draw(SamplingParams(temperature=0), 5)) == {top}
    assert set(draw(SamplingParams(top_k=1))) == {top}
    assert set(draw(SamplingParams(top_p=1e-6))) == {top}
    assert set(draw(SamplingParams(min_p=1.0))) == {top}


def test_truncations_restrict_the_support():
    x = logits()
    # exactly the kept tokens come out (a sampler stuck on the argmax would fail too)
    top5 = set(torch.topk(x, 5).indices.tolist())
    assert set(draw(SamplingParams(top_k=5, seed=1), 500)) == top5
    probs = torch.softmax(x, -1)
    order = torch.argsort(probs, descending=True)
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.5).sum()) + 1].tolist())
    assert len(nucleus) > 1 and set(draw(SamplingParams(top_p=0.5, seed=2), 500)) == nucleus
    keep = set(torch.nonzero(probs >= 0.12 * probs.max()).flatten().tolist())  # 6 tokens (0.3 keeps only the top)
    assert len(keep) > 1 and set(draw(SamplingParams(min_p=0.12, seed=3), 500)) == keep


def test_seed_reproducible_and_temperature_spreads():
    a = draw(SamplingParams(seed=7, temperature=1.0))
    b = draw(SamplingParams(seed=7, temperature=1.0))
    c = draw(SamplingParams(seed=8, temperature=1.0))
    assert a == b and a != c
    assert len(set(draw(SamplingParams(seed=1, temperature=5.0), 500))) > len(set(draw(SamplingParams(seed=1, temperature=0.3), 500)))


def test_penalties_and_bias():
    x = torch.zeros(10)
    x[3] = 5.0
    assert draw(SamplingParams(temperature=0, logit_bias={7: 10.0}), 1, x) == [7]
    s = Sampler(SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=1.5))
    toks = [s.sample(x).token for _ in range(3)]
    assert toks == [3, 3, 0]  # 5, then 5 - 1.5 - 2 = 1.5, then 5 - 3 - 2 = 0: a tie, the first index wins

    s = Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), prompt_ids=[3])
    assert s.sample(x + 1.0).token != 3  # 6 / 100 < 1
    y = torch.tensor([1.0, -1.0])
    rp = Sampler(SamplingParams(repetition_penalty=2.0), prompt_ids=[0, 1]).process(y)
    assert rp.tolist() == [0.5, -2.0]  # positive logits divided, negative multiplied


def test_logprobs():
    x = logits()
    s = Sampler(SamplingParams(temperature=0, logprobs=3))
    r = s.sample(x)
    lp = torch.log_softmax(x, -1)
    assert r.logprob == pytest.approx(float(lp.max()))
    assert [t for t, _ in r.top_logprobs] == torch.topk(lp, 3).indices.tolist()


@pytest.mark.parametrize("kw,msg", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=True), "max_tokens"), (dict(min_tokens=5, max_tokens=4), "min_tokens"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(ignore_eos=1), "ignore_eos"),
    (dict(stop="END"), "stop"), (dict(stop_token_ids=[50]), "stop_token_ids.*outside"),
    (dict(logit_bias={1: float("nan")}), "logit_bias"), (dict(temperature=float("nan")), "temperature"),
    (dict(logit_bias={99: 1}), "outside the vocabulary"), (dict(presence_penalty=3), "presence_penalty"),
])
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        Sampler(SamplingParams(**kw), vocab_size=50)


class ByteTok:
    def decode_bytes(self, ids):
        return bytes(ids)


def test_stream_never_splits_a_character_and_holds_stop_prefixes():
    text = "héllo 漢字 🙂 END tail"
    ids = list(text.encode())
    ts = TextStream(ByteTok(), stop=["END"])
    pieces = [ts.push(i) for i in ids]
    out = "".join(pieces) + ts.flush()
    assert out == "héllo 漢字 🙂 "
    assert ts.stopped
    for p in pieces:
        p.encode("utf-8")  # every piece is valid text on its own
    assert "E" not in "".join(pieces)  # the stop string never leaked
    ts = TextStream(ByteTok(), stop=["ENDX"])
    out = "".join(ts.push(i) for i in b"a END b") + ts.flush()
    assert out == "a END b"
    ts = TextStream(ByteTok())
    assert ts.push(0xE6) == "" and ts.flush() == "\ufffd"


def test_min_tokens_masks_the_stop_tokens_then_lets_them_through():
    x = torch.zeros(10)
    x[4] = 5.0  # the eos: the argmax
    x[6] = 3.0  # a stop token id: second
    s = Sampler(SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6], logprobs=2), eos_token_id=4)
    for _ in range(2):  # both stops are -inf, the rest tie at 0: the first index wins
        r = s.sample(x)
        assert r.token == 0 and {t for t, _ in r.top_logprobs}.isdisjoint({4, 6})
    assert s.sample(x).token == 4  # two tokens exist: the eos is back
    # ignore_eos: nothing to mask (those tokens end nothing)
    assert Sampler(SamplingParams(temperature=0, min_tokens=2, ignore_eos=True), eos_token_id=4).sample(x).token == 4


def test_nan_logits_raise_a_clear_error():
    x = torch.zeros(10)
    x[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN at token ids \[3\]"):
        Sampler(SamplingParams(temperature=1.0, seed=0)).sample(x)


def test_stream_stop_choice_include_and_unchecked_text():
    # the stop string that starts first wins, whatever the order of the list
    ts = TextStream(ByteTok(), stop=["cd", "bcx"])
    out = "".join(ts.push(i) for i in b"abcdx")
    assert (out, ts.stop_reason) == ("ab", "cd")
    ts = TextStream(ByteTok(), stop=["bc", "abc"])
    assert "".join(ts.push(i) for i in b"xabc") == "x" and ts.stop_reason == "abc"
    ts = TextStream(ByteTok(), stop=["lo w"], include_stop=True)
    assert "".join(ts.push(i) for i in b"hello world") == "hello w" and ts.stopped
    # unchecked text (min_tokens): a stop string that ends there does not count; one that begins
    # there and ends later does
    ts = TextStream(ByteTok(), stop=["ab"])
    assert ts.push(ord("a"), check_stop=False) + ts.push(ord("b"), check_stop=False) == "ab"
    assert ts.push(ord("c")) == "c" and not ts.stopped
    ts = TextStream(ByteTok(), stop=["abc"])
    assert ts.push(ord("a"), check_stop=False) + ts.push(ord("b"), check_stop=False) == ""  # held back
    assert ts.push(ord("c")) == "" and ts.stop_reason == "abc"


def test_nan_logits_raise_when_greedy_too_and_an_empty_support_is_named():
    x = torch.zeros(10)
    x[7] = float("nan")
    with pytest.raises(ValueError, match=r"NaN at token ids \[7\]"):
        Sampler(SamplingParams(temperature=0)).sample(x)
    with pytest.raises(ValueError, match="no token can be sampled"):
        Sampler(SamplingParams(seed=0)).sample(torch.full((10,), -float("inf")))
