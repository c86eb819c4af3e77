"""Latency under load: a real `lmforge serve` process on loopback and a load generator.

A ~5M Llama-style model (random weights, a 2k BPE tokenizer) is served; `--clients`
threads send `--requests` streaming chat completions in all (each 64 tokens, a
shared system prompt so prefix caching has something to find) with the official
`openai` client. Reported: time to first token and time between tokens (p50, p90,
p99), request and token throughput, the server's prefix-cache hit rate. There is no
reference server here; the reference column is the same load with one client at a
time (the engine's batching is what makes the difference).

Both loads are warmed up first (one client, then --clients at once, 8 tokens each), so
neither pays the server's cold start alone, and the shared system prompt is in the
prefix cache for both.

Run: python benchmarks/serve_load.py [--requests 32 --clients 8] [--quick]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from _report import report, row


def make_model(d: Path) -> None:
    import torch

    from lmforge import tokenize
    from lmforge.data import corpus_files
    from lmforge.model import ModelConfig, save
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(p) for p in corpus_files()[:8]], 2048,
                         special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS], show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=704,
                      max_seq_len=1024, norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False,
                      out_bias=False, mlp_bias=False, tie_embeddings=False, arch="llama")
    save(Transformer(cfg), d, tokenizer=tok)


def load(base: str, n_requests: int, clients: int, max_tokens: int) -> dict:
    import openai

    c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
    system = "You are a player in a company of actors. Speak in verse, briefly, as the Bard would. " * 3
    ttft, gaps, tokens = [], [], [0]
    lock = threading.Lock()
    todo = list(range(n_requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t0 = time.perf_counter()
            last = None
            n = 0
            stream = c.chat.completions.create(
                model="lm", stream=True, max_tokens=max_tokens, temperature=1.0, seed=i,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": f"Line {i}, please."}])
            for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    now = time.perf_counter()
                    with lock:
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            gaps.append(now - last)
                    last = now
                    n += 1
            with lock:
                tokens[0] += n

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0

    def pct(xs, p):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")

    return {"wall": wall, "ttft": {p: pct(ttft, p) for p in (50, 90, 99)},
            "gap": {p: pct(gaps, p) for p in (50, 90, 99)}, "tokens": tokens[0], "requests": n_requests}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="a smoke run: --requests 8 --clients 4 --max-tokens 16")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.clients, a.max_tokens = 8, 4, 16
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "lm"
        make_model(d)
        proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(d), "--port", "0"],
                                stderr=subprocess.PIPE, text=True)
        try:
            port = int(re.search(r":(\d+)", proc.stderr.readline()).group(1))
            base = f"http://127.0.0.1:{port}"
            load(base, 2, 1, 8)  # warm-up of both loads: one client, then all of them at once
            load(base, a.clients, a.clients, 8)
            one = load(base, max(4, a.requests // 4), 1, a.max_tokens)
            many = load(base, a.requests, a.clients, a.max_tokens)
            health = json.loads(urllib.request.urlopen(base + "/health").read())
        finally:
            proc.terminate()
            proc.wait(10)
    tps_one, tps_many = one["tokens"] / one["wall"], many["tokens"] / many["wall"]
    print(f"{a.clients} clients, {a.requests} requests x {a.max_tokens} tokens: {tps_many:.0f} tok/s, "
          f"{a.requests / many['wall']:.2f} req/s; one client: {tps_one:.0f} tok/s")
    print("time to first token  p50 {:.3f}s  p90 {:.3f}s  p99 {:.3f}s".format(*many["ttft"].values()))
    print("between tokens       p50 {:.4f}s p90 {:.4f}s p99 {:.4f}s".format(*many["gap"].values()))
    print(f"prefix-cache hit rate (prompt tokens served from cached blocks): {health['prefix_hit_rate']:.2f}")
    rows = [row(f"token throughput, {a.clients} concurrent clients vs one at a time", tps_many, tps_one, "tok/s"),
            row("time to first token p50 under load (vs one client)", many["ttft"][50], one["ttft"][50], "s"),
            row("time to first token p99 under load (vs one client)", many["ttft"][99], one["ttft"][99], "s"),
            row("time between tokens p50 under load (vs one client)", many["gap"][50], one["gap"][50], "s"),
            row("time between tokens p99 under load (vs one client)", many["gap"][99], one["gap"][99], "s"),
            row("prefix-cache hit rate", health["prefix_hit_rate"], None, "fraction")]
    report("serve_load", rows)


if __name__ == "__main__":
    main()
