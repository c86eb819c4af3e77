"""The figures behind DedupConfig's defaults (docs/data.md, section 6): true and estimated Jaccard
of copies of 12 plays with 1%, 3%, 5% of their words replaced, and the estimated Jaccard of every
other pair of the 77 built-in texts (the top pairs are the two editions of one play).

    PYTHONPATH=src python tests/dedup_figures.py [SHINGLE_SIZE]     (default 5; about a minute)
"""
import itertools
import random
import sys

import numpy as np

from lmforge.data import corpus_files, dedup


def shingles(words: list[str], k: int) -> set:
    return {tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def main(k: int = 5) -> None:
    texts = {p.name: p.read_text() for p in corpus_files()}
    modern = [n for n in texts if n.endswith("_gut.txt") and len(texts[n]) > 80000]
    rng = random.Random(0)
    mhs = {n: dedup.MinHasher(k, n) for n in (128, 256)}
    rows = []
    for name in modern[:12]:
        words = texts[name].split(" ")
        vocab = sorted(set(words))
        base = shingles(dedup.words_of(texts[name]), k)
        for rate in (0.01, 0.03, 0.05):
            copy = " ".join(w if rng.random() >= rate else rng.choice(vocab) for w in words)
            other = shingles(dedup.words_of(copy), k)
            true = len(base & other) / len(base | other)
            est = [float((mh(texts[name]) == mh(copy)).mean()) for mh in mhs.values()]
            rows.append((rate, true, *est))
    for rate in (0.01, 0.03, 0.05):
        r = np.array([x[1:] for x in rows if x[0] == rate])
        print(f"k={k} {rate:.0%} of words replaced: true J mean {r[:, 0].mean():.3f} lowest {r[:, 0].min():.3f}; "
              f"estimated (128) mean {r[:, 1].mean():.3f} lowest {r[:, 1].min():.3f}; "
              f"(256) mean {r[:, 2].mean():.3f} lowest {r[:, 2].min():.3f}")
    sig = {n: mhs[256](t) for n, t in texts.items()}
    pairs = sorted(((float((sig[a] == sig[b]).mean()), a, b) for a, b in itertools.combinations(sorted(texts), 2)),
                   reverse=True)
    print(f"k={k} all {len(pairs)} pairs of the 77 texts, estimated J (256), highest first:")
    for j, a, b in pairs[:40]:
        print(f"  {j:.3f} {a} {b}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
