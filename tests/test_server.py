"""The OpenAI-compatible server: uvicorn on loopback, driven by the official client and raw HTTP.

Parity: greedy output equals ``transformers``' ``generate`` on the same weights, token for
token; log-probabilities equal HF's. Robustness: bad ids, a failing model, a full queue, big
or foreign bodies, foreign Host headers, missing keys and hung-up clients each get their
answer while the server goes on serving.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import hf_greedy, load_hf

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

NAME = "tiny-chat"
BLOCKS = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, corpus_files):
    from tiny_serve import tiny_model

    from lmforge.model import save

    d = tmp_path_factory.mktemp("srv") / NAME
    m, tok = tiny_model(corpus_files[0])
    save(m, d, tokenizer=tok)
    return d


def start(model_dir, **kw):
    from lmforge.infer.server import build_app, start_in_thread
    from lmforge.model import load, load_tokens

    m, tok = load(model_dir)
    app = build_app(m, tok, load_tokens(model_dir, tok), NAME, num_blocks=BLOCKS, **kw)
    srv, port = start_in_thread(app)
    return app, srv, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(model_dir):
    """(base url, tokenizer, model dir, app) of a server with the default settings."""
    from lmforge.infer.server import stop_thread

    app, srv, base = start(model_dir)
    yield base, app.state.service.tok, model_dir, app
    stop_thread(srv)


@pytest.fixture(scope="module")
def locked(model_dir):
    """A server with an API key, one CORS origin, an extra host name, a small queue and body limit."""
    from lmforge.infer.server import stop_thread

    app, srv, base = start(model_dir, api_key="sekret", cors_origins=["http://ok.example"], allowed_hosts=["my.box"],
                           max_queued=2, max_body_bytes=4000)
    yield base, app
    stop_thread(srv)


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    """HF ``generate`` (greedy) on the served weights exported to an HF directory: prompt text (or
    chat messages, or ids) -> (completion text, tokens generated, finish_reason), as the server should answer."""
    from lmforge.model import load, load_tokens
    from lmforge.model.hf import export_hf

    _, tok, d, _ = server
    m, _ = load(d)
    spec = load_tokens(d, tok)
    hf = load_hf(export_hf(m, tmp_path_factory.mktemp("hf")))
    stops = list(spec.stop)

    def prompt_ids(prompt):
        if isinstance(prompt, str):
            return spec.encode_prompt(tok, prompt)
        if prompt and isinstance(prompt[0], int):
            return list(prompt)
        return spec.encode_chat(tok, prompt)

    def ids(prompt, max_tokens):
        return hf_greedy(hf, prompt_ids(prompt), max_tokens, eos=stops)

    def logprobs(prompt, out):  # HF's log-probability of each token of ``out`` after the prompt
        x = prompt_ids(prompt)
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([x + out])).logits[0, len(x) - 1:-1].float(), -1)
        return lp.gather(1, torch.tensor(out)[:, None])[:, 0].tolist()

    def prompt_logprobs(ids_):  # HF's log-probability of each token given those before it
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([ids_])).logits[0, :-1].float(), -1)
        return lp.gather(1, torch.tensor(ids_[1:])[:, None])[:, 0].tolist()

    def ref(prompt, max_tokens):
        out = ids(prompt, max_tokens)
        stopped = bool(out) and out[-1] in stops
        return tok.decode(out[:-1] if stopped else out), len(out), "stop" if stopped else "length"

    ref.ids, ref.logprobs, ref.prompt_ids, ref.prompt_logprobs = ids, logprobs, prompt_ids, prompt_logprobs
    return ref


def client(base, key="none"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def post(base, path, body=None, raw=None, headers=None, **kw):
    h = {"Content-Type": "application/json", **(headers or {})}
    r = httpx.post(base + path, content=raw if raw is not None else json.dumps(body).encode(), headers=h,
                   timeout=60, **kw)
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, r.text


def health(base):
    return httpx.get(base + "/health").json()


def wait_idle(base, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(base)
        if h["in_flight"] == 0 and h["running"] == 0 and h["free_blocks"] == BLOCKS:
            return h
        time.sleep(0.05)
    return h


def still_up(base):
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "still up", "max_tokens": 2})
    assert code == 200 and r["usage"]["completion_tokens"] >= 1


# ---- the endpoints ----------------------------------------------------------------------------------

def test_models_health_version_page_openapi(server):
    from lmforge import __version__
    from lmforge.infer.webchat import PAGE

    base, _, _, app = server
    models = client(base).models.list().data
    assert [m.id for m in models] == [NAME]
    raw = httpx.get(base + "/v1/models").json()["data"][0]
    assert raw["max_model_len"] == 256 and raw["chat_template"] == app.state.service.spec.template == "lmforge"
    h = health(base)
    assert h["status"] == "ok" and h["running"] == h["waiting"] == 0 and h["free_blocks"] == BLOCKS
    assert {"steps", "multi_sequence_steps", "max_sequences_in_step"} <= set(h["stats"])
    assert httpx.get(base + "/version").json() == {"version": __version__}
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.text == PAGE  # verbatim: the page asks /v1/models for the name
    spec = httpx.get(base + "/openapi.json").json()
    want = {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize", "/v1/models", "/health",
            "/metrics", "/version"}
    assert want <= set(spec["paths"])
    for p in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert spec["paths"][p]["post"]["requestBody"]["content"]["application/json"]["schema"]
    code, r = post(base, "/nope", {})
    assert code == 404 and "no route" in r["error"]["message"]


def test_tokenize_and_detokenize(server):
    from lmforge.model import load_tokens

    base, tok, d, _ = server
    spec = load_tokens(d, tok)
    code, r = post(base, "/tokenize", {"prompt": "Good morrow"})
    assert code == 200 and r["tokens"] == spec.encode_prompt(tok, "Good morrow")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 256
    msgs = [{"role": "developer", "content": "Be brief"}, {"role": "user", "content": "Hi"}]
    code, r = post(base, "/tokenize", {"messages": msgs, "add_generation_prompt": True})
    assert code == 200 and r["tokens"] == spec.encode_chat(tok, msgs)
    code, r = post(base, "/detokenize", {"tokens": tok.encode("Good morrow")})
    assert code == 200 and r["prompt"] == "Good morrow"
    code, r = post(base, "/detokenize", {"tokens": [5, 999999]})
    assert code == 400 and "999999" in r["error"]["message"]


# ---- parity with transformers ----------------------------------------------------------------------

def test_completions_and_chat(server, reference):
    base, tok, d, _ = server
    c = client(base)
    r = c.completions.create(model=NAME, prompt="To be, or not", max_tokens=8, temperature=0, seed=1)
    text, n, why = reference("To be, or not", 8)
    assert (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason) == (text, n, why)
    assert r.usage.prompt_tokens == len(reference.prompt_ids("To be, or not"))
    s1 = c.completions.create(model=NAME, prompt="Hi", max_tokens=10, temperature=1.0, seed=5)
    s2 = c.completions.create(model=NAME, prompt="Hi", max_tokens=10, temperature=1.0, seed=5)
    assert s1.choices[0].text == s2.choices[0].text
    msgs = [{"role": "user", "content": "Hello"}]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == reference(msgs, 12)[:2]
    r = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=12, n=2, temperature=0.9, seed=3,
                                  logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content != r.choices[1].message.content  # n=2: seeds 3 and 4
    lp = r.choices[0].logprobs.content
    assert lp and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)
    for e in lp:  # the alternatives best first; no sampled token more likely than the best of them
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True) and e.logprob <= tops[0] + 1e-6
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token


def test_default_max_tokens_is_what_the_context_leaves(server, reference):
    base, _, _, _ = server
    prompt = "Friends, Romans, countrymen " * 8
    room = 256 - len(reference.prompt_ids(prompt))
    r = client(base).completions.create(model=NAME, prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == room and r.choices[0].finish_reason == "length"
    code, _ = post(base, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": room + 1})
    assert code == 400


def test_streaming_matches_non_streaming(server):
    base, _, _, _ = server
    c = client(base)
    msgs = [{"role": "user", "content": "Speak"}]
    full = c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model=NAME, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens and not chunks[-1].choices
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == \
        [full.choices[0].finish_reason]
    pieces = list(c.completions.create(model=NAME, prompt="Good", max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == \
        c.completions.create(model=NAME, prompt="Good", max_tokens=6, temperature=0).choices[0].text


def test_concurrent_clients_are_batched(server, reference):
    base, _, _, _ = server
    c = client(base)
    prompts = ["Once", "Now is the winter", "What", "Friends, Romans, countrymen, lend me", "O", "Good night",
               "Alas", "To be, or not to be: that is"]
    refs = [reference(x, 24) for x in prompts]
    assert len({t for t, _, _ in refs}) == len(prompts)
    before = health(base)["stats"]
    out = [None] * len(prompts)

    def go(i):
        r = c.completions.create(model=NAME, prompt=prompts[i], max_tokens=24, temperature=0)
        out[i] = r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == refs  # each request's greedy text, token for token, though it shared its steps
    after = health(base)["stats"]
    # the engine really ran several of them in one forward (not one after another)
    assert after["multi_sequence_steps"] > before["multi_sequence_steps"]
    assert after["max_sequences_in_step"] >= 2


def test_list_of_prompts_and_n_choices_in_one_batch(server, reference):
    base, tok, _, app = server
    c = client(base)
    prompts = ["Once", "Now is the winter"]
    r = c.completions.create(model=NAME, prompt=prompts, max_tokens=10, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    # prompt-major: choices 0, 1 answer the first prompt, 2, 3 the second
    assert [ch.text for ch in r.choices] == [reference(p, 10)[0] for p in prompts for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(reference.prompt_ids(p)) for p in prompts)
    assert r.usage.completion_tokens == sum(reference(p, 10)[1] for p in prompts) * 2
    ids = [reference.prompt_ids(p) for p in prompts]  # a list of token-id lists (lm-evaluation-harness)
    r2 = c.completions.create(model=NAME, prompt=ids, max_tokens=10, temperature=0)
    assert [ch.text for ch in r2.choices] == [reference(p, 10)[0] for p in prompts]
    # n sampled choices: choice j has seed + j, and all n were decoded in the same steps
    before = health(base)["stats"]
    rs = c.completions.create(model=NAME, prompt="Hi", max_tokens=12, temperature=1.0, n=3, seed=7)
    after = health(base)["stats"]
    for j in range(3):
        one = c.completions.create(model=NAME, prompt="Hi", max_tokens=12, temperature=1.0, seed=7 + j)
        assert rs.choices[j].text == one.choices[0].text
    assert after["max_sequences_in_step"] >= 3
    assert after["steps"] - before["steps"] <= 12 + 2  # together: not 3 x 12 steps one after another
    streamed = list(c.completions.create(model=NAME, prompt=prompts, max_tokens=10, temperature=0, n=2, stream=True))
    texts = {}
    for ev in streamed:
        for ch in ev.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert [texts[i] for i in range(4)] == [ch.text for ch in r.choices]


def test_echo_logprobs_max_tokens_0_scores_the_prompt(server, reference):
    """What lm-evaluation-harness sends for log-likelihood: the prompt's own log-probabilities."""
    base, tok, _, _ = server
    prompt = "Good morrow, kind sir"
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 0, "echo": True,
                                             "logprobs": 1, "temperature": 0})
    assert code == 200, r
    ch = r["choices"][0]
    ids = reference.prompt_ids(prompt)
    lp = ch["logprobs"]
    assert ch["text"] == prompt and ch["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 0
    assert lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(reference.prompt_logprobs(ids), abs=1e-4)
    for v, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert len(top) == 1 and max(top.values()) >= v - 1e-6
    # text_offset: where each token starts in the returned text (the BOS is not text)
    offs = lp["text_offset"]
    for k in range(1, len(ids)):
        end = offs[k + 1] if k + 1 < len(ids) else len(ch["text"])
        assert ch["text"][offs[k]:end] == lp["tokens"][k]
    # token ids, several prompts, max_tokens 1 (the harness's request): prompt scores, then the next token
    batch = [ids, reference.prompt_ids("Alas, poor")]
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": batch, "max_tokens": 1, "echo": True,
                                             "logprobs": 1, "temperature": 0})
    assert code == 200 and len(r["choices"]) == 2
    for ch, x in zip(r["choices"], batch):
        got = ch["logprobs"]["token_logprobs"]
        assert len(got) == len(x) + 1 and got[0] is None
        nxt = reference.ids(x, 1)
        assert got[1:] == pytest.approx(reference.prompt_logprobs(x + nxt), abs=1e-4)
        assert ch["text"] == tok.decode(x) + tok.decode(nxt)
    # streamed echo: the prompt first, with its log-probabilities
    evs = list(client(base).completions.create(model=NAME, prompt=prompt, max_tokens=2, echo=True, logprobs=0,
                                               temperature=0, stream=True))
    assert evs[0].choices[0].text == prompt and evs[0].choices[0].logprobs.token_logprobs[0] is None


