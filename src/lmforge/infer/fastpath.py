"""The bridge to ``_decode`` (C): decode steps without PyTorch's per-operator overhead.

A decode step reads every weight once to produce one token per sequence, so it is
bound by memory bandwidth, and for small models by the fixed cost of each of the
~15 PyTorch operators per layer. ``FastDecoder`` runs the whole step of an
``lmforge.model.Transformer`` (eval mode, CPU, float32; the dense ``ModelConfig``
variants with one sliding window for all layers) as one C call that reads the
weights where PyTorch keeps them and the keys/values straight from the KV cache,
contiguous or paged. The engine runs prefill chunks through the same call: a chunk's
tokens are rows of one sequence at consecutive positions (no padding), the output head
at its last row only (``step(..., logits_rows=...)``).

Both caches have the same shape per layer, ``(N, K, S, D)``: a contiguous
``KVCache`` is N rows of S = max_len positions; the paged pool is N blocks of
S = block_size positions. A sequence is a list of those (its block table); a
contiguous row ``b`` is the one-entry table ``[b]``.

Quantized linears (``lmforge.quant.linear.IntLinear``, swapped in by ``lmforge.quant``)
run in the same step: int8 codes (symmetric; one scale per row, per group of a multiple
of 8 columns, or per tensor) and codes of 2..4 bits packed two per byte (symmetric or
with zero points; groups of a multiple of 32 columns, or one per row or tensor), with or
without an input permutation (GPTQ act-order). The codes are dequantized in registers
against float32 activations, so the logits equal ``IntLinear``'s PyTorch forward within
float32 rounding; any other quantized layout (5..7 bits, 8-bit asymmetric, fp8,
LLM.int8, W8A8) declines with the layer's name and why.

``FastDecoder.why_not(model)`` says why the fast path does not apply (None: it
does; ``supported(model)`` is ``why_not(model) is None``; ``LMFORGE_NO_NATIVE=1``
turns it off). It fails closed: anything it does not know exactly (another
component, a swapped module, MoE, per-layer windows that differ, a config field
it does not know away from its default) declines. (Prefill chunks that need logits
at every position, ``prompt_logprobs``, stay in PyTorch.)
"""
from __future__ import annotations


import numpy as np
import torch

from .._io import native_extension

_decode = native_extension("lmforge.infer._decode")

AVAILABLE = _decode is not None
_NORM = {"layernorm": 0, "rmsnorm": 1}
_MLP = {"gelu_tanh": 0, "gelu": 1, "swiglu": 2, "relu2": 3}
_POS = {"learned": 0, "rope": 1}


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


# ModelConfig settings the C step implements (their values are checked in ``why_not``) or that do not
# change an eval-mode forward; any other field set away from its default makes ``why_not`` decline
_HANDLED = {
    "": {"vocab_size", "n_layer", "d_model", "max_seq_len", "norm", "norm_eps", "norm_bias", "pos", "rope_theta",
         "rope_scaling", "tie_embeddings", "logit_softcap", "attn", "ffn", "moe", "window_layers", "moe_layers",
         "dropout", "init_std", "zero_init_proj", "hf_family"},  # (the last four: training and export only)
    "attn": {"kind", "n_head", "n_kv_head", "head_dim", "qk_norm", "qkv_bias", "out_bias", "sliding_window"},
    "ffn": {"activation", "d_ff", "bias"},
}


def _unknown_settings(cfg) -> list[str]:
    """``name=value`` of every config field the C step does not know that is not at its default."""
    import dataclasses

    out = []
    for prefix, obj in (("", cfg), ("attn", cfg.attn), ("ffn", cfg.ffn)):
        for f in dataclasses.fields(obj):
            if f.name in _HANDLED[prefix]:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = getattr(obj, f.name)
            if value != default:
                out.append(f"{prefix + '.' if prefix else ''}{f.name}={value!r}")
    return out


