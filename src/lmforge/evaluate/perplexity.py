"""Loss, perplexity and bits per byte of a model on a token stream or a text file.

Knows how to slide non-overlapping windows over a sequence so that every token
but the first is predicted exactly once, and how to turn the summed negative
log-likelihood into bits per byte: ``sum_nll / ln 2 / utf8_bytes``. Bits per
byte does not depend on the tokenizer, so models with different vocabularies
compare fairly. Targets that are the document token (the start of the next
document, which has no bytes) are not counted. Knows nothing about training.

``generate`` is a minimal sampling loop (temperature, top-k, a KV cache) for the
samples the trainer and the pipeline's eval stage print; the inference engine
(``lmforge.infer``) is the full one. The document token and the stop ids come
from the model's ``TokenSpec`` (``lmforge.tokenize.special``); callers pass them.
"""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch

from ..model.kernels import cross_entropy


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


@torch.inference_mode()
def generate(model, ids: list[int], max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 50,
             seed: int = 0, stop: int | Sequence[int] | None = None) -> list[int]:
    """Sample with a KV cache: one forward over the prompt, then one token per step, until a ``stop`` id
    (not returned) or ``max_new_tokens`` (the inference engine adds batching and the full set of sampling
    controls)."""
    from ..infer.cache import KVCache
    from ..infer.fastpath import FastDecoder

    stops = set() if stop is None else {stop} if isinstance(stop, int) else set(stop)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    limit = model.cfg.max_seq_len if model.cfg.pos == "learned" else len(ids) + max_new_tokens
    ids = list(ids)[-max(1, limit - max_new_tokens):] if len(ids) + max_new_tokens > limit else list(ids)
    cache = KVCache(model.cfg, 1, min(limit, len(ids) + max_new_tokens), device=dev,
                    dtype=next(model.parameters()).dtype)
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    out: list[int] = []
    fast = None
    if FastDecoder.supported(model):  # decode steps in one C call each (prefill stays in PyTorch)
        fast = FastDecoder(model)
        fast.bind(cache.k, cache.v)
    for _ in range(max_new_tokens):
        if cache.pos + x.shape[1] > cache.max_len:
            break
        if fast is not None and cache.pos > 0:
            logits = fast.step([out[-1]], [cache.pos], [[0]])[0]
            cache.advance(1)
        else:
            logits = model(x, cache=cache)[0, -1].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.numel()))
                logits[logits < v[-1]] = -float("inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
        if nxt in stops:
            break
        out.append(nxt)
        if fast is None:
            x = torch.tensor([[nxt]], device=dev)
        else:
            x = x[:, :1]  # the C step takes the token itself; x only sets how many positions the next step adds
    if was_training:
        model.train()
    return out