def test_completion_logprobs_text_offset(server, reference):
    import codecs

    from lmforge.model import load_tokens

    base, tok, model_dir, _ = server
    body = {"model": NAME, "prompt": "Good morrow", "max_tokens": 10, "temperature": 0, "logprobs": 1}
    code, r = post(base, "/v1/completions", body)
    assert code == 200
    ch = r["choices"][0]
    lp = ch["logprobs"]
    stops = set(load_tokens(model_dir, tok).stop)  # a stop token ends the text; any other token is text
    ids = [t for t in reference.ids("Good morrow", 10) if t not in stops]
    assert tok.decode(ids) == ch["text"] and lp["tokens"] == [tok.decode([t]) for t in ids]
    assert lp["token_logprobs"] == pytest.approx(reference.logprobs("Good morrow", ids), abs=1e-4)
    assert [list(d.values()) for d in lp["top_logprobs"]] == [[v] for v in lp["token_logprobs"]]  # greedy: top 1
    # each token's offset is where it starts in the returned text: the characters that the tokens
    # before it complete (an unfinished multi-byte character is not text yet)
    want = [len(codecs.getincrementaldecoder("utf-8")("replace").decode(tok.decode_bytes(ids[:i])))
            for i in range(len(ids))]
    assert lp["text_offset"] == want
    pieces = list(client(base).completions.create(**{**body, "stream": True}))  # the offsets run on across chunks
    assert [o for p in pieces if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset] == want


