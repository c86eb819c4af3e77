"""The data pipeline's single steps: sources and bad input, cleaning, filters, PII,
decontamination, MinHash/LSH (against exact Jaccard and planted duplicates)."""
import gzip
import json
import os
import random
import re

import numpy as np
import pytest

from lmforge.data import clean, dedup, filters, pii
from lmforge.data.sources import iter_documents


# ---- sources and bad input ------------------------------------------------------------------

def test_sources_all_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document\n")
    rows = [{"id": f"r{i}", "text": f"row {i}"} for i in range(3)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"content": f"gz {i}"}) + "\n" for i in range(2)))
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": f"zst {i}"}) + "\n" for i in range(2)).encode()))
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["pq 0", "pq 1", "pq 2"]}), tmp_path / "e.parquet")
    problems = []
    docs = list(iter_documents([tmp_path], problems))
    texts = [d.text for d in docs]
    assert texts == ["plain text document\n", "row 0", "row 1", "row 2", "zst 0", "zst 1", "pq 0", "pq 1", "pq 2"]
    assert [d.id for d in docs[1:4]] == ["r0", "r1", "r2"] and docs[-1].id == "e.parquet:3"
    # c.jsonl.gz has no "text" field: two reported, skipped items
    assert [(p.file.endswith("c.jsonl.gz"), p.line, p.kind) for p in problems] == \
        [(True, 1, "missing-field"), (True, 2, "missing-field")]
    assert [d.text for d in iter_documents([tmp_path / "c.jsonl.gz"], [], text_field="content")] == ["gz 0", "gz 1"]


def test_bad_input_is_counted_and_reported(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"line one\nline \xff two\n")
    (tmp_path / "lines.jsonl").write_bytes(b'{"text": "ok"}\nnot json\n{"other": 1}\n{"text": 5}\n\n{"text": "ok2"}\n')
    payload = "".join(json.dumps({"text": f"doc {i} " + "x" * 50}) + "\n" for i in range(2000)).encode()
    gz = gzip.compress(payload)
    (tmp_path / "trunc.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    problems = []
    docs = list(iter_documents([tmp_path], problems))
    by = {(p.file.split("/")[-1], p.kind) for p in problems}
    assert ("empty.txt", "empty") in by
    assert ("corrupt.parquet", "unreadable") in by
    assert ("trunc.jsonl.gz", "truncated") in by
    bad = [p for p in problems if p.kind == "invalid-utf8"][0]
    assert bad.line == 2 and bad.action == "repaired"
    lines = sorted((p.line, p.kind) for p in problems if p.file.endswith("lines.jsonl"))
    assert lines == [(2, "not-json"), (3, "missing-field"), (4, "wrong-type")]
    texts = [d.text for d in docs]
    # the invalid byte became one U+FFFD in its own document, and nowhere else
    assert {d.id: d.text for d in docs}["bad.txt"] == "line one\nline \ufffd two\n"
    assert [d.id for d in docs if "\ufffd" in d.text] == ["bad.txt"]
    assert "ok" in texts and "ok2" in texts
    n_trunc = sum(1 for d in docs if d.source.endswith("trunc.jsonl.gz"))
    assert 100 < n_trunc < 2000  # the documents before the damage are kept
    # skip policy drops the document instead of repairing it
    problems = []
    docs = list(iter_documents([tmp_path / "bad.txt"], problems, utf8_errors="skip"))
    assert docs == [] and problems[0].action == "skipped"


def test_ids_are_paths_relative_to_the_input(tmp_path):
    """Files with the same base name in different folders get different ids: the path under the
    directory given; a file given directly is named by itself; JSONL rows without an id by path:line."""
    for rel in ("pkg/__init__.py", "pkg/sub/__init__.py", "__init__.py"):
        (tmp_path / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / rel).write_text(f"text of {rel}\n")
    (tmp_path / "src" / "data").mkdir()
    (tmp_path / "src" / "data" / "rows.jsonl").write_text('{"text": "a"}\n{"text": "b", "id": "mine"}\n')
    ids = [d.id for d in iter_documents([tmp_path / "src"])]
    assert ids == ["__init__.py", "data/rows.jsonl:1", "mine", "pkg/__init__.py", "pkg/sub/__init__.py"]
    assert [d.id for d in iter_documents([tmp_path / "src" / "pkg" / "sub" / "__init__.py"])] == ["__init__.py"]


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents([tmp_path / "nope"]))


# ---- cleaning -------------------------------------------------------------------------------

GUTENBERG = """\ufeffThe Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost and with\r
almost no restrictions whatsoever.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Produced by a volunteer\r
\r
HAMLET\r
\r
Ber.   \r
Who's there?\r
\r
\r
\r
\r
Fran.\r
Nay, answer me: stand, and unfold yourself.\r
\r
THE END\r
\r
End of the Project Gutenberg EBook of Hamlet\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
Updated editions will replace the previous one.\r
"""


