"""Built-in evaluation tasks: seeded, verifiable documents; disjoint splits; the private seed; corpus
tasks drawn from a data directory's test documents only; the YAML definitions shipped with them."""
import json
import os
import random
import re
import stat
import threading
from pathlib import Path

import pytest
import yaml

from lmforge.evaluate import builtin as B
from lmforge.evaluate.builtin import corpus as C
from lmforge.evaluate.builtin import splits as S

SYNTHETIC = [n for n in B.GENERATORS if n not in B.CORPUS]
# corpus documents of these lengths: a few hundred items per split
N_SPEECHES = 700
PREFIX = {"train": "zo", "val": "zu", "test": ("qa", "qe", "qi")}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A fresh LMFORGE_HOME per test: the private seed is made there."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---- a tiny data directory: three test plays, one train and one val play, each with its own words ----

def _play(rng: random.Random, prefix: str, n_speeches: int) -> str:
    """A play in the corpus's layout whose every word starts with ``prefix`` (so a word tells which
    document it came from): scenes of speeches "NAME.\\nline\\nline", stage directions, a title."""
    vocab = [prefix + "".join(rng.choice("bcdfghklmnprstvw") + rng.choice("aeiou") for _ in range(rng.randint(1, 3)))
             for _ in range(400)]
    vocab = sorted(set(vocab))
    weights = [1 / (i + 1) for i in range(len(vocab))]  # Zipf: frequencies vary, as a play's do
    cast = sorted({(prefix + "".join(rng.choice("bcdfghklmnprst") + rng.choice("aeiou") for _ in range(3))).upper()
                   for _ in range(8)})
    seen_lines = set()

    def line():
        while True:
            words = rng.choices(vocab, weights, k=rng.randint(4, 9))
            s = " ".join(words)
            s = s[0].upper() + s[1:] + rng.choice([",", ".", ";", "", "?"])
            if s not in seen_lines:  # every line unique: a line tells where it came from
                seen_lines.add(s)
                return s

    out = [f"THE TRAGEDY OF {prefix.upper()}\n\nby Nobody\n\n\nACT I.\n\nSCENE I. A place.\n\n[Enter all.]\n"]
    for i in range(n_speeches):
        if i and i % 150 == 0:
            out.append(f"\nSCENE {i // 150 + 1}. Another place.\n")
        if i % 37 == 5:
            out.append("[Exit someone.]\n")
        who = rng.choice(cast)
        out.append(f"{who}.\n" + "\n".join(line() for _ in range(rng.randint(1, 4))) + "\n")
    return "\n".join(out)


@pytest.fixture(scope="module")
def plays():
    rng = random.Random(7)
    docs = {}
    for p in PREFIX["test"]:
        docs[f"test_{p}"] = _play(rng, p, N_SPEECHES)
    docs["train_zo"] = _play(rng, "zo", 200)
    docs["val_zu"] = _play(rng, "zu", 120)
    return docs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, plays):
    from lmforge import tokenize
    from lmforge.data import prepare as P

    d = tmp_path_factory.mktemp("evaldata")
    with open(d / "plays.jsonl", "w") as f:
        for doc_id, text in plays.items():
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    tok = tokenize.train("bpe", [t for t in plays.values()][:1], 300, special_tokens=["<|bos|>"],
                         show_progress=False)
    (d / "tok").mkdir()
    tok.save(d / "tok" / "tokenizer.lmforge.json")
    cfg = P.make_config([str(d / "plays.jsonl")], None, None)
    P.apply_overrides(cfg, {"shards.test_docs": [k for k in plays if k.startswith("test_")],
                            "shards.val_docs": ["val_zu"], "shards.shard_tokens": 50000, "workers": 1,
                            "filters.gopher_quality": False, "pii": False, "decontam.heldout": "off"})
    out = d / "data"
    m = P.prepare(cfg, d / "tok", out, quiet=True)
    assert m["splits"]["test"]["documents"] == 3 and m["splits"]["train"]["documents"] == 1
    return out


