"""Number formats for weights: round-to-nearest integer codes (symmetric or zero-point; per tensor, per
output channel or per group of input columns), 4-bit nibble packing, and FP8 (E4M3 / E5M2) with a scale.

Knows tensors only: no modules, no model, no file. ``quant.linear`` stores what these functions produce.

Integer error arithmetic (one group of weights ``w``, ``b`` bits):

- symmetric, 8 bits: codes ``q`` in ``[qmin, qmax] = [-128, 127]``; step ``s = absmax / 127.5``
  (``absmax / ((qmax - qmin) / 2)``, torchao's ``MappingType.SYMMETRIC`` convention, so 8-bit per channel is
  torchao's ``Int8WeightOnlyConfig`` exactly: same scale, same codes); ``q = clamp(round(w * (1 / s)), qmin,
  qmax)`` with round half to even; ``w ~ q * s``. ``w / s`` lies in ``[-(qmax + 0.5), qmax + 0.5]``, so rounding
  and the clamp each cost at most half a step: ``|w - q s| <= s / 2``.
- symmetric, fewer bits (2..7): llama.cpp's Q4_0 rule. The group's largest-magnitude weight ``v`` (with its
  sign; the first one on a tie) lands exactly on ``qmin``: ``s = v / qmin`` (negative when ``v`` is
  positive), ``q = clamp(round(w / s), qmin, qmax)``. At 4 bits the step is ``absmax / 8``, finer than
  ``absmax / 7.5``, and the largest weight is exact. (torchao's convention at 4 bits maps ``+absmax`` to
  7.5 and rounds it down to 7: every group's largest positive weight shrinks by 1/15, a bias on exactly the
  weights that matter most; on the demo model int4 g32 lost 0.019 bits/byte that way against per-channel's
  0.009.) Weights on the other side of zero beyond ``(qmax + 0.5) |s|`` clip to ``qmax``: the error bound
  is ``|s| / 2`` inside that range and ``|s|`` at worst (the other side's weight as large as ``v``).
  lmforge's int4 g32 symmetric codes are then Q4_0's codes (ggml rounds ties up, lmforge to even).
- asymmetric (zero point): codes ``u`` in ``[0, 2**b - 1]``; ``s = (max(w, 0) - min(w, 0)) / (2**b - 1)``, zero
  point ``z = clamp(-round(min(w, 0) / s), 0, 2**b - 1)`` (an integer, so 0.0 is represented exactly);
  ``u = clamp(round(w / s) + z, 0, 2**b - 1)``; ``w ~ (u - z) * s``; again ``|w - (u - z) s| <= s / 2``.
  The range includes 0, which is torchao's convention as well (``MappingType.ASYMMETRIC``).
- the step is clamped from below by float32 eps (``torch.finfo(torch.float32).eps``), so an all-zero group
  gets codes 0 and a tiny positive scale rather than a division by zero.

Per-element mean squared error of uniform rounding is about ``s**2 / 12``; halving the group (more scales)
shrinks ``s`` where the weights are uneven, at ``32 / group_size`` extra bits per weight for an fp32 scale.

FP8: ``scale = absmax / fmax`` (fmax 448 for E4M3, 57344 for E5M2), ``w8 = cast(clamp(w / scale, -fmax, fmax))``
with torch's float8 casts (round to nearest, ties to even; subnormals kept); the clamp saturates instead of
letting torch turn an out-of-range value into NaN (E4M3) or inf (E5M2). Relative error per element is at most
2**-4 (E4M3, 3 mantissa bits) or 2**-3 (E5M2) above the smallest normal, absolute below it.
"""
from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "channel", "group")
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
EPS = torch.finfo(torch.float32).eps


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """The codes' inclusive range: q in [-2**(b-1), 2**(b-1)-1] (sym) or u in [0, 2**b-1] (asym)."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"quantize: bits: got {bits!r}, expected an integer in 2..8")
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if sym else (0, (1 << bits) - 1)


def n_groups(in_features: int, granularity: str, group_size: int, name: str = "weight",
             out_features: int | None = None) -> int:
    """Scale columns per row: 1 (tensor, channel) or in_features / group_size (group). A group size that does
    not divide in_features is a ValueError naming ``name`` and its shape."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"quantize: granularity: got {granularity!r}, expected one of {', '.join(GRANULARITIES)}")
    if granularity != "group":
        return 1
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"quantize: group_size: got {group_size!r}, expected a positive integer")
    if in_features % group_size:
        shape = f"({out_features}, {in_features})" if out_features is not None else f"(.., {in_features})"
        raise ValueError(
            f"quantize: {name}: weight shape {shape}: in_features {in_features} is not a multiple of "
            f"group_size {group_size}; choose a group size that divides {in_features}"
        )
    return in_features // group_size