def test_text_offset_counts_characters_not_bytes(server):
    """Tokens that split a multi-byte character: a token starts in the character its first byte is in."""
    from lmforge.infer.engine import StepOutput
    from lmforge.infer.server import Choice, Prompt, _completion_logprobs

    base, tok, _, app = server
    svc = app.state.service
    byte_id = {t: i for i, t in enumerate(tok.tokens) if t is not None and len(t) == 1}
    text = "aé漢🙂b"
    ids = [byte_id[bytes([b])] for b in text.encode()]
    s = svc.settings({"model": NAME, "prompt": "x", "logprobs": 0}, chat=False)
    c = Choice(0, svc, s, s.params, Prompt([1], ""))
    entries = []
    for j, t in enumerate(ids):
        last = j == len(ids) - 1
        entries += c.feed(StepOutput(0, t, last, "length" if last else None, -1.0, []))[1]
    starts = [i for i, ch in enumerate(text) for _ in ch.encode()]  # the character each byte belongs to
    assert _completion_logprobs(entries)["text_offset"] == starts and c.tokens == len(ids)


def test_sampling_extensions(server, reference):
    base, tok, _, _ = server
    c = client(base)
    greedy = reference.ids("Once", 12)
    full = tok.decode(greedy)
    # a stop string cut from the text (kept with include_stop_str_in_output), named in stop_reason
    cut = full[3:6]
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "Once", "max_tokens": 12, "temperature": 0,
                                             "stop": [cut]})
    assert code == 200 and r["choices"][0]["text"] == full[:full.find(cut)]
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["stop_reason"] == cut
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "Once", "max_tokens": 12, "temperature": 0,
                                             "stop": [cut], "include_stop_str_in_output": True})
    assert r["choices"][0]["text"] == full[:full.find(cut) + len(cut)]
    # stop_token_ids: the greedy output's third token ends it
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "Once", "max_tokens": 12, "temperature": 0,
                                             "stop_token_ids": [greedy[2]]})
    k = greedy.index(greedy[2])
    assert r["choices"][0]["text"] == tok.decode(greedy[:k]) and r["choices"][0]["stop_reason"] == greedy[2]
    assert r["usage"]["completion_tokens"] == k + 1
    # top_k -1 is off (vLLM's spelling): the same as no top_k
    a = c.completions.create(model=NAME, prompt="Hi", max_tokens=8, temperature=1, seed=2, extra_body={"top_k": -1})
    b = c.completions.create(model=NAME, prompt="Hi", max_tokens=8, temperature=1, seed=2)
    assert a.choices[0].text == b.choices[0].text
    # min_tokens: no stop before it; max_completion_tokens is max_tokens
    msgs = [{"role": "user", "content": "Hello"}]
    _, n, why = reference(msgs, 40)
    if why == "stop":
        r = c.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=n + 3, temperature=0,
                                      extra_body={"min_tokens": n + 3})
        assert r.usage.completion_tokens == n + 3 and r.choices[0].finish_reason == "length"
    r = c.chat.completions.create(model=NAME, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


@pytest.mark.parametrize("path,body,raw,status,needle", [
    ("c", None, b"{not json", 400, "could not parse"),
    ("c", None, b"[" * 100000, 400, "could not parse"),
    ("c", None, b"[1, 2]", 400, "must be an object"),
    ("c", {"prompt": "x"}, None, 400, "'model' is required"),
    ("c", {"model": "gpt-4", "prompt": "x"}, None, 404, "does not exist"),
    ("c", {"model": NAME, "prompt": 5}, None, 400, "'prompt' must be"),
    ("c", {"model": NAME, "prompt": [[]]}, None, 400, "'prompt'"),
    ("c", {"model": NAME, "prompt": [999999]}, None, 400, "999999"),
    ("c", {"model": NAME, "prompt": [[1, 2], [3, -1]]}, None, 400, "-1"),
    ("c", {"model": NAME, "prompt": "x", "max_tokens": "ten"}, None, 400, "'max_tokens' must be an integer"),
    ("c", {"model": NAME, "prompt": "x", "max_tokens": -1}, None, 400, "'max_tokens' is out of range"),
    ("c", {"model": NAME, "prompt": "x " * 300, "max_tokens": 10}, None, 400, "maximum context length"),
    ("c", {"model": NAME, "prompt": "x", "temperature": 9}, None, 400, "'temperature' is out of range"),
    ("c", {"model": NAME, "prompt": "x", "top_k": -2}, None, 400, "'top_k' is out of range"),
    ("c", {"model": NAME, "prompt": "x", "stop_token_ids": [999999]}, None, 400, "999999"),
    ("c", {"model": NAME, "prompt": "x", "logit_bias": {"999999": 5}}, None, 400, "999999"),
    ("c", {"model": NAME, "prompt": "x", "suffix": "y"}, None, 400, "'suffix'"),
    ("c", {"model": NAME, "prompt": "x", "best_of": 3}, None, 400, "'best_of'"),
    ("c", {"model": NAME, "prompt": "x", "max_tokens": 4, "min_tokens": 5}, None, 400, "'min_tokens'"),
    ("ch", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "unknown role"),
    ("ch", {"model": NAME, "messages": []}, None, 400, "messages"),
    ("ch", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, None, 400,
     "'max_tokens' is out of range"),
    ("ch", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}, None, 400, "'tools'"),
    ("ch", {"model": NAME, "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"}}, None, 400, "'response_format'"),
    ("ch", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None, 400,
     "not a text part"),
])
def test_bad_requests_get_openai_errors(server, path, body, raw, status, needle):
    base, _, _, _ = server
    code, obj = post(base, "/v1/chat/completions" if path == "ch" else "/v1/completions", body, raw)
    assert code == status and needle in obj["error"]["message"], obj
    assert obj["error"]["type"] and obj["error"]["code"] == status
    still_up(base)


