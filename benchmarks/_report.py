"""Shared by the benchmarks: one row format, the table and the closing JSON line."""
from __future__ import annotations

import json


def row(name, ours, ref, unit, goal=None, higher_is_better=True, ratio=None) -> dict:
    """A result row; ``ratio`` defaults to ours / ref, ``goal`` is on the ratio."""
    if ratio is None and ref not in (None, 0):
        ratio = ours / ref
    meets = None
    if goal is not None and ratio is not None:
        meets = ratio >= goal if higher_is_better else ratio <= goal
    return {"name": name, "lmforge": None if ours is None else round(ours, 4),
            "reference": None if ref is None else round(ref, 4), "unit": unit,
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "meets": meets}


def report(benchmark: str, rows: list[dict], note: str = "") -> None:
    """Print the table, then the one JSON line every benchmark ends with."""
    w = max(len(r["name"]) for r in rows)
    print(f"\n{'row':<{w}} {'lmforge':>10} {'reference':>10} {'unit':>10} {'ratio':>7} {'goal':>6} meets")
    for r in rows:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        meets = "-" if r["meets"] is None else ("yes" if r["meets"] else "NO")
        print(f"{r['name']:<{w}} {fmt(r['lmforge']):>10} {fmt(r['reference']):>10} {r['unit']:>10} "
              f"{fmt(r['ratio']):>7} {fmt(r['goal']):>6} {meets}")
    if note:
        print(note)
    print(json.dumps({"benchmark": benchmark, "rows": rows}))
