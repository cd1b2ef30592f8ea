"""Hydra wiring: the schemas in ConfigStore, composition for tests/tools, typed conversion.

Recipes compose `conf/<recipe>.yaml` (`steerlm/conf/`, package data), whose defaults list starts with the
recipe's schema node (e.g. `train_schema`), so every YAML group option and every command-line override is
type-checked against the dataclasses and unknown keys are rejected by OmegaConf's struct mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar, overload

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from steerlm.config.annotate import AnnotateConfig
from steerlm.config.bootstrap import BootstrapConfig
from steerlm.config.convert import ConvertConfig
from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig
from steerlm.config.inference import ChatConfig, ServeConfig
from steerlm.config.pipeline import PipelineConfig
from steerlm.config.pretrain import PretrainConfig
from steerlm.config.schema import AttributeModelConfig, AttributesConfig, PrepareDataConfig, TrainConfig
from steerlm.config.sft import SFTConfig
from steerlm.config.steering import SteeringEvalConfig
from steerlm.config.steerlm2 import PrepareSteerLM2Config
from steerlm.errors import ConfigError
from steerlm.files import atomic_write_text

PACKAGE_DIR = Path(__file__).resolve().parents[1]
CONF_DIR = PACKAGE_DIR / "conf"  # package data; `conf/` at the repository root links here
RECIPES_DIR = PACKAGE_DIR / "recipes"  # the recipe modules; `recipes/` at the repository root links here

SCHEMAS = {
    "train_schema": TrainConfig,
    "pretrain_schema": PretrainConfig,
    "bootstrap_schema": BootstrapConfig,
    "pipeline_schema": PipelineConfig,
    "prepare_data_schema": PrepareDataConfig,
    "attribute_model_schema": AttributeModelConfig,
    "annotate_schema": AnnotateConfig,
    "sft_schema": SFTConfig,
    "chat_schema": ChatConfig,
    "serve_schema": ServeConfig,
    "evaluate_attribute_model_schema": EvaluateAttributeModelConfig,
    "steering_eval_schema": SteeringEvalConfig,
    "prepare_steerlm2_schema": PrepareSteerLM2Config,
    "convert_schema": ConvertConfig,
}

T = TypeVar("T")


def register_schemas() -> None:
    """Put every root schema into Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)


def compose(config_name: str, overrides: Sequence[str] = (), config_dir: Path = CONF_DIR) -> DictConfig:
    """Compose a primary config the way a recipe does: outside a Hydra app (tests, tools), or inside a recipe's
    (the pipeline composes the annotate recipe's config to label the held-out ratings in its own process), where
    Hydra is already initialised with the recipes' `conf/` and cannot be initialised again."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        if config_dir.resolve() != CONF_DIR:
            raise RuntimeError(f"inside a Hydra app only its own conf/ ({CONF_DIR}) can be composed, not {config_dir}")
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _unknown_key(node: DictConfig, schema: type, prefix: str = "") -> str | None:
    """The first key of `node` that `schema` (a dataclass) does not define, searched recursively.

    Hydra's `+key=value` appends keys even to structured configs; the dataclass conversion would then
    drop them silently.
    """
    defaults, names = schema(), {field.name for field in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in names:
            return f"{prefix}{key!s}"
        child, value = node._get_node(key), getattr(defaults, key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(value):
            found = _unknown_key(child, type(value), f"{prefix}{key}.")
            if found:
                return found
    return None


@overload
def to_typed(cfg: DictConfig) -> TrainConfig: ...


@overload
def to_typed(cfg: DictConfig, schema: type[T]) -> T: ...


def to_typed(cfg: DictConfig, schema: type[Any] = TrainConfig) -> Any:
    """Turn a composed config into its dataclass, reporting type errors and unknown keys as ConfigError."""
    unknown = _unknown_key(cfg, schema)
    if unknown is not None:
        raise ConfigError(
            unknown,
            OmegaConf.select(cfg, unknown),
            f"is not a key of {schema.__name__}",
            "remove it or check its spelling against steerlm/config/ (a leading + cannot add keys)",
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        typed = OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or "<config>"
        raise ConfigError(key, None, "is required and has no default", f"pass {key}=<value>") from error
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "<config>"
        raise ConfigError(
            key,
            getattr(error, "value", None),
            str(error).splitlines()[0],
            "check the key's spelling and type against steerlm/config/schema.py",
        ) from error
    assert isinstance(typed, schema)
    return typed


def shipped_attributes(name: str) -> AttributesConfig:
    """A schema shipped as `conf/attributes/<name>.yaml` (helpsteer2, steerlm_oasst, steerlm_paper)."""
    node = OmegaConf.load(CONF_DIR / "attributes" / f"{name}.yaml")
    assert isinstance(node, DictConfig)  # a shipped file: a mapping
    return to_typed(node, AttributesConfig)


def save_resolved(cfg: DictConfig | object, path: Path) -> None:
    """Write the resolved config (a DictConfig or a schema dataclass) next to an output, atomically."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    atomic_write_text(path, OmegaConf.to_yaml(node, resolve=True))
