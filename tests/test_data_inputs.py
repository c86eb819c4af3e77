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


def _bpe_dir(d, text):
    """A 400-token BPE (with <|endoftext|> and <|bos|>) trained on ``text``, saved in ``d``."""
    from lmforge import tokenize

    tok = tokenize.train("bpe", [text], 400, special_tokens=["<|endoftext|>", "<|bos|>"], show_progress=False)
    tok.save(d / "tokenizer.lmforge.json")
    return d, tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus_texts):
    return _bpe_dir(tmp_path_factory.mktemp("tok"), corpus_texts[0][:200_000])[0]


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
    list(iter_documents([tmp_path], problems))  # collects the problems
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


# ---- 5. shards remember their tokenizer; 6. mistyped --data directories ---------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok_dir, corpus_texts):
    d = tmp_path_factory.mktemp("shards")
    for k, text in enumerate(corpus_texts[1:5]):
        (d / "in").mkdir(exist_ok=True)
        (d / "in" / f"p{k}.txt").write_text(text[:20_000])
    assert _prepare(d / "in", tok_dir, d / "data") == 0
    return d / "data"


def _model_dir(path: Path, tok, vocab: int | None = None) -> Path:
    from lmforge.model import make_config, save
    from lmforge.model.transformer import Transformer

    cfg = make_config(vocab_size=vocab or tok.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    save(Transformer(cfg), path, tokenizer=tok if vocab is None or vocab >= tok.vocab_size else None)
    return path


def test_manifest_records_the_canonical_tokenizer_hash(shards, tok_dir):
    from lmforge.data.shards import load_manifest, tokenizer_fingerprint
    from lmforge.tokenize import load

    m = load_manifest(shards)
    tok = load(tok_dir)
    assert m["tokenizer"]["canonical_sha256"] == tokenizer_fingerprint(tok)
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size
    # the same tokenizer read from another format or saved again has the same hash; another has not
    tok.save(shards.parent / "again.json")
    assert tokenizer_fingerprint(load(shards.parent / "again.json")) == m["tokenizer"]["canonical_sha256"]
    assert tokenizer_fingerprint(load(shards / m["tokenizer"]["file"])) == m["tokenizer"]["canonical_sha256"]
    from lmforge.tokenize.formats import save_hf

    save_hf(tok, shards.parent / "hf-tokenizer.json")  # HF spells the cl100k regex another way
    hf = load(shards.parent / "hf-tokenizer.json")
    assert hf.encode("To be, or not to be") == tok.encode("To be, or not to be")
    assert tokenizer_fingerprint(hf) == m["tokenizer"]["canonical_sha256"]


@pytest.fixture(scope="module")
def other_tok(tmp_path_factory, corpus_texts):
    return _bpe_dir(tmp_path_factory.mktemp("other"), corpus_texts[3][:100_000])


def test_eval_refuses_shards_of_another_tokenizer(shards, tok_dir, other_tok, tmp_path, capsys):
    from lmforge.tokenize import load

    good = _model_dir(tmp_path / "good", load(tok_dir))
    assert main(["eval", "--checkpoint", str(good), "--data", str(shards), "--seq-len", "32", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] > 0
    bad = _model_dir(tmp_path / "bad", other_tok[1])
    assert main(["eval", "--checkpoint", str(bad), "--data", str(shards), "--seq-len", "32"]) == 1
    err = capsys.readouterr().err
    assert "made by another tokenizer" in err and f"the tokenizer of {bad}" in err
    assert str(tok_dir) in err  # names the tokenizer that made the shards


def test_eval_on_ids_beyond_the_model_vocabulary_is_a_clear_error(shards, tok_dir, tmp_path, capsys):
    from lmforge.evaluate.perplexity import evaluate_shards
    from lmforge.model import load as load_model
    from lmforge.tokenize import load

    small = _model_dir(tmp_path / "small", load(tok_dir), vocab=200)
    assert main(["eval", "--checkpoint", str(small), "--data", str(shards), "--seq-len", "32"]) == 1
    err = capsys.readouterr().err
    assert "200 embeddings" in err and "IndexError" not in err
    # a manifest that says nothing (or lies) about the vocabulary: the ids themselves are checked
    m = json.loads((shards / "manifest.json").read_text())
    lying = tmp_path / "lying"
    lying.mkdir()
    for f in shards.iterdir():
        if f.is_file():
            (lying / f.name).write_bytes(f.read_bytes())
    m["tokenizer"]["vocab_size"] = 100
    (lying / "manifest.json").write_text(json.dumps(m))
    model, _ = load_model(small)
    with pytest.raises(ValueError, match=r"has id \d+, but the model's vocabulary has 200 ids"):
        evaluate_shards(model, lying, "val", 32)


def test_old_manifest_without_the_hash_warns_and_continues(shards, tok_dir, tmp_path, capsys):
    import shutil

    from lmforge.tokenize import load

    old = tmp_path / "old"
    shutil.copytree(shards, old, ignore=shutil.ignore_patterns("work"))
    m = json.loads((old / "manifest.json").read_text())
    del m["tokenizer"]["canonical_sha256"]
    (old / "manifest.json").write_text(json.dumps(m))
    good = _model_dir(tmp_path / "good", load(tok_dir))
    assert main(["eval", "--checkpoint", str(good), "--data", str(old), "--seq-len", "32", "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tokens"] > 0
    assert "warning" in out.err and "canonical sha256" in out.err


def _pretrain(data, out, *extra) -> int:
    return main(["pretrain", "--data", str(data), "--out", str(out), "--max-steps", "1", "-q",
                 "--set", "model.n_layer=1", "--set", "model.n_head=2", "--set", "model.d_model=16",
                 "--set", "seq_len=32", "--set", "batch_size=2", "--set", "eval_every=0", *extra])


def test_pretrain_refuses_shards_of_another_tokenizer(shards, tok_dir, other_tok, tmp_path, capsys):
    import shutil

    assert _pretrain(shards, tmp_path / "run", "--tokenizer", str(other_tok[0])) == 1
    err = capsys.readouterr().err
    assert "made by another tokenizer" in err and f"--tokenizer {other_tok[0]}" in err
    # the copy in the data directory replaced by another tokenizer
    swapped = tmp_path / "swapped"
    shutil.copytree(shards, swapped, ignore=shutil.ignore_patterns("work"))
    m = json.loads((swapped / "manifest.json").read_text())
    shutil.copyfile(other_tok[0] / "tokenizer.lmforge.json", swapped / m["tokenizer"]["file"])
    assert _pretrain(swapped, tmp_path / "run2") == 1
    err = capsys.readouterr().err
    assert "made by another tokenizer" in err and f"the tokenizer in {swapped / m['tokenizer']['file']}" in err


def test_mistyped_data_directory(shards, tok_dir, tmp_path, capsys, monkeypatch):
    from lmforge.tokenize import load

    model = _model_dir(tmp_path / "m", load(tok_dir))
    monkeypatch.chdir(shards.parent)
    typo = Path(shards.name[:-1] + "x")  # e.g. "datx" next to "data"
    for argv in (["data", "stats", str(typo)], ["pretrain", "--data", str(typo), "--out", str(tmp_path / "r"),
                                                 "--max-steps", "1"],
                 ["eval", "--checkpoint", str(model), "--data", str(typo)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert f"no such directory {typo}" in err and f"did you mean {shards.name}?" in err, err
        assert "data prepare" not in err
    assert not (tmp_path / "r").exists()  # pretrain checked --data before making its run directory
    (shards.parent / "empty").mkdir()
    assert main(["data", "stats", "empty"]) == 1
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "lmforge data prepare --out empty" in err
    assert main(["data", "stats", "nothing/like/it"]) == 1
    assert "no such directory nothing/like/it (nothing/like does not exist either)" in capsys.readouterr().err


def test_fingerprint_same_for_a_unigram_and_its_sentencepiece_file(tmp_path, corpus_texts):
    from lmforge import tokenize
    from lmforge.data.shards import tokenizer_fingerprint

    tok = tokenize.train("unigram", [corpus_texts[0][:60_000]], 300, show_progress=False)
    tok.save_sentencepiece(tmp_path / "u.model")
    back = tokenize.load(tmp_path / "u.model")
    assert back.encode("To be, or not to be") == tok.encode("To be, or not to be")
    assert tokenizer_fingerprint(back) == tokenizer_fingerprint(tok)
    other = tokenize.train("unigram", [corpus_texts[1][:60_000]], 300, show_progress=False)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tok)


def test_prepare_counts_a_truncated_compressed_text_and_goes_on(tmp_path, tok_dir, corpus_texts):
    d = tmp_path / "in"
    d.mkdir()
    text = "".join(corpus_texts[1:4])[:600_000]
    (d / "whole.txt").write_text(corpus_texts[5][:40_000])
    gz = gzip.compress(text.encode())
    (d / "cut.txt.gz").write_bytes(gz[: len(gz) // 2])
    assert _prepare(d, tok_dir, tmp_path / "out") == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(p["file"].split("/")[-1], p["kind"]) for p in report["problems"]] == [("cut.txt.gz", "truncated")]
    assert report["documents_in"] == 2  # the part before the damage is a document too
