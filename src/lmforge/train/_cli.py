"""The ``lmforge pretrain`` subcommand: its arguments and the run's ``TrainConfig`` from them.

Knows how the --config file, the flags and --set become one checked
``TrainConfig`` (``_pretrain_config``) and hands it to ``train``; knows nothing of
the training loop itself, nor of the other stages' subcommands. ``--nproc N`` (``parallel.launch``)
re-runs the same command under torchrun.
"""
from __future__ import annotations

import json
import os

from .._cli_common import _settings


def cmd_pretrain(a) -> int:
    from ..parallel.launch import maybe_launch
    from . import train

    with _settings():
        cfg = _pretrain_config(a)
    rc = maybe_launch(a, cfg)  # --nproc N (not yet under torchrun): the job's exit status
    if rc is not None:
        return rc
    final = train(cfg, quiet=a.quiet)
    if os.environ.get("RANK", "0") == "0":  # (under torchrun: rank 0 prints the result)
        print(json.dumps(final))
    return 0


def _pretrain_config(a):
    """The run's TrainConfig: the --config file (a TrainConfig table, a recipe with a [train] table, or a
    run's own train_config.json), then flags and --set, then the preset's recipe for every field none
    of them named (``trainer.apply_preset_recipe``; the pipeline applies a preset the same way)."""
    from .._config import apply_overrides, coerce, from_dict, load_file
    from . import TrainConfig
    from .trainer import apply_preset_recipe

    given: set[str] = set()
    cfg = TrainConfig()
    if a.config:
        d = load_file(a.config)
        if isinstance(d.get("train"), dict):  # a recipe, or a run's train_config.json ({"train", "model"})
            d = {**d["train"], **({"model": d["model"]} if isinstance(d.get("model"), dict) else {})}
        cfg = from_dict(TrainConfig, d, "train" if a.config else "")
        given |= set(d)
    for k in ("out", "data", "text", "tokenizer", "preset", "checkpoint_every", "device", "max_time", "max_steps"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
            given.add(k)
    if a.resume:
        cfg.resume = True
    from ..model.config import field_names, field_type

    names = field_names()  # the tree's fields, "attn.n_head" paths and the old flat names
    for s in a.set:
        k, v = s.split("=", 1)
        k = k.strip()
        if k.startswith("model."):  # merged into the model table
            f = k[len("model."):]
            if f not in names:
                from .._config import _did_you_mean

                raise ValueError(f"unknown field 'model.{f}' (ModelConfig has: {', '.join(sorted(names))})"
                                 f"{_did_you_mean(f, names)}")
            cfg.model[f] = coerce(v.strip(), field_type(f), k)
        else:
            apply_overrides(cfg, [s])
            given.add(k.split(".")[0])
    from .trainer import check_config

    from ..parallel.deepspeed import apply_for_run

    cfg, ds = apply_for_run(cfg, given)  # a DeepSpeed JSON config (deepspeed = FILE): its settings, before the preset's
    given |= ds
    cfg = apply_preset_recipe(cfg, given)
    check_config(cfg)  # every setting, before any work (a bad one is a usage error)
    return cfg


def add_parser(sub) -> None:
    pt = sub.add_parser("pretrain", help="pre-train a model on shards or a text file",
                        description="Pre-train a decoder from shards (`lmforge data prepare`) or, for quick "
                        "experiments, a text file (first 90% trains, last 10% validates). Writes checkpoints, "
                        "metrics.jsonl, loss.png and the final model to --out.",
                        epilog="examples of --set: batch_size=32 seq_len=512 optimizer=muon lr=3e-4 "
                        "schedule=wsd warmup_steps=100 eval_every=200 recompute=selective compile=true "
                        "model.n_layer=8 model.d_model=512 init=bigram (start from the training text's bigram model; "
                        "needs rope, rmsnorm, untied embeddings, zero_init_proj: see docs/training.md) ema=0.99 ema_start=0.7 "
                        "(end on a moving average of the weights over the last 30% of the run)")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="a directory written by `lmforge data prepare`")
    src.add_argument("--text", default=None, help="a UTF-8 text file")
    pt.add_argument("--tokenizer", default=None, help="with --text: char, bpe:N or a tokenizer path")
    pt.add_argument("--preset", default=None, help="model preset (see `lmforge model info`)")
    pt.add_argument("--max-time", type=float, default=None, help="seconds to train")
    pt.add_argument("--max-steps", type=int, default=None)
    pt.add_argument("--out", "-o", default=None, help="run directory")
    pt.add_argument("--config", "-c", default=None, help="TOML/JSON file with TrainConfig fields")
    pt.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    pt.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                    help="write a checkpoint every N steps (default 0: at the end and on Ctrl-C only)")
    pt.add_argument("--device", default=None, help="auto (the default: CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    pt.add_argument("--quiet", "-q", action="store_true")
    from ..parallel.launch import add_launch_flags

    add_launch_flags(pt)
    pt.set_defaults(fn=cmd_pretrain)
