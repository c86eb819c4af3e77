"""Bigram initialization: a fresh model that already predicts like the training data's bigram model.

The idea. A new decoder first spends its early steps learning the bigram statistics
of its data (which token follows which); those can be counted in one pass instead.
With zero-initialized output projections (``zero_init_proj``) every block adds
nothing at first, so the initial model computes

    logits(next | token i) = W_head · norm_f(e_i)

which is exactly a rank-d factorization of a V x V table. This module fills ``e``
(the token embeddings) and ``W_head`` so that table is the training split's
smoothed bigram log-probabilities:

1. count the pairs (a, b) of consecutive training tokens (the trainer passes at most ``init_tokens``);
2. smooth each row with Witten-Bell interpolation (no knob to tune): the weight of
   the row's own counts is n_i / (n_i + u_i), with u_i the number of distinct
   successors, and the rest goes to the (add-1/2) unigram distribution;
3. take the log, centre each row (softmax ignores a row's constant) and keep the
   best rank d-1 approximation (a randomized truncated SVD): M ≈ A Bᵀ;
4. RMSNorm divides each embedding by its own size, which would give every row its
   own temperature. The spare d-th coordinate pads every row of A to the same size
   R·sqrt(d), and the head ignores that coordinate, so norm_f(e_i) = A_i / R exactly
   and the head is R·B.

Training then starts from the bigram model (on the built-in Shakespeare text with a
2k-token BPE, ~2.7 bits per byte instead of log2(V)/bytes-per-token ≈ 3.6) and the
blocks learn what the bigram cannot. The embeddings are scaled to rms ``scale``.
"""
from __future__ import annotations

import math

import numpy as np
import torch

MAX_VOCAB = 8192  # the V x V table is float32: 256 MB at 8192


def check_model(model) -> None:
    cfg = model.cfg
    why = []
    if not cfg.zero_init_proj:
        why.append("zero_init_proj=False (blocks must add nothing at the start)")
    if cfg.tie_embeddings:
        why.append("tied embeddings (the head and the embeddings play different roles)")
    if cfg.pos != "rope":
        why.append(f"pos={cfg.pos!r} (learned positions add to the embeddings; use rope)")
    if cfg.logit_softcap:
        why.append("logit soft-capping")
    if cfg.norm != "rmsnorm":
        why.append(f"norm={cfg.norm!r} (the padding trick needs RMSNorm)")
    if cfg.vocab_size > MAX_VOCAB:
        why.append(f"vocab_size {cfg.vocab_size} > {MAX_VOCAB} (the bigram table would not fit)")
    if cfg.d_model < 2:
        why.append("d_model < 2")
    if why:
        raise ValueError("init=bigram needs a model whose start is a plain bigram factorization; this one has "
                         + "; ".join(why))


def bigram_log_probs(tokens: np.ndarray, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Witten-Bell smoothed log P(b | a) as a (V, V) float32 tensor, and the context counts n_a."""
    V = vocab_size
    t = np.asarray(tokens, dtype=np.int64)
    if len(t) < 2:
        raise ValueError("init=bigram needs at least 2 training tokens")
    if t.min() < 0 or t.max() >= V:
        raise ValueError(f"training tokens outside the vocabulary [0, {V})")
    C = torch.from_numpy(np.bincount(t[:-1] * V + t[1:], minlength=V * V).astype(np.float32).reshape(V, V))
    n = C.sum(1, keepdim=True)
    u = (C > 0).sum(1, keepdim=True).to(torch.float32)
    uni = C.sum(0) + 0.5
    uni /= uni.sum()
    lam = n / (n + u).clamp(min=1.0)
    P = C.div_(n.clamp(min=1.0)).mul_(lam).add_((1 - lam) * uni)
    return P.log_(), n[:, 0]


@torch.no_grad()
def bigram_init(model, tokens: np.ndarray, scale: float = 1.0, seed: int = 0) -> dict:
    """Set the embeddings and head of ``model`` (fresh, see ``check_model``) to the bigram
    factorization of ``tokens``. Returns what it did (rank, the fit's size)."""
    check_model(model)
    cfg = model.cfg
    V, d = cfg.vocab_size, cfg.d_model
    M, _ = bigram_log_probs(tokens, V)
    M -= M.mean(1, keepdim=True)
    r = d - 1
    with torch.random.fork_rng(devices=[]):  # the training run's random stream stays as it was
        torch.manual_seed(seed)
        U, S, Vt = torch.svd_lowrank(M, q=min(r + 8, V), niter=2)
    r = min(r, S.numel())
    A, B = U[:, :r] * S[:r], Vt[:, :r]
    sq = (A * A).sum(1)
    R = math.sqrt(float(sq.max()) / d * (1 + 1e-4)) or 1.0  # every row padded to rms R
    pad = (d * R * R - sq).clamp(min=0).sqrt()
    E = torch.zeros(V, d)
    E[:, :r], E[:, r] = A, pad
    W = torch.zeros(V, d)
    W[:, :r] = B * R
    dev = model.tok_emb.weight.device
    model.tok_emb.weight.copy_((E * (scale / R)).to(dev))
    # norm_f(e) = e / rms(e) * g with g = 1: the head sees A / R
    model.norm_f.weight.fill_(1.0)
    model.lm_head.weight.copy_(W.to(dev))
    return {"rank": r, "tokens": int(len(tokens)), "scale": scale}
