"""The ``lmforge eval`` subcommand: loss, perplexity and bits per byte of a model directory.

Knows its arguments, help text, which shards or text file to evaluate on (by
default the run's own) and how to print the result; knows nothing of how the
numbers are computed (``perplexity``), nor of the other stages' subcommands.
"""
from __future__ import annotations

import json
from pathlib import Path

from .._cli_common import _checkpoint


def cmd_eval(a) -> int:
    from .perplexity import evaluate_shards, evaluate_text
    from ..model import load

    _checkpoint(a.checkpoint)
    model, tok = load(a.checkpoint)
    if a.text:
        if tok is None:
            raise ValueError(f"{a.checkpoint}: no tokenizer in the checkpoint; cannot evaluate a text file")
        from ..model import load_tokens

        r = evaluate_text(model, tok, a.text, a.seq_len, batch_size=a.batch_size,
                          doc_token=load_tokens(a.checkpoint, tok).doc)
    else:
        data = a.data
        if data is None:
            tc = Path(a.checkpoint) / "train_config.json"
            if tc.exists():
                t = json.loads(tc.read_text())["train"]
                data = t["data"] or str(Path(a.checkpoint) / "data")
        if data is None:
            raise ValueError("give --text FILE or --data DIR (no training config next to the checkpoint)")
        r = evaluate_shards(model, data, a.split, a.seq_len, batch_size=a.batch_size, tokenizer=tok,
                            tokenizer_name=f"the tokenizer of {a.checkpoint}")
    if a.json:
        print(json.dumps(r))
    else:
        where = {"val": "validation split: ", "test": "test split: ", "train": "training split: "}.get(r.get("split"), "")
        print(f"{where}loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint",
                        description="Evaluate a model directory on its validation (or --split test) shards, other shards or a text "
                        "file: loss (nats/token), perplexity and tokenizer-independent bits per byte.")
    ev.add_argument("--checkpoint", required=True, help="a model directory (lmforge or HF)")
    ev.add_argument("--text", default=None, help="a UTF-8 text file")
    ev.add_argument("--data", default=None, help="a shards directory (default: the run's own)")
    ev.add_argument("--split", default="val", choices=["train", "val", "test"],
                    help="val (validation, default: for choosing settings) or test (for reporting; a directory "
                    "prepared before the test split existed has none)")
    ev.add_argument("--seq-len", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(fn=cmd_eval)
