"""The bridge to the C kernels ``_kernels`` and ``_attention``, for CPU float32.

``gelu_tanh(x)`` equals ``F.gelu(x, approximate="tanh")`` (to ~1e-6) and is
differentiable; ``cross_entropy(logits, targets)`` equals ``F.cross_entropy``
(mean or sum, ``ignore_index``) to ~1e-6 with one read of the logits forward and
one read + one write backward; ``causal_attention(q, k, v)`` equals causal
``F.scaled_dot_product_attention`` (to ~1e-6, gradients ~1e-5) at about 2x its
speed on the 2-core CPU of docs/training.md (B16 H6 T256 D64: forward 4.1 vs 9.1 ms,
backward 11-12 vs 22 ms); past T x D ~ 2^18 floats SDPA catches up. They use the C kernels for CPU float32 tensors and fall back to
PyTorch otherwise (CUDA, bf16, no compiler, ``LMFORGE_NO_NATIVE=1``). The C side
splits the work over PyTorch's own OpenMP threads (``_parallel.h``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._io import native_extension

_kernels = native_extension("lmforge.model._kernels")

AVAILABLE = _kernels is not None
_MIN_SPLIT = 1 << 15  # elements per extra thread (below, waking one costs more than it saves)


def _threads(work: int, per_thread: int) -> int:
    """How many of the torch threads a kernel of ``work`` units uses (the C side runs them on
    PyTorch's own OpenMP team: see ``_parallel.h``)."""
    return max(1, min(torch.get_num_threads(), work // per_thread))


class _GeluTanh(torch.autograd.Function):
    """Saves the output y and s = sigmoid(2z) (the backward needs no exp); y is the
    tensor the next Linear saves anyway, so this keeps as much memory as saving x."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        s = torch.empty_like(x)
        n = x.numel()
        _kernels.gelu_tanh_fwd(x.data_ptr(), y.data_ptr(), s.data_ptr(), n, _threads(n, _MIN_SPLIT))
        ctx.save_for_backward(y, s)
        return y

    @staticmethod
    def backward(ctx, g):
        y, s = ctx.saved_tensors
        g = g.contiguous()
        out = torch.empty_like(y)
        n = y.numel()
        _kernels.gelu_tanh_bwd(y.data_ptr(), s.data_ptr(), g.data_ptr(), out.data_ptr(), n, _threads(n, _MIN_SPLIT))
        return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() \
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


_CE_MIN_SPLIT = 1 << 15  # logits per extra thread
_CE_MIN_SIZE = 1 << 16  # below, PyTorch's call costs less than this bridge's Python


class _CrossEntropy(torch.autograd.Function):
    """Saves the logits (no copy: they are the head's output) and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, reduction: str):
        N, V = logits.shape
        lse = torch.empty(N)
        rows = torch.empty(N)
        bad = _kernels.ce_fwd(logits.data_ptr(), targets.data_ptr(), N, V, ignore_index, lse.data_ptr(),
                              rows.data_ptr(), _threads(N * V, _CE_MIN_SPLIT))
        if bad:
            t = int(targets[bad - 1])
            raise IndexError(f"cross_entropy: target {t} at row {bad - 1} is outside [0, {V})")
        count = int((targets != ignore_index).sum()) if reduction == "mean" else 1
        ctx.save_for_backward(logits, targets, lse)
        ctx.ignore_index, ctx.count = ignore_index, count
        total = rows.sum()
        return total / count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        N, V = logits.shape
        grad = torch.empty_like(logits)
        scale = float(g) / ctx.count if ctx.count else float("nan")
        _kernels.ce_bwd(logits.data_ptr(), targets.data_ptr(), lse.data_ptr(), N, V, ctx.ignore_index, scale,
                        grad.data_ptr(), _threads(N * V, _CE_MIN_SPLIT))
        return grad, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits (N, V), targets (N,))`` with the fused C kernel where it applies."""
    if AVAILABLE and reduction in ("mean", "sum") and logits.dim() == 2 and logits.device.type == "cpu" \
            and logits.dtype == torch.float32 and targets.dtype == torch.int64 and logits.is_contiguous() \
            and logits.shape[1] > 0 and logits.numel() >= _CE_MIN_SIZE and not torch.jit.is_scripting() \
            and not torch.compiler.is_compiling():
        return _CrossEntropy.apply(logits, targets.contiguous(), int(ignore_index), reduction)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)


_attention = native_extension("lmforge.model._attention")
ATTENTION = _attention is not None and _attention.available()
_ATTN_MIN_SPLIT = 1 << 18  # multiply-adds per extra thread
# each query tile streams all of one head's K^T (T x D floats): past ~1 MB (this CPU's L2) PyTorch's
# key-blocked flash kernel wins (measured: T 2048 x D 128 even, T 4096 x D 128 SDPA 15% faster)
_ATTN_MAX_TD = 1 << 18


def _attn_threads(BH: int, work: int) -> int:
    return min(BH, _threads(work, _ATTN_MIN_SPLIT))


class _CausalAttention(torch.autograd.Function):
    """Saves q, k, v (views of the qkv projection's output: no copies), the output and one
    log-sum-exp per query; the backward recomputes the scores."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float):
        B, H, T, D = q.shape
        o = torch.empty(B, T, H, D)
        lse = torch.empty(B * H, T)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
        _attention.fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), strides, B, H, T, D, scale, o.data_ptr(),
                       lse.data_ptr(), _attn_threads(B * H, B * H * T * T * D))
        y = o.transpose(1, 2)
        ctx.save_for_backward(q, k, v, y, lse)
        ctx.scale, ctx.strides = scale, strides
        return y

    @staticmethod
    def backward(ctx, g):
        q, k, v, y, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        if g.stride(-1) != 1:
            g = g.contiguous()
        dq, dk, dv = (torch.empty(B, T, H, D) for _ in range(3))
        _attention.bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), ctx.strides, B, H, T, D, ctx.scale, y.data_ptr(),
                       lse.data_ptr(), g.data_ptr(), g.stride()[:3], dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                       _attn_threads(B * H, 2 * B * H * T * T * D))
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` for (B, H, T, D) tensors, with the
    C kernel (``_attention.c``) on CPU float32 when D is a multiple of 16. The result is a
    (B, H, T, D) view of a (B, T, H, D) buffer: ``y.transpose(1, 2).reshape(B, T, H * D)`` is free.
    Long heads (T x D above 2^18) go to SDPA, whose key blocks stay in cache."""
    if ATTENTION and q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == torch.float32 \
            and q.dim() == 4 and q.shape == k.shape == v.shape and q.shape[-1] % 16 == 0 and q.shape[2] > 0 \
            and q.shape[2] * q.shape[3] <= _ATTN_MAX_TD \
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and not torch.jit.is_scripting() \
            and not torch.compiler.is_compiling():
        return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
