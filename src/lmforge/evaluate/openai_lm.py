"""Any OpenAI-compatible endpoint as an ``lm.LM``: generation, and log-likelihoods where the endpoint echoes them.

Knows the wire format of ``/v1/chat/completions`` and ``/v1/completions`` (what
``lmforge serve``, vLLM, llama.cpp's server and OpenAI speak), how to retry a
request (connection errors, 429 and 5xx, with exponential backoff and the
server's ``Retry-After``), and how to read a completions endpoint's echoed
prompt log-probabilities (``echo`` with ``logprobs``) as lm-eval's
``loglikelihood``. Plain ``httpx``; the ``openai`` package is not needed.
Knows nothing of tasks or metrics, and holds no tokenizer.

* ``generate_until``: ``chat=True`` sends the context as one user message to
  ``/v1/chat/completions`` (the server applies its chat template);
  ``chat=False`` sends it as the prompt of ``/v1/completions``. ``until`` goes
  as ``stop`` (at most ``max_stop`` of them, OpenAI allows 4) and the text is
  cut again here before the first stop string, so every stop string holds
  whatever the server does with it; ``max_gen_toks`` is ``max_tokens`` (256,
  lm-eval's default, when absent); ``temperature`` 0 or ``do_sample`` False is
  greedy (``do_sample`` without a temperature samples at 1); ``top_p``, ``top_k``
  and ``seed`` pass through; any other key is a ValueError naming it. Requests
  run ``concurrency`` at a time, answers in order.
* ``loglikelihood`` / ``loglikelihood_rolling`` (``/v1/completions`` with
  ``echo``, ``logprobs=1``, ``max_tokens=1``). With the server's tokenizer
  (``scoring="tokens"``, or "auto" when ``POST /tokenize`` answers: lmforge
  serve and vLLM have it) the split is lm-eval's exactly: the context's
  trailing whitespace moves to the continuation, the context is
  ``prefix + encode(context)`` (the prefix: what ``/tokenize`` puts before a
  text, the BOS), the continuation ``prefix + encode(context + continuation)``
  after that many ids, and the prompt is sent as those ids; a prompt past the
  server's window is cut from the left (counted in ``stats["truncated"]``), and
  rolling texts go in lm-eval's disjoint windows of ``max_model_len - 2``
  tokens (one is generated, the window's last is sent). Without a tokenizer
  (``scoring="offsets"``, or "auto" without ``/tokenize``) the text is sent
  whole and the continuation is the echoed tokens at or past the end of the
  context by ``text_offset``, a token straddling that point counted in the
  continuation: the same as lm-eval's wherever the tokens break at the end of
  the context; texts are scored whole (no windows). ``is_greedy``: each
  continuation token is its position's top token. The first token of a text
  is scored only after a BOS / document token the server prepends; otherwise
  this raises. An endpoint that refuses ``echo`` or returns no
  log-probabilities raises the base class's ``NotImplementedError``
  (multiple-choice and perplexity tasks need them), with the reason.

Bad input and failures: a status other than 2xx, 429 and 5xx, or the last retry
failing, raises ``OpenAIError`` naming the URL, the status and the server's
message; a connection that cannot be made names the URL and the reason. A
generation prompt longer than the server's window is the server's 400 (no
tokenizer here to cut it with).
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import lm

__all__ = ["OpenAILM", "OpenAIError"]

GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "max_tokens", "temperature", "top_p", "top_k", "seed",
              "do_sample")
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's
SCORING = ("auto", "tokens", "offsets")
RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))


class OpenAIError(RuntimeError):
    """A request the endpoint refused or that could not be made; ``status`` is None for a connection error."""

    def __init__(self, message: str, url: str, status: int | None = None, body=None):
        super().__init__(message)
        self.url, self.status, self.body = url, status, body


def _server_message(body) -> str:
    """The ``error.message`` of an OpenAI-style error body, or the body itself (shortened)."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
    text = body if isinstance(body, str) else repr(body)
    return text[:500] + ("..." if len(text) > 500 else "")


