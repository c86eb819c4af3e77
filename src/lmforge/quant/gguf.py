"""GGUF files: the container (header, metadata, tensor infos, aligned data) and ggml's block codecs.

Knows the byte layout of a GGUF file (version 3, little-endian; versions 2 and 3 are read) and of
ggml's tensor types; knows nothing about models, architectures or tokenizers (``gguf_model`` maps an
lmforge model onto tensor names and metadata keys).

Layout (every integer little-endian)::

    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x      (string key | u32 value type | value)          string = u64 length + UTF-8 bytes
                                                               array  = u32 element type + u64 count + elements
    n_tensors x (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset)
    zero padding to `general.alignment` (32 unless the file says otherwise)
    tensor data, each tensor starting at data_start + offset (a multiple of the alignment)

Shapes. ggml lists dimensions fastest first (``ne0`` is the row length, the contiguous one), numpy
slowest first. ``TensorInfo.shape`` is the file's order (``ne0`` first); every other shape in this
module (``write_gguf``'s tensor tuples, ``quantize``/``dequantize``, ``GGUFFile.array``) is the numpy
order, rows first: a (out_features, in_features) weight is written with shape (out, in) and listed in
the file as ne = (in, out).

Codecs (numpy, vectorized over blocks; ggml's block structs are in ggml-common.h, its reference
quantizers in ggml-quants.c). Quantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml's
``quantize_row_*_ref``), Q4_K and Q5_K (``quantize_row_q4_K_ref`` / ``q5_K_ref``: the weighted
least-squares search of ``make_qkx2_quants`` for each 32-value sub-block's scale and min, the 6-bit
packing of the eight scales and eight mins into 12 bytes, then the codes re-derived from the fp16
super-block scales) and Q6_K (``make_qx_quants`` per 16 values, int8 sub-block scales). What
``llama_model_quantize`` writes without an importance matrix is these functions' output. Every float32
operation is the reference's, in its order (sums run sequentially over a block's values, as the C loops
do), so the bytes equal ggml's: checked against llama-cpp-python's libggml, byte for byte, on every type.
A C build that fuses multiply-adds (-ffp-contract) could differ in the K-quants' searches on rare ties.
Dequantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lmforge._io import atomic_open

MAGIC = b"GGUF"
VERSION = 3
READ_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_NAME = 63  # ggml's GGML_MAX_NAME (64) includes the terminating NUL
MAX_DIMS = 4
QK_K = 256


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41
    Q2_0 = 42


# (elements per block, bytes per block), from ggml's type traits.
BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 16 + 64 + 2 + 2),
    GGMLType.Q3_K: (256, 32 + 64 + 12 + 2),
    GGMLType.Q4_K: (256, 2 + 2 + 12 + 128),
    GGMLType.Q5_K: (256, 2 + 2 + 12 + 32 + 128),
    GGMLType.Q6_K: (256, 128 + 64 + 16 + 2),
    GGMLType.Q8_K: (256, 4 + 256 + 32),
    GGMLType.IQ2_XXS: (256, 2 + 64),
    GGMLType.IQ2_XS: (256, 2 + 64 + 8),
    GGMLType.IQ3_XXS: (256, 2 + 64 + 32),
    GGMLType.IQ1_S: (256, 2 + 32 + 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + 64 + 32 + 8 + 4),
    GGMLType.IQ2_S: (256, 2 + 64 + 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + 128 + 4),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 32 + 16 + 8),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 52),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
    GGMLType.NVFP4: (64, 4 + 32),
    GGMLType.Q1_0: (128, 2 + 16),
    GGMLType.Q2_0: (64, 2 + 16),
}


_TYPE_IDS = frozenset(int(t) for t in GGMLType)


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtypes (little-endian) of the fixed-size value types.
_VALUE_DTYPE = {
    GGUFValueType.UINT8: np.dtype("<u1"),
    GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("<u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
_INT_RANGE = {t: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for t, d in _VALUE_DTYPE.items()
              if d.kind in "iu" and t != GGUFValueType.BOOL}


def _ggml_type(t) -> GGMLType:
    if isinstance(t, str):
        key = t.upper()
        if key in GGMLType.__members__:
            return GGMLType[key]
        raise ValueError(f"unknown ggml type {t!r}; expected one of {', '.join(m.lower() for m in GGMLType.__members__)}")
    try:
        return GGMLType(int(t))
    except (ValueError, TypeError):
        raise ValueError(f"unknown ggml type {t!r}; expected a GGMLType") from None


def row_bytes(t: GGMLType, n: int) -> int:
    """Bytes of one row of ``n`` values of type ``t`` (``n`` a multiple of the block size)."""
    blk, size = BLOCK[t]
    if n % blk:
        raise ValueError(f"row length {n} is not a multiple of the {GGMLType(t).name} block of {blk} values")
    return n // blk * size


def tensor_bytes(t: GGMLType, shape: Iterable[int]) -> int:
    """Bytes of a tensor of numpy ``shape`` (rows first, the last dimension the row) and type ``t``."""
    shape = tuple(int(s) for s in shape)
    n = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(t, n)


# ---------------------------------------------------------------------------------------------
# Block codecs. Every quantizer takes float32 blocks (N, block) and returns uint8 (N, bytes per
# block); every dequantizer the reverse. fp16 scales are numpy's float16 (round to nearest even,
# as ggml's GGML_FP32_TO_FP16).
# ---------------------------------------------------------------------------------------------

_f32 = np.float32


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 (N,) -> uint8 (N, 2): the fp16 bit pattern, little-endian."""
    return np.ascontiguousarray(v, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _fp16_value(b: np.ndarray) -> np.ndarray:
    """uint8 (N, 2) -> float32 (N, 1)."""
    return np.ascontiguousarray(b).view("<f2").astype(np.float32).reshape(-1, 1)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C's roundf (half away from zero), exact in float32: trunc plus the carry of the fraction."""
    t = np.trunc(x)
    frac = np.abs(x - t)  # exact: x and its integer part share the exponent range
    return t + np.where(frac >= 0.5, np.sign(x), _f32(0))


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (the 1.5*2**23 trick): round half to even, as an int32 array."""
    return np.rint(x).astype(np.int32)


def _q_f32(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks, dtype="<f4").view(np.uint8)


def _q_f16(blocks: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(blocks, dtype=np.float32).astype("<f2").view(np.uint8)


def _q_bf16(blocks: np.ndarray) -> np.ndarray:
    # ggml_compute_fp32_to_bf16: NaN -> quiet NaN with the sign kept; else round to nearest even.
    u = np.ascontiguousarray(blocks, dtype="<f4").view("<u4").astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = np.where(nan, (u >> 16) | 64, r)
    return r.astype("<u2").view(np.uint8)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d) via x * (1 / d).
    n = blocks.shape[0]
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / _f32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _f32(1) / d, _f32(0)).astype(np.float32)
    q = _roundf(blocks * inv).astype(np.int8)
    out = np.empty((n, 34), dtype=np.uint8)
    out[:, :2] = _fp16_bytes(d[:, 0])
    out[:, 2:] = q.view(np.uint8)
    return out


def _q_sym(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q4_0_ref / q5_0_ref: d = (the value of largest magnitude, the first on ties) / -2**(bits-1),
    code = min(2**bits - 1, trunc(x / d + 2**(bits-1) + 0.5)) with 1/d multiplied. Returns (fp16 d bytes, codes)."""
    n = blocks.shape[0]
    half = 1 << (bits - 1)
    idx = np.abs(blocks).argmax(axis=1)
    vmax = blocks[np.arange(n), idx][:, None]
    d = vmax / _f32(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _f32(1) / d, _f32(0)).astype(np.float32)
    q = np.minimum(np.trunc(blocks * inv + _f32(half + 0.5)), _f32(2 * half - 1)).astype(np.uint8)
    return _fp16_bytes(d[:, 0]), q


def _q_asym(blocks: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / (2**bits - 1), m = min,
    code = min(2**bits - 1, trunc((x - min) / d + 0.5)). Returns (fp16 d bytes, fp16 m bytes, codes)."""
    top = (1 << bits) - 1
    vmin = blocks.min(axis=1, keepdims=True)
    vmax = blocks.max(axis=1, keepdims=True)
    d = (vmax - vmin) / _f32(top)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, _f32(1) / d, _f32(0)).astype(np.float32)
    q = np.minimum(np.trunc((blocks - vmin) * inv + _f32(0.5)), _f32(top)).astype(np.uint8)
    return _fp16_bytes(d[:, 0]), _fp16_bytes(vmin[:, 0]), q


def _low_nibbles(q: np.ndarray) -> np.ndarray:
    """(N, 32) codes -> (N, 16) bytes: value j in the low nibble of byte j, value j+16 in its high nibble."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """(N, 32) 5-bit codes -> (N, 4) bytes: a little-endian u32 whose bit j is bit 4 of value j."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _q_sym(blocks, 4)
    return np.concatenate([d, _low_nibbles(q)], axis=1)


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _q_sym(blocks, 5)
    return np.concatenate([d, _fifth_bits(q), _low_nibbles(q)], axis=1)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _q_asym(blocks, 4)
    return np.concatenate([d, m, _low_nibbles(q)], axis=1)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _q_asym(blocks, 5)
    return np.concatenate([d, m, _fifth_bits(q), _low_nibbles(q)], axis=1)


def _seq_sum(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Sum over axis 0 in index order (the reference's ``for`` loop), float32."""
    out = np.add(a[0], a[1], out=out)
    for i in range(2, a.shape[0]):
        out += a[i]
    return out


def _qkx2(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad false) on M sub-blocks at once; x, w: float32 (n, M), the n values of
    each sub-block along axis 0 so that sums run in the reference's order.
    Returns (codes float32 (n, M) in 0..nmax, scale float32 (M,), min float32 (M,) >= 0, the value
    subtracted). Every float32 operation is the reference's, in its order. The winning codes are not
    carried through the steps: the step's (iscale, min subtracted) are, and the codes re-derived once."""
    f = np.float32
    vmax = x.max(axis=0)
    vmin = np.minimum(x.min(axis=0), f(0))
    sum_w = _seq_sum(w)
    t = np.multiply(w, x)
    sum_x = _seq_sum(t)
    flat = vmax == vmin  # the reference returns at once: codes 0, scale 0
    rng = np.where(flat, f(1), vmax - vmin)
    xm = np.subtract(x, vmin)  # x - min
    iscale = f(nmax) / rng
    scale = f(1) / iscale
    best_iscale, best_shift = iscale, vmin
    la = np.multiply(xm, iscale)
    np.rint(la, out=la)  # nearest_int rounds half to even
    np.clip(la, 0, nmax, out=la)
    np.multiply(la, scale, out=t)
    t += vmin
    t -= x
    np.square(t, out=t)
    t *= w
    best = _seq_sum(t)
    best_min = vmin
    wl = np.empty_like(x)
    sums = np.empty((4,) + x.shape[1:], dtype=np.float32)
    for step in range(nstep + 1):
        # the steps use the current best min: the reference updates `min` in place
        iscale = (f(rmin) + f(rdelta) * f(step) + f(nmax)) / rng
        np.multiply(xm, iscale, out=la)
        np.rint(la, out=la)
        np.clip(la, 0, nmax, out=la)
        np.multiply(w, la, out=wl)
        sum_l = _seq_sum(wl, sums[0])
        np.multiply(wl, la, out=t)
        sum_l2 = _seq_sum(t, sums[1])
        np.multiply(wl, x, out=t)
        sum_xl = _seq_sum(t, sums[2])
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        if pos.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, f(0), this_min)
        np.multiply(la, this_scale, out=t)
        t += this_min
        t -= x
        np.square(t, out=t)
        t *= w
        cur = _seq_sum(t, sums[3])
        better = ok & (cur < best)
        if better.any():
            best_iscale = np.where(better, iscale, best_iscale)
            best_shift = np.where(better, best_min, best_shift)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            best_min = np.where(better, this_min, best_min)
            rng = np.where(flat, f(1), vmax - best_min)
            np.subtract(x, best_min, out=xm)
    L = np.subtract(x, best_shift, out=xm)
    L *= best_iscale
    np.rint(L, out=L)
    np.clip(L, 0, nmax, out=L)
    L[:, flat] = 0
    scale = np.where(flat, f(0), scale).astype(np.float32)
    return L, scale, (-best_min).astype(np.float32)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins (N, 8) -> the 12 scale bytes of Q4_K/Q5_K (N, 12):
    bytes 0-3: scale j (low 6 bits) | high 2 bits of scale j+4; bytes 4-7: the same for the mins;
    bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _unpack_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, 12) scale bytes -> (scales, mins), each uint8 (N, 8) (ggml's get_scale_min_k4)."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _qk_k(blocks: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The scale/min part of quantize_row_q4_K_ref (nmax 15, rmin -1, 20 steps) and q5_K_ref (31, -0.5, 15):
    blocks (N, 256) = 8 sub-blocks of 32. Returns (d fp16 bytes, dmin fp16 bytes, 12 scale bytes, codes (N, 256))."""
    f = np.float32
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)  # (32, N*8): each sub-block's values along axis 0
    av = np.sqrt(_seq_sum(x * x) / f(32))
    w = av + np.abs(x)
    L, scale, mins = _qkx2(x, w, nmax, rmin, 0.1, nstep)
    scale = scale.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = np.maximum(scale.max(axis=1), f(0))
    max_min = np.maximum(mins.max(axis=1), f(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f(63) / max_scale, f(0)).astype(np.float32)
        inv_min = np.where(max_min > 0, f(63) / max_min, f(0)).astype(np.float32)
    ls = np.minimum(_nearest(inv_scale[:, None] * scale) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d16 = _fp16_bytes(max_scale / f(63))
    m16 = _fp16_bytes(max_min / f(63))
    dj = (_fp16_value(d16) * ls.astype(np.float32)).reshape(n * 8)  # (N*8,)
    dmj = (_fp16_value(m16) * lm.astype(np.float32)).reshape(n * 8)
    nz = dj != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest(np.where(nz, (x + dmj) / np.where(nz, dj, f(1)), f(0))), 0, nmax).astype(np.uint8)
    L = np.where(nz, lq, L.astype(np.uint8))  # a zero sub-block scale keeps the search's codes (as the reference)
    return d16, m16, _pack_k_scales(ls, lm), L.T.reshape(n, 256)


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # 144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles: in each 64 values, value l (l < 32) in the
    # low nibble of byte l and value 32 + l in its high nibble
    n = blocks.shape[0]
    d16, m16, sc, L = _qk_k(blocks, 15, -1.0, 20)
    codes = L.reshape(n, 4, 2, 32)
    qs = codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)
    return np.concatenate([d16, m16, sc, qs.reshape(n, 128)], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    # 176 bytes: d, dmin, 12 scale bytes, qh[32] (bit k of byte l: the fifth bit of value l of sub-block k),
    # then the low nibbles as Q4_K's
    n = blocks.shape[0]
    d16, m16, sc, L = _qk_k(blocks, 31, -0.5, 15)
    sub = L.reshape(n, 8, 32)
    qh = np.zeros((n, 32), dtype=np.uint8)
    for k in range(8):
        qh |= ((sub[:, k, :] >> 4) & 1) << k
    codes = (L & 0xF).reshape(n, 4, 2, 32)
    qs = codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)
    return np.concatenate([d16, m16, sc, qh, qs.reshape(n, 128)], axis=1)


def _qx(x: np.ndarray, nmax: int):
    """make_qx_quants with rmse_type 1 (weights x**2, no importance matrix) on M groups at once; x float32
    (n, M), values along axis 0. Returns (codes uint8 (n, M) in 0..2*nmax-1, scale float32 (M,))."""
    f = np.float32
    m = x.shape[1]
    idx = np.abs(x).argmax(axis=0)
    vmax = x[idx, np.arange(m)]
    zero = np.abs(vmax) < f(1e-15)  # GROUP_MAX_EPS
    vmax_s = np.where(zero, f(1), vmax)
    w = x * x
    wx = w * x

    def sums(iscale):
        l = np.rint(x * iscale)
        np.clip(l, -nmax, nmax - 1, out=l)
        sumlx = _seq_sum(wx * l)
        suml2 = _seq_sum((w * l) * l)
        return sumlx, suml2

    iscale = f(-nmax) / vmax_s
    best_iscale = iscale
    sumlx, suml2 = sums(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f(1)), f(0)).astype(np.float32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f(nmax) + f(0.1) * f(step)) / vmax_s
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        if better.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                sc = sumlx / np.where(better, suml2, f(1))
            scale = np.where(better, sc, scale).astype(np.float32)
            best = np.where(better, scale * sumlx, best).astype(np.float32)
            best_iscale = np.where(better, iscale, best_iscale)
    L = np.rint(x * best_iscale)
    np.clip(L, -nmax, nmax - 1, out=L)
    L = (L + nmax).astype(np.uint8)
    L[:, zero] = 0
    return L, np.where(zero, f(0), scale).astype(np.float32)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    # quantize_row_q6_K_ref. 210 bytes: ql[128], qh[64], 16 int8 scales (one per 16 values), d.
    f = np.float32
    n = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # (16, N*16)
    L, scale = _qx(x, 32)
    scale = scale.reshape(n, 16)
    idx = np.abs(scale).argmax(axis=1)
    max_scale = scale[np.arange(n), idx]
    empty = np.abs(max_scale) < f(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, f(0), f(-128) / np.where(empty, f(1), max_scale)).astype(np.float32)
        d16 = _fp16_bytes(np.where(empty, f(0), f(1) / np.where(empty, f(1), iscale)))
    sc = np.minimum(_nearest(iscale[:, None] * scale), 127).astype(np.int8)
    sc[empty] = 0
    dj = (_fp16_value(d16) * sc.astype(np.float32)).reshape(n * 16)
    nz = dj != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = (np.clip(_nearest(np.where(nz, x / np.where(nz, dj, f(1)), f(0))), -32, 31) + 32).astype(np.uint8)
    L = np.where(nz, lq, L).T.reshape(n, 256)
    L[empty] = 0
    h = L.reshape(n, 2, 4, 32)  # (half, quarter, l): values 0-31, 32-63, 64-95, 96-127 of each half
    ql = np.concatenate([(h[:, :, 0] & 0xF) | ((h[:, :, 2] & 0xF) << 4),
                         (h[:, :, 1] & 0xF) | ((h[:, :, 3] & 0xF) << 4)], axis=2)  # (N, 2, 64)
    qh = (h[:, :, 0] >> 4) | ((h[:, :, 1] >> 4) << 2) | ((h[:, :, 2] >> 4) << 4) | ((h[:, :, 3] >> 4) << 6)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d16], axis=1)


def _d_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32)


def _d_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _d_bf16(raw: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return u.view(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(N, 16) bytes -> (N, 32) codes: the low nibbles are values 0..15, the high ones 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """(N, 4) bytes (a little-endian u32) -> (N, 32) bits, bit j for value j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _d_q8_0(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, 0:2])
    return np.ascontiguousarray(raw[:, 2:]).view(np.int8).astype(np.float32) * d


def _d_q4_0(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, 0:2])
    return (_nibbles(raw[:, 2:]).astype(np.float32) - _f32(8)) * d


def _d_q4_1(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, 0:2])
    m = _fp16_value(raw[:, 2:4])
    return _nibbles(raw[:, 4:]).astype(np.float32) * d + m


