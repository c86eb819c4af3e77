"""Run a function on N ranks (gloo on this CPU) and a reference training loop for the strategies.

``run_ranks(n, "module:function", **kwargs)`` starts ``n`` fresh Python processes with torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), each calling
``function(**kwargs)`` (the module is imported from tests/ or src/), and returns each rank's return
value (a dict of tensors / numbers / lists, passed back through ``torch.save``). A rank that fails
fails the call with its traceback; a run past ``timeout`` kills every rank and fails.

``mini_train(parallel, ...)`` is the training step of ``lmforge.train.loop`` reduced to the strategy
contract (``lmforge.parallel.base``) on a tiny Llama-shaped model and fixed random batches: run with
``parallel="none"`` in one process and with a strategy on N ranks, the two must give the same losses,
gradient norms and final parameters (the same global batch: each rank reads its rows of it).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RUNNER = textwrap.dedent("""
    import importlib, os, sys, traceback, torch
    target, out = sys.argv[1], sys.argv[2]
    kwargs = torch.load(sys.argv[3], weights_only=False)
    mod, fn = target.split(":")
    try:
        res = getattr(importlib.import_module(mod), fn)(**kwargs)
        torch.save({"ok": True, "value": res}, out)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
""")


def run_ranks(nproc: int, target: str, timeout: float = 240, env: dict | None = None, threads: int = 1,
              **kwargs) -> list:
    """``target(**kwargs)`` on ``nproc`` ranks; returns the ranks' return values, rank 0 first."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        kw = d / "kwargs.pt"
        torch.save(kwargs, kw)
        port = free_port()
        procs = []
        for r in range(nproc):
            e = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r),
                 "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "OMP_NUM_THREADS": str(threads),
                 "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
                 **(env or {})}
            procs.append(subprocess.Popen([sys.executable, "-c", _RUNNER, target, str(d / f"rank{r}.pt"), str(kw)],
                                          env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = []
        try:
            for p in procs:
                outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            logs = "\n".join(f"--- rank {r}\n{(p.communicate()[0] or '')[-3000:]}" for r, p in enumerate(procs))
            raise AssertionError(f"{target} on {nproc} ranks ran past {timeout} s (a hang?)\n{logs}") from None
        results = []
        for r, p in enumerate(procs):
            f = d / f"rank{r}.pt"
            res = torch.load(f, weights_only=False) if f.exists() else None
            if res is None or not res["ok"]:
                why = res["error"] if res else f"(no result; exit status {p.returncode})"
                raise AssertionError(f"{target}: rank {r} failed:\n{why}\n--- its output:\n{outs[r][-4000:]}")
            results.append(res["value"])
        return results


# ---- the reference loop ----

def tiny_config(**over):
    from lmforge.model import make_config

    kw = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=32,
              norm="rmsnorm", mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False, mlp_bias=False,
              tie_embeddings=False, arch="llama", dropout=0.0)
    kw.update(over)
    return make_config(**kw)


def global_batches(steps: int, accum: int, global_b: int, T: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """(steps, accum, global_b, T + 1) token ids; a micro-batch's rows r*B..(r+1)*B are rank r's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (steps, accum, global_b, T + 1), generator=g)


def mini_train(parallel: str = "none", steps: int = 3, global_b: int = 8, accum: int = 2, T: int = 16,
               optimizer: str = "adamw", grad_clip: float = 1.0, lr: float = 1e-2, model: dict | None = None,
               cfg: dict | None = None, seed: int = 0, memory: bool = False, comm: bool = False,
               freeze: tuple = ()) -> dict:
    """Train the tiny model ``steps`` steps under ``parallel`` on this rank; returns {"losses", "gnorms",
    "state" (rank 0: the full final state dict, else None), "describe", and with ``memory`` the
    strategy's ``memory_bytes`` after the last backward}. With ``comm``, "comm" holds what the last step's
    collectives moved on this rank (``lmforge.parallel.comm``): {"summary", "small" (the bookkeeping
    collectives of at most comm.SMALL elements), "calls" [(kind, numel, group size)], "ddp_buckets" (the
    elements a DDP communication hook saw, when the wrapped model is a DDP module)}. ``freeze``: name prefixes
    of parameters to freeze (``requires_grad`` False) before the strategy wraps the model."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel import make_strategy
    from lmforge.train.loop import LoopConfig
    from lmforge.train.optim import build_optimizers

    torch.set_num_threads(1)
    mcfg = tiny_config(**(model or {}))
    probe = make_strategy(LoopConfig(parallel=parallel, max_steps=steps, **(cfg or {})))
    dp_rank, dp = probe.dp_rank, probe.dp_size
    if global_b % dp:
        raise ValueError(f"global_b {global_b} is not a multiple of the {dp} data-parallel ranks")
    B = global_b // dp
    lcfg = LoopConfig(parallel=parallel, batch_size=B, grad_accum=accum, max_steps=steps, grad_clip=grad_clip,
                      optimizer=optimizer, lr=lr, **(cfg or {}))
    strategy = probe
    strategy.cfg = lcfg
    torch.manual_seed(seed)
    net = Transformer(mcfg)
    for name, p in net.named_parameters():
        if any(name.startswith(f) for f in freeze):
            p.requires_grad_(False)
    strategy.check(net)
    fwd = strategy.wrap(net)
    opts = strategy.wrap_optimizers(net, build_optimizers(net, optimizer, lr=lr, weight_decay=0.1, muon_lr=lr,
                                                          fused=False))
    data = global_batches(steps, accum, global_b, T, mcfg.vocab_size, seed)
    losses, gnorms, mem, counter, comm_out = [], [], None, None, None
    if comm:
        from lmforge.parallel.comm import CommCounter, install_ddp_hook

        counter = CommCounter()
        if isinstance(fwd, torch.nn.parallel.DistributedDataParallel):
            install_ddp_hook(fwd, counter)
    for s in range(steps):
        if counter is not None and s == steps - 1:
            counter.reset()
            counter.__enter__()
        micro = data[s, :, dp_rank * B:(dp_rank + 1) * B]
        N = strategy.all_sum([micro[:, :, 1:].numel()])[0]
        loss_sum = 0.0
        for i in range(accum):
            x, y = micro[i, :, :-1], micro[i, :, 1:]
            with strategy.micro_batch(fwd, last=i == accum - 1):
                _, loss = fwd(x, y)
                loss = loss * y.numel()
                (loss * strategy.grad_scale / N).backward()
            loss_sum += loss.item()
        losses.append(strategy.all_sum([loss_sum])[0] / N)
        gnorms.append(strategy.clip_grad_norm(net, grad_clip))
        if memory and s == steps - 1:
            mem = strategy.memory_bytes(net, opts)
        strategy.step(opts)
        strategy.zero_grad(opts)
        if counter is not None and s == steps - 1:
            counter.__exit__(None, None, None)
            comm_out = {"summary": counter.summary(), "small": counter.summary(small=True),
                        "calls": [(c.kind, c.numel, c.group_size) for c in counter.calls],
                        "ddp_buckets": list(counter.hook_buckets)}
    out = {"losses": losses, "gnorms": gnorms, "state": strategy.full_state_dict(net),
           "describe": strategy.describe(), "memory": mem}
    if comm:
        out["comm"] = comm_out
    return out


def assert_same_training(ref: dict, got: dict, atol: float = 1e-5) -> None:
    """Losses, gradient norms and every final parameter of ``got`` (rank 0 of a strategy) equal ``ref``."""
    assert len(ref["losses"]) == len(got["losses"])
    for k in ("losses", "gnorms"):
        for i, (a, b) in enumerate(zip(ref[k], got[k])):
            assert abs(a - b) <= atol * max(1.0, abs(a)), f"{k}[{i}]: one process {a}, strategy {b}"
    assert set(ref["state"]) == set(got["state"]), set(ref["state"]) ^ set(got["state"])
    for name, t in ref["state"].items():
        u = got["state"][name]
        assert u.shape == t.shape, (name, u.shape, t.shape)
        err = (u.float() - t.float()).abs().max().item()
        assert err <= atol, f"{name}: max |difference| {err:.3g} from one process (> {atol})"