def _cut(text: str, until) -> str:
    """``text`` up to the first occurrence of any stop string."""
    cut = len(text)
    for s in until or ():
        if s:
            i = text.find(s)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


class OpenAILM(lm.LM):
    """``base_url`` (``http://host:port`` or ``http://host:port/v1``) and ``model`` (None: the only model the
    endpoint's ``/v1/models`` lists). ``api_key`` defaults to ``$OPENAI_API_KEY`` (sent as a Bearer token when
    set). ``max_retries`` more tries after the first, waiting ``backoff_s * 2**k`` (or ``Retry-After``, at most
    ``max_wait_s``)."""

    def __init__(self, base_url: str, model: str | None = None, *, api_key: str | None = None, chat: bool = True,
                 timeout: float = 60, max_retries: int = 2, concurrency: int = 4, backoff_s: float = 0.5,
                 max_wait_s: float = 30.0, max_stop: int = 4, scoring: str = "auto"):
        import httpx

        super().__init__()
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"OpenAILM: base_url must be an http(s) URL, got {base_url!r}")
        if int(concurrency) < 1:
            raise ValueError(f"OpenAILM: concurrency must be >= 1, got {concurrency!r}")
        if int(max_retries) < 0:
            raise ValueError(f"OpenAILM: max_retries must be >= 0, got {max_retries!r}")
        if scoring not in SCORING:
            raise ValueError(f"OpenAILM: scoring must be one of {SCORING}, got {scoring!r}")
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.root = self.base_url[: -len("/v1")]
        self.scoring = scoring
        self._prefix: list[int] | None = None  # the ids /tokenize puts before a text (BOS), once known
        self._use_ids: bool | None = None if scoring == "auto" else scoring == "tokens"
        self.chat, self.timeout, self.max_retries = bool(chat), float(timeout), int(max_retries)
        self.concurrency, self.backoff_s, self.max_wait_s = int(concurrency), float(backoff_s), float(max_wait_s)
        self.max_stop = int(max_stop)
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._http = httpx.Client(timeout=self.timeout, headers=headers)
        self.stats.update({"requests": 0, "retries": 0})
        self._lock = threading.Lock()  # the stats and the tokenize cache, from the worker threads
        self._tok_cache: dict[tuple[str, bool], list[int]] = {}  # shared contexts are tokenized once
        self._models: list | None = None
        self._max_length: int | None = None
        self.model = model if model is not None else self._only_model()
        self.name = f"{self.model}@{self.base_url}"

    def close(self) -> None:
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"OpenAILM({self.base_url!r}, {self.model!r}, chat={self.chat})"

    # ---- HTTP ----
    def _request(self, method: str, path: str, body: dict | None = None, root: bool = False) -> dict:
        """The parsed JSON answer of ``method path`` (under ``/v1``, or the server's root); retries what is worth
        retrying; ``OpenAIError`` otherwise."""
        import httpx

        url = (self.root if root else self.base_url) + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            wait = self.backoff_s * (2 ** attempt)
            with self._lock:
                self.stats["requests"] += 1
            try:
                r = self._http.request(method, url, json=body)
            except httpx.TransportError as e:  # refused, reset, timed out, protocol error
                if last:
                    raise OpenAIError(f"{method} {url}: could not get an answer after {attempt + 1} "
                                      f"attempt(s): {type(e).__name__}: {e}", url) from None
            else:
                try:
                    parsed = r.json()
                except ValueError:
                    parsed = r.text
                if 200 <= r.status_code < 300:
                    if not isinstance(parsed, dict):
                        raise OpenAIError(f"{method} {url}: status {r.status_code} but the body is not a JSON "
                                          f"object: {_server_message(parsed)}", url, r.status_code, parsed)
                    return parsed
                if r.status_code not in RETRY_STATUS or last:
                    tries = f" after {attempt + 1} attempts" if attempt else ""
                    raise OpenAIError(f"{method} {url}: HTTP {r.status_code}{tries}: {_server_message(parsed)}",
                                      url, r.status_code, parsed)
                after = r.headers.get("retry-after")
                if after is not None:
                    try:
                        wait = max(wait, float(after))
                    except ValueError:
                        pass
            with self._lock:
                self.stats["retries"] += 1
            time.sleep(min(wait, self.max_wait_s))
        raise AssertionError("unreachable")

    def _list_models(self) -> list:
        if self._models is None:
            data = self._request("GET", "/models").get("data")
            self._models = [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        return self._models

    def _only_model(self) -> str:
        ids = [m.get("id") for m in self._list_models() if m.get("id")]
        if len(ids) != 1:
            raise ValueError(f"OpenAILM: {self.base_url}/models lists {ids or 'no models'}; name one as model=")
        return ids[0]

    @property
    def max_length(self) -> int:
        """``max_model_len`` from ``/v1/models`` (vLLM and lmforge serve give it), else 0 (unknown); asked once."""
        if self._max_length is None:
            self._max_length = 0
            try:
                models = self._list_models()
            except OpenAIError:
                models = []
            for m in models:
                if m.get("id") == self.model and isinstance(m.get("max_model_len"), int):
                    self._max_length = m["max_model_len"]
        return self._max_length

    def _map(self, fn, items: list) -> list:
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))

    # ---- generation ----
    def _gen_body(self, context: str, kw: dict) -> tuple[str, dict, list[str]]:
        if not isinstance(context, str):
            raise TypeError(f"{self.name}: generate_until context must be a string, got {type(context).__name__}")
        if kw is not None and not isinstance(kw, dict):
            raise ValueError(f"{self.name}: gen_kwargs must be a dict, got {type(kw).__name__}")
        kw = dict(kw or {})
        unknown = [k for k in kw if k not in GEN_KWARGS]
        if unknown:
            raise ValueError(f"{self.name}: unknown gen_kwargs key {unknown[0]!r}; expected {', '.join(GEN_KWARGS)}")
        until = kw.get("until") or []
        if isinstance(until, str):
            until = [until]
        until = [s for s in until if s]
        body: dict = {"model": self.model}
        body["max_tokens"] = int(next((kw[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                                       if kw.get(k) is not None), DEFAULT_MAX_GEN_TOKS))
        temp = kw.get("temperature")
        if temp is None:
            temp = 1.0 if kw.get("do_sample") else 0.0  # lm-eval's: sampling without a temperature is at 1
        greedy = kw.get("do_sample") is False or float(temp) == 0.0
        body["temperature"] = 0.0 if greedy else float(temp)
        if not greedy and kw.get("top_p") is not None:
            body["top_p"] = float(kw["top_p"])
        if not greedy and kw.get("top_k"):
            body["top_k"] = int(kw["top_k"])  # not OpenAI's; vLLM's and lmforge serve's
        if kw.get("seed") is not None:
            body["seed"] = int(kw["seed"])
        if until:
            body["stop"] = until[: self.max_stop]
        if self.chat:
            body["messages"] = [{"role": "user", "content": context}]
            return "/chat/completions", body, until
        body["prompt"] = context
        return "/completions", body, until

    def _generate_one(self, req: tuple[str, dict]) -> str:
        context, kw = req
        path, body, until = self._gen_body(context, kw)
        r = self._request("POST", path, body)
        try:
            choice = r["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
        except (KeyError, IndexError, TypeError):
            raise OpenAIError(f"POST {self.base_url}{path}: the answer has no choices[0]."
                              f"{'message.content' if self.chat else 'text'}: {_server_message(r)}",
                              self.base_url + path, 200, r) from None
        return _cut(text or "", until)

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        return self._map(self._generate_one, list(requests))

    # ---- log-likelihoods from an echoing completions endpoint ----
    def _echo(self, text: str) -> tuple[list[float | None], list[int], list[float | None]]:
        """(logprob, text_offset, top logprob) of each prompt token of ``text``, as the endpoint echoes them."""
        url = self.base_url + "/completions"
        body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0, "echo": True,
                "logprobs": 1}
        try:
            r = self._request("POST", "/completions", body)
        except OpenAIError as e:
            if e.status is not None and 400 <= e.status < 500 and e.status not in (401, 403, 429):
                raise NotImplementedError(f"{self.name}: cannot score log-likelihoods (multiple-choice and "
                                          f"perplexity tasks need them): {e}") from None
            raise
        try:
            choice = r["choices"][0]
            lp = choice["logprobs"]
            toks, offs, tops = lp["token_logprobs"], lp["text_offset"], lp["top_logprobs"]
            echoed = choice["text"]
        except (KeyError, IndexError, TypeError):
            raise NotImplementedError(f"{self.name}: cannot score log-likelihoods (multiple-choice and perplexity "
                                      f"tasks need them): POST {url} gave no echoed prompt log-probabilities "
                                      "(choices[0].logprobs with token_logprobs, text_offset, top_logprobs)") from None
        if not echoed.startswith(text) or not (len(toks) == len(offs) == len(tops)):
            raise NotImplementedError(f"{self.name}: cannot score log-likelihoods: POST {url} did not echo the "
                                      "prompt with one log-probability per token")
        keep = [i for i, o in enumerate(offs) if o < len(text)]  # the prompt's tokens, not the generated one
        best = [None if tops[i] is None or not tops[i] else max(tops[i].values()) for i in keep]
        return [toks[i] for i in keep], [offs[i] for i in keep], best

    def _score(self, context: str, continuation: str) -> tuple[float, bool]:
        n = len(context) - len(context.rstrip())
        if n:  # lm-eval's: the context's trailing whitespace moves to the continuation
            context, continuation = context[:-n], context[-n:] + continuation
        text = context + continuation
        if not continuation:
            return 0.0, True
        toks, offs, best = self._echo(text)
        L, lp_sum, greedy, n = len(context), 0.0, True, 0
        for k, (lp, off, top) in enumerate(zip(toks, offs, best)):
            end = offs[k + 1] if k + 1 < len(offs) else len(text)
            if k == 0 and lp is None and off == end == 0:
                continue  # the BOS / document token the server prepended: context, not text
            if off < L and end <= L:
                continue  # a context token; one that straddles the end of the context is the continuation's
            if lp is None:
                raise ValueError(f"{self.name}: the endpoint gave no log-probability for the first token of "
                                 f"{text[:40]!r} (it prepends no BOS/document token), so it cannot be scored")
            lp_sum += float(lp)
            n += 1
            if top is not None and float(top) > float(lp) + 1e-6:
                greedy = False
        if n == 0:
            raise ValueError(f"{self.name}: no token of the continuation {continuation[:40]!r} was found in the "
                             "echoed prompt")
        return lp_sum, greedy

    # ---- log-likelihoods with the server's tokenizer (lm-eval's split exactly) ----
    def _tokenize(self, text: str, special: bool) -> list[int]:
        key = (text, special)
        with self._lock:
            hit = self._tok_cache.get(key)
        if hit is not None:
            return list(hit)
        r = self._request("POST", "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": special},
                          root=True)
        ids = r.get("tokens")
        if not (isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
            raise OpenAIError(f"POST {self.root}/tokenize: the answer has no 'tokens' list of ids", self.root, 200, r)
        with self._lock:
            if len(self._tok_cache) > 4096:
                self._tok_cache.clear()
            self._tok_cache[key] = ids
        return list(ids)

    def _ids_mode(self) -> bool:
        """Whether to score with token ids (``scoring``; "auto": whether the server's ``/tokenize`` answers)."""
        if self._use_ids is None:
            try:
                self._prefix = self._tokenize("", True)
                self._use_ids = True
            except OpenAIError as e:
                if e.status is None or e.status in (401, 403, 429) or e.status >= 500:
                    raise
                self._use_ids = False
        elif self._use_ids and self._prefix is None:
            self._prefix = self._tokenize("", True)
        return self._use_ids

    def _score_ids(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """The continuation's summed log-probability and greediness, the prompt sent as ids ``ctx + cont``."""
        if not cont:
            return 0.0, True
        if not ctx:
            raise ValueError(f"{self.name}: the server's tokenizer puts no BOS/document token before a text, so the "
                             "first token of a text cannot be scored")
        ids = ctx + cont
        room = self.max_length - 1 if self.max_length else len(ids)  # one token is generated
        if len(cont) > room:
            raise ValueError(f"{self.name}: a continuation of {len(cont)} tokens does not fit the server's context of "
                             f"{self.max_length} tokens")
        if len(ids) > room:
            with self._lock:
                self.stats["truncated"] += 1
            ids = ids[-room:]
        url = self.base_url + "/completions"
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 1}
        try:
            r = self._request("POST", "/completions", body)
            lp = r["choices"][0]["logprobs"]
            toks, tops = lp["token_logprobs"], lp["top_logprobs"]
        except OpenAIError as e:
            if e.status is not None and 400 <= e.status < 500 and e.status not in (401, 403, 429):
                raise NotImplementedError(f"{self.name}: cannot score log-likelihoods (multiple-choice and "
                                          f"perplexity tasks need them): {e}") from None
            raise
        except (KeyError, IndexError, TypeError):
            raise NotImplementedError(f"{self.name}: cannot score log-likelihoods (multiple-choice and perplexity "
                                      f"tasks need them): POST {url} gave no echoed prompt log-probabilities") from None
        if not (isinstance(toks, list) and isinstance(tops, list)) or len(toks) < len(ids) or len(tops) < len(ids):
            raise NotImplementedError(f"{self.name}: cannot score log-likelihoods: POST {url} did not echo one "
                                      "log-probability per prompt token")
        total, greedy = 0.0, True
        for k in range(len(ids) - len(cont), len(ids)):
            if toks[k] is None:
                raise ValueError(f"{self.name}: POST {url} gave no log-probability for prompt token {k}")
            total += float(toks[k])
            top = tops[k]
            if top and max(top.values()) > float(toks[k]) + 1e-6:
                greedy = False
        return total, greedy

    def _pair_ids(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: the trailing whitespace of the context moves to the continuation; the context is
        ``prefix + encode(context)``, the continuation ``prefix + encode(context + continuation)`` after it."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if context == "":
            return list(self._prefix), self._tokenize(continuation, False)
        ctx = self._prefix + self._tokenize(context, False)
        whole = self._prefix + self._tokenize(context + continuation, False)
        return ctx, whole[len(ctx):]

    def _rolling_ids(self, text: str) -> float:
        ids = self._tokenize(text, False)
        if not self._prefix:
            raise ValueError(f"{self.name}: the server's tokenizer puts no BOS/document token before a text, so the "
                             "first token of a text cannot be scored")
        if not self.max_length:
            return self._score_ids(self._prefix[-1:], ids)[0]
        from .local import rolling_windows

        # a window is sent whole (its last token too) and one token is generated: max_length - 2 positions
        return sum(self._score_ids(c, x)[0] for c, x in rolling_windows(ids, self._prefix[-1], self.max_length - 2))

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        if self._ids_mode():
            return self._map(lambda r: self._score_ids(*self._pair_ids(r[0], r[1])), list(requests))
        return self._map(lambda r: self._score(r[0], r[1]), list(requests))

    def loglikelihood_rolling(self, requests: list[str]) -> list[float]:
        """Each text's summed log-probability: in lm-eval's rolling windows with the server's tokenizer; scored
        whole by text offsets without one (a text past the server's window is then its 400)."""
        if self._ids_mode():
            return self._map(self._rolling_ids, list(requests))
        return self._map(lambda t: self._score("", t)[0], list(requests))
