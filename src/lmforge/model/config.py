"""``ModelConfig``: one serializable dataclass tree describes every decoder lmforge builds.

Knows the architecture as data: model-wide fields (vocabulary, width, depth,
norm, positions, the head), one sub-config per component family
(``attn``: attention; ``ffn``: the dense feed-forward; ``moe``: the
mixture-of-experts feed-forward, when there is one) and a per-layer pattern
(which layers use the sliding window, which use MoE) that ``layer_specs()``
resolves once into one ``LayerSpec`` per layer. GPT-2, Llama, Mistral, Qwen2,
Qwen3, Mixtral, Qwen2-MoE and small CPU models are presets, not subclasses.
It checks that the numbers fit together and counts parameters and FLOPs (on a
meta-device model: the components own their counts); it knows nothing about
weights.

    ModelConfig ──layer_specs()──> [LayerSpec(i, attention="causal", window, ffn="dense"|"moe"), ...]
         │                                     │ looked up by name in model.registry
         ├── attn: AttentionConfig             ▼
         ├── ffn:  FeedForwardConfig     Block(attn=ATTENTION[kind](cfg, spec), mlp=FEEDFORWARD[kind](cfg, spec))
         └── moe:  MoEConfig | None

Old flat files (``{"n_head": 12, "mlp": "swiglu", "arch": "llama", ...}``: every
checkpoint before the tree, and what ``preset(name, **overrides)`` and a recipe's
``[train.model]`` table may still say) load through ``from_dict``/``normalize``:
``LEGACY`` maps each flat name to its place in the tree.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass
class AttentionConfig:
    kind: str = "causal"  # the attention component (model.registry.ATTENTION): "causal" = MHA / GQA / MQA
    n_head: int = 12
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_head (Qwen3 sets it apart)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3, OLMo-2)
    qkv_bias: bool = True
    out_bias: bool = True  # the output projection's bias
    sliding_window: int | None = None  # a query sees at most this many keys, itself included (Mistral)


@dataclass
class FeedForwardConfig:
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) | "gelu" | "swiglu" | "relu2"
    d_ff: int | None = None  # None: 4 * d_model (GELU/ReLU²) or the Llama rule for SwiGLU
    bias: bool = True


@dataclass
class MoEConfig:
    """A mixture-of-experts feed-forward (Switch / Mixtral / Qwen2-MoE): a router scores the experts of
    each token, the top ``top_k`` run, their outputs are summed weighted by the scores; optional shared
    experts run on every token (Qwen2-MoE, with a sigmoid gate)."""
    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None  # each routed expert's hidden size (None: the dense ffn's size)
    activation: str = "swiglu"
    score: str = "softmax"  # how router logits become weights ("softmax"; DeepSeek-V3 will add "sigmoid")
    norm_topk_prob: bool = True  # renormalize the top-k weights to sum to 1 (Mixtral: yes; Qwen2-MoE: its flag)
    n_shared: int = 0  # shared experts (as one MLP of n_shared * d_shared), run on every token
    d_shared: int | None = None  # hidden size of one shared expert (None: d_expert)
    shared_gate: bool = False  # scale the shared output by sigmoid(w . x) (Qwen2-MoE)
    aux_loss_coef: float = 0.01  # the Switch/Mixtral load-balancing loss, added to the training loss
    z_loss_coef: float = 0.0  # router z-loss (ST-MoE): mean logsumexp(router logits)^2

    def validate(self) -> None:
        def bad(f, msg):
            raise ValueError(f"ModelConfig.moe.{f}: {msg}")

        if not isinstance(self.n_experts, int) or self.n_experts < 1:
            bad("n_experts", f"must be a positive integer, got {self.n_experts!r}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.n_experts:
            bad("top_k", f"must be in 1..n_experts={self.n_experts}, got {self.top_k!r}")
        if self.score != "softmax":
            bad("score", f"only 'softmax' router scores are implemented, got {self.score!r}")
        if self.n_shared < 0:
            bad("n_shared", f"must be >= 0, got {self.n_shared}")
        if self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            bad("aux_loss_coef", "the loss coefficients must be >= 0")


@dataclass(frozen=True)
class LayerSpec:
    """What one layer is: the components' registry names and the per-layer settings."""
    index: int
    attention: str = "causal"
    window: int | None = None  # this layer's sliding window (None: full causal)
    ffn: str = "dense"  # "dense" | "moe"


