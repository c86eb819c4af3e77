"""The ``lmforge`` command line: one subcommand group per stage.

Thin by design: each subcommand parses its arguments and calls one library
function (the same one the pipeline and your own code call). A stage's
subcommands, their arguments and handlers are in that stage's package, its
``_cli`` module (``data/_cli.py``, ``infer/_cli.py``, ...; ``_stages`` lists them);
this module knows only what they share: the top-level parser and its hints for a
mistyped option, ``main()``, the exit statuses and how errors map to them, and
logging. A command's results go to stdout (print, in the ``_cli`` modules only);
what the library says along the way is ``logging`` under the ``lmforge`` logger,
which ``main()`` alone configures: one stderr handler at ``--log-level`` /
``$LMFORGE_LOG_LEVEL`` (default info), "lmforge: message", from warning up
"lmforge: warning: message". Library code never configures logging.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys

# the exit statuses (0 done, 1 a runtime error, 2 a usage error, 130 interrupted) and the error line
from ._cli_common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, _die


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

    for add in _stages():
        add(sub)
    return p


def _stages():
    """What adds each stage's subcommands, in the order ``lmforge --help`` lists them. Imported here, when a
    parser is built: ``import lmforge.cli`` stays light, and so does each ``_cli`` module (a handler imports
    its stage's library when it runs)."""
    from .align import _cli as align
    from .data import _cli as data
    from .evaluate import _cli as evaluate
    from .infer import _cli as infer
    from .model import _cli as model
    from .parallel import _cli as parallel
    from .pipeline import _cli as pipeline
    from .quant import _cli as quant
    from .tokenize import _cli as tokenize
    from .train import _cli as train

    return (data.add_parser, tokenize.add_parser, model.add_parser, train.add_parser, align.add_parser,
            align.add_dpo_parser, evaluate.add_parser,
            quant.add_parser, model.add_export_parser, infer.add_parser, parallel.add_parser, pipeline.add_parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits with status 2 here (and --help with 0)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # (--nproc N re-runs this command under torchrun)
    from ._config import UsageError

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


def __getattr__(name):
    if name == "_pretrain_config":  # where it was before the stages' subcommands had modules of their own
        from .train._cli import _pretrain_config

        return _pretrain_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
