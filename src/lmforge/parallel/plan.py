"""The memory planner: what each device holds under each strategy, estimated and exactly counted.

Knows the arithmetic of training memory (below, as data) and how lmforge's strategies split a
model's tensors; knows nothing of how any strategy moves them (``comm`` counts that) nor of the
training loop. Three faces:

* ``plan(...)`` (``lmforge plan``): per-device GB for parameters, gradients, optimizer states and
  activations for each strategy, the largest micro-batch that fits, and a recommendation.
* ``state_bytes(model, strategy, world, optimizer, tp=1, rank=0)``: the *exact* bytes rank
  ``rank`` holds under a strategy on lmforge's own fp32 runs, from the real parameter shapes and
  the optimizers that hold each (``train.optim.build_optimizers``' grouping).
* ``measured_bytes(model, opts)``: the bytes the tensors of this rank really hold, now
  (``base.Strategy.memory_bytes`` calls it). The tests check ``state_bytes == measured_bytes``.

**Model states (the ZeRO paper, Rajbhandari et al. 2020, section 3.1 and Figure 1).** Mixed
precision Adam holds per parameter 2 bytes of fp16/bf16 weights (2Ψ), 2 bytes of gradients (2Ψ)
and K = 12 bytes of optimizer state (KΨ: an fp32 master copy, Adam's m and v). On N data-parallel
devices:

    DDP           2Ψ + 2Ψ + KΨ                 (everything replicated)
    ZeRO-1        2Ψ + 2Ψ + KΨ/N               (P_os: optimizer states partitioned)
    ZeRO-2        2Ψ + (2Ψ + KΨ)/N             (P_os+g: gradients too)
    ZeRO-3, FSDP  (2Ψ + 2Ψ + KΨ)/N             (P_os+g+p: parameters too)
    TP t          the split matrices (S of Ψ) divided by t: (Ψ - S) + S/t in place of Ψ

The paper's example, Ψ = 7.5e9, N = 64, K = 12: 120, 31.4, 16.6 and 1.9 GB. These are **GB of
1e9 bytes** (120e9 / 2**30 = 111.8 would be GiB; the paper's 31.4 = 30 + 90/64 = 31.406 and
16.6 = 15 + 105/64 = 16.64 round from decimal GB). ``--precision fp32`` (lmforge on a CPU):
4Ψ + 4Ψ + 8Ψ (AdamW's m and v; no master copy). Muon keeps one momentum per hidden matrix in
place of Adam's two moments: K = 8 (mixed: master + momentum) or 4 (fp32) for those parameters.

**Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", section 4 and Table 2)**, bytes per transformer layer with 16-bit activations and 1-byte
dropout masks, s the sequence length, b the micro-batch, h the hidden size, a the heads, t the
tensor-parallel degree:

    no parallelism, no recompute         s b h (34 + 5 a s / h)
    tensor parallel                      s b h (10 + 24/t + 5 a s / (h t))
    tensor + sequence parallel           s b h / t (34 + 5 a s / h)
    selective recompute                  the 5as/h term dropped (attention's scores, softmax and
                                         its dropout are recomputed): s b h 34, s b h (10 + 24/t),
                                         s b h 34 / t
    full recompute                       2 s b h (each layer keeps only its 16-bit input)

The 34 is the paper's count for a GPT layer (attention 11 sbh + 5 a s^2 b, MLP 19 sbh with a 4h
GeLU, two layer norms 4 sbh; its equations 1-2 and 6 and Table 2; the paper itself was not in the
reference library here, so these were checked against two independent public restatements of
them, which agree term for term). lmforge's Llama-shaped layers (SwiGLU, GQA, RMSNorm) differ by a
few sbh; the planner uses the paper's constants and says so. On top, the planner adds what the
paper leaves to its section 4.3 and lmforge's loss keeps: the fp32 logits, 4 s b v bytes (the head
is replicated under lmforge's TP, so not divided by t), and with full recompute one layer's
activations rematerialized during its backward (the working set). ``--precision fp32`` doubles the
activation bytes (every 16-bit tensor is 32-bit; the masks are counted at 2 bytes too, an
over-estimate of at most 3 sbh per layer). Data parallelism (DDP, ZeRO, FSDP) does not divide
activations: each device runs its own micro-batch.

**Exact mode** (``state_bytes``), fp32, what the tensors hold:

* AdamW: per parameter ``exp_avg`` and ``exp_avg_sq`` (its shape, fp32) and a 0-dim fp32 ``step``
  (4 bytes). Muon: a ``momentum_buffer`` per hidden matrix; the embeddings, head, norms and biases
  on AdamW (``param_groups``). A ``WeightEMA`` (``ema=True``) one fp32 copy of every parameter.
* ZeRO-1/2/3 (``parallel/zero.py``): each parameter flattened and cut into N equal pieces of
  s = ceil(numel / N) elements (the last padded with zeros); rank r holds piece r of the optimizer
  states (ZeRO-1), of the gradients too (ZeRO-2), of the parameters too (ZeRO-3). ZeRO-1/2 keep
  the whole parameters in padded flat buffers of N s elements (a piece is a view, updated in
  place) and ZeRO-1 the whole averaged gradient in one too; the ``step`` tensors are 0-dim and
  whole on every rank. A weight average follows ``ema_params``: the whole parameters (ZeRO-1/2,
  unpadded copies), the pieces (ZeRO-3).
* FSDP2 (``torch.distributed.fsdp.fully_shard``, read in ``_fsdp_param.py``): each parameter is
  chunked on dim 0 by ``torch.chunk`` into c = ceil(rows / N)-row pieces, and every rank's storage
  is padded to c rows (``padded_sharded_param_size``), so parameters and gradients (the
  reduce-scatter's output, views of one flat buffer per FSDP group) hold c x (other dims) elements
  on every rank, even an empty last chunk; the optimizer states (``zeros_like`` of the unpadded
  local shard) hold the rank's real rows, min(c, max(0, rows - r c)).
* TP t (``parallel/tp.py``): the plan's colwise entries (``colwise``, ``colwise_qkv``,
  ``colwise_gate_up``) split weight and bias on dim 0, rowwise split the weight on dim 1 (the bias
  is replicated), everything else is replicated: a whole copy on every rank. TP+FSDP: the TP
  local shard, then FSDP2's dim-0 chunking over the data-parallel ranks.

``measured_bytes`` counts distinct storages (a DTensor: its local tensor's), each once: tied
embeddings count once, FSDP2's padding counts (its storage is padded), a view into a flat buffer
counts the buffer.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

GB = 1e9  # the ZeRO paper's unit (decimal gigabytes): see the module docstring
STRATEGY_NAMES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "tp", "tp+fsdp")
RECOMPUTE = ("none", "selective", "full")
PRECISION = {  # bytes per parameter: (weights, gradients, optimizer states of AdamW, of Muon's matrices)
    "mixed": {"params": 2, "grads": 2, "adamw": 12, "muon": 8},
    "fp32": {"params": 4, "grads": 4, "adamw": 8, "muon": 4},
}
# which model states each strategy divides by the data-parallel degree (ZeRO's P_os, P_g, P_p)
SHARDS = {"ddp": (), "zero1": ("optim",), "zero2": ("optim", "grads"), "zero3": ("optim", "grads", "params"),
          "fsdp": ("optim", "grads", "params"), "tp": (), "tp+fsdp": ("optim", "grads", "params"), "none": ()}


# ---------------------------------------------------------------------------------------------------
# the arithmetic
# ---------------------------------------------------------------------------------------------------

def model_state_bytes(n_params: float, strategy: str, world: int, precision: str = "mixed",
                      optimizer: str = "adamw", tp: int = 1, tp_sharded: float | None = None,
                      muon_share: float = 0.0) -> dict:
    """Per-device bytes {"params", "grads", "optim"} of ``n_params`` trained parameters (the module
    docstring's table). ``tp_sharded``: how many of them TP splits (default all: Megatron's Ψ/t);
    ``muon_share``: the share of parameters Muon holds (``optimizer = "muon"``)."""
    if strategy not in SHARDS:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGY_NAMES)}")
    if precision not in PRECISION:
        raise ValueError(f"precision {precision!r}: expected mixed or fp32")
    if world < 1:
        raise ValueError(f"gpus {world}: expected >= 1")
    t = tp if strategy in ("tp", "tp+fsdp") else 1
    if t < 1 or world % t:
        raise ValueError(f"tp {t} must divide gpus {world}")
    dp = world // t
    S = n_params if tp_sharded is None else tp_sharded
    local = (n_params - S) + S / t  # the parameters one device keeps before data-parallel sharding
    pr = PRECISION[precision]
    k = pr["adamw"] if optimizer == "adamw" else pr["adamw"] * (1 - muon_share) + pr["muon"] * muon_share
    out = {"params": pr["params"] * local, "grads": pr["grads"] * local, "optim": k * local}
    for part in SHARDS[strategy]:
        out[part] /= dp
    return out


def activation_bytes_per_layer(s: int, b: int, h: int, a: int, t: int = 1, sequence_parallel: bool = False,
                               recompute: str = "none") -> float:
    """Korthikanti et al. 2022's bytes per transformer layer (16-bit activations; Table 2)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    if recompute == "full":
        return 2.0 * s * b * h
    attn = 0.0 if recompute == "selective" else 5.0 * a * s / h
    if sequence_parallel:
        return s * b * h / t * (34 + attn)
    return s * b * h * (10 + 24 / t + attn / t) if t > 1 else s * b * h * (34 + attn)