def _d_q5_0(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, 0:2])
    q = _nibbles(raw[:, 6:]) | (_high_bits32(raw[:, 2:6]) << 4)
    return (q.astype(np.float32) - _f32(16)) * d


def _d_q5_1(raw: np.ndarray) -> np.ndarray:
    d = _fp16_value(raw[:, 0:2])
    m = _fp16_value(raw[:, 2:4])
    q = _nibbles(raw[:, 8:]) | (_high_bits32(raw[:, 4:8]) << 4)
    return q.astype(np.float32) * d + m


def _d_q4_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    d = _fp16_value(raw[:, 0:2])
    dmin = _fp16_value(raw[:, 2:4])
    sc, mn = _unpack_k_scales(raw[:, 4:16])
    d1 = (d * sc.astype(np.float32))[:, :, None]  # (N, 8, 1)
    m1 = (dmin * mn.astype(np.float32))[:, :, None]
    qs = raw[:, 16:].reshape(n, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (d1 * q - m1).reshape(n, 256)


def _d_q5_k(raw: np.ndarray) -> np.ndarray:
    n = raw.shape[0]
    d = _fp16_value(raw[:, 0:2])
    dmin = _fp16_value(raw[:, 2:4])
    sc, mn = _unpack_k_scales(raw[:, 4:16])
    d1 = (d * sc.astype(np.float32))[:, :, None]
    m1 = (dmin * mn.astype(np.float32))[:, :, None]
    qh = raw[:, 16:48]  # bit k of qh[l] is the fifth bit of value l of sub-block k
    qs = raw[:, 48:].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).astype(np.float32)
    return (d1 * q - m1).reshape(n, 256)


