"""Training: the shared loop (``loop``: ``LoopConfig``, ``Batch``, ``Stage``, ``run``), pre-training as
its first stage (``trainer``), optimizers (AdamW, Muon), schedules, checkpoints, recompute.

The names below are imported on first use, so importing the package (as the command line does for
its ``_cli`` module) loads nothing heavy.
"""

__all__ = ["TrainConfig", "train", "PretrainStage", "LoopConfig", "Batch", "Stage", "BaseStage", "run",
           "check_loop_config"]

_FROM = {"TrainConfig": "trainer", "train": "trainer", "PretrainStage": "trainer"}


def __getattr__(name):
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_FROM.get(name, 'loop')}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