def activation_bytes(s: int, b: int, h: int, a: int, n_layer: int, vocab: int, t: int = 1,
                     sequence_parallel: bool = False, recompute: str = "none", precision: str = "mixed") -> float:
    """The whole model's activation bytes on one device: L layers (the paper), the fp32 logits
    (4 s b v), and with full recompute one layer's rematerialized activations."""
    per = activation_bytes_per_layer(s, b, h, a, t, sequence_parallel, recompute)
    total = n_layer * per
    if recompute == "full":
        total += activation_bytes_per_layer(s, b, h, a, t, sequence_parallel, "none")
    if precision == "fp32":
        total *= 2
    return total + 4.0 * s * b * vocab


# ---------------------------------------------------------------------------------------------------
# the model to plan for
# ---------------------------------------------------------------------------------------------------

@dataclass
class Shape:
    """What the planner needs of a model: its parameter count, the share TP splits, Muon's share,
    and the layer sizes of the activation formulas (0 when unknown: ``--params`` alone)."""
    n_params: float
    tp_sharded: float | None = None  # parameters TP splits (None: all of them)
    muon_params: float = 0.0  # parameters Muon would hold (hidden matrices)
    n_layer: int = 0
    d_model: int = 0
    n_head: int = 0
    vocab_size: int = 0
    max_seq_len: int = 0
    name: str = ""
    n_kv_head: int = 0  # key/value heads (GQA); TP splits them too

    def heads_divide(self, t: int) -> bool:
        return all(not h or h % t == 0 for h in (self.n_head, self.n_kv_head))

    @property
    def has_layers(self) -> bool:
        return bool(self.n_layer and self.d_model and self.n_head)


