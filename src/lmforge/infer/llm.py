"""The Python API: ``lmforge.load(path)`` gives an ``LM`` that generates, streams and chats.

Knows how to turn text (or a conversation) into a request for the ``Engine`` and
the engine's tokens back into text: the model's ``TokenSpec`` (BOS, stop ids, chat
template and chat stop strings), default and checked ``max_tokens`` (what the
context leaves, capped by ``max_tokens`` given to ``load``) and trimming a
conversation to the context (``fit_messages``). Stop strings and the text that is
safe to show while streaming (a UTF-8 character never split, the start of a stop
string held back) are the engine's (``Engine(tokenizer=...)``); a request the
engine ends with an error raises RuntimeError here. Knows nothing about HTTP
(``infer/server.py`` serves many clients at once; an ``LM`` is for one thread:
its calls step the engine themselves). A list of prompts runs as one continuous batch; each request samples
from its own generator, so its output is the one it would get alone.

    import lmforge
    m = lmforge.load("runs/pt")
    m.generate("To be, or not to be", max_tokens=40, temperature=0).text
    for piece in m.stream("Once upon a time", stop="\\n\\n"):
        print(piece, end="", flush=True)
    m.chat([{"role": "user", "content": "Hail!"}]).text
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Iterator

from .engine import Engine
from .sampling import SamplingParams

SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


@dataclass
class Completion:
    """One finished generation."""
    text: str  # the generated text: no stop token, cut where a stop string starts (unless include_stop_str_in_output)
    token_ids: list[int]  # the generated ids (a stop token, or the token completing a stop string, included)
    finish_reason: str  # "stop" (a stop token or string), "length" (max_tokens) or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None  # per token: {"token_id", "token", "logprob", "top_logprobs": [(id, lp)]}
    prompt_logprobs: list | None = None  # with prompt_logprobs: per prompt token (logprob, [(id, lp), ...])

    @property
    def message(self) -> dict:
        """The reply as a chat message."""
        return {"role": "assistant", "content": self.text}

    def __str__(self) -> str:
        return self.text


class _Run:
    """One request in flight: its tokens so far and the text the engine found safe to show."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer):
        self.prompt, self.params, self.tok = prompt, params, tokenizer
        self.ids: list[int] = []
        self.pieces: list[str] = []  # all text so far
        self.unread: list[str] = []  # text not yet taken by a streaming reader
        self.logprobs: list[dict] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs = None
        self.done = False
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None

    def feed(self, o) -> None:
        """Take one of the engine's ``StepOutput``."""
        if o.token is not None:
            self.ids.append(o.token)
            if self.logprobs is not None:
                self.logprobs.append({"token_id": o.token, "token": self.tok.decode([o.token]),
                                      "logprob": o.logprob, "top_logprobs": list(o.top_logprobs or [])})
        if o.prompt_logprobs is not None:
            self.prompt_logprobs = o.prompt_logprobs
        if o.text:
            self.pieces.append(o.text)
            self.unread.append(o.text)
        if o.finished:
            self.done, self.finish_reason, self.stop_reason, self.error = True, o.finish_reason, o.stop_reason, \
                o.error

    def completion(self) -> Completion:
        return Completion("".join(self.pieces), list(self.ids), self.finish_reason, self.stop_reason,
                          list(self.prompt), self.logprobs, self.prompt_logprobs)


