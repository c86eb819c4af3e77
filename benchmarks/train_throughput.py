"""Training-step throughput: lmforge vs HF transformers (GPT2LMHeadModel + torch.optim.AdamW), same config and batch.

Both run forward, backward, gradient clipping and an AdamW step in fp32 on this
CPU, in one process, after a warm-up of each, alternating which side goes first
from repeat to repeat (so machine noise and cold caches hit both alike). The
optimizers do the same work: the same two groups (matrices decay, vectors do
not), the same hyperparameters. lmforge's trainer uses its fused AdamW
(``torch._fused_adamw_``, one kernel per group) where torch has it on CPU; HF
gets ``torch.optim.AdamW`` with whichever of ``fused=True``, ``foreach=True`` and
the plain loop is fastest here, measured on HF's own parameters at the start of
the run (printed). Rows:

* tiny: 4 layers x 128 wide, 4 heads, block 64, batch 12, vocab 65 (nanoGPT's CPU baby GPT), overhead-bound;
* 10M: 6 layers x 384 wide, 6 heads, block 256, batch 16, vocab 65, compute-bound;
* MFU of lmforge at 10M: achieved FLOP/s / a fp32 matmul peak measured beside each timing.
  The goal row counts only the FLOPs the kernel computes: FLOPs per token = 6 N + 6 L d T
  (N: parameters without position embeddings, with the output head; 6 L d T: the causal
  half of the T x T attention scores and their backward). The PaLM count 6 N + 12 L d T
  (the whole score matrix, half of it masked) is an informative row.

Run: python benchmarks/train_throughput.py [--steps 30 --repeats 3] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _report import report, row


def matmul_peak(seconds=1.0, n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def decay_groups(model, weight_decay):
    """lmforge's grouping (lmforge.train.optim.param_groups): matrices decay, vectors do not."""
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]


HF_OPT = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
WD = 0.1


def fastest_torch_adamw(model, reps=10) -> tuple[dict, dict]:
    """Which torch.optim.AdamW path is fastest for these parameters here: ({kwargs}, {name: ms/step})."""
    variants = {"fused=True": dict(fused=True), "foreach=True": dict(foreach=True),
                "foreach=False (loop)": dict(foreach=False)}
    ps = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    opts, times = {}, {k: [] for k in variants}
    for name, kw in list(variants.items()):
        try:
            opts[name] = torch.optim.AdamW(decay_groups(model, WD), **HF_OPT, **kw)
            for _ in range(3):  # warm-up (the first step also imports torch._dynamo)
                opts[name].step()
        except (RuntimeError, TypeError, ValueError) as e:  # a path this torch/device lacks
            print(f"torch.optim.AdamW({name}): unavailable here ({e})")
            variants.pop(name)
            times.pop(name)
    for i in range(5):  # alternate the order, medians
        names = list(opts) if i % 2 == 0 else list(opts)[::-1]
        for name in names:
            t0 = time.perf_counter()
            for _ in range(reps):
                opts[name].step()
            times[name].append((time.perf_counter() - t0) / reps)
    with torch.no_grad():
        for p, s in zip(ps, saved):
            p.copy_(s)
            p.grad = None
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = min(med, key=med.get)
    return variants[best] | {"_name": best}, med


def make_hf(L, d, H, T, V, opt_kw=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    c = GPT2Config(vocab_size=V, n_positions=T, n_embd=d, n_layer=L, n_head=H, resid_pdrop=0, embd_pdrop=0,
                   attn_pdrop=0, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    m = GPT2LMHeadModel(c).train()
    if opt_kw is None:
        opt_kw, med = fastest_torch_adamw(m)
        print("  HF optimizer, torch.optim.AdamW per step: "
              + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()) + f" -> HF uses {opt_kw['_name']}")
    kw = {k: v for k, v in opt_kw.items() if not k.startswith("_")}
    opt = torch.optim.AdamW(decay_groups(m, WD), **HF_OPT, **kw)

    # HF shifts labels itself: same work as next-token targets
    return training_step(lambda x, y: m(input_ids=x, labels=x).loss, m, opt), opt_kw


def make_ours(L, d, H, T, V):
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizers

    torch.manual_seed(0)
    cfg = make_config(vocab_size=V, n_layer=L, n_head=H, d_model=d, max_seq_len=T)
    m = Transformer(cfg).train()
    # exactly what `lmforge pretrain` builds (fused AdamW where torch has it on this device)
    (opt,) = build_optimizers(m, "adamw", lr=HF_OPT["lr"], weight_decay=WD, betas=HF_OPT["betas"],
                              eps=HF_OPT["eps"])
    fused = all(g.get("fused") for g in opt.param_groups)

    return training_step(lambda x, y: m(x, y)[1], m, opt), cfg, fused


def training_step(loss_of, model, opt):
    """The step every side runs: ``loss_of(x, y)``, backward, clipping to norm 1, the optimizer, zeroed grads."""
    def step(x, y):
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def time_steps(step, x, y, n):
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t0) / n