def _why_not(model) -> str | None:
    from ..model.attention import CausalSelfAttention as Attention
    from ..model.feedforward import DenseMLP as MLP
    from ..model.layers import KVSpec, RMSNorm, up_width
    from ..model.transformer import Block, Transformer

    if not AVAILABLE:
        return "the compiled extension lmforge.infer._decode is not available (or LMFORGE_NO_NATIVE=1)"
    if type(model) is not Transformer:
        return f"the model is a {type(model).__name__}, not exactly an lmforge Transformer"
    if model.training:
        return "the model is in training mode"
    for n, p in model.named_parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            return f"parameter {n} is {p.dtype} on {p.device}: the C step runs CPU float32 only"
        if not p.is_contiguous():
            return f"parameter {n} is not contiguous"
    cfg = model.cfg
    if cfg.moe is not None:
        return "the model has MoE feed-forward layers (cfg.moe is set): the C step implements dense MLPs only"
    if cfg.norm not in _NORM:
        return f"norm {cfg.norm!r} is not implemented in the C step"
    if cfg.ffn.activation not in _MLP:
        return f"activation {cfg.ffn.activation!r} is not implemented in the C step"
    if cfg.pos not in _POS:
        return f"positions {cfg.pos!r} are not implemented in the C step"
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type")) != "llama3":
        return f"rope_scaling {cfg.rope_scaling!r}: only Llama-3 scaling (in the RoPE tables) is implemented"
    if cfg.attn.kind != "causal":
        return f"attention kind {cfg.attn.kind!r}: the C step implements 'causal' only"
    unknown = _unknown_settings(cfg)
    if unknown:
        return f"settings the C step does not know: {', '.join(unknown)}"
    for name, mod in model.named_modules():
        if mod._forward_hooks or mod._forward_pre_hooks or "forward" in vars(mod):
            return f"module {name or 'model'} has forward hooks or its own forward"
    norm_type = RMSNorm if cfg.norm == "rmsnorm" else torch.nn.LayerNorm
    H, K, D, C = cfg.n_head, cfg.kv_heads, cfg.hd, cfg.d_model
    exact = [("tok_emb", model.tok_emb, torch.nn.Embedding, (cfg.vocab_size, C)),
             ("lm_head", model.lm_head, torch.nn.Linear, (cfg.vocab_size, C)),
             ("norm_f", model.norm_f, norm_type, (C,))]
    if cfg.pos == "learned":
        exact.append(("pos_emb", model.pos_emb, torch.nn.Embedding, (cfg.max_seq_len, C)))
    if len(model.blocks) != cfg.n_layer:
        return f"{len(model.blocks)} blocks, but cfg.n_layer={cfg.n_layer}"
    windows = set()
    for i, b in enumerate(model.blocks):
        if type(b) is not Block:
            return f"layer {i} is a {type(b).__name__}, not exactly a Block"
        spec = b.spec
        if spec.attention != "causal" or spec.ffn != "dense":
            return (f"layer {i} is attention {spec.attention!r} + feed-forward {spec.ffn!r}"
                    f"{' (MoE)' if spec.ffn == 'moe' else ''}: the C step implements 'causal' + 'dense' only")
        at, mlp = b.attn, b.mlp
        if type(at) is not Attention or type(mlp) is not MLP:
            return f"layer {i}: {type(at).__name__} / {type(mlp).__name__}, not exactly CausalSelfAttention / DenseMLP"
        if (at.H, at.K, at.D) != (H, K, D) or at.qk_norm != cfg.attn.qk_norm or at.window != spec.window:
            return f"layer {i}: its attention's heads, qk-norm or window differ from the config"
        if at.cache_spec() != KVSpec(K, D, spec.window):
            return f"layer {i}: cache spec {at.cache_spec()!r} is not KVSpec({K}, {D}, {spec.window})"
        if mlp.activation != cfg.ffn.activation or mlp.hidden != cfg.ff:
            return f"layer {i}: its MLP ({mlp.activation}, {mlp.hidden} wide) differs from the config"
        windows.add(spec.window)
        exact += [(f"blocks.{i}.attn_norm", b.attn_norm, norm_type, (C,)),
                  (f"blocks.{i}.mlp_norm", b.mlp_norm, norm_type, (C,)),
                  (f"blocks.{i}.attn.qkv", at.qkv, torch.nn.Linear, ((H + 2 * K) * D, C)),
                  (f"blocks.{i}.attn.proj", at.proj, torch.nn.Linear, (C, H * D)),
                  (f"blocks.{i}.mlp.fc", mlp.fc, torch.nn.Linear, (up_width(mlp.activation, mlp.hidden), C)),
                  (f"blocks.{i}.mlp.proj", mlp.proj, torch.nn.Linear, (C, mlp.hidden))]
        if cfg.attn.qk_norm:
            exact += [(f"blocks.{i}.attn.q_norm", at.q_norm, RMSNorm, (D,)),
                      (f"blocks.{i}.attn.k_norm", at.k_norm, RMSNorm, (D,))]
    if len(windows) > 1:
        return (f"the layers' sliding windows differ ({sorted(windows, key=lambda w: (w is not None, w or 0))}): "
                "the C step takes one window for every layer")
    for name, mod, cls, shape in exact:
        if cls is torch.nn.Linear and type(mod) is not cls:
            why = _quant_why_not(name, mod, shape)
            if why is not None:
                return why
            continue
        if type(mod) is not cls:
            return f"{name} is a {type(mod).__name__}, not exactly a {cls.__name__}"
        got = tuple(getattr(mod.weight, "shape", ()))
        if got != shape:
            return f"{name}.weight is {got}, expected {shape}"
        if cls is not torch.nn.Embedding and getattr(mod, "eps", cfg.norm_eps) != cfg.norm_eps:
            return f"{name}: eps {mod.eps} differs from norm_eps {cfg.norm_eps}"
    return None


