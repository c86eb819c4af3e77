"""Character-level tokenizer: one id per character seen in training (nanoGPT's
shakespeare_char), plus special tokens after them.

Knows its alphabet and nothing else; characters outside it map to ``unk``
(the first character of the alphabet that is listed in ``unk``, else an error).
"""
from __future__ import annotations

from typing import Iterable

from .base import Tokenizer


class CharTokenizer(Tokenizer):
    kind = "char"

    def __init__(self, chars: list[str], special_tokens: dict[str, int] | None = None, unk: str | None = None):
        super().__init__(special_tokens)
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if unk is not None and unk not in self.index:
            raise ValueError(f"unk character {unk!r} is not in the alphabet")
        self.unk = unk

    @classmethod
    def train(cls, texts: Iterable[str], special_tokens: list[str] | None = None, unk: str | None = None,
              **_ignored) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        chars = sorted(seen)
        specials = {s: len(chars) + i for i, s in enumerate(special_tokens or [])}
        return cls(chars, specials, unk)

    def encode_ordinary(self, text: str) -> list[int]:
        idx = self.index
        try:
            return [idx[c] for c in text]
        except KeyError:
            if self.unk is None:
                bad = next(c for c in text if c not in idx)
                raise ValueError(f"character {bad!r} is not in this character tokenizer's alphabet "
                                 f"({len(self.chars)} characters)") from None
            u = idx[self.unk]
            return [idx.get(c, u) for c in text]

    def decode_bytes(self, ids) -> bytes:
        n = len(self.chars)
        return "".join(self.chars[i] if i < n else self._special_by_id.get(i, "") for i in ids).encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.special_tokens)

    def id_to_token(self, i: int) -> str:
        return self.chars[i] if i < len(self.chars) else self._special_by_id[i]

    def token_to_id(self, token: str) -> int | None:
        return self.index.get(token, self.special_tokens.get(token))

    def _to_dict(self) -> dict:
        return {"chars": "".join(self.chars), "unk": self.unk}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "CharTokenizer":
        return cls(list(d["chars"]), d.get("special_tokens", {}), d.get("unk"))

    # HF tokenizer.json: a WordLevel vocabulary of the characters, every character split off
    # on its own, the pieces joined back as they are (without an unk, an unknown character is
    # an error there as here)
    HF_SPLIT = {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": False}

    def to_hf(self) -> dict:
        from .base import hf_added_tokens

        return {"version": "1.0", "truncation": None, "padding": None,
                "added_tokens": hf_added_tokens(self.special_tokens), "normalizer": None,
                "pre_tokenizer": self.HF_SPLIT, "post_processor": None, "decoder": {"type": "Fuse"},
                "model": {"type": "WordLevel", "vocab": dict(self.index), "unk_token": self.unk or ""}}

    @classmethod
    def from_hf(cls, d: dict, path) -> "CharTokenizer":
        m = d["model"]
        specials = {a["content"]: a["id"] for a in d.get("added_tokens", [])}
        vocab = {t: i for t, i in m["vocab"].items() if specials.get(t) != i}
        if d.get("pre_tokenizer") != cls.HF_SPLIT or any(len(t) != 1 for t in vocab) \
                or sorted(vocab.values()) != list(range(len(vocab))):
            raise ValueError(f"{path}: a WordLevel tokenizer is read only as lmforge's character tokenizer "
                             "(one character per id, 0..n-1, each character split off)")
        chars = sorted(vocab, key=vocab.get)
        return cls(chars, specials, m.get("unk_token") or None)
