"""Preference data: TRL's preference files in, checked; pairs to tokens; tokens to batches; sequence log-probs.

Knows TRL's preference formats (1.16: ``trl/data_utils.py``'s ``is_conversational`` / ``extract_prompt``
and what ``DPOTrainer`` / ``KTOTrainer`` tokenize), the rules a pair must keep, how a validation split is
drawn by prompt, how TRL turns a row into prompt and completion ids, the two row layouts of a micro-batch
(padded as TRL's collator, or packed) with KTO's mismatched KL rows, and the summed completion
log-probabilities of one forward. Knows nothing of losses (``align.pref_loss``), reference models, the
optimizer or the loop (``align.dpo`` hands the loop these batches): it never decides what a log-prob
is used for.

Formats (one JSON object a line; blank lines skipped):

* paired, explicit prompt: ``{"prompt", "chosen", "rejected"}``, all strings (*plain*) or all message
  lists (*conversational*: the prompt ends with a user turn; chosen and rejected are one assistant
  message each, ``[{"role": "assistant", "content": ...}]``);
* paired, implicit prompt: ``{"chosen", "rejected"}`` holding whole texts or whole conversations; the
  prompt is their common start (TRL's ``extract_prompt``: the longest common prefix of characters,
  a space before the split going to the completions; of messages for conversations). A string
  ``"prompt"`` next to conversational chosen/rejected is read as TRL's ``maybe_extract_prompt`` reads it:
  the prompt comes from the conversations (the string is kept as ``meta["prompt_text"]``);
* unpaired (KTO): ``{"prompt", "completion", "label": true|false}``, plain or conversational.

Rows come back normalized: ``{"id": "<file>:<line>", "kind": "paired"|"unpaired", "conversational",
"prompt", "chosen", "rejected"}`` (or ``"completion"``, ``"label"``) and ``"meta"``: the record's own
``"meta"`` object updated with every other key (``ref_chosen_logps`` / ``ref_rejected_logps`` / ``ref_logps``
there are read by ``encode_preferences`` as precomputed reference log-probs). Messages are checked by
``align.data.check_messages`` (roles, string contents, one system message first; ``developer`` read as
``system``). A bad line is ``ValueError("FILE:LINE: FIELD: problem")``; ``on_error="skip"`` counts it
under its reason instead (``bad_json``, ``bad_text``, ``not_an_object``, ``bad_format``, ``missing_field``,
``bad_type``, ``mixed_format``, ``bad_prompt``, ``bad_completion``, ``empty_completion``, ``bad_label``
and ``align.data``'s message reasons ``bad_message``, ``unknown_role``, ``system_not_first``,
``content_not_string``).

Tokens (``encode_preferences``), as TRL 1.16's ``_prepare_dataset``: conversational rows through
``chat.render``: prompt ids = ``render(prompt, add_generation_prompt=True)``, completion = the rest of
``render(prompt + completion)`` (its assistant text and closing ``<|end|>``); render encodes each message
alone, so the prompt is always a prefix (checked: were it not, as with a foreign template, the prompt
is cut where the two diverge, TRL's ``common_prefix_length`` rule, and ``prompt_not_prefix`` counts it).
Plain rows: ``BOS`` (when the spec adds one, as the HF export's post-processor does) + the prompt's text,
and the completion is what ``prompt + completion`` tokenizes to after the common prefix, plus the stop
token (TRL appends ``eos_token`` to plain completions). A pair longer than ``max_len`` keeps its start
(TRL's ``truncation_mode="keep_start"``, per sequence); a prompt of ``max_len`` tokens or more (or more
than ``max_prompt_len``) is dropped, as TRL drops it; a pair whose chosen and rejected ids are equal
(before or after the cut) and a completion with no token are dropped; all counted.

Batches (``PrefBatches``): a micro-batch of B pairs is 2B sequences, the B chosen then the B rejected.
``"padded"``: one sequence a row, right padding (TRL's collator; every row starts at position 0, so
plain causal attention is exact and the model is called without masks). ``"packed"``: the 2B sequences
best-fit into rows (``align.packing.pack_bfd``) of at most ``seq_len`` tokens, ``doc_ids`` keeping
attention inside a sequence and ``position_ids`` restarting (no padding compute but the rows' tails).
Unpaired: B rows, and with ``kl=True`` B more: prompt i with the completion of batch item (i-1) mod B
(TRL's KTO: completions rotated by one within the batch, ``[y_B, y_1, ..., y_{B-1}]``), cut to
``seq_len``. (TRL's rotation gives prompt i the completion of item i-1; the KL estimate is a batch mean,
so the direction changes no loss, and this one makes the rows equal TRL's ``KL_completion_ids``.) A
sequence's first token has no prediction, so a completion starting at position 0 (a plain row with an
empty prompt and no BOS) is scored from its second token, as TRL does.

Log-probs (``completion_logps``): an lmforge model computes its head only at the scored positions
(``hidden_states`` then ``compute_logits`` on the gathered rows), log-softmax in fp32; any other callable
gives full logits and they are gathered. A MoE's router losses are not part of what it returns (the
caller owns the loss). Measured (the demo's SFT model, 4 x 96, V 2048, one thread, 64 addition pairs
of 57 tokens a pair on average, B 8, forward + backward of the summed log-probs): padded 23.6 pairs/s,
packed (rows of 256) 28.1 pairs/s; the two agree to 2e-7 relative (fp32 sums of about -100).
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import ROLE_ALIASES, ConversationError, check_messages

ON_ERROR = ("raise", "skip")
TRUNCATION = ("keep_start", "skip")
MODES = ("padded", "packed")
MAX_ERRORS_KEPT = 5
_KNOWN = ("prompt", "chosen", "rejected", "completion", "label", "meta")

try:  # the shared loop's batch type
    from lmforge.train.loop import Batch
except ImportError:  # pragma: no cover
    @dataclass
    class Batch:
        inputs: dict
        n: int
        tokens: int
        trained: int = 0


class PreferenceError(ConversationError):
    """A preference record that breaks a rule; ``reason`` is the short name its skip is counted under."""


# ---- reading ------------------------------------------------------------------------------------------

def _kind(v, where: str, field: str) -> str:
    """'str' or 'conv' for a field's value; anything else is an error."""
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        if v and all(isinstance(m, dict) for m in v):
            return "conv"
        if not v:
            return "empty"
    raise PreferenceError(f"{where}: {field}: expected a string or a list of messages ({{role, content}}), got "
                          f"{_show(v)}", "bad_type")


