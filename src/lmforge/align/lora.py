"""LoRA: low-rank adapters swapped into an lmforge model from outside, saved and read in PEFT's format.

Knows how a LoRA adapts a linear map (y = W x + b + s * B A dropout(x), A (r, in), B (out, r), s =
alpha / r, or alpha / sqrt(r) with rsLoRA), how lmforge's fused linears split into the modules HF and
PEFT adapt one by one, and PEFT's files (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<HF module>.lora_A.weight``); knows nothing about training (the SFT stage optimizes
``lora_parameters(model)``) and the model never imports it (``model.surgery``'s rule: wrappers come
from outside).

**Units.** A PEFT adapter on ``q_proj`` and ``v_proj`` has its own (A, B) per projection, but lmforge's
attention has one fused ``qkv`` linear and its SwiGLU MLP one fused ``fc`` = [gate; up]. So a wrapped
linear (``LoRALinear``) holds one (A, B) per *unit*: a block of its output rows that is one module of
the HF export (``model.hf``'s weight rules say which). Llama family (llama, mistral, qwen2, qwen3,
mixtral, qwen2_moe): ``attn.qkv`` = units q, k, v (rows H*D, K*D, K*D); ``attn.proj`` = o; ``mlp.fc`` =
gate, up (SwiGLU; for ReLU², exported as gate_proj = up_proj = fc, one unit ``fc`` written as both);
``mlp.proj`` = down. GPT-2 (Conv1D modules, PEFT's ``fan_in_fan_out``): ``c_attn`` is one module, so
``attn.qkv`` is ONE unit ``qkv`` (targeting q, k or v adapts all three, as PEFT on GPT-2 does);
``c_proj`` = o, ``c_fc`` = up, ``mlp.c_proj`` = down. The layout follows ``LoRAConfig.arch``
(default the model's ``hf_family``; a model that exports nowhere as configured gets the closest:
Qwen2-MoE's with MoE layers, else Llama's for a gated MLP, else GPT-2's). MoE experts are 3-D
parameters, not linears, and transformers 5's routers are not linears PEFT can wrap: neither is
adapted (a shared expert's linears and gate are). The output head is never adapted.

**Target patterns** (``LoRAConfig.targets``; a unit is adapted when any pattern selects it; a pattern
that selects nothing is an error naming it):

* ``"all-linear"``: every unit except shared-expert gates (the default);
* a part name, ``q k v o gate up down`` (and ``shared_gate``): the units holding that part;
* a module name, lmforge's (``blocks.0.attn.qkv``, ``attn.proj``, ``qkv``) or the HF export's
  (``model.layers.0.self_attn.q_proj``, ``q_proj``, ``c_attn``): selected when it equals the name,
  is a dotted suffix of it (PEFT's rule: ``q_proj`` selects every layer's), or matches it as an
  ``fnmatch`` glob (``blocks.[01].*``, ``model.layers.*.mlp.*``); a lmforge module name selects all
  its units; ``blocks.0.attn.qkv:q`` (glob too) names one unit.

Init as PEFT: A kaiming-uniform (a = sqrt(5)), B zeros (the adapted model starts equal to the base).
Only adapter parameters require grad after ``apply_lora``. ``merge`` adds s B A into the base rows and
``unmerge`` subtracts the same product (exact to float rounding); ``merge_and_unload`` leaves plain
``nn.Linear``s holding the merged weights, every parameter trainable again. A wrapped model's state
dict keeps the base keys (``blocks.0.attn.qkv.weight``) and adds ``blocks.0.attn.qkv.lora_A.q`` /
``lora_B.q`` per unit. ``save_peft`` writes ``target_modules`` as the HF leaf names (``["q_proj",
"v_proj"]``) when those select exactly the adapted modules, else as a regex of their full names.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._io import read_json_object

__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "lora_parameters", "merge", "unmerge", "merge_and_unload",
           "save_peft", "load_peft", "lora_modules"]

PARTS = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate")
NOT_ALL_LINEAR = ("shared_gate",)  # what "all-linear" leaves out
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    r: int = 8  # rank
    alpha: float = 16  # the update is scaled by alpha / r (rsLoRA: alpha / sqrt(r))
    dropout: float = 0.0  # on the adapter's input, train mode only
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # patterns (module docstring)
    rslora: bool = False
    arch: str | None = None  # the HF family whose module layout the units follow (None: model.cfg.hf_family)

    def validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRAConfig.r: expected an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"LoRAConfig.alpha: expected a number > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRAConfig.dropout: expected a number in [0, 1), got {self.dropout!r}")
        t = self.targets
        if isinstance(t, str) or not t or not all(isinstance(p, str) and p for p in t):
            raise ValueError(f"LoRAConfig.targets: expected a non-empty list of pattern strings, got {t!r}")
        if not isinstance(self.rslora, bool):
            raise ValueError(f"LoRAConfig.rslora: expected true or false, got {self.rslora!r}")


def scale_of(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


# ---- the layout: lmforge linears -> units -> HF modules ------------------------------------------

@dataclass(frozen=True)
class Unit:
    """One adapted block of a linear's output rows: ``label`` (its key in the wrapper), the ``parts`` it
    holds (q, k, v, ...), its rows [start, stop), and the HF module(s) it is (two for ReLU²'s fc)."""
    label: str
    parts: tuple[str, ...]
    start: int
    stop: int
    hf: tuple[str, ...]
    fan_in_fan_out: bool = False


def _layout_arch(cfg, arch: str | None) -> str:
    from ..model.hf import FAMILIES, check_exportable

    if arch is not None:
        if arch not in FAMILIES:
            raise ValueError(f"LoRAConfig.arch: unknown HF family {arch!r}; expected one of {', '.join(FAMILIES)}")
        return arch
    try:
        check_exportable(cfg, cfg.hf_family)
        return cfg.hf_family
    except ValueError:  # exports nowhere as configured: the closest layout (save_peft then says why not)
        if cfg.moe is not None:
            return "qwen2_moe"
        return "llama" if cfg.ffn.activation in ("swiglu", "relu2") else "gpt2"


def _leaf_part(path: str) -> str:
    """The part a whole-module unit is, by the lmforge module's name."""
    if path.endswith("attn.proj"):
        return "o"
    if path.endswith("shared_gate"):
        return "shared_gate"
    if path.endswith("proj"):  # mlp.proj, mlp.shared.proj
        return "down"
    if path.endswith("fc"):  # a non-gated MLP's fc is the up projection
        return "up"
    return path.rsplit(".", 1)[-1]


def layout(model, arch: str | None = None) -> tuple[str, dict[str, list[Unit]]]:
    """(the layout's family, {lmforge linear name: its units}) for every adaptable linear of ``model``."""
    from ..model.hf import _fill, _walk

    cfg = model.cfg
    a = _layout_arch(cfg, arch)
    try:
        rules = {_fill(r.ours, i): (r, i, act) for r, i, act in _walk(cfg, a)}
    except KeyError as e:
        raise ValueError(f"LoRA: the {a} layout has no rules for this model's layer kind {e} "
                         f"(set LoRAConfig.arch to a family that expresses it)") from None
    out: dict[str, list[Unit]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name == "lm_head" or isinstance(mod, LoRALinear):
            if isinstance(mod, LoRALinear):
                out[name] = list(mod.units.values())
            continue
        hit = rules.get(name + ".weight")
        if hit is None or name.endswith("mlp.router"):  # (transformers 5's MoE routers are no linears PEFT wraps)
            continue
        r, i, act = hit
        hf = [_fill(t, i).removesuffix(".weight") for t in r.theirs]
        n_out = mod.out_features
        if r.how == "qkv":
            H, K, D = cfg.n_head, cfg.kv_heads, cfg.hd
            bounds = [0, H * D, H * D + K * D, H * D + 2 * K * D]
            units = [Unit(p, (p,), bounds[j], bounds[j + 1], (hf[j],)) for j, p in enumerate("qkv")]
        elif r.how == "gate_up" and act == "swiglu":
            h = n_out // 2
            units = [Unit("gate", ("gate",), 0, h, (hf[0],)), Unit("up", ("up",), h, n_out, (hf[1],))]
        elif r.how == "gate_up":  # relu2: gate_proj = up_proj = fc
            units = [Unit("fc", ("gate", "up"), 0, n_out, tuple(hf))]
        elif r.how == "t" and name.endswith("attn.qkv"):  # GPT-2's c_attn: one module
            units = [Unit("qkv", ("q", "k", "v"), 0, n_out, (hf[0],), True)]
        else:
            p = _leaf_part(name)
            units = [Unit(p, (p,), 0, n_out, (hf[0],), r.how == "t")]
        out[name] = units
    return a, out


def _selects(pat: str, name: str, unit: Unit) -> bool:
    if pat == "all-linear":
        return unit.label not in NOT_ALL_LINEAR
    if pat in PARTS:
        return pat in unit.parts
    if ":" in pat:
        return fnmatch.fnmatchcase(f"{name}:{unit.label}", pat)
    for n in (name, *unit.hf):
        if n == pat or n.endswith("." + pat) or fnmatch.fnmatchcase(n, pat):
            return True
    return False


# ---- the wrapper --------------------------------------------------------------------------------

class LoRALinear(nn.Linear):
    """An ``nn.Linear`` (the same weight and bias Parameters as the one it replaces, so every reference
    to them stays valid) plus one (A, B) per unit: ``lora_A[label]`` (r, in), ``lora_B[label]``
    (rows, r), scaled by ``scaling[label]``; dropout on the adapter input in train mode."""

    def __init__(self, base: nn.Linear, units: list[Unit], r: dict[str, int], scaling: dict[str, float],
                 dropout: float, arch: str, rslora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias  # (None registers an absent bias)
        self.units = {u.label: u for u in sorted(units, key=lambda u: u.start)}
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(r[k], self.in_features, device=dev, dtype=dt))
                                        for k in self.units})
        self.lora_B = nn.ParameterDict({k: nn.Parameter(torch.zeros(u.stop - u.start, r[k], device=dev, dtype=dt))
                                        for k, u in self.units.items()})
        for A in self.lora_A.values():
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.scaling = dict(scaling)
        self.lora_dropout = float(dropout)
        self.arch, self.rslora = arch, rslora  # (rslora: how save_peft writes the scale back as an alpha)
        self.merged = False
        self.train(base.training)  # (the mode of the model it joins)

    def extra_repr(self) -> str:
        u = ", ".join(f"{k}[{x.start}:{x.stop}] r={self.lora_A[k].shape[0]}" for k, x in self.units.items())
        return f"{super().extra_repr()}, lora=({u}), merged={self.merged}"

    def delta(self, label: str) -> torch.Tensor:
        """s B A of one unit, (rows, in), in float32."""
        return self.scaling[label] * (self.lora_B[label].float() @ self.lora_A[label].float())

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        segs, pos = [], 0
        for k, u in self.units.items():
            if u.start > pos:
                segs.append(y.new_zeros(*y.shape[:-1], u.start - pos))
            xd = F.dropout(x, self.lora_dropout, self.training) if self.lora_dropout else x
            segs.append(F.linear(F.linear(xd, self.lora_A[k]), self.lora_B[k]) * self.scaling[k])
            pos = u.stop
        if pos < self.out_features:
            segs.append(y.new_zeros(*y.shape[:-1], self.out_features - pos))
        return y + (torch.cat(segs, -1) if len(segs) > 1 else segs[0]).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            for k, u in self.units.items():
                self.weight[u.start:u.stop] += self.delta(k).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            for k, u in self.units.items():
                self.weight[u.start:u.stop] -= self.delta(k).to(self.weight.dtype)
            self.merged = False


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _install(model, plan: dict[str, list[Unit]], r: dict, scaling: dict, dropout: float, arch: str,
             rslora: bool) -> list[str]:
    """Swap each planned linear for a LoRALinear, freeze everything but the adapters; the unit names."""
    from ..model.surgery import replace_linear

    if lora_modules(model):
        raise ValueError("LoRA: the model already has LoRA adapters (merge_and_unload it, or start from a fresh "
                         "model)")

    def make(name, mod):
        return LoRALinear(mod, plan[name], r[name], scaling[name], dropout, arch, rslora)

    replace_linear(model, make, lambda n, m: n in plan)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    mods = lora_modules(model)
    return [n if (u.start, u.stop) == (0, mods[n].out_features) else f"{n}:{u.label}"
            for n in plan for u in mods[n].units.values()]