CONFIGS = {"tiny 4x128": (4, 128, 4, 64, 12, 65), "10M 6x384": (6, 384, 6, 256, 16, 65)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat at tiny (a third of it at 10M)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: --steps 6 --repeats 2 (figures meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.repeats = 6, 2
    # `lmforge pretrain` also calls lmforge.train.trainer.keep_freed_memory() on CPU (3-7% per step);
    # it is process-wide and would speed HF as well (measured: HF 10M 162 -> 182 GFLOP/s, lmforge
    # 191 -> 196), so both run here with the default allocator, as HF users get it
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    results = {}
    hf_opt = None
    for name, (L, d, H, T, B, V) in CONFIGS.items():
        torch.manual_seed(0)
        x = torch.randint(0, V, (B, T))
        y = torch.roll(x, -1, 1)
        print(f"{name}:")
        hf, hf_opt_here = make_hf(L, d, H, T, V)
        hf_opt = hf_opt or hf_opt_here
        ours, cfg, fused = make_ours(L, d, H, T, V)
        print(f"  lmforge optimizer: lmforge.train.optim.AdamW, fused={fused} (as `lmforge pretrain` builds it)")
        n = a.steps if T < 256 else max(2, a.steps // 3)
        for _ in range(3):  # warm-up of both sides
            hf(x, y)
            ours(x, y)
        t_o, t_h, mfu = [], [], []
        fpt_causal = cfg.flops_per_token(T) - 6 * cfg.n_layer * cfg.n_head * cfg.hd * T
        for i in range(a.repeats):
            peak = matmul_peak(0.5)  # measured beside each timing: the machine is shared
            if i % 2 == 0:  # alternate which side goes first
                t_h.append(time_steps(hf, x, y, n))
                t_o.append(time_steps(ours, x, y, n))
            else:
                t_o.append(time_steps(ours, x, y, n))
                t_h.append(time_steps(hf, x, y, n))
            peak = max(peak, matmul_peak(0.5))
            mfu.append((fpt_causal * B * T / t_o[-1] / peak, peak))
        to, th = statistics.median(t_o), statistics.median(t_h)
        results[name] = (to, th, B * T, cfg, sorted(mfu)[len(mfu) // 2])
        print(f"  lmforge {to * 1e3:.1f} ms/step, HF {th * 1e3:.1f} ms/step (medians of {a.repeats} x {n} steps)")
        goal = 1.3 if name.startswith("tiny") else 1.1
        rows.append(row(f"train step tokens/s {name} vs HF GPT2LMHeadModel+AdamW({hf_opt_here['_name']})",
                        B * T / to, B * T / th, "tokens/s", goal))
    to, th, tok, cfg, (mfu, peak) = results["10M 6x384"]
    T = cfg.max_seq_len
    palm = cfg.flops_per_token(T)
    causal = palm - 6 * cfg.n_layer * cfg.n_head * cfg.hd * T
    n_params = cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model
    print(f"FLOPs/token at 10M, N = {n_params:,}: counted as computed, 6N + 6 L d T (causal half of attention) = "
          f"{causal:,}; PaLM count 6N + 12 L d T (whole score matrix) = {palm:,}")
    print(f"median-MFU repeat: fp32 matmul peak beside it {peak / 1e9:.1f} GFLOP/s, lmforge {mfu * peak / 1e9:.1f} "
          f"GFLOP/s computed; at the median step times: lmforge {causal * tok / to / 1e9:.1f}, HF "
          f"{causal * tok / th / 1e9:.1f} GFLOP/s computed")
    rows.append(row("MFU at 10M, FLOPs computed (6N + 6 L d T: causal half of attention) / fp32 matmul peak",
                    mfu * peak / 1e9, peak / 1e9, "GFLOP/s", 0.9, ratio=mfu))
    rows.append(row("MFU at 10M, PaLM count (6N + 12 L d T: whole score matrix; informative)",
                    mfu * palm / causal * peak / 1e9, peak / 1e9, "GFLOP/s", None, ratio=mfu * palm / causal))
    report("train_throughput", rows,
           "MFU counting rule: the goal row counts only the FLOPs the kernel computes, 6N + 6 L d T per token "
           "(the causal half of the attention scores); the PaLM row counts the whole T x T matrix.")


if __name__ == "__main__":
    main()
