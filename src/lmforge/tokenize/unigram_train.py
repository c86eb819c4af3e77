"""EM training of a Unigram tokenizer (the sentencepiece recipe, written out).

Knows how to go from text to a scored piece vocabulary; the ``Unigram`` class
knows how to use one. Steps:

1. Normalize (sentencepiece rules, identity map) and count words: each
   whitespace-separated word becomes ``▁word``.
2. Seed: every character (up to ``character_coverage``) and the most frequent
   substrings (``freq * length``), up to ``seed_size`` pieces. A piece holds
   ``▁`` only at its start and never mixes digits, letters and other symbols.
3. EM: the E-step runs forward-backward over each word's lattice and adds up
   expected piece counts; the M-step sets ``score = digamma(count) -
   digamma(total)`` (the Bayesian update sentencepiece uses) and drops pieces
   expected less than 0.5 times.
4. Prune: for each piece, the likelihood lost if it were removed and its
   occurrences re-segmented with the remaining pieces; keep the best
   ``shrinking_factor`` share. Repeat 3-4 until ``1.1 * vocab_size`` pieces,
   then keep the ``vocab_size`` best by score.
"""
from __future__ import annotations

import math
import unicodedata
from collections import Counter

from . import native
from .base import char_counts
from .spm_model import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, Normalizer


def _digamma(x: float) -> float:
    r = 0.0
    while x < 7:
        r -= 1 / x
        x += 1
    x -= 0.5
    xx = 1 / x
    xx2 = xx * xx
    xx4 = xx2 * xx2
    return r + math.log(x) + (1 / 24) * xx2 - (7.0 / 960.0) * xx4 + (31.0 / 8064.0) * xx4 * xx2 - (
        127.0 / 30720.0) * xx4 * xx4


def _cls(c: str) -> int:
    if c.isdigit():
        return 1
    if c.isalpha() or unicodedata.category(c)[0] == "M":
        return 2
    return 3


def _valid(piece: str) -> bool:
    body = piece[1:] if piece.startswith(SPACE) else piece
    if not body or SPACE in body:
        return piece == SPACE
    k = _cls(body[0])
    return all(_cls(c) == k for c in body[1:])


# ---- lattice passes (pure-Python twins of the C functions) ---------------------------------

def _word_nodes(word: str, table: dict[str, tuple[int, float]], max_len: int):
    n = len(word)
    begins = [[] for _ in range(n)]
    for s in range(n):
        for e in range(s + 1, min(n, s + max_len) + 1):
            hit = table.get(word[s:e])
            if hit is not None:
                begins[s].append((e, hit[0], hit[1]))
    return begins


def estep_py(words, counts, table, max_len, n_pieces):
    """Expected piece counts (forward-backward) and the corpus log-likelihood."""
    expected = [0.0] * n_pieces
    objective = 0.0
    for w, c in zip(words, counts):
        n = len(w)
        begins = _word_nodes(w, table, max_len)
        alpha = [-math.inf] * (n + 1)
        alpha[0] = 0.0
        for s in range(n):
            if alpha[s] == -math.inf:
                continue
            for e, _, sc in begins[s]:
                v = alpha[s] + sc
                a = alpha[e]
                alpha[e] = v if a == -math.inf else max(a, v) + math.log1p(math.exp(-abs(a - v)))
        beta = [-math.inf] * (n + 1)
        beta[n] = 0.0
        for s in range(n - 1, -1, -1):
            acc = -math.inf
            for e, _, sc in begins[s]:
                v = beta[e] + sc
                acc = v if acc == -math.inf else max(acc, v) + math.log1p(math.exp(-abs(acc - v)))
            beta[s] = acc
        z = alpha[n]
        if z == -math.inf:
            continue
        objective += c * z
        for s in range(n):
            for e, i, sc in begins[s]:
                expected[i] += c * math.exp(alpha[s] + sc + beta[e] - z)
    return expected, objective


def viterbi_py(word, table, max_len, exclude=-1):
    """Best segmentation of ``word`` as a list of piece ids (``None`` if impossible)."""
    n = len(word)
    best = [-math.inf] * (n + 1)
    back = [None] * (n + 1)
    best[0] = 0.0
    begins = _word_nodes(word, table, max_len)
    for s in range(n):
        if best[s] == -math.inf:
            continue
        for e, i, sc in begins[s]:
            if i == exclude:
                continue
            if best[s] + sc > best[e]:
                best[e] = best[s] + sc
                back[e] = (s, i)
    if back[n] is None:
        return None
    out, e = [], n
    while e > 0:
        s, i = back[e]
        out.append(i)
        e = s
    return out[::-1]


