"""lmforge.quant.gguf: the GGUF container and ggml's block codecs, against gguf-py (the reference reader,
writer and numpy codecs of llama.cpp's project) and a scalar transliteration of ggml's Q4_K quantizer."""
import os
import struct

import numpy as np
import pytest

from conftest import in_ci
from lmforge.quant import gguf as G
from lmforge.quant.gguf import GGMLType, GGUFValueType


@pytest.fixture(scope="module")
def gg():
    try:
        import gguf
        from gguf import quants  # noqa: F401
    except ImportError:
        if in_ci():
            pytest.fail("gguf-py (pip package gguf) is the reference here and is not installed")
        pytest.skip("gguf-py not installed")
    return gguf


def _rows(seed=0, rows=48, n=512):
    """Weights with row scales from 1e-3 to 3, plus the corner cases of the reference quantizers."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((rows, n)) * rng.uniform(1e-3, 3, (rows, 1))).astype(np.float32)
    a[0, :32] = 0  # an all-zero block: scale 0
    a[1, :32] = 5.0  # a constant block
    a[2, :32] = np.arange(32, dtype=np.float32) - 16  # Q4_0: max magnitude -16 first
    a[3, :32] = 0.5
    a[3, 5], a[3, 9] = -4.0, 4.0  # Q4_0: ties on |max|, the first one wins (its sign sets d)
    a[4, :32] = [127.0, 2.5, -2.5, 3.5, -0.5, 0.5, 126.5, -126.5] * 4  # Q8_0: d = 1, halves round away from 0
    a[5, 32:64] = -2.0  # a constant negative block
    a[6, 64:96] = 1e-8  # tiny values: fp16 scale underflows
    a[7] = rng.standard_t(2, n).astype(np.float32)  # heavy tails
    return a


# ---- block codecs against gguf-py ----

@pytest.mark.parametrize("t", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"])
def test_quantize_bytes_equal_gguf_py(gg, t):
    a = _rows()
    mine = G.quantize(a, GGMLType[t])
    ref = gg.quants.quantize(a, gg.GGMLQuantizationType[t])
    assert mine == np.ascontiguousarray(ref).tobytes()
    assert len(mine) == G.tensor_bytes(GGMLType[t], a.shape)


def _random_blocks(t: GGMLType, n_blocks: int, seed: int) -> np.ndarray:
    """Random block bytes whose fp16 fields hold finite values (random bytes would make NaNs)."""
    rng = np.random.default_rng(seed)
    size = G.BLOCK[t][1]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    halves = {GGMLType.Q8_0: [0], GGMLType.Q4_0: [0], GGMLType.Q4_1: [0, 2], GGMLType.Q5_0: [0],
              GGMLType.Q5_1: [0, 2], GGMLType.Q2_K: [80, 82], GGMLType.Q3_K: [108], GGMLType.Q4_K: [0, 2],
              GGMLType.Q5_K: [0, 2], GGMLType.Q6_K: [208]}
    for at in halves.get(t, []):
        raw[:, at:at + 2] = rng.uniform(-2, 2, n_blocks).astype("<f2").view(np.uint8).reshape(-1, 2)
    if t in (GGMLType.F16, GGMLType.BF16, GGMLType.F32):
        vals = rng.standard_normal(n_blocks * size // (4 if t == GGMLType.F32 else 2)).astype(np.float32)
        raw = np.frombuffer(G.quantize(vals, t), dtype=np.uint8).reshape(n_blocks, size)
    return raw


@pytest.mark.parametrize("t", [t.name for t in G.DEQUANTIZE_TYPES])
def test_dequantize_equals_gguf_py_on_random_blocks(gg, t):
    t = GGMLType[t]
    blk, size = G.BLOCK[t]
    raw = _random_blocks(t, 64, seed=int(t))
    shape = (4, 64 * blk // 4)
    mine = G.dequantize(raw.tobytes(), t, shape)
    ref = gg.quants.dequantize(raw.reshape(4, -1), gg.GGMLQuantizationType[t.name])
    assert mine.dtype == np.float32 and mine.shape == shape
    np.testing.assert_array_equal(mine, ref)


@pytest.mark.parametrize("t", ["Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_0"])
def test_dequantize_equals_gguf_py_on_its_quantized_blocks(gg, t):
    a = _rows(seed=3)
    q = gg.quants.quantize(a, gg.GGMLQuantizationType[t])
    np.testing.assert_array_equal(G.dequantize(q.tobytes(), GGMLType[t], a.shape),
                                  gg.quants.dequantize(q, gg.GGMLQuantizationType[t]))
    # and a real quantization: within half a step of the block's grid
    err = np.abs(G.dequantize(q.tobytes(), GGMLType[t], a.shape) - a).reshape(-1, 32).max(axis=1)
    span = np.abs(a).reshape(-1, 32).max(axis=1) * 2
    assert (err <= span / (15 if t in ("Q4_0", "Q4_1") else 31 if t in ("Q5_0", "Q5_1") else 127) + 1e-6).all()


@pytest.mark.parametrize("t", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_layout_read_by_gguf_py(gg, t):
    a = _rows(seed=4, rows=16, n=512)
    q = G.quantize(a, GGMLType[t])
    ref = gg.quants.dequantize(np.frombuffer(q, dtype=np.uint8).reshape(16, -1), gg.GGMLQuantizationType[t])
    np.testing.assert_array_equal(G.dequantize(q, GGMLType[t], a.shape), ref)


# ---- Q4_K against a scalar transliteration of ggml's quantize_row_q4_K_ref ----

def _nearest_int(v):
    return int(np.rint(np.float32(v)))


def _qkx2_scalar(x, w, nmax, rmin, rdelta, nstep):
    f = np.float32
    n = len(x)
    mn, mx = x[0], x[0]
    sum_w = w[0]
    sum_x = f(sum_w * x[0])
    for i in range(1, n):
        mn = min(mn, x[i])
        mx = max(mx, x[i])
        sum_w = f(sum_w + w[i])
        sum_x = f(sum_x + f(w[i] * x[i]))
    if mn > 0:
        mn = f(0)
    if mx == mn:
        return [0] * n, f(0), f(-mn)
    iscale = f(f(nmax) / f(mx - mn))
    scale = f(f(1) / iscale)
    L = [max(0, min(nmax, _nearest_int(f(iscale * f(x[i] - mn))))) for i in range(n)]
    best = f(0)
    for i in range(n):
        d = f(f(f(scale * f(L[i])) + mn) - x[i])
        best = f(best + f(w[i] * f(d * d)))
    for s in range(nstep + 1):
        iscale = f(f(f(f(rmin) + f(f(rdelta) * f(s))) + f(nmax)) / f(mx - mn))
        la = [max(0, min(nmax, _nearest_int(f(iscale * f(x[i] - mn))))) for i in range(n)]
        sl = sl2 = sxl = f(0)
        for i in range(n):
            wl = f(w[i] * f(la[i]))
            sl = f(sl + wl)
            sl2 = f(sl2 + f(wl * f(la[i])))
            sxl = f(sxl + f(wl * x[i]))
        D = f(f(sum_w * sl2) - f(sl * sl))
        if D > 0:
            ts = f(f(f(sum_w * sxl) - f(sum_x * sl)) / D)
            tm = f(f(f(sl2 * sum_x) - f(sl * sxl)) / D)
            if tm > 0:
                tm = f(0)
                ts = f(sxl / sl2)
            cur = f(0)
            for i in range(n):
                d = f(f(f(ts * f(la[i])) + tm) - x[i])
                cur = f(cur + f(w[i] * f(d * d)))
            if cur < best:
                L, best, scale, mn = la, cur, ts, tm
    return L, scale, f(-mn)


def _q4_k_scalar(block):
    """One super-block of 256 float32 values -> 144 bytes, one float32 operation at a time."""
    f = np.float32
    x = [f(v) for v in block]
    scales, mins, L = [], [], []
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        s2 = f(0)
        for v in xs:
            s2 = f(s2 + f(v * v))
        av = f(np.sqrt(f(s2 / f(32))))
        w = [f(av + abs(v)) for v in xs]
        l, sc, m = _qkx2_scalar(xs, w, 15, -1.0, 0.1, 20)
        scales.append(sc)
        mins.append(m)
        L += l
    max_scale = max([f(0)] + scales)
    max_min = max([f(0)] + mins)
    inv_s = f(f(63) / max_scale) if max_scale > 0 else f(0)
    inv_m = f(f(63) / max_min) if max_min > 0 else f(0)
    ls = [min(63, _nearest_int(f(inv_s * s)) & 0xFF) for s in scales]
    lm = [min(63, _nearest_int(f(inv_m * m)) & 0xFF) for m in mins]
    sb = [0] * 12
    for j in range(8):
        if j < 4:
            sb[j] = ls[j]
            sb[j + 4] = lm[j]
        else:
            sb[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sb[j - 4] |= (ls[j] >> 4) << 6
            sb[j] |= (lm[j] >> 4) << 6
    d16 = np.float16(f(max_scale / f(63)))
    m16 = np.float16(f(max_min / f(63)))
    for j in range(8):
        d = f(f(d16) * f(ls[j]))
        if not d:
            continue
        dm = f(f(m16) * f(lm[j]))
        for i in range(32):
            L[32 * j + i] = max(0, min(15, _nearest_int(f(f(x[32 * j + i] + dm) / d))))
    qs = [L[c + l] | (L[c + l + 32] << 4) for c in range(0, 256, 64) for l in range(32)]
    return d16.tobytes() + m16.tobytes() + bytes(sb) + bytes(qs)


def test_q4_k_bytes_equal_scalar_reference():
    rng = np.random.default_rng(7)
    blocks = [
        rng.standard_normal(256),
        rng.standard_t(2, 256) * 0.02,
        np.abs(rng.standard_normal(256)) + 0.5,  # all positive: min clamps to 0
        rng.integers(-3, 4, 256),  # ties everywhere
        np.concatenate([rng.standard_normal(32) * 1e-5, rng.standard_normal(224)]),  # a sub-block scale of 0
        np.concatenate([np.full(32, -2.0), np.zeros(32), rng.standard_normal(192)]),  # flat sub-blocks
    ]
    a = np.stack(blocks).astype(np.float32)
    mine = G.quantize(a, GGMLType.Q4_K)
    for i, b in enumerate(a):
        assert mine[144 * i:144 * (i + 1)] == _q4_k_scalar(b), f"block {i}"


def test_q4_k_error_within_the_format():
    """Every value dequantizes to its sub-block's nearest grid point (d_j * q - m_j, q = 0..15), and the
    grid spans the data: RMSE ~7% of sigma on Gaussian rows, better than Q4_0's on the same weights."""
    a = _rows(seed=5, rows=32, n=1024)
    q = np.frombuffer(G.quantize(a, GGMLType.Q4_K), dtype=np.uint8).reshape(-1, 144)
    deq = G.dequantize(q.tobytes(), GGMLType.Q4_K, a.shape).reshape(-1, 8, 32)
    d = q[:, 0:2].copy().view("<f2").astype(np.float32)
    dmin = q[:, 2:4].copy().view("<f2").astype(np.float32)
    sc, mn = G._unpack_k_scales(q[:, 4:16])
    dj = (d * sc)[:, :, None]
    mj = (dmin * mn)[:, :, None]
    grid = dj * np.arange(16, dtype=np.float32) - mj  # (blocks, 8, 16)
    x = a.reshape(-1, 8, 32)
    nearest = np.abs(x[..., None] - grid[:, :, None, :]).min(axis=-1)
    got = np.abs(x - deq)
    assert (got <= nearest + 1e-6 * np.abs(x).max()).all()
    gauss = a[8:]
    err_k = np.sqrt(((G.dequantize(G.quantize(gauss, GGMLType.Q4_K), GGMLType.Q4_K, gauss.shape) - gauss) ** 2).mean(1))
    err_0 = np.sqrt(((G.dequantize(G.quantize(gauss, GGMLType.Q4_0), GGMLType.Q4_0, gauss.shape) - gauss) ** 2).mean(1))
    sigma = gauss.std(axis=1)
    assert (err_k / sigma < 0.085).all(), err_k / sigma
    assert err_k.mean() < err_0.mean()


