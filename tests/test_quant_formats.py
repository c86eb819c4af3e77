"""quant.formats: RTN codes and scales, nibble packing, FP8 rounding.

References: hand-computed codes for small weights; the error bound |w - deq| <= s/2 derived in the module
docstring; an independent FP8 rounding (nearest value of the format's full table of finite values, ties to the
even code, saturation) that torch's casts, and so lmforge's, must equal on the grid, on every midpoint (ties),
just off the midpoints, in the subnormal range and beyond the largest value.
"""
import pytest
import torch

from lmforge.quant import formats as fm

torch.set_num_threads(1)


# ---- nibble packing ----

def test_pack_layout_low_nibble_first():
    u = torch.tensor([[1, 2, 3, 4, 5], [15, 0, 0, 15, 7]], dtype=torch.uint8)
    p = fm.pack_nibbles(u)
    assert p.dtype == torch.uint8 and p.shape == (2, 3)
    assert p.tolist() == [[0x21, 0x43, 0x05], [0x0F, 0xF0, 0x07]]
    assert torch.equal(fm.unpack_nibbles(p, 5), u)


@pytest.mark.parametrize("I", [1, 2, 7, 64, 129])
def test_pack_unpack_round_trip(I):
    g = torch.Generator().manual_seed(I)
    u = torch.randint(0, 16, (5, I), generator=g, dtype=torch.int64)
    p = fm.pack_nibbles(u)
    assert p.shape == (5, (I + 1) // 2)
    assert torch.equal(fm.unpack_nibbles(p, I).long(), u)


def test_pack_rejects_out_of_range_and_bad_shape():
    with pytest.raises(ValueError, match="0..15"):
        fm.pack_nibbles(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="0..15"):
        fm.pack_nibbles(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="does not hold 5 columns"):
        fm.unpack_nibbles(torch.zeros(2, 2, dtype=torch.uint8), 5)


# ---- RTN ----

def test_rtn_sym_8bit_by_hand():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0]])
    q, s, z = fm.rtn_quantize(w, 8, "channel", 128, True)
    assert z is None
    assert s.shape == (1, 1) and s.item() == pytest.approx(1 / 127.5, rel=1e-7)
    # w * (1 / s) = +-127.5 in exact arithmetic; float32's 1 / s is a hair below 127.5, so +-absmax round to
    # +-127 (never beyond qmax, within s/2 either way); -63.75 -> -64, 31.875 -> 32
    assert q.tolist() == [[127, -64, 32, 0, -127]]
    assert q.tolist() == torch.clamp(torch.round(w * (1.0 / s)), -128, 127).int().tolist()


def test_rtn_asym_4bit_by_hand():
    w = torch.tensor([[-1.0, 0.0, 2.0, 0.5]])
    u, s, z = fm.rtn_quantize(w, 4, "channel", 128, False)
    assert s.item() == pytest.approx(3.0 / 15)
    assert z.item() == 5.0  # -round(-1 / 0.2)
    # w / s: -5 -> 0 + 5 = 0; 0 -> 5; 10 -> 15; 2.5 -> 2 (half to even) -> 7
    assert u.tolist() == [[0, 5, 15, 7]]
    deq = fm.dequantize_codes(u, s, z)
    assert deq[0, 1].item() == 0.0  # zero is exact with a zero point
    assert torch.allclose(deq, torch.tensor([[-1.0, 0.0, 2.0, 0.4]]))


CASES = [(b, g, sym) for b in (2, 3, 4, 5, 8) for g in ("tensor", "channel", "group") for sym in (True, False)]


