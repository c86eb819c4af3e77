"""A model's special tokens, defined once: BOS, the document delimiter, the stop
tokens, the pad token and the chat template.

Knows which special token plays which part and how a prompt or a conversation
becomes ids; knows nothing about models or HTTP. ``TokenSpec`` is saved with the
model (``config.json``'s ``"tokens"``) and read back by everything that prompts
a model: ``generate``, ``serve``, ``chat``, the pipeline's eval and demo stages
and ``lmforge.load``. A directory saved before the spec existed gets the one
``TokenSpec.for_tokenizer`` infers, by the same rules the data pipeline uses to
start documents, so old models keep their behaviour.

Three kinds of chat template:

* ``"lmforge"``: the tokenizer has the chat special tokens
  (``lmforge.tokenize.chat.CHAT_SPECIAL_TOKENS``). Conversations are rendered by
  ``chat.render`` (message text always encoded as ordinary text); the Jinja
  ``chat.CHAT_TEMPLATE`` written into an HF export renders the same ids.
* ``"plain"``: a base model without chat tokens. A text template
  (``User: ...`` / ``Assistant: ...``) and a stop string at the next user
  turn, so any lmforge model can be served for chat.
* ``"hf"``: an imported HF model keeps its own template (rendered with jinja2
  as transformers renders it) and its ``generation_config`` stop ids.

The pad token is never a stop token (``for_tokenizer``): a trainer that masks the pad id out of the loss
would otherwise mask the end of every answer too and the model would never learn to stop (TRL's old
trouble with pad = EOS). ``default_special_tokens`` reserves ``<|pad|>`` for that; a tokenizer without a
pad token that is not a stop gets ``pad=None``. An imported HF model keeps the pad its files name.

HF directories, both ways (``hf_files`` writes, ``from_hf`` reads): the chat
template, bos/eos/pad tokens and ``add_bos_token`` in ``tokenizer_config.json``,
a ``TemplateProcessing`` post-processor that prepends BOS in ``tokenizer.json``,
and the stop ids as ``eos_token_id`` (a list) in ``config.json`` and
``generation_config.json``. On import, whether a prompt starts with BOS is what
the post-processor does (transformers 5 ignores ``add_bos_token`` when the
tokenizer.json has one); a post-processor that appends tokens (BERT's
``[SEP]``) is not reproduced. The template's ``eos_token`` is ``stop[0]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# the token that starts every document, first found wins (data/shards.py starts documents with it)
DOC_CANDIDATES = ("<|bos|>", "<|endoftext|>", "<s>", "[CLS]")
# tokens that end a generation when the tokenizer has them
STOP_CANDIDATES = ("<|end|>", "<|endoftext|>", "</s>", "[SEP]")
# the pad token, first found wins, never a stop token (see ``TokenSpec.for_tokenizer``)
PAD_CANDIDATES = ("<|pad|>", "[PAD]", "<pad>", "<|endoftext|>")
PAD = "<|pad|>"  # what ``default_special_tokens`` reserves for a family without a pad token of its own

PLAIN_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set role = 'system' if m['role'] == 'developer' else m['role'] -%}"
    "{{- role | capitalize ~ ': ' ~ m['content'] ~ '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
PLAIN_STOP = ("\nUser:", "\nSystem:")
TEMPLATE_KINDS = ("lmforge", "plain", "hf")
_AUTO = object()


def default_special_tokens(kind: str) -> list[str]:
    """The special tokens lmforge reserves when it trains a tokenizer of ``kind`` for a model (the CLI,
    the pipeline, ``pretrain --text --tokenizer bpe:N``): the family's own (BPE ``<|endoftext|>``,
    WordPiece BERT's, Unigram sentencepiece's) and the chat tokens, so any model trained on it can chat.
    The library's ``train`` functions keep the family defaults (they are checked against HF's trainers).

    A pad token that is no stop token comes last: ``<|pad|>`` for BPE, char and Unigram (WordPiece has
    ``[PAD]``). Last, so the tokens before it keep their order: a BPE of the same ``vocab_size`` has one
    merge fewer and its special tokens one id lower (they take the last ids); a char, WordPiece or
    Unigram tokenizer keeps every special id (measured)."""
    from .chat import CHAT_SPECIAL_TOKENS

    family = {"bpe": ["<|endoftext|>"], "char": ["<|endoftext|>"],
              "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "unigram": ["<unk>", "<s>", "</s>"]}
    if kind not in family:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(family)}")
    out = list(dict.fromkeys(family[kind] + list(CHAT_SPECIAL_TOKENS)))
    stops = set(STOP_CANDIDATES) | set(DOC_CANDIDATES)
    if not any(c in out and c not in stops for c in PAD_CANDIDATES):
        out.append(PAD)
    return out


@dataclass
class TokenSpec:
    bos: int | None = None  # prepended to every prompt (lmforge: the document token)
    doc: int | None = None  # starts every training document (data prepare's doc_token)
    stop: list[int] = field(default_factory=list)  # a generation ends at any of these (HF eos_token_id list)
    pad: int | None = None
    template: str = "plain"  # "lmforge" | "plain" | "hf" (see the module docstring)
    chat_template: str = PLAIN_TEMPLATE  # Jinja source
    chat_stop: list[str] = field(default_factory=list)  # stop strings a chat adds (the plain template's next turn)
    add_bos: bool = True  # whether a plain-text prompt starts with ``bos``

    def __post_init__(self):
        if self.template not in TEMPLATE_KINDS:
            raise ValueError(f"TokenSpec.template: expected one of {TEMPLATE_KINDS}, got {self.template!r}")

    # ---- construction ----
    @classmethod
    def for_tokenizer(cls, tok, doc=_AUTO) -> "TokenSpec":
        """The spec of a tokenizer lmforge trained (or any without saved settings). ``doc``: the id the
        training data started documents with (a shard manifest's ``doc_token_id``; None: none, so prompts
        get no BOS either); by default the first of ``DOC_CANDIDATES`` the tokenizer has. ``stop``: every
        ``STOP_CANDIDATES`` token it has, and ``doc``. ``pad``: the first of ``PAD_CANDIDATES`` that is not
        a stop token; None when there is none (a tokenizer trained before ``default_special_tokens``
        reserved ``<|pad|>``: ``<|endoftext|>`` is a stop, and SFT masks its labels, not its pad id)."""
        from .chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE

        st = tok.special_tokens
        if doc is _AUTO:
            doc = next((st[c] for c in DOC_CANDIDATES if c in st), None)
        stop = list(dict.fromkeys([st[c] for c in STOP_CANDIDATES if c in st] + ([doc] if doc is not None else [])))
        # pad is never a stop token: a model trained with pad = a stop (masked as padding) never learns to stop
        pad = next((st[c] for c in PAD_CANDIDATES if c in st and st[c] not in stop), None)
        if all(s in st for s in CHAT_SPECIAL_TOKENS):
            return cls(bos=doc, doc=doc, stop=stop, pad=pad, template="lmforge", chat_template=CHAT_TEMPLATE)
        return cls(bos=doc, doc=doc, stop=stop, pad=pad, template="plain", chat_template=PLAIN_TEMPLATE,
                   chat_stop=list(PLAIN_STOP))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenSpec":
        from .._config import known_fields

        return cls(**known_fields(cls, d))

    @classmethod
    def load(cls, directory: str | os.PathLike, tok) -> "TokenSpec":
        """The spec saved in an lmforge model directory (``config.json``'s ``"tokens"``); an HF directory's
        (``from_hf``); else the one ``for_tokenizer`` infers (a directory saved before specs existed)."""
        d = Path(directory)
        p = d / "config.json"
        c = _read_json(p) if p.exists() else {}
        if c.get("format") == "lmforge.model" or not (p.exists() or (d / "tokenizer_config.json").exists()):
            if isinstance(c.get("tokens"), dict):
                try:
                    return cls.from_dict(c["tokens"])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{p}: bad \"tokens\": {e}") from None
            return cls.for_tokenizer(tok)
        return cls.from_hf(d, tok)

    @classmethod
    def from_hf(cls, directory: str | os.PathLike, tok) -> "TokenSpec":
        """The spec of an HF model directory: ``tokenizer_config.json``'s chat template (a string, the
        list-of-named-templates form's ``"default"``, or ``chat_template.jinja``) and bos/eos/pad tokens;
        ``tokenizer.json``'s post-processor (BOS or not); ``generation_config.json``'s ``eos_token_id`` (int
        or list; else ``config.json``'s, else the tokenizer's eos token) as the stop ids. No template:
        the plain one. lmforge's own template (an lmforge export read back): ``"lmforge"``."""
        from .chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE, LEGACY_CHAT_TEMPLATES

        d = Path(directory)
        tc_path = d / "tokenizer_config.json"
        tc = _read_json(tc_path) if tc_path.exists() else {}
        gen = _read_json(d / "generation_config.json") if (d / "generation_config.json").exists() else {}
        conf = _read_json(d / "config.json") if (d / "config.json").exists() else {}

        def tid(field_name: str):
            v = tc.get(field_name)
            if isinstance(v, dict):  # {"content": ..., "__type": "AddedToken"}
                v = v.get("content")
            if v is None:
                return None
            if not isinstance(v, str):
                raise ValueError(f"{tc_path}: {field_name} must be a string, got {v!r}")
            i = tok.special_tokens.get(v, tok.token_to_id(v))
            if i is None:
                raise ValueError(f"{tc_path}: {field_name} {v!r} is not a token of {d / 'tokenizer.json'}")
            return i

        def ids(where: Path, c: dict, key: str) -> list[int] | None:
            v = c.get(key)
            if v is None:
                return None
            v = [v] if isinstance(v, int) else v
            if not (isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
                raise ValueError(f"{where}: {key} must be an int or a list of ints, got {c.get(key)!r}")
            return list(dict.fromkeys(v))

        template = _hf_chat_template(d, tc, tc_path)
        bos_tok, eos_tok, pad_tok = tid("bos_token"), tid("eos_token"), tid("pad_token")
        lead = _post_processor_bos(d / "tokenizer.json", tok)
        stop = (ids(d / "generation_config.json", gen, "eos_token_id") or ids(d / "config.json", conf, "eos_token_id")
                or ([eos_tok] if eos_tok is not None else []))
        if eos_tok in stop:  # the template's eos_token is stop[0]
            stop = [eos_tok] + [s for s in stop if s != eos_tok]
        pad = pad_tok
        if pad is None:
            pad = (ids(d / "generation_config.json", gen, "pad_token_id") or ids(d / "config.json", conf, "pad_token_id")
                   or [None])[0]
        bos = lead if lead is not None else bos_tok
        st = tok.special_tokens
        doc = bos if bos is not None else next((st[c] for c in DOC_CANDIDATES if c in st), None)
        common = dict(bos=bos, doc=doc, stop=stop, pad=pad, add_bos=lead is not None)
        if template is None:
            spec = cls(template="plain", chat_template=PLAIN_TEMPLATE, chat_stop=list(PLAIN_STOP), **common)
        elif template in (CHAT_TEMPLATE, *LEGACY_CHAT_TEMPLATES) and all(s in st for s in CHAT_SPECIAL_TOKENS):
            spec = cls(template="lmforge", chat_template=CHAT_TEMPLATE, **common)
        else:
            spec = cls(template="hf", chat_template=template, **common)
        try:
            spec.check(tok)
        except ValueError as e:
            raise ValueError(f"{d}: {e} (tokenizer_config.json / generation_config.json name a token "
                             "tokenizer.json does not have)") from None
        return spec

    def check(self, tok, vocab_size: int | None = None) -> None:
        """Every id in range of the tokenizer (and model); raises ValueError naming the field."""
        n = vocab_size or tok.vocab_size
        for name in ("bos", "doc", "pad"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < n:
                raise ValueError(f"TokenSpec.{name}: token id {v} is outside the vocabulary (0..{n - 1})")
        for v in self.stop:
            if not 0 <= v < n:
                raise ValueError(f"TokenSpec.stop: token id {v} is outside the vocabulary (0..{n - 1})")

    # ---- HF files ----
    def hf_files(self, tok, model_max_length: int | None = None) -> dict:
        """What an HF export carries: ``{"tokenizer_config": ..., "post_processor": ..., "ids": ...}`` where
        ``ids`` holds ``bos_token_id``/``eos_token_id`` (the stop list)/``pad_token_id`` for ``config.json``
        and ``generation_config.json``."""
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "chat_template": self.chat_template, "add_bos_token": bool(self.add_bos and self.bos is not None),
              "add_eos_token": False}
        if model_max_length:
            tc["model_max_length"] = model_max_length
        for name, i in (("bos_token", self.bos), ("eos_token", self.stop[0] if self.stop else None),
                        ("pad_token", self.pad)):
            if i is not None:
                tc[name] = tok.id_to_token(i)
        post = None
        if self.add_bos and self.bos is not None:
            b = tok.id_to_token(self.bos)
            seq = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
            post = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": b, "type_id": 0}}, seq[0]],
                    "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, seq[0],
                             {"SpecialToken": {"id": b, "type_id": 1}}, seq[1]],
                    "special_tokens": {b: {"id": b, "ids": [self.bos], "tokens": [b]}}}
        ids = {"bos_token_id": self.bos, "eos_token_id": list(self.stop) or None, "pad_token_id": self.pad}
        return {"tokenizer_config": tc, "post_processor": post, "ids": ids}

    # ---- prompts ----
    def token_text(self, tok, i: int | None) -> str:
        return "" if i is None else tok.id_to_token(i)

    def encode_prompt(self, tok, text: str) -> list[int]:
        """A plain-text prompt as the model saw documents: BOS, then the text (special-token text as text)."""
        ids = tok.encode(text, disallowed_special=())
        return ([self.bos] if self.add_bos and self.bos is not None else []) + ids

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, tok=None) -> str:
        """The conversation as the template's text (what ``apply_chat_template(tokenize=False)`` gives);
        messages are normalized first (text parts joined), as ``encode_chat`` does."""
        from .chat import normalize_messages, render_template

        messages = normalize_messages(messages)

        specials = {}
        if tok is not None:
            specials = {"bos_token": self.token_text(tok, self.bos),
                        "eos_token": self.token_text(tok, self.stop[0] if self.stop else None),
                        "pad_token": self.token_text(tok, self.pad)}
        return render_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt, **specials)

    def encode_chat(self, tok, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """A conversation's prompt ids. ``lmforge``: ``chat.render`` (message text never becomes a control
        token); other templates: the rendered text with special tokens parsed, as transformers does."""
        from .chat import normalize_messages, render

        messages = normalize_messages(messages)
        if self.template == "lmforge":
            return render(tok, messages, add_generation_prompt=add_generation_prompt)[0]
        return tok.encode(self.render_chat(messages, add_generation_prompt, tok), allowed_special="all")


def _read_json(p: Path) -> dict:
    try:
        v = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(v, dict):
        raise ValueError(f"{p}: expected a JSON object, got {type(v).__name__}")
    return v


def _hf_chat_template(d: Path, tc: dict, tc_path: Path) -> str | None:
    """``chat_template.jinja`` (what newer transformers saves), else ``tokenizer_config.json``'s."""
    j = d / "chat_template.jinja"
    if j.exists():
        return j.read_text(encoding="utf-8")
    t = tc.get("chat_template")
    if t is None or isinstance(t, str):
        return t
    if isinstance(t, list):
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{tc_path}: chat_template is a list without a 'default' template "
                         f"(it has: {', '.join(map(str, named)) or 'none'})")
    raise ValueError(f"{tc_path}: chat_template must be a string or a list of {{name, template}}, "
                     f"got {type(t).__name__}")


def _post_processor_bos(path: Path, tok) -> int | None:
    """The id a ``tokenizer.json``'s post-processor puts before a single sequence (None: none)."""
    if not path.exists():
        return None
    pp = _read_json(path).get("post_processor")
    procs = pp.get("processors", []) if isinstance(pp, dict) and pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if not isinstance(p, dict):
            continue
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0] if single else {}
            if "SpecialToken" in first:
                name = first["SpecialToken"]["id"]
                spec = (p.get("special_tokens") or {}).get(name, {})
                got = spec.get("ids") or [tok.special_tokens.get(name, tok.token_to_id(name))]
                if got[0] is None:
                    raise ValueError(f"{path}: the post-processor adds {name!r}, which is not a token")
                return int(got[0])
        elif p.get("type") in ("BertProcessing", "RobertaProcessing"):
            cls_ = p.get("cls")
            if isinstance(cls_, list) and len(cls_) == 2:
                return int(cls_[1])
    return None
