"""lmforge's int8 weight-only per-channel RTN against torchao's ``Int8WeightOnlyConfig`` on the same weights.

Reference: torchao (``quantize_(model, Int8WeightOnlyConfig())``, its ``Int8Tensor`` holding ``qdata`` and
``scale``). Scales and int8 codes must be identical (same formula, same rounding); outputs of single linears
and of a whole tiny model within float rounding (the two forwards order the multiply differently).
Install: ``pip install --no-deps torchao==0.18.0`` (the wheel in /tmp/llamabuild/deps offline).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from lmforge.quant.linear import IntLinear

torch.set_num_threads(1)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torchao = pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_


def _torchao_int8(module, filter_fn=None):
    quantize_(module, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=filter_fn)
    return module


def test_linear_scales_codes_outputs():
    torch.manual_seed(0)
    lins = [nn.Linear(256, 96), nn.Linear(96, 40, bias=False), nn.Linear(33, 7)]
    with torch.no_grad():
        lins[0].weight[3] = 0.0  # an all-zero row: both clamp the scale at float32 eps
        lins[0].weight[5, 7] = 5.0  # an outlier
        lins[1].weight.mul_(torch.logspace(-3, 1, 40)[:, None])  # rows of very different ranges
    for lin in lins:
        ours = IntLinear.from_linear(lin, bits=8, granularity="channel", sym=True)
        ao = _torchao_int8(nn.Sequential(copy.deepcopy(lin)))[0]
        t = ao.weight
        assert t.qdata.dtype == torch.int8 and tuple(t.scale.shape) == (lin.out_features, 1)
        assert torch.equal(t.scale.float().reshape(-1), ours.scales.reshape(-1))
        assert torch.equal(t.qdata, ours.qweight)
        x = torch.randn(5, 3, lin.in_features)
        with torch.no_grad():
            a, b = ao(x), ours(x)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


def test_tiny_model_logits():
    from conftest import perturbed

    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer
    from lmforge.quant.api import quantize
    from lmforge.quant.config import QuantConfig

    torch.manual_seed(0)
    m = perturbed(Transformer(make_config(vocab_size=128, n_layer=2, n_head=2, d_model=64, max_seq_len=32,
                                          norm="rmsnorm", mlp="swiglu", pos="rope", arch="llama",
                                          tie_embeddings=False)), 0.2)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fp32 = m(x)
    ao = _torchao_int8(copy.deepcopy(m), filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn != "lm_head")
    quantize(m, QuantConfig(method="rtn", bits=8, granularity="channel"), progress=False)
    with torch.no_grad():
        a, b = ao(x), m(x)
    for name, mod in m.named_modules():
        if isinstance(mod, IntLinear):
            t = ao.get_submodule(name).weight
            assert torch.equal(t.qdata, mod.qweight) and torch.equal(t.scale.reshape(-1), mod.scales.reshape(-1)), name
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert (b - fp32).abs().max() > 1e-4  # the comparison is between quantized models, not two fp32 copies
