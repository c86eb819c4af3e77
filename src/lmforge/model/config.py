"""``ModelConfig``: one dataclass describes every decoder lmforge builds.

Knows the architecture as data (GPT-2, Llama, Mistral, Qwen2, Qwen3 and small
CPU models are presets, not subclasses), checks that the numbers fit together,
and counts parameters, FLOPs and memory; knows nothing about weights.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_head (Qwen3 sets it apart)
    d_ff: int | None = None  # None: 4 * d_model (GELU/ReLU²) or the Llama rule for SwiGLU
    max_seq_len: int = 1024
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm bias (GPT-2 has one)
    mlp: str = "gelu_tanh"  # "gelu_tanh" (GPT-2's gelu_new) | "gelu" | "swiglu" | "relu2"
    pos: str = "learned"  # "learned" absolute positions | "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 style: {"type": "llama3", "factor", "low_freq_factor",
    #                                      "high_freq_factor", "original_max_position_embeddings"}
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3, OLMo-2)
    qkv_bias: bool = True
    out_bias: bool = True  # attention output projection bias
    mlp_bias: bool = True
    tie_embeddings: bool = True
    sliding_window: int | None = None  # a query sees at most this many keys, itself included (Mistral)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2)
    dropout: float = 0.0
    init_std: float = 0.02
    zero_init_proj: bool = False  # zero the output projections of attention and MLP at init
    arch: str = "gpt2"  # the HF family it exports as: gpt2 | llama | mistral | qwen2 | qwen3 | none (not exported)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes ----
    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.mlp == "swiglu":  # Llama: 2/3 of 4d, rounded up to a multiple of 64
            return 64 * math.ceil(int(8 * self.d_model / 3) / 64)
        return 4 * self.d_model

    def validate(self) -> None:
        def bad(field_name, msg):
            raise ValueError(f"ModelConfig.{field_name}: {msg}")

        for f in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                bad(f, f"must be a positive integer, got {v!r}")
        if self.head_dim is None and self.d_model % self.n_head:
            bad("n_head", f"{self.n_head} heads do not divide d_model={self.d_model} "
                          "(set head_dim to use heads of another size)")
        if self.kv_heads < 1 or self.n_head % self.kv_heads:
            bad("n_kv_head", f"{self.kv_heads} key/value heads must divide n_head={self.n_head} (GQA groups)")
        if self.norm not in ("layernorm", "rmsnorm"):
            bad("norm", f"expected 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.mlp not in ("gelu_tanh", "gelu", "swiglu", "relu2"):
            bad("mlp", f"expected gelu_tanh, gelu, swiglu or relu2, got {self.mlp!r}")
        if self.pos not in ("learned", "rope"):
            bad("pos", f"expected 'learned' or 'rope', got {self.pos!r}")
        if self.pos == "rope" and self.hd % 2:
            bad("head_dim", f"RoPE needs an even head dimension, got {self.hd}")
        if self.sliding_window is not None and self.sliding_window < 1:
            bad("sliding_window", f"must be >= 1 or None, got {self.sliding_window}")
        if not 0 <= self.dropout < 1:
            bad("dropout", f"must be in [0, 1), got {self.dropout}")
        if self.rope_scaling is not None:
            t = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if t != "llama3":
                bad("rope_scaling", f"only Llama-3 scaling ({{'type': 'llama3', ...}}) is supported, got {t!r}")
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if k not in self.rope_scaling:
                    bad("rope_scaling", f"missing {k!r}")

    # ---- counts ----
    def num_params(self, embeddings: bool = True) -> int:
        d, hd, L = self.d_model, self.hd, self.n_layer
        q, kv = self.n_head * hd, self.kv_heads * hd
        attn = d * (q + 2 * kv) + q * d
        attn += (q + 2 * kv) * self.qkv_bias + d * self.out_bias + (2 * hd if self.qk_norm else 0)
        ff = self.ff
        mlp = (3 if self.mlp == "swiglu" else 2) * d * ff
        mlp += ((2 * ff if self.mlp == "swiglu" else ff) + d) * self.mlp_bias
        norm = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        per_layer = attn + mlp + 2 * norm
        n = L * per_layer + norm
        if embeddings:
            n += self.vocab_size * d
            if not self.tie_embeddings:
                n += self.vocab_size * d
            if self.pos == "learned":
                n += self.max_seq_len * d
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N (N without embeddings, plus the output head)
        + 12 L d T for attention scores (the PaLM / Chinchilla accounting)."""
        T = seq_len or self.max_seq_len
        if self.sliding_window:
            T = min(T, self.sliding_window)
        n = self.num_params(embeddings=False) + self.vocab_size * self.d_model  # the head's matmul
        return 6 * n + 12 * self.n_layer * self.n_head * self.hd * T

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        from .._config import known_fields

        return cls(**known_fields(cls, d))


def _llama_like(**kw) -> dict:
    base = dict(norm="rmsnorm", norm_eps=1e-5, norm_bias=False, mlp="swiglu", pos="rope", qkv_bias=False,
                out_bias=False, mlp_bias=False, tie_embeddings=False, arch="llama")
    base.update(kw)
    return base


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
                     qkv_bias=False, out_bias=False, mlp_bias=False, arch="gpt2"),
    # lmforge's best CPU recipe for the built-in corpus (benchmarks/cpu_recipe.py): the modern changes
    # (sized by measurement: at 40-80 s of 2 CPU cores, 4 x 96 beat 4 x 128/192/256, 6 layers and 64 wide);
    # exports as Qwen3 with hidden_act "relu" and gate_proj = up_proj (relu(a) * a = relu(a)^2)
    "shakespeare-cpu": dict(vocab_size=2048, n_layer=4, n_head=3, d_model=96, max_seq_len=256, norm="rmsnorm",
                            norm_bias=False, mlp="relu2", pos="rope", qk_norm=True, qkv_bias=False, out_bias=False,
                            mlp_bias=False, tie_embeddings=False, zero_init_proj=True, arch="qwen3"),
    "small-6x384": dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, max_seq_len=256),
    "tiny-llama": _llama_like(vocab_size=4096, n_layer=2, n_head=4, n_kv_head=2, d_model=128, max_seq_len=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    d = dict(PRESETS[name])
    d.update(overrides)
    return ModelConfig(**d)


def describe(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Parameters, FLOPs per token and memory, for ``lmforge model info``."""
    n = cfg.num_params()
    T = seq_len or cfg.max_seq_len
    kv_per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.hd
    return {
        "params": n, "params_non_embedding": cfg.num_params(embeddings=False),
        "flops_per_token_train": cfg.flops_per_token(T), "flops_per_token_forward": cfg.flops_per_token(T) // 3,
        "weights_mb_fp32": n * 4 / 1e6, "weights_mb_bf16": n * 2 / 1e6,
        "train_state_mb_fp32_adamw": n * 16 / 1e6,  # weights + grads + two moments
        "kv_cache_bytes_per_token_bf16": kv_per_token * 2, "seq_len": T,
    }


