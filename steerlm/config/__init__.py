"""Typed configuration: schemas, validation, Hydra composition."""

from steerlm.errors import ConfigError
from steerlm.config.schema import (
    Activation,
    AttributeModelConfig,
    AttributesConfig,
    Backend,
    CheckpointConfig,
    DType,
    LRDecayStyle,
    ModelConfig,
    Normalization,
    OptimizerConfig,
    OptimizerName,
    ParallelConfig,
    PositionEmbedding,
    PrepareDataConfig,
    SyntheticConfig,
    PrecisionConfig,
    TrainConfig,
    TrainerConfig,
    TransformerImpl,
)
from steerlm.config.store import compose, register_schemas, save_resolved, to_typed
from steerlm.config.validation import Accelerator, resolve_transformer_impl, validate_train_config, validate_vocab

__all__ = [
    "Accelerator", "Activation", "AttributeModelConfig", "AttributesConfig", "Backend", "CheckpointConfig", "ConfigError", "DType", "LRDecayStyle", "ModelConfig",
    "Normalization", "OptimizerConfig", "OptimizerName", "ParallelConfig", "PositionEmbedding", "PrepareDataConfig", "SyntheticConfig",
    "PrecisionConfig", "TrainConfig", "TrainerConfig", "TransformerImpl", "compose", "register_schemas",
    "resolve_transformer_impl", "save_resolved", "to_typed", "validate_train_config", "validate_vocab",
]