def _grouped(w: torch.Tensor, granularity: str, group_size: int, name: str) -> torch.Tensor:
    """(O, I) -> (O, G, I/G) for channel/group, (1, 1, O*I) for tensor."""
    O, I = w.shape
    G = n_groups(I, granularity, group_size, name, O)
    if granularity == "tensor":
        return w.reshape(1, 1, O * I)
    return w.reshape(O, G, I // G)


def rtn_quantize(w: torch.Tensor, bits: int, granularity: str = "channel", group_size: int = 128,
                 sym: bool = True, name: str = "weight"):
    """Round-to-nearest codes for a weight (O, I): returns ``(codes, scales, zeros)``; codes int32 (O, I) in q
    units (sym) or u units (asym), scales fp32 (O, G) (``(1, 1)`` for tensor), zeros fp32 (O, G) integer-valued
    code units (asym) or None. See the module docstring for the arithmetic."""
    if w.dim() != 2:
        raise ValueError(f"quantize: {name}: expected a 2-d weight (out, in), got shape {tuple(w.shape)}")
    qmin, qmax = code_range(bits, sym)
    w = w.detach().float()
    O, I = w.shape
    g = _grouped(w, granularity, group_size, name)  # (R, G, n)
    lo = torch.clamp(g.amin(dim=-1), max=0.0)
    hi = torch.clamp(g.amax(dim=-1), min=0.0)
    if sym and bits == 8:  # torchao's convention (see the module docstring)
        s = torch.clamp(torch.maximum(-lo, hi) / (float(qmax - qmin) / 2), min=EPS)
        q = torch.clamp(torch.round(g * (1.0 / s).unsqueeze(-1)), qmin, qmax)
        z = None
    elif sym:  # Q4_0's rule: the largest-magnitude weight, with its sign, on qmin
        v = g.gather(-1, g.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        s = v / float(qmin)
        s = torch.where(s.abs() < EPS, torch.full_like(s, EPS), s)
        q = torch.clamp(torch.round(g * (1.0 / s).unsqueeze(-1)), qmin, qmax)
        z = None
    else:
        s = torch.clamp((hi - lo) / float(qmax - qmin), min=EPS)
        z = torch.clamp(qmin - torch.round(lo / s), qmin, qmax)
        q = torch.clamp(torch.round(g * (1.0 / s).unsqueeze(-1)) + z.unsqueeze(-1), qmin, qmax)
    codes = q.reshape(O, I).to(torch.int32)
    return codes, s.contiguous(), (z.contiguous() if z is not None else None)


def expand_groups(t: torch.Tensor, O: int, I: int) -> torch.Tensor:
    """Per-group values (O, G) or (1, 1) broadcast to (O, I) (each group covers I / G adjacent columns)."""
    if t.shape == (1, 1):
        return t.expand(O, I)
    if t.dim() != 2 or t.shape[0] != O or I % t.shape[1]:
        raise ValueError(f"quantize: scales shape {tuple(t.shape)} does not fit a ({O}, {I}) weight")
    return t.repeat_interleave(I // t.shape[1], dim=1)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 (O, I) weights from codes (O, I) (q units when ``zeros`` is None, else u units), scales (O, G) or
    (1, 1) and zeros like scales: ``q * s`` or ``(u - z) * s``."""
    O, I = codes.shape
    s = scales.float()
    if s.shape == (1, 1) or (s.dim() == 2 and s.shape[0] == O and s.shape[1] > 0 and I % s.shape[1] == 0):
        R, G = (1, 1) if s.shape == (1, 1) else (O, s.shape[1])
        c = codes.float().reshape(R, G, -1)  # each group's columns side by side: broadcast, no repeat
        if zeros is not None:
            c = c - zeros.float().reshape(R, G, 1)
        return (c * s.reshape(R, G, 1)).reshape(O, I)
    raise ValueError(f"quantize: scales shape {tuple(scales.shape)} does not fit a ({O}, {I}) weight")


def pack_nibbles(u: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (O, I) -> uint8 (O, ceil(I/2)): column 2j in the low nibble, 2j+1 in the high nibble
    (an odd last column pairs with a zero high nibble)."""
    if u.dim() != 2:
        raise ValueError(f"pack_nibbles: expected (O, I) codes, got shape {tuple(u.shape)}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError(f"pack_nibbles: codes must be in 0..15, got {int(u.min())}..{int(u.max())}")
    u = u.to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.zeros(u.shape[0], 1, dtype=torch.uint8, device=u.device)], dim=1)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (O, ceil(I/2)) -> uint8 codes (O, I); inverse of ``pack_nibbles``."""
    if p.dim() != 2 or p.shape[1] != (in_features + 1) // 2:
        raise ValueError(f"unpack_nibbles: packed shape {tuple(p.shape)} does not hold {in_features} columns")
    out = torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return out[:, :in_features].contiguous()


def fp8_dtype(fmt: str) -> torch.dtype:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"quantize: fp8_format: got {fmt!r}, expected one of {', '.join(FP8_DTYPES)}")
    return FP8_DTYPES[fmt]


def fp8_max(fmt: str) -> float:
    return float(torch.finfo(fp8_dtype(fmt)).max)


def fp8_cast(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Saturating cast of fp32 values already divided by their scale: clamp to +-fmax, then torch's cast."""
    m = fp8_max(fmt)
    return torch.clamp(x.float(), -m, m).to(fp8_dtype(fmt))


def fp8_quantize(w: torch.Tensor, fmt: str = "e4m3", scale_kind: str = "tensor"):
    """``(w8, scale)``: w8 float8 (O, I), scale fp32 (1, 1) (tensor) or (O, 1) (channel) with
    ``scale = absmax / fmax`` (clamped below by eps); ``w ~ w8.float() * scale``."""
    if scale_kind not in ("tensor", "channel"):
        raise ValueError(f"quantize: fp8_scale: got {scale_kind!r}, expected tensor or channel")
    if w.dim() != 2:
        raise ValueError(f"quantize: fp8: expected a 2-d weight (out, in), got shape {tuple(w.shape)}")
    w = w.detach().float()
    m = fp8_max(fmt)
    amax = w.abs().amax().reshape(1, 1) if scale_kind == "tensor" else w.abs().amax(dim=1, keepdim=True)
    scale = torch.clamp(amax / m, min=EPS)
    return fp8_cast(w / scale, fmt), scale.contiguous()


def fp8_fake_quant(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Dynamic per-tensor fp8 round trip of activations in fp32: scale = absmax / fmax, cast, back."""
    scale = torch.clamp(x.detach().abs().amax().float() / fp8_max(fmt), min=EPS)
    return fp8_cast(x / scale, fmt).float() * scale
