"""Byte-level BPE: training, encoding and decoding.

Knows bytes, merges and the pre-tokenization pattern; knows nothing about file
formats other than its own JSON (see ``formats.py`` for tiktoken and HF).

How encoding works. Text is split into chunks by a regex (``pretokenize.py``).
Each chunk's UTF-8 bytes start as one token per byte; then, repeatedly, the
adjacent pair with the best (lowest) priority is merged, leftmost first on ties,
until no adjacent pair can merge. A *pair table* ``(left_id, right_id) ->
(priority, result_id)`` drives this. Two kinds of vocabulary fill it:

* ``mode="merges"`` (lmforge-trained, HF-imported): priority = index in the
  ordered merge list.
* ``mode="ranks"`` (tiktoken files): any two adjacent tokens whose
  concatenation is a token may merge, with priority = that token's rank.

With ``whole_word=True`` a chunk that is itself a token is emitted directly
(tiktoken does this; HF calls it ``ignore_merges``). With ``normalizer="nfc"``
(Qwen2's tokenizer.json) text is NFC-normalized before it is split; that is the
only normalizer byte-level BPE supports.

How training works. Chunks are counted once; then the most frequent adjacent
pair is merged, repeatedly, until the vocabulary is full or no pair occurs
``min_frequency`` times. Tie-break (documented and deterministic): among pairs
with the same count, the one whose ``(left_bytes, right_bytes)`` is
lexicographically smallest wins. Counts are kept incrementally: a merge only
touches the words that contain the pair.
"""
from __future__ import annotations

import heapq
import unicodedata
import os
from collections import Counter
from itertools import chain
from typing import Iterable, Sequence