def test_unknown_fields_are_ignored_and_developer_is_system(server, reference):
    base, _, _, _ = server
    code, r = post(base, "/v1/chat/completions", {
        "model": NAME, "messages": [{"role": "developer", "content": "Be kind"}, {"role": "user", "content": "Hi"}],
        "max_tokens": 5, "temperature": 0, "frobnicate": 3, "user": "me", "tool_choice": "none", "store": False})
    want = reference([{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}], 5)
    assert code == 200 and r["choices"][0]["message"]["content"] == want[0]


# ---- robustness ------------------------------------------------------------------------------------------

def test_out_of_vocabulary_ids_are_refused_before_the_engine(server):
    base, _, _, app = server
    for body in ({"model": NAME, "prompt": [999999], "max_tokens": 3},
                 {"model": NAME, "prompt": [1, 2, 999999], "max_tokens": 3, "stream": True}):
        code, r = post(base, "/v1/completions", body)
        assert code == 400 and "999999" in r["error"]["message"]
    assert app.state.loop.alive() and health(base)["step_errors"] == 0
    still_up(base)


def test_a_failing_model_ends_only_its_request(server, monkeypatch):
    """An exception in the forward pass of one request: that client gets a 500 (or an error
    event, then [DONE]); its blocks come back; another request running beside it finishes."""
    base, tok, _, app = server
    svc = app.state.service
    poison = tok.special_tokens["<|system|>"]
    forward = svc.model.forward

    def failing(idx, *a, **kw):
        if (idx == poison).any():
            raise RuntimeError("injected failure")
        return forward(idx, *a, **kw)
    monkeypatch.setattr(svc.model, "forward", failing)
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": [poison, 5, 6], "max_tokens": 4})
    assert code == 500 and "injected failure" in r["error"]["message"]
    with httpx.stream("POST", base + "/v1/completions", json={"model": NAME, "prompt": [poison, 7], "max_tokens": 4,
                                                              "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert "injected failure" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    # beside a healthy request: the healthy one is unaffected
    out = {}

    def healthy():
        out["r"] = client(base).completions.create(model=NAME, prompt="Now is the winter", max_tokens=40,
                                                   temperature=0, extra_body={"ignore_eos": True})
    t = threading.Thread(target=healthy)
    t.start()
    time.sleep(0.05)
    code, _ = post(base, "/v1/completions", {"model": NAME, "prompt": [poison, 9, 9, 9], "max_tokens": 4})
    t.join()
    assert code == 500 and out["r"].usage.completion_tokens == 40
    h = wait_idle(base)
    assert h["free_blocks"] == BLOCKS and svc.engine.pool.available() == BLOCKS and not svc.engine.requests
    assert app.state.loop.alive()
    still_up(base)


def test_a_step_that_raises_outside_any_request_keeps_the_loop(server, monkeypatch):
    base, _, _, app = server
    svc = app.state.service
    step, calls = svc.engine.step, []

    def broken():
        if not calls:
            calls.append(1)
            raise RuntimeError("scheduler bug")
        return step()
    monkeypatch.setattr(svc.engine, "step", broken)
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 3})
    assert code == 500 and "scheduler bug" in r["error"]["message"]
    assert wait_idle(base)["free_blocks"] == BLOCKS
    still_up(base)


