"""On-policy, verifiable preference data: the model's own sampled answers, scored by the evaluation's checkers.

Knows how to ask the built-in evaluation tasks' **dev** items exactly as the evaluation asks them through
the chat template (``Task.requests(..., chat=LocalLM.apply_chat_template)``: the same messages, the same
token ids; ``num_fewshot=0`` is what the pipeline scores, ``None`` the task YAML's own, what
``lmforge eval --apply-chat-template`` asks by default), how to sample ``k`` answers per prompt with
lmforge's batched engine (seeded per sample, stopping at the chat's ``<|end|>`` or after
``max_new_tokens``), how to score each answer with the task's own checker, and how to turn scored answers
into TRL-format preference rows (paired for DPO and its family, unpaired for KTO). Knows nothing of
tokenizing rows for training or of losses (``align.pref_data``, ``align.pref_loss``).

Scoring (``score_answer``), per kind of task:

* ``generate_until`` tasks (addition, subtraction, letter_count, reverse, sort, sort_numbers): the answer
  the evaluation would read is the sample's first ``max_gen_toks`` tokens (the task's own limit) cut
  before the first of its ``until`` strings, exactly what the engine returns to the harness; it is scored
  by the harness's own per-document scorer (``harness._per_doc``: the task's filters, then its metric).
  Correct = the primary metric is 1.
* ``multiple_choice`` tasks (brackets): the evaluation compares the log-likelihoods of the choices right
  after the assistant's turn opens; a sampled answer is correct when, stripped, it is the gold choice
  (``Task.choices`` / ``Task.gold``), wrong when it is another choice or anything else.
* the style task ``identity`` (questions about the model itself, ``align.generators.IDENTITY``, asked in a
  phrasing and greeting drawn with a seed of its own): the rule scores 0-2, one point for **stating the
  topic's fact** (``IDENTITY_FACTS``, a word or phrase of the topic's list, case-insensitive: who / name / maker
  mention "lmforge" (who: or "language model" / "Shakespeare"); browse / now say it cannot; abilities name
  one of the tasks it was taught) and one for **ending cleanly** (the ``<|end|>`` within
  ``max_new_tokens``); correct = 2. Its prompts are not evaluation items (there is no split to leak).
* ``clean_pairs`` (on by default) adds a style rule to the verifiable tasks: a prompt whose answers are
  all correct still yields a pair when one answer is **clean** (it ended with ``<|end|>`` and holds
  nothing past what the evaluation reads) and another **rambles** (more text after the answer, or no end
  within the limit): the clean one is chosen (``meta.kind == "clean"``).

Pairing: answers are deduplicated by their text (the first sample of a text is kept); a prompt with at
least one correct and one incorrect distinct answer yields up to ``max_pairs_per_prompt`` pairs (default
1), drawn with ``random.Random(f"{seed}|{task}|{doc_id}")``: the chosen among the correct answers, clean
ones first, the rejected among the incorrect ones. Unpaired rows: every distinct scored answer, labelled
``label = correct``.

Rows are TRL's conversational formats (``{"prompt": [messages], "chosen": [assistant], "rejected":
[assistant]}`` and ``{"prompt", "completion", "label"}``) plus ``"id"`` and ``"meta"`` (task, split,
doc_id, content_key, scores, the evaluation's view of each answer, whether it ended).

Speed: every prompt's ``k`` samples of a task go into the engine at once (``running`` = 256 in flight; the
``k`` samples of a prompt share its cached prefix). Measured on the demo's 0.8M-parameter SFT model, one
thread on two shared cores (load 3.5-4): 400 prompts (50 of each of the 8 tasks) x k=8 in 15.9-18.5 s
(``running=64``: 36 s; 512: 20 s).

Never the private split: ``split`` must be ``"dev"`` (or ``"train"``); ``"test"``, ``"private"`` or any
task's test split is a ValueError before anything is sampled.
"""
from __future__ import annotations

import json
import random
import re
import time
import zlib
from pathlib import Path

__all__ = ["PAIR_TASKS", "STYLE_TASKS", "IDENTITY_FACTS", "make_pairs", "write_pairs", "score_answer",
           "pick_pairs", "eval_prompts", "identity_prompts", "yield_table", "add_pairs_parser"]