def _d_q6_k(raw: np.ndarray) -> np.ndarray:
    # halves of 128 values: ql 64 bytes, qh 32 bytes, 8 int8 scales (one per 16 values)
    n = raw.shape[0]
    ql = raw[:, 0:128].reshape(n, 2, 2, 32)  # (half, byte group of 32, l)
    qh = raw[:, 128:192].reshape(n, 2, 1, 32)
    sc = np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)  # (N, 16)
    d = _fp16_value(raw[:, 208:210])
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (N, 2, 4, 32): values 0-31, 32-63, 64-95, 96-127
    high = (qh >> (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]) & 3
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.float32).reshape(n, 16, 16)
    return ((d * sc)[:, :, None] * q).reshape(n, 256)


def _d_q2_k(raw: np.ndarray) -> np.ndarray:
    # scales[16] (low nibble: scale, high nibble: min, one pair per 16 values), qs[64] (2-bit codes), d, dmin
    n = raw.shape[0]
    sc = raw[:, 0:16]
    d = _fp16_value(raw[:, 80:82])
    dmin = _fp16_value(raw[:, 82:84])
    qs = raw[:, 16:80].reshape(n, 2, 1, 32)  # halves of 128 values, 32 bytes each
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]
    q = ((qs >> shifts) & 3).reshape(n, 16, 16).astype(np.float32)  # (half, shift, l) -> 16 groups of 16
    dl = (d * (sc & 0xF).astype(np.float32))[:, :, None]
    ml = (dmin * (sc >> 4).astype(np.float32))[:, :, None]
    return (dl * q - ml).reshape(n, 256)