# relative RMSE (to the row's sigma) on Gaussian rows: measured 2.2e-4, 1.7e-3, 5.6e-3, 0.091, 0.082, 0.045,
# 0.039, 0.074, 0.038, 0.019 at most; the bounds leave ~20%
_RMSE_BOUND = {"F16": 3e-4, "BF16": 2.2e-3, "Q8_0": 7e-3, "Q4_0": 0.11, "Q4_1": 0.1, "Q5_0": 0.055, "Q5_1": 0.05,
               "Q4_K": 0.085, "Q5_K": 0.045, "Q6_K": 0.024}


def test_every_quantizer_round_trips_within_its_bound():
    a = np.random.default_rng(5).standard_normal((32, 1024)).astype(np.float32)
    rel = {}
    for t in G.QUANTIZE_TYPES:
        b = G.quantize(a, t)
        assert len(b) == G.tensor_bytes(t, a.shape)
        back = G.dequantize(b, t, a.shape)
        rel[t.name] = (np.sqrt(((back - a) ** 2).mean(axis=1)) / a.std(axis=1)).max()
    assert rel.pop("F32") == 0
    assert set(rel) == set(_RMSE_BOUND)
    for name, r in rel.items():
        assert r < _RMSE_BOUND[name], (name, r)
    # a K-quant beats the legacy block type of the same bits; more bits, less error
    assert rel["Q4_K"] < rel["Q4_1"] < rel["Q4_0"] and rel["Q5_K"] < rel["Q5_1"] < rel["Q5_0"]
    assert rel["Q8_0"] < rel["Q6_K"] < rel["Q5_K"] < rel["Q4_K"]


