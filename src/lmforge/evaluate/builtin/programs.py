"""Python tasks for pass@k: small functions with a docstring to complete and unit tests to pass.

Knows a few families of problems ("the sum of the numbers in xs divisible by 3", "shift every letter
k places", ...), each with parameters varied by the split's random stream, a reference solution, and
how to make test inputs; the expected outputs in the tests are computed by running the reference
(trusted code, written here) in this process. Knows nothing of running a model's completion (the
``sandbox`` does that: program = prompt + completion + "\\n" + test).

Document: ``{"prompt", "test", "entry_point", "canonical_solution", "family"}``. ``prompt`` is
``def NAME(ARGS):`` and a docstring with the task and one example; ``canonical_solution`` the
reference body (indented, so prompt + canonical_solution + "\\n" + test runs and passes); ``test``
four to six ``assert NAME(...) == ...`` lines whose expected values are not all equal (a function
returning a constant fails). The content key is the family and its parameters: two documents with
the same key are the same problem, whatever their test inputs.
"""
from __future__ import annotations

import random

from .splits import draw


def _ints(r: random.Random, lo: int = -9, hi: int = 20, min_len: int = 3, max_len: int = 8) -> list[int]:
    return [r.randint(lo, hi) for _ in range(r.randint(min_len, max_len))]


def _sentence(r: random.Random, words: tuple[str, ...], min_len: int = 2, max_len: int = 6) -> str:
    return " ".join(r.choice(words) for _ in range(r.randint(min_len, max_len)))


def _words():
    from .words import WORDS

    return WORDS


ORDINALS = ["first", "second", "third", "fourth", "fifth"]


# Each family: r -> (key, name, args, sentence, body, [input tuples]).
def _sum_multiples(r):
    k, neg = r.randint(2, 12), r.random() < 0.5
    what = "not divisible" if neg else "divisible"
    body = f"    return sum(x for x in xs if x % {k} {'!=' if neg else '=='} 0)\n"
    return (f"sum_multiples:{k}:{neg}", "sum_selected", "xs",
            f"Return the sum of the numbers in xs that are {what} by {k}.", body,
            [(_ints(r, 0, 40),) for _ in range(6)])


def _count_chars(r):
    chars = "".join(sorted(r.sample("abcdefghijklmnopqrstuvwxyz", r.randint(2, 5))))
    body = f"    return sum(1 for c in s if c in {chars!r})\n"
    return (f"count_chars:{chars}", "count_chars", "s",
            f"Return how many characters of s are one of the letters in {chars!r}.", body,
            [(_sentence(r, _words()),) for _ in range(6)])


def _long_words_reversed(r):
    k, longer, backwards = r.randint(2, 6), r.random() < 0.5, r.random() < 0.5
    cmp, what = (">", "more") if longer else ("<", "fewer")
    body = f"    return [w for w in s.split() if len(w) {cmp} {k}]{'[::-1]' if backwards else ''}\n"
    order = "last one first" if backwards else "in their order"
    return (f"select_words:{k}:{longer}:{backwards}", "select_words", "s",
            f"Return the words of s (split on spaces) that have {what} than {k} letters, {order}.", body,
            [(_sentence(r, _words(), 3, 7),) for _ in range(6)])



def _scale_shift(r):
    a, b = r.choice([x for x in range(-5, 6) if x]), r.randint(-9, 9)
    body = f"    return [x * {a} + {b} for x in xs]\n"
    return (f"scale_shift:{a}:{b}", "scale_shift", "xs",
            f"Return a list of each number in xs multiplied by {a}, plus {b}.", body,
            [(_ints(r),) for _ in range(5)])


def _fib_like(r):
    a, b = r.randint(0, 9), r.randint(0, 9)
    body = (f"    a, b = {a}, {b}\n"
            "    for _ in range(n):\n"
            "        a, b = b, a + b\n"
            "    return a\n")
    return (f"fib_like:{a}:{b}", "sequence_term", "n",
            f"Return term n (counting from n = 0) of the sequence that starts {a}, {b} and in which every "
            "later term is the sum of the two before it.", body,
            [(n,) for n in r.sample(range(0, 20), 6)])


