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


def bandwidth(seconds=1.0) -> tuple[float, float]:
    """Bytes/s of y = W x over a 64 MB fp32 matrix (the decode access pattern; far larger than
    the caches), with PyTorch's ``mv`` and with lmforge's C kernel; the faster is the bound."""
    from lmforge.infer import fastpath

    W = torch.randn(4096, 4096)
    x = torch.randn(4096)
    y = torch.empty(4096)
    threads = torch.get_num_threads()
    runs = {"torch": lambda: torch.mv(W, x, out=y)}
    if fastpath.AVAILABLE:
        runs["lmforge"] = lambda: fastpath._decode.matmul(W.data_ptr(), 0, x.data_ptr(), y.data_ptr(), 1, 4096,
                                                          4096, threads)
    out = {}
    for name, f in runs.items():
        f()
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            f()
            reps += 1
        out[name] = W.numel() * 4 * reps / (time.perf_counter() - t0)
    return out.get("torch"), out.get("lmforge", 0.0)


def bytes_per_token(model) -> int:
    """Weight bytes a decode step reads: every weight once, but only one row of the token embedding
    (and of learned positions), unless the embedding is also the output head."""
    n = model.num_params()
    if not model.cfg.tie_embeddings:
        n -= model.tok_emb.weight.numel() - model.cfg.d_model
    if model.cfg.pos == "learned":
        n -= model.pos_emb.weight.numel() - model.cfg.d_model
    return 4 * n


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
    bws = [bandwidth(0.5) for _ in range(3)]
    bw_t, bw_l = statistics.median(b[0] for b in bws), statistics.median(b[1] for b in bws)
    bw = max(bw_t, bw_l)
    print(f"matrix-vector streaming bandwidth over 64 MB: torch.mv {bw_t / 1e9:.1f} GB/s, lmforge kernel "
          f"{bw_l / 1e9:.1f} GB/s; bound uses {bw / 1e9:.1f} GB/s")
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
            weight_bytes = bytes_per_token(ours)
            # the steady decode rate (the prompt's prefill, compute-bound and not in this bound, taken out),
            # each repeat right beside a measurement of the streaming bandwidth, as the machine drifts
            tn, t1, bws = [], [], []
            for _ in range(max(3, a.repeats)):
                bws.append(bandwidth(0.3))
                tn.append(time_ours(ours, prompt, n)[0])
                t1.append(time_ours(ours, prompt, 1)[0])
            bw_t = statistics.median(b[0] for b in bws)
            bw = max(bw_t, statistics.median(b[1] for b in bws))
            bound = bw / weight_bytes
            tps_o = (n - 1) / max(1e-9, statistics.median(tn) - statistics.median(t1))
            print(f"streaming bandwidth beside it: torch.mv {bw_t / 1e9:.1f} GB/s, lmforge kernel "
                  f"{statistics.median(b[1] for b in bws) / 1e9:.1f} GB/s")
            frac = tps_o / bound
            print(f"steady decode at {size}: {tps_o:.0f} tok/s ({weight_bytes * tps_o / 1e9:.1f} GB/s of weights; "
                  f"torch.mv would bound it at {bw_t / weight_bytes:.0f} tok/s)")
            print(f"bandwidth bound at {size}: {weight_bytes / 1e6:.1f} MB of weights per token -> {bound:.0f} "
                  f"tok/s; lmforge reaches {100 * frac:.0f}%")
            rows.append(row(f"steady decode {size}: fraction of the memory-bandwidth bound", tps_o, bound, "tokens/s",
                            0.8))
            # 16 concurrent requests: the engine batches them; HF serves one after another
            prompts = [[(7 * i + j) % cfg.vocab_size + 1 for j in range(32)] for i in range(16)]
            eng = Engine(ours, num_blocks=1024, block_size=16, max_batch_tokens=1024)
            eng.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))
            eng = Engine(ours, num_blocks=1024, block_size=16, max_batch_tokens=1024)  # a fresh cache, built once
            t0 = time.perf_counter()
            outs = eng.generate(prompts, SamplingParams(max_tokens=n, temperature=0))
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