def _d_q3_k(raw: np.ndarray) -> np.ndarray:
    # hmask[32] (the third bit, set = no subtraction of 4), qs[64] (2-bit codes), 12 bytes of sixteen 6-bit
    # signed scales (minus 32), d
    n = raw.shape[0]
    hm = raw[:, 0:32]
    qs = raw[:, 32:96].reshape(n, 2, 1, 32)
    s = raw[:, 96:108].astype(np.uint32)
    d = _fp16_value(raw[:, 108:110])
    lo = s[:, 0:8]  # bytes 0-7 carry the low nibbles: byte j -> scale j (low), scale j+8 (high nibble)
    hi = s[:, 8:12]  # bytes 8-11 carry the top 2 bits: byte k, bits 2i..2i+1 -> scale 4i + k
    low4 = np.concatenate([lo & 0xF, lo >> 4], axis=1)  # (N, 16)
    top2 = ((hi[:, None, :] >> (np.arange(4, dtype=np.uint32) * 2)[None, :, None]) & 3).reshape(n, 16)
    scales = (low4 | (top2 << 4)).astype(np.int32) - 32
    shifts = (np.arange(4, dtype=np.uint8) * 2)[None, None, :, None]
    q2 = (qs >> shifts) & 3  # (N, 2, 4, 32)
    bit = np.arange(8, dtype=np.uint8).reshape(2, 4)[None, :, :, None]
    h = (hm[:, None, None, :] >> bit) & 1  # (N, 2, 4, 32)
    q = q2.astype(np.int16) - np.where(h != 0, 0, 4).astype(np.int16)
    q = q.reshape(n, 16, 16).astype(np.float32)
    dl = (d * scales.astype(np.float32))[:, :, None]
    return (dl * q).reshape(n, 256)