def test_quantize_errors():
    a = np.zeros((2, 48), np.float32)
    with pytest.raises(ValueError, match=r"row length 48 .*Q8_0 block of 32"):
        G.quantize(a, GGMLType.Q8_0)
    with pytest.raises(ValueError, match=r"row length 48 .*Q4_K block of 256"):
        G.quantize(a, GGMLType.Q4_K)
    with pytest.raises(ValueError, match=r"no quantizer for Q2_K"):
        G.quantize(np.zeros((1, 256), np.float32), GGMLType.Q2_K)
    with pytest.raises(ValueError, match=r"unknown ggml type 'q9_9'"):
        G.quantize(a, "q9_9")
    b = np.zeros((1, 64), np.float32)
    b[0, 40] = np.nan
    with pytest.raises(ValueError, match=r"finite.*value 40"):
        G.quantize(b, GGMLType.Q4_0)
    assert G.quantize(np.ones((1, 32)), "q8_0") == G.quantize(np.ones((1, 32), np.float32), GGMLType.Q8_0)
    with pytest.raises(ValueError, match=r"Q8_0 shape \(2, 32\) needs 68 bytes, got 34"):
        G.dequantize(bytes(34), GGMLType.Q8_0, (2, 32))
    with pytest.raises(ValueError, match=r"no dequantizer for IQ2_XXS"):
        G.dequantize(bytes(66), GGMLType.IQ2_XXS, (256,))
    with pytest.raises(ValueError, match=r"row length 40 .*Q4_0"):
        G.dequantize(bytes(36), GGMLType.Q4_0, (2, 40))
    # no rows: no bytes, and back
    for t in G.QUANTIZE_TYPES:
        assert G.quantize(np.zeros((0, 256), np.float32), t) == b""
        assert G.dequantize(b"", t, (0, 256)).shape == (0, 256)


