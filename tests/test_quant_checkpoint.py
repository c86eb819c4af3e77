"""quant.checkpoint: save_quantized / load_quantized / is_quantized.

References: the saved model itself (the loaded model's logits must be identical, bit for bit, for every
format, tied and untied heads, a quantized head); the directory before a failed save (left untouched);
hand-broken config.json files (each error must name the file and the field).
"""
import json

import pytest
import torch
import torch.nn as nn

from lmforge.quant.api import quantize
from lmforge.quant.checkpoint import is_quantized, load_quantized, save_quantized
from lmforge.quant.config import QuantConfig
from lmforge.quant.linear import FP8Linear, IntLinear

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tok():
    from lmforge import tokenize

    return tokenize.train("bpe", ["to be or not to be, that is the question " * 50], 300, show_progress=False)


def _tiny(tok, tie=False, qk_norm=False):
    from conftest import perturbed

    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    return perturbed(Transformer(make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                                             max_seq_len=32, norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama",
                                             tie_embeddings=tie, qk_norm=qk_norm)), 0.2)


CFGS = [QuantConfig(), QuantConfig(bits=4, granularity="group", group_size=16, sym=False),
        QuantConfig(bits=3, granularity="tensor", skip=[]),
        QuantConfig(method="fp8", fp8_scale="channel", activations=True, skip=[]),
        QuantConfig(method="fp8", fp8_format="e5m2")]


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: f"{c.method}{c.bits}-{c.granularity}-{len(c.skip)}")
def test_save_load_logits_identical(tmp_path, tok, cfg, tie):
    m = _tiny(tok, tie)
    quantize(m, cfg, progress=False)
    x = torch.randint(0, tok.vocab_size, (2, 16))
    want = m(x)
    d = save_quantized(m, tmp_path / "q", tokenizer=tok)
    assert is_quantized(d)
    m2, tok2 = load_quantized(d)
    assert torch.equal(m2(x), want)
    assert tok2.encode("to be or not") == tok.encode("to be or not")
    assert m2.quant_config == cfg
    kinds = {n: type(mod) for n, mod in m.named_modules()}
    assert {n: type(mod) for n, mod in m2.named_modules()} == kinds
    assert (kinds["lm_head"] is nn.Linear) == ("lm_head" in cfg.skip)
    c = json.loads((d / "config.json").read_text())
    q = c["quantization_config"]
    assert q["quant_method"] == "lmforge" and q["config"] == cfg.to_dict()
    assert q["modules"]["blocks.0.mlp.fc"] == m.blocks[0].mlp.fc.qconfig()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_quantized_storage_in_safetensors(tmp_path, tok):
    from safetensors import safe_open

    m = _tiny(tok)
    quantize(m, QuantConfig(bits=4, granularity="group", group_size=16), progress=False)
    d = save_quantized(m, tmp_path / "q", tokenizer=tok)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.0.attn.qkv.qweight").dtype == torch.uint8
        assert tuple(f.get_tensor("blocks.0.attn.qkv.qweight").shape) == (96, 16)  # 32 columns, two per byte
    assert "blocks.0.attn.qkv.weight" not in keys and "lm_head.weight" in keys
    full = sum(p.numel() * 4 for p in _tiny(tok).parameters())
    assert (d / "model.safetensors").stat().st_size < full


def test_is_quantized_false(tmp_path, tok):
    from lmforge.model import save

    assert not is_quantized(tmp_path / "nothing")
    save(_tiny(tok), tmp_path / "fp32", tokenizer=tok)
    assert not is_quantized(tmp_path / "fp32")
    with pytest.raises(ValueError, match=r"config.json: field 'quantization_config' missing"):
        load_quantized(tmp_path / "fp32")


def _saved(tmp_path, tok):
    m = _tiny(tok)
    quantize(m, QuantConfig(bits=4, granularity="group", group_size=16), progress=False)
    return save_quantized(m, tmp_path / "q", tokenizer=tok)


def _edit(d, fn):
    p = d / "config.json"
    c = json.loads(p.read_text())
    fn(c)
    p.write_text(json.dumps(c))


BROKEN = [
    (lambda c: c["quantization_config"].update(quant_method="gptq-hf"), "'quantization_config.quant_method'"),
    (lambda c: c["quantization_config"].pop("modules"), "'quantization_config.modules'"),
    (lambda c: c["quantization_config"]["modules"]["blocks.0.attn.qkv"].update(format="int3"),
     r"'quantization_config.modules.blocks.0.attn.qkv'.*'int3'"),
    (lambda c: c["quantization_config"]["modules"]["blocks.0.attn.qkv"].pop("bits"),
     r"'quantization_config.modules.blocks.0.attn.qkv'.*'bits' missing"),
    (lambda c: c["quantization_config"]["modules"].update({"blocks.0.attn_norm": {"format": "int"}}),
     r"'quantization_config.modules.blocks.0.attn_norm': the model has no linear"),
    (lambda c: c["quantization_config"]["config"].update(bitz=4), r"'quantization_config.config'.*'bitz'"),
    (lambda c: c.update(format="hf"), "field 'format'"),
    (lambda c: c["quantization_config"]["modules"]["blocks.0.attn.qkv"].update(bits=8),
     r"model.safetensors: tensor 'blocks.0.attn.qkv.qweight' is torch.uint8 \(96, 16\).*torch.int8 \(96, 32\)"),
    (lambda c: c["quantization_config"]["modules"].pop("blocks.1.mlp.proj"),
     r"model.safetensors: unexpected tensors \['blocks.1.mlp.proj.qweight'"),
]


@pytest.mark.parametrize("edit,msg", BROKEN)
def test_bad_fields_name_file_and_field(tmp_path, tok, edit, msg):
    d = _saved(tmp_path, tok)
    _edit(d, edit)
    with pytest.raises(ValueError, match=msg) as e:
        load_quantized(d)
    assert str(d) in str(e.value)


def test_bad_json(tmp_path, tok):
    d = _saved(tmp_path, tok)
    (d / "config.json").write_text("{not json")
    assert not is_quantized(d)
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        load_quantized(d)


def test_failed_save_leaves_the_directory(tmp_path, tok, monkeypatch):
    d = _saved(tmp_path, tok)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ValueError, match="no quantized linear"):
        save_quantized(_tiny(tok), d, tokenizer=tok)  # an fp32 model: refused before writing
    import lmforge.model as lm

    def broken_save(model, directory, **kw):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(lm, "save", broken_save)
    m = _tiny(tok)
    quantize(m, QuantConfig(method="fp8"), progress=False)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(m, d, tokenizer=tok)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    m2, _ = load_quantized(d)
    assert isinstance(m2.blocks[0].attn.qkv, IntLinear) and not isinstance(m2.blocks[0].attn.qkv, FP8Linear)
