"""evaluate.contamination: planted overlaps are found (through case, punctuation and spacing), unrelated text is
clean, the normalization and n-grams are lm-eval's janitor's, and an index built from prepared shards equals one
built from the training documents' text."""
import io
import json
import random
import string
import contextlib

import numpy as np
import pytest

from lmforge.evaluate import contamination as C


@pytest.fixture(scope="module")
def plays(corpus_files):
    """Passages of different plays (one edition each): training text and unrelated text."""
    seen, out = set(), []
    for p in corpus_files:
        key = p.name.replace("_gut_f", "").replace("_gut", "")
        if p.name.endswith("_f.txt") or key in seen:
            continue
        seen.add(key)
        t = p.read_text(encoding="utf-8")
        out.append(t[len(t) // 3: len(t) // 3 + 6000])
    return out


@pytest.fixture(scope="module")
def janitor():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        mod = pytest.importorskip("lm_eval.decontamination.janitor")  # warns that its C++ helper is missing
    return mod


def _slice(text: str, start: int, k: int) -> str:
    return " ".join(text.split()[start:start + k])


def _perturb(s: str, rng: random.Random) -> str:
    """Same words, other case, punctuation next to them and other whitespace."""
    out = []
    for w in s.split():
        w = w.upper() if rng.random() < 0.3 else w.capitalize() if rng.random() < 0.3 else w
        if rng.random() < 0.3:
            w = rng.choice(['"', "(", "'"]) + w
        if rng.random() < 0.3:
            w = w + rng.choice([",", "!", "?", ";", "...", ")"])
        out.append(w)
    return "".join(w + rng.choice([" ", "\n", "\t ", "  "]) for w in out)


def test_planted_overlaps_are_dirty_and_unrelated_text_is_clean(plays):
    train, held = plays[:8], plays[8:12]
    idx = C.NgramIndex.from_texts(train)
    assert idx.n == 13 and idx.documents == 8 and len(idx) > 0
    rng = random.Random(0)
    copied = "Question: " + _slice(train[3], 200, 13) + " -- which play?"  # exactly 13 words from training
    disguised = _perturb(_slice(train[5], 400, 30), rng)
    unrelated = [_slice(h, 100, 60) for h in held]
    twelve = _slice(train[1], 50, 12)
    assert idx.dirty([copied, disguised, *unrelated, twelve]) == [True, True] + [False] * len(held) + [False]
    assert idx.status(twelve) == "short"
    # an n-gram does not span two training documents
    across = " ".join(train[0].split()[-6:] + train[1].split()[:7])
    assert C.NgramIndex.from_texts(train[:2]).dirty([across]) == [False]
    assert C.NgramIndex.from_texts([train[0] + " " + train[1]]).dirty([across]) == [True]


def test_check_counts_per_task(plays):
    idx = C.NgramIndex.from_texts(plays[:6])
    docs = {"leaky": [_slice(plays[8], 0, 40), _slice(plays[2], 10, 40), "Yes", _slice(plays[4], 300, 20).upper()],
            "clean": [_slice(plays[9], 0, 40), _slice(plays[10], 0, 40)], "empty": []}
    r = C.check(idx, docs)
    assert r["leaky"] == {"clean": 2, "dirty": 2, "dirty_ids": [1, 3], "short": 1}
    assert r["clean"] == {"clean": 2, "dirty": 0, "dirty_ids": [], "short": 0}
    assert r["empty"] == {"clean": 0, "dirty": 0, "dirty_ids": [], "short": 0}


def test_short_texts_checked_whole_when_asked(plays):
    idx = C.NgramIndex.from_texts(plays[:4], short_min_words=8)
    ten = _slice(plays[2], 77, 10)
    assert idx.status(ten.upper() + "!") == "dirty"
    assert idx.status(_slice(plays[9], 77, 10)) == "clean"
    assert idx.status("to be") == "short"  # under short_min_words: not checked
    assert idx.dirty([_slice(plays[1], 5, 20)]) == [True]  # long texts as before
    with pytest.raises(ValueError, match="short_min_words"):
        C.NgramIndex(13, short_min_words=14)


SAMPLES = ["   ,, I'm a very !dirty,, ,,  dirty boy. Clean me daddy. \n\nhe he he hehe heh.  lastword  " * 2,
           "KING HENRY: Once more unto the breach, dear friends, once more; Or close the wall up with our English dead!",
           "Ünïcödé “curly quotes” — and em-dashes… stay; ÀÉÎ are not lowered\tbut ASCII is: ABC def",
           "a\u00a0b\u2003c d e f g h i j k l m n o p q r s t u v w x y z 1 2 3 4 5 6 7 8 9 0 ~ ` {} []",
           "", "!!! ??? ...", "one two three"]


def test_normalization_and_ngrams_match_lm_eval(janitor):
    jan = janitor.Janitor()
    for s in SAMPLES:
        assert C.normalize(s) == jan.normalize_string(s), s
        for n in (1, 3, 13):
            assert C.ngrams(s, n) == list(janitor.word_ngrams(jan.normalize_string(s), n)), (s, n)


def test_dirty_agrees_with_lm_eval_janitor(janitor, plays):
    """lm-eval's own recipe as reference: register the training text's n-grams with the janitor, and call a
    task document dirty when one of its normalized n-grams is among them."""
    train = plays[:6]
    with contextlib.redirect_stdout(io.StringIO()):
        jan = janitor.Janitor(ngram_n=13)
        for t in train:
            jan.register_contaminant_python(t)
    rng = random.Random(1)
    docs = []
    for _ in range(120):
        src = rng.choice(plays[:8])  # mostly training text, some not
        piece = _slice(src, rng.randrange(0, 600), rng.randrange(5, 40))
        if rng.random() < 0.5:
            piece = _perturb(piece, rng)
        if rng.random() < 0.3:  # break one word: may turn a dirty text clean
            ws = piece.split()
            if ws:
                ws[rng.randrange(len(ws))] = "zzyzx"
            piece = " ".join(ws)
        docs.append(piece)
    ref = [any(g in jan.dirt_ngrams for g in janitor.word_ngrams(jan.normalize_string(d), 13)) for d in docs]
    assert 20 < sum(ref) < 100  # both kinds present: the comparison can fail
    assert C.NgramIndex.from_texts(train).dirty(docs) == ref


def test_bad_input_is_a_clear_error(plays):
    with pytest.raises(ValueError, match="n-gram size"):
        C.NgramIndex.from_texts(plays[:1], n=0)
    with pytest.raises(TypeError, match=r"texts\[1\]: expected a str, got int"):
        C.NgramIndex.from_texts(["a b c", 3])
    with pytest.raises(TypeError, match="single str"):
        C.NgramIndex.from_texts("a whole text, not a list")
    idx = C.NgramIndex.from_texts(plays[:1])
    with pytest.raises(TypeError, match=r"task_docs\['t'\]\[0\]"):
        C.check(idx, {"t": [None]})
    with pytest.raises(TypeError, match="dict of task name"):
        C.check(idx, [["a"]])
    assert C.NgramIndex.from_texts([]).dirty([_slice(plays[0], 0, 20)]) == [False]


# ---- from prepared shards ----

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, plays):
    from lmforge import tokenize
    from lmforge.data import prepare as P

    d = tmp_path_factory.mktemp("contam")
    docs = [{"id": f"play{i}", "text": t} for i, t in enumerate(plays[:10])]
    files = []
    for i, t in enumerate(plays[:3]):
        (d / f"tok{i}.txt").write_text(t, encoding="utf-8")
        files.append(str(d / f"tok{i}.txt"))
    tok = tokenize.train("bpe", files, 300, special_tokens=["<|endoftext|>", "<|bos|>"], show_progress=False)
    (d / "tok").mkdir()
    tok.save(d / "tok" / "tokenizer.lmforge.json")
    (d / "in").mkdir()
    with open(d / "in" / "docs.jsonl", "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    cfg = P.make_config([str(d / "in")], None, [
        "shards.shard_tokens=2048", "workers=1", "shards.val_docs=[\"play8\"]", "shards.test_docs=[\"play9\"]",
        "filters.gopher_quality=false", "filters.gopher_repetition=false", "filters.c4=false", "pii=false"])
    P.prepare(cfg, d / "tok", d / "out", quiet=True)
    return d / "out", docs