def test_a_bug_in_a_handler_is_a_500_and_the_server_goes_on(server, monkeypatch):
    base, _, _, app = server

    def bug(body):
        raise KeyError("oops")
    monkeypatch.setattr(app.state.service, "check_model", bug)
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x"})
    assert code == 500 and r["error"]["type"] == "internal_server_error" and "KeyError" in r["error"]["message"]
    monkeypatch.undo()
    still_up(base)


def test_health_fails_when_the_loop_is_dead(model_dir):
    from lmforge.infer.server import stop_thread

    app, srv, base = start(model_dir)
    try:
        assert httpx.get(base + "/health").status_code == 200
        app.state.loop.close()
        r = httpx.get(base + "/health")
        assert r.status_code == 503 and r.json()["status"] == "dead"
        code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2})
        assert code == 503
    finally:
        stop_thread(srv)


@pytest.fixture
def paused(server, monkeypatch):
    """The engine steps only while the returned event is set."""
    _, _, _, app = server
    eng = app.state.service.engine
    go = threading.Event()
    step = eng.step

    def gated():
        go.wait()
        return step()
    monkeypatch.setattr(eng, "step", gated)
    yield go
    go.set()


def test_queue_full_gets_429(locked, monkeypatch):
    base, app = locked
    key = {"Authorization": "Bearer sekret"}
    eng = app.state.service.engine
    go, step = threading.Event(), eng.step
    monkeypatch.setattr(eng, "step", lambda: (go.wait(), step())[1])
    try:
        code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2, "n": 3}, headers=key)
        assert code == 400 and "at most 2" in r["error"]["message"]  # could never fit: not worth a retry
        t = threading.Thread(target=post, args=(base, "/v1/completions",
                                                {"model": NAME, "prompt": "x", "max_tokens": 2, "n": 2}),
                             kwargs={"headers": key})
        t.start()
        deadline = time.time() + 10
        while app.state.loop.in_flight < 2 and time.time() < deadline:
            time.sleep(0.01)
        code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "y", "max_tokens": 2}, headers=key)
        assert code == 429 and "busy" in r["error"]["message"] and r["error"]["type"] == "rate_limit_error"
    finally:
        go.set()
    t.join()
    code, _ = post(base, "/v1/completions", {"model": NAME, "prompt": "y", "max_tokens": 2}, headers=key)
    assert code == 200


