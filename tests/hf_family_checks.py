"""The checks every HF model family steerlm exports to passes (tests/test_nemotron.py, tests/test_qwen_mistral.py,
tests/test_phi3.py, tests/test_gemma.py, the RoPE scalings' tests): an export written at TP=2 computes steerlm's
logits in transformers and converts back bitwise, the lean decoder's greedy tokens are transformers' `generate`'s,
and a regression APM exported as the family's sequence classifier scores as steerlm does; another tool's models,
written by transformers, converted at TP=2; and a checkpoint written before a family's `model.*` field existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steerlm.checkpoint.sharded import META, check_compatible, load_weights, resolve_checkpoint, saved_config
from steerlm.config import ConfigError, ModelConfig, PrecisionConfig
from steerlm.config.store import to_typed
from steerlm.inference.decoders import lean_unsupported
from steerlm.inference.generate import Generator, SamplingParams
from steerlm.inference.loading import load_generator
from steerlm.models import build_model_chunks
from steerlm.models.attribute import build_attribute_model_chunks
from steerlm.stages.convert import convert
from tests.multiproc import run_distributed
from tests.test_convert import _checkpoint, _convert, _distributed_conversions, _parameters, _steerlm_logits


def exported_at_tp2(layout, root: Path, model: ModelConfig, prepare) -> dict[str, Path]:
    """An SFT checkpoint of `model` (its weights changed by `prepare`) at `root / "sft"`, exported to Hugging Face at
    TP=2 (`root / "hf"`) and converted back from that export at TP=1 (`root / "back"`): `check_export`'s paths."""
    run = _checkpoint(layout, root / "sft", model, prepare=prepare)
    run_distributed(_distributed_conversions, 2, [(str(run), str(root / "hf"), {}, 2, 1)])
    convert(_convert(root / "hf", root / "back"), layout)
    return {"run": run, "hf": root / "hf", "back": root / "back"}


