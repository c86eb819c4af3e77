"""align.generators: every answer checked by an independent computation, the evaluation's own prompt among
the phrasings, replies the task's metric accepts, no item shared with the evaluation's dev or private
splits (n=2000 per task; a planted coincidence is caught), corpus items from train documents only, seeded."""
import json
import random
import re

import jinja2
import pytest
import yaml

from lmforge.align import data as D
from lmforge.align import generators as G
from lmforge.evaluate import builtin as B

SYNTH = list(G.SYNTHETIC)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh LMFORGE_HOME per test: the private seed check_disjoint draws is made there."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))


def _yaml(task: str) -> dict:
    return yaml.safe_load(B.task_path(task).read_text())


def _user(c) -> str:
    return next(m["content"] for m in c["messages"] if m["role"] == "user")


def _reply(c) -> str:
    return c["messages"][-1]["content"]


def _balanced(s: str) -> bool:  # an independent bracket checker
    pairs, depth = {")": "(", "]": "[", "}": "{"}, []
    for ch in s:
        if ch in "([{":
            depth.append(ch)
        elif not depth or depth.pop() != pairs[ch]:
            return False
    return not depth


def _truth(task: str, c) -> str:
    """The answer recomputed from the question's text (and the item's fields, each found in that text; a
    few-shot prompt's question is its last block)."""
    q, doc = _user(c).split("\n\n")[-1], c["doc"]
    if task == "addition":
        a, b = map(int, re.findall(r"\d+", q))
        return str(a + b)
    if task == "subtraction":
        a, b = map(int, re.findall(r"\d+", q))
        return str(max(a, b) - min(a, b))
    if task == "letter_count":
        assert doc["word"] in q and re.search(rf"\b{doc['letter']}\b", q)
        return str(sum(ch == doc["letter"] for ch in doc["word"]))
    if task == "reverse":
        assert doc["word"] in q
        return "".join(reversed(doc["word"]))
    if task == "sort":
        assert doc["items"] in q
        items = doc["items"].split()
        key = int if all(x.isdigit() for x in items) else str
        return " ".join(sorted(items, key=key))
    if task == "brackets":
        assert doc["brackets"] in q
        return "yes" if _balanced(doc["brackets"].replace(" ", "")) else "no"
    raise AssertionError(task)


@pytest.mark.parametrize("task", SYNTH)
def test_synthetic_answers_are_true(task):
    convs = G.GENERATORS[task](400, seed=0)
    assert len(convs) == 400
    for c in convs:
        assert c["source"] == f"gen:{task}" and c["id"].startswith(f"gen:{task}:")
        assert D.check_messages(c["messages"], c["id"]) == c["messages"]
        assert _reply(c) == _truth(task, c) == str(c["answer"]), c


@pytest.mark.parametrize("task,kw", [(t, {}) for t in SYNTH] + [("sort", {"kind": "numbers"})])
def test_the_evaluation_prompt_is_one_phrasing_and_the_reply_scores(task, kw):
    """Prompt 0 is the task YAML's doc_to_text rendered for the item (rendered here with jinja2 straight from
    the YAML); prompt -1 is its num_fewshot-shot prompt as lm-eval's --apply_chat_template puts it in one
    user turn (examples joined by the fewshot delimiter, each answer after the target delimiter); the
    reply is what its metric accepts (the filter's regex keeps all of it and it equals the target; multiple
    choice: the gold choice); about p_eval and p_fewshot of the prompts are the evaluation's."""
    name = "sort_numbers" if kw.get("kind") == "numbers" else task
    y = _yaml(name)
    convs = G.GENERATORS[task](600, seed=5, **kw)
    assert 0.42 < sum(c["prompt"] == 0 for c in convs) / len(convs) < 0.58  # p_eval = 0.5, binomial sd 0.02
    assert 0.06 < sum(c["prompt"] == -1 for c in convs) / len(convs) < 0.14  # p_fewshot = 0.1, sd 0.012
    assert len({c["prompt"] for c in convs}) >= 5  # several phrasings
    env = jinja2.Environment()
    text = lambda d: env.from_string(y["doc_to_text"]).render(**d)  # noqa: E731

    def target(d):
        if y["output_type"] == "multiple_choice":
            return y["doc_to_choice"][d["gold"]]
        return env.from_string(y["doc_to_target"]).render(**d)

    for c in convs:
        doc = c["doc"]
        if c["prompt"] == 0:
            assert c["messages"] == [{"role": "user", "content": text(doc)}, c["messages"][-1]]
        elif c["prompt"] == -1:
            assert len(c["shots"]) == y["num_fewshot"] and doc not in c["shots"]
            want = "".join(text(s) + y["target_delimiter"] + target(s) + y["fewshot_delimiter"] for s in c["shots"])
            assert c["messages"] == [{"role": "user", "content": want + text(doc)}, c["messages"][-1]]
        else:
            assert text(doc) not in _user(c)
        if y["output_type"] == "multiple_choice":
            assert _reply(c) == target(doc)
        else:
            regex = y["filter_list"][0]["filter"][0]["regex_pattern"]
            assert re.search(regex, _reply(c)).group(1) == _reply(c) == target(doc)
    for k, v in (y.get("generator_kwargs") or {}).items():  # the evaluation's own kwargs
        if task == "reverse":
            assert all(len(c["doc"]["word"]) >= v for c in convs)
    if task == "addition":
        assert all(100 <= c["doc"]["a"] <= 999 and 100 <= c["doc"]["b"] <= 999 for c in convs)


