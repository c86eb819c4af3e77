"""Pre-training: the loop, from shards (or a text file) to a checkpointed model.

Knows the order of a training step (batches, forward, backward with gradient
accumulation, clipping, optimizer step, schedule), when to evaluate, sample and
checkpoint, and how to resume exactly (a resumed run records what it restored:
a ``resumed`` line in metrics.jsonl, ``resumed_from_step`` and ``steps_this_run``
in final.json); knows nothing about how the model computes. It runs in one
process on one device: there is no data or model parallelism yet (the loader
already takes ``rank`` / ``world_size``; DDP/FSDP are to wrap the model from
outside, not to live here).

One ``TrainConfig`` holds every knob; ``lmforge pretrain --set key=value`` sets them.
Messages go through ``logging`` (logger ``lmforge.train``): resuming, the model's place
at the end, and on Ctrl-C the checkpoint written and the command that continues the run
(a warning, so it shows even where no handler is configured). ``report_to = "tensorboard"``
also writes the metrics as TensorBoard event files under ``<out>/tensorboard/`` (needs
the optional ``tensorboard`` package: ``pip install 'lmforge[tensorboard]'``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .._io import write_json
from ..model import PRESETS, ModelConfig, make_config, preset
from ..model.transformer import Transformer
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, state_summary
from .optim import WeightEMA, build_optimizers, skip_dynamo_import
from .recompute import apply_recompute
from .schedule import lr_multiplier

logger = logging.getLogger("lmforge.train")

@dataclass
class TrainConfig:
    out: str = "runs/pretrain"
    data: str = ""  # a directory from `lmforge data prepare`
    text: str = ""  # or a text file: first 90% trains, the next 5% validates, the last 5% tests
    text_val_frac: float = 0.05  # --text mode: the share of the text (before the test share) that validates
    text_test_frac: float = 0.05  # --text mode: the share at the end that tests (0: no test split)
    tokenizer: str = ""  # with --text: char | bpe:N | a tokenizer path (default: the preset's choice)
    preset: str = "tiny"
    model: dict = field(default_factory=dict)  # ModelConfig overrides, e.g. {"n_layer": 4}
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    loader: str = "windows"  # or "bos" (BOS-aligned packing)
    optimizer: str = "adamw"  # or "muon"
    lr: float = 6e-4  # AdamW (with muon: the embeddings', head's, norms' rate)
    muon_lr: float = 0.02
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 50
    decay_frac: float = 0.2  # wsd: share of the run spent decaying
    max_steps: int = 0  # bounds: the first one reached ends the run (at least one is needed)
    max_tokens: int = 0
    max_time: float = 0.0  # seconds of training, evaluation included
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 20  # 0: the whole validation split
    final_eval_batches: int = 0  # the evaluation at the end (0: the whole validation split)
    sample_every: int = 0
    sample_tokens: int = 120
    sample_prompt: str = "\n"
    checkpoint_every: int = 0  # steps; 0: at the end (and on Ctrl-C) only
    keep_checkpoints: int = 2
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast where supported (CUDA), fp32 on CPU
    compile: bool = False
    recompute: str = "none"  # none | full | every:K | selective
    seed: int = 1337
    threads: int = 0  # CPU threads for torch (0: leave torch's default)
    log_every: int = 10
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    peak_flops: float = 0.0  # for MFU; 0: measure a matmul on this device
    init: str = "default"  # or "bigram": start from the training split's bigram model (lmforge.train.ngram_init)
    init_scale: float = 1.0  # bigram init: rms of the embeddings
    init_tokens: int = 20_000_000  # bigram init: count pairs in at most this many training tokens
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (this decay per step) and end on it
    ema_start: float = 0.7  # ema: share of the run after which the average is kept
    report_to: str = "none"  # or "tensorboard": also write the metrics as event files under <out>/tensorboard/


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


CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"), "loader": ("windows", "bos"),
           "dtype": ("auto", "fp32", "bf16", "fp16"), "init": ("default", "bigram"),
           "report_to": ("none", "tensorboard")}


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


def bound_progress(bounds: dict, step: int, tokens: int, elapsed: float) -> float:
    """The share done of the bound reached first (max_steps, max_tokens, max_time; 0 = no such bound)."""
    p = 0.0
    if bounds.get("max_steps"):
        p = max(p, step / bounds["max_steps"])
    if bounds.get("max_tokens"):
        p = max(p, tokens / bounds["max_tokens"])
    if bounds.get("max_time"):
        p = max(p, elapsed / bounds["max_time"])
    return p


def check_config(cfg: "TrainConfig") -> None:
    """Every setting checked before any work (the pipeline's recipe validation calls this too):
    bounds, choice strings, shares, the model's fields (and that the preset plus ``model`` builds)."""

    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time):
        raise ValueError("give a bound: max_steps, max_tokens or max_time (e.g. --max-time 60)")
    for k, ok in CHOICES.items():
        if getattr(cfg, k) not in ok:
            raise ValueError(f"{k}: expected one of {', '.join(ok)}, got {getattr(cfg, k)!r}")
    if cfg.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to = 'tensorboard' needs the tensorboard package, which is not installed: "
                             "pip install 'lmforge[tensorboard]' (or set report_to = 'none')")
    if not (cfg.recompute in ("none", "full", "selective") or
            (cfg.recompute.startswith("every:") and cfg.recompute[6:].isdigit() and int(cfg.recompute[6:]) > 0)):
        raise ValueError(f"recompute: expected none, full, selective or every:K (K > 0), got {cfg.recompute!r}")
    if not (0 < cfg.text_val_frac and 0 <= cfg.text_test_frac and cfg.text_val_frac + cfg.text_test_frac < 0.5):
        raise ValueError(f"text_val_frac must be > 0 and text_test_frac >= 0, together under 0.5; got "
                         f"{cfg.text_val_frac} and {cfg.text_test_frac}")
    if not (0.0 <= cfg.ema < 1.0 and 0.0 <= cfg.ema_start <= 1.0):
        raise ValueError(f"ema must be in [0, 1) and ema_start in [0, 1], got {cfg.ema} and {cfg.ema_start}")
    for k in ("batch_size", "seq_len", "grad_accum"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k}: must be a positive integer, got {getattr(cfg, k)}")
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device {name!r}: {why} (torch {torch.__version__}); use --device cpu or auto, or install a "
                         "CUDA build of torch (README: Installing torch)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use --device cpu or auto")
    return dev


