"""Training: the pre-training loop, optimizers (AdamW, Muon), schedules, checkpoints, recompute.

``TrainConfig`` and ``train`` (``trainer``) are imported on first use, so importing the package (as
the command line does for its ``_cli`` module) loads nothing heavy.
"""

__all__ = ["TrainConfig", "train"]


def __getattr__(name):
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
