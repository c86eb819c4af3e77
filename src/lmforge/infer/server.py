"""An OpenAI-compatible HTTP server over the engine (Starlette on uvicorn).

Knows the OpenAI wire format (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``; JSON or server-sent events), vLLM's extra endpoints
(``/tokenize``, ``/detokenize``, ``/version``, ``/health``, ``/metrics``) and
extra sampling fields (``top_k``, ``min_p``, ``repetition_penalty``,
``stop_token_ids``, ``ignore_eos``, ``min_tokens``,
``include_stop_str_in_output``), and how to keep one engine busy for many
clients; knows nothing about how tokens are computed.

How it runs. One thread (``EngineLoop``) owns the engine: it takes new requests
and aborts from an inbox, steps the engine while any request is in flight and
hands each step's outputs to the asyncio loop in one ``call_soon_threadsafe``
per step (no polling). Concurrent clients therefore share every forward pass
(continuous batching); the ``n`` choices of a request and the prompts of a
batched completions request are submitted together, so they are decoded in the
same steps. Tokenization runs in a worker thread, never on the event loop.

What it defends against. Prompt ids are checked against the vocabulary and the
context before they reach the engine (400). An exception while stepping ends the
requests it concerns (their blocks freed; their clients get an OpenAI-style
error, a streaming client an error event and ``[DONE]``) and the loop goes on;
``/health`` answers 503 once the loop thread is dead. Request bodies are
limited in size (413, also for chunked bodies) and must be
``application/json`` (415: no cross-origin "simple" POST); the ``Host`` header
must name this server (an IP literal, ``localhost`` or an ``--allowed-host``;
421 otherwise: DNS rebinding); with an API key every endpoint but ``/``,
``/health`` and ``/openapi.json`` wants ``Authorization: Bearer KEY`` (401).
Requests beyond ``max_queued`` sequences in flight get 429; a request past its
deadline is aborted (504, or an error event); a client that hangs up, streaming
or not, has its requests aborted. CORS is off unless origins are given.

Stop strings, ``min_tokens``, ``include_stop_str_in_output``, ``max_tokens``
0 and prompt log-probabilities (``echo`` with ``logprobs``, what
lm-evaluation-harness sends) are the engine's (built with the tokenizer); this
layer turns its ``StepOutput``s into OpenAI's fields (``text_offset`` in
characters of the returned text, the first prompt token's logprob null).
``ignore_eos`` drops the model's stop tokens (``TokenSpec.stop``) but keeps the
request's ``stop_token_ids``, as vLLM does.

What it does not do: tools/function calling, ``response_format``, ``suffix``,
``best_of`` > 1 and audio output are refused with a 400 naming the field (never
silently ignored); other unknown fields are ignored, as OpenAI does.
"""
from __future__ import annotations

import asyncio
import codecs
import dataclasses
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable


from .engine import Engine
from .sampling import SamplingParams

log = logging.getLogger("lmforge.serve")