class LM:
    """A model, its tokenizer and its ``TokenSpec`` behind an engine: ``generate``, ``stream``, ``chat``.

    Engine options: ``num_blocks`` (KV blocks; default: room for two full contexts, between 2048 and 8192
    tokens), ``block_size``, ``max_batch_tokens``, ``max_running``; ``max_tokens`` caps the default length
    of a completion (a request may ask for more, up to what the context leaves).
    """

    def __init__(self, model, tokenizer, tokens=None, *, num_blocks: int | None = None, block_size: int = 16,
                 max_batch_tokens: int = 512, max_running: int = 64, max_tokens: int = 256):
        from ..tokenize.special import TokenSpec

        if tokenizer is None:
            raise ValueError("LM needs a tokenizer (the model directory has none)")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.tokens = tokens if tokens is not None else TokenSpec.for_tokenizer(tokenizer)
        self.tokens.check(tokenizer, model.cfg.vocab_size)
        self.max_context = model.cfg.max_seq_len
        self.default_max_tokens = max_tokens
        if num_blocks is None:  # a long-context model would otherwise take gigabytes of cache it rarely uses
            num_blocks = -(-min(max(2 * self.max_context, 2048), 8192) // block_size)
        self.engine = Engine(model, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                             max_running=max_running, eos_token_id=None, tokenizer=tokenizer)
        self._runs: dict[int, _Run] = {}

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", **engine_options) -> "LM":
        """An lmforge or HF model directory as an ``LM``."""
        return cls(*load_with_tokenizer(path, device=device), **engine_options)

    def __repr__(self) -> str:
        return (f"LM({self.model.cfg.hf_family}, {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                f"context {self.max_context}, chat template {self.tokens.template!r})")

    # ---- prompts and parameters ----
    def encode(self, text: str) -> list[int]:
        """A plain-text prompt's ids (BOS first, as the model saw documents)."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be a string or a list of token ids, got {type(text).__name__}")
        return self.tokens.encode_prompt(self.tokenizer, text)

    def encode_chat(self, messages) -> list[int]:
        """A conversation's prompt ids (the model's chat template, ending with the assistant's turn)."""
        return self.tokens.encode_chat(self.tokenizer, _messages(messages))

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            n = self.model.cfg.vocab_size
            bad = [t for t in prompt if not 0 <= t < n]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{n - 1})")
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a non-empty list of token ids, got {prompt!r:.80}")

    def sampling_params(self, prompt_len: int, sampling: dict, chat: bool = False,
                        where: str = "generate") -> SamplingParams:
        """``SamplingParams`` from keyword arguments: stop strings and the model's stop ids added,
        ``max_tokens`` defaulted to what the context leaves (capped) and checked against it."""
        unknown = [k for k in sampling if k not in SAMPLING_FIELDS]
        if unknown:
            raise TypeError(f"{where}() got an unexpected keyword argument {unknown[0]!r}; sampling options are: "
                            f"{', '.join(SAMPLING_FIELDS)}")
        kw = dict(sampling)
        stop = kw.pop("stop", None)
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        if not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop: expected a string or a list of strings, got {stop!r}")
        if chat:
            stop += [s for s in self.tokens.chat_stop if s not in stop]
        ids = list(kw.pop("stop_token_ids", None) or [])
        ids += [t for t in self.tokens.stop if t not in ids]  # ignore_eos=True: none of them ends the output
        left = self.max_context - prompt_len
        if left < 1:
            raise ValueError(f"the prompt is {prompt_len} tokens: it leaves no room in the model's context of "
                             f"{self.max_context} tokens" + (" (LM.fit_messages drops early turns)" if chat else ""))
        max_tokens = kw.pop("max_tokens", None)
        if max_tokens is None:
            max_tokens = min(left, self.default_max_tokens)
        elif isinstance(max_tokens, int) and max_tokens > left:
            raise ValueError(f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                             f"context of {self.max_context} tokens; at most {left} tokens can be generated")
        p = SamplingParams(max_tokens=max_tokens, stop=stop, stop_token_ids=ids, **kw)
        p.validate(self.model.cfg.vocab_size)
        return p

    # ---- the engine ----
    def _check(self, ids: list[int], params: SamplingParams) -> None:
        pool = self.engine.pool
        if pool.blocks_needed(len(ids) + params.max_tokens) > pool.num_blocks:
            raise ValueError(f"the request needs {len(ids) + params.max_tokens} tokens of KV cache; the engine has "
                             f"{pool.num_blocks * pool.block_size} (load the model with a larger num_blocks=)")

    def _submit(self, ids: list[int], params: SamplingParams) -> int:
        self._check(ids, params)
        rid = self.engine.add_request(ids, params)
        self._runs[rid] = _Run(ids, params, self.tokenizer)
        return rid

    def _step(self) -> None:
        outs = self.engine.step()
        if not outs and not self.engine.has_work():
            raise RuntimeError("the engine has no work left but requests are unfinished")
        for o in outs:
            run = self._runs.get(o.request_id)
            if run is not None and not run.done:
                run.feed(o)

    def _take(self, rid: int) -> Completion:
        run = self._runs.pop(rid)
        if run.finish_reason == "error":
            raise RuntimeError(f"the engine could not run this request: {run.error}")
        return run.completion()

    def _abort(self, rid: int) -> None:
        run = self._runs.pop(rid, None)
        if run is not None and not run.done:
            self.engine.abort(rid)

    def _stream(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Checked now; submitted when the first piece is asked for (a stream never read costs nothing), and
        aborted when the iterator is closed or dropped before the end."""
        self._check(ids, params)
        return self._pieces(ids, params)

    def _pieces(self, ids: list[int], params: SamplingParams) -> Iterator[str]:
        rid = self._submit(ids, params)
        run = self._runs[rid]
        try:
            while True:
                while run.unread:
                    yield run.unread.pop(0)
                if run.done:
                    if run.finish_reason == "error":
                        raise RuntimeError(f"the engine could not run this request: {run.error}")
                    return
                self._step()
        finally:
            self._abort(rid)

    # ---- generation ----
    def generate(self, prompts, **sampling):
        """Complete a prompt (a string, or a list of token ids) -> ``Completion``; a list of prompts -> a list
        of ``Completion``, run as one continuous batch. Keyword arguments are ``SamplingParams`` fields."""
        single = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and bool(prompts)
                                              and all(isinstance(t, int) for t in prompts))
        batch = [prompts] if single else prompts
        if not isinstance(batch, (list, tuple)):
            raise TypeError(f"generate() takes a prompt or a list of prompts, got {type(prompts).__name__}")
        if not batch:
            return []
        requests = []
        for x in batch:
            ids = self._prompt_ids(x)
            requests.append((ids, self.sampling_params(len(ids), sampling)))
        rids = []
        try:
            for ids, p in requests:
                rids.append(self._submit(ids, p))
            while not all(self._runs[r].done for r in rids):
                self._step()
        except BaseException:
            for r in rids:
                self._abort(r)
            raise
        runs = [self._runs.pop(r) for r in rids]
        bad = [k for k, r in enumerate(runs) if r.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"prompt {bad[0]}: the engine could not run this request: {runs[bad[0]].error}")
        outs = [r.completion() for r in runs]
        return outs[0] if single else outs

    def stream(self, prompt, **sampling) -> Iterator[str]:
        """Text pieces of one completion as they become safe to show (joined: ``generate``'s text)."""
        ids = self._prompt_ids(prompt)
        return self._stream(ids, self.sampling_params(len(ids), sampling, where="stream"))

    # ---- chat ----
    def chat(self, messages, stream: bool = False, **sampling):
        """The assistant's reply to a conversation (a list of ``{"role", "content"}``, or one string: one user
        turn) as a ``Completion`` (``.text``); with ``stream=True``, an iterator of text pieces. Stops at the
        model's stop ids and its chat stop strings (the plain template's next turn)."""
        if stream:
            return self.chat_stream(messages, **sampling)
        ids = self.encode_chat(messages)
        rid = self._submit(ids, self.sampling_params(len(ids), sampling, chat=True, where="chat"))
        try:
            while not self._runs[rid].done:
                self._step()
        except BaseException:
            self._abort(rid)
            raise
        return self._take(rid)

    def chat_stream(self, messages, **sampling) -> Iterator[str]:
        """``chat``'s reply as text pieces while it is generated."""
        ids = self.encode_chat(messages)
        return self._stream(ids, self.sampling_params(len(ids), sampling, chat=True, where="chat_stream"))

    def fit_messages(self, messages, reserve: int = 1) -> tuple[list[dict], int]:
        """(messages, how many were dropped): the oldest turns dropped until the prompt leaves ``reserve`` tokens
        of the context for the reply. A leading system message and the last message are kept; a conversation
        after the system message starts with a user turn (an assistant turn left first goes too). Raises
        ValueError when even those do not fit."""
        msgs = _messages(messages)
        if not isinstance(reserve, int) or not 0 < reserve < self.max_context:
            raise ValueError(f"reserve: expected 1..{self.max_context - 1} tokens, got {reserve!r}")
        head = msgs[:1] if msgs[0]["role"] in ("system", "developer") else []
        body = msgs[len(head):]
        budget = self.max_context - reserve
        dropped = 0
        while True:
            n = len(self.encode_chat(head + body))
            if n <= budget:
                return head + body, dropped
            if len(body) <= 1:
                what = "the system message and the last message need" if head else "the last message needs"
                raise ValueError(f"{what} {n} tokens; with {reserve} kept for the reply the model's context of "
                                 f"{self.max_context} tokens leaves {budget}")
            k = 1
            while k < len(body) - 1 and body[k]["role"] != "user":
                k += 1  # drop up to the next user turn
            body, dropped = body[k:], dropped + k


def _messages(messages) -> list[dict]:
    from ..tokenize.chat import normalize_messages

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return normalize_messages(messages)


def load_with_tokenizer(path: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer, ``TokenSpec``) of an lmforge or HF model directory, or of a quantized one
    (``lmforge quantize``'s output: ``quant.checkpoint.load_quantized``); one without a tokenizer is a
    ValueError (what generates text needs one)."""
    from ..model import load as load_model, load_tokens
    from ..quant.checkpoint import is_quantized, load_quantized

    model, tok = (load_quantized if is_quantized(path) else load_model)(path, device=device)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer in the model directory")
    return model, tok, load_tokens(path, tok)


def load(path: str | os.PathLike, device: str = "cpu", **engine_options) -> LM:
    """``LM.load``: an lmforge or HF model directory, ready to ``generate``, ``stream`` and ``chat``."""
    return LM.load(path, device=device, **engine_options)
