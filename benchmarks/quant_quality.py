"""The quality table of quantization: every method and format on one finished pipeline run's final model.

For the final model of a run (``make demo`` writes one: runs/default; the DPO model, else SFT's, else the
pretrained one) this script quantizes a fresh copy once per row, each method's calibration windows from the
TRAIN split (``lmforge.quant.calib``; never the split it reports on), and measures, side by side in one run:
  - bits per byte on the TEST split (``--split val`` to choose settings; the eval stage's own code,
    ``lmforge.evaluate.perplexity.evaluate_shards``, the whole split at the run's sequence length);
  - the size: bytes of model.safetensors written by ``save_quantized`` (the fp32 row: ``lmforge.model.save``),
    and of the GGUF file where a GGUF type holds the row's format (Q8_0 = int8 g32 sym, Q4_0 = int4 g32 sym);
  - greedy decode tokens/s through the engine (the same prompt and length for every row, one run each after a
    two-token warm-up; "C" when the engine's C step runs the model).
Rows: fp32; RTN sym/asym x channel/g32/g64 x 8/4/3 bits (g16 instead of g64 where 64 does not divide the
model's rows, as the demo model's 96); FP8 E4M3/E5M2 x tensor/channel scales x weight-only
and weights+activations; LLM.int8() (threshold 6); SmoothQuant W8A8 (alpha 0.5); GPTQ and AWQ at 8/4/3 bits,
g32 and per channel (GPTQ also with act-order); the GGUF files lmforge writes (Q8_0, Q4_0), read back by
``import_gguf(dequantize=False)``; with llama-cpp-python installed, llama.cpp's decode speed on the same GGUF.

    python benchmarks/quant_quality.py --run runs/default [--quick] [--split test|val] [--threads 2]
        [--only gptq,awq] [--calib-samples 128] [--decode-tokens 128] [--json-out table.json]

Prints the table, then the house rows (benchmarks/_report.py): per row lmforge = its bits/byte, reference =
fp32's (ratio: the cost); goal rows "GPTQ < RTN" / "AWQ < RTN" at 4 and 3 bits with the same group
(reference = RTN sym's bits/byte; meets when the ratio is below 1), and the JSON line. A method that fails
(or is not installed yet) is a row with its error, the others go on.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def variants(quick: bool, second_group: int = 64) -> list[tuple[str, dict]]:
    """(row name, QuantConfig fields) of every row (``--quick``: a subset: one of each method). RTN's second
    group size is 64, or ``second_group`` for a model whose rows 64 does not divide (the demo's 96)."""
    g2 = f"g{second_group}"
    G = {"channel": {"granularity": "channel"}, "g32": {"granularity": "group", "group_size": 32},
         g2: {"granularity": "group", "group_size": second_group}}
    rows = []
    for bits in (8, 4, 3):
        for g in ("channel", "g32", g2):
            for sym in (True, False):
                if quick and (g != "g32" or not sym):
                    continue
                rows.append((f"rtn int{bits} {g} {'sym' if sym else 'asym'}",
                             {"method": "rtn", "bits": bits, "sym": sym, **G[g]}))
    for fmt in ("e4m3", "e5m2"):
        for scale in ("tensor", "channel"):
            for act in (False, True):
                if quick and (fmt != "e4m3" or scale != "channel"):
                    continue
                rows.append((f"fp8 {fmt} {scale} {'w+a' if act else 'weight-only'}",
                             {"method": "fp8", "fp8_format": fmt, "fp8_scale": scale, "activations": act}))
    rows.append(("llm_int8 threshold 6", {"method": "llm_int8", "threshold": 6.0}))
    rows.append(("smoothquant w8a8 alpha 0.5", {"method": "smoothquant", "alpha": 0.5}))
    for m in ("gptq", "awq"):
        for bits in (8, 4, 3):
            for g in ("g32", "channel"):
                if quick and (g != "g32" or bits == 8):
                    continue
                rows.append((f"{m} int{bits} {g} sym", {"method": m, "bits": bits, "sym": True, **G[g]}))
                if m == "gptq" and g == "g32" and bits in (4, 3):
                    rows.append((f"gptq int{bits} g32 sym act-order",
                                 {"method": m, "bits": bits, "sym": True, "act_order": True, **G[g]}))
    return rows


# the GGUF type that holds a row's format exactly (llama.cpp's blocks: 32 values and one fp16 scale)
GGUF_OF = {"rtn int8 g32 sym": "q8_0", "rtn int4 g32 sym": "q4_0"}


def final_model(run: Path, which: str = "final") -> Path:
    if which != "final":
        if not (run / which / "model.safetensors").exists():
            raise SystemExit(f"{run / which}: no model.safetensors")
        return run / which
    for name in ("dpo", "sft", "model"):
        if (run / name / "model.safetensors").exists():
            return run / name
    raise SystemExit(f"{run}: no finished model (dpo/, sft/ or model/ with model.safetensors); run `make demo` "
                     "or `lmforge run` first")


def decode(model, prompt: list[int], n: int) -> tuple[float, list[int], bool]:
    """tokens/s of one greedy generation of n tokens through the engine, its tokens, whether C ran it."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    eng = Engine(model)
    eng.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = eng.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))[0]
    return len(out) / (time.perf_counter() - t0), out, eng.fast is not None


def llama_cpp_decode(path: Path, prompt: list[int], n: int, threads: int) -> float | None:
    """llama.cpp's greedy decode tokens/s on the GGUF (llama-cpp-python), or None when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                          verbose=False, logits_all=False)
    llm.eval(prompt)  # the prompt, not timed
    t0 = time.perf_counter()
    for _ in range(n):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/default", help="a finished pipeline run (default runs/default)")
    ap.add_argument("--model", default="final", choices=["final", "model", "sft", "dpo"],
                    help="which of the run's models: final (dpo, else sft, else model: what the pipeline quantizes) "
                         "or model (the pretrained one: trained on the very text bits/byte scores, so fp32 is its "
                         "optimum and a quantization error shows as a loss, not as noise)")
    ap.add_argument("--split", default="test", choices=["test", "val"],
                    help="the split bits/byte is reported on (val: to choose settings)")
    ap.add_argument("--quick", action="store_true", help="a subset: one row of each method")
    ap.add_argument("--only", default="", help="comma-separated row-name prefixes (e.g. gptq,awq,rtn int4)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2: an idle 2-core machine; 1 on a busy one)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prompt", default="ROMEO.\n")
    ap.add_argument("--json-out", default="", help="also write the rows to this JSON file")
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from lmforge.evaluate.perplexity import evaluate_shards
    from lmforge.infer.llm import load_with_tokenizer
    from lmforge.model import save
    from lmforge.quant.api import model_bytes, quantize
    from lmforge.quant.calib import calibration_tokens
    from lmforge.quant.checkpoint import save_quantized
    from lmforge.quant.config import QuantConfig

    from _report import report, row

    run = Path(a.run)
    src = final_model(run, a.model)
    data = run / "data"
    recipe = json.loads((run / "recipe.json").read_text()) if (run / "recipe.json").exists() else {}
    seq_len = (recipe.get("train") or {}).get("seq_len") or None
    model, tok, spec = load_with_tokenizer(src)
    prompt = spec.encode_prompt(tok, a.prompt)
    n = max(1, min(a.decode_tokens, model.cfg.max_seq_len - len(prompt)))
    calib = calibration_tokens(data, n_samples=a.calib_samples, seq_len=a.calib_seq_len, seed=0, split="train")
    print(f"{src}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; bits/byte on the "
          f"{a.split} split (seq_len {seq_len or model.cfg.max_seq_len}); calibration {tuple(calib.shape)} from "
          f"train; decode {n} tokens greedy, {a.threads} thread(s)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="quant_quality-"))
    table = []

    def measure(name, m, file_bytes, gguf_bytes=None, seconds=None, cfg=None, extra=None):
        t0 = time.perf_counter()
        ev = evaluate_shards(m, data, a.split, seq_len, batch_size=8)
        eval_s = time.perf_counter() - t0
        tps, out, fast = decode(m, prompt, n)
        r = {"name": name, "bpb": ev["bits_per_byte"], "weight_bytes": model_bytes(m), "file_bytes": file_bytes,
             "gguf_bytes": gguf_bytes, "tok_s": tps, "c_decode": fast, "quantize_s": seconds,
             "eval_s": round(eval_s, 1), "config": cfg, "tokens": out, **(extra or {})}
        table.append(r)
        print(f"  {name:<36} {r['bpb']:.4f} bits/byte  {file_bytes / 1e6:7.3f} MB"
              + (f" (gguf {gguf_bytes / 1e6:.3f} MB)" if gguf_bytes else "")
              + f"  {tps:7.0f} tok/s{' C' if fast else ''}" + (f"  quantize {seconds:.1f}s" if seconds else ""),
              flush=True)
        return r

    t_all = time.perf_counter()
    save(model, tmp / "fp32", tokenizer=tok, tokens=spec)
    fp = measure("fp32", model, (tmp / "fp32" / "model.safetensors").stat().st_size)
    want = [p.strip() for p in a.only.split(",") if p.strip()]
    gguf_done = {}
    widths = {m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)}
    second = 64 if all(w % 64 == 0 for w in widths) else 16  # (the demo's rows of 96: 64 does not divide them)
    for name, fields in variants(a.quick, second):
        if want and not any(name.startswith(p) for p in want):
            continue
        cfg = QuantConfig(**fields, calib_samples=a.calib_samples, calib_seq_len=a.calib_seq_len)
        try:
            m, _, _ = load_with_tokenizer(src)
            t0 = time.perf_counter()
            quantize(m, cfg, calib=calib, progress=False)
            secs = time.perf_counter() - t0
            d = save_quantized(m, tmp / name.replace(" ", "_"), tokenizer=tok, tokens=spec)
            gb = None
            if name in GGUF_OF:
                from lmforge.quant.gguf_model import export_gguf

                base, _, _ = load_with_tokenizer(src)
                gp = export_gguf(base, tmp / f"model-{GGUF_OF[name]}.gguf", tok, tokens=spec, type=GGUF_OF[name])
                gb = gp.stat().st_size
                gguf_done[GGUF_OF[name]] = gp
            measure(name, m, (Path(d) / "model.safetensors").stat().st_size, gb, secs, cfg.to_dict())
        except Exception as e:  # (a method not there yet, or failing: its row says so, the others go on)
            print(f"  {name:<36} FAILED: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
            table.append({"name": name, "error": f"{type(e).__name__}: {e}", "config": cfg.to_dict()})
    if not want or any(p.startswith("gguf") for p in want):
        from lmforge.quant.gguf_model import export_gguf, import_gguf

        for t in ("q8_0", "q4_0"):
            try:
                gp = gguf_done.get(t) or export_gguf(load_with_tokenizer(src)[0], tmp / f"model-{t}.gguf", tok,
                                                     tokens=spec, type=t)
                gm, _, _ = import_gguf(gp, dequantize=False)
                ref_tps = llama_cpp_decode(gp, prompt, n, a.threads)
                measure(f"gguf {t} (import_gguf)", gm, gp.stat().st_size, gp.stat().st_size,
                        extra={"llama_cpp_tok_s": ref_tps})
            except Exception as e:
                print(f"  gguf {t}: FAILED: {type(e).__name__}: {e}", flush=True)
                table.append({"name": f"gguf {t} (import_gguf)", "error": f"{type(e).__name__}: {e}"})
    total = time.perf_counter() - t_all

    by = {r["name"]: r for r in table if "bpb" in r}
    print(f"\n{'row':<36} {'bits/byte':>9} {'change':>8} {'safetensors':>12} {'gguf':>10} {'tok/s':>7} "
          f"{'x fp32':>6}  C")
    for r in table:
        if "bpb" not in r:
            print(f"{r['name']:<36} {'error':>9}  {r['error'][:70]}")
            continue
        print(f"{r['name']:<36} {r['bpb']:9.4f} {r['bpb'] - fp['bpb']:+8.4f} {r['file_bytes']:12,d} "
              f"{(r['gguf_bytes'] or 0):10,d} {r['tok_s']:7.0f} {r['tok_s'] / fp['tok_s']:6.2f}  "
              f"{'yes' if r['c_decode'] else 'no'}"
              + (f"  (llama.cpp {r['llama_cpp_tok_s']:.0f} tok/s)" if r.get("llama_cpp_tok_s") else ""))
    rows = []
    for r in table:
        if "bpb" not in r:
            rows.append({**row(f"{r['name']} bits/byte", None, None, "bits/byte"), "error": r["error"]})
            continue
        rows.append({**row(f"{r['name']} bits/byte", r["bpb"], fp["bpb"], "bits/byte", higher_is_better=False),
                     "split": a.split, "file_bytes": r["file_bytes"], "gguf_bytes": r["gguf_bytes"],
                     "weight_bytes": r["weight_bytes"], "tok_s": round(r["tok_s"], 1), "c_decode": r["c_decode"],
                     "llama_cpp_tok_s": r.get("llama_cpp_tok_s")})
    for m in ("gptq", "awq"):  # the issue's goal: better than RTN at 4 and 3 bits, the same group
        for bits in (4, 3):
            for g in ("g32", "channel"):
                ours, ref = by.get(f"{m} int{bits} {g} sym"), by.get(f"rtn int{bits} {g} sym")
                if ours and ref:
                    rows.append(row(f"{m} < rtn int{bits} {g} ({a.split} bits/byte)", ours["bpb"], ref["bpb"],
                                    "bits/byte", goal=1.0, higher_is_better=False))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"split": a.split, "run": str(run), "model": str(src),
                                                "rows": [{k: v for k, v in r.items() if k != "tokens"}
                                                         for r in table]}, indent=1))
    report("quant_quality", rows, note=f"{len(table)} rows in {total:.0f} s; bits/byte on the {a.split} split, "
                                       f"calibration from train; ratio = row / fp32 (goal rows: / RTN's)")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