def _show(v) -> str:
    s = json.dumps(v, ensure_ascii=False) if not isinstance(v, (bytes,)) else repr(v)
    return f"{type(v).__name__} {s[:60]}{'...' if len(s) > 60 else ''}"


def _completion(msgs: list, where: str, field: str) -> list[dict]:
    """A conversational completion: one assistant message with text."""
    if len(msgs) != 1:
        roles = ", ".join(str(m.get("role")) if isinstance(m, dict) else "?" for m in msgs) or "none"
        raise PreferenceError(f"{where}: {field}: expected one assistant message, got {len(msgs)} messages "
                              f"(roles: {roles})", "bad_completion")
    m = msgs[0]
    role = m.get("role")
    if ROLE_ALIASES.get(role, role) != "assistant":
        raise PreferenceError(f"{where}: {field}[0].role: {role!r}; a completion is the assistant's message",
                              "bad_completion")
    if isinstance(m.get("content"), str) and not m["content"].strip():
        raise PreferenceError(f"{where}: {field}[0].content: empty completion (nothing to prefer)",
                              "empty_completion")
    return msgs


def _conversation(prompt: list, completions: dict[str, list], where: str) -> tuple[list, dict]:
    """Check a conversational prompt and its completions with align.data's rules; normalized copies."""
    if not prompt:
        raise PreferenceError(f"{where}: prompt: empty (expected messages ending with a user turn)", "bad_prompt")
    for f, c in completions.items():
        _completion(c, where, f)
    labels = [f"prompt[{k}]" for k in range(len(prompt))]
    out = {}
    p = None
    for f, c in completions.items():
        try:
            msgs = check_messages(list(prompt) + list(c), where, labels + [f"{f}[0]"])
        except PreferenceError:
            raise
        except ConversationError as e:
            raise PreferenceError(str(e), e.reason) from None
        p, out[f] = msgs[:-1], [msgs[-1]]
    if p[-1]["role"] != "user":
        raise PreferenceError(f"{where}: prompt[{len(p) - 1}].role: the prompt ends with a {p[-1]['role']!r} "
                              "message; expected a user turn (the completion answers it)", "bad_prompt")
    return p, out


def _extract_text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's ``extract_prompt`` for strings: split where chosen and rejected first differ, a space just
    before the split going to the completions. When one is a prefix of the other TRL's loop ends
    without a split and cuts at min(len) - 1; so here too."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:
        idx = max(n - 1, 0)
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _msg_key(m) -> tuple:
    return (ROLE_ALIASES.get(m.get("role"), m.get("role")), m.get("content")) if isinstance(m, dict) else (id(m),)


def _extract_conv_prompt(chosen: list, rejected: list, where: str) -> tuple[list, list, list]:
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if _msg_key(chosen[i]) != _msg_key(rejected[i])), None)
    if idx is None:
        raise PreferenceError(f"{where}: chosen/rejected: one conversation is the start of the other; an implicit "
                              "prompt needs them to differ in their last (assistant) message", "bad_completion")
    if idx == 0:
        raise PreferenceError(f"{where}: chosen/rejected: no common first message, so no implicit prompt; give "
                              "\"prompt\" or conversations that share it", "bad_prompt")
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _meta(record: dict) -> dict:
    meta = dict(record["meta"]) if isinstance(record.get("meta"), dict) else {}
    if "meta" in record and not isinstance(record["meta"], dict):
        meta["meta"] = record["meta"]
    meta.update({k: v for k, v in record.items() if k not in _KNOWN})
    return meta


