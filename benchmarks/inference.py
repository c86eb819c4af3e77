"""Inference side by side with HF transformers on the same weights (CPU, fp32, after warm-up).

* single-stream greedy decode tokens/s: lmforge (KV cache, one token per forward) vs
  HF ``generate`` (greedy, same prompt and length), at ~6M and ~40M parameters
  (Llama-style configs, exported to HF format and loaded with ``from_pretrained``);
* the memory-bandwidth bound at ~40M: weight bytes read per token ÷ the streaming
  bandwidth of a matrix-vector pass measured here, and the fraction lmforge reaches;
* throughput with 16 concurrent requests (32-token prompts, 64 new tokens each): the engine
  with the server's default settings (``lmforge serve``: ``Server.__init__``'s ``num_blocks``,
  ``block_size``, ``max_batch_tokens``; the engine's own ``max_running``) against HF ``generate`` on
  all 16 prompts in one batched call (same lengths, so no padding): the goal is judged
  against that; HF serving them one by one is an extra row;
* the engine's prefill of a 4 x 384-token batch (1536 tokens, one forward, one sampled token each),
  with the output head run only at each row's last position (what the engine does) against the head
  over every position (the old way, ``Engine._all_logits``): an informative row per size, run on one
  thread and timed in CPU seconds (the ratio is the work saved; in wall time on every thread, other
  load on a shared machine swamps it).

Every side is warmed up first; repeats alternate which side goes first; medians.
Greedy tokens must agree with HF's (single stream, batched and one by one): the
benchmark exits with an error naming the first difference otherwise.

Run: python benchmarks/inference.py [--tokens 64 --repeats 3] [--quick]
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
    from lmforge.model import make_config
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer

    import transformers

    cfg = make_config(max_seq_len=512, norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False,
                      out_bias=False, mlp_bias=False, tie_embeddings=False, arch="llama", **SIZES[size])
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    d = tempfile.mkdtemp()
    export_hf(ours, d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    return ours, hf, cfg


def time_ours(model, prompt, n):
    from lmforge.infer.loop import generate

    t0 = time.perf_counter()
    out = generate(model, prompt, n, temperature=0)
    return time.perf_counter() - t0, out


def time_hf(hf, prompts, n):
    """HF ``generate``, greedy, exactly n new tokens, on one prompt or (a list of lists) a batch of equal lengths."""
    batch = isinstance(prompts[0], list)
    ids = torch.tensor(prompts if batch else [prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    new = out[:, ids.shape[1]:].tolist()
    return dt, new if batch else new[0]


def check_same(what, ours, ref):
    """Greedy decoding is deterministic: lmforge's tokens must be HF's."""
    if ours == ref:
        return
    if isinstance(ours[0], list):
        for i, (a, b) in enumerate(zip(ours, ref)):
            if a != b:
                j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                raise SystemExit(f"inference benchmark: {what}: greedy tokens differ from HF's in request {i} at "
                                 f"new token {j}: lmforge {a[j:j + 5]}, HF {b[j:j + 5]}")
        raise SystemExit(f"inference benchmark: {what}: {len(ours)} outputs, HF {len(ref)}")
    j = next((k for k, (x, y) in enumerate(zip(ours, ref)) if x != y), min(len(ours), len(ref)))
    raise SystemExit(f"inference benchmark: {what}: greedy tokens differ from HF's at new token {j}: "
                     f"lmforge {ours[j:j + 5]}, HF {ref[j:j + 5]}")


def server_defaults() -> dict:
    """The engine settings `lmforge serve` uses when none are given (read from Server, not restated)."""
    import inspect

    from lmforge.infer.server import Server

    sig = inspect.signature(Server.__init__).parameters
    return {k: sig[k].default for k in ("num_blocks", "block_size", "max_batch_tokens")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a smoke run: --tokens 16 --repeats 1 (figures meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.repeats = 16, 1
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
        time_ours(ours, prompt, 8)  # warm-up of both sides
        time_hf(hf, prompt, 8)
        to, th = [], []
        for i in range(a.repeats):
            sides = [("ours", time_ours), ("hf", time_hf)]
            for name, f in (sides if i % 2 == 0 else sides[::-1]):  # alternate which side goes first
                t, out = f(ours if name == "ours" else hf, prompt, n)
                (to if name == "ours" else th).append(t)
                if name == "ours":
                    out_o = out
                else:
                    out_h = out
        check_same(f"single stream at {size}", out_o, out_h)
        tps_o, tps_h = n / statistics.median(to), n / statistics.median(th)
        print(f"{size} ({params / 1e6:.1f}M params): lmforge {tps_o:.0f} tok/s, HF {tps_h:.0f} tok/s; greedy "
              f"tokens identical (checked)")
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
            concurrent(a, ours, hf, cfg, n, size, rows, Engine, SamplingParams)
        prefill(a, ours, cfg, size, rows, Engine, SamplingParams)
    report("inference", rows)


def prefill(a, ours, cfg, size, rows, Engine, SamplingParams, batch=4, length=384):
    """One forward over ``batch`` prompts of ``length`` tokens: logits at the last positions vs at all."""
    total = batch * length
    sp = SamplingParams(max_tokens=1, temperature=0)

    def run(r, every):  # a fresh engine per run: no prefix-cache hits; its construction is not timed
        ps = [[(11 * i + 3 * j + 97 * r) % (cfg.vocab_size - 1) + 1 for j in range(length)] for i in range(batch)]
        eng = Engine(ours, num_blocks=-(-(total + batch) // 16) + batch, block_size=16, max_batch_tokens=total)
        eng._all_logits = every
        t0 = time.process_time()
        out = eng.generate(ps, sp)
        return time.process_time() - t0, out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(0, False), run(0, True)  # warm-up
        times = {False: [], True: []}
        for r in range(max(7, a.repeats)):
            outs = {}
            for every in ((False, True) if r % 2 == 0 else (True, False)):  # alternate which goes first
                t, outs[every] = run(r + 1, every)
                times[every].append(t)
            if outs[False] != outs[True]:
                raise SystemExit(f"inference benchmark: prefill at {size}: the sampled tokens differ between the "
                                 f"two ways: {outs[False]} vs {outs[True]}")
    finally:
        torch.set_num_threads(threads)
    new, old = (total / statistics.median(times[k]) for k in (False, True))
    print(f"prefill of {batch} x {length} tokens at {size}, one thread: head at the last positions {new:.0f} "
          f"tok/CPU-s, at every position {old:.0f} tok/CPU-s ({new / old:.2f}x); sampled tokens identical (checked)")
    rows.append(row(f"prefill {batch} x {length} tokens at {size}, 1 thread: logits at last positions vs at all "
                    "(informative)", new, old, "tok/CPU-s"))


def concurrent(a, ours, hf, cfg, n, size, rows, Engine, SamplingParams):
    """16 requests at once: the engine (server defaults) vs HF generate batched, and one by one."""
    settings = server_defaults()
    import inspect

    max_running = inspect.signature(Engine.__init__).parameters["max_running"].default
    print(f"engine settings (lmforge serve's defaults): {settings}, max_running {max_running} (the engine's)")

    def prompts_for(r):  # a new set per repeat (same lengths): no prefix-cache hits across repeats
        return [[(7 * i + j + 131 * r) % (cfg.vocab_size - 1) + 1 for j in range(32)] for i in range(16)]

    eng = Engine(ours, **settings)  # built once, as the server does at start-up
    sp = SamplingParams(max_tokens=n, temperature=0)
    warm = prompts_for(a.repeats + 1)
    eng.generate(warm, SamplingParams(max_tokens=8, temperature=0))  # warm-up of every side, 16 at once
    time_hf(hf, warm, 8)
    time_hf(hf, warm[0], 8)

    def run_engine(ps):
        t0 = time.perf_counter()
        outs = eng.generate(ps, sp)
        return time.perf_counter() - t0, outs

    def run_batched(ps):
        return time_hf(hf, ps, n)

    def run_one_by_one(ps):
        t, outs = 0.0, []
        for p in ps:
            dt, o = time_hf(hf, p, n)
            t += dt
            outs.append(o)
        return t, outs

    sides = [("engine", run_engine), ("hf batched", run_batched), ("hf one by one", run_one_by_one)]
    times = {k: [] for k, _ in sides}
    for r in range(a.repeats):
        ps = prompts_for(r)
        order = sides[r % 3:] + sides[:r % 3]  # rotate which side goes first
        outs = {}
        for name, f in order:
            t, outs[name] = f(ps)
            times[name].append(t)
        check_same(f"16 concurrent at {size}, engine vs HF batched", outs["engine"], outs["hf batched"])
        check_same(f"16 concurrent at {size}, engine vs HF one by one", outs["engine"], outs["hf one by one"])
        if any(len(o) != n for o in outs["engine"]):
            raise SystemExit(f"inference benchmark: the engine returned {[len(o) for o in outs['engine']]} tokens, "
                             f"expected {n} each")
    total = 16 * n
    tps = {k: total / statistics.median(v) for k, v in times.items()}
    print(f"16 concurrent requests at {size}: engine {tps['engine']:.0f} tok/s, HF generate batched "
          f"{tps['hf batched']:.0f} tok/s, HF one by one {tps['hf one by one']:.0f} tok/s; greedy tokens identical "
          f"(checked)")
    rows.append(row(f"16 concurrent requests at {size}: engine (serve defaults) vs HF generate batched (16 in one call)",
                    tps["engine"], tps["hf batched"], "tokens/s", 1.5))
    rows.append(row(f"16 concurrent requests at {size}: engine vs HF generate one by one (informative)",
                    tps["engine"], tps["hf one by one"], "tokens/s"))


if __name__ == "__main__":
    main()
