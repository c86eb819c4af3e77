"""align.data: every JSONL format read, every bad input named by file:line:field (or counted as a skip),
the mixture arithmetic of weights and caps, the validation split by conversation."""
import json
import math
import random

import pytest

from lmforge.align import data as D

U, A = "user", "assistant"


def _write(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def _conv(i: int) -> dict:
    return {"messages": [{"role": U, "content": f"question {i}"}, {"role": A, "content": f"answer {i}"}]}


# ---- formats ---------------------------------------------------------------------------------------------

def test_every_format_reads_to_messages(tmp_path):
    p = _write(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": U, "content": "Hi"},
                      {"role": A, "content": "Hello."}, {"role": U, "content": "Bye"}, {"role": A, "content": "Bye."}]},
        "",  # blank lines are skipped (and keep the line numbers true)
        {"prompt": "2 + 2?", "completion": "4"},
        {"prompt": [{"role": "developer", "content": "Count."}, {"role": U, "content": "1, 2, ?"}],
         "completion": [{"role": A, "content": "3"}]},
        "   ",
        {"system": "Answer yes or no.", "prompt": "Is ( ) balanced?", "completion": "yes"},
        {"system": "S", "messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", "name": "bot"}],
         "extra": {"ignored": True}},
    ])
    convs = D.read_conversations(p)
    assert [c["id"] for c in convs] == ["mixed.jsonl:1", "mixed.jsonl:3", "mixed.jsonl:4", "mixed.jsonl:6",
                                        "mixed.jsonl:7"]
    assert all(c["source"] == "mixed.jsonl" for c in convs)
    assert [m["role"] for m in convs[0]["messages"]] == ["system", U, A, U, A]
    assert convs[1]["messages"] == [{"role": U, "content": "2 + 2?"}, {"role": A, "content": "4"}]
    assert convs[2]["messages"] == [{"role": "system", "content": "Count."}, {"role": U, "content": "1, 2, ?"},
                                    {"role": A, "content": "3"}]  # developer is read as system
    assert convs[3]["messages"][0] == {"role": "system", "content": "Answer yes or no."}
    assert convs[4]["messages"] == [{"role": "system", "content": "S"}, {"role": U, "content": "q"},
                                    {"role": A, "content": "a"}]  # other keys dropped


def test_a_utf8_bom_and_crlf_lines_read(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(_conv(0)).encode() + b"\r\n" + json.dumps(_conv(1)).encode() + b"\r\n")
    assert [c["messages"][1]["content"] for c in D.read_conversations(p)] == ["answer 0", "answer 1"]


def test_the_messages_render_in_the_chat_format(tmp_path):
    """What comes out is what ``chat.render`` takes: its loss mask marks each assistant turn and its end."""
    from lmforge import tokenize
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS, parse, render

    tok = tokenize.train("bpe", ["hello world, a tiny corpus of words " * 20], 300,
                         special_tokens=list(CHAT_SPECIAL_TOKENS), show_progress=False)
    p = _write(tmp_path / "c.jsonl", [{"prompt": [{"role": "developer", "content": "sys"},
                                                  {"role": U, "content": "hi"}],
                                       "completion": [{"role": A, "content": "hello"}]}])
    (c,) = D.read_conversations(p)
    ids, mask = render(tok, c["messages"])
    assert parse(tok, ids) == c["messages"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "hello<|end|>"


# ---- bad input -----------------------------------------------------------------------------------------------

BAD = [  # (line, field named in the message, reason, message fragment)
    ('{"messages": [', None, "bad_json", "bad JSON"),
    ('[1, 2]', None, "not_an_object", "expected a JSON object"),
    ({"text": "plain"}, "messages", "no_messages", "missing"),
    ({"messages": "hi"}, "messages", "no_messages", "expected a list"),
    ({"messages": [{"role": U, "content": "q"}, {"role": "tool", "content": "x"}, {"role": A, "content": "a"}]},
     "messages[1].role", "unknown_role", "unknown role 'tool'"),
    ({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": U, "content": "q"},
                   {"role": A, "content": "a"}]}, "messages[1].role", "system_not_first", "second system message"),
    ({"messages": [{"role": U, "content": "q"}, {"role": "system", "content": "s"}, {"role": A, "content": "a"}]},
     "messages[1].role", "system_not_first", "only first"),
    ({"system": "s", "messages": [{"role": "system", "content": "t"}, {"role": U, "content": "q"},
                                  {"role": A, "content": "a"}]}, "messages[0].role", "system_not_first", "second"),
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": ["a"]}]}, "messages[1].content",
     "content_not_string", "must be a string, got list"),
    ({"messages": [{"role": U, "content": None}, {"role": A, "content": "a"}]}, "messages[0].content",
     "content_not_string", "got NoneType"),
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "  \n"}]}, "messages[1].content",
     "empty_assistant", "empty assistant turn"),
    ({"messages": [{"role": U, "content": "q"}]}, "messages", "no_assistant", "no assistant turn"),
    ({"messages": []}, "messages", "no_assistant", "empty"),
    ({"messages": [{"role": U}, {"role": A, "content": "a"}]}, "messages[0]", "bad_message", "missing 'content'"),
    ({"messages": ["hi", {"role": A, "content": "a"}]}, "messages[0]", "bad_message", "got str"),
    ({"prompt": "q"}, "completion", "no_messages", "missing"),
    ({"prompt": "q", "completion": [{"role": A, "content": "a"}]}, "prompt/completion", "bad_format",
     "two strings or two lists"),
    ({"prompt": [{"role": U, "content": "q"}], "completion": [{"role": U, "content": "more"}]}, "completion[0].role",
     "bad_format", "assistant turns only"),
    ({"prompt": [{"role": U, "content": "q"}], "completion": [{"role": A, "content": ""}]}, "completion[0].content",
     "empty_assistant", "empty assistant"),
    ({"prompt": "q", "completion": ""}, "completion.content", "empty_assistant", "empty assistant"),
    ({"system": 3, "prompt": "q", "completion": "a"}, "system", "content_not_string", "must be a string"),
    ({"messages": [{"role": A, "content": "a"}], "prompt": "q"}, "messages", "bad_format", "one or the other"),
]


