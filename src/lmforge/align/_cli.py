"""The ``lmforge sft`` and ``lmforge dpo`` subcommands: their arguments and the runs' configs from them.

Knows how the --config file, the flags and --set become one checked ``SFTConfig`` (``_sft_config``)
or ``DPOConfig`` (``_dpo_config``) and hands it to ``align.sft.sft`` / ``align.dpo.dpo``; prints
final.json as JSON; ``--nproc N`` re-runs the command under torchrun (``parallel.launch``). Knows nothing of the training itself, nor of the other stages' subcommands
(``lmforge dpo pairs`` is ``align.pairs``' own ``add_parser``, attached under ``dpo`` when present).
"""
from __future__ import annotations

import json
import os

from .._cli_common import _settings
from ..parallel.launch import add_launch_flags, maybe_launch


def cmd_sft(a) -> int:
    from .sft import sft

    with _settings():
        cfg = _sft_config(a)
    from ..parallel.deepspeed import apply_for_run

    with _settings():
        cfg, _ = apply_for_run(cfg)  # a DeepSpeed JSON config (deepspeed = FILE)
    rc = maybe_launch(a, cfg)  # --nproc N (not yet under torchrun): the job's exit status
    if rc is not None:
        return rc
    final = sft(cfg, quiet=a.quiet)
    if os.environ.get("RANK", "0") == "0":  # (under torchrun: rank 0 prints the result)
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
                   help="comma-separated LoRA targets (default all-linear): part names (q,k,v,o,gate,up,down), "
                   "module names lmforge's or the HF export's (attn.qkv, q_proj), or globs (blocks.[01].*); "
                   "see lmforge.align.lora")
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
    add_launch_flags(p)
    p.set_defaults(fn=cmd_sft)


# ---- lmforge dpo ----

def cmd_dpo(a) -> int:
    from .dpo import dpo

    with _settings():
        cfg = _dpo_config(a)
    from ..parallel.deepspeed import apply_for_run

    with _settings():
        cfg, _ = apply_for_run(cfg)  # a DeepSpeed JSON config (deepspeed = FILE)
    rc = maybe_launch(a, cfg)  # --nproc N (not yet under torchrun): the job's exit status
    if rc is not None:
        return rc
    final = dpo(cfg, quiet=a.quiet)
    if os.environ.get("RANK", "0") == "0":  # (under torchrun: rank 0 prints the result)
        print(json.dumps(final))
    return 0


def _dpo_config(a):
    """The run's DPOConfig: the --config file (a DPOConfig table, a recipe with a [dpo] table, or a run's own
    train_config.json), then the flags, then --set; checked (``align.dpo.check_config``)."""
    from .._config import apply_overrides, from_dict, load_file
    from .dpo import DPOConfig, check_config

    cfg = DPOConfig()
    if a.config:
        d = load_file(a.config)
        if isinstance(d.get("dpo"), dict):
            d = d["dpo"]
        cfg = from_dict(DPOConfig, d, "dpo")
    for k in ("base", "ref", "out", "method", "reference", "beta", "label_smoothing", "packing", "max_steps",
              "max_time", "batch_size", "seq_len", "lr", "device", "lora_r", "lora_alpha", "lora_dropout",
              "checkpoint_every", "val_frac"):
        if getattr(a, k, None) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.data:
        cfg.data = list(a.data)
    if a.loss:
        cfg.loss_type = [t.strip() for x in a.loss for t in x.split(",") if t.strip()]
    if a.loss_weights is not None:
        try:
            cfg.loss_weights = [float(w) for w in a.loss_weights.split(",") if w.strip()]
        except ValueError:
            raise ValueError(f"--loss-weights {a.loss_weights!r}: expected comma-separated numbers, e.g. 0.8,0.2")
    if a.lora_targets is not None:
        cfg.lora_targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()]
    if a.skip_bad:
        cfg.on_error = "skip"
    if a.no_export:
        cfg.export_hf = False
    if a.resume:
        cfg.resume = True
    apply_overrides(cfg, a.set)
    if a.pairs_from_tasks:  # (after --set, so a --set pairs={...} table keeps the flag's tasks)
        cfg.pairs = {**cfg.pairs, "tasks": [t.strip() for t in a.pairs_from_tasks.split(",") if t.strip()]}
    check_config(cfg)
    return cfg