def _tp_split_numel(model) -> int:
    """Elements of ``model``'s parameters the components' ``tp_plan()`` split (colwise: weight and
    bias; rowwise: the weight)."""
    n = 0
    for block in model.blocks:
        for comp in block.components():
            n += _comp_split_numel(comp)
    return n


def _comp_split_numel(comp) -> int:
    n = 0
    for key, kind in (comp.tp_plan() if hasattr(comp, "tp_plan") else {}).items():
        sub = getattr(comp, key, None)
        if sub is None:
            continue
        if "+" in kind:  # a nested plan (a MoE's shared expert)
            n += _comp_split_numel(sub)
        elif kind.startswith("colwise"):
            n += sum(p.numel() for p in sub.parameters())
        elif kind == "rowwise":
            n += sub.weight.numel()
    return n


def shape_of_config(cfg, name: str = "") -> Shape:
    """A ``ModelConfig``'s shape, counted on a meta-device model (GQA, SwiGLU, MoE included)."""
    from ..train.optim import param_groups

    m = cfg._meta_model()
    hidden, _, _ = param_groups(m)
    return Shape(n_params=float(m.num_params()), tp_sharded=float(_tp_split_numel(m)),
                 muon_params=float(sum(p.numel() for _, p in hidden)), n_layer=cfg.n_layer, d_model=cfg.d_model,
                 n_head=cfg.n_head, vocab_size=cfg.vocab_size, max_seq_len=cfg.max_seq_len, name=name,
                 n_kv_head=cfg.kv_heads)


