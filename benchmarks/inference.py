"""Inference side by side with HF transformers on the same weights (CPU, fp32, after warm-up).

* single-stream greedy decode tokens/s: lmforge (KV cache, one token per forward) vs
  HF ``generate`` (greedy, same prompt and length), at ~6M and ~40M parameters
  (Llama-style configs, exported to HF format and loaded with ``from_pretrained``);
* the memory-bandwidth bound at ~40M: weight bytes read per token ÷ the streaming
  bandwidth of a matrix-vector pass measured here, and the fraction lmforge reaches;
* throughput with 16 concurrent requests through the engine vs HF serving them one by one.

Run: python benchmarks/inference.py [--tokens 64 --repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from _report import report, row

SIZES = {
    "6M": dict(vocab_size=4096, n_layer=4, n_head=4, n_kv_head=2, d_model=256, d_ff=704),
    "40M": dict(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1536),
}


def bandwidth(seconds=1.0) -> float:
    """Bytes/s of y = W x over a 64 MB fp32 matrix (the decode access pattern)."""
    W = torch.randn(4096, 4096)
    x = torch.randn(4096)
    W @ x
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        W @ x
        reps += 1
    return W.numel() * 4 * reps / (time.perf_counter() - t0)


def build(size):
    from lmforge.model import ModelConfig
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer

    import transformers

    cfg = ModelConfig(max_seq_len=512, norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False,
                      out_bias=False, mlp_bias=False, tie_embeddings=False, arch="llama", **SIZES[size])
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    d = tempfile.mkdtemp()
    export_hf(ours, d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    return ours, hf, cfg


def time_ours(model, prompt, n):
    from lmforge.evaluate.perplexity import generate

    t0 = time.perf_counter()
    out = generate(model, prompt, n, temperature=0)
    return time.perf_counter() - t0, out


def time_hf(hf, prompt, n):
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0, out[0, len(prompt):].tolist()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    rows = []
    bw = statistics.median(bandwidth(0.5) for _ in range(3))
    print(f"matrix-vector streaming bandwidth: {bw / 1e9:.1f} GB/s")
    prompt = list(range(1, 33))
    n = a.tokens
    for size in SIZES:
        ours, hf, cfg = build(size)
        params = ours.num_params()
        time_ours(ours, prompt, 8)
        time_hf(hf, prompt, 8)
        to, th = [], []
        for _ in range(a.repeats):
            t, out_o = time_ours(ours, prompt, n)
            to.append(t)
            t, out_h = time_hf(hf, prompt, n)
            th.append(t)
        same = out_o == out_h
        tps_o, tps_h = n / statistics.median(to), n / statistics.median(th)
        print(f"{size} ({params / 1e6:.1f}M params): lmforge {tps_o:.0f} tok/s, HF {tps_h:.0f} tok/s; same greedy "
              f"tokens: {same}")
        goal = 3.0 if size == "6M" else 1.5
        rows.append(row(f"single-stream decode {size} ({params / 1e6:.1f}M) vs HF generate", tps_o, tps_h,
                        "tokens/s", goal))
        if size == "40M":
            weight_bytes = params * 4  # every weight is read once per token (embedding: one row, ignored)
            bound = bw / weight_bytes
            frac = tps_o / bound
            print(f"bandwidth bound at {size}: {bound:.0f} tok/s; lmforge reaches {100 * frac:.0f}%")
            rows.append(row(f"decode {size}: fraction of the memory-bandwidth bound", tps_o, bound, "tokens/s", 0.8))
            # 16 concurrent requests: the engine batches them; HF serves one after another
            prompts = [[(7 * i + j) % cfg.vocab_size + 1 for j in range(32)] for i in range(16)]
            eng = Engine(ours, num_blocks=1024, block_size=16, max_batch_tokens=1024)
            eng.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
            t0 = time.perf_counter()
            outs = Engine(ours, num_blocks=1024, block_size=16, max_batch_tokens=1024).generate(
                prompts, SamplingParams(max_tokens=n, temperature=0))
            te = time.perf_counter() - t0
            t0 = time.perf_counter()
            for p in prompts:
                time_hf(hf, p, n)
            th16 = time.perf_counter() - t0
            total = sum(len(o) for o in outs)
            print(f"16 concurrent requests at {size}: engine {total / te:.0f} tok/s, HF one by one "
                  f"{16 * n / th16:.0f} tok/s")
            rows.append(row(f"16 concurrent requests at {size}: engine vs HF generate one by one", total / te,
                            16 * n / th16, "tokens/s", 8.0))
    report("inference", rows)


if __name__ == "__main__":
    main()