UNSUPPORTED = {  # OpenAI fields this server does not implement: refused, not ignored
    "tools": "tool calling is not supported",
    "functions": "function calling is not supported",
    "tool_choice": "tool calling is not supported",
    "function_call": "function calling is not supported",
    "response_format": "response_format (JSON mode / structured output) is not supported",
    "suffix": "suffix (insertion) is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


# ---- errors ------------------------------------------------------------------------------

class APIError(Exception):
    """An error with its HTTP status, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                             413: "invalid_request_error", 500: "internal_server_error",
                             503: "service_unavailable", 504: "timeout_error"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# ---- the engine thread --------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Job:
    """One sequence in the engine. ``deliver(job, out, err)`` gets its outputs (on the engine
    thread): a ``StepOutput``, or ``err`` (an ``APIError``) once when it failed."""
    prompt: list[int]
    params: SamplingParams
    deliver: Callable
    tag: Any = None  # the caller's (the choice index)
    rid: int | None = None
    submitted: bool = False  # counted in EngineLoop.in_flight
    done: bool = False
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    last: float | None = None


class EngineLoop:
    """Steps ``engine`` on its own thread while it has work; ``submit`` and ``abort`` are safe
    from any thread and return at once."""

    def __init__(self, engine: Engine, max_queued: int = 1024, metrics: "Metrics | None" = None):
        self.engine, self.max_queued, self.metrics = engine, max_queued, metrics
        self.cv = threading.Condition()
        self.inbox: list[tuple] = []
        self.jobs: dict[int, Job] = {}  # engine request id -> job
        self.in_flight = 0  # sequences submitted and not finished
        self.stopping = False
        self.errors = 0  # steps that raised
        self._batch: dict | None = None  # asyncio loop -> [(queue, item)], delivered once per step
        self.thread = threading.Thread(target=self._run, daemon=True, name="lmforge-engine")
        self.thread.start()

    # -- any thread --
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` for admission in the same step; 429 if that would pass ``max_queued``."""
        with self.cv:
            if not self.alive():
                raise APIError(503, "the engine is not running")
            if len(jobs) > self.max_queued:
                raise APIError(400, f"the request asks for {len(jobs)} sequences (prompts x n); this server "
                                    f"takes at most {self.max_queued} at once")
            if self.in_flight + len(jobs) > self.max_queued:
                raise APIError(429, f"the server is busy: {self.in_flight} sequences in flight "
                                    f"(at most {self.max_queued}); retry later")
            self.in_flight += len(jobs)
            for j in jobs:
                j.submitted = True
            self.inbox.extend(("add", j) for j in jobs)
            self.cv.notify()

    def abort(self, jobs: list[Job]) -> None:
        with self.cv:
            self.inbox.extend(("abort", j) for j in jobs if j.submitted and not j.done)
            self.cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout)

    def waiting(self) -> int:
        return self.engine.num_waiting()

    def running(self) -> int:
        return self.engine.num_running()

    def kv_usage(self) -> float:
        return float(self.engine.kv_usage())

    # -- the engine thread --
    def _run(self) -> None:
        while True:
            with self.cv:
                while not self.inbox and not self.engine.has_work() and not self.stopping:
                    self.cv.wait()
                inbox, self.inbox = self.inbox, []
                stopping = self.stopping
            self._batch = defaultdict(list)
            try:
                if stopping:
                    self._shutdown(inbox)
                    return
                self._apply(inbox)
                if self.engine.has_work():
                    self._step()
            except Exception:  # a bug here must not end the loop: fail what is running, go on
                log.exception("engine loop error")
                self._fail_running("internal error in the engine loop")
            finally:
                self._flush()

    def _flush(self) -> None:
        """Hand this round's outputs to each asyncio loop in one wake-up."""
        batch, self._batch = self._batch, None
        for loop, items in (batch or {}).items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed
                pass

    def _apply(self, inbox: list[tuple]) -> None:
        for item in inbox:
            if item[0] == "add":
                job = item[1]
                try:
                    job.rid = self.engine.add_request(job.prompt, job.params)
                except ValueError as e:
                    self._end(job, None, APIError(400, str(e)))
                except Exception as e:
                    log.exception("add_request failed")
                    self._end(job, None, APIError(500, f"could not admit the request: {e}"))
                else:
                    self.jobs[job.rid] = job
            else:  # "abort"
                job = item[1]
                if not job.done:
                    if job.rid is not None:
                        self.engine.abort(job.rid)
                    self._end(job, None, None)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:
            self.errors += 1
            log.exception("engine step failed")
            self._fail_running(f"the engine failed while generating: {type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        m = self.metrics
        for o in outs:
            job = self.jobs.get(o.request_id)
            if job is None or job.done:
                continue
            if o.error:
                self._end(job, None, APIError(500, f"the engine failed on this request: {o.error}"))
                continue
            if m is not None and o.token is not None:
                m.generation_tokens.inc()
                if job.last is None:
                    m.ttft.observe(now - job.arrival)
                else:
                    m.itl.observe(now - job.last)
            job.last = now
            if o.finished:
                self._end(job, o, None)
            else:
                self._send(job, o, None)

    def _fail_running(self, message: str) -> None:
        """After an exception the engine could not pin on one request (its rows are isolated; this is
        a scheduler bug): end the running requests (freeing their blocks), or, if none was running,
        the waiting ones (the step was admitting them), so the same failure cannot repeat forever."""
        running = {r.id for r in self.engine.running}
        victims = [rid for rid in self.jobs if rid in running] or list(self.jobs)
        for rid in victims:
            try:
                self.engine.abort(rid)
            except Exception:
                log.exception("abort failed")
            self._end(self.jobs[rid], None, APIError(500, message))

    def _shutdown(self, inbox: list[tuple]) -> None:
        for item in inbox:
            if item[0] in ("add", "abort"):
                self._end(item[1], None, APIError(503, "the server is shutting down"))
        for rid, job in list(self.jobs.items()):
            self.engine.abort(rid)
            self._end(job, None, APIError(503, "the server is shutting down"))

    def _end(self, job: Job, out, err) -> None:
        if job.done:
            return
        job.done = True
        if job.rid is not None:
            self.jobs.pop(job.rid, None)
        if job.submitted:
            with self.cv:
                self.in_flight -= 1
        if out is not None or err is not None:
            self._send(job, out, err)

    def _send(self, job: Job, out, err) -> None:
        loop = getattr(job.deliver, "loop", None)
        if loop is not None and self._batch is not None:
            self._batch[loop].append((job.deliver.queue, (job, out, err)))
            return
        try:
            job.deliver(job, out, err)
        except Exception:  # e.g. the client's event loop is gone
            log.debug("could not deliver to a request", exc_info=True)


def async_sink(queue: asyncio.Queue) -> Callable:
    """A ``Job.deliver`` that puts ``(job, out, err)`` on an asyncio queue from the engine thread."""
    loop = asyncio.get_running_loop()

    def deliver(job, out, err):
        loop.call_soon_threadsafe(queue.put_nowait, (job, out, err))
    deliver.loop, deliver.queue = loop, queue  # lets EngineLoop batch a step's outputs per loop
    return deliver


def _put_all(items) -> None:
    for q, item in items:
        q.put_nowait(item)


# ---- metrics -------------------------------------------------------------------------------

class Metrics:
    """Prometheus metrics in a registry of their own (one per app)."""

    def __init__(self, loop_getter: Callable[[], EngineLoop | None]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time from submission to first token",
                              buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30, 60), registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "time between two tokens of a sequence",
                             buckets=(.001, .0025, .005, .01, .02, .05, .1, .2, .5, 1, 2), registry=r)
        self.e2e = Histogram("lmforge_request_latency_seconds", "generation request latency",
                             buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)

        def gauge(name, doc, fn):
            def read():
                lp = loop_getter()
                return fn(lp) if lp is not None else 0.0
            Gauge(name, doc, registry=r).set_function(read)

        gauge("lmforge_num_requests_waiting", "sequences waiting for admission", lambda lp: lp.waiting())
        gauge("lmforge_num_requests_running", "sequences being decoded", lambda lp: lp.running())
        gauge("lmforge_num_requests_in_flight", "sequences submitted and not finished", lambda lp: lp.in_flight)
        gauge("lmforge_kv_cache_usage_ratio", "fraction of KV blocks in use", lambda lp: lp.kv_usage())
        gauge("lmforge_prefix_cache_hit_rate", "prompt tokens served from the prefix cache",
              lambda lp: lp.engine.prefix_hit_rate())
        gauge("lmforge_engine_step_errors", "engine steps that raised", lambda lp: lp.errors)


# ---- request parsing ------------------------------------------------------------------------

def _get(body: dict, key: str, types, default=None, check=None, what: str | None = None):
    v = body.get(key)
    if v is None:
        return default
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             dict: "an object", list: "a list"}.get(t, t.__name__) for t in types)
        raise APIError(400, f"'{key}' must be {names}, got {type(v).__name__}", key)
    if check is not None and not check(v):
        raise APIError(400, f"'{key}' is out of range: {v!r}" + (f" (expected {what})" if what else ""), key)
    return v


@dataclasses.dataclass
class Prompt:
    ids: list[int]
    text: str  # what echo returns
    skip: int = 0  # leading ids (an added BOS) that are not part of ``text``


