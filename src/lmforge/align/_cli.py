"""The ``lmforge sft`` subcommand: its arguments and the run's ``SFTConfig`` from them.

Knows how the --config file, the flags and --set become one checked ``SFTConfig``
(``_sft_config``) and hands it to ``align.sft.sft``; prints final.json as JSON. Knows
nothing of the training itself, nor of the other stages' subcommands.
"""
from __future__ import annotations

import json

from .._cli_common import _settings


def cmd_sft(a) -> int:
    from .sft import sft

    with _settings():
        cfg = _sft_config(a)
    final = sft(cfg, quiet=a.quiet)
    print(json.dumps(final))
    return 0


def _sft_config(a):
    """The run's SFTConfig: the --config file (an SFTConfig table, a recipe with an [sft] table, or a run's own
    train_config.json), then the flags, then --set; checked (``align.sft.check_config``)."""
    from .._config import apply_overrides, from_dict, load_file
    from .sft import SFTConfig, _default_sources, check_config

    cfg = SFTConfig()
    if a.config:
        d = load_file(a.config)
        if isinstance(d.get("sft"), dict):  # a recipe, or a run's train_config.json ({"sft", "model"})
            d = d["sft"]
        cfg = from_dict(SFTConfig, d, "sft")
    for k in ("base", "out", "data_dir", "packing", "max_steps", "max_time", "device", "lora_r", "lora_alpha",
              "lora_dropout", "checkpoint_every"):
        if getattr(a, k, None) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.lora_targets is not None:
        cfg.lora_targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    if a.rslora:
        cfg.lora_rslora = True
    if a.data or a.generators:  # the command line names the conversations: they replace the file's
        cfg.sources = [{"path": p} for p in a.data or []] + (_default_sources() if a.generators else [])
    if a.skip_bad:
        cfg.on_error = "skip"
    if a.no_export:
        cfg.export_hf = False
    if a.resume:
        cfg.resume = True
    apply_overrides(cfg, a.set)
    check_config(cfg)  # every setting, before any work (a bad one is a usage error)
    return cfg


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sft", help="supervised fine-tuning on conversations (assistant-only loss, packing, LoRA)",
        description="Fine-tune a base model (an lmforge model directory or an HF one whose tokenizer has lmforge's "
        "chat tokens) on conversations: JSONL files (--data; {\"messages\": [...]} or {\"prompt\", \"completion\"} "
        "per line) and/or the built-in offline instruction generators (--generators, the default when no --data). "
        "Only the assistant's tokens (and the <|end|> closing each reply) are trained. Writes checkpoints, "
        "metrics.jsonl, loss.png and final.json to --out, which ends as a model directory "
        "(`lmforge chat --checkpoint OUT`); LoRA runs add OUT/adapter/ (PEFT format), and OUT/hf/ is the HF "
        "export with its chat template. Prints final.json.",
        epilog="examples of --set: lr=3e-4 batch_size=16 seq_len=256 grad_accum=2 schedule=constant "
        "warmup_steps=20 loss_norm=conversation truncation=skip val_frac=0.1 neftune_alpha=5 eval_every=25 "
        "sample_every=50 sample_prompt='What is 12 + 30?' 'sources=[{\"generator\": \"addition\", \"n\": 500}]' "
        "threads=2 seed=1")
    p.add_argument("--base", "-b", default=None, help="the model to fine-tune: an lmforge model directory "
                   "(a pretrain run's --out, the pipeline's model/) or an HF model directory")
    p.add_argument("--out", "-o", default=None, help="run directory (default runs/sft)")
    p.add_argument("--data", "-d", action="append", default=None, metavar="FILE.jsonl",
                   help="a JSONL file of conversations (repeatable; replaces the built-in mixture unless "
                   "--generators is given too)")
    p.add_argument("--generators", action="store_true",
                   help="train on the built-in offline instruction mixture (align.generators.DEFAULT_MIXTURE); "
                   "the default when no --data is given")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="a `lmforge data prepare` directory: the corpus generators (speaker, quote, play) read "
                   "its train split")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad conversations in --data files instead of stopping at the first")
    p.add_argument("--packing", choices=["bfd", "none", "padding_free", "grouped"], default=None,
                   help="bfd (default): conversations packed into rows of seq_len, attention kept within each; "
                   "none: one conversation per row, padded; grouped: as none, each micro-batch of similar lengths "
                   "(little padding; the fastest on a CPU with a large batch_size); padding_free: a micro-batch as "
                   "one unpadded row")
    p.add_argument("--lora-r", type=int, default=None, metavar="R", help="LoRA rank (default 0: a full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, metavar="P", help="LoRA dropout (default 0)")
    p.add_argument("--lora-targets", default=None, metavar="PATTERNS",
                   help="comma-separated patterns over lmforge's module names (default: align.lora's)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized LoRA scaling (alpha / sqrt(r))")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 300)")
    p.add_argument("--max-time", type=float, default=None, help="seconds to train (the first bound reached ends it)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint every N steps (default 0: at the end and on Ctrl-C only)")
    p.add_argument("--no-export", action="store_true", help="do not write OUT/hf/ (the HF export)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--config", "-c", default=None,
                   help="TOML/JSON file with SFTConfig fields (or an [sft] table; or a run's train_config.json)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=cmd_sft)