def _count_long_words(r):
    k, cmp = r.randint(1, 8), r.choice([">", "<", "=="])
    what = {">": "more than", "<": "fewer than", "==": "exactly"}[cmp]
    body = f"    return sum(1 for w in s.split() if len(w) {cmp} {k})\n"
    return (f"count_words:{k}:{cmp}", "count_words", "s",
            f"Return how many words of s (split on spaces) have {what} {k} letters.", body,
            [(_sentence(r, _words(), 2, 8),) for _ in range(6)])



def _clamp(r):
    lo = r.randint(-10, 10)
    hi = lo + r.randint(1, 20)
    body = f"    return [min(max(x, {lo}), {hi}) for x in xs]\n"
    return (f"clamp:{lo}:{hi}", "clamp_all", "xs",
            f"Return xs with every number below {lo} replaced by {lo} and every number above {hi} "
            f"replaced by {hi}.", body,
            [(_ints(r, lo - 10, hi + 10),) for _ in range(5)])


def _repeat_join(r):
    k, sep = r.randint(2, 6), r.choice([" ", "-", ", ", "_", "/", "|"])
    body = f"    return {sep!r}.join([s] * {k})\n"
    return (f"repeat_join:{k}:{sep}", "repeat_join", "s",
            f"Return s repeated {k} times, the copies separated by {sep!r}.", body,
            [(r.choice(_words()),) for _ in range(5)])


def _count_greater(r):
    t = r.randint(-20, 50)
    body = f"    return sum(1 for x in xs if x > {t})\n"
    return (f"count_greater:{t}", "count_greater", "xs",
            f"Return how many numbers in xs are greater than {t}.", body,
            [(_ints(r, t - 15, t + 15),) for _ in range(6)])


def _frequent(r):
    k, exact, ordered = r.randint(2, 5), r.random() < 0.5, r.random() < 0.5
    cmp, what = ("==", "exactly") if exact else (">=", "at least")
    body = ("    out = []\n"
            "    for x in xs:\n"
            f"        if xs.count(x) {cmp} {k} and x not in out:\n"
            "            out.append(x)\n"
            f"    return {'sorted(out)' if ordered else 'out'}\n")
    order = "from smallest to largest" if ordered else "in the order they first occur"
    return (f"frequent:{k}:{exact}:{ordered}", "frequent", "xs",
            f"Return the numbers that occur {what} {k} times in xs, {order}, each once.", body,
            [(_ints(r, 0, 5, 6, 14),) for _ in range(6)])



def _running_total(r):
    c = r.randint(-5, 10)
    body = (f"    total, out = {c}, []\n"
            "    for x in xs:\n"
            "        total += x\n"
            "        out.append(total)\n"
            "    return out\n")
    return (f"running_total:{c}", "running_total", "xs",
            f"Return the running totals of xs, starting from {c}: element i is {c} plus the sum of "
            "xs[0] to xs[i].", body,
            [(_ints(r),) for _ in range(5)])


def _digit_sum(r):
    base, how = r.randint(2, 10), r.choice(["sum", "count", "max"])
    step = {"sum": "total += n % {b}", "count": "total += 1", "max": "total = max(total, n % {b})"}[how]
    body = ("    total = 0\n"
            "    while n > 0:\n"
            f"        {step.format(b=base)}\n"
            f"        n //= {base}\n"
            "    return total\n")
    what = {"sum": "the sum of the digits", "count": "the number of digits",
            "max": "the largest digit"}[how]
    return (f"digits:{base}:{how}", f"digit_{how}", "n",
            f"Return {what} of the positive integer n written in base {base} (0 for n = 0).", body,
            [(r.randint(0, 5000),) for _ in range(6)])