@pytest.mark.parametrize("line,field,reason,fragment", BAD, ids=[f"{b[2]}-{k}" for k, b in enumerate(BAD)])
def test_bad_input_names_file_line_and_field(tmp_path, line, field, reason, fragment):
    p = _write(tmp_path / "bad.jsonl", [_conv(0), "", line])
    with pytest.raises(ValueError) as e:
        D.read_conversations(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: "), msg
    if field is not None:
        assert msg.startswith(f"{p}:3: {field}"), msg
    assert fragment in msg, msg
    assert e.value.reason == reason


def test_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps(_conv(0)).encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}'.encode("latin-1")
                  + b"\n")
    with pytest.raises(ValueError, match=rf"^{p}:2: not UTF-8"):
        D.read_conversations(p)


def test_missing_file_and_bad_on_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: conversation file not found"):
        D.read_conversations(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        D.read_conversations(_write(tmp_path / "a.jsonl", [_conv(0)]), on_error="ignore")


def test_skip_counts_each_reason(tmp_path):
    lines = [_conv(0)] + [b[0] for b in BAD] + ["", _conv(1)]
    p = _write(tmp_path / "mixed.jsonl", lines)
    stats = {}
    convs = D.read_conversations(p, on_error="skip", stats=stats)
    assert [c["id"] for c in convs] == ["mixed.jsonl:1", f"mixed.jsonl:{len(lines)}"]
    want = {}
    for b in BAD:
        want[b[2]] = want.get(b[2], 0) + 1
    assert stats["reasons"] == want
    assert stats["read"] == len(BAD) + 2 and stats["used"] == 2 and stats["skipped"] == len(BAD)
    assert len(stats["errors"]) == D.MAX_ERRORS_KEPT and stats["errors"][0].startswith(f"{p}:2: bad JSON")


def test_check_messages_normalizes_and_keeps_what_is_good():
    msgs = [{"role": "developer", "content": "s"}, {"role": U, "content": ""}, {"role": A, "content": "a"},
            {"role": U, "content": "trailing question"}]
    assert D.check_messages(msgs, "here") == [{"role": "system", "content": "s"}, {"role": U, "content": ""},
                                              {"role": A, "content": "a"}, {"role": U, "content": "trailing question"}]
    with pytest.raises(ValueError, match=r"^conv 7: messages\[1\]\.role: unknown role 'robot'"):
        D.check_messages([{"role": U, "content": "q"}, {"role": "robot", "content": "x"}], "conv 7")


# ---- mixtures ------------------------------------------------------------------------------------------------

def test_mixture_sizes_by_hand():
    assert D.mixture_sizes([10, 20, 5], None) == [10, 20, 5]
    # shares 1/2, 1/4, 1/4: M = min(100/.5, 40/.25, 1000/.25) = 160 -> 80, 40, 40
    assert D.mixture_sizes([100, 40, 1000], [2, 1, 1]) == [80, 40, 40]
    # shares 1/3 each: M = 3 * 7 = 21 -> 7 each
    assert D.mixture_sizes([7, 50, 50], [1, 1, 1]) == [7, 7, 7]
    # weight 0 leaves a source out and does not limit M
    assert D.mixture_sizes([3, 50, 60], [0, 1, 1]) == [0, 50, 50]
    # M = floor(10 / (1/3)) = 30 -> 10, 20 (exact); M = floor(11 / (1/3)) = 33 -> 11, 22
    assert D.mixture_sizes([10, 100], [1, 2]) == [10, 20]
    assert D.mixture_sizes([11, 100], [1, 2]) == [11, 22]
    # remainders: shares .3/.3/.4 of M = floor(5/.3) = 16: 4.8, 4.8, 6.4 -> floors 4, 4, 6, two left for the
    # largest remainders (.8, .8) -> 5, 5, 6
    assert D.mixture_sizes([5, 5, 100], [3, 3, 4]) == [5, 5, 6]
    assert D.mixture_sizes([0, 9], [1, 1]) == [0, 0]


@pytest.mark.parametrize("seed", range(25))
def test_mixture_sizes_keep_the_shares(seed):
    """Random cases: never past a source's count, the sum is M, each size within 1 of M * share, and M is
    the largest such (one more would need more of some source than it has)."""
    r = random.Random(seed)
    k = r.randint(1, 5)
    avail = [r.randint(0, 500) for _ in range(k)]
    w = [r.choice([0, 0.5, 1, 2, 3.7, 10]) for _ in range(k)]
    sizes = D.mixture_sizes(avail, w)
    assert all(0 <= s <= a for s, a in zip(sizes, avail))
    live = [i for i in range(k) if w[i] > 0]
    if not live:
        assert sizes == [0] * k
        return
    m = sum(sizes)
    shares = [x / sum(w) for x in w]
    assert all(abs(sizes[i] - m * shares[i]) < 1 + 1e-9 for i in range(k))
    assert all(sizes[i] == 0 for i in range(k) if w[i] == 0)
    assert any((m + 1) * shares[i] > avail[i] for i in live)  # the largest: one more overdraws a source


def test_load_sources_weights_caps_and_stats(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_conv(i) for i in range(100)])
    b = _write(tmp_path / "b.jsonl", [_conv(1000 + i) for i in range(30)] + ["{bad"])
    c = _write(tmp_path / "c.jsonl", [_conv(2000 + i) for i in range(50)])
    srcs = [{"path": str(a), "weight": 2}, {"path": str(b), "weight": 1}, {"path": str(c), "weight": 1, "cap": 10}]
    convs, st = D.load_sources(srcs, seed=3, on_error="skip")
    # available 100, 30, 10 (cap); shares 1/2, 1/4, 1/4: M = min(200, 120, 40) = 40 -> 20, 10, 10
    assert [st[str(p)]["used"] for p in (a, b, c)] == [20, 10, 10]
    assert [st[str(p)]["available"] for p in (a, b, c)] == [100, 30, 10]
    assert st[str(b)]["skipped"] == 1 and st[str(b)]["reasons"] == {"bad_json": 1} and st[str(b)]["read"] == 31
    assert len(convs) == 40 and len({c["id"] for c in convs}) == 40
    assert sum(x["source"] == "a.jsonl" for x in convs) == 20
    again, _ = D.load_sources(srcs, seed=3, on_error="skip")
    assert [x["id"] for x in again] == [x["id"] for x in convs]  # seeded
    other, _ = D.load_sources(srcs, seed=4, on_error="skip")
    assert [x["id"] for x in other] != [x["id"] for x in convs]
    # no weights: everything (after caps)
    convs, st = D.load_sources([{"path": str(a)}, {"path": str(c), "cap": 7}], seed=0)
    assert len(convs) == 107 and st[str(c)]["used"] == 7
    # a repeated source is named apart
    _, st = D.load_sources([{"path": str(a)}, {"path": str(a)}], seed=0)
    assert sorted(st) == sorted([str(a), f"{a}#2"])


