"""``QuantConfig``: what to quantize and how (method, bits, granularity, the methods' knobs), as data, and
``check_config``, which refuses a bad setting with the field, the value and what was expected.

Knows the fields and their ranges; knows nothing of how a method uses them (``quant.rtn``, ``quant.gptq``...).
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields

METHODS = {"rtn": "lmforge.quant.rtn", "fp8": "lmforge.quant.rtn", "llm_int8": "lmforge.quant.llm_int8",
           "smoothquant": "lmforge.quant.smoothquant", "gptq": "lmforge.quant.gptq", "awq": "lmforge.quant.awq"}


@dataclass
class QuantConfig:
    method: str = "rtn"            # rtn | fp8 | llm_int8 | smoothquant | gptq | awq   (METHODS)
    bits: int = 8                  # rtn/gptq/awq: 2..8 (8/4/3 used); llm_int8/smoothquant/fp8: 8
    granularity: str = "channel"   # "tensor" | "channel" (per output row) | "group" (group_size input columns)
    group_size: int = 128          # used when granularity == "group"
    sym: bool = True               # False: asymmetric (zero point)
    fp8_format: str = "e4m3"       # fp8: "e4m3" | "e5m2"
    fp8_scale: str = "tensor"      # fp8: "tensor" | "channel"
    activations: bool = False      # fp8: also quantize activations (dynamic per-tensor scale), simulated in fp32
    threshold: float = 6.0         # llm_int8 outlier threshold
    alpha: float = 0.5             # smoothquant migration strength
    damp: float = 0.01             # gptq: dampening, fraction of the mean Hessian diagonal
    block_size: int = 128          # gptq lazy-batch block
    act_order: bool = False        # gptq
    static_groups: bool = False    # gptq
    awq_grid: int = 20             # awq: alpha grid points in [0, 1)
    awq_clip: bool = True          # awq: clipping search after scaling
    calib_samples: int = 128       # calibration windows (gptq, awq, smoothquant)
    calib_seq_len: int = 256
    seed: int = 0
    skip: list[str] = field(default_factory=lambda: ["lm_head"])  # globs of linears left unquantized

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """The config from a dict of its fields (missing ones take their defaults); an unknown key is a
        ValueError naming it (and the nearest field)."""
        if not isinstance(d, dict):
            raise ValueError(f"quantize: expected a table of QuantConfig fields, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for k in d:
            if k not in names:
                near = difflib.get_close_matches(str(k), names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"quantize: unknown field {k!r}{hint}; expected one of {', '.join(names)}")
        kw = dict(d)
        if "skip" in kw and isinstance(kw["skip"], (list, tuple)):
            kw["skip"] = list(kw["skip"])
        return cls(**kw)


def _bad(fname, value, expected):
    raise ValueError(f"quantize: {fname}: got {value!r}, expected {expected}")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: QuantConfig) -> None:
    """Every field in range, or ValueError ``"quantize: FIELD: got X, expected ..."``."""
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"quantize: expected a QuantConfig, got {type(cfg).__name__}")
    if cfg.method not in METHODS:
        near = difflib.get_close_matches(str(cfg.method), list(METHODS), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        _bad("method", cfg.method, f"one of {', '.join(METHODS)}{hint}")
    if not _is_int(cfg.bits):
        _bad("bits", cfg.bits, "an integer")
    if cfg.method in ("rtn", "gptq", "awq"):
        if not 2 <= cfg.bits <= 8:
            _bad("bits", cfg.bits, f"an integer in 2..8 for method {cfg.method} (8, 4 and 3 are the usual)")
    elif cfg.bits != 8:
        _bad("bits", cfg.bits, f"8 for method {cfg.method}")
    if cfg.granularity not in ("tensor", "channel", "group"):
        _bad("granularity", cfg.granularity, "one of tensor, channel, group")
    if not _is_int(cfg.group_size) or cfg.group_size <= 0:
        _bad("group_size", cfg.group_size, "a positive integer")
    for b in ("sym", "activations", "act_order", "static_groups", "awq_clip"):
        if not isinstance(getattr(cfg, b), bool):
            _bad(b, getattr(cfg, b), "true or false")
    if cfg.fp8_format not in ("e4m3", "e5m2"):
        _bad("fp8_format", cfg.fp8_format, "e4m3 or e5m2")
    if cfg.fp8_scale not in ("tensor", "channel"):
        _bad("fp8_scale", cfg.fp8_scale, "tensor or channel")
    if not _is_num(cfg.threshold) or not cfg.threshold > 0:
        _bad("threshold", cfg.threshold, "a number > 0")
    if not _is_num(cfg.alpha) or not 0.0 <= cfg.alpha <= 1.0:
        _bad("alpha", cfg.alpha, "a number in [0, 1]")
    if not _is_num(cfg.damp) or not cfg.damp > 0:
        _bad("damp", cfg.damp, "a number > 0 (a fraction of the mean Hessian diagonal, e.g. 0.01)")
    for n in ("block_size", "awq_grid", "calib_samples", "calib_seq_len"):
        if not _is_int(getattr(cfg, n)) or getattr(cfg, n) <= 0:
            _bad(n, getattr(cfg, n), "a positive integer")
    if not _is_int(cfg.seed):
        _bad("seed", cfg.seed, "an integer")
    if not isinstance(cfg.skip, list) or not all(isinstance(s, str) for s in cfg.skip):
        _bad("skip", cfg.skip, "a list of glob strings (e.g. ['lm_head'])")
