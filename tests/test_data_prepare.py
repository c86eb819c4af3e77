"""``prepare`` end to end: shards and manifest, reuse, crash and resume, the loader, the CLI."""
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.data import prepare as P
from lmforge.data.loader import MixtureLoader, ShardLoader, TokenStream, pack_bos
from lmforge.data.shards import ShardWriter, load_manifest


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_files):
    from lmforge import tokenize

    d = tmp_path_factory.mktemp("tok")
    tok = tokenize.train("bpe", [str(p) for p in corpus_files[:6]], 700,
                         special_tokens=["<|endoftext|>", "<|bos|>"], show_progress=False)
    tok.save(d / "tokenizer.lmforge.json")
    return d


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_texts):
    """~1.2 MB of JSONL: 5 KB pieces of the plays, planted near/exact duplicates, PII, junk, a bad line."""
    d = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    pieces = [t[i:i + 5000] for t in corpus_texts[::3] for i in range(0, len(t) - 5000, 40000)]
    spare = pieces[-2:]
    docs = [{"id": f"doc{i}", "text": p} for i, p in enumerate(pieces[:-2])]
    docs.append({"id": "exact-copy", "text": docs[3]["text"].upper()})
    words = docs[5]["text"].split(" ")
    docs.append({"id": "near-copy", "text": " ".join(w if rng.random() > 0.003 else "thee" for w in words)})
    docs.append({"id": "pii", "text": spare[0] + "\nmail me at someone@example.com or 555-867-5309 x.\n"})
    docs.append({"id": "junk", "text": "buy now " * 3})
    docs.append({"id": "eval-leak", "text": spare[1][:2500] + docs[9]["text"][200:900] + spare[1][2500:]})
    half = len(docs) // 2
    with open(d / "a.jsonl", "w") as f:
        for doc in docs[:half]:
            f.write(json.dumps(doc) + "\n")
        f.write("{broken json\n")
    import gzip

    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for doc in docs[half:]:
            f.write(json.dumps(doc) + "\n")
    evald = tmp_path_factory.mktemp("evals")
    (evald / "eval.txt").write_text(docs[9]["text"][200:900])
    return d, evald, docs


def _cfg(corpus, evald, **over):
    sets = [f"decontam.eval_files={evald}", "shards.shard_tokens=4096", "chunk_bytes=200000", "workers=2",
            "shards.val_fraction=0.1"] + [f"{k}={v}" for k, v in over.items()]
    return P.make_config([str(corpus)], None, sets)


def _digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*-*.*"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_corpus, tok_dir):
    corpus, evald, docs = small_corpus
    out = tmp_path_factory.mktemp("prepared")
    manifest = P.prepare(_cfg(corpus, evald), tok_dir, out, quiet=True)
    return out, manifest, docs