from . import native, pretokenize
from .base import Tokenizer, warn_small_vocab


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters
    (used by HF ``tokenizer.json`` and lmforge's own JSON to write tokens as text)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out = {}
    extra = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def token_to_text(b: bytes) -> str:
    return "".join(BYTE_TO_CHAR[x] for x in b)


def text_to_token(s: str) -> bytes:
    try:
        return bytes(CHAR_TO_BYTE[c] for c in s)
    except KeyError as e:
        raise ValueError(f"token {s!r} has a character {e.args[0]!r} outside the byte-level alphabet") from None


class _ChunkCache(dict):
    """chunk text -> tuple of ids; computes misses with the owner's BPE."""

    __slots__ = ("bpe",)

    def __missing__(self, chunk: str):
        ids = self.bpe(chunk.encode("utf-8"))
        if len(self) < 500_000:
            self[chunk] = ids
        return ids


class ByteBPE(Tokenizer):
    kind = "bpe"

    def __init__(
        self,
        tokens: Sequence[bytes | None],
        *,
        merges: Sequence[tuple[int, int, int]] | None = None,
        pattern: str = "cl100k",
        special_tokens: dict[str, int] | None = None,
        whole_word: bool = True,
        normalizer: str | None = None,
    ):
        """``tokens[i]`` is the bytes of id ``i`` (``None`` for an unused id).
        ``merges`` (``(left, right, result)`` in priority order) selects merge-list
        mode; ``None`` selects tiktoken rank mode. ``normalizer``: None or ``"nfc"``."""
        super().__init__(special_tokens)
        if normalizer not in (None, "nfc"):
            raise ValueError(f"byte-level BPE normalizer must be None or 'nfc', got {normalizer!r}")
        self.normalizer = normalizer
        self.tokens: list[bytes | None] = list(tokens)
        self.pattern, self.pattern_name = pretokenize.resolve(pattern)
        self.whole_word = whole_word
        self.mode = "ranks" if merges is None else "merges"
        self.bytes_to_id: dict[bytes, int] = {}
        for i, t in enumerate(self.tokens):
            if t is not None and t not in self.bytes_to_id:
                self.bytes_to_id[t] = i
        missing = [b for b in range(256) if bytes([b]) not in self.bytes_to_id]
        if missing:
            raise ValueError(f"byte-level BPE vocabulary lacks {len(missing)} single-byte tokens (e.g. {bytes([missing[0]])!r})")
        self.byte_ids = [self.bytes_to_id[bytes([b])] for b in range(256)]
        for s, i in self.special_tokens.items():
            if i < len(self.tokens) and self.tokens[i] is not None:
                raise ValueError(f"special token {s!r} id {i} collides with an ordinary token")
        if merges is None:
            self.merges = None
            self.pairs = self._pairs_from_ranks()
        else:
            self.merges = [tuple(m) for m in merges]
            self.pairs = {}
            for prio, (a, b, r) in enumerate(self.merges):
                self.pairs.setdefault((a, b), (prio, r))
        self._re = pretokenize.compiled(self.pattern)
        self._cache = _ChunkCache()
        self._cache.bpe = self._bpe
        self._native = None
        self._vocab_size = max([len(self.tokens)] + [i + 1 for i in self.special_tokens.values()])

    # ---- construction helpers ---------------------------------------------------------
    def _pairs_from_ranks(self) -> dict[tuple[int, int], tuple[int, int]]:
        pairs = {}
        get = self.bytes_to_id.get
        for r, t in enumerate(self.tokens):
            if t is None or len(t) < 2 or self.bytes_to_id.get(t) != r:
                continue
            for k in range(1, len(t)):
                a = get(t[:k])
                if a is None:
                    continue
                b = get(t[k:])
                if b is not None:
                    pairs[(a, b)] = (r, r)
        return pairs

    def derived_merges(self) -> list[tuple[int, int, int]]:
        """An ordered merge list equivalent to this vocabulary (for HF export).
        In rank mode each token's merge is found by running BPE on its bytes with
        only lower-ranked tokens allowed."""
        if self.merges is not None:
            return list(self.merges)
        out = []
        for r, t in enumerate(self.tokens):
            if t is None or len(t) < 2:
                continue
            parts = [self.byte_ids[x] for x in t]
            while len(parts) > 2:
                best, bi = None, -1
                for i in range(len(parts) - 1):
                    v = self.pairs.get((parts[i], parts[i + 1]))
                    if v is not None and v[0] < r and (best is None or v[0] < best[0]):
                        best, bi = v, i
                if best is None:
                    break
                parts[bi:bi + 2] = [best[1]]
            if len(parts) == 2:
                out.append((parts[0], parts[1], r))
        return out

    # ---- encoding ---------------------------------------------------------------------
    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        if self.whole_word:
            i = self.bytes_to_id.get(piece)
            if i is not None:
                return (i,)
        ids = [self.byte_ids[x] for x in piece]
        pairs = self.pairs
        while len(ids) > 1:
            best_p, best_i, best_r = None, -1, -1
            for i in range(len(ids) - 1):
                v = pairs.get((ids[i], ids[i + 1]))
                if v is not None and (best_p is None or v[0] < best_p):
                    best_p, best_i, best_r = v[0], i, v[1]
            if best_i < 0:
                break
            ids[best_i:best_i + 2] = [best_r]
        return tuple(ids)

    def _get_native(self):
        if self._native is None and native.AVAILABLE and os.environ.get("LMFORGE_NO_NATIVE") != "1":
            self._native = native.make_bpe(self)
            self._threads_parallel = self._native is not None
        return self._native

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode ignoring special tokens (their text is encoded as ordinary text)."""
        if self.normalizer is not None:
            text = unicodedata.normalize("NFC", text)
        nat = self._get_native()
        if nat is not None:
            return nat.encode(text)
        return self.encode_ordinary_py(text)

    def encode_ordinary_py(self, text: str) -> list[int]:
        """The pure-Python path (the readable reference for the C one)."""
        if self.normalizer is not None:
            text = unicodedata.normalize("NFC", text)
        return list(chain.from_iterable(map(self._cache.__getitem__, self._re.findall(text))))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        toks, spec = self.tokens, self._special_by_id
        out = []
        for i in ids:
            t = toks[i] if 0 <= i < len(toks) else None
            if t is None:
                s = spec.get(i)
                if s is None:
                    raise ValueError(f"token id {i} is not in the vocabulary (size {self.vocab_size})")
                t = s.encode("utf-8")
            out.append(t)
        return b"".join(out)

    # ---- vocabulary -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def id_to_token(self, i: int) -> str:
        """The token as text: specials as themselves, others in the byte-level alphabet."""
        if i in self._special_by_id:
            return self._special_by_id[i]
        t = self.tokens[i] if 0 <= i < len(self.tokens) else None
        if t is None:
            raise KeyError(f"token id {i} is not in the vocabulary")
        return token_to_text(t)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        try:
            return self.bytes_to_id.get(text_to_token(token))
        except ValueError:
            return None

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # ---- files ------------------------------------------------------------------------
    def _to_dict(self) -> dict:
        d = {
            "pattern": self.pattern,
            "pattern_name": self.pattern_name,
            "mode": self.mode,
            "whole_word": self.whole_word,
            "tokens": [None if t is None else token_to_text(t) for t in self.tokens],
        }
        if self.merges is not None:
            d["merges"] = [list(m) for m in self.merges]
        if self.normalizer is not None:
            d["normalizer"] = self.normalizer
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "ByteBPE":
        try:
            tokens = [None if t is None else text_to_token(t) for t in d["tokens"]]
            merges = d.get("merges") if d["mode"] == "merges" else None
            return cls(tokens, merges=merges, pattern=d["pattern"],
                       special_tokens=d.get("special_tokens", {}), whole_word=d.get("whole_word", True),
                       normalizer=d.get("normalizer"))
        except KeyError as e:
            raise ValueError(f"{source}: BPE tokenizer lacks the field {e.args[0]!r}") from None

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        data: Iterable[str] | Sequence[str | os.PathLike],
        vocab_size: int,
        *,
        pattern: str = "cl100k",
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (),
        show_progress: bool = True,
        use_native: bool | None = None,
    ) -> "ByteBPE":
        """Train on texts (an iterable of strings) or on files (paths).

        ``vocab_size`` counts the 256 byte tokens, the merges and the special
        tokens; special tokens take the last ids."""
        special_tokens = list(dict.fromkeys(special_tokens))
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size={vocab_size} is below the base alphabet: byte-level BPE needs at least "
                f"256 byte tokens + {len(special_tokens)} special tokens = {256 + len(special_tokens)}"
            )
        counts = count_chunks(data, pattern, show_progress=show_progress, use_native=use_native)
        if not counts:
            raise ValueError("no training text: the input is empty")
        words = list(counts.keys())
        freqs = list(counts.values())
        if use_native is None:
            use_native = native.AVAILABLE
        if use_native:
            merges, tokens = native.bpe_train(words, freqs, n_merges, min_frequency, show_progress)
        else:
            merges, tokens = train_merges_py(words, freqs, n_merges, min_frequency, show_progress)
        specials = {s: len(tokens) + k for k, s in enumerate(special_tokens)}
        tok = cls(tokens, merges=merges, pattern=pattern, special_tokens=specials, whole_word=True)
        warn_small_vocab("bpe", vocab_size, tok.vocab_size, (
            f"only {len(tokens) - 256:,} of the {n_merges:,} merges were found: no pair of adjacent tokens is left "
            f"that occurs at least min_frequency={min_frequency} times in the {len(counts):,} distinct "
            "pre-tokenized chunks of the training text; train on more text or lower min_frequency"))
        return tok


def iter_texts(data) -> Iterable[str]:
    """Yield texts from an iterable of strings or of file paths (UTF-8 checked)."""
    from pathlib import Path

    from .._io import read_text_file

    if isinstance(data, (str, os.PathLike)):
        data = [data]
    for item in data:
        if isinstance(item, os.PathLike) or (isinstance(item, str) and _looks_like_path(item)):
            yield read_text_file(Path(item))
        elif isinstance(item, str):
            yield item
        else:
            raise TypeError(f"training data items must be str or paths, got {type(item).__name__}")


def _looks_like_path(s: str) -> bool:
    return len(s) < 4096 and "\n" not in s and os.path.isfile(s)


def count_chunks(data, pattern: str, show_progress: bool = False, use_native: bool | None = None) -> Counter:
    """Count pre-tokenized chunks (as UTF-8 bytes) over all texts."""
    from .._progress import bar as tqdm

    counts: Counter = Counter()
    _, name = pretokenize.resolve(pattern)
    if use_native is None:
        use_native = native.AVAILABLE
    nat = use_native and native.AVAILABLE and name in native.PATTERN_IDS
    rx = pretokenize.compiled(pattern)
    with tqdm(desc="count chunks", unit="B", unit_scale=True, disable=not show_progress, leave=False) as bar:
        for text in iter_texts(data):
            if nat:
                native.count_chunks_into(counts, text, name)
            else:
                counts.update(rx.findall(text))
            bar.update(len(text))
    if not nat:
        counts = Counter({k.encode("utf-8"): v for k, v in counts.items()})
    return counts


def train_merges_py(words: list[bytes], freqs: list[int], n_merges: int, min_frequency: int,
                    show_progress: bool = False):
    """Pure-Python incremental BPE merge loop over byte strings. Returns ``(merges, tokens)``."""
    tokens = [bytes([b]) for b in range(256)]
    return train_merges_generic([list(w) for w in words], list(freqs), tokens, n_merges, min_frequency,
                                bytes.__add__, show_progress)


def train_merges_generic(seqs: list[list[int]], freqs: list[int], tokens: list, n_new: int, min_frequency: int,
                         concat, show_progress: bool = False):
    """The incremental merge loop shared by BPE and WordPiece training.

    ``seqs`` are the words as token-id sequences, ``tokens`` the starting
    vocabulary (bytes or str), ``concat(a, b)`` the merged token. Stops after
    ``n_new`` new tokens or when the best pair occurs fewer than
    ``min_frequency`` times. Ties: the lexicographically smallest
    ``(tokens[left], tokens[right])`` wins. Returns ``(merges, tokens)``."""
    from .._progress import bar as tqdm

    tokens = list(tokens)
    tok_id = {t: i for i, t in enumerate(tokens)}
    pair_count: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for wi, (s, f) in enumerate(zip(seqs, freqs)):
        for p in zip(s, s[1:]):
            pair_count[p] = pair_count.get(p, 0) + f
            where.setdefault(p, set()).add(wi)
    heap = [(-c, tokens[p[0]], tokens[p[1]], p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[int, int, int]] = []
    bar = tqdm(total=n_new, desc="merges", disable=not show_progress, leave=False)
    new_tokens = 0
    while new_tokens < n_new and heap:
        negc, _, _, p = heapq.heappop(heap)
        c = pair_count.get(p, 0)
        if c != -negc:
            continue  # stale heap entry
        if c < max(min_frequency, 1):
            break
        a, b = p
        merged = concat(tokens[a], tokens[b])
        r = tok_id.get(merged)
        if r is None:
            r = len(tokens)
            tokens.append(merged)
            tok_id[merged] = r
            new_tokens += 1
            bar.update(1)
        merges.append((a, b, r))
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(p, ()):
            s, f = seqs[wi], freqs[wi]
            for q in zip(s, s[1:]):
                pair_count[q] -= f
                touched.add(q)
            out, i, n = [], 0, len(s)
            while i < n:
                if i < n - 1 and s[i] == a and s[i + 1] == b:
                    out.append(r)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[wi] = out
            for q in zip(out, out[1:]):
                pair_count[q] = pair_count.get(q, 0) + f
                where.setdefault(q, set()).add(wi)
                touched.add(q)
        pair_count.pop(p, None)
        for q in touched:
            cq = pair_count.get(q, 0)
            if cq > 0:
                heapq.heappush(heap, (-cq, tokens[q[0]], tokens[q[1]], q))
            else:
                pair_count.pop(q, None)
    bar.close()
    return merges, tokens