def test_from_shards_equals_the_training_texts(prepared):
    out, docs = prepared
    from lmforge.data.loader import TokenStream

    ids = []
    for sh in TokenStream(out, "train").manifest["splits"]["train"]["shards"]:
        ids += json.loads((out / sh["index"]).read_text())["ids"]
    assert sorted(ids) == [f"play{i}" for i in range(8)]  # the shards' documents, each once
    idx = C.NgramIndex.from_shards(out)
    assert idx.documents == 8 and idx.source == {"data_dir": str(out), "split": "train"}
    ref = C.NgramIndex.from_texts([d["text"] for d in docs[:8]])
    assert np.array_equal(idx.hashes, ref.hashes)  # decoded, doc token dropped, no n-gram across documents
    r = C.check(idx, {"t": [_slice(docs[2]["text"], 500, 25), _slice(docs[8]["text"], 500, 25),
                            _slice(docs[9]["text"], 500, 25)]})["t"]
    assert r["dirty_ids"] == [0]  # training text dirty; the held-out val and test documents clean
    test_idx = C.NgramIndex.from_shards(out, split="test")
    assert test_idx.documents == 1 and test_idx.dirty([_slice(docs[9]["text"], 500, 25)]) == [True]


def test_from_shards_bad_dirs(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(FileNotFoundError, match="no such directory"):
        C.NgramIndex.from_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        C.NgramIndex.from_shards(tmp_path)
    with pytest.raises(ValueError, match="no split 'dev'"):
        C.NgramIndex.from_shards(out, split="dev")