# the evaluation generators the SFT mixture trains (align.generators.EVAL_TASKS), then the style task
VERIFIABLE_TASKS = ("addition", "subtraction", "letter_count", "reverse", "sort", "sort_numbers", "brackets")
STYLE_TASKS = ("identity",)
PAIR_TASKS = VERIFIABLE_TASKS + STYLE_TASKS
ALLOWED_SPLITS = ("dev", "train")

# identity: what a good reply states, per topic of align.generators.IDENTITY (any one of the words, lowercased)
IDENTITY_FACTS = {
    "who": ("lmforge", "language model", "shakespeare"),
    "name": ("lmforge",),
    "maker": ("lmforge",),
    "browse": ("no", "cannot", "can't"),
    "now": ("cannot", "can't", "don't know", "do not know", "no clock", "no internet"),
    "abilities": ("sum", "sums", "arithmetic", "count", "counting", "letter", "letters", "sort", "sorting",
                  "bracket", "brackets", "backwards"),
}


# ---------------------------------------------------------------------------------------------- checks

def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name}={v!r}: expected an integer >= {lo}")
    return v


def _check_split(split) -> str:
    if split in ("test", "private"):
        raise ValueError(f"split={split!r}: preference pairs are made from the dev split only; the private test "
                         "split is what the evaluation reports and is never sampled here (use split='dev')")
    if split not in ALLOWED_SPLITS:
        raise ValueError(f"split={split!r}: expected 'dev' (the public split) or 'train'")
    return split


