"""The interface every lmforge tokenizer has, and the special-token rules.

Knows how special tokens are found in text (allowed / disallowed, as tiktoken
does it), how batches are spread over cores and how files are written; the
subclasses know their own algorithm (BPE, WordPiece, Unigram). A training run
that ends with fewer tokens than asked says so through ``logging`` (logger
``lmforge.tokenize``, ``warn_small_vocab``).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import AbstractSet, Collection, Iterable, Literal, Sequence

import regex

from .._io import write_json

FORMAT = "lmforge.tokenizer"
FORMAT_VERSION = 1
log = logging.getLogger("lmforge.tokenize")


def warn_small_vocab(kind: str, asked: int, got: int, why: str) -> None:
    """Log (warning, logger ``lmforge.tokenize``) that training gave ``got`` tokens, not ``asked``."""
    if got < asked:
        log.warning("%s tokenizer: vocab_size %d asked, %d trained: %s", kind, asked, got, why)


class Tokenizer:
    """Common behaviour. Subclasses implement ``encode_ordinary``, ``decode_bytes``,
    ``id_to_token``, ``token_to_id``, ``vocab_size`` and ``_to_dict``.

    ``special_tokens`` maps a special token's text to its id.
    """

    kind = "base"
    # True when encode_ordinary releases the GIL (C path): batches then use threads.
    _threads_parallel = False

    def __init__(self, special_tokens: dict[str, int] | None = None):
        self.special_tokens: dict[str, int] = dict(special_tokens or {})
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}
        self._special_re_cache: dict[frozenset, "regex.Pattern"] = {}

    # ---- to be provided by subclasses -------------------------------------------------
    def encode_ordinary(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _to_dict(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- special tokens ---------------------------------------------------------------
    def _special_regex(self, tokens: AbstractSet[str]) -> "regex.Pattern":
        key = frozenset(tokens)
        r = self._special_re_cache.get(key)
        if r is None:
            # longest first so that a token that is a prefix of another loses
            alts = sorted(key, key=lambda s: (-len(s), s))
            r = regex.compile("|".join(regex.escape(s) for s in alts))
            self._special_re_cache[key] = r
        return r

    def encode(
        self,
        text: str,
        *,
        allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode ``text`` to ids.

        Special tokens follow tiktoken's rules: those in ``allowed_special`` are
        encoded as their special id; finding one listed in ``disallowed_special``
        (default: every special token not allowed) raises ``ValueError``; any
        other special-token text is encoded as ordinary text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"allowed_special names tokens this tokenizer does not have: {sorted(unknown)}")
        if disallowed_special == "all":
            disallowed = set(self.special_tokens) - allowed
        else:
            disallowed = set(disallowed_special)
            unknown = disallowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"disallowed_special names tokens this tokenizer does not have: {sorted(unknown)}")
        if disallowed and any(s in text for s in disallowed):
            m = self._special_regex(disallowed).search(text)
            if m:
                raise ValueError(
                    f"text contains the special token {m.group()!r}, which is disallowed. "
                    f"Pass allowed_special={{{m.group()!r}}} (or 'all') to encode it as a special token, "
                    "or disallowed_special=() to encode it as ordinary text."
                )
        if not allowed or not any(s in text for s in allowed):
            return self.encode_ordinary(text)
        out: list[int] = []
        start = 0
        for m in self._special_regex(allowed).finditer(text):
            if m.start() > start:
                out.extend(self.encode_ordinary(text[start:m.start()]))
            out.append(self.special_tokens[m.group()])
            start = m.end()
        if start < len(text):
            out.extend(self.encode_ordinary(text[start:]))
        return out

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Decode ids to text. Partial UTF-8 sequences become U+FFFD (``errors='replace'``)."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ---- batches ----------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str], *, num_threads: int | None = None, **kw) -> list[list[int]]:
        """Encode many texts using all cores (threads on the C path, processes otherwise)."""
        n = num_threads or os.cpu_count() or 1
        texts = list(texts)
        if n <= 1 or len(texts) <= 1:
            return [self.encode(t, **kw) for t in texts]
        if hasattr(self, "_get_native"):
            self._get_native()  # the C encoder is built lazily; it decides threads vs processes
        if self._threads_parallel:
            with ThreadPoolExecutor(n) as ex:
                return list(ex.map(lambda t: self.encode(t, **kw), texts))
        return _process_map(self, texts, n, kw)

    def decode_batch(self, batch: Sequence[Sequence[int]], errors: str = "replace") -> list[str]:
        return [self.decode(ids, errors=errors) for ids in batch]

    # ---- files ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": FORMAT, "version": FORMAT_VERSION, "kind": self.kind}
        d.update(self._to_dict())
        d["special_tokens"] = self.special_tokens
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as lmforge JSON, atomically (a failed save leaves nothing behind).
        ``path`` may be a directory (``tokenizer.lmforge.json`` is written inside) or a file."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.lmforge.json")
        write_json(path, self.to_dict())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} vocab_size={self.vocab_size} special={len(self.special_tokens)}>"


# ---- process-pool batches (pure-Python path) -----------------------------------------
_WORKER_TOK: Tokenizer | None = None


def _worker_encode(args):
    texts, kw = args
    return [_WORKER_TOK.encode(t, **kw) for t in texts]


def _process_map(tok: Tokenizer, texts: list[str], n: int, kw: dict) -> list[list[int]]:
    import multiprocessing as mp

    global _WORKER_TOK
    try:
        ctx = mp.get_context("fork")
    except ValueError:  # pragma: no cover - platforms without fork
        return [tok.encode(t, **kw) for t in texts]
    # balance by size: round-robin over texts sorted by length
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    parts = [order[k::n] for k in range(n)]
    _WORKER_TOK = tok
    try:
        with ctx.Pool(n) as pool:
            results = pool.map(_worker_encode, [([texts[i] for i in p], kw) for p in parts])
    finally:
        _WORKER_TOK = None
    out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
    for p, res in zip(parts, results):
        for i, ids in zip(p, res):
            out[i] = ids
    return out


def hf_added_tokens(specials: dict[str, int]) -> list[dict]:
    """Special tokens as HF ``tokenizer.json`` ``added_tokens`` entries, by id."""
    return [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True} for t, i in sorted(specials.items(), key=lambda x: x[1])]


def char_counts(words) -> "Counter[str]":
    """Character frequencies over a ``Counter`` of words."""
    chars: Counter = Counter()
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
    return chars


def load_json_file(path: str | os.PathLike) -> dict:
    """Read a JSON tokenizer file with errors that name the file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tokenizer file") from None
    if not raw.strip():
        raise ValueError(f"{path}: empty file; expected a tokenizer in JSON")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt or truncated tokenizer file ({e}); expected JSON") from None
