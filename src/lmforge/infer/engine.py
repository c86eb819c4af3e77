"""The engine: continuous batching over a paged KV cache.

Knows requests, the scheduler and the step loop; knows nothing about
tokenization or HTTP (it works on token ids; the server and ``generate`` sit on
top). Every step:

1. admit waiting requests while blocks and the token budget allow; a prompt
   longer than what is left of the budget is prefilled in chunks over several
   steps (chunked prefill);
2. run one forward over the batch: every running sequence's next token (decode)
   and the prefill chunks, as rows of one ``PagedBatch``;
3. sample each finished row with its own ``Sampler`` (so its output does not
   depend on the rest of the batch), retire sequences that stopped and free
   their blocks; when a decode step has no free block, the most recently
   admitted sequence is preempted (its blocks freed, its tokens kept) and
   recomputed when blocks are free again.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .paged import BlockPool, PagedBatch, Sequence, block_hashes
from .fastpath import FastDecoder
from .sampling import Sampler, SamplingParams


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


class Engine:
    def __init__(self, model, num_blocks: int = 512, block_size: int = 16, max_batch_tokens: int = 512,
                 max_running: int = 64, eos_token_id: int | None = None):
        self.model = model.eval()
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.cfg = model.cfg
        self.pool = BlockPool(self.cfg, num_blocks, block_size, self.device, self.dtype)
        self.fast = None  # decode rows in one C call per step (CPU float32), prefill chunks in PyTorch
        if FastDecoder.supported(self.model):
            self.fast = FastDecoder(self.model)
            self.fast.bind(self.pool.k, self.pool.v)
        self.max_batch_tokens, self.max_running = max_batch_tokens, max_running
        self.eos = eos_token_id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self._ids = itertools.count()
        self.stats = {"steps": 0, "preemptions": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "prompt_tokens": 0, "prefix_hit_tokens": 0,
                      # continuous batching at work: steps whose forward ran more than one sequence
                      "multi_sequence_steps": 0, "max_sequences_in_step": 0}

    # ---- requests ----
    def add_request(self, prompt: list[int], params: SamplingParams | None = None) -> int:
        params = params or SamplingParams()
        if not prompt:
            raise ValueError("the prompt is empty")
        limit = self.cfg.max_seq_len
        if self.cfg.pos == "learned" and len(prompt) + params.max_tokens > limit:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"model's context of {limit} tokens")
        need = self.pool.blocks_needed(len(prompt) + params.max_tokens)
        if need > self.pool.num_blocks:
            raise ValueError(f"the request needs {need} KV blocks; the pool has {self.pool.num_blocks}")
        rid = next(self._ids)
        req = Request(rid, list(prompt), params, Sampler(params, prompt, self.cfg.vocab_size))
        self.requests[rid] = req
        self.waiting.append(req)
        return rid

    def abort(self, rid: int) -> None:
        """Stop a request (e.g. its client went away) and free its blocks."""
        req = self.requests.get(rid)
        if req is None or req.finished:
            return
        self._finish(req, "abort")
        if req in self.waiting:
            self.waiting.remove(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the step ----
    def _finish(self, req: Request, reason: str) -> None:
        req.finished, req.finish_reason = True, reason
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
        req.hashes = block_hashes(toks[: len(toks) - 1], bs)
        blocks = self.pool.lookup(req.hashes)
        req.hashes = req.hashes[: len(blocks)]
        req.seq.blocks = blocks
        req.seq.length = req.done_tokens = len(blocks) * bs
        self.stats["prompt_tokens"] += len(req.prompt)
        self.stats["prefix_hit_tokens"] += min(req.done_tokens, len(req.prompt))

    def _register_full_blocks(self, req: Request) -> None:
        bs = self.pool.block_size
        full = req.seq.length // bs
        if full > len(req.hashes):
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
        plan = self._schedule()
        if not plan:
            return []
        logits = self._forward(plan)
        self.stats["steps"] += 1
        self.stats["multi_sequence_steps"] += len(plan) > 1
        self.stats["max_sequences_in_step"] = max(self.stats["max_sequences_in_step"], len(plan))
        outs: list[StepOutput] = []
        for i, (req, n) in enumerate(plan):
            req.done_tokens += n
            self._register_full_blocks(req)
            if n > 1 or req.done_tokens < len(req.prompt):
                self.stats["prefill_tokens"] += n
            else:
                self.stats["decode_tokens"] += n
            if req.done_tokens < len(req.tokens):
                continue  # a prefill chunk that has not reached the end of the prompt
            s = req.sampler.sample(logits[i][n - 1])
            req.output.append(s.token)
            if req.first_token_time is None:
                req.first_token_time = time.perf_counter()
            reason = None
            if s.token == self.eos or s.token in req.params.stop_token_ids:
                reason = "stop"
            elif len(req.output) >= req.params.max_tokens:
                reason = "length"
            if reason:
                self._finish(req, reason)
            outs.append(StepOutput(req.id, s.token, reason is not None, reason, s.logprob, s.top_logprobs))
        return outs

    def _forward(self, plan: list[tuple[Request, int]]) -> list[torch.Tensor]:
        """Each planned row's logits (n, vocab) for its n new tokens; writes their keys/values."""
        out: list[torch.Tensor | None] = [None] * len(plan)
        multi = list(range(len(plan)))
        if self.fast is not None:  # single new tokens (decode) go through the C step
            single = [i for i, (_, n) in enumerate(plan) if n == 1]
            multi = [i for i, (_, n) in enumerate(plan) if n > 1]
            if single:
                seqs = [plan[i][0].seq for i in single]
                toks = [plan[i][0].tokens[plan[i][0].done_tokens] for i in single]
                lg = self.fast.step(toks, [s.length for s in seqs], [s.blocks for s in seqs])
                for j, (i, s) in enumerate(zip(single, seqs)):
                    s.length += 1
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
            lg = self.model(idx, cache=batch)  # writes the new keys/values and advances each sequence
            for j, i in enumerate(multi):
                out[i] = lg[j, :plan[i][1]]
        return out

    def run(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[list[int]]:
        """Run prompts to completion (all admitted at once); returns each one's output ids."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, q) for p, q in zip(prompts, plist)]
        self.run()
        return [self.requests[i].output for i in ids]
