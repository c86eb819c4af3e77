"""The bridge to ``_kernels`` (C): GELU with the tanh approximation on CPU float32.

``gelu_tanh(x)`` equals ``F.gelu(x, approximate="tanh")`` (to ~1e-6) and is
differentiable; it uses the C kernel, split over the torch threads, for
contiguous CPU float32 tensors and falls back to PyTorch otherwise (CUDA,
bf16, no compiler, ``LMFORGE_NO_NATIVE=1``).
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


def _parallel(fn, n: int, *ptrs):
    global _POOL
    k = max(1, min(torch.get_num_threads(), n // _MIN_SPLIT))
    if k == 1:
        fn(*ptrs, n)
        return
    if _POOL is None or _POOL._max_workers < k:
        _POOL = ThreadPoolExecutor(k)
    step = -(-n // k)
    futs = [_POOL.submit(fn, *(p + 4 * i * step for p in ptrs), min(step, n - i * step)) for i in range(k)]
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
