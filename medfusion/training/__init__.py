"""The one training loop (on Accelerate) that every model of the toolkit uses, and its checkpoints."""

from medfusion.training.checkpoint import CheckpointManager
from medfusion.training.loop import TrainConfig, TrainingError, TrainingTask, TrainResult, train
from medfusion.training.state_io import CheckpointError

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingTask",
    "train",
]