ACTIVATIONS = ("gelu_tanh", "gelu", "swiglu", "relu2")
GATED = ("swiglu",)  # activations whose MLP has a gate and an up projection


def select_layers(pattern, n_layer: int, what: str) -> list[bool]:
    """Which of ``n_layer`` layers a pattern selects: "all", "none", "every:K" (layers K-1, 2K-1, ...:
    Qwen2-MoE's decoder_sparse_step), "from:K" (layers K.. : DeepSeek's first-k-dense, Qwen2's
    max_window_layers), or a list of layer indices."""
    if isinstance(pattern, (list, tuple)):
        bad = [i for i in pattern if not isinstance(i, int) or not 0 <= i < n_layer]
        if bad:
            raise ValueError(f"ModelConfig.{what}: layer indices {bad} are outside 0..{n_layer - 1}")
        s = set(pattern)
        return [i in s for i in range(n_layer)]
    if pattern == "all":
        return [True] * n_layer
    if pattern == "none":
        return [False] * n_layer
    if isinstance(pattern, str) and ":" in pattern:
        how, _, k = pattern.partition(":")
        if how in ("every", "from") and k.isdigit() and (int(k) >= 1 or how == "from"):
            k = int(k)
            return [(i + 1) % k == 0 if how == "every" else i >= k for i in range(n_layer)]
    raise ValueError(f"ModelConfig.{what}: expected 'all', 'none', 'every:K', 'from:K' or a list of layer "
                     f"indices, got {pattern!r}")


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    d_model: int = 768
    max_seq_len: int = 1024
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias (GPT-2 has one)
    pos: str = "learned"  # "learned" absolute positions | "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style: {"type": "llama3", "factor", "low_freq_factor",
    #                                      "high_freq_factor", "original_max_position_embeddings"}
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2)
    dropout: float = 0.0
    init_std: float = 0.02
    zero_init_proj: bool = False  # zero the output projections of every component at init
    hf_family: str = "gpt2"  # the HF family it exports as (model.hf.FAMILIES), or "none" (not exported)
    attn: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FeedForwardConfig = field(default_factory=FeedForwardConfig)
    moe: MoEConfig | None = None
    window_layers: str | list = "all"  # the layers whose attention uses attn.sliding_window
    moe_layers: str | list = "all"  # the layers whose feed-forward is the MoE (when moe is set)

    def __post_init__(self):
        for name, cls in (("attn", AttentionConfig), ("ffn", FeedForwardConfig), ("moe", MoEConfig)):
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, cls(**_known(cls, v, f"ModelConfig.{name}")))
        self.validate()

    # ---- derived sizes ----
    @property
    def n_head(self) -> int:
        return self.attn.n_head

    @property
    def kv_heads(self) -> int:
        return self.attn.n_kv_head or self.attn.n_head

    @property
    def hd(self) -> int:
        return self.attn.head_dim or self.d_model // self.attn.n_head

    @property
    def ff(self) -> int:
        """The dense feed-forward's hidden size."""
        return ffn_size(self.ffn.d_ff, self.ffn.activation, self.d_model)

    @property
    def d_expert(self) -> int:
        return self.moe.d_expert or ffn_size(None, self.moe.activation, self.d_model)

    def layer_specs(self) -> list[LayerSpec]:
        """One ``LayerSpec`` per layer: the pattern fields resolved."""
        windowed = select_layers(self.window_layers, self.n_layer, "window_layers")
        moe = select_layers(self.moe_layers, self.n_layer, "moe_layers") if self.moe else [False] * self.n_layer
        w = self.attn.sliding_window
        return [LayerSpec(i, self.attn.kind, w if windowed[i] else None, "moe" if moe[i] else "dense")
                for i in range(self.n_layer)]

    def validate(self) -> None:
        def bad(field_name, msg):
            raise ValueError(f"ModelConfig.{field_name}: {msg}")

        for f in ("vocab_size", "n_layer", "d_model", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(f, f"must be a positive integer, got {v!r}")
        a = self.attn
        if not isinstance(a.n_head, int) or a.n_head < 1:
            bad("attn.n_head", f"must be a positive integer, got {a.n_head!r}")
        if a.head_dim is None and self.d_model % a.n_head:
            bad("attn.n_head", f"{a.n_head} heads do not divide d_model={self.d_model} "
                               "(set attn.head_dim to use heads of another size)")
        if self.kv_heads < 1 or a.n_head % self.kv_heads:
            bad("attn.n_kv_head", f"{self.kv_heads} key/value heads must divide n_head={a.n_head} (GQA groups)")
        if self.norm not in ("layernorm", "rmsnorm"):
            bad("norm", f"expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.ffn.activation not in ACTIVATIONS:
            bad("ffn.activation", f"expected {', '.join(ACTIVATIONS)}, got {self.ffn.activation!r}")
        if self.pos not in ("learned", "rope"):
            bad("pos", f"expected 'learned' or 'rope', got {self.pos!r}")
        if self.pos == "rope" and self.hd % 2:
            bad("attn.head_dim", f"RoPE needs an even head dimension, got {self.hd}")
        if a.sliding_window is not None and a.sliding_window < 1:
            bad("attn.sliding_window", f"must be >= 1 or None, got {a.sliding_window}")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            t = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if t != "llama3":
                bad("rope_scaling", f"only Llama-3 scaling ({{'type': 'llama3', ...}}) is supported, got {t!r}")
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if k not in self.rope_scaling:
                    bad("rope_scaling", f"missing {k!r}")
        if self.moe is not None:
            self.moe.validate()
            if self.moe.activation not in ACTIVATIONS:
                bad("moe.activation", f"expected {', '.join(ACTIVATIONS)}, got {self.moe.activation!r}")
        from .registry import known

        attention, ffn = known("attention"), known("feed-forward")
        for s in self.layer_specs():  # (also checks the patterns)
            if s.attention not in attention:
                bad("attn.kind", f"unknown attention {s.attention!r}; known: {', '.join(attention)}")
            if s.ffn not in ffn:
                bad("ffn", f"unknown feed-forward {s.ffn!r}; known: {', '.join(ffn)}")

    # ---- counts (the components own them: counted on a meta-device model) ----
    def _meta_model(self):
        import torch

        from .transformer import Transformer

        with torch.device("meta"):
            return Transformer(self)

    def num_params(self, embeddings: bool = True) -> int:
        return self._meta_model().num_params(embeddings=embeddings)

    def num_active_params(self, embeddings: bool = True) -> int:
        """Parameters one token multiplies (a MoE's top-k experts, not all of them)."""
        return self._meta_model().num_active_params(embeddings=embeddings)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N_active (without embeddings, plus the output head) plus each
        attention layer's scores (12 H D T per layer: the PaLM / Chinchilla accounting)."""
        return self._meta_model().flops_per_token(seq_len or self.max_seq_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """From a nested dict (``to_dict``) or an old flat one (``LEGACY`` names), or a mix."""
        return cls(**normalize(d))


def ffn_size(d_ff: int | None, activation: str, d_model: int) -> int:
    if d_ff:
        return d_ff
    if activation in GATED:  # Llama: 2/3 of 4d, rounded up to a multiple of 64
        return 64 * math.ceil(int(8 * d_model / 3) / 64)
    return 4 * d_model


# flat name (ModelConfig before the tree) -> its place in the tree
LEGACY = {"n_head": ("attn", "n_head"), "n_kv_head": ("attn", "n_kv_head"), "head_dim": ("attn", "head_dim"),
          "qk_norm": ("attn", "qk_norm"), "qkv_bias": ("attn", "qkv_bias"), "out_bias": ("attn", "out_bias"),
          "sliding_window": ("attn", "sliding_window"), "mlp": ("ffn", "activation"), "d_ff": ("ffn", "d_ff"),
          "mlp_bias": ("ffn", "bias"), "arch": ("hf_family",)}
_SUB = {"attn": AttentionConfig, "ffn": FeedForwardConfig, "moe": MoEConfig}


def _known(cls, d: dict, what: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        import difflib

        hint = "".join(f"; did you mean {c[0]!r} for {u!r}?" for u in unknown
                       if (c := difflib.get_close_matches(u, sorted(names), n=1, cutoff=0.6)))
        raise ValueError(f"{what}: unknown field(s) {unknown} (it has: {', '.join(sorted(names))}){hint}")
    return d


def field_names() -> set[str]:
    """Every name a model dict may use: the tree's fields, ``sub.field`` paths and the legacy names."""
    out = {f.name for f in dataclasses.fields(ModelConfig)} | set(LEGACY)
    for sub, cls in _SUB.items():
        out |= {f"{sub}.{f.name}" for f in dataclasses.fields(cls)}
    return out


def field_type(name: str):
    """The type of a model field by any name ``normalize`` reads ("n_head", "attn.n_head", "vocab_size");
    KeyError if there is none."""
    import typing

    path = LEGACY.get(name) or tuple(name.split(".", 1))
    cls = ModelConfig if len(path) == 1 else _SUB.get(path[0])
    hints = typing.get_type_hints(cls) if cls else {}
    if path[-1] not in hints:
        raise KeyError(name)
    return hints[path[-1]]


def normalize(d: dict) -> dict:
    """A nested ModelConfig dict from a nested, flat (``LEGACY``), dotted (``"attn.n_head"``) or mixed one;
    a ValueError names any unknown field."""
    out: dict = {}
    subs: dict[str, dict] = {}
    top = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in d.items():
        path = LEGACY.get(k) or tuple(k.split(".", 1))
        if len(path) == 2:
            if path[0] not in _SUB:
                raise ValueError(f"ModelConfig: unknown field {k!r}")
            subs.setdefault(path[0], {})[path[1]] = v
        elif k in _SUB and isinstance(v, dict):
            subs.setdefault(k, {}).update(v)
        elif k in _SUB and (v is None or dataclasses.is_dataclass(v)):
            out[k] = v
        else:
            if path[0] not in top:
                _known(ModelConfig, {k: v}, "ModelConfig")
            out[path[0]] = v
    for sub, fields in subs.items():
        base = out.get(sub)
        base = dataclasses.asdict(base) if dataclasses.is_dataclass(base) else {}
        out[sub] = {**base, **_known(_SUB[sub], fields, f"ModelConfig.{sub}")}
    return out


def merge(base: dict, overrides: dict) -> dict:
    """``overrides`` (any form ``normalize`` reads) applied on ``base``, sub-config by sub-config."""
    b, o = normalize(base), normalize(overrides)
    for k, v in o.items():
        if k in _SUB and isinstance(v, dict) and isinstance(b.get(k), dict):
            b[k] = {**b[k], **v}
        else:
            b[k] = v
    return b


def make(**kw) -> ModelConfig:
    """A ModelConfig from keywords in any form ``normalize`` reads (``make(n_head=4, mlp="swiglu")``)."""
    return ModelConfig.from_dict(kw)


def _llama_like(**kw) -> dict:
    base = dict(norm="rmsnorm", norm_eps=1e-5, norm_bias=False, pos="rope", tie_embeddings=False,
                hf_family="llama", attn=dict(qkv_bias=False, out_bias=False),
                ffn=dict(activation="swiglu", bias=False))
    return merge(base, kw)


PRESETS: dict[str, dict] = {
    # GPT-2 small, exactly (vocab padded to 50304 for speed; 50257 for the real one)
    "gpt2-124m": dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seq_len=1024),
    "gpt2-350m": dict(vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seq_len=1024),
    # Llama-3.2-1B-shaped, for the GPU recipe (not run in CI)
    "llama-1b": _llama_like(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_ff=8192,
                            max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    # CPU sizes
    "tiny": dict(vocab_size=4096, n_layer=2, n_head=4, d_model=128, max_seq_len=256),
    # nanoGPT's CPU "baby GPT" (shakespeare_char): no biases, exact GELU, tied embeddings
    # (exports as GPT-2 with zero biases and activation_function "gelu")
    "baby-gpt": dict(vocab_size=65, n_layer=4, n_head=4, d_model=128, max_seq_len=64, mlp="gelu", norm_bias=False,
                     qkv_bias=False, out_bias=False, mlp_bias=False, hf_family="gpt2"),
    # lmforge's best CPU recipe for the built-in corpus (benchmarks/cpu_recipe.py): the modern changes
    # (sized by measurement: at 40-80 s of 2 CPU cores, 4 x 96 beat 4 x 128/192/256, 6 layers and 64 wide);
    # exports as Qwen3 with hidden_act "relu" and gate_proj = up_proj (relu(a) * a = relu(a)^2)
    "shakespeare-cpu": dict(vocab_size=2048, n_layer=4, n_head=3, d_model=96, max_seq_len=256, norm="rmsnorm",
                            norm_bias=False, mlp="relu2", pos="rope", qk_norm=True, qkv_bias=False, out_bias=False,
                            mlp_bias=False, tie_embeddings=False, zero_init_proj=True, hf_family="qwen3"),
    "small-6x384": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    "tiny-llama": _llama_like(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=256),
    # Mixtral-shaped and Qwen2-MoE-shaped small models (CPU)
    "tiny-mixtral": _llama_like(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=256,
                                hf_family="mixtral", moe=dict(n_experts=4, top_k=2, d_expert=192)),
    "tiny-qwen2-moe": _llama_like(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=256,
                                  hf_family="qwen2_moe", qkv_bias=True,
                                  moe=dict(n_experts=4, top_k=2, d_expert=96, norm_topk_prob=False, n_shared=1,
                                           d_shared=192, shared_gate=True)),
    # shakespeare-cpu's shape with a Mixtral MoE feed-forward of the same active parameters: 8 SwiGLU experts
    # of 128, top 2 (2 x 3 x 96 x 128 = 73,728 = the dense 96 -> 384 -> 96 ReLU^2 MLP; + the 768-weight
    # router), every layer; no qk_norm (Mixtral has none), exports as Mixtral
    "shakespeare-moe": dict(vocab_size=2048, n_layer=4, n_head=3, d_model=96, max_seq_len=256, norm="rmsnorm",
                            norm_bias=False, pos="rope", qkv_bias=False, out_bias=False, mlp="swiglu",
                            mlp_bias=False, tie_embeddings=False, zero_init_proj=True, hf_family="mixtral",
                            moe=dict(n_experts=8, top_k=2, d_expert=128, activation="swiglu")),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return ModelConfig(**merge(PRESETS[name], overrides))


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters, FLOPs per token and memory, for ``lmforge model info``."""
    m = cfg._meta_model()
    T = seq_len or cfg.max_seq_len
    n = m.num_params()
    cache = sum(s.bytes_per_token(2) for s in m.cache_specs())
    flops = m.flops_per_token(T)
    return {
        "params": n, "params_non_embedding": m.num_params(embeddings=False),
        "params_active": m.num_active_params(),
        "flops_per_token_train": flops, "flops_per_token_forward": flops // 3,
        "weights_mb_fp32": n * 4 / 1e6, "weights_mb_bf16": n * 2 / 1e6,
        "train_state_mb_fp32_adamw": n * 16 / 1e6,  # weights + grads + two moments
        "kv_cache_bytes_per_token_bf16": cache, "seq_len": T,
    }
