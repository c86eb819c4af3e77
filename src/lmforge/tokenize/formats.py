"""Reading and writing other projects' tokenizer files.

Knows the tiktoken rank format (``base64 rank`` per line) and HF
``tokenizer.json`` for byte-level BPE, WordPiece and Unigram models; the
sentencepiece ``.model`` format lives in ``spm_model.py``. Knows nothing about
how the algorithms work: it only maps fields.
"""
from __future__ import annotations

import base64
import os
from pathlib import Path

from .._io import atomic_open, write_json
from .base import hf_added_tokens, load_json_file
from .bpe import ByteBPE, text_to_token, token_to_text
from . import pretokenize

# ---- tiktoken ----------------------------------------------------------------------------

TIKTOKEN_SPECIALS = {
    "cl100k": {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
               "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
    "o200k": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
    "gpt2": {"<|endoftext|>": 50256},
}


def load_tiktoken(path: str | os.PathLike, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None) -> ByteBPE:
    """Load a ``.tiktoken`` rank file. ``pattern`` is a preset name (``gpt2``,
    ``cl100k``, ``o200k``) or a regex; its standard special tokens are added
    unless ``special_tokens`` is given."""
    path = Path(path)
    if pattern is None:
        name = path.name.lower()
        pattern = "o200k" if "o200k" in name else "cl100k" if "cl100k" in name else None
        if pattern is None:
            raise ValueError(f"{path}: a .tiktoken file does not say its pre-tokenization pattern; "
                             "pass pattern='cl100k' (or 'o200k', 'gpt2', or a regex)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such tiktoken file") from None
    ranks: dict[int, bytes] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[int(rank)] = base64.b64decode(tok, validate=True)
        except Exception:
            raise ValueError(f"{path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken file")
    tokens: list[bytes | None] = [None] * (max(ranks) + 1)
    for r, t in ranks.items():
        tokens[r] = t
    _, preset = pretokenize.resolve(pattern)
    if special_tokens is None:
        special_tokens = dict(TIKTOKEN_SPECIALS.get(preset or "", {}))
        if preset == "gpt2" and len(tokens) > 50256:
            special_tokens = {}
    return ByteBPE(tokens, merges=None, pattern=pattern, special_tokens=special_tokens, whole_word=True)


def save_tiktoken(tok: ByteBPE, path: str | os.PathLike) -> None:
    """Write the ordinary tokens as a tiktoken rank file (special tokens are not part of it)."""
    if not isinstance(tok, ByteBPE):
        raise TypeError("tiktoken rank files hold byte-level BPE vocabularies only")
    with atomic_open(path, "w") as f:
        for i, t in enumerate(tok.tokens):
            if t is not None:
                f.write(f"{base64.b64encode(t).decode('ascii')} {i}\n")


# ---- HF tokenizer.json -------------------------------------------------------------------

def bpe_to_hf(tok: ByteBPE) -> dict:
    merges = tok.derived_merges()
    vocab = {}
    for i, t in enumerate(tok.tokens):
        if t is not None:
            vocab.setdefault(token_to_text(t), i)
    for s, i in tok.special_tokens.items():  # specials among the ordinary ids (an HF trainer puts them first)
        if i < len(tok.tokens):              # are vocab entries there, or HF would renumber them after it
            vocab.setdefault(s, i)
    # HF numbers added tokens consecutively after the vocabulary: fill unused ids
    # (cl100k has gaps among its special ids) with reserved placeholders.
    added = dict(tok.special_tokens)
    used = set(added.values())
    for i in range(len(vocab), max(used, default=-1) + 1):
        if i not in used:
            added[f"<|reserved_{i}|>"] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": hf_added_tokens(added),
        "normalizer": {"type": "NFC"} if tok.normalizer == "nfc" else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pretokenize.HF_PATTERNS.get(tok.pattern_name, tok.pattern)}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": tok.whole_word, "vocab": vocab,
            "merges": [[token_to_text(tok.tokens[a]), token_to_text(tok.tokens[b])] for a, b, _ in merges],
        },
    }


