"""Tensor parallel's bad settings: the same ValueError, naming the setting, on every rank, and no hang.

One 2-rank launch tries each setting in turn (``_bad_cases``) and returns each rank's error message.
"""
from __future__ import annotations

from parallel_harness import mini_train, run_ranks
from test_parallel_tp import MOE

BAD = {
    "heads": (dict(model=dict(n_head=3, n_kv_head=3, d_model=48), parallel="tp"), ("n_head=3", "tp_size=2")),
    "kv_heads": (dict(model=dict(n_head=4, n_kv_head=1), parallel="tp"), ("n_kv_head=1", "tp_size=2")),
    "d_ff": (dict(model=dict(d_ff=63), parallel="tp"), ("d_ff=63", "tp_size=2")),
    "tp_size_not_world": (dict(cfg=dict(tp_size=1), parallel="tp"), ("tp_size=1", "world size is 2")),
    "tpfsdp_needs_tp_size": (dict(parallel="tp+fsdp"), ("needs tp_size",)),
    "tpfsdp_tp_size_divides": (dict(cfg=dict(tp_size=3), parallel="tp+fsdp"), ("tp_size=3", "world size 2")),
    "sp_seq_len": (dict(T=15, cfg=dict(sequence_parallel=True), parallel="tp"),
                   ("sequence_parallel", "15", "tp_size=2")),
    "sp_moe": (dict(model=MOE, cfg=dict(sequence_parallel=True), parallel="tp"), ("sequence_parallel", "MoE")),
}


def _bad_cases() -> dict:
    out = {}
    for name, (kw, _) in BAD.items():
        kw = dict(kw)
        try:
            mini_train(kw.pop("parallel"), steps=1, accum=1, **kw)
            out[name] = None
        except ValueError as e:
            out[name] = str(e)
    return out


def test_bad_settings_raise_on_every_rank():
    got = run_ranks(2, "test_parallel_tp_bad:_bad_cases", timeout=120)
    for name, (_, words) in BAD.items():
        for r, res in enumerate(got):
            assert res[name] is not None, f"{name}: rank {r} raised nothing"
            for w in words:
                assert w in res[name], f"{name}: rank {r}: {res[name]!r} does not name {w!r}"