def test_clean_gutenberg_whitespace_and_unicode():
    counts = {}
    out = clean.clean_text(GUTENBERG, counts=counts)
    assert out == "HAMLET\n\nBer.\nWho's there?\n\n\nFran.\nNay, answer me: stand, and unfold yourself.\n"
    assert {"newlines", "gutenberg", "trailing_space", "end_markers", "blank_lines"} <= set(counts)
    assert clean.clean_text("cafe\u0301\x07 ok") == "caf\u00e9 ok\n"  # NFC, control character dropped
    # every step can be switched off
    off = clean.CleanConfig(nfc=False, newlines=False, control_chars=False, strip_trailing_space=False,
                            max_blank_lines=-1, gutenberg=False, end_markers=False)
    assert clean.clean_text("a \r\n\n\n\nb", off) == "a \r\n\n\n\nb\n"


def test_clean_builtin_corpus_end_markers(corpus_texts, corpus_files):
    """The built-in texts carry no Gutenberg licence (the sdist stripped it) but do end in
    'THE END' / 'FINIS. ...' lines; cleaning removes those and leaves the play."""
    counts = {}
    outs = [clean.clean_text(t, counts=counts) for t in corpus_texts]
    assert "gutenberg" not in counts
    assert counts["end_markers"] >= 10
    assert not any(re.search(r"\n(THE END|FINIS\b.*)\n\Z", o) for o in outs)
    ham = outs[[p.name for p in corpus_files].index("hamlet_gut_f.txt")]
    assert ham.rstrip().endswith("Go, bid the Souldiers shoote.\n\nExeunt. Marching: after the which, a Peale of "
                                 "Ordenance are shot\noff.".rstrip())


# ---- filters --------------------------------------------------------------------------------

PROSE = ("The quick brown fox jumps over the lazy dog and then it runs to the river with the other animals. "
         "It was a bright cold day in April, and the clocks were striking thirteen as we walked home. ")


def _prose(n_words=120, seed=0):
    words = PROSE.split()
    rng = random.Random(seed)
    return " ".join(rng.choice(words) for _ in range(n_words)) + ".\n"


@pytest.mark.parametrize("text,rule", [
    ("too few words here.", "gopher_min_words"),
    ("a b c d e f g h i j " * 10, "gopher_mean_word_length"),
    ("# " * 30 + PROSE * 2, "gopher_symbol_word_ratio"),
    ("\n".join(["- bullet item with the words"] * 40), "gopher_bullet_lines"),
    ("\n".join([f"and then the story {i} went on and on with the old man and his dog..." for i in range(40)]),
     "gopher_ellipsis_lines"),
    ("1234 5678 9012 3456 7890 " * 20 + "the and", "gopher_alpha_words"),
    ("lorem ipsum dolor sit amet consectetur " * 20, "gopher_stop_words"),
])
def test_gopher_quality_rules(text, rule):
    cfg = filters.FilterConfig()
    assert filters.gopher_quality(text, cfg)[0] == rule
    assert filters.gopher_quality(_prose(), cfg) is None


def test_gopher_repetition_rules():
    cfg = filters.FilterConfig()
    assert filters.gopher_repetition(_prose(300), cfg) is None
    para = _prose(40, 1)
    assert filters.gopher_repetition((para + "\n") * 5 + _prose(60, 2), cfg)[0].startswith("gopher_dup_para")
    lines = "\n".join(["same line here"] * 10 + [_prose(8, i).strip() for i in range(10)])
    assert filters.gopher_repetition(lines, cfg)[0] == "gopher_dup_line_frac"
    spam = _prose(100, 3) + " buy cheap pills now" * 30
    assert filters.gopher_repetition(spam, cfg)[0].startswith("gopher_top_2gram")
    # dup n-gram coverage: exact against a brute-force count
    words = "a b c d e f g a b c d e f g h i j k".split()
    wh = dedup.hash_words(words)
    lens = np.array([len(w) for w in words])
    assert filters.dup_ngram_char_frac(wh, lens, 5) == pytest.approx(14 / 18)
    assert filters.top_ngram_char_frac(wh, lens, 2) == pytest.approx(4 / 18)
    # a single threshold can be switched off
    cfg.max_dup_line_frac = None
    cfg.max_dup_line_char_frac = None
    assert not (filters.gopher_repetition(lines, cfg) or ("",))[0].startswith("gopher_dup_line")


