"""LongRoPE (Phi-3.5-mini, Phi-4-mini, the 128k Phi-3s): per-channel factors on RoPE's inverse frequencies, the short
ones for a forward within the pretraining length and the long ones beyond it, and an attention factor on cos/sin
(`steerlm.models.rope`, `steerlm.megatron_compat.scaled_rope`, `model.rope_*`).

Checked against transformers' Phi3 with random factors: another tool's LongRoPE Phi-3 models (RoPE on every channel
with the attention factor config.json implies, and on half of each head with one it names) convert at TP=2 with their
logits on sequences within and past the pretraining length; a steerlm LongRoPE checkpoint exported at TP=2 is a
Phi3ForCausalLM with `rope_scaling` as Phi-3.5 ships it, steerlm's logits, and converts back bitwise; every step's
logits and the greedy tokens of the lean decoder are HF `generate`'s for prompts that stay within, cross and start past
that length; shared-
prefix scoring equals each sequence's own forward; wrong factors, megatron's decoder past the pretraining length,
packing past it, a NeMo export and a run started from a LongRoPE checkpoint without its factors are refused naming
the key.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from steerlm import runtime
from steerlm.config import ConfigError, PrecisionConfig, compose, to_typed
from steerlm.config.convert import ModelFormat
from steerlm.config.sft import SFTConfig
from steerlm.data.collate import Example, pad_batch
from steerlm.inference.decoders import GraphedLeanDecoder, LeanDecoder
from steerlm.inference.generate import Generator, SamplingParams
from steerlm.inference.loading import load_generator
from steerlm.inference.prefix_scoring import grouped_log_probs
from steerlm.models.gpt import build_model_chunks
from steerlm.models.hf_config import hf_model_fields
from steerlm.models.hf_llama import PHI3, hf_architecture, hf_config_dict
from steerlm.stages.convert import convert
from steerlm.training import SEQUENCE_LOG_PROB, predict
from steerlm.training.init_from import resolve_init_source
from tests.conftest import TEST_MODEL
from tests.hf_family_checks import check_export, converted_other_tools, exported_at_tp2, imported
from tests.test_convert import _convert
from tests.test_qwen_mistral import HF_SHAPE, _randomise_vectors

transformers = pytest.importorskip("transformers")

ORIGINAL = 16  # the pretraining length of the steerlm checkpoints below: TOKENS' 20 positions pass it
TOKENS = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(4))  # ids the word tokenizer has


def _factors(count: int, low: float, high: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return [round(low + (high - low) * value, 4) for value in torch.rand(count, generator=generator).tolist()]


# RoPE on every channel (8 pairs of TEST_MODEL's 16-channel heads), the attention factor 128 / 16 positions implies
LONG_MODEL = replace(
    TEST_MODEL,
    rope_short_factor=_factors(8, 1.0, 1.5, 1),
    rope_long_factor=_factors(8, 1.0, 6.0, 2),
    rope_original_max_positions=ORIGINAL,
    rope_attention_factor=math.sqrt(1 + math.log(128 / ORIGINAL) / math.log(ORIGINAL)),
)
# RoPE on half of each head (4 pairs), an attention factor of its own
LONG_PARTIAL = replace(
    LONG_MODEL,
    rotary_percent=0.5,
    rope_short_factor=LONG_MODEL.rope_short_factor[:4],
    rope_long_factor=LONG_MODEL.rope_long_factor[:4],
    rope_attention_factor=1.25,
)


def _logits(model: torch.nn.Module, tokens: torch.Tensor, vocab: int = 300) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[..., :vocab]


@pytest.fixture(scope="module")
def longrope_imports(tmp_path_factory) -> dict:
    """transformers' Phi3ForCausalLM with LongRoPE (pretraining length 32 of 128 positions), converted at TP=2."""
    torch.manual_seed(2)

    def scaling(pairs: int, **extra) -> dict:
        return {
            "type": "longrope",
            "short_factor": _factors(pairs, 1.0, 1.5, 3),
            "long_factor": _factors(pairs, 1.0, 6.0, 4),
            **extra,
        }

    shapes = {
        "full": {"rope_scaling": scaling(8)},
        "partial": {"partial_rotary_factor": 0.5, "rope_scaling": scaling(4, attention_factor=1.3)},
    }
    models = {
        name: transformers.Phi3ForCausalLM(
            transformers.Phi3Config(
                **HF_SHAPE, pad_token_id=0, sliding_window=None, original_max_position_embeddings=32, **extra
            )
        )
        for name, extra in shapes.items()
    }
    return converted_other_tools(models, tmp_path_factory.mktemp("longrope_imports"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "partial"])
