"""Contamination: which task documents share a 13-gram with a run's training shards.

Knows lm-evaluation-harness's decontamination recipe (``lm_eval/decontamination``): a text is
normalized by lowercasing ASCII letters and deleting ASCII punctuation (``string.punctuation``;
other characters, curly quotes and accented letters included, stay as they are), split on
whitespace into words, and cut into every run of ``n`` consecutive words (n = 13); a task document
is dirty when any of its n-grams occurs in the training data. Knows nothing of tasks or scores:
the harness passes each task's document texts (``check``) and scores the clean subset itself.

The index is a sorted numpy array of 64-bit hashes of the training n-grams (8 bytes a training
word; about three times that at the peak of a merge; n-grams never span two documents), searched
with ``np.searchsorted``. The demo run's training split (35 documents, 752k words) indexes in
about a second (0.7 s on a quiet machine). Words are hashed with
the data pipeline's word hash (``lmforge.data.dedup.hash_words``, FNV-1a 64) and combined
polynomially; two different n-grams share a hash with probability about 2^-64 per pair, so a
false "dirty" is possible in principle and unheard of in practice.

Texts shorter than ``n`` words have no n-gram: lm-eval never finds them dirty, and by default
neither does this module (``check`` counts them as ``short``). With ``short_min_words=k`` set when
the index is built, a text of k..n-1 words is dirty when its whole normalized word sequence occurs
in one training document (the index then also keeps the training words' hashes, 8 more bytes a
word). A very short text (a number, "Yes") occurs somewhere in any corpus, which is why this is
off by default and k should not be small.

``NgramIndex.from_shards`` reads a prepared data directory (``lmforge data prepare``): each
document of the split, decoded with the tokenizer the manifest records, without its document token.
"""
from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["NgramIndex", "check", "normalize", "words", "ngrams"]

# lm-eval's janitor: ASCII upper case to lower case, ASCII punctuation deleted, nothing else touched
_TABLE = str.maketrans(string.ascii_uppercase, string.ascii_lowercase, string.punctuation)
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial n-gram hash is a bijection of the last word


def normalize(text: str) -> str:
    """The text as lm-eval's janitor normalizes it (``Janitor().normalize_string``)."""
    return text.translate(_TABLE)


def words(text: str) -> list[str]:
    """The normalized text's words: split on any whitespace."""
    return normalize(text).split()


def ngrams(text: str, n: int = 13) -> list[str]:
    """The text's word n-grams as strings (lm-eval's ``word_ngrams(normalize_string(text), n)``)."""
    w = words(text)
    return [" ".join(w[i:i + n]) for i in range(len(w) - n + 1)]


def _word_hashes(ws: list[str]) -> np.ndarray:
    from ..data.dedup import hash_words

    if not ws:
        return np.empty(0, dtype=np.uint64)
    return np.asarray(hash_words(ws), dtype=np.uint64)