def _check_tasks(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks: empty; expected some of " + ", ".join(PAIR_TASKS))
    for t in tasks:
        if t not in PAIR_TASKS:
            import difflib

            m = difflib.get_close_matches(str(t), PAIR_TASKS, n=1, cutoff=0.5)
            near = f" (did you mean {m[0]!r}?)" if m else ""
            raise ValueError(f"tasks: unknown task {t!r}{near}; expected some of {', '.join(PAIR_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: {tasks} names a task twice")
    return tasks


# ---------------------------------------------------------------------------------------------- prompts

class _Prompt:
    """One question: its task, document, the messages the evaluation renders and the ids it sends."""
    __slots__ = ("task", "doc_id", "doc", "dr", "messages", "ids", "key", "topic")

    def __init__(self, task, doc_id, doc, dr, messages, ids, key=None, topic=None):
        self.task, self.doc_id, self.doc, self.dr = task, doc_id, doc, dr
        self.messages, self.ids, self.key, self.topic = messages, ids, key, topic


def _fresh_task(name: str, n: int):
    """The evaluation's task ``name`` loaded anew, its generator asked for ``n`` documents (as the harness's
    ``_cap_generators`` does), so the cached definition is never changed."""
    from ..evaluate import builtin
    from ..evaluate.task import load_task

    t = load_task(builtin.task_path(name))[0]
    gk = dict(t.config.get("generator_kwargs") or {})
    gk["n"] = n
    t.config = {**t.config, "generator_kwargs": gk}
    return t


def eval_prompts(lm, task_name: str, split: str, n: int, num_fewshot=0, data_dir=None) -> tuple[object, list]:
    """(task, [_Prompt]): the first ``n`` documents of ``split`` asked as ``lmforge eval --apply-chat-template``
    asks them (``Task.requests`` with ``chat=lm.apply_chat_template``; the messages it renders are kept; few-shot
    examples, with ``num_fewshot`` None or > 0, drawn from the task's default train pool as the evaluation
    draws them). A split with fewer than ``n`` items (reverse's dev split has 275) gives all it has."""
    from .generators import content_key

    _check_split(split)
    task = _fresh_task(task_name, n)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if k > 0:  # the examples drawn as the evaluation draws them: from its default pool, whatever n is here
        from ..evaluate import builtin
        from ..evaluate.task import load_task

        pool = load_task(builtin.task_path(task_name))[0]
        task.fewshot_samples = list(pool.docs(pool.fewshot_split, data_dir))
    if task.split_for(split) == task.test_split:
        raise ValueError(f"split={split!r} is task {task_name!r}'s test split: never sampled here")
    rendered: dict = {}  # the chat text -> the messages it renders (what the row's prompt is)

    def chat(msgs):
        text = lm.apply_chat_template(msgs)
        rendered[text] = [dict(m) for m in msgs]
        return text

    try:
        drs = task.requests(task.split_for(split), limit=n, num_fewshot=num_fewshot, data_dir=data_dir, chat=chat)
    except ValueError as e:
        m = re.search(r"ask for at most (\d+)", str(e))
        if m is None or int(m.group(1)) < 1:
            raise ValueError(f"task {task_name!r}: {n} documents of split {split!r}: {e}") from e
        return eval_prompts(lm, task_name, split, int(m.group(1)), num_fewshot, data_dir)  # all the split has
    gen = task.config["generator"]
    out = []
    for dr in drs:
        ctx = dr.requests[0].args[0]  # (multiple choice: every choice's request has the same context)
        out.append(_Prompt(task_name, dr.doc_id, dr.doc, dr, rendered[ctx], lm.tok_encode(ctx),
                           content_key(gen, dr.doc)))
    return task, out


def identity_prompts(lm, n: int, seed: int) -> list:
    """``n`` identity questions (``align.generators.identity``'s phrasings, drawn with a seed of their own)."""
    from .generators import identity

    convs = identity(n, seed=zlib.crc32(f"lmforge-pairs|identity|{seed}".encode()))
    out = []
    for i, c in enumerate(convs):
        msgs = [m for m in c["messages"] if m["role"] != "assistant"]
        ctx = lm.apply_chat_template(msgs)
        out.append(_Prompt("identity", i, {"topic": c["topic"], "question": msgs[-1]["content"]}, None, msgs,
                           lm.tok_encode(ctx), None, c["topic"]))
    return out


# ---------------------------------------------------------------------------------------------- scoring

def eval_view(task, text: str) -> str:
    """What the evaluation reads of an answer whose full text is ``text``: cut before the first ``until``
    string (the engine's stop strings) of the task's generation settings."""
    gk = task.generation_kwargs or {}
    cut = len(text)
    for s in gk.get("until") or []:
        if s:
            j = text.find(s)
            if 0 <= j < cut:
                cut = j
    return text[:cut]


def score_answer(task, prompt, text: str, *, ended: bool = True, view: str | None = None) -> tuple[float, str]:
    """(score, what the evaluation reads) of one answer ``text`` to ``prompt``. ``task`` is the evaluation
    task (or ``"identity"``); ``ended``: the answer closed with ``<|end|>`` within the limit; ``view``:
    the evaluation's reading when it differs from ``eval_view(task, text)`` (a sample longer than the task's
    ``max_gen_toks``). Correct means ``score == best_score(task)``."""
    if task == "identity":
        facts = IDENTITY_FACTS[prompt.topic]
        low = " " + " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower().replace("\u2019", "'")).split()) + " "
        stated = any(f" {f} " in low for f in facts)  # whole words (a phrase: its words in a row)
        return float(stated) + float(bool(ended)), text
    if task.output_type == "multiple_choice":
        ch = task.choices(prompt.doc)
        return float(text.strip() == str(ch[task.gold(prompt.doc)])), text.strip()
    from ..evaluate.harness import _per_doc  # the harness's own scorer: the task's filters, then its metric

    v = eval_view(task, text) if view is None else view
    vals, _ = _per_doc(task, prompt.dr, [v], None, {})
    return float(vals[task.primary_metric]), v


def best_score(task) -> float:
    return 2.0 if task == "identity" else 1.0


def pick_pairs(answers: list[dict], rng: random.Random, max_pairs: int = 1, clean_pairs: bool = True) -> list:
    """Up to ``max_pairs`` (chosen, rejected, kind) from one prompt's distinct scored answers (dicts with
    ``correct``, ``clean``): correct vs incorrect (kind "correct"; the chosen drawn among the clean
    correct answers first); with none incorrect and ``clean_pairs``, clean vs rambling correct answers
    (kind "clean"). Deterministic given ``rng``'s state."""
    good = [a for a in answers if a["correct"]]
    bad = [a for a in answers if not a["correct"]]
    if good and bad:
        kind, chosen_pool, rejected_pool = "correct", good, bad
    elif good and clean_pairs:
        kind = "clean"
        chosen_pool = [a for a in good if a["clean"]]
        rejected_pool = [a for a in good if not a["clean"]]
        if not chosen_pool or not rejected_pool:
            return []
    else:
        return []
    clean_first = sorted(chosen_pool, key=lambda a: not a["clean"])
    combos = [(c, r) for c in clean_first for r in rejected_pool]
    # the chosen: a clean one when there is one; the order within each cleanliness class, and the rejected, seeded
    n_clean = sum(1 for c in chosen_pool if c["clean"])
    head = [x for x in combos if x[0]["clean"]] if n_clean else combos
    tail = [x for x in combos if not x[0]["clean"]] if n_clean else []
    rng.shuffle(head)
    rng.shuffle(tail)
    return [(c, r, kind) for c, r in (head + tail)[:max_pairs]]


# ---------------------------------------------------------------------------------------------- sampling

def _sample(lm, prompts: list, k: int, params_for, seed: int) -> list[list[dict]]:
    """``k`` samples per prompt through the engine, all in flight together: for each prompt a list of
    ``{"text", "ids", "ended"}`` (``ids``: the sampled tokens without the closing stop token)."""
    import torch

    eng = lm.engine()
    stop = set(lm.tokens.stop)
    reqs = []
    try:
        for p in prompts:
            for j in range(k):
                s = zlib.crc32(f"{seed}|{p.task}|{p.doc_id}|{j}".encode())
                reqs.append(eng.requests[eng.add_request(list(p.ids), params_for(s))])
        with torch.inference_mode():
            eng.run()
    except BaseException:
        for q in reqs:
            eng.abort(q.id)
        raise
    out, i = [], 0
    for p in prompts:
        row = []
        for _ in range(k):
            q = reqs[i]
            i += 1
            if q.finish_reason == "error":
                raise RuntimeError(f"{p.task} document {p.doc_id}: the engine could not sample: {q.error}")
            ids = list(q.output)
            ended = bool(ids) and ids[-1] in stop and q.finish_reason == "stop"
            if ended:
                ids = ids[:-1]
            row.append({"text": q.text, "ids": ids, "ended": ended})
        out.append(row)
    return out


def _progress(progress, task, done, total, t0):
    if progress is None or progress is False:
        return
    if callable(progress):
        progress(task, done, total)
        return
    import sys

    print(f"pairs: {task}: {done}/{total} prompts sampled in {time.perf_counter() - t0:.1f}s", file=sys.stderr)


def make_pairs(model, tok, tokens, tasks=PAIR_TASKS, *, n: int = 200, k: int = 8, temperature: float = 1.0,
               top_k: int | None = None, max_new_tokens: int = 48, seed: int = 0, split: str = "dev",
               data_dir=None, progress=None, max_pairs_per_prompt: int = 1, num_fewshot: int | None = 0,
               clean_pairs: bool = True, running: int = 256) -> tuple[list[dict], list[dict], dict]:
    """Preference rows from the model's own answers to ``n`` prompts per task of ``tasks`` (``PAIR_TASKS``),
    ``k`` samples each (the module's docstring has the scoring and pairing rules). Returns
    ``(paired rows, unpaired rows, stats)``, stats per task ``{prompts, samples, distinct, correct,
    correct_share, pairs, clean_pairs, all_correct, all_wrong, empty (distinct empty replies, left out of
    the rows), too_long, seconds}``.

    ``num_fewshot``: 0 (the pipeline's zero-shot chat prompt) or None (the task's own few-shot prompt, as
    ``lmforge eval --apply-chat-template`` asks by default); ``running``: requests in flight in the engine.
    ``data_dir`` is passed to the tasks (the synthetic ones do not read it). Bad arguments: ValueError
    naming the argument; ``split`` other than dev / train is refused before anything is sampled."""
    from ..evaluate.local import LocalLM
    from ..infer.sampling import SamplingParams

    _check_split(split)
    tasks = _check_tasks(tasks)
    _check_int("n", n, 1)
    _check_int("k", k, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    _check_int("max_pairs_per_prompt", max_pairs_per_prompt, 1)
    _check_int("running", running, 1)
    if num_fewshot is not None:
        _check_int("num_fewshot", num_fewshot, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= 10:
        raise ValueError(f"temperature={temperature!r}: expected a number in (0, 10] (sampling; 0 would give k "
                         "identical greedy answers)")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: expected an integer")
    was_training = model.training
    lm = LocalLM(model, tok, tokens=tokens, batch_size=running)
    L = model.cfg.max_seq_len
    if max_new_tokens >= L:
        raise ValueError(f"max_new_tokens={max_new_tokens}: the model's context is {L} tokens")

    def params_for(s):
        return SamplingParams(max_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k or 0,
                              seed=s, stop_token_ids=list(tokens.stop))

    paired, unpaired, stats = [], [], {}
    try:
        for name in tasks:
            t0 = time.perf_counter()
            if name == "identity":
                task, prompts = "identity", identity_prompts(lm, n, seed)
            else:
                task, prompts = eval_prompts(lm, name, split, n, num_fewshot=num_fewshot, data_dir=data_dir)
            fits = [p for p in prompts if len(p.ids) + max_new_tokens <= L]
            st = {"prompts": len(fits), "samples": 0, "distinct": 0, "correct": 0, "correct_share": 0.0, "pairs": 0,
                  "clean_pairs": 0, "all_correct": 0, "all_wrong": 0, "empty": 0,
                  "too_long": len(prompts) - len(fits)}
            samples = _sample(lm, fits, k, params_for, seed)
            _progress(progress, name, len(fits), len(prompts), t0)
            max_gen = None if task == "identity" or task.output_type == "multiple_choice" else \
                int((task.generation_kwargs or {}).get("max_gen_toks") or 256)
            for p, row in zip(fits, samples):
                answers, by_text = [], {}
                for j, smp in enumerate(row):
                    st["samples"] += 1
                    view = None
                    if max_gen is not None and len(smp["ids"]) > max_gen:  # the evaluation stops at its own limit
                        view = eval_view(task, tok.decode(smp["ids"][:max_gen]))
                    score, seen = score_answer(task, p, smp["text"], ended=smp["ended"], view=view)
                    correct = score >= best_score(task)
                    st["correct"] += int(correct)
                    if smp["text"] in by_text:
                        continue
                    if not smp["text"].strip():  # an empty reply (the model ended at once): no preference row
                        st["empty"] += 1  # can hold it (pref_data refuses empty completions); scored, counted
                        by_text[smp["text"]] = None
                        continue
                    full = smp["text"] if task == "identity" or task.output_type == "multiple_choice" else seen
                    a = {"text": smp["text"], "score": score, "correct": correct, "view": seen,
                         "ended": smp["ended"], "clean": smp["ended"] and smp["text"].strip() == str(full).strip(),
                         "sample": j, "tokens": len(smp["ids"])}
                    by_text[smp["text"]] = a
                    answers.append(a)
                st["distinct"] += len(answers)
                n_good = sum(a["correct"] for a in answers)
                if answers and n_good == len(answers):
                    st["all_correct"] += 1
                elif n_good == 0:
                    st["all_wrong"] += 1
                base = {"task": name, "split": split, "doc_id": p.doc_id}
                if p.key is not None:
                    base["content_key"] = p.key
                if p.topic is not None:
                    base["topic"] = p.topic
                rng = random.Random(f"{seed}|{name}|{p.doc_id}")
                for c, r, kind in pick_pairs(answers, rng, max_pairs_per_prompt, clean_pairs):
                    st["pairs"] += 1
                    st["clean_pairs"] += int(kind == "clean")
                    paired.append({
                        "id": f"{name}:{split}:{p.doc_id}:{c['sample']}-{r['sample']}",
                        "prompt": [dict(m) for m in p.messages],
                        "chosen": [{"role": "assistant", "content": c["text"]}],
                        "rejected": [{"role": "assistant", "content": r["text"]}],
                        "meta": {**base, "kind": kind, "chosen_score": c["score"], "rejected_score": r["score"],
                                 "chosen_view": c["view"], "rejected_view": r["view"],
                                 "chosen_ended": c["ended"], "rejected_ended": r["ended"]}})
                for a in answers:
                    unpaired.append({
                        "id": f"{name}:{split}:{p.doc_id}:{a['sample']}",
                        "prompt": [dict(m) for m in p.messages],
                        "completion": [{"role": "assistant", "content": a["text"]}],
                        "label": bool(a["correct"]),
                        "meta": {**base, "score": a["score"], "view": a["view"], "ended": a["ended"],
                                 "clean": a["clean"]}})
            st["correct_share"] = round(st["correct"] / st["samples"], 4) if st["samples"] else 0.0
            st["seconds"] = round(time.perf_counter() - t0, 3)
            stats[name] = st
    finally:
        model.train(was_training)
    return paired, unpaired, stats


def yield_table(stats: dict) -> str:
    """The per-task yield as a plain text table (what the CLI prints)."""
    cols = ("prompts", "samples", "correct_share", "pairs", "clean_pairs", "all_correct", "all_wrong", "empty",
            "seconds")
    lines = ["task          " + " ".join(f"{c:>13}" for c in cols)]
    for name, st in stats.items():
        lines.append(f"{name:<14}" + " ".join(f"{st.get(c, ''):>13}" for c in cols))
    return "\n".join(lines)


def write_pairs(rows, path) -> Path:
    """``rows`` as JSONL at ``path``, atomically (a temporary name, then a rename): one JSON object a line."""
    from .._io import atomic_open

    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as f:
        for i, r in enumerate(rows):
            if not isinstance(r, dict):
                raise ValueError(f"{path}: row {i}: expected a dict, got {type(r).__name__}")
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- CLI

def cmd_pairs(a) -> int:
    import torch

    from .._config import UsageError
    from ..infer.llm import load_with_tokenizer

    try:
        tasks = _check_tasks(a.tasks)
        _check_split(a.split)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, tokens = load_with_tokenizer(a.model)
    try:
        paired, unpaired, stats = make_pairs(
            model, tok, tokens, tasks, n=a.n, k=a.k, temperature=a.temperature, top_k=a.top_k,
            max_new_tokens=a.max_new_tokens, seed=a.seed, split=a.split, data_dir=a.data_dir,
            progress=None if a.quiet else True, max_pairs_per_prompt=a.max_pairs_per_prompt,
            num_fewshot=None if a.num_fewshot < 0 else a.num_fewshot, clean_pairs=not a.no_clean_pairs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out = write_pairs(paired, a.out)
    written = {"pairs": str(out), "n_pairs": len(paired)}
    if a.unpaired_out:
        written["unpaired"] = str(write_pairs(unpaired, a.unpaired_out))
        written["n_unpaired"] = len(unpaired)
    if not a.quiet:
        import sys

        print(yield_table(stats), file=sys.stderr)
    print(json.dumps({**written, "stats": stats}))
    return 0


def add_pairs_parser(sub) -> None:
    """``pairs``: a subcommand of the parsers in ``sub`` (``lmforge dpo pairs``)."""
    p = sub.add_parser(
        "pairs", help="on-policy preference pairs: sample k answers per dev prompt, score them by the task's checker",
        description="Sample --k answers per prompt from the model (an SFT model directory) for --n dev-split prompts "
        "of each task, asked exactly as `lmforge eval --apply-chat-template` asks them, score every answer with "
        "the task's own checker, and write a correct answer paired with an incorrect one (TRL's conversational "
        "prompt/chosen/rejected) for each prompt that has both. The private test split is never used. Prints "
        "the per-task yield and a JSON line.")
    p.add_argument("--model", "-m", required=True, help="the model to sample (an lmforge or HF model directory)")
    p.add_argument("--tasks", "-t", default=",".join(PAIR_TASKS), help=f"comma-separated (default all: "
                   f"{','.join(PAIR_TASKS)})")
    p.add_argument("--n", type=int, default=200, help="prompts per task (default 200)")
    p.add_argument("--k", type=int, default=8, help="samples per prompt (default 8)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-pairs-per-prompt", type=int, default=1)
    p.add_argument("--num-fewshot", type=int, default=0, help="0 (default): the pipeline's zero-shot chat "
                   "prompt; -1: the task's own few-shot prompt (lmforge eval's default)")
    p.add_argument("--no-clean-pairs", action="store_true",
                   help="no clean-vs-rambling pairs from prompts whose answers are all correct")
    p.add_argument("--split", default="dev", help="dev (default) or train; test/private are refused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="a `lmforge data prepare` directory (corpus tasks only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", "-o", required=True, metavar="FILE.jsonl", help="the paired rows")
    p.add_argument("--unpaired-out", default=None, metavar="FILE.jsonl", help="also the unpaired rows (KTO)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(fn=cmd_pairs)
