"""Does `lmforge data prepare` stream? Peak memory at two corpus sizes.

Generates JSONL corpora of about --small and --large MB on disk (5 KB documents of
words drawn with the built-in corpus's word frequencies, lines of 8-16 words,
so they pass the quality filters and are not duplicates), runs
`lmforge data prepare` on each in a subprocess, and samples the resident memory
of the whole process tree (main process + workers) every 50 ms.
Reports peak RSS (sum over the tree, and the largest single process) and MB/s.

Before both, one untimed `prepare` on a 2 MB corpus, so the first measured process
does not pay the cold start alone.

Run: python benchmarks/data_scale.py [--small 150 --large 450] [--quick]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def generate(path: Path, mb: int, seed: int = 0) -> int:
    from lmforge.data import corpus_files

    counts = collections.Counter()
    for p in corpus_files():
        counts.update(re.findall(r"[A-Za-z']+", p.read_text()))
    words = np.array(list(counts))
    prob = np.array([counts[w] for w in words], dtype=np.float64)
    prob /= prob.sum()
    rng = np.random.default_rng(seed)
    target = mb * 1_000_000
    written = 0
    n = 0
    with open(path, "w") as f:
        while written < target:
            ws = words[rng.choice(len(words), size=900, p=prob)].tolist()
            cuts = np.cumsum(rng.integers(8, 17, size=100))
            lines, last = [], 0
            for c in cuts:
                if c >= len(ws):
                    break
                lines.append(" ".join(ws[last:c]) + ".")
                last = c
            text = "\n".join(lines)
            line = json.dumps({"id": f"gen-{n}", "text": text}) + "\n"
            f.write(line)
            written += len(line)
            n += 1
    return n


def tree_rss(pid: int) -> tuple[int, int, int]:
    """(sum over the tree, the largest process, ``pid`` itself) of VmRSS in bytes."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{d}/status") as f:
                m = re.search(r"VmRSS:\s+(\d+) kB", f.read())
            children[ppid].append(int(d))
            rss[int(d)] = int(m.group(1)) * 1024 if m else 0
        except (OSError, IndexError, ValueError):
            continue
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo.extend(children.get(p, []))
    vals = [rss.get(p, 0) for p in seen]
    return sum(vals), max(vals) if vals else 0, rss.get(pid, 0)


def run_prepare(inp: Path, tok: Path, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lmforge.cli", "data", "prepare", "--input", str(inp), "--tokenizer", str(tok),
           "--out", str(out), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak_sum = peak_max = peak_main = 0
    while proc.poll() is None:
        s, m, mine = tree_rss(proc.pid)
        peak_sum, peak_max, peak_main = max(peak_sum, s), max(peak_max, m), max(peak_main, mine)
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode})")
    dt = time.perf_counter() - t0
    report = json.loads((out / "report.json").read_text())
    return {"seconds": dt, "peak_rss_sum_mb": peak_sum / 1e6, "peak_rss_max_mb": peak_max / 1e6,
            "peak_rss_main_mb": peak_main / 1e6,
            "mb_in": report["bytes_in"] / 1e6, "documents": report["documents_in"],
            "mb_per_s": report["bytes_in"] / 1e6 / dt, "stages": report["seconds"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=150, help="MB")
    ap.add_argument("--large", type=int, default=450, help="MB")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --small 5 --large 15 (figures meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.small, a.large = 5, 15
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenizer", "train", "--vocab-size", "4096",
                        "--out", str(tmp / "tok"), "-q"], check=True, capture_output=True)
        generate(tmp / "warmup.jsonl", 2)
        run_prepare(tmp / "warmup.jsonl", tmp / "tok", tmp / "out-warmup")  # untimed: the cold start
        subprocess.run(["rm", "-rf", str(tmp / "out-warmup"), str(tmp / "warmup.jsonl")])
        results = {}
        for label, mb in (("small", a.small), ("large", a.large)):
            path = tmp / f"{label}.jsonl"
            t0 = time.perf_counter()
            n = generate(path, mb)
            print(f"generated {path.stat().st_size / 1e6:.0f} MB, {n} documents in {time.perf_counter() - t0:.0f}s",
                  file=sys.stderr)
            results[label] = run_prepare(path, tmp / "tok", tmp / f"out-{label}")
            path.unlink()
            subprocess.run(["rm", "-rf", str(tmp / f"out-{label}")])
            r = results[label]
            print(f"{label}: {r['mb_in']:.0f} MB, {r['documents']} docs: peak RSS {r['peak_rss_sum_mb']:.0f} MB "
                  f"(tree sum), {r['peak_rss_max_mb']:.0f} MB (largest process), {r['peak_rss_main_mb']:.0f} MB (main); "
                  f"{r['mb_per_s']:.2f} MB/s; "
                  f"stages {r['stages']}")
    s, l = results["small"], results["large"]
    growth = l["peak_rss_sum_mb"] / s["peak_rss_sum_mb"]
    size = l["mb_in"] / s["mb_in"]
    print(f"\ninput grew {size:.1f}x, peak memory {growth:.2f}x")
    rows = [{"name": f"peak RSS (process tree) at {l['mb_in']:.0f} MB ÷ at {s['mb_in']:.0f} MB",
             "lmforge": round(l["peak_rss_sum_mb"], 1), "reference": round(s["peak_rss_sum_mb"], 1), "unit": "MB",
             "ratio": round(growth, 3), "goal": 1.25, "meets": growth <= 1.25},
            {"name": "prepare throughput at the large size (all cores)", "lmforge": round(l["mb_per_s"], 3),
             "reference": None, "unit": "MB/s", "ratio": None, "goal": None, "meets": None}]
    print(json.dumps({"benchmark": "data_scale", "rows": rows}))


if __name__ == "__main__":
    main()
