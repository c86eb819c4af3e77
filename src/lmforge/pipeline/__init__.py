"""The end-to-end pipeline: recipes (``recipe``), the runner (``runner``), the report (``report``).

The names below are imported on first use, so importing the package (as the command line does for
its ``_cli`` module) loads nothing heavy.
"""

__all__ = ["Recipe", "load_recipe", "Runner", "StageError", "run_recipe"]

_LAZY = {"Recipe": "recipe", "load_recipe": "recipe", "Runner": "runner", "StageError": "runner",
         "run_recipe": "runner"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