def test_body_limits_and_content_type(locked):
    base, _ = locked
    key = {"Authorization": "Bearer sekret"}
    big = json.dumps({"model": NAME, "prompt": "x" * 5000}).encode()
    code, r = post(base, "/v1/completions", raw=big, headers=key)
    assert code == 413 and "4000" in r["error"]["message"]

    def chunks():  # chunked transfer encoding: no Content-Length to refuse up front
        for i in range(0, len(big), 512):
            yield big[i:i + 512]
    r = httpx.post(base + "/v1/completions", content=chunks(), headers={**key, "Content-Type": "application/json"})
    assert "content-length" not in r.request.headers and r.status_code == 413
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        h = {**key, **({"Content-Type": ctype} if ctype else {})}
        r = httpx.post(base + "/v1/completions", content=b'{"model": "tiny-chat", "prompt": "x"}', headers=h)
        if ctype is None:
            r = httpx.post(base + "/v1/completions", content=b'{"model": "tiny-chat", "prompt": "x"}',
                           headers={**key, "Content-Type": ""})
        assert r.status_code == 415, ctype
    code, _ = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1},
                   headers={**key, "Content-Type": "application/json; charset=utf-8"})
    assert code == 200


def test_host_header_must_name_this_server(server, locked):
    base, _, _, _ = server
    port = int(base.rsplit(":", 1)[1])
    for host, ok in ((f"127.0.0.1:{port}", True), (f"localhost:{port}", True), (f"[::1]:{port}", True),
                     ("localhost", True), (f"evil.example:{port}", False), ("evil.example", False),
                     (f"localhost:{port + 1}", True),  # a port mapping (docker -p) changes the port
                     (f"my.box:{port}", False), (f"localhost.evil.example:{port}", False)):
        r = httpx.get(base + "/v1/models", headers={"Host": host})
        assert (r.status_code == 200) == ok, (host, r.status_code)
        if not ok:
            assert r.status_code == 421 and r.json()["error"]["message"]
    # POSTs too (a rebinding page posting to /v1/completions), and the extra name of --allowed-host
    code, _ = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1},
                   headers={"Host": "evil.example"})
    assert code == 421
    lbase, _ = locked
    lport = int(lbase.rsplit(":", 1)[1])
    r = httpx.get(lbase + "/health", headers={"Host": f"my.box:{lport}"})
    assert r.status_code == 200
    s = socket.create_connection(("127.0.0.1", port))  # HTTP/1.0 without a Host header
    s.sendall(b"GET /v1/models HTTP/1.0\r\n\r\n")
    assert s.recv(100).split(b" ")[1] == b"400"
    s.close()


