"""quant.linear (IntLinear, FP8Linear, the registry), quant.rtn.apply and quant.api.quantize.

References: ``F.linear`` on the module's own ``dequantize()`` (the forward must be exactly that computation);
``formats.rtn_quantize``/``dequantize_codes`` for what the stored buffers must decode to; the layout the
contract states (int8 (O, I); two codes per byte, column 2j low nibble); a permuted module against the
unpermuted one with the same effective weight; empty() + load_state_dict against the original module.
"""
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.quant import formats as fm
from lmforge.quant.config import QuantConfig
from lmforge.quant.linear import FORMATS, FP8Linear, IntLinear, QuantLinear, format_class

torch.set_num_threads(1)

INT_CASES = [  # bits, granularity, sym, qweight dtype, packed
    (8, "channel", True, torch.int8, False), (8, "group", True, torch.int8, False),
    (8, "tensor", True, torch.int8, False), (8, "channel", False, torch.uint8, False),
    (6, "group", True, torch.uint8, False), (5, "channel", False, torch.uint8, False),
    (4, "group", True, torch.uint8, True), (4, "group", False, torch.uint8, True),
    (4, "channel", True, torch.uint8, True), (3, "group", False, torch.uint8, True),
    (3, "tensor", True, torch.uint8, True), (2, "group", True, torch.uint8, True),
]


def _linear(I=48, O=20, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(I, O, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 4.0, I))
    return lin


@pytest.mark.parametrize("bits,gran,sym,dtype,packed", INT_CASES)
def test_int_linear_storage_and_forward(bits, gran, sym, dtype, packed):
    lin = _linear(I=47 if gran != "group" else 48)  # an odd width where groups allow: a half-filled last byte
    I, O = lin.in_features, lin.out_features
    m = IntLinear.from_linear(lin, bits, gran, 16, sym)
    assert isinstance(m, QuantLinear) and (m.in_features, m.out_features) == (I, O)
    assert m.qweight.dtype == dtype and m.qweight.shape == (O, (I + 1) // 2 if packed else I)
    G = I // 16 if gran == "group" else 1
    assert m.scales.shape == ((1, 1) if gran == "tensor" else (O, G)) and m.scales.dtype == torch.float32
    assert (m.zeros is None) == sym
    assert [n for n, _ in m.named_parameters()] == ["bias"]  # no weight Parameter; storage is buffers
    assert set(m.state_dict()) == {"qweight", "scales", "bias"} | (set() if sym else {"zeros"})
    codes, s, z = fm.rtn_quantize(lin.weight, bits, gran, 16, sym)
    assert torch.equal(m.codes(), codes)
    assert torch.equal(m.dequantize(), fm.dequantize_codes(codes, s, z))
    x = torch.randn(2, 3, I)
    assert torch.equal(m(x), F.linear(x, m.dequantize(), m.bias))
    assert (m(x) - lin(x)).abs().max() < 0.6 * 2 ** (8 - bits)  # quantization moved it, but not wildly
    nz = 0 if sym else m.zeros.numel() * 4
    assert m.weight_bytes() == m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * 4 + nz


def test_packed_byte_layout_from_codes():
    codes = torch.tensor([[-8, 7, 0, -1], [1, 2, 3, 4]])  # 4-bit sym: u = q + 8
    m = IntLinear.from_codes(codes, torch.ones(2, 1), None, 4, "channel", 4, True)
    u = codes + 8
    assert m.qweight.tolist() == [[int(u[r, 0]) | int(u[r, 1]) << 4, int(u[r, 2]) | int(u[r, 3]) << 4] for r in range(2)]
    assert m.dequantize().tolist() == codes.float().tolist()
    m8 = IntLinear.from_codes(codes, torch.full((2, 1), 0.5), None, 8, "channel", 4, True)
    assert m8.qweight.dtype == torch.int8 and torch.equal(m8.qweight, codes.to(torch.int8))
    ua = torch.tensor([[0, 255, 3, 9]])
    ma = IntLinear.from_codes(ua, torch.ones(1, 1), torch.full((1, 1), 3.0), 8, "channel", 4, False)
    assert ma.qweight.dtype == torch.uint8 and ma.dequantize().tolist() == [[-3.0, 252.0, 0.0, 6.0]]


def test_from_codes_validates():
    s = torch.ones(2, 1)
    with pytest.raises(ValueError, match="outside -8..7"):
        IntLinear.from_codes(torch.tensor([[8, 0], [0, 0]]), s, None, 4, "channel", 2, True)
    with pytest.raises(ValueError, match="scales shape"):
        IntLinear.from_codes(torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 2), None, 4, "channel", 2, True)
    with pytest.raises(ValueError, match="zeros must be given"):
        IntLinear.from_codes(torch.zeros(2, 4, dtype=torch.int64), s, None, 4, "channel", 2, False)
    with pytest.raises(ValueError, match="permutation"):
        IntLinear.from_codes(torch.zeros(2, 4, dtype=torch.int64), s, None, 4, "channel", 2, True,
                             in_perm=torch.tensor([0, 1, 1, 3]))
    with pytest.raises(ValueError, match=r"IntLinear.*\(2, 6\).*group_size 4"):
        IntLinear(6, 2, 4, "group", 4, True)


