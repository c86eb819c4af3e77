"""The end-to-end pipeline: recipes (``recipe``), the runner (``runner``), the report (``report``)."""
from .recipe import Recipe, load_recipe
from .runner import Runner, StageError, run_recipe

__all__ = ["Recipe", "load_recipe", "Runner", "StageError", "run_recipe"]
