"""The training loop every stage shares: pre-training, SFT and the later preference, reward and RL stages.

Knows the order of a training step (fetch the step's ``grad_accum`` micro-batches, forward and
backward each with the loss normalized by the step's total ``n``, clip, optimizer steps, weight
average), the schedule and the bounds that end a run (and how a resumed run with changed bounds
continues its schedule), when to evaluate, sample and checkpoint, exact resume (a ``resumed`` line
in metrics.jsonl, ``resumed_from_step`` / ``steps_this_run`` in final.json), Ctrl-C (a checkpoint
and the command that continues), the NaN stop, the final validation and test evaluations,
final.json, metrics.jsonl, TensorBoard, the progress bar and loss.png. Knows nothing of what the
model computes, where batches come from or what the loss is: a ``Stage`` hands it those (its
model, optimizers, batches, loss, evaluation, artifacts), nor how the ranks of a distributed run
share the work: a ``lmforge.parallel`` strategy wraps the model and its optimizers, sums across
ranks, clips and steps (``parallel.base`` states the step it follows); one process is the
strategy "none".

``LoopConfig`` holds the knobs every stage shares; a stage's config (``TrainConfig``,
``SFTConfig``) is a dataclass that extends it. ``BaseStage`` gives the optional parts of the
``Stage`` protocol their do-nothing defaults.

Accumulation: a micro-batch states its loss normalizer ``n`` before the forward (pre-training:
its B*T targets; SFT: its trained tokens or its conversations); ``stage.loss`` returns the SUM of
the per-unit losses, the loop backpropagates ``sum / N`` with ``N`` the sum of the step's ``n``, so
``grad_accum`` micro-batches give the gradient of one batch holding them all, whatever their sizes.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .._io import write_json
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, state_summary
from .optim import WeightEMA, skip_dynamo_import
from .schedule import lr_multiplier

logger = logging.getLogger("lmforge.train")


@dataclass
class LoopConfig:
    """The knobs every training stage shares (``TrainConfig`` and ``SFTConfig`` extend it)."""
    out: str = "runs/run"  # the run directory (each stage's config gives its own default)
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
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
    seed: int = 1337
    threads: int = 0  # CPU threads for torch (0: leave torch's default)
    log_every: int = 10
    resume: bool = False  # continue the run in `out` from its latest checkpoint
    peak_flops: float = 0.0  # for MFU; 0: measure a matmul on this device
    ema: float = 0.0  # > 0: keep an exponential moving average of the weights (this decay per step) and end on it
    ema_start: float = 0.7  # ema: share of the run after which the average is kept
    report_to: str = "none"  # or "tensorboard": also write the metrics as event files under <out>/tensorboard/
    # parallelism (lmforge.parallel; docs/distributed.md). batch_size is per data-parallel rank.
    parallel: str = "none"  # none | ddp | fsdp | zero1 | zero2 | zero3 | tp | tp+fsdp
    nproc: int = 1  # processes on this machine: `lmforge pretrain --nproc N` launches them through torchrun
    nnodes: int = 1  # machines (torchrun's rendezvous; docs/distributed.md for Slurm)
    tp_size: int = 0  # tp / tp+fsdp: the tensor-parallel degree (0: tp uses every rank; tp+fsdp needs it)
    sequence_parallel: bool = False  # tp: norms and dropout on sequence shards (reduce-scatter / all-gather)
    fsdp_mixed_precision: str = "none"  # fsdp: none | bf16 | fp16 (parameters and compute; gradients reduce in fp32)
    cpu_offload: bool = False  # fsdp: parameters, gradients and optimizer state on the CPU (CPUOffloadPolicy)
    dist_backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    dist_timeout: float = 300.0  # seconds a collective or the rendezvous may wait before every rank fails
    global_batch_size: int = 0  # > 0: batch_size = this / (data-parallel ranks x grad_accum), which must divide it
    deepspeed: str = ""  # a DeepSpeed JSON config, mapped onto these settings (lmforge.parallel.deepspeed)


LOOP_CHOICES = {"optimizer": ("adamw", "muon"), "schedule": ("cosine", "wsd", "constant"),
                "dtype": ("auto", "fp32", "bf16", "fp16"), "report_to": ("none", "tensorboard")}


def _strategy_names() -> tuple:
    from ..parallel import STRATEGIES

    return tuple(STRATEGIES)


def check_loop_config(cfg: LoopConfig) -> None:
    """The generic settings, checked before any work: a bound, the choice strings, the weight
    average's range, positive sizes, no negative counts or periods. A stage's own check calls it
    first, then checks its own fields."""
    if not (cfg.max_steps or cfg.max_tokens or cfg.max_time):
        raise ValueError("give a bound: max_steps, max_tokens or max_time (e.g. --max-time 60)")
    for k, ok in LOOP_CHOICES.items():
        if getattr(cfg, k) not in ok:
            raise ValueError(f"{k}: expected one of {', '.join(ok)}, got {getattr(cfg, k)!r}")
    if cfg.report_to == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ValueError("report_to = 'tensorboard' needs the tensorboard package, which is not installed: "
                             "pip install 'lmforge[tensorboard]' (or set report_to = 'none')")
    if not (0.0 <= cfg.ema < 1.0 and 0.0 <= cfg.ema_start <= 1.0):
        raise ValueError(f"ema must be in [0, 1) and ema_start in [0, 1], got {cfg.ema} and {cfg.ema_start}")
    for k in ("batch_size", "seq_len", "grad_accum", "log_every"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k}: must be a positive integer, got {getattr(cfg, k)}")
    if cfg.parallel not in _strategy_names():
        raise ValueError(f"parallel: unknown strategy {cfg.parallel!r}; expected one of {', '.join(_strategy_names())}")
    for k in ("nproc", "nnodes"):
        if getattr(cfg, k) < 1:
            raise ValueError(f"{k}: must be a positive integer, got {getattr(cfg, k)}")
    if cfg.dist_timeout <= 0:
        raise ValueError(f"dist_timeout: must be > 0 seconds, got {cfg.dist_timeout}")
    for k in ("max_steps", "max_tokens", "max_time", "warmup_steps", "global_batch_size", "tp_size",
              "eval_every", "eval_batches",
              "final_eval_batches", "sample_every", "checkpoint_every", "threads", "grad_clip", "peak_flops"):
        if getattr(cfg, k) < 0:
            raise ValueError(f"{k}: must be >= 0 (0: {'off' if k.endswith('_every') else 'none / the default'}), "
                             f"got {getattr(cfg, k)}")


def per_rank_batch(cfg, strategy):
    """``cfg`` with ``batch_size`` per data-parallel rank: ``global_batch_size`` (> 0) / (dp_size x
    grad_accum), which must divide it (a ValueError naming both settings); with ``global_batch_size = 0``
    ``cfg`` itself (its batch_size is already per rank). A copy: the caller's config is not changed."""
    import dataclasses

    g = cfg.global_batch_size
    if not g:
        return cfg
    per = strategy.dp_size * cfg.grad_accum
    if g % per:
        raise ValueError(f"global_batch_size = {g} is not a multiple of the {strategy.dp_size} data-parallel rank(s) "
                         f"x grad_accum = {cfg.grad_accum} (= {per}): each rank's micro-batch must be whole; choose a "
                         f"global_batch_size divisible by {per}, or another grad_accum")
    return dataclasses.replace(cfg, batch_size=g // per)


@dataclass
class Batch:
    """One micro-batch, as a stage's batch source hands it to the loop."""
    inputs: dict  # str -> torch.Tensor: whatever the stage's loss reads, already on the device
    n: int  # the loss normalizer of this micro-batch, known before the forward (pretrain: B*T targets)
    tokens: int  # tokens processed (non-pad), for tokens/s and max_tokens
    trained: int = 0  # tokens that carry loss (SFT); logged as trained_tokens (cumulative)


@runtime_checkable
class Stage(Protocol):
    """What a stage hands the loop (``BaseStage`` has defaults for the optional parts)."""
    name: str  # "pretrain" | "sft" | ...: progress bar, messages
    model: torch.nn.Module  # what the loss calls; its state_dict is what checkpoints hold
    tokenizer: object  # saved into checkpoints (may be None)
    tokens: object  # the TokenSpec saved with the tokenizer (may be None)

    def optimizers(self, cfg) -> list: ...  # over the parameters this stage trains
    def next_batch(self) -> Batch: ...
    def loss(self, fwd, batch: Batch) -> torch.Tensor: ...  # the SUM over the batch's n normalizer units
    def evaluate(self, split: str, max_batches: int) -> dict: ...  # includes "loss"; logged as val_<key>
    def has_split(self, split: str) -> bool: ...
    def state_dict(self) -> dict: ...  # the batch source's position (part of exact resume)
    def load_state_dict(self, d: dict) -> None: ...
    def start(self, resumed: bool) -> None: ...  # before step 1
    def sample(self, step: int) -> str | None: ...
    def flops_per_token(self) -> float | None: ...
    def log_metrics(self) -> dict: ...
    def finish(self, out: Path, final: dict) -> dict: ...  # the stage's artifacts; extra final.json keys


class BaseStage:
    """Do-nothing defaults for the optional parts of ``Stage``: no test split, no samples, no MFU,
    no extra log fields, nothing to do at the start or the end. A stage that keeps a
    ``started = time.perf_counter()`` attribute has final.json's ``wall`` counted from then (its
    own set-up included) instead of from the loop's start."""
    name = "stage"
    tokenizer = None
    tokens = None

    def has_split(self, split: str) -> bool:
        return False

    def start(self, resumed: bool) -> None:
        return None

    def sample(self, step: int) -> str | None:
        return None

    def flops_per_token(self) -> float | None:
        return None

    def log_metrics(self) -> dict:
        return {}

    def finish(self, out: Path, final: dict) -> dict:
        return {}


class NaNLossError(RuntimeError):
    pass


# ---- the device ----

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
    g = torch.Generator(device=device).manual_seed(0)  # its own stream: the run's RNG state is left as it is
    a = torch.randn(n, n, device=device, generator=g)  # (a resumed run draws what an uninterrupted one draws)
    b = torch.randn(n, n, device=device, generator=g)
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


# ---- bounds, the run directory, metrics ----

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


def existing_run(cfg: LoopConfig) -> Path | None:
    """The checkpoint a run in ``cfg.out`` resumes from (None: a fresh run); a ValueError when the
    directory already holds a run and ``cfg.resume`` is off. A stage calls it before it writes
    anything into ``out`` (the loop calls it again)."""
    out = Path(cfg.out)
    ck = latest_checkpoint(out)
    if ck is not None and not cfg.resume:
        raise ValueError(f"{out} already holds a run (checkpoint {ck.name}); pass --resume to continue it "
                         "or choose another --out")
    return ck


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


class _TensorBoard:
    """The run's metrics as TensorBoard scalars (``report_to = "tensorboard"``), in ``<out>/tensorboard/``.
    A resumed run drops the events after its checkpoint's step (``purge_step``), as metrics.jsonl does.
    Other evaluation keys than these go to ``val/<key>``."""

    TAGS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
            "val_loss": "val/loss", "val_bpb": "val/bpb", "ce": "train/ce", "aux_loss": "moe/aux_loss",
            "z_loss": "moe/z_loss", "trained_tokens": "train/trained_tokens"}

    def __init__(self, out: Path, step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # checked in check_loop_config; a broken install still says what to do
            raise ValueError(f"report_to = 'tensorboard': {e}; pip install 'lmforge[tensorboard]'") from None
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=step or None)

    def add(self, rec: dict, step: int) -> None:
        for k, v in rec.items():
            tag = self.TAGS.get(k) or (f"val/{k[4:]}" if k.startswith("val_") else None)
            if tag is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.w.add_scalar(tag, v, step)

    def close(self) -> None:
        self.w.close()


