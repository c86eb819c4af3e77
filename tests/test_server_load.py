"""Many streaming clients at once, a third of them hanging up: nothing hangs, nothing leaks.

Knows: 64 concurrent streaming completions (greedy) on loopback against a tiny model;
a third of the clients disconnect at random points (some after a random number of
chunks, some after a random delay, which may fall before the response has started).
Checks that every client finishes within a bound, that every client that stayed got a
complete stream (a finish reason, ``[DONE]``) whose text is the text the same request
gets alone, and that afterwards the engine has nothing running or waiting, every KV
block is back in the pool and the server still serves. Does not measure speed
(benchmarks/serve_load.py does).
"""
import asyncio
import json
import random
import time

import pytest
from tiny_serve import live, post, tiny_model, wait_idle

httpx = pytest.importorskip("httpx")

CLIENTS = 64
BLOCKS = 512  # 64 x (prompt + 24 tokens) fits: no preemption needed, but all of them in flight together
MAX_TOKENS = 24
BOUND_S = 45.0
PROMPTS = ["Once", "Now is the winter", "What", "Friends, Romans, countrymen, lend me", "O", "Good night",
           "Alas", "To be, or not to be: that is"]


@pytest.fixture(scope="module")
def served(corpus_files):
    m, tok = tiny_model(corpus_files[0])
    with live(m, tok, model_name="load", num_blocks=BLOCKS, max_queued=4 * CLIENTS) as (base, app):
        yield base, app


def _body(i):
    # ignore_eos: every stream runs its full MAX_TOKENS, so a client planned to leave after k < MAX_TOKENS
    # chunks really leaves mid-stream, however fast the machine
    return {"model": "load", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}


async def _client(http, base, i, plan):
    """Stream request i; ``plan`` is None (stay), ("chunks", k) or ("delay", s). Returns what it saw."""
    kind, arg = plan or (None, None)
    text, chunks, reason, done = [], 0, None, False

    async def run():
        nonlocal chunks, reason, done
        async with http.stream("POST", base + "/v1/completions", json=_body(i)) as r:
            assert r.status_code == 200, (r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                ev = json.loads(data)
                assert "error" not in ev, ev
                c = ev["choices"][0]
                text.append(c.get("text") or "")
                reason = c.get("finish_reason") or reason
                chunks += 1
                if kind == "chunks" and chunks >= arg:
                    return "hung up"  # leaving the block closes the connection mid-stream
        return "complete"

    if kind == "delay":
        try:
            how = await asyncio.wait_for(run(), arg)
        except asyncio.TimeoutError:
            how = "hung up"
    else:
        how = await run()
    return {"i": i, "plan": plan, "how": how, "text": "".join(text), "reason": reason, "done": done}


def test_64_streaming_clients_a_third_disconnecting(served):
    base, app = served
    refs = {}
    for p in range(len(PROMPTS)):
        code, r = post(base, "/v1/completions", {**_body(p), "stream": False})
        assert code == 200
        refs[p] = r["choices"][0]["text"], r["choices"][0]["finish_reason"]
    rng = random.Random(0)
    quitters = set(rng.sample(range(CLIENTS), CLIENTS // 3))
    plans = {i: (("chunks", rng.randint(1, MAX_TOKENS - 2)) if rng.random() < 0.7 else ("delay", rng.uniform(0.0, 0.5)))
             if i in quitters else None for i in range(CLIENTS)}

    async def main():
        limits = httpx.Limits(max_connections=2 * CLIENTS, max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(BOUND_S)) as http:
            return await asyncio.wait_for(asyncio.gather(*(_client(http, base, i, plans[i]) for i in range(CLIENTS))),
                                          BOUND_S)

    t0 = time.perf_counter()
    results = asyncio.run(main())  # a hang is a TimeoutError here
    wall = time.perf_counter() - t0
    assert wall < BOUND_S
    stayed = [r for r in results if r["plan"] is None]
    assert len(stayed) == CLIENTS - len(quitters)
    for r in stayed:  # complete streams, each the text the request gets alone
        assert r["how"] == "complete" and r["done"], r
        assert (r["text"], r["reason"]) == refs[r["i"] % len(PROMPTS)], r
    hung = [r for r in results if r["how"] == "hung up"]
    by_chunks = [r for r in results if r["plan"] and r["plan"][0] == "chunks"]
    assert by_chunks and all(r["how"] == "hung up" for r in by_chunks), "a client planned to leave mid-stream did not"
    assert len(hung) >= len(by_chunks)
    h = wait_idle(base, BLOCKS, within=20)
    assert h["running"] == 0 and h["waiting"] == 0, h
    assert h["free_blocks"] == BLOCKS, f"KV blocks leaked: {BLOCKS - h['free_blocks']} of {BLOCKS} still held"
    assert h["in_flight"] == 0, h  # the engine loop holds no request either
    assert not app.state.engine.requests and not app.state.engine.running and not app.state.engine.waiting
    assert app.state.engine.pool.available() == app.state.engine.pool.num_blocks == BLOCKS
    code, r = post(base, "/v1/completions", {**_body(3), "stream": False})
    assert code == 200 and (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == refs[3]
