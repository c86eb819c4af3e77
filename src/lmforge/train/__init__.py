"""Training: the pre-training loop, optimizers (AdamW, Muon), schedules, checkpoints, recompute."""
from .trainer import TrainConfig, train

__all__ = ["TrainConfig", "train"]
