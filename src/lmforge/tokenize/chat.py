"""The chat format: conversations to token ids with a loss mask, and back.

Knows the role tokens and the layout; knows nothing about models. The server
and ``lmforge chat`` prompt with ``render(..., add_generation_prompt=True)``; SFT
(``lmforge.align``) trains on exactly ``render``'s output and mask.

Layout (every marker is one special token)::

    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|end|> ...

``loss_mask`` is 1 on the tokens of assistant content and on the ``<|end|>``
that closes it (the model must learn to stop), 0 elsewhere. Message text is
always encoded as ordinary text: a user who types ``<|end|>`` gets the
characters, never the control token.
"""
from __future__ import annotations

from typing import Sequence

from .base import Tokenizer

BOS = "<|bos|>"
END = "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
CHAT_SPECIAL_TOKENS = (BOS, *ROLE_TOKENS.values(), END)
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role

# The same layout as a Jinja chat template (what an HF export carries; ``transformers``'
# ``apply_chat_template`` renders it to the ids ``render`` gives, for message text free of control tokens).
# The assistant's text and its closing ``<|end|>`` sit in a ``{% generation %}`` block: transformers'
# ``return_assistant_tokens_mask`` (and so TRL's ``assistant_only_loss``) then marks exactly the tokens
# ``render``'s loss mask marks.
CHAT_TEMPLATE = (
    "{{- '<|bos|>' -}}"
    "{%- for m in messages -%}"
    "{%- set role = 'system' if m['role'] == 'developer' else m['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ m['role'] ~ '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if role == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{%- if role == 'assistant' -%}"
    "{{- '<|assistant|>' -}}{%- generation -%}{{- m['content'] ~ '<|end|>' -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- '<|' ~ role ~ '|>' ~ m['content'] ~ '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)
# The template exports carried before the generation markers (same ids): still read as lmforge's own.
LEGACY_CHAT_TEMPLATES = (
    "{{- '<|bos|>' -}}"
    "{%- for m in messages -%}"
    "{%- set role = 'system' if m['role'] == 'developer' else m['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role ' ~ m['role'] ~ '; expected system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- if role == 'system' and not loop.first -%}"
    "{{- raise_exception('a system message may only come first') -}}"
    "{%- endif -%}"
    "{{- '<|' ~ role ~ '|>' ~ m['content'] ~ '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
)


def _ids(tok: Tokenizer) -> dict[str, int]:
    missing = [s for s in CHAT_SPECIAL_TOKENS if s not in tok.special_tokens]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing}; train it with "
                         "special_tokens=lmforge.tokenize.chat.CHAT_SPECIAL_TOKENS")
    return {s: tok.special_tokens[s] for s in CHAT_SPECIAL_TOKENS}


def render(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False,
           train_on: Sequence[str] = ("assistant",)) -> tuple[list[int], list[int]]:
    """Render a conversation (``[{"role": ..., "content": ...}, ...]``) to ``(ids, loss_mask)``."""
    sp = _ids(tok)
    ids, mask = [sp[BOS]], [0]
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {k}: expected a dict with 'role' and 'content', got {m!r}")
        role, content = ROLE_ALIASES.get(m["role"], m["role"]), m["content"]
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {k}: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"message {k}: content must be a string, got {type(content).__name__}")
        if role == "system" and k != 0:
            raise ValueError(f"message {k}: a system message may only come first")
        body = tok.encode(content, allowed_special=(), disallowed_special=())
        trained = 1 if role in train_on else 0
        ids.append(sp[ROLE_TOKENS[role]])
        mask.append(0)
        ids.extend(body)
        mask.extend([trained] * len(body))
        ids.append(sp[END])
        mask.append(trained)
    if add_generation_prompt:
        ids.append(sp[ROLE_TOKENS["assistant"]])
        mask.append(0)
    return ids, mask


def parse(tok: Tokenizer, ids: Sequence[int]) -> list[dict]:
    """The inverse of ``render``: ids back to messages. A final message without
    ``<|end|>`` (e.g. a reply being generated) is returned as it stands."""
    sp = _ids(tok)
    role_of = {sp[t]: r for r, t in ROLE_TOKENS.items()}
    out: list[dict] = []
    role, body = None, []
    for pos, i in enumerate(ids):
        if i == sp[BOS] and role is None:
            continue
        if role is None:
            if i not in role_of:
                raise ValueError(f"position {pos}: expected a role token, got id {i}")
            role, body = role_of[i], []
        elif i == sp[END]:
            out.append({"role": role, "content": tok.decode(body)})
            role = None
        elif i in role_of or i == sp[BOS]:
            raise ValueError(f"position {pos}: message of role {role!r} not closed by {END}")
        else:
            body.append(i)
    if role is not None:
        out.append({"role": role, "content": tok.decode(body)})
    return out


def normalize_messages(messages: Sequence[dict]) -> list[dict]:
    """OpenAI-style messages to ``{"role", "content": str}``: content given as a list of parts keeps its
    text parts (anything else is refused); a missing or null content is an error naming the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {k}: expected a dict with 'role' and 'content', got {m!r}")
        c = m.get("content")
        if isinstance(c, list):
            parts = []
            for j, p in enumerate(c):
                if not (isinstance(p, dict) and p.get("type", "text") == "text" and isinstance(p.get("text"), str)):
                    raise ValueError(f"message {k}: content part {j} is not a text part "
                                     f"({{'type': 'text', 'text': ...}}); only text is supported")
                parts.append(p["text"])
            c = "".join(parts)
        if not isinstance(c, str):
            raise ValueError(f"message {k}: content must be a string or a list of text parts, got "
                             f"{type(c).__name__}")
        out.append({"role": m["role"], "content": c})
    return out


def render_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = False,
                    **variables) -> str:
    """Render a Jinja chat template the way ``transformers`` does (a sandboxed environment with
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps
    non-ASCII). A template's ``raise_exception`` becomes ``ValueError``."""
    env = _jinja_env()
    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **variables)
    except _TemplateRaise as e:
        raise ValueError(str(e)) from None


class _TemplateRaise(Exception):
    pass


_ENV = None


def _jinja_env():
    global _ENV
    if _ENV is None:
        import json
        from datetime import datetime

        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise _TemplateRaise(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, _generation_tag()])
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


def _generation_tag():
    """transformers' ``{% generation %} ... {% endgeneration %}`` (it marks the assistant's tokens for
    ``return_assistant_tokens_mask``): here the block renders its body, unchanged."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return Generation
