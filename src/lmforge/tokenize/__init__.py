"""Tokenizers: byte-level BPE, WordPiece and Unigram behind one interface.

``load(path)`` opens lmforge's own files, ``.tiktoken`` rank files, HF
``tokenizer.json`` and sentencepiece ``.model`` files; ``train(kind, ...)``
trains any kind. Every tokenizer has ``encode``, ``decode``, ``encode_batch``,
``save``, ``vocab_size``, ``id_to_token`` and tiktoken-style special tokens.
"""
from __future__ import annotations

import os
from pathlib import Path

TYPE_CHECKING = False  # (not typing's: importing typing costs the command line's --help time)
if TYPE_CHECKING:
    from .base import Tokenizer

__all__ = ["Tokenizer", "ByteBPE", "WordPiece", "Unigram", "load", "train", "PATTERNS"]

# imported on first use, so importing the package (as the command line does for its ``_cli`` module)
# loads nothing heavy
_LAZY = {"Tokenizer": "base", "ByteBPE": "bpe", "WordPiece": "wordpiece", "Unigram": "unigram",
         "PATTERNS": "pretokenize"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)


def load(path: str | os.PathLike, **options) -> Tokenizer:
    """Open any supported tokenizer file.

    * a directory: its ``tokenizer.lmforge.json``, else ``tokenizer.json``, else ``tokenizer.model``
    * ``*.tiktoken``: tiktoken ranks (``pattern="cl100k"|"o200k"|"gpt2"|regex``)
    * ``*.model``: a sentencepiece model
    * ``*.json``: lmforge's own format or an HF ``tokenizer.json``
    """
    p = Path(path)
    if p.is_dir():
        for name in ("tokenizer.lmforge.json", "tokenizer.json", "tokenizer.model"):
            if (p / name).exists():
                return load(p / name, **options)
        raise FileNotFoundError(f"{p}: no tokenizer.lmforge.json, tokenizer.json or tokenizer.model inside")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such tokenizer file")
    if p.suffix == ".tiktoken":
        from .formats import load_tiktoken

        return load_tiktoken(p, **options)
    if p.suffix == ".model":
        from .unigram import Unigram

        return Unigram.from_sentencepiece(p, **options)
    from .base import load_json_file

    d = load_json_file(p)
    if not isinstance(d, dict):
        raise ValueError(f"{p}: expected a JSON object")
    if d.get("format") == "lmforge.tokenizer":
        return _from_lmforge_dict(d, str(p))
    if "model" in d:
        from .formats import load_hf

        return load_hf(p)
    raise ValueError(f"{p}: not a tokenizer file lmforge knows (neither lmforge JSON nor HF tokenizer.json)")


def _from_lmforge_dict(d: dict, source: str) -> Tokenizer:
    from .base import FORMAT_VERSION

    if d.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{source}: tokenizer format version {d.get('version')} is newer than this lmforge reads")
    kind = d.get("kind")
    if kind == "bpe":
        from .bpe import ByteBPE

        return ByteBPE.from_dict(d, source)
    if kind == "wordpiece":
        from .wordpiece import WordPiece

        return WordPiece.from_dict(d, source)
    if kind == "unigram":
        from .unigram import Unigram

        return Unigram.from_dict(d, source)
    if kind == "char":
        from .char import CharTokenizer

        return CharTokenizer.from_dict(d, source)
    raise ValueError(f"{source}: unknown tokenizer kind {kind!r} (expected bpe, wordpiece, unigram or char)")


def train(kind: str, data, vocab_size: int, **options) -> Tokenizer:
    """Train a tokenizer of ``kind`` (``bpe``, ``wordpiece``, ``unigram``, or ``char``) on texts or files."""
    if kind == "bpe":
        from .bpe import ByteBPE

        return ByteBPE.train(data, vocab_size, **options)
    if kind == "wordpiece":
        from .wordpiece import WordPiece

        return WordPiece.train(data, vocab_size, **options)
    if kind == "unigram":
        from .unigram import Unigram

        return Unigram.train(data, vocab_size, **options)
    if kind == "char":
        from .char import CharTokenizer

        texts = (open(p, encoding="utf-8").read() if isinstance(p, str) and os.path.exists(p) else p for p in data)
        return CharTokenizer.train(texts, **options)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected bpe, wordpiece, unigram or char")
