"""An lmforge model (or an HF model lmforge imports) as a scored ``lm.LM``: batched, context-sharing, head-only logits.

Knows how to answer lm-evaluation-harness's three request kinds with one local model, the way
lm-eval's ``hf`` backend (``HFLM``) answers them, only faster; knows nothing about tasks, metrics or
files other than the model directory ``from_checkpoint`` opens.

Tokenization is HFLM's, with the model's document token (``TokenSpec.doc``, the token every
training document starts with; else its BOS) in the place of HFLM's prefix/BOS token. An HF import
whose prompts start with no BOS (``TokenSpec.add_bos`` false: Qwen2) gets none either, as in HFLM;
its prefix token (empty contexts, the first rolling window) is HFLM's: BOS, else EOS (``stop[0]``).

* ``loglikelihood``: a trailing space of the context moves to the continuation; the context is
  ``[doc] + encode(context)``, the continuation is ``([doc] + encode(context + continuation))`` after
  that many tokens. An empty context: the continuation is ``encode(continuation)`` and the context
  ``[doc]`` (unless the continuation itself starts with the doc token: then that token is the
  context). The model reads ``(context + continuation)[:-1]``, cut from the left to ``max_length``
  tokens when longer (counted in ``stats["truncated"]``); a continuation longer than ``max_length``
  is a ValueError.
* ``loglikelihood_rolling``: ``encode(text)`` in lm-eval's disjoint rolling windows
  (``get_rolling_token_windows`` with context length 1: every token predicted exactly once, the
  first from the doc token alone, later windows with as much left context as fits).
* ``generate_until``: ``[doc] + encode(context)`` cut from the left to ``max_length - max_gen_toks``
  (counted), through the batched engine (``lmforge.infer.engine``): greedy or seeded sampling, the
  ``until`` strings and the model's stop ids end a generation, the text is cut before the stop string.
* A context that starts with a string ``apply_chat_template`` returned is encoded with that
  conversation's own ids (its control tokens stay control tokens; text elsewhere never becomes one).

How it is fast (``benchmarks/eval_bench.py --ablate`` switches each off in turn): requests that share a context (the
choices of one question) are packed into one row, the context once and each continuation after it,
under a tree attention mask (a continuation sees the context and itself, not its siblings) with
positions restarting after the context; rows are sorted by length and batched under a token budget,
rows of near-equal length together (``pad_slack``), padding masked; the output head runs only at the
positions whose next token is scored, the log-softmax only at the targets (logit - logsumexp); no grad,
eval mode, float32 on CPU. Generation runs every request in flight at once in the engine (continuous
batching, the C step for prompts and decode, one argmax over the batch for greedy rows, prefix caching
of shared few-shot prompts).

The tree mask reaches the model through the cache protocol its forward already reads for the paged
engine (``paged``, ``positions``, ``mask(window)``, ``update``, ``advance``): ``_TreeBatch`` stores
nothing and returns each layer's keys and values as they are. Packing needs a model whose layers
mix positions only through attention (every lmforge component does; a recurrent layer would not).
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch

from .lm import LM

__all__ = ["LocalLM", "GEN_KWARGS"]

GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "do_sample")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's


class _TreeBatch:
    """The cache protocol of ``Transformer.hidden_states`` for packed rows: positions per token and a mask
    (B, 1, T, T) of the keys each query sees; keys and values pass through (nothing is cached)."""

    paged = True

    def __init__(self, positions: torch.Tensor, visible: torch.Tensor):
        self.positions = positions  # (B, T)
        self._visible = visible  # (B, T, T) bool: tree ancestry (padding sees itself only)
        self._masks = {}

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            m = self._visible
            if window is not None:
                q, k = self.positions[:, :, None], self.positions[:, None, :]
                m = m & ((q - k < window) | torch.eye(m.shape[1], dtype=torch.bool, device=m.device))
            self._masks[window] = m[:, None]
        return self._masks[window]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        return k, v

    def advance(self, T: int) -> None:
        pass


class LocalLM(LM):
    """``LocalLM(model, tokenizer, tokens=None, batch_size=None, device="cpu", max_length=None)``.

    ``tokens``: the model's ``TokenSpec`` (default: inferred from the tokenizer); ``batch_size``: rows
    per forward (a row is one context with all its continuations; None: as many as ``token_budget``
    tokens allow) and requests in flight while generating (None: 64); ``max_length``: tokens of
    context (default and maximum: the model's ``max_seq_len``)."""

    name = "lmforge"
    token_budget = 16384  # tokens (rows x padded length) per forward when batch_size is None (the best of
    # 4096, 8192, 16384 on the demo model, 1 and 2 threads)
    pad_slack = 0.1  # a batch (batch_size None) holds rows at least (1 - pad_slack) x its longest
    row_cap = 1024  # most tokens in one packed row (a context's continuations beyond it go to another row)
    cache_bytes = 1 << 30  # the generation engine's KV pool, at most (and at least one full context)
    # techniques that can be switched off, to measure each (benchmarks/eval_bench.py --ablate)
    share_contexts = True  # the continuations of a context packed after it in one row (else a row each)
    head_only = True  # the output head only at scored positions (else everywhere, then gathered)

    def __init__(self, model, tokenizer, *, tokens=None, batch_size: int | None = None, device: str = "cpu",
                 max_length: int | None = None):
        super().__init__()
        from ..tokenize.special import TokenSpec

        if tokenizer is None:
            raise ValueError("LocalLM needs a tokenizer (the model directory has none)")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
        cfg = model.cfg
        if max_length is None:
            max_length = cfg.max_seq_len
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 2 <= max_length <= cfg.max_seq_len:
            raise ValueError(f"max_length: expected an integer in [2, {cfg.max_seq_len}] (the model's max_seq_len), "
                             f"got {max_length!r}")
        self.tokens = tokens if tokens is not None else TokenSpec.for_tokenizer(tokenizer)
        self.tokens.check(tokenizer, cfg.vocab_size)
        t = self.tokens
        # the token a context starts with: lmforge's document token (HF imports without a BOS: HFLM's prefix
        # token, BOS else EOS, for empty contexts and rolling windows only)
        self.add_bos = bool(t.add_bos)
        first = (t.doc, t.bos) if self.add_bos else (t.bos, t.stop[0] if t.stop else None, t.doc)
        self.doc = next((x for x in first if x is not None), t.stop[0] if t.stop else None)
        if self.doc is None:
            raise ValueError("LocalLM: the model has no document, BOS or stop token to start a context with "
                             "(TokenSpec.doc, .bos and .stop are all empty)")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu" and next(model.parameters()).dtype != torch.float32:
            self.model = self.model.float()  # fp32 on CPU (the house rule)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.vocab_size = cfg.vocab_size
        self._row_cap = min(self.row_cap, cfg.max_seq_len) if cfg.pos == "learned" else max(self.row_cap, max_length)
        self._chat: OrderedDict[str, list[int]] = OrderedDict()  # apply_chat_template's strings -> their ids
        self._engine = None
        self.stats.update({"requests": 0, "forwards": 0, "tokens_run": 0, "tokens_requested": 0})

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, **kw) -> "LocalLM":
        """An lmforge model directory or an HF one (``lmforge.model.load``), with its ``TokenSpec``."""
        from ..infer.llm import load_with_tokenizer

        device = kw.get("device", "cpu")
        model, tok, tokens = load_with_tokenizer(directory, device=device)
        kw.setdefault("tokens", tokens)
        lm = cls(model, tok, **kw)
        lm.checkpoint = str(directory)
        return lm

    def __repr__(self) -> str:
        return (f"LocalLM({self.model.cfg.hf_family}, {sum(p.numel() for p in self.model.parameters()):,} "
                f"parameters, max_length {self.max_length}, doc token {self.doc})")

    # ---- tokenization (HFLM's) ----
    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, disallowed_special=())

    def tok_encode(self, text: str) -> list[int]:
        """A context's ids: the doc token (when the model's prompts start with one: ``TokenSpec.add_bos``; and
        for an empty text), then the text; a conversation from ``apply_chat_template`` at its
        start keeps its own ids (which begin with the chat format's own first token)."""
        if self._chat:
            best = None
            for s in self._chat:
                if text.startswith(s) and (best is None or len(s) > len(best)):
                    best = s
            if best is not None:
                return self._chat[best] + (self._encode_text(text[len(best):]) if len(text) > len(best) else [])
        ids = self._encode_text(text)
        return [self.doc] + ids if self.add_bos or not ids else ids

    def _encode_pair(self, context: str, continuation: str, cache: dict) -> tuple[list[int], list[int]]:
        n = len(context) - len(context.rstrip())
        if n:
            continuation = context[-n:] + continuation
            context = context[:-n]
        if context == "":  # (a context of only spaces too: HFLM would have no token to condition on)
            cont = self._encode_text(continuation)
            if cont and cont[0] == self.doc:
                return cont[:1], cont[1:]
            return [self.doc], cont
        ctx = cache.get(context)
        if ctx is None:
            ctx = cache[context] = self.tok_encode(context)
        whole = self.tok_encode(context + continuation)
        return ctx, whole[len(ctx):]

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation in the model's chat format with the assistant's turn opened (lmforge's template:
        ``lmforge.tokenize.chat.render``'s ids as text; others: the template's text). A context that starts
        with the returned string is encoded with the conversation's own ids."""
        from ..tokenize.chat import normalize_messages, render

        messages = normalize_messages(messages)
        if self.tokens.template == "lmforge":
            ids = render(self.tokenizer, messages, add_generation_prompt=True)[0]
            text = self.tokenizer.decode(ids)
        else:
            text = self.tokens.render_chat(messages, add_generation_prompt=True, tok=self.tokenizer)
            ids = self.tokens.encode_chat(self.tokenizer, messages)
        self._chat[text] = ids
        self._chat.move_to_end(text)
        while len(self._chat) > 4096:
            self._chat.popitem(last=False)
        return text

    # ---- log-likelihoods ----
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs, cache = [], {}
        for i, r in enumerate(requests):
            if not (isinstance(r, (tuple, list)) and len(r) == 2 and all(isinstance(x, str) for x in r)):
                raise ValueError(f"loglikelihood request {i}: expected (context, continuation) strings, got {r!r:.120}")
            ctx, cont = self._encode_pair(r[0], r[1], cache)
            if not cont:
                raise ValueError(f"loglikelihood request {i}: the continuation {r[1]!r:.80} encodes to no tokens "
                                 f"(after the context {r[0][-40:]!r})")
            pairs.append((ctx, cont))
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(logprob, is_greedy) of each (context ids, continuation ids): the model reads
        ``(context + continuation)[:-1]`` cut from the left to ``max_length`` (counted)."""
        L = self.max_length
        items = []  # (prefix, branch, continuation)
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: a context and a continuation of at least one token each are needed")
            if len(cont) > L:
                raise ValueError(f"request {i}: the continuation is {len(cont)} tokens, longer than the model's "
                                 f"context of {L}")
            full = ctx + cont
            if len(full) > L + 1:
                self.stats["truncated"] += 1
                full = full[-(L + 1):]
            inp = full[:-1]
            cut = len(inp) - len(cont) + 1  # inp[:cut] is shared by every continuation of this context
            items.append((tuple(inp[:cut]), tuple(inp[cut:]), tuple(cont)))
        self.stats["requests"] += len(pairs)
        return self._score(items)

    def loglikelihood_rolling(self, requests: list[str]) -> list[float]:
        windows, owner = [], []
        for i, text in enumerate(requests):
            if not isinstance(text, str):
                raise ValueError(f"loglikelihood_rolling request {i}: expected a string, got {type(text).__name__}")
            for ctx, cont in rolling_windows(self._encode_text(text), self.doc, self.max_length):
                windows.append((ctx, cont))
                owner.append(i)
        self.stats["requests"] += len(requests)
        items = []
        for ctx, cont in windows:
            inp = (ctx + cont)[:-1]
            cut = len(inp) - len(cont) + 1
            items.append((tuple(inp[:cut]), tuple(inp[cut:]), tuple(cont)))
        out = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._score(items)):
            out[i] += lp
        return out

    def _rows(self, items) -> list[tuple[tuple, list]]:
        """Packed rows: (prefix, [distinct (branch, continuation), ...]), a prefix's continuations split over
        rows of at most ``row_cap`` tokens."""
        if not self.share_contexts:  # (the ablation: a row per distinct request)
            return [(p, [(b, c)]) for p, b, c in dict.fromkeys(items)]
        groups: dict[tuple, dict] = {}
        for prefix, branch, cont in items:
            groups.setdefault(prefix, {}).setdefault((branch, cont), None)
        rows = []
        for prefix, branches in groups.items():
            cur, n = [], len(prefix)
            for b in branches:
                if cur and n + len(b[0]) > self._row_cap:
                    rows.append((prefix, cur))
                    cur, n = [], len(prefix)
                cur.append(b)
                n += len(b[0])
            rows.append((prefix, cur))
        return rows

    @torch.inference_mode()
    def _score(self, items) -> list[tuple[float, bool]]:
        rows = self._rows(items)
        lengths = [len(p) + sum(len(b) for b, _ in bs) for p, bs in rows]
        order = sorted(range(len(rows)), key=lambda r: -lengths[r])
        answers: dict[tuple, tuple[float, bool]] = {}
        start = 0
        while start < len(order):
            T = lengths[order[start]]
            if self.batch_size:
                n = self.batch_size
            else:  # under the token budget, and no row padded by more than ``pad_slack`` of T
                n, cap = 1, max(1, self.token_budget // max(T, 1))
                while n < cap and start + n < len(order) and lengths[order[start + n]] >= (1 - self.pad_slack) * T:
                    n += 1
            batch = [rows[r] for r in order[start:start + n]]
            start += n
            for key, ans in self._forward(batch, T):
                answers[key] = ans
        return [answers[(p, b, c)] for p, b, c in items]

    def _forward(self, batch, T: int):
        """One forward over packed rows (the longest is T tokens): each (prefix, branch, continuation)'s answer."""
        B, dev = len(batch), self.device
        ids = torch.zeros((B, T), dtype=torch.long)
        pos = torch.zeros((B, T), dtype=torch.long)
        seg = torch.full((B, T), -1, dtype=torch.long)  # 0: the prefix, k: branch k, -1: padding
        gather, targets, spans, keys = [], [], [], []  # flat positions whose logits score targets
        for r, (prefix, branches) in enumerate(batch):
            p = len(prefix)
            ids[r, :p] = torch.tensor(prefix)
            pos[r, :p] = torch.arange(p)
            seg[r, :p] = 0
            o = p
            for k, (branch, cont) in enumerate(branches, start=1):
                m = len(branch)
                if m:
                    ids[r, o:o + m] = torch.tensor(branch)
                    pos[r, o:o + m] = torch.arange(p, p + m)
                    seg[r, o:o + m] = k
                at = [r * T + p - 1] + [r * T + o + j for j in range(m)]
                spans.append((len(gather), len(at)))
                gather += at
                targets += cont
                keys.append((prefix, branch, cont))
                o += m
        qs, ks = seg[:, :, None], seg[:, None, :]
        visible = (((ks == 0) | (ks == qs)) & (ks >= 0) & (pos[:, None, :] <= pos[:, :, None])) \
            | torch.eye(T, dtype=torch.bool)[None]
        # within a branch (and the prefix), position order is token order, so ``pos <=`` is causal order
        cache = _TreeBatch(pos.to(dev), visible.to(dev))
        h = self.model.hidden_states(ids.to(dev), cache=cache)  # (B, T, C)
        self.stats["forwards"] += 1
        self.stats["tokens_run"] += B * T
        self.stats["tokens_requested"] += int((seg >= 0).sum())
        at = torch.tensor(gather, device=dev)
        if self.head_only:
            logits = self.model.compute_logits(h.reshape(B * T, -1)[at])[:, :self.vocab_size].float()
        else:  # (the ablation: the head and a log-softmax over every position, as HFLM)
            full = torch.log_softmax(self.model.compute_logits(h).float(), -1)
            logits = full.reshape(B * T, -1)[at][:, :self.vocab_size]
        tgt = torch.tensor(targets, device=dev)
        # log_softmax at the targets only: logit - logsumexp (no (N, V) output written)
        chosen = (logits.gather(1, tgt[:, None])[:, 0] - torch.logsumexp(logits, -1)).double().cpu()
        greedy = (logits.argmax(-1) == tgt).cpu()
        out = []
        for key, (s, n) in zip(keys, spans):
            out.append((key, (float(chosen[s:s + n].sum()), bool(greedy[s:s + n].all()))))
        return out

    # ---- generation ----
    def _gen_params(self, i: int, kw: dict):
        from ..infer.sampling import SamplingParams

        if kw is None:
            kw = {}
        if not isinstance(kw, dict):
            raise ValueError(f"generate_until request {i}: gen_kwargs must be a dict, got {type(kw).__name__}")
        unknown = [k for k in kw if k not in GEN_KWARGS]
        if unknown:
            raise ValueError(f"generate_until request {i}: unknown gen_kwargs key {unknown[0]!r}; expected "
                             f"{', '.join(GEN_KWARGS)}")
        until = kw.get("until", [])
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(s, str) for s in until):
            raise ValueError(f"generate_until request {i}: until must be a string or a list of strings, got {until!r}")
        max_gen = next((kw[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if kw.get(k) is not None),
                       DEFAULT_MAX_GEN_TOKS)
        if isinstance(max_gen, bool) or not isinstance(max_gen, int) or not 1 <= max_gen < self.max_length:
            raise ValueError(f"generate_until request {i}: max_gen_toks must be an integer in [1, "
                             f"{self.max_length - 1}] (the model's context is {self.max_length}), got {max_gen!r}")
        do_sample = kw.get("do_sample")
        temp = kw.get("temperature")
        if temp is None:
            temp = 1.0 if do_sample else 0.0
        if do_sample is False:
            temp = 0.0
        p = SamplingParams(max_tokens=max_gen, temperature=float(temp) if isinstance(temp, (int, float)) else temp,
                           top_p=kw.get("top_p", 1.0) if kw.get("top_p") is not None else 1.0,
                           top_k=kw.get("top_k") or 0, seed=kw.get("seed"), stop=until,
                           stop_token_ids=list(self.tokens.stop))
        try:
            p.validate(self.vocab_size)
        except ValueError as e:
            raise ValueError(f"generate_until request {i}: {e}") from None
        return p

    def engine(self):
        """The batched engine this model generates with (made at first use; blocks for every request in flight)."""
        if self._engine is None:
            from ..infer.engine import Engine

            running = self.batch_size or 64
            bs, L = 16, self.model.cfg.max_seq_len
            p = next(self.model.parameters())
            per_token = sum(s.bytes_per_token(p.element_size()) for s in self.model.cache_specs())
            # room for every request in flight at full length, within ``cache_bytes`` (at least one full
            # context: the engine preempts and recomputes when blocks run out)
            tokens = max(L, min(running * L, self.cache_bytes // max(per_token, 1)))
            blocks = max(math.ceil(tokens / bs), 64)
            self._engine = Engine(self.model, num_blocks=blocks, block_size=bs, max_batch_tokens=2048,
                                  max_running=running, eos_token_id=None, tokenizer=self.tokenizer)
        return self._engine

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        plan = []
        for i, r in enumerate(requests):
            if not (isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)):
                raise ValueError(f"generate_until request {i}: expected (context, gen_kwargs), got {r!r:.120}")
            params = self._gen_params(i, r[1])
            ids = self.tok_encode(r[0])
            room = self.max_length - params.max_tokens
            if len(ids) > room:
                self.stats["truncated"] += 1
                ids = ids[-room:]
            plan.append((ids, params))
        self.stats["requests"] += len(requests)
        if not plan:
            return []
        eng = self.engine()
        reqs = []
        try:
            for ids, params in plan:
                reqs.append(eng.requests[eng.add_request(ids, params)])
            with torch.inference_mode():
                eng.run()
        except BaseException:
            for q in reqs:
                eng.abort(q.id)
            raise
        bad = [k for k, q in enumerate(reqs) if q.finish_reason == "error"]
        if bad:
            raise RuntimeError(f"generate_until request {bad[0]}: the engine could not run it: {reqs[bad[0]].error}")
        return [q.text for q in reqs]


def rolling_windows(tokens: list[int], prefix: int, max_len: int):
    """lm-eval's disjoint rolling windows with context length 1: (context ids, continuation ids) pairs that
    predict every token once; the first from ``prefix`` alone, each later one with as much left context as
    fits in ``max_len`` positions (``lm_eval.utils.get_rolling_token_windows`` + ``make_disjoint_window``)."""
    out, n, done = [], len(tokens), 0
    if not n:
        return out
    first = min(max_len, n)
    out.append(([prefix], tokens[:first]))
    done = first
    while done < n:
        k = min(n - done, max_len)
        end = done + k
        ctx = tokens[max(0, end - max_len - 1):end - 1]
        out.append((ctx[:len(ctx) - (k - 1)], tokens[end - k:end]))
        done = end
    return out
