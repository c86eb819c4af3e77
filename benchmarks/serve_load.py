"""The server under load: the new uvicorn + Starlette server against the old stdlib one.

Both serve the same ~5M Llama-style model (random weights, a 2k BPE tokenizer) with
the same engine settings (--num-blocks, --block-size 16, --max-batch-tokens 512), each in
its own process on loopback. The load is the same for both: `--clients` concurrent
clients send `--requests` streaming chat completions in all (greedy, `--max-tokens` each,
a shared system prompt so prefix caching has something to find), from one asyncio
process with httpx. Reported: requests/s and tokens/s (completion tokens from each
stream's `usage`), time to first token p50/p99, time between tokens p50, and the new
server's prefix-cache hit rate.

The reference is the server of commit a815afc (`ThreadingHTTPServer`, one thread per
connection, the same engine), read at run time with `git show a815afc:src/lmforge/infer/server.py`
into a temporary module whose relative imports point at today's `lmforge.infer.engine` and
`lmforge.infer.sampling` (run from a git checkout). Before timing, both servers must give the
same greedy reply to the same chat request, which shows the old file still works against
today's engine.

Method: both servers start at once and both are warmed up (one client, then `--clients`
at once, 8 tokens each). Then `--rounds` rounds, each loading one server and then the
other, alternating which goes first; each figure is the median over rounds, and the
throughput ratios are the median of each round's new/old ratio (the two loads of a round run
back to back, so the machine's drift between rounds cancels). Both
servers stay up throughout (the idle one only polls), so the two sides see the same
machine. Goal: new/old requests/s >= 1.0; the other rows are informative.

Run: python benchmarks/serve_load.py [--requests 64 --clients 16 --max-tokens 64 --rounds 5] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _report import report, row

ROOT = Path(__file__).resolve().parent.parent
OLD_COMMIT = "a815afc"
SYSTEM = "You are a player in a company of actors. Speak in verse, briefly, as the Bard would. " * 3


def make_model(d: Path) -> None:
    import torch

    from lmforge import tokenize
    from lmforge.data import corpus_files
    from lmforge.model import make_config, save
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    tok = tokenize.train("bpe", [str(p) for p in corpus_files()[:8]], 2048,
                         special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS], show_progress=False)
    torch.manual_seed(0)
    cfg = make_config(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=704,
                      max_seq_len=1024, norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False,
                      out_bias=False, mlp_bias=False, tie_embeddings=False, arch="llama")
    save(Transformer(cfg), d, tokenizer=tok)


def old_server_module(tmp: Path) -> Path:
    """The server of OLD_COMMIT as ``old_server.py`` in ``tmp``, importing today's lmforge."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:src/lmforge/infer/server.py"],
                         check=True, capture_output=True, text=True).stdout
    src = src.replace("from .engine import", "from lmforge.infer.engine import")
    src = src.replace("from .sampling import", "from lmforge.infer.sampling import")
    src = src.replace("from ..tokenize.chat import", "from lmforge.tokenize.chat import")
    src = src.replace("from .webchat import", "from lmforge.infer.webchat import")
    assert not re.search(r"^\s*from \.", src, re.M), "a relative import left in the old server"
    (tmp / "old_server.py").write_text(src)
    (tmp / "run_old.py").write_text(
        "import sys\n"
        "from lmforge.model import load\n"
        "import old_server\n"
        "ckpt, name, nb, bs, mbt = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])\n"
        "m, tok = load(ckpt)\n"
        "httpd = old_server.make_server(m, tok, '127.0.0.1', 0, model_name=name, num_blocks=nb, block_size=bs,\n"
        "                              max_batch_tokens=mbt)\n"
        "print(f'serving on http://127.0.0.1:{httpd.server_address[1]}', file=sys.stderr, flush=True)\n"
        "httpd.serve_forever()\n")
    return tmp / "run_old.py"


