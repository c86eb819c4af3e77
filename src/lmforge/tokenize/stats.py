"""Tokenizer statistics: compression, vocabulary use, longest tokens.

Knows how to measure a tokenizer on a text; knows nothing of training.
"""
from __future__ import annotations

from collections import Counter

from .base import Tokenizer


def tokenizer_stats(tok: Tokenizer, text: str | None = None, top: int = 10) -> dict:
    """``bytes_per_token``, vocabulary usage and the longest tokens (by bytes)."""
    out: dict = {"kind": tok.kind, "vocab_size": tok.vocab_size, "special_tokens": len(tok.special_tokens)}
    lengths = []
    for i in range(tok.vocab_size):
        try:
            b = tok.decode_bytes([i]) if tok.kind == "bpe" else tok.id_to_token(i).encode("utf-8")
        except (KeyError, ValueError):
            continue
        lengths.append((len(b), i))
    lengths.sort(key=lambda x: (-x[0], x[1]))
    out["longest_tokens"] = [{"id": i, "token": tok.id_to_token(i), "bytes": n} for n, i in lengths[:top]]
    if text is not None:
        ids = tok.encode(text, disallowed_special=())
        nbytes = len(text.encode("utf-8"))
        used = Counter(ids)
        out.update({
            "text_bytes": nbytes,
            "tokens": len(ids),
            "bytes_per_token": nbytes / max(1, len(ids)),
            "vocab_used": len(used),
            "vocab_used_fraction": len(used) / max(1, tok.vocab_size),
            "most_common": [{"id": i, "token": tok.id_to_token(i), "count": c} for i, c in used.most_common(top)],
        })
    return out