def test_load_sources_bad_sources(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_conv(0)])
    bad = _write(tmp_path / "bad.jsonl", [_conv(0), {"messages": [{"role": U, "content": "q"}]}])
    cases = [
        ([], "non-empty list"),
        ([{"path": str(a), "weight": 1}, {"path": str(a)}], r"sources\[1\]: no weight"),
        ([{"path": str(a), "weight": -1}], r"weight=-1"),
        ([{"path": str(a), "cap": 1.5}], r"cap=1.5"),
        ([{"path": str(a), "generator": "addition"}], "exactly one"),
        ([{"generator": "nope", "n": 3}], "unknown generator 'nope'"),
        ([{"generator": "addition"}], r"n=None"),
        ([{"path": str(a), "colour": "red"}], "unknown key"),
        ([{"generator": "speaker", "n": 3}], "needs data_dir"),
        ([{"path": str(bad)}], rf"{bad}:2: messages: no assistant turn"),
    ]
    for srcs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            D.load_sources(srcs, seed=0)


def test_load_sources_generators_and_optional_corpus():
    convs, st = D.load_sources([{"generator": "addition", "n": 30, "p_eval": 1.0}, {"generator": "identity", "n": 10},
                                {"generator": "speaker", "n": 5, "optional": True}], seed=1)
    assert len(convs) == 40 and st["gen:addition"]["used"] == 30 and st["gen:speaker"]["used"] == 0
    assert "no data_dir" in st["gen:speaker"]["note"]
    assert {c["source"] for c in convs} == {"gen:addition", "gen:identity"}
    assert all(c["messages"][-1]["content"] == str(c["answer"]) for c in convs if c["source"] == "gen:addition")