def _all_words(doc: dict) -> set[str]:
    text = " ".join(v if isinstance(v, str) else " ".join(map(str, v)) for k, v in doc.items()
                    if k in ("passage", "context", "choices", "names", "words", "lines", "line"))
    return {w.lower() for w in re.findall(r"[A-Za-z]+", text)}


def _content_lines(text: str) -> list[str]:
    """The lines of speeches in a play's text (no names, titles or directions), in order."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        ls = [l for l in block.split("\n") if l.strip()]
        if ls and re.fullmatch(r"[A-Z]+\.", ls[0]):
            out += [l for l in ls[1:] if not l.startswith("[")]
    return out


def _is_sublist(small: list, big: list) -> bool:
    return any(big[i:i + len(small)] == small for i in range(len(big) - len(small) + 1))


# ---- corpus tasks: test documents only, answers true to the text ----

def test_corpus_reads_only_the_test_split(data_dir, monkeypatch, plays):
    from lmforge.data import loader

    opened = []
    real = loader.TokenStream.__init__

    def spy(self, path, split="train"):
        opened.append(split)
        real(self, path, split)

    monkeypatch.setattr(loader.TokenStream, "__init__", spy)
    C._load_cached.cache_clear()
    docs = dict(C.read_test_documents(data_dir))
    assert opened == ["test"]
    assert set(docs) == {k for k in plays if k.startswith("test_")}
    for k, text in docs.items():  # decoded exactly (the cleaner may only have touched whitespace)
        assert _content_lines(text) == _content_lines(plays[k])
    stats = C.corpus_stats(data_dir)
    assert stats["plays"] == 3 and stats["skipped_documents"] == []
    assert sum(stats["stretches"].values()) == len(C.load_corpus(data_dir).stretches)


@pytest.mark.parametrize("name", B.CORPUS)
def test_corpus_items_come_from_test_documents(name, data_dir, plays):
    test_words = {w.lower() for k, t in plays.items() if k.startswith("test_") for w in re.findall(r"[A-Za-z]+", t)}
    other_lines = {l for k, t in plays.items() if not k.startswith("test_") for l in _content_lines(t)}
    lines_of = {k: _content_lines(t) for k, t in plays.items() if k.startswith("test_")}
    for split in S.SPLITS:
        docs = B.generate(name, split, n=60, data_dir=data_dir)
        assert len(docs) == 60
        for d in docs:
            words = _all_words(d)
            assert words <= test_words, words - test_words
            assert not any(w.startswith(("zo", "zu")) for w in words)
            assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4 and 0 <= d["gold"] < 4
            play = lines_of[d["play"]]
            if name == "next_line":
                shown = [l for l in d["passage"].split("\n") if l and not re.fullmatch(r"[A-Z]+\.", l)]
                assert _is_sublist(shown + [d["lines"][d["gold"]]], play)  # the true next line
                for c, l in zip(d["choices"], d["lines"]):
                    assert l in play and l not in other_lines
                    assert d["context"] + c == d["passage"] + "\n" + l
            elif name == "speaker":
                text = re.sub(r"\[[^\]\n]*\]\n\n", "", plays[d["play"]])  # without the stage directions
                last = d["passage"].split("\n")[-1]
                truth = f"{d['names'][d['gold']]}.\n{d['line']}"
                assert f"{last}\n\n{truth}\n" in text  # the next speech, under its true speaker
                for c, nm in zip(d["choices"], d["names"]):
                    assert f"\n{nm}.\n" in text
                    assert d["context"] + c == f"{d['passage']}\n\n{nm}.\n{d['line']}"
                assert len(set(d["names"])) == 4
            else:
                head, partial = d["context"].rsplit("\n", 1)
                full = partial + d["choices"][d["gold"]]
                assert full in play and full not in other_lines
                assert d["choices"][d["gold"]].startswith(d["words"][d["gold"]])
                rest = {c[len(w):] for c, w in zip(d["choices"], d["words"])}
                assert len(rest) == 1  # only the word differs


@pytest.mark.parametrize("name", B.CORPUS)
def test_corpus_splits_disjoint(name, data_dir):
    keys, lines = {}, {}
    for split in S.SPLITS:
        docs = B.GENERATORS[name](split, None, S.rng(name, split), data_dir=data_dir)  # every item of the split
        assert len(docs) >= 200, (split, len(docs))
        keys[split] = {d["context"] + "\x00" + d["choices"][d["gold"]] for d in docs}
        assert len(keys[split]) == len(docs)
        if name == "next_line":  # every line shown, passage or choice
            lines[split] = {l for d in docs for l in d["passage"].split("\n") + d["lines"]} - {""}
            lines[split] = {l for l in lines[split] if not re.fullmatch(r"[A-Z]+\.", l)}
    for a, b in (("train", "dev"), ("train", "private"), ("dev", "private")):
        assert not keys[a] & keys[b]
        if name == "next_line":  # nor do they share a line: distractors come from the split's own stretches
            assert not lines[a] & lines[b]


@pytest.mark.parametrize("name", B.CORPUS)
def test_corpus_requests_split_on_a_token_boundary(name, data_dir):
    """lm-eval scores context + continuation as tokens(context) + tokens(whole)[len(tokens(context)):];
    where BPE joins the two sides that drops or garbles text. The tasks cut after a letter: with the
    data's tokenizer (cl100k's pre-tokenizer) the context's tokens are a prefix of the whole's."""
    from lmforge.tokenize import load

    tok = load(data_dir / "tokenizer")
    for d in B.generate(name, "dev", n=80, data_dir=data_dir):
        for c in d["choices"]:
            ctx, cont = d["context"], c
            k = len(ctx) - len(ctx.rstrip())  # lm-eval moves trailing whitespace to the continuation
            if k:
                ctx, cont = ctx[:-k], ctx[-k:] + cont
            a, w = tok.encode(ctx, disallowed_special=()), tok.encode(ctx + cont, disallowed_special=())
            assert w[:len(a)] == a, (ctx[-30:], cont[:30])


def test_corpus_needs_a_data_dir(tmp_path):
    with pytest.raises(ValueError, match="needs data_dir"):
        B.generate("next_line", "dev")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        B.generate("speaker", "dev", data_dir=tmp_path / "nope")


def test_corpus_too_few_items_is_a_clear_error(data_dir):
    with pytest.raises(ValueError, match=r"speaker: .* fewer than n=100000"):
        B.generate("speaker", "dev", n=100000, data_dir=data_dir)


def test_parse_play_layouts():
    text = ("ACT I.\n\nSCENE I. Rome.\n\n[Enter Brutus.]\n\nBRUTUS.\nFirst line,\n[Aside.]\nsecond line.\n\n"
            "SIR TOBY. [Drinking.]\nA cup.\n\nRomeo.\nIs the day so young?\n\nSCENE II. Elsewhere.\n\n"
            "CASSIUS.\nHere.\n\n[Exeunt.]\n\n   Eno. Folio layout is not read\n")
    scenes = C.parse_play(text)
    assert [[(s.speaker, s.lines) for s in sc] for sc in scenes] == [
        [("BRUTUS", ["First line,", "second line."]), ("SIR TOBY", ["A cup."]), ("Romeo", ["Is the day so young?"])],
        [("CASSIUS", ["Here."])]]


# ---- synthetic tasks: answers recomputed here ----

def _stack_balanced(s: str) -> bool:
    pairs, stack = {")": "(", "]": "[", "}": "{"}, []
    for c in s:
        if c in "([{":
            stack.append(c)
        elif not stack or stack[-1] != pairs[c]:
            return False
        else:
            stack.pop()
    return not stack


def _check_answer(name: str, d: dict) -> None:
    if name == "addition":
        assert d["answer"] == int(str(d["a"])) + int(str(d["b"])) and len(str(d["a"])) == 3
    elif name == "subtraction":
        assert d["answer"] == d["a"] - d["b"] >= 0
    elif name == "letter_count":
        assert d["answer"] == sum(1 for ch in d["word"] if ch == d["letter"])
    elif name == "reverse":
        assert d["answer"] == "".join(d["word"][i] for i in range(len(d["word"]) - 1, -1, -1)) != ""
    elif name == "sort":
        items, ans = d["items"].split(), d["answer"].split()
        assert sorted(items) == sorted(ans) and all(a <= b for a, b in zip(ans, ans[1:]))
    elif name == "brackets":
        s = d["brackets"].replace(" ", "")
        assert d["brackets"] == " ".join(s) and len(s) % 2 == 0
        assert d["answer"] == ("yes" if _stack_balanced(s) else "no") and d["gold"] == ["yes", "no"].index(d["answer"])
    elif name == "python":
        program = d["prompt"] + d["canonical_solution"] + "\n" + d["test"]
        exec(compile(program, "<reference>", "exec"), {})  # the reference passes its own tests
        assert d["test"].count("assert ") >= 4
        for wrong in ("    return None\n", "    return 0\n", "    return []\n", "    return ''\n"):
            with pytest.raises(Exception):  # and a constant does not
                exec(compile(d["prompt"] + wrong + "\n" + d["test"], "<wrong>", "exec"), {})
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_answers_verified(name):
    for split in S.SPLITS:
        for d in B.generate(name, split):
            _check_answer(name, d)


def test_sort_numbers_and_other_arguments():
    for d in B.generate("sort", "dev", n=50, kind="numbers", max_value=50):
        nums = [int(x) for x in d["items"].split()]
        assert [int(x) for x in d["answer"].split()] == sorted(nums) and max(nums) <= 50
    for d in B.generate("addition", "dev", n=50, digits=5):
        assert d["answer"] == d["a"] + d["b"] and len(str(d["a"])) == 5 == len(str(d["b"]))
    neg = B.generate("subtraction", "dev", n=200, negative=True)
    assert any(d["answer"] < 0 for d in neg) and all(d["answer"] == d["a"] - d["b"] for d in neg)
    assert {d["answer"] for d in B.generate("letter_count", "dev")} == {0, 1, 2}
    bal = [d["answer"] for d in B.generate("brackets", "dev", n=400)]
    assert 0.4 < bal.count("yes") / len(bal) < 0.6


def test_python_families_all_appear_and_run():
    docs = B.generate("python", "dev", n=150)
    from lmforge.evaluate.builtin.programs import FAMILIES

    assert {d["family"] for d in docs} == {f.__name__.lstrip("_") for f in FAMILIES}
    for d in docs:
        assert d["prompt"].startswith(f"def {d['entry_point']}(") and d["prompt"].endswith('"""\n')
        _check_answer("python", d)


