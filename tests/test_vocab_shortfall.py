"""A tokenizer trained to a smaller vocabulary than asked says so (issue 15): a warning through
logging (logger ``lmforge.tokenize``) and in ``lmforge tokenizer train``'s output."""
import logging

import pytest

from lmforge import tokenize
from lmforge.cli import main

SMALL = "the cat sat on the mat. a dog ran far, the dog sat. " * 40


@pytest.mark.parametrize("kind,why", [("bpe", "min_frequency=2"), ("wordpiece", "min_frequency=2"),
                                      ("unigram", "pieces of the")])
def test_smaller_vocab_than_asked_warns(kind, why, caplog):
    with caplog.at_level(logging.WARNING, logger="lmforge.tokenize"):
        tok = tokenize.train(kind, [SMALL], 8192, show_progress=False)
    assert tok.vocab_size < 8192
    recs = [r for r in caplog.records if r.name == "lmforge.tokenize" and r.levelno == logging.WARNING]
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert f"vocab_size 8192 asked, {tok.vocab_size} trained" in msg and why in msg, msg


def test_full_vocab_does_not_warn(caplog, corpus_texts):
    with caplog.at_level(logging.WARNING, logger="lmforge.tokenize"):
        tok = tokenize.train("bpe", [corpus_texts[0][:100_000]], 400, show_progress=False)
    assert tok.vocab_size == 400
    assert not [r for r in caplog.records if r.name == "lmforge.tokenize"]


def test_cli_train_says_asked_and_got(tmp_path, capsys):
    (tmp_path / "small.txt").write_text(SMALL)
    assert main(["tokenizer", "train", "--input", str(tmp_path / "small.txt"), "--vocab-size", "8192",
                 "--out", str(tmp_path / "tok"), "-q"]) == 0
    out = capsys.readouterr()
    got = tokenize.load(tmp_path / "tok").vocab_size
    assert got < 8192
    warn = [l for l in out.err.splitlines() if l.startswith("lmforge: warning:")]
    assert len(warn) == 1 and f"vocab_size 8192 asked, {got} trained" in warn[0] and "min_frequency" in warn[0]
    assert f"vocab {got} (asked 8192)" in out.out