# ---- checkpoints of any model ----

class _PlainWeights:
    """A model that is not an lmforge model (no ``cfg``), shown to checkpoint.py as one: its
    state_dict, under a config.json that only names its class (such a checkpoint resumes a run;
    it is not a model directory ``lmforge.load`` reads)."""

    class _Cfg:
        tie_embeddings = False
        vocab_size = 1 << 62

        def __init__(self, module):
            self.name = f"{type(module).__module__}.{type(module).__qualname__}"

        def to_dict(self) -> dict:
            return {"module": self.name}

    def __init__(self, module: torch.nn.Module):
        self.module, self.cfg = module, self._Cfg(module)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, sd, strict: bool = True):
        return self.module.load_state_dict(sd, strict=True)


def _checkpointable(model):
    return model if hasattr(getattr(model, "cfg", None), "to_dict") else _PlainWeights(model)


class _InterruptGuard:
    """Ctrl-C (SIGINT) held while the weights and the counters are updated: the update happens whole or
    not at all, so a checkpoint written on Ctrl-C always describes a step boundary. One handler for
    the whole run (installed by ``install``, removed by ``remove``): outside ``with guard:`` it raises
    KeyboardInterrupt at once, as Python's own does; inside, the KeyboardInterrupt comes when the block
    ends. Outside the main thread, or where another SIGINT handler is installed, it does nothing.

    ``defer=True`` (a run on several ranks): the handler never raises, it only records the Ctrl-C
    (``hit``); the loop sums that flag over the ranks with the step's loss, so every rank learns of a
    Ctrl-C on any of them at the same step and they stop together, at the end of that step, with one
    collective checkpoint (a KeyboardInterrupt raised at different points on different ranks would
    leave one rank waiting in a collective the others never join)."""

    def __init__(self, defer: bool = False):
        self.holding, self.hit, self.old, self.defer = False, False, None, defer

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.old = signal.signal(signal.SIGINT, self._handle)

    def remove(self) -> None:
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
            self.old = None

    def _handle(self, signum, frame):
        if self.defer:
            self.hit = True
            return
        if not self.holding:
            raise KeyboardInterrupt
        self.hit = True

    def __enter__(self):
        self.holding = True
        return self

    def __exit__(self, *exc):
        self.holding = False
        if self.hit and not self.defer:
            self.hit = False
            if exc[0] is None:
                raise KeyboardInterrupt
        return False


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), random.getstate(), cuda