def _shift_letters(r):
    k = r.randint(1, 25)
    body = ("    return ''.join(chr((ord(c) - 97 + " + str(k) + ") % 26 + 97) if 'a' <= c <= 'z' else c "
            "for c in s)\n")
    return (f"shift_letters:{k}", "shift_letters", "s",
            f"Return s with every lowercase letter moved {k} places forward in the alphabet (after z comes "
            "a again); other characters stay as they are.", body,
            [(_sentence(r, _words(), 1, 3),) for _ in range(5)])


def _nth_word(r):
    k, from_end, upper = r.randint(1, 5), r.random() < 0.5, r.random() < 0.5
    idx = f"-{k}" if from_end else f"{k - 1}"
    word = f"words[{idx}]" + (".upper()" if upper else "")
    body = (f"    words = s.split()\n"
            f"    return {word} if len(words) >= {k} else ''\n")
    where = f"{'last' if k == 1 else ORDINALS[k - 1] + ' from last'}" if from_end else ORDINALS[k - 1]
    return (f"nth_word:{k}:{from_end}:{upper}", "pick_word", "s",
            f"Return the {where} word of s (split on spaces){' in capital letters' if upper else ''}, or '' "
            f"when s has fewer than {k} words.", body,
            [(_sentence(r, _words(), max(0, k - 2), k + 2),) for _ in range(6)])



def _affix(r):
    p, end = r.choice("abcdefghilmnoprstw"), r.random() < 0.5
    how = "end" if end else "start"
    body = f"    return [w for w in words if w.{'endswith' if end else 'startswith'}({p!r})]\n"
    pool = _words()
    return (f"affix:{p}:{end}", f"{how}s_with", "words",
            f"Return the words in the list words that {how} with the letter {p!r}, in their order.", body,
            [([r.choice(pool) for _ in range(r.randint(3, 8))] + [r.choice([w for w in pool if
              (w.endswith(p) if end else w.startswith(p))] or pool)],) for _ in range(5)])


def _count_divisible_either(r):
    a, b = sorted(r.sample(range(2, 10), 2))
    body = f"    return sum(1 for i in range(1, n + 1) if i % {a} == 0 or i % {b} == 0)\n"
    return (f"divisible_either:{a}:{b}", "count_divisible", "n",
            f"Return how many of the integers 1, 2, ..., n are divisible by {a} or by {b}.", body,
            [(r.randint(0, 60),) for _ in range(6)])


FAMILIES = (_sum_multiples, _count_chars, _long_words_reversed, _scale_shift, _fib_like, _count_long_words,
            _clamp, _repeat_join, _count_greater, _frequent, _running_total, _digit_sum, _shift_letters,
            _nth_word, _affix, _count_divisible_either)


def reference(name: str, args: str, body: str):
    """The reference function, defined from its own source."""
    env: dict = {}
    exec(f"def {name}({args}):\n{body}", env)  # noqa: S102 - our own reference code, not a model's
    return env[name]


def make_item(family, r: random.Random):
    """(content key, document) of one problem of ``family``, or None when its test inputs happened to
    give one output for all (too weak a test: the caller draws again)."""
    key, name, args, sentence, body, inputs = family(r)
    fn = reference(name, args, body)
    outs = [fn(*map(_copy, a)) for a in inputs]
    if len({repr(o) for o in outs}) < 2:
        return None
    call = lambda a: f"{name}({', '.join(map(repr, a))})"  # noqa: E731
    prompt = (f"def {name}({args}):\n"
              f'    """{sentence}\n'
              f"    >>> {call(inputs[0])}\n"
              f"    {outs[0]!r}\n"
              f'    """\n')
    test = "".join(f"assert {call(a)} == {o!r}\n" for a, o in zip(inputs, outs))
    return key, {"prompt": prompt, "test": test, "entry_point": name, "canonical_solution": body,
                 "family": family.__name__.lstrip("_")}


def _copy(a):
    return list(a) if isinstance(a, list) else a


def python(split: str, n: int, r: random.Random) -> list[dict]:
    def sample(r, i):
        while True:
            got = make_item(r.choice(FAMILIES), r)
            if got is not None:
                return got

    return draw("python", split, n, r, sample)