# ---- the container ----

def _metadata():
    return {
        "general.architecture": "llama",
        "general.name": "tiny ✓ model",
        "u32": 7,
        "neg": -3,
        "big": 1 << 40,
        "f32": 1.5,
        "flag": True,
        "u8": (GGUFValueType.UINT8, 255),
        "i8": (GGUFValueType.INT8, -128),
        "u16": (GGUFValueType.UINT16, 65535),
        "i16": (GGUFValueType.INT16, -32768),
        "i64": (GGUFValueType.INT64, -(1 << 62)),
        "f64": (GGUFValueType.FLOAT64, 0.1),
        "tokens": ["a", "Ġb", "", "<|endoftext|>", "日本"],
        "ids": [1, 2, 3],
        "types": (GGUFValueType.INT32, [1, 3, -1]),
        "scores": [0.5, -1.25, 3.0],
        "flags": [True, False],
        "none": (GGUFValueType.STRING, []),
        "np_scores": np.array([0.25, 2.0], dtype=np.float32),
    }


_EXPECT = {  # key -> (value as read back, gguf-py's types list)
    "general.architecture": ("llama", [GGUFValueType.STRING]),
    "general.name": ("tiny ✓ model", [GGUFValueType.STRING]),
    "u32": (7, [GGUFValueType.UINT32]),
    "neg": (-3, [GGUFValueType.INT32]),
    "big": (1 << 40, [GGUFValueType.UINT64]),
    "f32": (1.5, [GGUFValueType.FLOAT32]),
    "flag": (True, [GGUFValueType.BOOL]),
    "u8": (255, [GGUFValueType.UINT8]),
    "i8": (-128, [GGUFValueType.INT8]),
    "u16": (65535, [GGUFValueType.UINT16]),
    "i16": (-32768, [GGUFValueType.INT16]),
    "i64": (-(1 << 62), [GGUFValueType.INT64]),
    "f64": (0.1, [GGUFValueType.FLOAT64]),
    "tokens": (["a", "Ġb", "", "<|endoftext|>", "日本"], [GGUFValueType.ARRAY, GGUFValueType.STRING]),
    "ids": ([1, 2, 3], [GGUFValueType.ARRAY, GGUFValueType.UINT32]),
    "types": ([1, 3, -1], [GGUFValueType.ARRAY, GGUFValueType.INT32]),
    "scores": ([0.5, -1.25, 3.0], [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]),
    "flags": ([True, False], [GGUFValueType.ARRAY, GGUFValueType.BOOL]),
    "none": ([], [GGUFValueType.ARRAY, GGUFValueType.STRING]),
    "np_scores": ([0.25, 2.0], [GGUFValueType.ARRAY, GGUFValueType.FLOAT32]),
}


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 256)).astype(np.float32)
    v = rng.standard_normal(64).astype(np.float32)
    e = rng.standard_normal((2, 3, 64)).astype(np.float32)
    return w, v, e, [
        ("w.f32", w, GGMLType.F32, w.shape),
        ("w.f16", w, GGMLType.F16, None),
        ("w.q8_0", w, GGMLType.Q8_0, (8, 256)),
        ("w.q4_0", w, GGMLType.Q4_0, (8, 256)),
        ("w.q4_k", w, GGMLType.Q4_K, (8, 256)),
        ("v.bf16", v, GGMLType.BF16, (64,)),
        ("e.3d", e, GGMLType.Q8_0, (2, 3, 64)),
        ("w.raw_q6_k", _random_blocks(GGMLType.Q6_K, 8, 1).tobytes(), GGMLType.Q6_K, (8, 256)),
    ]


@pytest.mark.parametrize("alignment", [32, 64])
def test_written_file_read_identically_by_gguf_py(gg, tmp_path, alignment):
    p = tmp_path / "m.gguf"
    w, v, e, tensors = _tensors()
    G.write_gguf(p, _metadata(), tensors, alignment=alignment)
    r = gg.GGUFReader(p)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    expect = dict(_EXPECT, **{"general.alignment": (alignment, [GGUFValueType.UINT32])})
    assert list(fields) == list(expect)
    for k, (value, types) in expect.items():
        f = fields[k]
        got = f.contents()
        if types[0] == GGUFValueType.FLOAT32:
            assert got == pytest.approx(value, rel=0, abs=0), k
        else:
            assert got == value, k
        if value != []:  # gguf-py records no element type for an empty array
            assert [int(t) for t in f.types] == [int(t) for t in types], k
    assert r.fields["GGUF.version"].contents() == 3
    assert r.alignment == alignment
    got = {t.name: t for t in r.tensors}
    assert list(got) == [t[0] for t in tensors]
    for name, data, t, shape in tensors:
        rt = got[name]
        shape = shape or data.shape
        assert int(rt.tensor_type) == int(t), name
        assert [int(s) for s in rt.shape] == list(shape[::-1]), name  # GGUF order: ne0 first
        assert rt.data_offset % alignment == 0
        want = data if isinstance(data, bytes) else G.quantize(data, t)
        assert rt.data.tobytes() == want, name
    np.testing.assert_array_equal(gg.quants.dequantize(got["w.q8_0"].data, gg.GGMLQuantizationType.Q8_0),
                                  G.dequantize(G.quantize(w, GGMLType.Q8_0), GGMLType.Q8_0, w.shape))


