"""Deduplication: exact (normalized-content hash) and near-duplicate (MinHash + LSH).

Knows how to fingerprint a document and how to group fingerprints into
clusters; knows nothing about files or shards. The pipeline computes
fingerprints document by document (in parallel, streaming) and hands the
arrays to ``exact_clusters`` and ``LSHIndex``, which need only a few bytes per
document in memory.

Near-duplicates, step by step:

1. words: the lowercased text split into ``\\w+`` runs (punctuation and layout ignored);
2. shingles: every run of ``shingle_size`` consecutive words, hashed to 32 bits
   (FNV-1a 64 per word, combined, folded);
3. signature: for each of ``num_perm`` hash functions
   ``h_i(x) = ((a_i x + b_i) mod (2^61-1)) & (2^32-1)`` the minimum over the
   shingles. Two documents agree at position i with probability equal to the
   Jaccard similarity of their shingle sets;
4. LSH banding: the signature is cut into ``bands`` bands of ``rows`` rows; two
   documents become candidates when any band is identical, which happens with
   probability ``1 - (1 - J^rows)^bands``, an S-curve whose steep part sits at the
   threshold (``lsh_params`` picks bands and rows for a threshold like datasketch);
5. candidates whose estimated Jaccard (share of equal signature positions) is
   below the threshold are dropped, the rest are joined into clusters
   (union-find); each cluster keeps its first document in stream order.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from .._io import native_extension

_dedup = native_extension("lmforge.data._dedup")

NATIVE = _dedup is not None
_WORD = re.compile(r"\w+")
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1
MERSENNE61 = np.uint64((1 << 61) - 1)


@dataclass
class DedupConfig:
    """Near-duplicate defaults, measured on the built-in plays (docs/data.md): a copy of a play with
    1%, 3%, 5% of its words replaced has a true Jaccard of ~0.92, ~0.78, ~0.66 on 5-word shingles
    (lowest of 12 plays: 0.91, 0.77, 0.65); two different plays <= 0.016 (Love's Labour's Lost and
    The Passionate Pilgrim, which share poems), the two editions of one play 0.12-0.20. The old
    0.8 threshold (datasketch's S-curve, 9 bands x 13 rows) made a 3% copy a candidate with
    probability ~0.2. A 0.5 threshold sits in the wide gap; since every candidate is verified by
    its estimated Jaccard (128 permutations: standard error ~0.04 at 0.65), bands and rows are
    chosen weighting a missed duplicate 9x an extra candidate: 32 bands x 4 rows, candidate
    probability 0.988 at J = 0.6, 0.998 at 0.65, 0.02 at 0.15 (and then rejected). FineWeb uses
    5-word shingles too, with 14 x 8 of 112 hashes and no verification (its curve is centred
    near 0.75, so it would miss most 5% copies)."""
    exact: bool = True
    near: bool = True
    shingle_size: int = 5  # words per shingle
    num_perm: int = 128  # hash functions in a signature
    threshold: float = 0.5  # estimated Jaccard at which two documents are near-duplicates
    bands: int = 0  # 0: chosen from threshold, num_perm and fn_weight (``lsh_params``)
    rows: int = 0
    fn_weight: float = 0.9  # auto bands/rows: weight of a missed duplicate (1 - this: of a verified-away candidate)
    seed: int = 1


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with case and whitespace normalized."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def fnv1a64(word: str) -> int:
    h = FNV_OFFSET
    for byte in word.encode("utf-8", "surrogatepass"):
        h = ((h ^ byte) * FNV_PRIME) & MASK64
    return h


class _WordHasher:
    """Pure-Python word hashing with a cache (the twin of the C ``hash_words``)."""

    def __init__(self):
        self.cache: dict[str, int] = {}

    def __call__(self, words: list[str]) -> np.ndarray:
        c = self.cache
        if len(c) > 1_000_000:
            c.clear()
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = c.get(w)
            if h is None:
                h = c[w] = fnv1a64(w)
            out[i] = h
        return out


_py_hasher = _WordHasher()


def hash_words(words: list[str]) -> np.ndarray:
    if _dedup is not None:
        return np.frombuffer(_dedup.hash_words(words), dtype=np.uint64)
    return _py_hasher(words)


def shingle_hashes(word_hashes: np.ndarray, k: int) -> np.ndarray:
    """32-bit hashes (as uint64) of every run of ``k`` consecutive words."""
    n = len(word_hashes)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    kk = min(k, n)
    m = n - kk + 1
    s = np.zeros(m, dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    with np.errstate(over="ignore"):
        for j in range(kk):
            s = (s * prime) ^ word_hashes[j:j + m]
    return (s >> np.uint64(32)) ^ (s & np.uint64(0xFFFFFFFF))


def minhash_numpy(words: list[str], k: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The readable reference: the MinHash signature (uint32[num_perm]) of ``words``."""
    sh = shingle_hashes(hash_words(words), k)
    sig = np.full(len(a), 0xFFFFFFFF, dtype=np.uint64)
    step = max(1, (1 << 20) // max(1, len(a)))
    with np.errstate(over="ignore"):
        for i in range(0, len(sh), step):
            x = a[:, None] * sh[None, i:i + step] + b[:, None]  # < 2^64: a, b, x < 2^32
            x = (x & MERSENNE61) + (x >> np.uint64(61))
            x = np.where(x >= MERSENNE61, x - MERSENNE61, x) & np.uint64(0xFFFFFFFF)
            sig = np.minimum(sig, x.min(axis=1))
    return sig.astype(np.uint32)


class MinHasher:
    """Signatures for documents: ``MinHasher(cfg)(text) -> uint32[num_perm]``."""

    def __init__(self, shingle_size: int = 5, num_perm: int = 128, seed: int = 1, native: bool | None = None):
        if shingle_size < 1 or num_perm < 2:
            raise ValueError(f"shingle_size must be >= 1 and num_perm >= 2 (got {shingle_size}, {num_perm})")
        self.k = shingle_size
        self.a, self.b = permutations(num_perm, seed)
        self._ab = (self.a.tobytes(), self.b.tobytes())
        self.native = NATIVE if native is None else (native and NATIVE)

    def words(self, words: list[str]) -> np.ndarray:
        if self.native:
            return np.frombuffer(_dedup.minhash(words, self.k, *self._ab), dtype=np.uint32)
        return minhash_numpy(words, self.k, self.a, self.b)

    def __call__(self, text: str) -> np.ndarray:
        return self.words(words_of(text))


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5) -> tuple[int, int]:
    """Bands and rows (bands*rows <= num_perm) minimizing the weighted areas of false
    positives (below the threshold) and false negatives (above) under the S-curve."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    best, best_err = (1, num_perm), float("inf")
    lo = np.linspace(0.0, threshold, 201)
    hi = np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo) if hasattr(np, "trapezoid") else \
                np.trapz(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid(1 - (1 - (1 - hi ** r) ** b), hi) if hasattr(np, "trapezoid") else \
                np.trapz(1 - (1 - (1 - hi ** r) ** b), hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64 keys: a hash of each band's ``rows`` signature values."""
    sigs = np.ascontiguousarray(sigs, dtype=np.uint32)
    n = sigs.shape[0]
    keys = np.empty((n, bands), dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    with np.errstate(over="ignore"):
        for band in range(bands):
            h = np.full(n, FNV_OFFSET, dtype=np.uint64)
            for r in range(rows):
                h = (h ^ sigs[:, band * rows + r].astype(np.uint64)) * prime
            keys[:, band] = h
    return keys


class _UnionFind:
    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent
        root = x
        while p.get(root, root) != root:
            root = p[root]
        while p.get(x, x) != root:
            p[x], x = root, p[x]
        return root

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:  # the smaller index (earlier in the stream) stays the root
            if rx < ry:
                self.parent[ry] = rx
            else:
                self.parent[rx] = ry


def exact_clusters(keys: np.ndarray) -> dict[int, list[int]]:
    """Groups of equal exact keys: ``{first index: [later indices]}``. ``keys``: (N, 16) uint8."""
    if len(keys) == 0:
        return {}
    v = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
    order = np.argsort(v, kind="stable")
    sv = v[order]
    out: dict[int, list[int]] = {}
    starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
    ends = np.r_[starts[1:], len(sv)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            members = np.sort(order[s:e])
            out[int(members[0])] = [int(x) for x in members[1:]]
    return out


def near_clusters(sig_rows, n: int, threshold: float, bands: int, rows: int,
                  keys: np.ndarray | None = None, alive: np.ndarray | None = None,
                  max_group_pairs: int = 64) -> list[tuple[int, list[tuple[int, float]]]]:
    """Near-duplicate clusters among ``n`` documents.

    ``sig_rows(idx_array) -> (len, num_perm) uint32`` reads signatures (they may live on
    disk); ``keys`` are the precomputed ``band_keys``; ``alive`` masks documents already
    removed (exact duplicates, filtered). Returns ``[(representative, [(member,
    estimated Jaccard with the representative), ...]), ...]`` sorted by representative.
    """
    if keys is None:
        keys = band_keys(sig_rows(np.arange(n)), bands, rows)
    idx_all = np.arange(n) if alive is None else np.flatnonzero(alive)
    uf = _UnionFind()
    checked: set[tuple[int, int]] = set()
    for band in range(bands):
        col = keys[idx_all, band]
        order = np.argsort(col, kind="stable")
        sc = col[order]
        starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
        ends = np.r_[starts[1:], len(sc)]
        big = ends - starts > 1
        for s, e in zip(starts[big], ends[big]):
            members = np.sort(idx_all[order[s:e]])
            if len(members) * (len(members) - 1) // 2 <= max_group_pairs:
                pairs = [(int(x), int(y)) for i, x in enumerate(members) for y in members[i + 1:]]
            else:  # a large bucket: compare everyone with its first member only
                pairs = [(int(members[0]), int(y)) for y in members[1:]]
            pairs = [p for p in pairs if p not in checked and uf.find(p[0]) != uf.find(p[1])]
            if not pairs:
                continue
            checked.update(pairs)
            left = sig_rows(np.array([p[0] for p in pairs]))
            right = sig_rows(np.array([p[1] for p in pairs]))
            est = (left == right).mean(axis=1)
            for (x, y), j in zip(pairs, est):
                if j >= threshold:
                    uf.union(x, y)
    groups: dict[int, list[int]] = {}
    for x in list(uf.parent):
        groups.setdefault(uf.find(x), []).append(x)
    out = []
    for rep in sorted(groups):
        members = sorted(m for m in groups[rep] if m != rep)
        if not members:
            continue
        sr = sig_rows(np.array([rep]))
        sm = sig_rows(np.array(members))
        est = (sm == sr).mean(axis=1)
        out.append((rep, [(m, float(j)) for m, j in zip(members, est)]))
    return out