_QUANTIZE = {
    GGMLType.F32: _q_f32,
    GGMLType.F16: _q_f16,
    GGMLType.BF16: _q_bf16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q4_1: _q4_1,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q5_1: _q5_1,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
_DEQUANTIZE = {
    GGMLType.F32: _d_f32,
    GGMLType.F16: _d_f16,
    GGMLType.BF16: _d_bf16,
    GGMLType.Q8_0: _d_q8_0,
    GGMLType.Q4_0: _d_q4_0,
    GGMLType.Q4_1: _d_q4_1,
    GGMLType.Q5_0: _d_q5_0,
    GGMLType.Q5_1: _d_q5_1,
    GGMLType.Q2_K: _d_q2_k,
    GGMLType.Q3_K: _d_q3_k,
    GGMLType.Q4_K: _d_q4_k,
    GGMLType.Q5_K: _d_q5_k,
    GGMLType.Q6_K: _d_q6_k,
}
QUANTIZE_TYPES = tuple(_QUANTIZE)
DEQUANTIZE_TYPES = tuple(_DEQUANTIZE)
_CHUNK_BLOCKS = {GGMLType.Q4_K: 1024, GGMLType.Q5_K: 1024, GGMLType.Q6_K: 1024}  # super-blocks per step: bounds the search's temporaries


def _blocks_per_chunk(t: GGMLType) -> int:
    return _CHUNK_BLOCKS.get(t, 1 << 16 if BLOCK[t][0] > 1 else 1 << 62)


def quantize(a: np.ndarray, t) -> bytes:
    """float32 values (any shape; the last dimension is the row) -> the bytes of ggml type ``t``.

    ValueError: a type with no quantizer here, a row length that is not a multiple of the block,
    non-finite values for a block type."""
    t = _ggml_type(t)
    if t not in _QUANTIZE:
        raise ValueError(f"quantize: no quantizer for {t.name}; expected one of "
                         f"{', '.join(x.name for x in QUANTIZE_TYPES)}")
    a = np.asarray(a)
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    n = a.shape[-1] if a.ndim else 1
    blk, size = BLOCK[t]
    if n % blk:
        raise ValueError(f"quantize: row length {n} (shape {tuple(a.shape)}) is not a multiple of the "
                         f"{t.name} block of {blk} values")
    flat = np.ascontiguousarray(a).reshape(-1, blk)
    if blk > 1 and not np.isfinite(flat).all():
        bad = int(np.flatnonzero(~np.isfinite(flat.reshape(-1)))[0])
        raise ValueError(f"quantize: {t.name} needs finite values; value {bad} (flat index) is "
                         f"{flat.reshape(-1)[bad]}")
    if flat.shape[0] == 0:
        return b""
    fn = _QUANTIZE[t]
    step = _blocks_per_chunk(t)
    if flat.shape[0] <= step:
        return fn(flat).tobytes()
    return b"".join(fn(flat[i:i + step]).tobytes() for i in range(0, flat.shape[0], step))


def dequantize(b, t, shape) -> np.ndarray:
    """Bytes of ggml type ``t`` -> float32 array of numpy ``shape`` (rows first; the last dimension
    is the row and must be a multiple of the block).

    ValueError: a type with no dequantizer here, a shape that does not fit the block, a byte count that
    does not match the shape."""
    t = _ggml_type(t)
    if t not in _DEQUANTIZE:
        raise ValueError(f"dequantize: no dequantizer for {t.name}; expected one of "
                         f"{', '.join(x.name for x in DEQUANTIZE_TYPES)}")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"dequantize: negative dimension in shape {shape}")
    need = tensor_bytes(t, shape) if shape else BLOCK[t][1]
    raw = np.frombuffer(b, dtype=np.uint8)
    if raw.size != need:
        raise ValueError(f"dequantize: {t.name} shape {shape} needs {need} bytes, got {raw.size}")
    blk, size = BLOCK[t]
    if need == 0:
        return np.zeros(shape, dtype=np.float32)
    raw = raw.reshape(-1, size)
    fn = _DEQUANTIZE[t]
    step = 1 << 15 if blk > 1 else 1 << 62
    if raw.shape[0] <= step:
        out = fn(raw)
    else:
        out = np.concatenate([fn(raw[i:i + step]) for i in range(0, raw.shape[0], step)], axis=0)
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _scalar_type(key: str, v) -> GGUFValueType:
    if isinstance(v, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(v, (int, np.integer)):
        v = int(v)
        if 0 <= v <= 0xFFFFFFFF:
            return GGUFValueType.UINT32
        if -(1 << 31) <= v < 0:
            return GGUFValueType.INT32
        if 0 <= v < (1 << 64):
            return GGUFValueType.UINT64
        if -(1 << 63) <= v < 0:
            return GGUFValueType.INT64
        raise ValueError(f"write_gguf: metadata {key!r}: integer {v} does not fit 64 bits")
    if isinstance(v, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(v, str):
        return GGUFValueType.STRING
    raise ValueError(f"write_gguf: metadata {key!r}: unsupported value {v!r} of type {type(v).__name__}; "
                     "expected str, bool, int, float, a list of them, or a (GGUFValueType, value) tuple")


def _pack_scalar(key: str, t: GGUFValueType, v) -> bytes:
    if t == GGUFValueType.STRING:
        if not isinstance(v, str):
            raise ValueError(f"write_gguf: metadata {key!r}: STRING needs a str, got {v!r}")
        return _pack_string(v)
    if t == GGUFValueType.BOOL:
        if not isinstance(v, (bool, np.bool_, int, np.integer)) or int(v) not in (0, 1):
            raise ValueError(f"write_gguf: metadata {key!r}: BOOL needs True/False, got {v!r}")
        return struct.pack("<B", int(bool(v)))
    dt = _VALUE_DTYPE.get(t)
    if dt is None:
        raise ValueError(f"write_gguf: metadata {key!r}: {t!r} is not a scalar type")
    if dt.kind in "iu":
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"write_gguf: metadata {key!r}: {t.name} needs an int, got {v!r}")
        lo, hi = _INT_RANGE[t]
        if not lo <= int(v) <= hi:
            raise ValueError(f"write_gguf: metadata {key!r}: {int(v)} is out of range for {t.name} [{lo}, {hi}]")
        return np.array(int(v), dtype=dt).tobytes()
    if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, (bool, np.bool_)):
        raise ValueError(f"write_gguf: metadata {key!r}: {t.name} needs a number, got {v!r}")
    return np.array(float(v), dtype=dt).tobytes()