def _hf_pattern(pre: dict | None, path) -> tuple[str, bool]:
    """The split regex and add_prefix_space of a byte-level pre-tokenizer."""
    if pre is None:
        raise ValueError(f"{path}: byte-level BPE without a pre_tokenizer is not supported")
    t = pre.get("type")
    if t == "ByteLevel":
        if not pre.get("use_regex", True):
            raise ValueError(f"{path}: ByteLevel pre_tokenizer with use_regex=false and no Split is not supported")
        return pretokenize.GPT2_HF, bool(pre.get("add_prefix_space", False))
    if t == "Sequence":
        subs = pre.get("pretokenizers", [])
        splits = [p for p in subs if p.get("type") == "Split"]
        bls = [p for p in subs if p.get("type") == "ByteLevel"]
        if len(subs) == 2 and len(splits) == 1 and len(bls) == 1 and not bls[0].get("use_regex", True):
            sp = splits[0]
            pat = sp.get("pattern", {})
            if "Regex" not in pat or sp.get("behavior") != "Isolated" or sp.get("invert"):
                raise ValueError(f"{path}: only an Isolated, non-inverted Regex Split is supported")
            return pat["Regex"], bool(bls[0].get("add_prefix_space", False))
        if len(subs) == 1:
            return _hf_pattern(subs[0], path)
    raise ValueError(f"{path}: unsupported pre_tokenizer {t!r} for byte-level BPE")


def load_hf(path: str | os.PathLike):
    """Load an HF ``tokenizer.json`` (byte-level BPE, WordPiece, Unigram, or characters as WordLevel)."""
    d = load_json_file(path)
    model = d.get("model")
    if not isinstance(model, dict) or "type" not in model and "vocab" not in model:
        raise ValueError(f"{path}: not an HF tokenizer.json (no 'model' object)")
    mtype = model.get("type") or ("BPE" if "merges" in model else None)
    if mtype == "BPE":
        return _load_hf_bpe(d, path)
    if mtype == "WordPiece":
        from .wordpiece import WordPiece

        return WordPiece.from_hf(d, path)
    if mtype == "Unigram":
        from .unigram import Unigram

        return Unigram.from_hf(d, path)
    if mtype == "WordLevel":
        from .char import CharTokenizer

        return CharTokenizer.from_hf(d, path)
    raise ValueError(f"{path}: unsupported HF model type {mtype!r} (expected BPE, WordPiece, Unigram, "
                     "or WordLevel for characters)")


def _load_hf_bpe(d: dict, path) -> ByteBPE:
    model = d["model"]
    norm = d.get("normalizer")
    if isinstance(norm, dict) and norm.get("type") == "Sequence" and len(norm.get("normalizers", [])) <= 1:
        norm = (norm["normalizers"] or [None])[0]
    if norm is not None and norm.get("type") != "NFC":
        raise ValueError(f"{path}: byte-level BPE with a normalizer ({norm.get('type')}) is not supported "
                         "(only NFC, as Qwen2 has)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        raise ValueError(f"{path}: only byte-level BPE is supported (no subword prefix/suffix or byte_fallback)")
    pattern, add_prefix_space = _hf_pattern(d.get("pre_tokenizer"), path)
    vocab: dict[str, int] = model["vocab"]
    specials = {a["content"]: a["id"] for a in d.get("added_tokens", [])}
    size = max(list(vocab.values()) + [-1]) + 1
    tokens: list[bytes | None] = [None] * size
    for s, i in vocab.items():
        if s in specials and specials[s] == i:
            continue
        tokens[i] = text_to_token(s)
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        try:
            merges.append((vocab[a], vocab[b], vocab[a + b]))
        except KeyError as e:
            raise ValueError(f"{path}: merge {a!r} + {b!r} names a token not in the vocab ({e.args[0]!r})") from None
    tok = ByteBPE(tokens, merges=merges, pattern=pattern, special_tokens=specials,
                  whole_word=bool(model.get("ignore_merges", False)), normalizer="nfc" if norm else None)
    tok.add_prefix_space = add_prefix_space
    return tok


def save_hf(tok, path: str | os.PathLike, post_processor: dict | None = None) -> None:
    """Write an HF ``tokenizer.json`` for any lmforge tokenizer. ``post_processor``: what HF's
    ``tokenizer(text)`` adds around the ids (an HF export passes ``TokenSpec.hf_files``'s, which prepends
    BOS); lmforge's own ``encode`` never adds tokens (``TokenSpec.encode_prompt`` does), and ``load_hf``
    does not apply a file's post-processor (``TokenSpec.from_hf`` reads it instead)."""
    if isinstance(tok, ByteBPE):
        d = bpe_to_hf(tok)
    elif hasattr(tok, "to_hf"):
        d = tok.to_hf()
    else:
        raise TypeError(f"no HF export for {type(tok).__name__}")
    if post_processor is not None:
        d["post_processor"] = post_processor
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    write_json(path, d)