def shape_of(preset: str | None = None, config: str | None = None, params: float | None = None, **layers) -> Shape:
    """The shape of a named preset, of a model config file (an lmforge model directory or its
    config.json, or a bare ModelConfig JSON), or of a bare parameter count (with optional
    ``n_layer``, ``d_model``, ``n_head``, ``vocab_size`` for the activations)."""
    given = [x for x in (preset, config, params) if x is not None]
    if len(given) != 1:
        raise ValueError("plan: give exactly one of --preset, --config or --params")
    if preset is not None:
        from ..model import preset as make_preset

        return shape_of_config(make_preset(preset), preset)
    if config is not None:
        from ..model.config import ModelConfig

        p = Path(config)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise FileNotFoundError(f"--config {config}: no such file")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {p}: not JSON ({e})") from None
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            d = d["model"]
        if not isinstance(d, dict):
            raise ValueError(f"--config {p}: expected a JSON object (a model config)")
        try:
            cfg = ModelConfig.from_dict(d)
        except TypeError as e:
            raise ValueError(f"--config {p}: not a model config ({e})") from None
        return shape_of_config(cfg, str(p))
    if not params or params <= 0:
        raise ValueError(f"--params {params}: expected a positive parameter count (e.g. 7.5e9)")
    kw = {k: int(v or 0) for k, v in layers.items() if k in ("n_layer", "d_model", "n_head", "vocab_size")}
    return Shape(n_params=float(params), name=f"{params:g} parameters", **kw)


# ---------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------

@dataclass
class Row:
    strategy: str
    params_gb: float
    grads_gb: float
    optim_gb: float
    activations_gb: float | None  # at the planned micro-batch (None: the layer sizes are unknown)
    total_gb: float | None
    fits: bool
    max_micro_batch: int | None  # the largest that fits (0: the model states alone do not)
    tp: int = 1
    dp: int = 1
    notes: list = field(default_factory=list)


def parse_memory(text) -> float:
    """``80GB``, ``80G``, ``80``, ``24GiB``, ``512MB`` -> bytes (GB = 1e9, GiB = 2**30)."""
    if isinstance(text, (int, float)):
        return float(text) * GB
    s = str(text).strip().lower().replace(" ", "")
    units = {"gib": 2 ** 30, "gb": 1e9, "g": 1e9, "mib": 2 ** 20, "mb": 1e6, "m": 1e6, "tb": 1e12, "tib": 2 ** 40}
    for u in sorted(units, key=len, reverse=True):
        if s.endswith(u):
            num, mult = s[: -len(u)], units[u]
            break
    else:
        num, mult = s, 1e9
    try:
        v = float(num)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 80GB, 24GiB or 512MB") from None
    if v <= 0:
        raise ValueError(f"--gpu-memory {text!r}: expected a positive size")
    return v * mult