def apply_lora(model, cfg: LoRAConfig) -> list[str]:
    """Wrap the linears ``cfg.targets`` select (in place), freeze every other parameter; returns the
    adapted units, ``"blocks.0.attn.qkv:q"`` (a linear with several units) or ``"blocks.0.attn.proj"``.
    A pattern that selects nothing is a ValueError naming it and what names there are."""
    cfg.validate()
    arch, units = layout(model, cfg.arch)
    used = dict.fromkeys(cfg.targets, False)
    plan: dict[str, list[Unit]] = {}
    for name, us in units.items():
        for u in us:
            hits = [p for p in cfg.targets if _selects(p, name, u)]
            for p in hits:
                used[p] = True
            if hits:
                plan.setdefault(name, []).append(u)
    bad = [p for p, ok in used.items() if not ok]
    if bad:
        first = next(iter(units), None)
        eg = "" if first is None else (f"; e.g. lmforge {first!r}, HF {units[first][0].hf[0]!r}, parts "
                                       f"{sorted({p for us in units.values() for u in us for p in u.parts})}")
        raise ValueError(f"LoRAConfig.targets: {bad} select no adaptable linear of this model ({arch} layout; "
                         f"patterns: 'all-linear', part names {', '.join(PARTS)}, lmforge or HF module names or "
                         f"globs{eg})")
    s = scale_of(cfg.alpha, cfg.r, cfg.rslora)
    r = {n: {u.label: cfg.r for u in us} for n, us in plan.items()}
    scaling = {n: {u.label: s for u in us} for n, us in plan.items()}
    return _install(model, plan, r, scaling, cfg.dropout, arch, cfg.rslora)