@pytest.mark.parametrize("bits,sym", [(8, True), (4, False)])
def test_in_perm(bits, sym):
    """Stored column j holds original column perm[j]: the module equals an unpermuted one with the same
    effective weight, and dequantize() is in the original order."""
    lin = _linear(I=32, O=8)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(32, generator=g)
    stored_w = lin.weight.detach()[:, perm]
    codes, s, z = fm.rtn_quantize(stored_w, bits, "group", 8, sym)
    m = IntLinear.from_codes(codes, s, z, bits, "group", 8, sym, bias=lin.bias, in_perm=perm)
    deq_stored = fm.dequantize_codes(codes, s, z)
    want = torch.empty_like(deq_stored)
    want[:, perm] = deq_stored
    assert torch.equal(m.dequantize(), want)
    assert torch.equal(m.dequantize()[:, perm], m.dequantize_stored())
    x = torch.randn(4, 32)
    assert torch.allclose(m(x), F.linear(x, m.dequantize(), lin.bias), atol=1e-5)
    assert torch.allclose(m(x), F.linear(x[:, perm], deq_stored, lin.bias), atol=0)
    assert not torch.allclose(m(x), F.linear(x, deq_stored, lin.bias), atol=1e-3)  # the permutation matters
    assert m.qconfig()["in_perm"] is True
    assert m.weight_bytes() == m.qweight.numel() * m.qweight.element_size() + s.numel() * 4 * (1 if sym else 2) + 32 * 8


def _roundtrip(m):
    q = m.qconfig()
    assert q["format"] in FORMATS
    import json

    q = json.loads(json.dumps(q))
    e = format_class(q["format"]).empty(q, m.in_features, m.out_features, m.bias is not None)
    assert set(e.state_dict()) == set(m.state_dict())
    for k, v in m.state_dict().items():
        assert e.state_dict()[k].shape == v.shape and e.state_dict()[k].dtype == v.dtype, k
    e.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(3, m.in_features)
    assert torch.equal(e(x), m(x))
    assert e.qconfig() == m.qconfig()


@pytest.mark.parametrize("bits,gran,sym,dtype,packed", INT_CASES)
def test_int_empty_load_round_trip(bits, gran, sym, dtype, packed):
    _roundtrip(IntLinear.from_linear(_linear(bias=bits % 2 == 0), bits, gran, 16, sym))


def test_int_empty_load_round_trip_with_perm():
    lin = _linear(I=32, O=8)
    codes, s, z = fm.rtn_quantize(lin.weight, 4, "group", 8, True)
    _roundtrip(IntLinear.from_codes(codes, s, z, 4, "group", 8, True, in_perm=torch.randperm(32)))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("kind", ["tensor", "channel"])
@pytest.mark.parametrize("act", [False, True])
def test_fp8_linear(fmt, kind, act):
    lin = _linear()
    m = FP8Linear.from_linear(lin, fmt, kind, act)
    assert m.weight.dtype == fm.fp8_dtype(fmt) and m.scale.shape == ((1, 1) if kind == "tensor" else (20, 1))
    assert [n for n, _ in m.named_parameters()] == ["bias"]
    w8, s = fm.fp8_quantize(lin.weight, fmt, kind)
    assert torch.equal(m.weight, w8) and torch.equal(m.scale, s)
    assert torch.equal(m.dequantize(), w8.float() * s)
    x = torch.randn(2, 5, 48)
    xin = fm.fp8_fake_quant(x, fmt) if act else x
    assert torch.equal(m(x), F.linear(xin, m.dequantize(), m.bias))
    if act:
        assert not torch.equal(m(x), F.linear(x, m.dequantize(), m.bias))
    assert m.weight_bytes() == 20 * 48 + s.numel() * 4
    _roundtrip(m)


def test_format_registry():
    assert format_class("int") is IntLinear and format_class("fp8") is FP8Linear
    with pytest.raises(ValueError, match=r"got 'int4'.*fp8, int, llm_int8, w8a8"):
        format_class("int4")
    with pytest.raises(ValueError, match="field 'bits' missing"):
        IntLinear.empty({"format": "int", "granularity": "channel", "group_size": 8, "sym": True}, 8, 4, False)


