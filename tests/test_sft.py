"""Stage 3, attribute-conditioned SFT: what is trained, the plain baseline, batches with and without
packing, the unigram baseline, config and data errors before training, and end-to-end recipe runs (the
tiny model beats the unigram baseline on the synthetic world; TP=2 equals one process; a TP=2 checkpoint
trains on at TP=1 and initialises a new run)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from steerlm.config import ConfigError, compose, save_resolved, to_typed
from steerlm.config.schema import AttributesConfig, TokenizerConfig, TrainDataConfig
from steerlm.config.sft import SFTConfig, SFTOptions
from steerlm.data.attribute_lines import AttributeLines
from steerlm.data.collate import Example
from steerlm.data.readers import DataFormat
from steerlm.errors import DataError
from steerlm.stages import sft
from steerlm.tokenizers import WordTokenizer
from tests.recipe_runner import TORCHRUN_2, run_recipe, train_losses

HELPSTEER2 = AttributesConfig()  # helpfulness, correctness, coherence, complexity, verbosity
ROWS = [
    {
        "system": "Be brief.",
        "conversations": [
            {"from": "User", "value": "what does zog eat", "label": None},
            {"from": "Assistant", "value": "zog eats figs", "label": "helpfulness:4,verbosity:1"},
        ],
    },
    {
        "system": "",
        "conversations": [
            {"from": "User", "value": "tell me about zog", "label": None},
            {"from": "Assistant", "value": "zog is red and small", "label": "helpfulness:2,correctness:3"},
            {"from": "User", "value": "and its food", "label": None},
            {"from": "Assistant", "value": "figs", "label": None},
        ],
    },
]
WORDS = (
    "be brief what does zog eat eats figs tell me about is red and small its food you are kind "
    "System User Assistant helpfulness correctness coherence complexity verbosity humor 0 1 2 3 4"
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _config(
    tmp_path: Path,
    train_file: Path,
    fmt: DataFormat = DataFormat.conversation,
    attributes: AttributesConfig = HELPSTEER2,
    **options,
) -> SFTConfig:
    tokenizer_dir = tmp_path / "tokenizer"
    if not tokenizer_dir.exists():
        WordTokenizer.build([WORDS]).save(tokenizer_dir)
    return SFTConfig(
        attributes=attributes,
        tokenizer=TokenizerConfig(path=str(tokenizer_dir)),
        data=TrainDataConfig(train_file=str(train_file), format=fmt, validation_fraction=0.0),
        sft=SFTOptions(**options),
        output_dir=str(tmp_path / "run"),
    )


def _examples(cfg: SFTConfig) -> tuple[sft.SFTData, WordTokenizer]:
    tokenizer = WordTokenizer.load(cfg.tokenizer.path)
    return sft.load_data(cfg, cfg.attributes.schema(), tokenizer, Path(cfg.output_dir)), tokenizer


def _trained(example: Example) -> list[int]:
    return [token for token, flag in zip(example.ids[1:], example.trainable[1:]) if flag]


def test_plain_baseline_drops_only_the_attribute_line_and_trains_the_same_tokens(tmp_path: Path) -> None:
    data_file = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    conditioned, tokenizer = _examples(_config(tmp_path, data_file))
    plain, _ = _examples(_config(tmp_path, data_file, condition_on_attributes=False))
    first = tokenizer.decode(conditioned.train[0].ids)
    assert "<extra_id_2>helpfulness:4,verbosity:1\nzog eats figs" in first
    assert "<extra_id_2>" not in tokenizer.decode(plain.train[0].ids)
    for with_labels, without in zip(conditioned.train, plain.train):
        assert _trained(with_labels) == _trained(without)  # the attribute line is given, never predicted
    assert tokenizer.decode(_trained(conditioned.train[1])).split("\n") == [
        "zog is red and small",
        "<extra_id_1>figs",
        "<extra_id_1>",
    ]
    unlabelled_context, _ = _examples(_config(tmp_path, data_file, train_unlabelled_responses=False))
    assert tokenizer.decode(_trained(unlabelled_context.train[1])) == "zog is red and small\n<extra_id_1>"
    everything, _ = _examples(_config(tmp_path, data_file, answer_only_loss=False))
    assert len(_trained(everything.train[0])) == len(everything.train[0].ids) - 1


def test_attribute_lines_count_what_the_trained_text_conditions_on(tmp_path: Path) -> None:
    rows = [
        *ROWS,
        {
            **ROWS[0],
            "conversations": [ROWS[0]["conversations"][0], {**ROWS[0]["conversations"][1], "label": "helpfulness:2"}],
        },
    ]
    data, tokenizer = _examples(_config(tmp_path, _write_jsonl(tmp_path / "train.jsonl", rows), repeat=3))
    schema = HELPSTEER2.schema()
    written = [  # every attribute line in the tokenised training text, read back
        schema.parse(line.split("<extra_id_2>")[1])
        for example in data.train[: data.distinct_train]
        for line in tokenizer.decode(example.ids).split("\n")
        if "<extra_id_2>" in line
    ]
    expected = {
        name: Counter(f"{labels[name]:g}" for labels in written if labels.get(name) is not None)
        for name in schema.attributes
    }
    assert data.attribute_lines == AttributeLines(
        len(written), {k: dict(sorted(v.items())) for k, v in expected.items()}
    )
    assert data.attribute_lines.lines == 3 and data.attribute_lines.levels["helpfulness"] == {"2": 2, "4": 1}
    assert data.attribute_lines.count("helpfulness", 2.0) == 2 and data.attribute_lines.count("coherence", 4) == 0
    plain, _ = _examples(_config(tmp_path, tmp_path / "train.jsonl", condition_on_attributes=False))
    assert plain.attribute_lines is None  # the baseline conditions on nothing


def test_system_prompt_repeat_and_held_out_rows(tmp_path: Path) -> None:
    data_file = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    data, tokenizer = _examples(_config(tmp_path, data_file, system_prompt="you are kind", repeat=3))
    assert data.distinct_train == 2 and len(data.train) == 6 and data.train[:2] == data.train[2:4]
    assert all(tokenizer.decode(e.ids[1:]).startswith("<extra_id_0>System\nyou are kind\n") for e in data.train)
    kept, _ = _examples(_config(tmp_path, data_file))
    assert tokenizer.decode(kept.train[1].ids[1:]).startswith("<extra_id_0>System\n\n<extra_id_1>User")
    sources = [f"{data_file}:{line}" for line in range(1, 2001)]
    held = [source for source in sources if sft.held_out(source, 0.1)]
    assert 150 < len(held) < 250 and held == [s for s in sources if sft.held_out(s, 0.1)]


def test_unigram_cross_entropy_by_hand() -> None:
    train = [Example((0, 5, 5, 6), (False, True, True, True))]  # trained targets 5, 5, 6
    valid = [Example((0, 5, 7), (False, False, True))]  # the only trained target: 7, never seen in training
    expected = -math.log((0 + 1) / (3 + 10))
    assert sft.unigram_cross_entropy(train, valid, vocab_size=10) == pytest.approx(expected)
    assert sft.unigram_cross_entropy(train, [], vocab_size=10) is None


def _target_counts(batch: dict) -> Counter:
    mask = batch["loss_mask"].bool()
    return Counter(batch["labels"][mask].tolist())


def test_a_packed_step_trains_the_same_tokens_in_fewer_rows() -> None:
    examples = [Example(tuple(range(n + 1)), (False,) + (True,) * n, f"f:{n}") for n in (30, 9, 17, 25, 4, 12, 40, 8)]
    padded = sft.step_batch(examples, 99, packing=False, seq_length=48, rows_multiple=4)
    packed = sft.step_batch(examples, 99, packing=True, seq_length=48, rows_multiple=4, length_multiple=4)
    assert padded["tokens"].shape == (8, 40) and "attention_mask" not in padded
    rows, length = packed["tokens"].shape
    assert rows == 4 and length % 4 == 0 and length <= 48 and packed["attention_mask"].shape == (4, 1, length, length)
    assert _target_counts(packed) == _target_counts(padded)
    assert packed["loss_mask"].sum() == padded["loss_mask"].sum() == sum(e.positions for e in examples)


def test_validation_batches_hold_every_example_once() -> None:
    valid = [Example(tuple(range(n + 2)), (False,) + (True,) * (n + 1), f"f:{n}") for n in range(7)]
    batches = sft.validation_batches(valid, 99, rows=4)
    assert [b["tokens"].shape for b in batches] == [(4, 7), (4, 3)]
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(e.positions for e in valid)
    assert batches[1]["loss_mask"][3].sum() == 0  # the blank filler row is never trained


def test_config_composes_validates_and_names_bad_keys(tmp_path: Path) -> None:
    (tmp_path / "tok").mkdir()
    train = _write_jsonl(tmp_path / "train.jsonl", ROWS)
    overrides = [f"data.train_file={train}", f"tokenizer.path={tmp_path / 'tok'}"]
    cfg = to_typed(compose("train_sft", overrides), SFTConfig)
    for section in (cfg.tokenizer, cfg.data, cfg.attributes, cfg.sft):
        section.validate()
    assert cfg.attributes.name == "steerlm_oasst" and cfg.model.vocab_size == 768 and cfg.trainer.seq_length == 320
    assert cfg.sft == SFTOptions() and cfg.data.format == DataFormat.helpsteer2
    with pytest.raises(ConfigCompositionException, match="sft.max_seq_length"):  # trainer.seq_length is the one
        compose("train_sft", [*overrides, "sft.max_seq_length=512"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    for options, problem in (
        ({"repeat": 0}, "must be >= 1"),
        ({"init_from": str(tmp_path / "nope")}, "not a directory"),
        ({"init_from": str(tmp_path / "hf")}, "Hugging Face model directory"),
    ):
        with pytest.raises(ConfigError) as error:
            SFTOptions(**options).validate()
        assert error.value.key == f"sft.{next(iter(options))}" and problem in str(error.value)
    with pytest.raises(ConfigError, match="is neither a checkpoint"):  # a directory, but no steerlm run
        sft.resolve_init_checkpoint(replace(cfg, sft=SFTOptions(init_from=str(tmp_path / "tok"))))


def test_attributes_the_schema_lacks_stop_the_run_before_training(tmp_path: Path) -> None:
    rows = [
        ROWS[0],
        {
            "conversations": [
                {"from": "User", "value": "zog", "label": None},
                {"from": "Assistant", "value": "figs", "label": "humor:3"},
            ]
        },
    ]
    cfg = _config(tmp_path, _write_jsonl(tmp_path / "labels.jsonl", rows))
    with pytest.raises(DataError) as error:
        sft.run(cfg)
    assert "labels.jsonl:2" in str(error.value) and "unknown attribute 'humor' for schema 'helpsteer2'" in str(
        error.value
    )
    helpsteer_row = {
        "prompt": "what does zog eat",
        "response": "figs",
        "helpfulness": 4,
        "correctness": 4,
        "coherence": 4,
        "complexity": 1,
        "verbosity": 1,
        "humor": 2,
        "toxicity": 0,
    }
    cfg = _config(tmp_path, _write_jsonl(tmp_path / "rows.jsonl", [helpsteer_row]), DataFormat.helpsteer2)
    with pytest.raises(ConfigError) as error:
        sft.run(cfg)
    assert (
        error.value.key == "attributes.attributes"
        and "rates humor, toxicity, which schema 'helpsteer2' lacks" in str(error.value)
    )
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints").exists()


# --- end to end: the recipe as users run it -------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("synthetic")
    result = run_recipe(
        "prepare_data", ["data=synthetic", f"output={data}", "synthetic.unlabelled_rows=10", "synthetic.eval_prompts=2"]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return data


def _sft_ok(synthetic: Path, out: Path, args: list[str], launcher: list[str] | None = None) -> dict:
    result = run_recipe(
        "train_sft",
        [
            f"data.train_file={synthetic}/annotated.jsonl",
            f"tokenizer.path={synthetic}/tokenizer",
            f"output_dir={out}",
            *args,
        ],
        launcher,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_tiny_sft_falls_well_below_the_unigram_baseline(synthetic: Path, tmp_path: Path) -> None:
    result = _sft_ok(synthetic, tmp_path, ["trainer.max_steps=100", "trainer.eval_interval=50"])
    print(
        f"\nvalidation loss {result['initial_validation_loss']:.3f} → {result['final_validation_loss']:.3f} "
        f"(unigram baseline {result['unigram_baseline']:.3f}) in {result['train_seconds']:.0f} s"
    )
    assert result["train_examples"] + result["validation_examples"] == 2000 and result["validation_examples"] > 150
    losses = [loss for _, loss in result["evaluations"]]
    assert losses[0] > losses[1] == result["final_validation_loss"]
    assert result["final_validation_loss"] < 0.4 * result["unigram_baseline"] < result["initial_validation_loss"]


SMALL = [
    "trainer.micro_batch_size=4",
    "trainer.global_batch_size=8",
    "trainer.log_interval=1",
    "trainer.eval_interval=3",
    "optim.lr_warmup_steps=1",
    "optim.lr_decay_steps=6",
    "checkpoint.save_interval=3",
]


@pytest.mark.slow
def test_tp2_equals_one_process_and_its_checkpoint_trains_on_at_tp1(synthetic: Path, tmp_path: Path) -> None:
    reference = _sft_ok(synthetic, tmp_path / "single", [*SMALL, "trainer.max_steps=6"])
    tp2 = _sft_ok(synthetic, tmp_path / "tp2", [*SMALL, "trainer.max_steps=3", "parallel=tp2"], TORCHRUN_2)
    assert tp2["layout"].startswith("world=2 tp=2 pp=1")
    expected = train_losses(tmp_path / "single")
    assert train_losses(tmp_path / "tp2") == pytest.approx({s: expected[s] for s in (1, 2, 3)}, rel=1e-5)

    resumed = _sft_ok(synthetic, tmp_path / "tp2", [*SMALL, "trainer.max_steps=6"])  # same run dir, now TP=1
    assert resumed["start_step"] == 3 and resumed["layout"].startswith("world=1 tp=1")
    assert resumed["initial_validation_loss"] == pytest.approx(tp2["final_validation_loss"], rel=1e-6)
    assert train_losses(tmp_path / "tp2") == pytest.approx(expected, rel=1e-5)
    assert resumed["final_validation_loss"] == pytest.approx(reference["final_validation_loss"], rel=1e-5)
    saved = (tmp_path / "tp2" / "checkpoints" / "step_0000003" / "config.yaml").read_text()
    assert "condition_on_attributes: true" in saved and f"path: {synthetic}/tokenizer" in saved

    started = _sft_ok(
        synthetic,
        tmp_path / "init",
        [*SMALL, "trainer.max_steps=1", f"sft.init_from={tmp_path / 'tp2' / 'checkpoints' / 'step_0000003'}"],
    )
    assert started["start_step"] == 0
    assert started["initial_validation_loss"] == pytest.approx(tp2["final_validation_loss"], rel=1e-6)


@pytest.mark.slow
def test_packing_gives_the_unpacked_loss_curve(synthetic: Path, tmp_path: Path) -> None:
    common = [
        "trainer.micro_batch_size=2",
        "trainer.global_batch_size=8",
        "trainer.seq_length=512",
        "trainer.log_interval=1",
        "trainer.max_steps=3",
        "trainer.eval_interval=null",
    ]
    _sft_ok(synthetic, tmp_path / "padded", common)
    packed = _sft_ok(synthetic, tmp_path / "packed", [*common, "sft.packing=true"])
    assert packed["packing"]
    assert train_losses(tmp_path / "packed") == pytest.approx(train_losses(tmp_path / "padded"), rel=1e-4)


def test_resuming_with_the_other_conditioning_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, _write_jsonl(tmp_path / "train.jsonl", ROWS))
    step = Path(cfg.output_dir) / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / "steerlm_checkpoint.json").write_text("{}")
    save_resolved(cfg, step / "config.yaml")
    (step.parent / "latest").write_text(step.name + "\n")
    sft.check_resume_conditioning(cfg, Path(cfg.output_dir))
    plain = replace(cfg, sft=replace(cfg.sft, condition_on_attributes=False))
    with pytest.raises(ConfigError) as error:
        sft.check_resume_conditioning(plain, Path(cfg.output_dir))
    assert error.value.key == "sft.condition_on_attributes" and "step_0000002 was trained with" in str(error.value)
    sft.check_resume_conditioning(
        replace(plain, checkpoint=replace(plain.checkpoint, resume=False)), Path(cfg.output_dir)
    )
