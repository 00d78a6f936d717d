"""The training harness: typed configs, the loop, AdamW + schedule, checkpoints, distributed, metrics.

>>> from polycom.train import build_config, train
>>> config = build_config("tiny", [("run.max_steps", "50"), ("model.activation", "polyrelu")])
>>> result = train(config)          # -> TrainResult(out_dir, steps, train_loss, val_loss, ...)
"""

from polycom.train.config import (
    DataConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
    build_config,
)
from polycom.train.loop import TrainingStopped, TrainResult, train

__all__ = [
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "TrainingStopped",
    "build_config",
    "train",
]
