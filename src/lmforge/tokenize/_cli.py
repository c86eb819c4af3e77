"""The ``lmforge tokenizer`` subcommands: train, encode, decode, stats, import, export, demo.

Knows their arguments, help texts and how each calls the tokenizer library and
prints its result (where a command's text and input files come from included);
knows nothing of how a tokenizer trains or encodes, nor of the other stages' subcommands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .._cli_common import _die, _group


def _inputs(a) -> list[str]:
    if a.input:
        for p in a.input:
            if not Path(p).exists():
                raise FileNotFoundError(f"{p}: no such input file")
        files: list[str] = []
        for p in a.input:
            pp = Path(p)
            files.extend(sorted(str(f) for f in pp.rglob("*") if f.is_file()) if pp.is_dir() else [str(pp)])
        return files
    from ..data import corpus_files

    return [str(p) for p in corpus_files(a.corpus)]


def cmd_tok_train(a) -> int:
    from . import train
    from .special import default_special_tokens

    files = _inputs(a)
    opts: dict = {"show_progress": not a.quiet}
    opts["special_tokens"] = a.special_tokens if a.special_tokens is not None else default_special_tokens(a.kind)
    if a.kind == "bpe":
        opts.update(pattern=a.pattern, min_frequency=a.min_frequency)
    elif a.kind == "wordpiece":
        opts.update(lowercase=not a.cased, min_frequency=a.min_frequency)
    else:
        opts.update(byte_fallback=a.byte_fallback)
    import time

    t0 = time.perf_counter()
    tok = train(a.kind, files, a.vocab_size, **opts)
    dt = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.lmforge.json")
    asked = f" (asked {a.vocab_size})" if a.kind != "char" and tok.vocab_size < a.vocab_size else ""
    print(f"trained {a.kind} tokenizer, vocab {tok.vocab_size}{asked}, on {len(files)} files in {dt:.1f}s -> "
          f"{out / 'tokenizer.lmforge.json'}")
    return 0


def _load(a):
    from . import load

    opts = {"pattern": a.pattern} if getattr(a, "pattern", None) else {}
    return load(a.tokenizer, **opts)


def _read_text(a) -> str:
    from .._io import read_text_file

    if a.file:
        return read_text_file(a.file)
    if a.text is not None:
        return a.text
    return sys.stdin.read()


def cmd_tok_encode(a) -> int:
    tok = _load(a)
    text = _read_text(a)
    allowed = "all" if a.allow_special else frozenset()
    ids = tok.encode(text, allowed_special=allowed, disallowed_special=())
    if a.pieces:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0


def cmd_tok_decode(a) -> int:
    tok = _load(a)
    raw = a.ids if a.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        return _die(f"ids must be integers ({e})")
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")
    return 0


def cmd_tok_stats(a) -> int:
    from .stats import tokenizer_stats

    tok = _load(a)
    text = _read_text(a) if (a.file or a.text is not None) else None
    st = tokenizer_stats(tok, text, top=a.top)
    if a.json:
        print(json.dumps(st, ensure_ascii=False))
        return 0
    print(f"kind {st['kind']}  vocab {st['vocab_size']}  special tokens {st['special_tokens']}")
    if text is not None:
        print(f"text {st['text_bytes']:,} bytes -> {st['tokens']:,} tokens: {st['bytes_per_token']:.3f} bytes/token; "
              f"{st['vocab_used']:,} distinct tokens used ({100 * st['vocab_used_fraction']:.1f}% of the vocabulary)")
    print("longest tokens: " + ", ".join(f"{t['token']!r} ({t['bytes']})" for t in st["longest_tokens"]))
    return 0


def cmd_tok_import(a) -> int:
    tok = _load(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.lmforge.json")
    print(f"imported {a.tokenizer} ({tok.kind}, vocab {tok.vocab_size}) -> {out / 'tokenizer.lmforge.json'}")
    return 0


def cmd_tok_export(a) -> int:
    tok = _load(a)
    out = Path(a.out)
    if a.format == "hf":
        from .formats import save_hf

        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / "tokenizer.json"
        save_hf(tok, out)
    elif a.format == "tiktoken":
        from .formats import save_tiktoken

        save_tiktoken(tok, out)
    elif a.format == "sentencepiece":
        if not hasattr(tok, "save_sentencepiece"):
            return _die("sentencepiece export is for unigram tokenizers")
        tok.save_sentencepiece(out)
    print(f"wrote {out}")
    return 0


def cmd_tok_demo(a) -> int:
    from .demo import format_table, run_demo

    summary = run_demo(a.out, a.vocab_size)
    print(format_table(summary))
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    tsub = _group(sub, "tokenizer", help="tokenizers: train, encode, decode, stats, import, export",
                  description="Byte-level BPE, WordPiece and Unigram tokenizers.")

    def tok_arg(sp, required=True):
        sp.add_argument("--tokenizer", "-t", required=required,
                        help="tokenizer: a directory, lmforge JSON, HF tokenizer.json, .tiktoken or .model file")
        sp.add_argument("--pattern", default=None, help="pre-tokenization pattern for .tiktoken files "
                        "(cl100k, o200k, gpt2 or a regex)")

    def text_args(sp):
        sp.add_argument("text", nargs="?", default=None, help="text (default: stdin)")
        sp.add_argument("--file", "-f", default=None, help="read the text from a UTF-8 file")

    tr = tsub.add_parser("train", help="train a tokenizer", description="Train a tokenizer on files or directories "
                         "(default: the built-in corpus) and write OUT/tokenizer.lmforge.json.")
    tr.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], default="bpe")
    tr.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary size incl. special tokens")
    tr.add_argument("--input", nargs="*", default=None, help="text files or directories")
    tr.add_argument("--corpus", default="shakespeare", help="built-in corpus when no --input is given")
    tr.add_argument("--pattern", default="cl100k", help="BPE pre-tokenization: gpt2, cl100k, o200k or a regex")
    tr.add_argument("--min-frequency", type=int, default=2, help="BPE/WordPiece: stop when the best pair is rarer")
    tr.add_argument("--special-tokens", nargs="*", default=None,
                    help="special tokens (default: the family's own - BPE <|endoftext|>; WordPiece [PAD] [UNK] "
                    "[CLS] [SEP] [MASK]; Unigram <unk> <s> </s> - then the chat tokens <|bos|> <|system|> "
                    "<|user|> <|assistant|> <|end|>)")
    tr.add_argument("--cased", action="store_true", help="WordPiece: keep case and accents")
    tr.add_argument("--byte-fallback", action="store_true", help="Unigram: <0xXX> pieces for unknown characters")
    tr.add_argument("--out", "-o", required=True, help="output directory")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    tr.set_defaults(fn=cmd_tok_train)

    en = tsub.add_parser("encode", help="text -> ids", description="Encode text to token ids (or pieces).")
    tok_arg(en)
    text_args(en)
    en.add_argument("--pieces", action="store_true", help="print tokens instead of ids")
    en.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    en.set_defaults(fn=cmd_tok_encode)

    de = tsub.add_parser("decode", help="ids -> text", description="Decode token ids (arguments or stdin).")
    tok_arg(de)
    de.add_argument("ids", nargs="*", help="token ids")
    de.set_defaults(fn=cmd_tok_decode)

    st = tsub.add_parser("stats", help="bytes/token, vocabulary use, longest tokens",
                         description="Statistics of a tokenizer, and of its encoding of a text if one is given.")
    tok_arg(st)
    text_args(st)
    st.add_argument("--top", type=int, default=10, help="how many longest / most common tokens to show")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(fn=cmd_tok_stats)

    im = tsub.add_parser("import", help="convert a tiktoken/HF/sentencepiece file to lmforge JSON",
                         description="Read any supported tokenizer file and write OUT/tokenizer.lmforge.json.")
    tok_arg(im)
    im.add_argument("--out", "-o", required=True)
    im.set_defaults(fn=cmd_tok_import)

    ex = tsub.add_parser("export", help="write HF tokenizer.json, tiktoken ranks or a sentencepiece .model",
                         description="Export a tokenizer to another project's format.")
    tok_arg(ex)
    ex.add_argument("--format", choices=["hf", "tiktoken", "sentencepiece"], required=True)
    ex.add_argument("--out", "-o", required=True)
    ex.set_defaults(fn=cmd_tok_export)
    dm = tsub.add_parser("demo", help="train all three kinds on the built-in corpus and compare",
                         description="The tokenizer stage end to end on the built-in corpus.")
    dm.add_argument("--out", "-o", default="runs/tokenizer-demo")
    dm.add_argument("--vocab-size", type=int, default=8192)
    dm.set_defaults(fn=cmd_tok_demo)