def lora_parameters(model) -> list[torch.nn.Parameter]:
    """Every adapter parameter (each wrapped linear's A then B per unit, in module order)."""
    out = []
    for m in lora_modules(model).values():
        for k in m.units:
            out += [m.lora_A[k], m.lora_B[k]]
    return out


def merge(model) -> None:
    for m in lora_modules(model).values():
        m.merge()


def unmerge(model) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def merge_and_unload(model):
    """Merge every adapter into its weights and put plain ``nn.Linear``s (holding those weight and bias
    Parameters) back; every parameter requires grad again, as in a freshly built model. Returns ``model``."""
    for name, m in lora_modules(model).items():
        m.merge()
        lin = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(lin)
        lin.in_features, lin.out_features = m.in_features, m.out_features
        lin.weight, lin.bias = m.weight, m.bias
        lin.train(m.training)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, lin)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---- PEFT's format ----------------------------------------------------------------------------------

def _check_arch(model, mods: dict[str, LoRALinear], arch: str | None) -> str:
    """The family to save for: ``arch`` if the adapters' units are that family's modules, else an error."""
    from ..model.hf import check_exportable

    have = {m.arch for m in mods.values()}
    a = arch or (next(iter(have)) if len(have) == 1 else model.cfg.hf_family)
    try:
        check_exportable(model.cfg, a)
    except ValueError as e:
        raise ValueError(f"save_peft: the adapter is for the HF export, and {e}") from None
    _, want = layout(_Plain(model), a)
    for n, m in mods.items():
        theirs = {u.label: u for u in want.get(n, [])}
        for k, u in m.units.items():
            t = theirs.get(k)
            if t is None or (t.start, t.stop, t.hf) != (u.start, u.stop, u.hf):
                raise ValueError(f"save_peft: {n}:{k} was adapted in the {m.arch} layout, which is not {a}'s "
                                 f"(apply_lora with LoRAConfig(arch={a!r}))")
    return a