def test_p_eval_and_system_frac():
    convs = G.GENERATORS["addition"](200, seed=1, p_eval=1.0)
    assert all(c["prompt"] == 0 and len(c["messages"]) == 2 for c in convs)
    convs = G.GENERATORS["addition"](200, seed=1, p_eval=0.0, p_fewshot=0.0, system_frac=1.0)
    assert all(c["prompt"] > 0 and c["messages"][0]["role"] == "system" for c in convs)
    convs = G.GENERATORS["addition"](200, seed=1, p_eval=0.0, p_fewshot=1.0)
    assert all(c["prompt"] == -1 for c in convs)
    assert all(c["prompt"] == 0 for c in G.GENERATORS["addition"](3, seed=1, p_eval=0.0, p_fewshot=1.0))  # too few
    with pytest.raises(ValueError, match="p_eval=2"):
        G.GENERATORS["addition"](3, seed=1, p_eval=2)
    with pytest.raises(ValueError, match="unknown argument"):
        G.GENERATORS["addition"](3, seed=1, colour="red")


def test_seeded():
    for name in SYNTH + ["multiturn", "identity"]:
        a, b = G.GENERATORS[name](150, seed=3), G.GENERATORS[name](150, seed=3)
        assert json.dumps(a) == json.dumps(b), name
        assert json.dumps(a) != json.dumps(G.GENERATORS[name](150, seed=4)), name


@pytest.mark.parametrize("task", ["reverse", "letter_count", "brackets"])
def test_small_item_spaces_come_round(task):
    cap = G.train_capacity(task, **(_yaml(task).get("generator_kwargs") or {}))
    convs = G.GENERATORS[task](cap + 50, seed=0)
    keys = [G.content_key(task, c["doc"]) for c in convs]
    assert len(set(keys)) == cap and keys[cap:] == keys[:50]  # every distinct train item, then round again


def test_check_disjoint_is_zero_for_2000_per_task():
    convs = [c for t in SYNTH for c in G.GENERATORS[t](2000, seed=0)]
    convs += G.GENERATORS["sort"](2000, seed=0, kind="numbers") + G.GENERATORS["multiturn"](2000, seed=0)
    got = G.check_disjoint(convs, detail=True)
    assert set(got) == set(SYNTH) | {"multiturn"}
    for t, row in got.items():
        assert row["dev"] == row["private"] == row["outside_train"] == 0, (t, row)
    assert got["sort"]["checked"] == 4000 and got["addition"]["checked"] == 2000


def test_check_disjoint_catches_a_planted_item():
    """A conversation made from a dev item and one from a private item are counted (the check can fail)."""
    from lmforge.evaluate.task import load_task

    dev = load_task(B.task_path("addition"))[0].docs("dev")[0]
    shots = [c for c in G.GENERATORS["sort"](100, seed=0) if c["prompt"] == -1][:1]
    shots[0]["shots"][1] = load_task(B.task_path("sort"))[0].docs("private")[5]  # a worked example counts too
    assert G.check_disjoint(shots) == {"sort": 2}
    priv = B.generate("brackets", "private", 5, max_len=8, kinds=3)[3]
    good = G.GENERATORS["addition"](20, seed=0)
    planted = [dict(good[0], doc=dict(dev), id="planted:dev"),
               {"messages": [], "task": "brackets", "doc": dict(priv), "id": "planted:private"}]
    got = G.check_disjoint(good + planted, detail=True)
    assert got["addition"]["dev"] == 1 and got["addition"]["outside_train"] == 1
    assert got["brackets"]["private"] == 1
    assert G.check_disjoint(good + planted) == {"addition": 2, "brackets": 2}
    assert G.check_disjoint(good + planted, tasks=["brackets"]) == {"brackets": 2}


# ---- multi-turn and identity --------------------------------------------------------------------------------

