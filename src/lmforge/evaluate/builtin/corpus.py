"""Corpus tasks: next-line choice, speaker choice and cloze, drawn only from a data directory's test documents.

Knows how to read the ``test`` split of a shard directory (``lmforge data prepare`` output: the
tokenizer saved beside the shards decodes each test document; nothing of ``train`` or ``val`` is
ever opened), how to find the speeches in a play, and how to make multiple-choice items from them;
knows nothing of prompts or scoring (the YAML files in ``evaluate/tasks``) nor of seeds (``splits``).

Plays: the Project Gutenberg layout of the corpus, a speech being a block of lines after a blank
line whose first line is the speaker's name and a full stop (``CASSIUS.``, ``SIR TOBY.``, or
``Romeo.``), optionally followed by a bracketed direction. Whole-line stage directions
(``[Exit.]``) are dropped; ``ACT``/``SCENE`` lines start a new scene. A document laid out otherwise
(the First Folio's ``   Eno. What's...``, poems) yields no items and is counted in
``corpus_stats``.

Splits: each scene is cut into *stretches* of ``STRETCH`` consecutive speeches and each stretch is
owned by one split (``splits.bucket`` over its document id, scene and stretch number), so a
passage and its answer never straddle two splits, and a split's distractors are drawn from its
own stretches only (the dev items never show a private line). An item whose text (passage and
answer) occurs in two splits' stretches is dropped from both.

Documents (``play``: the document id; ``stretch``: "scene.k", the unit its split owns: items of one
stretch are correlated, for a bootstrap that resamples stretches; the fields the templates use:
``gold`` indexes ``choices``; a scored request is
``context`` + ``choices[i]``, cut after a letter so that the tokens of the context are a prefix of the
tokens of the whole, see ``clean_cut``):

* ``next_line``: ``passage`` (the ``context_lines`` speech lines before the answer, with their
  speakers' names, laid out as in the play), ``lines`` four lines of the same play: the true next
  line and three others from the split's stretches of length within a factor of 1.5 when there
  are enough (so that length says little); ``choices[i]`` = the passage's tail + "\n" + ``lines[i]``.
* ``speaker``: ``passage`` (the ``context_speeches`` speeches before, each cut to its last
  ``speech_lines`` lines), ``names`` the true next speaker and three other characters of the play
  who speak at least three times (drawn in proportion to how often they speak), ``line`` the next speech's first line; ``choices[i]`` = tail +
  "\n\nNAME.\n" + ``line`` (the same line under each name: the model scores the name and the line
  given the name).
* ``cloze``: ``context`` (``context_lines`` lines, then the start of a line up to a held-out word
  that follows a space), ``words`` the true word and three words of the play of about the same
  frequency (nearest in frequency rank), capitalised like the true one; ``choices[i]`` =
  ``words[i]`` + the rest of the line.
"""
from __future__ import annotations

import functools
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .splits import SPLITS, bucket

STRETCH = 12  # speeches per stretch of a scene (the unit a split owns; small: items of a split spread wide)
_HEADING = re.compile(r"^(?P<name>[A-Z][A-Z'&-]*(?: [A-Z][A-Z'&-]*){0,4}|[A-Z][a-z']+(?: [A-Z][a-z']+)?)\."
                      r"(?:\s*\[[^\]]*\])?\s*$")
_NOT_NAMES = {"ACT", "SCENE", "FINIS", "THE END", "END", "EPILOGUE", "PROLOGUE"}
_SCENE = re.compile(r"^(?:ACT|SCENE|Scene|Act)\b")
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass
class Speech:
    speaker: str
    lines: list[str]


@dataclass
class Stretch:
    doc_id: str
    scene: int
    index: int
    speeches: list[Speech]
    split: str = ""


@dataclass
class Corpus:
    data_dir: str
    stretches: list[Stretch]
    stats: dict
    words: dict  # doc_id -> Counter of lowercase words (the whole play)
    speakers: dict  # doc_id -> Counter of speaker names


def _is_direction(line: str) -> bool:
    s = line.strip()
    return s.startswith("[") and s.endswith("]")