def test_c4_line_filter():
    cfg = filters.FilterConfig(c4=True)
    page = ("Home | About | Contact\n"
            "This is a real sentence about the topic at hand.\n"
            "Please enable javascript to view this page properly.\n"
            "Another full sentence follows here, and it ends well.\n"
            "We use cookies. Read our privacy policy.\n"
            "A third sentence is here to make the count.\n"
            "The fourth sentence has a citation[1] in it.\n"
            "And a fifth sentence closes the document.\n")
    out, rule, removed = filters.c4_lines(page, cfg)
    assert rule is None and removed == 3
    assert "javascript" not in out and "Home" not in out and "[1]" not in out
    assert filters.c4_lines("function f() { return 1; }", cfg)[1] == "c4_curly_bracket"
    assert filters.c4_lines("Lorem ipsum dolor sit amet.", cfg)[1] == "c4_lorem_ipsum"
    assert filters.c4_lines("One good sentence here.\n", cfg)[1] == "c4_min_sentences"


def test_decontamination():
    evals = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
             "the slings and arrows of outrageous fortune"]
    dc = filters.Decontaminator(evals, n=13)
    leaked = "He said: to be or NOT to be -- that is the question, whether tis nobler in the mind. And more."
    assert dc.overlap(leaked) >= 1
    assert dc.overlap("To be, or not to be, that is the question: and then something else entirely.") == 0
    assert dc.overlap("short") == 0


# ---- PII ------------------------------------------------------------------------------------

def test_pii_scrub_planted():
    text = ("Write to jane.roe+news@mail.example.org or call +44 20 7946 0958 / (415) 555-0132. "
            "Server 10.0.0.255 and fe80::1ff:fe23:4567:890a; card 4111-1111-1111-1111; SSN 078-05-1120.")
    counts = {}
    out = pii.scrub(text, counts)
    assert out == ("Write to <EMAIL> or call <PHONE> / <PHONE>. Server <IP> and <IP>; card <CARD>; SSN <SSN>.")
    assert counts == {"email": 1, "phone": 2, "ip": 2, "card": 1, "ssn": 1}


def test_pii_leaves_ordinary_numbers():
    text = ("Act 3, Scene 2, line 1599. Version 1.2.3 at 12:30:45 on 2024-01-15, page 300-301, "
            "invalid 999.1.1.1, card-like 4111 1111 1111 1112, ratio 3:1, Hamlet: to be.")
    counts = {}
    assert pii.scrub(text, counts) == text and counts == {}


def test_pii_on_corpus_finds_nothing(corpus_texts):
    counts = {}
    for t in corpus_texts[:20]:
        pii.scrub(t, counts)
    assert counts == {}


# ---- MinHash and LSH --------------------------------------------------------------------------

def test_native_and_numpy_minhash_agree(corpus_texts):
    if not dedup.NATIVE:
        assert os.environ.get("LMFORGE_REQUIRE_NATIVE") != "1", "the lmforge.data._dedup extension did not build"
        pytest.skip("C extension not built")
    for k in (1, 3, 5):
        a = dedup.MinHasher(k, 64, native=True)
        b = dedup.MinHasher(k, 64, native=False)
        for t in [corpus_texts[0][:20000], "two words", "", "ünïcödé wörds ñ 漢字 and more words here"]:
            assert np.array_equal(a(t), b(t))
    w = dedup.words_of(corpus_texts[1][:5000])
    assert np.array_equal(dedup.hash_words(w), dedup._py_hasher(w))


def _jaccard(a: str, b: str, k: int) -> float:
    def sh(t):
        w = dedup.words_of(t)
        return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}

    A, B = sh(a), sh(b)
    return len(A & B) / len(A | B)


def test_minhash_estimates_jaccard(corpus_texts):
    mh = dedup.MinHasher(5, 256)
    base = corpus_texts[3][:30000]
    words = base.split()
    rng = random.Random(0)
    for rate in (0.005, 0.02, 0.05, 0.1):
        edited = [w if rng.random() > rate else "zzz" + w for w in words]
        other = " ".join(edited)
        true = _jaccard(base, other, 5)
        est = float((mh(base) == mh(other)).mean())
        assert abs(est - true) < 4 * np.sqrt(true * (1 - true) / 256) + 0.01, (rate, est, true)


def test_lsh_params_match_the_s_curve():
    b, r = dedup.lsh_params(0.8, 128)
    assert b * r <= 128
    p = lambda j: 1 - (1 - j ** r) ** b  # noqa: E731
    assert p(0.9) > 0.9 and p(0.5) < 0.05 and 0.3 < p(0.8) < 0.9


