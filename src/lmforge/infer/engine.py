"""The engine: continuous batching over a paged KV cache.

Knows requests, the scheduler and the step loop; knows nothing about HTTP (the
server sits on top) and tokenizes nothing: it works on token ids, and, given a
tokenizer, detokenizes its outputs incrementally to apply stop strings. Every step:

1. admit waiting requests while blocks and the token budget allow; a prompt
   longer than what is left of the budget is prefilled in chunks over several
   steps (chunked prefill);
2. run one forward over the batch: every running sequence's next token (decode)
   and the prefill chunks. With the C step (``fastpath``; CPU float32) that is one
   call whose rows are single tokens: a chunk is its tokens at consecutive positions
   of one sequence (no padding), the output head at its last one only; chunks whose
   padding would cost PyTorch less (``Engine.c_prefill_padding``) run there. A step with
   a row that scores its prompt (``prompt_logprobs``: logits at every position), or a
   model whose forward was replaced or hooked after the engine was built, runs its
   chunks in PyTorch as rows of one ``PagedBatch`` (the decode rows stay in C);
3. sample each finished row with its own ``Sampler`` (so its output does not
   depend on the rest of the batch; the rows whose sampler is ``plain_greedy`` share
   one argmax over their logits, the same max each would take), retire sequences that stopped and free
   their blocks; when a decode step has no free block, the most recently
   admitted sequence is preempted (its blocks freed, its tokens kept) and
   recomputed when blocks are free again.

One bad request cannot stop the others: ``add_request`` checks everything it can
before admission (ValueError naming the value); if the batched forward raises,
each planned row is run again alone (as vLLM isolates a failing request) and the
rows that still fail, and any request whose sampling or detokenization raises,
finish with ``finish_reason == "error"`` and the message in ``StepOutput.error``;
the others go on. A finished request leaves ``Engine.requests`` once ``step``
has returned its final ``StepOutput``.

``StepOutput`` (one per request per step that produced something):

* ``token``: the new token id (None when there is none: ``max_tokens == 0`` or an error);
* ``text``: the new text that is safe to show (with a tokenizer; '' without): never
  half a UTF-8 character, never the start of a possible stop string;
* ``finished``, ``finish_reason`` ("stop", "length" or "error"), ``stop_reason`` (the
  matched stop string, or the stop token id; None for the engine's eos and otherwise);
* ``logprob``, ``top_logprobs`` (with ``logprobs``), ``error`` (with "error");
* ``prompt_logprobs`` (with ``prompt_logprobs``), on the request's first StepOutput only:
  one ``(logprob, [(id, logprob), ...top k])`` per prompt token given the ones before it,
  ``(None, [])`` for the first; the raw model distribution (no penalties, no temperature).

Tokens and text of a stopped request: ``Request.output`` keeps every sampled token,
including the one that completed a stop string or that is a stop token; ``Request.text``
is the decoded output cut before the stop string (after it with
``include_stop_str_in_output``), without the stop token.
"""
from __future__ import annotations

import itertools
import logging
import operator
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .paged import BlockPool, PagedBatch, Sequence, block_hashes
from .fastpath import FastDecoder
from .sampling import Sampler, SamplingParams, TextStream

log = logging.getLogger(__name__)


@dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    output: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    seq: Sequence | None = None
    done_tokens: int = 0  # tokens of prompt + output already in the cache
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    text: str = ""  # the output's text so far (with a tokenizer)
    stream: TextStream | None = None
    prompt_logprobs: list | None = None  # filled position by position while the prompt is prefilled
    hashes: list = field(default_factory=list)  # chained hashes of this sequence's full blocks
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclass
class StepOutput:
    request_id: int
    token: int | None
    finished: bool
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: list | None = None
    text: str = ""
    stop_reason: int | str | None = None
    error: str | None = None
    prompt_logprobs: list | None = None


