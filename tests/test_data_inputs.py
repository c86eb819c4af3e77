"""Data pipeline inputs and checks (issue 15): compressed text inputs, the tokenizer checked before
the corpus is read, shards that remember their tokenizer, and mistyped ``--data`` directories."""
import gzip
import hashlib
import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.sources import iter_documents

zstandard = pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_texts):
    from lmforge import tokenize

    d = tmp_path_factory.mktemp("tok")
    tok = tokenize.train("bpe", [corpus_texts[0][:200_000]], 400, special_tokens=["<|endoftext|>", "<|bos|>"],
                         show_progress=False)
    tok.save(d / "tokenizer.lmforge.json")
    return d


def _shard_digests(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*-*.*"))}


def _prepare(inp, tok, out, *extra) -> int:
    return main(["data", "prepare", "--input", str(inp), "--tokenizer", str(tok), "--out", str(out), "-q",
                 "--set", "workers=1", "--set", "shards.shard_tokens=4096", *extra])


# ---- 1. .txt.gz and .txt.zst inputs are decompressed ---------------------------------------------

def test_compressed_text_gives_the_same_shards_as_plain(tmp_path, tok_dir, corpus_texts):
    plain, gz, zst = (tmp_path / n for n in ("plain", "gz", "zst"))
    for d in (plain, gz, zst):
        d.mkdir()
    for k, text in enumerate(corpus_texts[1:7]):
        data = text[:30_000].encode()
        (plain / f"play{k}.txt").write_bytes(data)
        (gz / f"play{k}.txt.gz").write_bytes(gzip.compress(data))
        (zst / f"play{k}.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    outs = {}
    for d in (plain, gz, zst):
        assert _prepare(d, tok_dir, tmp_path / f"out-{d.name}") == 0
        outs[d.name] = _shard_digests(tmp_path / f"out-{d.name}")
    assert outs["plain"] and any(n.startswith("val-") for n in outs["plain"])
    assert outs["gz"] == outs["plain"]
    assert outs["zst"] == outs["plain"]
    report = json.loads((tmp_path / "out-gz" / "report.json").read_text())
    assert report["problems"] == []
    ids = json.loads((tmp_path / "out-gz" / "train-00000.idx.json").read_text())["ids"]
    assert all(i.endswith(".txt") for i in ids)  # the document is the text, not its compressed file


def test_truncated_or_corrupt_compressed_text_keeps_what_decoded(tmp_path, corpus_texts):
    text = "".join(corpus_texts[2:10])[:1_000_000]  # several zstd blocks (128 KiB each)
    data = text.encode()
    gz = gzip.compress(data)
    (tmp_path / "cut.txt.gz").write_bytes(gz[: len(gz) // 2])
    zs = zstandard.ZstdCompressor().compress(data)
    (tmp_path / "cut.txt.zst").write_bytes(zs[: len(zs) // 2])
    (tmp_path / "tail.txt.gz").write_bytes(gzip.compress(data) + b"garbage after the stream")
    mid = bytearray(gzip.compress(data))
    mid[len(mid) // 2: len(mid) // 2 + 64] = b"\x00" * 64  # deflate finds this at the latest at the CRC
    (tmp_path / "mid.txt.gz").write_bytes(bytes(mid))
    (tmp_path / "junk.txt.zst").write_bytes(b"not zstd at all")
    problems = []
    docs = {d.id: d.text for d in iter_documents([tmp_path], problems)}
    kept = {d.source.split("/")[-1]: d.text for d in iter_documents([tmp_path], [])}
    for name in ("cut.txt.gz", "cut.txt.zst"):  # the text before the cut, back to a whole line
        assert 1000 < len(kept[name]) < len(text) and text.startswith(kept[name]), name
        assert kept[name].endswith("\n"), name
    assert kept["tail.txt.gz"] == text[: text.rindex("\n") + 1]
    assert "junk.txt.zst" not in kept
    by = {p.file.split("/")[-1]: p for p in problems}
    assert set(by) == {"cut.txt.gz", "cut.txt.zst", "tail.txt.gz", "mid.txt.gz", "junk.txt.zst"}
    assert all(p.kind == "truncated" for p in by.values())
    assert "decoded before the damage" in by["cut.txt.gz"].detail
    assert by["cut.txt.gz"].line == kept["cut.txt.gz"].count("\n") + 1


# ---- 4. data prepare checks its tokenizer before reading the corpus --------------------------------

@pytest.mark.parametrize("make,msg", [
    (lambda d: d / "no-such-tokenizer", "no such tokenizer file or directory"),
    (lambda d: (d / "empty-dir").mkdir() or d / "empty-dir", "no tokenizer.lmforge.json, tokenizer.json"),
    (lambda d: (d / "t.json").write_text("{not json") and d / "t.json", "corrupt or truncated tokenizer file"),
    (lambda d: (d / "t2.json").write_text('{"a": 1}') and d / "t2.json", "not a tokenizer file lmforge knows"),
    (lambda d: (d / "x.model").write_bytes(b"\xff\xff\xff") and d / "x.model", "sentencepiece"),
])
def test_bad_tokenizer_fails_before_the_corpus_is_read(make, msg, tmp_path, capsys, monkeypatch):
    from lmforge.data import prepare as P

    (tmp_path / "in.txt").write_text("some text\n" * 100)
    tok = make(tmp_path)
    read = []
    monkeypatch.setattr(P, "iter_documents", lambda *a, **k: read.append(1) or iter(()))
    out = tmp_path / "out"
    assert _prepare(tmp_path / "in.txt", tok, out) != 0
    err = capsys.readouterr().err
    assert msg in err and str(tok) in err, err
    assert not read  # the corpus was never opened
    assert not out.exists()  # and nothing was written


def test_tokenizer_without_a_document_token_fails_first(tmp_path, capsys, corpus_texts):
    from lmforge import tokenize

    tok = tokenize.train("bpe", [corpus_texts[0][:20_000]], 300, show_progress=False)
    tok.save(tmp_path / "tokenizer.lmforge.json")
    (tmp_path / "in.txt").write_text("some text\n" * 100)
    assert _prepare(tmp_path / "in.txt", tmp_path, tmp_path / "out") != 0
    assert "shards.doc_token" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
