"""A tiny chat model and a live server on loopback, for the server tests (web chat, fuzz, load).

Knows how to make a 2-layer, 256-token-context Llama-style model with a 400-token BPE
tokenizer that has the chat special tokens, moved off its init so its greedy text depends
on the prompt, and how to run ``build_app`` on it with ``start_in_thread``. Knows nothing
about what the tests check.
"""
from __future__ import annotations

import contextlib
import json
import time
import urllib.request

import torch
from conftest import perturbed

CTX = 256


def tiny_llama(tok, ctx: int = CTX):
    """A 2 x 64 Llama-style model for ``tok``, moved off its init (greedy text depends on the prompt)."""
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    m = Transformer(make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=ctx,
                                norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama"))
    return perturbed(m, 0.3)


def tiny_model(corpus_file, ctx: int = CTX):
    from lmforge import tokenize
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(corpus_file)], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    return tiny_llama(tok, ctx), tok


@contextlib.contextmanager
def live(model, tok, **kw):
    """``build_app(model, tok, **kw)`` served on 127.0.0.1:<free port>; yields (base URL, app)."""
    from lmforge.infer.server import build_app, start_in_thread, stop_thread

    app = build_app(model, tok, **kw)
    server, port = start_in_thread(app, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        stop_thread(server)


def get(base: str, path: str, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers or {}), timeout=30) as r:
        return json.loads(r.read())


def post(base: str, path: str, body: dict, headers: dict | None = None, timeout: float = 60):
    """(status, parsed JSON body) of a JSON POST; 4xx/5xx are returned, not raised."""
    import urllib.error

    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_idle(base: str, total_blocks: int, within: float = 20.0) -> dict:
    """Poll /health until the engine has nothing running or waiting and every KV block is free
    (or ``within`` seconds pass); returns the last /health."""
    deadline = time.time() + within
    while True:
        h = get(base, "/health")
        if (h["running"] == 0 and h["waiting"] == 0 and h["free_blocks"] == total_blocks) or time.time() > deadline:
            return h
        time.sleep(0.1)