@pytest.mark.parametrize("bits,gran,sym", CASES)
def test_rtn_error_bound_and_code_range(bits, gran, sym):
    g = torch.Generator().manual_seed(bits * 10 + sym)
    w = torch.randn(12, 64, generator=g) * torch.linspace(0.01, 3.0, 64)  # uneven columns
    w[3] = 0.0  # an all-zero row
    w[5] = w[5].abs()  # all non-negative
    codes, s, z = fm.rtn_quantize(w, bits, gran, 16, sym)
    qmin, qmax = fm.code_range(bits, sym)
    assert codes.dtype == torch.int32 and codes.shape == w.shape
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    G = {"tensor": 1, "channel": 1, "group": 4}[gran]
    assert s.shape == ((1, 1) if gran == "tensor" else (12, G))
    assert (z is None) == sym
    if z is not None:
        assert torch.equal(z, z.round()) and int(z.min()) >= qmin and int(z.max()) <= qmax
    deq = fm.dequantize_codes(codes, s, z)
    step = fm.expand_groups(s, 12, 64).abs()
    err = (w - deq).abs()
    if sym and bits < 8:  # Q4_0's rule: half a step inside [qmin - 1/2, qmax + 1/2] steps, one step beyond
        inside = (w / fm.expand_groups(s, 12, 64) <= qmax + 0.5) & (w / fm.expand_groups(s, 12, 64) >= qmin - 0.5)
        assert torch.all(err[inside] <= step[inside] / 2 * (1 + 1e-5) + 1e-7)
        assert torch.all(err <= step * (1 + 1e-5) + 1e-7)
        # the largest-magnitude weight of each group (and every group's sign convention) lands exactly on qmin
        grp = w.reshape(1, 1, -1) if gran == "tensor" else w.reshape(12, -1, 64 if gran == "channel" else 16)
        dq = deq.reshape(grp.shape)
        i = grp.abs().argmax(-1, keepdim=True)
        assert torch.allclose(dq.gather(-1, i), grp.gather(-1, i), rtol=1e-6, atol=1e-7)
        cg = codes.reshape(grp.shape).gather(-1, i)
        assert torch.all((cg == qmin) | (grp.gather(-1, i) == 0))
    else:
        assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    assert not torch.isnan(deq).any()
    assert torch.all(deq[3] == 0.0)
    # the extremes of each group reach the end codes (the scale is no wider than needed)
    if sym and gran == "channel":
        assert torch.all(codes.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] >= qmax)


def test_rtn_group_scales_cover_their_columns():
    w = torch.zeros(2, 8)
    w[0, :4] = 0.1
    w[0, 4:] = 10.0
    q, s, _ = fm.rtn_quantize(w, 4, "group", 4, True)
    assert s[0, 0] * -8 == pytest.approx(0.1) and s[0, 1] * -8 == pytest.approx(10.0)  # Q4_0's d = max / -8
    err = (fm.dequantize_codes(q, s) - w).abs()
    assert err[0, :4].max() <= 1e-7 and err[0, 4:].max() <= 1e-6  # each group's largest weight is exact
    assert torch.all(q[1] == 0) and torch.all(fm.dequantize_codes(q, s)[1] == 0)


def test_group_size_must_divide_naming_the_linear():
    w = torch.randn(6, 40)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv.*\(6, 40\).*group_size 32"):
        fm.rtn_quantize(w, 4, "group", 32, True, name="blocks.0.attn.qkv")
    with pytest.raises(ValueError, match="bits"):
        fm.rtn_quantize(w, 9, "channel", 32, True)
    with pytest.raises(ValueError, match="granularity"):
        fm.rtn_quantize(w, 4, "row", 32, True)
    with pytest.raises(ValueError, match="group_size"):
        fm.rtn_quantize(w, 4, "group", 0, True)


# ---- FP8 ----

def _fp8_table(dtype):
    """Every finite value of the format, sorted, with its bit pattern."""
    bits = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    vals = bits.view(dtype).float()
    keep = torch.isfinite(vals) & ~((bits == 0x80))  # -0 duplicates +0
    vals, bits = vals[keep], bits[keep]
    order = torch.argsort(vals)
    return vals[order].double(), bits[order].long()


def _reference_round(x: torch.Tensor, dtype) -> torch.Tensor:
    """Nearest finite value of the format (ties to the even bit pattern), saturating at +-max."""
    vals, bits = _fp8_table(dtype)
    xd = x.double().clamp(vals[0], vals[-1])
    i = torch.searchsorted(vals, xd).clamp(1, len(vals) - 1)
    lo, hi = vals[i - 1], vals[i]
    dlo, dhi = xd - lo, hi - xd
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (bits[i] % 2 == 0))
    out = torch.where(pick_hi, hi, lo)
    return torch.where(xd == 0, xd * 0, out).float()