def test_round_trip_own_reader(tmp_path):
    p = tmp_path / "m.gguf"
    w, v, e, tensors = _tensors()
    G.write_gguf(p, _metadata(), tensors)
    with G.read_gguf(p) as f:
        assert f.version == 3 and f.alignment == 32
        assert f.data_offset % 32 == 0
        for k, (value, types) in _EXPECT.items():
            assert f.metadata[k] == value, k
            want = types[0] if len(types) == 1 else tuple(types)
            assert f.types[k] == want, k
        assert f.metadata["general.alignment"] == 32
        assert list(f.tensors) == [t[0] for t in tensors]
        ti = f.tensors["e.3d"]
        assert ti.shape == (64, 3, 2) and ti.array_shape == (2, 3, 64) and ti.type == GGMLType.Q8_0
        assert ti.nbytes == 12 * 34 and ti.offset % 32 == 0
        np.testing.assert_array_equal(f.array("w.f32"), w)
        np.testing.assert_array_equal(f.array("w.f16"), w.astype(np.float16).astype(np.float32))
        for name in ("w.q8_0", "w.q4_0", "w.q4_k"):
            t = f.tensors[name].type
            assert f.raw(name).tobytes() == G.quantize(w, t)
            np.testing.assert_array_equal(f.array(name), G.dequantize(G.quantize(w, t), t, w.shape))
        assert np.abs(f.array("w.q8_0") - w).max() < 0.02 * np.abs(w).max()
        assert f.array("v.bf16").shape == (64,)
        assert np.abs(f.array("v.bf16") - v).max() <= np.abs(v).max() / 128
        assert f.array("e.3d").shape == (2, 3, 64)
        assert f.array("w.raw_q6_k").shape == (8, 256)
        with pytest.raises(ValueError, match=r"no tensor 'nope'"):
            f.raw("nope")
        view = np.frombuffer(f.raw("w.f32"), dtype=np.float32)  # zero-copy, from the memory map
        kept = f.array("w.f32")
    # closing with a view still alive keeps the map until the view goes; arrays are copies
    np.testing.assert_array_equal(view.reshape(w.shape), w)
    np.testing.assert_array_equal(kept, w)
    with pytest.raises(ValueError, match=r"closed"):
        f.array("w.f32")


def test_reads_gguf_py_written_file(gg, tmp_path):
    p = tmp_path / "ref.gguf"
    rng = np.random.default_rng(2)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    h = rng.standard_normal((3, 32)).astype(np.float16)
    q8 = gg.quants.quantize(w, gg.GGMLQuantizationType.Q8_0)
    q6 = _random_blocks(GGMLType.Q6_K, 2, 3)
    wr = gg.GGUFWriter(str(p), "qwen3")
    wr.add_uint8("k.u8", 200)
    wr.add_int8("k.i8", -7)
    wr.add_uint16("k.u16", 60000)
    wr.add_int16("k.i16", -300)
    wr.add_uint32("k.u32", 4_000_000_000)
    wr.add_int32("k.i32", -2_000_000_000)
    wr.add_float32("k.f32", 0.25)
    wr.add_uint64("k.u64", 1 << 50)
    wr.add_int64("k.i64", -(1 << 50))
    wr.add_float64("k.f64", 1e-300)
    wr.add_bool("k.bool", False)
    wr.add_string("k.str", "héllo")
    wr.add_array("k.strs", ["x", "", "yz"])
    wr.add_array("k.ints", [5, 6, 7])
    wr.add_array("k.floats", [1.5, 2.5])
    wr.add_tensor("w", w)
    wr.add_tensor("h", h)
    wr.add_tensor("q8", q8, raw_dtype=gg.GGMLQuantizationType.Q8_0)  # uint8 (4, 68): byte shape
    wr.add_tensor("q6", q6.reshape(1, -1), raw_dtype=gg.GGMLQuantizationType.Q6_K)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    ref = gg.GGUFReader(p)
    with G.read_gguf(p) as f:
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for k in keys:
            rf = ref.fields[k]
            assert f.metadata[k] == rf.contents(), k
            t = f.types[k]
            assert ([int(x) for x in t] if isinstance(t, tuple) else [int(t)]) == [int(x) for x in rf.types], k
        assert f.metadata["general.architecture"] == "qwen3"
        assert f.metadata["k.f64"] == 1e-300 and f.metadata["k.bool"] is False
        for rt in ref.tensors:
            ti = f.tensors[rt.name]
            assert int(ti.type) == int(rt.tensor_type) and list(ti.shape) == [int(s) for s in rt.shape]
            assert ti.offset == rt.data_offset and ti.nbytes == rt.n_bytes
            assert f.raw(rt.name).tobytes() == rt.data.tobytes()
        np.testing.assert_array_equal(f.array("w"), w)
        np.testing.assert_array_equal(f.array("h"), h.astype(np.float32))
        np.testing.assert_array_equal(f.array("q8"), gg.quants.dequantize(q8, gg.GGMLQuantizationType.Q8_0))
        np.testing.assert_array_equal(f.array("q6"), gg.quants.dequantize(q6.reshape(1, -1), gg.GGMLQuantizationType.Q6_K))


