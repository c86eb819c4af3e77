"""On-policy preference pairs (``lmforge.align.pairs``).

References: the checker is the evaluation's own (the harness, scoring scripted answers through the chat
template, gives every document the score ``score_answer`` gives the same answer; the prompt each row
carries renders to the very context the harness sent); prompts come from the dev split only (every
content key is a dev item, test/private refused before anything runs); pairs exist exactly where a prompt
has a correct and an incorrect distinct answer; a seed fixes every row; the JSONL rows are TRL's
conversational preference formats and read back as written.
"""
import argparse
import json
import random

import pytest
import torch

from conftest import perturbed

from lmforge import tokenize
from lmforge.align import pairs as P
from lmforge.align.generators import content_key
from lmforge.evaluate import builtin
from lmforge.evaluate.builtin import splits
from lmforge.evaluate.harness import score_split
from lmforge.evaluate.local import LocalLM
from lmforge.model import make_config, save
from lmforge.model.transformer import Transformer
from lmforge.tokenize.chat import render
from lmforge.tokenize.special import TokenSpec, default_special_tokens

CTX = 256


@pytest.fixture(scope="module")
def tok(corpus_files):
    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


@pytest.fixture(scope="module")
def tokens(tok):
    return TokenSpec.for_tokenizer(tok)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
                      max_seq_len=CTX, norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False, arch="llama")
    return perturbed(Transformer(cfg), 0.2, seed=0)


def _gold(task, p):
    if task == "identity":  # the SFT data's own first reply of the topic
        from lmforge.align.generators import IDENTITY

        return IDENTITY[p.topic][1][0]
    if task.output_type == "multiple_choice":
        return str(task.choices(p.doc)[task.gold(p.doc)])
    return str(p.doc["answer"])


def _wrong(task, p):
    if task.output_type == "multiple_choice":
        ch = task.choices(p.doc)
        return str(ch[1 - task.gold(p.doc)])
    return str(p.doc["answer"]) + "7"


# ------------------------------------------------------------------------------------------- the checker

class Scripted(LocalLM):
    """The evaluation's LocalLM (its chat template and tokenization), answering from a script, each answer cut
    before the first ``until`` string as the engine cuts a generation."""

    def __init__(self, *a, script, **kw):
        super().__init__(*a, **kw)
        self.script = script

    def generate_until(self, requests):
        out = []
        for ctx, gk in requests:
            text = self.script(ctx)
            cuts = [text.find(s) for s in gk["until"] if s in text]
            out.append(text[:min(cuts)] if cuts else text)
        return out


@pytest.mark.parametrize("name,shots", [("addition", 0), ("letter_count", 0), ("sort_numbers", 0), ("reverse", 0),
                                        ("subtraction", None)])
def test_checker_is_the_evaluations(name, shots, model, tok, tokens):
    """The harness, scoring answers through the chat template, agrees with ``score_answer`` on every
    document; the contexts it sent are the rows' prompts rendered (the ids too). ``shots`` None: the
    task's own few-shot prompt (``lmforge eval --apply-chat-template``'s default)."""
    n = 12
    lm0 = LocalLM(model, tok, tokens=tokens)
    task, prompts = P.eval_prompts(lm0, name, "dev", n, num_fewshot=shots)
    if shots is None:
        assert all(p.messages[-1]["content"].count("Q: ") == task.num_fewshot + 1 for p in prompts)
    by_ctx = {}
    r = random.Random(0)
    for p in prompts:
        ctx = tok.decode(p.ids)
        g = _gold(task, p)
        by_ctx[ctx] = r.choice([g, _wrong(task, p), g + "\nQ: more", "x" + g, g + " " + g])
    lm = Scripted(model, tok, tokens=tokens, script=lambda c: by_ctx[c])
    from lmforge.evaluate.task import load_task

    ev = load_task(builtin.task_path(name))[0]  # the evaluation's own definition (its default n, its few-shot pool)
    res = score_split(lm, ev, "dev", limit=n, num_fewshot=shots, apply_chat_template=True,
                      bootstrap=10)
    assert len(res["lines"]) == len(prompts) == n
    scores = set()
    for line, p in zip(res["lines"], prompts):
        assert line["prompt"] == tok.decode(p.ids)  # the same context
        assert lm.tok_encode(line["prompt"]) == p.ids == render(tok, p.messages, add_generation_prompt=True)[0]
        s, view = P.score_answer(task, p, by_ctx[line["prompt"]])
        assert s == line["metrics"]["exact_match"], (line["responses"], view)
        assert view == line["responses"][0]
        scores.add(s)
    assert scores == {0.0, 1.0}  # both kinds of answer were scored


