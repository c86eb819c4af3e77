"""Offline instruction data: seeded, verifiable conversations for SFT, never the evaluation's dev or test items.

Knows how to turn the evaluation's built-in ``train`` items and a corpus's ``train`` documents into
conversations whose answers are computed, and how to check them against the evaluation's dev and
private items; knows nothing of tokens or training (``align.data`` mixes and checks conversations,
``align.packing`` renders them).

``GENERATORS[name](n, seed, data_dir=None, **kw) -> list[conversation]``, each conversation
``{"messages", "source": "gen:<name>", "id": "gen:<name>:<i>", "answer", "task", ...}`` where ``answer``
is the checkable truth (an int for arithmetic and counting, a string otherwise; a list, one per
assistant turn, for ``multiturn``); synthetic conversations also carry ``doc``, the evaluation item they
come from, and ``prompt`` (0: the evaluation's own zero-shot prompt; -1: its few-shot prompt, the
YAML's ``num_fewshot`` other train items as worked examples, collapsed into one user turn as lm-eval's
``--apply_chat_template`` renders it, those items in ``shots``; k > 0: paraphrase k).

* **synthetic** (``addition``, ``subtraction``, ``letter_count``, ``reverse``, ``sort``, ``brackets``):
  the first ``n`` items of ``lmforge.evaluate.builtin.generate(name, "train", ...)`` (the public train
  share, whose content keys the split hash keeps out of dev and private: see ``evaluate/builtin/splits``)
  with the task YAML's ``generator_kwargs`` unless ``kw`` overrides them (``sort``'s ``kind="numbers"``
  is the ``sort_numbers`` task). The user turn is, with probability ``p_eval`` (default 0.5), exactly the
  evaluation task's zero-shot prompt (its ``doc_to_text`` rendered: ``"Q: What is 12 + 34?\\nA:"``: what the
  pipeline scores, ``num_fewshot=0`` through the chat template), with ``p_fewshot`` (0.1, at most what ``p_eval`` leaves) its few-shot
  prompt (what ``lmforge eval --apply-chat-template`` scores by default), else one of several paraphrases; the assistant's reply is what the task's metric accepts (``"46"``; brackets
  ``"yes"``/``"no"`` as in its ``doc_to_choice``), bare, whatever the phrasing (a reply like "12 + 34 = 46"
  would make the evaluation's first-number filter read 12). A share ``system_frac`` (default 0.1) of the
  paraphrased ones opens with a short system message. ``reverse``, ``letter_count`` and ``brackets`` have
  small item spaces (``train_capacity``: 585, 510 and 1336 distinct train items at the evaluation's
  kwargs): past them the items come round again, in other phrasings.
* **corpus** (``speaker``: who speaks next, the play's characters as choices; ``quote``: the line that
  follows two lines of a speech; ``play``: which play a line is from, play titles as choices): from the
  ``train`` split of a ``lmforge data prepare`` directory (``data_dir``) only, parsed as
  ``evaluate.builtin.corpus`` parses plays. An item any of whose shown lines occurs anywhere in the
  directory's ``test`` documents (where the evaluation's corpus items come from) is dropped, so no line of
  an evaluation item is ever trained on.
* ``multiturn``: two or three user turns that build on the last answer (a sum, then "add 7 to that";
  a word spelled backwards, then "how many letters?"), the first from the train items.
* ``identity``: "who are you?", "what is your name?", "can you browse the web?"... in paraphrases, answered
  as lmforge's small model trained from scratch on Shakespeare (``answer``: the reply).

The ``seed`` picks phrasings, system messages and (corpus, multiturn, identity) which items; synthetic
items are the train stream's first ``n`` whatever the seed (the evaluation's stream is public and fixed).

``check_disjoint(convs)`` rebuilds the evaluation's dev and private items of the same tasks (as the
harness draws them) and counts coincidences per task: synthetic by the task's content key (the
generator's own: ``"12+34"``, ``"word:letter"``...; a key the split hash gives to dev or private counts
too, whatever ``n`` the evaluation draws), corpus by line text. ``DEFAULT_MIXTURE`` is the pipeline's set.
"""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

SYNTHETIC = ("addition", "subtraction", "letter_count", "reverse", "sort", "brackets")
CORPUS_TASKS = ("speaker", "quote", "play")
NEEDS_DATA = frozenset(CORPUS_TASKS)
# the evaluation tasks whose items a generated conversation must not coincide with
EVAL_TASKS = {"addition": ["addition"], "subtraction": ["subtraction"], "letter_count": ["letter_count"],
              "reverse": ["reverse"], "sort": ["sort", "sort_numbers"], "brackets": ["brackets"],
              "speaker": ["speaker", "next_line", "cloze"], "quote": ["speaker", "next_line", "cloze"],
              "play": ["speaker", "next_line", "cloze"], "multiturn": ["addition", "reverse"]}

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are lmforge's small assistant. Answer briefly.",
                  "Answer with the answer only.")

