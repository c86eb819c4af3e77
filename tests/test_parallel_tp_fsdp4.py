"""TP + FSDP2 on a real (2, 2) device mesh (4 gloo ranks, 1 thread each) equals one process.

Rows of the mesh are data-parallel (each reads half the global batch), columns tensor-parallel; the
checks are ``test_parallel_tp_fsdp``'s (losses, gradient norms, every final parameter, 1e-5).
"""
from __future__ import annotations

import pytest

from parallel_harness import run_ranks

CASES_4 = {
    "2x2_adamw_sp": dict(optimizer="adamw", grad_clip=0.3, cfg=dict(tp_size=2, sequence_parallel=True)),
    "2x2_muon": dict(optimizer="muon", grad_clip=0.3, cfg=dict(tp_size=2)),
}

pytestmark = pytest.mark.slow  # 4 ranks; test_parallel_tp_fsdp.py's 1x2 and 2x1 meshes stay in CI


def test_tp_fsdp_2x2_mesh_on_four_ranks():
    from test_parallel_tp_fsdp import _check, _check_bytes

    got = run_ranks(4, "test_parallel_tp_fsdp:_cases", timeout=300, names=list(CASES_4))
    for name, kw in CASES_4.items():
        _check(name, kw, got[0][name], 4)
        _check_bytes(kw, got, name)
        assert all(g[name]["losses"] == got[0][name]["losses"] for g in got)
