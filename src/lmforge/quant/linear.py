"""Quantized linear layers: the ``QuantLinear`` protocol, the format registry, and the core formats
``IntLinear`` ("int": RTN/GPTQ/AWQ integer codes, 2..8 bits, packed two per byte at <= 4 bits) and
``FP8Linear`` ("fp8": float8_e4m3fn / float8_e5m2 weights with a scale, optional fp8 activations).

Knows storage layouts and how to run them in fp32 on any device (simulated: codes are dequantized, then an
fp32 ``F.linear``). Knows nothing about how codes are chosen (``quant.formats``, the method modules), about
the model, or about files (``quant.checkpoint``). Other formats (``llm_int8``, ``w8a8``) register from their
own modules with ``@register_format``; ``format_class`` imports them on demand.

Every module keeps all of its storage in registered buffers (the state dict carries them), has
``in_features``, ``out_features``, ``bias`` (fp32 Parameter or None), ``dequantize()`` (the effective fp32
weight in the original column order), ``qconfig()`` (JSON-able, ``"format"`` plus what ``empty()`` needs),
``empty(q, in_features, out_features, bias)`` (zero buffers of the right shapes, for loading) and
``weight_bytes()``.

IntLinear storage (``bits``, ``sym``):
- 8 bits symmetric: ``qweight`` int8 (O, I), the signed codes q; ``w = q * s``.
- <= 4 bits: ``qweight`` uint8 (O, ceil(I/2)), two codes per byte, column 2j in the low nibble, 2j+1 in the
  high nibble; stored code ``u = q - qmin`` (sym, qmin = -2**(bits-1)) or ``u`` (asym).
- otherwise (5..7 bits, 8-bit asym): ``qweight`` uint8 (O, I) codes u (``u = q - qmin`` when sym).
- ``scales`` fp32 (O, G) (G = 1 per channel, I / group_size per group; (1, 1) per tensor); ``zeros`` fp32 like
  scales (asym only; else None, absent from the state dict): ``w = (u - zeros) * scales``.
- optional ``in_perm`` int64 (I,): stored column j holds original column ``in_perm[j]`` (GPTQ act-order keeps
  its groups contiguous); forward is ``x[..., in_perm] @ W_stored^T``. Absent: the identity.
Rounding of symmetric RTN (``quant.formats.rtn_quantize``): ``s = absmax / (2**(b-1) - 0.5)``,
``q = clamp(round_half_even(w * (1 / s)), qmin, qmax)``: torchao's ``Int8WeightOnlyConfig`` at 8 bits per
channel (same scales, same codes, so the same outputs).
"""
from __future__ import annotations

import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import formats as fm

FORMATS: dict[str, type] = {}
_FORMAT_MODULES = {"llm_int8": "lmforge.quant.llm_int8", "w8a8": "lmforge.quant.smoothquant"}


def register_format(name: str):
    """Class decorator: ``FORMATS[name] = cls`` and ``cls.format = name``."""

    def deco(cls):
        FORMATS[name] = cls
        cls.format = name
        return cls

    return deco


def format_class(name: str) -> type:
    """The QuantLinear subclass registered as ``name`` (importing a non-core format's module on demand)."""
    if name not in FORMATS and name in _FORMAT_MODULES:
        importlib.import_module(_FORMAT_MODULES[name])
    if name not in FORMATS:
        known = sorted(set(FORMATS) | set(_FORMAT_MODULES))
        raise ValueError(f"quantized linear format: got {name!r}, expected one of {', '.join(known)}")
    return FORMATS[name]


class QuantLinear(nn.Module):
    """Base class of every quantized linear (see the module docstring for the protocol)."""

    format = "?"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def qconfig(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def empty(cls, q: dict, in_features: int, out_features: int, bias: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False) if b is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize(), self.bias)

    def extra_repr(self) -> str:
        q = {k: v for k, v in self.qconfig().items() if k != "format"}
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {q}"


def _need(q: dict, key: str, fmt: str):
    if key not in q:
        raise ValueError(f"quantized linear {fmt!r}: field {key!r} missing from {sorted(q)}")
    return q[key]