def _pack_array(key: str, et: GGUFValueType | None, items) -> bytes:
    if isinstance(items, np.ndarray):
        if items.ndim != 1:
            raise ValueError(f"write_gguf: metadata {key!r}: arrays must be 1-D, got shape {items.shape}")
        if et is None:
            kinds = {"b": GGUFValueType.BOOL, "f": GGUFValueType.FLOAT32}
            if items.dtype.kind in kinds:
                et = kinds[items.dtype.kind]
            elif items.dtype.kind in "iu":
                et = next((t for t, d in _VALUE_DTYPE.items() if d == items.dtype.newbyteorder("<")
                           and t != GGUFValueType.BOOL), None)
            if et is None:
                raise ValueError(f"write_gguf: metadata {key!r}: unsupported array dtype {items.dtype}")
        items = items.tolist()
    items = list(items)
    if et is None:
        if not items:
            raise ValueError(f"write_gguf: metadata {key!r}: an empty list has no element type; "
                             "give (GGUFValueType.<element type>, []) ")
        types = {_scalar_type(key, v) if not isinstance(v, (list, tuple, np.ndarray)) else None for v in items}
        if None in types:
            raise ValueError(f"write_gguf: metadata {key!r}: arrays of arrays are not written (llama.cpp refuses them)")
        if types == {GGUFValueType.UINT32, GGUFValueType.INT32}:
            types = {GGUFValueType.INT32}
        if types <= {GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64}:
            vals = [int(v) for v in items]
            lo, hi = min(vals), max(vals)
            et = next(t for t in (GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64)
                      if _INT_RANGE[t][0] <= lo and hi <= _INT_RANGE[t][1])
        elif len(types) == 1:
            et = types.pop()
        elif types <= {GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64,
                       GGUFValueType.FLOAT32}:
            et = GGUFValueType.FLOAT32
        else:
            raise ValueError(f"write_gguf: metadata {key!r}: mixed element types "
                             f"{sorted(t.name for t in types)} in one array")
    if et == GGUFValueType.ARRAY:
        raise ValueError(f"write_gguf: metadata {key!r}: arrays of arrays are not written (llama.cpp refuses them)")
    head = struct.pack("<IIQ", GGUFValueType.ARRAY, et, len(items))
    if et == GGUFValueType.STRING:
        parts = []
        for i, s in enumerate(items):
            if not isinstance(s, str):
                raise ValueError(f"write_gguf: metadata {key!r}[{i}]: STRING array needs str, got {s!r}")
            parts.append(_pack_string(s))
        return head + b"".join(parts)
    dt = _VALUE_DTYPE[et]
    if dt.kind in "iu" and et != GGUFValueType.BOOL:
        lo, hi = _INT_RANGE[et]
        for i, v in enumerate(items):
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or not lo <= int(v) <= hi:
                raise ValueError(f"write_gguf: metadata {key!r}[{i}]: {v!r} is not an int in [{lo}, {hi}] ({et.name})")
    elif et == GGUFValueType.BOOL:
        for i, v in enumerate(items):
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"write_gguf: metadata {key!r}[{i}]: BOOL array needs True/False, got {v!r}")
    else:
        for i, v in enumerate(items):
            if isinstance(v, (bool, np.bool_, str)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"write_gguf: metadata {key!r}[{i}]: {et.name} array needs numbers, got {v!r}")
    return head + np.array(items, dtype=dt).tobytes()


def _pack_kv(key: str, value) -> bytes:
    if not isinstance(key, str) or not key:
        raise ValueError(f"write_gguf: metadata key {key!r}: expected a non-empty str")
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], GGUFValueType):
        t, v = value
        if t == GGUFValueType.ARRAY:
            raise ValueError(f"write_gguf: metadata {key!r}: give arrays as (element type, list), e.g. "
                             "(GGUFValueType.INT32, [1, 2])")
        if isinstance(v, (list, tuple, np.ndarray)):
            body = _pack_array(key, t, v)
        else:
            body = struct.pack("<I", t) + _pack_scalar(key, t, v)
    elif isinstance(value, (list, tuple, np.ndarray)):
        body = _pack_array(key, None, value)
    else:
        t = _scalar_type(key, value)
        body = struct.pack("<I", t) + _pack_scalar(key, t, value)
    return _pack_string(key) + body


