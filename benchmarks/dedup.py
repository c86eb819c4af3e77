"""Near-duplicate detection side by side with datasketch, and the data pipeline's speed.

Same documents for both (the built-in corpus in 5 KB pieces, plus planted copies
of some pieces with words replaced at rates 0 to 10%), same settings (5-word
shingles over lowercased \\w+ words, 128 permutations, LSH at Jaccard 0.8).
datasketch: ``MinHash.update_batch`` on the shingles, ``MinHashLSH`` insert then
query, its candidates taken as the duplicates (its usual use). lmforge:
``MinHasher`` (C) + ``band_keys`` + ``near_clusters`` (candidates verified by the
estimated Jaccard). Both single-process.

Truth: a planted pair is a duplicate when the exact Jaccard of its shingle sets is
>= 0.8. Precision = found true pairs / found pairs; recall = found true pairs / true pairs.

Also: `prepare` end to end on the built-in corpus (all cores), MB/s of input.

Run: python benchmarks/dedup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _report import report, row

K, NUM_PERM, THRESHOLD = 5, 128, 0.8


def planted_docs(texts, piece=5000, n_copies=400, seed=0):
    rng = random.Random(seed)
    docs = [t[i:i + piece] for t in texts for i in range(0, len(t), piece)]
    docs = [d for d in docs if len(d) > 1000]
    planted = []
    for j in range(n_copies):
        i = rng.randrange(len(docs))
        rate = [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1][j % 7]
        words = docs[i].split(" ")
        docs.append(" ".join(w if rng.random() >= rate else rng.choice(["thee", "thou", "lord", "sir"])
                             for w in words))
        planted.append((i, len(docs) - 1))
    return docs, planted


def shingles(words, k=K):
    return {" ".join(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def truth_pairs(planted, words, extra_pairs):
    """Pairs whose exact shingle Jaccard is >= the threshold, among: each copy with its
    original, copies of the same original with each other, and every pair either method found."""
    family: dict[int, list[int]] = {}
    for i, c in planted:
        family.setdefault(i, [i]).append(c)
    cand = set(extra_pairs)
    for members in family.values():
        cand.update((min(x, y), max(x, y)) for k, x in enumerate(members) for y in members[k + 1:])
    cache: dict[int, set] = {}

    def sh(i):
        if i not in cache:
            cache[i] = shingles(words[i])
        return cache[i]

    return {(x, y) for x, y in cand if len(sh(x) & sh(y)) / len(sh(x) | sh(y)) >= THRESHOLD}


def pr(found, truth):
    tp = len(found & truth)
    return tp / max(1, len(found)), tp / max(1, len(truth))


def run_datasketch(words_list):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    mhs = []
    for i, words in enumerate(words_list):
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in shingles(words)])
        lsh.insert(i, m)
        mhs.append(m)
    found = set()
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j != i:
                found.add((min(i, j), max(i, j)))
    return found, lsh.b, lsh.r


def run_lmforge(docs):
    from lmforge.data.dedup import MinHasher, band_keys, lsh_params, near_clusters, words_of

    mh = MinHasher(K, NUM_PERM)
    sigs = np.stack([mh.words(words_of(d)) for d in docs])
    b, r = lsh_params(THRESHOLD, NUM_PERM)
    keys = band_keys(sigs, b, r)
    clusters = near_clusters(lambda idx: sigs[idx], len(docs), THRESHOLD, b, r, keys=keys)
    found = set()
    for rep, members in clusters:  # every pair inside a cluster
        allm = [rep] + [m for m, _ in members]
        found.update((min(x, y), max(x, y)) for i, x in enumerate(allm) for y in allm[i + 1:])
    return found, b, r


def pipeline_mbps(tmp: Path) -> tuple[float, dict]:
    lf = [sys.executable, "-m", "lmforge.cli"]
    subprocess.run(lf + ["tokenizer", "train", "--vocab-size", "4096", "--out", str(tmp / "tok"), "-q"],
                   check=True, capture_output=True)
    subprocess.run(lf + ["data", "prepare", "--tokenizer", str(tmp / "tok"), "--out", str(tmp / "data"), "-q"],
                   check=True, capture_output=True)
    r = json.loads((tmp / "data" / "report.json").read_text())
    return r["mb_per_s"], r["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from lmforge.data import corpus_files
    from lmforge.data.dedup import NATIVE, words_of

    texts = [p.read_text(encoding="utf-8") for p in corpus_files()]
    docs, planted = planted_docs(texts)
    nbytes = sum(len(d.encode()) for d in docs)
    words = [words_of(d) for d in docs]
    print(f"{len(docs)} documents, {nbytes / 1e6:.2f} MB, {len(planted)} planted copies; "
          f"C extension: {NATIVE}; {os.cpu_count()} cores")
    ours_t, ref_t = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        found_ours, b, r = run_lmforge(docs)
        ours_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # datasketch is given the same word lists' text; its time includes the same word splitting
        found_ref, rb, rr = run_datasketch([words_of(d) for d in docs])
        ref_t.append(time.perf_counter() - t0)
    to = statistics.median(ours_t)
    tr = statistics.median(ref_t)
    truth = truth_pairs(planted, words, found_ours | found_ref)
    print(f"{len(truth)} true pairs (exact Jaccard >= {THRESHOLD}); found: lmforge {len(found_ours)}, "
          f"datasketch {len(found_ref)}")
    p_o, r_o = pr(found_ours, truth)
    p_r, r_r = pr(found_ref, truth)
    print(f"bands x rows: lmforge {b}x{r}, datasketch {rb}x{rr}")
    with tempfile.TemporaryDirectory() as tmp:
        mbps = []
        for _ in range(a.repeats):
            m, secs = pipeline_mbps(Path(tmp))
            mbps.append(m)
            subprocess.run(["rm", "-rf", str(Path(tmp) / "data")])
    rows = []
    rows.append(row("near-dup MinHash+LSH throughput, 1 process, vs datasketch", nbytes / 1e6 / to,
                    nbytes / 1e6 / tr, "MB/s", 3.0))
    rows.append(row("recall on planted duplicates vs datasketch", r_o, r_r, "fraction", 1.0))
    rows.append(row("precision on planted duplicates vs datasketch", p_o, p_r, "fraction", 1.0))
    rows.append(row("prepare end to end on the built-in corpus (all cores; no reference)", statistics.median(mbps),
                    None, "MB/s"))
    report("dedup", rows, f"(medians of {a.repeats}; pipeline stage seconds of the last run: {secs})")


if __name__ == "__main__":
    main()