def test_any_host_and_idle_clients(model_dir):
    """``allowed_hosts=["*"]`` accepts any Host; a body slower than the idle timeout gets 408 and an
    idle keep-alive connection is closed."""
    from lmforge.infer.server import stop_thread

    _, srv, base = start(model_dir, allowed_hosts=["*"], idle_timeout_s=1)
    port = int(base.rsplit(":", 1)[1])
    try:
        assert httpx.get(base + "/health", headers={"Host": "anything.example"}).status_code == 200
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\"")  # ... and the rest never comes
        t0 = time.time()
        assert s.recv(100).split(b" ")[1] == b"408" and time.time() - t0 < 5
        s.close()
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(100).split(b" ")[1] == b"200"
        t0 = time.time()
        while s.recv(4096):  # the rest of the response, then the server hangs up on the idle connection
            pass
        assert time.time() - t0 < 5
        s.close()
    finally:
        stop_thread(srv)


def test_api_key(locked):
    base, _ = locked
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1})
    assert code == 401 and r["error"]["type"] == "authentication_error"
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 1},
                   headers={"Authorization": "Bearer wrong"})
    assert code == 401
    for path in ("/v1/models", "/metrics", "/version"):
        assert httpx.get(base + path).status_code == 401
    assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(base, "wrong").models.list()
    r = client(base, "sekret").completions.create(model=NAME, prompt="x", max_tokens=2)
    assert r.usage.completion_tokens >= 1


def test_cors_is_opt_in(server, locked):
    base, _, _, _ = server
    pre = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(base + "/v1/completions", headers=pre)  # off by default: no CORS headers at all
    assert "access-control-allow-origin" not in r.headers
    lbase, _ = locked
    r = httpx.options(lbase + "/v1/completions", headers=pre)  # the preflight needs no API key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.options(lbase + "/v1/completions", headers={**pre, "Origin": "http://evil.example"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(lbase + "/v1/models", headers={"Origin": "http://ok.example", "Authorization": "Bearer sekret"})
    assert r.headers["access-control-allow-origin"] == "http://ok.example"


def test_client_disconnect_frees_blocks(server):
    base, _, _, _ = server
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "Go", "max_tokens": 200,
                                                         "temperature": 1.0, "stream": True, "ignore_eos": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read(50)
    conn.close()  # hang up mid-stream
    h = wait_idle(base)
    assert h["running"] == 0 and h["free_blocks"] == BLOCKS