def _probe_values(dtype):
    vals, _ = _fp8_table(dtype)
    v = vals.float()
    mids = ((vals[1:] + vals[:-1]) / 2).float()  # exact in fp32: the ties
    assert torch.equal(mids.double(), (vals[1:] + vals[:-1]) / 2)
    up, down = torch.nextafter(mids, torch.tensor(float("inf"))), torch.nextafter(mids, torch.tensor(-float("inf")))
    g = torch.Generator().manual_seed(0)
    logs = torch.empty(4000).uniform_(-24, 18, generator=g)
    rand = torch.exp2(logs) * torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0)
    smallest = v[v > 0].min()
    sub = torch.linspace(-4 * float(smallest) * 8, 4 * float(smallest) * 8, 1001)  # the subnormal range
    big = torch.tensor([1e30, -1e30, 1e6, -1e6, float(v.max()) * 1.01, float(v.max()) * 1.2])
    return torch.cat([v, mids, up, down, rand, sub, big])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cast_equals_reference_rounding(fmt):
    dtype = fm.fp8_dtype(fmt)
    x = _probe_values(dtype)
    ours = fm.fp8_cast(x, fmt)
    assert ours.dtype == dtype
    ref = _reference_round(x, dtype)
    bad = (ours.float() != ref).nonzero().flatten()
    assert bad.numel() == 0, f"{fmt}: {x[bad[:5]].tolist()} -> {ours.float()[bad[:5]].tolist()} vs {ref[bad[:5]].tolist()}"
    # ... and it is torch's own cast wherever that cast is in range
    inside = x.abs() <= fm.fp8_max(fmt)
    assert torch.equal(ours[inside].float(), x[inside].to(dtype).float())
    assert fm.fp8_cast(torch.tensor([1e30]), fmt).float().item() == fm.fp8_max(fmt)  # saturates, no NaN/inf


@pytest.mark.parametrize("fmt,rel", [("e4m3", 2 ** -4), ("e5m2", 2 ** -3)])
@pytest.mark.parametrize("kind", ["tensor", "channel"])
def test_fp8_quantize_scale_and_error(fmt, rel, kind):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g) * torch.logspace(-1, 1, 8)[:, None]
    w8, s = fm.fp8_quantize(w, fmt, kind)
    assert w8.dtype == fm.fp8_dtype(fmt)
    assert s.shape == ((1, 1) if kind == "tensor" else (8, 1))
    amax = w.abs().amax() if kind == "tensor" else w.abs().amax(dim=1, keepdim=True)
    assert torch.allclose(s, amax / fm.fp8_max(fmt))
    assert torch.equal(w8.float().abs().amax(dim=None if kind == "tensor" else 1).flatten(),
                       torch.full((1 if kind == "tensor" else 8,), fm.fp8_max(fmt)))
    deq = w8.float() * s
    normal = (w / s).abs() >= torch.finfo(fm.fp8_dtype(fmt)).smallest_normal
    assert torch.all((deq - w).abs()[normal] <= rel * w.abs()[normal] * (1 + 1e-6))
    assert torch.equal(w8, fm.fp8_cast(w / s, fmt))


def test_fp8_fake_quant_is_dynamic_per_tensor():
    x = torch.randn(3, 5, 16)
    y = fm.fp8_fake_quant(x, "e4m3")
    s = x.abs().amax() / 448.0
    assert torch.equal(y, (x / s).to(torch.float8_e4m3fn).float() * s)
    assert y.abs().max() == pytest.approx(x.abs().max().item(), rel=1e-6)


def test_fp8_bad_names():
    with pytest.raises(ValueError, match="fp8_format: got 'e3m4'"):
        fm.fp8_quantize(torch.ones(2, 2), "e3m4")
    with pytest.raises(ValueError, match="fp8_scale: got 'group'"):
        fm.fp8_quantize(torch.ones(2, 2), "e4m3", "group")


def test_int4_group32_symmetric_codes_are_q4_0s():
    """lmforge's 4-bit g32 symmetric codes are llama.cpp's Q4_0 codes (lmforge.quant.gguf's quantizer is
    byte-exact with ggml's quantize_row_q4_0_ref; tests/test_gguf.py), scales its d before the fp16 rounding."""
    import numpy as np

    from lmforge.quant import gguf

    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 2.0, 256)
    q, s, _ = fm.rtn_quantize(w, 4, "group", 32, True)
    raw = np.frombuffer(gguf.quantize(w.numpy(), gguf.GGMLType.Q4_0), dtype=np.uint8).reshape(16, 8, 18)
    d = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nib = raw[..., 2:]
    ours = q.reshape(16, 8, 32).numpy() + 8
    theirs = np.concatenate([nib & 15, nib >> 4], axis=-1)  # element j in the low nibble, j + 16 in the high
    assert np.array_equal(ours, theirs)
    assert np.allclose(s.numpy(), d, rtol=1e-3)  # fp16