def _set_rng_state(st: tuple) -> None:
    torch.set_rng_state(st[0])
    random.setstate(st[1])
    if st[2] is not None:
        torch.cuda.set_rng_state(st[2])


def _scalar(x, what: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{what}: expected a number or a one-element tensor, got shape {tuple(x.shape)}")
        return float(x.item())
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    raise ValueError(f"{what}: expected a number, got {type(x).__name__} {x!r}")


def _evaluate(stage, split: str, max_batches: int) -> dict:
    ev = stage.evaluate(split, max_batches)
    if not isinstance(ev, dict) or "loss" not in ev:
        raise ValueError(f"stage {stage.name!r}: evaluate({split!r}) returned {ev!r}; expected a dict with a "
                         "'loss' key (each key is logged as val_<key> / test_<key>)")
    out = {k: _scalar(v, f"stage {stage.name!r}: evaluate({split!r})[{k!r}]") for k, v in ev.items()}
    stage.model.train()
    return out


# ---- the loop ----

def _plain_class(model) -> type:
    """The model's own class under a wrapper's (FSDP2's ``fully_shard`` swaps in a subclass of it)."""
    for c in type(model).__mro__:
        if not c.__module__.startswith("torch."):
            return c
    return type(model)


def _dist_checkpoints():
    """``lmforge.parallel.checkpoint`` (the distributed checkpoints), or None where it is not there."""
    try:
        from ..parallel import checkpoint as pc
    except ImportError:
        return None
    return pc if hasattr(pc, "save_dist_checkpoint") else None


def run(cfg: LoopConfig, stage: Stage, *, on_step=None, quiet: bool = False, resume_hint: str | None = None,
        config_record: dict | None = None, command: str | None = None, strategy=None) -> dict:
    """Run (or resume, with ``cfg.resume``) ``stage``'s training in ``cfg.out``; returns final.json's dict.

    ``on_step(step, rec)`` sees each metrics line (on every rank); ``config_record`` is written as
    ``<out>/train_config.json`` (default ``{"train": asdict(cfg)}``); ``command`` is the command that
    continues the run, shown on Ctrl-C (``resume_hint`` replaces the whole hint). ``strategy``: the
    ``lmforge.parallel`` strategy of this process (None: ``make_strategy(cfg)``, which joins the process
    group torchrun describes); the stage's batch source must already read this rank's share
    (``strategy.dp_rank`` of ``strategy.dp_size``).

    On N ranks: every rank runs this function alike. Rank 0 alone writes metrics.jsonl,
    train_config.json, final.json, loss.png, TensorBoard, the progress bar and the log lines, and calls
    ``stage.finish``; every rank evaluates (the same batches); only rank 0 samples, and not at all when
    the strategy shards the parameters. Everything that decides the control flow is the same on every
    rank: the step's normalizer, tokens and loss are summed over the ranks, the time bound is rank 0's
    clock, a Ctrl-C on any rank is agreed on with the step's loss (``_InterruptGuard(defer=True)``)."""
    check_loop_config(cfg)
    if strategy is None:
        from ..parallel import make_strategy

        strategy = make_strategy(cfg)
    dist_run = strategy.world_size > 1
    main = strategy.is_main
    say = logger.debug if (quiet or not main) else logger.info
    quiet = quiet or not main  # (the progress bar: rank 0's)
    try:
        return _run(cfg, stage, strategy, dist_run, main, say, on_step=on_step, quiet=quiet,
                    resume_hint=resume_hint, config_record=config_record, command=command)
    finally:
        if dist_run:
            strategy.close()


def _run(cfg, stage, strategy, dist_run, main, say, *, on_step, quiet, resume_hint, config_record, command):
    from .._progress import bar as tqdm

    t_start = getattr(stage, "started", None) or time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = strategy.device if dist_run else pick_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()
    resume_ck = existing_run(cfg)
    model = stage.model
    if not cfg.compile:
        skip_dynamo_import()
    strategy.check(model)  # the same ValueError on every rank, before any collective
    stage.start(resume_ck is not None)  # (before the wrap: a bigram initialization writes whole tensors)
    fwd = strategy.wrap(model)  # the optimizers are built over the wrapped model's parameters
    opts = list(strategy.wrap_optimizers(model, list(stage.optimizers(cfg))))
    if not opts:
        raise ValueError(f"stage {stage.name!r}: optimizers() returned no optimizer")
    for opt in opts:
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
    ema = WeightEMA(strategy.ema_params(model), cfg.ema) if cfg.ema else None
    saved = opts + [ema] if ema is not None else opts  # what a checkpoint holds besides the model
    ck_model = _checkpointable(model)
    # cfg.parallel != "none": the distributed checkpoints (lmforge.parallel.checkpoint), which load at any
    # world size; "none": the single-process format, unchanged
    pc = _dist_checkpoints() if cfg.parallel != "none" else None
    step, tokens, trained, elapsed = 0, 0, 0, 0.0
    resumed = None  # what this run restored, measured on the live objects (metrics.jsonl, final.json)
    bounds = {"max_steps": cfg.max_steps, "max_tokens": cfg.max_tokens, "max_time": cfg.max_time}
    remap = None  # (p0, q0) when a resumed run's bounds changed (below)
    if resume_ck is not None:
        if pc is not None and pc.is_dist_checkpoint(resume_ck):
            st = pc.load_dist_checkpoint(resume_ck, strategy, model, saved)
        else:
            st = load_checkpoint(resume_ck, ck_model, saved)
        step, tokens, elapsed = st["step"], st["tokens"], st["elapsed"]
        trained = st.get("trained_tokens", 0)
        stage.load_state_dict(st["loader"])
        pos = stage.state_dict()
        resumed = {"event": "resumed", "step": step, "checkpoint": resume_ck.relative_to(out).as_posix(),
                   "tokens": tokens, "loader_step": pos.get("step"), "optimizer_state": state_summary(saved),
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if dist_run:
            resumed["world_size"] = strategy.world_size
        if trained:
            resumed["trained_tokens"] = trained
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
        say(f"resuming from {resume_ck}: step {step}, loader at batch {pos.get('step', '?')}, optimizer state of "
            f"{n} parameters restored")
    start_step = step
    metrics_path = out / "metrics.jsonl"
    if main:
        _truncate_metrics(metrics_path, step)
        if resumed is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(resumed) + "\n")
        write_json(out / "train_config.json", config_record if config_record is not None else {"train": asdict(cfg)},
                   indent=1)
    fwd = torch.compile(fwd) if cfg.compile else fwd
    autocast = autocast_for(device, cfg.dtype)
    flops_tok = stage.flops_per_token()
    peak = cfg.peak_flops or (measure_peak_flops(device) if flops_tok is not None and main else None)
    has_val = stage.has_split("val")  # (a stage without one: no validation lines, val_loss null in final.json)
    sync_time = dist_run and bool(cfg.max_time)  # the time bound is rank 0's clock: no rank steps alone

    def agreed(seconds: float) -> float:
        return strategy.broadcast([seconds])[0] if sync_time else seconds

    def progress() -> float:
        q = bound_progress(bounds, step, tokens, elapsed)
        if remap is None:
            return q
        p0, q0 = remap
        return p0 + (1 - p0) * (q - q0) / (1 - q0)

    def log(rec: dict):
        if main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint(position: dict | None = None):  # collective on N ranks
        state = {"step": step, "tokens": tokens, "elapsed": elapsed,
                 "loader": stage.state_dict() if position is None else position, "config": asdict(cfg)}
        if trained:
            state["trained_tokens"] = trained
        if pc is not None:
            pc.save_dist_checkpoint(out, strategy, model, saved, state, tokenizer=stage.tokenizer,
                                    tokens=stage.tokens, keep=cfg.keep_checkpoints)
            return
        if dist_run and strategy.shards_params:
            raise RuntimeError(f"parallel = {cfg.parallel!r} shards the parameters: its checkpoints need "
                               "lmforge.parallel.checkpoint, which this installation lacks")
        # one process, or (without parallel.checkpoint) ranks that all hold the same full state: rank 0
        # writes the single-process format, the others wait for it
        if main:
            save_checkpoint(out, ck_model, saved, state, tokenizer=stage.tokenizer, keep=cfg.keep_checkpoints,
                            tokens=stage.tokens)
        strategy.barrier()

    # the bar counts steps when steps bound the run, else percent of the bound that ends it first (with an ETA)
    by_steps = bool(cfg.max_steps) and not (cfg.max_tokens or cfg.max_time)
    bar = tqdm(total=cfg.max_steps if by_steps else 100, initial=step if by_steps else 0, desc=stage.name,
               disable=quiet, file=sys.stderr, dynamic_ncols=True,
               bar_format=None if by_steps else "{desc}: {n:.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")
    tb = _TensorBoard(out, step) if cfg.report_to == "tensorboard" and main else None
    model.train()
    last_loss = float("nan")
    t_window, tok_window = time.perf_counter(), 0
    before = None  # (batch source state, RNG) at the start of the step in progress; None between steps
    pending = None  # the step's metrics line until it is written
    guard = _InterruptGuard(defer=dist_run)
    stop_agreed = False  # N ranks: a Ctrl-C every rank learnt of at the same step
    guard.install()
    try:
        while progress() < 1.0:
            t0 = time.perf_counter()
            before = (copy.deepcopy(stage.state_dict()), _rng_state())
            mult = lr_multiplier(progress(), step, cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_frac)
            for opt in opts:
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * mult
            batches = [stage.next_batch() for _ in range(cfg.grad_accum)]
            for b in batches:
                if not isinstance(b, Batch):
                    raise TypeError(f"stage {stage.name!r}: next_batch() returned {type(b).__name__}; expected "
                                    "lmforge.train.loop.Batch")
            # the global normalizer, tokens and trained tokens of the step (summed over the ranks' shares)
            sums = strategy.all_sum([sum(b.n for b in batches), sum(b.tokens for b in batches),
                                     sum(b.trained for b in batches)])
            N, step_tokens, step_trained = sums[0], int(round(sums[1])), int(round(sums[2]))
            if N == int(N):
                N = int(N)
            if N <= 0:
                raise ValueError(f"stage {stage.name!r}: step {step + 1}: its {cfg.grad_accum} micro-batch(es) have "
                                 f"n = {[b.n for b in batches]}; expected a positive total (the loss normalizer: "
                                 "units that carry loss)")
            scale = strategy.grad_scale if dist_run else 1.0
            loss_sum = 0.0
            for i, b in enumerate(batches):
                with strategy.micro_batch(fwd, last=i == len(batches) - 1):
                    if autocast:
                        with autocast():
                            loss = stage.loss(fwd, b)
                    else:
                        loss = stage.loss(fwd, b)
                    if loss.dim() != 0:
                        raise ValueError(f"stage {stage.name!r}: loss() returned shape {tuple(loss.shape)}; expected "
                                         "a scalar (the SUM of the loss over the batch's n units)")
                    (loss * scale / N if dist_run else loss / N).backward()
                loss_sum += loss.item()
            if dist_run:  # one all-reduce: the loss and whether any rank saw a Ctrl-C
                loss_sum, votes = strategy.all_sum([loss_sum, 1.0 if guard.hit else 0.0])
                stop_agreed = votes > 0
            loss_val = loss_sum / N
            if not math.isfinite(loss_val):  # (the summed loss: every rank raises alike)
                raise NaNLossError(f"loss became {loss_val} at step {step + 1}; stopped without writing a "
                                   "checkpoint (the last good one is kept). Try a lower lr or grad_clip.")
            gnorm = strategy.clip_grad_norm(model, cfg.grad_clip)
            with guard:  # the update is whole or not at all (a Ctrl-C checkpoint is a step boundary)
                strategy.step(opts)
                strategy.zero_grad(opts)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                step += 1
                tokens += step_tokens
                trained += step_trained
                dt = agreed(time.perf_counter() - t0)
                elapsed += dt
                if ema is not None and progress() >= cfg.ema_start:
                    ema.step()
                tok_window += step_tokens
                last_loss = loss_val
                rec = {"step": step, "loss": round(loss_val, 6), "lr": opts[0].param_groups[0]["lr"],
                       "grad_norm": round(gnorm, 4), "tokens": tokens}
                if trained:
                    rec["trained_tokens"] = trained
                rec["elapsed"] = round(elapsed, 3)
                pending, before = rec, None
            if step % cfg.log_every == 0 or step == 1:
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                rec["tokens_per_s"] = round(tps, 1)
                post = {"loss": f"{loss_val:.3f}", "tok_s": f"{tps:,.0f}"}
                if flops_tok is not None and peak:  # (the ranks' tokens over the ranks' peak)
                    rec["mfu"] = round(tps * flops_tok / (peak * strategy.world_size), 4)
                    post["mfu"] = f"{100 * rec['mfu']:.0f}%"
                t_window, tok_window = now, 0
                rec.update(stage.log_metrics() or {})
                bar.set_postfix(**post)
            if cfg.eval_every and step % cfg.eval_every == 0 and has_val:
                te = time.perf_counter()
                ev = _evaluate(stage, "val", cfg.eval_batches)
                rec.update({f"val_{k}": round(v, 6) for k, v in ev.items()})
                elapsed += agreed(time.perf_counter() - te)
            if cfg.sample_every and step % cfg.sample_every == 0 and main and not strategy.shards_params:
                sample = stage.sample(step)
                model.train()
                if sample is not None:
                    rec["sample"] = sample
            log(rec)
            pending = None
            if tb is not None:
                tb.add(rec, step)
            bar.update(1 if by_steps else max(0.0, min(100.0, 100 * progress()) - bar.n))
            if on_step is not None:
                on_step(step, rec)
            if stop_agreed:  # every rank is here, at this same step boundary
                raise KeyboardInterrupt
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt as e:
        guard.remove()  # (a second Ctrl-C now stops the checkpoint, as Python's own handler would)
        bar.close()
        if tb is not None:
            tb.close()
        if pending is not None:  # the step ended; its line (without what was cut short) is kept
            log(pending)
        hint = resume_hint or f"continue with: {command or resume_text(cfg)}"
        if dist_run and not stop_agreed:  # raised here alone: a checkpoint on N ranks is collective or nothing
            ck = latest_checkpoint(out)
            logger.warning(f"rank {strategy.rank}: interrupted at step {step} outside the agreed stop: no checkpoint "
                           f"written; the last is {ck if ck is not None else 'none'}; {hint}")
            e.lmforge_told = True
            raise
        if step > start_step:  # nothing lost: the run resumes from this step
            if before is not None:  # cut mid-step: the step's batches go back to the source, the RNG too
                _set_rng_state(before[1])
                checkpoint(before[0])
            else:
                checkpoint()
        ck = latest_checkpoint(out)
        if not main:
            pass
        elif ck is None:
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
    finally:
        guard.remove()
    bar.close()
    if ema is not None and ema.started():
        ema.copy_to_model()  # the run ends on the averaged weights: evaluated, checkpointed and saved
    ev = _evaluate(stage, "val", cfg.final_eval_batches) if has_val else {"loss": None}
    # the reported number: the test split, read once the run is over
    ev_test = _evaluate(stage, "test", cfg.final_eval_batches) if stage.has_split("test") else None
    checkpoint()
    final = {"step": step, "tokens": tokens}
    if trained:
        final["trained_tokens"] = trained
    final["train_loss"] = last_loss
    final.update({f"val_{k}": v for k, v in ev.items()})
    final.update({f"test_{k}": v for k, v in (ev_test or dict.fromkeys(ev)).items()})
    if dist_run:
        full = strategy.full_state_dict(model)  # collective; the whole model on rank 0
        if main and strategy.shards_params:  # the stage saves a plain model holding the full weights
            plain = _plain_class(model)(model.cfg)
            plain.load_state_dict(full)
            stage.model = model = plain
    params = model.num_params() if hasattr(model, "num_params") else \
        sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    final.update({"elapsed": round(elapsed, 2), "wall": round(time.perf_counter() - t_start, 2), "params": params,
                  "peak_flops": peak, "ema": bool(ema is not None and ema.started()),
                  "resumed_from_step": None if resumed is None else resumed["step"],
                  "steps_this_run": step - start_step})
    if dist_run or cfg.parallel != "none":
        final["parallel"] = strategy.describe()
    if main:
        extra = stage.finish(out, dict(final)) or {}
        final.update(extra)
        write_json(out / "final.json", final, indent=1)
        if tb is not None:
            tb.add({f"val_{k}": v for k, v in ev.items() if v is not None}, step)
            tb.close()
        try:
            plot_metrics(metrics_path, out / "loss.png", final=final)
        except ImportError:
            logger.warning("no loss.png: matplotlib is not installed; pip install 'lmforge[plot]'")
        except Exception as e:  # a plot is a convenience, never a failure
            logger.warning(f"no loss.png: {type(e).__name__}: {e}")
    strategy.barrier()  # the model directory is written when run returns, on every rank
    return final


def resume_text(cfg: LoopConfig) -> str:
    """The generic way to continue a run (a stage passes ``command`` to say its own)."""
    return f"rerun with resume = true (out = {cfg.out})"
