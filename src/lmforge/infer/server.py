"""An OpenAI-compatible HTTP server over the engine (standard library only).

Knows the OpenAI wire format (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``; JSON or server-sent events) and how to
feed the engine from many client threads; knows nothing about how tokens are
computed. One background thread owns the engine and steps it while any request
is in flight, so concurrent clients share each forward pass (continuous
batching). A client that disconnects mid-stream aborts its request, which frees
its blocks. Bad requests get HTTP 4xx with an OpenAI-style error object.
"""
from __future__ import annotations

import codecs
import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .engine import Engine
from .sampling import SamplingParams, TextStream


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


class EngineLoop:
    """Runs ``engine.step()`` on one thread; hands each request's tokens to its queue."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.queues: dict[int, queue.Queue] = {}
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True, name="lmforge-engine")
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams) -> tuple[int, queue.Queue]:
        q: queue.Queue = queue.Queue()
        with self.lock:
            rid = self.engine.add_request(prompt, params)
            self.queues[rid] = q
        self.wake.set()
        return rid, q

    def abort(self, rid: int) -> None:
        with self.lock:
            self.engine.abort(rid)
            q = self.queues.pop(rid, None)
        if q is not None:
            q.put(None)

    def _run(self) -> None:
        while not self.stop:
            with self.lock:
                busy = self.engine.has_work()
                outs = self.engine.step() if busy else []
                for o in outs:
                    q = self.queues.get(o.request_id)
                    if q is not None:
                        q.put(o)
                        if o.finished:
                            self.queues.pop(o.request_id, None)
            if not busy:
                self.wake.wait(0.05)
                self.wake.clear()


def _get(body: dict, key: str, types, default=None, check=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise APIError(400, f"'{key}' must be of type {types}, got a boolean", key)
    if not isinstance(v, types):
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise APIError(400, f"'{key}' must be {names}, got {type(v).__name__}", key)
    if check is not None and not check(v):
        raise APIError(400, f"'{key}' is out of range: {v!r}", key)
    return v


class Server:
    def __init__(self, model, tokenizer, model_name: str = "lmforge", num_blocks: int = 1024, block_size: int = 16,
                 max_batch_tokens: int = 512):
        self.model, self.tok, self.name = model, tokenizer, model_name
        st = tokenizer.special_tokens
        self.end_id = st.get("<|end|>")
        self.eos_id = st.get("<|endoftext|>")
        self.bos_id = st.get("<|bos|>", self.eos_id)
        self.engine = Engine(model, num_blocks=num_blocks, block_size=block_size, max_batch_tokens=max_batch_tokens,
                             eos_token_id=None, tokenizer=tokenizer)  # the engine needs it for stop strings
        self.loop = EngineLoop(self.engine)
        self.created = int(time.time())

    # ---- request parsing ----
    def params(self, body: dict, default_max: int) -> tuple[SamplingParams, int, bool, bool]:
        max_tokens = _get(body, "max_completion_tokens", int, None) or _get(body, "max_tokens", int, default_max)
        if max_tokens < 1:
            raise APIError(400, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
        stop = body.get("stop")
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 strings", "stop")
        lp = body.get("logprobs")
        if isinstance(lp, bool):  # chat style: logprobs=true, top_logprobs=k
            logprobs = (_get(body, "top_logprobs", int, 0, lambda v: 0 <= v <= 20) if lp else None)
        else:
            logprobs = _get(body, "logprobs", int, None, lambda v: 0 <= v <= 5)
        bias = _get(body, "logit_bias", dict, {})
        try:
            bias = {int(k): float(v) for k, v in bias.items()}
        except (TypeError, ValueError):
            raise APIError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
        stops = [t for t in (self.end_id, self.eos_id) if t is not None]
        p = SamplingParams(
            max_tokens=max_tokens,
            temperature=float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2)),
            top_p=float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1)),
            top_k=_get(body, "top_k", int, 0, lambda v: v >= 0),
            min_p=float(_get(body, "min_p", (int, float), 0.0, lambda v: 0 <= v <= 1)),
            presence_penalty=float(_get(body, "presence_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2)),
            frequency_penalty=float(_get(body, "frequency_penalty", (int, float), 0.0, lambda v: -2 <= v <= 2)),
            repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0, lambda v: v > 0)),
            logit_bias=bias, stop=stop, stop_token_ids=stops, seed=_get(body, "seed", int, None),
            logprobs=logprobs)
        try:
            p.validate(self.model.cfg.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        n = _get(body, "n", int, 1, lambda v: 1 <= v <= 16)
        stream = bool(_get(body, "stream", bool, False))
        so = _get(body, "stream_options", dict, {}) or {}
        return p, n, stream, bool(so.get("include_usage", False))

    def check_model(self, body: dict) -> None:
        m = body.get("model")
        if not isinstance(m, str):
            raise APIError(400, "'model' is required (a string)", "model")
        if m != self.name:
            raise APIError(404, f"The model '{m}' does not exist; this server serves '{self.name}'", "model",
                           "model_not_found")

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise APIError(400, "'messages' must be a non-empty list", "messages")
            from ..tokenize.chat import render

            norm = []
            for m in msgs:
                if isinstance(m, dict) and isinstance(m.get("content"), list):  # content parts: text only
                    m = {**m, "content": "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))}
                norm.append(m)
            try:
                ids, _ = render(self.tok, norm, add_generation_prompt=True)
            except ValueError as e:
                raise APIError(400, str(e), "messages") from None
            return ids
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if not isinstance(prompt, str):
            raise APIError(400, "'prompt' must be a string (or a list of token ids)", "prompt")
        ids = self.tok.encode(prompt, disallowed_special=())
        return ([self.bos_id] if self.bos_id is not None else []) + ids

    def check_length(self, ids: list[int], p: SamplingParams) -> None:
        ctx = self.model.cfg.max_seq_len
        if len(ids) + p.max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(ids) + p.max_tokens} tokens ({len(ids)} in the prompt, {p.max_tokens} for the "
                                "completion). Please reduce the length of the prompt or max_tokens.",
                           "max_tokens")

    # ---- generation ----
    def run_choice(self, ids: list[int], p: SamplingParams, on_text=None, cancelled=None):
        """Generate one choice; ``on_text(piece, logprob_entry)`` is called as text becomes safe to show."""
        rid, q = self.loop.submit(ids, p)
        ts = TextStream(self.tok, p.stop)
        text, n_tokens, lps, reason = [], 0, [], None
        chars, utf8 = 0, codecs.getincrementaldecoder("utf-8")(errors="replace")  # characters of the text so far
        try:
            while True:
                try:
                    o = q.get(timeout=0.5)
                except queue.Empty:
                    if cancelled is not None and cancelled():
                        raise BrokenPipeError
                    continue
                if o is None:
                    reason = "abort"
                    break
                n_tokens += 1
                entry = None
                if p.logprobs is not None and o.token not in p.stop_token_ids:
                    # text_offset: where the token starts in the completion text, in characters
                    # (a token that ends a multi-byte character starts in that character)
                    entry = {"token": self.tok.decode([o.token]), "logprob": o.logprob,
                             "top_logprobs": [{"token": self.tok.decode([t]), "logprob": v}
                                              for t, v in (o.top_logprobs or [])], "text_offset": chars}
                    lps.append(entry)
                if o.token not in p.stop_token_ids:
                    chars += len(utf8.decode(self.tok.decode_bytes([o.token])))
                piece = "" if o.token in p.stop_token_ids else ts.push(o.token)
                if o.finished or ts.stopped:
                    piece += "" if ts.stopped else ts.flush()
                if piece or entry:
                    text.append(piece)
                    if on_text is not None:
                        on_text(piece, entry)
                if ts.stopped:
                    self.loop.abort(rid)
                    reason = "stop"
                    break
                if o.finished:
                    reason = "stop" if o.finish_reason == "stop" else "length"
                    break
        except BaseException:
            self.loop.abort(rid)
            raise
        return "".join(text), n_tokens, lps, reason


class Handler(BaseHTTPRequestHandler):
    server_version = "lmforge"
    protocol_version = "HTTP/1.1"
    app: Server

    def log_message(self, fmt, *args):  # quiet
        pass

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        app = self.app
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self._json(200, {"status": "ok", "running": len(app.engine.running),
                                    "waiting": len(app.engine.waiting), "free_blocks": app.engine.pool.available(),
                                    "prefix_hit_rate": round(app.engine.prefix_hit_rate(), 4),
                                    "stats": dict(app.engine.stats)})
        if path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": app.name, "object": "model",
                                                                 "created": app.created, "owned_by": "lmforge"}]})
        if path in ("/", "/index.html"):
            from .webchat import PAGE

            data = PAGE.replace("__MODEL__", app.name).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        return self._json(404, APIError(404, f"no route {self.path}", kind="not_found_error").body())

    def do_POST(self):
        try:
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                raise APIError(404, f"no route {self.path}", kind="not_found_error")
            n = int(self.headers.get("Content-Length") or 0)
            if n > 8 << 20:
                raise APIError(413, "request body too large")
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                raise APIError(400, f"could not parse the JSON body: {e}") from None
            if not isinstance(body, dict):
                raise APIError(400, "the JSON body must be an object")
            self.handle_generation(body, chat=self.path.endswith("chat/completions"))
        except APIError as e:
            self._json(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def handle_generation(self, body: dict, chat: bool):
        app = self.app
        app.check_model(body)
        p, n, stream, include_usage = app.params(body, default_max=512 if chat else 16)
        ids = app.prompt_ids(body, chat)
        app.check_length(ids, p)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if not stream:
            choices, completion = [], 0
            for i in range(n):
                pi = p if p.seed is None or i == 0 else SamplingParams(**{**p.__dict__, "seed": p.seed + i})
                text, k, lps, reason = app.run_choice(ids, pi)
                completion += k
                if chat:
                    c = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": {"content": _chat_logprobs(lps)} if p.logprobs is not None else None}
                else:
                    c = {"index": i, "text": text, "finish_reason": reason,
                         "logprobs": _completion_logprobs(lps) if p.logprobs is not None else None}
                choices.append(c)
            return self._json(200, {"id": rid, "object": obj, "created": created, "model": app.name,
                                    "choices": choices, "usage": {"prompt_tokens": len(ids),
                                                                  "completion_tokens": completion,
                                                                  "total_tokens": len(ids) + completion}})
        # streaming: server-sent events
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def send(data: str):
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()

        def event(choices, usage=None):
            ev = {"id": rid, "object": chunk_obj, "created": created, "model": app.name, "choices": choices}
            if include_usage:
                ev["usage"] = usage
            send(json.dumps(ev))

        completion = 0
        for i in range(n):
            pi = p if p.seed is None or i == 0 else SamplingParams(**{**p.__dict__, "seed": p.seed + i})
            if chat:
                event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}])

            def on_text(piece, entry, i=i):
                if chat:
                    event([{"index": i, "delta": {"content": piece},
                            "logprobs": {"content": _chat_logprobs([entry])} if entry else None,
                            "finish_reason": None}])
                else:
                    event([{"index": i, "text": piece, "finish_reason": None,
                            "logprobs": _completion_logprobs([entry]) if entry else None}])

            _, k, _, reason = app.run_choice(ids, pi, on_text)
            completion += k
            if chat:
                event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}])
            else:
                event([{"index": i, "text": "", "finish_reason": reason, "logprobs": None}])
        if include_usage:
            ev = {"id": rid, "object": chunk_obj, "created": created, "model": app.name, "choices": [],
                  "usage": {"prompt_tokens": len(ids), "completion_tokens": completion,
                            "total_tokens": len(ids) + completion}}
            send(json.dumps(ev))
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _completion_logprobs(entries: list[dict]) -> dict:
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": [e["text_offset"] for e in entries]}


def _chat_logprobs(entries: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "text_offset"} for e in entries]


def make_server(model, tokenizer, host: str = "127.0.0.1", port: int = 8000, model_name: str = "lmforge",
                **engine_kw) -> ThreadingHTTPServer:
    app = Server(model, tokenizer, model_name, **engine_kw)
    handler = type("BoundHandler", (Handler,), {"app": app})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    httpd.app = app
    return httpd
