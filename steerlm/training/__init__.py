"""Training: DDP/optimizer setup, the per-step schedule, losses, batch splitting."""

from steerlm.training.batching import microbatches_for_rank
from steerlm.training.losses import (
    ATTRIBUTE_REGRESSION,
    LANGUAGE_MODEL,
    SEQUENCE_LOG_PROB,
    STEERLM2,
    Task,
    masked_token_loss,
)
from steerlm.training.setup import TrainingSetup, build_optimizer, build_training, wrap_for_training
from steerlm.training.step import StepResult, forward_backward, predict, train_step

__all__ = [
    "ATTRIBUTE_REGRESSION",
    "LANGUAGE_MODEL",
    "SEQUENCE_LOG_PROB",
    "STEERLM2",
    "StepResult",
    "Task",
    "predict",
    "TrainingSetup",
    "build_optimizer",
    "build_training",
    "forward_backward",
    "masked_token_loss",
    "microbatches_for_rank",
    "train_step",
    "wrap_for_training",
]