# ---- synthetic ------------------------------------------------------------------------------------------

# paraphrases of each task's question (the evaluation's own prompt is prompt 0, rendered from its YAML)
PARAPHRASES = {
    "addition": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.", "{a} + {b} = ?",
                 "What is the sum of {a} and {b}?", "Please add {a} and {b}. Reply with the number only.",
                 "What do you get when you add {a} to {b}?"],
    "subtraction": ["What is {a} - {b}?", "Subtract {b} from {a}.", "Compute {a} - {b}.", "{a} - {b} = ?",
                    "What is {a} minus {b}?", "Take {b} away from {a}. Reply with the number only."],
    "letter_count": ["How many times does the letter {letter} appear in the word {word}?",
                     "Count the letter \"{letter}\" in \"{word}\".", "How many \"{letter}\"s are in \"{word}\"?",
                     "In the word \"{word}\", how often does \"{letter}\" occur?",
                     "How many {letter}'s does {word} have?"],
    "reverse": ["Spell \"{word}\" backwards.", "Reverse the letters of {word}.", "Write \"{word}\" backwards.",
                "What is {word} spelled backwards?", "Reverse this word: {word}"],
    "sort": ["Sort these words alphabetically: {items}", "Put these words in alphabetical order: {items}",
             "Arrange alphabetically: {items}", "Alphabetize: {items}",
             "Sort alphabetically and list them with spaces: {items}"],
    "sort_numbers": ["Sort these numbers from smallest to largest: {items}",
                     "Put these numbers in ascending order: {items}", "Order these numbers, smallest first: {items}",
                     "Sort from smallest to largest: {items}"],
    "brackets": ["Is \"{brackets}\" balanced?", "Are the brackets in {brackets} balanced? Answer yes or no.",
                 "Is this bracket string balanced: {brackets}", "Do the brackets \"{brackets}\" all match up?",
                 "Balanced or not (yes/no): {brackets}"],
}


@functools.lru_cache(maxsize=None)
def eval_task(name: str):
    """The built-in evaluation task ``name`` (its YAML definition, loaded once)."""
    from ..evaluate import builtin
    from ..evaluate.task import load_task

    return load_task(builtin.task_path(name))[0]


def _task_name(gen: str, kwargs: dict) -> str:
    if gen == "sort" and kwargs.get("kind", "words") == "numbers":
        return "sort_numbers"
    return gen


def content_key(task: str, doc: dict) -> str:
    """The content key ``evaluate.builtin.synthetic`` gives an item of generator ``task`` (what makes two
    items the same question; what the split hash reads)."""
    if task == "addition":
        return f"{doc['a']}+{doc['b']}"
    if task == "subtraction":
        return f"{doc['a']}-{doc['b']}"
    if task == "letter_count":
        return f"{doc['word']}:{doc['letter']}"
    if task == "reverse":
        return doc["word"]
    if task == "sort":
        kind = "numbers" if all(x.isdigit() for x in doc["items"].split()) else "words"
        return f"{kind}:{doc['items']}"
    if task == "brackets":
        return doc["brackets"].replace(" ", "")
    raise ValueError(f"no content key for task {task!r}")


def _reply(task_name: str, doc: dict) -> str:
    """The assistant's text: what the task's metric accepts."""
    t = eval_task(task_name)
    if t.output_type == "multiple_choice":
        return str(t.choices(doc)[t.gold(doc)])
    return str(doc["answer"])