def start(cmd: list[str], log: Path, env_path: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start a server process (its stderr to ``log``); returns it and its base URL."""
    import os

    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = env_path + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, stderr=open(log, "w"), env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())
        if m:
            return proc, f"http://127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise RuntimeError(f"{cmd[:3]} did not start:\n{log.read_text()[-3000:]}")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


async def _load(base: str, name: str, n_requests: int, clients: int, max_tokens: int) -> dict:
    import httpx

    ttft, gaps, tokens, texts = [], [], 0, {}
    todo = list(range(n_requests))

    async def one(http, i):
        nonlocal tokens
        body = {"model": name, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Line {i}, please."}]}
        t0 = time.perf_counter()
        last, text, usage = None, [], None
        async with http.stream("POST", base + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{base}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                ev = json.loads(line[5:])
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("choices") and ev["choices"][0].get("delta", {}).get("content"):
                    now = time.perf_counter()
                    (ttft if last is None else gaps).append(now - (t0 if last is None else last))
                    last = now
                    text.append(ev["choices"][0]["delta"]["content"])
        tokens += usage["completion_tokens"]
        texts[i] = "".join(text)

    async def worker(http):
        while todo:
            await one(http, todo.pop())

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(600)) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "rps": n_requests / wall, "tps": tokens / wall, "tokens": tokens,
            "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99), "gap50": pct(gaps, 50), "texts": texts}


def load(*a) -> dict:
    return asyncio.run(_load(*a))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="a smoke run: --requests 16 --clients 8 --max-tokens 16 "
                                                         "--rounds 2")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.clients, a.max_tokens, a.rounds = 16, 8, 16, 2
    engine = ["--num-blocks", str(a.num_blocks), "--block-size", "16", "--max-batch-tokens", "512"]
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        d = tmp / "lm"
        make_model(d)
        run_old = old_server_module(tmp)
        try:
            logs = {"new": tmp / "new.log", "old": tmp / "old.log"}
            p, new = start([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(d), "--port", "0",
                            *engine], logs["new"])
            procs.append(p)
            p, old = start([sys.executable, str(run_old), str(d), "lm", str(a.num_blocks), "16", "512"], logs["old"],
                           str(tmp))
            procs.append(p)
            sides = {"new": new, "old": old}
            for base in sides.values():  # warm-up: one client, then all of them at once
                load(base, "lm", 2, 1, 8)
                load(base, "lm", a.clients, a.clients, 8)
            same = {k: load(base, "lm", 1, 1, a.max_tokens)["texts"][0] for k, base in sides.items()}
            if same["new"] != same["old"]:
                raise SystemExit(f"the two servers disagree on a greedy reply: {same}")
            runs = {"new": [], "old": []}
            for r in range(a.rounds):
                for k in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    try:
                        runs[k].append(load(sides[k], "lm", a.requests, a.clients, a.max_tokens))
                    except Exception:
                        print(f"the {k} server failed under load; the end of its log:\n"
                              f"{logs[k].read_text()[-4000:]}", file=sys.stderr)
                        raise
                    x = runs[k][-1]
                    print(f"round {r + 1} {k}: {x['rps']:.2f} req/s, {x['tps']:.0f} tok/s, "
                          f"ttft p50 {x['ttft50']:.3f}s p99 {x['ttft99']:.3f}s", flush=True)
            health = json.loads(urllib.request.urlopen(new + "/health").read())
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    toks = {k: {x["tokens"] for x in v} for k, v in runs.items()}
    if toks["new"] != toks["old"]:
        print(f"note: the two sides generated different token totals: {toks}")
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("rps", "tps", "ttft50", "ttft99", "gap50")}
           for k, v in runs.items()}
    n, o = med["new"], med["old"]
    print(f"\n{a.clients} clients, {a.requests} requests x up to {a.max_tokens} tokens (greedy), "
          f"medians of {a.rounds} rounds: new {n['rps']:.2f} req/s {n['tps']:.0f} tok/s, "
          f"old {o['rps']:.2f} req/s {o['tps']:.0f} tok/s")
    # the ratios of the two loads of one round (run back to back), median over rounds: the machine's
    # drift between rounds cancels; the lmforge / reference columns are the medians of each side
    paired = {f: statistics.median(x[f] / y[f] for x, y in zip(runs["new"], runs["old"])) for f in ("rps", "tps")}
    rows = [row(f"requests/s, {a.clients} streaming clients (new / old server)", n["rps"], o["rps"], "req/s", goal=1.0,
                ratio=paired["rps"]),
            row("completion tokens/s (new / old)", n["tps"], o["tps"], "tok/s", ratio=paired["tps"]),
            row("time to first token p50 (new / old)", n["ttft50"], o["ttft50"], "s", higher_is_better=False),
            row("time to first token p99 (new / old)", n["ttft99"], o["ttft99"], "s", higher_is_better=False),
            row("time between tokens p50 (new / old)", n["gap50"], o["gap50"], "s", higher_is_better=False),
            row("prefix-cache hit rate (new server)", health["prefix_hit_rate"], None, "fraction")]
    report("serve_load", rows, note=f"reference: the stdlib server of commit {OLD_COMMIT} on today's engine")


if __name__ == "__main__":
    main()
