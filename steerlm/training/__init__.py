"""Training: DDP/optimizer setup, the per-step schedule, losses, batch splitting."""

from steerlm.training.batching import microbatches_for_rank
from steerlm.training.losses import masked_token_loss
from steerlm.training.setup import TrainingSetup, build_optimizer, build_training, wrap_for_training
from steerlm.training.step import StepResult, forward_backward, train_step

__all__ = ["StepResult", "TrainingSetup", "build_optimizer", "build_training", "forward_backward", "masked_token_loss", "microbatches_for_rank",
           "train_step", "wrap_for_training"]
