"""Conversations in, checked: JSONL files and generated sets, mixed by weight and cap, split by conversation.

Knows the formats conversations come in (the ones TRL and HF ``datasets`` use), the rules a
conversation must keep to be trained on, how several sources make one mixture and how a validation
split is drawn; knows nothing of tokens, masks or models (``align.packing`` renders what comes out of
here with ``tokenize.chat.render``) nor of how instruction data is made (``align.generators``).

Formats (one JSON object a line; blank lines are skipped; any other key is ignored):

* ``{"messages": [{"role": ..., "content": ...}, ...]}``: TRL's *conversational language modeling*;
* ``{"prompt": str, "completion": str}``: *standard prompt-completion*, read as a user turn and an
  assistant turn;
* ``{"prompt": [messages], "completion": [messages]}``: *conversational prompt-completion*: the
  prompt's messages then the completion's (the completion holds only assistant turns);
* an optional ``"system": str`` with any of them: a system message put first.

The rules (``check_messages``): roles ``system``, ``user``, ``assistant`` (``developer`` is read as
``system``, OpenAI's newer name); at most one system message and only first; ``content`` a string;
no assistant turn empty or only whitespace; at least one assistant turn (an SFT example without
one trains nothing). A message's other keys (``name``...) are dropped. Every error names the file,
the line and the field (``data.jsonl:7: messages[2].role: unknown role 'tool'; ...``).

``on_error="skip"`` counts bad lines instead of raising: the stats give how many were skipped and why
(``reasons``: ``bad_json``, ``not_an_object``, ``no_messages``, ``bad_message``, ``unknown_role``,
``system_not_first``, ``content_not_string``, ``empty_assistant``, ``no_assistant``, ``bad_format``,
``bad_text``) and the first few messages (``errors``).

Mixtures (``load_sources``): each source is ``{"path": FILE}`` or ``{"generator": NAME, "n": N, **kwargs}``
(``align.generators.GENERATORS``), with optional ``"cap"`` and ``"weight"``. How sizes are decided:

1. a source's conversations are read (or generated), then shuffled by a stream of the seed and the
   source's position; ``cap`` keeps the first ``cap`` of them: that is the source's *available* count;
2. no source has a ``weight``: every available conversation is used;
3. otherwise every source must have one (a number >= 0; 0 leaves the source out). The share of source
   ``i`` is ``p_i = w_i / sum(w)``; the mixture's size is ``M = min_i floor(available_i / p_i)`` over the
   sources with ``w_i > 0`` (the largest mixture with those shares in which no conversation repeats:
   the scarcest source, for its weight, decides), and source ``i`` gives ``floor(M * p_i)`` conversations,
   the ``M - sum`` left over going one each to the largest remainders (never past a source's available
   count). Weights never repeat a conversation: to give a small file more weight, cap the others.

The mixture is then shuffled by the seed. A generator source named by ``align.generators`` as needing a
corpus (``speaker``, ``quote``, ``play``) reads ``data_dir``; with ``"optional": true`` it is left out
(its stats say why) when ``data_dir`` is None instead of raising.

``split_validation``: a conversation goes to validation when a hash of its messages (salted by the seed)
falls below ``val_frac``, so a conversation (and any copy of it) is in one split only, and its split does
not change as the data grows or is reordered.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}
ON_ERROR = ("raise", "skip")
MAX_ERRORS_KEPT = 5


class ConversationError(ValueError):
    """A conversation that breaks a rule; ``reason`` is the short name its skip is counted under."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _check_one(m, label: str, where: str) -> dict:
    if not isinstance(m, dict):
        raise ConversationError(f"{where}: {label}: expected an object with 'role' and 'content', got "
                                f"{type(m).__name__}", "bad_message")
    for key in ("role", "content"):
        if key not in m:
            raise ConversationError(f"{where}: {label}: missing '{key}' (a message is "
                                    "{\"role\": ..., \"content\": ...})", "bad_message")
    role = m["role"]
    if not isinstance(role, str) or ROLE_ALIASES.get(role, role) not in ROLES:
        raise ConversationError(f"{where}: {label}.role: unknown role {role!r}; expected system, user or "
                                "assistant (developer is read as system)", "unknown_role")
    content = m["content"]
    if not isinstance(content, str):
        raise ConversationError(f"{where}: {label}.content: must be a string, got {type(content).__name__}",
                                "content_not_string")
    return {"role": ROLE_ALIASES.get(role, role), "content": content}


