"""Config schemas: every shipped YAML composes and validates; every bad value names its key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from steerlm.config import (
    Accelerator,
    ConfigError,
    DType,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    OptimizerName,
    ParallelConfig,
    PrecisionConfig,
    PrepareDataConfig,
    TrainConfig,
    TrainerConfig,
    TransformerImpl,
    compose,
    to_typed,
)
from steerlm.config.schema import TokenizerType
from steerlm.config.store import CONF_DIR
from steerlm.config.validation import resolve_torch_compile, transformer_engine_available
from steerlm.data.attributes import KNOWN_SCHEMAS

GROUPS = ("model", "parallel", "precision", "trainer", "optim")
PRIMARY = (
    "demo",
    "pretrain",
    "bootstrap",
    "pipeline",
    "prepare_data",
    "train_attribute_model",
    "annotate",
    "train_sft",
    "evaluate_attribute_model",
    "chat",
    "serve",
    "evaluate_steering",
    "prepare_steerlm2",
    "convert",
)
PREPARE_GROUPS = ("attributes", "data")


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def _world_for(cfg: TrainConfig) -> int:
    return cfg.parallel.model_parallel_size * (cfg.parallel.data_parallel_size or 1)


def test_every_yaml_under_conf_is_covered() -> None:
    """A YAML added anywhere under conf/ must be reachable by the tests below."""
    covered = {CONF_DIR / f"{name}.yaml" for name in PRIMARY}
    covered |= {CONF_DIR / group / f"{option}.yaml" for group in GROUPS + PREPARE_GROUPS for option in _options(group)}
    covered |= set((CONF_DIR / "cluster").glob("*.yaml"))  # composed and validated in tests/test_launchers.py
    covered |= set((CONF_DIR / "route").glob("*.yaml"))  # composed and validated in tests/test_pipeline.py
    assert set(CONF_DIR.rglob("*.yaml")) == covered


@pytest.mark.parametrize("option", _options("attributes"))
def test_prepare_data_config_composes_and_validates(option: str, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("")
    cfg = to_typed(
        compose("prepare_data", [f"attributes={option}", f"input={source}", f"output={tmp_path / 'o'}"]),
        PrepareDataConfig,
    )
    cfg.validate()
    schema = cfg.attributes.schema()
    assert schema.name == option and len(schema.attributes) in (5, 7, 9)
    assert KNOWN_SCHEMAS[option] == schema.attributes and schema.left_out == ()  # the code's copy of the YAML
    assert tuple(dict(schema.defaults)) == schema.attributes  # a best response for every attribute


def test_synthetic_data_option_composes_and_validates(tmp_path: Path) -> None:
    cfg = to_typed(compose("prepare_data", ["data=synthetic", f"output={tmp_path / 'syn'}"]), PrepareDataConfig)
    cfg.validate()
    assert cfg.synthetic is not None and cfg.synthetic.unlabelled_rows == 20000 and cfg.input is None
    with pytest.raises(ConfigError) as error:
        replace(cfg, synthetic=replace(cfg.synthetic, missing_label_rate=2.0)).validate()
    assert error.value.key == "synthetic.missing_label_rate"


def test_attribute_model_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config import AttributeModelConfig

    (tmp_path / "tok").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    overrides = [f"data.train_file={tmp_path / 'train.jsonl'}", f"tokenizer.path={tmp_path / 'tok'}"]
    cfg = to_typed(compose("train_attribute_model", overrides), AttributeModelConfig)
    assert cfg.validate(1, Accelerator.cpu) == 1
    assert cfg.attributes.name == "steerlm_oasst" and cfg.model.vocab_size == 768
    with pytest.raises(ConfigError) as error:
        replace(cfg.apm, attribute_weights=[1.0, 2.0]).validate(cfg.attributes.schema())
    assert error.value.key == "apm.attribute_weights"
    with pytest.raises(ConfigError) as error:
        replace(cfg.data, train_file=str(tmp_path / "missing.jsonl")).validate()
    assert error.value.key == "data.train_file" and "prepare_data.py data=synthetic" in str(error.value)
    nemo = to_typed(compose("train_attribute_model", [*overrides, "template.tokenization=nemo"]), AttributeModelConfig)
    with pytest.raises(ConfigError) as error:  # the word tokenizer holds the markers only as single ids
        nemo.validate(1, Accelerator.cpu)
    assert error.value.key == "template.tokenization" and "tokenizer.type=hf" in str(error.value)
    assert replace(nemo, tokenizer=replace(nemo.tokenizer, type=TokenizerType.hf)).validate(1, Accelerator.cpu) == 1


def test_pretrain_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config.pretrain import PretrainConfig

    (tmp_path / "tok").mkdir()
    (tmp_path / "corpus.jsonl").write_text("")
    overrides = [f"data.train_file={tmp_path / 'corpus.jsonl'}", f"tokenizer.path={tmp_path / 'tok'}"]
    cfg = to_typed(compose("pretrain", overrides), PretrainConfig)
    assert cfg.validate(1, Accelerator.cpu) == 1
    assert cfg.model.vocab_size == 768 and cfg.data.key == "text"
    planned = to_typed(
        compose("pretrain", ["data.train_file=later/corpus.jsonl", "tokenizer.path=later"]), PretrainConfig
    )
    assert planned.validate(1, Accelerator.cpu, this_machine=False) == 1  # a pipeline plans it before it exists
    with pytest.raises(ConfigError) as error:
        planned.validate(1, Accelerator.cpu)
    assert error.value.key == "data.train_file" and "corpus.jsonl" in str(error.value)
    with pytest.raises(ConfigError) as error:
        replace(cfg, data=replace(cfg.data, validation_fraction=1.0)).validate(1, Accelerator.cpu)
    assert error.value.key == "data.validation_fraction"


def test_bootstrap_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config.bootstrap import BootstrapConfig

    for name in ("tok", "sft", "apm"):
        (tmp_path / name).mkdir()
    (tmp_path / "labels.jsonl").write_text("")
    overrides = [
        f"data.train_file={tmp_path / 'labels.jsonl'}",
        f"tokenizer.path={tmp_path / 'tok'}",
        f"sft.init_from={tmp_path / 'sft'}",
        f"bootstrap.apm_checkpoint={tmp_path / 'apm'}",
    ]
    cfg = to_typed(compose("bootstrap", overrides), BootstrapConfig)
    assert cfg.validate(1, Accelerator.cpu) == 1
    assert cfg.quality_attribute() == "quality"  # steerlm_oasst has it
    hs2 = to_typed(compose("bootstrap", [*overrides, "attributes=helpsteer2"]), BootstrapConfig)
    assert hs2.quality_attribute() == "helpfulness"
    for change, key in (
        ({"sft": replace(cfg.sft, init_from=None)}, "sft.init_from"),
        ({"sft": replace(cfg.sft, condition_on_attributes=False)}, "sft.condition_on_attributes"),
        ({"bootstrap": replace(cfg.bootstrap, quality_attribute="charm")}, "bootstrap.quality_attribute"),
        ({"bootstrap": replace(cfg.bootstrap, top_p=0.0)}, "bootstrap.top_p"),
        ({"bootstrap": replace(cfg.bootstrap, apm_checkpoint=str(tmp_path / "none"))}, "bootstrap.apm_checkpoint"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(cfg, **change).validate(1, Accelerator.cpu)
        assert error.value.key == key


def test_annotate_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config.annotate import AnnotateConfig, AnnotateMode

    (tmp_path / "apm").mkdir()
    (tmp_path / "in.jsonl").write_text("")
    cfg = to_typed(
        compose(
            "annotate",
            [
                f"apm_checkpoint={tmp_path / 'apm'}",
                f"input={tmp_path / 'in.jsonl'}",
                f"output={tmp_path / 'out.jsonl'}",
                "parallel=tp2",
            ],
        ),
        AnnotateConfig,
    )
    cfg.validate()
    assert cfg.mode == AnnotateMode.fill_missing and cfg.parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError) as error:
        replace(cfg, output=cfg.input).validate()
    assert error.value.key == "output"


def test_convert_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config.convert import ConvertConfig, ModelFormat

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    overrides = [f"input={tmp_path / 'run'}", f"output={tmp_path / 'out'}", "parallel=tp2", "attributes.humor=3"]
    cfg = to_typed(compose("convert", overrides), ConvertConfig)
    cfg.validate()
    assert cfg.target == ModelFormat.hf and cfg.max_shard_bytes == 5 * 10**9 and cfg.attributes["humor"] == 3
    assert replace(cfg, input=str(tmp_path / "hf")).target == ModelFormat.steerlm
    for change, key in (
        ({"input": str(tmp_path / "hf"), "to": ModelFormat.hf}, "to"),
        ({"max_shard_size": "5 parsecs"}, "max_shard_size"),
        ({"output": str(tmp_path)}, "output"),
        ({"input": str(tmp_path / "missing")}, "input"),
        ({"apm_range": [4.0, 0.0]}, "apm_range"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(cfg, **change).validate()
        assert error.value.key == key


def test_prepare_steerlm2_config_composes_and_validates(tmp_path: Path) -> None:
    from steerlm.config.steerlm2 import PrepareSteerLM2Config

    for name in ("sft", "plain", "apm"):
        (tmp_path / name).mkdir()
    (tmp_path / "in.jsonl").write_text("")
    overrides = [
        f"steerlm_checkpoint={tmp_path / 'sft'}",
        f"plain_sft_checkpoint={tmp_path / 'plain'}",
        f"apm_checkpoint={tmp_path / 'apm'}",
        f"input={tmp_path / 'in.jsonl'}",
        f"output={tmp_path / 'rows.jsonl'}",
        "parallel=tp2",
    ]
    cfg = to_typed(compose("prepare_steerlm2", overrides), PrepareSteerLM2Config)
    cfg.validate()
    assert cfg.num_responses == 4 and cfg.parallel.tensor_model_parallel_size == 2
    replace(cfg, parallel=replace(cfg.parallel, pipeline_model_parallel_size=2)).validate()  # sampled in two stages
    for bad, key in (
        ({"num_responses": 1}, "num_responses"),
        ({"temperature": 0.0}, "temperature"),
        ({"output": cfg.input}, "output"),
        ({"parallel": replace(cfg.parallel, context_parallel_size=2)}, "parallel.context_parallel_size"),
        ({"parallel": replace(cfg.parallel, sequence_parallel=True)}, "parallel.sequence_parallel"),
    ):
        with pytest.raises(ConfigError) as error:
            replace(cfg, **bad).validate()
        assert error.value.key == key


def test_prepare_data_requires_input_and_output() -> None:
    with pytest.raises(ConfigError) as error:
        to_typed(compose("prepare_data", ["input=x.jsonl"]), PrepareDataConfig)
    assert error.value.key == "output" and "pass output=<value>" in str(error.value)
    with pytest.raises(ConfigError) as error:
        to_typed(compose("prepare_data", ["output=x.jsonl"]), PrepareDataConfig).validate()
    assert error.value.key == "input" and "data=synthetic" in str(error.value)


def test_custom_attribute_schema_from_overrides(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("")
    cfg = to_typed(
        compose(
            "prepare_data",
            [
                "attributes.name=mine",
                "attributes.attributes=[wit,brevity]",
                "attributes.max_value=9",
                f"input={source}",
                "output=o.jsonl",
            ],
        ),
        PrepareDataConfig,
    )
    assert cfg.attributes.schema().format(cfg.attributes.schema().check({"brevity": 9, "wit": 1})) == "wit:1,brevity:9"
    with pytest.raises(ConfigError) as error:
        replace(cfg.attributes, attributes=["a", "a"]).validate()
    assert error.value.key == "attributes"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_shipped_config_composes_and_validates(group: str, option: str) -> None:
    cfg = to_typed(compose("demo", [f"{group}={option}"]))
    accelerator = Accelerator.cuda if cfg.precision.dtype == DType.fp16 else Accelerator.cpu
    if group == "parallel":
        cfg = replace(cfg, model=_model_fitting(cfg.parallel))
        cfg = replace(cfg, trainer=replace(cfg.trainer, global_batch_size=cfg.trainer.micro_batch_size))
    dp = cfg.validate(_world_for(cfg), accelerator)
    assert dp == 1


def _model_fitting(parallel: ParallelConfig) -> ModelConfig:
    """Parallel presets target real shapes (tp8 for 7B-70B): validate them against llama2_70b."""
    if parallel.tensor_model_parallel_size <= 2:
        return to_typed(compose("demo", ["model=tiny", "model.num_layers=4"])).model
    return to_typed(compose("demo", ["model=llama2_70b"])).model


@pytest.mark.parametrize(
    "preset,parameters",
    [  # Hugging Face's parameter counts of the same architectures
        ("llama2_7b", 6_738_415_616),
        ("llama2_13b", 13_015_864_320),
        ("llama2_70b", 68_976_648_192),
        ("llama3_8b", 8_030_261_248),
        ("llama3_1_8b", 8_030_261_248),
        ("llama3_70b", 70_553_706_496),
        ("llama3_2_1b", 1_235_814_400),
        ("nemotron3_8b", 8_540_135_424),  # NemotronForCausalLM's
        ("nemotron4_340b", 341_029_195_776),
        ("qwen2_5_7b", 7_615_616_512),  # Qwen2ForCausalLM's
        ("mistral_7b", 7_248_023_552),  # MistralForCausalLM's
        ("qwen3_8b", 8_190_735_360),  # Qwen3ForCausalLM's
        ("phi4", 14_659_507_200),  # Phi3ForCausalLM's
        ("gemma_7b", 8_537_680_896),  # GemmaForCausalLM's
        ("gemma2_9b", 9_241_705_984),  # Gemma2ForCausalLM's
        ("gemma2_27b", 27_227_128_320),
        ("gemma3_1b", 999_885_952),  # Gemma3ForCausalLM's
        ("gemma3_27b", 27_009_346_304),  # Gemma3ForCausalLM's of its text_config
    ],
)
def test_real_presets_have_the_published_parameter_count(preset: str, parameters: int) -> None:
    model = to_typed(compose("demo", [f"model={preset}"])).model
    assert model.num_parameters() == parameters


def test_small_preset_is_about_fifty_million_parameters() -> None:
    model = to_typed(compose("demo", ["model=small"])).model
    assert 45e6 < model.num_parameters() < 60e6


def test_overrides_reach_the_typed_config() -> None:
    cfg = to_typed(compose("demo", ["parallel=tp2", "trainer.max_steps=7", "model.rotary_base=500000"]))
    assert cfg.parallel.tensor_model_parallel_size == 2
    assert cfg.trainer.max_steps == 7
    assert cfg.model.rotary_base == 500000


def test_unknown_key_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose("demo", ["model.num_layer=3"])
    assert "model.num_layer" in str(error.value) + str(error.value.__cause__)


def test_appended_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        to_typed(compose("demo", ["+trainer.foo=1"]))
    assert error.value.key == "trainer.foo"
    with pytest.raises(ConfigError) as error:
        to_typed(compose("demo", ["+bar=2"]))
    assert error.value.key == "bar"
    with pytest.raises(ConfigError) as error:  # a property is not a key
        to_typed(compose("demo", ["+parallel.model_parallel_size=2"]))
    assert error.value.key == "parallel.model_parallel_size"


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose("demo", ["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(error.value) + str(error.value.__cause__)


def test_unknown_enum_value_names_the_key() -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose("demo", ["precision.dtype=fp8"])
    assert "precision.dtype" in str(error.value) + str(error.value.__cause__)


def _tiny(**model) -> TrainConfig:
    return TrainConfig(model=replace(ModelConfig(), **model))


@pytest.mark.parametrize(
    "cfg,world,accelerator,key,phrase",
    [
        (
            TrainConfig(parallel=ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
            6,
            Accelerator.cpu,
            "parallel.tensor_model_parallel_size",
            "not divisible",
        ),
        (
            TrainConfig(parallel=ParallelConfig(data_parallel_size=4)),
            2,
            Accelerator.cpu,
            "parallel.data_parallel_size",
            "gives 2",
        ),
        (
            replace(
                _tiny(num_attention_heads=6, num_query_groups=None, hidden_size=120),
                parallel=ParallelConfig(tensor_model_parallel_size=4),
            ),
            4,
            Accelerator.cpu,
            "parallel.tensor_model_parallel_size",
            "num_attention_heads",
        ),
        (
            replace(_tiny(num_query_groups=2), parallel=ParallelConfig(tensor_model_parallel_size=4)),
            4,
            Accelerator.cpu,
            "parallel.tensor_model_parallel_size",
            "query groups",
        ),
        (
            TrainConfig(parallel=ParallelConfig(pipeline_model_parallel_size=4)),
            4,
            Accelerator.cpu,
            "model.num_layers",
            "pipeline stages",
        ),
        (
            replace(
                _tiny(num_layers=4),
                parallel=ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4),
            ),
            2,
            Accelerator.cpu,
            "model.num_layers",
            "virtual",
        ),
        (
            replace(
                _tiny(vocab_size=301, make_vocab_size_divisible_by=7),
                parallel=ParallelConfig(tensor_model_parallel_size=2),
            ),
            2,
            Accelerator.cpu,
            "model.make_vocab_size_divisible_by",
            "padded",
        ),
        (TrainConfig(precision=PrecisionConfig(dtype=DType.fp16)), 1, Accelerator.cpu, "precision.dtype", "fp16"),
        (
            TrainConfig(trainer=TrainerConfig(micro_batch_size=4, global_batch_size=12)),
            2,
            Accelerator.cpu,
            "trainer.global_batch_size",
            "data_parallel_size",
        ),
        (
            TrainConfig(trainer=TrainerConfig(micro_batch_size=4, global_batch_size=10)),
            1,
            Accelerator.cpu,
            "trainer.global_batch_size",
            "micro_batch_size",
        ),
        (
            TrainConfig(trainer=TrainerConfig(seq_length=1024)),
            1,
            Accelerator.cpu,
            "trainer.seq_length",
            "max_position_embeddings",
        ),
        (
            TrainConfig(parallel=ParallelConfig(sequence_parallel=True)),
            1,
            Accelerator.cpu,
            "parallel.sequence_parallel",
            "tensor_model_parallel_size > 1",
        ),
        (
            TrainConfig(parallel=ParallelConfig(context_parallel_size=2)),
            2,
            Accelerator.cpu,
            "parallel.context_parallel_size",
            "Transformer Engine",
        ),
        (
            TrainConfig(
                parallel=ParallelConfig(use_distributed_optimizer=True), optim=OptimizerConfig(name=OptimizerName.sgd)
            ),
            1,
            Accelerator.cpu,
            "optim.name",
            "Adam",
        ),
        (_tiny(hidden_size=130), 1, Accelerator.cpu, "model.hidden_size", "not divisible"),
        (_tiny(num_query_groups=3), 1, Accelerator.cpu, "model.num_query_groups", "must divide"),
        (_tiny(num_layers=0), 1, Accelerator.cpu, "model.num_layers", "positive"),
        (TrainConfig(lora=LoraConfig(rank=-1)), 1, Accelerator.cpu, "lora.rank", ">= 0"),
        (TrainConfig(lora=LoraConfig(rank=4, alpha=0)), 1, Accelerator.cpu, "lora.alpha", "positive"),
        (TrainConfig(lora=LoraConfig(rank=4, dropout=1.0)), 1, Accelerator.cpu, "lora.dropout", "[0, 1)"),
        (TrainConfig(lora=LoraConfig(rank=4, targets=[])), 1, Accelerator.cpu, "lora.targets", "names no layer"),
        (
            TrainConfig(lora=LoraConfig(rank=4, targets=["attention_qkv", "mlp_fc2"])),
            1,
            Accelerator.cpu,
            "lora.targets",
            "use ['linear_qkv'] for NeMo's 'attention_qkv'",
        ),
        (
            TrainConfig(lora=LoraConfig(rank=4, targets=["linear_qkv", "linear_qkv"])),
            1,
            Accelerator.cpu,
            "lora.targets",
            "twice",
        ),
    ],
    ids=lambda value: None if not isinstance(value, str) or "." not in value else value,
)
def test_invalid_config_names_key_and_fix(
    cfg: TrainConfig, world: int, accelerator: Accelerator, key: str, phrase: str
) -> None:
    with pytest.raises(ConfigError) as error:
        cfg.validate(world, accelerator)
    assert error.value.key == key
    assert phrase in str(error.value)
    assert "Fix:" in str(error.value)


def test_job_planned_elsewhere_skips_checks_of_this_machine() -> None:
    cfg = TrainConfig(
        parallel=ParallelConfig(use_distributed_optimizer=True), precision=PrecisionConfig(dtype=DType.bf16)
    )
    assert cfg.validate(1, Accelerator.cuda, this_machine=False) == 1
    with pytest.raises(ConfigError):  # a layout error is still caught while planning
        replace(cfg, parallel=ParallelConfig(tensor_model_parallel_size=3)).validate(
            3, Accelerator.cuda, this_machine=False
        )


def test_bf16_is_allowed_on_cpu() -> None:
    cfg = TrainConfig(precision=PrecisionConfig(dtype=DType.bf16))
    assert cfg.validate(2, Accelerator.cpu) == 2


@pytest.mark.parametrize("accelerator", [Accelerator.cpu, Accelerator.cuda])
def test_distributed_optimizer_is_accepted_with_torch_adam(accelerator: Accelerator) -> None:
    """No fused Adam needed: steerlm.megatron_compat makes megatron's distributed optimizer over torch's Adam
    save and resume (tests/test_checkpoint_resume.py)."""
    cfg = TrainConfig(parallel=ParallelConfig(use_distributed_optimizer=True))
    assert cfg.validate(2, accelerator, this_machine=accelerator == Accelerator.cpu) == 2


@pytest.mark.skipif(transformer_engine_available(), reason="Transformer Engine is installed here")
def test_transformer_engine_requested_without_it_is_refused() -> None:
    cfg = _tiny(transformer_impl=TransformerImpl.transformer_engine)
    with pytest.raises(ConfigError) as error:
        cfg.validate(1, Accelerator.cuda)
    assert error.value.key == "model.transformer_impl"


def test_padded_vocab_does_not_depend_on_tensor_parallel_size() -> None:
    model = ModelConfig(vocab_size=300, make_vocab_size_divisible_by=128)
    assert model.padded_vocab_size == 384
    for tp in (1, 2):
        cfg = replace(TrainConfig(model=model), parallel=ParallelConfig(tensor_model_parallel_size=tp))
        cfg.validate(tp, Accelerator.cpu)


def test_conf_dir_is_the_repository_conf() -> None:
    root = Path(__file__).resolve().parents[1]
    assert CONF_DIR == root / "steerlm" / "conf" == (root / "conf").resolve()  # conf/ links to the package data


def test_model_vocabulary_must_cover_the_tokenizer() -> None:
    from steerlm.config import validate_vocab

    validate_vocab(ModelConfig(vocab_size=32003), 32003, "/models/llama")
    with pytest.raises(ConfigError) as error:
        validate_vocab(ModelConfig(vocab_size=32000), 32003, "/models/llama")
    assert error.value.key == "model.vocab_size" and "set model.vocab_size=32003" in str(error.value)
    assert ModelConfig(vocab_size=32003).padded_vocab_size == 32128


@pytest.mark.parametrize(
    ("setting", "tp", "accelerator", "expected"),
    [
        (None, 1, Accelerator.cuda, True),
        (None, 2, Accelerator.cuda, False),
        (None, 1, Accelerator.cpu, False),
        (True, 1, Accelerator.cpu, True),
        (False, 1, Accelerator.cuda, False),
    ],
)
def test_torch_compile_defaults_to_cuda_at_tp1_and_an_explicit_setting_wins(setting, tp, accelerator, expected) -> None:
    trainer = TrainerConfig(torch_compile=setting)
    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    assert resolve_torch_compile(trainer, parallel, accelerator) is expected


@pytest.mark.parametrize("recipe", ["annotate", "evaluate_attribute_model"])
def test_recipes_that_read_an_apm_refuse_a_missing_checkpoint(recipe: str, tmp_path: Path) -> None:
    from steerlm.config.annotate import AnnotateConfig
    from steerlm.config.evaluate_apm import EvaluateAttributeModelConfig

    schema = {"annotate": AnnotateConfig, "evaluate_attribute_model": EvaluateAttributeModelConfig}[recipe]
    data = tmp_path / "rows.jsonl"
    data.write_text("{}\n")
    overrides = [f"input={data}", f"apm_checkpoint={tmp_path / 'missing'}"]
    with pytest.raises(ConfigError) as error:
        to_typed(compose(recipe, overrides), schema).validate()
    assert error.value.key == "apm_checkpoint" and "train_attribute_model.py" in str(error.value)
    if recipe == "annotate":
        (tmp_path / "apm").mkdir()
        over_input = [f"input={data}", f"apm_checkpoint={tmp_path / 'apm'}", f"output={data}"]
        with pytest.raises(ConfigError) as error:
            to_typed(compose(recipe, over_input), schema).validate()
        assert error.value.key == "output" and "would overwrite the input" in str(error.value)


def test_compose_works_inside_a_running_hydra_app_on_its_own_conf_only(tmp_path: Path) -> None:
    """The pipeline's report composes the annotate recipe's config from inside the pipeline recipe's Hydra app,
    where Hydra is initialised already: the same config as outside one; another conf/ there is refused."""
    from hydra import initialize_config_dir

    from steerlm.config.annotate import AnnotateConfig

    overrides = ["apm_checkpoint=runs/apm", "input=in.jsonl", "output=out.jsonl", "judge.attributes=[correctness]"]
    outside = compose("annotate", overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):  # as inside recipes/pipeline.py
        assert compose("annotate", overrides) == outside
        with pytest.raises(RuntimeError, match="only its own conf"):
            compose("annotate", overrides, config_dir=tmp_path)
    assert to_typed(outside, AnnotateConfig).judge.attributes == ["correctness"]
