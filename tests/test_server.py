"""The OpenAI-compatible server: a real process on loopback, driven by the official client."""
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory, corpus_files):
    from lmforge import tokenize
    from lmforge.model import ModelConfig, save
    from lmforge.model.transformer import Transformer
    from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS

    d = tmp_path_factory.mktemp("srv") / "tiny-chat"
    tok = tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=["<|endoftext|>", *CHAT_SPECIAL_TOKENS],
                         show_progress=False)
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64, max_seq_len=256,
                                norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama"))
    save(m, d, tokenizer=tok)
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--checkpoint", str(d), "--port", "0",
                             "--num-blocks", "256"], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    port = int(re.search(r":(\d+)", line).group(1))
    base = f"http://127.0.0.1:{port}"
    yield base, tok, d
    proc.terminate()
    proc.wait(10)


def test_generate_and_chat_cli(server):
    base, _, d = server
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", "--checkpoint", str(d), "--json",
                        "--max-tokens", "5", "--temperature", "0", "To be", "Or not"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    outs = [json.loads(l) for l in r.stdout.splitlines()]
    assert [o["prompt"] for o in outs] == ["To be", "Or not"] and all(o["tokens"] <= 5 for o in outs)
    r = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", "--checkpoint", str(d), "--max-tokens", "5"],
                       input="Hello there\n\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("model> ") == 1


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def test_models_and_health(server):
    base, _, _ = server
    c = client(base)
    assert [m.id for m in c.models.list().data] == ["tiny-chat"]
    h = json.loads(urllib.request.urlopen(base + "/health").read())
    assert h["status"] == "ok"


def test_completions_and_chat(server):
    base, tok, _ = server
    c = client(base)
    r = c.completions.create(model="tiny-chat", prompt="To be, or not", max_tokens=8, temperature=0, seed=1)
    assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens <= 8
    assert r.usage.prompt_tokens == len(tok.encode("To be, or not")) + 1
    r2 = c.completions.create(model="tiny-chat", prompt="To be, or not", max_tokens=8, temperature=0)
    assert r2.choices[0].text == r.choices[0].text  # greedy is deterministic
    s1 = c.completions.create(model="tiny-chat", prompt="Hi", max_tokens=10, temperature=1.0, seed=5)
    s2 = c.completions.create(model="tiny-chat", prompt="Hi", max_tokens=10, temperature=1.0, seed=5)
    assert s1.choices[0].text == s2.choices[0].text
    r = c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Hello"}],
                                  max_tokens=12, n=2, temperature=0.9, seed=3, logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and r.choices[0].message.role == "assistant"
    lp = r.choices[0].logprobs.content
    assert lp and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)


def test_streaming_matches_non_streaming(server):
    base, _, _ = server
    c = client(base)
    full = c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Speak"}],
                                     max_tokens=16, temperature=0)
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Speak"}],
                                            max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert any(ch.choices and ch.choices[0].finish_reason for ch in chunks)
    pieces = list(c.completions.create(model="tiny-chat", prompt="Good", max_tokens=6, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == \
        c.completions.create(model="tiny-chat", prompt="Good", max_tokens=6, temperature=0).choices[0].text


def test_concurrent_clients_are_batched(server):
    base, _, _ = server
    c = client(base)
    ref = c.completions.create(model="tiny-chat", prompt="Once", max_tokens=20, temperature=0).choices[0].text
    out = [None] * 8

    def go(i):
        out[i] = c.completions.create(model="tiny-chat", prompt="Once", max_tokens=20, temperature=0).choices[0].text

    ts = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == [ref] * 8


def post(base, path, body, raw=None):
    req = urllib.request.Request(base + path, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        r = urllib.request.urlopen(req)
        return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("body,raw,status,needle", [
    (None, b"{not json", 400, "could not parse"),
    ({"prompt": "x"}, None, 400, "'model' is required"),
    ({"model": "gpt-4", "prompt": "x"}, None, 404, "does not exist"),
    ({"model": "tiny-chat", "prompt": 5}, None, 400, "'prompt' must be"),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": "ten"}, None, 400, "'max_tokens' must be int"),
    ({"model": "tiny-chat", "prompt": "x", "max_tokens": 0}, None, 400, "at least 1"),
    ({"model": "tiny-chat", "prompt": "x " * 300, "max_tokens": 10}, None, 400, "maximum context length"),
    ({"model": "tiny-chat", "prompt": "x", "temperature": 9}, None, 400, "'temperature' is out of range"),
    ({"model": "tiny-chat", "messages": [{"role": "wizard", "content": "x"}]}, None, 400, "unknown role"),
])
def test_bad_requests_get_openai_errors(server, body, raw, status, needle):
    base, _, _ = server
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    code, obj = post(base, path, body, raw)
    assert code == status and needle in obj["error"]["message"]
    code, _ = post(base, "/v1/completions", {"model": "tiny-chat", "prompt": "still up", "max_tokens": 2})
    assert code == 200


def test_client_disconnect_frees_blocks(server):
    base, _, _ = server
    import http.client

    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny-chat", "prompt": "Go", "max_tokens": 200,
                                                         "temperature": 1.0, "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read(50)
    conn.close()  # hang up mid-stream
    deadline = time.time() + 20
    while time.time() < deadline:
        h = json.loads(urllib.request.urlopen(base + "/health").read())
        if h["running"] == 0 and h["free_blocks"] == 256:
            break
        time.sleep(0.2)
    assert h["running"] == 0 and h["free_blocks"] == 256


def test_web_chat_page_streams_a_reply_in_headless_chromium(server):
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    if shutil.which("chromedriver") is None or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, _ = server
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
    try:
        drv.get(base + "/")
        box = drv.find_element(By.ID, "msg")
        box.send_keys("Hello there")
        drv.find_element(By.ID, "send").click()
        reply = WebDriverWait(drv, 60).until(
            lambda d: d.find_element(By.ID, "reply-1") if d.find_elements(By.CSS_SELECTOR, "#reply-1[data-done]")
            else False)
        assert reply.text.strip()
        assert drv.find_element(By.CSS_SELECTOR, ".user").text == "Hello there"
        # a second turn carries the conversation
        box.send_keys("And then?")
        drv.find_element(By.ID, "send").click()
        WebDriverWait(drv, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reply-3[data-done]"))
        assert len(drv.find_elements(By.CSS_SELECTOR, ".assistant")) == 2
    finally:
        drv.quit()