def check_messages(messages, where: str, labels: list[str] | None = None) -> list[dict]:
    """The conversation's messages, checked and normalized to ``[{"role", "content"}]`` (``developer`` ->
    ``system``). ``where`` starts every error (``file:line``); ``labels`` names each message's field
    (default ``messages[k]``). Raises ``ConversationError`` (a ``ValueError``) with its ``reason``."""
    if not isinstance(messages, list):
        raise ConversationError(f"{where}: messages: expected a list of messages, got {type(messages).__name__}",
                                "no_messages")
    if not messages:
        raise ConversationError(f"{where}: messages: empty (expected at least one assistant turn)", "no_assistant")
    labels = labels or [f"messages[{k}]" for k in range(len(messages))]
    out = [_check_one(m, labels[k], where) for k, m in enumerate(messages)]
    for k, m in enumerate(out):
        if m["role"] == "system" and k != 0:
            first = next(j for j, x in enumerate(out) if x["role"] == "system")
            what = "a second system message" if first < k else "a system message after the first message"
            raise ConversationError(f"{where}: {labels[k]}.role: {what}; at most one system message, and only "
                                    "first", "system_not_first")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ConversationError(f"{where}: {labels[k]}.content: empty assistant turn (nothing to learn; "
                                    "drop the turn or the conversation)", "empty_assistant")
    if not any(m["role"] == "assistant" for m in out):
        raise ConversationError(f"{where}: messages: no assistant turn (an SFT example needs at least one; "
                                f"roles: {', '.join(m['role'] for m in out)})", "no_assistant")
    return out