@dataclasses.dataclass
class Settings:
    """A generation request, parsed."""
    params: SamplingParams
    max_tokens: int | None  # None: what the context leaves
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None  # top alternatives per token (0: just the chosen token's); None: no logprobs
    chat: bool


class SafeTokenizer:
    """The tokenizer, decoding ids it does not have (a model's padded vocabulary) as nothing."""

    def __init__(self, tok):
        self.tok, self.n = tok, tok.vocab_size

    def decode_bytes(self, ids) -> bytes:
        return self.tok.decode_bytes([i for i in ids if 0 <= i < self.n])

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class Service:
    """The model behind the HTTP layer: parsing, prompts, and generation as events."""

    def __init__(self, model, tokenizer, tokens=None, model_name: str = "lmforge", *, num_blocks: int = 1024,
                 block_size: int = 16, max_batch_tokens: int = 512, max_queued: int = 1024,
                 request_timeout_s: float = 600.0, metrics: Metrics | None = None, engine: Engine | None = None):
        from ..tokenize.special import TokenSpec

        self.model, self.tok, self.name = model, tokenizer, model_name
        self.safe = SafeTokenizer(tokenizer)
        self.spec = tokens if tokens is not None else TokenSpec.for_tokenizer(tokenizer)
        self.vocab = model.cfg.vocab_size
        self.spec.check(tokenizer, self.vocab)
        self.engine = engine or Engine(model, num_blocks=num_blocks, block_size=block_size,
                                       max_batch_tokens=max_batch_tokens, eos_token_id=None, tokenizer=self.safe)
        pool = self.engine.pool
        self.max_model_len = min(model.cfg.max_seq_len, pool.num_blocks * pool.block_size)
        self.metrics = metrics
        self.loop = EngineLoop(self.engine, max_queued, metrics)
        self.request_timeout_s = request_timeout_s
        self.created = int(time.time())

    # -- parsing --
    def check_model(self, body: dict) -> None:
        m = body.get("model")
        if not isinstance(m, str):
            raise APIError(400, "'model' is required (a string)", "model")
        if m != self.name:
            raise APIError(404, f"The model '{m}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def settings(self, body: dict, chat: bool) -> Settings:
        for k, why in UNSUPPORTED.items():
            v = body.get(k)
            if v in (None, [], "") or (k == "tool_choice" and v == "none") or \
                    (k == "response_format" and isinstance(v, dict) and v.get("type") == "text"):
                continue
            raise APIError(400, f"'{k}': {why} by this server", k)
        best_of = _get(body, "best_of", int, 1, lambda v: v >= 1, "an integer >= 1")
        if best_of > 1:
            raise APIError(400, "'best_of' > 1 is not supported by this server", "best_of")
        if body.get("modalities") not in (None, ["text"]):
            raise APIError(400, "'modalities': only ['text'] is supported", "modalities")
        low = 1 if chat else 0
        max_tokens = _get(body, "max_completion_tokens", int, None, lambda v: v >= low, f"an integer >= {low}")
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", int, None, lambda v: v >= low, f"an integer >= {low}")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 16:
            raise APIError(400, "'stop' must be a string or a list of at most 16 strings", "stop")
        if any(len(s) > 1024 for s in stop):
            raise APIError(400, "'stop': a stop string may have at most 1024 characters", "stop")
        stop = [s for s in stop if s]
        if chat:
            stop += [s for s in self.spec.chat_stop if s not in stop]
            lp = _get(body, "logprobs", bool, False)
            top = _get(body, "top_logprobs", int, None, lambda v: 0 <= v <= 20, "0..20")
            if top and not lp:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
            logprobs = (top or 0) if lp else None
            echo = False
        else:
            logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 20, "0..20")
            echo = bool(_get(body, "echo", bool, False))
        bias = _get(body, "logit_bias", dict, {})
        if len(bias) > 1024:
            raise APIError(400, "'logit_bias' may name at most 1024 tokens", "logit_bias")
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError, OverflowError):
            raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
        if any(not -100 <= v <= 100 for v in bias.values()):
            raise APIError(400, "'logit_bias' values must be in [-100, 100]", "logit_bias")
        stop_ids = _get(body, "stop_token_ids", list, [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
            raise APIError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
        ignore_eos = bool(_get(body, "ignore_eos", bool, False))
        stop_ids = list(dict.fromkeys(stop_ids + ([] if ignore_eos else list(self.spec.stop))))
        top_k = _get(body, "top_k", int, 0, lambda v: v >= -1, "-1 or 0 (off), or a positive integer")
        min_tokens = _get(body, "min_tokens", int, 0, lambda v: v >= 0, "an integer >= 0")
        if max_tokens is not None and min_tokens > max_tokens:
            raise APIError(400, f"'min_tokens' ({min_tokens}) must not exceed 'max_tokens' ({max_tokens})",
                           "min_tokens")
        seed = _get(body, "seed", int, None, lambda v: -(1 << 63) <= v < (1 << 64), "a 64-bit integer")
        num = (int, float)
        kw = dict(
            max_tokens=1,  # set per prompt
            temperature=float(_get(body, "temperature", num, 1.0, lambda v: 0 <= v <= 2, "0..2")),
            top_p=float(_get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "(0, 1]")),
            top_k=max(top_k, 0),
            min_p=float(_get(body, "min_p", num, 0.0, lambda v: 0 <= v <= 1, "0..1")),
            presence_penalty=float(_get(body, "presence_penalty", num, 0.0, lambda v: -2 <= v <= 2, "-2..2")),
            frequency_penalty=float(_get(body, "frequency_penalty", num, 0.0, lambda v: -2 <= v <= 2, "-2..2")),
            repetition_penalty=float(_get(body, "repetition_penalty", num, 1.0, lambda v: 0 < v <= 10, "(0, 10]")),
            logit_bias=bias, stop=stop, stop_token_ids=stop_ids,
            seed=None if seed is None else seed % (1 << 64), logprobs=logprobs)
        p = SamplingParams(**kw, min_tokens=min_tokens,
                           include_stop_str_in_output=bool(_get(body, "include_stop_str_in_output", bool, False)))
        try:
            p.validate(self.vocab)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        n = _get(body, "n", int, 1, lambda v: 1 <= v <= 16, "1..16")
        stream = bool(_get(body, "stream", bool, False))
        so = _get(body, "stream_options", dict, {}) or {}
        return Settings(p, max_tokens, n, stream, bool(so.get("include_usage", False)), echo, logprobs, chat)

    def check_ids(self, ids, param: str) -> list[int]:
        """``ids`` if it is a non-empty list of ids the model has; 400 naming the first bad one."""
        if not isinstance(ids, list) or not ids:
            raise APIError(400, f"'{param}' must be a non-empty list of token ids", param)
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab:
                raise APIError(400, f"'{param}': token id {t!r} is not in the vocabulary (0..{self.vocab - 1})",
                               param)
        return ids

    def prompts(self, body: dict, chat: bool) -> list[Prompt]:
        """The prompts of a request, as ids (runs the tokenizer: call it off the event loop)."""
        if chat:
            try:
                ids = self.spec.encode_chat(self.tok, body.get("messages"))
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            except Exception as e:  # a template error (jinja) is the request's fault
                raise APIError(400, f"could not render the conversation: {e}", "messages") from None
            return [Prompt(self.check_ids(ids, "messages"), "")]
        p = body.get("prompt")
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            items = [p]
        elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
            items = p
        else:
            raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                                "lists of token ids", "prompt")
        if len(items) > 256:
            raise APIError(400, "at most 256 prompts per request", "prompt")
        out = []
        for x in items:
            if isinstance(x, str):
                ids = self.spec.encode_prompt(self.tok, x)
                if not ids:
                    raise APIError(400, "'prompt' is empty", "prompt")
                out.append(Prompt(ids, x, int(self.spec.add_bos and self.spec.bos is not None)))
            else:
                ids = self.check_ids(x, "prompt")
                out.append(Prompt(ids, self.safe.decode(ids)))
        return out

    def max_tokens_for(self, pr: Prompt, s: Settings) -> int:
        room = self.max_model_len - len(pr.ids)
        want = s.max_tokens if s.max_tokens is not None else room
        if want > room or room < (1 if s.chat else 0):
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {len(pr.ids) + want} tokens ({len(pr.ids)} in the prompt, {want} for "
                                "the completion). Please reduce the length of the prompt or max_tokens.",
                           "max_tokens")
        return want


