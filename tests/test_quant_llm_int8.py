"""LLM.int8(): vector-wise int8 with outlier input columns in fp32 (lmforge.quant.llm_int8).

The reference is bitsandbytes' documented algorithm (int8_vectorwise_quant / int8_mixed_scaled_mm),
written out here independently in float64: per-row absmax codes of the weight; per call, the outlier
columns (any |x| >= threshold), the row scales over the non-outlier elements, the outlier columns zeroed in
the int8 part and multiplied in high precision against the dequantized weight columns.
"""
import copy

import pytest
import torch
import torch.nn as nn

from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.quant.config import QuantConfig
from lmforge.quant.linear import format_class
from lmforge.quant.llm_int8 import LLMInt8Linear, apply, int8_matmul, vectorwise_quant
from lmforge.quant.smoothquant import W8A8Linear

torch.set_num_threads(1)


def ref_llm_int8(x, w, b, threshold):
    """bitsandbytes' Linear8bitLt inference from its definition: the codes rounded from the input dtype
    (fp32 here), as bitsandbytes does, everything after in float64."""
    x, w = x.float().reshape(-1, x.shape[-1]), w.float()
    wa = w.abs().amax(1, keepdim=True)
    qw = torch.round(w * (127 / wa)).double()
    out = x.abs() >= threshold
    cols = out.any(0)
    xa = x.abs().masked_fill(out, 0).amax(1, keepdim=True)
    cx = torch.round(x * (127 / xa)).double()
    cx[:, cols] = 0
    x, xa, wa = x.double(), xa.double(), wa.double()
    deq = qw * wa / 127
    y = (cx @ qw.t()) * xa * wa.t() / 127 ** 2 + x[:, cols] @ deq[:, cols].t()
    return (y + (b.double() if b is not None else 0)).float(), torch.nonzero(cols).view(-1)


def _data(seed=0, N=48, I=256, O=96, outlier_cols=(), mag=40.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, I, generator=g)
    for j, c in enumerate(outlier_cols):  # systematic outlier features: large in many rows of one column
        x[:, c] = mag * (1 + 0.5 * j) * torch.randn(N, generator=g).sign() * (0.5 + torch.rand(N, generator=g))
    w = torch.randn(O, I, generator=g) * 0.05
    b = torch.randn(O, generator=g) * 0.1
    return x, w, b


def test_vectorwise_quant_codes_and_outlier_rows():
    x, _, _ = _data(outlier_cols=(5, 77))
    x[3, 200] = 7.0  # a lone outlier element: column 200 becomes an outlier column too
    codes, step, cols = vectorwise_quant(x, threshold=6.0)
    out = x.abs() >= 6.0
    assert cols.tolist() == torch.nonzero(out.any(0)).view(-1).tolist()
    assert set(cols.tolist()) >= {5, 77, 200}
    # the row absmax leaves out only the outlier elements (the rest of an outlier column still counts)
    want = x.abs().masked_fill(out, 0).amax(1, keepdim=True)
    assert torch.equal(step, want / 127)
    ref = torch.round(x.double() * (127 / want.double()))
    ref[:, cols] = 0
    assert codes.dtype == torch.int8
    assert (codes.double() - ref).abs().max() <= 1  # equal but for fp32-vs-fp64 ties of the product
    assert (codes.double() != ref).float().mean() < 1e-3
    assert codes[:, cols].abs().sum() == 0
    # no threshold: plain per-row absmax, an all-zero row gets step 0 and codes 0
    x[7] = 0
    c2, s2, cols2 = vectorwise_quant(x)
    assert cols2 is None and s2[7, 0] == 0 and c2[7].abs().sum() == 0
    assert torch.equal(s2, x.abs().amax(1, keepdim=True) / 127)


def test_int8_matmul_is_exact_where_fp32_is_not():
    g = torch.Generator().manual_seed(1)
    I = 4096  # sums of up to 4096 * 127**2 ~ 6.6e7 > 2**24: an fp32 accumulation rounds
    cx = torch.randint(90, 128, (8, I), generator=g, dtype=torch.int8)
    qw = torch.randint(90, 128, (16, I), generator=g, dtype=torch.int8)
    qw[::2] = -qw[::2]
    exact = cx.long() @ qw.long().t()  # int64 reference
    assert not torch.equal(cx.float() @ qw.float().t(), exact.float())  # (the data is hard: one fp32 matmul rounds)
    one_x, one_w = torch.ones(8, 1), torch.ones(16, 1)
    got = int8_matmul(cx, one_x, qw, one_w)
    assert torch.equal(got, exact.float())
    # with steps: the exact integer sum rescaled once
    sx, sw = torch.rand(8, 1) + 0.5, torch.rand(16, 1) + 0.5
    assert torch.equal(int8_matmul(cx, sx, qw, sw), exact.float() * (sx * sw.t()))
    # one slice (1024 * 127**2 < 2**24) and slices summed in int32, at the extreme codes
    for I in (1024, 3000):
        c1, q1 = torch.full((4, I), 127, dtype=torch.int8), torch.full((6, I), -127, dtype=torch.int8)
        c1[:, 1::2] = 126
        want = (c1.long() @ q1.long().t()).float()
        assert torch.equal(int8_matmul(c1, torch.ones(4, 1), q1, torch.ones(6, 1)), want)