def add_dpo_parser(sub) -> None:
    """``lmforge dpo`` (and, when ``align.pairs`` provides ``add_parser``, its ``pairs`` subcommand)."""
    p = sub.add_parser(
        "dpo", help="preference training: DPO and its family, KTO, ORPO, CPO, SimPO (TRL's losses)",
        description="Train a chat model (the SFT model: an lmforge model directory or an HF one) on preference "
        "data: JSONL in TRL's formats (--data; {\"prompt\", \"chosen\", \"rejected\"} as strings or message lists, "
        "or {\"prompt\", \"completion\", \"label\"} for KTO), or pairs generated first from the model's own answers "
        "to the evaluation tasks' dev split (--pairs-from-tasks). The reference is the base unless --ref names "
        "another model with the same tokenizer; its log-probs are precomputed once (default), kept as a frozen copy, "
        "or taken from the policy with its LoRA adapters disabled. Writes checkpoints, metrics.jsonl (TRL's names: "
        "rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/...), loss.png, margins.png "
        "and final.json to --out, which ends as a model directory (`lmforge chat --checkpoint OUT`). Prints "
        "final.json.",
        epilog="examples of --set: lr=1e-4 grad_accum=2 max_prompt_len=128 f_divergence_type=js_divergence "
        "simpo_gamma=0.5 cpo_alpha=1.0 desirable_weight=1.33 ld_alpha=0.5 use_weighting=true eval_every=25 "
        "'pairs={\"n\": 100, \"k\": 8}' threads=2 seed=1")
    p.add_argument("--base", "-b", default=None, help="the model to train (the SFT model directory)")
    p.add_argument("--ref", default=None, metavar="DIR",
                   help="the reference model (default: the base); must have the same tokenizer")
    p.add_argument("--data", "-d", action="append", default=None, metavar="FILE.jsonl",
                   help="a preference JSONL file (repeatable)")
    p.add_argument("--pairs-from-tasks", default=None, metavar="TASKS",
                   help="generate pairs first from the base's own sampled answers, scored by the tasks' checkers "
                   "(comma-separated, e.g. brackets,letter_count; align.pairs; the dev split only)")
    p.add_argument("--method", choices=["dpo", "kto", "orpo", "cpo", "simpo"], default=None,
                   help="dpo (default), kto (unpaired; pairs are split into desirable / undesirable), orpo, cpo, "
                   "simpo (the last three need no reference)")
    p.add_argument("--loss", action="append", default=None, metavar="TYPE",
                   help="the loss type (repeatable or comma-separated: a weighted sum); dpo: sigmoid (default), "
                   "hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, "
                   "apo_down, discopop, sft, sigmoid_norm; kto: kto, apo_zero_unpaired; cpo: sigmoid, hinge, ipo, "
                   "simpo, alphapo")
    p.add_argument("--loss-weights", default=None, metavar="W1,W2",
                   help="one weight per --loss (default 1.0 each)")
    p.add_argument("--beta", type=float, default=None, help="the KL strength beta (> 0; default 0.1)")
    p.add_argument("--label-smoothing", type=float, default=None, help="in [0, 0.5) (default 0)")
    p.add_argument("--reference", choices=["precomputed", "copy", "lora"], default=None,
                   help="precomputed (default: the reference's log-probs once, before step 1, stored in "
                   "OUT/ref_logps.json; no reference in memory), copy (a frozen copy), lora (the policy with its "
                   "adapters disabled; needs --lora-r)")
    p.add_argument("--out", "-o", default=None, help="run directory (default runs/dpo)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="max prompt + completion tokens (default 256)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4; LoRA 1e-3)")
    p.add_argument("--val-frac", type=float, default=None, help="held-out share of the prompts (default 0.1)")
    p.add_argument("--packing", choices=["padded", "packed"], default=None,
                   help="padded (default: 2B rows right-padded, as TRL) or packed (no padding compute)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) bad lines in --data files")
    p.add_argument("--lora-r", type=int, default=None, metavar="R", help="LoRA rank (default 0: full fine-tune)")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A", help="LoRA alpha (default 16)")
    p.add_argument("--lora-dropout", type=float, default=None, metavar="P",
                   help="LoRA dropout (set to 0 while training, as TRL disables dropout)")
    p.add_argument("--lora-targets", default=None, metavar="PATTERNS", help="comma-separated LoRA targets "
                   "(default all-linear; see lmforge sft --help)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 100)")
    p.add_argument("--max-time", type=float, default=None, help="seconds to train (the first bound reached ends it)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint every N steps (default 0: at the end and on Ctrl-C only)")
    p.add_argument("--no-export", action="store_true", help="do not write OUT/hf/ (the HF export)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--config", "-c", default=None,
                   help="TOML/JSON file with DPOConfig fields (or a [dpo] table; or a run's train_config.json)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", "-q", action="store_true")
    add_launch_flags(p)
    p.set_defaults(fn=cmd_dpo)
    try:
        from .pairs import add_pairs_parser  # `lmforge dpo pairs ...` (align.pairs' own subcommand; light import)
    except ImportError:
        return
    add_pairs_parser(p.add_subparsers(dest="dpo_command", required=False, metavar="{pairs}",
                                      title="subcommand (optional)"))