_KIND_I8, _KIND_Q4 = 1, 2  # the C step's weight kinds (W_I8, W_Q4 in _decode.c)


def _int_linear_class():
    """``lmforge.quant.linear.IntLinear`` (imported only when a model holds a module of that name)."""
    from ..quant.linear import IntLinear

    return IntLinear


def _quant_layout(mod) -> tuple[int, int]:
    """(kind, group width) of an IntLinear the C step implements; ValueError (the reason) otherwise."""
    I = mod.in_features
    bits, sym, gran = mod.bits, mod.sym, mod.granularity
    G = I if gran in ("tensor", "channel") else mod.group_size
    if bits == 8 and sym:
        kind, step = _KIND_I8, 8
    elif 2 <= bits <= 4:
        kind, step = _KIND_Q4, 32
    else:
        raise ValueError(f"{bits}-bit {'symmetric' if sym else 'asymmetric'} codes: the C step implements 8-bit "
                         "symmetric codes and codes of 2..4 bits (symmetric or asymmetric)")
    if G % step or I % G:
        what = f"groups of {G} columns" if gran == "group" else f"{I} input columns ({gran} scales)"
        raise ValueError(f"{bits}-bit codes in {what}: the C step needs a group width that is a multiple of {step} "
                         f"and divides the {I} inputs")
    return kind, G