def parse_play(text: str) -> list[list[Speech]]:
    """The scenes of a play, each a list of speeches (speaker, lines). Text before the first speech,
    stage directions and titles are left out."""
    scenes: list[list[Speech]] = [[]]
    blocks = re.split(r"\n[ \t]*\n", text.replace("\r\n", "\n"))
    for block in blocks:
        lines = [l.rstrip() for l in block.split("\n") if l.strip()]
        if not lines:
            continue
        if _SCENE.match(lines[0]):
            if scenes[-1]:
                scenes.append([])
            continue
        m = _HEADING.match(lines[0].strip())
        if not m or m.group("name").upper() in _NOT_NAMES or m.group("name").split()[0] in ("ACT", "SCENE"):
            continue
        body, in_dir = [], False
        for l in lines[1:]:
            s = l.strip()
            if in_dir:
                in_dir = "]" not in s
                continue
            if s.startswith("["):
                in_dir = "]" not in s
                continue
            body.append(s)
        if body:
            scenes[-1].append(Speech(m.group("name"), body))
    return [s for s in scenes if s]


def read_test_documents(data_dir: str | Path) -> list[tuple[str, str]]:
    """(document id, text) of every document of the directory's ``test`` split (``read_documents``)."""
    return read_documents(data_dir, "test")


def read_documents(data_dir: str | Path, split: str) -> list[tuple[str, str]]:
    """(document id, text) of every document of a split of the directory, decoded with the tokenizer
    saved in it (its document token dropped). The evaluation reads ``test``; SFT's corpus generators
    (``lmforge.align.generators``) read ``train``."""
    from ...data.loader import TokenStream
    from ...data.shards import check_shards_tokenizer
    from ...tokenize import load

    data_dir = Path(data_dir)
    stream = TokenStream(data_dir, split)
    m = stream.manifest
    rec = m.get("tokenizer") or {}
    tok_path = data_dir / rec.get("file", "tokenizer")
    if not tok_path.exists():
        raise FileNotFoundError(f"{data_dir}: the manifest names the tokenizer {rec.get('file')!r}, which is missing")
    tok = load(tok_path)
    check_shards_tokenizer(m, data_dir, tok, f"the tokenizer saved in {data_dir}")
    doc_token = rec.get("doc_token_id")
    ids: list[str] = []
    for sh in m["splits"][split]["shards"]:
        import json

        ids += json.loads((data_dir / sh["index"]).read_text())["ids"]
    starts, lengths = stream.doc_lengths()
    if len(ids) != len(starts):
        raise ValueError(f"{data_dir}: the {split} index files list {len(ids)} document ids for {len(starts)} "
                         "document starts")
    out = []
    for doc_id, s, n in zip(ids, starts, lengths):
        toks = stream.read(int(s), int(n)).tolist()
        if toks and doc_token is not None and toks[0] == doc_token:
            toks = toks[1:]
        out.append((doc_id, tok.decode(toks)))
    return out