# ---- one choice's text -------------------------------------------------------------------------

class Choice:
    """One sequence's step outputs as text pieces and log-probability entries (the text is the
    engine's: safe to show, cut at stop strings)."""

    def __init__(self, index: int, svc: Service, s: Settings, p: SamplingParams, prompt: Prompt, offset: int = 0):
        self.index, self.svc, self.s, self.p, self.prompt = index, svc, s, p, prompt
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = offset  # where the next token starts in the returned text, in characters
        self.tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.stop_ids = set(p.stop_token_ids)
        self.echo: list[dict] | None = None  # the prompt's entries (echo with logprobs), from the first output
        self.started = False  # streaming: the echo / role chunk was sent
        self.job: Job | None = None

    def entry(self, token: int, logprob, tops, offset: int) -> dict:
        dec = self.svc.safe.decode
        return {"token": dec([token]), "logprob": logprob, "text_offset": offset,
                "top_logprobs": [(dec([i]), v) for i, v in (tops or [])]}

    def prompt_entries(self, lps) -> list[dict]:
        """Entries of the prompt tokens (``lps``: the engine's prompt_logprobs); offsets in ``prompt.text``."""
        pr, out, chars = self.prompt, [], 0
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for k, (t, (lp, tops)) in enumerate(zip(pr.ids, lps)):
            out.append(self.entry(t, lp, tops, chars))
            if k >= pr.skip:
                chars += len(dec.decode(self.svc.safe.decode_bytes([t])))
        return out

    def feed(self, o) -> tuple[str, list[dict]]:
        """The text newly safe to show and the log-probability entries of this output."""
        entries = []
        if o.prompt_logprobs is not None and self.s.echo and self.s.logprobs is not None:
            self.echo = self.prompt_entries(o.prompt_logprobs)
        t = o.token
        if t is not None:
            self.tokens += 1
            stop_token = o.finished and o.finish_reason == "stop" and t in self.stop_ids  # not text
            if self.s.logprobs is not None and not stop_token:
                entries.append(self.entry(t, o.logprob, o.top_logprobs, self.chars))
                self.chars += len(self.utf8.decode(self.svc.safe.decode_bytes([t])))
        if o.finished:
            self.finish_reason = o.finish_reason
            self.stop_reason = o.stop_reason
        return o.text or "", entries

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [None if e["logprob"] is None else {t: v for t, v in e["top_logprobs"]}
                             for e in entries],
            "text_offset": [e["text_offset"] for e in entries]}


def _chat_logprobs(entries: list[dict]) -> dict:
    def b(t):
        return list(t.encode("utf-8"))
    return {"content": [{"token": e["token"], "logprob": e["logprob"], "bytes": b(e["token"]),
                         "top_logprobs": [{"token": t, "logprob": v, "bytes": b(t)} for t, v in e["top_logprobs"]]}
                        for e in entries]}


# ---- generation over HTTP --------------------------------------------------------------------------

DISCONNECT, TIMEOUT = object(), object()  # sentinels on a generation's queue


