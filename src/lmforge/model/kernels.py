"""The bridge to ``_kernels`` (C): GELU-tanh and a fused cross-entropy on CPU float32.

``gelu_tanh(x)`` equals ``F.gelu(x, approximate="tanh")`` (to ~1e-6) and is
differentiable; ``cross_entropy(logits, targets)`` equals ``F.cross_entropy``
(mean or sum, ``ignore_index``) to ~1e-6 with one read of the logits forward and
one read + one write backward. Both use the C kernels for contiguous CPU float32
tensors and fall back to PyTorch otherwise (CUDA, bf16, no compiler,
``LMFORGE_NO_NATIVE=1``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from .._io import native_extension

_kernels = native_extension("lmforge.model._kernels")

AVAILABLE = _kernels is not None
_POOL: ThreadPoolExecutor | None = None
_MIN_SPLIT = 1 << 20  # elements per extra thread (below, threads cost more than they save)


def _pool(k: int) -> ThreadPoolExecutor:
    """The kernels' worker threads (the C calls release the GIL), grown to ``k`` when needed."""
    global _POOL
    if _POOL is None or _POOL._max_workers < k:
        _POOL = ThreadPoolExecutor(k)
    return _POOL


def _parallel(fn, n: int, *ptrs):
    k = max(1, min(torch.get_num_threads(), n // _MIN_SPLIT))
    if k == 1:
        fn(*ptrs, n)
        return
    step = -(-n // k)
    futs = [_pool(k).submit(fn, *(p + 4 * i * step for p in ptrs), min(step, n - i * step)) for i in range(k)]
    for f in futs:
        f.result()


class _GeluTanh(torch.autograd.Function):
    """Saves the output y and s = sigmoid(2z) (the backward needs no exp); y is the
    tensor the next Linear saves anyway, so this keeps as much memory as saving x."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        s = torch.empty_like(x)
        _parallel(_kernels.gelu_tanh_fwd, x.numel(), x.data_ptr(), y.data_ptr(), s.data_ptr())
        ctx.save_for_backward(y, s)
        return y

    @staticmethod
    def backward(ctx, g):
        y, s = ctx.saved_tensors
        g = g.contiguous()
        out = torch.empty_like(y)
        _parallel(_kernels.gelu_tanh_bwd, y.numel(), y.data_ptr(), s.data_ptr(), g.data_ptr(), out.data_ptr())
        return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if AVAILABLE and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() \
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling():
        return _GeluTanh.apply(x)
    return F.gelu(x, approximate="tanh")


_CE_MIN_SPLIT = 1 << 18  # logits per extra thread
_CE_MIN_SIZE = 1 << 16  # below, PyTorch's call costs less than this bridge's Python


class _CrossEntropy(torch.autograd.Function):
    """Saves the logits (no copy: they are the head's output) and one log-sum-exp per row."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index: int, reduction: str):
        N, V = logits.shape
        lse = torch.empty(N)
        rows = torch.empty(N)
        bad = _rows_parallel(_kernels.ce_fwd, N, V, logits.data_ptr(), targets.data_ptr(), ignore_index,
                             lse.data_ptr(), rows.data_ptr())
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
        _rows_parallel(_kernels.ce_bwd, N, V, logits.data_ptr(), targets.data_ptr(), lse.data_ptr(),
                       ctx.ignore_index, scale, grad.data_ptr(), backward=True)
        return grad, None, None, None


def _rows_parallel(fn, N: int, V: int, x, t, *rest, backward: bool = False) -> int:
    """Split rows over the torch threads (the kernels release the GIL); returns the first bad row + 1 or 0."""
    k = max(1, min(torch.get_num_threads(), N * V // _CE_MIN_SPLIT, N))
    if k == 1:
        return _call_rows(fn, 0, N, V, x, t, rest, backward) or 0
    step = -(-N // k)
    pool = _pool(k)
    futs = [pool.submit(_call_rows, fn, i * step, min(step, N - i * step), V, x, t, rest, backward)
            for i in range(k) if i * step < N]
    for i, f in enumerate(futs):
        bad = f.result()
        if bad:
            return i * step + bad
    return 0


def _call_rows(fn, r0, n, V, x, t, rest, backward):
    x, t = x + 4 * r0 * V, t + 8 * r0
    if backward:  # (lse, ignore, scale, grad)
        lse, ignore, scale, grad = rest
        fn(x, t, lse + 4 * r0, n, V, ignore, scale, grad + 4 * r0 * V)
        return 0
    ignore, lse, rows = rest  # forward: (ignore, lse, rows)
    return fn(x, t, n, V, ignore, lse + 4 * r0, rows + 4 * r0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits (N, V), targets (N,))`` with the fused C kernel where it applies."""
    if AVAILABLE and reduction in ("mean", "sum") and logits.dim() == 2 and logits.device.type == "cpu" \
            and logits.dtype == torch.float32 and targets.dtype == torch.int64 and logits.is_contiguous() \
            and logits.shape[1] > 0 and logits.numel() >= _CE_MIN_SIZE and not torch.jit.is_scripting() \
            and not torch.compiler.is_compiling():
        return _CrossEntropy.apply(logits, targets.contiguous(), int(ignore_index), reduction)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)
