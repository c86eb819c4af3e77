"""Pre-training: from shards (or a text file) to a checkpointed model, as a stage of the shared loop.

Knows what pre-training adds to the loop (``lmforge.train.loop``): the data (shards, or a text
file cut into train / val / test shards with a tokenizer trained on its training share), the
model built from a preset and overrides, its optimizers, the shard loader as the batch source
(its position is part of exact resume), the next-token loss, bits-per-byte evaluation, the
bigram initialization, samples, MFU, a MoE model's router metrics, and the model directory it
leaves in ``out``. The step, the schedule, checkpoints, resume, Ctrl-C, metrics and final.json
are the loop's. On N ranks (``parallel``: ``lmforge.parallel``) the strategy is made first, rank 0
alone writes a --text run's shards (the others wait, then read them), each rank's loader reads its
``dp_rank`` share of the global batch, and ``global_batch_size`` sets the per-rank ``batch_size``;
the strategy wraps the model from outside (in the loop), never here.

One ``TrainConfig`` (a ``LoopConfig`` plus pre-training's own fields) holds every knob;
``lmforge pretrain --set key=value`` sets them. Messages go through ``logging`` (logger
``lmforge.train``): resuming, the model's place at the end, and on Ctrl-C the checkpoint written
and the command that continues the run (a warning, so it shows even where no handler is
configured). ``report_to = "tensorboard"`` also writes the metrics as TensorBoard event files
under ``<out>/tensorboard/`` (needs the optional ``tensorboard`` package:
``pip install 'lmforge[tensorboard]'``).
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import write_json
from ..model import PRESETS, ModelConfig, make_config, preset
from ..model.transformer import Transformer
# the loop's names that pre-training's callers (tests, the pipeline, older code) import from here, re-exported
from .checkpoint import latest_checkpoint  # noqa: F401
from .loop import (LOOP_CHOICES, PEAK_FLOPS_BF16, Batch, BaseStage, LoopConfig, NaNLossError,  # noqa: F401
                   _TensorBoard, _truncate_metrics, autocast_for, bound_progress, check_loop_config,
                   existing_run, keep_freed_memory, loss_series, measure_peak_flops, pick_device,
                   plot_metrics, run)
from .optim import build_optimizers
from .recompute import apply_recompute

logger = logging.getLogger("lmforge.train")


@dataclass
class TrainConfig(LoopConfig):
    """Pre-training's knobs: the loop's (``LoopConfig``: sizes, optimizer, schedule, bounds, cadence,
    device, ...) and these."""
    out: str = "runs/pretrain"
    data: str = ""  # a directory from `lmforge data prepare`
    text: str = ""  # or a text file: first 90% trains, the next 5% validates, the last 5% tests
    text_val_frac: float = 0.05  # --text mode: the share of the text (before the test share) that validates
    text_test_frac: float = 0.05  # --text mode: the share at the end that tests (0: no test split)
    tokenizer: str = ""  # with --text: char | bpe:N | a tokenizer path (default: the preset's choice)
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_layer": 4}
    loader: str = "windows"  # or "bos" (BOS-aligned packing)
    recompute: str = "none"  # none | full | every:K | selective
    init: str = "default"  # or "bigram": start from the training split's bigram model (lmforge.train.ngram_init)
    init_scale: float = 1.0  # bigram init: rms of the embeddings
    init_tokens: int = 20_000_000  # bigram init: count pairs in at most this many training tokens


# Training settings that go with a preset: `lmforge pretrain --preset NAME` and a pipeline recipe's
# `preset = NAME` both apply them to every field the command line / recipe does not set (apply_preset_recipe).
RECIPES: dict[str, dict] = {
    # nanoGPT's shakespeare_char CPU run, faithfully: char tokens, AdamW 1e-3, beta2 0.99, cosine to 1e-4
    "baby-gpt": {"tokenizer": "char", "batch_size": 12, "seq_len": 64, "optimizer": "adamw", "lr": 1e-3,
                 "beta2": 0.99, "warmup_steps": 100, "min_lr_ratio": 0.1, "weight_decay": 0.1, "schedule": "cosine",
                 "grad_clip": 1.0},
    # lmforge's CPU recipe: 2k-token byte-level BPE, bigram initialization, Muon, warmup-stable-decay,
    # ending on the average of the weights over the decay
    "shakespeare-cpu": {"tokenizer": "bpe:2048", "init": "bigram", "batch_size": 8, "seq_len": 256, "optimizer": "muon",
                        "lr": 1e-2, "muon_lr": 0.02, "schedule": "wsd", "warmup_steps": 5, "decay_frac": 0.3,
                        "min_lr_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 1.0, "ema": 0.99, "ema_start": 0.7},
    # the same recipe for its MoE twin (same active parameters); the router stays on AdamW
    "shakespeare-moe": {"tokenizer": "bpe:2048", "init": "bigram", "batch_size": 8, "seq_len": 256, "optimizer": "muon",
                        "lr": 1e-2, "muon_lr": 0.02, "schedule": "wsd", "warmup_steps": 5, "decay_frac": 0.3,
                        "min_lr_ratio": 0.0, "weight_decay": 0.0, "grad_clip": 1.0, "ema": 0.99, "ema_start": 0.7},
}


PRETRAIN_CHOICES = {"loader": ("windows", "bos"), "init": ("default", "bigram")}
CHOICES = {**LOOP_CHOICES, **PRETRAIN_CHOICES}  # every choice a TrainConfig has


def apply_preset_recipe(cfg: "TrainConfig", given=()) -> "TrainConfig":
    """Give every field not in ``given`` (the fields a file, flag or --set named) the value of the preset's
    training recipe (``RECIPES``). The one meaning of a preset, for ``pretrain`` and the pipeline alike.
    The recipe's tokenizer only applies to --text runs (shards carry their own tokenizer)."""
    given = set(given)
    for k, v in RECIPES.get(cfg.preset, {}).items():
        if k in given or (k == "tokenizer" and not cfg.text):
            continue
        setattr(cfg, k, v)
    return cfg