@functools.lru_cache(maxsize=4)
def _load_cached(data_dir: str, key: str) -> Corpus:
    docs = read_test_documents(data_dir)
    stretches, words, speakers = [], {}, {}
    stats = {"documents": len(docs), "plays": 0, "skipped_documents": [], "speeches": 0, "stretches": {}}
    for doc_id, text in docs:
        scenes = parse_play(text)
        n_speeches = sum(len(s) for s in scenes)
        if n_speeches < 10:
            stats["skipped_documents"].append(doc_id)
            continue
        stats["plays"] += 1
        stats["speeches"] += n_speeches
        words[doc_id] = Counter(w.lower() for s in scenes for sp in s for l in sp.lines for w in _WORD.findall(l))
        speakers[doc_id] = Counter(sp.speaker for s in scenes for sp in s)
        for si, scene in enumerate(scenes):
            for k in range(0, len(scene), STRETCH):
                st = Stretch(doc_id, si, k // STRETCH, scene[k:k + STRETCH])
                st.split = bucket("corpus", f"{doc_id}|{si}|{k // STRETCH}")
                stretches.append(st)
    for sp in SPLITS:
        stats["stretches"][sp] = sum(1 for s in stretches if s.split == sp)
    return Corpus(data_dir, stretches, stats, words, speakers)


def load_corpus(data_dir) -> Corpus:
    """The parsed test plays of ``data_dir`` (cached per process, keyed by the manifest's key)."""
    if data_dir is None:
        raise ValueError("a corpus task (next_line, speaker, cloze) needs data_dir: a `lmforge data prepare` "
                         "output with a test split (for a pipeline run, RUN/data)")
    from ...data.shards import load_manifest

    p = Path(data_dir).resolve()
    m = load_manifest(p)
    return _load_cached(str(p), str(m.get("key")))


def corpus_stats(data_dir) -> dict:
    return dict(load_corpus(data_dir).stats)


def _lines(st: Stretch):
    """(speech index, line index, line) of every line of the stretch."""
    for i, sp in enumerate(st.speeches):
        for j, l in enumerate(sp.lines):
            yield i, j, l


def _render(st: Stretch, lines: list, a: int, b: int) -> str:
    """The play's text of lines ``a`` to ``b - 1`` of ``lines`` (``list(_lines(st))``), with each speech's
    name before its first shown line and a blank line between speeches."""
    parts, cur = [], None
    for i, _, l in lines[a:b]:
        if i != cur:
            if cur is not None:
                parts.append("")
            parts.append(f"{st.speeches[i].speaker}.")
            cur = i
        parts.append(l)
    return "\n".join(parts)


def _split_stretches(corpus: Corpus, split: str) -> list[Stretch]:
    return [s for s in corpus.stretches if s.split == split]


def _pick(split: str, r: random.Random, skeletons) -> list:
    """``skeletons``: split -> list of (content key, item). The split's items, a key found in two splits
    dropped from both (and repeats of a key within the split), shuffled by ``r``."""
    owners: dict[str, set] = {}
    for sp, items in skeletons.items():
        for key, _ in items:
            owners.setdefault(key, set()).add(sp)
    mine, seen = [], set()
    for key, item in skeletons[split]:
        if len(owners[key]) == 1 and key not in seen:
            seen.add(key)
            mine.append(item)
    r.shuffle(mine)
    return mine


def _build(corpus: Corpus, split: str, n: int | None, items, make, task: str) -> list[dict]:
    """Documents made by ``make(item)`` (None: the item has too few distractors, skipped) until ``n``."""
    docs = []
    for item in items:
        if n is not None and len(docs) >= n:
            break
        doc = make(item)
        if doc is not None:
            docs.append(doc)
    if n is not None and len(docs) < n:
        raise ValueError(f"built-in task {task}: {corpus.data_dir} gives {len(docs)} {split} items "
                         f"({corpus.stats['plays']} plays in its test split), fewer than n={n}; ask for fewer")
    return docs


def _line_choices(r: random.Random, true: str, pool: list[str], avoid: set, k: int = 3) -> list[str]:
    ok = [l for l in pool if l != true and l not in avoid]
    near = [l for l in ok if len(true) / 1.5 <= len(l) <= len(true) * 1.5]
    cands = near if len(set(near)) >= k else ok
    picked: list[str] = []
    for l in r.sample(cands, min(len(cands), 8 * k)):
        if l not in picked:
            picked.append(l)
        if len(picked) == k:
            break
    return picked


def _shuffled(r: random.Random, true, others: list) -> tuple[list, int]:
    choices = [true] + list(others)
    r.shuffle(choices)
    return choices, choices.index(true)


def clean_cut(passage: str) -> tuple[str, str]:
    """(context, tail): the passage cut after its last letter or digit. Scored requests split a text
    where the context's tokens are a prefix of the whole text's tokens (lm-eval's rule); a BPE whose
    pre-tokenizer joins punctuation to the newlines after it (cl100k's does: ".\n\n" is one token)
    would break that rule at "world." + "\nNext line", and the newline would vanish from what the
    model sees. Cut after a letter, the boundary falls between pre-tokens; the tail (the same in
    every choice) goes to the front of each continuation."""
    k = len(passage)
    while k > 0 and not passage[k - 1].isalnum():
        k -= 1
    return passage[:k], passage[k:]


def next_line(split: str, n: int | None, r: random.Random, data_dir=None, context_lines: int = 4,
              min_chars: int = 12) -> list[dict]:
    corpus = load_corpus(data_dir)
    skel: dict[str, list] = {sp: [] for sp in SPLITS}
    for st in corpus.stretches:
        lines = list(_lines(st))
        for t in range(context_lines, len(lines)):
            i, j, line = lines[t]
            if len(line) < min_chars:
                continue
            passage = _render(st, lines, t - context_lines, t)
            if j == 0:  # the answer opens a speech: its speaker's name ends the passage
                passage += f"\n\n{st.speeches[i].speaker}."
            skel[st.split].append((passage + "\n" + line, (st, passage, line)))
    items = _pick(split, r, skel)
    pools: dict[str, list[str]] = {}
    for st in _split_stretches(corpus, split):
        pools.setdefault(st.doc_id, []).extend(l for _, _, l in _lines(st) if len(l) >= min_chars)

    def make(item):
        st, passage, line = item
        others = _line_choices(r, line, pools[st.doc_id], set(passage.split("\n")))
        if len(others) < 3:
            return None
        lines, gold = _shuffled(r, line, others)
        context, tail = clean_cut(passage)
        return {"play": st.doc_id, "stretch": f"{st.scene}.{st.index}", "passage": passage, "context": context, "lines": lines,
                "choices": [f"{tail}\n{l}" for l in lines], "gold": gold}

    return _build(corpus, split, n, items, make, "next_line")


def speaker(split: str, n: int | None, r: random.Random, data_dir=None, context_speeches: int = 4,
            speech_lines: int = 2) -> list[dict]:
    corpus = load_corpus(data_dir)
    skel: dict[str, list] = {sp: [] for sp in SPLITS}
    for st in corpus.stretches:
        for i in range(context_speeches, len(st.speeches)):
            parts = []
            for sp in st.speeches[i - context_speeches:i]:
                parts.append(f"{sp.speaker}.\n" + "\n".join(sp.lines[-speech_lines:]))
            passage = "\n\n".join(parts)
            nxt = st.speeches[i]
            skel[st.split].append((passage + "\n\n" + nxt.speaker + ".\n" + nxt.lines[0], (st, passage, nxt)))
    items = _pick(split, r, skel)

    def make(item):
        st, passage, nxt = item
        counts = corpus.speakers[st.doc_id]
        cast = sorted(c for c, k in counts.items() if k >= 3 and c != nxt.speaker)
        if len(cast) < 3:
            cast = sorted(c for c in counts if c != nxt.speaker)
        if len(cast) < 3:
            return None
        # distractors as likely as the characters are to speak: "a main character speaks" is no clue
        others: list[str] = []
        while len(others) < 3:
            c = r.choices(cast, [counts[c] for c in cast])[0]
            if c not in others:
                others.append(c)
        names, gold = _shuffled(r, nxt.speaker, others)
        context, tail = clean_cut(passage)
        return {"play": st.doc_id, "stretch": f"{st.scene}.{st.index}", "passage": passage, "context": context, "names": names, "line": nxt.lines[0],
                "choices": [f"{tail}\n\n{nm}.\n{nxt.lines[0]}" for nm in names], "gold": gold}

    return _build(corpus, split, n, items, make, "speaker")


def _cased(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[0].upper() + word[1:] if like[0].isupper() else word


def cloze(split: str, n: int | None, r: random.Random, data_dir=None, context_lines: int = 2,
          min_word: int = 3, neighbours: int = 12) -> list[dict]:
    corpus = load_corpus(data_dir)
    ranks = {d: [w for w, _ in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))] for d, c in corpus.words.items()}
    where = {d: {w: i for i, w in enumerate(rk)} for d, rk in ranks.items()}
    skel: dict[str, list] = {sp: [] for sp in SPLITS}
    for st in corpus.stretches:
        lines = list(_lines(st))
        for t in range(context_lines, len(lines)):
            i, j, line = lines[t]
            cands = [m for m in _WORD.finditer(line) if m.start() > 0 and line[m.start() - 1] == " "
                     and len(m.group()) >= min_word
                     and m.group().isalpha() and corpus.words[st.doc_id][m.group().lower()] >= 2]
            if not cands:
                continue
            ctx = _render(st, lines, t - context_lines, t)
            if j == 0:
                ctx += f"\n\n{st.speeches[i].speaker}."
            skel[st.split].append((ctx + "\n" + line, (st, ctx, line, cands)))
    items = _pick(split, r, skel)

    def make(item):
        st, ctx, line, cands = item
        m = r.choice(cands)
        word = m.group()
        rank, rk = where[st.doc_id][word.lower()], ranks[st.doc_id]
        lo = max(0, rank - neighbours // 2)
        near = [w for w in rk[lo:lo + neighbours + 1] if w != word.lower() and w.isalpha() and len(w) >= min_word]
        if len(near) < 3:
            return None
        words, gold = _shuffled(r, word, [_cased(w, word) for w in r.sample(near, 3)])
        rest = line[m.end():]
        return {"play": st.doc_id, "stretch": f"{st.scene}.{st.index}", "context": ctx + "\n" + line[:m.start()], "words": words,
                "choices": [w + rest for w in words], "gold": gold}

    return _build(corpus, split, n, items, make, "cloze")
