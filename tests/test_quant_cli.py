"""``lmforge quantize`` (quant._cli), end to end on a tiny checkpoint, through its own parser.

References: the same model quantized in-process with ``quant.api.quantize`` (the written directory must load
to identical logits); the flags must land in the saved QuantConfig; bad flags are usage errors naming the
field; a bad group size names the linear and writes nothing.
"""
import argparse
import json

import pytest
import torch

from lmforge._config import UsageError
from lmforge.quant import _cli
from lmforge.quant.api import quantize
from lmforge.quant.checkpoint import is_quantized, load_quantized
from lmforge.quant.config import QuantConfig

torch.set_num_threads(1)


def _run(*argv):
    p = argparse.ArgumentParser(prog="lmforge")
    _cli.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["quantize", *argv])
    return a.fn(a)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import perturbed

    from lmforge import tokenize
    from lmforge.model import make_config, save
    from lmforge.model.transformer import Transformer

    tok = tokenize.train("bpe", ["to be or not to be, that is the question " * 50], 300, show_progress=False)
    torch.manual_seed(0)
    m = perturbed(Transformer(make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, max_seq_len=32,
                                          norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama")), 0.2)
    return save(m, tmp_path_factory.mktemp("cli") / "fp32", tokenizer=tok)


def test_quantize_end_to_end(ckpt, tmp_path, capsys):
    from lmforge.model import load

    out = tmp_path / "q4"
    assert _run("--checkpoint", str(ckpt), "--out", str(out), "--bits", "4", "--granularity", "group",
                "--group-size", "16", "--asym", "--quiet") == 0
    text = capsys.readouterr().out
    assert "blocks.0.attn.qkv" in text and "96x32" in text and "model:" in text and "smaller" in text
    assert "8.00 bits per weight" in text  # 4 + (scale + zero point) * 32 bits / 16 columns
    assert is_quantized(out)
    m, tok = load_quantized(out)
    ref, _ = load(ckpt)
    quantize(ref, QuantConfig(bits=4, granularity="group", group_size=16, sym=False), progress=False)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    assert torch.equal(m(x), ref(x))
    assert m.quant_config == QuantConfig(bits=4, granularity="group", group_size=16, sym=False)
    rep = json.loads((out / "quant_report.json").read_text())
    assert sorted(rep["layers"]) == sorted(f"blocks.{i}.{n}" for i in range(2)
                                           for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert rep["bytes"]["after"] < rep["bytes"]["before"]
    c = json.loads((out / "config.json").read_text())
    assert c["tokens"] == json.loads((ckpt / "config.json").read_text())["tokens"]


def test_fp8_flags_and_skip(ckpt, tmp_path, capsys):
    out = tmp_path / "f8"
    assert _run("--checkpoint", str(ckpt), "--out", str(out), "--method", "fp8", "--fp8-format", "e5m2",
                "--fp8-scale", "channel", "--activations", "--skip", "--json", "-q") == 0
    rep = json.loads(capsys.readouterr().out)
    assert "lm_head" in rep["layers"]
    m, _ = load_quantized(out)
    q = m.lm_head.qconfig()
    assert q == {"format": "fp8", "fp8_format": "e5m2", "fp8_scale": "channel", "activations": True}
    assert m.quant_config.skip == []


@pytest.mark.parametrize("argv,msg", [
    (["--method", "gtpq"], "method: got 'gtpq'.*did you mean 'gptq'"),
    (["--bits", "12"], "bits: got 12"),
    (["--method", "fp8", "--bits", "4"], "bits: got 4, expected 8 for method fp8"),
    (["--granularity", "rows"], "granularity: got 'rows'"),
    (["--alpha", "2"], "alpha: got 2.0"),
])
def test_bad_flags_are_usage_errors(ckpt, tmp_path, argv, msg):
    with pytest.raises(UsageError, match=msg):
        _run("--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), *argv)
    assert not (tmp_path / "x").exists()


def test_bad_group_names_linear_and_writes_nothing(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"blocks.0.attn.qkv: weight shape \(96, 32\).*group_size 24"):
        _run("--checkpoint", str(ckpt), "--out", str(tmp_path / "x"), "--bits", "4", "--granularity", "group",
             "--group-size", "24", "-q")
    assert not (tmp_path / "x").exists()


def test_refuses_quantized_input_and_same_dir(ckpt, tmp_path):
    out = tmp_path / "q8"
    _run("--checkpoint", str(ckpt), "--out", str(out), "-q")
    with pytest.raises(UsageError, match="already quantized"):
        _run("--checkpoint", str(out), "--out", str(tmp_path / "again"), "-q")
    with pytest.raises(UsageError, match="same directory"):
        _run("--checkpoint", str(ckpt), "--out", str(ckpt), "-q")
    with pytest.raises(UsageError, match="is a file"):
        _run("--checkpoint", str(ckpt / "config.json"), "--out", str(tmp_path / "y"), "-q")


# the routes docs/quantization.md and README.md show, through `lmforge` itself (cli.main), on a tiny model:
# every method (the calibrated ones reading --data's train split), then generate from and export the result
DOC_ROUTES = {
    "rtn8": ["--method", "rtn", "--bits", "8", "--granularity", "group", "--group-size", "32"],
    "rtn4": ["--method", "rtn", "--bits", "4", "--granularity", "group", "--group-size", "32", "--asym"],
    "fp8": ["--method", "fp8", "--fp8-format", "e4m3", "--fp8-scale", "channel"],
    "int8": ["--method", "llm_int8", "--threshold", "6.0"],
    "sq": ["--method", "smoothquant", "--alpha", "0.5", "--data", None],
    "gptq": ["--method", "gptq", "--bits", "4", "--granularity", "group", "--group-size", "32", "--act-order",
             "--data", None],
    "awq": ["--method", "awq", "--bits", "4", "--granularity", "group", "--group-size", "32", "--data", None],
}


@pytest.mark.parametrize("name", sorted(DOC_ROUTES))
def test_documented_routes_through_the_command_line(ckpt, tmp_path, name, capsys):
    import numpy as np
    from test_quant_calib import write_shards

    from lmforge.cli import main
    from lmforge.model import load

    _, tok = load(ckpt)
    data = write_shards(tmp_path / "data", {s: np.random.default_rng(k).integers(0, tok.vocab_size, 9000)
                                            for k, s in enumerate(("train", "val", "test"))})
    argv = [str(data) if a is None else a for a in DOC_ROUTES[name]]
    out = tmp_path / name
    assert main(["quantize", "--checkpoint", str(ckpt), "--out", str(out), *argv, "--calib-samples", "8",
                 "--calib-seq-len", "32", "-q"]) == 0
    assert is_quantized(out)
    assert main(["generate", "--checkpoint", str(out), "to be", "--max-tokens", "5"]) == 0
    if name in ("rtn8", "gptq"):  # the GGUF export takes a quantized checkpoint too (dequantized, re-quantized)
        gguf = tmp_path / f"{name}.gguf"
        assert main(["export", "--checkpoint", str(out), "--format", "gguf", "--type", "q8_0", "--out", str(gguf)]) == 0
        assert gguf.stat().st_size > 0