def _quant_why_not(name, mod, shape) -> str | None:
    """None when ``mod`` (in place of the nn.Linear of shape (out, in)) is an IntLinear the C step runs."""
    IntLinear = _int_linear_class() if type(mod).__name__ == "IntLinear" else None
    if IntLinear is None or type(mod) is not IntLinear:
        return (f"{name} is a {type(mod).__name__}, not exactly a Linear or an IntLinear (the quantized linears "
                "the C step implements)")
    if (mod.out_features, mod.in_features) != shape:
        return f"{name} is {(mod.out_features, mod.in_features)}, expected {shape}"
    try:
        _quant_layout(mod)
    except ValueError as e:
        return f"{name}: {e}"
    O, I = shape
    want = {"qweight": ((O, I) if mod.bits == 8 else (O, (I + 1) // 2), torch.int8 if mod.bits == 8 else torch.uint8),
            "scales": ((1, 1) if mod.granularity == "tensor" else (O, I // (I if mod.granularity == "channel"
                                                                          else mod.group_size)), torch.float32)}
    if not mod.sym:
        want["zeros"] = want["scales"]
    if mod.in_perm is not None:
        want["in_perm"] = ((I,), torch.int64)
    for buf, (shp, dt) in want.items():
        t = getattr(mod, buf, None)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shp or t.dtype != dt:
            got = "none" if not isinstance(t, torch.Tensor) else f"{t.dtype} {tuple(t.shape)}"
            return f"{name}.{buf} is {got}, expected {dt} {shp}"
        if t.device.type != "cpu" or not t.is_contiguous():
            return f"{name}.{buf} is {'not contiguous' if t.device.type == 'cpu' else f'on {t.device}'}: the C step " \
                   "reads contiguous CPU buffers"
    return None


class FastDecoder:
    @staticmethod
    def why_not(model) -> str | None:
        """None when the C step implements ``model`` exactly; otherwise why not (the first reason found).

        It fails closed: the model must be an eval-mode lmforge ``Transformer`` on CPU in float32 whose
        every module is exactly the class the C step mirrors (``Block``, ``CausalSelfAttention``,
        ``DenseMLP``, ``nn.Linear`` or an ``IntLinear`` of a layout it implements (see the module
        docstring), the configured norm; no hooks), every layer's spec attention
        "causal" + feed-forward "dense" with the same sliding window (the C step takes one), known
        norms, activations, positions and RoPE scaling (none or Llama-3: in the tables), no MoE, and
        no other config field away from its default."""
        return _why_not(model)

    @staticmethod
    def supported(model) -> bool:
        """True when ``why_not(model)`` is None."""
        return _why_not(model) is None

    def __init__(self, model, threads: int | None = None):
        why = _why_not(model)
        if why is not None:
            raise ValueError(f"the fast decode path does not apply: {why}")
        self.model, self.cfg = model, model.cfg
        self.threads = threads or torch.get_num_threads()
        self._binding = None
        self._build(model.cfg.max_seq_len if model.cfg.pos == "rope" else 0)

    def _build(self, rope_len: int) -> None:
        m, cfg = self.model, self.cfg
        keep = []  # detached views keep every storage alive even if the module's tensors are replaced

        def a(t):
            if t is None:
                return 0
            t = t.detach()
            if not t.is_contiguous():
                raise ValueError("fast decode: a weight is not contiguous")
            keep.append(t)
            return _addr(t)

        cos = sin = None
        if cfg.pos == "rope":
            rope_len = max(rope_len, 256)
            m._rope(rope_len, torch.float32)
            cos, sin = (t.contiguous() for t in m._rope_cache[1])
            rope_len = cos.shape[2]
        ints = (cfg.vocab_size, cfg.d_model, cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.hd, cfg.ff,
                _NORM[cfg.norm], _MLP[cfg.ffn.activation], _POS[cfg.pos], m.blocks[0].spec.window or 0, rope_len,
                cfg.max_seq_len if cfg.pos == "learned" else 1 << 30)
        floats = (float(cfg.norm_eps), float(cfg.logit_softcap or 0.0))
        nf = m.norm_f

        def w(lin):  # a float32 weight's address (0 for a quantized one: its codes go in ``quant``)
            return a(lin.weight) if type(lin) is torch.nn.Linear else 0

        def q(lin):  # None (float32) or the C step's description of a quantized weight
            if type(lin) is torch.nn.Linear:
                return None
            kind, G = _quant_layout(lin)
            O = lin.out_features
            scales, zeros = lin.scales, lin.zeros
            if lin.granularity == "tensor":  # one scale (and zero) for every row
                scales = scales.detach().reshape(1, 1).expand(O, 1).contiguous()
                zeros = None if zeros is None else zeros.detach().reshape(1, 1).expand(O, 1).contiguous()
            zc = float(2 ** (lin.bits - 1))  # symmetric codes <= 4 bits are stored u = q + 2 ** (bits - 1)
            return (kind, G, a(lin.qweight), a(scales), a(zeros), a(lin.in_perm), a(lin.bias), zc)

        glob = (a(m.tok_emb.weight), a(m.pos_emb.weight) if cfg.pos == "learned" else 0, a(nf.weight),
                a(getattr(nf, "bias", None)), w(m.lm_head), a(cos), a(sin))
        layers, quant = [], []
        for b in m.blocks:
            at, mlp = b.attn, b.mlp
            layers.append((a(b.attn_norm.weight), a(getattr(b.attn_norm, "bias", None)), w(at.qkv),
                           a(at.qkv.bias), a(at.q_norm.weight) if cfg.attn.qk_norm else 0,
                           a(at.k_norm.weight) if cfg.attn.qk_norm else 0, w(at.proj), a(at.proj.bias),
                           a(b.mlp_norm.weight), a(getattr(b.mlp_norm, "bias", None)), w(mlp.fc),
                           a(mlp.fc.bias), w(mlp.proj), a(mlp.proj.bias)))
            quant += [q(at.qkv), q(at.proj), q(mlp.fc), q(mlp.proj)]
        quant.append(q(m.lm_head))
        self._keep = keep
        self.rope_len = rope_len
        if any(e is not None for e in quant):
            self._model = _decode.new(ints, floats, glob, tuple(layers), tuple(quant))
        else:
            self._model = _decode.new(ints, floats, glob, tuple(layers))
        if self._binding is not None:
            self.bind(*self._binding)

    def bind(self, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
        """Use these per-layer ``(N, K, S, D)`` key and value buffers as the cache."""
        cfg = self.cfg
        for t in list(k) + list(v):
            if t.dim() != 4 or t.shape[1] != cfg.kv_heads or t.shape[3] != cfg.hd or not t.is_contiguous() \
                    or t.dtype != torch.float32 or t.device.type != "cpu":
                raise ValueError("fast decode: the cache must be contiguous CPU float32 (N, K, S, D) buffers")
        self._binding = (list(k), list(v))
        N, K, S, D = k[0].shape
        self.n_slots, self.slot_len = N, S
        _decode.set_cache(self._model, tuple(t.data_ptr() for t in k), tuple(t.data_ptr() for t in v), K * S * D, S)

    def step(self, tokens: list[int], positions: list[int], tables: list[list[int]],
             logits_rows: list[int] | None = None) -> torch.Tensor:
        """Logits ``(B, vocab)`` of one new token per row: row ``b`` holds ``tokens[b]`` at position
        ``positions[b]`` of the sequence whose cache slots are ``tables[b]``; its key and value are written.

        Rows of one sequence at consecutive positions run a prefill chunk in one call: every row's key
        and value are written before any row attends, and a row sees positions up to its own only.
        ``logits_rows``: the rows whose logits are returned, in that order (``(len(logits_rows), vocab)``;
        the output head runs at those rows only); None: every row."""
        B = len(tokens)
        if self._binding is None:
            raise RuntimeError("fast decode: bind a cache first")
        if not (len(positions) == len(tables) == B) or B == 0:
            raise ValueError("fast decode: one position and one block table per token")
        top = max(positions)
        if self.cfg.pos == "rope" and top >= self.rope_len:
            self._build(2 * (top + 1))
        width = max(len(t) for t in tables)
        for p, t in zip(positions, tables):
            if p // self.slot_len >= len(t):
                raise ValueError(f"fast decode: position {p} is past the sequence's {len(t)} cache blocks")
        tab = np.zeros((B, width), dtype=np.int32)
        for i, t in enumerate(tables):
            tab[i, :len(t)] = t
        if tab.min() < 0 or tab.max() >= self.n_slots:
            raise ValueError("fast decode: a block table points outside the cache")
        tok = np.asarray(tokens, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int32)
        if logits_rows is None:
            out = torch.empty(B, self.cfg.vocab_size)
            _decode.step(self._model, B, tok.ctypes.data, pos.ctypes.data, tab.ctypes.data, width, out.data_ptr(),
                         self.threads)
            return out
        heads = np.asarray(logits_rows, dtype=np.int32)
        if heads.ndim != 1 or not len(heads) or heads.min() < 0 or heads.max() >= B:
            raise ValueError(f"fast decode: logits_rows must be row numbers in [0, {B}), got {list(logits_rows)!r}")
        out = torch.empty(len(heads), self.cfg.vocab_size)
        _decode.step(self._model, B, tok.ctypes.data, pos.ctypes.data, tab.ctypes.data, width, out.data_ptr(),
                     self.threads, heads.ctypes.data, len(heads))
        return out