def planted_corpus(corpus_texts, n_base=150, piece=5000, seed=0):
    """Base documents (5 KB pieces of different plays) and copies with words edited at known rates."""
    rng = random.Random(seed)
    pieces = [t[i:i + piece] for t in corpus_texts for i in range(0, len(t) - piece, piece * 7)]
    rng.shuffle(pieces)
    docs = pieces[:n_base]
    planted = []  # (copy index, original index)
    for i in range(n_base // 2):
        rate = [0.0, 0.005, 0.01, 0.02, 0.05, 0.1][i % 6]
        words = docs[i].split(" ")
        copy = " ".join(w if rng.random() >= rate else rng.choice(["thee", "thou", "lord"]) for w in words)
        planted.append((len(docs), i))
        docs.append(copy)
    return docs, planted


def pairs_above(docs, planted, threshold, k):
    return {(i, c) for c, i in planted if _jaccard(docs[i], docs[c], k) >= threshold}


def run_lsh(docs, threshold=0.8, k=5, num_perm=128):
    mh = dedup.MinHasher(k, num_perm)
    sigs = np.stack([mh(d) for d in docs])
    b, r = dedup.lsh_params(threshold, num_perm)
    clusters = dedup.near_clusters(lambda idx: sigs[idx], len(docs), threshold, b, r)
    return {(rep, m) for rep, members in clusters for m, _ in members}


def test_near_dup_precision_recall_on_planted(corpus_texts):
    docs, planted = planted_corpus(corpus_texts)
    truth = pairs_above(docs, planted, 0.8, 5)
    found = run_lsh(docs)
    tp = len(found & truth)
    precision = tp / max(1, len(found))
    recall = tp / max(1, len(truth))
    assert len(truth) >= 40
    assert recall >= 0.9 and precision >= 0.9, (precision, recall, len(truth), len(found))


def test_exact_clusters():
    keys = np.stack([np.frombuffer(dedup.exact_key(t), dtype=np.uint8) for t in
                     ["Hello  World", "other", "hello world", "HELLO\nWORLD", "x"]])
    assert dedup.exact_clusters(keys) == {0: [2, 3]}


def test_dedup_extension_built_when_required():
    import os

    if os.environ.get("LMFORGE_REQUIRE_NATIVE") == "1":
        assert dedup.NATIVE, "the lmforge.data._dedup C extension did not build (see pip's output)"


@pytest.mark.slow
def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Generated corpora of 60 and 180 MB: peak RSS of the whole process tree grows < 25%."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "data_scale", Path(__file__).parents[1] / "benchmarks" / "data_scale.py")
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenizer", "train", "--vocab-size", "2048",
                    "--out", str(tmp_path / "tok"), "-q"], check=True)
    peaks = []
    for mb in (60, 180):
        ds.generate(tmp_path / "in.jsonl", mb)
        peaks.append(ds.run_prepare(tmp_path / "in.jsonl", tmp_path / "tok", tmp_path / f"o{mb}")["peak_rss_sum_mb"])
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_default_near_dup_settings_catch_edited_copies_not_other_plays(tmp_path, corpus_files):
    """With the default DedupConfig (the data step as `lmforge data prepare --input` runs it), copies of
    a play with 1%, 3% and 5% of its words replaced are each removed as a near duplicate of their play,
    and no two different texts (other plays, or the two editions of one play) are merged."""
    from lmforge.data.prepare import PrepareConfig, clean_and_dedup

    rng = random.Random(7)
    copies = tmp_path / "copies"
    copies.mkdir()
    modern = [p for p in corpus_files if p.name.endswith("_gut.txt") and p.stat().st_size > 90_000]
    planted = {}
    for i, p in enumerate(modern[:9]):
        rate = (0.01, 0.03, 0.05)[i % 3]
        words = p.read_text().split(" ")
        vocab = sorted(set(words))
        edited = [w if rng.random() >= rate else rng.choice(vocab) for w in words]
        (copies / f"{rate:.2f}-{p.name}").write_text(" ".join(edited))
        planted[f"{rate:.2f}-{p.name}"] = p.name
        if rate == 0.05:  # the copies sit where the issue says they do, well above the threshold
            true = _jaccard(p.read_text(), " ".join(edited), 5)
            assert 0.6 < true < 0.7, true
    cfg = PrepareConfig(inputs=[str(corpus_files[0].parent), str(copies)], workers=2)
    assert (cfg.dedup.shingle_size, cfg.dedup.num_perm, cfg.dedup.threshold) == (5, 128, 0.5)
    _, d = clean_and_dedup(cfg, tmp_path / "out", quiet=True)
    assert (d["bands"], d["rows"]) == (32, 4)
    found = {r["id"]: (c["kept"], r["jaccard"]) for c in d["near_clusters"] for r in c["removed"]}
    assert {k: v[0] for k, v in found.items()} == planted  # every planted copy, and nothing else
    assert min(j for _, j in found.values()) > 0.55
