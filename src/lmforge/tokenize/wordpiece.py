"""WordPiece (BERT): BERT normalization and pre-tokenization, greedy
longest-match-first encoding, and training.

Knows the BERT text rules (clean-up, CJK spacing, accent stripping,
lower-casing, whitespace and punctuation splits) and the ``##`` continuation
convention. Encoding a word: take the longest vocabulary entry that prefixes
the rest of the word (``##``-prefixed after the first piece); if at some point
nothing matches, the whole word becomes ``[UNK]``. Words longer than
``max_input_chars_per_word`` characters are ``[UNK]`` too.

Training follows what HF ``tokenizers`` does: BPE merges over the
pre-tokenized words, where every symbol but a word's first carries ``##``;
the final vocabulary is specials + alphabet + merged pieces.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from typing import Iterable, Sequence

from .base import Tokenizer, char_counts, hf_added_tokens, warn_small_vocab

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_ws(c: str) -> bool:
    # Rust's char::is_whitespace (the Unicode White_Space property)
    return c in _WHITE_SPACE


_WHITE_SPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                   "\u200a\u2028\u2029\u202f\u205f\u3000")


def _is_control(c: str) -> bool:
    if c in "\t\n\r":
        return False
    return unicodedata.category(c)[0] == "C"


def _is_punct(c: str) -> bool:
    o = ord(c)
    if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
        return True
    return unicodedata.category(c)[0] == "P"


def _is_cjk(o: int) -> bool:
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0x20000 <= o <= 0x2A6DF or 0x2A700 <= o <= 0x2B73F
            or 0x2B740 <= o <= 0x2B81F or 0x2B920 <= o <= 0x2CEAF or 0xF900 <= o <= 0xFAFF or 0x2F800 <= o <= 0x2FA1F)


def bert_normalize(text: str, *, clean_text=True, handle_chinese_chars=True, strip_accents=None,
                   lowercase=True) -> str:
    """HF ``BertNormalizer``: clean, pad CJK, strip accents (default: when lower-casing), lower-case."""
    if clean_text:
        text = "".join(" " if _is_ws(c) else c for c in text
                       if not (c == "\0" or c == "\ufffd" or _is_control(c)))
    if handle_chinese_chars:
        text = "".join(f" {c} " if _is_cjk(ord(c)) else c for c in text)
    if strip_accents if strip_accents is not None else lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    if lowercase:
        text = text.lower()
    return text


def bert_pretokenize(text: str) -> list[str]:
    """HF ``BertPreTokenizer``: split on whitespace (dropped) and punctuation (kept alone)."""
    out: list[str] = []
    cur: list[str] = []
    for c in text:
        if _is_ws(c):
            if cur:
                out.append("".join(cur))
                cur = []
        elif _is_punct(c):
            if cur:
                out.append("".join(cur))
                cur = []
            out.append(c)
        else:
            cur.append(c)
    if cur:
        out.append("".join(cur))
    return out


class WordPiece(Tokenizer):
    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str], *, unk_token="[UNK]", prefix="##", max_input_chars_per_word=100,
                 lowercase=True, strip_accents=None, clean_text=True, handle_chinese_chars=True,
                 special_tokens: dict[str, int] | None = None):
        self.vocab = list(vocab)
        self.token_ids = {}
        for i, t in enumerate(self.vocab):
            self.token_ids.setdefault(t, i)
        if unk_token not in self.token_ids:
            raise ValueError(f"WordPiece vocabulary lacks the unknown token {unk_token!r}")
        if special_tokens is None:
            special_tokens = {s: self.token_ids[s] for s in BERT_SPECIALS if s in self.token_ids}
        super().__init__(special_tokens)
        self.unk_token, self.prefix = unk_token, prefix
        self.unk_id = self.token_ids[unk_token]
        self.max_input_chars_per_word = max_input_chars_per_word
        self.norm = dict(lowercase=lowercase, strip_accents=strip_accents, clean_text=clean_text,
                         handle_chinese_chars=handle_chinese_chars)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._max_len = max((len(t) for t in self.vocab), default=1)

    def encode_word(self, word: str) -> tuple[int, ...]:
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_id,)
        ids, start, n = [], 0, len(word)
        get = self.token_ids.get
        while start < n:
            end = min(n, start + self._max_len)
            found = None
            while end > start:
                sub = word[start:end]
                if start > 0:
                    sub = self.prefix + sub
                found = get(sub)
                if found is not None:
                    break
                end -= 1
            if found is None:
                ids = [self.unk_id]
                break
            ids.append(found)
            start = end
        out = tuple(ids)
        if len(self._cache) < 200_000:
            self._cache[word] = out
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        out: list[int] = []
        for w in bert_pretokenize(bert_normalize(text, **self.norm)):
            out.extend(self.encode_word(w))
        return out

    def decode(self, ids, errors: str = "replace", skip_special_tokens: bool = False) -> str:
        words: list[str] = []
        for i in ids:
            if skip_special_tokens and i in self._special_by_id:
                continue
            t = self.id_to_token(i)
            if t.startswith(self.prefix) and words:
                words[-1] += t[len(self.prefix):]
            else:
                words.append(t)
        return " ".join(words)

    def decode_bytes(self, ids) -> bytes:
        return self.decode(ids).encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < len(self.vocab):
            raise KeyError(f"token id {i} is not in the vocabulary (size {len(self.vocab)})")
        return self.vocab[i]

    def token_to_id(self, token: str) -> int | None:
        return self.token_ids.get(token)

    def _to_dict(self) -> dict:
        return {"vocab": self.vocab, "unk_token": self.unk_token, "prefix": self.prefix,
                "max_input_chars_per_word": self.max_input_chars_per_word, **self.norm}

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "WordPiece":
        try:
            return cls(d["vocab"], unk_token=d["unk_token"], prefix=d.get("prefix", "##"),
                       max_input_chars_per_word=d.get("max_input_chars_per_word", 100),
                       lowercase=d.get("lowercase", True), strip_accents=d.get("strip_accents"),
                       clean_text=d.get("clean_text", True), handle_chinese_chars=d.get("handle_chinese_chars", True),
                       special_tokens=d.get("special_tokens"))
        except KeyError as e:
            raise ValueError(f"{source}: WordPiece tokenizer lacks the field {e.args[0]!r}") from None

    # ---- HF ---------------------------------------------------------------------------
    def to_hf(self) -> dict:
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": hf_added_tokens(self.special_tokens),
            "normalizer": {"type": "BertNormalizer", "clean_text": self.norm["clean_text"],
                           "handle_chinese_chars": self.norm["handle_chinese_chars"],
                           "strip_accents": self.norm["strip_accents"], "lowercase": self.norm["lowercase"]},
            "pre_tokenizer": {"type": "BertPreTokenizer"},
            "post_processor": None,
            "decoder": {"type": "WordPiece", "prefix": self.prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": self.unk_token, "continuing_subword_prefix": self.prefix,
                      "max_input_chars_per_word": self.max_input_chars_per_word,
                      "vocab": {t: i for i, t in enumerate(self.vocab)}},
        }

    @classmethod
    def from_hf(cls, d: dict, path) -> "WordPiece":
        m = d["model"]
        norm = d.get("normalizer") or {}
        if norm and norm.get("type") != "BertNormalizer":
            raise ValueError(f"{path}: WordPiece with normalizer {norm.get('type')!r} is not supported "
                             "(expected BertNormalizer)")
        pre = d.get("pre_tokenizer") or {}
        if pre and pre.get("type") not in ("BertPreTokenizer",):
            raise ValueError(f"{path}: WordPiece with pre_tokenizer {pre.get('type')!r} is not supported")
        vocab_map = m["vocab"]
        vocab = [None] * (max(vocab_map.values()) + 1)
        for t, i in vocab_map.items():
            vocab[i] = t
        specials = {a["content"]: a["id"] for a in d.get("added_tokens", [])}
        return cls(vocab, unk_token=m.get("unk_token", "[UNK]"), prefix=m.get("continuing_subword_prefix", "##"),
                   max_input_chars_per_word=m.get("max_input_chars_per_word", 100),
                   lowercase=norm.get("lowercase", False) if norm else False,
                   strip_accents=norm.get("strip_accents") if norm else False,
                   clean_text=norm.get("clean_text", False) if norm else False,
                   handle_chinese_chars=norm.get("handle_chinese_chars", False) if norm else False,
                   special_tokens=specials)

    # ---- training ---------------------------------------------------------------------
    @classmethod
    def train(cls, data: Iterable[str], vocab_size: int, *, lowercase=True, strip_accents=None,
              special_tokens: Sequence[str] = BERT_SPECIALS, min_frequency: int = 2, prefix="##",
              max_input_chars_per_word=100, limit_alphabet: int | None = 1000, show_progress=True) -> "WordPiece":
        from .bpe import iter_texts, train_merges_generic

        special_tokens = list(dict.fromkeys(special_tokens))
        if "[UNK]" not in special_tokens:
            special_tokens.insert(0, "[UNK]")
        norm = dict(lowercase=lowercase, strip_accents=strip_accents, clean_text=True, handle_chinese_chars=True)
        words: Counter = Counter()
        for text in iter_texts(data):
            words.update(w for w in bert_pretokenize(bert_normalize(text, **norm))
                         if len(w) <= max_input_chars_per_word)
        if not words:
            raise ValueError("no training text: the input is empty")
        chars = char_counts(words)
        alphabet = [ch for ch, _ in sorted(chars.items(), key=lambda x: (-x[1], x[0]))]
        if limit_alphabet is not None:
            alphabet = alphabet[:limit_alphabet]
        keep = set(alphabet)
        base: list[str] = []
        for ch in sorted(keep):
            base.append(ch)
        for ch in sorted(keep):
            base.append(prefix + ch)
        if vocab_size < len(special_tokens) + len(base):
            raise ValueError(f"vocab_size={vocab_size} is below the base alphabet: {len(special_tokens)} special "
                             f"tokens + {len(base)} characters (with their {prefix} forms) are needed")
        tokens = list(base)
        tid = {t: i for i, t in enumerate(tokens)}
        seqs, freqs = [], []
        for w, c in words.items():
            if any(ch not in keep for ch in w):
                continue
            seqs.append([tid[w[0]]] + [tid[prefix + ch] for ch in w[1:]])
            freqs.append(c)
        plen = len(prefix)

        def concat(a: str, b: str) -> str:
            return a + b[plen:]

        n_new = vocab_size - len(special_tokens) - len(base)
        _, tokens = train_merges_generic(seqs, freqs, tokens, n_new, min_frequency, concat, show_progress)
        vocab = special_tokens + tokens
        tok = cls(vocab, prefix=prefix, max_input_chars_per_word=max_input_chars_per_word, **norm,
                  special_tokens={s: i for i, s in enumerate(special_tokens)})
        warn_small_vocab("wordpiece", vocab_size, tok.vocab_size, (
            f"only {len(tokens) - len(base):,} of the {n_new:,} merged tokens were found: no pair of adjacent "
            f"tokens is left that occurs at least min_frequency={min_frequency} times in the {len(seqs):,} "
            "distinct words of the training text; train on more text or lower min_frequency"))
        return tok
