"""lmforge.quant.gptq: GPTQ against a plain optimal-brain-surgeon loop, against RTN on held-out activations
of a tiny model, and its invariants (identity Hessian = RTN, codes in range, dead inputs, bad input)."""
import copy

import numpy as np
import pytest
import torch

from conftest import perturbed
from lmforge.model.config import preset
from lmforge.model.transformer import Transformer
from lmforge.quant import formats as fm
from lmforge.quant.calib import calibration_tokens, capture_inputs
from lmforge.quant.config import QuantConfig
from lmforge.quant.gptq import apply, gptq_quantize, hessian, output_error
from lmforge.quant.linear import IntLinear
from test_quant_calib import write_shards


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared CPU: no oversubscription (and the same reductions every run)
    yield
    torch.set_num_threads(n)



def obs_reference(W, H, bits, granularity, group_size, sym, damp, act_order, static_groups):
    """GPTQ written the slow, obvious way (float64): explicit inverse Hessian, one column at a time, the
    optimal-brain-surgeon update of every later column and the Gaussian elimination of the quantized
    column from H^-1; no Cholesky, no lazy blocks. Returns the dequantized weight in the original order."""
    W = W.double().clone()
    O, I = W.shape
    H = H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H += damp * H.diagonal().mean() * torch.eye(I, dtype=torch.float64)
    order = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(I)
    Hinv = torch.linalg.inv(H)
    qmin, qmax = fm.code_range(bits, sym)
    g = group_size if granularity == "group" else I

    def params(cols):
        _, s, z = fm.rtn_quantize(cols, bits, "tensor" if granularity == "tensor" else "channel",
                                  cols.shape[1], sym)
        return s.reshape(-1).double(), None if z is None else z.reshape(-1).double()

    W0 = W.clone()
    whole = params(W0)
    static = {k: params(W0[:, k * g:(k + 1) * g]) for k in range(I // g)}
    out = torch.zeros_like(W)
    remaining = order.tolist()
    for p, j in enumerate(order.tolist()):
        if granularity != "group":
            s, z = whole
        elif static_groups:
            s, z = static[j // g]
        elif p % g == 0:  # a group of the next g columns in processing order, from their current weights
            s, z = params(W[:, order[p:p + g]])
        w = W[:, j]
        if z is None:
            deq = torch.clamp(torch.round(w * (1.0 / s)), qmin, qmax) * s
        else:
            deq = (torch.clamp(torch.round(w * (1.0 / s)) + z, qmin, qmax) - z) * s
        out[:, j] = deq
        remaining.remove(j)
        e = (w - deq) / Hinv[j, j]
        W[:, remaining] -= e[:, None] * Hinv[j, remaining][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return out


def _module(res, bits, gran, gs, sym):
    return IntLinear.from_codes(res["codes"], res["scales"], res["zeros"], bits, gran, gs, sym,
                                in_perm=res["in_perm"])


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    O, I = 24, 32
    W = torch.randn(O, I, generator=g, dtype=torch.float64)
    A = torch.randn(I, I, generator=g, dtype=torch.float64) * torch.rand(I, generator=g, dtype=torch.float64) * 3
    X = torch.randn(600, I, generator=g, dtype=torch.float64) @ A
    return W, hessian(X)


@pytest.mark.parametrize("bits,gran,sym,act_order,static", [
    (4, "channel", True, False, False), (3, "channel", False, True, False), (4, "tensor", True, True, False),
    (4, "group", True, False, False), (3, "group", False, True, False), (4, "group", True, True, True),
    (3, "group", True, False, True), (8, "group", False, True, False)])
def test_lazy_cholesky_blocks_equal_the_plain_obs_loop(problem, bits, gran, sym, act_order, static):
    W, H = problem
    ref = obs_reference(W, H, bits, gran, 8, sym, 0.01, act_order, static)
    for block_size in (128, 8, 3):  # blocks are aligned to groups: the block size does not change the result
        res = gptq_quantize(W, H, bits, gran, 8, sym, 0.01, block_size, act_order, static)
        m = _module(res, bits, gran, 8, sym)
        assert (res["in_perm"] is not None) == (act_order and gran == "group" and not static)
        assert torch.allclose(m.dequantize().double(), ref, atol=1e-6), (block_size, (m.dequantize() - ref).abs().max())


@pytest.mark.parametrize("gran,gs", [("channel", 32), ("group", 8), ("tensor", 32)])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_identity_hessian_without_damping_is_rtn(gran, gs, sym, act_order, static):
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    res = gptq_quantize(W, torch.eye(32, dtype=torch.float64), 3, gran, gs, sym, 0.0, 8, act_order, static)
    codes, s, z = fm.rtn_quantize(W, 3, gran, gs, sym)
    assert torch.equal(_module(res, 3, gran, gs, sym).dequantize(), fm.dequantize_codes(codes, s, z))
    # ... and with a real Hessian it is not (the test above is not vacuous)
    X = torch.randn(200, 32, generator=torch.Generator().manual_seed(2)) @ torch.randn(32, 32)
    res = gptq_quantize(W, hessian(X), 3, gran, gs, sym, 0.01, 8, act_order, static)
    assert not torch.equal(_module(res, 3, gran, gs, sym).dequantize(), fm.dequantize_codes(codes, s, z))


def test_dead_inputs_keep_their_weights_and_nothing_is_nan(problem):
    W, H = problem
    W, H = W.float(), H.clone()
    H[:, [3, 17]] = 0
    H[[3, 17], :] = 0
    res = gptq_quantize(W, H, 4, "group", 8, True, 0.01, 128, True, False)
    assert res["dead"] == 2
    deq = _module(res, 4, "group", 8, True).dequantize()
    assert torch.isfinite(deq).all()
    assert deq[:, [3, 17]].abs().sum() > 0  # not zeroed: the weights are quantized as they are
    # a dead column neither gives nor takes an update: RTN of its original value at its group's scale
    res = gptq_quantize(W, H, 4, "group", 8, True, 0.01, 128, False, True)
    deq = _module(res, 4, "group", 8, True).dequantize()
    codes, s, z = fm.rtn_quantize(W, 4, "group", 8, True)
    assert torch.equal(deq[:, [3, 17]], fm.dequantize_codes(codes, s, z)[:, [3, 17]])
    # an all-zero Hessian (a linear no calibration row reached) is RTN
    res = gptq_quantize(W, torch.zeros(32, 32, dtype=torch.float64), 4, "group", 8, True, 0.01, 128, True, False)
    assert torch.equal(_module(res, 4, "group", 8, True).dequantize(), fm.dequantize_codes(codes, s, z))


# ---- a tiny model, calibrated on train windows, judged on validation windows ----

V = 97


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Token streams with structure (a sparse Markov chain), so activations are correlated as in text."""
    rng = np.random.default_rng(0)
    nxt = rng.integers(0, V, size=(V, 3))

    def stream(n):
        t = [int(rng.integers(V))]
        for _ in range(n - 1):
            t.append(int(nxt[t[-1], rng.integers(3)]) if rng.random() < 0.9 else int(rng.integers(V)))
        return np.array(t)

    return write_shards(tmp_path_factory.mktemp("gptq") / "data", {"train": stream(3000), "val": stream(1500)})


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return perturbed(Transformer(preset("tiny-llama", vocab_size=V, n_layer=2, d_model=64, n_head=4, n_kv_head=2,
                                        d_ff=128, max_seq_len=64)), 0.05)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


CASES = [dict(bits=4, granularity="group", group_size=16), dict(bits=3, granularity="group", group_size=16),
         dict(bits=4, granularity="channel"), dict(bits=3, granularity="channel"),
         dict(bits=4, granularity="group", group_size=16, act_order=True),
         dict(bits=3, granularity="channel", act_order=True),
         dict(bits=3, granularity="group", group_size=16, act_order=True, static_groups=True),
         dict(bits=4, granularity="group", group_size=32, sym=False, static_groups=True)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gptq_beats_rtn_on_held_out_activations(tiny, data, case):
    cfg = QuantConfig(method="gptq", **case)
    calib = calibration_tokens(data, n_samples=24, seq_len=64, seed=0)
    held = calibration_tokens(data, n_samples=12, seq_len=64, seed=1, split="val")
    names = _linears(tiny)
    model = copy.deepcopy(tiny)
    report = apply(model, cfg, calib, progress=False)
    assert sorted(report["layers"]) == sorted(names)
    assert isinstance(model.lm_head, torch.nn.Linear)  # skipped by default
    x = capture_inputs(model, held, names)  # what each quantized linear sees on held-out text
    xc = capture_inputs(model, calib, names)
    qmin, qmax = fm.code_range(cfg.bits, cfg.sym)
    wins = 0
    for n in names:
        q = model.get_submodule(n)
        assert isinstance(q, IntLinear) and (q.in_perm is not None) == (
            cfg.act_order and cfg.granularity == "group" and not cfg.static_groups)
        c = q.codes()
        assert int(c.min()) >= qmin and int(c.max()) <= qmax
        w = tiny.get_submodule(n).weight.detach()
        codes, s, z = fm.rtn_quantize(w, cfg.bits, cfg.granularity, cfg.group_size, cfg.sym)
        rtn = fm.dequantize_codes(codes, s, z)
        ref = x[n] @ w.T
        e_gptq = float(((x[n] @ q.dequantize().T - ref) ** 2).sum())
        e_rtn = float(((x[n] @ rtn.T - ref) ** 2).sum())
        assert e_gptq < e_rtn, (n, e_gptq, e_rtn)
        wins += e_gptq < 0.9 * e_rtn
        # the reported error is measured on the inputs this linear saw with the blocks before it (and the
        # linears before it in its block) already quantized: sequential, as the docstring says
        assert report["layers"][n]["err"] == pytest.approx(output_error(w, q.dequantize(), hessian(xc[n])), rel=1e-4)
    assert wins >= len(names) // 2  # and by a margin on most layers, not by a hair
    # the whole model's output moves less from fp32 than RTN's does
    rtn_model = copy.deepcopy(tiny)
    from lmforge.model.surgery import replace_linear

    replace_linear(rtn_model, lambda n, m: IntLinear.from_linear(m, cfg.bits, cfg.granularity, cfg.group_size,
                                                                 cfg.sym), names)
    with torch.no_grad():
        ref = tiny(held)
        assert ((model(held) - ref) ** 2).mean() < ((rtn_model(held) - ref) ** 2).mean()


def test_head_is_quantized_when_not_skipped(tiny, data):
    model = copy.deepcopy(tiny)
    calib = calibration_tokens(data, n_samples=8, seq_len=32)
    rep = apply(model, QuantConfig(method="gptq", bits=4, granularity="group", group_size=16,
                                   skip=["blocks.0.*"]), calib, progress=False)
    assert isinstance(model.lm_head, IntLinear) and "lm_head" in rep["layers"]
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear) and isinstance(model.blocks[1].attn.qkv, IntLinear)
    assert rep["layers"]["lm_head"]["err"] < rep["layers"]["lm_head"]["rtn_err"]


def test_bad_input(tiny, data):
    model = copy.deepcopy(tiny)
    calib = calibration_tokens(data, n_samples=4, seq_len=32)
    # a group size that does not divide a linear: named with its shape, and nothing is modified
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*\(128, 64\).*group_size 48"):
        apply(model, QuantConfig(method="gptq", bits=4, granularity="group", group_size=48), calib, progress=False)
    assert not any(isinstance(m, IntLinear) for m in model.modules())
    with pytest.raises(ValueError, match="needs calibration tokens"):
        apply(model, QuantConfig(method="gptq", bits=4), None, progress=False)
    with pytest.raises(ValueError, match="calib: expected an integer"):
        apply(model, QuantConfig(method="gptq", bits=4), torch.zeros(4, 8), progress=False)
    # calibration shorter than asked
    with pytest.raises(ValueError, match=r"'train' has 3000 tokens, fewer than the 3200"):
        calibration_tokens(data, n_samples=50, seq_len=64)
    with pytest.raises(ValueError, match="bits: got 9"):
        gptq_quantize(torch.randn(4, 8), torch.eye(8), 9)
    with pytest.raises(ValueError, match=r"Hessian shape \(7, 7\)"):
        gptq_quantize(torch.randn(4, 8), torch.eye(7), 4, "channel")


def test_quantize_from_shards_saves_and_loads_back_exactly(tiny, data, tmp_path):
    """The public path: ``quantize`` with a data directory (train windows), act-order groups (stored with
    ``in_perm``), then the checkpoint round trip gives the same logits."""
    from lmforge.quant.api import quantize
    from lmforge.quant.checkpoint import load_quantized, save_quantized

    model = copy.deepcopy(tiny)
    cfg = QuantConfig(method="gptq", bits=4, granularity="group", group_size=16, act_order=True,
                      calib_samples=8, calib_seq_len=32, seed=5)
    rep = quantize(model, cfg, data_dir=data, progress=False)
    assert rep["calib"] == {"samples": 8, "seq_len": 32} and rep["bytes"]["after"] < rep["bytes"]["before"]
    assert model.blocks[0].mlp.fc.in_perm is not None
    # the same windows given directly: the same model
    again = copy.deepcopy(tiny)
    apply(again, cfg, calibration_tokens(data, 8, 32, seed=5), progress=False)
    assert torch.equal(again.blocks[1].mlp.proj.dequantize(), model.blocks[1].mlp.proj.dequantize())
    save_quantized(model, tmp_path / "q")
    loaded, _ = load_quantized(tmp_path / "q")
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match=r"fewer than the 6400"):
        quantize(copy.deepcopy(tiny), QuantConfig(method="gptq", bits=4, calib_samples=100, calib_seq_len=64),
                 data_dir=data, progress=False)


def test_bad_settings_refused_before_anything_changes(tiny, data):
    model = copy.deepcopy(tiny)
    calib = calibration_tokens(data, n_samples=4, seq_len=32)
    for cfg, msg in ((QuantConfig(method="gptq", bits=9), "bits: got 9"),
                     (QuantConfig(method="gptq", bits=4, block_size=0), "block_size: got 0")):
        with pytest.raises(ValueError, match=msg):
            apply(model, cfg, calib, progress=False)
        assert not any(isinstance(m, IntLinear) for m in model.modules())
