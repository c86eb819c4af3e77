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
PAD_CANDIDATES = ("<|pad|>", "[PAD]", "<pad>", "<|endoftext|>")

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
    def for_tokenizer(cls, tok) -> "TokenSpec":
        """The spec of a tokenizer lmforge trained (or any without saved settings)."""
        from .chat import CHAT_SPECIAL_TOKENS, CHAT_TEMPLATE

        st = tok.special_tokens
        doc = next((st[c] for c in DOC_CANDIDATES if c in st), None)
        stop = list(dict.fromkeys([st[c] for c in STOP_CANDIDATES if c in st] + ([doc] if doc is not None else [])))
        pad = next((st[c] for c in PAD_CANDIDATES if c in st), doc)
        if all(s in st for s in CHAT_SPECIAL_TOKENS):
            return cls(bos=doc, doc=doc, stop=stop, pad=pad, template="lmforge", chat_template=CHAT_TEMPLATE)
        return cls(bos=doc, doc=doc, stop=stop, pad=pad, template="plain", chat_template=PLAIN_TEMPLATE,
                   chat_stop=list(PLAIN_STOP))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TokenSpec: unknown field(s) {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def load(cls, directory: str | os.PathLike, tok) -> "TokenSpec":
        """The spec saved in a model directory (``config.json``'s ``"tokens"``), else the inferred one."""
        p = Path(directory) / "config.json"
        if p.exists():
            c = json.loads(p.read_text())
            if isinstance(c.get("tokens"), dict):
                return cls.from_dict(c["tokens"])
        return cls.for_tokenizer(tok)

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

    # ---- prompts ----
    def token_text(self, tok, i: int | None) -> str:
        return "" if i is None else tok.id_to_token(i)

    def encode_prompt(self, tok, text: str) -> list[int]:
        """A plain-text prompt as the model saw documents: BOS, then the text (special-token text as text)."""
        ids = tok.encode(text, disallowed_special=())
        return ([self.bos] if self.add_bos and self.bos is not None else []) + ids

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True, tok=None) -> str:
        """The conversation as the template's text (what ``apply_chat_template(tokenize=False)`` gives)."""
        from .chat import render_template

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
