"""A DeepSpeed JSON config, read as lmforge's training settings.

Knows DeepSpeed's config format (the keys its documentation lists: batch sizes, ``zero_optimization``,
``bf16`` / ``fp16``, ``optimizer``, ``scheduler``, clipping) and which ``LoopConfig`` fields each
becomes; knows nothing of DeepSpeed's code (it is not imported, nor needed) nor of the training
loop (helper code that applies the settings lives with the loop: ``cfg.deepspeed``).

``from_deepspeed(path_or_dict, world_size=None) -> {LoopConfig field: value}``. The mapping:

    zero_optimization.stage 0 / 1 / 2 / 3   parallel = ddp / zero1 / zero2 / fsdp
                                            (stage 3 -> torch's FSDP2, which overlaps its gathers and
                                            offloads; ``stage3="zero3"`` picks lmforge's readable ZeRO-3)
    zero_optimization.offload_optimizer /   cpu_offload = true (device "cpu"; stage 3 only: FSDP2's
      offload_param                         CPUOffloadPolicy moves parameters, gradients and optimizer
                                            states together; "nvme" is refused)
    train_micro_batch_size_per_gpu          batch_size (per data-parallel rank)
    gradient_accumulation_steps             grad_accum
    train_batch_size                        global_batch_size; DeepSpeed's rule holds:
                                            train_batch_size = micro x accumulation x world size (any two
                                            give the third; all three must agree)
    gradient_clipping                       grad_clip
    bf16.enabled / fp16.enabled             dtype = bf16 / fp16 (and fsdp_mixed_precision under stage 3)
    optimizer {type AdamW (or Adam with     optimizer = adamw, lr, beta1, beta2, weight_decay (eps must
      adam_w_mode true), params}            be lmforge's 1e-8)
    scheduler WarmupLR                      schedule = constant, warmup_steps (lr = warmup_max_lr)
    scheduler WarmupDecayLR                 schedule = wsd, decay_frac = 1 - warmup / total,
                                            min_lr_ratio = 0, max_steps = total_num_steps (exactly
                                            DeepSpeed's linear decay after the warmup)
    scheduler WarmupCosineLR                schedule = cosine, min_lr_ratio = cos_min_ratio,
                                            warmup_steps, max_steps = total_num_steps

**Unknown keys are errors** (a ``ValueError`` naming the JSON path, e.g. ``zero_optimization.stagee``);
**known keys lmforge does not act on warn** (``deepspeed_warnings`` returns them, ``from_deepspeed``
logs them, each with its path and why: DeepSpeed's bucket sizes, its loss scaler's settings, its
monitors). A value lmforge cannot honour (a stage 4, an optimizer other than AdamW, offload to
NVMe, an ``"auto"`` left for HF's Trainer to fill) is an error naming its path.

Differences kept in the warnings: DeepSpeed's warmup defaults to ``log`` (lmforge's is linear);
WarmupCosineLR's cosine runs over the steps after the warmup, lmforge's over the whole run.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger("lmforge.parallel")

STAGES = {0: "ddp", 1: "zero1", 2: "zero2", 3: "fsdp"}

# known keys lmforge reads no setting from: path -> why it is ignored
IGNORED = {
    "steps_per_print": "lmforge logs every log_every steps",
    "wall_clock_breakdown": "DeepSpeed's timers",
    "dump_state": "DeepSpeed's debugging",
    "memory_breakdown": "DeepSpeed's debugging (lmforge plan, Strategy.memory_bytes)",
    "prescale_gradients": "lmforge averages gradients as the loop's contract says",
    "gradient_predivide_factor": "lmforge averages gradients as the loop's contract says",
    "zero_allow_untested_optimizer": "DeepSpeed's own optimizer check",
    "zero_force_ds_cpu_optimizer": "DeepSpeed's CPU Adam",
    "communication_data_type": "gradients reduce in their own dtype (fp32 under FSDP2's policy)",
    "tensorboard": "lmforge's report_to = tensorboard", "wandb": "a monitor", "csv_monitor": "a monitor",
    "comms_logger": "lmforge.parallel.comm counts collectives", "flops_profiler": "lmforge reports MFU",
    "activation_checkpointing": "DeepSpeed's checkpointing API; lmforge's recompute setting does this",
    "zero_optimization.contiguous_gradients": "a DeepSpeed buffer layout",
    "zero_optimization.overlap_comm": "FSDP2 overlaps on its own",
    "zero_optimization.reduce_scatter": "lmforge's ZeRO-2/3 always reduce-scatter",
    "zero_optimization.reduce_bucket_size": "a DeepSpeed bucket size",
    "zero_optimization.allgather_partitions": "lmforge always all-gathers",
    "zero_optimization.allgather_bucket_size": "a DeepSpeed bucket size",
    "zero_optimization.round_robin_gradients": "a DeepSpeed layout",
    "zero_optimization.sub_group_size": "a DeepSpeed layout",
    "zero_optimization.stage3_prefetch_bucket_size": "FSDP2 prefetches one block ahead",
    "zero_optimization.stage3_param_persistence_threshold": "FSDP2 shards every block's parameters",
    "zero_optimization.stage3_max_live_parameters": "FSDP2 frees each block after use",
    "zero_optimization.stage3_max_reuse_distance": "FSDP2 frees each block after use",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "lmforge export consolidates checkpoints",
    "zero_optimization.offload_optimizer.pin_memory": "FSDP2 pins offloaded memory itself",
    "zero_optimization.offload_param.pin_memory": "FSDP2 pins offloaded memory itself",
    "zero_optimization.offload_optimizer.buffer_count": "NVMe offload only",
    "zero_optimization.offload_param.buffer_count": "NVMe offload only",
    "zero_optimization.offload_optimizer.fast_init": "NVMe offload only",
    "zero_optimization.offload_optimizer.ratio": "a partial offload (lmforge offloads all or nothing)",
    "fp16.loss_scale": "lmforge does not scale the loss (prefer bf16)",
    "fp16.initial_scale_power": "lmforge does not scale the loss (prefer bf16)",
    "fp16.loss_scale_window": "lmforge does not scale the loss (prefer bf16)",
    "fp16.hysteresis": "lmforge does not scale the loss (prefer bf16)",
    "fp16.consecutive_hysteresis": "lmforge does not scale the loss (prefer bf16)",
    "fp16.min_loss_scale": "lmforge does not scale the loss (prefer bf16)",
    "fp16.auto_cast": "lmforge autocasts under dtype = fp16",
    "bf16.immediate_grad_update": "a DeepSpeed buffer option",
    "optimizer.params.torch_adam": "lmforge's AdamW is its own",
    "optimizer.params.amsgrad": None,  # (checked: only false)
}
IGNORED_OBJECTS = {"tensorboard", "wandb", "csv_monitor", "comms_logger", "flops_profiler", "activation_checkpointing"}
MAPPED = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "zero_optimization.stage", "zero_optimization.offload_optimizer",
    "zero_optimization.offload_param", "zero_optimization.offload_optimizer.device",
    "zero_optimization.offload_param.device", "bf16", "bf16.enabled", "fp16", "fp16.enabled",
    "optimizer", "optimizer.type", "optimizer.params", "optimizer.params.lr", "optimizer.params.betas",
    "optimizer.params.eps", "optimizer.params.weight_decay", "optimizer.params.adam_w_mode",
    "scheduler", "scheduler.type", "scheduler.params",
}
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "total_num_steps",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"warmup_min_ratio", "cos_min_ratio", "warmup_num_steps", "warmup_type", "total_num_steps",
                       "last_batch_iteration"},
}
LMFORGE_EPS = 1e-8


def _load(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return path_or_dict, "the DeepSpeed config"
    p = Path(path_or_dict)
    if not p.exists():
        raise FileNotFoundError(f"deepspeed = {str(p)!r}: no such file")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not a JSON DeepSpeed config ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{p}: a DeepSpeed config is a JSON object, got {type(d).__name__}")
    return d, str(p)


def _walk(d: dict, prefix: str = ""):
    """(path, value) of every key, nested objects included (their own path first)."""
    for k, v in d.items():
        path = f"{prefix}{k}"
        yield path, v
        if isinstance(v, dict) and path != "scheduler.params":
            yield from _walk(v, path + ".")


def _world_size(world_size) -> int:
    if world_size is not None:
        return int(world_size)
    from .env import dist_env

    return dist_env()[1]


def deepspeed_warnings(path_or_dict, world_size: int | None = None, stage3: str = "fsdp") -> tuple[dict, list[str]]:
    """(settings, warnings): ``from_deepspeed``'s settings and the known-but-ignored keys, each
    "path: why"."""
    d, src = _load(path_or_dict)
    warns: list[str] = []

    def bad(path, msg):
        raise ValueError(f"{src}: {path}: {msg}")

    def num(path, v, kind=int, lo=None, positive=False):
        if v == "auto":
            bad(path, "'auto' is filled in by HF's Trainer; give a number")
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
        if not ok:
            bad(path, f"expected {'an integer' if kind is int else 'a number'}, got {v!r}")
        v = kind(v)
        if positive and v <= 0:
            bad(path, f"expected a positive value, got {v}")
        if lo is not None and v < lo:
            bad(path, f"expected >= {lo}, got {v}")
        return v

    for path, v in _walk(d):
        if path in MAPPED:
            continue
        if path.startswith("scheduler.params."):
            continue  # checked against the scheduler's type below
        if path in IGNORED:
            if path == "optimizer.params.amsgrad":
                if v:
                    bad(path, "lmforge's AdamW has no AMSGrad")
                continue
            warns.append(f"{path}: ignored ({IGNORED[path]})")
            continue
        if path.split(".", 1)[0] in IGNORED_OBJECTS:
            continue  # inside an ignored object (tensorboard.output_path, ...): warned about once, above
        bad(path, "unknown DeepSpeed key (lmforge maps: " + ", ".join(sorted(k for k in MAPPED if "." not in k))
            + "; docs/distributed.md lists what each becomes)")

    out: dict = {}
    zo = d.get("zero_optimization", {})
    if not isinstance(zo, dict):
        bad("zero_optimization", f"expected an object, got {zo!r}")
    stage = num("zero_optimization.stage", zo.get("stage", 0), int)
    if stage not in STAGES:
        bad("zero_optimization.stage", f"expected 0, 1, 2 or 3, got {stage}")
    if stage3 not in ("fsdp", "zero3"):
        raise ValueError(f"from_deepspeed: stage3 must be 'fsdp' or 'zero3', got {stage3!r}")
    out["parallel"] = stage3 if stage == 3 else STAGES[stage]
    offload = False
    for which in ("offload_optimizer", "offload_param"):
        o = zo.get(which)
        if o is None:
            continue
        path = f"zero_optimization.{which}"
        if not isinstance(o, dict):
            bad(path, f"expected an object such as {{\"device\": \"cpu\"}}, got {o!r}")
        dev = o.get("device", "none")
        if dev in ("none", None):
            continue
        if dev == "nvme":
            bad(f"{path}.device", "offload to NVMe is not supported (use \"cpu\")")
        if dev != "cpu":
            bad(f"{path}.device", f"expected \"cpu\", \"nvme\" or \"none\", got {dev!r}")
        if stage != 3 or out["parallel"] != "fsdp":
            bad(f"{path}.device", f"CPU offload needs zero_optimization.stage 3 (FSDP2's CPUOffloadPolicy); "
                                  f"lmforge's {out['parallel']} keeps everything on the device")
        offload = True
    if offload:
        out["cpu_offload"] = True
        if not (isinstance(zo.get("offload_optimizer"), dict) and isinstance(zo.get("offload_param"), dict)):
            warns.append("zero_optimization.offload_*: FSDP2 offloads parameters, gradients and optimizer states "
                         "together (DeepSpeed can offload one of them alone)")

    # batch sizes: train_batch_size = micro x accumulation x world size
    tbs, mb, ga = (d.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                      "gradient_accumulation_steps"))
    tbs = None if tbs is None else num("train_batch_size", tbs, int, positive=True)
    mb = None if mb is None else num("train_micro_batch_size_per_gpu", mb, int, positive=True)
    ga = None if ga is None else num("gradient_accumulation_steps", ga, int, positive=True)
    _batches(out, (tbs, mb, ga), _world_size(world_size), src)

    if "gradient_clipping" in d:
        out["grad_clip"] = num("gradient_clipping", d["gradient_clipping"], float, lo=0.0)

    bf16 = d.get("bf16", {})
    fp16 = d.get("fp16", {})
    for name, sec in (("bf16", bf16), ("fp16", fp16)):
        if not isinstance(sec, dict):
            bad(name, f"expected an object such as {{\"enabled\": true}}, got {sec!r}")
        if "enabled" in sec and not isinstance(sec["enabled"], bool) and sec["enabled"] != "auto":
            bad(f"{name}.enabled", f"expected true or false, got {sec['enabled']!r}")
        if sec.get("enabled") == "auto":
            bad(f"{name}.enabled", "'auto' is filled in by HF's Trainer; give true or false")
    if bf16.get("enabled") and fp16.get("enabled"):
        bad("fp16.enabled", "bf16 and fp16 are both enabled; enable one")
    if bf16.get("enabled") or fp16.get("enabled"):
        dt = "bf16" if bf16.get("enabled") else "fp16"
        out["dtype"] = dt
        if out["parallel"] == "fsdp":
            out["fsdp_mixed_precision"] = dt
    else:
        out["dtype"] = "fp32"

    opt = d.get("optimizer")
    if opt is not None:
        if not isinstance(opt, dict):
            bad("optimizer", f"expected an object with type and params, got {opt!r}")
        typ = str(opt.get("type", ""))
        params = opt.get("params", {}) or {}
        if not isinstance(params, dict):
            bad("optimizer.params", f"expected an object, got {params!r}")
        if typ.lower() == "adam":
            if params.get("adam_w_mode", True) is not True:
                bad("optimizer.params.adam_w_mode", "false (Adam with L2 regularization) is not supported; "
                                                    "lmforge's optimizer is AdamW (decoupled weight decay)")
        elif typ.lower() != "adamw":
            bad("optimizer.type", f"{typ!r} is not supported; expected AdamW (or Adam with adam_w_mode true)")
        out["optimizer"] = "adamw"
        if "lr" in params:
            out["lr"] = num("optimizer.params.lr", params["lr"], float, lo=0.0)
        if "betas" in params:
            b = params["betas"]
            if b == "auto" or not (isinstance(b, (list, tuple)) and len(b) == 2):
                bad("optimizer.params.betas", f"expected [beta1, beta2], got {b!r}")
            out["beta1"] = num("optimizer.params.betas[0]", b[0], float, lo=0.0)
            out["beta2"] = num("optimizer.params.betas[1]", b[1], float, lo=0.0)
        if "eps" in params:
            eps = num("optimizer.params.eps", params["eps"], float, lo=0.0)
            if abs(eps - LMFORGE_EPS) > 1e-15:
                bad("optimizer.params.eps", f"{eps:g}: lmforge's AdamW uses eps = {LMFORGE_EPS:g} (not a setting)")
        if "weight_decay" in params:
            out["weight_decay"] = num("optimizer.params.weight_decay", params["weight_decay"], float, lo=0.0)

    sch = d.get("scheduler")
    if sch is not None:
        if not isinstance(sch, dict):
            bad("scheduler", f"expected an object with type and params, got {sch!r}")
        typ = sch.get("type")
        if typ not in SCHEDULER_PARAMS:
            bad("scheduler.type", f"{typ!r} is not supported; expected one of {', '.join(SCHEDULER_PARAMS)}")
        sp = sch.get("params", {}) or {}
        if not isinstance(sp, dict):
            bad("scheduler.params", f"expected an object, got {sp!r}")
        for k in sp:
            if k not in SCHEDULER_PARAMS[typ]:
                known = ", ".join(sorted(SCHEDULER_PARAMS[typ]))
                bad(f"scheduler.params.{k}", f"unknown for {typ} (its params: {known})")
        if "last_batch_iteration" in sp:
            warns.append("scheduler.params.last_batch_iteration: ignored (a resumed lmforge run continues its own "
                         "schedule)")
        warm = num("scheduler.params.warmup_num_steps", sp.get("warmup_num_steps", 1000), int, lo=0)
        out["warmup_steps"] = warm
        wtype = sp.get("warmup_type", "log")
        if wtype not in ("log", "linear"):
            bad("scheduler.params.warmup_type", f"expected log or linear, got {wtype!r}")
        if wtype == "log":
            warns.append("scheduler.params.warmup_type: lmforge warms up linearly (DeepSpeed's default, and this "
                         "config's, is log)")
        if typ in ("WarmupLR", "WarmupDecayLR"):
            lo = num("scheduler.params.warmup_min_lr", sp.get("warmup_min_lr", 0.0), float, lo=0.0)
            if lo:
                warns.append(f"scheduler.params.warmup_min_lr: {lo:g} ignored (lmforge's warmup starts at "
                             "lr / warmup_steps)")
            if "warmup_max_lr" in sp:
                hi = num("scheduler.params.warmup_max_lr", sp["warmup_max_lr"], float, lo=0.0)
                if "lr" in out and abs(out["lr"] - hi) > 1e-12 * max(1.0, hi):
                    warns.append(f"scheduler.params.warmup_max_lr: {hi:g} is the peak (DeepSpeed's scheduler sets "
                                 f"it), not optimizer.params.lr {out['lr']:g}")
                out["lr"] = hi
        if typ == "WarmupLR":
            out["schedule"] = "constant"
        else:
            total = num("scheduler.params.total_num_steps", sp.get("total_num_steps"), int, positive=True) \
                if "total_num_steps" in sp else bad("scheduler.params.total_num_steps", f"{typ} needs it")
            if warm >= total:
                bad("scheduler.params.warmup_num_steps", f"{warm} is not below total_num_steps {total}")
            out["max_steps"] = total
            if typ == "WarmupDecayLR":
                out["schedule"], out["min_lr_ratio"], out["decay_frac"] = "wsd", 0.0, 1.0 - warm / total
            else:
                out["schedule"] = "cosine"
                out["min_lr_ratio"] = num("scheduler.params.cos_min_ratio", sp.get("cos_min_ratio", 0.0001), float,
                                          lo=0.0)
                wmin = num("scheduler.params.warmup_min_ratio", sp.get("warmup_min_ratio", 0.0), float, lo=0.0)
                if wmin:
                    warns.append(f"scheduler.params.warmup_min_ratio: {wmin:g} ignored (lmforge's warmup starts at "
                                 "lr / warmup_steps)")
                warns.append("scheduler WarmupCosineLR: lmforge's cosine runs over the whole run's progress, "
                              "DeepSpeed's over the steps after the warmup")
    return out, warns


def _batches(out: dict, given: tuple, world: int, src: str) -> None:
    tbs, mb, ga = given
    if world < 1:
        raise ValueError(f"{src}: world size {world}: expected >= 1")

    def bad(msg):
        raise ValueError(f"{src}: train_batch_size / train_micro_batch_size_per_gpu / gradient_accumulation_steps: "
                         f"{msg} (DeepSpeed requires train_batch_size = micro x accumulation x world size, "
                         f"world size {world})")
    if tbs is None and mb is None:
        if ga is not None:
            out["grad_accum"] = ga
        return
    if tbs is not None and mb is not None and ga is not None:
        if tbs != mb * ga * world:
            bad(f"{tbs} != {mb} x {ga} x {world}")
    elif tbs is not None and mb is not None:
        if tbs % (mb * world):
            bad(f"{tbs} is not a multiple of {mb} x {world}")
        ga = tbs // (mb * world)
    elif tbs is not None:
        ga = ga or 1
        if tbs % (ga * world):
            bad(f"{tbs} is not a multiple of {ga} x {world}")
        mb = tbs // (ga * world)
    else:
        ga = ga or 1
        tbs = mb * ga * world
    out.update(batch_size=mb, grad_accum=ga, global_batch_size=tbs)


def from_deepspeed(path_or_dict, world_size: int | None = None, stage3: str = "fsdp") -> dict:
    """The ``LoopConfig`` settings a DeepSpeed config asks for ({field: value}; the module docstring's
    mapping). ``world_size``: the data-parallel ranks (default: ``WORLD_SIZE`` of torchrun's
    environment, 1 without one). Unknown keys and values lmforge cannot honour raise a ValueError
    naming their JSON path; known keys it ignores are logged as warnings (``deepspeed_warnings``
    returns them)."""
    out, warns = deepspeed_warnings(path_or_dict, world_size, stage3)
    for w in warns:
        logger.warning("deepspeed config: %s", w)
    return out


def apply_deepspeed(cfg, given=(), world_size: int | None = None, stage3: str = "fsdp"):
    """A copy of ``cfg`` (a ``LoopConfig`` or a subclass) with the settings of its ``deepspeed`` config
    applied (unchanged when ``cfg.deepspeed`` is empty). ``given``: the fields the user set explicitly
    (flags, ``--set``, the config file); one of them that the DeepSpeed config sets to another value
    is a ValueError naming both, so neither silently wins."""
    import dataclasses

    if not getattr(cfg, "deepspeed", ""):
        return cfg
    settings = from_deepspeed(cfg.deepspeed, world_size=world_size, stage3=stage3)
    fields = {f.name for f in dataclasses.fields(cfg)}
    for k, v in settings.items():
        if k not in fields:
            raise ValueError(f"deepspeed = {cfg.deepspeed!r}: maps to {k!r}, which {type(cfg).__name__} lacks")
        if k in given and getattr(cfg, k) != v:
            raise ValueError(f"{k} = {getattr(cfg, k)!r} is set, and deepspeed = {cfg.deepspeed!r} asks for {v!r}: "
                             f"remove one of them")
    return dataclasses.replace(cfg, **settings)


def apply_for_run(cfg, given=None):
    """``apply_deepspeed`` as the commands call it: the world size from torchrun's environment (or the
    run's ``nproc`` x ``nnodes`` before the launch), ``given`` (None: every field off its default) the
    settings a user set, which the DeepSpeed config may not contradict. Returns (cfg, the fields it set)."""
    import dataclasses
    import os

    if not getattr(cfg, "deepspeed", ""):
        return cfg, set()
    if given is None:
        blank = type(cfg)()
        given = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(blank, f.name)}
    world = int(os.environ.get("WORLD_SIZE", "0") or 0) or max(1, cfg.nproc) * max(1, cfg.nnodes)
    new = apply_deepspeed(cfg, set(given) - {"deepspeed"}, world_size=world)
    return new, {f.name for f in dataclasses.fields(cfg) if getattr(new, f.name) != getattr(cfg, f.name)}