def normalize_preference(record, where: str, rid: str | None = None) -> dict:
    """One record in any of the module docstring's formats, checked and normalized (raises
    ``PreferenceError``, a ``ValueError`` with its ``reason``)."""
    if not isinstance(record, dict):
        raise PreferenceError(f"{where}: expected a JSON object, got {type(record).__name__}", "not_an_object")
    rid = rid if rid is not None else where
    paired = "chosen" in record or "rejected" in record
    unpaired = "completion" in record or "label" in record
    if paired and unpaired:
        raise PreferenceError(f"{where}: keys: both chosen/rejected (paired) and completion/label (unpaired); a "
                              f"record is one or the other (keys here: {', '.join(sorted(record))})", "bad_format")
    if not paired and not unpaired:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise PreferenceError(f"{where}: chosen: missing; expected \"prompt\", \"chosen\", \"rejected\" (paired) or "
                              f"\"prompt\", \"completion\", \"label\" (unpaired) (keys here: {keys})", "missing_field")
    meta = _meta(record)
    if unpaired:
        for f in ("prompt", "completion", "label"):
            if f not in record:
                raise PreferenceError(f"{where}: {f}: missing (an unpaired record has prompt, completion and label)",
                                      "missing_field")
        label = record["label"]
        if not isinstance(label, bool):
            raise PreferenceError(f"{where}: label: expected true or false, got {_show(label)}", "bad_label")
        kp, kc = _kind(record["prompt"], where, "prompt"), _kind(record["completion"], where, "completion")
        if kc == "empty" or (kc == "str" and not record["completion"].strip()):
            raise PreferenceError(f"{where}: completion: empty completion (nothing to learn)", "empty_completion")
        if kp == "str" and kc == "str":
            return {"id": rid, "kind": "unpaired", "conversational": False, "prompt": record["prompt"],
                    "completion": record["completion"], "label": label, "meta": meta}
        if kp == "conv" and kc == "conv":
            p, c = _conversation(record["prompt"], {"completion": record["completion"]}, where)
            return {"id": rid, "kind": "unpaired", "conversational": True, "prompt": p, "completion": c["completion"],
                    "label": label, "meta": meta}
        raise PreferenceError(f"{where}: prompt/completion: mixed formats (prompt is {_kname(kp)}, completion is "
                              f"{_kname(kc)}); both strings or both message lists", "mixed_format")
    for f in ("chosen", "rejected"):
        if f not in record:
            raise PreferenceError(f"{where}: {f}: missing (a paired record has chosen and rejected)", "missing_field")
    kch, krj = _kind(record["chosen"], where, "chosen"), _kind(record["rejected"], where, "rejected")
    for f, k in (("chosen", kch), ("rejected", krj)):
        if k == "empty" or (k == "str" and not record[f].strip()):
            raise PreferenceError(f"{where}: {f}: empty completion (nothing to prefer)", "empty_completion")
    if kch != krj:
        raise PreferenceError(f"{where}: chosen/rejected: mixed formats (chosen is {_kname(kch)}, rejected is "
                              f"{_kname(krj)}); both strings or both message lists", "mixed_format")
    conv = kch == "conv"
    kp = _kind(record["prompt"], where, "prompt") if "prompt" in record else None
    if kp == "empty":
        raise PreferenceError(f"{where}: prompt: empty list (expected messages ending with a user turn)", "bad_prompt")
    if kp is not None and (kp == "conv") == conv:  # explicit prompt
        if conv:
            p, c = _conversation(record["prompt"], {"chosen": record["chosen"], "rejected": record["rejected"]}, where)
            return {"id": rid, "kind": "paired", "conversational": True, "prompt": p, "chosen": c["chosen"],
                    "rejected": c["rejected"], "meta": meta}
        return {"id": rid, "kind": "paired", "conversational": False, "prompt": record["prompt"],
                "chosen": record["chosen"], "rejected": record["rejected"], "meta": meta}
    if kp == "conv":  # a message-list prompt with string completions
        raise PreferenceError(f"{where}: prompt/chosen: mixed formats (prompt is a message list, chosen and rejected "
                              "are strings); both strings or both message lists", "mixed_format")
    if kp == "str":  # TRL's maybe_extract_prompt: a string prompt beside whole conversations is ignored
        meta["prompt_text"] = record["prompt"]
    if conv:
        if kp == "str" and not (record["chosen"] and _msg_key(record["chosen"][0]) == _msg_key(record["rejected"][0])):
            raise PreferenceError(f"{where}: prompt/chosen: mixed formats (prompt is a string, chosen and rejected are "
                                  "message lists that share no prompt to read it from, as TRL would); give the prompt "
                                  "as messages", "mixed_format")
        p, ch, rj = _extract_conv_prompt(record["chosen"], record["rejected"], where)
        p, c = _conversation(p, {"chosen": ch, "rejected": rj}, where)
        return {"id": rid, "kind": "paired", "conversational": True, "prompt": p, "chosen": c["chosen"],
                "rejected": c["rejected"], "meta": meta}
    p, ch, rj = _extract_text_prompt(record["chosen"], record["rejected"])
    for f, v in (("chosen", ch), ("rejected", rj)):
        if not v.strip():
            raise PreferenceError(f"{where}: {f}: empty completion once the shared prompt {p[-40:]!r} is taken off "
                                  "(the implicit prompt is the common start of chosen and rejected)",
                                  "empty_completion")
    return {"id": rid, "kind": "paired", "conversational": False, "prompt": p, "chosen": ch, "rejected": rj,
            "meta": meta}