def autocast_for(device: torch.device, dtype: str):
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    if dtype in ("auto", "bf16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return None
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if dtype == "fp16":
        return lambda: torch.autocast(device.type, dtype=torch.float16)
    raise ValueError(f"dtype must be auto, fp32, bf16 or fp16, got {dtype!r}")


PEAK_FLOPS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def measure_peak_flops(device: torch.device, seconds: float = 0.25) -> float:
    """Dense matmul FLOP/s here: the bf16 table for known GPUs (``PEAK_FLOPS_BF16``); otherwise (CPU,
    MPS, another GPU) a measured fp32 1024 x 1024 matmul, for ``seconds``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for k, v in PEAK_FLOPS_BF16.items():
            if k in name:
                return v
    n = 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks instead of returning them to the system.

    A training step frees and reallocates the same activation buffers every step. By
    default glibc serves blocks over 128 KB-32 MB with fresh ``mmap`` pages, so each
    step pays a page fault (and the kernel's zeroing) per 4 KB of every large
    activation: measured 3-7% of a CPU step (4 x 128 and 6 x 384 GPTs). Raising the
    mmap and trim thresholds keeps the pages in the heap for reuse; the process's
    resident memory then stays at its peak. Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


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


class NaNLossError(RuntimeError):
    pass


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


class _TensorBoard:
    """The run's metrics as TensorBoard scalars (``report_to = "tensorboard"``), in ``<out>/tensorboard/``.
    A resumed run drops the events after its checkpoint's step (``purge_step``), as metrics.jsonl does."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
            "val_loss": "val/loss", "val_bpb": "val/bpb", "ce": "train/ce", "aux_loss": "moe/aux_loss",
            "z_loss": "moe/z_loss"}

    def __init__(self, out: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # checked in check_config; a broken install still says what to do
            raise ValueError(f"report_to = 'tensorboard': {e}; pip install 'lmforge[tensorboard]'") from None
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)

    def add(self, rec: dict, step: int) -> None:
        for k, tag in self.TAGS.items():
            if k in rec and rec[k] is not None:
                self.w.add_scalar(tag, rec[k], step)

    def close(self) -> None:
        self.w.close()