def check_export(layout, paths: dict[str, Path], model: ModelConfig, tokens: torch.Tensor, causal_lm: str):
    """`paths["hf"]` (exported from `paths["run"]`) is a `causal_lm` with the run's logits, and `paths["back"]` (it
    converted back) holds bitwise the run's weights. Returns the HF model for the family's own checks."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(paths["hf"]).eval()
    assert type(hf).__name__ == causal_lm
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, _steerlm_logits(layout, paths["run"], model, tokens), rtol=0, atol=1e-4)
    original, back = (_parameters(layout, paths[k], model) for k in ("run", "back"))
    assert original.keys() == back.keys() and all(torch.equal(original[n], back[n]) for n in original)
    return hf


def check_lean_greedy(layout, run: Path, hf_directory: Path, tokens: torch.Tensor) -> None:
    """The lean decoder's greedy continuation of two prompts (rows of `tokens`) is HF `generate`'s, token for token."""
    import transformers

    loaded = load_generator(str(run), layout, PrecisionConfig())
    assert lean_unsupported(loaded.generator.model) is None
    # neither side stops early: every one of the 8 tokens is compared
    lean = Generator([loaded.generator.model], loaded.tokenizer, layout, 128, stop_token_ids=[], decoder="lean")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_directory).eval()
    hf.generation_config.eos_token_id = None
    prompts = [tokens[0, :9].tolist(), tokens[1, :4].tolist()]
    ours = lean.generate(prompts, [SamplingParams(max_new_tokens=8)] * 2)
    beyond = list(range(loaded.tokenizer.vocab_size, hf.config.vocab_size))  # rows steerlm never samples
    for prompt, result in zip(prompts, ours):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, suppress_tokens=beyond)
        assert result.token_ids == expected[0, len(prompt) :].tolist()


def check_apm_export(layout, root: Path, model: ModelConfig, prepare, tokens: torch.Tensor, classifier: str) -> None:
    """A regression APM of `model` (3 attributes, its vectors set by `prepare`, its head's bias random) exports as
    `classifier`, whose logits plus `steerlm_score_bias` are steerlm's scores."""
    import transformers

    def with_head_bias(chunks: list) -> None:
        prepare(chunks)
        torch.nn.init.normal_(chunks[0].attribute_head.bias)

    run = _checkpoint(layout, root / "apm", model, apm=True, prepare=with_head_bias)
    convert(_convert(run, root / "hf"), layout)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(root / "hf").eval()
    assert type(hf).__name__ == classifier and hf.config.num_labels == 3
    chunks = build_attribute_model_chunks(model, PrecisionConfig(), layout, 1, 3)
    load_weights(resolve_checkpoint(run), chunks, layout, model)
    with torch.no_grad():
        theirs = hf(tokens).logits + torch.tensor(hf.config.steerlm_score_bias)
        ours = chunks[0](tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)[:, -1]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def converted_other_tools(
    models: dict[str, torch.nn.Module], root: Path
) -> dict[str, tuple[torch.nn.Module, Path, Path]]:
    """Each of transformers' `models` with every weight random (vectors around 0.5: biases, norm weights), written by
    `save_pretrained`, and the steerlm checkpoint it converts to at TP=2 (one two-rank launch): name → (the HF
    model, its directory, the steerlm run)."""
    with torch.no_grad():
        for name, model in models.items():
            for param in model.parameters():
                param.copy_(torch.randn_like(param) * 0.1 + (0.5 if param.dim() == 1 else 0.0))
            model.eval().save_pretrained(root / name)
    jobs = [(str(root / name), str(root / f"{name}_steerlm"), {}, 2, 1) for name in models]
    run_distributed(_distributed_conversions, 2, jobs)
    return {name: (model, root / name, root / f"{name}_steerlm") for name, model in models.items()}


def check_same_logits(source: torch.nn.Module, chunks: list, length: int, vocab: int = 300, seed: int = 6) -> None:
    """transformers' `source` and a steerlm model's first chunk give the same logits (1e-4) on two random rows of
    `length` tokens."""
    tokens = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        theirs = source(tokens).logits
        ours = chunks[0](tokens, torch.arange(length).expand_as(tokens), None)[..., :vocab]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def check_peft_on_hf_base(layout, directory: Path, run: Path, root: Path, base: torch.nn.Module, tokens) -> dict:
    """A LoRA run (adapters on every linear, B random) whose `init_from` is the HF `directory` (imported as `run`)
    exports PEFT adapters that, on `base` (that directory loaded by transformers), give steerlm's logits on `tokens`.
    Returns the adapters' `adapter_config.json`."""
    import peft

    from steerlm.checkpoint.sharded import WeightsOnly, save_checkpoint
    from steerlm.config import LoraConfig
    from steerlm.config.convert import ModelFormat
    from steerlm.config.schema import TokenizerConfig, TokenizerType, TrainDataConfig
    from steerlm.config.sft import SFTConfig, SFTOptions
    from steerlm.models import lora
    from steerlm.tokenizers import WordTokenizer
    from tests.test_convert import SCHEMA, TEXTS
    from tests.test_lora import _randomise_b

    model, chunks = imported(layout, run)
    lora.attach(chunks, LoraConfig(rank=4, alpha=8.0), 7)
    _randomise_b(chunks[0])
    WordTokenizer.build(TEXTS).save(root / "tokenizer")
    cfg = SFTConfig(
        model=model,
        output_dir=str(root / "run"),
        attributes=SCHEMA,
        tokenizer=TokenizerConfig(TokenizerType.word, str(root / "tokenizer")),
        data=TrainDataConfig(train_file="unused.jsonl"),
        sft=SFTOptions(init_from=str(directory)),
        lora=LoraConfig(rank=4, alpha=8.0),
    )
    save_checkpoint(root / "run", 3, WeightsOnly(chunks), layout, cfg)
    convert(_convert(root / "run", root / "peft", to=ModelFormat.peft), layout)
    wrapped = peft.PeftModel.from_pretrained(base, root / "peft").eval()  # PEFT wraps `base` in place
    length = tokens.shape[1]
    with torch.no_grad():
        theirs = wrapped(input_ids=tokens).logits
        ours = chunks[0](tokens, torch.arange(length).expand_as(tokens), None)[..., : model.vocab_size]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    return json.loads((root / "peft" / "adapter_config.json").read_text())


def imported(layout, run: Path) -> tuple[ModelConfig, list]:
    """The model config and loaded chunks of a steerlm run (one an import wrote)."""
    path = resolve_checkpoint(run)
    model = to_typed(saved_config(path).model, ModelConfig)
    chunks = build_model_chunks(model, PrecisionConfig(), layout, 99)
    load_weights(path, chunks, layout, model)
    return model, chunks


def check_fields_added(layout, root: Path, written: ModelConfig, later: dict[str, ModelConfig]) -> None:
    """A checkpoint of `written` whose meta lacks the fields named in `later` (written before they existed) reads as
    their old value, False: it loads into `written` and refuses each of `later`'s models, naming its field."""
    step = resolve_checkpoint(_checkpoint(layout, root, written))
    meta = json.loads((step / META).read_text())
    for field in later:
        del meta["model"][field]
    (step / META).write_text(json.dumps(meta))
    check_compatible(step, written)
    for field, model in later.items():
        with pytest.raises(ConfigError, match=f"written for model.{field}=False") as error:
            check_compatible(step, model)
        assert error.value.key == f"model.{field}"