def plan(shape: Shape, gpus: int, gpu_memory: float, strategies=("all",), seq_len: int = 0, micro_batch: int = 1,
         recompute: str = "none", tp: int = 0, optimizer: str = "adamw", precision: str = "mixed",
         sequence_parallel: bool = False) -> dict:
    """The per-device memory of each strategy (``Row``s) and a recommendation. ``gpu_memory`` in
    bytes. ``tp`` is tp+fsdp's tensor-parallel degree (0: the largest of 8, 4, 2 that divides
    ``gpus`` and the heads); "tp" splits over every device, as ``parallel = "tp"`` does."""
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: expected >= 1")
    if micro_batch < 1:
        raise ValueError(f"--micro-batch {micro_batch}: expected >= 1")
    if recompute not in RECOMPUTE:
        raise ValueError(f"--recompute {recompute!r}: expected one of {', '.join(RECOMPUTE)}")
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"--optimizer {optimizer!r}: expected adamw or muon")
    if precision not in PRECISION:
        raise ValueError(f"--precision {precision!r}: expected mixed or fp32")
    names = list(STRATEGY_NAMES) if "all" in strategies else list(strategies)
    for n in names:
        if n not in STRATEGY_NAMES:
            raise ValueError(f"--strategy {n!r}: expected one of {', '.join(STRATEGY_NAMES)} or all")
    if tp < 0:
        raise ValueError(f"--tp {tp}: expected >= 1 (or 0: chosen)")
    if tp and gpus % tp:
        raise ValueError(f"--tp {tp} does not divide --gpus {gpus}")
    if tp and not shape.heads_divide(tp):
        raise ValueError(f"--tp {tp} does not divide the model's {shape.n_head} heads and {shape.n_kv_head} "
                         "key/value heads")
    if not tp:
        tp = next((t for t in (8, 4, 2) if gpus % t == 0 and shape.heads_divide(t)), 1)
    s = seq_len or shape.max_seq_len
    if shape.has_layers and not s:
        raise ValueError("plan: give --seq-len (the model has no max_seq_len)")
    muon_share = shape.muon_params / shape.n_params if optimizer == "muon" and shape.n_params else 0.0
    if optimizer == "muon" and not shape.muon_params:
        muon_share = 1.0  # a bare --params: every parameter a hidden matrix (an upper bound on Muon's saving)
    rows = []
    for name in names:
        # lmforge's "tp" splits the model over every rank; "tp+fsdp" over tp of them, FSDP2 across the rest
        t = gpus if name == "tp" else (tp if name == "tp+fsdp" else 1)
        dp = gpus // t
        states = model_state_bytes(shape.n_params, name, gpus, precision, optimizer, t, shape.tp_sharded, muon_share)
        static = sum(states.values())
        notes = []
        runnable = True
        if name == "tp" and not shape.heads_divide(gpus):
            runnable = False
            notes.append(f"tp: over all {gpus} devices the heads ({shape.n_head}, {shape.n_kv_head} key/value) do "
                         "not divide (use tp+fsdp with --tp)")
        if name in ("tp", "tp+fsdp") and t == 1:
            notes.append("tp = 1: no tensor parallelism (give --tp or more GPUs)")
        act = mb = total = None
        sp = sequence_parallel and t > 1
        if shape.has_layers:
            def act_at(b):
                return activation_bytes(s, b, shape.d_model, shape.n_head, shape.n_layer, shape.vocab_size, t, sp,
                                        recompute, precision)
            act = act_at(micro_batch)
            total = static + act
            per_sample = act_at(1)
            mb = max(0, int((gpu_memory - static) // per_sample)) if gpu_memory > static else 0
            fits = total <= gpu_memory and runnable
            mb = mb if runnable else 0
        else:
            fits = static <= gpu_memory and runnable
            notes.append("activations unknown (give --preset/--config, or --layers --hidden --heads)")
        if name == "zero3":
            notes.append("lmforge's readable ZeRO-3; fsdp (torch's) holds the same and overlaps its gathers")
        rows.append(Row(name, states["params"] / GB, states["grads"] / GB, states["optim"] / GB,
                        None if act is None else act / GB, None if total is None else total / GB, fits, mb, t, dp,
                        notes))
    return {"model": shape.name, "n_params": shape.n_params, "gpus": gpus, "gpu_memory_gb": gpu_memory / GB,
            "seq_len": s, "micro_batch": micro_batch, "recompute": recompute, "optimizer": optimizer,
            "precision": precision, "sequence_parallel": sequence_parallel, "tp": tp,
            "rows": [asdict(r) for r in rows], "recommendation": recommend(rows, gpus, recompute)}


# the order of preference when several fit: least communication and fewest moving parts first
PREFERENCE = ("ddp", "zero1", "zero2", "fsdp", "zero3", "tp+fsdp", "tp")


def recommend(rows: list[Row], gpus: int, recompute: str) -> str:
    by = {r.strategy: r for r in rows}
    fits = [n for n in PREFERENCE if n in by and by[n].fits]
    if fits:
        best = by[fits[0]]
        why = {"ddp": "everything fits replicated: DDP moves the least (one all-reduce of the gradients, 2Ψ)",
               "zero1": "the optimizer states must be sharded; ZeRO-1 moves no more than DDP (Ψ + Ψ)",
               "zero2": "gradients must be sharded too; ZeRO-2 still moves Ψ + Ψ",
               "fsdp": "the parameters must be sharded too: FSDP2 (3Ψ per step, overlapped with compute)",
               "zero3": "the parameters must be sharded too",
               "tp+fsdp": "a layer's activations need splitting too: TP inside a node, FSDP2 across",
               "tp": "tensor parallel alone fits"}[best.strategy]
        mb = f"; micro-batch up to {best.max_micro_batch}" if best.max_micro_batch is not None else ""
        return f"{best.strategy}: {why}{mb}"
    hint = "" if recompute == "full" else " or --recompute full"
    def size(r):
        return r.total_gb if r.total_gb is not None else r.params_gb + r.grads_gb + r.optim_gb
    smallest = min(rows, key=size)
    return (f"nothing fits on {gpus} device(s): the smallest is {smallest.strategy} "
            f"({size(smallest):.1f} GB); add devices, use --tp{hint}, or a smaller micro-batch")


COLUMNS = ("params", "grads", "optim", "states", "activ.", "total")


def format_plan(p: dict) -> str:
    """The table ``lmforge plan`` prints."""
    lines = [f"{p['model']}: {p['n_params'] / 1e9:.3g}B parameters on {p['gpus']} device(s) of "
             f"{p['gpu_memory_gb']:.4g} GB; {p['precision']} precision, {p['optimizer']}, seq_len {p['seq_len'] or 'n/a'}, "
             f"micro-batch {p['micro_batch']}, recompute {p['recompute']}"
             + (", sequence parallel" if p["sequence_parallel"] else "")
             + "  (GB = 1e9 bytes, per device)",
             "  ".join([f"{'strategy':<9}", f"{'tp x dp':>8}"] + [f"{h:>9}" for h in COLUMNS]
                       + [f"{'fits':<4}", f"{'max micro-batch':>15}"])]

    def f(x):
        return "n/a" if x is None else f"{x:.2f}"
    for r in p["rows"]:
        cells = [r["params_gb"], r["grads_gb"], r["optim_gb"], r["params_gb"] + r["grads_gb"] + r["optim_gb"],
                 r["activations_gb"], r["total_gb"]]
        mb = "n/a" if r["max_micro_batch"] is None else r["max_micro_batch"]
        lines.append("  ".join([f"{r['strategy']:<9}", f"{str(r['tp']) + 'x' + str(r['dp']):>8}"]
                               + [f"{f(c):>9}" for c in cells] + [f"{'yes' if r['fits'] else 'no':<4}", f"{mb:>15}"]))
    notes = sorted({n for r in p["rows"] for n in r["notes"]})
    lines += [f"  note: {n}" for n in notes]
    lines.append(f"recommendation: {p['recommendation']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# exact mode: lmforge's own fp32 runs
# ---------------------------------------------------------------------------------------------------

def _zero_piece(numel: int, world: int) -> int:
    return -(-numel // world)  # ceil: every piece padded to the same size


def _fsdp_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(padded rows every rank's storage has, the rank's real rows) of FSDP2's dim-0 chunking."""
    c = -(-rows // world)
    return c, min(c, max(0, rows - rank * c))


def _tp_local_shape(shape, kind: str | None, is_bias: bool, t: int):
    shape = list(shape)
    if t == 1 or kind is None:
        return shape
    if kind.startswith("colwise"):
        shape[0] //= t
    elif kind == "rowwise" and not is_bias:
        shape[1] //= t
    return shape


def _tp_kinds(model) -> dict:
    """{parameter name: the plan kind that splits it} (None: replicated)."""
    out = {}
    for name, _ in model.named_parameters():
        out[name] = None
    for i, block in enumerate(model.blocks):
        for cname in ("attn", "mlp"):
            _walk_plan(getattr(block, cname), f"blocks.{i}.{cname}", out)
    return out


def _walk_plan(comp, prefix: str, out: dict) -> None:
    for key, kind in (comp.tp_plan() if hasattr(comp, "tp_plan") else {}).items():
        sub = getattr(comp, key, None)
        if sub is None:
            continue
        if "+" in kind:
            _walk_plan(sub, f"{prefix}.{key}", out)
        elif kind.startswith("colwise") or kind == "rowwise":
            for pn, _ in sub.named_parameters():
                out[f"{prefix}.{key}.{pn}"] = kind


def _frozen_bytes(p, name, strategy, world, t, dp, dp_rank, kinds) -> int:
    """Elements a rank holds of a frozen parameter: whole under DDP and ZeRO-1/2 (which cut only what
    they step), a piece under ZeRO-3 (it gathers frozen weights too), FSDP2's and TP's shards."""
    if strategy in ("none", "ddp", "zero1", "zero2"):
        return p.numel()
    if strategy == "zero3":
        return _zero_piece(p.numel(), world)
    shp = _tp_local_shape(p.shape, kinds.get(name), name.endswith(".bias"), t)
    if strategy == "tp":
        return math.prod(shp)
    rest = math.prod(shp[1:]) if len(shp) > 1 else 1
    return _fsdp_rows(shp[0], dp, dp_rank)[0] * rest


def state_bytes(model, strategy: str, world: int, optimizer: str = "adamw", tp: int = 1, rank: int = 0,
                ema: bool = False) -> dict:
    """The exact bytes {"params", "grads", "optim"} rank ``rank`` of ``world`` holds under ``strategy``
    for lmforge's fp32 training of ``model`` (an unwrapped model: its parameters' full shapes), with
    gradients present (between backward and ``zero_grad``). The rules are the module docstring's; a
    frozen parameter (``requires_grad`` False) counts as weights only."""
    from ..train.optim import param_groups

    if strategy not in SHARDS:
        raise ValueError(f"strategy {strategy!r}: expected one of none, {', '.join(STRATEGY_NAMES)}")
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer {optimizer!r}: expected adamw or muon")
    if strategy == "none" and world != 1:
        raise ValueError("strategy 'none' runs on one process (world = 1)")
    t = tp if strategy in ("tp", "tp+fsdp") else 1
    if strategy == "tp" and tp == 1:
        t = world
    if world % t:
        raise ValueError(f"tp {t} does not divide world {world}")
    dp = world // t
    dp_rank = rank // t if strategy == "tp+fsdp" else rank  # (the mesh is (dp, tp), tp varying fastest)
    muon = set()
    if optimizer == "muon":  # build_optimizers' grouping (a model without lmforge's facts: every matrix)
        hidden = param_groups(model)[0] if hasattr(model, "adam_only") else \
            [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
        muon = {id(p) for _, p in hidden}
    kinds = _tp_kinds(model) if t > 1 else {}
    E = 4  # fp32
    out = {"params": 0, "grads": 0, "optim": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:  # frozen (LoRA's base): held as the strategy holds weights, no gradient or state
            out["params"] += _frozen_bytes(p, name, strategy, world, t, dp, dp_rank, kinds) * E
            continue
        n_states = 1 if id(p) in muon else 2
        step = 0 if id(p) in muon else E  # AdamW's 0-dim step
        n_ema = 1 if ema else 0
        if strategy in ("none", "ddp"):
            n = p.numel()
            out["params"] += n * E
            out["grads"] += n * E
            out["optim"] += (n_states + n_ema) * n * E + step
        elif strategy in ("zero1", "zero2", "zero3"):
            n, piece = p.numel(), _zero_piece(p.numel(), world)
            # ZeRO-1/2 keep the whole parameter in a padded flat buffer (N pieces), ZeRO-1 its averaged
            # gradient too; ZeRO-2/3 a rank's piece of the gradient, ZeRO-3 of the parameter
            out["params"] += (piece if strategy == "zero3" else piece * world) * E
            out["grads"] += (piece * world if strategy == "zero1" else piece) * E
            # the weight average follows this rank's parameters (ZeRO-3: its shards; ema_params)
            out["optim"] += (n_states * piece + n_ema * (piece if strategy == "zero3" else n)) * E + step
        else:  # fsdp, tp, tp+fsdp
            shp = _tp_local_shape(p.shape, kinds.get(name), name.endswith(".bias"), t)
            rest = math.prod(shp[1:]) if len(shp) > 1 else 1
            if strategy == "tp":
                n = math.prod(shp)
                out["params"] += n * E
                out["grads"] += n * E
                out["optim"] += (n_states + n_ema) * n * E + step
            else:
                padded, real = _fsdp_rows(shp[0], dp, dp_rank)
                out["params"] += padded * rest * E
                out["grads"] += padded * rest * E
                out["optim"] += (n_states + n_ema) * real * rest * E + step
    return out


# ---------------------------------------------------------------------------------------------------
# measured: what the tensors of this rank hold
# ---------------------------------------------------------------------------------------------------

def _local(t):
    """A DTensor's local tensor (the shard this rank holds); a plain tensor itself."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None and type(t).__name__ == "DTensor":
        return t._local_tensor
    return t


def _storage_key(t):
    t = _local(t)
    if t is None or not hasattr(t, "untyped_storage") or t.is_meta:
        return None, 0
    st = t.untyped_storage()
    n = st.nbytes()
    if n == 0:
        return None, 0
    return (st.data_ptr(), n, str(t.device)), n


def _tensors_in(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def measured_bytes(model, opts: list) -> dict:
    """Bytes {"params", "grads", "optim"} this rank holds now: the distinct storages of the model's
    parameters and of the parameters the optimizers in ``opts`` step (ZeRO's shards), of their
    gradients, and of every tensor in the optimizers' states (a ``WeightEMA``'s averages too). A
    DTensor counts its local tensor; a storage shared by several tensors (tied embeddings, a flat
    buffer) counts once, under the first part that reaches it (params, then grads, then optim)."""
    seen: set = set()
    out = {"params": 0, "grads": 0, "optim": 0}

    def add(part, t):
        key, n = _storage_key(t)
        if key is not None and key not in seen:
            seen.add(key)
            out[part] += n

    params = list(model.parameters())
    for opt in opts or []:
        for g in getattr(opt, "param_groups", []):
            params += list(g["params"])
    for p in params:
        add("params", p)
    for p in params:
        if p.grad is not None:
            add("grads", p.grad)
    for opt in opts or []:
        for st in getattr(opt, "state", {}).values():
            for t in _tensors_in(st):
                add("optim", t)
    return out