def _kname(k: str) -> str:
    return {"str": "a string", "conv": "a message list", "empty": "an empty list"}[k]


def read_preferences(path, *, on_error: str = "raise") -> tuple[list[dict], dict]:
    """The preference rows of a JSONL file, in file order, normalized (module docstring), and stats
    ``{"read": non-blank lines, "kept", "skipped": {reason: count}, "errors": [the first few messages]}``.
    ``on_error="skip"`` counts bad lines instead of raising."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {ON_ERROR}, got {on_error!r}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: preference file not found" + (" (it is a directory)" if p.is_dir() else ""))
    st = {"read": 0, "kept": 0, "skipped": {}, "errors": []}
    out = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{p}:{lineno}"
            if not raw.strip():
                continue
            st["read"] += 1
            try:
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise PreferenceError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})", "bad_text") from None
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PreferenceError(f"{where}: bad JSON ({e.msg} at column {e.colno})", "bad_json") from None
                row = normalize_preference(record, where, f"{p.name}:{lineno}")
            except ConversationError as e:
                if on_error == "raise":
                    raise
                st["skipped"][e.reason] = st["skipped"].get(e.reason, 0) + 1
                if len(st["errors"]) < MAX_ERRORS_KEPT:
                    st["errors"].append(str(e))
                continue
            out.append(row)
            st["kept"] += 1
    return out, st


def unpair_preferences(rows: Sequence[dict]) -> list[dict]:
    """Paired rows as unpaired ones (TRL's ``unpair_preference_dataset``): each pair gives its chosen
    (label true) then its rejected (label false); unpaired rows pass through."""
    out = []
    for r in rows:
        if r.get("kind") != "paired":
            out.append(r)
            continue
        for f, label in (("chosen", True), ("rejected", False)):
            out.append({"id": f"{r['id']}/{f}", "kind": "unpaired", "conversational": r["conversational"],
                        "prompt": r["prompt"], "completion": r[f], "label": label, "meta": dict(r.get("meta", {}))})
    return out


# ---- validation split -----------------------------------------------------------------------------------

def prompt_hash(prompt, seed: int = 0) -> float:
    """A number in [0, 1) from a row's prompt (text, or roles and contents) and the seed."""
    if isinstance(prompt, str):
        text = json.dumps(["text", prompt], ensure_ascii=False)
    else:
        text = json.dumps(["chat", [[m["role"], m["content"]] for m in prompt]], ensure_ascii=False)
    h = hashlib.sha256(f"lmforge-pref-split|{seed}|{text}".encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64


def split_validation_pairs(rows, frac: float, seed: int) -> tuple[list, list]:
    """``(train, val)``: a row goes to ``val`` when its prompt's hash (``prompt_hash``) is below ``frac``,
    so every pair of one prompt is on one side and a prompt's side does not change as the data grows or
    is reordered; order kept. With ``frac > 0`` and at least two distinct prompts, ``val`` holds at least
    the prompt of lowest hash and ``train`` at least one prompt."""
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise ValueError(f"val_frac={frac!r}: expected a number in [0, 1)")
    hs = [prompt_hash((r if "kind" in r else normalize_preference(r, f"rows[{k}]"))["prompt"], seed)
          for k, r in enumerate(rows)]
    cut = float(frac)
    distinct = sorted(set(hs))
    if frac > 0 and len(distinct) >= 2:
        if distinct[0] >= cut:
            cut = math.nextafter(distinct[0], 1.0)
        if distinct[-1] < cut:
            cut = distinct[-1]
    return [r for r, h in zip(rows, hs) if h >= cut], [r for r, h in zip(rows, hs) if h < cut]


# ---- tokens -----------------------------------------------------------------------------------------

@dataclass
class PrefExample:
    """One pair (or unpaired example) as ids: the prompt, and the completions to score after it."""
    id: str
    prompt: list[int]
    chosen: list[int]            # unpaired: the completion
    rejected: list[int] | None   # None for unpaired
    label: bool | None = None    # unpaired: desirable
    ref_chosen: float | None = None    # precomputed reference log-probs (unpaired: of the completion)
    ref_rejected: float | None = None

    @property
    def paired(self) -> bool:
        return self.rejected is not None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _float_or_none(v, where: str, field: str):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: meta.{field}: expected a finite number (a precomputed log-prob), got {v!r}")
    return float(v)


def encode_preferences(tok, rows, max_len: int, *, max_prompt_len: int | None = None,
                       truncation: str = "keep_start", tokens=None) -> tuple[list[PrefExample], dict]:
    """Rows (``read_preferences``'s, or raw TRL records, normalized here) to ``PrefExample``s, as TRL 1.16
    tokenizes them (module docstring). ``tokens``: the model's ``TokenSpec`` (BOS and the stop token of
    plain rows; a non-lmforge chat template); default ``TokenSpec.for_tokenizer(tok)``.
    ``truncation``: ``"keep_start"`` cuts a too-long completion to fit ``max_len`` with its prompt,
    ``"skip"`` drops the pair. Stats: ``pairs`` (rows seen), ``identical``, ``empty_completion``,
    ``prompt_too_long`` (all three dropped), ``truncated``, ``skipped_long`` (``"skip"``),
    ``prompt_not_prefix``, ``kept``, ``tokens`` (prompt + completions of the kept examples)."""
    from lmforge.tokenize.chat import render
    from lmforge.tokenize.special import TokenSpec

    if truncation not in TRUNCATION:
        raise ValueError(f"truncation: expected one of {TRUNCATION}, got {truncation!r} (TRL's keep_end would cut "
                         "the shared prompt differently for chosen and rejected)")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 2:
        raise ValueError(f"max_len: expected an int >= 2, got {max_len!r}")
    if max_prompt_len is not None and (not isinstance(max_prompt_len, int) or isinstance(max_prompt_len, bool)
                                       or max_prompt_len < 1):
        raise ValueError(f"max_prompt_len: expected None or an int >= 1, got {max_prompt_len!r}")
    spec = tokens if tokens is not None else TokenSpec.for_tokenizer(tok)
    lmforge_chat = spec.template == "lmforge" or tokens is None
    eos = spec.stop[0] if spec.stop else None
    eos_text = spec.token_text(tok, eos) if eos is not None else None
    bos = [spec.bos] if spec.add_bos and spec.bos is not None else []

    def chat(msgs, gen):
        if lmforge_chat:
            return render(tok, msgs, add_generation_prompt=gen)[0]
        return spec.encode_chat(tok, msgs, add_generation_prompt=gen)

    def text(s):
        return tok.encode(s, disallowed_special=())

    st = {"pairs": 0, "identical": 0, "empty_completion": 0, "prompt_too_long": 0, "truncated": 0,
          "skipped_long": 0, "prompt_not_prefix": 0, "kept": 0, "tokens": 0}
    out: list[PrefExample] = []
    for k, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{k}]: expected a dict (a preference row), got {type(row).__name__}")
        if "kind" not in row:
            row = normalize_preference(row, f"rows[{k}]", str(row.get("id", k)))
        rid = str(row.get("id", k))
        st["pairs"] += 1
        paired = row["kind"] == "paired"
        fields = ("chosen", "rejected") if paired else ("completion",)
        try:
            if row["conversational"]:
                p_ids = chat(row["prompt"], True)
                full = [chat(list(row["prompt"]) + list(row[f]), False) for f in fields]
            else:
                p_ids = bos + text(row["prompt"])
                full = []
                for f in fields:
                    c = row[f]
                    tail = []
                    if eos is not None:  # TRL appends eos_token to a plain completion that lacks it
                        if eos_text and c.endswith(eos_text):
                            c = c[:-len(eos_text)]
                        tail = [eos]
                    full.append(bos + text(row["prompt"] + c) + tail)
        except ValueError as e:
            raise ValueError(f"row {rid}: {e}") from None
        plen = min(_common_prefix(p_ids, f) for f in full)
        if plen < len(p_ids):
            st["prompt_not_prefix"] += 1
        prompt = p_ids[:plen]
        comps = [f[plen:] for f in full]
        if any(len(c) < (1 if prompt else 2) for c in comps):  # no token to score (position 0 predicts nothing)
            st["empty_completion"] += 1
            continue
        if len(prompt) >= max_len or (max_prompt_len is not None and len(prompt) > max_prompt_len):
            st["prompt_too_long"] += 1
            continue
        if paired and comps[0] == comps[1]:
            st["identical"] += 1
            continue
        room = max_len - len(prompt)
        if any(len(c) > room for c in comps):
            if truncation == "skip":
                st["skipped_long"] += 1
                continue
            comps = [c[:room] for c in comps]
            st["truncated"] += 1
            if paired and comps[0] == comps[1]:
                st["identical"] += 1
                continue
        meta = row.get("meta") or {}
        where = f"row {rid}"
        if paired:
            ex = PrefExample(rid, prompt, comps[0], comps[1],
                             ref_chosen=_float_or_none(meta.get("ref_chosen_logps"), where, "ref_chosen_logps"),
                             ref_rejected=_float_or_none(meta.get("ref_rejected_logps"), where, "ref_rejected_logps"))
        else:
            ex = PrefExample(rid, prompt, comps[0], None, label=bool(row["label"]),
                             ref_chosen=_float_or_none(meta.get("ref_logps"), where, "ref_logps"))
        out.append(ex)
        st["kept"] += 1
        st["tokens"] += len(prompt) + sum(len(c) for c in comps)
    return out, st


# ---- batches ----------------------------------------------------------------------------------------

class PrefBatches:
    """The preference batch source: examples to ``Batch`` objects, epoch after epoch, each epoch in an
    order drawn from ``(seed, epoch)``; its state (epoch, batch within it) makes resume exact.

    ``inputs``: ``idx``, ``attention_mask``, ``position_ids``, ``doc_ids`` (-1 on padding; the sequence's
    number in the micro-batch), ``completion_mask`` (R, T) int64; the scored positions flat: ``loss_pos``
    (N,) (the position whose logits predict the token), ``loss_targets`` (N,), ``loss_seq`` (N,) (its
    sequence), ``loss_rank`` (N,) (1, 2, ... within its completion); ``seq_tokens`` (S,) fp32 scored
    tokens of each sequence; ``index`` (B,) the examples' indices; ``plain`` (0-dim bool): no masks needed.
    Paired: S = 2B, chosen then rejected, and ``ref_chosen`` / ``ref_rejected`` (B,) fp32 when every
    example of the batch has them. Unpaired: ``label`` (B,) bool, ``ref_logps`` (B,) when given; with
    ``kl`` S = 2B, the KL sequences last. ``n``: pairs (examples); ``tokens``: non-pad tokens of all rows;
    ``trained``: scored completion tokens (KL rows not counted).

    ``seq_len``: the longest row (``"packed"``'s capacity, the cut of a KL sequence); default the longest
    prompt + completion of the examples. Batches per epoch: ``ceil(examples / batch_size)`` (the last may
    be smaller)."""

    def __init__(self, examples: Sequence[PrefExample], batch_size: int, *, mode: str = "padded", pad_id: int = 0,
                 seed: int = 0, shuffle: bool = True, device="cpu", kl: bool = False, seq_len: int | None = None):
        if mode not in MODES:
            raise ValueError(f"packing mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not examples:
            raise ValueError("no preference examples to batch (every pair was dropped, or none was given)")
        self.paired = examples[0].paired
        for e in examples:
            if e.paired != self.paired:
                raise ValueError(f"example {e.id}: {'paired' if e.paired else 'unpaired'} among "
                                 f"{'paired' if self.paired else 'unpaired'} examples; a batch source holds one kind "
                                 "(unpair_preferences turns pairs into KTO examples)")
            if not e.chosen or (e.paired and not e.rejected):
                raise ValueError(f"example {e.id}: empty completion (encode_preferences drops those)")
            if not e.paired and e.label is None:
                raise ValueError(f"example {e.id}: unpaired without a label")
        if kl and self.paired:
            raise ValueError("kl=True is for unpaired (KTO) examples; these are pairs")
        longest = max(len(e.prompt) + max(len(e.chosen), len(e.rejected or ())) for e in examples)
        if seq_len is None:
            seq_len = longest
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < longest:
            raise ValueError(f"seq_len: expected an int >= {longest} (the longest prompt + completion), got {seq_len!r}; "
                             "encode with max_len <= seq_len")
        self.examples = list(examples)
        self.mode, self.B, self.T, self.kl = mode, batch_size, seq_len, bool(kl)
        self.pad_id, self.seed, self.shuffle = int(pad_id), int(seed), bool(shuffle)
        self.device = torch.device(device)
        h = 0
        for e in self.examples:
            for part in (e.prompt, e.chosen, e.rejected or [], [int(bool(e.label))] if e.label is not None else []):
                h = zlib.crc32(np.asarray(part, dtype=np.int64).tobytes(), zlib.crc32(b"|", h))
        self.fingerprint = h
        self.epoch, self.cursor = 0, 0
        self._n_batches = math.ceil(len(self.examples) / self.B)
        self._plan, self._plan_epoch = self._make_plan(0), 0

    def _make_plan(self, epoch: int) -> list[list[int]]:
        n = len(self.examples)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        p = perm.tolist()
        return [p[s:s + self.B] for s in range(0, n, self.B)]

    def __len__(self) -> int:
        return self._n_batches

    def order(self, epoch: int) -> list[int]:
        """The example indices in the order epoch ``epoch`` feeds them."""
        return [i for b in self._make_plan(epoch) for i in b]

    def next(self) -> Batch:
        if self._plan_epoch != self.epoch:
            self._plan, self._plan_epoch = self._make_plan(self.epoch), self.epoch
        items = self._plan[self.cursor]
        self.cursor += 1
        if self.cursor >= len(self._plan):
            self.epoch, self.cursor = self.epoch + 1, 0
        return self.build(items)

    def sequences(self, items: Sequence[int]) -> list[tuple[list[int], list[int]]]:
        """The (prompt, completion) sequences of a micro-batch of these examples, in row order."""
        ex = [self.examples[i] for i in items]
        if self.paired:
            return [(e.prompt, e.chosen) for e in ex] + [(e.prompt, e.rejected) for e in ex]
        seqs = [(e.prompt, e.chosen) for e in ex]
        if self.kl:  # prompt i with the completion of item i-1 (TRL's rotation), cut to seq_len
            b = len(ex)
            seqs += [(e.prompt, ex[(j - 1) % b].chosen[:self.T - len(e.prompt)]) for j, e in enumerate(ex)]
        return seqs

    def build(self, items: Sequence[int]) -> Batch:
        """The batch of these examples (indices into ``examples``)."""
        from .packing import pack_bfd

        seqs = self.sequences(items)
        lens = [len(p) + len(c) for p, c in seqs]
        if self.mode == "padded":
            rows = [[s] for s in range(len(seqs))]
        else:
            rows = pack_bfd(lens, self.T)
        R = len(rows)
        T = max(sum(lens[s] for s in r) for r in rows)
        idx = np.full((R, T), self.pad_id, dtype=np.int64)
        att = np.zeros((R, T), dtype=np.int64)
        pos = np.zeros((R, T), dtype=np.int64)
        doc = np.full((R, T), -1, dtype=np.int64)
        cmask = np.zeros((R, T), dtype=np.int64)
        S = len(seqs)
        loss_pos, loss_tgt, loss_seq, loss_rank = [], [], [], []
        seq_tokens = np.zeros(S, dtype=np.float32)
        for r, row in enumerate(rows):
            off = 0
            for s in row:
                p, c = seqs[s]
                L = lens[s]
                idx[r, off:off + L] = np.asarray(list(p) + list(c), dtype=np.int64)
                att[r, off:off + L] = 1
                pos[r, off:off + L] = np.arange(L)
                doc[r, off:off + L] = s
                cmask[r, off + len(p):off + L] = 1
                first = max(len(p), 1)  # position 0 has no prediction
                t = np.arange(first, L)
                loss_pos.append(r * T + off + t - 1)
                loss_tgt.append(np.asarray(c, dtype=np.int64)[t - len(p)])
                loss_seq.append(np.full(len(t), s, dtype=np.int64))
                loss_rank.append(np.arange(1, len(t) + 1, dtype=np.int64))
                seq_tokens[s] = len(t)
                off += L
        dev = self.device
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
        ex = [self.examples[i] for i in items]
        inputs = {"idx": t(idx), "attention_mask": t(att), "position_ids": t(pos), "doc_ids": t(doc),
                  "completion_mask": t(cmask), "loss_pos": t(cat(loss_pos)), "loss_targets": t(cat(loss_tgt)),
                  "loss_seq": t(cat(loss_seq)), "loss_rank": t(cat(loss_rank)), "seq_tokens": t(seq_tokens),
                  "index": t(np.asarray(items, dtype=np.int64)),
                  "plain": torch.tensor(all(len(r) == 1 for r in rows))}
        if self.paired:
            if all(e.ref_chosen is not None and e.ref_rejected is not None for e in ex):
                inputs["ref_chosen"] = t(np.asarray([e.ref_chosen for e in ex], dtype=np.float32))
                inputs["ref_rejected"] = t(np.asarray([e.ref_rejected for e in ex], dtype=np.float32))
        else:
            inputs["label"] = t(np.asarray([bool(e.label) for e in ex], dtype=np.bool_))
            if all(e.ref_chosen is not None for e in ex):
                inputs["ref_logps"] = t(np.asarray([e.ref_chosen for e in ex], dtype=np.float32))
        main = 2 * len(ex) if self.paired else len(ex)
        return Batch(inputs=inputs, n=len(ex), tokens=int(sum(lens)), trained=int(seq_tokens[:main].sum()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "mode": self.mode,
                "batch_size": self.B, "seq_len": self.T, "examples": len(self.examples), "shuffle": self.shuffle,
                "kl": self.kl, "fingerprint": self.fingerprint}

    def load_state_dict(self, d: dict) -> None:
        for k, mine in (("seed", self.seed), ("mode", self.mode), ("batch_size", self.B), ("seq_len", self.T),
                        ("examples", len(self.examples)), ("shuffle", self.shuffle), ("kl", self.kl),
                        ("fingerprint", self.fingerprint)):
            if k in d and d[k] != mine:
                raise ValueError(f"preference batch state: {k} is {d[k]!r} in the checkpoint but {mine!r} now; "
                                 "resume needs the same pairs and batching")
        epoch, cursor = d.get("epoch"), d.get("cursor")
        if not (isinstance(epoch, int) and isinstance(cursor, int) and epoch >= 0 and 0 <= cursor < len(self)):
            raise ValueError(f"preference batch state: epoch={epoch!r} cursor={cursor!r}; expected ints, "
                             f"0 <= cursor < {len(self)}")
        self.epoch, self.cursor = epoch, cursor


# ---- log-probabilities ------------------------------------------------------------------------------

def ld_weights(rank: torch.Tensor, seq: torch.Tensor, seq_tokens: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights (TRL's ``ld_alpha``): 1 on a completion's first ``min(len chosen, len
    rejected)`` tokens, ``ld_alpha`` past them. ``rank`` (N,) 1-based place in the completion, ``seq`` (N,)
    its sequence, ``seq_tokens`` (2B,) completion lengths, chosen then rejected."""
    c, r = seq_tokens.chunk(2)
    shared = torch.minimum(c, r).repeat(2)
    inside = rank.to(shared.dtype) <= shared.index_select(0, seq)
    return torch.where(inside, torch.ones((), dtype=torch.float32, device=rank.device),
                       torch.full((), float(ld_alpha), dtype=torch.float32, device=rank.device))


def completion_logps(fwd, batch: Batch, *, ld_alpha: float | None = None, weighting: bool = False,
                     token_stats: bool = False) -> dict:
    """One forward over the batch's rows: per sequence (S,) ``"logps"`` (the SUM of its completion tokens'
    log-probs, fp32; with ``ld_alpha`` the tokens past the shorter completion of the pair weighted by it),
    ``"tokens"`` (scored completion tokens, fp32) and with ``weighting`` ``"weight"`` (WPO: exp of the mean
    over the completion of log p(y_t) - log sum_v p(v)^2, detached, as TRL's ``use_weighting``).
    ``token_stats``: also per sequence, detached, SUMS over its scored tokens of what TRL's metrics average
    (divide by ``"tokens"``): ``"entropy"`` (of the next-token distribution), ``"mean_logits"`` (the logits'
    mean over the vocabulary; TRL's ``logits/chosen``) and ``"top1"`` (1 where the token is the argmax;
    TRL's ``mean_token_accuracy`` over the chosen).
    ``fwd``: the lmforge model (logits at completion positions only), or any callable
    ``fwd(idx, attention_mask=, position_ids=, doc_ids=)`` returning logits (or a tuple / an output object
    holding them as ``.logits``); a plain batch is passed ``idx`` alone."""
    from .packing import _module

    inp = batch.inputs
    idx = inp["idx"]
    model = _module(fwd)
    moe = model is not None and getattr(getattr(model, "cfg", None), "moe", None) is not None
    kw = {}
    if not bool(inp["plain"]):
        kw = {"attention_mask": inp["attention_mask"], "position_ids": inp["position_ids"], "doc_ids": inp["doc_ids"]}
    elif moe:
        kw = {"attention_mask": inp["attention_mask"]}
    pos, tgt, seq = inp["loss_pos"], inp["loss_targets"], inp["loss_seq"]
    if model is not None:
        h = model.hidden_states(idx, **kw)
        logits = model.compute_logits(h.reshape(-1, h.shape[-1]).index_select(0, pos))
    else:
        out = fwd(idx, **kw)
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out[0] if isinstance(out, tuple) else out
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, pos)
    lsm = torch.log_softmax(logits.float(), dim=-1)
    tok_lp = lsm.gather(1, tgt.unsqueeze(1)).squeeze(1)
    S = inp["seq_tokens"].shape[0]
    ntok = inp["seq_tokens"].float()
    if ld_alpha is not None:
        if "label" in inp:
            raise ValueError("ld_alpha (LD-DPO) weights a pair's longer completion; this batch is unpaired")
        w = ld_weights(inp["loss_rank"], seq, ntok, ld_alpha)
        summed = torch.zeros(S, dtype=torch.float32, device=tok_lp.device).index_add(0, seq, tok_lp * w)
    else:
        summed = torch.zeros(S, dtype=torch.float32, device=tok_lp.device).index_add(0, seq, tok_lp)
    res = {"logps": summed, "tokens": ntok}
    if weighting:
        with torch.no_grad():
            aligned = tok_lp - torch.logsumexp(2 * lsm, dim=-1)
            mean = torch.zeros(S, dtype=torch.float32, device=tok_lp.device).index_add(0, seq, aligned) / ntok.clamp(min=1)
            res["weight"] = torch.exp(mean)
    if token_stats:
        with torch.no_grad():
            z = torch.zeros(S, dtype=torch.float32, device=tok_lp.device)
            res["entropy"] = z.index_add(0, seq, -(lsm.exp() * lsm).sum(-1))
            res["mean_logits"] = z.index_add(0, seq, logits.float().mean(-1))
            res["top1"] = z.index_add(0, seq, (logits.argmax(-1) == tgt).float())
    return res
