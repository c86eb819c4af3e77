"""Activation recompute: peak memory and step time per policy and sequence length.

Each (policy, sequence length) runs in its own process (so peaks do not mix):
a 6 x 384 GPT (GELU, learned positions), batch 8, AdamW, fp32. Reported:

* activation memory: bytes held between the end of the forward and the backward
  (CPU: growth of the resident set across the forward, with glibc told to give
  large blocks back at once; CUDA: growth of ``memory_allocated``),
* peak memory of the step above the model and optimizer state
  (CPU: peak RSS; CUDA: ``max_memory_allocated``),
* median step time.

No reference library: the baseline is the same model without recompute
(policy ``none``), and the ratios are against it. Each process discards its first
step (warm-up; the optimizer state appears then); one untimed process runs before
all of them (so the first measured one does not pay the cold start alone), and the
order of the policies alternates from one sequence length to the next.

Run: python benchmarks/recompute.py [--seq 128 256 512] [--steps 4] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

POLICIES = ["none", "every:2", "selective", "full"]


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(policy: str, T: int, steps: int) -> dict:
    import resource

    import torch

    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizers
    from lmforge.train.recompute import apply_recompute

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(vocab_size=4096, n_layer=6, n_head=6, d_model=384, max_seq_len=max(T, 64))
    m = Transformer(cfg).to(dev).train()
    apply_recompute(m, policy)
    (opt,) = build_optimizers(m, "adamw")
    x = torch.randint(0, 4096, (8, T), device=dev)

    def mem():
        return torch.cuda.memory_allocated() if dev.type == "cuda" else rss()

    times, act = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        before = mem()
        _, loss = m(x, x)
        after = mem()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:  # warm-up: optimizer state now exists; measure peaks from here
            base = mem()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            continue
        times.append(time.perf_counter() - t0)
        act.append(after - before)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"policy": policy, "seq_len": T, "step_s": statistics.median(times),
            "activation_mb": statistics.median(act) / 1e6, "peak_above_state_mb": max(peak, 0) / 1e6,
            "device": dev.type}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="a smoke run: --seq 64 --steps 2 (figures meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.seq, a.steps = [64], 2
    if a.child:
        print(json.dumps(child(a.child[0], int(a.child[1]), a.steps)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results = []
    # the cold start (imports from a cold page cache) in an untimed process of its own
    subprocess.run([sys.executable, __file__, "--child", "none", str(min(a.seq)), "--steps", "1"],
                   capture_output=True, text=True, env=env, check=True)
    for n, T in enumerate(a.seq):
        for pol in (POLICIES if n % 2 == 0 else POLICIES[::-1]):
            r = subprocess.run([sys.executable, __file__, "--child", pol, str(T), "--steps", str(a.steps)],
                               capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(r.stderr)
            results.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = results[-1]
            print(f"T={T:<5} {pol:<10} step {x['step_s'] * 1e3:8.0f} ms   activations {x['activation_mb']:8.1f} MB"
                  f"   peak above state {x['peak_above_state_mb']:8.1f} MB", file=sys.stderr)
    rows = []
    print(f"\n{'seq':>5} {'policy':<10} {'step ms':>9} {'time x':>7} {'activ. MB':>10} {'memory x':>9} "
          f"{'peak MB':>9}")
    for T in a.seq:
        base = next(r for r in results if r["seq_len"] == T and r["policy"] == "none")
        for r in (r for r in results if r["seq_len"] == T):
            tx = r["step_s"] / base["step_s"]
            mx = r["activation_mb"] / base["activation_mb"] if base["activation_mb"] else float("nan")
            print(f"{T:>5} {r['policy']:<10} {r['step_s'] * 1e3:>9.0f} {tx:>7.2f} {r['activation_mb']:>10.1f} "
                  f"{mx:>9.2f} {r['peak_above_state_mb']:>9.1f}")
            rows.append({"name": f"{r['policy']} T={T}: activation memory", "lmforge": round(r["activation_mb"], 2),
                         "reference": round(base["activation_mb"], 2), "unit": "MB", "ratio": round(mx, 4),
                         "goal": None, "meets": None})
            rows.append({"name": f"{r['policy']} T={T}: step time", "lmforge": round(r["step_s"], 4),
                         "reference": round(base["step_s"], 4), "unit": "s", "ratio": round(tx, 4), "goal": None,
                         "meets": None})
    print(f"(device: {results[0]['device']}; the reference column is policy none)")
    print(json.dumps({"benchmark": "recompute", "rows": rows}))


if __name__ == "__main__":
    main()