def _pad(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def write_gguf(path, metadata: dict[str, Any], tensors, alignment: int = DEFAULT_ALIGNMENT) -> None:
    """Write a GGUF v3 file atomically (temp name, fsync, rename: a failed write leaves no file).

    metadata: key -> value, in order. str -> STRING, bool -> BOOL, int -> UINT32 (INT32 when negative,
    UINT64/INT64 beyond 32 bits), float -> FLOAT32, list / 1-D ndarray -> ARRAY (element type the same
    way; ints of one array share a type), or ``(GGUFValueType.X, value)`` for an exact type (with a list:
    an array of X). ``general.alignment`` (UINT32) is written from ``alignment`` unless given.
    tensors: (name, data, type, shape) each; shape in numpy order (rows first; the file stores it reversed);
    data a float array (quantized here to ``type``, its shape must equal ``shape``; None: taken from data)
    or the tensor's bytes already in ``type`` (exactly ``tensor_bytes(type, shape)`` of them).
    Every check runs before the file is opened; quantizing happens while writing."""
    path = Path(path)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"write_gguf: {path}: alignment {alignment!r} is not a positive power of 2")
    metadata = dict(metadata)
    if "general.alignment" in metadata:
        v = metadata["general.alignment"]
        vv = v[1] if isinstance(v, tuple) and len(v) == 2 else v
        if isinstance(vv, bool) or not isinstance(vv, int) or vv != alignment or (
                isinstance(v, tuple) and v[0] != GGUFValueType.UINT32):
            raise ValueError(f"write_gguf: {path}: metadata 'general.alignment' is {v!r}; expected the UINT32 "
                             f"{alignment} (the alignment argument)")
        metadata["general.alignment"] = (GGUFValueType.UINT32, alignment)
    else:
        metadata["general.alignment"] = (GGUFValueType.UINT32, alignment)
    try:
        kv = [_pack_kv(k, v) for k, v in metadata.items()]
    except ValueError as e:  # name the file too
        raise ValueError(f"write_gguf: {path}: {str(e).removeprefix('write_gguf: ')}") from None

    plan = []  # (name, data, type, numpy shape, nbytes, offset)
    names = set()
    offset = 0
    for i, item in enumerate(tensors):
        try:
            name, data, t, shape = item
        except (TypeError, ValueError):
            raise ValueError(f"write_gguf: {path}: tensor {i}: expected (name, data, type, shape)") from None
        if not isinstance(name, str) or not name:
            raise ValueError(f"write_gguf: {path}: tensor {i}: name {name!r} is not a non-empty str")
        if len(name.encode("utf-8")) > MAX_NAME:
            raise ValueError(f"write_gguf: {path}: tensor {name!r}: name longer than {MAX_NAME} bytes "
                             "(llama.cpp's limit)")
        if name in names:
            raise ValueError(f"write_gguf: {path}: tensor {name!r} appears twice")
        names.add(name)
        try:
            t = _ggml_type(t)
        except ValueError as e:
            raise ValueError(f"write_gguf: {path}: tensor {name!r}: {e}") from None
        if isinstance(data, (bytes, bytearray, memoryview)):
            if shape is None:
                raise ValueError(f"write_gguf: {path}: tensor {name!r}: raw bytes need a shape")
        else:
            data = np.asarray(data)
            if shape is None:
                shape = data.shape
            if tuple(int(s) for s in data.shape) != tuple(int(s) for s in shape):
                raise ValueError(f"write_gguf: {path}: tensor {name!r}: data shape {tuple(data.shape)} does not "
                                 f"match shape {tuple(shape)} (numpy order, rows first)")
            if t not in _QUANTIZE:
                raise ValueError(f"write_gguf: {path}: tensor {name!r}: no quantizer for {t.name}; pass its bytes "
                                 f"or one of {', '.join(x.name for x in QUANTIZE_TYPES)}")
            if data.dtype.kind not in "fiub":
                raise ValueError(f"write_gguf: {path}: tensor {name!r}: dtype {data.dtype} is not numeric")
        shape = tuple(int(s) for s in shape)
        if not 1 <= len(shape) <= MAX_DIMS or any(s < 0 for s in shape):
            raise ValueError(f"write_gguf: {path}: tensor {name!r}: shape {shape} must have 1 to {MAX_DIMS} "
                             "non-negative dimensions")
        blk = BLOCK[t][0]
        if shape[-1] % blk:
            raise ValueError(f"write_gguf: {path}: tensor {name!r}: row length {shape[-1]} (shape {shape}) is not "
                             f"a multiple of the {t.name} block of {blk} values")
        nbytes = tensor_bytes(t, shape)
        if isinstance(data, (bytes, bytearray, memoryview)):
            got = memoryview(data).nbytes
            if got != nbytes:
                raise ValueError(f"write_gguf: {path}: tensor {name!r}: {got} bytes given, {t.name} shape {shape} "
                                 f"needs {nbytes}")
        elif BLOCK[t][0] > 1 and data.size and not np.isfinite(data).all():
            raise ValueError(f"write_gguf: {path}: tensor {name!r}: non-finite values cannot be quantized to {t.name}")
        plan.append((name, data, t, shape, nbytes, offset))
        offset = _pad(offset + nbytes, alignment)

    infos = []
    for name, _, t, shape, _, off in plan:
        ne = shape[::-1]
        infos.append(_pack_string(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t, off))
    header = MAGIC + struct.pack("<IQQ", VERSION, len(plan), len(kv))
    head = b"".join([header, *kv, *infos])
    with atomic_open(path, "wb") as f:
        f.write(head)
        if plan:  # as llama.cpp: the data section (and its padding) only when there are tensors
            f.write(b"\0" * (_pad(len(head), alignment) - len(head)))
        pos = 0
        for name, data, t, shape, nbytes, off in plan:
            assert pos == off
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                f.write(quantize(data.reshape(shape), t))
            pos = _pad(off + nbytes, alignment)
            f.write(b"\0" * (pos - off - nbytes))


