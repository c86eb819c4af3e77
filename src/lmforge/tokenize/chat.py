"""The chat format: conversations to token ids with a loss mask, and back.

Knows the role tokens and the layout; knows nothing about models. The server
and ``lmforge chat`` prompt with ``render(..., add_generation_prompt=True)``; SFT
(planned, not built yet) is to train on exactly ``render``'s output and mask.

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
        role, content = m["role"], m["content"]
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