# ---- bad files ----

def _small_file(tmp_path, name="ok.gguf"):
    p = tmp_path / name
    w = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    G.write_gguf(p, {"general.architecture": "llama", "x": 1},
                 [("first", w, GGMLType.F32, w.shape), ("second", w, GGMLType.Q8_0, w.shape)])
    return p, bytearray(p.read_bytes())


def _info_at(data: bytes, name: str) -> int:
    """Byte position just after a tensor info's name."""
    key = struct.pack("<Q", len(name)) + name.encode()
    return data.index(key) + len(key)


def _expect_error(tmp_path, data, pattern, name="bad.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=pattern) as e:
        G.read_gguf(p)
    assert str(p) in str(e.value)
    return str(e.value)


def test_bad_header(tmp_path):
    p, data = _small_file(tmp_path)
    _expect_error(tmp_path, b"", r"truncated header")
    _expect_error(tmp_path, b"GGUF", r"truncated header \(version\)")
    _expect_error(tmp_path, b"GGUF" + struct.pack("<I", 3) + b"\0" * 5, r"truncated header \(tensor and key counts\)")
    _expect_error(tmp_path, b"GGML" + data[4:], r"magic: got b'GGML', expected b'GGUF'")
    for v in (1, 4):
        d = bytearray(data)
        d[4:8] = struct.pack("<I", v)
        _expect_error(tmp_path, d, rf"version: got {v}, expected one of 2, 3")
    d = bytearray(data)
    d[4:8] = struct.pack(">I", 3)
    _expect_error(tmp_path, d, r"version: got 50331648 \(a big-endian file\?\)")
    d = bytearray(data)
    d[16:24] = struct.pack("<Q", 1 << 40)  # more keys than the file holds
    _expect_error(tmp_path, d, r"truncated metadata key \d+")
    with pytest.raises(ValueError, match=r"missing.gguf: cannot open GGUF file \(No such file"):
        G.read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match=r"cannot open GGUF file \(Is a directory"):
        G.read_gguf(tmp_path)


def test_version_2_reads(tmp_path):
    p, data = _small_file(tmp_path)
    data[4:8] = struct.pack("<I", 2)
    q = tmp_path / "v2.gguf"
    q.write_bytes(bytes(data))
    with G.read_gguf(q) as f:
        assert f.version == 2 and f.metadata["x"] == 1
        np.testing.assert_array_equal(f.array("first"), np.arange(128, dtype=np.float32).reshape(2, 64))


def test_bad_metadata(tmp_path):
    p, data = _small_file(tmp_path)
    key_type_at = 24 + 8 + len("general.architecture")
    _expect_error(tmp_path, data[:30], r"truncated metadata key 0")
    _expect_error(tmp_path, data[:key_type_at + 2], r"truncated metadata 'general.architecture' \(value type\)")
    _expect_error(tmp_path, data[:key_type_at + 4 + 8 + 2], r"truncated metadata 'general.architecture' \(string\)")
    d = bytearray(data)
    d[key_type_at:key_type_at + 4] = struct.pack("<I", 13)
    _expect_error(tmp_path, d, r"metadata 'general.architecture': unknown value type 13")
    # an array with an unknown element type
    p2 = tmp_path / "arr.gguf"
    G.write_gguf(p2, {"arr": [1, 2]}, [])
    d = bytearray(p2.read_bytes())
    at = 24 + 8 + 3 + 4
    d[at:at + 4] = struct.pack("<I", 99)
    _expect_error(tmp_path, d, r"metadata 'arr': unknown array element type 99")
    d = bytearray(p2.read_bytes())
    d[at + 4:at + 12] = struct.pack("<Q", 10 ** 6)
    _expect_error(tmp_path, d, r"truncated metadata 'arr' \(array of 1000000 UINT32\)")
    # a string array cut short, and one with bytes that are not UTF-8
    G.write_gguf(p2, {"toks": ["abc", "defg"]}, [])
    d = bytearray(p2.read_bytes())
    at = d.index(b"defg")
    _expect_error(tmp_path, d[:at + 2], r"truncated metadata 'toks'\[1\] \(string\)")
    _expect_error(tmp_path, d[:at - 3], r"truncated metadata 'toks'\[1\] \(string length\)")
    d[d.index(b"defg")] = 0xFF
    _expect_error(tmp_path, d, r"metadata 'toks'\[1\]: not valid UTF-8 \(byte 0\)")
    # a duplicate key
    p3 = tmp_path / "dup.gguf"
    G.write_gguf(p3, {"aa": 1, "bb": 2}, [])
    d = bytearray(p3.read_bytes())
    d[d.index(b"bb"):d.index(b"bb") + 2] = b"aa"
    _expect_error(tmp_path, d, r"metadata key 'aa' appears twice")
    # an alignment that is not a UINT32 power of 2
    G.write_gguf(p3, {}, [], alignment=32)
    d = bytearray(p3.read_bytes())
    d[-4:] = struct.pack("<I", 48)
    _expect_error(tmp_path, d, r"'general.alignment': got 48 .*power of 2")