def test_another_tool_s_longrope_phi3_converts_at_tp2_with_its_logits_within_and_past_its_length(
    layout, longrope_imports, name: str
) -> None:
    source, _, run = longrope_imports[name]
    model, chunks = imported(layout, run)
    assert model.rope_original_max_positions == 32
    assert model.rope_long_factor == source.config.rope_parameters["long_factor"]
    expected_factor = 1.3 if name == "partial" else math.sqrt(1 + math.log(4) / math.log(32))
    assert model.rope_attention_factor == pytest.approx(expected_factor, rel=1e-12)
    tokens = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(6))
    for length in (24, 32, 33, 64):  # the short factors up to 32 positions, the long ones past them
        with torch.no_grad():
            theirs = source(tokens[:, :length]).logits
        torch.testing.assert_close(theirs, _logits(chunks[0], tokens[:, :length]), rtol=0, atol=1e-4)
    assert hf_architecture(model) == PHI3


@pytest.fixture(scope="module")
def exported(layout, tmp_path_factory) -> dict[str, Path]:
    """LONG_MODEL's SFT checkpoint with random norm weights, exported at TP=2 and imported back at TP=1."""
    root = tmp_path_factory.mktemp("longrope_export")
    return exported_at_tp2(layout, root, LONG_MODEL, _randomise_vectors(layout))


@pytest.mark.slow
def test_a_longrope_checkpoint_exports_at_tp2_as_phi3_and_imports_back_bitwise(layout, exported) -> None:
    hf = check_export(layout, exported, LONG_MODEL, TOKENS, "Phi3ForCausalLM")  # 20 positions: the long factors
    config = (exported["hf"] / "config.json").read_text()
    assert '"original_max_position_embeddings": 16' in config and '"attention_factor"' not in config
    assert "LongRoPE (pretraining length 16)" in (exported["hf"] / "README.md").read_text()  # the model card
    assert hf.config.rope_parameters["short_factor"] == LONG_MODEL.rope_short_factor
    _, chunks = imported(layout, exported["back"])
    with torch.no_grad():
        theirs = hf(TOKENS[:, :12]).logits
    torch.testing.assert_close(theirs, _logits(chunks[0], TOKENS[:, :12]), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_the_lean_decoder_decodes_as_hf_generate_within_across_and_past_the_length(layout, exported) -> None:
    """transformers' Phi-3 rotates a longer prompt with the long factors throughout, and at the step whose sequence
    passes the pretraining length computes its cache again with them: every step is the whole sequence's forward.
    So is the lean decoder's, row by row: every step's logits and the greedy tokens."""
    loaded = load_generator(str(exported["run"]), layout, PrecisionConfig())
    model = loaded.generator.model
    lean = Generator([model], loaded.tokenizer, layout, 64, stop_token_ids=[], decoder="lean")
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    hf.generation_config.eos_token_id = None
    beyond = list(range(loaded.tokenizer.vocab_size, hf.config.vocab_size))  # rows steerlm never samples
    for prompt_length in (4, 12, 18):  # 12 tokens: position 16 is reached while decoding the 8 new ones
        prompt = TOKENS[0, :prompt_length].tolist()
        expected = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            suppress_tokens=beyond,
            output_logits=True,
            return_dict_in_generate=True,
        )
        new = expected.sequences[0, prompt_length:]
        [ours] = lean.generate([prompt], [SamplingParams(max_new_tokens=8)])
        assert ours.token_ids == new.tolist(), prompt_length
        # the CUDA-graph decoder's static step (run without a graph here) too
        for decoder in (LeanDecoder(model, layout, 64), GraphedLeanDecoder(model, layout, 64, capture=False)):
            with runtime.inference():
                logits, _ = decoder.add([prompt], prompt_length + 8)
                for step, token in enumerate(new):
                    theirs = expected.logits[step][0, : loaded.tokenizer.vocab_size]
                    torch.testing.assert_close(logits[0, : len(theirs)], theirs, rtol=0, atol=1e-4)
                    logits = decoder.step(token.view(1))


def test_megatron_s_decoder_is_refused_past_the_pretraining_length(layout) -> None:
    model = build_model_chunks(LONG_MODEL, PrecisionConfig(), layout, 3)
    Generator(model, None, layout, ORIGINAL, [], decoder="megatron")  # within it both rotate with the short factors
    with pytest.raises(ValueError, match="decoder=megatron rotates every position of this LongRoPE model"):
        Generator(model, None, layout, ORIGINAL + 1, [], decoder="megatron")