def test_no_outliers_equals_plain_vectorwise_w8a8():
    x, w, b = _data(seed=2)
    assert x.abs().max() < 6.0
    li = LLMInt8Linear.from_weight(w, b, threshold=6.0)
    plain = W8A8Linear.from_weight(w, b)
    assert torch.equal(li.qweight, plain.qweight) and torch.equal(li.scales, plain.scales)
    y = li(x)
    assert li.last_outliers is None
    assert torch.equal(y, plain(x))  # the same int8 path, bit for bit
    ref, _ = ref_llm_int8(x, w, b, 6.0)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_outlier_columns_in_fp32_match_bitsandbytes_semantics():
    x, w, b = _data(seed=3, outlier_cols=(11, 130, 201))
    li = LLMInt8Linear.from_weight(w, b, threshold=6.0)
    y = li(x)
    ref, cols = ref_llm_int8(x, w, b, 6.0)
    assert li.last_outliers.tolist() == cols.tolist() == [11, 130, 201]
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the weight is stored once, in int8: the outlier columns multiply its dequantized columns
    assert torch.allclose(li.dequantize(), torch.round(w * (127 / w.abs().amax(1, keepdim=True))) *
                          (w.abs().amax(1, keepdim=True) / 127), atol=1e-7)
    assert (li.dequantize() - w).abs().max() <= w.abs().amax() / 127 / 2 + 1e-7


def test_planted_outliers_error_far_below_plain_int8():
    x, w, b = _data(seed=4, N=64, outlier_cols=(3, 90, 170, 250))
    li = LLMInt8Linear.from_weight(w, b, threshold=6.0)
    plain = W8A8Linear.from_weight(w, b)

    def err(y, ref):
        return float((y - ref).norm() / ref.norm())

    # the activation side alone (against the product with the same int8 weight): outlier columns in fp32
    # leave only the 1/127 rounding of the ordinary features; per-token int8 spends its range on the outliers
    wq = x @ li.dequantize().t() + b
    e_li, e_plain = err(li(x), wq), err(plain(x), wq)
    assert e_li < e_plain / 10, (e_li, e_plain)
    # against the fp32 layer: what is left is the int8 weight's own rounding
    exact = x @ w.t() + b
    assert err(li(x), exact) < err(plain(x), exact) / 3
    assert err(li(x), exact) < 1.2 * err(wq, exact)


def test_outliers_decided_per_call_over_all_rows():
    x, w, b = _data(seed=5, N=24, outlier_cols=())
    li = LLMInt8Linear.from_weight(w, b, threshold=6.0)
    x3 = x.reshape(2, 12, -1).clone()
    x3[1, 4, 17] = 9.0  # one element of the second sequence
    y3 = li(x3)
    assert li.last_outliers.tolist() == [17]
    assert y3.shape == (2, 12, 96)
    assert torch.equal(y3.reshape(24, -1), li(x3.reshape(24, -1)))  # leading dims flatten: one decision
    # the first sequence alone has no outlier: its int8 part then includes column 17
    y_alone = li(x3[0])
    assert li.last_outliers is None
    ref_batch, _ = ref_llm_int8(x3, w, b, 6.0)
    ref_alone, _ = ref_llm_int8(x3[0], w, b, 6.0)
    assert torch.allclose(y3[0], ref_batch[:12], rtol=1e-5, atol=1e-5)
    assert torch.allclose(y_alone, ref_alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y3[0], y_alone, rtol=0, atol=1e-7)


def test_state_round_trip_and_registry():
    x, w, b = _data(seed=6, outlier_cols=(9,))
    li = LLMInt8Linear.from_weight(w, b, threshold=5.0)
    assert format_class("llm_int8") is LLMInt8Linear
    q = li.qconfig()
    assert q == {"format": "llm_int8", "bits": 8, "threshold": 5.0}
    m = format_class(q["format"]).empty(q, 256, 96, bias=True)
    assert m.qweight.abs().sum() == 0
    m.load_state_dict(li.state_dict(), strict=True)
    assert torch.equal(m(x), li(x))
    assert sorted(li.state_dict()) == ["bias", "qweight", "scales"]
    assert li.weight_bytes() == 96 * 256 + 96 * 4
    for bad in (0, -1.0, True, "6"):
        with pytest.raises(ValueError, match="threshold"):
            LLMInt8Linear(4, 4, threshold=bad)


def _tiny(seed=0, **kw):
    from conftest import perturbed

    torch.manual_seed(seed)
    cfg = preset("tiny-llama", d_model=64, n_layer=2, vocab_size=256, d_ff=128, **kw)
    return perturbed(Transformer(cfg), 0.02, seed=seed)