def _gram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of ``n`` consecutive word hashes: sum of w[i+j] * B^(n-1-j) mod 2^64, mixed."""
    m = len(wh) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _BASE + wh[j:j + m]
        h ^= h >> np.uint64(31)  # spread the high bits down (the low bits of a sum of products mix poorly)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(29)
    return h


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` by sort (numpy >= 2.3's hash-based unique is ~10x slower on a million uint64s)."""
    a = np.sort(a)
    if len(a) < 2:
        return a
    keep = np.empty(len(a), dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a[keep]


def _decoder(tok):
    """ids -> text. A byte-level BPE decodes token by token exactly, so a per-id table of bytes replaces the
    tokenizer's checked loop; other kinds (WordPiece, Unigram: spacing depends on neighbours) decode whole."""
    if getattr(tok, "kind", None) != "bpe":
        return lambda ids: tok.decode(ids)
    table = []
    for i in range(tok.vocab_size):
        try:
            table.append(tok.decode_bytes([i]))
        except ValueError:  # a hole in the vocabulary: decode_bytes raises for it, so must we
            table.append(None)
    get = table.__getitem__

    def decode(ids):
        try:
            return b"".join(map(get, ids)).decode("utf-8", "replace")
        except (TypeError, IndexError):
            return tok.decode(ids)  # an id outside the vocabulary: the tokenizer's own error

    return decode


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n-gram size must be an int >= 1, got {n!r}")
    return n


def _check_texts(texts, where: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{where}: expected a list of texts, got a single {type(texts).__name__}")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{where}[{i}]: expected a str, got {type(t).__name__}")
    return out


class NgramIndex:
    """The set of hashed word n-grams of some training texts; ``dirty(texts)`` says which texts share one."""

    def __init__(self, n: int = 13, short_min_words: int | None = None):
        self.n = _check_n(n)
        if short_min_words is not None:
            if isinstance(short_min_words, bool) or not isinstance(short_min_words, int) \
                    or not 1 <= short_min_words <= n:
                raise ValueError(f"short_min_words must be None or an int in [1, n={n}], got {short_min_words!r}")
        self.short_min_words = short_min_words
        self.hashes = np.empty(0, dtype=np.uint64)  # sorted, unique
        self.documents = 0  # training documents indexed
        self.words = 0  # training words indexed
        self.source = None  # the data directory and split, when built from shards
        self._parts: list[np.ndarray] = []
        self._doc_words: list[np.ndarray] = []  # kept only for short_min_words
        self._short: dict[int, np.ndarray] = {}

    # ---- building ----
    def add(self, text: str) -> None:
        """Index one training document (call ``finish()`` before querying; the constructors do)."""
        wh = _word_hashes(words(text))
        self.documents += 1
        self.words += len(wh)
        g = _gram_hashes(wh, self.n)
        if len(g):
            self._parts.append(g)
        if self.short_min_words is not None and len(wh):
            self._doc_words.append(wh)
        if sum(len(p) for p in self._parts) > 1 << 24:  # bound the unsorted backlog (128 MB)
            self._merge()

    def _merge(self) -> None:
        if self._parts:
            self.hashes = _sorted_unique(np.concatenate([self.hashes, *self._parts]))
            self._parts = []

    def finish(self) -> "NgramIndex":
        self._merge()
        self._short = {}
        return self

    @classmethod
    def from_texts(cls, texts: Iterable[str], n: int = 13, short_min_words: int | None = None) -> "NgramIndex":
        """An index of ``texts`` (each one training document)."""
        idx = cls(n, short_min_words)
        for t in _check_texts(texts, "from_texts: texts"):
            idx.add(t)
        return idx.finish()

    @classmethod
    def from_shards(cls, data_dir: str | os.PathLike, split: str = "train", n: int = 13,
                    short_min_words: int | None = None) -> "NgramIndex":
        """An index of every document of ``split`` in a prepared data directory, decoded with the shards' own
        tokenizer (the copy under ``data_dir/tokenizer/``) and without the document token."""
        from ..data.loader import TokenStream
        from ..data.shards import tokenizer_file
        from ..tokenize import load

        data_dir = Path(data_dir)
        stream = TokenStream(data_dir, split)  # clear errors for a missing dir, manifest, split or shard
        rec = stream.manifest.get("tokenizer") or {}
        tok_path = data_dir / rec["file"] if rec.get("file") else data_dir / "tokenizer"
        if not tok_path.exists():
            raise FileNotFoundError(f"{data_dir}/manifest.json: the shards' tokenizer {tok_path} is missing "
                                    "(needed to decode the training documents)")
        tok = load(tokenizer_file(tok_path))
        decode = _decoder(tok)
        doc_id = rec.get("doc_token_id")
        idx = cls(n, short_min_words)
        starts, lengths = stream.doc_lengths()
        for s, L in zip(starts.tolist(), lengths.tolist()):
            ids = stream.read(s, L)
            if doc_id is not None:
                ids = ids[ids != doc_id]
            idx.add(decode(ids.tolist()))
        idx.source = {"data_dir": str(data_dir), "split": split}
        return idx.finish()

    # ---- querying ----
    def __len__(self) -> int:
        return len(self.hashes)

    def _contains(self, table: np.ndarray, g: np.ndarray) -> bool:
        if len(table) == 0 or len(g) == 0:
            return False
        at = np.searchsorted(table, g)
        at[at == len(table)] = 0
        return bool((table[at] == g).any())

    def _short_table(self, k: int) -> np.ndarray:
        t = self._short.get(k)
        if t is None:
            parts = [_gram_hashes(w, k) for w in self._doc_words]
            t = self._short[k] = _sorted_unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        return t

    def status(self, text: str) -> str:
        """``"dirty"``, ``"clean"`` or ``"short"`` (fewer than n words and not checked whole: clean)."""
        if self._parts:
            self._merge()
        wh = _word_hashes(words(text))
        if len(wh) >= self.n:
            return "dirty" if self._contains(self.hashes, _gram_hashes(wh, self.n)) else "clean"
        if self.short_min_words is None or len(wh) < self.short_min_words:
            return "short"
        return "dirty" if self._contains(self._short_table(len(wh)), _gram_hashes(wh, len(wh))) else "clean"

    def dirty(self, texts: Iterable[str]) -> list[bool]:
        """For each text: does any of its n-grams occur in the index (see the module's note on short texts)."""
        return [self.status(t) == "dirty" for t in _check_texts(texts, "dirty: texts")]


def check(index: NgramIndex, task_docs: dict[str, list[str]]) -> dict[str, dict]:
    """Per task: ``{"clean": c, "dirty": d, "dirty_ids": [positions in the task's list], "short": s}``;
    ``short`` counts the clean texts too short to have an n-gram (never dirty unless the index checks
    short texts whole)."""
    if not isinstance(index, NgramIndex):
        raise TypeError(f"check: index must be a contamination.NgramIndex, got {type(index).__name__}")
    if not isinstance(task_docs, dict):
        raise TypeError(f"check: task_docs must be a dict of task name -> list of texts, got {type(task_docs).__name__}")
    out = {}
    for task, texts in task_docs.items():
        texts = _check_texts(texts, f"check: task_docs[{task!r}]")
        st = [index.status(t) for t in texts]
        dirty_ids = [i for i, s in enumerate(st) if s == "dirty"]
        out[task] = {"clean": len(st) - len(dirty_ids), "dirty": len(dirty_ids), "dirty_ids": dirty_ids,
                     "short": st.count("short")}
    return out