# ---- determinism, disjoint splits, the private seed ----

@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_deterministic_and_disjoint(name):
    n0 = B.default_n(name)
    for n in (n0, 2 * n0):
        got = {sp: B.generate(name, sp, n=n) for sp in S.SPLITS}
        for sp, docs in got.items():
            assert len(docs) == n
            assert B.generate(name, sp, n=n) == docs  # same split, same items
            assert B.generate(name, sp, n=n // 2) == docs[:n // 2]  # a smaller n is a prefix
        keyf = (lambda d: (d["prompt"].split("\n")[0], d["prompt"].split('"""')[1].split("\n")[0])) \
            if name == "python" else (lambda d: json.dumps({k: v for k, v in d.items() if k != "answer"}, sort_keys=True))
        keys = {sp: [keyf(d) for d in docs] for sp, docs in got.items()}
        for sp, ks in keys.items():
            assert len(set(ks)) == len(ks), f"{name} {sp}: repeated items"
        for a, b in (("train", "dev"), ("train", "private"), ("dev", "private")):
            assert not set(keys[a]) & set(keys[b]), f"{name}: {a} and {b} share items"


def test_default_arguments_explicit_or_not_give_the_same_items():
    assert B.generate("addition", "dev", n=20) == B.generate("addition", "dev", n=20, digits=3)
    assert B.generate("addition", "dev", n=20) != B.generate("addition", "dev", n=20, digits=4)


def test_private_seed_made_once_mode_0600_and_reused(home):
    path = home / "eval" / "private_seed"
    assert not path.exists()
    first = B.generate("addition", "private", n=30)
    assert path.exists()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    seed = path.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", seed)
    mtime = path.stat().st_mtime_ns
    assert B.generate("addition", "private", n=30) == first
    assert path.stat().st_mtime_ns == mtime and path.read_text().strip() == seed
    assert [p.name for p in path.parent.iterdir()] == ["private_seed"]  # no temporary file left behind
    dev = B.generate("addition", "dev", n=30)
    assert dev != first
    # another machine (another seed): other private items, the same dev items
    path.write_text("ab" * 32 + "\n")
    assert B.generate("addition", "private", n=30) != first
    assert B.generate("addition", "dev", n=30) == dev


def test_private_seed_not_in_documents_only_a_fingerprint(home, data_dir):
    fp = B.fingerprint("private")
    seed = (home / "eval" / "private_seed").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{12}", fp) and fp not in seed and B.fingerprint("private") == fp
    assert B.fingerprint("dev") == S.PUBLIC_SEEDS["dev"]
    blob = json.dumps([B.generate(n, "private", n=20, data_dir=data_dir) for n in B.GENERATORS])
    for piece in (seed[i:i + 12] for i in range(0, 64, 4)):
        assert piece not in blob
    (home / "eval" / "private_seed").write_text("cd" * 32 + "\n")
    assert B.fingerprint("private") != fp


def test_private_seed_race_gives_one_seed(home):
    got = []
    threads = [threading.Thread(target=lambda: got.append(S.private_seed())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len(set(got)) == 1
    assert (home / "eval" / "private_seed").read_text().strip() == got[0]


def test_seed_file_readable_by_others_is_tightened(home):
    seed = S.private_seed()
    p = home / "eval" / "private_seed"
    p.chmod(0o644)
    assert S.private_seed() == seed and stat.S_IMODE(p.stat().st_mode) == 0o600


def test_damaged_seed_file_is_a_clear_error(home):
    p = home / "eval" / "private_seed"
    p.parent.mkdir(parents=True)
    p.write_text("not a seed\n")
    with pytest.raises(ValueError, match=r"private_seed: not a private seed"):
        B.generate("addition", "private", n=3)
    assert p.read_text() == "not a seed\n"  # left as it was


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown built-in generator 'nope'"):
        B.generate("nope", "dev")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        B.generate("addition", "test")
    with pytest.raises(ValueError, match="unknown argument.*'digitz'.*takes digits"):
        B.generate("addition", "dev", digitz=3)
    with pytest.raises(ValueError, match=r"digits=0: expected an integer in \[1, 18\]"):
        B.generate("addition", "dev", digits=0)
    with pytest.raises(ValueError, match="kind='letters'"):
        B.generate("sort", "dev", kind="letters")
    with pytest.raises(ValueError, match=r"reverse .*has \d+ items, fewer than n=100000"):
        B.generate("reverse", "dev", n=100000)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        B.generate("addition", "dev", n=-1)


def test_split_shares():
    counts = {sp: 0 for sp in S.SPLITS}
    for i in range(20000):
        counts[S.bucket("t", str(i))] += 1
    assert abs(counts["train"] / 20000 - 0.5) < 0.02 and abs(counts["dev"] / 20000 - 0.25) < 0.02


# ---- the YAML definitions ----

METRICS = {"acc", "acc_norm", "acc_bytes", "exact_match", "perplexity", "bits_per_byte", "word_perplexity",
           "byte_perplexity"}


def test_yaml_definitions(data_dir):
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    assert set(B.DEFAULT_TASKS) <= set(B.names())
    assert {yaml.safe_load(B.task_path(n).read_text())["generator"] for n in B.names()} == set(B.GENERATORS)
    for name in B.names():
        path = B.task_path(name)
        d = yaml.safe_load(path.read_text())
        assert d["task"] == name == path.stem
        assert d["generator"] in B.GENERATORS
        assert d["output_type"] in ("multiple_choice", "generate_until", "loglikelihood_rolling")
        assert (d["test_split"], d["validation_split"], d["fewshot_split"]) == ("private", "dev", "train")
        metrics = [m["metric"] for m in d["metric_list"]]
        assert all(m in METRICS or re.fullmatch(r"pass@\d+", m) for m in metrics)
        assert d["primary_metric"] in metrics and 0 <= d["random_baseline"] < 1
        docs = B.generate(d["generator"], "dev", n=5, data_dir=data_dir, **d.get("generator_kwargs", {}))
        for doc in docs:  # every template renders from the document's fields alone
            prompt = env.from_string(d["doc_to_text"]).render(**doc)
            assert prompt and "{{" not in prompt
            if d["output_type"] == "multiple_choice":
                choices = d["doc_to_choice"] if isinstance(d["doc_to_choice"], list) else doc[d["doc_to_choice"]]
                assert len(choices) >= 2 and 0 <= doc[d["doc_to_target"]] < len(choices)
                assert d["random_baseline"] == pytest.approx(1 / len(choices), abs=1e-3)
            else:
                target = env.from_string(d["doc_to_target"]).render(**doc)
                assert target.strip()
                if "filter_list" in d:  # the filter keeps the true answer whole
                    pat = d["filter_list"][0]["filter"][0]["regex_pattern"]
                    assert re.findall(pat, " " + target)[0].strip() == target
            if any(m.startswith("pass@") for m in metrics):
                k = max(int(m[5:]) for m in metrics if m.startswith("pass@"))
                assert d["repeats"] >= k and d["code"]["test_field"] in doc and d["code"]["entry_point_field"] in doc


def test_every_builtin_task_loads_and_builds_requests(data_dir):
    """Through the task loader (``evaluate.task``): each shipped task by name, its requests for the
    dev split, few-shot examples from train (never the document itself), corpus tasks given the data."""
    from lmforge.evaluate.task import load_tasks

    tasks = load_tasks(B.names())
    assert [t.name for t in tasks] == B.names()
    for t in tasks:
        drs = t.requests("dev", limit=4, data_dir=data_dir)
        assert len(drs) == 4
        for dr in drs:
            kinds = {r.kind for r in dr.requests}
            if t.output_type == "multiple_choice":
                assert kinds == {"loglikelihood"} and len(dr.requests) == len(dr.choices) >= 2
                ctx = dr.requests[0].args[0]
                assert all(r.args[0] == ctx for r in dr.requests)
            else:
                assert kinds == {"generate_until"} and len(dr.requests) == t.config.get("repeats", 1)
                ctx, gen = dr.requests[0].args
                assert gen["until"] and gen["max_gen_toks"] > 0
                if t.num_fewshot:  # k worked examples from the train split, then the question
                    assert ctx.count("\nA: ") == t.num_fewshot and ctx.endswith("A:")


def test_corpus_tasks_bootstrap_by_stretch_of_a_play(data_dir):
    """Items of one stretch are correlated: the corpus tasks resample stretches, named by play AND
    scene.k (a scene.k alone recurs in every play, and would merge stretches of different plays)."""
    from lmforge.evaluate.task import load_tasks

    for t in load_tasks(list(B.CORPUS)):
        assert t.bootstrap_unit == ("play", "stretch")
        docs = t.docs("dev", data_dir)
        units = {t.unit(d) for d in docs}
        assert 1 < len(units) < len(docs)  # several items per stretch, several stretches
        assert len({d["stretch"] for d in docs}) < len(units)  # the play is needed to tell them apart
    for t in load_tasks([n for n in B.names() if B.GENERATORS[yaml.safe_load(B.task_path(n).read_text())["generator"]]
                         not in [B.GENERATORS[c] for c in B.CORPUS]]):
        assert t.bootstrap_unit is None  # synthetic items are drawn independently


@pytest.mark.parametrize("name,classes", [("brackets", 2), ("letter_count", 3)])
def test_answer_classes_are_balanced_in_every_split(name, classes):
    # a model that always gives one answer must score the baseline on dev and on private alike: an
    # independent draw per document left brackets' splits at 44% and 63% balanced (a false 0.19 gap)
    from collections import Counter

    for split in ("train", "dev", "private"):
        for n in (30, 100):
            counts = Counter(str(d["answer"]) for d in B.generate(name, split, n=n))
            assert len(counts) == classes and max(counts.values()) - min(counts.values()) <= 1, (split, n, counts)
