"""Quality filters: Gopher quality and repetition rules, C4 line filters, decontamination.

Knows how to judge one document's text and say which rule it fails (and the
measured value); knows nothing about files or counts across documents (the
pipeline keeps the tally and the examples for the report).

The rules and their default thresholds follow the papers:

* Gopher quality (Rae et al. 2021, appendix A): 50..100,000 words, mean word
  length 3..10 characters, symbol (``#``, ``...``) to word ratio <= 0.1, <= 90% of
  lines starting with a bullet, <= 30% ending in an ellipsis, >= 80% of words
  containing a letter, >= 2 of the stop words (the, be, to, of, and, that, have, with).
* Gopher repetition: duplicate lines / paragraphs (share of items, share of
  characters), the most frequent 2-, 3-, 4-gram's share of characters, and the
  share of characters inside repeated 5- to 10-grams.
* C4 (Raffel et al. 2020): drop lines without terminal punctuation, with fewer
  than 3 words, or mentioning javascript / cookie and privacy policies; drop
  documents with "lorem ipsum", a curly bracket, or fewer than 5 sentences left.

``FilterConfig`` holds every threshold; ``None`` turns a single rule off.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .dedup import hash_words

STOP_WORDS = frozenset(["the", "be", "to", "of", "and", "that", "have", "with"])
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·", "‣", "⁃", "◦")
_NGRAM_RE = re.compile(r"\w+")
_PARAS = re.compile(r"\n{2,}")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
              "use cookies")
_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]", re.I)


@dataclass
class FilterConfig:
    gopher_quality: bool = True
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8
    min_stop_words: int | None = 2

    gopher_repetition: bool = True
    max_dup_line_frac: float | None = 0.3
    max_dup_para_frac: float | None = 0.3
    max_dup_line_char_frac: float | None = 0.2
    max_dup_para_char_frac: float | None = 0.2
    max_top_ngram_char_frac: dict = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    max_dup_ngram_char_frac: dict = field(default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12,
                                                                   9: 0.11, 10: 0.10})

    c4: bool = False  # line-level rules written for web pages; off for books and plays
    c4_min_words_per_line: int = 3
    c4_min_sentences: int = 5


def _dup_fracs(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier item, and their share of characters."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup_n / len(items), dup_chars / max(1, total_chars)


def _ngram_hashes(wh: np.ndarray, n: int) -> np.ndarray:
    m = len(wh) - n + 1
    s = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            s = (s * np.uint64(0x100000001B3)) ^ wh[j:j + m]
    return s


def top_ngram_char_frac(wh: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Characters in all occurrences of the most frequent n-gram ÷ characters in all words."""
    if len(wh) < n:
        return 0.0
    g = _ngram_hashes(wh, n)
    uniq, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    top = int(np.argmax(counts))
    if counts[top] < 2:
        return 0.0
    first = int(np.flatnonzero(inv == top)[0])
    return float(counts[top] * lens[first:first + n].sum() / lens.sum())


def dup_ngram_char_frac(wh: np.ndarray, lens: np.ndarray, n: int) -> float:
    """Characters of words covered by any n-gram that occurs more than once ÷ all characters."""
    if len(wh) < n:
        return 0.0
    g = _ngram_hashes(wh, n)
    _, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    dup_start = counts[inv] > 1
    if not dup_start.any():
        return 0.0
    cover = np.zeros(len(wh) + 1, dtype=np.int32)  # difference array of n-word spans
    starts = np.flatnonzero(dup_start)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    covered = np.cumsum(cover[:-1]) > 0
    return float(lens[covered].sum() / lens.sum())


def gopher_quality(text: str, cfg: FilterConfig) -> tuple[str, float] | None:
    """The first Gopher quality rule ``text`` fails, as (rule, value), or None."""
    if cfg.max_words is not None:  # never materialize more than max_words + 1 words
        words = text.split(maxsplit=cfg.max_words)
        if len(words) > cfg.max_words:
            return "gopher_max_words", len(words)
    else:
        words = text.split()
    n = len(words)
    if cfg.min_words is not None and n < cfg.min_words:
        return "gopher_min_words", n
    if n == 0:
        return "gopher_min_words", 0
    mean_len = sum(map(len, words)) / n
    if cfg.min_mean_word_length is not None and mean_len < cfg.min_mean_word_length:
        return "gopher_mean_word_length", mean_len
    if cfg.max_mean_word_length is not None and mean_len > cfg.max_mean_word_length:
        return "gopher_mean_word_length", mean_len
    if cfg.max_symbol_word_ratio is not None:
        r = (text.count("#") + text.count("...") + text.count("…")) / n
        if r > cfg.max_symbol_word_ratio:
            return "gopher_symbol_word_ratio", r
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        if cfg.max_bullet_lines is not None:
            r = sum(ln.lstrip().startswith(BULLETS) for ln in lines) / len(lines)
            if r > cfg.max_bullet_lines:
                return "gopher_bullet_lines", r
        if cfg.max_ellipsis_lines is not None:
            r = sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / len(lines)
            if r > cfg.max_ellipsis_lines:
                return "gopher_ellipsis_lines", r
    if cfg.min_alpha_words is not None:
        # most words are all letters (fast C check); only the rest are looked at closely
        r = (n - sum(1 for w in words if not w.isalpha() and not any(c.isalpha() for c in w))) / n
        if r < cfg.min_alpha_words:
            return "gopher_alpha_words", r
    if cfg.min_stop_words is not None:
        found = 0
        for w in words:
            if w.lower() in STOP_WORDS:
                found += 1
                if found >= cfg.min_stop_words:
                    break
        if found < cfg.min_stop_words:
            return "gopher_stop_words", found
    return None