def check_config(cfg: "TrainConfig") -> None:
    """Every setting checked before any work (the pipeline's recipe validation calls this too):
    bounds, choice strings, shares, the model's fields (and that the preset plus ``model`` builds)."""

    check_loop_config(cfg)  # bounds, the loop's choices, ema, sizes
    for k, ok in PRETRAIN_CHOICES.items():
        if getattr(cfg, k) not in ok:
            raise ValueError(f"{k}: expected one of {', '.join(ok)}, got {getattr(cfg, k)!r}")
    if not (cfg.recompute in ("none", "full", "selective") or
            (cfg.recompute.startswith("every:") and cfg.recompute[6:].isdigit() and int(cfg.recompute[6:]) > 0)):
        raise ValueError(f"recompute: expected none, full, selective or every:K (K > 0), got {cfg.recompute!r}")
    if not (0 < cfg.text_val_frac and 0 <= cfg.text_test_frac and cfg.text_val_frac + cfg.text_test_frac < 0.5):
        raise ValueError(f"text_val_frac must be > 0 and text_test_frac >= 0, together under 0.5; got "
                         f"{cfg.text_val_frac} and {cfg.text_test_frac}")
    if cfg.data and not cfg.text and (cfg.tokenizer == "char" or cfg.tokenizer.startswith("bpe:")):
        raise ValueError(f"tokenizer {cfg.tokenizer!r} (a tokenizer to train) is only used with text=FILE (--text): "
                         f"shards from `lmforge data prepare` carry their tokenizer ({cfg.data}/manifest.json); "
                         "drop --tokenizer, or give the tokenizer file the shards were made with (it is checked)")
    if cfg.preset and cfg.preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {cfg.preset!r}; known: {', '.join(sorted(PRESETS))}")
    from ..model.config import field_names

    names = field_names()  # the tree's fields, "attn.n_head"-style paths and the old flat names
    bad = sorted(set(cfg.model) - names)
    if bad:
        import difflib

        hint = difflib.get_close_matches(bad[0], sorted(names), n=1)
        raise ValueError(f"model: unknown field(s) {bad} (ModelConfig has: {', '.join(sorted(names))})"
                         + (f"; did you mean {hint[0]!r}?" if hint else ""))
    try:  # the preset plus the overrides make a valid (and, if it names a family, exportable) model
        model_config(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(str(e) if str(e).startswith("model") else f"model: {e}") from None


def text_to_shards(text_file: str, tokenizer_spec: str, out: Path, val_frac: float = 0.05, test_frac: float = 0.05):
    """--text mode: train (or load) the tokenizer on the training share and write one-document shards:
    train (the first 1 - val_frac - test_frac of the text), val (the next val_frac, for choosing
    settings) and test (the last test_frac; no test split when it is 0)."""
    from .._io import read_text_file
    from ..data.shards import FORMAT, VERSION, tokenizer_fingerprint
    from ..tokenize import load, train

    text = read_text_file(text_file)
    if len(text) < 1000:
        raise ValueError(f"{text_file}: only {len(text)} characters; need at least 1000 to train on")
    cut, cut2 = int(len(text) * (1 - val_frac - test_frac)), int(len(text) * (1 - test_frac))
    parts = {"train": text[:cut], "val": text[cut:cut2], "test": text[cut2:]}
    if not test_frac:
        del parts["test"]
    tr = parts["train"]
    spec = tokenizer_spec or "char"
    if spec == "char":  # the alphabet of the whole file, as nanoGPT's shakespeare_char builds it: a
        tok = train("char", [text], 0)  # character first seen in validation must still encode
    elif spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            raise ValueError(f"--tokenizer {spec!r}: expected bpe:N with N an integer") from None
        from ..tokenize.special import default_special_tokens

        # <|endoftext|> and the chat tokens, as every tokenizer lmforge trains for a model (it can then chat)
        tok = train("bpe", [tr], n, special_tokens=default_special_tokens("bpe"), show_progress=False)
    else:
        tok = load(spec)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.lmforge.json")
    ids = {s: np.asarray(tok.encode(t, disallowed_special=()), dtype=np.int64) for s, t in parts.items()}
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    splits = {}
    for s, arr in ids.items():
        (out / f"{s}-00000.bin").write_bytes(arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
        write_json(out / f"{s}-00000.idx.json", {"starts": [0], "ids": [Path(text_file).name + f":{s}"]})
        splits[s] = {"shards": [{"file": f"{s}-00000.bin", "index": f"{s}-00000.idx.json", "tokens": len(arr)}],
                     "documents": 1, "bytes": len(parts[s].encode("utf-8")), "tokens": len(arr)}
    write_json(out / "manifest.json", {
        "format": FORMAT, "version": VERSION, "complete": True, "dtype": dtype, "splits": splits,
        "tokenizer": {"file": "tokenizer.lmforge.json", "canonical_sha256": tokenizer_fingerprint(tok),
                      "kind": tok.kind, "vocab_size": tok.vocab_size,
                      "doc_token": None, "doc_token_id": None}}, indent=1)
    return tok


def _load_tokenizer_of(data_dir: Path):
    from ..tokenize import load

    m = json.loads((data_dir / "manifest.json").read_text())
    p = data_dir / m["tokenizer"]["file"]
    return load(p), m


def _data_tokenizer(data_dir: Path, given: str | None):
    """The tokenizer for shards in ``data_dir``: ``given`` (a tokenizer path) or the copy in the data
    directory, refused when it is not the one that made the shards (a ``char`` / ``bpe:N`` spec is
    for ``--text`` and ignored here)."""
    from ..data.shards import check_shards_tokenizer
    from ..tokenize import load

    tok, m = _load_tokenizer_of(data_dir)
    name = f"the tokenizer in {data_dir / m['tokenizer']['file']}"
    if given and given != "char" and not given.startswith("bpe:"):  # char / bpe:N (a preset's) are for --text
        tok, name = load(given), f"--tokenizer {given}"
    check_shards_tokenizer(m, data_dir, tok, name)
    return tok


class _RouterLog:
    """A MoE model's router metrics (``Transformer.router_metrics``) over the micro-batches since the
    last log line, averaged: the cross-entropy apart from the total loss (``ce``), the load-balancing
    (``aux_loss``) and z-losses, and per MoE layer the share of (token, slot) choices each expert got
    (``expert_load``: one list of E fractions per layer, and its ``expert_load_max`` / ``_min``).
    Adding is on tensors (no device sync); ``record`` reads them once per log line."""

    def __init__(self):
        self.sums, self.n = None, 0

    def add(self, m: dict) -> None:
        if not m:
            return
        vals = {k: m[k] for k in ("ce", "aux_loss", "z_loss", "expert_load")}
        self.sums = vals if self.sums is None else {k: self.sums[k] + v for k, v in vals.items()}
        self.n += 1

    def record(self) -> dict:
        if not self.n:
            return {}
        s = {k: v / self.n for k, v in self.sums.items()}
        load = s["expert_load"].float().cpu()
        self.sums, self.n = None, 0
        return {"ce": round(s["ce"].item(), 6), "aux_loss": round(s["aux_loss"].item(), 6),
                "z_loss": round(s["z_loss"].item(), 6),
                "expert_load": [[round(v, 4) for v in layer] for layer in load.tolist()],
                "expert_load_max": [round(v, 4) for v in load.max(1).values.tolist()],
                "expert_load_min": [round(v, 4) for v in load.min(1).values.tolist()]}


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The run's ModelConfig before the tokenizer sets its vocabulary; a ValueError if it
    names an HF family (``hf_family``, not "none") that cannot express it, so such a run fails
    before any work rather than at export."""
    from ..model.hf import check_exportable

    mcfg = preset(cfg.preset, **cfg.model) if cfg.preset else make_config(**cfg.model)
    if mcfg.hf_family != "none":
        try:
            check_exportable(mcfg, mcfg.hf_family)
        except ValueError as e:
            raise ValueError(f"model.hf_family = {mcfg.hf_family!r} but {e} (set model.hf_family=none to train a model "
                             "that is not exported)") from None
    return mcfg


def resume_command(cfg: TrainConfig) -> str:
    """The command that continues the run in ``cfg.out``: its own train_config.json holds every setting."""
    import shlex

    return f"lmforge pretrain --config {shlex.quote(str(Path(cfg.out) / 'train_config.json'))} --resume"




class PretrainStage(BaseStage):
    """Pre-training as a stage of the shared loop: data and tokenizer, the model, its optimizers, the
    shard loader (its position is the stage's state), the next-token loss, bits-per-byte evaluation,
    the bigram initialization, samples, MFU and the router metrics of a MoE model; at the end the model
    directory in ``out``. Built before ``loop.run`` (it is what writes the data of a --text run)."""

    name = "pretrain"

    def __init__(self, cfg: TrainConfig, strategy=None):
        from ..data.loader import ShardLoader

        check_config(cfg)  # before any tokenizer training or data reading
        if bool(cfg.data) == bool(cfg.text):
            raise ValueError("give exactly one of data (shards from `lmforge data prepare`) or text (a text file)")
        self.cfg = cfg
        mcfg = model_config(cfg)  # before any data or tokenizer work
        if cfg.data:  # a mistyped or unprepared --data fails before the run directory is made
            from ..data.shards import load_manifest

            load_manifest(cfg.data)
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.started = time.perf_counter()  # final.json's wall counts the data and tokenizer work too
        device = self.device = strategy.device if strategy is not None else pick_device(cfg.device)
        rank, world = (strategy.dp_rank, strategy.dp_size) if strategy is not None else (0, 1)
        main = strategy is None or strategy.is_main
        resume_ck = existing_run(cfg)  # before --text writes its data into out
        # data and tokenizer
        if cfg.text:
            data_dir = out / "data"
            if resume_ck and (data_dir / "manifest.json").exists():
                tok, _ = _load_tokenizer_of(data_dir)
            elif main:
                tok = text_to_shards(cfg.text, cfg.tokenizer, data_dir, cfg.text_val_frac, cfg.text_test_frac)
            if strategy is not None and not (resume_ck and (data_dir / "manifest.json").exists()):
                strategy.barrier()  # rank 0 has written the shards (one writer; the others read them)
                if not main:
                    tok, _ = _load_tokenizer_of(data_dir)
        else:
            data_dir = Path(cfg.data)
            tok = _data_tokenizer(data_dir, cfg.tokenizer)
        self.data_dir, self.tokenizer = data_dir, tok
        # the model's special tokens: documents started with the manifest's doc token (--text: none), prompts too
        from ..tokenize.special import TokenSpec

        self.manifest = json.loads((data_dir / "manifest.json").read_text())
        tm = self.manifest.get("tokenizer", {})
        self.tokens = TokenSpec.for_tokenizer(tok, **({"doc": tm["doc_token_id"]} if "doc_token_id" in tm else {}))
        # model
        if "vocab_size" not in cfg.model:  # the tokenizer decides, unless the model's vocab is set explicitly
            mcfg.vocab_size = tok.vocab_size
        elif tok.vocab_size > mcfg.vocab_size:
            raise ValueError(f"model.vocab_size {mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
        if "max_seq_len" not in cfg.model:
            mcfg.max_seq_len = max(mcfg.max_seq_len, cfg.seq_len) if mcfg.pos == "rope" else cfg.seq_len
        if cfg.seq_len > mcfg.max_seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} is longer than the model's max_seq_len {mcfg.max_seq_len}")
        mcfg.validate()
        self.mcfg = mcfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.model = Transformer(mcfg).to(device)
        apply_recompute(self.model, cfg.recompute)
        self.loader = ShardLoader(data_dir, "train", cfg.batch_size, cfg.seq_len, mode=cfg.loader, seed=cfg.seed,
                                  rank=rank, world_size=world)
        self.eval_batch = cfg.batch_size * world  # every rank evaluates the global batch's rows (as one process)
        self.autocast = autocast_for(device, cfg.dtype)
        self.router_log = _RouterLog() if mcfg.moe is not None else None  # MoE: each log line's router metrics

    def config_record(self) -> dict:
        return {"train": asdict(self.cfg), "model": self.mcfg.to_dict()}

    def optimizers(self, cfg) -> list:
        return build_optimizers(self.model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)

    def start(self, resumed: bool) -> None:
        if self.cfg.init == "bigram" and not resumed:
            from ..data.loader import TokenStream
            from .ngram_init import bigram_init

            s = TokenStream(self.data_dir, "train")
            bigram_init(self.model, s.read(0, min(len(s), self.cfg.init_tokens)), scale=self.cfg.init_scale,
                        seed=self.cfg.seed)

    def next_batch(self) -> Batch:
        b = self.loader.next()
        x = torch.from_numpy(b.x).to(self.device, non_blocking=True)
        y = torch.from_numpy(b.y).to(self.device, non_blocking=True)
        return Batch(inputs={"idx": x, "targets": y}, n=y.numel(), tokens=y.numel())

    def loss(self, fwd, batch: Batch) -> torch.Tensor:
        _, loss = fwd(batch.inputs["idx"], batch.inputs["targets"])  # the mean over the B*T targets
        if self.router_log is not None:
            self.router_log.add(self.model.router_metrics)
        return loss * batch.n

    def evaluate(self, split: str, max_batches: int) -> dict:
        from ..evaluate.perplexity import evaluate_shards

        ev = evaluate_shards(self.model, self.data_dir, split, self.cfg.seq_len, batch_size=self.eval_batch,
                             max_batches=max_batches, device=self.device, autocast=self.autocast)
        return {"loss": ev["loss"], "bpb": ev["bits_per_byte"]}

    def has_split(self, split: str) -> bool:  # (none in directories made before the test split existed)
        return bool(self.manifest["splits"].get(split, {}).get("shards"))

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.loader.load_state_dict(d)

    def sample(self, step: int) -> str:
        from ..infer.loop import generate

        spec, tok = self.tokens, self.tokenizer
        ids = spec.encode_prompt(tok, self.cfg.sample_prompt)
        prompt = ids[1:] if spec.add_bos and spec.bos is not None else ids
        return tok.decode(prompt + generate(self.model, ids, self.cfg.sample_tokens, seed=step, stop=spec.stop))

    def flops_per_token(self) -> float:
        return self.mcfg.flops_per_token(self.cfg.seq_len)

    def log_metrics(self) -> dict:
        return self.router_log.record() if self.router_log is not None else {}

    def finish(self, out: Path, final: dict) -> dict:
        from ..model import save as save_model

        save_model(self.model, out, tokenizer=self.tokenizer, tokens=self.tokens,
                   extra={"trained": {"steps": final["step"], "tokens": final["tokens"]}})
        return {}


def train(cfg: TrainConfig, on_step=None, quiet: bool = False, resume_hint: str | None = None) -> dict:
    """Run (or resume) a pre-training run; returns the final metrics.

    On Ctrl-C the run writes a checkpoint and logs where it is and how to continue: ``resume_hint``
    (the pipeline's "rerun `lmforge run ...`"), else ``lmforge pretrain --config OUT/train_config.json --resume``."""
    from ..parallel import make_strategy
    from .loop import per_rank_batch

    check_config(cfg)  # before joining any process group: a bad setting fails alike on every rank
    strategy = make_strategy(cfg)
    try:
        if strategy.name == "none":
            strategy.check(None)  # (under torchrun with parallel = "none": the error, before any work)
        cfg = per_rank_batch(cfg, strategy)
        stage = PretrainStage(cfg, strategy=strategy)
    except BaseException:
        strategy.close()
        raise
    final = run(cfg, stage, on_step=on_step, quiet=quiet, resume_hint=resume_hint,
                config_record=stage.config_record(), command=resume_command(cfg), strategy=strategy)
    out = Path(cfg.out)
    (logger.debug if quiet or not strategy.is_main else logger.info)(
        f"saved the model to {out} (load it with lmforge.load({str(out)!r}) / "
        f"lmforge generate --checkpoint {out})")
    return final
