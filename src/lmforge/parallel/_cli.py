"""The ``lmforge plan`` subcommand: the memory planner's arguments and its table.

Knows the flags and how the plan prints (a table, or JSON with ``--json``); the arithmetic is
``parallel.plan``'s (imported when the command runs), and nothing here knows any strategy's code.
"""
from __future__ import annotations

import json


def cmd_plan(a) -> int:
    from .._config import UsageError
    from .plan import format_plan, parse_memory, plan, shape_of

    try:
        shape = shape_of(preset=a.preset, config=a.config, params=a.params, n_layer=a.layers, d_model=a.hidden,
                         n_head=a.heads, vocab_size=a.vocab)
        p = plan(shape, a.gpus, parse_memory(a.gpu_memory), strategies=[a.strategy], seq_len=a.seq_len,
                 micro_batch=a.micro_batch, recompute=a.recompute, tp=a.tp, optimizer=a.optimizer,
                 precision=a.precision, sequence_parallel=a.sequence_parallel)
    except ValueError as e:
        raise UsageError(str(e)) from e
    print(json.dumps(p) if a.json else format_plan(p))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-device memory of each parallel strategy, and the largest micro-batch that fits",
        description="Estimate per-device GB (1e9 bytes) for parameters, gradients, optimizer states and "
        "activations under DDP, ZeRO-1/2/3, FSDP2 and tensor parallel (the ZeRO paper's model-state arithmetic, "
        "Korthikanti et al. 2022's activation formulas; docs/distributed.md), the largest micro-batch that fits, "
        "and a recommendation.",
        epilog="examples: lmforge plan --params 7.5e9 --gpus 64 --strategy all   (the ZeRO paper's Figure 1); "
        "lmforge plan --preset llama-1b --gpus 8 --gpu-memory 80GB --seq-len 4096 --recompute selective")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="an lmforge model preset (lmforge model info lists them)")
    src.add_argument("--config", help="a model directory or its config.json")
    src.add_argument("--params", type=float, help="a bare parameter count, e.g. 7.5e9")
    p.add_argument("--gpus", type=int, required=True, help="devices in all")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one device: 80GB, 24GiB, 512MB (default 80GB)")
    p.add_argument("--strategy", default="all", choices=("ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp+fsdp",
                                                         "all"))
    p.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (default: the model's max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per device per micro-batch (default 1)")
    p.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    p.add_argument("--tp", type=int, default=0,
                   help="tp+fsdp's tensor-parallel degree (default: 8, 4 or 2, what divides); tp uses every device")
    p.add_argument("--sequence-parallel", action="store_true", help="tp: norms and dropout on sequence shards")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "muon"))
    p.add_argument("--precision", default="mixed", choices=("mixed", "fp32"),
                   help="mixed: 16-bit weights and gradients, fp32 master and Adam states (K = 12); fp32: all fp32")
    p.add_argument("--layers", type=int, default=0, help="with --params: layers (for the activations)")
    p.add_argument("--hidden", type=int, default=0, help="with --params: hidden size")
    p.add_argument("--heads", type=int, default=0, help="with --params: attention heads")
    p.add_argument("--vocab", type=int, default=0, help="with --params: vocabulary size (the logits)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)