def gopher_repetition(text: str, cfg: FilterConfig) -> tuple[str, float] | None:
    """The first Gopher repetition rule ``text`` fails, as (rule, value), or None."""
    paras = [p.strip() for p in _PARAS.split(text) if p.strip()]
    pf, pcf = _dup_fracs(paras)
    if cfg.max_dup_para_frac is not None and pf > cfg.max_dup_para_frac:
        return "gopher_dup_para_frac", pf
    if cfg.max_dup_para_char_frac is not None and pcf > cfg.max_dup_para_char_frac:
        return "gopher_dup_para_char_frac", pcf
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    lf, lcf = _dup_fracs(lines)
    if cfg.max_dup_line_frac is not None and lf > cfg.max_dup_line_frac:
        return "gopher_dup_line_frac", lf
    if cfg.max_dup_line_char_frac is not None and lcf > cfg.max_dup_line_char_frac:
        return "gopher_dup_line_char_frac", lcf
    words = _NGRAM_RE.findall(text.lower())
    if not words:
        return None
    wh = hash_words(words)
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    for n, limit in sorted((int(k), v) for k, v in cfg.max_top_ngram_char_frac.items()):
        if limit is not None:
            r = top_ngram_char_frac(wh, lens, n)
            if r > limit:
                return f"gopher_top_{n}gram_char_frac", r
    for n, limit in sorted((int(k), v) for k, v in cfg.max_dup_ngram_char_frac.items()):
        if limit is not None:
            r = dup_ngram_char_frac(wh, lens, n)
            if r > limit:
                return f"gopher_dup_{n}gram_char_frac", r
    return None


def c4_lines(text: str, cfg: FilterConfig) -> tuple[str | None, str | None, int]:
    """C4 rules: returns (kept text or None, the document rule failed or None, lines removed)."""
    low = text.lower()
    if "lorem ipsum" in low:
        return None, "c4_lorem_ipsum", 0
    if "{" in text:
        return None, "c4_curly_bracket", 0
    kept, removed = [], 0
    for line in text.split("\n"):
        s = _CITATION.sub("", line).strip()
        if not s:
            continue
        ls = s.lower()
        if (not s.endswith(_TERMINAL) or s.endswith("...") or len(s.split()) < cfg.c4_min_words_per_line
                or "javascript" in ls or any(p in ls for p in _C4_POLICY)
                or any(len(w) > 1000 for w in s.split())):
            removed += 1
            continue
        kept.append(s)
    out = "\n".join(kept)
    sentences = len(re.findall(r"[.!?]+(?:\s|$)", out))
    if sentences < cfg.c4_min_sentences:
        return None, "c4_min_sentences", removed
    return out + "\n", None, removed


def apply_filters(text: str, cfg: FilterConfig) -> tuple[str | None, str | None, float | None, int]:
    """Run the enabled filters in order. Returns (text or None if dropped, failed rule,
    its value, C4 lines removed)."""
    c4_removed = 0
    if cfg.c4:
        text, rule, c4_removed = c4_lines(text, cfg)
        if text is None:
            return None, rule, None, c4_removed
    if cfg.gopher_quality:
        fail = gopher_quality(text, cfg)
        if fail:
            return None, fail[0], float(fail[1]), c4_removed
    if cfg.gopher_repetition:
        fail = gopher_repetition(text, cfg)
        if fail:
            return None, fail[0], float(fail[1]), c4_removed
    return text, None, None, c4_removed


class Decontaminator:
    """Flags training documents that share an n-gram (default 13 words, lowercased
    ``\\w+`` words) with any evaluation text, as in GPT-3's contamination analysis."""

    def __init__(self, eval_texts, n: int = 13):
        if n < 1:
            raise ValueError(f"decontamination n-gram size must be >= 1, got {n}")
        self.n = n
        grams: list[np.ndarray] = []
        self.num_texts = 0
        for t in eval_texts:
            self.num_texts += 1
            words = _NGRAM_RE.findall(t.lower())
            if len(words) >= n:
                grams.append(_ngram_hashes(hash_words(words), n))
        self.grams = np.unique(np.concatenate(grams)) if grams else np.empty(0, dtype=np.uint64)

    def overlap(self, text: str) -> int:
        """Number of the document's n-grams found in the evaluation texts."""
        if len(self.grams) == 0:
            return 0
        words = _NGRAM_RE.findall(text.lower())
        if len(words) < self.n:
            return 0
        g = _ngram_hashes(hash_words(words), self.n)
        at = np.minimum(np.searchsorted(self.grams, g), len(self.grams) - 1)  # self.grams is sorted (np.unique)
        return int((self.grams[at] == g).sum())
