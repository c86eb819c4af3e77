"""Quantized decode speed: lmforge's C step on fp32 / int8 / 4-bit weights, and llama.cpp on the same weights.

A ~34M-parameter Llama-shaped model (d_model 512, 8 layers, 8 heads / 4 KV heads, SwiGLU 1536, vocab
8192; random init, which is fine for speed) decodes single-stream, greedy, after the same prompt:

* lmforge fp32, int8 per channel (RTN), int8 in groups of 32 and 4-bit (symmetric) in groups of 32: the last
  two are the Q8_0 and Q4_0 weights of lmforge's own GGUF export (``export_gguf`` -> ``import_gguf(...,
  dequantize=False)``: IntLinear with exactly llama.cpp's codes and scales). Every linear is quantized,
  the output head included (as llama.cpp's files have it); the token embedding stays fp32 (a row lookup).
  Goals: int8 >= 1.6x fp32, 4-bit >= 2.2x fp32. An extra row, no goal: 4-bit RTN with the head left fp32
  (QuantConfig's default ``skip=["lm_head"]``: what ``lmforge quantize`` writes unless told otherwise).
* llama.cpp (``llama_cpp.Llama``, same thread count, same prompt and length, greedy) on the f32, q8_0 and
  q4_0 GGUF files, at its best settings here (n_batch 512, mmap, warmed up, flash attention on and off:
  the faster counts). Goals: lmforge Q8_0-equivalent >= 1.0x llama.cpp Q8_0, 4-bit >= 0.9x llama.cpp Q4_0.
  Skipped, with the reason, when ``llama_cpp`` is not importable.

Decode tokens/s is timed over the generated tokens only (the prompt is prefilled first, untimed), each
step one C call (lmforge: ``FastDecoder.step``; llama.cpp: ``Llama.eval``) plus an argmax in numpy/torch.
Runs are interleaved (every variant once per round, the order rotating) and the medians reported: on a
shared machine the absolute figures are noisy, the ratios within a round much less so.

Run: python benchmarks/quant_bench.py [--tokens 128 --repeats 5 --threads N] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import report, row

CONFIG = dict(vocab_size=8192, n_layer=8, n_head=8, n_kv_head=4, d_model=512, d_ff=1536, max_seq_len=1024,
              norm="rmsnorm", norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False, out_bias=False,
              mlp_bias=False, tie_embeddings=False, arch="llama")


def build(seed=0):
    from lmforge.model import make_config
    from lmforge.model.transformer import Transformer

    torch.manual_seed(seed)
    return Transformer(make_config(**CONFIG)).eval()


def tokenizer():
    """A small byte-level BPE (the GGUF needs one; the model's vocabulary is padded past it)."""
    from lmforge import tokenize
    from lmforge.data import corpus_files
    from lmforge.tokenize.special import default_special_tokens

    return tokenize.train("bpe", [str(corpus_files("shakespeare")[0])], 512,
                          special_tokens=default_special_tokens("bpe"), show_progress=False)


class Ours:
    """Greedy decode with lmforge's C step (prefill one chunk, then one step per token)."""

    def __init__(self, model, threads):
        from lmforge.infer.cache import KVCache
        from lmforge.infer.fastpath import FastDecoder

        why = FastDecoder.why_not(model)
        if why:
            raise SystemExit(f"quant_bench: the C step declines the model: {why}")
        self.fd = FastDecoder(model, threads=threads)
        self.KVCache, self.model = KVCache, model

    def run(self, prompt, n):
        cache = self.KVCache(self.model.cfg, 1, len(prompt) + n + 1)
        self.fd.bind(cache.k, cache.v)
        lg = self.fd.step(prompt, list(range(len(prompt))), [[0]] * len(prompt), logits_rows=[len(prompt) - 1])
        out, pos = [int(lg[0].argmax())], len(prompt)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            lg = self.fd.step([out[-1]], [pos], [[0]])
            out.append(int(lg[0].argmax()))
            pos += 1
        return (n - 1) / (time.perf_counter() - t0), out


class Llama:
    """Greedy decode with llama.cpp through llama_cpp.Llama (prompt evaluated first, then one eval per token)."""

    def __init__(self, path, threads, flash_attn):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                                   n_batch=512, use_mmap=True, flash_attn=flash_attn, verbose=False,
                                   logits_all=False)

    def last_logits(self):
        """The logits of the last evaluated token (with logits_all=False llama.cpp computes that row only and
        llama_cpp leaves ``scores`` unfilled): a view of the context's buffer."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def run(self, prompt, n):
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = [int(np.argmax(self.last_logits()))]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([out[-1]])
            out.append(int(np.argmax(self.last_logits())))
        return (n - 1) / (time.perf_counter() - t0), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="threads for both sides (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: --tokens 16 --repeats 1 (figures meaningless)")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.repeats = 16, 1
    threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    from lmforge.quant.api import quantize
    from lmforge.quant.config import QuantConfig
    from lmforge.quant.gguf_model import export_gguf, import_gguf

    base = build()
    n_params = sum(p.numel() for p in base.parameters())
    tok = tokenizer()
    tmp = Path(tempfile.mkdtemp(prefix="quant_bench_"))
    files = {t: export_gguf(base, tmp / f"model-{t}.gguf", tok, type=t) for t in ("f32", "q8_0", "q4_0")}

    def rtn(skip_head=False, **qc):
        m = build()
        quantize(m, QuantConfig(method="rtn", skip=["lm_head"] if skip_head else [], **qc), progress=False)
        return m

    def from_gguf(t):
        m = import_gguf(files[t], dequantize=False)[0]
        from lmforge.quant.linear import IntLinear

        lin = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
        if lin:
            raise SystemExit(f"quant_bench: import_gguf({t}) left fp32 linears {lin[:3]}")
        assert isinstance(m.lm_head, IntLinear)
        return m

    ours = {"fp32": Ours(base, threads), "int8 channel": Ours(rtn(bits=8), threads),
            "int8 g32 (Q8_0)": Ours(from_gguf("q8_0"), threads), "int4 g32 (Q4_0)": Ours(from_gguf("q4_0"), threads),
            "int4 g32, fp32 head": Ours(rtn(bits=4, granularity="group", group_size=32, skip_head=True), threads)}
    runners = {f"lmforge {k}": v for k, v in ours.items()}
    skipped = ""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        skipped = f"llama.cpp rows skipped: llama_cpp is not importable ({e})"
    if not skipped:
        for t, name in (("f32", "F32"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0")):
            for fa in (False, True):
                runners[f"llama.cpp {name} fa={int(fa)}"] = Llama(files[t], threads, fa)

    prompt = [int(t) for t in torch.randint(0, CONFIG["vocab_size"], (a.prompt_len,),
                                            generator=torch.Generator().manual_seed(1))]
    for r in runners.values():  # warm-up: caches, thread pools, page faults of the mapped files
        r.run(prompt, min(8, a.tokens))
    rates = {k: [] for k in runners}
    outs = {}
    names = list(runners)
    for rep in range(a.repeats):
        k0 = rep % len(names)
        for k in names[k0:] + names[:k0]:
            tps, outs[k] = runners[k].run(prompt, a.tokens)
            rates[k].append(tps)
        print(f"round {rep + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    # round by round ratios (the same round's load on both sides), then their median
    def ratio(x, y):
        return statistics.median(p / q for p, q in zip(rates[x], rates[y]))

    def best_llama(name):
        ks = [k for k in med if k.startswith(f"llama.cpp {name} ")]
        return max(ks, key=lambda k: med[k]) if ks else None

    rows = [row("lmforge fp32 decode", med["lmforge fp32"], None, "tok/s")]
    for k, goal in (("int8 channel", 1.6), ("int8 g32 (Q8_0)", 1.6), ("int4 g32 (Q4_0)", 2.2),
                    ("int4 g32, fp32 head", None)):
        rows.append(row(f"lmforge {k} vs lmforge fp32", med[f"lmforge {k}"], med["lmforge fp32"], "tok/s", goal,
                        ratio=ratio(f"lmforge {k}", "lmforge fp32")))
    if not skipped:
        for ours_k, name, goal in (("fp32", "F32", None), ("int8 g32 (Q8_0)", "Q8_0", 1.0),
                                   ("int4 g32 (Q4_0)", "Q4_0", 0.9)):
            ref = best_llama(name)
            rows.append(row(f"lmforge {ours_k} vs llama.cpp {name} (best: {ref[len('llama.cpp '):]})",
                            med[f"lmforge {ours_k}"], med[ref], "tok/s", goal, ratio=ratio(f"lmforge {ours_k}", ref)))
        for name, ours_k in (("Q8_0", "int8 g32 (Q8_0)"), ("Q4_0", "int4 g32 (Q4_0)")):
            a_, b_ = outs[f"lmforge {ours_k}"], outs[best_llama(name)]
            same = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x != y), len(a_))
            print(f"greedy tokens, lmforge {ours_k} vs llama.cpp {name}: the first {same} of {len(a_)} agree "
                  "(llama.cpp rounds activations to 8 bits, lmforge keeps them fp32: a random model's near-ties "
                  "may split)")
    note = (f"{n_params / 1e6:.1f}M parameters, {threads} thread(s), prompt {a.prompt_len}, {a.tokens} new tokens, "
            f"median of {a.repeats} interleaved rounds (ratios: median of per-round ratios). "
            + (skipped or "llama.cpp rows: the faster of flash attention on/off."))
    report("quant_bench", rows, note)


if __name__ == "__main__":
    main()