def test_checker_hand_made(model, tok, tokens):
    lm = LocalLM(model, tok, tokens=tokens)
    task, (p, *_) = P.eval_prompts(lm, "addition", "dev", 3)
    a = str(p.doc["a"] + p.doc["b"])
    assert P.score_answer(task, p, a) == (1.0, a)
    assert P.score_answer(task, p, a + "\nQ: What is 1 + 1?\nA: 2") == (1.0, a)  # the evaluation reads to the \n
    assert P.score_answer(task, p, str(int(a) + 1))[0] == 0.0
    assert P.score_answer(task, p, "")[0] == 0.0
    # a sample longer than the task's max_gen_toks: the evaluation's reading is passed in
    assert P.score_answer(task, p, a + "123", view=a)[0] == 1.0
    bt, (bp, *_) = P.eval_prompts(lm, "brackets", "dev", 3)
    gold = bt.choices(bp.doc)[bt.gold(bp.doc)]
    other = bt.choices(bp.doc)[1 - bt.gold(bp.doc)]
    assert P.score_answer(bt, bp, gold)[0] == 1.0 and P.score_answer(bt, bp, f" {gold} ")[0] == 1.0
    assert P.score_answer(bt, bp, other)[0] == 0.0 and P.score_answer(bt, bp, gold + " maybe")[0] == 0.0


def test_identity_rule(model, tok, tokens):
    lm = LocalLM(model, tok, tokens=tokens)
    ps = {p.topic: p for p in P.identity_prompts(lm, 12, seed=0)}
    assert set(ps) == set(P.IDENTITY_FACTS)
    who, browse = ps["name"], ps["browse"]
    assert P.score_answer("identity", who, "My name is lmforge.", ended=True)[0] == 2.0
    assert P.score_answer("identity", who, "My name is lmforge and", ended=False)[0] == 1.0
    assert P.score_answer("identity", who, "I like the king.", ended=True)[0] == 1.0
    assert P.score_answer("identity", who, "I like the king", ended=False)[0] == 0.0
    assert P.score_answer("identity", browse, "No. I cannot browse the web.", ended=True)[0] == 2.0
    assert P.score_answer("identity", browse, "Yes, gladly.", ended=True)[0] == 1.0
    assert P.score_answer("identity", browse, "Nothing", ended=True)[0] == 1.0  # "no" as a word, not a prefix
    assert P.score_answer("identity", browse, "NO! I can't.", ended=True)[0] == 2.0
    now, can = ps["now"], ps["abilities"]
    assert P.score_answer("identity", now, "I don't know; there is no clock here.", ended=True)[0] == 2.0
    assert P.score_answer("identity", now, "It is Tuesday.", ended=True)[0] == 1.0
    assert P.score_answer("identity", can, "Small sums and sorting words.", ended=True)[0] == 2.0
    assert P.score_answer("identity", can, "I am trained on Shakespeare.", ended=True)[0] == 1.0


# ------------------------------------------------------------------------------------------- pairing

def _a(text, correct, clean=True, j=0):
    return {"text": text, "correct": correct, "clean": clean, "sample": j}


def test_pick_pairs_only_where_both_exist():
    r = random.Random(0)
    assert P.pick_pairs([_a("1", True), _a("2", True)], r, clean_pairs=False) == []
    assert P.pick_pairs([_a("1", True), _a("2", True)], r) == []  # both clean: no style pair either
    assert P.pick_pairs([_a("1", False), _a("2", False, clean=False)], r) == []
    got = P.pick_pairs([_a("1", True, clean=False), _a("2", True), _a("3", False), _a("4", False)], r, 1)
    assert len(got) == 1 and got[0][0]["text"] == "2" and got[0][1]["text"] in "34" and got[0][2] == "correct"
    many = P.pick_pairs([_a("1", True, clean=False), _a("2", True), _a("3", False), _a("4", False)], r, 10)
    assert len(many) == 4 and len({(c["text"], x["text"]) for c, x, _ in many}) == 4
    assert [c["clean"] for c, _, _ in many] == [True, True, False, False]  # the clean chosen first
    style = P.pick_pairs([_a("1", True), _a("1\nmore", True, clean=False)], r)
    assert [(c["text"], x["text"], k) for c, x, k in style] == [("1", "1\nmore", "clean")]
    ans = [_a(str(i), i < 3, j=i) for i in range(8)]
    assert P.pick_pairs(ans, random.Random(5), 2) == P.pick_pairs(ans, random.Random(5), 2)