def conversation_messages(record, where: str) -> list[dict]:
    """The checked messages of one JSONL record in any of the module docstring's formats."""
    if not isinstance(record, dict):
        raise ConversationError(f"{where}: expected a JSON object, got {type(record).__name__}", "not_an_object")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise ConversationError(f"{where}: system: must be a string, got {type(system).__name__}",
                                "content_not_string")
    head = [{"role": "system", "content": system}] if system is not None else []
    head_labels = ["system"] if head else []
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise ConversationError(f"{where}: messages: given with prompt/completion; a record is one or the other",
                                "bad_format")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list):
            raise ConversationError(f"{where}: messages: expected a list of messages, got {type(msgs).__name__}",
                                    "no_messages")
        return check_messages(head + msgs, where, head_labels + [f"messages[{k}]" for k in range(len(msgs))])
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise ConversationError(f"{where}: {key}: missing (a prompt-completion record has both)",
                                        "no_messages")
        p, c = record["prompt"], record["completion"]
        if isinstance(p, str) and isinstance(c, str):
            return check_messages(head + [{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                  where, head_labels + ["prompt", "completion"])
        if isinstance(p, list) and isinstance(c, list):
            labels = [f"prompt[{k}]" for k in range(len(p))] + [f"completion[{k}]" for k in range(len(c))]
            for k, m in enumerate(c):
                if isinstance(m, dict) and ROLE_ALIASES.get(m.get("role"), m.get("role")) != "assistant":
                    raise ConversationError(f"{where}: completion[{k}].role: {m.get('role')!r}; a completion holds "
                                            "assistant turns only", "bad_format")
            if not c:
                raise ConversationError(f"{where}: completion: empty list (expected the assistant's turn)",
                                        "no_assistant")
            return check_messages(head + p + c, where, head_labels + labels)
        raise ConversationError(f"{where}: prompt/completion: expected two strings or two lists of messages, got "
                                f"{type(p).__name__} and {type(c).__name__}", "bad_format")
    keys = ", ".join(sorted(map(str, record))) or "none"
    raise ConversationError(f"{where}: messages: missing; expected \"messages\" (a list of "
                            f"{{role, content}}) or \"prompt\" and \"completion\" (keys here: {keys})", "no_messages")


def _new_stats() -> dict:
    return {"read": 0, "used": 0, "skipped": 0, "reasons": {}, "errors": []}


def _skip(stats: dict, e: ConversationError) -> None:
    stats["skipped"] += 1
    stats["reasons"][e.reason] = stats["reasons"].get(e.reason, 0) + 1
    if len(stats["errors"]) < MAX_ERRORS_KEPT:
        stats["errors"].append(str(e))


def read_conversations(path, *, on_error: str = "raise", stats: dict | None = None) -> list[dict]:
    """The conversations of a JSONL file: ``[{"messages", "source": file name, "id": "<file>:<line>"}]`` in
    file order. ``on_error="skip"``: bad lines are counted into ``stats`` (filled in when given:
    ``read``, ``used``, ``skipped``, ``reasons``, ``errors``) instead of raising."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: conversation file not found" + (" (it is a directory)" if p.is_dir() else ""))
    st = stats if stats is not None else {}
    for k, v in _new_stats().items():
        st.setdefault(k, v)
    out = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            try:
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ConversationError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})",
                                            "bad_text") from None
                if not line.strip():
                    continue
                st["read"] += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversationError(f"{where}: bad JSON ({e.msg} at column {e.colno})", "bad_json") from None
                msgs = conversation_messages(record, where)
            except ConversationError as e:
                if on_error == "raise":
                    raise
                _skip(st, e)
                continue
            out.append({"messages": msgs, "source": p.name, "id": f"{p.name}:{lineno}"})
            st["used"] += 1
    return out


# ---- mixtures ----------------------------------------------------------------------------------------

def _source_name(src: dict, k: int) -> str:
    return str(src["path"]) if "path" in src else f"gen:{src['generator']}"


def _check_source(src, k: int) -> dict:
    where = f"sources[{k}]"
    if not isinstance(src, dict):
        raise ValueError(f"{where}: expected {{\"path\": FILE}} or {{\"generator\": NAME, \"n\": N}}, got {src!r}")
    if ("path" in src) == ("generator" in src):
        raise ValueError(f"{where}: give exactly one of \"path\" (a JSONL file) or \"generator\" (a name in "
                         f"lmforge.align.generators.GENERATORS); got keys {sorted(src)}")
    if "weight" in src:
        w = src["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"{where}: weight={w!r}: expected a number >= 0")
    if "cap" in src:
        c = src["cap"]
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{where}: cap={c!r}: expected an integer >= 0")
    if "generator" in src:
        n = src.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{where} (generator {src['generator']!r}): n={n!r}: expected an integer >= 0")
    else:
        extra = sorted(set(src) - {"path", "weight", "cap", "on_error"})
        if extra:
            raise ValueError(f"{where} ({src['path']}): unknown key(s) {extra}; a file source takes path, weight, "
                             "cap, on_error")
    return src


def mixture_sizes(available: list[int], weights: list[float] | None) -> list[int]:
    """How many conversations each source gives (the module docstring's rule 2 or 3)."""
    if weights is None:
        return list(available)
    total = float(sum(weights))
    live = [i for i, w in enumerate(weights) if w > 0]
    if not live or total <= 0:
        return [0] * len(available)
    shares = [w / total for w in weights]
    m = min(math.floor(available[i] / shares[i] + 1e-9) for i in live)
    exact = [m * s for s in shares]
    sizes = [min(available[i], math.floor(exact[i] + 1e-9)) for i in range(len(weights))]
    left = m - sum(sizes)
    order = sorted(live, key=lambda i: (-(exact[i] - sizes[i]), i))
    for i in order:
        if left <= 0:
            break
        if sizes[i] < available[i]:
            sizes[i] += 1
            left -= 1
    return sizes


def load_sources(sources: list[dict], *, seed: int, data_dir=None, on_error: str = "raise") -> tuple[list[dict], dict]:
    """A mixture of conversation sources (module docstring: formats, rules, how sizes are decided).
    Returns the mixed conversations (seeded order) and ``{source: stats}`` (``source``: the path or
    ``gen:<name>``, ``#2``... appended when a name repeats; ``stats``: ``read`` conversations (non-blank
    lines, or generated), ``skipped`` with their ``reasons`` and first ``errors``, ``available`` after the
    cap, ``used`` in the mixture, and a ``note`` for an optional source left out). ``on_error``
    applies to files (a source may set its own); generated conversations are always checked and a
    bad one is an error (a generator's bug)."""
    from . import generators as G

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ValueError("sources: expected a non-empty list of {\"path\": FILE} or {\"generator\": NAME, \"n\": N}")
    sources = [_check_source(s, k) for k, s in enumerate(sources)]
    weighted = ["weight" in s for s in sources]
    if any(weighted) and not all(weighted):
        missing = [k for k, w in enumerate(weighted) if not w]
        raise ValueError(f"sources{missing}: no weight while other sources have one; give every source a weight "
                         "(shares of the mixture) or none (every conversation used)")
    stats: dict[str, dict] = {}
    pools: list[list[dict]] = []
    names = []
    for k, src in enumerate(sources):
        name = _source_name(src, k)
        if name in stats:
            j = 2
            while f"{name}#{j}" in stats:
                j += 1
            name = f"{name}#{j}"
        names.append(name)
        st = _new_stats()
        stats[name] = st
        if "path" in src:
            convs = read_conversations(src["path"], on_error=src.get("on_error", on_error), stats=st)
        else:
            gname = src["generator"]
            if gname not in G.GENERATORS:
                raise ValueError(f"sources[{k}]: unknown generator {gname!r}; known: {', '.join(G.GENERATORS)}")
            kwargs = {key: v for key, v in src.items() if key not in ("generator", "n", "weight", "cap", "optional")}
            if gname in G.NEEDS_DATA and data_dir is None and src.get("optional"):
                st["note"] = "left out: this generator reads a corpus and no data_dir was given"
                pools.append([])
                st["available"] = 0
                continue
            try:
                convs = G.GENERATORS[gname](src["n"], seed, data_dir=data_dir, **kwargs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"sources[{k}] (generator {gname!r}): {e}") from None
            st["read"] = len(convs)
            for c in convs:
                c["messages"] = check_messages(c["messages"], f"sources[{k}] (generator {gname!r}) {c.get('id')}")
            st["used"] = len(convs)
        r = random.Random(f"lmforge-sft-source|{seed}|{k}|{name}")
        convs = list(convs)
        r.shuffle(convs)
        if "cap" in src:
            convs = convs[:src["cap"]]
        st["available"] = len(convs)
        pools.append(convs)
    sizes = mixture_sizes([len(p) for p in pools], [float(s["weight"]) for s in sources] if all(weighted) else None)
    out = []
    for name, pool, size in zip(names, pools, sizes):
        stats[name]["used"] = size
        out.extend(pool[:size])
    random.Random(f"lmforge-sft-mixture|{seed}").shuffle(out)
    return out, stats


# ---- validation split ----------------------------------------------------------------------------------

def conversation_hash(messages, seed: int = 0) -> float:
    """A number in [0, 1) from the conversation's messages (roles and contents) and the seed."""
    text = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    h = hashlib.sha256(f"lmforge-sft-split|{seed}|{text}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def split_validation(convs, val_frac: float, seed: int) -> tuple[list, list]:
    """``(train, val)``: a conversation is in ``val`` when its hash (``conversation_hash``) is below
    ``val_frac``; order kept; copies of one conversation land together. With ``val_frac > 0`` and at
    least two distinct conversations, ``val`` holds at least the one of lowest hash and ``train`` at
    least one."""
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0 <= val_frac < 1:
        raise ValueError(f"val_frac={val_frac!r}: expected a number in [0, 1)")
    hs = [conversation_hash(c["messages"], seed) for c in convs]
    cut = float(val_frac)
    distinct = sorted(set(hs))
    if val_frac > 0 and len(distinct) >= 2:
        if distinct[0] >= cut:  # too few for the fraction to pick any: the lowest one
            cut = math.nextafter(distinct[0], 1.0)
        if distinct[-1] < cut:  # every one picked: keep the highest for training
            cut = distinct[-1]
    train = [c for c, h in zip(convs, hs) if h >= cut]
    val = [c for c, h in zip(convs, hs) if h < cut]
    return train, val
