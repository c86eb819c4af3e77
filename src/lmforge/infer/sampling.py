"""Sampling: from one row of logits to the next token, and text that streams safely.

Knows the sampling controls people expect from an OpenAI-style API and how to
apply them to a logits vector; knows nothing about models or batches (the
engine calls ``Sampler.sample`` once per sequence per step, so a request's output
never depends on what else is in the batch).

Order of the logits processors (as vLLM and HF apply them):
penalties (repetition on prompt + output; frequency and presence on the output),
logit bias, then temperature, top-k, top-p, min-p, then a draw from the
request's own seeded generator (or the argmax when ``temperature == 0``).
Log-probabilities are those of the penalized, biased distribution before
temperature and truncation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages any token already in prompt or output
    frequency_penalty: float = 0.0  # logit -= f x (times the token appeared in the output)
    presence_penalty: float = 0.0  # logit -= p if the token appeared in the output
    logit_bias: dict = field(default_factory=dict)  # token id -> added to its logit
    stop: list = field(default_factory=list)  # strings that end the output (not included)
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # also return the log-probability of the chosen and this many top tokens

    def validate(self, vocab_size: int | None = None) -> None:
        def bad(f, msg):
            raise ValueError(f"{f}: {msg}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be a positive integer, got {self.max_tokens!r}")
        if not 0 <= self.temperature <= 10:
            bad("temperature", f"must be in [0, 10], got {self.temperature}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for f in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, f) <= 2:
                bad(f, f"must be in [-2, 2], got {getattr(self, f)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", f"must be in [0, 20], got {self.logprobs}")
        if vocab_size is not None:
            for t in list(self.logit_bias) + list(self.stop_token_ids):
                if not 0 <= int(t) < vocab_size:
                    bad("logit_bias/stop_token_ids", f"token id {t} is outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """The per-request state: its generator and the counts of the tokens it produced."""

    def __init__(self, params: SamplingParams, prompt_ids: list[int] | None = None, vocab_size: int | None = None):
        params.validate(vocab_size)
        self.p = params
        self.generator = torch.Generator(device="cpu")
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()
        self.prompt = set(prompt_ids or [])
        self.counts: dict[int, int] = {}

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalties and logit bias applied to a float32 (V,) logits vector (a new tensor)."""
        p = self.p
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
        return x

    def sample(self, logits: torch.Tensor) -> Sampled:
        p = self.p
        x = self.process(logits)
        lp = None
        if p.logprobs is not None:
            lp = torch.log_softmax(x, -1)
        if p.temperature == 0:
            tok = int(torch.argmax(x))
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
            tok = int(torch.multinomial(torch.softmax(x, -1), 1, generator=self.generator))
        self.counts[tok] = self.counts.get(tok, 0) + 1
        out = Sampled(tok)
        if lp is not None:
            out.logprob = float(lp[tok])
            if p.logprobs:
                v, i = torch.topk(lp, p.logprobs)
                out.top_logprobs = [(int(a), float(b)) for a, b in zip(i, v)]
        return out


class TextStream:
    """Turns tokens into text pieces that never split a UTF-8 character and never show
    the beginning of a stop string before it is known not to be one."""

    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.buf = b""  # bytes not yet decodable
        self.pending = ""  # text held back: it may begin a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Text that can be shown now ('' if nothing yet). Sets ``stopped`` at a stop string."""
        if self.stopped:
            return ""
        self.buf += self.tok.decode_bytes([token_id])
        text, self.buf = _split_utf8(self.buf)
        return self._emit(self.pending + text)

    def _emit(self, text: str) -> str:
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                self.stopped = True
                self.pending = ""
                return text[:i]
        hold = 0  # the longest tail that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The rest at the end of generation (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        out = self.pending + self.buf.decode("utf-8", errors="replace")
        self.pending, self.buf = "", b""
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