def test_bad_tensor_infos_and_data(tmp_path):
    p, data = _small_file(tmp_path)
    at = _info_at(data, "second")
    _expect_error(tmp_path, data[:at + 2], r"truncated tensor info 'second' \(n_dims\)")
    _expect_error(tmp_path, data[:at + 4 + 8], r"truncated tensor info 'second' \(dims\)")
    d = bytearray(data)
    d[at:at + 4] = struct.pack("<I", 5)
    _expect_error(tmp_path, d, r"tensor 'second': n_dims 5, expected 0 to 4")
    type_at = at + 4 + 16
    for bad in (4, 31, 99):
        d = bytearray(data)
        d[type_at:type_at + 4] = struct.pack("<I", bad)
        _expect_error(tmp_path, d, rf"tensor 'second': unknown ggml type {bad}")
    d = bytearray(data)
    d[type_at:type_at + 4] = struct.pack("<I", GGMLType.Q4_K)
    _expect_error(tmp_path, d, r"tensor 'second': row length 64 is not a multiple of the Q4_K block of 256")
    off_at = type_at + 4
    (off,) = struct.unpack("<Q", data[off_at:off_at + 8])
    d = bytearray(data)
    d[off_at:off_at + 8] = struct.pack("<Q", off + 4)
    _expect_error(tmp_path, d, rf"tensor 'second': offset {off + 4} is not a multiple of the alignment 32")
    d = bytearray(data)
    d[off_at:off_at + 8] = struct.pack("<Q", off + (1 << 20))
    _expect_error(tmp_path, d, r"truncated tensor data: tensor 'second' \(Q8_0, ne \(64, 2\)\)")
    _expect_error(tmp_path, data[:-30], r"truncated tensor data: tensor 'second' .* but the file has")
    G.write_gguf(p, {}, [("aaa", np.zeros(32, np.float32), GGMLType.F32, None),
                         ("bbb", np.zeros(32, np.float32), GGMLType.F32, None)])
    d = bytearray(p.read_bytes())
    d[_info_at(d, "bbb") - 3:_info_at(d, "bbb")] = b"aaa"
    _expect_error(tmp_path, d, r"tensor 'aaa' appears twice")


def test_unsupported_tensor_type_reads_raw_but_not_array(tmp_path):
    p = tmp_path / "iq.gguf"
    G.write_gguf(p, {}, [("iq", bytes(66), GGMLType.IQ2_XXS, (1, 256))])
    with G.read_gguf(p) as f:
        assert f.tensors["iq"].type == GGMLType.IQ2_XXS and len(f.raw("iq")) == 66
        with pytest.raises(ValueError, match=rf"{p}: tensor 'iq': dequantize: no dequantizer for IQ2_XXS"):
            f.array("iq")


# ---- the writer's refusals and atomicity ----

def test_writer_refusals(tmp_path):
    p = tmp_path / "x.gguf"
    w = np.zeros((2, 64), np.float32)

    def refuse(pattern, metadata=None, tensors=(), **kw):
        with pytest.raises(ValueError, match=pattern) as e:
            G.write_gguf(p, metadata or {}, list(tensors), **kw)
        assert str(e.value).startswith(f"write_gguf: {p}: ")
        assert not p.exists() and not [q for q in tmp_path.iterdir() if q.name.startswith(".x.gguf")]

    refuse(r"tensor 'odd': row length 48 \(shape \(2, 48\)\) is not a multiple of the Q8_0 block of 32",
           tensors=[("odd", np.zeros((2, 48), np.float32), GGMLType.Q8_0, (2, 48))])
    refuse(r"tensor 'k': row length 64 .*Q4_K block of 256", tensors=[("k", w, "q4_k", None)])
    refuse(r"tensor 'b': 10 bytes given, Q8_0 shape \(2, 64\) needs 136",
           tensors=[("b", bytes(10), GGMLType.Q8_0, (2, 64))])
    refuse(r"tensor 'w': data shape \(2, 64\) does not match shape \(64, 2\)",
           tensors=[("w", w, GGMLType.F32, (64, 2))])
    refuse(r"tensor 'w' appears twice", tensors=[("w", w, GGMLType.F32, None)] * 2)
    refuse(r"longer than 63 bytes", tensors=[("n" * 64, w, GGMLType.F32, None)])
    refuse(r"tensor 'w': no quantizer for Q3_K", tensors=[("w", np.zeros((1, 256)), GGMLType.Q3_K, None)])
    refuse(r"tensor 'w': unknown ggml type 'q3'", tensors=[("w", w, "q3", None)])
    refuse(r"shape \(\) must have 1 to 4", tensors=[("s", np.float32(1), GGMLType.F32, None)])
    refuse(r"non-finite values cannot be quantized to Q4_0",
           tensors=[("w", np.full((1, 32), np.inf, np.float32), GGMLType.Q4_0, None)])
    refuse(r"tensor 0: expected \(name, data, type, shape\)", tensors=[("w", w)])
    refuse(r"alignment 48 is not a positive power of 2", alignment=48)
    refuse(r"'general.alignment' is 64; expected the UINT32 32", metadata={"general.alignment": 64})
    refuse(r"metadata 'nested': arrays of arrays", metadata={"nested": [[1], [2]]})
    refuse(r"metadata 'e': an empty list has no element type", metadata={"e": []})
    refuse(r"metadata 'm': mixed element types", metadata={"m": ["a", 1]})
    refuse(r"metadata 'u8': 300 is out of range for UINT8", metadata={"u8": (GGUFValueType.UINT8, 300)})
    refuse(r"metadata 'i': INT32 needs an int", metadata={"i": (GGUFValueType.INT32, 1.5)})
    refuse(r"metadata 'a'\[1\]: 'x' is not an int", metadata={"a": (GGUFValueType.INT32, [1, "x"])})
    refuse(r"metadata 'o': unsupported value None", metadata={"o": None})
    refuse(r"metadata 'huge': integer .* does not fit 64 bits", metadata={"huge": 1 << 70})
    refuse(r"metadata key '': expected a non-empty str", metadata={"": 1})


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p, data = _small_file(tmp_path, "keep.gguf")
    calls = []

    def failing(a, t):
        calls.append(t)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(a, t)

    real = G.quantize
    monkeypatch.setattr(G, "quantize", failing)
    w = np.ones((2, 64), np.float32)
    with pytest.raises(OSError, match="disk full"):
        G.write_gguf(p, {"general.architecture": "llama"}, [("a", w, GGMLType.F32, None), ("b", w, GGMLType.Q8_0, None)])
    assert p.read_bytes() == bytes(data)
    assert sorted(os.listdir(tmp_path)) == ["keep.gguf"]