def train_unigram(cls, data, vocab_size: int, *, seed_size: int = 200_000, max_piece_length: int = 16,
                  shrinking_factor: float = 0.75, num_sub_iterations: int = 2, character_coverage: float = 0.9995,
                  byte_fallback: bool = False, special_tokens=("<unk>", "<s>", "</s>"), show_progress: bool = True,
                  use_native: bool | None = None):
    from .._progress import bar as tqdm

    from .bpe import iter_texts

    if use_native is None:
        use_native = native.AVAILABLE
    special_tokens = list(dict.fromkeys(special_tokens))
    if "<unk>" not in special_tokens:
        special_tokens.insert(0, "<unk>")
    norm = Normalizer(b"")
    words: Counter = Counter()
    for text in iter_texts(data):
        for line in text.splitlines():
            s = norm.normalize(line)
            if s:
                words.update(SPACE + w for w in s.split(SPACE) if w)
    if not words:
        raise ValueError("no training text: the input is empty")
    chars = char_counts(words)
    total_chars = sum(chars.values())
    kept_chars, acc = [], 0
    for ch, c in sorted(chars.items(), key=lambda x: (-x[1], x[0])):
        if acc / total_chars >= character_coverage and kept_chars:
            break
        kept_chars.append(ch)
        acc += c
    reserved = len(special_tokens) + (256 if byte_fallback else 0)
    if vocab_size < reserved + len(kept_chars):
        raise ValueError(f"vocab_size={vocab_size} is below the base alphabet: {reserved} reserved pieces + "
                         f"{len(kept_chars)} characters are needed")
    # seed pieces: frequent substrings
    subs: Counter = Counter()
    for w, c in words.items():
        n = len(w)
        for s in range(n):
            for e in range(s + 2, min(n, s + max_piece_length) + 1):
                subs[w[s:e]] += c
    cand = [(c * len(p), p) for p, c in subs.items() if c > 1 and _valid(p)]
    cand.sort(key=lambda x: (-x[0], x[1]))
    charset = set(kept_chars)
    pieces = {ch: float(chars[ch]) for ch in kept_chars}
    for sc, p in cand[: max(0, seed_size - len(pieces))]:
        if all(ch in charset for ch in p):
            pieces[p] = float(subs[p])
    del subs, cand
    wlist = list(words.keys())
    wcount = list(words.values())
    desired = max(len(kept_chars), int((vocab_size - reserved) * 1.1))
    final = vocab_size - reserved

    def normalize_scores(p: dict[str, float]) -> dict[str, float]:
        tot = math.log(sum(p.values()))
        return {k: math.log(v) - tot for k, v in p.items()}

    scores = normalize_scores(pieces)
    bar = tqdm(desc="unigram EM", total=None, disable=not show_progress, leave=False)

    def run_estep(scores):
        names = list(scores)
        table = {p: (i, scores[p]) for i, p in enumerate(names)}
        if use_native:
            exp, obj = native.unigram_estep(wlist, wcount, names, [scores[p] for p in names], max_piece_length)
        else:
            exp, obj = estep_py(wlist, wcount, table, max_piece_length, len(names))
        return names, exp, obj

    while True:
        for _ in range(num_sub_iterations):
            names, exp, obj = run_estep(scores)
            kept = {p: e for p, e in zip(names, exp) if e >= 0.5 or len(p) == 1}
            total = sum(kept.values())
            dg = _digamma(total)
            scores = {p: _digamma(max(e, 1e-9)) - dg for p, e in kept.items()}
            bar.set_postfix(pieces=len(scores), loglik=f"{obj:.4g}")
            bar.update(1)
        if len(scores) <= desired:
            break
        scores = _prune(scores, wlist, wcount, max_piece_length, shrinking_factor, desired, use_native)
    bar.close()
    singles = [p for p in scores if len(p) == 1]
    multi = sorted((p for p in scores if len(p) > 1), key=lambda p: (-scores[p], p))
    chosen = set(singles) | set(multi[: max(0, final - len(singles))])
    ordered = sorted(chosen, key=lambda p: (-scores[p], p))
    out = []
    for s in special_tokens:
        out.append((s, 0.0, UNKNOWN if s == "<unk>" else CONTROL))
    if byte_fallback:
        out += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    out += [(p, scores[p], NORMAL) for p in ordered]
    return cls(out, byte_fallback=byte_fallback, normalizer_name="identity")


def _prune(scores, wlist, wcount, max_len, shrinking_factor, desired, use_native):
    """Drop the pieces whose removal costs the least likelihood."""
    names = list(scores)
    idx = {p: i for i, p in enumerate(names)}
    table = {p: (i, scores[p]) for i, p in enumerate(names)}
    # how often each piece appears in the best segmentations
    freq = [0.0] * len(names)
    if use_native:
        segs = native.unigram_viterbi_batch(wlist, names, [scores[p] for p in names], max_len)
    else:
        segs = [viterbi_py(w, table, max_len) for w in wlist]
    for seg, c in zip(segs, wcount):
        if seg:
            for i in seg:
                freq[i] += c
    total = sum(freq)
    if total <= 0:
        return scores
    logsum = math.log(total)
    # the best segmentation of each piece without the piece itself
    cands = [p for p in names if len(p) > 1]
    if use_native:
        alts = native.unigram_viterbi_batch(cands, names, [scores[p] for p in names], max_len,
                                            [idx[p] for p in cands])
    else:
        alts = [viterbi_py(p, table, max_len, exclude=idx[p]) for p in cands]
    losses = []
    for p, alt in zip(cands, alts):
        i = idx[p]
        f = freq[i]
        if f <= 0:
            losses.append((0.0, p))
            continue
        if alt is None:
            continue  # cannot be removed
        logsum_alt = math.log(total + f * (len(alt) - 1))
        lp = math.log(f) - logsum
        lp_alt = sum(math.log(freq[j] + f) - logsum_alt for j in alt)
        losses.append((f / total * (lp - lp_alt), p))
    losses.sort(key=lambda x: (-x[0], x[1]))
    n_single = sum(1 for p in scores if len(p) == 1)
    keep_n = max(desired - n_single, int(len(scores) * shrinking_factor) - n_single)
    keep = {p for _, p in losses[:keep_n]}
    removable = {p for _, p in losses}
    return {p: s for p, s in scores.items() if len(p) == 1 or p in keep or p not in removable}
