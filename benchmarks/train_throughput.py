"""Training-step throughput: lmforge vs HF transformers (GPT2LMHeadModel + AdamW), same config and batch.

Both run forward, backward, gradient clipping and an AdamW step in fp32 on this
CPU, in one process, alternating (so machine noise hits both alike). Rows:

* tiny: 4 layers x 128 wide, 4 heads, block 64, batch 12, vocab 65 (nanoGPT's CPU baby GPT), overhead-bound;
* 10M: 6 layers x 384 wide, 6 heads, block 256, batch 16, vocab 65, compute-bound;
* MFU of lmforge at 10M: FLOPs per token = 6 N + 12 L d T (N: parameters without
  position embeddings, with the output head) x tokens/s / a fp32 matmul peak measured here in the same run.

Run: python benchmarks/train_throughput.py [--steps 30 --repeats 3]
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


def make_hf(L, d, H, T, V):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = GPT2Config(vocab_size=V, n_positions=T, n_embd=d, n_layer=L, n_head=H, resid_pdrop=0, embd_pdrop=0,
                   attn_pdrop=0)
    m = GPT2LMHeadModel(c).train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def step(x, y):
        loss = m(input_ids=x, labels=x).loss  # HF shifts labels itself: same work as next-token targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def make_ours(L, d, H, T, V):
    from lmforge.model import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.optim import build_optimizers

    cfg = ModelConfig(vocab_size=V, n_layer=L, n_head=H, d_model=d, max_seq_len=T)
    m = Transformer(cfg).train()
    (opt,) = build_optimizers(m, "adamw", lr=1e-3)

    def step(x, y):
        _, loss = m(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, cfg


def time_steps(step, x, y, n):
    for _ in range(3):
        step(x, y)
    t0 = time.perf_counter()
    for _ in range(n):
        step(x, y)
    return (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    # `lmforge pretrain` also calls lmforge.train.trainer.keep_freed_memory() on CPU (3-7% per step);
    # it is process-wide and would speed HF as well (measured: HF 10M 162 -> 182 GFLOP/s, lmforge
    # 191 -> 196), so both run here with the default allocator, as HF users get it
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    results = {}
    for name, (L, d, H, T, B, V) in {"tiny 4x128": (4, 128, 4, 64, 12, 65),
                                     "10M 6x384": (6, 384, 6, 256, 16, 65)}.items():
        x = torch.randint(0, V, (B, T))
        y = torch.roll(x, -1, 1)
        hf = make_hf(L, d, H, T, V)
        ours, cfg = make_ours(L, d, H, T, V)
        n = a.steps if T < 256 else max(5, a.steps // 3)
        t_o, t_h, mfu = [], [], []
        fpt = cfg.flops_per_token(T)
        for _ in range(a.repeats):
            peak = matmul_peak(0.5)  # measured beside each timing: the machine is shared
            t_h.append(time_steps(hf, x, y, n))
            t_o.append(time_steps(ours, x, y, n))
            peak = max(peak, matmul_peak(0.5))
            mfu.append((fpt * B * T / t_o[-1] / peak, peak))
        to, th = statistics.median(t_o), statistics.median(t_h)
        results[name] = (to, th, B * T, cfg, sorted(mfu)[len(mfu) // 2])
        print(f"{name}: lmforge {to * 1e3:.1f} ms/step, HF {th * 1e3:.1f} ms/step")
        goal = 1.3 if name.startswith("tiny") else 1.1
        rows.append(row(f"train step tokens/s {name} vs HF GPT2LMHeadModel+AdamW", B * T / to, B * T / th,
                        "tokens/s", goal))
    to, th, tok, cfg, (mfu, peak) = results["10M 6x384"]
    fpt = cfg.flops_per_token(cfg.max_seq_len)
    print(f"FLOPs/token at 10M: {fpt:,} (6N + 12 L d T, N = "
          f"{cfg.num_params(embeddings=False) + cfg.vocab_size * cfg.d_model:,})")
    print(f"fp32 matmul peak measured beside the median run: {peak / 1e9:.1f} GFLOP/s; lmforge "
          f"{mfu * peak / 1e9:.1f} GFLOP/s, HF {fpt * tok / th / 1e9:.1f} GFLOP/s (median step times)")
    # the 12 L d T term counts the whole T x T score matrix; a causal kernel computes about half of it
    causal = fpt - 6 * cfg.n_layer * cfg.d_model * cfg.max_seq_len
    print(f"counting only the causal half of attention (6N + 6 L d T = {causal:,} FLOPs/token): lmforge "
          f"{causal * tok / to / 1e9:.1f} GFLOP/s = {causal * tok / to / peak:.2f} of the peak")
    rows.append(row("MFU at 10M (achieved / fp32 matmul peak measured beside it)", mfu * peak / 1e9, peak / 1e9,
                    "GFLOP/s", 0.9, ratio=mfu))
    report("train_throughput", rows)


if __name__ == "__main__":
    main()