# ---------------------------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: GGMLType
    shape: tuple[int, ...]  # GGUF order: ne0 (the row length) first
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The numpy shape (rows first) ``GGUFFile.array`` returns."""
        return self.shape[::-1]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, n: int, what: str) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ValueError(f"{self.path}: truncated {what}: needs bytes [{self.pos}, {end}) "
                             f"but the file has {len(self.buf)}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: {what}: not valid UTF-8 (byte {e.start})") from None


class GGUFFile:
    """A GGUF file opened read-only and memory-mapped; tensor data is touched only when asked for.

    .version, .alignment, .data_offset, .metadata (key -> python value; arrays as lists),
    .types (key -> GGUFValueType, or (ARRAY, element type)), .tensors (name -> TensorInfo, file order),
    .raw(name) -> memoryview of the tensor's bytes, .array(name) -> float32 ndarray in numpy order.
    Use as a context manager or call close(); arrays from .array() are copies and stay valid."""

    def __init__(self, path):
        self.path = Path(path)
        self._mm = self._buf = None
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 4:
                    raise ValueError(f"{self.path}: truncated header: {size} bytes, expected the magic 'GGUF' "
                                     "and the header (24 bytes)")
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot open GGUF file ({e.strerror or e})") from None
        self._buf = memoryview(self._mm)
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        c = _Cursor(self._buf, self.path)
        magic = bytes(c.take(4, "header (magic)"))
        if magic != MAGIC:
            raise ValueError(f"{self.path}: magic: got {magic!r}, expected b'GGUF' (not a GGUF file)")
        (version,) = c.unpack("<I", "header (version)")
        if version not in READ_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            hint = " (a big-endian file?)" if swapped in READ_VERSIONS else ""
            raise ValueError(f"{self.path}: version: got {version}{hint}, expected one of "
                             f"{', '.join(map(str, READ_VERSIONS))}")
        self.version = version
        n_tensors, n_kv = c.unpack("<QQ", "header (tensor and key counts)")
        # counts beyond the file stop at the first item that runs past its end (a truncation error)
        self.metadata: dict[str, Any] = {}
        self.types: dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}")
            if key in self.metadata:
                raise ValueError(f"{self.path}: metadata key {key!r} appears twice")
            (t,) = c.unpack("<I", f"metadata {key!r} (value type)")
            self.metadata[key], self.types[key] = self._value(c, key, t)
        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.types["general.alignment"] != GGUFValueType.UINT32 or a <= 0 or a & (a - 1):
                raise ValueError(f"{self.path}: metadata 'general.alignment': got {a!r} "
                                 f"({self.types['general.alignment']!r}), expected a UINT32 power of 2")
            self.alignment = a
        infos = []
        for i in range(n_tensors):
            name = c.string(f"tensor info {i} (name)")
            (nd,) = c.unpack("<I", f"tensor info {name!r} (n_dims)")
            if nd > MAX_DIMS:
                raise ValueError(f"{self.path}: tensor {name!r}: n_dims {nd}, expected 0 to {MAX_DIMS}")
            ne = c.unpack(f"<{nd}Q", f"tensor info {name!r} (dims)") if nd else ()
            t, off = c.unpack("<IQ", f"tensor info {name!r} (type, offset)")
            infos.append((name, ne, t, off))
        self.data_offset = _pad(c.pos, self.alignment)
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, t, off in infos:
            if name in self.tensors:
                raise ValueError(f"{self.path}: tensor {name!r} appears twice")
            if t not in _TYPE_IDS:
                raise ValueError(f"{self.path}: tensor {name!r}: unknown ggml type {t}; known: "
                                 f"{', '.join(f'{x.name}={int(x)}' for x in GGMLType)}")
            t = GGMLType(t)
            blk = BLOCK[t][0]
            n0 = ne[0] if ne else 1  # n_dims 0: one value
            if n0 % blk:
                raise ValueError(f"{self.path}: tensor {name!r}: row length {n0} is not a multiple of the "
                                 f"{t.name} block of {blk} values")
            if off % self.alignment:
                raise ValueError(f"{self.path}: tensor {name!r}: offset {off} is not a multiple of the alignment "
                                 f"{self.alignment}")
            rows = 1
            for d in ne[1:]:
                rows *= d
            nbytes = rows * row_bytes(t, n0)
            start = self.data_offset + off
            if start + nbytes > size:
                raise ValueError(f"{self.path}: truncated tensor data: tensor {name!r} ({t.name}, ne {tuple(ne)}) "
                                 f"needs bytes [{start}, {start + nbytes}) but the file has {size}")
            self.tensors[name] = TensorInfo(name, t, tuple(int(d) for d in ne), start, nbytes)

    def _value(self, c: _Cursor, key: str, t: int):
        try:
            t = GGUFValueType(t)
        except ValueError:
            raise ValueError(f"{self.path}: metadata {key!r}: unknown value type {t}; expected 0 to "
                             f"{max(GGUFValueType)}") from None
        if t == GGUFValueType.STRING:
            return c.string(f"metadata {key!r} (string)"), t
        if t == GGUFValueType.ARRAY:
            et, n = c.unpack("<IQ", f"metadata {key!r} (array header)")
            try:
                et = GGUFValueType(et)
            except ValueError:
                raise ValueError(f"{self.path}: metadata {key!r}: unknown array element type {et}; expected 0 to "
                                 f"{max(GGUFValueType)}") from None
            if et in _VALUE_DTYPE:
                dt = _VALUE_DTYPE[et]
                raw = c.take(n * dt.itemsize, f"metadata {key!r} (array of {n} {et.name})")
                arr = np.frombuffer(raw, dtype=dt)
                vals = arr.astype(bool).tolist() if et == GGUFValueType.BOOL else arr.tolist()
                return vals, (GGUFValueType.ARRAY, et)
            if n > len(c.buf) - c.pos:
                raise ValueError(f"{self.path}: truncated metadata {key!r}: an array of {n} {et.name} "
                                 "cannot fit in the rest of the file")
            if et == GGUFValueType.STRING:
                return self._strings(c, key, n), (GGUFValueType.ARRAY, et)
            vals, sub = [], None
            for j in range(n):
                v, sub = self._value(c, f"{key}[{j}]", et)
                vals.append(v)
            return vals, (GGUFValueType.ARRAY, et if et != GGUFValueType.ARRAY or sub is None else sub)
        dt = _VALUE_DTYPE[t]
        (v,) = np.frombuffer(c.take(dt.itemsize, f"metadata {key!r} ({t.name})"), dtype=dt).tolist()
        return (bool(v) if t == GGUFValueType.BOOL else v), t

    def _strings(self, c: _Cursor, key: str, n: int) -> list[str]:
        """An array of n strings (a vocabulary: 10**5 of them), read straight from the map."""
        mm, pos, end = self._mm, c.pos, len(c.buf)
        unpack = struct.Struct("<Q").unpack_from
        out = []
        append = out.append
        for j in range(n):
            if pos + 8 > end:
                raise ValueError(f"{self.path}: truncated metadata {key!r}[{j}] (string length): needs bytes "
                                 f"[{pos}, {pos + 8}) but the file has {end}")
            (ln,) = unpack(mm, pos)
            pos += 8
            if pos + ln > end:
                raise ValueError(f"{self.path}: truncated metadata {key!r}[{j}] (string): needs bytes "
                                 f"[{pos}, {pos + ln}) but the file has {end}")
            try:
                append(mm[pos:pos + ln].decode("utf-8"))
            except UnicodeDecodeError as e:
                raise ValueError(f"{self.path}: metadata {key!r}[{j}]: not valid UTF-8 (byte {e.start})") from None
            pos += ln
        c.pos = pos
        return out

    def raw(self, name: str) -> memoryview:
        ti = self._info(name)
        return self._buf[ti.offset:ti.offset + ti.nbytes]

    def array(self, name: str) -> np.ndarray:
        ti = self._info(name)
        try:
            return dequantize(self.raw(name), ti.type, ti.array_shape)
        except ValueError as e:
            raise ValueError(f"{self.path}: tensor {name!r}: {e}") from None

    def _info(self, name: str) -> TensorInfo:
        if self._buf is None:
            raise ValueError(f"{self.path}: the file is closed")
        try:
            return self.tensors[name]
        except KeyError:
            raise ValueError(f"{self.path}: no tensor {name!r}; the file has {len(self.tensors)} "
                             f"(e.g. {', '.join(list(self.tensors)[:5])})") from None

    def close(self) -> None:
        if getattr(self, "_buf", None) is not None:
            self._buf.release()
            self._buf = None
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:  # a raw() view is still alive; the map closes when it is dropped
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, version={self.version}, {len(self.metadata)} keys, {len(self.tensors)} tensors)"


def read_gguf(path) -> GGUFFile:
    """Open a GGUF file (memory-mapped). ValueError naming the file and the field or tensor on a wrong
    magic, an unsupported version, a truncated header / metadata / tensor info / tensor data, an unknown
    value type or tensor type, a row length off the block, or a misaligned offset."""
    return GGUFFile(path)
