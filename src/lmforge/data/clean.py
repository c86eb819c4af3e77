"""Cleaning: Unicode and whitespace normalization, and boilerplate removal.

Knows how to turn one document's raw text into the text a model should see;
knows nothing about where the document came from or whether it is kept.
Every step is a switch in ``CleanConfig`` and reports what it changed.

Boilerplate removed:

* Project Gutenberg wrappers: everything up to the ``*** START OF THE/THIS
  PROJECT GUTENBERG EBOOK ... ***`` line (or the old ``*END*THE SMALL PRINT!``
  line) and everything from the ``*** END OF ...`` / ``End of the Project
  Gutenberg EBook`` line on, and ``Produced by ...`` credits right after the start.
* the ``<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM SHAKESPEARE
  IS COPYRIGHT ... >>`` notices that Gutenberg's complete-works file repeats
  between plays.
* end-of-text trailers: a last line ``THE END`` or ``FINIS. <title>`` (the
  built-in texts end this way: the sdist already removed Gutenberg's licence).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


@dataclass
class CleanConfig:
    nfc: bool = True  # Unicode NFC: one code-point sequence per visible character
    newlines: bool = True  # \r\n and \r -> \n, byte-order mark removed
    control_chars: bool = True  # drop C0/C1 control characters other than \t and \n
    strip_trailing_space: bool = True  # per line
    max_blank_lines: int = 2  # runs of more empty lines are cut to this many (-1: keep)
    gutenberg: bool = True  # Project Gutenberg header/licence/footer
    end_markers: bool = True  # trailing "THE END" / "FINIS. ..." lines


_START = re.compile(
    r"^\s*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT).*"
    r"|\*END\*THE SMALL PRINT!.*)$", re.I | re.M)
_END = re.compile(
    r"^\s*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG E-?(BOOK|TEXT).*"
    r"|End of (the )?Project Gutenberg'?s?( E-?(Book|Text))?\b.*)$", re.I | re.M)
_PRODUCED = re.compile(r"\A(\s*(Produced|Prepared|Transcribed) by[^\n]*(\n[^\n]+)*\n)", re.I)
_WORLD_LIBRARY = re.compile(r"<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS.*?>>\s*", re.S)
_END_MARKER = re.compile(r"\n[ \t]*(THE END|FINIS\b[^\n]{0,120})[ \t]*\s*\Z")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING = re.compile(r"[ \t\u00a0\u3000]+$", re.M)


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """Remove a Project Gutenberg header and footer; returns (text, whether anything was found)."""
    found = False
    m = _START.search(text)
    if m:
        text = text[m.end():].lstrip("\n")
        text = _PRODUCED.sub("", text, count=1)
        found = True
    m = _END.search(text)
    if m:
        text = text[: m.start()]
        found = True
    text, n = _WORLD_LIBRARY.subn("", text)
    return text, found or n > 0


def clean_text(text: str, cfg: CleanConfig | None = None, counts: dict | None = None) -> str:
    """Apply the cleaning steps to one document; ``counts[step]`` += 1 for each step that changed it."""
    cfg = cfg or CleanConfig()
    counts = {} if counts is None else counts

    def changed(step: str, before: str, after: str) -> str:
        if before != after:
            counts[step] = counts.get(step, 0) + 1
        return after

    if cfg.newlines:
        t = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
        text = changed("newlines", text, t)
    if cfg.nfc and not text.isascii():
        text = changed("nfc", text, unicodedata.normalize("NFC", text))
    if cfg.control_chars:
        text = changed("control_chars", text, _CONTROL.sub("", text))
    if cfg.gutenberg:
        t, found = strip_gutenberg(text)
        if found:
            counts["gutenberg"] = counts.get("gutenberg", 0) + 1
            text = t
    if cfg.strip_trailing_space:
        text = changed("trailing_space", text, _TRAILING.sub("", text))
    if cfg.end_markers:
        text = changed("end_markers", text, _END_MARKER.sub("\n", text))
    if cfg.max_blank_lines >= 0:
        pat = "\n" * (cfg.max_blank_lines + 2) + "+"
        text = changed("blank_lines", text, re.sub(pat, "\n" * (cfg.max_blank_lines + 1), text))
    return text.strip("\n") + "\n" if text.strip() else ""