class Engine:
    _all_logits = False  # True: the head over every real position of a prefill (the old way; benchmarks time it)
    # prefill chunks go through the C step (rows of real tokens only) when the PyTorch forward would run at least
    # this many times their tokens (rows padded to the longest): per token, its matrix products (MKL) beat the C
    # step's on chunks of equal length (measured, 1 thread: 0.9x at 0.5M parameters, 0.7x at 6M, 0.56x at 40M),
    # while 64 prompts of 10-70 tokens (padding 1.8x) ran 2.2x, 1.5x and 1.3x faster in C
    c_prefill_padding = 1.5

    def __init__(self, model, num_blocks: int = 512, block_size: int = 16, max_batch_tokens: int = 512,
                 max_running: int = 64, eos_token_id: int | None = None, tokenizer=None):
        for name, v in (("max_batch_tokens", max_batch_tokens), ("max_running", max_running)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cfg = model.cfg
        if eos_token_id is not None and not 0 <= eos_token_id < self.cfg.vocab_size:
            raise ValueError(f"eos_token_id {eos_token_id} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        specs = model.cache_specs()
        self.pool = BlockPool(specs, num_blocks, block_size, self.device, self.dtype)
        # a block's contents name its prefix only when every layer keeps per-token entries
        self.prefix_caching = all(s.token_indexed for s in specs)
        self._notes = []  # logged (INFO) once, at the first step: what this engine runs with
        if not self.prefix_caching:
            self._notes.append(("prefix caching is off: layers %s keep a per-sequence state, not per-token "
                                "entries", [i for i, s in enumerate(specs) if not s.token_indexed]))
        self.fast = None  # decode rows in one C call per step (CPU float32), prefill chunks in PyTorch
        why = FastDecoder.why_not(self.model)
        if why is None:
            self.fast = FastDecoder(self.model)
            self.fast.bind(self.pool.k, self.pool.v)
            self._notes.append(("decode path: the C step (lmforge.infer.fastpath)",))
        else:
            self._notes.append(("decode path: PyTorch (the C step declined: %s)", why))
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.eos = eos_token_id
        self.tokenizer = tokenizer
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}  # not yet finished, or finished in the step being returned
        self._ids = itertools.count()
        self.stats = {"steps": 0, "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "prompt_tokens": 0, "prefix_hit_tokens": 0,
                      # continuous batching at work: steps whose forward ran more than one sequence
                      "multi_sequence_steps": 0, "max_sequences_in_step": 0,
                      # how requests ended: finished (stop or length), errored, aborted
                      "requests_finished": 0, "requests_errored": 0, "requests_aborted": 0}

    # ---- requests ----
    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        """Queue a request; raises ValueError (naming the value) for anything it could not run."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        V = self.cfg.vocab_size
        params.validate(V)
        prompt = self._check_prompt(prompt, V)
        limit, total = self.cfg.max_seq_len, len(prompt) + params.max_tokens
        if total > limit:
            raise ValueError(f"this model's maximum context length is {limit} tokens, but {total} were requested "
                             f"({len(prompt)} in the prompt, {params.max_tokens} for the completion): that exceeds "
                             f"the model's context; reduce the prompt or max_tokens")
        need = self.pool.blocks_needed(total)
        if need > self.pool.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks ({total} tokens); the pool has "
                             f"{self.pool.num_blocks} of {self.pool.block_size} tokens")
        if any(params.stop) and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop!r} need a tokenizer: build the Engine with tokenizer=...")
        rid = next(self._ids)
        req = Request(rid, prompt, params, Sampler(params, prompt, V, None if params.ignore_eos else self.eos))
        if self.tokenizer is not None:
            req.stream = TextStream(self.tokenizer, params.stop, params.include_stop_str_in_output)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [(None, [])]
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    @staticmethod
    def _check_prompt(prompt, vocab_size: int) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            raise ValueError("the prompt must be a list of token ids, got text (tokenize it first)")
        try:
            ids = list(prompt)
        except TypeError:
            raise ValueError(f"the prompt must be a list of token ids, got {type(prompt).__name__}") from None
        if not ids:
            raise ValueError("the prompt is empty: it needs at least one token")
        out = []
        for i, t in enumerate(ids):
            try:
                if isinstance(t, bool):
                    raise TypeError
                t = operator.index(t)
            except TypeError:
                raise ValueError(f"prompt token at position {i} is not an integer token id: {t!r} "
                                 f"({type(t).__name__})") from None
            if not 0 <= t < vocab_size:
                raise ValueError(f"prompt token id {t} at position {i} is outside the vocabulary "
                                 f"(0..{vocab_size - 1})")
            out.append(t)
        return out

    def abort(self, rid: int) -> None:
        """Stop a request (e.g. its client went away), free its blocks and forget it."""
        req = self.requests.pop(rid, None)
        if req is None or req.finished:
            return
        self._finish(req, "abort")
        if req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self) -> int:
        return len(self.running)

    def kv_usage(self) -> float:
        """Fraction of the KV blocks held by sequences (cached prefixes nobody uses count as free)."""
        return 1.0 - self.pool.available() / self.pool.num_blocks

    # ---- the step ----
    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
        key = {"abort": "requests_aborted", "error": "requests_errored"}.get(reason, "requests_finished")
        self.stats[key] += 1
        if req.seq is not None:
            self.pool.release(req.seq.blocks)
            req.seq = None
        if req in self.running:
            self.running.remove(req)

    def _preempt(self, req: Request) -> None:
        self.pool.release(req.seq.blocks)
        req.seq, req.done_tokens, req.hashes = None, 0, []
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _schedule(self) -> list[tuple[Request, int]]:
        """(request, new tokens to run) for this step."""
        plan: list[tuple[Request, int]] = []
        budget = self.max_batch_tokens
        # decode: every running sequence whose prompt is fully cached takes one token
        for req in list(self.running):
            if req.seq is None or req.done_tokens < len(req.tokens) - 1:
                continue  # preempted above, or still prefilling (handled below)
            while not self._reserve(req, 1):  # out of blocks: recompute the newest sequence later
                victim = self.running[-1]
                self._preempt(victim)
                plan = [(r, n) for r, n in plan if r is not victim]
                if victim is req:
                    break
            if req.seq is None:
                continue
            plan.append((req, 1))
            budget -= 1
        # continue prefills of running sequences, then admit new ones
        for req in self.running:
            left = len(req.tokens) - req.done_tokens
            if left > 1 and budget > 0 and all(r is not req for r, _ in plan):
                n = min(left, budget)
                if self._reserve(req, n):
                    plan.append((req, n))
                    budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            req = self.waiting[0]
            req.seq = Sequence()
            self._attach_prefix(req)
            n = min(len(req.tokens) - req.done_tokens, budget)
            if not self._reserve(req, n):
                self.pool.release(req.seq.blocks)
                req.seq, req.done_tokens = None, 0
                break
            self.waiting.popleft()
            self.running.append(req)
            plan.append((req, n))
            budget -= n
        return plan

    def _attach_prefix(self, req: Request) -> None:
        """Reuse cached blocks for the longest known prefix (at least one token is left to compute)."""
        bs = self.pool.block_size
        toks = req.tokens
        # prompt log-probabilities need the logits of every prompt position: no skipping until they exist
        skip = self._scoring_prompt(req) or not self.prefix_caching
        req.hashes = [] if skip else block_hashes(toks[: len(toks) - 1], bs)
        blocks = self.pool.lookup(req.hashes)
        req.hashes = req.hashes[: len(blocks)]
        req.seq.blocks = blocks
        req.seq.length = req.done_tokens = len(blocks) * bs
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["prefix_hit_tokens"] += min(req.done_tokens, len(req.prompt))

    @staticmethod
    def _scoring_prompt(req: Request) -> bool:
        """Whether the request still wants log-probabilities of prompt positions (logits at each one)."""
        return req.prompt_logprobs is not None and len(req.prompt_logprobs) < len(req.prompt)

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        full = req.seq.length // bs
        if full > len(req.hashes) and self.prefix_caching:
            prev = req.hashes[-1] if req.hashes else None
            new = block_hashes(req.tokens[: full * bs], bs, len(req.hashes), prev)
            for j, h in enumerate(new, start=len(req.hashes)):
                self.pool.register(req.seq.blocks[j], h)
            req.hashes += new

    def prefix_hit_rate(self) -> float:
        return self.stats["prefix_hit_tokens"] / max(1, self.stats["prompt_tokens"])

    def _reserve(self, req: Request, n: int) -> bool:
        need = self.pool.blocks_needed(req.seq.length + n) - len(req.seq.blocks)
        if need > self.pool.available():
            return False
        req.seq.ensure(self.pool, req.seq.length + n)
        return True

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        for note in self._notes:
            log.info(*note)
        self._notes = []
        plan = self._schedule()
        if not plan:
            return []
        logits, outs = self._forward_isolated(plan)
        self.stats["steps"] += 1
        self.stats["multi_sequence_steps"] += len(plan) > 1
        self.stats["max_sequences_in_step"] = max(self.stats["max_sequences_in_step"], len(plan))
        greedy = self._greedy_tokens(plan, logits)
        for (req, n), lg, tok in zip(plan, logits, greedy):
            if lg is None:
                continue  # its forward failed: already finished with an error
            try:
                o = self._advance(req, n, lg, tok)
            except Exception as e:  # sampling or detokenization: this request alone ends
                o = self._fail(req, e)
            if o is not None:
                outs.append(o)
        for o in outs:
            if o.finished:
                self.requests.pop(o.request_id, None)
        return outs

    @staticmethod
    def _greedy_tokens(plan: list[tuple[Request, int]], logits: list) -> list[int | None]:
        """The next token of every row that samples this step with a ``plain_greedy`` sampler: one argmax over
        those rows' logits at once (the token ``torch.max`` gives in each ``Sampler.sample``: the first maximum);
        None for the others (and for a row whose top logit is NaN: its own sampler raises the error)."""
        rows = [j for j, ((req, n), lg) in enumerate(zip(plan, logits))
                if lg is not None and req.done_tokens + n == len(req.tokens) and req.params.max_tokens
                and req.sampler.plain_greedy]
        out: list[int | None] = [None] * len(plan)
        if len(rows) < 2:
            return out
        # numpy, one thread: between two C steps, a torch op over the batch would wake torch's own thread pool,
        # whose spinning threads then compete with the C step's (measured: the whole generation 1.6x slower on 2
        # busy cores). The first index of the maximum, as torch.max gives (checked with ties in the tests).
        x = np.stack([logits[j][-1].float().numpy() for j in rows])
        top, tok = x.max(1), x.argmax(1)
        for j, v, t in zip(rows, top.tolist(), tok.tolist()):
            if v == v:  # not NaN
                out[j] = t
        return out

    def _forward_isolated(self, plan: list[tuple[Request, int]]) -> tuple[list, list[StepOutput]]:
        """The rows' logits; if the batched forward raises, each row is run alone and the ones
        that still fail are finished with an error (their logits are None)."""
        lengths = [req.seq.length for req, _ in plan]
        try:
            return self._forward(plan), []
        except Exception as e:
            first = e
        for (req, _), n in zip(plan, lengths):  # a failed forward may have advanced some rows
            req.seq.length = n
        if len(plan) == 1:
            return [None], [self._fail(plan[0][0], first)]
        logits, outs = [], []
        for (req, n), length in zip(plan, lengths):
            try:
                logits.append(self._forward([(req, n)])[0])
            except Exception as e:
                req.seq.length = length
                logits.append(None)
                outs.append(self._fail(req, e))
        return logits, outs

    def _fail(self, req: Request, exc: BaseException) -> StepOutput:
        msg = f"{type(exc).__name__}: {exc}"
        log.error("request %d failed and was stopped: %s", req.id, msg, exc_info=exc)
        req.error = msg
        self._finish(req, "error")
        return StepOutput(req.id, None, True, "error", error=msg)

    def _advance(self, req: Request, n: int, lg: torch.Tensor, token: int | None = None) -> StepOutput | None:
        """Account for ``n`` tokens run with logits ``lg``: (n, vocab) while scoring the prompt, else
        (1, vocab) of the last one; sample when the prompt is done (``token``: the argmax already taken for a
        ``plain_greedy`` sampler, see ``_greedy_tokens``)."""
        start = req.done_tokens
        req.done_tokens += n
        self._register_full_blocks(req)
        if n > 1 or req.done_tokens < len(req.prompt):
            self.stats["prefill_tokens"] += n
        else:
            self.stats["decode_tokens"] += n
        if self._scoring_prompt(req):
            self._collect_prompt_logprobs(req, start, lg)
        if req.done_tokens < len(req.tokens):
            return None  # a prefill chunk that has not reached the end of the prompt
        first = not req.output
        p = req.params
        if p.max_tokens == 0:  # prefill only
            self._finish(req, "length")
            return StepOutput(req.id, None, True, "length", prompt_logprobs=req.prompt_logprobs)
        s = req.sampler.sample(lg[-1]) if token is None else req.sampler.accept(token)
        t = s.token
        req.output.append(t)
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        reason = stop_reason = None
        text = ""
        count = len(req.output)
        if not p.ignore_eos and count >= p.min_tokens and (t == self.eos or t in p.stop_token_ids):
            reason = "stop"
            stop_reason = t if t in p.stop_token_ids else None
            if req.stream is not None:
                text = req.stream.flush()
        else:
            if req.stream is not None:
                text = req.stream.push(t, check_stop=count >= p.min_tokens)
                if req.stream.stopped:
                    reason, stop_reason = "stop", req.stream.stop_reason
            if reason is None and count >= p.max_tokens:
                reason = "length"
                if req.stream is not None:
                    text += req.stream.flush()
        req.text += text
        req.stop_reason = stop_reason
        if reason:
            self._finish(req, reason)
        return StepOutput(req.id, t, reason is not None, reason, s.logprob, s.top_logprobs, text, stop_reason,
                          prompt_logprobs=req.prompt_logprobs if first else None)

    def _collect_prompt_logprobs(self, req: Request, start: int, lg: torch.Tensor) -> None:
        """Row ``j`` of ``lg`` is the distribution of position ``start + j + 1``: keep those of the
        prompt positions not yet scored (a recomputed prefix after preemption is not scored twice)."""
        lo = len(req.prompt_logprobs)  # the next prompt position to score
        hi = min(start + len(lg), len(req.prompt) - 1)  # the last one these logits reach
        if lo > hi:
            return
        if lo < start + 1:
            raise RuntimeError(f"prompt logprobs: position {lo} was skipped (prefix cached?)")
        lp = torch.log_softmax(lg[lo - start - 1: hi - start].float(), -1)
        ids = torch.tensor(req.prompt[lo:hi + 1], device=lp.device)
        chosen = lp.gather(1, ids[:, None])[:, 0].tolist()
        k = req.params.prompt_logprobs
        if k:
            v, ix = torch.topk(lp, k, dim=-1)
            tops = [list(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())]
        else:
            tops = [[] for _ in chosen]
        req.prompt_logprobs += list(zip(chosen, tops))

    def _forward(self, plan: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """Each planned row's logits for its n new tokens, writing their keys/values: (n, vocab) for a
        row scoring its prompt (``prompt_logprobs``), else (1, vocab) at its last real position only
        (``forward(logits_at=...)``: the head is not run over the rest of a prefill chunk, nor over the
        padding)."""
        out: list[torch.Tensor | None] = [None] * len(plan)
        multi = list(range(len(plan)))
        if self.fast is not None:
            # decode rows go through the C step, and so do prefill chunks when no row of the step needs logits at
            # every position and padding would cost PyTorch more (``c_prefill_padding``): a chunk is then its tokens
            # as rows of one sequence at consecutive positions (no padding), the head at its last row only. A row
            # scoring its prompt (prompt_logprobs) runs in PyTorch, and the step's other chunks join that forward
            chunks = [n for _, n in plan if n > 1]
            torch_rows = self._all_logits or self._forward_swapped() or any(
                n > 1 and self._scoring_prompt(req) for req, n in plan) or (
                chunks and len(chunks) * max(chunks) < self.c_prefill_padding * sum(chunks))
            fast = [i for i, (_, n) in enumerate(plan) if n == 1 or not torch_rows]
            multi = [i for i, (_, n) in enumerate(plan) if n > 1 and torch_rows]
            if fast:
                toks, pos, tabs, last = [], [], [], []
                for i in fast:
                    req, n = plan[i]
                    s, d = req.seq, req.done_tokens
                    toks += req.tokens[d:d + n] if n > 1 else [req.tokens[d]]
                    pos += range(s.length, s.length + n)
                    tabs += [s.blocks] * n
                    last.append(len(toks) - 1)
                lg = self.fast.step(toks, pos, tabs, last if len(last) < len(toks) else None)
                for j, i in enumerate(fast):
                    plan[i][0].seq.length += plan[i][1]
                    out[i] = lg[j:j + 1]
        if multi:
            T = max(plan[i][1] for i in multi)
            rows = []
            for i in multi:
                req, n = plan[i]
                toks = req.tokens[req.done_tokens:req.done_tokens + n]
                rows.append(toks + [0] * (T - n))
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            batch = PagedBatch(self.pool, [plan[i][0].seq for i in multi], [plan[i][1] for i in multi], T,
                               self.device)
            at = []  # each row's positions that need logits: all n while scoring its prompt, else the last
            for i in multi:
                req, n = plan[i]
                at.append(list(range(n)) if self._all_logits or self._scoring_prompt(req) else [n - 1])
            W = max(len(a) for a in at)
            at_t = torch.tensor([a + a[-1:] * (W - len(a)) for a in at], dtype=torch.long, device=self.device)
            # hidden states of every position, the head only at ``at``; writes the new keys/values and
            # advances each sequence
            lg = self.model(idx, cache=batch, logits_at=at_t)
            for j, (i, a) in enumerate(zip(multi, at)):
                out[i] = lg[j, :len(a)]
        return out

    def _forward_swapped(self) -> bool:
        """Whether the model's forward was replaced or hooked after the engine was built (a wrapper, an
        injected failure): the C step mirrors the plain forward (``FastDecoder.why_not`` declines such a model
        at build time), so prefill chunks then go through the model's own forward."""
        m = self.model
        return "forward" in vars(m) or bool(getattr(m, "_forward_hooks", None)) \
            or bool(getattr(m, "_forward_pre_hooks", None))

    def run(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion (all admitted at once); returns each one's output ids (for a
        request that ended with an error, the tokens it had; the error is logged)."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        reqs = [self.requests[self.add_request(p, q)] for p, q in zip(prompts, plist)]
        self.run()
        return [r.output for r in reqs]
