"""Sampling: from one row of logits to the next token, and text that streams safely.

Knows the sampling controls people expect from an OpenAI-style API and how to
apply them to a logits vector; knows nothing about models or batches (the
engine calls ``Sampler.sample`` once per sequence per step, so a request's output
never depends on what else is in the batch).

Order of the logits processors (as vLLM and HF apply them):
penalties (repetition on prompt + output; frequency and presence on the output),
logit bias, the stop tokens masked out until ``min_tokens`` were sampled, then
temperature, top-k, top-p, min-p, then a draw from the request's own seeded
generator (or the argmax when ``temperature == 0``).
Log-probabilities are those of the penalized, biased distribution before
temperature and truncation. Logits holding NaN raise ValueError (the engine then
ends that request alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128  # 0: prefill only (with prompt_logprobs: score a text, as lm-evaluation-harness does)
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages any token already in prompt or output
    frequency_penalty: float = 0.0  # logit -= f x (times the token appeared in the output)
    presence_penalty: float = 0.0  # logit -= p if the token appeared in the output
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit
    stop: list = field(default_factory=list)  # strings that end the output (cut before them; empty ones ignored)
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # also return the log-probability of the chosen and this many top tokens
    min_tokens: int = 0  # stop tokens are masked and stop strings ignored until this many tokens exist
    ignore_eos: bool = False  # the engine's eos and stop_token_ids do not end the output (stop strings still do)
    include_stop_str_in_output: bool = False  # keep the matched stop string at the end of the text
    prompt_logprobs: int | None = None  # log-probability of each prompt token (and this many top alternatives)

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError naming the first field that is out of range or of the wrong type."""
        def bad(f, msg):
            raise ValueError(f"{f}: {msg}")

        def integer(f, lo, hi=None, optional=False):
            v = getattr(self, f)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
                rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
                bad(f, f"must be an integer {rng}{' or None' if optional else ''}, got {v!r}")

        def number(f, lo, hi, lo_open=False):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v \
                    or not (lo < v if lo_open else lo <= v) or not v <= hi:
                bad(f, f"must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

        integer("max_tokens", 0)
        number("temperature", 0, 10)
        integer("top_k", 0)
        number("top_p", 0, 1, lo_open=True)
        number("min_p", 0, 1)
        number("repetition_penalty", 0, float("inf"), lo_open=True)
        number("frequency_penalty", -2, 2)
        number("presence_penalty", -2, 2)
        integer("logprobs", 0, 20, optional=True)
        integer("prompt_logprobs", 0, 20, optional=True)
        integer("seed", -(1 << 63), (1 << 64) - 1, optional=True)
        integer("min_tokens", 0, self.max_tokens if isinstance(self.max_tokens, int) else None)
        for f in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, f), bool):
                bad(f, f"must be true or false, got {getattr(self, f)!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(x, str) for x in self.stop):
            bad("stop", f"must be a list of strings, got {self.stop!r}")
        if not isinstance(self.logit_bias, dict):
            bad("logit_bias", f"must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        for t, b in self.logit_bias.items():
            if isinstance(b, bool) or not isinstance(b, (int, float)) or b != b:
                bad("logit_bias", f"the bias of token {t!r} must be a number, got {b!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        for f, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", list(self.stop_token_ids))):
            for t in ids:
                if isinstance(t, bool) or not isinstance(t, int):
                    bad(f, f"token ids must be integers, got {t!r}")
                if vocab_size is not None and not 0 <= t < vocab_size:
                    bad(f, f"token id {t} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """The per-request state: its generator and the counts of the tokens it produced.

    ``eos_token_id`` (the engine's) and ``params.stop_token_ids`` are masked out while fewer than
    ``params.min_tokens`` tokens were sampled (unless ``ignore_eos``: then they end nothing)."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None = None, vocab_size: int | None = None,
                 eos_token_id: int | None = None):
        params.validate(vocab_size)
        self.p = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()
        self.prompt = set(prompt_ids or [])
        self.counts: dict[int, int] = {}
        self.n = 0  # tokens sampled so far
        stops = set() if params.ignore_eos else set(params.stop_token_ids) | ({eos_token_id} - {None})
        self.min_mask = torch.tensor(sorted(stops), dtype=torch.long) if params.min_tokens and stops else None

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and logit bias applied to a float32 (V,) logits vector (a new tensor; the input itself
        when there is nothing to apply: ``sample`` never writes into it)."""
        p = self.p
        if not (p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty or p.logit_bias
                or (self.min_mask is not None and self.n < p.min_tokens)):
            return logits.float()  # a greedy decode step pays no copy of the vocabulary
        x = logits.float().clone()
        if p.repetition_penalty != 1.0 and (self.prompt or self.counts):
            seen = torch.tensor(sorted(self.prompt | set(self.counts)), dtype=torch.long)
            v = x[seen]
            x[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if self.counts and (p.frequency_penalty or p.presence_penalty):
            ids = torch.tensor(list(self.counts), dtype=torch.long)
            cnt = torch.tensor([self.counts[i] for i in self.counts], dtype=x.dtype)
            x[ids] -= p.frequency_penalty * cnt + p.presence_penalty
        for t, b in p.logit_bias.items():
            x[int(t)] += float(b)
        if self.min_mask is not None and self.n < p.min_tokens:
            x[self.min_mask] = -float("inf")
        return x

    @property
    def plain_greedy(self) -> bool:
        """True when ``sample(x)`` is the argmax of ``x`` itself (temperature 0; no penalty, bias,
        min_tokens mask or logprobs at this step): the engine then takes the argmax of a whole batch at
        once and hands each token to ``accept``."""
        p = self.p
        return (p.temperature == 0 and p.logprobs is None and p.repetition_penalty == 1.0 and not p.frequency_penalty
                and not p.presence_penalty and not p.logit_bias
                and (self.min_mask is None or self.n >= p.min_tokens))

    def accept(self, tok: int) -> Sampled:
        """Record ``tok`` as this step's token, chosen outside (the argmax when ``plain_greedy``): the same
        state as if ``sample`` had chosen it."""
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.n += 1
        return Sampled(tok)

    def sample(self, logits: torch.Tensor) -> Sampled:
        p = self.p
        x = self.process(logits)
        lp = None
        if p.logprobs is not None:
            lp = torch.log_softmax(x, -1)
        if p.temperature == 0:
            top, tok = torch.max(x, 0)  # NaN counts as the maximum: checking the top checks them all
            if math.isnan(top.item()):
                self._nan(x)
            tok = int(tok)
        else:
            x = x / p.temperature
            if p.top_k and p.top_k < x.numel():
                kth = torch.topk(x, p.top_k).values[-1]
                x = x.masked_fill(x < kth, -float("inf"))
            if p.top_p < 1.0:
                sorted_x, idx = torch.sort(x, descending=True)
                probs = torch.softmax(sorted_x, -1)
                cum = probs.cumsum(-1)
                drop = cum - probs >= p.top_p  # keep the smallest prefix reaching top_p (at least one)
                sorted_x = sorted_x.masked_fill(drop, -float("inf"))
                x = torch.full_like(x, -float("inf")).scatter(0, idx, sorted_x)
            if p.min_p > 0:
                probs = torch.softmax(x, -1)
                x = x.masked_fill(probs < p.min_p * probs.max(), -float("inf"))
            try:
                tok = int(torch.multinomial(torch.softmax(x, -1), 1, generator=self.generator))
            except RuntimeError:  # NaN in the logits, or every token masked out
                if torch.isnan(x).any():
                    self._nan(x)
                raise ValueError("no token can be sampled: every token's probability is 0 (logit bias, "
                                 "stop tokens masked by min_tokens, or -inf logits)") from None
        self.counts[tok] = self.counts.get(tok, 0) + 1
        self.n += 1
        out = Sampled(tok)
        if lp is not None:
            out.logprob = float(lp[tok])
            if p.logprobs:
                v, i = torch.topk(lp, p.logprobs)
                out.top_logprobs = [(int(a), float(b)) for a, b in zip(i, v)]
        return out

    @staticmethod
    def _nan(x: torch.Tensor):
        bad = torch.nonzero(torch.isnan(x)).flatten()[:5].tolist()
        raise ValueError(f"the logits hold NaN at token ids {bad} (the model's output is not finite)")


class TextStream:
    """Turns tokens into text pieces that never split a UTF-8 character and never show
    the beginning of a stop string before it is known not to be one.

    At a stop string, ``stopped`` is set, ``stop_reason`` is the string matched (the one that
    starts first) and the text is cut before it (after it with ``include_stop``). ``push(t,
    check_stop=False)`` adds text in which no stop string may end (``min_tokens``); a stop
    string that begins there and ends in later text still counts."""

    def __init__(self, tokenizer, stop: list[str] | None = None, include_stop: bool = False):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop
        self.buf = b""  # bytes not yet decodable
        self.pending = ""  # text held back: it may begin a stop string
        self.floor = 0  # no stop string may end within pending[:floor] (it was pushed unchecked)
        self.stopped = False
        self.stop_reason: str | None = None

    def push(self, token_id: int, check_stop: bool = True) -> str:
        """Text that can be shown now ('' if nothing yet). Sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        self.buf += self.tok.decode_bytes([token_id])
        text, self.buf = _split_utf8(self.buf)
        return self._emit(self.pending + text, check_stop)

    def _emit(self, text: str, check: bool = True) -> str:
        if check:
            first = None  # (start, stop string) of the match that starts first
            for s in self.stop:
                i = text.find(s)
                while 0 <= i and i + len(s) <= self.floor:
                    i = text.find(s, i + 1)
                if i >= 0 and (first is None or i < first[0]):
                    first = (i, s)
            if first is not None:
                i, s = first
                self.stopped, self.stop_reason = True, s
                self.pending, self.buf = "", b""
                return text[: i + len(s)] if self.include_stop else text[:i]
        hold = 0  # the longest tail that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        self.floor = 0 if check else len(self.pending)
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The rest at the end of generation (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        out = self.pending + self.buf.decode("utf-8", errors="replace")
        self.pending, self.buf, self.floor = "", b"", 0
        return out


def _split_utf8(b: bytes) -> tuple[str, bytes]:
    """(decodable prefix, incomplete character at the end: at most 3 bytes). Invalid bytes
    elsewhere become U+FFFD."""
    n = len(b)
    for i in range(n - 1, max(-1, n - 4), -1):
        c = b[i]
        if c & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        if c >= 0xC0:
            need = 2 if c < 0xE0 else 3 if c < 0xF0 else 4
            if n - i < need:
                return b[:i].decode("utf-8", errors="replace"), b[i:]
        break
    return b.decode("utf-8", errors="replace"), b""