def test_multiturn_answers_replayed():
    convs = G.multiturn(300, seed=2)
    kinds = {c["kind"] for c in convs}
    assert kinds == {"arithmetic", "word"}
    for c in convs:
        msgs = c["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2) and 4 <= len(msgs) <= 6
        q0 = msgs[0]["content"]
        if c["kind"] == "arithmetic":
            a, b = map(int, re.findall(r"\d+", q0))
            v = a + b
        else:
            word = c["doc"]["word"]
            assert word in q0
            v = word[::-1]
        assert msgs[1]["content"] == str(v)
        for k in range(2, len(msgs), 2):
            q = msgs[k]["content"].lower()
            if c["kind"] == "arithmetic":
                nums = [int(x) for x in re.findall(r"\d+", q)]
                if re.search(r"add|plus|more", q):
                    v = v + nums[0]
                elif re.search(r"subtract|minus|away", q):
                    v = v - nums[0]
                else:
                    assert re.search(r"double|twice|by 2", q)
                    v = 2 * v
                truth = v
            else:
                if "first letter" in q or "start with" in q:
                    truth = word[::-1][0]
                elif "how many" in q and ("appear" in q or "'s" in q):
                    ch = re.search(r'"(\w)"|how many (\w)\'s', q)
                    ch = ch.group(1) or ch.group(2)
                    truth = word.count(ch)
                else:
                    assert "letters" in q or "how long" in q
                    truth = len(word)
            assert msgs[k + 1]["content"] == str(truth), (c, k)
        assert [str(x) for x in c["answer"]] == [m["content"] for m in msgs[1::2]]


def test_identity_says_what_it_is():
    convs = G.identity(300, seed=0)
    topics = {c["topic"] for c in convs}
    assert topics == set(G.IDENTITY)
    for t in topics:
        qs = {_user(c) for c in convs if c["topic"] == t}
        assert len(qs) >= 3  # paraphrases
    for c in convs:
        a = _reply(c)
        assert a == c["answer"]
        if c["topic"] in ("who", "name", "maker"):
            assert "lmforge" in a and "Shakespeare" in a
        if c["topic"] == "browse":
            assert a.startswith("No") and ("cannot" in a or "no internet" in a)


# ---- corpus: train documents only, lines of the test documents never shown -----------------------------------

PREFIX = {"train": ("zo", "za", "zy", "zi", "ze"), "val": ("vu",), "test": ("qa", "qe", "qi")}
PLANTED = 40  # lines of the train plays copied into a test play


def _play(rng, prefix, n_speeches, borrowed=()):
    vocab = sorted({prefix + "".join(rng.choice("bcdfghklmnprstvw") + rng.choice("aeiou")
                                     for _ in range(rng.randint(1, 3))) for _ in range(300)})
    cast = sorted({(prefix + "".join(rng.choice("bcdfghklmnprst") + rng.choice("aeiou") for _ in range(3))).upper()
                   for _ in range(7)})
    seen, borrowed = set(), list(borrowed)

    def line():
        if borrowed and rng.random() < 0.3:
            return borrowed.pop()
        while True:
            s = " ".join(rng.choices(vocab, k=rng.randint(4, 9)))
            s = s[0].upper() + s[1:] + rng.choice([",", ".", ";", "?"])
            if s not in seen:
                seen.add(s)
                return s

    out = [f"THE TRAGEDY OF {prefix.upper()}\n\nby Nobody\n\n\nACT I.\n\nSCENE I. A place.\n"]
    for i in range(n_speeches):
        if i and i % 120 == 0:
            out.append(f"\nSCENE {i // 120 + 1}. Another place.\n")
        out.append(f"{rng.choice(cast)}.\n" + "\n".join(line() for _ in range(rng.randint(1, 4))) + "\n")
    return "\n".join(out)


def _speech_lines(text):
    out = []
    for block in re.split(r"\n\s*\n", text):
        ls = [l for l in block.split("\n") if l.strip()]
        if ls and re.fullmatch(r"[A-Z]+\.", ls[0]):
            out += ls[1:]
    return out


@pytest.fixture(scope="module")
def plays():
    rng = random.Random(11)
    docs = {f"train_{p}": _play(rng, p, 260) for p in PREFIX["train"]}
    train_lines = [l for t in docs.values() for l in _speech_lines(t)]
    planted = rng.sample(train_lines, PLANTED)
    docs["val_vu"] = _play(rng, "vu", 100)
    docs["test_qa"] = _play(rng, "qa", 700, borrowed=planted)
    docs["test_qe"] = _play(rng, "qe", 700)
    docs["test_qi"] = _play(rng, "qi", 700)
    assert all(l in docs["test_qa"] for l in planted)
    return docs, set(planted)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, plays):
    from lmforge import tokenize
    from lmforge.data import prepare as P

    docs, _ = plays
    d = tmp_path_factory.mktemp("sftdata")
    with open(d / "plays.jsonl", "w") as f:
        for doc_id, text in docs.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    tok = tokenize.train("bpe", [docs["train_zo"]], 300, special_tokens=["<|bos|>"], show_progress=False)
    (d / "tok").mkdir()
    tok.save(d / "tok" / "tokenizer.lmforge.json")
    cfg = P.make_config([str(d / "plays.jsonl")], None, None)
    P.apply_overrides(cfg, {"shards.test_docs": ["test_qa", "test_qe", "test_qi"], "shards.val_docs": ["val_vu"],
                            "shards.shard_tokens": 50000, "workers": 1, "filters.gopher_quality": False,
                            "pii": False, "decontam.heldout": "off"})
    m = P.prepare(cfg, d / "tok", d / "data", quiet=True)
    assert m["splits"]["test"]["documents"] == 3 and m["splits"]["train"]["documents"] == 5
    return d / "data"


