"""PII scrubbing: replace e-mail addresses, phone numbers, IP addresses, card and
social-security numbers with placeholders.

Knows regular expressions and a few validity checks (IPv4 octets, the Luhn
checksum of card numbers, ``ipaddress`` for IPv6); knows nothing about documents
beyond their text. Placeholders are plain text (``<EMAIL>``, ``<PHONE>``,
``<IP>``, ``<CARD>``, ``<SSN>``) so a model learns that something was there.
Like every regex scrubber it trades recall for precision: it will miss
obfuscated addresses ("name at example dot com") and leaves version strings
such as ``1.2.3`` alone.
"""
from __future__ import annotations

import bisect
import ipaddress
import re

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![\w-])")
# international (+CC ...) or North-American style numbers with separators; at least 9 digits
PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?![\w-]|[ .]\d)")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
SSN = re.compile(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])")

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "card": "<CARD>", "ssn": "<SSN>", "phone": "<PHONE>"}


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if alt:
            d *= 2
            if d > 9:
                d -= 9
        total += d
        alt = not alt
    return total % 10 == 0


def _ipv4_ok(s: str) -> bool:
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in s.split("."))


def _ipv6_ok(s: str) -> bool:
    if s.count(":") < 2 or not any(c.isalnum() for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
        return True
    except ValueError:
        return False


_TRIGGERS = {  # cheap searches (a literal or a leading character class) that every match contains
    "email": (re.compile("@"), 256),
    "ip6": (re.compile(r":[0-9A-Fa-f]{0,4}:"), 48),
    "digits": (re.compile(r"\d"), 40),
}
_SPACE = re.compile(r"\s")
_ORDER = [  # (kind, pattern, check, trigger); earlier kinds win where matches overlap
    ("email", EMAIL, None, "email"),
    ("ip", IPV6, _ipv6_ok, "ip6"),
    ("ip", IPV4, _ipv4_ok, "digits"),
    ("card", CARD, lambda s: _luhn(re.sub(r"\D", "", s)), "digits"),
    ("ssn", SSN, None, "digits"),
    ("phone", PHONE, lambda s: sum(c.isdigit() for c in s) >= 9, "digits"),
]


def _windows(text: str, trigger: str) -> list[tuple[int, int]]:
    """Regions around each trigger hit, merged; each ends at whitespace (or the end of the text)
    so that a pattern's look-ahead sees what follows. Look-behinds see the text before a region."""
    pat, pad = _TRIGGERS[trigger]
    n = len(text)
    out: list[list[int]] = []
    for m in pat.finditer(text):
        s, e = max(0, m.start() - pad), min(n, m.end() + pad)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    for w in out:
        sp = _SPACE.search(text, w[1], min(n, w[1] + 256))
        w[1] = sp.start() if sp else min(n, w[1] + 256)
    return [(s, e) for s, e in out]


def scrub(text: str, counts: dict | None = None) -> str:
    """Replace PII in ``text``; ``counts[kind]`` += number of replacements.

    The patterns only run in small regions around a trigger (an ``@``, a digit,
    ``:hex:``), so ordinary prose costs one fast scan per trigger."""
    counts = {} if counts is None else counts
    windows = {}
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []
    for kind, pattern, check, trig in _ORDER:
        if trig not in windows:
            windows[trig] = _windows(text, trig)
        for s, e in windows[trig]:
            for m in pattern.finditer(text, s, e):
                a, b = m.span()
                if check is not None and not check(m.group(0)):
                    continue
                i = bisect.bisect_left(taken, (a, b))  # taken: sorted, non-overlapping
                if (i > 0 and taken[i - 1][1] > a) or (i < len(taken) and taken[i][0] < b):
                    continue
                taken.insert(i, (a, b))
                spans.append((a, b, kind))
    if not spans:
        return text
    spans.sort()
    parts, pos = [], 0
    for a, b, kind in spans:
        parts.append(text[pos:a])
        parts.append(PLACEHOLDERS[kind])
        counts[kind] = counts.get(kind, 0) + 1
        pos = b
    parts.append(text[pos:])
    return "".join(parts)
