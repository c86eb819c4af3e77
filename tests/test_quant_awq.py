"""lmforge.quant.awq: the scaling pairs fold exactly, AWQ's per-layer error on held-out activations is below
RTN's at the same bits and group size, and bad input is refused before anything changes."""
import copy
import json

import pytest
import torch
import torch.nn as nn

from conftest import perturbed
from lmforge.model import make_config, preset
from lmforge.model.transformer import Transformer
from lmforge.quant import awq
from lmforge.quant import formats as fm
from lmforge.quant.calib import capture_inputs
from lmforge.quant.config import QuantConfig
from lmforge.quant.linear import IntLinear

V = 256


@pytest.fixture(autouse=True)
def one_thread():
    """One thread (the searches are many small products; extra threads only spin on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0, outliers=True, **kw):
    """A tiny model moved off its init; with ``outliers`` a few channels of every norm are 8x larger (the
    salient input channels trained LLMs have, which AWQ's scales are for)."""
    torch.manual_seed(seed)
    base = dict(vocab_size=V, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=64, norm="rmsnorm",
                pos="rope", mlp="swiglu", qk_norm=True, tie_embeddings=False)
    m = perturbed(Transformer(make_config(**{**base, **kw})), 0.05, seed=seed + 1)
    if outliers:
        with torch.no_grad():
            for b in m.blocks:
                b.attn_norm.weight[:4] *= 8
                b.mlp_norm.weight[:4] *= 8
    return m


def _tokens(n, T=32, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


CONFIGS = {
    "qwen3-like": ({}, ["blocks.{i}.attn_norm->blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv[v]->blocks.{i}.attn.proj",
                        "blocks.{i}.mlp_norm->blocks.{i}.mlp.fc", "blocks.{i}.mlp.fc[up]->blocks.{i}.mlp.proj"], []),
    "gqa-relu2-bias": (dict(n_kv_head=2, mlp="relu2", qkv_bias=True, mlp_bias=True, qk_norm=False),
                       ["blocks.{i}.attn_norm->blocks.{i}.attn.qkv", "blocks.{i}.mlp_norm->blocks.{i}.mlp.fc",
                        "blocks.{i}.mlp.fc->blocks.{i}.mlp.proj"],
                       ["blocks.{i}.attn.qkv[v]->blocks.{i}.attn.proj"]),
    "gpt2-like": (dict(norm="layernorm", pos="learned", mlp="gelu", qk_norm=False),
                  ["blocks.{i}.attn_norm->blocks.{i}.attn.qkv", "blocks.{i}.attn.qkv[v]->blocks.{i}.attn.proj",
                   "blocks.{i}.mlp_norm->blocks.{i}.mlp.fc"],
                  ["blocks.{i}.mlp.fc->blocks.{i}.mlp.proj"]),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folding_scales_leaves_the_logits_unchanged(name):
    kw, want, want_skipped = CONFIGS[name]
    m = _model(**kw).eval()
    if name == "gpt2-like":  # LayerNorm biases away from zero, so folding into them is tested too
        with torch.no_grad():
            for b in m.blocks:
                b.attn_norm.bias.normal_(0, 0.3)
                b.mlp_norm.bias.normal_(0, 0.3)
    x = _tokens(2)
    with torch.no_grad():
        ref = m(x)
    g = torch.Generator().manual_seed(5)
    changed = 0
    for i in range(len(m.blocks)):
        pairs, skipped = awq.block_pairs(m, i)
        assert [p.name for p in pairs] == [w.format(i=i) for w in want]
        assert sorted(skipped) == sorted(w.format(i=i) for w in want_skipped)
        for p in pairs:
            before = {n: t.clone() for n, t in m.state_dict().items()}
            s = torch.exp(torch.randn(m.get_submodule(p.linears[0]).in_features, generator=g))  # 0.05 .. 20
            awq.fold(m, p, s)
            changed += sum(not torch.equal(before[n], t) for n, t in m.state_dict().items())
    assert changed >= 2 * len(want) * len(m.blocks)  # every fold touched its prev op and its linears
    with torch.no_grad():
        out = m(x)
    assert (out - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
    # a wrong fold is seen: scaling the linear without its prev op changes the logits
    p = awq.block_pairs(m, 0)[0][0]
    with torch.no_grad():
        m.get_submodule(p.linears[0]).weight.mul_(2.0)
        assert (m(x) - ref).abs().max() > 1e-3


def test_skipped_pair_reasons_name_the_cause():
    _, skipped = awq.block_pairs(_model(n_kv_head=2), 0)
    assert "grouped-query attention (4 query heads, 2 key/value heads)" in skipped["blocks.0.attn.qkv[v]->blocks.0.attn.proj"]
    m = Transformer(preset("tiny-qwen2-moe", d_model=64, vocab_size=V))
    pairs, skipped = awq.block_pairs(m, 1)
    assert [p.name for p in pairs] == ["blocks.1.attn_norm->blocks.1.attn.qkv"]
    assert "MoE" in skipped["blocks.1.mlp_norm->blocks.1.mlp"]


def _effective(model_q, name, factors):
    """A quantized linear's weight in the original coordinates: s_out * Q / s_in."""
    w = model_q.get_submodule(name).dequantize()
    s_in, s_out = factors.get(name, (None, None))
    if s_in is not None:
        w = w / s_in[None, :]
    if s_out is not None:
        w = w * s_out[:, None]
    return w


@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (4, False)])
def test_per_layer_error_on_held_out_activations_is_below_rtn(bits, sym):
    fp = _model().eval()
    m = copy.deepcopy(fp)
    cfg = QuantConfig(method="awq", bits=bits, granularity="group", group_size=32, sym=sym)
    factors = {}
    rep = awq.apply(m, cfg, _tokens(16, seed=1), progress=False, scales_out=factors)
    names = [n for n, mod in fp.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"]
    assert sorted(rep["layers"]) == sorted(names) and isinstance(m.lm_head, nn.Linear)
    for n in names:
        q = m.get_submodule(n)
        assert isinstance(q, IntLinear) and (q.bits, q.group_size, q.sym) == (bits, 32, sym)
    held = _tokens(8, seed=99)  # not the calibration windows
    xs = capture_inputs(fp, held, names)
    tot_awq = tot_rtn = 0.0
    for n in names:
        w, x = fp.get_submodule(n).weight.detach(), xs[n]
        ref = x @ w.t()
        e_awq = float((x @ _effective(m, n, factors).t() - ref).pow(2).sum())
        c, s, z = fm.rtn_quantize(w, bits, "group", 32, sym)
        e_rtn = float((x @ fm.dequantize_codes(c, s, z).t() - ref).pow(2).sum())
        assert e_awq < e_rtn, f"{n}: AWQ {e_awq:.4g} >= RTN {e_rtn:.4g}"
        tot_awq, tot_rtn = tot_awq + e_awq, tot_rtn + e_rtn
    assert tot_awq < 0.8 * tot_rtn
    # the whole quantized model, too: its logits are closer to fp32's than RTN's on held-out tokens
    rtn = copy.deepcopy(fp)
    from lmforge.model.surgery import replace_linear

    replace_linear(rtn, lambda n, lin: IntLinear.from_linear(lin, bits, "group", 32, sym, name=n),
                   lambda n, _: n != "lm_head")
    with torch.no_grad():
        ref = fp(held)
        assert (m(held) - ref).pow(2).mean() < (rtn(held) - ref).pow(2).mean()
    # the report: the chosen alphas lie on the grid, and the search never chose worse than alpha = 0 (RTN)
    for p in rep["pairs"].values():
        assert p["alpha"] in [k / cfg.awq_grid for k in range(cfg.awq_grid)] and p["loss"] <= p["loss_rtn"]
    assert all(0.55 - 1e-6 <= v["clip"] <= 1.0 for v in rep["layers"].values())
    json.dumps(rep)  # JSON-able


@pytest.mark.parametrize("granularity,bits", [("channel", 8), ("tensor", 4)])
def test_other_granularities_run_and_are_no_worse_than_rtn_on_calibration(granularity, bits):
    m = _model(n_kv_head=2, mlp="relu2")
    cfg = QuantConfig(method="awq", bits=bits, granularity=granularity, skip=["lm_head", "blocks.1.mlp.*"])
    rep = awq.apply(m, cfg, _tokens(8, seed=2), progress=False)
    assert isinstance(m.blocks[1].mlp.fc, nn.Linear) and isinstance(m.blocks[1].mlp.proj, nn.Linear)
    assert "blocks.1.mlp_norm->blocks.1.mlp.fc" in rep["skipped_pairs"]
    assert isinstance(m.blocks[0].mlp.proj, IntLinear) and m.blocks[0].mlp.proj.granularity == granularity
    for n, v in rep["layers"].items():  # the calibration objective: alpha 0 and clip 1 are candidates
        assert v["err"] <= v["rtn_err"] * 1.05, n
    if granularity == "channel":
        assert max(v["err"] for v in rep["layers"].values()) < 1e-3  # 8 bits: small


def test_bad_input_is_refused_before_anything_changes():
    m = _model(d_model=48, n_head=4, d_ff=96)
    before = {n: t.clone() for n, t in m.state_dict().items()}
    x = _tokens(4)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: weight shape \(144, 48\): in_features 48 is not a "
                                         r"multiple of group_size 32"):
        awq.apply(m, QuantConfig(method="awq", bits=4, granularity="group", group_size=32), x, progress=False)
    with pytest.raises(ValueError, match="calibration tokens are required"):
        awq.apply(m, QuantConfig(method="awq", bits=4, group_size=16, granularity="group"), None, progress=False)
    with pytest.raises(ValueError, match=r"calib: expected a \(samples, seq_len\) integer token tensor"):
        awq.apply(m, QuantConfig(method="awq", bits=4), x.float(), progress=False)
    with pytest.raises(ValueError, match=r"token ids 0\.\.300 outside the model's vocabulary 0\.\.255"):
        awq.apply(m, QuantConfig(method="awq", bits=4), torch.tensor([[0, 300]]), progress=False)
    with pytest.raises(ValueError, match=r"bits: got 9"):
        awq.apply(m, QuantConfig(method="awq", bits=9), x, progress=False)
    with pytest.raises(ValueError, match=r"awq_grid: got 0"):
        awq.apply(m, QuantConfig(method="awq", awq_grid=0), x, progress=False)
    after = m.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before) and set(before) == set(after)
    assert all(isinstance(mod, nn.Linear) for n, mod in m.named_modules() if n.endswith(("qkv", "proj", "fc")))


def test_quantize_api_and_checkpoint_round_trip(tmp_path):
    from lmforge.quant.api import quantize
    from lmforge.quant.checkpoint import load_quantized, save_quantized

    m = _model(n_layer=1)
    rep = quantize(m, QuantConfig(method="awq", bits=4, granularity="group", group_size=16), calib=_tokens(4, seed=3),
                   progress=False)
    assert rep["method"] == "awq" and rep["bytes"]["after"] < rep["bytes"]["before"]
    save_quantized(m, tmp_path / "q")
    back, _ = load_quantized(tmp_path / "q")
    x = _tokens(2, seed=4)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))  # the folded norms travel with the codes
    with pytest.raises(ValueError, match="needs calibration tokens"):
        quantize(_model(n_layer=1), QuantConfig(method="awq", bits=4), progress=False)