@register_format("int")
class IntLinear(QuantLinear):
    """Integer codes with per-tensor / per-channel / per-group scales (and zero points when asymmetric)."""

    def __init__(self, in_features, out_features, bits, granularity, group_size, sym, bias=None):
        super().__init__(in_features, out_features, bias)
        fm.code_range(bits, sym)
        G = fm.n_groups(in_features, granularity, group_size, "IntLinear", out_features)
        self.bits = int(bits)
        self.granularity = granularity
        self.group_size = int(group_size) if granularity == "group" else self.in_features
        self.sym = bool(sym)
        O, I = self.out_features, self.in_features
        if self.bits == 8 and self.sym:
            qw = torch.zeros(O, I, dtype=torch.int8)
        elif self.bits <= 4:
            qw = torch.zeros(O, (I + 1) // 2, dtype=torch.uint8)
        else:
            qw = torch.zeros(O, I, dtype=torch.uint8)
        sshape = (1, 1) if granularity == "tensor" else (O, G)
        self.register_buffer("qweight", qw)
        self.register_buffer("scales", torch.zeros(sshape))
        self.register_buffer("zeros", None if self.sym else torch.zeros(sshape))
        self.register_buffer("in_perm", None)

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes, scales, zeros, bits, granularity, group_size, sym, bias=None, in_perm=None):
        """A module from already computed codes (O, I) in stored column order: q units (sym) or u units (asym),
        ``scales`` (O, G) or (1, 1), ``zeros`` like scales (asym) or None, ``in_perm`` (I,) or None."""
        O, I = codes.shape
        m = cls(I, O, bits, granularity, group_size, sym, bias=bias)
        qmin, qmax = fm.code_range(bits, sym)
        codes = codes.detach().to(torch.int64)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"IntLinear.from_codes: codes {int(codes.min())}..{int(codes.max())} outside "
                             f"{qmin}..{qmax} for bits={bits} sym={sym}")
        if tuple(scales.shape) != tuple(m.scales.shape):
            raise ValueError(f"IntLinear.from_codes: scales shape {tuple(scales.shape)}, expected {tuple(m.scales.shape)}")
        if sym != (zeros is None):
            raise ValueError(f"IntLinear.from_codes: zeros must be {'None' if sym else 'given'} when sym={sym}")
        if zeros is not None and tuple(zeros.shape) != tuple(m.scales.shape):
            raise ValueError(f"IntLinear.from_codes: zeros shape {tuple(zeros.shape)}, expected {tuple(m.scales.shape)}")
        if m.bits == 8 and m.sym:
            m.qweight.copy_(codes.to(torch.int8))
        else:
            u = codes - qmin if m.sym else codes
            m.qweight.copy_(fm.pack_nibbles(u) if m.bits <= 4 else u.to(torch.uint8))
        m.scales.copy_(scales.detach().float())
        if zeros is not None:
            m.zeros.copy_(zeros.detach().float())
        if in_perm is not None:
            in_perm = torch.as_tensor(in_perm, dtype=torch.int64).detach().clone()
            if tuple(in_perm.shape) != (I,) or not torch.equal(torch.sort(in_perm).values, torch.arange(I)):
                raise ValueError(f"IntLinear.from_codes: in_perm must be a permutation of range({I})")
            m.in_perm = in_perm
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits=8, granularity="channel", group_size=128, sym=True, name="weight"):
        """Round-to-nearest quantization of an ``nn.Linear``."""
        codes, s, z = fm.rtn_quantize(linear.weight, bits, granularity, group_size, sym, name=name)
        return cls.from_codes(codes, s, z, bits, granularity, group_size, sym, bias=linear.bias)

    @classmethod
    def empty(cls, q, in_features, out_features, bias):
        fmt = "int"
        m = cls(in_features, out_features, int(_need(q, "bits", fmt)), _need(q, "granularity", fmt),
                int(_need(q, "group_size", fmt)), bool(_need(q, "sym", fmt)),
                bias=torch.zeros(out_features) if bias else None)
        if q.get("in_perm", False):
            m.in_perm = torch.arange(in_features, dtype=torch.int64)
        return m

    def qconfig(self) -> dict:
        return {"format": "int", "bits": self.bits, "granularity": self.granularity, "group_size": self.group_size,
                "sym": self.sym, "in_perm": self.in_perm is not None}

    # --- reading ----------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """int32 (O, I) codes in stored column order: q (sym) or u (asym)."""
        qmin, _ = fm.code_range(self.bits, self.sym)
        if self.bits == 8 and self.sym:
            return self.qweight.to(torch.int32)
        u = fm.unpack_nibbles(self.qweight, self.in_features) if self.bits <= 4 else self.qweight
        u = u.to(torch.int32)
        return u + qmin if self.sym else u

    def dequantize_stored(self) -> torch.Tensor:
        """fp32 (O, I) weight in stored column order (``in_perm`` not undone)."""
        return fm.dequantize_codes(self.codes(), self.scales, self.zeros)

    def dequantize(self) -> torch.Tensor:
        w = self.dequantize_stored()
        if self.in_perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.in_perm] = w
        return out

    def forward(self, x):
        x = x.float()
        if self.in_perm is not None:
            x = x.index_select(-1, self.in_perm)
        return F.linear(x, self.dequantize_stored(), self.bias)


@register_format("fp8")
class FP8Linear(QuantLinear):
    """FP8 weights (E4M3 or E5M2) with an fp32 per-tensor (1, 1) or per-channel (O, 1) scale; with
    ``activations`` the input is also rounded to fp8 with a dynamic per-tensor scale (simulated in fp32)."""

    def __init__(self, in_features, out_features, fp8_format="e4m3", fp8_scale="tensor", activations=False, bias=None):
        super().__init__(in_features, out_features, bias)
        dt = fm.fp8_dtype(fp8_format)
        if fp8_scale not in ("tensor", "channel"):
            raise ValueError(f"quantize: fp8_scale: got {fp8_scale!r}, expected tensor or channel")
        self.fp8_format, self.fp8_scale, self.activations = fp8_format, fp8_scale, bool(activations)
        self.register_buffer("weight", torch.zeros(self.out_features, self.in_features, dtype=dt))
        self.register_buffer("scale", torch.zeros((1, 1) if fp8_scale == "tensor" else (self.out_features, 1)))

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8_format="e4m3", fp8_scale="tensor", activations=False):
        w8, s = fm.fp8_quantize(linear.weight, fp8_format, fp8_scale)
        m = cls(linear.in_features, linear.out_features, fp8_format, fp8_scale, activations, bias=linear.bias)
        m.weight.copy_(w8)
        m.scale.copy_(s)
        return m

    @classmethod
    def empty(cls, q, in_features, out_features, bias):
        fmt = "fp8"
        return cls(in_features, out_features, _need(q, "fp8_format", fmt), _need(q, "fp8_scale", fmt),
                   bool(_need(q, "activations", fmt)), bias=torch.zeros(out_features) if bias else None)

    def qconfig(self) -> dict:
        return {"format": "fp8", "fp8_format": self.fp8_format, "fp8_scale": self.fp8_scale,
                "activations": self.activations}

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scale

    def forward(self, x):
        x = x.float()
        if self.activations:
            x = fm.fp8_fake_quant(x, self.fp8_format)
        return F.linear(x, self.dequantize(), self.bias)
