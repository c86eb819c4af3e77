"""Near-duplicate detection side by side with datasketch, and the data pipeline's speed.

Same documents for both (the built-in corpus in 5 KB pieces, plus planted copies
of some pieces with words replaced at rates 0 to 10%), same settings, passed
explicitly to both sides (so a change of lmforge's defaults does not move them):
5-word shingles over lowercased \\w+ words, 128 permutations, LSH at Jaccard 0.8
with bands and rows chosen by equal false-positive / false-negative weights.
Both sides then treat their LSH candidates the same way: a candidate pair is kept
when its estimated Jaccard (the share of equal signature values) is >= 0.8, the
kept pairs are joined into clusters (union-find), and every pair inside a cluster
counts as found.

* datasketch: ``MinHash.update_batch`` on the shingles, ``MinHashLSH`` insert then
  query (its candidates), then that verification and cluster expansion, written
  here with numpy on datasketch's own signatures;
* lmforge: ``MinHasher`` (C) + ``band_keys`` + ``near_clusters`` (which does the
  same verification and union-find itself; in a bucket with more than 64 pairs it
  compares each member with the first one only).

Both single-process, timed end to end (shingling, hashing, LSH, verification), after
a warm-up of each on a few documents; the order alternates between repeats.

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

K, NUM_PERM, THRESHOLD, SEED = 5, 128, 0.8, 1
WEIGHTS = (0.5, 0.5)  # false positive, false negative


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


def clusters_to_pairs(clusters) -> set:
    found = set()
    for members in clusters:  # every pair inside a cluster
        members = sorted(members)
        found.update((x, y) for i, x in enumerate(members) for y in members[i + 1:])
    return found


def verify_and_cluster(candidates, sigs: np.ndarray, threshold: float) -> list[list[int]]:
    """What lmforge's near_clusters does with its candidates, applied to another LSH's:
    keep a pair when its estimated Jaccard is >= threshold, then join kept pairs (union-find)."""
    cand = np.array(sorted(candidates), dtype=np.int64).reshape(-1, 2)
    est = (sigs[cand[:, 0]] == sigs[cand[:, 1]]).mean(axis=1) if len(cand) else np.zeros(0)
    parent: dict[int, int] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for (x, y), j in zip(cand.tolist(), est):
        if j >= threshold:
            rx, ry = find(x), find(y)
            if rx != ry:
                parent[max(rx, ry)] = min(rx, ry)
    groups: dict[int, list[int]] = {}
    for x in list(parent):
        groups.setdefault(find(x), []).append(x)
    return [g for g in groups.values() if len(g) > 1]


def run_datasketch(docs):
    from datasketch import MinHash, MinHashLSH

    from lmforge.data.dedup import words_of  # the same word splitting as lmforge's (included in the time)

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=WEIGHTS)
    mhs = []
    for i, d in enumerate(docs):
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch([s.encode("utf-8") for s in shingles(words_of(d))])
        lsh.insert(i, m)
        mhs.append(m)
    candidates = set()
    for i, m in enumerate(mhs):
        for j in lsh.query(m):
            if j != i:
                candidates.add((min(i, j), max(i, j)))
    sigs = np.stack([m.hashvalues for m in mhs])
    found = clusters_to_pairs(verify_and_cluster(candidates, sigs, THRESHOLD))
    return found, lsh.b, lsh.r, len(candidates)


def run_lmforge(docs):
    from lmforge.data.dedup import MinHasher, band_keys, lsh_params, near_clusters, words_of

    mh = MinHasher(shingle_size=K, num_perm=NUM_PERM, seed=SEED)
    sigs = np.stack([mh.words(words_of(d)) for d in docs])
    b, r = lsh_params(THRESHOLD, NUM_PERM, fp_weight=WEIGHTS[0], fn_weight=WEIGHTS[1])
    keys = band_keys(sigs, b, r)
    clusters = near_clusters(lambda idx: sigs[idx], len(docs), THRESHOLD, b, r, keys=keys)
    found = clusters_to_pairs([rep] + [m for m, _ in members] for rep, members in clusters)
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
    run_lmforge(docs[:50])  # warm-up of both sides
    run_datasketch(docs[:50])
    ours_t, ref_t = [], []
    for i in range(a.repeats):
        for side in (("ours", "ref") if i % 2 == 0 else ("ref", "ours")):  # alternate which goes first
            t0 = time.perf_counter()
            if side == "ours":
                found_ours, b, r = run_lmforge(docs)
                ours_t.append(time.perf_counter() - t0)
            else:
                found_ref, rb, rr, n_cand = run_datasketch(docs)
                ref_t.append(time.perf_counter() - t0)
    to = statistics.median(ours_t)
    tr = statistics.median(ref_t)
    print(f"datasketch: {n_cand} LSH candidate pairs, {len(found_ref)} pairs after verification and clustering")
    truth = truth_pairs(planted, words, found_ours | found_ref)
    print(f"{len(truth)} true pairs (exact Jaccard >= {THRESHOLD}); found: lmforge {len(found_ours)}, "
          f"datasketch {len(found_ref)}")
    p_o, r_o = pr(found_ours, truth)
    p_r, r_r = pr(found_ref, truth)
    print(f"bands x rows: lmforge {b}x{r}, datasketch {rb}x{rr}; shingles {K} words, {NUM_PERM} permutations, "
          f"threshold {THRESHOLD} (explicit on both sides)")
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
