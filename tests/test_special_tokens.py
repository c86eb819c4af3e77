"""One definition of a model's special tokens (``TokenSpec``) and the HF directories that carry it:
lmforge's prompt and chat ids equal what ``transformers`` makes of the export, ``transformers``
generation stops where lmforge's does, and HF chat models (Llama-3, Qwen2 layouts) import with their
own template and stop ids."""
import json

import pytest
import torch

from hf_fixtures import make_tiny_hf_chat_model
from mixed_sample import MIXED

from lmforge import tokenize
from lmforge.model import load, load_tokens, save, make_config
from lmforge.model.hf import export_hf
from lmforge.model.transformer import Transformer
from lmforge.tokenize.chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE
from lmforge.tokenize.special import PLAIN_TEMPLATE, TokenSpec, default_special_tokens

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
     {"role": "assistant", "content": "A player."}, {"role": "user", "content": "And now?"}],
    [{"role": "developer", "content": "Answer in verse."}, {"role": "user", "content": "naïve café 你好 😀 שלום"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": ""}],
    [{"role": "user", "content": "  padded\n\n  "}, {"role": "assistant", "content": "Ça va?\tOui.\n"},
     {"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}],
]


def hf_ids(enc):
    return enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc


def flat(messages):
    """transformers' templates index ``content`` as a string (lmforge normalizes text parts itself)."""
    from lmforge.tokenize.chat import normalize_messages

    return normalize_messages(messages)


@pytest.fixture(scope="module")
def bpe(corpus_files):
    return tokenize.train("bpe", [str(corpus_files[0])], 400, special_tokens=default_special_tokens("bpe"),
                          show_progress=False)


def tiny_llama(vocab: int, seed: int = 0) -> Transformer:
    from conftest import perturbed

    torch.manual_seed(seed)
    cfg = make_config(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=128,
                      norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False, mlp_bias=False,
                      tie_embeddings=False, arch="llama")
    return perturbed(Transformer(cfg), 0.3, seed=seed)


@pytest.fixture(scope="module")
def exported(bpe, tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    model = tiny_llama(bpe.vocab_size)
    save(model, d / "lm", tokenizer=bpe)
    export_hf(model, d / "hf", tokenizer=bpe, tokens=load_tokens(d / "lm", bpe))
    return model, TokenSpec.for_tokenizer(bpe), d / "hf"


# ---- what lmforge trains ----------------------------------------------------------------------

@pytest.mark.parametrize("kind,vocab", [("bpe", 300), ("wordpiece", 300), ("unigram", 300)])
def test_cli_trained_tokenizers_can_chat(kind, vocab, corpus_files, tmp_path):
    from lmforge.cli import main
    from lmforge.tokenize.chat import parse, render

    assert main(["tokenizer", "train", "--kind", kind, "--vocab-size", str(vocab), "--input", str(corpus_files[0]),
                 "--out", str(tmp_path), "--quiet"]) == 0
    tok = tokenize.load(tmp_path / "tokenizer.lmforge.json")
    assert set(CHAT_SPECIAL_TOKENS) <= set(tok.special_tokens)
    family = {"bpe": "<|endoftext|>", "wordpiece": "[CLS]", "unigram": "<s>"}[kind]
    assert family in tok.special_tokens  # the family's own tokens stay
    spec = TokenSpec.for_tokenizer(tok)
    assert spec.template == "lmforge" and spec.doc == spec.bos == tok.special_tokens["<|bos|>"]
    conv = [{"role": "user", "content": "what news"}, {"role": "assistant", "content": "none"}]
    ids = spec.encode_chat(tok, conv, add_generation_prompt=False)
    assert ids == render(tok, conv)[0] and [m["role"] for m in parse(tok, ids)] == ["user", "assistant"]


def test_pretrain_text_bpe_reserves_chat_tokens_and_saves_the_spec(tmp_path, corpus_texts):
    from lmforge.train import TrainConfig, train

    text = tmp_path / "plays.txt"
    text.write_text(corpus_texts[0][:60_000])
    cfg = TrainConfig(out=str(tmp_path / "run"), text=str(text), tokenizer="bpe:300", preset="tiny",
                      model={"n_layer": 1, "n_head": 2, "d_model": 32}, batch_size=2, seq_len=32, max_steps=2,
                      eval_every=0, eval_batches=1, final_eval_batches=1, warmup_steps=1, peak_flops=1e11, threads=1)
    train(cfg, quiet=True)
    model, tok = load(tmp_path / "run")
    assert tok.vocab_size == 300 and set(CHAT_SPECIAL_TOKENS) <= set(tok.special_tokens)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["tokens"]
    spec = load_tokens(tmp_path / "run", tok)
    assert spec == TokenSpec.from_dict(saved) and spec.template == "lmforge"
    # --text shards are one document with no document token, so a prompt starts with none either
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["tokenizer"]["doc_token_id"] is None and spec.doc is None and spec.bos is None
    assert spec.encode_prompt(tok, "To be") == tok.encode("To be")
    assert tok.special_tokens["<|end|>"] in spec.stop
    ck = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/config.json")).read_text())
    assert ck["tokens"] == saved  # checkpoints carry the same spec


def test_no_chat_tokens_gets_the_plain_template(tmp_path):
    char = tokenize.train("char", ["System: Be kind\n\nUser: to be\n\nAssistant:"], 0)
    spec = TokenSpec.for_tokenizer(char)
    assert spec.template == "plain" and spec.bos is None and spec.stop == []
    msgs = [{"role": "developer", "content": "Be kind"}, {"role": "user", "content": "to be"}]
    assert spec.render_chat(msgs, tok=char) == "System: Be kind\n\nUser: to be\n\nAssistant:"
    assert char.decode(spec.encode_chat(char, msgs)) == "System: Be kind\n\nUser: to be\n\nAssistant:"
    # a model directory saved before specs existed: inferred from its tokenizer, as the data pipeline did
    old = tokenize.ByteBPE.train(["To be, or not to be"] * 20, 270, special_tokens=["<|endoftext|>"],
                                 show_progress=False)
    save(Transformer(make_config(vocab_size=270, n_layer=1, n_head=2, d_model=16, max_seq_len=16)), tmp_path / "m",
         tokenizer=old)
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    del c["tokens"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    spec = load_tokens(tmp_path / "m", old)
    assert spec.template == "plain" and spec.bos == spec.doc == old.special_tokens["<|endoftext|>"]
    assert spec.encode_prompt(old, "To be")[0] == spec.bos


# ---- the HF export ------------------------------------------------------------------------------

def test_export_carries_the_spec(exported, bpe):
    _, spec, d = exported
    st = bpe.special_tokens
    conf = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert conf["eos_token_id"] == gen["eos_token_id"] == spec.stop
    assert set(spec.stop) == {st["<|end|>"], st["<|endoftext|>"], st["<|bos|>"]}  # the document end stops too
    assert conf["bos_token_id"] == gen["bos_token_id"] == st["<|bos|>"]
    assert conf["pad_token_id"] == gen["pad_token_id"] == spec.pad is not None
    assert tc["chat_template"] == CHAT_TEMPLATE and tc["add_bos_token"] is True
    assert (tc["bos_token"], tc["eos_token"], tc["pad_token"]) == ("<|bos|>", "<|end|>", "<|pad|>")
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (spec.bos, spec.stop[0], spec.pad)
    hc = transformers.AutoConfig.from_pretrained(d)
    assert hc.eos_token_id == spec.stop
    assert transformers.GenerationConfig.from_pretrained(d).eos_token_id == spec.stop
    # read back, the export has the same spec (lmforge's template is recognized, not treated as foreign)
    model, tok = load(d)
    assert load_tokens(d, tok) == spec


def test_export_prompt_ids_equal_hf_tokenizer(exported, bpe):
    _, spec, d = exported
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for text in MIXED:
        ours = spec.encode_prompt(bpe, text)
        assert ours[0] == bpe.special_tokens["<|bos|>"]
        # lmforge encodes special-token text in a prompt as text; HF does with split_special_tokens
        assert hf(text, split_special_tokens=True)["input_ids"] == ours, text
        if not any(s in text for s in bpe.special_tokens):
            assert hf(text)["input_ids"] == ours, text


def test_export_chat_ids_equal_apply_chat_template(exported, bpe):
    _, spec, d = exported
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = spec.encode_chat(bpe, conv, add_generation_prompt=gen)
            theirs = hf_ids(hf.apply_chat_template(flat(conv), add_generation_prompt=gen, tokenize=True))
            assert theirs == ours, conv
            assert hf.apply_chat_template(flat(conv), add_generation_prompt=gen, tokenize=False) == \
                spec.render_chat(conv, gen, bpe)
    with pytest.raises(Exception, match="system message may only come first"):
        hf.apply_chat_template([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


def stop_after(model, prompt: list[int], stop_id: int, k: int) -> None:
    """Set ``lm_head``'s row of ``stop_id`` so that greedy decoding from ``prompt`` emits it as its
    ``k``-th new token and never before: the row is orthogonal to the hidden states that chose the
    first ``k - 1`` tokens (its logit there is 0, below their maximum) and wins at the ``k``-th."""
    ids = list(prompt)
    for _ in range(k - 1):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    hidden = {}
    h = model.lm_head.register_forward_hook(lambda m, i, o: hidden.update(x=i[0][0]))
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    h.remove()
    H = hidden["x"][len(prompt) - 1:]  # the states that choose new tokens 1..k
    assert (logits[len(prompt) - 1:-1].max(-1).values > 0.5).all()  # the row's 0 loses there
    before, last = H[:-1], H[-1]
    q, _ = torch.linalg.qr(before.T)
    u = last - q @ (q.T @ last)
    with torch.no_grad():
        model.lm_head.weight[stop_id] = u * (logits[-1].max() + 5.0) / (u @ u)


def test_transformers_generation_stops_where_lmforge_does(bpe, tmp_path):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    model = tiny_llama(bpe.vocab_size, seed=3)
    spec = TokenSpec.for_tokenizer(bpe)
    doc_end = bpe.special_tokens["<|bos|>"]  # the next document: not stop[0], so the list matters
    prompt_text = "HAMLET.\nWhat news?"
    prompt = spec.encode_prompt(bpe, prompt_text)
    stop_after(model, prompt, doc_end, 6)
    export_hf(model, tmp_path, tokenizer=bpe, tokens=spec)

    eng = Engine(model, eos_token_id=None)
    ours = eng.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop_token_ids=spec.stop))[0]
    body = [t for t in ours if t not in spec.stop]
    assert len(body) == 5 and ours[-1] == doc_end  # it did stop, at the document end
    text = bpe.decode(body)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    x = hf_tok(prompt_text, return_tensors="pt")
    assert x["input_ids"][0].tolist() == prompt
    with torch.no_grad():  # the export's generation_config alone decides where it stops
        out = hf_model.generate(**x, max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert out == body + [doc_end]
    pipe = transformers.pipeline("text-generation", model=hf_model, tokenizer=hf_tok)
    got = pipe(prompt_text, max_new_tokens=40, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert got == text
    # without the document token among the stop ids (the old export: <|endoftext|> only) it runs on
    with torch.no_grad():
        longer = hf_model.generate(**x, max_new_tokens=40, do_sample=False,
                                   eos_token_id=bpe.special_tokens["<|endoftext|>"])[0, len(prompt):].tolist()
    assert len(longer) > len(out)


# ---- HF chat models imported ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def hf_chat(request, tmp_path_factory):
    d = make_tiny_hf_chat_model(tmp_path_factory.mktemp("hf"), request.param)
    model, tok = load(d)
    return request.param, d, model, tok, load_tokens(d, tok)


def test_imported_spec_is_the_families(hf_chat):
    family, d, _, tok, spec = hf_chat
    gen = json.loads((d / "generation_config.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert spec.template == "hf" and spec.chat_template == tc["chat_template"]
    assert sorted(spec.stop) == sorted(gen["eos_token_id"])
    assert spec.stop[0] == tok.special_tokens[tc["eos_token"]]  # the template's eos_token
    hf = transformers.AutoTokenizer.from_pretrained(d)
    if family == "llama3":
        assert spec.add_bos and spec.bos == tok.special_tokens["<|begin_of_text|>"] == hf.bos_token_id
        assert spec.pad is None
    else:
        assert not spec.add_bos and spec.bos is None
        assert spec.pad == tok.special_tokens["<|endoftext|>"] == spec.doc


def test_imported_prompt_ids_equal_hf_tokenizer(hf_chat):
    family, d, _, tok, spec = hf_chat
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert tok.normalizer == ("nfc" if family == "qwen2" else None)  # Qwen2's NFC, applied as HF does
    for text in MIXED:
        assert hf(text, split_special_tokens=True)["input_ids"] == spec.encode_prompt(tok, text), text


def test_imported_chat_ids_equal_apply_chat_template(hf_chat):
    _, d, _, tok, spec = hf_chat
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            theirs = hf_ids(hf.apply_chat_template(flat(conv), add_generation_prompt=gen, tokenize=True))
            assert spec.encode_chat(tok, conv, add_generation_prompt=gen) == theirs, conv


def test_imported_model_generates_as_transformers(hf_chat):
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    _, d, model, tok, spec = hf_chat
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    prompt = spec.encode_chat(tok, CONVERSATIONS[1])
    ours = Engine(model, eos_token_id=None).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=spec.stop))[0]
    with torch.no_grad():
        x = torch.tensor([prompt])
        theirs = hf_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                                   temperature=None, top_p=None, top_k=None,
                                   repetition_penalty=1.0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_hf_template_forms_and_bad_files(hf_chat, tmp_path):
    import shutil

    family, d, _, tok, spec = hf_chat
    e = tmp_path / "e"
    shutil.copytree(d, e)
    tc = json.loads((e / "tokenizer_config.json").read_text())
    # the list-of-named-templates form: "default" is the chat template
    tc["chat_template"] = [{"name": "tool_use", "template": "{{ 'tools' }}"},
                           {"name": "default", "template": spec.chat_template}]
    (e / "tokenizer_config.json").write_text(json.dumps(tc))
    assert load_tokens(e, tok) == spec
    # chat_template.jinja (what newer transformers writes) wins over tokenizer_config.json
    (e / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert load_tokens(e, tok).chat_template.startswith("{% for m in messages %}")
    (e / "chat_template.jinja").unlink()
    tc["chat_template"] = [{"name": "tool_use", "template": "x"}]
    (e / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template is a list without a 'default'"):
        load_tokens(e, tok)
    # no template at all: a base model, chatting with the plain template
    del tc["chat_template"]
    (e / "tokenizer_config.json").write_text(json.dumps(tc))
    s = load_tokens(e, tok)
    assert s.template == "plain" and s.chat_template == PLAIN_TEMPLATE and s.stop == spec.stop
    # an int eos_token_id is one stop id; a bad one names the file and field
    (e / "generation_config.json").write_text(json.dumps({"eos_token_id": spec.stop[-1]}))
    assert load_tokens(e, tok).stop == [spec.stop[-1]]
    (e / "generation_config.json").write_text(json.dumps({"eos_token_id": "<|eot_id|>"}))
    with pytest.raises(ValueError, match=r"generation_config.json: eos_token_id must be an int or a list"):
        load_tokens(e, tok)
    (e / "generation_config.json").write_text(json.dumps({"eos_token_id": [10**6]}))
    with pytest.raises(ValueError, match=r"TokenSpec.stop: token id 1000000 is outside the vocabulary"):
        load_tokens(e, tok)
    (e / "generation_config.json").unlink()
    tc["eos_token"] = "<|nope|>"
    (e / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<\|nope\|>' is not a token"):
        load_tokens(e, tok)


def test_nfc_normalizer_survives_lmforge_and_hf_files(hf_chat, tmp_path):
    from tokenizers import Tokenizer

    from lmforge.tokenize.formats import save_hf

    family, _, _, tok, _ = hf_chat
    if family != "qwen2":  # Llama-3 has no normalizer: the two spellings stay two texts
        assert tok.normalizer is None and tok.encode("cafe\u0301") != tok.encode("café")
        return
    text = "".join(MIXED)
    tok.save(tmp_path / "t.json")
    back = tokenize.load(tmp_path / "t.json")
    assert back.normalizer == "nfc" and back.encode(text, disallowed_special=()) == tok.encode(text, disallowed_special=())
    save_hf(tok, tmp_path / "tokenizer.json")
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for t in MIXED:
        assert ref.encode(t, add_special_tokens=False).ids == tok.encode(t, allowed_special="all"), t
    # composed and decomposed spellings are one text to it, as to HF
    assert tok.encode("cafe\u0301") == tok.encode("café")


def test_lmforge_generate_stops_at_the_saved_stop_ids(bpe, tmp_path, capsys):
    """``lmforge generate`` prompts with the saved BOS and stops at the saved stop ids (here the document
    token, which it did not stop at before the spec)."""
    from lmforge.cli import main

    model = tiny_llama(bpe.vocab_size, seed=5)
    spec = TokenSpec.for_tokenizer(bpe)
    prompt = "OPHELIA.\nMy lord,"
    stop_after(model, spec.encode_prompt(bpe, prompt), bpe.special_tokens["<|bos|>"], 4)
    save(model, tmp_path / "m", tokenizer=bpe)
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--temperature", "0", "--max-tokens", "30",
                 "--json", prompt]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 3
    # a spec saved without the document token among the stop ids: generate runs on to max-tokens
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    c["tokens"]["stop"] = [bpe.special_tokens["<|end|>"]]
    (tmp_path / "m" / "config.json").write_text(json.dumps(c))
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--temperature", "0", "--max-tokens", "30",
                 "--json", prompt]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] > 3
