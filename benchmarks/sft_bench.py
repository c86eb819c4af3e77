"""SFT step throughput: lmforge's ``sft`` against TRL's ``SFTTrainer``, same model, data, sequence length and batch.

The models are random-initialized lmforge models and their HF exports (the same weights; throughput does not
depend on them): ``demo``, the default pipeline's pre-training model (``recipes/default.toml``'s ``[train]``
preset with its ``model`` overrides), and ``6M``, a wider, deeper one of the same shape. The tokenizer is a
2048-token BPE trained on the built-in corpus with lmforge's special tokens (chat tokens and ``<|pad|>``).
The conversations are the default SFT mixture's offline generators (``align.generators.DEFAULT_MIXTURE``,
the corpus ones left out: no data directory needed), every one of them fed to both sides.

The batch: ``--batch`` rows of ``--seq-len`` tokens for the packed layouts (lmforge ``bfd``, TRL
``packing=True`` with its ``bfd`` strategy); for the unpacked layouts (lmforge ``none``/``grouped``/``padding_free``, TRL
padded/``padding_free``) as many conversations as fill the same tokens on average, so every variant sees about
the same tokens per step. Each side tries its layouts (``--compile``: also ``torch.compile``) and its best
is the row; TRL runs fp32 (bf16 off: on CPU its default bf16 autocast is slower), no gradient
checkpointing, ``dataloader_num_workers=0``, sdpa attention, assistant-only loss. Both sides: the same
``torch.set_num_threads`` (``--threads``, default 2), AdamW, one process.

Timing: ``--warmup`` steps are left out; the rest is cut into ``--repeats`` windows of ``--window`` steps and
a rate is the median window's trained tokens / seconds (trained tokens: the assistant tokens that carry loss,
counted by each side itself: lmforge's ``trained_tokens`` in metrics.jsonl, TRL's ``num_items_in_batch``).
lmforge's time is the loop's per-step ``elapsed`` (data, forward, backward, clip, optimizer step; no eval,
no checkpoint); TRL's is the time between its ``on_step_end`` callbacks.

    PYTHONPATH=src python benchmarks/sft_bench.py [--quick] [--threads N] [--models demo,6M] [--compile] [--lora R]

Ends with the house's JSON line: {"benchmark": "sft", "rows": [...]} (trained tokens/s, goal 2x).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import report, row  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "src" / "lmforge" / "recipes" / "default.toml"
SEED = 0


def fail(msg: str) -> None:
    print(f"sft_bench: {msg}", file=sys.stderr)
    raise SystemExit(2)


# ---- the models, the tokenizer, the data ----

def model_configs(names: list[str]) -> dict:
    """name -> ModelConfig: ``demo`` from the recipe, ``6M`` the same shape at d_model 256, 6 layers."""
    try:
        import tomllib
    except ImportError:  # python < 3.11
        import tomli as tomllib
    from lmforge.model import preset

    train = tomllib.loads(RECIPE.read_text())["train"]
    demo = preset(train["preset"], **train.get("model", {}))
    out = {}
    for n in names:
        if n == "demo":
            out[n] = demo
        elif n == "6M":
            out[n] = preset(train["preset"], **{**train.get("model", {}), "n_layer": 6, "n_head": 4,
                                                 "d_model": 256, "d_ff": 768})
        else:
            fail(f"--models: unknown model {n!r}; expected demo or 6M")
    return out


def tokenizer(work: Path, vocab: int):
    from lmforge import tokenize
    from lmforge.data import corpus_files
    from lmforge.tokenize.special import default_special_tokens

    p = work / f"tokenizer-bpe{vocab}.json"
    if p.exists():
        return tokenize.load(p)
    tok = tokenize.train("bpe", [str(f) for f in corpus_files("shakespeare")], vocab,
                         special_tokens=default_special_tokens("bpe"), show_progress=False)
    tok.save(p)
    return tok


def conversations(scale: float) -> list[dict]:
    from lmforge.align.data import load_sources
    from lmforge.align.generators import DEFAULT_MIXTURE

    sources = [{**s, "n": max(1, round(s["n"] * scale))} for s in DEFAULT_MIXTURE if not s.get("optional")]
    convs, _ = load_sources(sources, seed=SEED)
    return convs


def build(work: Path, name: str, mcfg, tok) -> tuple[Path, Path]:
    """(lmforge model dir, HF export dir) of a random-initialized ``mcfg`` model."""
    import torch

    from lmforge.model import load_tokens, save
    from lmforge.model.hf import export_hf
    from lmforge.model.transformer import Transformer

    torch.manual_seed(SEED)
    model = Transformer(mcfg)
    d = work / name
    save(model, d / "lm", tokenizer=tok)
    export_hf(model, d / "hf", tokenizer=tok, tokens=load_tokens(d / "lm", tok))
    return d / "lm", d / "hf"


# ---- timing ----

def window_rates(times: list[float], trained: list[int], warmup: int, window: int, repeats: int) -> list[float]:
    """Trained tokens/s of each window: ``times[i]`` the clock at the end of step i+1, ``trained[i]`` its
    trained tokens; windows start after ``warmup`` steps."""
    rates = []
    for r in range(repeats):
        a, b = warmup + r * window, warmup + (r + 1) * window  # steps a+1 .. b
        if b > len(times):
            break
        rates.append(sum(trained[a:b]) / (times[b - 1] - times[a - 1]))
    return rates


def run_lmforge(lm_dir: Path, data: Path, out: Path, mode: str, batch: int, seq_len: int, steps: int, threads: int,
                compile_: bool, lora: int = 0) -> tuple[list[float], list[int], float, int]:
    from lmforge.align.sft import SFTConfig, sft

    cfg = SFTConfig(out=str(out), base=str(lm_dir), sources=[{"path": str(data)}], val_frac=0.0, packing=mode,
                    loss_norm="token", batch_size=batch, grad_accum=1, seq_len=seq_len, max_steps=steps,
                    optimizer="adamw", lr=5e-4, weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0,
                    schedule="cosine", warmup_steps=0, eval_every=0, final_eval_batches=1, sample_every=0,
                    log_every=1, checkpoint_every=0, keep_checkpoints=1, seed=SEED, threads=threads,
                    compile=compile_, dtype="fp32", device="cpu", export_hf=False, lora_r=lora,
                    lora_alpha=2.0 * lora)
    final = sft(cfg, quiet=True)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    recs = [r for r in recs if "loss" in r and "step" in r]
    cum = [r["trained_tokens"] for r in recs]
    return ([r["elapsed"] for r in recs], [b - a for a, b in zip([0] + cum, cum)], recs[0]["loss"],
            final["sft"]["trained_tokens"])


def no_checkpointing(config_cls) -> dict:
    """TRL defaults activation (gradient) checkpointing on: off (faster). transformers 5 renamed the field."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def run_trl(hf_dir: Path, convs: list[dict], out: Path, layout: str, batch: int, seq_len: int, steps: int,
            threads: int, compile_: bool, lora: int = 0) -> tuple[list[float], list[int], float, int]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    counts: list[int] = []
    times: list[float] = []

    class Counting(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts.append(int(num_items_in_batch))
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    layouts = {"padded": dict(packing=False, padding_free=False, max_length=seq_len),
               "padding_free": dict(packing=False, padding_free=True, max_length=None),
               "packed": dict(packing=True, packing_strategy="bfd", max_length=seq_len)}
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                     max_steps=steps, learning_rate=5e-4, lr_scheduler_type="cosine", warmup_steps=0,
                     weight_decay=0.0, max_grad_norm=1.0, assistant_only_loss=True, bf16=False, fp16=False,
                     logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, dataloader_num_workers=0, seed=SEED, disable_tqdm=True,
                     torch_compile=compile_, **layouts[layout], **no_checkpointing(SFTConfig))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = Counting(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(hf_dir),
                       peft_config=peft_config,
                       train_dataset=Dataset.from_list([{"messages": c["messages"]} for c in convs]),
                       callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # (it prints every step's log line)
    # the same data: TRL's prepared labels carry as many trained tokens as lmforge's encode counts
    epoch_trained = sum(sum(1 for t in lab[1:] if t != -100) if layout != "packed" else sum(1 for t in lab if t != -100)
                        for lab in trainer.train_dataset["labels"])
    trainer.train()
    first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return times, counts, first, epoch_trained


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the demo model only, fewer steps and layouts (a check)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    ap.add_argument("--models", default=None, help="comma-separated: demo, 6M (default both; --quick: demo)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="rows of seq_len tokens per step (default 8)")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out (default 8; --quick 4)")
    ap.add_argument("--window", type=int, default=None, help="steps per timed window (default 8; --quick 3)")
    ap.add_argument("--repeats", type=int, default=None, help="timed windows, median taken (default 5; --quick 2)")
    ap.add_argument("--scale", type=float, default=None,
                    help="share of DEFAULT_MIXTURE's sizes generated (default 0.5; --quick 0.05)")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="LoRA of rank R (alpha 2R, every linear) on both sides instead of a full fine-tune")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile on both sides (slow to start)")
    ap.add_argument("--work", default="/tmp/lmforge-sft-bench", help="scratch directory (default %(default)s)")
    args = ap.parse_args(argv)
    q = args.quick
    warmup = args.warmup if args.warmup is not None else (4 if q else 8)
    window = args.window if args.window is not None else (3 if q else 8)
    repeats = args.repeats if args.repeats is not None else (2 if q else 5)
    scale = args.scale if args.scale is not None else (0.05 if q else 0.5)
    names = (args.models or ("demo" if q else "demo,6M")).split(",")
    if min(warmup, window, repeats, args.threads, args.batch) < 1 or args.seq_len < 16:
        fail("--warmup, --window, --repeats, --threads and --batch must be >= 1 and --seq-len >= 16")
    if args.lora < 0:
        fail("--lora must be >= 0 (0: a full fine-tune)")
    for mod in ("trl", "datasets", "transformers") + (("peft",) if args.lora else ()):
        try:
            __import__(mod)
        except ImportError:
            fail(f"the reference needs {mod} (pip install 'lmforge[ref]')")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # SFTTrainer pings telemetry at init otherwise
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    import datasets
    import torch
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's renames, called from TRL/PEFT

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    steps = warmup + window * repeats
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfgs = model_configs(names)
    vocab = {c.vocab_size for c in cfgs.values()}
    if len(vocab) != 1:
        fail(f"the models have different vocabularies {sorted(vocab)}")
    tok = tokenizer(work, vocab.pop())
    convs = conversations(scale)
    data = work / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": c["messages"]}) + "\n" for c in convs))
    from lmforge.align.packing import encode

    ex, st = encode(tok, convs, args.seq_len)
    mean_len = st["tokens"] / max(len(ex), 1)
    conv_batch = max(1, round(args.batch * args.seq_len / mean_len))
    print(f"{len(convs)} conversations, {st['tokens']:,} tokens ({mean_len:.1f} per conversation, "
          f"{st['trained_tokens']:,} trained, {st['truncated']} truncated); steps: {warmup} warm-up + "
          f"{repeats} x {window}; batch: {args.batch} rows of {args.seq_len} (packed) or {conv_batch} "
          f"conversations (unpacked); {args.threads} threads", flush=True)

    ours_layouts = [("bfd", args.batch), ("grouped", conv_batch), ("padding_free", conv_batch), ("none", conv_batch)]
    ref_layouts = [("packed", args.batch), ("padding_free", conv_batch), ("padded", conv_batch)]
    if q:
        ours_layouts, ref_layouts = ours_layouts[:2], ref_layouts[:2]  # lmforge bfd, grouped; TRL packed, padding_free
    compiles = [False, True] if args.compile else [False]
    rows, notes = [], []
    for name, mcfg in cfgs.items():
        lm_dir, hf_dir = build(work, name, mcfg, tok)
        params = sum(p.numel() for p in __import__("lmforge").model.load(lm_dir)[0].parameters())
        print(f"\n{name}: {params / 1e6:.2f}M parameters ({mcfg.n_layer} x {mcfg.d_model}, {mcfg.hf_family})", flush=True)
        best = {}
        for side, layouts in (("lmforge", ours_layouts), ("TRL", ref_layouts)):
            for layout, b in layouts:
                for c in compiles:
                    label = layout + (" +compile" if c else "")
                    out = work / name / f"{side}-{layout}{'-c' if c else ''}"
                    if out.exists():
                        import shutil

                        shutil.rmtree(out)
                    t0 = time.perf_counter()
                    if side == "lmforge":
                        times, trained, first, epoch_trained = run_lmforge(lm_dir, data, out, layout, b, args.seq_len, steps,
                                                            args.threads, c, args.lora)
                    else:
                        times, trained, first, epoch_trained = run_trl(hf_dir, convs, out, layout, b, args.seq_len, steps,
                                                        args.threads, c, args.lora)
                    if epoch_trained != st["trained_tokens"]:
                        notes.append(f"{name} {side} {label}: {epoch_trained} trained tokens per epoch, "
                                     f"encode counts {st['trained_tokens']}")
                    rates = window_rates(times, trained, warmup, window, repeats)
                    if not rates:
                        fail(f"{side} {label}: only {len(times)} steps timed")
                    rate = statistics.median(rates)
                    print(f"  {side:<7} {label:<22} batch {b:>3}: {rate:9.0f} trained tok/s "
                          f"(windows {min(rates):.0f}..{max(rates):.0f}; first loss {first:.4f}; "
                          f"{time.perf_counter() - t0:.0f} s in all)", flush=True)
                    if side not in best or rate > best[side][0]:
                        best[side] = (rate, label)
        (o, ol), (r, rl) = best["lmforge"], best["TRL"]
        kind = f" (LoRA r={args.lora})" if args.lora else ""
        rows.append(row(f"{name}{kind}: trained tokens/s", o, r, "tok/s", goal=2.0))
        notes.append(f"{name}: lmforge {ol} vs TRL {rl}")
    report("sft", rows, note="best layouts: " + "; ".join(notes))


if __name__ == "__main__":
    main()