class _Plain:
    """A view of a model whose LoRALinears read as the plain linears (for ``layout`` under another arch)."""

    def __init__(self, model):
        self.cfg, self._m = model.cfg, model

    def named_modules(self):
        for n, m in self._m.named_modules():
            if isinstance(m, LoRALinear):
                lin = nn.Linear.__new__(nn.Linear)
                nn.Module.__init__(lin)
                lin.in_features, lin.out_features = m.in_features, m.out_features
                yield n, lin
            else:
                yield n, m


def _peft_config(r: int, alpha: float, rank_pattern: dict, alpha_pattern: dict, targets, dropout: float,
                 rslora: bool, fan_in_fan_out: bool, base: str) -> dict:
    """adapter_config.json as PEFT's LoraConfig writes it (the fields every recent PEFT reads; keys sorted)."""
    d = {"alpha_pattern": alpha_pattern, "auto_mapping": None, "base_model_name_or_path": base or None,
         "bias": "none", "exclude_modules": None, "fan_in_fan_out": fan_in_fan_out, "inference_mode": True,
         "init_lora_weights": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
         "loftq_config": {}, "lora_alpha": alpha, "lora_bias": False, "lora_dropout": dropout,
         "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
         "r": r, "rank_pattern": rank_pattern, "revision": None, "target_modules": targets,
         "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_dora": False, "use_rslora": rslora}
    return dict(sorted(d.items()))


