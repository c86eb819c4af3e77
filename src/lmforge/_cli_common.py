"""What the stages' subcommands share: exit statuses, error lines, settings errors, ``--checkpoint``.

Knows the ``lmforge`` command line's exit statuses and how it words an error
(``lmforge: error: message`` on stderr), turns a bad setting into a usage error and
checks that ``--checkpoint`` names a model directory; makes a stage's group of
subcommands (``lmforge data ...``). Knows no subcommand and no
stage: the stages' ``_cli`` modules and ``lmforge.cli`` import it, it imports none of them.
"""
from __future__ import annotations

import sys
from pathlib import Path

# exit statuses: 0 done, 1 a runtime error (bad file, bad data, a failed stage), 2 a usage error (bad
# arguments or settings), 130 interrupted (Ctrl-C). A bug (TypeError, ...) shows its traceback;
# LMFORGE_DEBUG=1 shows one for every error.
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def _die(msg: str, code: int = EXIT_ERROR) -> int:
    print(f"lmforge: error: {msg}", file=sys.stderr)
    return code


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


def _checkpoint(path) -> str:
    """--checkpoint names a model directory; a file in one (model.safetensors, config.json) is a usage error
    that names the directory to give instead."""
    from ._config import UsageError

    p = Path(path)
    if p.is_file():
        raise UsageError(f"{path} is a file; --checkpoint takes the model directory that holds it ({p.parent})")
    return path


def _group(sub, name: str, **kw):
    """A stage's group of subcommands (``lmforge data CMD``): the subparsers of its parser, one of them required.
    ``kw``: the group's ``help`` and ``description``."""
    cmds = sub.add_parser(name, **kw).add_subparsers(dest="cmd", metavar="CMD")
    cmds.required = True
    return cmds