def test_tensor_bytes_and_blocks():
    assert G.BLOCK[GGMLType.Q4_K] == (256, 144) and G.BLOCK[GGMLType.Q6_K] == (256, 210)
    assert G.BLOCK[GGMLType.Q8_0] == (32, 34) and G.BLOCK[GGMLType.Q4_0] == (32, 18)
    assert G.tensor_bytes(GGMLType.Q4_K, (3, 512)) == 3 * 2 * 144
    assert G.tensor_bytes(GGMLType.F16, (5,)) == 10
    with pytest.raises(ValueError, match=r"row length 100 is not a multiple of the Q5_K block of 256"):
        G.tensor_bytes(GGMLType.Q5_K, (1, 100))


def test_block_sizes_match_gguf_py(gg):
    known = {int(x) for x in gg.GGMLQuantizationType}
    for t in GGMLType:
        if int(t) not in known:  # newer than this gguf-py
            continue
        assert G.BLOCK[t] == tuple(gg.GGML_QUANT_SIZES[gg.GGMLQuantizationType(int(t))]), t.name
        assert gg.GGMLQuantizationType(int(t)).name == t.name


# ---- llama.cpp's own ggml (from llama-cpp-python): its quantizer and dequantizers ----

@pytest.fixture(scope="module")
def ggml():
    """libggml-base from llama-cpp-python: ggml_quantize_chunk (what llama_model_quantize runs per tensor,
    here without an importance matrix) and the dequantize_row_* functions."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        if in_ci():
            pytest.fail("llama-cpp-python is the reference here and is not installed (`make llama-cpp`)")
        pytest.skip("llama-cpp-python not installed")
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = [n for n in os.listdir(libdir) if n.startswith("libggml-base.")] if os.path.isdir(libdir) else []
    if not names:
        pytest.skip(f"no libggml-base in {libdir}")
    lib = ctypes.CDLL(os.path.join(libdir, sorted(names)[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def quantize(a: np.ndarray, t: GGMLType) -> bytes:
        a = np.ascontiguousarray(a, dtype=np.float32)
        out = np.zeros(G.tensor_bytes(t, a.shape), dtype=np.uint8)
        lib.ggml_quantize_init(int(t))
        n = lib.ggml_quantize_chunk(int(t), a.ctypes.data, out.ctypes.data, 0, a.shape[0], a.shape[1], None)
        assert n == out.size
        return out.tobytes()

    def dequantize(b: bytes, t: GGMLType, count: int) -> np.ndarray:
        fn = getattr(lib, f"dequantize_row_{t.name.lower().replace('_k', '_K')}")
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        src = np.frombuffer(b, dtype=np.uint8).copy()
        out = np.zeros(count, dtype=np.float32)
        fn(src.ctypes.data, out.ctypes.data, count)
        return out

    return quantize, dequantize


@pytest.mark.parametrize("t", [t.name for t in G.QUANTIZE_TYPES if t != GGMLType.F32])
def test_quantize_bytes_equal_llama_cpp(ggml, t):
    quantize, _ = ggml
    t = GGMLType[t]
    a = _rows(seed=11, rows=64, n=1024)
    assert G.quantize(a, t) == quantize(a, t)


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantize_equals_llama_cpp(ggml, t):
    quantize, dequantize = ggml
    t = GGMLType[t]
    a = _rows(seed=12, rows=16, n=1024)
    b = quantize(a, t)  # llama.cpp's own blocks of this type
    np.testing.assert_array_equal(G.dequantize(b, t, a.shape).reshape(-1), dequantize(b, t, a.size))