def test_manifest_and_shards(prepared, tok_dir):
    out, m, docs = prepared
    from lmforge.tokenize import load

    tok = load(tok_dir)
    assert m["complete"] and m["dtype"] == "uint16" and m["tokenizer"]["doc_token"] == "<|bos|>"
    bos = m["tokenizer"]["doc_token_id"]
    seen_ids = {}
    for split, sp in m["splits"].items():
        shards = sp["shards"]
        assert all(s["tokens"] == 4096 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 4096
        assert sum(s["tokens"] for s in shards) == sp["tokens"]
        for s in shards:
            data = (out / s["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == s["sha256"]
        stream = TokenStream(out, split)
        toks = stream.read(0, len(stream))
        assert (toks[stream.doc_starts] == bos).all() and (toks == bos).sum() == sp["documents"]
        ids = [i for s in shards for i in json.loads((out / s["index"]).read_text())["ids"]]
        assert len(ids) == sp["documents"]
        seen_ids[split] = set(ids)
        # the shards decode back to the documents' cleaned text
        bounds = list(stream.doc_starts) + [len(toks)]
        texts = [tok.decode(toks[a + 1:b].tolist()) for a, b in zip(bounds, bounds[1:])]
        assert sum(len(t.encode()) for t in texts) == sp["bytes"]
    assert set(m["splits"]) == {"train", "val", "test"}
    assert not seen_ids["train"] & seen_ids["val"] and not seen_ids["train"] & seen_ids["test"]
    assert not seen_ids["val"] & seen_ids["test"]
    # about the requested share of the *bytes*: within half a document of it (val 10%, test the 5% default)
    kept = sum(sp["bytes"] for sp in m["splits"].values())
    for split, frac in (("val", 0.1), ("test", 0.05)):
        assert abs(m["splits"][split]["bytes"] - frac * kept) <= 2600, (split, m["splits"][split]["bytes"], kept)
        assert m["splits"][split]["documents"] >= 4
    report = json.loads((out / "report.json").read_text())
    assert report["dedup"]["exact"]["clusters"][0]["removed"] == ["exact-copy"]
    near = report["dedup"]["near"]["clusters"]
    assert [(c["kept"], [r["id"] for r in c["removed"]]) for c in near] == [("doc5", ["near-copy"])]
    assert report["filters"]["gopher_min_words"]["docs"] == 1
    assert report["filters"]["gopher_min_words"]["examples"][0]["id"] == "junk"
    assert report["pii"]["replacements"] == {"email": 1, "phone": 1}
    assert report["decontamination"]["docs"] == 2  # doc9 and the leaked copy, both dropped
    assert "doc9" not in seen_ids["train"] | seen_ids["val"] | seen_ids["test"]
    assert [(p["kind"], p["line"]) for p in report["problems"]] == [("not-json", len(docs) // 2 + 1)]
    assert sorted(report["test_ids"]) == sorted(seen_ids["test"]) and report["heldout"]["test"]["documents"] > 0
    all_ids = seen_ids["train"] | seen_ids["val"] | seen_ids["test"]
    assert len(all_ids) == len(docs) - 5  # exact, near, junk, doc9, leak


def test_rerun_reuses_everything(prepared, small_corpus, tok_dir):
    out, m, _ = prepared
    corpus, evald, _ = small_corpus
    before = {p: p.stat().st_mtime_ns for p in (out / "work").glob("chunk-*")}
    digests = _digests(out)
    t0 = time.perf_counter()
    m2 = P.prepare(_cfg(corpus, evald), tok_dir, out, quiet=True)
    assert m2["key"] == m["key"] and _digests(out) == digests
    assert {p: p.stat().st_mtime_ns for p in (out / "work").glob("chunk-*")} == before
    # a changed dedup threshold redoes dedup and shards, not step 1
    P.prepare(_cfg(corpus, evald, **{"dedup.threshold": 0.5}), tok_dir, out, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in (out / "work").glob("chunk-*")} == before
    P.prepare(_cfg(corpus, evald), tok_dir, out, quiet=True)
    assert _digests(out) == digests
    assert time.perf_counter() - t0 < 60


def test_crash_in_shards_resumes_identically(prepared, small_corpus, tok_dir, tmp_path, monkeypatch):
    out_ref, _, _ = prepared
    corpus, evald, _ = small_corpus
    real_flush = ShardWriter.flush
    calls = {"n": 0}

    def flaky_flush(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("simulated crash")
        real_flush(self)

    monkeypatch.setattr(ShardWriter, "flush", flaky_flush)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(_cfg(corpus, evald), tok_dir, tmp_path, quiet=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert not m["complete"] and sum(len(s["shards"]) for s in m["splits"].values()) == 6
    with pytest.raises(ValueError, match="did not finish"):
        load_manifest(tmp_path)
    monkeypatch.setattr(ShardWriter, "flush", real_flush)
    P.prepare(_cfg(corpus, evald), tok_dir, tmp_path, quiet=True)
    assert _digests(tmp_path) == _digests(out_ref)


def test_crash_in_documents_resumes_identically(small_corpus, tok_dir, tmp_path, monkeypatch):
    corpus, evald, _ = small_corpus
    out_ref = tmp_path / "ref"
    P.prepare(_cfg(corpus, evald, chunk_bytes=50000), tok_dir, out_ref, quiet=True)
    tmp_path = tmp_path / "crashed"
    real = P.iter_documents

    def dying(*a, **k):
        for i, d in enumerate(real(*a, **k)):
            if i == 80:
                raise KeyboardInterrupt("simulated crash")
            yield d

    monkeypatch.setattr(P, "iter_documents", dying)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(_cfg(corpus, evald, chunk_bytes=50000), tok_dir, tmp_path, quiet=True)
    done = sorted((tmp_path / "work").glob("chunk-*.json"))
    done = [p for p in done if not p.name.endswith(".meta.json")]
    assert len(done) >= 2 and not (tmp_path / "manifest.json").exists()
    stamps = {p: p.stat().st_mtime_ns for p in done}
    monkeypatch.setattr(P, "iter_documents", real)
    P.prepare(_cfg(corpus, evald, chunk_bytes=50000), tok_dir, tmp_path, quiet=True)
    assert {p: p.stat().st_mtime_ns for p in done} == stamps  # finished chunks were not redone
    assert _digests(tmp_path) == _digests(out_ref)


def test_killed_process_resumes(small_corpus, tok_dir, tmp_path, prepared):
    """A real SIGKILL in the middle of a CLI run; the rerun ends with the same shards."""
    out_ref, _, _ = prepared
    corpus, evald, _ = small_corpus
    cmd = [sys.executable, "-m", "lmforge.cli", "data", "prepare", "--input", str(corpus), "--tokenizer",
           str(tok_dir), "--out", str(tmp_path), "-q"]
    for s in ["decontam.eval_files=" + str(evald), "shards.shard_tokens=4096", "chunk_bytes=30000", "workers=2",
              "shards.val_fraction=0.1"]:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and not list((tmp_path / "work").glob("chunk-00001.json")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "manifest.json").exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _digests(tmp_path) == _digests(out_ref)


# ---- loader ---------------------------------------------------------------------------------

def test_loader_deterministic_and_resumable(prepared):
    out, _, _ = prepared
    for mode in ("windows", "bos"):
        a = ShardLoader(out, "train", batch_size=4, seq_len=64, mode=mode, seed=3)
        batches = [a.next() for _ in range(30)]
        b = ShardLoader(out, "train", batch_size=4, seq_len=64, mode=mode, seed=3)
        for _ in range(12):
            b.next()
        state = json.loads(json.dumps(b.state_dict()))
        c = ShardLoader(out, "train", batch_size=4, seq_len=64, mode=mode, seed=3)
        c.load_state_dict(state)
        for want in batches[12:]:
            got = c.next()
            assert np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)
            assert np.array_equal(got.doc_ids, want.doc_ids)
        assert np.array_equal(batches[0].x[:, 1:], batches[0].y[:, :-1])
        other = ShardLoader(out, "train", batch_size=4, seq_len=64, mode=mode, seed=4).next()
        assert not np.array_equal(other.x, batches[0].x)
    with pytest.raises(ValueError, match="seq_len"):
        ShardLoader(out, "train", batch_size=4, seq_len=32, mode="bos", seed=3).load_state_dict(state)


def test_loader_rank_sharding_no_overlap_no_gaps(prepared):
    out, _, _ = prepared
    T, B, W = 32, 3, 4
    full = ShardLoader(out, "train", batch_size=B, seq_len=T, seed=1)
    R = full.rows_per_epoch
    starts = []
    steps = R // (B * W)
    for r in range(W):
        ld = ShardLoader(out, "train", batch_size=B, seq_len=T, seed=1, rank=r, world_size=W)
        for s in range(steps):
            rows = ld.batch_rows(s)
            starts.extend(rows.tolist())
            if s == 0:
                assert np.array_equal(ld.next().x, full.rows(rows).x)
    assert len(starts) == len(set(starts)) == steps * B * W
    assert set(starts) == set(range(steps * B * W))
    # within an epoch the windows tile the stream: each token once
    offset, perm = full._windows_epoch(0)
    assert sorted(perm.tolist()) == list(range(R))


def test_bos_packing(prepared):
    out, m, _ = prepared
    bos = m["tokenizer"]["doc_token_id"]
    ld = ShardLoader(out, "train", batch_size=8, seq_len=128, mode="bos", seed=0)
    for _ in range(5):
        b = ld.next()
        full = np.concatenate([b.x, b.y[:, -1:]], axis=1)
        for row, seg in zip(full, np.concatenate([b.doc_ids, b.doc_ids[:, -1:]], axis=1)):
            # a row starts at a document start, or is a full-length piece of a longer document
            assert row[0] == bos or (seg == 0).all()
            # a new segment begins exactly where a document starts
            change = np.flatnonzero(np.diff(seg)) + 1
            assert (row[change] == bos).all()
    starts = np.array([0, 10, 30, 100])
    lengths = np.array([10, 20, 70, 5])
    rp, ss, sl = pack_bos(starts, lengths, 16, np.random.default_rng(0), buffer=4)
    assert all(sl[rp[i]:rp[i + 1]].sum() == 16 for i in range(len(rp) - 1))


def test_mixture_weights_and_resume(prepared):
    out, _, _ = prepared
    mk = lambda: MixtureLoader([ShardLoader(out, "train", 4, 32, seed=1), ShardLoader(out, "val", 4, 32, seed=2)],  # noqa
                               [0.8, 0.2], seed=5)
    a = mk()
    bs = [a.next() for _ in range(50)]
    share = a.cursors[0] / sum(a.cursors)
    assert 0.7 < share < 0.9
    b = mk()
    for _ in range(20):
        b.next()
    c = mk()
    c.load_state_dict(b.state_dict())
    assert all(np.array_equal(c.next().x, want.x) for want in bs[20:])
    with pytest.raises(ValueError, match="weights"):
        MixtureLoader([ShardLoader(out, "train", 4, 32)], [-1])


# ---- CLI and config errors ---------------------------------------------------------------------

def test_cli_prepare_and_stats(small_corpus, tok_dir, tmp_path, capsys):
    corpus, evald, _ = small_corpus
    rc = main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path),
               "-q", "--set", "shards.shard_tokens=65536", "--set", "workers=1"])
    assert rc == 0
    capsys.readouterr()
    assert main(["data", "stats", str(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    for key in ("documents", "bytes", "tokens", "bytes_per_token", "removals", "near_duplicate_clusters", "splits"):
        assert key in s
    assert s["removals"]["gopher_min_words"]["documents"] == 1
    assert s["near_duplicate_clusters"][0]["removed"][0]["id"] == "near-copy"
    assert 0 < s["near_duplicate_clusters"][0]["removed"][0]["jaccard"] <= 1
    assert main(["data", "stats", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "near-copy" in text and "bytes/token" in text


@pytest.mark.parametrize("sets,msg", [
    (["dedup.treshold=0.5"], "unknown field 'dedup.treshold'"),
    (["dedup.threshold=high"], "dedup.threshold: expected a number"),
    (["dedup.threshold=1.5"], "threshold must be in"),
    (["pii=maybe"], "pii: expected true or false"),
    (["nokey"], "expected KEY=VALUE"),
])
def test_bad_config_is_rejected(sets, msg, tmp_path, tok_dir, capsys):
    (tmp_path / "in.txt").write_text("hello")
    argv = ["data", "prepare", "--input", str(tmp_path / "in.txt"), "--tokenizer", str(tok_dir), "--out",
            str(tmp_path / "o")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_config_file_and_help(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('inputs = ["x"]\n[dedup]\nthreshold = 0.7\n[filters]\nc4 = true\n')
    (tmp_path / "x").write_text("hello")
    cfg = P.make_config(None, str(tmp_path / "c.toml"), ["dedup.num_perm=64"])
    assert cfg.dedup.threshold == 0.7 and cfg.filters.c4 and cfg.dedup.num_perm == 64 and cfg.inputs == ["x"]
    (tmp_path / "bad.toml").write_text("[dedup]\nthreshold = 'x'\n")
    with pytest.raises(ValueError, match="dedup.threshold"):
        P.make_config(None, str(tmp_path / "bad.toml"))
    for cmd in (["data", "prepare", "--help"], ["data", "stats", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    assert "--set" in capsys.readouterr().out


def test_nothing_left_is_a_clear_error(tmp_path, tok_dir):
    (tmp_path / "in.txt").write_text("too short")
    with pytest.raises(ValueError, match="no documents left"):
        P.prepare(P.make_config([str(tmp_path / "in.txt")]), tok_dir, tmp_path / "o", quiet=True)


def test_builtin_corpus_defaults(tmp_path, tok_dir):
    """The default run on the built-in corpus finds the pairs of editions, holds out the listed
    plays in their modern edition (the Folio edition leaves training), and checks the splits
    for shared 13-word passages."""
    cfg = P.make_config(None, None, [])
    assert cfg.dedup.shingle_size == 3 and cfg.dedup.threshold == 0.1
    P.prepare(cfg, tok_dir, tmp_path, quiet=True)
    r = json.loads((tmp_path / "report.json").read_text())
    pairs = r["dedup"]["near"]["clusters"]
    assert len(pairs) == 34  # 35 folio editions; Merry Wives' modern edition fails dup-line frac first
    for c in pairs:
        kept = c["kept"].replace("_gut_f.txt", "").replace("_gut.txt", "")
        (rem,) = c["removed"]
        assert rem["jaccard"] > 0.15
        assert {c["kept"].endswith("_f.txt"), rem["id"].endswith("_f.txt")} == {True, False}, (kept, rem)
    from lmforge.data.corpora import CORPORA

    d = CORPORA["shakespeare"].prepare_defaults
    assert sorted(r["val_ids"]) == sorted(d["shards.val_docs"]) and len(r["val_ids"]) == 3
    assert sorted(r["test_ids"]) == sorted(d["shards.test_docs"]) and len(r["test_ids"]) == 4
    assert r["output"]["val"]["documents"] == 3 and r["output"]["test"]["documents"] == 4
    # every held-out play is the kept member of its editions' cluster (twelfth_night_gut.txt sorts after
    # its Folio edition twelfe-night_gut_f.txt, which would otherwise have been kept) ...
    by_kept = {c["kept"]: [x["id"] for x in c["removed"]] for c in pairs}
    for doc in r["val_ids"] + r["test_ids"]:
        assert len(by_kept[doc]) == 1 and by_kept[doc][0].endswith("_gut_f.txt"), doc
    assert by_kept["twelfth_night_gut.txt"] == ["twelfe-night_gut_f.txt"]
    # ... so neither edition is in the training shards
    m = load_manifest(tmp_path)
    train_ids = {i for s in m["splits"]["train"]["shards"] for i in json.loads((tmp_path / s["index"]).read_text())["ids"]}
    assert not train_ids & {x for doc in r["val_ids"] + r["test_ids"] for x in [doc, *by_kept[doc]]}
    # test ~10% and validation ~6% of the kept bytes; both big enough to measure (no warning)
    assert 0.09 < r["heldout"]["test"]["byte_share"] < 0.11 and 0.05 < r["heldout"]["val"]["byte_share"] < 0.08
    assert "warning" not in r["heldout"]["test"] and "warning" not in r["heldout"]["val"]
    # the decontamination between the splits finds one shared 13-gram, a stage direction
    ov = r["heldout_overlap"]
    assert ov["ngram"] == 13 and not ov["sampled"] and "val-vs-train" not in ov and "test-vs-val" not in ov
    assert ov["test-vs-train"]["ngrams"] == 1
    (pair,) = ov["test-vs-train"]["pairs"]
    assert (pair["heldout"], pair["other"]) == ("twelfth_night_gut.txt", "measure_for_measure_gut.txt")
    assert pair["examples"] == ["act i scene i an apartment in the duke s palace enter duke"]


def test_fifty_megabyte_single_line(tmp_path, tok_dir, corpus_texts):
    """A 50 MB document without a newline goes through (removed by the word-count rule)
    next to ordinary documents, in bounded time."""
    d = tmp_path / "in"
    d.mkdir()
    words = corpus_texts[0].split()
    line = " ".join(words)
    with open(d / "huge.txt", "w") as f:
        written = 0
        while written < 50_000_000:
            f.write(line + " ")
            written += len(line) + 1
    (d / "play.txt").write_text(corpus_texts[1])
    t0 = time.perf_counter()
    P.prepare(P.make_config([str(d)], None, ["workers=1"]), tok_dir, tmp_path / "o", quiet=True)
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["filters"]["gopher_max_words"]["docs"] == 1
    assert r["filters"]["gopher_max_words"]["bytes"] >= 50_000_000
    assert r["output"]["train"]["documents"] == 1  # one document: nothing held out ...
    assert r["output"]["val"]["documents"] == r["output"]["test"]["documents"] == 0
    assert "warning" in r["heldout"]["val"] and "warning" in r["heldout"]["test"]  # ... and the report says so
    assert time.perf_counter() - t0 < 120


# ---- the held-out splits on a user's own files -----------------------------------------------

def _tree(root: Path, texts: list[str]) -> list[str]:
    """Files under ``root`` with repeated base names (``__init__.py`` in every package); returns their ids."""
    ids = []
    for i, t in enumerate(texts):
        rel = Path(f"pkg{i % 4}") / (f"sub{i}" if i >= 4 else "") / "__init__.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(t)
        ids.append(rel.as_posix())
    return ids


def _split_ids(out: Path, m: dict) -> dict:
    return {name: [i for s in sp["shards"] for i in json.loads((out / s["index"]).read_text())["ids"]]
            for name, sp in m["splits"].items()}


def test_ids_are_relative_paths_and_splits_hold_a_share_of_the_bytes(tmp_path, tok_dir, corpus_texts):
    """Ids name files by their path under the input (several are __init__.py); the held-out splits
    hold about the requested share of the bytes, not of the documents."""
    rng = random.Random(1)
    texts = []
    big = [t for t in corpus_texts if len(t) > 90_000]
    for i in range(30):  # 24 small documents (~3 KB) and 6 large ones (~60 KB)
        t = big[i]
        size = 60_000 if i % 5 == 0 else 3_000
        start = rng.randrange(0, len(t) - size)
        texts.append(t[start:start + size])
    ids = _tree(tmp_path / "in", texts)
    assert len(set(Path(i).name for i in ids)) == 1 and len(set(ids)) == 30
    cfg = P.make_config([str(tmp_path / "in")], None, ["workers=1", "shards.val_fraction=0.1",
                                                        "shards.test_fraction=0.2", "shards.seed=3"])
    m = P.prepare(cfg, tok_dir, tmp_path / "out", quiet=True)
    got = _split_ids(tmp_path / "out", m)
    assert sorted(got["train"] + got["val"] + got["test"]) == sorted(ids)  # every file, by its relative path
    kept = sum(sp["bytes"] for sp in m["splits"].values())
    for split, frac in (("val", 0.1), ("test", 0.2)):
        share = m["splits"][split]["bytes"] / kept
        assert abs(share - frac) < 0.04, (split, share)
    # a share of the documents would have been 3 and 6 of them; the bytes decide here
    docs = {s: m["splits"][s]["documents"] for s in ("val", "test")}
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert r["heldout"]["val"]["documents"] == docs["val"] and r["heldout"]["test"]["chosen_by"].startswith("seeded")


def test_small_heldout_split_warns(tmp_path, tok_dir, corpus_texts, capsys):
    """A corpus too small to hold out a measurable split (a few KB of files) still prepares, and says so:
    on stderr, in report.json and in `lmforge data stats`."""
    _tree(tmp_path / "in", [t[5000:9000] for t in corpus_texts[:12]])
    assert main(["data", "prepare", "-i", str(tmp_path / "in"), "-t", str(tok_dir), "-o", str(tmp_path / "out"),
                 "-q", "--set", "workers=1"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "validation split holds 1 document(s)" in err and "test split holds 1" in err
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "too small" in r["heldout"]["val"]["warning"] and "too small" in r["heldout"]["test"]["warning"]
    assert main(["data", "stats", str(tmp_path / "out")]) == 0
    assert "WARNING: the test split holds 1 document(s)" in capsys.readouterr().out
    # a big enough split gets no warning
    out2 = tmp_path / "out2"
    assert main(["data", "prepare", "-i", str(tmp_path / "in"), "-t", str(tok_dir), "-o", str(out2), "-q",
                 "--set", "workers=1", "--set", "shards.warn_tokens=100", "--set", "shards.warn_documents=1"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_explicit_heldout_lists_and_their_errors(tmp_path, tok_dir, corpus_texts):
    texts = [t[10000:16000] for t in corpus_texts[:10]]
    ids = _tree(tmp_path / "in", texts)
    # a near copy of the first file, later in the stream: listing it holds it out and removes the original
    (tmp_path / "in" / "zcopy.txt").write_text(texts[0].replace(" the ", " thee ", 3))
    sets = ["workers=1", f"shards.val_docs={json.dumps(ids[1:3])}", f"shards.test_docs={json.dumps(['zcopy.txt'])}"]
    m = P.prepare(P.make_config([str(tmp_path / "in")], None, sets), tok_dir, tmp_path / "out", quiet=True)
    got = _split_ids(tmp_path / "out", m)
    assert sorted(got["val"]) == sorted(ids[1:3]) and got["test"] == ["zcopy.txt"]
    assert ids[0] not in got["train"]  # the other edition of a held-out document leaves training
    r = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(c["kept"], [x["id"] for x in c["removed"]]) for c in r["dedup"]["near"]["clusters"]] == \
        [("zcopy.txt", [ids[0]])]
    assert r["heldout"]["test"]["chosen_by"] == "list"
    # the same document in both lists, duplicates across the lists, unknown ids: errors that name them
    with pytest.raises(ValueError, match="disjoint.*zcopy"):
        P.make_config([str(tmp_path / "in")], None, ["shards.val_docs=[\"zcopy.txt\"]",
                                                     "shards.test_docs=[\"zcopy.txt\"]"])
    bad = ["workers=1", f"shards.val_docs={json.dumps([ids[0]])}", "shards.test_docs=[\"zcopy.txt\"]"]
    with pytest.raises(ValueError, match="near duplicates of each other"):
        P.prepare(P.make_config([str(tmp_path / "in")], None, bad), tok_dir, tmp_path / "o2", quiet=True)
    bad = ["workers=1", "shards.test_docs=[\"nope.txt\"]"]
    with pytest.raises(ValueError, match="shards.test_docs.*'nope.txt': no document has this id"):
        P.prepare(P.make_config([str(tmp_path / "in")], None, bad), tok_dir, tmp_path / "o3", quiet=True)


def test_heldout_overlap_is_found_and_can_be_dropped(tmp_path, tok_dir, corpus_files):
    """A training document that quotes 40 words of a test document is named, with the passage."""
    modern = [p for p in corpus_files if p.name.endswith("_gut.txt")]  # one edition per play
    texts = [p.read_text()[20000:26000] for p in modern[:8]]
    words = texts[5].split()
    quote = " ".join(words[300:340])
    texts[2] = texts[2][:3000] + "\n" + quote + "\n" + texts[2][3000:]
    ids = _tree(tmp_path / "in", texts)
    sets = ["workers=1", f"shards.test_docs={json.dumps([ids[5]])}", f"shards.val_docs={json.dumps([ids[6]])}"]
    m = P.prepare(P.make_config([str(tmp_path / "in")], None, sets), tok_dir, tmp_path / "out", quiet=True)
    ov = json.loads((tmp_path / "out" / "report.json").read_text())["heldout_overlap"]
    (pair,) = ov["test-vs-train"]["pairs"]
    assert (pair["heldout"], pair["other"], pair["passages"]) == (ids[5], ids[2], 1)
    n_words = len(re.findall(r"\w+", quote))
    assert pair["ngrams"] == n_words - 13 + 1  # every 13-gram of the quote, nothing else
    assert " ".join(re.findall(r"\w+", quote.lower()))[:200] == pair["examples"][0]  # the passage (cut at 200)
    assert "val-vs-train" not in ov and ids[2] in _split_ids(tmp_path / "out", m)["train"]  # flagged, kept
    m = P.prepare(P.make_config([str(tmp_path / "in")], None, sets + ["decontam.heldout=drop"]), tok_dir,
                  tmp_path / "out2", quiet=True)
    assert ids[2] not in _split_ids(tmp_path / "out2", m)["train"]
    assert json.loads((tmp_path / "out2" / "report.json").read_text())["heldout_overlap"]["dropped"] == [ids[2]]
    # past heldout_max_grams a fixed sample of the n-grams (~40% here) is compared: the passage is still found
    P.prepare(P.make_config([str(tmp_path / "in")], None, sets + ["decontam.heldout_max_grams=600"]), tok_dir,
              tmp_path / "out3", quiet=True)
    ov = json.loads((tmp_path / "out3" / "report.json").read_text())["heldout_overlap"]
    assert ov["sampled"] and ov["heldout_ngrams"] < 0.6 * 2 * 900
    (pair,) = ov["test-vs-train"]["pairs"]
    assert pair["other"] == ids[2] and 0 < pair["ngrams"] < n_words - 13 + 1


def test_directory_without_test_split_still_loads(prepared, tmp_path):
    """Shards written before the test split existed (train and val only) load; asking for test says why not."""
    import shutil

    out, m, _ = prepared
    old = tmp_path / "old"
    shutil.copytree(out, old, ignore=shutil.ignore_patterns("work", "test-*"))
    mo = json.loads((old / "manifest.json").read_text())
    del mo["splits"]["test"]
    (old / "manifest.json").write_text(json.dumps(mo))
    assert len(TokenStream(old, "val")) == m["splits"]["val"]["tokens"]
    ShardLoader(old, "train", 2, 16).next()
    with pytest.raises(ValueError, match="no test split.*prepared before"):
        TokenStream(old, "test")


def _generated_with_duplicates(path: Path, mb: float, seed: int = 0) -> int:
    """JSONL of ~5 KB documents of random corpus words; every 5th document is followed by an exact
    copy (case changed) and every 7th by a near copy (3% of words replaced)."""
    from lmforge.data import corpus_files

    words = sorted(set(re.findall(r"[A-Za-z']+", corpus_files()[0].read_text())))
    rng = np.random.default_rng(seed)
    written = n = 0
    with open(path, "w") as f:
        while written < mb * 1e6:
            ws = [words[i] for i in rng.integers(0, len(words), size=900)]
            text = "\n".join(" ".join(ws[i:i + 12]) + "." for i in range(0, 900, 12))
            docs = [text]
            if n % 5 == 0:
                docs.append(text.upper())
            if n % 7 == 0:
                docs.append(" ".join(w if rng.random() > 0.03 else "thee" for w in text.split(" ")))
            for t in docs:
                line = json.dumps({"id": f"gen-{n}", "text": t}) + "\n"
                f.write(line)
                written += len(line)
                n += 1
    return n


def test_memory_stays_flat_with_duplicates(tmp_path, tok_dir):
    """The CI-sized twin of the slow 60/180 MB test, on a corpus with exact and near duplicates: going
    from 3 to 9 MB of input, the peak resident memory of `lmforge data prepare` (all its processes)
    grows by far less than the 6 MB of added text (holding the text, or anything per byte of it, would
    add at least that). The fixed-size buffers are scaled down with the corpus (step-1 chunks, the
    tokenizer's batches, the held-out n-gram sample) so that both sizes are well past them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("data_scale", Path(__file__).parents[1] / "benchmarks" / "data_scale.py")
    ds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ds)
    peaks, reports = [], []
    for mb in (3, 9):
        inp = tmp_path / f"in{mb}.jsonl"
        _generated_with_duplicates(inp, mb)
        out = tmp_path / f"o{mb}"
        args = ["data", "prepare", "-i", str(inp), "-t", str(tok_dir), "-o", str(out), "-q", "--set", "workers=2",
                "--set", "chunk_bytes=250000", "--set", "decontam.heldout_max_grams=20000"]
        code = ("import sys, lmforge.data.shards as s; s.ENCODE_BATCH_CHARS = 250_000; s.ENCODE_BATCH_DOCS = 64; "
                f"from lmforge.cli import main; sys.exit(main({args!r}))")
        cmd = [sys.executable, "-c", code]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, ds.tree_rss(proc.pid)[0])
            time.sleep(0.1)
        assert proc.returncode == 0
        peaks.append(peak)
        reports.append(json.loads((out / "report.json").read_text()))
    # the duplicates were found at both sizes (so the dedup step really ran on them)
    for r in reports:
        assert r["dedup"]["exact"]["documents"] > 0.1 * r["documents_in"]
        assert r["dedup"]["near"]["documents"] > 0.08 * r["documents_in"]
    added = reports[1]["bytes_in"] - reports[0]["bytes_in"]
    print(f"peak RSS {peaks[0] / 1e6:.1f} -> {peaks[1] / 1e6:.1f} MB for {added / 1e6:.1f} MB more input")
    assert peaks[1] - peaks[0] < 0.4 * added, (peaks, added)


def test_text_mode_holds_out_validation_and_test(tmp_path, corpus_texts):
    """`lmforge pretrain --text FILE`: the first 90% trains, the next 5% validates, the last 5% tests,
    as three one-document splits the loader reads back exactly."""
    from lmforge.train.trainer import text_to_shards

    text = corpus_texts[5][:40000]
    (tmp_path / "play.txt").write_text(text)
    tok = text_to_shards(str(tmp_path / "play.txt"), "char", tmp_path / "d")
    m = load_manifest(tmp_path / "d")
    assert list(m["splits"]) == ["train", "val", "test"]
    parts = [text[:36000], text[36000:38000], text[38000:]]
    for split, part in zip(("train", "val", "test"), parts):
        s = TokenStream(tmp_path / "d", split)
        assert tok.decode(s.read(0, len(s)).tolist()) == part and s.bytes == len(part.encode())
    # the shares are settings: 10% validation and no test (benchmarks/cpu_recipe.py holds its test text apart)
    tok = text_to_shards(str(tmp_path / "play.txt"), "char", tmp_path / "d2", val_frac=0.1, test_frac=0)
    m = load_manifest(tmp_path / "d2")
    assert list(m["splits"]) == ["train", "val"]
    assert tok.decode(TokenStream(tmp_path / "d2", "val").read(0, 4000).tolist()) == text[36000:]
    from lmforge.train.trainer import TrainConfig, train

    with pytest.raises(ValueError, match="text_val_frac"):
        train(TrainConfig(text=str(tmp_path / "play.txt"), out=str(tmp_path / "o"), text_val_frac=0.3,
                          text_test_frac=0.3, max_steps=1), quiet=True)