def test_non_streaming_disconnect_cancels(server, paused):
    base, _, _, app = server
    host, port = base.split("//")[1].split(":")
    before = health(base)["stats"]["requests_aborted"]
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/v1/completions", json.dumps({"model": NAME, "prompt": "Go", "max_tokens": 200,
                                                         "ignore_eos": True}), {"Content-Type": "application/json"})
    deadline = time.time() + 10
    while app.state.loop.in_flight == 0 and time.time() < deadline:
        time.sleep(0.01)
    assert app.state.loop.in_flight == 1
    conn.close()  # hang up while it waits
    time.sleep(0.3)
    paused.set()
    h = wait_idle(base)
    assert h["in_flight"] == 0 and h["free_blocks"] == BLOCKS
    assert h["stats"]["requests_aborted"] == before + 1  # aborted, not run to its 200 tokens


def test_request_deadline(server, paused, monkeypatch):
    base, _, _, app = server
    monkeypatch.setattr(app.state.service, "request_timeout_s", 0.3)
    code, r = post(base, "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 5})
    assert code == 504 and r["error"]["type"] == "timeout_error"
    with httpx.stream("POST", base + "/v1/completions",
                      json={"model": NAME, "prompt": "x", "max_tokens": 5, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert "error" in json.loads(lines[-2][6:]) and lines[-1] == "data: [DONE]"
    paused.set()
    assert wait_idle(base)["free_blocks"] == BLOCKS


def test_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    base, _, _, _ = server

    def scrape():
        r = httpx.get(base + "/metrics")
        assert r.status_code == 200
        out = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    a = scrape()
    r = client(base).completions.create(model=NAME, prompt="Once upon", max_tokens=5, temperature=0)
    post(base, "/v1/completions", {"model": NAME, "prompt": [999999]})
    b = scrape()
    ok = ("lmforge_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))
    bad = ("lmforge_http_requests_total", (("endpoint", "/v1/completions"), ("status", "400")))
    assert b[ok] == a.get(ok, 0) + 1 and b[bad] == a.get(bad, 0) + 1
    delta = lambda k: b[(k, ())] - a.get((k, ()), 0)  # noqa: E731
    assert delta("lmforge_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("lmforge_generation_tokens_total") == r.usage.completion_tokens
    assert delta("lmforge_time_to_first_token_seconds_count") == 1
    assert delta("lmforge_inter_token_latency_seconds_count") == r.usage.completion_tokens - 1
    for g in ("lmforge_num_requests_waiting", "lmforge_num_requests_running", "lmforge_kv_cache_usage_ratio",
              "lmforge_prefix_cache_hit_rate"):
        assert (g, ()) in b
    httpx.get(base + "/no/such/path/" + "x" * 50)
    assert not any(lab and dict(lab).get("endpoint", "").startswith("/no/") for _, lab in scrape())


# ---- the CLI ------------------------------------------------------------------------------------------

def test_cli_serve_drains_on_sigterm_and_refuses_a_taken_port(model_dir, tmp_path):
    env = {**os.environ, "LMFORGE_API_KEY": "k"}
    log = open(tmp_path / "err.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(model_dir),
                             "--port", "0", "--num-blocks", str(BLOCKS)], stderr=log, env=env)
    try:
        deadline = time.time() + 60
        port = None
        while port is None and time.time() < deadline:
            m = re.search(r"http://127\.0\.0\.1:(\d+)", (tmp_path / "err.txt").read_text())
            port = int(m.group(1)) if m else time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        while httpx.get(base + "/health").status_code != 200:
            time.sleep(0.1)
        # the port is taken: a second server says so in one line and exits 1
        r = subprocess.run([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(model_dir),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "cannot listen" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        # SIGTERM while a stream runs: the stream finishes, then the process exits 0
        lines = []

        def stream():
            with httpx.stream("POST", base + "/v1/completions", headers={"Authorization": "Bearer k"},
                              json={"model": NAME, "prompt": "Go", "max_tokens": 150, "ignore_eos": True,
                                    "stream": True}, timeout=60) as s:
                for ln in s.iter_lines():
                    lines.append(ln)
                    if len(lines) == 2:
                        proc.send_signal(signal.SIGTERM)
        stream()
        assert proc.wait(60) == 0
        data = [ln for ln in lines if ln.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and json.loads(data[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert "lmforge.serve" in (tmp_path / "err.txt").read_text()  # the access log
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("kw", [{"max_queued": 0}, {"max_body_bytes": -1}, {"request_timeout_s": 0},
                                {"idle_timeout_s": float("nan")}, {"max_queued": True}])
def test_build_app_refuses_bad_limits(kw):
    from lmforge.infer.server import build_app

    with pytest.raises(ValueError, match=next(iter(kw))):
        build_app(None, None, **kw)
