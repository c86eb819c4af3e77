"""The three splits of a built-in task and the private seed behind one of them (the Goodhart guard).

Knows how an item is assigned to a split, how each split's random stream is seeded, and where
the private seed lives; knows nothing of what an item is (the generators in ``corpus``,
``synthetic`` and ``code`` make them and name each one's *content key*).

* **Which split an item belongs to** is decided by a hash of its content key (for a corpus task,
  of the stretch of the play it comes from), not by the seed: ``bucket(task, key)`` puts about
  half of all possible items in ``train``, a quarter in ``dev`` and a quarter in ``private``
  (``SHARES``). The same content always lands in the same split, so items of two splits never
  coincide, whatever ``n`` each was drawn with (an SFT set of 100,000 ``train`` items included).
* **Which items of its share a split holds** is drawn from a seeded stream: ``train`` and ``dev``
  from fixed public seeds (everyone gets the same items), ``private`` from a 256-bit seed made
  with ``secrets`` on this machine at first use and kept in ``lmforge_home()/eval/private_seed``
  (mode 0600, created atomically, reused after; ``LMFORGE_HOME`` moves it). It is never
  committed, logged or written into a document; ``fingerprint("private")`` (12 hex digits of a
  hash of it) tells two results apart as drawn from the same private split or not.

What the guard does and does not do: the private items are unknown to anyone tuning on the
public ones (``dev`` is for that), so a score on them cannot have been chased item by item. The
private *share* is public (it is everything the hash does not give to ``train`` or ``dev``); for
the arithmetic, sorting and bracket tasks it holds far more items than a split draws; for
``reverse`` (a word list) the private split is most of its share; for the corpus tasks the share is
a known quarter of the test plays' stretches (the same stretches for all three tasks), from which
the seed picks the items and their distractors. Deleting the seed file makes a new private split.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import secrets
import stat
from pathlib import Path

from ..._io import lmforge_home

SPLITS = ("train", "dev", "private")
# share of the content-key hash space each split owns, in thousandths: [lo, hi)
SHARES = {"train": (0, 500), "dev": (500, 750), "private": (750, 1000)}
PUBLIC_SEEDS = {"train": "lmforge-eval-train-v1", "dev": "lmforge-eval-dev-v1"}
SEED_FILE = "private_seed"
log = logging.getLogger("lmforge.evaluate")
_SEED_RE = re.compile(r"[0-9a-f]{64}")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; a built-in task has {', '.join(SPLITS)} "
                         "(train: few-shot examples and training data, dev: public, private: the reported one)")
    return split


def seed_path() -> Path:
    return lmforge_home() / "eval" / SEED_FILE


def private_seed() -> str:
    """The private seed (64 hex digits): read from ``seed_path()``, made there on first use.

    Created atomically and at most once even with several processes racing: the seed is written
    and fsynced under a temporary name with mode 0600, then hard-linked to the final name, which
    fails if another process got there first (its seed is used and ours dropped)."""
    path = seed_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # copied or made by hand: others could read it
        log.warning("%s: mode %o lets others read the private seed; setting it to 600", path, mode)
        os.chmod(path, 0o600)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if not _SEED_RE.fullmatch(text):
        raise ValueError(f"{path}: not a private seed (expected 64 lowercase hex digits on one line); it was "
                         "damaged or written by hand. Delete it to make a new private split (earlier private "
                         "scores will then not compare with new ones)")
    return text


def fingerprint(split: str) -> str:
    """A short public name of the split's seed: ``dev``/``train`` give their public seed name; ``private``
    gives 12 hex digits of a hash of the private seed (the seed cannot be recovered from it)."""
    check_split(split)
    if split != "private":
        return PUBLIC_SEEDS[split]
    return hashlib.sha256(("lmforge-eval-fingerprint|" + private_seed()).encode()).hexdigest()[:12]


def bucket(task: str, key: str) -> str:
    """The split that owns the item (or stretch of text) with this content key."""
    h = int.from_bytes(hashlib.sha256(f"lmforge-eval-split|{task}|{key}".encode("utf-8")).digest()[:8], "big")
    v = h % 1000
    for name, (lo, hi) in SHARES.items():
        if lo <= v < hi:
            return name
    raise AssertionError(v)  # pragma: no cover - SHARES covers [0, 1000)


def rng(task: str, split: str, salt: str = "") -> random.Random:
    """The split's random stream for one task (and its generator arguments, in ``salt``)."""
    seed = private_seed() if check_split(split) == "private" else PUBLIC_SEEDS[split]
    digest = hashlib.sha256(f"lmforge-eval-rng|{task}|{split}|{salt}|{seed}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest, "big"))


def plan(r: random.Random, classes) -> "callable":
    """``at(i)``: the answer class of document ``i``, in exact proportion: documents ``k*m .. k*m+k-1``
    (``k = len(classes)``) hold each class once, in an order shuffled by a stream of its own (the same
    however many draws ``draw`` rejects). Every split of ``n`` documents is then balanced to within one
    block, so a model that always gives one answer scores the baseline on each split; an independent
    draw per document would leave dev and private apart by chance (brackets: 44% vs 63% balanced at
    n=100, a 0.19 "gap" for a model that always answers no)."""
    stream = random.Random(r.getrandbits(64))
    classes = list(classes)
    made: list = []

    def at(i: int):
        while len(made) <= i:
            block = classes[:]
            stream.shuffle(block)
            made.extend(block)
        return made[i]

    return at


def draw(task: str, split: str, n: int, r: random.Random, sample, what: str = "") -> list[dict]:
    """``n`` documents of ``split`` from an unbounded item space: ``sample(r, i) -> (content_key, doc)`` is
    called until ``n`` distinct keys owned by ``split`` (``bucket``) are found (``i``: how many are found
    so far, for a generator that balances its answers). Raises a clear error when
    the space is too small for ``n`` (``what`` names the generator arguments in it)."""
    seen: set[str] = set()
    out: list[dict] = []
    limit = 2000 + 400 * n
    for _ in range(limit):
        if len(out) >= n:
            break
        key, doc = sample(r, len(out))
        if key in seen or bucket(task, key) != split:
            continue
        seen.add(key)
        out.append(doc)
    if len(out) < n:
        raise ValueError(f"built-in task {task}{what}: found only {len(out)} distinct {split} items in {limit} "
                         f"draws, fewer than n={n}; ask for fewer or widen the generator's arguments")
    return out


def draw_pool(task: str, split: str, n: int | None, r: random.Random, items, what: str = "") -> list[dict]:
    """``n`` documents of ``split`` from a finite pool of ``(content_key, doc)``: the pool's items owned by
    ``split``, deduplicated by key, shuffled by ``r``. ``n=None``: all of them."""
    mine: dict[str, dict] = {}
    for key, doc in items:
        if key not in mine and bucket(task, key) == split:
            mine[key] = doc
    docs = [mine[k] for k in sorted(mine)]
    r.shuffle(docs)
    if n is not None and n > len(docs):
        raise ValueError(f"built-in task {task}{what}: the {split} split has {len(docs)} items, fewer than "
                         f"n={n}; ask for at most {len(docs)}")
    return docs if n is None else docs[:n]