def _scripted_sampler(monkeypatch, tok):
    """The engine replaced by a script: per prompt, gold and wrong answers in a seeded mix (some prompts
    all gold, some all wrong, one rambling correct answer now and then)."""
    def fake(lm, prompts, k, params_for, seed):
        out = []
        for p in prompts:
            task = P._fresh_task(p.task, 1) if p.task != "identity" else "identity"
            r = random.Random(f"{seed}|{p.task}|{p.doc_id}")
            mode = r.choice(["good", "bad", "mixed", "mixed"])
            row = []
            for j in range(k):
                good = mode == "good" or (mode == "mixed" and r.random() < 0.5)
                text = _gold(task, p) if good else (_wrong(task, p) if task != "identity" else "hm")
                if good and r.random() < 0.2 and task != "identity" and task.output_type != "multiple_choice":
                    text += "\nQ: again"
                row.append({"text": text, "ids": tok.encode(text, disallowed_special=()), "ended": True})
            out.append(row)
        return out
    monkeypatch.setattr(P, "_sample", fake)


def test_make_pairs_yield_matches_the_scores(monkeypatch, model, tok, tokens, tmp_path):
    _scripted_sampler(monkeypatch, tok)
    tasks = ["addition", "brackets", "sort", "identity"]
    paired, unpaired, stats = P.make_pairs(model, tok, tokens, tasks, n=10, k=4, seed=3, clean_pairs=False)
    by_doc = {}
    for u in unpaired:
        by_doc.setdefault((u["meta"]["task"], u["meta"]["doc_id"]), []).append(u)
    for name in tasks:
        st = stats[name]
        assert st["prompts"] == 10 and st["samples"] == 40
        docs = {d: us for (t, d), us in by_doc.items() if t == name}
        both = sum(1 for us in docs.values() if {u["label"] for u in us} == {True, False})
        assert st["pairs"] == both == sum(1 for x in paired if x["meta"]["task"] == name) > 0
        assert st["all_correct"] == sum(1 for us in docs.values() if all(u["label"] for u in us))
        assert st["all_wrong"] == sum(1 for us in docs.values() if not any(u["label"] for u in us))
        assert st["all_correct"] + st["all_wrong"] + both == 10
        # distinct answers only: the texts of one prompt's unpaired rows differ
        assert all(len({u["completion"][0]["content"] for u in us}) == len(us) for us in docs.values())
    for x in paired:
        assert x["meta"]["chosen_score"] > x["meta"]["rejected_score"]
        assert x["chosen"][0]["content"] != x["rejected"][0]["content"]
    # with clean_pairs, a prompt whose answers are all correct but one rambles yields a clean pair as well
    p2, _, s2 = P.make_pairs(model, tok, tokens, ["addition", "sort"], n=10, k=4, seed=3)
    assert sum(s2[t]["clean_pairs"] for t in s2) >= 1
    for x in p2:
        if x["meta"]["kind"] == "clean":
            assert "\n" in x["rejected"][0]["content"] and x["meta"]["chosen_view"] == x["meta"]["rejected_view"]

    # the rows are TRL's conversational formats and read back as written
    f = P.write_pairs(paired, tmp_path / "p.jsonl")
    g = P.write_pairs(unpaired, tmp_path / "u.jsonl")
    back = [json.loads(l) for l in f.read_text().splitlines()]
    assert back == paired and [json.loads(l) for l in g.read_text().splitlines()] == unpaired
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "u.jsonl"]  # no temporary left
    for x in back:
        assert x["prompt"][-1]["role"] == "user" and all(m["role"] in ("system", "user") for m in x["prompt"])
        assert [m["role"] for m in x["chosen"]] == ["assistant"] == [m["role"] for m in x["rejected"]]
    for u in unpaired:
        assert isinstance(u["label"], bool) and [m["role"] for m in u["completion"]] == ["assistant"]
    from lmforge.align.pref_data import encode_preferences, read_preferences

    rows, st = read_preferences(f)
    assert st["kept"] == len(paired) and all(r["kind"] == "paired" and r["conversational"] for r in rows)
    assert [r["meta"]["task"] for r in rows] == [x["meta"]["task"] for x in paired]
    exs, est = encode_preferences(tok, rows, CTX)
    assert est["kept"] == len(paired)
    for ex, x in zip(exs, paired):  # the prompt the DPO stage trains on is the one the engine was given
        assert ex.prompt == render(tok, x["prompt"], add_generation_prompt=True)[0]
    urows, st = read_preferences(g)
    assert st["kept"] == len(unpaired) and all(r["kind"] == "unpaired" for r in urows)
    assert [r["label"] for r in urows] == [u["label"] for u in unpaired]