def save_peft(model, out_dir, arch: str | None = None, base: str = "") -> Path:
    """Write ``out_dir/adapter_config.json`` and ``adapter_model.safetensors``: the adapters as PEFT saves a
    LoRA of the HF export (``export_hf(model, ...)`` of the *unmerged* base weights), so
    ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), out_dir)`` computes what
    the lmforge LoRA model does. ``arch``: the export's family (default the layout's); ``base``: written as
    ``base_model_name_or_path``. Each file is written whole, then renamed (the config last)."""
    from safetensors.torch import save as st_save

    from .._io import atomic_open, write_json

    mods = lora_modules(model)
    if not mods:
        raise ValueError("save_peft: the model has no LoRA adapters (apply_lora or load_peft first)")
    a = _check_arch(model, mods, arch)
    tensors: dict[str, torch.Tensor] = {}
    ranks, scales, fifo, drop = {}, {}, False, set()
    for m in mods.values():
        drop.add(m.lora_dropout)
        for k, u in m.units.items():
            A, B = m.lora_A[k].detach(), m.lora_B[k].detach()
            for hf in u.hf:
                tensors[f"{PREFIX}{hf}.lora_A.weight"] = A.contiguous().clone()
                tensors[f"{PREFIX}{hf}.lora_B.weight"] = B.contiguous().clone()
                ranks[hf], scales[hf] = A.shape[0], m.scaling[k]
            fifo |= u.fan_in_fan_out
    # the scale back as an alpha (alpha = s r, or s sqrt(r) with rsLoRA); one rank and alpha for most
    # modules, PEFT's rank_pattern / alpha_pattern (exact module names) for the others
    rslora = all(m.rslora for m in mods.values())
    alpha_of = {hf: s * (math.sqrt(ranks[hf]) if rslora else ranks[hf]) for hf, s in scales.items()}
    alpha_of = {hf: _tidy(v) for hf, v in alpha_of.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alpha_of.values()), key=list(alpha_of.values()).count)
    rank_pattern = {re.escape(hf): v for hf, v in sorted(ranks.items()) if v != r}
    alpha_pattern = {re.escape(hf): v for hf, v in sorted(alpha_of.items()) if v != alpha}
    names = sorted(ranks)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    _, full = layout(_Plain(model), a)
    every = sorted({h for us in full.values() for u in us for h in u.hf if h.rsplit(".", 1)[-1] in leaves})
    # the module names PEFT's suffix rule would select, unless that selects more (some layers only; a MoE,
    # whose experts transformers 4 keeps as per-expert gate_proj/... linears): then the exact names
    exact = "^(?:" + "|".join(re.escape(n) for n in names) + ")$"
    targets = leaves if every == names and model.cfg.moe is None else exact
    conf = _peft_config(r, alpha, rank_pattern, alpha_pattern, targets, max(drop), rslora, fifo, base)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / WEIGHTS_FILE, "wb") as f:
        f.write(st_save(dict(sorted(tensors.items())), metadata={"format": "pt"}))
    write_json(out / CONFIG_FILE, conf, indent=2)
    return out