def test_shared_prefix_scoring_rotates_as_the_whole_sequences_forward(layout) -> None:
    """A group within the pretraining length, and one whose sequences have 16 (the length itself) and 27 positions:
    each sequence's log-probability is its own forward's (which rotates with the long factors past 16 positions)."""
    model = build_model_chunks(LONG_PARTIAL, PrecisionConfig(), layout, 7)[0].eval()
    decoder = LeanDecoder(model, layout, 64)
    prefix = tuple(range(2, 10))
    for tails in ((3, 5), (9, 20)):
        group = [
            Example(prefix + tuple(range(20, 20 + n)), tuple(i > len(prefix) for i in range(8 + n))) for n in tails
        ]
        with runtime.inference():
            [shared] = grouped_log_probs(decoder, [group])
        alone = [predict([model], [pad_batch([example], 0)], layout, SEQUENCE_LOG_PROB)[0].item() for example in group]
        assert shared == pytest.approx(alone, abs=1e-4)


def test_the_factors_round_trip_through_config_json_and_bad_ones_are_refused() -> None:
    config = hf_config_dict(LONG_PARTIAL)
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["rope_scaling"]["attention_factor"] == 1.25
    fields = hf_model_fields({**config, "pad_token_id": 0}, "input", "x")
    for name in ("rope_short_factor", "rope_long_factor", "rope_original_max_positions", "rope_attention_factor"):
        assert fields[name] == getattr(LONG_PARTIAL, name), name
    # every channel rotated, no attention factor named: max_position_embeddings / original gives it (transformers 4's
    # Phi3Config accepts exactly these three keys)
    assert set(hf_config_dict(LONG_MODEL)["rope_scaling"]) == {"type", "short_factor", "long_factor"}
    with pytest.raises(ConfigError, match="LongRoPE needs 4 positive factors") as error:
        replace(LONG_PARTIAL, rope_long_factor=LONG_MODEL.rope_long_factor).validate()
    assert error.value.key == "model.rope_long_factor"
    with pytest.raises(ConfigError, match="which LongRoPE's factors replace") as error:
        replace(LONG_MODEL, rope_scaling=True).validate()
    assert error.value.key == "model.rope_scaling"


@pytest.mark.slow
def test_a_nemo_export_of_a_longrope_model_is_refused(layout, exported, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="LongRoPE.s per-channel factors.*no NeMo 1.x model") as error:
        convert(_convert(exported["run"], tmp_path / "nemo", to=ModelFormat.nemo), layout)
    assert error.value.key == "to"


def test_the_factors_compose_from_overrides_and_packing_past_the_length_is_refused(tmp_path: Path) -> None:
    """`model.rope_*` as a user sets them (Hydra overrides of lists); packed rows longer than the pretraining length
    would rotate every conversation with the long factors, whatever its own length: refused naming sft.packing."""
    short, long = _factors(16, 1.0, 1.5, 5), _factors(16, 1.0, 6.0, 6)  # the preset's 32-channel heads: 16 pairs
    overrides = [
        f"model.rope_short_factor=[{','.join(map(str, short))}]",
        f"model.rope_long_factor=[{','.join(map(str, long))}]",
        "model.rope_original_max_positions=64",
        "model.rope_attention_factor=1.2",
        "sft.packing=true",
        f"data.train_file={tmp_path / 'train.jsonl'}",
        f"tokenizer.path={tmp_path}",
    ]
    cfg = to_typed(compose("train_sft", [*overrides, "trainer.seq_length=64"]), SFTConfig)
    cfg.validate(this_machine=False)
    assert cfg.model.rope_short_factor == short and cfg.model.rope_long_factor == long and cfg.model.long_rope
    cfg = to_typed(compose("train_sft", [*overrides, "trainer.seq_length=65"]), SFTConfig)
    with pytest.raises(ConfigError, match="every conversation would train with the long factors") as error:
        cfg.validate(this_machine=False)
    assert error.value.key == "sft.packing"


@pytest.mark.slow
def test_init_from_a_longrope_checkpoint_without_its_factors_is_refused_naming_them(exported) -> None:
    """No tensor shape shows the factors: a run that left them out would train another function on the weights."""
    assert resolve_init_source("sft.init_from", str(exported["run"]), LONG_MODEL) is not None
    with pytest.raises(ConfigError, match=r"was written for model.rope_short_factor=\[") as error:
        resolve_init_source("sft.init_from", str(exported["run"]), TEST_MODEL)
    assert error.value.key == "model.rope_short_factor"
    with pytest.raises(ConfigError) as error:
        resolve_init_source("apm.init_from", str(exported["run"]), replace(LONG_MODEL, rope_attention_factor=1.0))
    assert error.value.key == "model.rope_attention_factor"