def test_apply_swaps_every_linear_but_the_skipped():
    model = _tiny()
    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # plant an outlier feature: channel 7 of block 1's mlp_norm output
        model.blocks[1].mlp_norm.weight[7] *= 300
        ref = model(toks)
    q = copy.deepcopy(model)
    rep = apply(q, QuantConfig(method="llm_int8"), calib=toks, progress=False)
    kinds = {n: type(m) for n, m in q.named_modules() if isinstance(m, (nn.Linear, LLMInt8Linear))}
    assert kinds.pop("lm_head") is nn.Linear
    assert set(kinds.values()) == {LLMInt8Linear} and len(kinds) == 8
    assert set(rep["layers"]) == set(kinds) and rep["unquantized"] == ["lm_head"]
    assert all(0 < L["err"] < 0.01 for L in rep["layers"].values())
    # the planted feature shows in the calibration counts of the linear it feeds, and nowhere in block 0
    assert rep["layers"]["blocks.1.mlp.fc"]["outlier_cols_max"] >= 1
    assert rep["layers"]["blocks.0.attn.qkv"]["outlier_cols_max"] == 0
    with torch.no_grad():
        got = q(toks)
    assert float((got - ref).norm() / ref.norm()) < 0.03
    # skip globs are honoured; bits other than 8 refused
    q2 = copy.deepcopy(model)
    rep2 = apply(q2, QuantConfig(method="llm_int8", skip=["lm_head", "blocks.0.*"]), None, progress=False)
    assert isinstance(q2.blocks[0].attn.qkv, nn.Linear) and isinstance(q2.blocks[1].attn.qkv, LLMInt8Linear)
    assert len(rep2["layers"]) == 4 and "outlier_cols_max" not in rep2["layers"]["blocks.1.mlp.fc"]
    with pytest.raises(ValueError, match="bits"):
        apply(copy.deepcopy(model), QuantConfig(method="llm_int8", bits=4), None, progress=False)


class _WeightOnly(nn.Module):
    """The same int8 weight, fp32 activations: the error floor of any int8-weight method."""

    def __init__(self, lin):
        super().__init__()
        self.w, self.b = LLMInt8Linear.from_linear(lin).dequantize(), lin.bias

    def forward(self, x):
        return nn.functional.linear(x, self.w, self.b)


def test_llm_int8_costs_no_more_than_weight_only_on_a_planted_outlier_model():
    """The paper's point on a whole model: a large activation feature (here channels 3 and 40 of every
    norm, x50) ruins per-token int8 activations; LLM.int8 keeps its columns in fp32 and ends as close to
    the fp32 model as int8 weights with fp32 activations."""
    from lmforge.model.surgery import replace_linear

    model = _tiny(seed=1)
    with torch.no_grad():
        for b in model.blocks:
            b.attn_norm.weight[[3, 40]] *= 50
            b.mlp_norm.weight[[3, 40]] *= 50
    toks = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    not_head = lambda n, m: n != "lm_head"  # noqa: E731
    with torch.no_grad():
        ref = model(toks)
        li = copy.deepcopy(model)
        apply(li, QuantConfig(method="llm_int8"), None, progress=False)
        w8 = copy.deepcopy(model)
        replace_linear(w8, lambda n, m: W8A8Linear.from_linear(m), not_head)
        wo = copy.deepcopy(model)
        replace_linear(wo, lambda n, m: _WeightOnly(m), not_head)
        e_li, e_w8, e_wo = (float((m(toks) - ref).norm() / ref.norm()) for m in (li, w8, wo))
    # (over model seeds 0-4: e_li / e_wo 0.98-1.11, e_w8 / e_li 1.97-2.18)
    assert e_li < 1.2 * e_wo, (e_li, e_wo)
    assert e_w8 > 1.5 * e_li, (e_li, e_w8)


def test_quantize_entry_point_and_checkpoint_round_trip(tmp_path):
    from lmforge.quant.api import quantize
    from lmforge.quant.checkpoint import load_quantized, save_quantized

    model = _tiny(seed=2)
    toks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="threshold"):
        quantize(copy.deepcopy(model), QuantConfig(method="llm_int8", threshold=0), progress=False)
    rep = quantize(model, QuantConfig(method="llm_int8", threshold=4.0), progress=False)  # no calibration needed
    assert rep["method"] == "llm_int8" and rep["bytes"]["after"] < rep["bytes"]["before"]
    assert model.quant_config.threshold == 4.0
    save_quantized(model, tmp_path / "q")
    back, _ = load_quantized(tmp_path / "q")
    assert isinstance(back.blocks[0].mlp.fc, LLMInt8Linear) and back.blocks[0].mlp.fc.threshold == 4.0
    with torch.no_grad():
        assert torch.equal(back(toks), model(toks))