# ---- rtn.apply and quantize() on a tiny model ----

def _tiny(tie=False, seed=0):
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(make_config(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=32, norm="rmsnorm",
                                   mlp="swiglu", pos="rope", arch="llama", tie_embeddings=tie)).eval()


LINEARS = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


def test_quantize_rtn_swaps_and_reports():
    from lmforge.quant.api import quantize

    m = _tiny()
    x = torch.randint(0, 64, (2, 12))
    ref = m(x)
    r = quantize(m, QuantConfig(bits=8), progress=False)
    assert sorted(r["layers"]) == sorted(LINEARS) and r["method"] == "rtn"
    assert isinstance(m.lm_head, nn.Linear) and not isinstance(m.lm_head, QuantLinear)  # skipped by default
    for n in LINEARS:
        mod = m.get_submodule(n)
        assert isinstance(mod, IntLinear) and mod.bits == 8
        assert 0 < r["layers"][n]["err"] < 0.01
    assert m.quant_config.bits == 8
    assert r["bytes"]["after"] < r["bytes"]["before"]
    assert (m(x) - ref).abs().max() < 0.05


def test_quantize_skip_globs_and_fp8():
    from lmforge.quant.api import quantize

    m = _tiny(tie=True)
    r = quantize(m, QuantConfig(method="fp8", fp8_format="e5m2", skip=["blocks.1.*"]), progress=False)
    assert sorted(r["layers"]) == sorted([n for n in LINEARS if n.startswith("blocks.0")] + ["lm_head"])
    assert isinstance(m.lm_head, FP8Linear) and type(m.blocks[1].attn.qkv) is nn.Linear
    assert isinstance(m.tok_emb.weight, nn.Parameter)  # the tied embedding stays fp32


def test_group_error_before_anything_changes():
    from lmforge.quant.api import quantize

    m = _tiny()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: weight shape \(96, 32\).*group_size 24"):
        quantize(m, QuantConfig(bits=4, granularity="group", group_size=24), progress=False)
    assert all(type(mod) is nn.Linear for n, mod in m.named_modules() if n in LINEARS)


def test_quantize_bad_config_and_calibration(monkeypatch):
    from lmforge.quant.api import quantize

    m = _tiny()
    with pytest.raises(ValueError, match="method: got 'rnt'.*did you mean 'rtn'"):
        quantize(m, QuantConfig(method="rnt"), progress=False)
    fake = types.ModuleType("lmforge.quant.gptq")
    fake.NEEDS_CALIBRATION = True
    seen = {}

    def apply(model, cfg, calib, progress=True):
        seen["calib"] = calib
        return {"layers": {}}

    fake.apply = apply
    monkeypatch.setitem(sys.modules, "lmforge.quant.gptq", fake)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        quantize(m, QuantConfig(method="gptq", bits=4), progress=False)
    with pytest.raises(ValueError, match="calib: expected an integer token tensor"):
        quantize(m, QuantConfig(method="gptq", bits=4), calib=torch.zeros(2, 3), progress=False)
    quantize(m, QuantConfig(method="gptq", bits=4), calib=torch.zeros(2, 3, dtype=torch.int32), progress=False)
    assert seen["calib"].dtype == torch.int64 and m.quant_config.method == "gptq"


# ---- QuantConfig ----

def test_config_round_trip_and_checks():
    from lmforge.quant.config import check_config

    c = QuantConfig(method="gptq", bits=3, granularity="group", group_size=64, act_order=True, skip=["lm_head", "x*"])
    assert QuantConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown field 'group'.*did you mean 'group_size'"):
        QuantConfig.from_dict({"group": 3})
    bad = [("bits", 9, "bits: got 9"), ("bits", 1, "bits: got 1"), ("granularity", "row", "granularity: got 'row'"),
           ("group_size", 0, "group_size: got 0"), ("fp8_format", "e4m4", "fp8_format"), ("alpha", 1.5, "alpha"),
           ("damp", 0.0, "damp: got 0.0"), ("sym", "yes", "sym: got 'yes'"), ("skip", "lm_head", "skip"),
           ("threshold", -1.0, "threshold"), ("calib_samples", 0, "calib_samples"), ("bits", True, "bits")]
    for f, v, msg in bad:
        with pytest.raises(ValueError, match="quantize: " + msg):
            check_config(QuantConfig(**{f: v}))
    for method in ("llm_int8", "smoothquant", "fp8"):
        with pytest.raises(ValueError, match=f"bits: got 4, expected 8 for method {method}"):
            check_config(QuantConfig(method=method, bits=4))
    check_config(QuantConfig(method="awq", bits=2))