def test_corpus_items_are_true_to_the_train_plays(data_dir, plays):
    docs, planted = plays
    train = {k: v for k, v in docs.items() if k.startswith("train_")}
    others = "\n".join(v for k, v in docs.items() if not k.startswith("train_"))
    lines_of = {k: set(_speech_lines(v)) for k, v in train.items()}
    sp = G.speaker(200, seed=0, data_dir=data_dir)
    qu = G.quote(200, seed=0, data_dir=data_dir)
    pl = G.play(200, seed=0, data_dir=data_dir)
    for c in sp:
        text = train[c["play"]]
        last = c["lines"][-1]
        assert f"{last}\n\n{c['answer']}." in text  # the next speech is the answer's
        assert c["answer"] in c["choices"] and len(set(c["choices"])) == 4
        assert all(ch in _user(c) for ch in c["choices"])
    for c in qu:
        assert "\n".join(c["lines"]) in train[c["play"]] and _reply(c) == c["lines"][-1] == c["answer"]
        assert "\n".join(c["lines"][:-1]) in _user(c) and c["answer"] not in _user(c)
    titles = {f"train_{p}": f"The Tragedy of {p.capitalize()}" for p in PREFIX["train"]}
    for c in pl:
        (line,) = c["lines"]
        assert [k for k, ls in lines_of.items() if line in ls] == [c["play"]]
        assert _reply(c) == c["answer"] == titles[c["play"]] and c["answer"] in c["choices"]
    assert planted <= G.train_corpus(data_dir)["test_lines"]  # the planted lines are known as test lines
    assert all(any(l in ls for ls in lines_of.values()) for l in planted)  # and are lines of the train plays
    for c in sp + qu + pl:
        shown = {l for m in c["messages"] for l in m["content"].split("\n")}
        assert not shown & planted  # no line of a test document is ever shown
        for l in c["lines"]:
            assert l not in others, l  # train documents only
        assert D.check_messages(c["messages"], c["id"]) == c["messages"]
    assert G.check_disjoint(sp + qu + pl, data_dir=data_dir) == {"speaker": 0, "quote": 0, "play": 0}


def test_corpus_check_catches_an_evaluation_line(data_dir):
    from lmforge.evaluate.task import load_task

    doc = load_task(B.task_path("next_line"))[0].docs("dev", data_dir)[0]
    line = doc["lines"][doc["gold"]]
    planted = {"messages": [{"role": "user", "content": "Continue:\nx"}, {"role": "assistant", "content": line}],
               "task": "quote", "id": "planted"}
    got = G.check_disjoint(G.quote(20, seed=0, data_dir=data_dir) + [planted], data_dir=data_dir, detail=True)
    assert got["quote"]["dev"] == 1 and got["quote"]["checked"] == 21
    assert G.check_disjoint([planted]) == {}  # without data_dir, corpus conversations are not checked


def test_corpus_generators_seeded_and_bounded(data_dir):
    for fn in (G.speaker, G.quote, G.play):
        a = fn(30, seed=1, data_dir=data_dir)
        assert json.dumps(a) == json.dumps(fn(30, seed=1, data_dir=data_dir))
        assert json.dumps(a) != json.dumps(fn(30, seed=2, data_dir=data_dir))
        with pytest.raises(ValueError, match="fewer than n=1000000"):
            fn(1_000_000, seed=1, data_dir=data_dir)
        with pytest.raises(ValueError, match="needs data_dir"):
            fn(3, seed=1)


def test_default_mixture_loads(data_dir):
    convs, st = D.load_sources(G.DEFAULT_MIXTURE, seed=0, data_dir=data_dir)
    want = {("gen:" + s["generator"]): s["n"] for s in G.DEFAULT_MIXTURE}
    assert {k: v["used"] for k, v in st.items()} == want and len(convs) == sum(want.values())
    evaluated = sum(want[f"gen:{t}"] for t in B.DEFAULT_TASKS if f"gen:{t}" in want)
    assert evaluated > len(convs) / 2  # mostly the tasks the pipeline evaluates
    assert all(v == 0 for v in G.check_disjoint(convs, data_dir=data_dir).values())
