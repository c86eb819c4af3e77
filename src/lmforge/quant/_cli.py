"""The ``lmforge quantize`` subcommand: flags -> a checked ``QuantConfig``; load the checkpoint, quantize
(``quant.api.quantize``), write the quantized directory (``quant.checkpoint.save_quantized``) with
``quant_report.json`` beside it, and print a per-layer summary and the sizes.

Knows the flags and the summary's wording; knows nothing of how any method quantizes.
"""
from __future__ import annotations

import json

from .._cli_common import _checkpoint, _settings

# flag attribute -> QuantConfig field (None values are left at their defaults)
_FIELDS = ("method", "bits", "granularity", "group_size", "fp8_format", "fp8_scale", "threshold", "alpha", "damp",
           "block_size", "awq_grid", "calib_samples", "calib_seq_len", "seed")


def _quant_config(a):
    from .config import QuantConfig, check_config

    cfg = QuantConfig()
    for k in _FIELDS:
        if getattr(a, k, None) is not None:
            setattr(cfg, k, getattr(a, k))
    if a.asym:
        cfg.sym = False
    for flag in ("activations", "act_order", "static_groups"):
        if getattr(a, flag):
            setattr(cfg, flag, True)
    if a.no_awq_clip:
        cfg.awq_clip = False
    if a.skip is not None:
        cfg.skip = list(a.skip)
    check_config(cfg)
    return cfg


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def summary(report: dict) -> str:
    """The per-layer table and the size line of a quantize report."""
    rows = [f"{'layer':<28} {'shape':>12} {'rel err':>9} {'bytes':>10}"]
    for name, st in report.get("layers", {}).items():
        shape = "x".join(str(s) for s in st.get("shape", [])) or "?"
        err = st.get("err")
        rows.append(f"{name:<28} {shape:>12} {err if err is None else format(err, '9.2e'):>9} "
                    f"{st.get('bytes', ''):>10}")
    layers = report.get("layers", {})
    lin_fp32 = sum(4 * st["shape"][0] * st["shape"][1] for st in layers.values() if len(st.get("shape", [])) == 2)
    lin_q = sum(st.get("bytes", 0) for st in layers.values())
    if lin_fp32 and lin_q:
        rows.append(f"quantized linears: {_mb(lin_fp32)} fp32 -> {_mb(lin_q)} ({lin_q * 8 / (lin_fp32 / 4):.2f} "
                    "bits per weight, scales and zero points included)")
    b = report.get("bytes", {})
    if b:
        ratio = b["before"] / max(b["after"], 1)
        rows.append(f"model: {_mb(b['before'])} -> {_mb(b['after'])} ({ratio:.2f}x smaller), "
                    f"{len(layers)} linears quantized with {report.get('method')}")
    return "\n".join(rows)


def cmd_quantize(a) -> int:
    from pathlib import Path

    from .._io import write_json
    from ..model import load, load_tokens
    from .api import quantize
    from .checkpoint import is_quantized, save_quantized

    with _settings():
        cfg = _quant_config(a)
        ckpt = _checkpoint(a.checkpoint)
        if is_quantized(ckpt):
            raise ValueError(f"--checkpoint {ckpt}: already quantized; quantize the fp32 model it came from")
        if Path(a.out).resolve() == Path(ckpt).resolve():
            raise ValueError(f"--out {a.out}: the same directory as --checkpoint; write the quantized model elsewhere")
    model, tok = load(ckpt)
    tokens = load_tokens(ckpt, tok) if tok is not None else None
    report = quantize(model, cfg, data_dir=a.data, progress=not a.quiet)
    out = save_quantized(model, a.out, tokenizer=tok, tokens=tokens)
    write_json(Path(out) / "quant_report.json", report, indent=1)
    if a.json:
        print(json.dumps(report))
    else:
        print(summary(report))
        print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantize a model's linears (RTN, FP8, LLM.int8, SmoothQuant, GPTQ, AWQ)",
        description="Load an lmforge model directory, quantize its linears (all but --skip, default lm_head) with "
        "--method and write a quantized model directory to --out (config.json with a quantization_config, "
        "model.safetensors with the codes and scales, the tokenizer, quant_report.json). GPTQ, AWQ and SmoothQuant "
        "calibrate on random windows of the training split of --data (never the test split). Prints a "
        "per-layer summary (relative weight error, bytes) and the size before and after.")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="the fp32 model directory to quantize")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="the quantized model directory to write")
    p.add_argument("--method", "-m", default=None, help="rtn (default), fp8, llm_int8, smoothquant, gptq, awq")
    p.add_argument("--bits", "-b", type=int, default=None,
                   help="integer bits (rtn/gptq/awq: 2..8, default 8; llm_int8, smoothquant and fp8: 8)")
    p.add_argument("--granularity", default=None, help="tensor, channel (default: one scale per output row) or "
                   "group (one per --group-size input columns)")
    p.add_argument("--group-size", type=int, default=None, metavar="N", help="columns per group (default 128)")
    p.add_argument("--asym", action="store_true", help="asymmetric codes with a zero point (default symmetric)")
    p.add_argument("--fp8-format", default=None, help="fp8: e4m3 (default) or e5m2")
    p.add_argument("--fp8-scale", default=None, help="fp8: tensor (default) or channel scales")
    p.add_argument("--activations", action="store_true",
                   help="fp8: also round activations to fp8 (dynamic per-tensor scale; simulated in fp32)")
    p.add_argument("--threshold", type=float, default=None, help="llm_int8: outlier threshold (default 6.0)")
    p.add_argument("--alpha", type=float, default=None, help="smoothquant: migration strength in [0, 1] (0.5)")
    p.add_argument("--damp", type=float, default=None, help="gptq: dampening, fraction of the mean Hessian "
                   "diagonal (default 0.01)")
    p.add_argument("--block-size", type=int, default=None, metavar="N", help="gptq: lazy-batch block (128)")
    p.add_argument("--act-order", action="store_true", help="gptq: columns in decreasing Hessian diagonal order")
    p.add_argument("--static-groups", action="store_true", help="gptq: group scales fixed before the updates")
    p.add_argument("--awq-grid", type=int, default=None, metavar="N", help="awq: alpha grid points (default 20)")
    p.add_argument("--no-awq-clip", action="store_true", help="awq: skip the clipping search")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="token shards of `lmforge data prepare` (calibration for gptq, awq, smoothquant)")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N", help="calibration windows (128)")
    p.add_argument("--calib-seq-len", type=int, default=None, metavar="T", help="tokens per window (256)")
    p.add_argument("--seed", type=int, default=None, help="calibration windows' seed (default 0)")
    p.add_argument("--skip", nargs="*", default=None, metavar="GLOB",
                   help="linears left in fp32 (globs over module names; default lm_head; `--skip` alone: none)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_quantize)