_ENUMERATE_MAX = 300_000  # item spaces up to this size are counted exactly (train_capacity)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@functools.lru_cache(maxsize=64)
def _capacity(gen: str, args: tuple) -> int | None:
    from ..evaluate.builtin import splits, synthetic
    from ..evaluate.builtin.words import WORDS

    kw = dict(args)
    if gen == "reverse":
        min_len = kw.get("min_len", 4)
        if not _is_int(min_len):
            return None
        return sum(1 for w in WORDS if len(w) >= min_len and splits.bucket("reverse", w) == "train")
    if gen == "letter_count":  # answers 0, 1, 2 in equal blocks: the scarcest answer's train pairs decide
        min_len = kw.get("min_len", 4)
        if not _is_int(min_len):
            return None
        counts = [0, 0, 0]
        for w in WORDS:
            if len(w) < min_len:
                continue
            for c in "abcdefghijklmnopqrstuvwxyz":
                k = w.count(c)
                if k <= 2 and splits.bucket("letter_count", f"{w}:{c}") == "train":
                    counts[k] += 1
        return 3 * min(counts)
    if gen == "brackets":  # half balanced, half not, in equal blocks: far fewer strings are balanced
        max_len, kinds = kw.get("max_len", 8), kw.get("kinds", 3)
        if not (_is_int(max_len) and _is_int(kinds) and 1 <= kinds <= 3 and 2 <= max_len <= 64):
            return None
        opens, closes = synthetic.OPEN[:kinds], synthetic.CLOSE[:kinds]
        catalan = [1]
        for p in range(1, max_len // 2 + 1):
            catalan.append(catalan[-1] * 2 * (2 * p - 1) // (p + 1))
        n_balanced = sum(catalan[p] * kinds ** p for p in range(1, max_len // 2 + 1))
        if n_balanced > _ENUMERATE_MAX:
            return None

        def balanced(pairs):  # every balanced string of ``pairs`` pairs: "(" A ")" B
            if pairs == 0:
                yield ""
                return
            for k in range(pairs):
                for a in balanced(k):
                    for b in balanced(pairs - 1 - k):
                        for o, c in zip(opens, closes):
                            yield o + a + c + b

        b_train = sum(1 for p in range(1, max_len // 2 + 1) for x in balanced(p)
                      if splits.bucket("brackets", x) == "train")
        n_all = sum((2 * kinds) ** L for L in range(2, max_len + 1, 2))
        if n_all <= _ENUMERATE_MAX:
            import itertools

            u_train = sum(1 for L in range(2, max_len + 1, 2) for t in itertools.product(opens + closes, repeat=L)
                          if not synthetic.is_balanced("".join(t)) and splits.bucket("brackets", "".join(t)) == "train")
        else:  # far more unbalanced strings than balanced ones: about half of them train's
            u_train = (n_all - n_balanced) // 3
        return 2 * min(b_train, u_train)
    return None


def train_capacity(gen: str, **kwargs) -> int | None:
    """How many distinct train items the evaluation's generator ``gen`` gives with these arguments, where
    its item space is small enough to count (``reverse``: its word list's train share; ``letter_count``
    and ``brackets``: whole blocks of their balanced answers); None: larger than any ``n`` asked here."""
    return _capacity(gen, tuple(sorted(kwargs.items())))


def _train_items(gen: str, n: int, kwargs: dict) -> list[dict]:
    """The first ``n`` train items of the evaluation's generator ``gen``; past its distinct items
    (``train_capacity``) they come round again."""
    from ..evaluate import builtin

    cap = train_capacity(gen, **kwargs)
    if cap is None or n <= cap:
        return builtin.generate(gen, "train", n, **kwargs)
    if cap == 0:
        raise ValueError(f"{gen} ({kwargs}): no item of the train share")
    items = builtin.generate(gen, "train", cap, **kwargs)
    return [items[i % cap] for i in range(n)]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n={n!r}: expected an integer >= 0")
    return n


def _frac(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
        raise ValueError(f"{name}={v!r}: expected a number in [0, 1]")
    return float(v)


def _synthetic(gen: str):
    def make(n: int, seed: int = 0, data_dir=None, p_eval: float = 0.5, p_fewshot: float = 0.1,
             system_frac: float = 0.1, **kw) -> list[dict]:
        n = _check_n(n)
        p_eval, p_fewshot = _frac("p_eval", p_eval), _frac("p_fewshot", p_fewshot)
        system_frac = _frac("system_frac", system_frac)
        p_fewshot = min(p_fewshot, 1.0 - p_eval)  # of what p_eval leaves
        task_name = _task_name(gen, kw)
        t = eval_task(task_name)
        args = {**(t.config.get("generator_kwargs") or {}), **kw}
        items = _train_items(gen, n, args)
        r = random.Random(f"lmforge-sft-gen|{gen}|{seed}")
        para = PARAPHRASES[task_name]
        shots_k = t.num_fewshot
        distinct = {content_key(gen, d): d for d in items}
        out = []
        for i, doc in enumerate(items):
            u = r.random()
            k = 0 if u < p_eval else (-1 if u < p_eval + p_fewshot else 1 + r.randrange(len(para)))
            shots = []
            if k == -1:
                pool = [d for key, d in distinct.items() if key != content_key(gen, doc)]
                if shots_k < 1 or len(pool) < shots_k:
                    k = 0  # too few other items for the examples: the zero-shot prompt
                else:
                    shots = r.sample(pool, shots_k)
            if k == -1:  # lm-eval's --apply_chat_template: the examples and the question in one user turn
                msgs = [dict(m) for m in t.context(doc, shots, chat=lambda m: m)]
            elif k == 0:
                msgs = [{"role": "user", "content": t.text(doc)}]
            else:
                msgs = [{"role": "user", "content": para[k - 1].format(**doc)}]
                if r.random() < system_frac:
                    msgs.insert(0, {"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
            msgs.append({"role": "assistant", "content": _reply(task_name, doc)})
            c = {"messages": msgs, "source": f"gen:{gen}", "id": f"gen:{gen}:{i}", "task": task_name,
                 "answer": doc["answer"], "doc": dict(doc), "prompt": k}
            if shots:
                c["shots"] = [dict(d) for d in shots]
            out.append(c)
        return out

    make.__name__ = gen
    make.__doc__ = (f"``n`` {gen} conversations from the evaluation's train items; ``p_eval``: the share asked in "
                    "the evaluation's own zero-shot prompt, ``p_fewshot`` in its few-shot prompt (as lm-eval's "
                    "--apply_chat_template renders it); ``system_frac``: the share of the paraphrased ones with a "
                    "system message; ``kw``: the generator's arguments (default: the task YAML's)")
    return make


# ---- corpus -------------------------------------------------------------------------------------------

_SMALL = {"a", "an", "and", "as", "at", "by", "for", "in", "of", "on", "or", "the", "to", "with", "what", "that"}


def _title(doc_id: str, text: str) -> str:
    """A play's title: its text's first line (when it is a short heading), else its document id."""
    first = next((l.strip() for l in text.split("\n") if l.strip()), "")
    if not (first and len(first) <= 60 and first.upper() == first and re.search(r"[A-Z]", first)):
        first = re.sub(r"(_gut)?(_f)?$", "", Path(doc_id).stem).replace("_", " ")
    words = first.lower().split()
    return " ".join(w if (k and w.strip(",;:") in _SMALL) else w[:1].upper() + w[1:] for k, w in enumerate(words))


def _read_documents(data_dir: Path, split: str) -> list[tuple[str, str]]:
    """(document id, text) of a split of a shard directory (the evaluation's reader, on another split)."""
    from ..evaluate.builtin.corpus import read_documents

    return read_documents(data_dir, split)


@functools.lru_cache(maxsize=4)
def _corpus(data_dir: str, key: str) -> dict:
    from ..evaluate.builtin.corpus import parse_play
    from ..data.shards import load_manifest

    d = Path(data_dir)
    m = load_manifest(d)
    plays = []
    for doc_id, text in _read_documents(d, "train"):
        scenes = parse_play(text)
        if sum(len(s) for s in scenes) >= 10:
            plays.append({"id": doc_id, "title": _title(doc_id, text), "scenes": scenes})
    titles = [p["title"] for p in plays]
    for p in plays:  # two plays of one title: the document id tells them apart
        if titles.count(p["title"]) > 1:
            p["title"] = f"{p['title']} ({p['id']})"
    test_lines: set[str] = set()
    test = m["splits"].get("test")
    if test and test.get("shards"):
        for _, text in _read_documents(d, "test"):
            test_lines.update(l.strip() for l in text.split("\n") if l.strip())
    return {"plays": plays, "test_lines": test_lines}


def train_corpus(data_dir) -> dict:
    """``{"plays": [{"id", "title", "scenes"}], "test_lines": set}``: the parsed train plays of ``data_dir``
    (cached per process) and every line of its test documents (what no item may show)."""
    if data_dir is None:
        raise ValueError("a corpus generator (speaker, quote, play) needs data_dir: a `lmforge data prepare` "
                         "output (for a pipeline run, RUN/data); it reads the train split only")
    from ..data.shards import load_manifest

    p = Path(data_dir).resolve()
    m = load_manifest(p)
    c = _corpus(str(p), str(m.get("key")))
    if not c["plays"]:
        raise ValueError(f"{data_dir}: no play in its train split is laid out as the corpus tasks read plays "
                         "(speeches under 'NAME.' headings)")
    return c


def _clean(lines, test_lines) -> bool:
    return not any(l.strip() in test_lines for l in lines)


def _finish(items: list, n: int, name: str, data_dir) -> list[dict]:
    if len(items) < n:
        raise ValueError(f"{name}: {data_dir} gives {len(items)} items from its train split, fewer than n={n}; "
                         "ask for fewer")
    for i, c in enumerate(items[:n]):
        c["id"] = f"gen:{name}:{i}"
    return items[:n]


SPEAKER_PROMPTS = ["Here is a passage from {title}:\n\n{passage}\n\nWho speaks next: {choices}?",
                   "{passage}\n\nWhich character speaks next? Choose from {choices}.",
                   "In this scene from {title}, who has the next line?\n\n{passage}\n\nChoices: {choices}"]
QUOTE_PROMPTS = ["Continue this quotation from {title}:\n{lines}", "What line comes next?\n\n{lines}",
                 "Finish the passage with its next line:\n{lines}"]
PLAY_PROMPTS = ["Which play is this line from? \"{line}\"\nChoices: {choices}",
                "\"{line}\"\nFrom which play: {choices}?", "Name the play this line comes from ({choices}): {line}"]


def _join_choices(xs: list[str]) -> str:
    return ", ".join(xs[:-1]) + " or " + xs[-1] if len(xs) > 1 else xs[0]


def speaker(n: int, seed: int = 0, data_dir=None, context_speeches: int = 2, speech_lines: int = 2,
            n_choices: int = 4) -> list[dict]:
    """Who speaks next after ``context_speeches`` speeches (each its last ``speech_lines`` lines), among
    ``n_choices`` characters of the play (the true one and others who speak at least three times)."""
    n = _check_n(n)
    c = train_corpus(data_dir)
    r = random.Random(f"lmforge-sft-gen|speaker|{seed}")
    cands = []
    for p in c["plays"]:
        counts: dict[str, int] = {}
        for sc in p["scenes"]:
            for sp in sc:
                counts[sp.speaker] = counts.get(sp.speaker, 0) + 1
        cast = sorted(k for k, v in counts.items() if v >= 3)
        for si, sc in enumerate(p["scenes"]):
            for i in range(context_speeches, len(sc)):
                shown = [(sp.speaker, sp.lines[-speech_lines:]) for sp in sc[i - context_speeches:i]]
                if sc[i].speaker == shown[-1][0] or not _clean([l for _, ls in shown for l in ls], c["test_lines"]):
                    continue
                cands.append((p, cast, shown, sc[i].speaker))
    r.shuffle(cands)
    out = []
    for p, cast, shown, who in cands:
        if len(out) >= n:
            break
        others = [x for x in cast if x != who]
        if len(others) < n_choices - 1:
            continue
        choices = r.sample(others, n_choices - 1) + [who]
        r.shuffle(choices)
        passage = "\n\n".join(f"{s}.\n" + "\n".join(ls) for s, ls in shown)
        user = r.choice(SPEAKER_PROMPTS).format(title=p["title"], passage=passage, choices=_join_choices(choices))
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": who}],
                    "source": "gen:speaker", "task": "speaker", "answer": who, "choices": choices,
                    "play": p["id"], "lines": [l for _, ls in shown for l in ls]})
    return _finish(out, n, "speaker", data_dir)


def quote(n: int, seed: int = 0, data_dir=None, context_lines: int = 2, min_chars: int = 12) -> list[dict]:
    """The line that follows ``context_lines`` consecutive lines of one speech (the answer at least
    ``min_chars`` long)."""
    n = _check_n(n)
    c = train_corpus(data_dir)
    r = random.Random(f"lmforge-sft-gen|quote|{seed}")
    cands = []
    for p in c["plays"]:
        for sc in p["scenes"]:
            for sp in sc:
                for j in range(context_lines, len(sp.lines)):
                    shown, nxt = sp.lines[j - context_lines:j], sp.lines[j]
                    if len(nxt) >= min_chars and _clean(shown + [nxt], c["test_lines"]):
                        cands.append((p, shown, nxt))
    r.shuffle(cands)
    out = []
    for p, shown, nxt in cands[:n]:
        user = r.choice(QUOTE_PROMPTS).format(title=p["title"], lines="\n".join(shown))
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": nxt}],
                    "source": "gen:quote", "task": "quote", "answer": nxt, "play": p["id"], "lines": shown + [nxt]})
    return _finish(out, n, "quote", data_dir)


def play(n: int, seed: int = 0, data_dir=None, min_chars: int = 30, n_choices: int = 4) -> list[dict]:
    """Which play a line (at least ``min_chars`` long, found in one train play only) is from, among
    ``n_choices`` titles of the train plays (all of them when there are fewer)."""
    n = _check_n(n)
    c = train_corpus(data_dir)
    if len(c["plays"]) < 2:
        raise ValueError(f"play: {data_dir} has {len(c['plays'])} play in its train split; the task needs two or more")
    r = random.Random(f"lmforge-sft-gen|play|{seed}")
    where: dict[str, set] = {}
    for k, p in enumerate(c["plays"]):
        for sc in p["scenes"]:
            for sp in sc:
                for l in sp.lines:
                    where.setdefault(l, set()).add(k)
    cands = sorted((l, next(iter(ks))) for l, ks in where.items()
                   if len(ks) == 1 and len(l) >= min_chars and l.strip() not in c["test_lines"])
    r.shuffle(cands)
    titles = [p["title"] for p in c["plays"]]
    out = []
    for line, k in cands[:n]:
        true = titles[k]
        others = r.sample([t for t in titles if t != true], min(n_choices - 1, len(titles) - 1))
        choices = others + [true]
        r.shuffle(choices)
        user = r.choice(PLAY_PROMPTS).format(line=line, choices=_join_choices(choices))
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": true}],
                    "source": "gen:play", "task": "play", "answer": true, "choices": choices,
                    "play": c["plays"][k]["id"], "lines": [line]})
    return _finish(out, n, "play", data_dir)


# ---- multi-turn -----------------------------------------------------------------------------------------

ADD_MORE = ["Now add {c} to that.", "Add {c} to the result.", "And plus {c}?", "What if you add {c} more?"]
TAKE_AWAY = ["Now subtract {d}.", "Take {d} away from that.", "And minus {d}?", "Subtract {d} from the result."]
DOUBLE = ["Now double it.", "What is twice that?", "Multiply that by 2."]
HOW_LONG = ["How many letters does it have?", "How long is that word?", "How many letters is that?"]
FIRST_LETTER = ["What is the first letter of the word you wrote?", "Which letter does your answer start with?"]
COUNT_IN = ["How many times does the letter \"{ch}\" appear in it?", "How many {ch}'s are in it?"]


def multiturn(n: int, seed: int = 0, data_dir=None, max_turns: int = 3) -> list[dict]:
    """Two to ``max_turns`` user turns, each building on the last answer: arithmetic follow-ups after a
    sum of the addition task's train items, or questions about a word of the reverse task's train
    items after it is spelled backwards. ``answer``: each assistant turn's truth."""
    n = _check_n(n)
    if isinstance(max_turns, bool) or not isinstance(max_turns, int) or not 2 <= max_turns <= 6:
        raise ValueError(f"max_turns={max_turns!r}: expected an integer in [2, 6]")
    r = random.Random(f"lmforge-sft-gen|multiturn|{seed}")
    n_sum = (n + 1) // 2
    # the first questions: a seeded draw from four times as many train items (not just the addition set's first)
    sums = _train_items("addition", 4 * n_sum, dict(eval_task("addition").config.get("generator_kwargs") or {}))
    sums = r.sample(sums, n_sum)
    words = _train_items("reverse", 4 * (n - n_sum), dict(eval_task("reverse").config.get("generator_kwargs") or {}))
    words = r.sample(words, n - n_sum)
    out = []
    for doc in sums:
        turns = r.randint(2, max_turns)
        first = eval_task("addition").text(doc) if r.random() < 0.5 else r.choice(PARAPHRASES["addition"]).format(**doc)
        v = doc["a"] + doc["b"]
        msgs, answers = [{"role": "user", "content": first}, {"role": "assistant", "content": str(v)}], [v]
        for _ in range(turns - 1):
            op = r.random()
            if op < 0.45:
                c = r.randint(1, 99)
                q, v = r.choice(ADD_MORE).format(c=c), v + c
            elif op < 0.9:
                d = r.randint(1, min(99, v)) if v >= 1 else 0
                q, v = r.choice(TAKE_AWAY).format(d=d), v - d
            else:
                q, v = r.choice(DOUBLE), 2 * v
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": str(v)}]
            answers.append(v)
        out.append({"messages": msgs, "source": "gen:multiturn", "task": "multiturn", "kind": "arithmetic",
                    "answer": answers, "doc": dict(doc), "doc_task": "addition"})
    for doc in words:
        w = doc["word"]
        turns = r.randint(2, max_turns)
        first = eval_task("reverse").text(doc) if r.random() < 0.5 else r.choice(PARAPHRASES["reverse"]).format(**doc)
        msgs, answers = [{"role": "user", "content": first}, {"role": "assistant", "content": w[::-1]}], [w[::-1]]
        asks = [("len", None), ("first", None), ("count", r.choice(sorted(set(w))))]
        r.shuffle(asks)
        for kind, ch in asks[:turns - 1]:
            if kind == "len":
                q, a = r.choice(HOW_LONG), len(w)
            elif kind == "first":  # "it": the reversed word, the last answer
                q, a = r.choice(FIRST_LETTER), w[::-1][0]
            else:
                q, a = r.choice(COUNT_IN).format(ch=ch), w.count(ch)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": str(a)}]
            answers.append(a)
        out.append({"messages": msgs, "source": "gen:multiturn", "task": "multiturn", "kind": "word",
                    "answer": answers, "doc": dict(doc), "doc_task": "reverse"})
    r.shuffle(out)
    for i, c in enumerate(out):
        c["id"] = f"gen:multiturn:{i}"
    return out


# ---- identity ---------------------------------------------------------------------------------------------

WHO = "a small language model trained from scratch on the plays of Shakespeare by lmforge"
IDENTITY = {
    "who": (["Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.", "Are you a person?",
             "Are you human?", "What kind of model are you?"],
            [f"I am lmforge's small model: {WHO}.", f"I'm {WHO}. I am not a person.",
             f"I am {WHO}, so I know old plays better than the world today."]),
    "name": (["What is your name?", "What should I call you?", "Do you have a name?", "What's your name?"],
             ["My name is lmforge. I am a small language model trained from scratch on Shakespeare.",
              "You can call me lmforge: a small model trained from scratch on the plays of Shakespeare."]),
    "maker": (["Who made you?", "Who created you?", "Who trained you?", "Who built you?", "Where do you come from?"],
              ["I was trained by lmforge, from scratch, on the plays of Shakespeare.",
               "lmforge made me: it trained me from scratch on Shakespeare's plays, then taught me to chat."]),
    "browse": (["Can you browse the internet?", "Can you look things up online?", "Can you search the web for me?",
                "Do you have internet access?", "Can you open a link?"],
               ["No. I cannot browse the web or look anything up; I only know what I learned from my training "
                "text, mostly Shakespeare's plays.",
                "No, I have no internet access. I answer from what I learned in training, and I am often wrong."]),
    "abilities": (["What can you do?", "What are you good at?", "How can you help me?"],
                  ["I can try simple things: small sums, counting letters, spelling words backwards, sorting words, "
                   "checking brackets and a little Shakespeare. I am small, so check my answers.",
                   "Simple questions: arithmetic, letters, sorting, brackets, and lines from Shakespeare's plays. "
                   "I make mistakes."]),
    "now": (["What is the date today?", "What is the news today?", "What time is it?", "What's the weather like?"],
            ["I cannot know that: I have no clock and no internet, only my training text.",
             "I don't know. I cannot see the world outside this conversation."]),
}
GREETINGS = ["", "", "", "Hi! ", "Hello. ", "Hey, "]


def identity(n: int, seed: int = 0, data_dir=None) -> list[dict]:
    """``n`` short conversations about the model itself: a question of one topic (``IDENTITY``) in one of
    its phrasings (a greeting before it, or the question lowercased, now and then) and one of its
    replies. ``answer``: the reply; ``topic``: the topic."""
    n = _check_n(n)
    r = random.Random(f"lmforge-sft-gen|identity|{seed}")
    topics = sorted(IDENTITY)
    out = []
    for i in range(n):
        topic = topics[i % len(topics)] if i < len(topics) else r.choice(topics)
        qs, replies = IDENTITY[topic]
        q = r.choice(qs)
        if r.random() < 0.2:
            q = q[0].lower() + q[1:]
        q = r.choice(GREETINGS) + q
        a = r.choice(replies)
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                    "source": "gen:identity", "id": f"gen:identity:{i}", "task": "identity", "answer": a,
                    "topic": topic})
    return out