# ------------------------------------------------------------------------------------------- the engine, seeds, splits

def test_small_split_gives_what_it_has(model, tok, tokens):
    lm = LocalLM(model, tok, tokens=tokens)
    task, prompts = P.eval_prompts(lm, "reverse", "dev", 100000)
    assert 0 < len(prompts) < 100000 and len({p.key for p in prompts}) == len(prompts)


def test_dev_split_only(model, tok, tokens):
    for bad in ("test", "private"):
        with pytest.raises(ValueError, match="dev split only"):
            P.make_pairs(None, None, None, ["addition"], split=bad)  # refused before the model is touched
    with pytest.raises(ValueError, match="expected 'dev'"):
        P.make_pairs(None, None, None, ["addition"], split="validation")
    lm = LocalLM(model, tok, tokens=tokens)
    for name in ("addition", "letter_count", "reverse", "sort", "sort_numbers", "brackets", "subtraction"):
        task, prompts = P.eval_prompts(lm, name, "dev", 30)
        gen = task.config["generator"]
        dev = {content_key(gen, d) for d in builtin.generate(gen, "dev", 30, **{
            k: v for k, v in (task.config.get("generator_kwargs") or {}).items() if k != "n"})}
        assert len(prompts) == 30
        for p in prompts:
            assert p.key in dev and splits.bucket(gen, p.key) == "dev", (name, p.key)
        with pytest.raises(ValueError, match="test split"):
            P.eval_prompts(lm, name, "private", 3)


def test_engine_run_is_seeded(model, tok, tokens):
    kw = dict(n=4, k=3, max_new_tokens=8, temperature=1.0)
    model.train()
    a = P.make_pairs(model, tok, tokens, ["addition", "brackets", "identity"], seed=1, **kw)
    b = P.make_pairs(model, tok, tokens, ["addition", "brackets", "identity"], seed=1, **kw)
    c = P.make_pairs(model, tok, tokens, ["addition", "brackets", "identity"], seed=2, **kw)
    assert a[0] == b[0] and a[1] == b[1]
    texts = lambda res: [u["completion"][0]["content"] for u in res[1]]
    assert texts(a) != texts(c)
    st = a[2]
    assert all(st[t]["samples"] == st[t]["prompts"] * 3 == 12 for t in st)
    assert all(st[t]["distinct"] == sum(1 for u in a[1] if u["meta"]["task"] == t) for t in st)
    assert model.training  # the caller's mode is restored
    model.eval()


@pytest.mark.parametrize("kw,match", [
    (dict(n=0), "n=0"), (dict(k=0), "k=0"), (dict(temperature=0), "temperature"), (dict(top_k=0), "top_k"),
    (dict(max_pairs_per_prompt=0), "max_pairs_per_prompt"), (dict(tasks=["addtion"]), "did you mean 'addition'"),
    (dict(tasks=[]), "tasks"), (dict(max_new_tokens=CTX), "context"),
])
def test_bad_arguments(kw, match, model, tok, tokens):
    kw = {"tasks": ["addition"], **kw}
    with pytest.raises(ValueError, match=match):
        P.make_pairs(model, tok, tokens, kw.pop("tasks"), **kw)


def test_cli(model, tok, tmp_path, capsys):
    d = tmp_path / "m"
    save(model, d, tokenizer=tok)
    ap = argparse.ArgumentParser()
    P.add_pairs_parser(ap.add_subparsers())
    out, un = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    a = ap.parse_args(["pairs", "--model", str(d), "--tasks", "brackets,letter_count", "--n", "3", "--k", "2",
                       "--max-new-tokens", "6", "--out", str(out), "--unpaired-out", str(un), "--quiet"])
    assert a.fn(a) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["n_pairs"] == len(out.read_text().splitlines())
    assert line["n_unpaired"] == len(un.read_text().splitlines()) > 0
    assert set(line["stats"]) == {"brackets", "letter_count"}
    from lmforge._config import UsageError

    a = ap.parse_args(["pairs", "--model", str(d), "--split", "private", "--out", str(tmp_path / "x.jsonl")])
    with pytest.raises(UsageError, match="dev split only"):
        a.fn(a)
    assert not (tmp_path / "x.jsonl").exists()