def _tidy(x: float):
    """An alpha as written: an int when it is one (16, not 16.000000000000004)."""
    y = round(x, 9)
    return int(y) if y == int(y) else y


_UNSUPPORTED = {  # adapter_config.json field -> (the value lmforge reads, what it is)
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "lora_bias": (False, "a bias on lora_B"),
    "use_qalora": (False, "QALoRA"),
    "modules_to_save": (None, "modules saved whole (modules_to_save)"),
    "trainable_token_indices": (None, "trainable token embeddings"),
    "layer_replication": (None, "layer replication"),
    "target_parameters": (None, "LoRA on parameters (MoE experts)"),
    "alora_invocation_tokens": (None, "activated LoRA"),
}


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name it full-matches as a
    regex, or ends (after a dot) as one."""
    for key, v in patterns.items():
        if re.fullmatch(key, name) or re.match(rf"(.*\.)?(?:{key})$", name):
            return v
    return default


def load_peft(model, adapter_dir, arch: str | None = None) -> list[str]:
    """Read a PEFT LoRA directory (lmforge's ``save_peft`` or PEFT's ``save_pretrained`` for this model's
    HF export) onto ``model``: wraps the linears it adapts (in place), freezes the rest; returns the
    adapted units as ``apply_lora`` names them. ``arch``: the HF family whose names the adapter uses
    (default the model's ``hf_family``, else read off the keys). Errors name the file, field or tensor:
    another base model (a module this model lacks, a shape it cannot take), unknown keys, missing config
    fields, PEFT options lmforge does not implement (DoRA, biases, modules_to_save, ...)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cpath, wpath = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cpath.exists():
        raise FileNotFoundError(f"{d}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    conf = read_json_object(cpath)
    for k in ("peft_type", "r", "lora_alpha"):
        if k not in conf:
            raise ValueError(f"{cpath}: missing field {k!r} (a PEFT LoRA config has peft_type, r, lora_alpha)")
    if conf["peft_type"] != "LORA":
        raise ValueError(f"{cpath}: peft_type {conf['peft_type']!r} is not supported (lmforge reads LORA)")
    r0, a0 = conf["r"], conf["lora_alpha"]
    if isinstance(r0, bool) or not isinstance(r0, int) or r0 < 1:
        raise ValueError(f"{cpath}: r: expected an integer >= 1, got {r0!r}")
    if isinstance(a0, bool) or not isinstance(a0, (int, float)):
        raise ValueError(f"{cpath}: lora_alpha: expected a number, got {a0!r}")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{cpath}: bias {conf['bias']!r} is not supported (lmforge's LoRA trains no biases; "
                         "expected 'none')")
    for k, (ok, what) in _UNSUPPORTED.items():
        v = conf.get(k, ok)
        if v not in (ok, None, False, [], {}):
            raise ValueError(f"{cpath}: {k}={v!r}: {what} is not supported by lmforge's LoRA")
    rslora = bool(conf.get("use_rslora", False))
    dropout = float(conf.get("lora_dropout", 0.0) or 0.0)
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    if not wpath.exists():
        bins = list(d.glob("adapter_model*.bin"))
        why = " (only pickle adapter_model.bin: lmforge reads safetensors only)" if bins else ""
        raise FileNotFoundError(f"{d}: no {WEIGHTS_FILE}{why}")
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wpath}: cannot read the tensors ({e}); truncated or not safetensors?") from None

    if arch is None and model.cfg.hf_family == "none":
        arch = "gpt2" if any(k.startswith(PREFIX + "transformer.") for k in tensors) else None
    a, units = layout(model, arch)
    by_hf = {h: (n, u) for n, us in units.items() for u in us for h in u.hf}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if m is None:
            raise ValueError(f"{wpath}: tensor {key!r} is not a LoRA A or B weight "
                             f"(expected '{PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
        hf, ab = m.groups()
        if hf not in by_hf:
            raise ValueError(f"{wpath}: tensor {key!r}: this model's {a} export has no adaptable module {hf!r} "
                             f"(an adapter for another base model?)")
        pairs.setdefault(hf, {})[ab] = t
    if not pairs:
        raise ValueError(f"{wpath}: no LoRA tensors")
    plan: dict[str, list[Unit]] = {}
    values: dict[str, dict[str, tuple]] = {}
    rank, scaling = {}, {}
    for hf, ab in sorted(pairs.items()):
        for want in ("lora_A", "lora_B"):
            if want not in ab:
                raise ValueError(f"{wpath}: {PREFIX}{hf}.{want}.weight is missing (its pair is there)")
        name, u = by_hf[hf]
        A, B = ab["lora_A"], ab["lora_B"]
        lin = model.get_submodule(name)
        rk = _pattern_value(rank_pattern, hf, r0)
        exp_a, exp_b = (rk, lin.in_features), (u.stop - u.start, rk)
        for t, which, exp in ((A, "lora_A", exp_a), (B, "lora_B", exp_b)):
            if t.dim() != 2 or tuple(t.shape) != exp:
                raise ValueError(f"{wpath}: tensor {PREFIX}{hf}.{which}.weight has shape {tuple(t.shape)}, this "
                                 f"model's {hf} needs {exp} (r={rk}; an adapter for another base model?)")
        prev = values.get(name, {}).get(u.label)
        if prev is not None:  # ReLU²: gate_proj and up_proj are one unit, so their adapters must be equal
            if not (torch.equal(prev[0], A) and torch.equal(prev[1], B)):
                raise ValueError(f"{wpath}: {' and '.join(u.hf)} have different adapters, but this model's "
                                 f"ReLU² MLP ({name}) is one matrix for both (gate_proj = up_proj)")
            continue
        if len(u.hf) > 1 and not all(h in pairs for h in u.hf):
            raise ValueError(f"{wpath}: {hf} is adapted but not {[h for h in u.hf if h not in pairs]}: this "
                             f"model's ReLU² MLP ({name}) is one matrix for both (gate_proj = up_proj)")
        plan.setdefault(name, []).append(u)
        values.setdefault(name, {})[u.label] = (A, B)
        rank.setdefault(name, {})[u.label] = rk
        alpha = _pattern_value(alpha_pattern, hf, a0)
        scaling.setdefault(name, {})[u.label] = scale_of(alpha, rk, rslora)
    order = [n for n in units if n in plan]  # module order
    plan = {n: plan[n] for n in order}
    names = _install(model, plan, rank, scaling, dropout, a, rslora)
    mods = lora_modules(model)
    with torch.no_grad():
        for n, vals in values.items():
            for label, (A, B) in vals.items():
                mods[n].lora_A[label].copy_(A)
                mods[n].lora_B[label].copy_(B)
    return names



# ---- the adapters switched off (DPO's "lora" reference) ------------------------------------------

class adapters_disabled:
    """``with adapters_disabled(model):`` the model computes as its base (every ``LoRALinear`` gives
    ``x W^T + b`` alone); on exit the adapters are back as they were. The preference stage's LoRA
    reference: the policy's own weights without its adapters, no second model in memory. A merged
    adapter is unmerged for the block and merged again after it (its weights then differ from before
    by the rounding of one subtract-and-add)."""

    def __init__(self, model):
        self.mods = list(lora_modules(model).values())
        self.remerge: list = []

    def __enter__(self):
        for m in self.mods:
            if m.merged:
                m.unmerge()
                self.remerge.append(m)
            m.merged = True  # (forward returns the base's output without the adapter's term)
        return self

    def __exit__(self, *exc):
        for m in self.mods:
            m.merged = False
        for m in self.remerge:
            m.merge()
        self.remerge = []
        return False
