"""lmforge models <-> GGUF files that llama.cpp runs: ``export_gguf`` and ``import_gguf``.

Knows what llama.cpp's ``llama``, ``qwen2`` and ``qwen3`` architectures are (their
metadata keys, tensor names and what each can run), the Q/K row permutation the
``llama`` architecture needs, which llama.cpp pre-tokenizer equals which lmforge
pattern, and how a byte-level BPE becomes ``tokenizer.ggml.*`` and back. Knows
nothing of the file's bytes or the block codecs (``lmforge.quant.gguf``), nor of
how weights are quantized by lmforge's own methods (``lmforge.quant``).

Mapping (lmforge name -> GGUF tensor, per layer i; GGUF shapes are ne0 first, i.e.
(in, out) for a weight whose torch shape is (out, in)):

| lmforge | GGUF |
| --- | --- |
| tok_emb.weight | token_embd.weight |
| blocks.i.attn_norm | blk.i.attn_norm |
| blocks.i.attn.qkv = [q; k; v] (+ bias) | blk.i.attn_q, attn_k, attn_v (+ .bias) |
| blocks.i.attn.q_norm, k_norm (qwen3) | blk.i.attn_q_norm, attn_k_norm |
| blocks.i.attn.proj | blk.i.attn_output |
| blocks.i.mlp_norm | blk.i.ffn_norm |
| blocks.i.mlp.fc = [gate; up] (swiglu) | blk.i.ffn_gate, ffn_up |
| blocks.i.mlp.proj | blk.i.ffn_down |
| norm_f | output_norm |
| lm_head (absent when tied) | output |
| (Llama-3 rope scaling) | rope_freqs (one factor per frequency) |

**The permutation pitfall.** lmforge (like HF) rotates the halves of a head: pairs
(x_j, x_{j+D/2}). llama.cpp's ``llama`` architecture uses "normal" RoPE, which
rotates adjacent pairs (x_{2j}, x_{2j+1}); so the rows of ``attn_q`` and ``attn_k``
(and their biases) are reordered within each head, row 2j+h of the GGUF head =
row h*D/2+j of lmforge's (h = 0, 1). ``qwen2`` and ``qwen3`` use NEOX RoPE (halves):
no permutation. (tests/test_gguf_llamacpp.py proves both by llama.cpp's logits.)

**Tensor types.** ``type`` is one of ``TYPES``; every 2-D weight gets it, norms and
other 1-D tensors stay F32 (as llama.cpp's quantizer leaves them). A row length
(the input dimension) that is not a multiple of 32 is refused for the block types
(ValueError naming the tensor and its size). ``q4_k`` (blocks of 256) falls back,
per tensor, to Q4_0 (32) for rows that are a multiple of 32 but not of 256 (llama.cpp's
own fallback is Q5_0, which lmforge does not write); the fallbacks are logged and
listed in the file's ``lmforge.fallback`` key.

**The tokenizer.** ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): tokens as
HF byte-level strings, types NORMAL, CONTROL for special tokens (llama.cpp splits
them out only with ``parse_special``, as lmforge's ``allowed_special``), UNUSED
for placeholders ``[PAD{i}]`` up to the model's vocabulary size (llama.cpp sizes the
embedding by the token list); merges; ``pre`` = the llama.cpp pre-tokenizer whose
regex is lmforge's pattern and whose ``ignore_merges`` is lmforge's ``whole_word``
(``PRE``; cl100k = "llama-bpe" with whole words, "dbrx" without); a pattern with no
llama.cpp twin, an NFC normalizer or a non-BPE tokenizer is refused. Special ids:
bos = ``TokenSpec.bos``, ``add_bos_token`` = ``TokenSpec.add_bos``, eos = stop[0],
eot = stop[1] (llama.cpp also ends a generation at tokens it recognizes by text:
``<|end|>``, ``<|endoftext|>``, ...; a third stop id has no key), pad; ``tokenizer.chat_template``.
(A spec without bos or stop ids leaves the key out, and llama.cpp then assumes id 11 for it.) The full
``TokenSpec`` and ``ModelConfig`` travel as JSON in ``lmforge.token_spec`` and
``lmforge.model`` (llama.cpp ignores unknown keys), so an lmforge export imports
back exactly; a GGUF without them imports from the standard keys alone.

**Import.** ``import_gguf`` reads lmforge's files and llama.cpp-quantized ones
(``llama_model_quantize`` keeps every key): weights dequantized to fp32, or with
``dequantize=False`` Q8_0 / Q4_0 linears as ``IntLinear`` with groups of 32:
Q8_0 block (fp16 d, 32 int8 q): w = d q -> 8-bit symmetric, codes q, scales d;
Q4_0 block (fp16 d, 16 bytes: elements 0..15 in the low nibbles, 16..31 in the high
ones): w = d (n - 8) -> 4-bit symmetric, codes q = n - 8 in [-8, 7], scales d (the
same numbers exactly). A fused lmforge linear (qkv, fc) stays quantized only when
its parts have one such type; others (K-quants, F16, mixed) become fp32 ``nn.Linear``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("lmforge.quant")

ARCHS = ("llama", "qwen2", "qwen3")
TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k")
# llama_ftype of the file (general.file_type): ALL_F32, MOSTLY_F16, MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_K_M
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2, "q4_k": 15}
# llama.cpp token types (llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5
PLACEHOLDER = "[PAD{}]"  # what llama.cpp's converter names the ids the tokenizer does not use


def _pre_table():
    """(llama.cpp pre-tokenizer name, the regexes it equals (llama.cpp's "original regex from
    tokenizer.json"), its ignore_merges): what llama-vocab.cpp does for each name we write or read."""
    from ..tokenize import pretokenize as P

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
    cl100k = (P.CL100K, P.CL100K_HF)
    return [("llama-bpe", cl100k, True, "cl100k"), ("dbrx", cl100k, False, "cl100k"),
            ("qwen2", (qwen2,), False, qwen2), ("gpt-2", (P.GPT2, P.GPT2_HF), False, "gpt2"),
            ("gpt-4o", (P.O200K,), False, "o200k")]


# names llama.cpp reads as one of the above (import): name -> the name of _pre_table
PRE_ALIASES = {**dict.fromkeys(("llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
                                "llama-bpe"),
               "smaug-bpe": "dbrx", **dict.fromkeys(("deepseek-r1-qwen", "kormo", "f2llmv2"), "qwen2"),
               **dict.fromkeys(("phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                                "mellum", "modern-bert"), "gpt-2"),
               **dict.fromkeys(("llama4", "kanana2", "talkie"), "gpt-4o")}


def _gguf():
    from . import gguf

    return gguf


# ---- what llama.cpp can run -------------------------------------------------------------------

def _need(cond: bool, arch: str, field: str, what: str) -> None:
    if not cond:
        raise ValueError(f"export_gguf: cannot export as GGUF {arch}: ModelConfig.{field} must be {what}")


def resolve_arch(cfg, arch: str | None = None) -> str:
    """The GGUF architecture to write: ``arch``, else the config's ``hf_family``."""
    a = arch or cfg.hf_family
    if a not in ARCHS:
        src = "arch" if arch else "ModelConfig.hf_family"
        raise ValueError(f"export_gguf: {src}: {a!r} is not a GGUF architecture lmforge writes (expected one of "
                         f"{', '.join(ARCHS)}; pass arch= for a model whose family is another)")
    return a


def check_gguf_exportable(cfg, arch: str) -> None:
    """Raise a ValueError naming the first ModelConfig field llama.cpp's ``arch`` cannot run."""
    specs = cfg.layer_specs()
    _need(cfg.norm == "rmsnorm", arch, "norm", "'rmsnorm' (llama.cpp's llama/qwen graphs use RMSNorm)")
    _need(cfg.pos == "rope", arch, "pos", "'rope' (llama.cpp's llama/qwen graphs have no learned positions)")
    _need(cfg.moe is None and all(s.ffn == "dense" for s in specs), arch, "moe",
          "None (lmforge does not write GGUF mixtures of experts)")
    _need(cfg.ffn.activation == "swiglu", arch, "ffn.activation",
          "'swiglu' (the llama/qwen graphs compute silu(gate) * up)")
    _need(all(s.attention == "causal" for s in specs), arch, "attn.kind", "'causal'")
    _need(cfg.attn.sliding_window is None, arch, "attn.sliding_window", "None")
    _need(cfg.logit_softcap is None, arch, "logit_softcap", "None")
    if arch == "qwen3":
        _need(cfg.attn.qk_norm, arch, "attn.qk_norm", "True (qwen3 always normalizes queries and keys)")
    else:
        _need(not cfg.attn.qk_norm, arch, "attn.qk_norm", f"False ({arch} has no query/key norm; qwen3 has)")
    if arch != "llama":
        _need(cfg.rope_scaling is None, arch, "rope_scaling", f"None (llama.cpp's {arch} graph takes no rope factors)")
        _need(not cfg.attn.out_bias, arch, "attn.out_bias", f"False ({arch}'s attn_output has no bias in llama.cpp)")
        _need(not cfg.ffn.bias, arch, "ffn.bias", f"False ({arch}'s feed-forward has no biases in llama.cpp)")
    if arch == "qwen2":
        _need(cfg.n_head * cfg.hd == cfg.d_model, arch, "attn.head_dim",
              f"d_model // n_head = {cfg.d_model // cfg.n_head} (llama.cpp's qwen2 needs n_head * head_dim = d_model)")


# ---- the tokenizer ----------------------------------------------------------------------------

def _merges_only(tok, t: bytes) -> tuple[int, ...]:
    """BPE of ``t`` by merges alone (no whole-word shortcut)."""
    ids = [tok.byte_ids[x] for x in t]
    while len(ids) > 1:
        best, bi = None, -1
        for i in range(len(ids) - 1):
            v = tok.pairs.get((ids[i], ids[i + 1]))
            if v is not None and (best is None or v[0] < best[0]):
                best, bi = v, i
        if best is None:
            break
        ids[bi:bi + 2] = [best[1]]
    return tuple(ids)


def _whole_words_matter(tok) -> int | None:
    """The first token id that merges alone do not rebuild (so ``whole_word`` changes how a chunk equal to
    it encodes), or None when whole-word lookup is the same as merging for every token."""
    for i, t in enumerate(tok.tokens):
        if t is not None and len(t) > 1 and tok.bytes_to_id.get(t) == i and _merges_only(tok, t) != (i,):
            return i
    return None


def pre_tokenizer(tok) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` that splits and merges as ``tok`` does; ValueError if none does."""
    from ..tokenize.bpe import ByteBPE

    if not isinstance(tok, ByteBPE):
        raise ValueError(f"export_gguf: tokenizer: a {type(tok).__name__} has no GGUF form lmforge writes "
                         "(tokenizer.ggml.model 'gpt2' is byte-level BPE)")
    if tok.normalizer is not None:
        raise ValueError(f"export_gguf: tokenizer.normalizer: {tok.normalizer!r}; llama.cpp's BPE pre-tokenizers "
                         "do not normalize, so it would tokenize differently (expected None)")
    if getattr(tok, "add_prefix_space", False):
        raise ValueError("export_gguf: tokenizer.add_prefix_space: True has no llama.cpp BPE equivalent")
    same = [(name, ig) for name, regexes, ig, _ in _pre_table() if tok.pattern in regexes]
    if not same:
        raise ValueError(f"export_gguf: tokenizer.pattern: {tok.pattern!r} is no llama.cpp pre-tokenizer's regex "
                         "(lmforge writes cl100k, gpt2, o200k and Qwen2's pattern)")
    for name, ig in same:
        if ig == tok.whole_word:
            return name
    name = same[0][0]
    bad = _whole_words_matter(tok)
    if bad is not None:
        raise ValueError(f"export_gguf: tokenizer.whole_word: {tok.whole_word} differs from llama.cpp's {name!r} "
                         f"pre-tokenizer (ignore_merges={not tok.whole_word}) and matters for token {bad} "
                         f"({tok.tokens[bad]!r}: merges alone do not rebuild it)")
    return name


def tokenizer_metadata(tok, tokens, vocab_size: int) -> dict:
    """The ``tokenizer.*`` keys (and ``lmforge.token_spec``) for ``tok`` padded to ``vocab_size`` ids."""
    from ..tokenize.bpe import token_to_text

    G = _gguf()
    pre = pre_tokenizer(tok)
    if tok.vocab_size > vocab_size:
        raise ValueError(f"export_gguf: the tokenizer has {tok.vocab_size} tokens but the model only "
                         f"{vocab_size} embeddings")
    tokens.check(tok, vocab_size)
    special = {i: s for s, i in tok.special_tokens.items()}
    texts, types, seen = [], [], {}
    for i in range(vocab_size):
        if i in special:
            t, ty = special[i], CONTROL
        elif i < len(tok.tokens) and tok.tokens[i] is not None:
            t, ty = token_to_text(tok.tokens[i]), NORMAL
        else:
            t, ty = PLACEHOLDER.format(i), UNUSED
        if t in seen:
            raise ValueError(f"export_gguf: tokenizer: ids {seen[t]} and {i} are both {t!r}; llama.cpp needs "
                             "every token's text to be unique")
        seen[t] = i
        texts.append(t)
        types.append(ty)
    merges = [f"{token_to_text(tok.tokens[a])} {token_to_text(tok.tokens[b])}" for a, b, _ in tok.derived_merges()]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": texts,
          "tokenizer.ggml.token_type": (G.GGUFValueType.INT32, types), "tokenizer.ggml.merges": merges}
    if tokens.bos is not None:
        md["tokenizer.ggml.bos_token_id"] = tokens.bos
    if tokens.stop:
        md["tokenizer.ggml.eos_token_id"] = tokens.stop[0]
    if len(tokens.stop) > 1:
        md["tokenizer.ggml.eot_token_id"] = tokens.stop[1]
    if tokens.pad is not None:
        md["tokenizer.ggml.padding_token_id"] = tokens.pad
    md["tokenizer.ggml.add_bos_token"] = bool(tokens.add_bos and tokens.bos is not None)
    md["tokenizer.ggml.add_eos_token"] = False
    if tokens.chat_template:
        md["tokenizer.chat_template"] = tokens.chat_template
    md["lmforge.token_spec"] = json.dumps(tokens.to_dict(), ensure_ascii=False)
    return md


# ---- the weights ------------------------------------------------------------------------------

def _weight(mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in) fp32, bias or None) of an nn.Linear or any quantized linear (``dequantize()``)."""
    if isinstance(mod, torch.nn.Linear):
        w = mod.weight
    elif hasattr(mod, "dequantize"):
        w = mod.dequantize()
    else:
        raise ValueError(f"export_gguf: {type(mod).__name__} is neither nn.Linear nor a quantized linear")
    b = getattr(mod, "bias", None)
    return w.detach().float(), (None if b is None else b.detach().float())


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of each head from lmforge's halves order to llama.cpp's adjacent-pairs order (weights or biases)."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of ``permute_rope``."""
    D = w.shape[0] // n_head
    return w.reshape(n_head, D // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor in torch layout) of every tensor ``arch`` has, in file order."""
    cfg = model.cfg
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.hd
    out = [("token_embd.weight", model.tok_emb.weight.detach().float())]
    if cfg.rope_scaling:
        from ..model.layers import rope_frequencies
        import dataclasses

        plain = rope_frequencies(dataclasses.replace(cfg, rope_scaling=None)).double()
        scaled = rope_frequencies(cfg).double()
        out.append(("rope_freqs.weight", (plain / scaled).float()))  # llama.cpp divides each frequency by it
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}."
        out.append((p + "attn_norm.weight", b.attn_norm.weight.detach().float()))
        w, bias = _weight(b.attn.qkv)
        parts = dict(zip("qkv", w.split([H * D, K * D, K * D])))
        bparts = dict(zip("qkv", bias.split([H * D, K * D, K * D]))) if bias is not None else {}
        for x in "qkv":
            t, bt = parts[x], bparts.get(x)
            if arch == "llama" and x in "qk":
                n = H if x == "q" else K
                t = permute_rope(t, n)
                bt = None if bt is None else permute_rope(bt, n)
            out.append((p + f"attn_{x}.weight", t))
            if bt is not None:
                out.append((p + f"attn_{x}.bias", bt))
        if cfg.attn.qk_norm:
            out.append((p + "attn_q_norm.weight", b.attn.q_norm.weight.detach().float()))
            out.append((p + "attn_k_norm.weight", b.attn.k_norm.weight.detach().float()))
        w, bias = _weight(b.attn.proj)
        out.append((p + "attn_output.weight", w))
        if bias is not None:
            out.append((p + "attn_output.bias", bias))
        out.append((p + "ffn_norm.weight", b.mlp_norm.weight.detach().float()))
        w, bias = _weight(b.mlp.fc)
        for name, t, bt in zip(("ffn_gate", "ffn_up"), w.chunk(2), bias.chunk(2) if bias is not None else (None, None)):
            out.append((p + name + ".weight", t))
            if bt is not None:
                out.append((p + name + ".bias", bt))
        w, bias = _weight(b.mlp.proj)
        out.append((p + "ffn_down.weight", w))
        if bias is not None:
            out.append((p + "ffn_down.bias", bias))
    out.append(("output_norm.weight", model.norm_f.weight.detach().float()))
    if not cfg.tie_embeddings:
        w, _ = _weight(model.lm_head)
        out.append(("output.weight", w))
    return out


def tensor_type(name: str, shape: tuple, type: str):
    """The GGMLType ``name`` gets in a ``type`` file (1-D: F32; q4_k rows not of 256: Q4_0); ValueError for a
    row length the block does not divide."""
    G = _gguf()
    T = G.GGMLType
    if len(shape) == 1 or type == "f32":
        return T.F32
    if type == "f16":
        return T.F16
    t = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k": T.Q4_K}[type]
    n = shape[-1]
    if n % 32:
        raise ValueError(f"export_gguf: tensor {name} has rows of {n} values, which blocks of 32 do not divide "
                         f"(type {type}; f32 and f16 take any size)")
    if t == T.Q4_K and n % 256:
        return T.Q4_0
    return t


# ---- export -----------------------------------------------------------------------------------

def gguf_metadata(cfg, arch: str, type: str) -> dict:
    G = _gguf()
    f32 = G.GGUFValueType.FLOAT32
    md = {"general.architecture": arch, "general.name": "lmforge", "general.file_type": FILE_TYPE[type],
          "general.quantization_version": 2,
          f"{arch}.vocab_size": cfg.vocab_size, f"{arch}.context_length": cfg.max_seq_len,
          f"{arch}.embedding_length": cfg.d_model, f"{arch}.block_count": cfg.n_layer,
          f"{arch}.feed_forward_length": cfg.ff, f"{arch}.attention.head_count": cfg.n_head,
          f"{arch}.attention.head_count_kv": cfg.kv_heads, f"{arch}.attention.key_length": cfg.hd,
          f"{arch}.attention.value_length": cfg.hd, f"{arch}.rope.dimension_count": cfg.hd,
          f"{arch}.attention.layer_norm_rms_epsilon": (f32, float(cfg.norm_eps)),
          f"{arch}.rope.freq_base": (f32, float(cfg.rope_theta)),
          "lmforge.model": json.dumps(cfg.to_dict())}
    return md


def export_gguf(model, path, tokenizer, tokens=None, type: str = "f32", arch: str | None = None) -> Path:
    """Write ``model`` and its tokenizer as a GGUF file llama.cpp runs (see the module docstring).

    ``tokens``: the model's ``TokenSpec`` (inferred from the tokenizer when None). ``type``: one of
    ``TYPES``. ``arch``: "llama" | "qwen2" | "qwen3" (default: ``cfg.hf_family``). Everything is checked
    before anything is written; the write is atomic (a failed export leaves no file)."""
    G = _gguf()
    cfg = model.cfg
    if type not in TYPES:
        raise ValueError(f"export_gguf: type: {type!r} is not one lmforge writes (expected one of {', '.join(TYPES)})")
    arch = resolve_arch(cfg, arch)
    check_gguf_exportable(cfg, arch)
    if tokenizer is None:
        raise ValueError("export_gguf: tokenizer: None; a GGUF for llama.cpp needs the model's tokenizer")
    from ..tokenize.special import TokenSpec

    tokens = tokens or TokenSpec.for_tokenizer(tokenizer)
    md = gguf_metadata(cfg, arch, type)
    md.update(tokenizer_metadata(tokenizer, tokens, cfg.vocab_size))
    if cfg.rope_scaling:
        md["lmforge.rope_scaling"] = json.dumps(cfg.rope_scaling)
    named = gguf_tensors(model, arch)
    types = [tensor_type(n, tuple(t.shape), type) for n, t in named]  # all checks before any work
    fallback = [n for (n, t), ty in zip(named, types) if type == "q4_k" and t.dim() == 2 and ty != G.GGMLType.Q4_K]
    if fallback:
        log.warning("export_gguf: %d tensor(s) with rows not a multiple of 256 are Q4_0 in the q4_k file: %s%s "
                    "(all listed in its lmforge.fallback key)", len(fallback), ", ".join(fallback[:4]),
                    ", ..." if len(fallback) > 4 else "")
        md["lmforge.fallback"] = fallback
    tensors = [(name, np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32), ty, tuple(t.shape))
               for (name, t), ty in zip(named, types)]
    path = Path(path)
    G.write_gguf(path, md, tensors)  # (quantizes while writing, into a temporary file renamed at the end)
    return path


# ---- import -----------------------------------------------------------------------------------

class _File:
    """A GGUF file's keys and tensors, with errors that name the file."""

    def __init__(self, path):
        self.path = Path(path)
        self.f = _gguf().read_gguf(self.path)
        self.md = self.f.metadata

    def get(self, key, default=KeyError):
        if key in self.md:
            return self.md[key]
        if default is KeyError:
            raise ValueError(f"{self.path}: missing metadata key {key!r}")
        return default

    def has(self, name) -> bool:
        return name in self.f.tensors

    def info(self, name):
        if name not in self.f.tensors:
            raise ValueError(f"{self.path}: missing tensor {name!r}")
        return self.f.tensors[name]

    def array(self, name) -> torch.Tensor:
        self.info(name)
        return torch.from_numpy(np.array(self.f.array(name), dtype=np.float32))


def _num(v):
    """A metadata float as the decimal it was written from (float32 keys: 1e-05, not 9.99999974e-06)."""
    return float(f"{float(v):.7g}")


def _config(F: _File):
    from ..model.config import ModelConfig

    arch = F.get("general.architecture")
    if arch not in ARCHS:
        raise ValueError(f"{F.path}: general.architecture: {arch!r} is not one lmforge imports "
                         f"(expected one of {', '.join(ARCHS)})")
    for key in (f"{arch}.expert_count", f"{arch}.attention.sliding_window"):
        if F.get(key, 0):
            raise ValueError(f"{F.path}: {key}: {F.get(key)!r}; lmforge imports dense full-attention GGUFs only")
    emb = F.info("token_embd.weight")
    n_head = int(F.get(f"{arch}.attention.head_count"))
    d_model = int(F.get(f"{arch}.embedding_length"))
    hd = int(F.get(f"{arch}.attention.key_length", d_model // n_head))
    if int(F.get(f"{arch}.attention.value_length", hd)) != hd:
        raise ValueError(f"{F.path}: {arch}.attention.value_length: {F.get(f'{arch}.attention.value_length')} "
                         f"differs from key_length {hd} (lmforge's heads have one size)")
    if int(F.get(f"{arch}.rope.dimension_count", hd)) != hd:
        raise ValueError(f"{F.path}: {arch}.rope.dimension_count: {F.get(f'{arch}.rope.dimension_count')}; "
                         f"lmforge rotates the whole head ({hd})")
    kw = dict(vocab_size=int(emb.shape[1]), n_layer=int(F.get(f"{arch}.block_count")), d_model=d_model,
              max_seq_len=int(F.get(f"{arch}.context_length", 2048)), norm="rmsnorm",
              norm_eps=_num(F.get(f"{arch}.attention.layer_norm_rms_epsilon")), norm_bias=False, pos="rope",
              rope_theta=_num(F.get(f"{arch}.rope.freq_base", 10000.0)), tie_embeddings=not F.has("output.weight"),
              hf_family=arch,
              attn=dict(n_head=n_head, n_kv_head=int(F.get(f"{arch}.attention.head_count_kv", n_head)), head_dim=hd,
                        qk_norm=F.has("blk.0.attn_q_norm.weight"), qkv_bias=F.has("blk.0.attn_q.bias"),
                        out_bias=F.has("blk.0.attn_output.bias")),
              ffn=dict(activation="swiglu", d_ff=int(F.get(f"{arch}.feed_forward_length")),
                       bias=F.has("blk.0.ffn_gate.bias")))
    saved = F.get("lmforge.model", None)
    if F.has("rope_freqs.weight"):
        rs = F.get("lmforge.rope_scaling", None)
        if rs is None:
            raise ValueError(f"{F.path}: tensor 'rope_freqs.weight' without 'lmforge.rope_scaling': lmforge reads "
                             "rope factors only as the Llama-3 scaling it wrote")
        kw["rope_scaling"] = json.loads(rs)
    if saved is not None:  # lmforge's own export: the fields GGUF does not hold, checked against what it does
        d = json.loads(saved)
        exact = ModelConfig.from_dict(d)
        got = ModelConfig.from_dict(kw)
        for f in ("vocab_size", "n_layer", "d_model", "norm", "pos", "tie_embeddings", "n_head", "kv_heads", "hd",
                  "ff"):
            if getattr(exact, f) != getattr(got, f):
                raise ValueError(f"{F.path}: lmforge.model says {f}={getattr(exact, f)!r}, the GGUF keys/tensors "
                                 f"{getattr(got, f)!r} (a file edited after export?)")
        return exact
    return ModelConfig.from_dict(kw)


def _state(F: _File, cfg) -> dict[str, torch.Tensor]:
    arch = cfg.hf_family
    H, K = cfg.n_head, cfg.kv_heads
    sd = {"tok_emb.weight": F.array("token_embd.weight"), "norm_f.weight": F.array("output_norm.weight")}
    sd["lm_head.weight"] = sd["tok_emb.weight"] if cfg.tie_embeddings else F.array("output.weight")
    for i in range(cfg.n_layer):
        p, o = f"blk.{i}.", f"blocks.{i}."
        qkv, bias = [], []
        for x in "qkv":
            w = F.array(p + f"attn_{x}.weight")
            b = F.array(p + f"attn_{x}.bias") if cfg.attn.qkv_bias else None
            if arch == "llama" and x in "qk":
                n = H if x == "q" else K
                w = unpermute_rope(w, n)
                b = None if b is None else unpermute_rope(b, n)
            qkv.append(w)
            bias.append(b)
        sd[o + "attn.qkv.weight"] = torch.cat(qkv)
        if cfg.attn.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat(bias)
        sd[o + "attn_norm.weight"] = F.array(p + "attn_norm.weight")
        if cfg.attn.qk_norm:
            sd[o + "attn.q_norm.weight"] = F.array(p + "attn_q_norm.weight")
            sd[o + "attn.k_norm.weight"] = F.array(p + "attn_k_norm.weight")
        sd[o + "attn.proj.weight"] = F.array(p + "attn_output.weight")
        if cfg.attn.out_bias:
            sd[o + "attn.proj.bias"] = F.array(p + "attn_output.bias")
        sd[o + "mlp_norm.weight"] = F.array(p + "ffn_norm.weight")
        sd[o + "mlp.fc.weight"] = torch.cat([F.array(p + "ffn_gate.weight"), F.array(p + "ffn_up.weight")])
        sd[o + "mlp.proj.weight"] = F.array(p + "ffn_down.weight")
        if cfg.ffn.bias:
            sd[o + "mlp.fc.bias"] = torch.cat([F.array(p + "ffn_gate.bias"), F.array(p + "ffn_up.bias")])
            sd[o + "mlp.proj.bias"] = F.array(p + "ffn_down.bias")
    return sd


def _codes(F: _File, name: str):
    """(codes int (O, I), scales fp32 (O, I/32), bits) of a Q8_0 or Q4_0 tensor, else None."""
    G = _gguf()
    info = F.info(name)
    I, O = int(info.shape[0]), int(info.shape[1])
    raw = np.frombuffer(F.f.raw(name), dtype=np.uint8).copy()
    if info.type == G.GGMLType.Q8_0:
        blocks = raw.reshape(O * I // 32, 34)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        q = blocks[:, 2:].copy().view(np.int8).astype(np.int32)
        return q.reshape(O, I), d.reshape(O, I // 32), 8
    if info.type == G.GGMLType.Q4_0:
        blocks = raw.reshape(O * I // 32, 18)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        nib = blocks[:, 2:]
        q = np.concatenate([nib & 0x0F, nib >> 4], axis=1).astype(np.int32) - 8
        return q.reshape(O, I), d.reshape(O, I // 32), 4
    return None


def _int_linear(F: _File, names: list[str], perms: list[int | None], bias):
    """One IntLinear (groups of 32) from GGUF tensors of one type (Q8_0 or Q4_0), rows concatenated in
    order (``perms[k]``: undo the llama RoPE permutation with that many heads), or None."""
    parts = [_codes(F, n) for n in names]
    if any(p is None for p in parts) or len({p[2] for p in parts}) != 1:
        return None
    from .linear import IntLinear

    codes, scales = [], []
    for (q, d, _), n in zip(parts, perms):
        q, d = torch.from_numpy(q), torch.from_numpy(d)
        if n is not None:
            q, d = unpermute_rope(q, n), unpermute_rope(d, n)
        codes.append(q)
        scales.append(d)
    return IntLinear.from_codes(torch.cat(codes), torch.cat(scales), None, bits=parts[0][2], granularity="group",
                                group_size=32, sym=True, bias=bias)


def _keep_quantized(F: _File, model) -> list[str]:
    """Swap every linear whose GGUF tensors are all Q8_0 or all Q4_0 for an IntLinear; returns their names."""
    cfg = model.cfg
    llama = cfg.hf_family == "llama"
    H, K = cfg.n_head, cfg.kv_heads
    plan = {}
    for i in range(cfg.n_layer):
        p, o = f"blk.{i}.", f"blocks.{i}."
        plan[o + "attn.qkv"] = ([p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
                                [H if llama else None, K if llama else None, None])
        plan[o + "attn.proj"] = ([p + "attn_output.weight"], [None])
        plan[o + "mlp.fc"] = ([p + "ffn_gate.weight", p + "ffn_up.weight"], [None, None])
        plan[o + "mlp.proj"] = ([p + "ffn_down.weight"], [None])
    if not cfg.tie_embeddings:
        plan["lm_head"] = (["output.weight"], [None])
    done = []
    for name, (tensors, perms) in plan.items():
        old = model.get_submodule(name)
        new = _int_linear(F, tensors, perms, None if old.bias is None else old.bias.detach().clone())
        if new is None:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        done.append(name)
    return done


def _tokenizer(F: _File):
    from ..tokenize.bpe import ByteBPE, text_to_token

    if F.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{F.path}: tokenizer.ggml.model: {F.get('tokenizer.ggml.model')!r}; lmforge imports "
                         "byte-level BPE ('gpt2') only")
    pre = F.get("tokenizer.ggml.pre", None)
    table = {name: (pattern, ig) for name, _, ig, pattern in _pre_table()}
    key = PRE_ALIASES.get(pre, pre)
    if key not in table:
        raise ValueError(f"{F.path}: tokenizer.ggml.pre: {pre!r} is not a pre-tokenizer lmforge reads "
                         f"(expected one of {', '.join(list(table) + list(PRE_ALIASES))})")
    pattern, whole_word = table[key]
    texts = list(F.get("tokenizer.ggml.tokens"))
    types = list(F.get("tokenizer.ggml.token_type", [NORMAL] * len(texts)))
    tokens: list[bytes | None] = []
    special: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(texts, types)):
        t = t.decode("utf-8") if isinstance(t, bytes) else t
        ty = int(ty)
        if ty in (CONTROL, USER_DEFINED):
            special[t] = i
            tokens.append(None)
        elif ty == UNUSED:
            tokens.append(None)
        else:
            try:
                tokens.append(text_to_token(t))
            except ValueError as e:
                raise ValueError(f"{F.path}: tokenizer.ggml.tokens[{i}]: {e}") from None
    while tokens and tokens[-1] is None:
        tokens.pop()
    ids = {t: i for i, t in enumerate(tokens) if t is not None}
    merges = []
    for k, m in enumerate(F.get("tokenizer.ggml.merges", [])):
        m = m.decode("utf-8") if isinstance(m, bytes) else m
        a, _, b = m.partition(" ")
        try:
            ab, bb = text_to_token(a), text_to_token(b)
            merges.append((ids[ab], ids[bb], ids[ab + bb]))
        except (KeyError, ValueError):
            raise ValueError(f"{F.path}: tokenizer.ggml.merges[{k}]: {m!r} names a token not in the vocabulary") from None
    try:
        return ByteBPE(tokens, merges=merges, pattern=pattern, special_tokens=special, whole_word=whole_word)
    except ValueError as e:
        raise ValueError(f"{F.path}: tokenizer: {e}") from None


def _token_spec(F: _File, tok):
    from ..tokenize.chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATES
    from ..tokenize.special import PLAIN_STOP, PLAIN_TEMPLATE, TokenSpec

    saved = F.get("lmforge.token_spec", None)
    if saved is not None:
        try:
            spec = TokenSpec.from_dict(json.loads(saved))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{F.path}: lmforge.token_spec: {e}") from None
    else:
        def tid(key):
            v = F.get(key, None)
            return None if v is None else int(v)

        bos = tid("tokenizer.ggml.bos_token_id")
        stop = list(dict.fromkeys(x for x in (tid("tokenizer.ggml.eos_token_id"), tid("tokenizer.ggml.eot_token_id"),
                                              tid("tokenizer.ggml.eom_token_id")) if x is not None))
        add_bos = bool(F.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
        template = F.get("tokenizer.chat_template", None)
        common = dict(bos=bos, doc=bos, stop=stop, pad=tid("tokenizer.ggml.padding_token_id"), add_bos=add_bos)
        st = tok.special_tokens
        if template is None or template == PLAIN_TEMPLATE:
            spec = TokenSpec(template="plain", chat_template=PLAIN_TEMPLATE, chat_stop=list(PLAIN_STOP), **common)
        elif template in (CHAT_TEMPLATE, *LEGACY_CHAT_TEMPLATES) and all(s in st for s in CHAT_SPECIAL_TOKENS):
            spec = TokenSpec(template="lmforge", chat_template=CHAT_TEMPLATE, **common)
        else:
            spec = TokenSpec(template="hf", chat_template=template, **common)
    try:
        spec.check(tok, F.info("token_embd.weight").shape[1])
    except ValueError as e:
        raise ValueError(f"{F.path}: {e}") from None
    return spec


def import_gguf(path, dequantize: bool = True):
    """(Transformer, tokenizer, TokenSpec) from a GGUF of a llama / qwen2 / qwen3 model (lmforge's or
    llama.cpp's). ``dequantize``: every weight fp32; False: Q8_0 / Q4_0 linears become ``IntLinear``
    (see the module docstring); other types are dequantized either way."""
    F = _File(path)
    try:
        return _import(F, dequantize)
    finally:
        F.f.close()


def _import(F: _File, dequantize: bool):
    from ..model.hf import load_state
    from ..model.transformer import Transformer

    cfg = _config(F)
    tok = _tokenizer(F)
    n_tokens = len(F.get("tokenizer.ggml.tokens"))
    if n_tokens != cfg.vocab_size:
        raise ValueError(f"{F.path}: tokenizer.ggml.tokens has {n_tokens} tokens, token_embd.weight "
                         f"{cfg.vocab_size} rows (llama.cpp needs them equal)")
    spec = _token_spec(F, tok)
    sd = _state(F, cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, sd, str(F.path))
    model.eval()
    if not dequantize:
        _keep_quantized(F, model)
    return model, tok, spec