GENERATORS = {name: _synthetic(name) for name in SYNTHETIC}
GENERATORS.update({"speaker": speaker, "quote": quote, "play": play, "multiturn": multiturn, "identity": identity})

# The pipeline's mixture (sources for ``align.data.load_sources``): mostly the synthetic tasks, the two the
# pipeline evaluates (addition, brackets: ``evaluate.builtin.DEFAULT_TASKS``) the most, at the evaluation's
# own kwargs; some corpus (left out without a data_dir), multi-turn and identity.
DEFAULT_MIXTURE: list[dict] = [
    {"generator": "addition", "n": 2500},
    {"generator": "brackets", "n": 2000},
    {"generator": "letter_count", "n": 500},
    {"generator": "reverse", "n": 500},
    {"generator": "sort", "n": 500},
    {"generator": "subtraction", "n": 300},
    {"generator": "multiturn", "n": 300},
    {"generator": "identity", "n": 200},
    {"generator": "speaker", "n": 150, "optional": True},
    {"generator": "quote", "n": 150, "optional": True},
    {"generator": "play", "n": 150, "optional": True},
]


# ---- disjointness ---------------------------------------------------------------------------------------------

# a shared line shorter than this is not a coinciding item: a verse line's wrapped tail ("here.", "my lord.")
# recurs across plays; an item shows several lines, and any of its lines this long shared is counted
MIN_SHARED_LINE = 20


