"""Synthetic, verifiable tasks: arithmetic, letter counting, reversal, sorting, bracket balancing.

Knows how to make one item of each (a document whose answer is computed, not looked up) and its
content key (what makes two items the same question); knows nothing of prompts or scoring (the
YAML files in ``evaluate/tasks`` hold those) nor of splits and seeds (``splits`` does that: every
generator here gets its split's random stream ``r`` and returns ``n`` documents of that split).

Documents (fields the templates use):

* ``addition`` / ``subtraction``: ``{"a", "b", "answer"}`` (ints; subtraction keeps ``a >= b``
  unless ``negative=True``), operands of ``digits`` digits.
* ``letter_count``: ``{"word", "letter", "answer"}``: how many times ``letter`` occurs in ``word``;
  the answers 0, 1 and 2 equally often (so always answering one number scores 1/3).
* ``reverse``: ``{"word", "answer"}``: the word's letters backwards.
* ``sort``: ``{"items", "answer"}``: space-separated words (alphabetical) or numbers (ascending).
* ``brackets``: ``{"brackets", "answer", "gold"}``: a string of ``()[]{}`` shown with spaces
  between the brackets, ``answer`` "yes"/"no" (balanced?), ``gold`` its index in ``["yes", "no"]``.
  Half are balanced; every string has even length (odd length would give the answer away), and
  half of the unbalanced ones are one edit away from a balanced one.
"""
from __future__ import annotations

import random

from .splits import draw, draw_pool, plan
from .words import WORDS

OPEN, CLOSE = "([{", ")]}"


def _int_arg(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"generator argument {name}={value!r}: expected an integer in [{lo}, {hi}]")
    return value


def _operand(r: random.Random, digits: int) -> int:
    return r.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def addition(split: str, n: int, r: random.Random, digits: int = 3) -> list[dict]:
    digits = _int_arg("digits", digits, 1, 18)

    def sample(r, i):
        a, b = _operand(r, digits), _operand(r, digits)
        return f"{a}+{b}", {"a": a, "b": b, "answer": a + b}

    return draw("addition", split, n, r, sample, f" (digits={digits})")


def subtraction(split: str, n: int, r: random.Random, digits: int = 3, negative: bool = False) -> list[dict]:
    digits = _int_arg("digits", digits, 1, 18)

    def sample(r, i):
        a, b = _operand(r, digits), _operand(r, digits)
        if not negative and a < b:
            a, b = b, a
        return f"{a}-{b}", {"a": a, "b": b, "answer": a - b}

    return draw("subtraction", split, n, r, sample, f" (digits={digits})")


def letter_count(split: str, n: int | None, r: random.Random, min_len: int = 4) -> list[dict]:
    min_len = _int_arg("min_len", min_len, 1, 12)
    words = [w for w in WORDS if len(w) >= min_len]
    if not words:
        raise ValueError(f"generator argument min_len={min_len}: no word in the list is that long")
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    by_count = {k: [(w, c) for w in words for c in sorted(set(w)) if w.count(c) == k] for k in (1, 2)}

    answer_at = plan(r, (0, 1, 2))  # 0, 1 and 2 equally often: one number scores a third

    def sample(r, i):
        k = answer_at(i)
        if k == 0:
            w = r.choice(words)
            c = r.choice([c for c in alphabet if c not in w])
        else:
            w, c = r.choice(by_count[k])
        return f"{w}:{c}", {"word": w, "letter": c, "answer": w.count(c)}

    return draw("letter_count", split, n, r, sample, f" (min_len={min_len})")


def reverse(split: str, n: int, r: random.Random, min_len: int = 4) -> list[dict]:
    min_len = _int_arg("min_len", min_len, 1, 12)
    items = ((w, {"word": w, "answer": w[::-1]}) for w in WORDS if len(w) >= min_len)
    return draw_pool("reverse", split, n, r, items, f" (min_len={min_len})")


def sort(split: str, n: int, r: random.Random, kind: str = "words", min_items: int = 3, max_items: int = 5,
         max_value: int = 99) -> list[dict]:
    if kind not in ("words", "numbers"):
        raise ValueError(f"generator argument kind={kind!r}: expected 'words' or 'numbers'")
    min_items = _int_arg("min_items", min_items, 2, 50)
    max_items = _int_arg("max_items", max_items, min_items, 50)
    max_value = _int_arg("max_value", max_value, max_items, 10 ** 9)

    def sample(r, i):
        k = r.randint(min_items, max_items)
        if kind == "words":
            items = r.sample(WORDS, k)
            answer = sorted(items)
        else:
            items = r.sample(range(max_value + 1), k)
            answer = sorted(items)
        key = " ".join(map(str, items))
        return f"{kind}:{key}", {"items": key, "answer": " ".join(map(str, answer))}

    return draw("sort", split, n, r, sample, f" (kind={kind}, {min_items}-{max_items} items)")


def is_balanced(s: str) -> bool:
    stack = []
    for c in s:
        if c in OPEN:
            stack.append(CLOSE[OPEN.index(c)])
        elif not stack or stack.pop() != c:
            return False
    return not stack


def _balanced(r: random.Random, pairs: int, kinds: int) -> str:
    """A random balanced string of ``pairs`` pairs: a random walk that opens while it can, each pair of a random kind."""
    out, stack = [], []
    opens_left = pairs
    while opens_left or stack:
        if opens_left and (not stack or r.random() < opens_left / (opens_left + len(stack))):
            k = r.randrange(kinds)
            out.append(OPEN[k])
            stack.append(CLOSE[k])
            opens_left -= 1
        else:
            out.append(stack.pop())
    return "".join(out)


def _unbalanced(r: random.Random, length: int, kinds: int) -> str:
    chars = OPEN[:kinds] + CLOSE[:kinds]
    while True:
        if r.random() < 0.5:  # one edit from a balanced string: a swap, or one bracket's kind or side changed
            s = list(_balanced(r, length // 2, kinds))
            i = r.randrange(length)
            if r.random() < 0.5 and length > 1:
                j = r.randrange(length)
                s[i], s[j] = s[j], s[i]
            else:
                s[i] = r.choice([c for c in chars if c != s[i]])
            s = "".join(s)
        else:
            s = "".join(r.choice(chars) for _ in range(length))
        if not is_balanced(s):
            return s


def brackets(split: str, n: int, r: random.Random, max_len: int = 8, kinds: int = 3) -> list[dict]:
    max_len = _int_arg("max_len", max_len, 2, 64)
    kinds = _int_arg("kinds", kinds, 1, 3)

    balanced_at = plan(r, (True, False))  # half balanced (far fewer strings are)

    def sample(r, i):
        balanced = balanced_at(i)
        length = 2 * r.randint(1, max_len // 2)
        s = _balanced(r, length // 2, kinds) if balanced else _unbalanced(r, length, kinds)
        return s, {"brackets": " ".join(s), "answer": "yes" if balanced else "no", "gold": 0 if balanced else 1}

    return draw("brackets", split, n, r, sample, f" (max_len={max_len}, kinds={kinds})")
