"""Regex pre-tokenization: split text into chunks that BPE never merges across.

Knows the patterns of GPT-2, cl100k (GPT-3.5/4) and o200k (GPT-4o) and how to
split with them; knows nothing about vocabularies. The C extension has
hand-written matchers for ``gpt2`` and ``cl100k`` that give the same chunks as
these regexes (tests check it); any other pattern runs through ``regex``.
"""
from __future__ import annotations

import functools

import regex

# The patterns exactly as tiktoken writes them (possessive quantifiers included).
GPT2 = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
O200K = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
# The pattern HF `tokenizers` uses in its ByteLevel pre-tokenizer (original GPT-2 form).
GPT2_HF = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# cl100k without possessive quantifiers (same chunks): the form HF `tokenizers` (Oniguruma) reads
# correctly; Oniguruma takes `{1,3}+` as "repeat {1,3} one or more times", not possessive.
CL100K_HF = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

PATTERNS = {"gpt2": GPT2, "cl100k": CL100K, "o200k": O200K}
# the form to write into an HF tokenizer.json for each preset
HF_PATTERNS = {"gpt2": GPT2_HF, "cl100k": CL100K_HF, "o200k": O200K}
# patterns equivalent to a preset (same chunks on every input)
_ALIASES = {GPT2: "gpt2", GPT2_HF: "gpt2", CL100K: "cl100k", CL100K_HF: "cl100k", O200K: "o200k"}


def resolve(pattern: str) -> tuple[str, str | None]:
    """Return ``(regex_source, preset_name_or_None)`` for a preset name or a pattern."""
    if pattern in PATTERNS:
        return PATTERNS[pattern], pattern
    if pattern in ("cl100k_base", "o200k_base", "r50k_base"):
        name = pattern.split("_")[0].replace("r50k", "gpt2")
        return PATTERNS[name], name
    return pattern, _ALIASES.get(pattern)


@functools.lru_cache(maxsize=32)
def compiled(pattern: str) -> "regex.Pattern":
    src, _ = resolve(pattern)
    try:
        return regex.compile(src)
    except regex.error as e:
        raise ValueError(f"pre-tokenization pattern does not compile: {e}: {src!r}") from None


def split(text: str, pattern: str = "cl100k") -> list[str]:
    """Split ``text`` into pre-tokenization chunks."""
    return compiled(pattern).findall(text)
