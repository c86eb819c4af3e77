"""The ``lmforge generate``, ``serve`` and ``chat`` subcommands.

Knows their arguments (the sampling flags they share), help texts and how each
drives the engine, the server or the Python API from a model directory, the
terminal chat loop included; knows nothing of how the engine, the server or the
sampler work, nor of the other stages' subcommands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .._cli_common import _checkpoint


def _sampling(a):
    from .sampling import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          seed=a.seed)


def cmd_generate(a) -> int:
    from .engine import Engine
    from .llm import load_with_tokenizer

    _checkpoint(a.checkpoint)
    model, tok, spec = load_with_tokenizer(a.checkpoint)  # spec: BOS and the stop ids the model was saved with
    prompts = a.prompt or [sys.stdin.read()]
    p = _sampling(a)
    p.stop_token_ids = list(spec.stop)
    eng = Engine(model, eos_token_id=None)
    outs = eng.generate([spec.encode_prompt(tok, x) for x in prompts], p)
    for x, o in zip(prompts, outs):
        o = [t for t in o if t not in p.stop_token_ids]
        if a.json:
            print(json.dumps({"prompt": x, "completion": tok.decode(o), "tokens": len(o)}))
        else:
            print(x + tok.decode(o))
    return 0


def cmd_serve(a) -> int:
    import logging
    import os

    from .llm import load_with_tokenizer
    from .server import build_app, serve

    _checkpoint(a.checkpoint)
    model, tok, spec = load_with_tokenizer(a.checkpoint)
    name = a.name or Path(a.checkpoint).resolve().name
    key = a.api_key or os.environ.get("LMFORGE_API_KEY") or None
    # uvicorn's loggers go to the root logger; lmforge's own (the access log) keep to the CLI's handler,
    # which the server has write the time and the logger's name
    logging.basicConfig(level=logging.getLogger("lmforge").getEffectiveLevel(),
                        format="%(asctime)s %(name)s %(message)s")
    lf = logging.getLogger("lmforge")
    lf.propagate = False
    for h in lf.handlers:
        if getattr(h, "_lmforge_cli", False):
            h.formatter.timestamps = True  # the CLI's _LogFormatter
    app = build_app(model, tok, spec, name, api_key=key, cors_origins=a.cors_origin or (),
                    allowed_hosts=a.allowed_host or None, max_body_bytes=a.max_body, max_queued=a.max_queue,
                    request_timeout_s=a.timeout, num_blocks=a.num_blocks, block_size=a.block_size,
                    max_batch_tokens=a.max_batch_tokens)

    def bound(port):
        print(f"serving {name} on http://{a.host}:{port}  (OpenAI API at /v1, chat page at /"
              f"{', API key required' if key else ''})", file=sys.stderr, flush=True)
        if a.host not in ("127.0.0.1", "localhost", "::1") and not a.allowed_host:
            print("note: clients must use an IP address or localhost in the URL; add --allowed-host NAME for a "
                  "host name", file=sys.stderr, flush=True)
    try:
        serve(app, a.host, a.port, on_bound=bound)
    except OSError as e:
        print(f"lmforge serve: cannot listen on {a.host}:{a.port}: {e.strerror or e}", file=sys.stderr)
        app.state.service.loop.close()
        return 1
    return 0


def cmd_chat(a) -> int:
    """A terminal chat on the Python API. The conversation is kept within the model's context by dropping
    the oldest turns (a system message stays), said on stderr; each reply may use what the context leaves,
    up to --max-tokens. An error in one turn is printed and the chat goes on."""
    from .llm import LM

    _checkpoint(a.checkpoint)
    lm = LM.load(a.checkpoint)
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be at least 1, got {a.max_tokens}")
    sampling = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    reserve = max(1, min(a.max_tokens, lm.max_context // 2))  # room kept for a reply when trimming
    messages = [{"role": "system", "content": a.system}] if a.system else []
    print(f"lmforge chat: {lm}; empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        except KeyboardInterrupt:
            print(file=sys.stderr)
            break
        if not line.strip():
            break
        try:
            fitted, dropped = lm.fit_messages(messages + [{"role": "user", "content": line}], reserve)
        except ValueError as e:
            print(f"error: {e}; say something shorter", file=sys.stderr)
            continue
        except Exception as e:  # noqa: BLE001 - e.g. a chat template that refuses the conversation
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped {dropped} earlier turn{'s' if dropped != 1 else ''} to fit the "
                  f"{lm.max_context}-token context)", file=sys.stderr)
        messages = fitted
        max_tokens = min(a.max_tokens, lm.max_context - len(lm.encode_chat(messages)))
        print("model> ", end="", flush=True)
        pieces = []
        try:
            for piece in lm.chat_stream(messages, max_tokens=max_tokens, **sampling):
                pieces.append(piece)
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # Ctrl-C ends the reply, not the chat
            print(" [interrupted]", end="")
        except Exception as e:  # noqa: BLE001 - the chat goes on; the turn is forgotten
            print()
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            messages.pop()
            continue
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


def add_parser(sub) -> None:
    def sampling_args(sp, max_tokens):
        sp.add_argument("--max-tokens", type=int, default=max_tokens)
        sp.add_argument("--temperature", type=float, default=0.8)
        sp.add_argument("--top-k", type=int, default=0)
        sp.add_argument("--top-p", type=float, default=0.95)
        sp.add_argument("--seed", type=int, default=None)

    ge = sub.add_parser("generate", help="one-shot generation from a model directory",
                        description="Continue each prompt (arguments, or stdin) with the inference engine.")
    ge.add_argument("--checkpoint", required=True)
    ge.add_argument("prompt", nargs="*", help="prompts (default: stdin as one prompt)")
    sampling_args(ge, 100)
    ge.add_argument("--json", action="store_true", help="one JSON object per prompt")
    ge.set_defaults(fn=cmd_generate)

    se = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (and a chat page at /)",
                        description="Serve a model over /v1/models, /v1/completions, /v1/chat/completions, /tokenize, "
                        "/detokenize, /health, /metrics and /version (OpenAI wire format, streaming by server-sent "
                        "events; uvicorn + Starlette), with continuous batching.")
    se.add_argument("--checkpoint", required=True)
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--name", default=None, help="model id clients ask for (default: the directory name)")
    se.add_argument("--num-blocks", type=int, default=1024, help="KV cache blocks")
    se.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    se.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per engine step (prefill budget)")
    se.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' (default: $LMFORGE_API_KEY; / and /health stay open)")
    se.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                    help="allow cross-origin requests from ORIGIN (repeatable; '*' for any; default: none)")
    se.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                    help="accept this Host header name besides IP addresses and localhost (repeatable; '*': any)")
    se.add_argument("--max-queue", type=int, default=1024,
                    help="most sequences in flight (running or waiting) before requests get 429")
    se.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (413 beyond)")
    se.add_argument("--timeout", type=float, default=600.0, help="seconds a generation request may take")
    se.set_defaults(fn=cmd_serve)

    ch = sub.add_parser("chat", help="chat with a model in the terminal (streaming)",
                        description="An interactive chat in the model's chat template; replies stream as they are "
                        "made and stop at the model's stop tokens (and, with the plain template, at the next "
                        "turn). When the conversation outgrows the model's context the oldest turns are dropped "
                        "(a system message is kept), and stderr says so; a reply may use what the context "
                        "leaves, up to --max-tokens. An empty line or Ctrl-D quits; Ctrl-C ends a reply.")
    ch.add_argument("--checkpoint", required=True)
    ch.add_argument("--system", default=None, help="a system message")
    sampling_args(ch, 200)
    ch.set_defaults(fn=cmd_chat)
