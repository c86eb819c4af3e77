"""`lmforge serve --checkpoint <HF dir>` chats with an imported model in that model's own format.

A tiny random Llama-3-style and Qwen2-style directory (tests/hf_fixtures.py) carries its
family's real chat template in tokenizer_config.json and its stop ids in
generation_config.json. Through the real command line and the official openai client:
the prompt the server builds for a conversation is exactly transformers'
``apply_chat_template(..., add_generation_prompt=True)``, the served model says which
template it uses, and a greedy chat reply equals transformers' own greedy generation
with the same stop ids, cut at the first stop id. (The generation_config's sampling defaults,
e.g. Qwen2's repetition_penalty 1.05, are not applied by the server; vLLM applies them.)
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from hf_fixtures import make_tiny_hf_chat_model

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a play."},
                {"role": "assistant", "content": "Hamlet."},
                {"role": "user", "content": "Another, please."}]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def served(request, tmp_path_factory):
    d = make_tiny_hf_chat_model(tmp_path_factory.mktemp("hf"), request.param)
    log_path = tmp_path_factory.mktemp("log") / "err.txt"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(d), "--port", "0",
                             "--name", "tiny", "--num-blocks", "64"], stderr=log, env=dict(os.environ))
    try:
        deadline, port = time.time() + 90, None
        while port is None and time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()
            m = re.search(r"http://127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(m.group(1)) if m else time.sleep(0.1)
        base = f"http://127.0.0.1:{port}"
        while httpx.get(base + "/health").status_code != 200:
            time.sleep(0.1)
        yield d, base
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_prompt_is_the_models_own_chat_template(served):
    d, base = served
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    want = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    if isinstance(want, dict) or hasattr(want, "input_ids"):  # transformers 5 may return an encoding
        want = list(want["input_ids"])
    r = httpx.post(base + "/tokenize", json={"model": "tiny", "messages": CONVERSATION, "add_generation_prompt": True})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == list(want)
    models = httpx.get(base + "/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and models[0]["chat_template"] == "hf" and models[0]["max_model_len"] == 256


def test_greedy_chat_equals_transformers_with_the_generation_config_stops(served):
    d, base = served
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    gen = json.loads((d / "generation_config.json").read_text())
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    ids = hf_tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = list(ids["input_ids"])
    # plain greedy on both sides: the generation_config's sampling defaults (Qwen2's repetition_penalty
    # 1.05, top_k ...) are not applied by lmforge's server (noted as not done), so HF is told not to either
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[0], repetition_penalty=1.0, top_k=None, top_p=None,
                          temperature=None)[0, len(ids):].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    want = hf_tok.decode(out[:cut])
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    r = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=24, temperature=0)
    c = r.choices[0]
    assert c.message.content == want
    assert c.finish_reason == ("stop" if cut < len(out) else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == min(cut + 1, len(out))