# ---- validation split ------------------------------------------------------------------------------------

def test_split_is_by_conversation_deterministic_and_disjoint():
    convs = [{"id": str(i), **_conv(i)} for i in range(5000)]
    convs += [{"id": f"copy{i}", **_conv(i)} for i in range(0, 5000, 7)]  # copies of some conversations
    train, val = D.split_validation(convs, 0.1, seed=0)
    assert len(train) + len(val) == len(convs)
    assert 0.08 < len(val) / len(convs) < 0.12
    key = lambda c: json.dumps(c["messages"])  # noqa: E731
    assert not {key(c) for c in train} & {key(c) for c in val}  # no conversation in both, copies included
    t2, v2 = D.split_validation(list(reversed(convs)), 0.1, seed=0)  # order does not decide the split
    assert {c["id"] for c in v2} == {c["id"] for c in val}
    t3, v3 = D.split_validation(convs[:2000], 0.1, seed=0)  # nor does the rest of the data
    first = {c["id"] for c in convs[:2000]}
    assert {c["id"] for c in v3} == {c["id"] for c in val if c["id"] in first}
    in_train = {c["id"] for c in train}
    assert [c["id"] for c in train] == [c["id"] for c in convs if c["id"] in in_train]  # order kept
    _, v4 = D.split_validation(convs, 0.1, seed=1)
    assert {c["id"] for c in v4} != {c["id"] for c in val}  # the seed salts the hash


def test_split_edges():
    two = [{"id": str(i), **_conv(i)} for i in range(2)]
    train, val = D.split_validation(two, 0.01, seed=0)
    assert len(train) == 1 and len(val) == 1  # a positive fraction gives a validation conversation
    train, val = D.split_validation(two, 0.99, seed=0)
    assert len(train) == 1 and len(val) == 1  # and keeps one for training
    assert D.split_validation(two, 0.0, seed=0) == (two, [])
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="val_frac"):
            D.split_validation(two, bad, seed=0)


# ---- the pad token SFT relies on: never a stop token ------------------------------------------------------------

@pytest.mark.parametrize("kind,size", [("bpe", 300), ("char", 80), ("wordpiece", 200), ("unigram", 120)])
def test_pad_is_never_a_stop_token(kind, size):
    from lmforge import tokenize
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS
    from lmforge.tokenize.special import TokenSpec, default_special_tokens

    specials = default_special_tokens(kind)
    assert (specials[-1] == "<|pad|>") == (kind != "wordpiece")  # reserved last, where the family has no pad
    assert [s for s in specials if s != "<|pad|>"] == list(dict.fromkeys(
        {"bpe": ["<|endoftext|>"], "char": ["<|endoftext|>"],
         "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
         "unigram": ["<unk>", "<s>", "</s>"]}[kind] + list(CHAT_SPECIAL_TOKENS)))  # the earlier ones, in order
    text = "to be or not to be that is the question whether tis nobler in the mind to suffer " * 30
    tok = tokenize.train(kind, [text], size, special_tokens=specials, show_progress=False)
    spec = TokenSpec.for_tokenizer(tok)
    assert spec.pad is not None and spec.pad not in spec.stop and spec.pad != spec.doc
    assert tok.id_to_token(spec.pad) == ("[PAD]" if kind == "wordpiece" else "<|pad|>")
    # a tokenizer trained before <|pad|> was reserved: its only candidate, <|endoftext|>, stops: no pad
    old = tokenize.train("bpe", [text], 300, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    spec = TokenSpec.for_tokenizer(old)
    assert old.special_tokens["<|endoftext|>"] in spec.stop and spec.pad is None
