"""Data-parallel strategies on this CPU: step time on 2 ranks against 1 process, and what each step moves.

The same global batch (8 sequences of 128 tokens, grad_accum 1, AdamW, fp32, clipping at 1.0) on a
~6.3M-parameter Llama-shaped model (4 layers, d_model 256, vocab 4096), trained

* by one process with 2 threads (the reference; the same with 1 thread is printed as context), and
* by each strategy on 2 gloo ranks with 1 thread each (4 sequences per rank): ddp and fsdp when their
  modules exist, zero1, zero2, zero3 (lmforge.parallel.zero),

each for ``--warmup`` untimed steps then ``--steps`` timed ones (median reported). Two cores run both
ranks, so a ratio below 1 is not expected here: the rows say what the collectives cost, not scaling.
The communication rows give the bytes a ring implementation moves per rank in the last timed step
(all-reduce 2 (N-1)/N n, reduce-scatter and all-gather (N-1)/N n, fp32), as ``lmforge.parallel.comm``'s
counter sees every collective (the loss sums and the norm, at most 8 elements each, left out); ZeRO's
own count (``strategy.comm``: the elements handed to each collective) is printed beside it.
Every strategy's losses are checked against the one process's (printed: the largest difference).

Run: python benchmarks/parallel_bench.py [--steps 4] [--warmup 1] [--strategies zero1 zero2 zero3]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
MODEL = dict(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=4, d_model=256, d_ff=1024, max_seq_len=128,
             norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False, mlp_bias=False,
             tie_embeddings=False, arch="llama", dropout=0.0)
GLOBAL_B, T = 8, 128


def child(parallel: str, steps: int, warmup: int, out: str) -> None:
    import torch

    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import build_optimizers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    cfg = LoopConfig(parallel=parallel, max_steps=steps + warmup, grad_clip=1.0)
    strategy = make_strategy(cfg)
    B = GLOBAL_B // strategy.dp_size
    torch.manual_seed(0)
    net = Transformer(make_config(**MODEL))
    strategy.check(net)
    fwd = strategy.wrap(net)
    opts = strategy.wrap_optimizers(net, build_optimizers(net, "adamw", lr=1e-3, fused=False))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, MODEL["vocab_size"], (steps + warmup, GLOBAL_B, T + 1), generator=g)
    counter = None
    try:  # lmforge.parallel.comm's counter (a dispatch mode: every collective, whoever issues it)
        counter = getattr(importlib.import_module("lmforge.parallel.comm"), "CommCounter", None)
    except ImportError:
        pass
    times, losses, moved, counted = [], [], [], []
    for s in range(steps + warmup):
        if hasattr(strategy, "comm"):
            strategy.comm.reset()
        b = data[s, strategy.dp_rank * B:(strategy.dp_rank + 1) * B]
        x, y = b[:, :-1], b[:, 1:]
        ctx = counter() if counter is not None and s == steps + warmup - 1 else None
        t0 = time.perf_counter()
        if ctx is not None:
            ctx.__enter__()
        N = GLOBAL_B * T
        with strategy.micro_batch(fwd, last=True):
            _, loss = fwd(x, y)
            (loss * y.numel() * strategy.grad_scale / N).backward()
        loss_val = strategy.all_sum([loss.item() * y.numel()])[0] / N
        strategy.clip_grad_norm(net, 1.0)
        strategy.step(opts)
        strategy.zero_grad(opts)
        dt = time.perf_counter() - t0
        if ctx is not None:
            ctx.__exit__(None, None, None)
            counted.append(_summary(ctx))
        losses.append(loss_val)
        if s >= warmup:
            times.append(dt)
            if hasattr(strategy, "comm"):
                moved.append(dict(strategy.comm.elements))
    if strategy.is_main:
        Path(out).write_text(json.dumps({"times": times, "losses": losses, "moved": moved, "counted": counted,
                                         "world": strategy.dp_size,
                                         "params": sum(p.numel() for p in net.parameters())}))


def _summary(ctx):
    for name in ("summary", "totals", "bytes", "elements"):
        v = getattr(ctx, name, None)
        if v is not None:
            try:
                return v() if callable(v) else v
            except Exception as e:  # a counter of another shape: say so, do not fail the benchmark
                return f"unreadable: {e}"
    return repr(ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(parallel: str, nproc: int, threads: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "result.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": str(threads), "BENCH_THREADS": str(threads)}
        me = [str(Path(__file__).resolve()), "--child", parallel, "--steps", str(steps), "--warmup", str(warmup),
              "--out", str(out)]
        if nproc == 1:
            cmd = [sys.executable] + me
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port())] + me
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode or not out.exists():
            raise RuntimeError(f"{parallel} on {nproc} ranks failed ({p.returncode}):\n{p.stdout[-2000:]}\n"
                               f"{p.stderr[-4000:]}")
        return json.loads(out.read_text())


RING = {"all_reduce": lambda n, N: 2 * (N - 1) / N * n, "reduce_scatter": lambda n, N: (N - 1) / N * n,
        "all_gather": lambda n, N: (N - 1) / N * n, "broadcast": lambda n, N: 0.0}


def main(argv=None) -> None:
    from _report import report, row

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--strategies", nargs="+", default=["ddp", "fsdp", "zero1", "zero2", "zero3"])
    ap.add_argument("--child")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.child:
        child(a.child, a.steps, a.warmup, a.out)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from lmforge.parallel import STRATEGIES

    ran = []
    for s in a.strategies:
        mod = STRATEGIES.get(s, "").split(":")[0]
        if not mod or importlib.util.find_spec(f"lmforge.parallel.{mod}") is None:
            print(f"{s}: lmforge.parallel.{mod or '?'} does not exist on this branch; skipped")
            continue
        ran.append(s)
    t0 = time.time()
    ref = launch("none", 1, 2, a.steps, a.warmup)
    t_ref = statistics.median(ref["times"])
    psi = ref["params"]
    print(f"model: {psi / 1e6:.2f}M parameters; global batch {GLOBAL_B} x {T} tokens; one process, 2 threads: "
          f"median step {t_ref * 1e3:.0f} ms")
    one = launch("none", 1, 1, a.steps, a.warmup)  # context: the same process with 1 thread
    t_one = statistics.median(one["times"])
    print(f"one process, 1 thread: median step {t_one * 1e3:.0f} ms (the 2 cores are shared with whatever "
          "else runs: the 2-thread reference suffers most from that)")
    rows = [row("one process, 1 thread vs 2 threads", t_one, t_ref, "s", higher_is_better=False)]
    for s in ran:
        r = launch(s, 2, 1, a.steps, a.warmup)
        t = statistics.median(r["times"])
        diff = max(abs(u - v) for u, v in zip(ref["losses"], r["losses"]))
        print(f"{s}: median step {t * 1e3:.0f} ms on 2 ranks x 1 thread; largest loss difference from one "
              f"process {diff:.2e}")
        rows.append(row(f"{s} step time, 2 ranks x 1 thread vs 1 x 2", t, t_ref, "s", higher_is_better=False))
        counted = r["counted"][-1] if r["counted"] else None
        if isinstance(counted, dict) and "total_volume_bytes" in counted:  # lmforge.parallel.comm: every path
            kinds = ", ".join(f"{k} {v['volume'] / psi:.3g}Ψ" for k, v in counted.items() if isinstance(v, dict))
            print(f"  lmforge.parallel.comm, per rank per step (ring volumes, Ψ = {psi}): {kinds}")
            rows.append(row(f"{s} bytes moved per rank per step (ring, fp32)", counted["total_volume_bytes"] / 1e6,
                            None, "MB"))
        if r["moved"]:
            N = r["world"]
            per = r["moved"][-1]
            ring = sum(RING[k](n, N) for k, n in per.items()) * 4
            kinds = ", ".join(f"{k} {n / psi:.3g}Ψ" for k, n in per.items() if n)
            print(f"  the strategy's own count, handed to collectives per step: {kinds} (padding included); "
                  f"ring bytes per rank {ring / 1e6:.2f} MB")
            if not isinstance(counted, dict):
                rows.append(row(f"{s} bytes moved per rank per step (ring, fp32)", ring / 1e6, None, "MB"))
    report("parallel", rows, note=f"reference: one process with 2 threads, same global batch; "
           f"{a.warmup} warm-up + {a.steps} timed steps per strategy; {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