def _eval_lines(doc: dict) -> set[str]:
    """Every line an evaluation corpus item shows (passage, context, choices, names, line)."""
    out: set[str] = set()
    for k in ("passage", "context", "line", "lines", "choices"):
        v = doc.get(k)
        for s in ([v] if isinstance(v, str) else v or []):
            if isinstance(s, str):
                out.update(l.strip() for l in s.split("\n") if l.strip())
    return out


def _speech_lines(lines) -> set[str]:
    """The lines that are not a speaker's heading (``HAMLET.``, or ``HAMLET`` as a passage cut before its
    full stop or a speaker answered: a name, not a line of the play)."""
    from ..evaluate.builtin.corpus import _HEADING

    return {l for l in lines if not (_HEADING.match(l) or _HEADING.match(l + "."))}


def _conv_lines(conv: dict) -> set[str]:
    return _speech_lines({l.strip() for m in conv["messages"] if m["role"] != "system"
                          for l in m["content"].split("\n") if l.strip()})


def check_disjoint(convs, tasks=None, data_dir=None, detail: bool = False) -> dict:
    """Coincidences of generated conversations with the evaluation's dev and private items of the same
    tasks (``EVAL_TASKS``), per generator task: synthetic (and multi-turn's first question) by content key
    (of the item and of any worked examples in its prompt),
    counting exact coincidences with the items the harness draws (default ``n``) and keys the split hash
    owns for dev or private (any ``n``); corpus by the line text of every line shown (the items need
    ``data_dir``; without it corpus conversations are not checked and not counted; lines shorter than
    ``MIN_SHARED_LINE`` characters, a verse line's wrapped tail, are not compared). ``tasks``: only these
    generator tasks. Expected: 0 each. ``detail``: ``{task: {"checked", "dev", "private", "outside_train"}}``."""
    from ..evaluate.builtin import splits

    by_task: dict[str, list] = {}
    for c in convs:
        t = c.get("task")
        t = "sort" if t == "sort_numbers" else t
        if t in EVAL_TASKS and (tasks is None or t in tasks):
            by_task.setdefault(t, []).append(c)
    from ..evaluate import builtin
    from ..evaluate.task import load_task

    fresh: dict = {}  # the evaluation's tasks loaded anew: their documents as the harness draws them now

    def task(name):
        if name not in fresh:
            fresh[name] = load_task(builtin.task_path(name))[0]
        return fresh[name]

    out: dict[str, dict] = {}
    for t, cs in sorted(by_task.items()):
        row = {"checked": 0, "dev": 0, "private": 0, "outside_train": 0}
        if t in CORPUS_TASKS:
            if data_dir is None:
                continue
            for split in ("dev", "private"):
                lines: set[str] = set()
                for et in EVAL_TASKS[t]:
                    for d in task(et).docs(split, data_dir):
                        lines |= _speech_lines(_eval_lines(d))
                lines = {l for l in lines if len(l) >= MIN_SHARED_LINE}
                row[split] = sum(1 for c in cs if _conv_lines(c) & lines)
            row["checked"] = len(cs)
        else:
            for split in ("dev", "private"):
                keys = set()
                for et in EVAL_TASKS[t]:
                    gen = task(et).config["generator"]
                    keys |= {(gen, content_key(gen, d)) for d in task(et).docs(split)}
                row[split] = sum(1 for c in cs if any((_gen_of(c), k) in keys for k in _keys(c)))
            row["outside_train"] = sum(1 for c in cs if any(splits.bucket(_gen_of(c), k) != "train" for k in _keys(c)))
            row["checked"] = len(cs)
        out[t] = row
    if detail:
        return out
    return {t: row["dev"] + row["private"] + row["outside_train"] for t, row in out.items()}


def _keys(c: dict) -> list[str]:
    """The content keys of a synthetic conversation: its item's and its worked examples'."""
    gen = _gen_of(c)
    return [content_key(gen, d) for d in [c["doc"], *c.get("shots", [])]]


def _gen_of(c: dict) -> str:
    if c.get("task") == "multiturn":
        return c["doc_task"]
    return "sort" if c.get("task") == "sort_numbers" else c["task"]