def train(cfg: TrainConfig, on_step=None, quiet: bool = False, resume_hint: str | None = None) -> dict:
    """Run (or resume) a pre-training run; returns the final metrics.

    On Ctrl-C the run writes a checkpoint and logs where it is and how to continue: ``resume_hint``
    (the pipeline's "rerun `lmforge run ...`"), else ``lmforge pretrain --config OUT/train_config.json --resume``."""
    from .._progress import bar as tqdm

    from ..data.loader import ShardLoader
    from ..evaluate.perplexity import evaluate_shards
    from ..infer.loop import generate

    check_config(cfg)  # before any tokenizer training or data reading
    if bool(cfg.data) == bool(cfg.text):
        raise ValueError("give exactly one of data (shards from `lmforge data prepare`) or text (a text file)")
    mcfg = model_config(cfg)  # before any data or tokenizer work
    if cfg.data:  # a mistyped or unprepared --data fails before the run directory is made
        from ..data.shards import load_manifest

        load_manifest(cfg.data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    resume_ck = latest_checkpoint(out)
    if resume_ck is not None and not cfg.resume:
        raise ValueError(f"{out} already holds a run (checkpoint {resume_ck.name}); pass --resume to continue it "
                         "or choose another --out")
    # data and tokenizer
    if cfg.text:
        data_dir = out / "data"
        if resume_ck and (data_dir / "manifest.json").exists():
            tok, _ = _load_tokenizer_of(data_dir)
        else:
            tok = text_to_shards(cfg.text, cfg.tokenizer, data_dir, cfg.text_val_frac, cfg.text_test_frac)
    else:
        data_dir = Path(cfg.data)
        from ..data.shards import load_manifest

        load_manifest(data_dir)
        tok = _data_tokenizer(data_dir, cfg.tokenizer)
    # the model's special tokens: documents started with the manifest's doc token (--text: none), prompts too
    from ..tokenize.special import TokenSpec

    tm = json.loads((data_dir / "manifest.json").read_text()).get("tokenizer", {})
    spec = TokenSpec.for_tokenizer(tok, **({"doc": tm["doc_token_id"]} if "doc_token_id" in tm else {}))
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
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = Transformer(mcfg).to(device)
    apply_recompute(model, cfg.recompute)
    if not cfg.compile:
        skip_dynamo_import()
    opts = build_optimizers(model, cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(cfg.beta1, cfg.beta2), muon_lr=cfg.muon_lr)
    for opt in opts:
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
    ema = WeightEMA(model.parameters(), cfg.ema) if cfg.ema else None
    saved = opts + [ema] if ema is not None else opts  # what a checkpoint holds besides the model
    loader = ShardLoader(data_dir, "train", cfg.batch_size, cfg.seq_len, mode=cfg.loader, seed=cfg.seed)
    step, tokens, elapsed = 0, 0, 0.0
    if cfg.init == "bigram" and resume_ck is None:
        from ..data.loader import TokenStream
        from .ngram_init import bigram_init

        s = TokenStream(data_dir, "train")
        bigram_init(model, s.read(0, min(len(s), cfg.init_tokens)), scale=cfg.init_scale, seed=cfg.seed)
    resumed = None  # what this run restored, measured on the live objects (metrics.jsonl, final.json)
    bounds = {"max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens, "max_time": cfg.max_time}
    remap = None  # (p0, q0) when a resumed run's bounds changed (below)
    if resume_ck is not None:
        st = load_checkpoint(resume_ck, model, saved)
        step, tokens, elapsed = st["step"], st["tokens"], st["elapsed"]
        loader.load_state_dict(st["loader"])
        resumed = {"event": "resumed", "step": step, "checkpoint": resume_ck.relative_to(out).as_posix(),
                   "tokens": tokens, "loader_step": loader.step, "optimizer_state": state_summary(saved),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        # A resumed run whose bounds changed (e.g. a larger --max-time) continues its schedule from where
        # the checkpoint was (progress p0 under the old bounds) and stretches the rest over the new ones, so
        # the learning rate is continuous at the resume: progress = p0 + (1 - p0) (q - q0) / (1 - q0), q the
        # share of the new bounds (q0 at the resume). Unchanged bounds: p0 = q0, and progress is q itself.
        old = st.get("config") or {}
        p0, q0 = bound_progress(old, step, tokens, elapsed), bound_progress(bounds, step, tokens, elapsed)
        if old and abs(p0 - q0) > 1e-9 and p0 < 1 and q0 < 1:
            remap = (p0, q0)
            resumed["schedule"] = {"progress_at_checkpoint": round(p0, 6), "share_of_new_bounds": round(q0, 6)}
        n = sum(o["params_with_state"] for o in resumed["optimizer_state"])
        (logger.debug if quiet else logger.info)(
            f"resuming from {resume_ck}: step {step}, loader at batch {loader.step}, optimizer state of "
            f"{n} parameters restored")
    start_step = step
    metrics_path = out / "metrics.jsonl"
    _truncate_metrics(metrics_path, step)
    if resumed is not None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(resumed) + "\n")
    write_json(out / "train_config.json", {"train": asdict(cfg), "model": mcfg.to_dict()}, indent=1)
    fwd = model
    if cfg.compile:
        fwd = torch.compile(model)
    autocast = autocast_for(device, cfg.dtype)
    peak = cfg.peak_flops or measure_peak_flops(device)
    flops_tok = mcfg.flops_per_token(cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum

    def progress() -> float:
        q = bound_progress(bounds, step, tokens, elapsed)
        if remap is None:
            return q
        p0, q0 = remap
        return p0 + (1 - p0) * (q - q0) / (1 - q0)

    def log(rec: dict):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_eval(max_batches=None, split="val"):  # validation during training; test only once, at the end
        return evaluate_shards(model, data_dir, split, cfg.seq_len, batch_size=cfg.batch_size,
                               max_batches=cfg.eval_batches if max_batches is None else max_batches,
                               device=device, autocast=autocast)

    def checkpoint():
        save_checkpoint(out, model, saved, {"step": step, "tokens": tokens, "elapsed": elapsed,
                                           "loader": loader.state_dict(), "config": asdict(cfg)},
                        tokenizer=tok, keep=cfg.keep_checkpoints, tokens=spec)

    # the bar counts steps when steps bound the run, else percent of the bound that ends it first (with an ETA)
    by_steps = bool(cfg.max_steps) and not (cfg.max_tokens or cfg.max_time)
    bar = tqdm(total=cfg.max_steps if by_steps else 100, initial=step if by_steps else 0, desc="pretrain",
               disable=quiet, file=sys.stderr, dynamic_ncols=True,
               bar_format=None if by_steps else "{desc}: {n:.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    tb = _TensorBoard(out, step) if cfg.report_to == "tensorboard" else None
    model.train()
    last_loss = float("nan")
    router_log = _RouterLog() if mcfg.moe is not None else None  # MoE: the router metrics of each log line
    t_window, tok_window = time.perf_counter(), 0
    try:
        while progress() < 1.0:
            t0 = time.perf_counter()
            mult = lr_multiplier(progress(), step, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_frac)
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                b = loader.next()
                x = torch.from_numpy(b.x).to(device, non_blocking=True)
                y = torch.from_numpy(b.y).to(device, non_blocking=True)
                if autocast:
                    with autocast():
                        _, loss = fwd(x, y)
                else:
                    _, loss = fwd(x, y)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item()
                if router_log is not None:
                    router_log.add(model.router_metrics)
            loss_val = loss_sum / cfg.grad_accum
            if not math.isfinite(loss_val):
                raise NaNLossError(f"loss became {loss_val} at step {step + 1}; stopped without writing a "
                                   "checkpoint (the last good one is kept). Try a lower lr or grad_clip.")
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
            for opt in opts:
                opt.step()
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            tokens += tokens_per_step
            if ema is not None and progress() >= cfg.ema_start:
                ema.step()
            dt = time.perf_counter() - t0
            elapsed += dt
            tok_window += tokens_per_step
            last_loss = loss_val
            rec = {"step": step, "loss": round(loss_val, 6), "lr": opts[0].param_groups[0]["lr"],
                   "grad_norm": round(gnorm, 4), "tokens": tokens, "elapsed": round(elapsed, 3)}
            if step % cfg.log_every == 0 or step == 1:
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                rec.update(tokens_per_s=round(tps, 1), mfu=round(tps * flops_tok / peak, 4))
                t_window, tok_window = now, 0
                if router_log is not None:
                    rec.update(router_log.record())
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{100 * rec['mfu']:.0f}%")
            if cfg.eval_every and step % cfg.eval_every == 0:
                te = time.perf_counter()
                ev = run_eval()
                rec.update(val_loss=round(ev["loss"], 6), val_bpb=round(ev["bits_per_byte"], 6))
                elapsed += time.perf_counter() - te
            if cfg.sample_every and step % cfg.sample_every == 0:
                ids = spec.encode_prompt(tok, cfg.sample_prompt)
                prompt = ids[1:] if spec.add_bos and spec.bos is not None else ids
                sample = tok.decode(prompt + generate(model, ids, cfg.sample_tokens, seed=step,
                                                               stop=spec.stop))
                rec["sample"] = sample
            log(rec)
            if tb is not None:
                tb.add(rec, step)
            bar.update(1 if by_steps else max(0.0, min(100.0, 100 * progress()) - bar.n))
            if on_step is not None:
                on_step(step, rec)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt as e:
        bar.close()
        if tb is not None:
            tb.close()
        if step > start_step:
            checkpoint()  # nothing lost: the run resumes from this step
        ck = latest_checkpoint(out)
        hint = resume_hint or f"continue with: {resume_command(cfg)}"
        if ck is None:
            logger.warning(f"interrupted at step {step}, before the first step ended: no checkpoint; "
                           f"{hint} (it starts from the beginning)")
        else:
            logger.warning(f"interrupted at step {step}; checkpoint {ck} saved; {hint}")
        e.lmforge_told = True  # a caller (the pipeline) need not say it again
        raise
    except BaseException:
        if tb is not None:
            tb.close()
        raise
    bar.close()
    if ema is not None and ema.started():
        ema.copy_to_model()  # the run ends on the averaged weights: evaluated, checkpointed and saved
    ev = run_eval(cfg.final_eval_batches)
    # the reported number: the test split, read once the run is over (none in directories made before it existed)
    has_test = bool(json.loads((data_dir / "manifest.json").read_text())["splits"].get("test", {}).get("shards"))
    ev_test = run_eval(cfg.final_eval_batches, "test") if has_test else None
    checkpoint()
    from ..model import save as save_model

    save_model(model, out, tokenizer=tok, extra={"trained": {"steps": step, "tokens": tokens}}, tokens=spec)
    final = {"step": step, "tokens": tokens, "train_loss": last_loss, "val_loss": ev["loss"],
             "val_bpb": ev["bits_per_byte"],
             "test_loss": ev_test["loss"] if ev_test else None, "test_bpb": ev_test["bits_per_byte"] if ev_test else None,
             "elapsed": round(elapsed, 2),
             "wall": round(time.perf_counter() - t_start, 2), "params": model.num_params(),
             "peak_flops": peak, "ema": bool(ema is not None and ema.started()),
             "resumed_from_step": None if resumed is None else resumed["step"], "steps_this_run": step - start_step}
    write_json(out / "final.json", final, indent=1)
    if tb is not None:
        tb.add({"val_loss": final["val_loss"], "val_bpb": final["val_bpb"]}, step)
        tb.close()
    try:
        plot_metrics(metrics_path, out / "loss.png", final=final)
    except ImportError:
        logger.warning("no loss.png: matplotlib is not installed; pip install 'lmforge[plot]'")
    except Exception as e:  # a plot is a convenience, never a failure
        logger.warning(f"no loss.png: {type(e).__name__}: {e}")
    (logger.debug if quiet else logger.info)(
        f"saved the model to {out} (load it with lmforge.load({str(out)!r}) / "
        f"lmforge generate --checkpoint {out})")
    return final


def _truncate_metrics(path: Path, step: int) -> None:
    """Cut the metric lines after ``step`` (from a run that died after its last checkpoint).

    Cut in place: the lines up to ``step`` keep their bytes (the file is never rewritten);
    a last line cut short by a crash mid-write goes too."""
    if not path.exists():
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                done = line.endswith(b"\n") and json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                done = False
            if not done:
                break
            keep += len(line)
    if keep < path.stat().st_size:
        os.truncate(path, keep)


def loss_series(metrics_path: Path, final: dict | None = None) -> dict:
    """What ``loss.png`` draws, as data: ``train`` (step, loss) per step, ``train_smooth`` (a running
    mean over about 1/50 of the run) and ``validation`` (step, val_loss): the in-training evaluations,
    then the final one (final.json's ``val_loss``, over ``final_eval_batches``) at the last step, which
    replaces an in-training point at that same step. A run too short to evaluate during training still
    gets its final point."""
    recs = [r for r in map(json.loads, filter(str.strip, metrics_path.read_text().splitlines())) if "loss" in r]
    train_pts = [(r["step"], r["loss"]) for r in recs]
    loss = np.array([v for _, v in train_pts], dtype=float)
    k = max(1, len(loss) // 50)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid") if len(loss) else loss
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if final is not None and final.get("val_loss") is not None and final.get("step") is not None:
        val = [(s_, v) for s_, v in val if s_ != final["step"]] + [(final["step"], final["val_loss"])]
    return {"train": train_pts,
            "train_smooth": list(zip([s_ for s_, _ in train_pts][k - 1:], smooth.tolist())),
            "validation": val}


def plot_metrics(metrics_path: Path, png: Path, final: dict | None = None) -> dict:
    """Draw ``loss_series`` to ``png``; returns the series drawn. ``final`` (final.json's dict) adds the
    final validation point; without it, a final.json next to metrics.jsonl is read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if final is None and (Path(metrics_path).parent / "final.json").exists():
        final = json.loads((Path(metrics_path).parent / "final.json").read_text())
    series = loss_series(Path(metrics_path), final)
    fig, ax = plt.subplots(figsize=(7, 4))
    if series["train"]:
        ax.plot(*zip(*series["train"]), alpha=0.25, color="C0")
    if series["train_smooth"]:
        ax.plot(*zip(*series["train_smooth"]), color="C0", label="train")
    if series["validation"]:
        ax.plot(*zip(*series["validation"]), "o-", color="C1", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return series
