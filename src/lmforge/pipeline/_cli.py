"""The ``lmforge run`` subcommand: a recipe, start to end.

Knows its arguments, help text and how it loads the recipe, prints it resolved
(--print-config) or runs it and says where the report is; knows nothing of the
stages it runs (``runner``), nor of the other subcommands.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .._cli_common import _settings


def cmd_run(a) -> int:
    from . import load_recipe, run_recipe

    with _settings():
        recipe, path = load_recipe(a.recipe, a.set)
    if a.print_config:
        from .runner import resolved_recipe

        print(json.dumps({"recipe": str(path), **resolved_recipe(recipe)}, indent=1))
        return 0
    run_dir = Path(a.runs) / (a.name or recipe.name)
    summary = run_recipe(recipe, run_dir, a.from_stage, quiet=a.quiet)
    print(f"report: {run_dir / 'report.md'}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def add_parser(sub) -> None:
    ru = sub.add_parser("run", help="the whole chain from a recipe: data, tokenizer, training, eval, export, demo",
                        description="Run a recipe (a path, or a name: ./recipes/NAME.toml, else the recipes shipped with "
                        "lmforge: default, gpt2-124m; default: default) into "
                        "runs/NAME: fetch -> clean/filter/dedup -> tokenizer -> shards -> pretrain -> sft -> eval -> export "
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
