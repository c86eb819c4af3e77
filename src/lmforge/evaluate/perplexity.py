"""Loss, perplexity and bits per byte of a model on a token stream or a text file.

Knows how to slide non-overlapping windows over a sequence so that every token
but the first is predicted exactly once, and how to turn the summed negative
log-likelihood into bits per byte: ``sum_nll / ln 2 / utf8_bytes``. Bits per
byte does not depend on the tokenizer, so models with different vocabularies
compare fairly. Targets that are the document token (the start of the next
document, which has no bytes) are not counted. Knows nothing about training
or sampling (generation is ``lmforge.infer.loop.generate``).
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..model.kernels import cross_entropy

__all__ = ["evaluate_tokens", "evaluate_shards", "evaluate_text"]


@torch.no_grad()
def evaluate_tokens(model, read, n_tokens: int, seq_len: int, n_bytes: int, batch_size: int = 8,
                    doc_token: int | None = None, max_batches: int = 0, device="cpu", autocast=None) -> dict:
    """``read(start, length) -> np.ndarray``: the token sequence. Returns loss (nats/token),
    perplexity, bits_per_byte and the counts. With ``max_batches`` only the first windows are used
    and bits per byte is scaled by the sequence's tokens per byte."""
    was_training = model.training
    model.eval()
    T = seq_len
    starts = list(range(0, max(0, n_tokens - 1), T))
    if max_batches:
        starts = starts[: max_batches * batch_size]
    nll, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        rows = []
        for s in starts[i:i + batch_size]:
            L = min(T + 1, n_tokens - s)
            r = np.full(T + 1, -1, dtype=np.int64)
            r[:L] = read(s, L)
            rows.append(r)
        t = torch.from_numpy(np.stack(rows)).to(device)
        x, y = t[:, :-1].clamp(min=0), t[:, 1:].clone()
        if doc_token is not None:
            y[y == doc_token] = -1
        with autocast() if autocast else _null():
            logits = model(x)
        loss = cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                             reduction="sum")
        nll += loss.item()
        count += int((y >= 0).sum())
    if was_training:
        model.train()
    mean = nll / max(count, 1)
    real_tokens = n_tokens - 1  # every token but the first is a target
    if max_batches and count < real_tokens:
        bpb = mean * (real_tokens / max(n_bytes, 1)) / math.log(2) if n_bytes else float("nan")
    else:
        bpb = nll / math.log(2) / n_bytes if n_bytes else float("nan")
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "bits_per_byte": bpb,
            "tokens": count, "bytes": n_bytes}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _vocab_guarded(read, vocab_size: int, where: str):
    """``read`` that raises a clear error on a token id the model has no embedding for."""
    def guarded(start: int, length: int):
        arr = read(start, length)
        if len(arr) and int(arr.max()) >= vocab_size:
            bad = int(np.argmax(arr >= vocab_size))
            raise ValueError(f"{where}: token {start + bad} has id {int(arr[bad])}, but the model's vocabulary "
                             f"has {vocab_size} ids (0..{vocab_size - 1}): these shards were made by a larger "
                             "tokenizer than the model's")
        return arr
    return guarded


def evaluate_shards(model, path, split: str = "val", seq_len: int | None = None, tokenizer=None,
                    tokenizer_name: str = "the model's tokenizer", **kw) -> dict:
    """``tokenizer``: the model's, checked against the one that made the shards (see
    ``check_shards_tokenizer``); token ids beyond the model's vocabulary are an error either way."""
    from ..data.loader import TokenStream
    from ..data.shards import check_shards_tokenizer

    s = TokenStream(path, split)
    check_shards_tokenizer(s.manifest, path, tokenizer, tokenizer_name, model.cfg.vocab_size)
    doc_token = s.manifest["tokenizer"].get("doc_token_id")
    T = seq_len or model.cfg.max_seq_len
    read = _vocab_guarded(s.read, model.cfg.vocab_size, f"{path} ({split} split)")
    out = evaluate_tokens(model, read, len(s), T, s.bytes, doc_token=doc_token, **kw)
    out.update(split=split, documents=s.documents)
    return out


_AUTO = object()


def evaluate_text(model, tokenizer, path: str | os.PathLike, seq_len: int | None = None, doc_token=_AUTO,
                  **kw) -> dict:
    """The file as one document: ``doc_token`` (the model's ``TokenSpec.doc``; None: none; by default the
    one ``TokenSpec.for_tokenizer`` infers) first, then its text."""
    from .._io import read_text_file

    text = read_text_file(path)
    if not text:
        raise ValueError(f"{path}: empty file")
    ids = tokenizer.encode(text, disallowed_special=())
    if doc_token is _AUTO:
        from ..tokenize.special import TokenSpec

        doc_token = TokenSpec.for_tokenizer(tokenizer).doc
    doc = doc_token
    if doc is not None:
        ids = [doc] + ids
    arr = np.asarray(ids, dtype=np.int64)
    T = seq_len or model.cfg.max_seq_len
    out = evaluate_tokens(model, lambda s, n: arr[s:s + n], len(arr), T, len(text.encode("utf-8")),
                          doc_token=doc, **kw)
    out.update(file=str(path))
    return out
