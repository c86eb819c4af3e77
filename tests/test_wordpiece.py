import pytest

from lmforge.tokenize import WordPiece, load
from lmforge.tokenize.formats import save_hf
from mixed_sample import MIXED


@pytest.fixture(scope="module")
def wp(corpus_files):
    return WordPiece.train(corpus_files[:15], 3000, show_progress=False)


def test_identical_to_hf_on_corpus(wp, tmp_path, corpus_lines):
    tokenizers = pytest.importorskip("tokenizers")
    save_hf(wp, tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    lines = corpus_lines[::3] + MIXED + ["a" * 150, "[CLS] x [SEP]", "Héllo ÀÉÎ straße"]
    ref = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    ours = [wp.encode(l, allowed_special="all") for l in lines]
    assert ours == ref


def test_cased_and_roundtrip(corpus_files, tmp_path):
    wp = WordPiece.train(corpus_files[:3], 1500, lowercase=False, show_progress=False)
    ids = wp.encode("Hamlet speaks")
    assert wp.decode(ids) == "Hamlet speaks"
    wp.save(tmp_path)
    assert load(tmp_path).encode("Hamlet speaks") == ids
    assert wp.id_to_token(wp.encode("Hamlet")[0]).startswith("H")


def test_unknown_and_long_words(wp):
    assert wp.encode("∮") == [wp.unk_id]
    assert wp.encode("x" * 101) == [wp.unk_id]


def test_vocab_below_alphabet(corpus_files):
    with pytest.raises(ValueError, match="below the base alphabet"):
        WordPiece.train(corpus_files[:1], 20, show_progress=False)