class Generation:
    """One /v1/completions or /v1/chat/completions request: its choices, their jobs, their events."""

    def __init__(self, svc: Service, s: Settings, prompts: list[Prompt]):
        self.svc, self.s, self.prompts = svc, s, prompts
        self.chat = s.chat
        self.id = ("chatcmpl-" if s.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.start = time.perf_counter()

    def submit(self) -> None:
        """Every choice of every prompt to the engine at once (so they are decoded together):
        choice ``i * n + j`` is prompt ``i``'s ``j``-th, with seed ``seed + j``."""
        svc, s = self.svc, self.s
        limits = [svc.max_tokens_for(pr, s) for pr in self.prompts]
        if s.params.min_tokens > min(limits):
            raise APIError(400, f"'min_tokens' ({s.params.min_tokens}) exceeds the tokens the context leaves "
                                f"({min(limits)})", "min_tokens")
        deliver = async_sink(self.queue)
        scoring = s.logprobs if s.echo and s.logprobs is not None else None
        for i, (pr, mt) in enumerate(zip(self.prompts, limits)):
            for j in range(s.n):
                seed = None if s.params.seed is None else (s.params.seed + j) % (1 << 64)
                p = dataclasses.replace(s.params, max_tokens=mt, seed=seed, prompt_logprobs=scoring,
                                        min_tokens=min(s.params.min_tokens, mt))
                c = Choice(i * s.n + j, svc, s, p, pr, len(pr.text) if s.echo else 0)
                if mt == 0 and scoring is None:  # nothing for the engine to do
                    c.finish_reason = "length"
                else:
                    c.job = Job(pr.ids, p, deliver, c)
                self.choices.append(c)
        jobs = [c.job for c in self.choices if c.job is not None]
        if jobs:
            svc.loop.submit(jobs)
        if svc.metrics is not None:
            svc.metrics.prompt_tokens.inc(sum(len(pr.ids) for pr in self.prompts))

    def abort(self) -> None:
        self.svc.loop.abort([c.job for c in self.choices if c.job is not None and not c.job.done])

    async def events(self):
        """Yields (choice, piece, entries) as outputs arrive, until every choice has finished.
        Raises APIError when a choice fails or the deadline passes; returns early on DISCONNECT."""
        left = sum(not c.finished for c in self.choices)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(max(0.0, self.start + self.svc.request_timeout_s - time.perf_counter()),
                                self.queue.put_nowait, TIMEOUT)
        try:
            while left:
                item = await self.queue.get()
                if item is DISCONNECT:
                    return
                if item is TIMEOUT:
                    raise APIError(504, f"the request did not finish within {self.svc.request_timeout_s:g} s")
                job, out, err = item
                c = job.tag
                if c.finished:
                    continue
                if err is not None:
                    raise err
                if out.finish_reason == "error":
                    raise APIError(500, f"the engine failed on this request: {out.error}")
                piece, entries = c.feed(out)
                left -= c.finished
                yield c, piece, entries
        finally:
            timer.cancel()

    def usage(self) -> dict:
        prompt = sum(len(pr.ids) for pr in self.prompts)
        done = sum(c.tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def _logprobs(self, entries):
        return _chat_logprobs(entries) if self.chat else _completion_logprobs(entries)

    async def response(self) -> dict | None:
        texts: dict[int, list[str]] = defaultdict(list)
        lps: dict[int, list[dict]] = defaultdict(list)
        async for c, piece, entries in self.events():
            texts[c.index].append(piece)
            lps[c.index].extend(entries)
        if any(not c.finished for c in self.choices):
            return None  # the client went away
        choices = []
        for c in self.choices:
            text, entries = "".join(texts[c.index]), lps[c.index]
            if self.s.echo:
                text = c.prompt.text + text
                entries = (c.echo or []) + entries
            lp = self._logprobs(entries) if self.s.logprobs is not None else None
            if self.chat:
                choices.append({"index": c.index, "message": {"role": "assistant", "content": text},
                                "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            else:
                choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.svc.name, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    async def stream(self):
        """Server-sent events: the chunks, the usage chunk if asked for, an error event on failure, [DONE]."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"

        def chunk(choices):
            ev = {"id": self.id, "object": obj, "created": self.created, "model": self.svc.name, "choices": choices}
            if self.s.include_usage:
                ev["usage"] = None
            return "data: " + json.dumps(ev) + "\n\n"

        def event(c, text, entries, finish=None):
            lp = self._logprobs(entries) if entries else None
            tail = {"stop_reason": c.stop_reason} if finish else {}
            if self.chat:
                delta = {"content": text} if text or finish is None else {}
                return chunk([{"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish, **tail}])
            return chunk([{"index": c.index, "text": text, "logprobs": lp, "finish_reason": finish, **tail}])

        def start(c):  # the first chunk of a choice: the role (chat) or the echoed prompt
            c.started = True
            if self.chat:
                return chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
            return event(c, c.prompt.text, c.echo or []) if self.s.echo else ""

        try:
            for c in self.choices:  # echo with logprobs waits for the engine's prompt log-probabilities
                if not (self.s.echo and self.s.logprobs is not None and not c.finished):
                    yield start(c)
                if c.finished:  # max_tokens 0
                    yield event(c, "", [], c.finish_reason)
            async for c, piece, entries in self.events():
                if not c.started:
                    yield start(c)
                if piece or entries:
                    yield event(c, piece, entries)
                if c.finished:
                    yield event(c, "", [], c.finish_reason)
            if any(not c.finished for c in self.choices):
                return  # the client went away
            if self.s.include_usage:
                yield "data: " + json.dumps({"id": self.id, "object": obj, "created": self.created,
                                             "model": self.svc.name, "choices": [], "usage": self.usage()}) + "\n\n"
        except APIError as e:
            yield "data: " + json.dumps(e.body()) + "\n\n"
        yield "data: [DONE]\n\n"


# ---- the HTTP layer -------------------------------------------------------------------------------

ENDPOINTS = ("/", "/health", "/metrics", "/version", "/openapi.json", "/v1/models", "/v1/completions",
             "/v1/chat/completions", "/tokenize", "/detokenize")
OPEN_PATHS = {"/", "/index.html", "/health", "/openapi.json"}
LOOPBACK_NAMES = {"localhost", "localhost.", "127.0.0.1", "::1"}


def _host_name(host: str) -> tuple[str, int | None]:
    """'[::1]:8000' -> ('::1', 8000); 'example.com' -> ('example.com', None)."""
    host = host.strip().lower()
    port = None
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[1:end], host[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        return name, port
    if host.count(":") == 1:
        name, _, p = host.partition(":")
        if not p.isdigit():
            raise ValueError(host)
        return name, int(p)
    return host, None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _error(e: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


class FrontMiddleware:
    """Outermost: the Host check (DNS rebinding), the access log and the request counter."""

    def __init__(self, app, metrics: Metrics, allowed_hosts):
        self.app, self.metrics = app, metrics
        self.any_host = allowed_hosts is not None and "*" in allowed_hosts
        self.names = LOOPBACK_NAMES | {h.lower() for h in (allowed_hosts or ())}

    def host_ok(self, scope) -> APIError | None:
        if self.any_host:
            return None
        raw = dict(scope.get("headers") or []).get(b"host")
        if not raw:
            return APIError(400, "the Host header is required")
        try:
            name, _ = _host_name(raw.decode("latin-1"))
        except ValueError:
            return APIError(400, "the Host header is malformed")
        # the name is what a rebinding attack controls; the port may differ behind a port mapping
        if name in self.names or _is_ip(name):
            return None
        return APIError(421, f"the Host header {name!r} does not name this server; start it with "
                             f"--allowed-host {name} to accept it")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
        path = scope.get("path", "")
        try:
            err = self.host_ok(scope)
            if err is not None:
                await _error(err)(scope, receive, send_)
            else:
                await self.app(scope, receive, send_)
        except Exception as e:  # a bug in a handler: this request gets a 500, the server goes on
            log.exception("unhandled error in %s %s", scope.get("method"), path)
            if not status[0]:
                await _error(APIError(500, f"internal error: {type(e).__name__}"))(scope, receive, send_)
        finally:
            ep = path if path in ENDPOINTS else "other"
            self.metrics.requests.labels(ep, str(status[0] or 500)).inc()
            client = scope.get("client") or ("-", 0)
            log.info('%s:%s "%s %s HTTP/%s" %s %.1fms', client[0], client[1], scope.get("method"), path,
                     scope.get("http_version"), status[0] or "-", (time.perf_counter() - t0) * 1e3)


class AuthMiddleware:
    """``Authorization: Bearer KEY`` on every path but the open ones."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS and scope.get("method") != "OPTIONS":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return await _error(APIError(401, "Incorrect or missing API key: pass it as "
                                                  "'Authorization: Bearer KEY'"))(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream:
    """An SSE response that aborts its generation when the client hangs up (mid-stream or before)."""

    def __init__(self, gen: Generation):
        self.gen = gen

    async def __call__(self, scope, receive, send):
        gen = self.gen

        async def watch():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    gen.queue.put_nowait(DISCONNECT)
                    return
        watcher = asyncio.ensure_future(watch())
        body = gen.stream()
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for ev in body:
                if watcher.done():
                    break
                if ev:
                    await send({"type": "http.response.body", "body": ev.encode(), "more_body": True})
            if not watcher.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client went away
        finally:
            watcher.cancel()
            await body.aclose()
            gen.abort()
            if gen.svc.metrics is not None:
                gen.svc.metrics.e2e.observe(time.perf_counter() - gen.start)


async def read_json(request, limit: int, timeout: float) -> dict:
    """The request's JSON object: 415 unless application/json, 413 past ``limit`` bytes (counted as
    they arrive, so a chunked body cannot dodge it), 408 when the body is slower than ``timeout``."""
    import anyio

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise APIError(413, f"the request body is {n} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout):
            async for c in request.stream():
                size += len(c)
                if size > limit:
                    raise APIError(413, f"the request body is over {limit} bytes")
                chunks.append(c)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout:g} s") from None
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"could not parse the JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    return body


def build_app(model, tokenizer, tokens=None, model_name: str = "lmforge", *, api_key: str | None = None,
              cors_origins=(), allowed_hosts=None, max_body_bytes: int = 1 << 20, max_queued: int = 1024,
              request_timeout_s: float = 600.0, idle_timeout_s: float = 30.0, num_blocks: int = 1024,
              block_size: int = 16, max_batch_tokens: int = 512):
    """The Starlette app serving ``model`` (run it with ``serve`` or ``start_in_thread``).

    Endpoints: GET ``/`` (the web chat page), ``/health``, ``/metrics``, ``/version``,
    ``/openapi.json``, ``/v1/models``; POST ``/v1/completions``, ``/v1/chat/completions``,
    ``/tokenize``, ``/detokenize``. ``tokens``: the model's ``TokenSpec`` (default: inferred from
    the tokenizer). ``api_key``: wanted as ``Authorization: Bearer`` everywhere but ``/``, ``/health``
    and ``/openapi.json``. ``cors_origins``: origins allowed cross-origin (none by default).
    ``allowed_hosts``: Host names accepted besides IP literals and localhost (``["*"]``: any).
    ``max_body_bytes``: the largest request body (413). ``max_queued``: the most sequences
    (prompts x n) in flight at once, running or waiting (429 beyond). ``request_timeout_s``: a
    generation's deadline (504). ``idle_timeout_s``: how long a client may stall a body or keep an
    idle connection. The rest configure the ``Engine``.

    ``app.state.service`` is the ``Service``; ``app.state.engine`` the engine, ``app.state.loop``
    its ``EngineLoop``, ``app.state.metrics`` the ``Metrics``.
    """
    from contextlib import asynccontextmanager

    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"lmforge serve needs starlette, uvicorn and prometheus-client ({e}); "
                          "pip install 'lmforge[serve]'") from None
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    for name, v in (("max_body_bytes", max_body_bytes), ("max_queued", max_queued)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    for name, v in (("request_timeout_s", request_timeout_s), ("idle_timeout_s", idle_timeout_s)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
    holder: dict = {}
    metrics = Metrics(lambda: holder.get("svc") and holder["svc"].loop)
    svc = Service(model, tokenizer, tokens, model_name, num_blocks=num_blocks, block_size=block_size,
                  max_batch_tokens=max_batch_tokens, max_queued=max_queued, request_timeout_s=request_timeout_s,
                  metrics=metrics)
    holder["svc"] = svc

    async def body_of(request) -> dict:
        return await read_json(request, max_body_bytes, idle_timeout_s)

    async def page(request):
        from .webchat import PAGE

        return HTMLResponse(PAGE)

    async def health(request):
        alive = svc.loop.alive()
        e = svc.engine
        return JSONResponse({"status": "ok" if alive else "dead", "running": svc.loop.running(),
                             "waiting": svc.loop.waiting(), "in_flight": svc.loop.in_flight,
                             "free_blocks": e.pool.available(), "kv_usage": round(svc.loop.kv_usage(), 4),
                             "prefix_hit_rate": round(e.prefix_hit_rate(), 4), "step_errors": svc.loop.errors,
                             "stats": dict(e.stats)}, status_code=200 if alive else 503)

    async def metrics_ep(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def version(request):
        from .. import __version__

        return JSONResponse({"version": __version__})

    async def openapi(request):
        return JSONResponse(openapi_schema(model_name))

    async def models(request):
        return JSONResponse({"object": "list", "data": [{
            "id": svc.name, "object": "model", "created": svc.created, "owned_by": "lmforge", "root": svc.name,
            "parent": None, "max_model_len": svc.max_model_len, "chat_template": svc.spec.template}]})

    async def generate(request, chat: bool):
        body = await body_of(request)
        svc.check_model(body)
        s = svc.settings(body, chat)
        if chat and not isinstance(body.get("messages"), list):
            raise APIError(400, "'messages' must be a non-empty list", "messages")
        prompts = await run_in_threadpool(svc.prompts, body, chat)
        gen = Generation(svc, s, prompts)
        try:
            gen.submit()
        except BaseException:
            gen.abort()
            raise
        if s.stream:
            return EventStream(gen)
        watcher = asyncio.ensure_future(_watch_disconnect(request, gen.queue))
        try:
            out = await gen.response()
        finally:
            watcher.cancel()
            gen.abort()
            metrics.e2e.observe(time.perf_counter() - gen.start)
        if out is None:
            return Response(status_code=499)  # nobody is listening
        return JSONResponse(out)

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def tokenize_ep(request):
        body = await body_of(request)
        if body.get("model") is not None:
            svc.check_model(body)

        def run():
            if "messages" in body:
                agp = _get(body, "add_generation_prompt", bool, True)
                try:
                    return svc.spec.encode_chat(tokenizer, body["messages"], add_generation_prompt=agp)
                except ValueError as e:
                    raise APIError(400, str(e), "messages") from None
                except Exception as e:
                    raise APIError(400, f"could not render the conversation: {e}", "messages") from None
            p = body.get("prompt")
            if not isinstance(p, str):
                raise APIError(400, "'prompt' (a string) or 'messages' is required", "prompt")
            if _get(body, "add_special_tokens", bool, True):
                return svc.spec.encode_prompt(tokenizer, p)
            return tokenizer.encode(p, disallowed_special=())
        ids = await run_in_threadpool(run)
        out = {"count": len(ids), "max_model_len": svc.max_model_len, "tokens": ids}
        if _get(body, "return_token_strs", bool, False):
            out["token_strs"] = [svc.safe.decode([t]) for t in ids]
        return JSONResponse(out)

    async def detokenize_ep(request):
        body = await body_of(request)
        if body.get("model") is not None:
            svc.check_model(body)
        ids = body.get("tokens")
        if not isinstance(ids, list):
            raise APIError(400, "'tokens' must be a list of token ids", "tokens")
        if ids:
            svc.check_ids(ids, "tokens")
        return JSONResponse({"prompt": await run_in_threadpool(svc.safe.decode, ids)})

    async def on_api_error(request, e: APIError):
        return _error(e)

    async def on_http_error(request, e: HTTPException):
        return _error(APIError(e.status_code, str(e.detail) if e.status_code != 404 else
                               f"no route {request.url.path}"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        svc.loop.close()

    mw = [Middleware(FrontMiddleware, metrics=metrics, allowed_hosts=allowed_hosts)]
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        mw.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600))
    if api_key:
        mw.append(Middleware(AuthMiddleware, key=api_key))
    routes = [Route("/", page), Route("/index.html", page), Route("/health", health), Route("/metrics", metrics_ep),
              Route("/version", version), Route("/openapi.json", openapi), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/tokenize", tokenize_ep, methods=["POST"]), Route("/detokenize", detokenize_ep, methods=["POST"])]
    app = Starlette(routes=routes, middleware=mw, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error})
    app.state.service = svc
    app.state.engine = svc.engine
    app.state.loop = svc.loop
    app.state.metrics = metrics
    app.state.idle_timeout_s = idle_timeout_s
    app.state.request_timeout_s = request_timeout_s
    return app


async def _watch_disconnect(request, queue: asyncio.Queue) -> None:
    """Puts DISCONNECT on ``queue`` when the client of a non-streaming request hangs up."""
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            queue.put_nowait(DISCONNECT)
            return


# ---- running it -------------------------------------------------------------------------------

def _config(app, host: str, port: int, **kw):
    import uvicorn

    idle = getattr(app.state, "idle_timeout_s", 30.0)
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="on",
                          timeout_keep_alive=int(max(1, idle)), timeout_graceful_shutdown=kw.pop("drain_s", 30),
                          limit_concurrency=kw.pop("limit_concurrency", None), **kw)


def serve(app, host: str = "127.0.0.1", port: int = 8000, *, drain_s: float = 30.0, on_bound=None, **uvicorn_kw):
    """Run ``app`` under uvicorn until SIGINT/SIGTERM; running requests are drained (up to ``drain_s``)
    before the engine stops. ``on_bound(port)`` is called once the socket is listening. A port in
    use raises ``OSError`` before anything is served."""
    import signal
    import socket

    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    server = uvicorn.Server(_config(app, host, sock.getsockname()[1], drain_s=int(drain_s), **uvicorn_kw))
    if on_bound is not None:
        on_bound(sock.getsockname()[1])
    # uvicorn drains, then re-raises the signal it caught: let that end run() rather than the process
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, old)


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0, **uvicorn_kw):
    """Serve ``app`` on a background thread (tests, benchmarks): returns ``(server, port)``; stop it
    with ``stop_thread(server)``."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(_config(app, host, bound, drain_s=int(uvicorn_kw.pop("drain_s", 5)), **uvicorn_kw))
    server.install_signal_handlers = lambda: None  # not the main thread
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="lmforge-uvicorn")
    t.start()
    deadline = time.time() + 30
    while not server.started:
        if not t.is_alive() or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    server._thread = t
    return server, bound


def stop_thread(server, timeout: float = 30.0) -> None:
    server.should_exit = True
    t = getattr(server, "_thread", None)
    if t is not None:
        t.join(timeout)


# ---- OpenAPI ------------------------------------------------------------------------------------

def openapi_schema(model_name: str = "lmforge") -> dict:
    """A hand-written OpenAPI 3.0 description of the endpoints and their request bodies."""
    def err():
        return {"description": "an OpenAI-style error", "content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Error"}}}}

    def ok(desc="OK", schema=None):
        c = {"description": desc}
        if schema is not None:
            c["content"] = {"application/json": {"schema": schema}}
        return c

    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    stop = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}],
            "nullable": True}
    sampling = {
        "model": {"type": "string", "example": model_name},
        "max_tokens": {"type": "integer", "minimum": 0, "nullable": True},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
        "top_k": {"type": "integer", "minimum": -1},
        "min_p": {"type": "number", "minimum": 0, "maximum": 1},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "repetition_penalty": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 10},
        "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100,
                                                                  "maximum": 100}},
        "n": {"type": "integer", "minimum": 1, "maximum": 16},
        "seed": {"type": "integer", "nullable": True},
        "stop": stop,
        "stop_token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "ignore_eos": {"type": "boolean"},
        "min_tokens": {"type": "integer", "minimum": 0},
        "include_stop_str_in_output": {"type": "boolean"},
        "stream": {"type": "boolean"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "nullable": True},
        "user": {"type": "string"},
    }
    completion_req = {"type": "object", "required": ["model", "prompt"], "properties": {
        **sampling,
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             ids, {"type": "array", "items": ids, "minItems": 1}]},
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
        "best_of": {"type": "integer", "minimum": 1, "maximum": 1},
    }}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "required": ["type", "text"],
            "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}}}}]},
        "name": {"type": "string"}}}
    chat_req = {"type": "object", "required": ["model", "messages"], "properties": {
        **sampling,
        "messages": {"type": "array", "items": message, "minItems": 1},
        "max_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "nullable": True},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20, "nullable": True},
    }}
    tokenize_req = {"oneOf": [
        {"type": "object", "required": ["prompt"], "properties": {
            "model": {"type": "string"}, "prompt": {"type": "string"}, "add_special_tokens": {"type": "boolean"},
            "return_token_strs": {"type": "boolean"}}},
        {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": "string"}, "messages": {"type": "array", "items": message, "minItems": 1},
            "add_generation_prompt": {"type": "boolean"}}}]}
    detok_req = {"type": "object", "required": ["tokens"], "properties": {
        "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}}}

    def post(summary, schema, result, stream=False):
        content = {"application/json": {"schema": result}}
        if stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": schema}}},
            "responses": {"200": {"description": "OK", "content": content}, "400": err(), "401": err(),
                          "404": err(), "413": err(), "415": err(), "429": err(), "500": err(), "504": err()}}}

    def get(summary, schema=None, media="application/json"):
        r = ok(schema=schema) if media == "application/json" else {
            "description": "OK", "content": {media: {"schema": {"type": "string"}}}}
        return {"get": {"summary": summary, "responses": {"200": r}}}

    obj = {"type": "object"}
    return {
        "openapi": "3.0.3",
        "info": {"title": "lmforge serve", "version": "1", "description": "OpenAI-compatible API of lmforge"},
        "paths": {
            "/": get("the web chat page", media="text/html"),
            "/health": {"get": {"summary": "engine liveness and statistics", "responses": {
                "200": ok(schema=obj), "503": ok("the engine loop is dead", obj)}}},
            "/metrics": get("Prometheus metrics", media="text/plain"),
            "/version": get("the lmforge version", {"type": "object", "properties": {"version": {"type": "string"}}}),
            "/v1/models": get("the served model", obj),
            "/v1/completions": post("text completion", completion_req, obj, stream=True),
            "/v1/chat/completions": post("chat completion", chat_req, obj, stream=True),
            "/tokenize": post("text or a conversation to token ids", tokenize_req, {
                "type": "object", "properties": {"count": {"type": "integer"}, "max_model_len": {"type": "integer"},
                                                 "tokens": {"type": "array", "items": {"type": "integer"}}}}),
            "/detokenize": post("token ids to text", detok_req, {
                "type": "object", "properties": {"prompt": {"type": "string"}}}),
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": "string", "nullable": True}, "code": {"nullable": True}}}}}}},
    }


# ---- in-process use (lmforge chat) ----------------------------------------------------------------

class Server:
    """The engine loop without HTTP, for ``lmforge chat``: ``prompt_ids`` and a blocking ``run_choice``."""

    def __init__(self, model, tokenizer, model_name: str = "lmforge", tokens=None, num_blocks: int = 1024,
                 block_size: int = 16, max_batch_tokens: int = 512):
        from ..tokenize.special import TokenSpec

        self.tok, self.name = tokenizer, model_name
        self.spec = tokens if tokens is not None else TokenSpec.for_tokenizer(tokenizer)
        st = tokenizer.special_tokens
        self.end_id, self.eos_id = st.get("<|end|>"), st.get("<|endoftext|>")
        self.safe = SafeTokenizer(tokenizer)
        self.engine = Engine(model, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                             eos_token_id=None, tokenizer=self.safe)
        self.loop = EngineLoop(self.engine)

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            return self.spec.encode_chat(self.tok, body["messages"])
        return self.spec.encode_prompt(self.tok, body["prompt"])

    def run_choice(self, ids: list[int], p: SamplingParams, on_text=None):
        """Generate one choice (the model's stop tokens and the template's stop strings added);
        ``on_text(piece, None)`` as text becomes safe to show. Returns (text, tokens, [], finish reason)."""
        import queue

        q: queue.Queue = queue.Queue()
        p = dataclasses.replace(p, stop_token_ids=list(dict.fromkeys(list(p.stop_token_ids) + list(self.spec.stop))),
                                stop=list(p.stop) + [s for s in self.spec.chat_stop if s not in p.stop])
        job = Job(list(ids), p, lambda j, o, e: q.put((o, e)))
        text, n = [], 0
        self.loop.submit([job])
        try:
            while True:
                o, e = q.get()
                if e is not None:
                    raise RuntimeError(e.message)
                if o.finish_reason == "error":
                    raise RuntimeError(o.error)
                n += o.token is not None
                if o.text:
                    text.append(o.text)
                    if on_text is not None:
                        on_text(o.text, None)
                if o.finished:
                    return "".join(text), n, [], o.finish_reason
        finally:
            self.loop.abort([job])
