"""The files of a Hugging Face export besides the weights: the tokenizer with its chat template, checked
against steerlm's own prompt ids, and the model card (README.md).

The chat template is generated from the checkpoint's template literals (`steerlm.data.chat_template`), but
whether its text tokenises to the ids steerlm generates (or scores) from depends on the tokenizer and on
how steerlm tokenises the template. So the export renders probe requests through the exported tokenizer,
as vLLM and `apply_chat_template` do (the text, then `add_special_tokens=False`), and compares the ids
with those of steerlm's server path (`Steering.labels` → `conversation` → `prompt_ids`; for an APM, the
scorer's `attribute_examples`). A BOS token that steerlm puts first is written into the template; any other
difference refuses the export, naming the first differing token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from steerlm.config import ConfigError
from steerlm.config.convert import ConvertConfig
from steerlm.data.apm import attribute_examples, last_assistant_turn
from steerlm.data.attribute_lines import AttributeLines
from steerlm.data.attributes import AttributeSchema
from steerlm.data.chat_template import attribute_prompt_template, steering_chat_template
from steerlm.data.lengths import LengthPolicy, LengthStats
from steerlm.inference.steering import ChatMessage, Steering
from steerlm.stages.export_source import ExportSource, ModelKind
from steerlm.tokenizers import Tokenizer
from steerlm.tokenizers.export import export_tokenizer

if TYPE_CHECKING:
    from pathlib import Path

Messages = list[dict[str, str]]
Probe = tuple[Messages, dict | None]
_UNLIMITED = 1 << 40


def _value(schema: AttributeSchema, value: float) -> float:
    return int(value) if schema.integer else value


def chat_probes(schema: AttributeSchema, conditioned: bool) -> list[Probe]:
    """Requests the export renders: one user turn, a multi-turn chat with a system message, system and
    developer messages with spaces and blank lines, each with and without attributes."""
    first = [{"role": "user", "content": "Hello there! How are you today?"}]
    chat = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris, of course."},
        {"role": "user", "content": "And of Spain, please?"},
    ]
    spaced = [
        {"role": "developer", "content": "Be kind."},
        {"role": "system", "content": " Use plain words. "},
        {"role": "user", "content": "Tell me a story about a cat."},
        {"role": "assistant", "content": " A cat sat.\n\nThe end. "},
        {"role": "user", "content": "Another one!"},
    ]
    names, low, high = schema.attributes, schema.min_value, schema.max_value
    if not conditioned:
        return [(first, None), (chat, None), (spaced, None)]
    return [
        (first, None),
        (chat, {names[0]: _value(schema, high)}),
        (spaced, {name: _value(schema, low) for name in names}),
        (chat, {names[-1]: None}),
    ]


def attribute_probes() -> list[Probe]:
    """Conversations an APM rates (ending with the assistant response), without and with a system message."""
    one = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    two = [
        {"role": "system", "content": "You answer briefly."},
        *one,
        {"role": "user", "content": "And of Spain?"},
        {"role": "assistant", "content": " Madrid, I think. "},
    ]
    return [(one, None), (two, None)]


def steerlm_prompt_ids(steering: Steering, messages: Messages, attributes: Mapping | None) -> list[int]:
    """The ids steerlm's server generates from for this chat request."""
    labels = steering.labels(attributes)
    system, turns = steering.conversation([ChatMessage(m["role"], m["content"]) for m in messages], labels)
    return steering.prompt_ids(system, turns, labels)


def steerlm_attribute_ids(steering: Steering, tokenizer: Tokenizer, messages: Messages) -> list[int]:
    """The ids steerlm's APM scorer reads for this conversation (its last assistant message rated)."""
    conversation = steering.scoring_conversation([ChatMessage(m["role"], m["content"]) for m in messages])
    schema, template = steering.schema, steering.template
    examples = attribute_examples(
        [conversation], schema, template, tokenizer, _UNLIMITED, LengthPolicy.drop, LengthStats(), last_assistant_turn
    )
    return list(examples[0].ids)


def render(hf: Any, messages: Messages, generation: bool, attributes: Mapping | None = None) -> str:
    """The chat template's text for `messages`, as vLLM renders it (`attributes` only when given)."""
    extra = {} if attributes is None else {"attributes": attributes}
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **extra)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text


def _differ(expected: list[int], got: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return index
    return None if len(expected) == len(got) else min(len(expected), len(got))


def _check(hf: Any, probes: list[Probe], expected: Callable[[Probe], list[int]], generation: bool) -> None:
    for probe in probes:
        messages, attributes = probe
        text = render(hf, messages, generation, attributes)
        ids, want = list(hf(text, add_special_tokens=False)["input_ids"]), expected(probe)
        at = _differ(want, ids)
        if at is not None:
            raise ConfigError(
                "input",
                text,
                f"tokenised by the exported tokenizer, this chat-template text differs from steerlm's prompt ids at "
                f"token {at} (steerlm {want[at : at + 3]}, exported {ids[at : at + 3]}), so served copies "
                "would read other tokens than the model was trained on",
                "steerlm encodes the template's segments one by one: with a tokenizer that merges across "
                "them (e.g. SentencePiece's leading '▁') the whole text cannot reproduce that; export a "
                "checkpoint trained with whole-text tokenization",
            )


def export_tokenizer_checked(cfg: ConvertConfig, source: ExportSource, tokenizer: Tokenizer, directory: Path) -> None:
    """Write the tokenizer (with the chat template of the source's kind) and check the template's ids."""
    from transformers import AutoTokenizer

    length = source.model.max_position_embeddings
    requested = {name: value for name, value in cfg.attributes.items() if value is not None}
    if source.kind != ModelKind.steerable and requested:
        raise ConfigError(
            "attributes",
            requested,
            f"only a steerable (SFT) model's chat template has default attributes; this is a {source.kind.value}",
            "leave attributes unset",
        )
    if source.template is None:
        export_tokenizer(tokenizer, directory, None, length)
        return
    template = source.template
    steering = Steering(template, tokenizer, cfg.attributes, cfg.system_prompt, _UNLIMITED)
    if source.kind == ModelKind.steerable:
        probes = chat_probes(template.schema, steering.conditioned)

        def make(bos: str | None) -> str:
            return steering_chat_template(template, steering.defaults, cfg.system_prompt, bos)

        def expected(probe: Probe) -> list[int]:
            return steerlm_prompt_ids(steering, *probe)

    else:
        probes = attribute_probes()

        def make(bos: str | None) -> str:
            return attribute_prompt_template(template, cfg.system_prompt, bos)

        def expected(probe: Probe) -> list[int]:
            return steerlm_attribute_ids(steering, tokenizer, probe[0])

    generation = source.kind == ModelKind.steerable
    export_tokenizer(tokenizer, directory, make(None), length)
    hf = AutoTokenizer.from_pretrained(str(directory))
    bare = list(hf(render(hf, probes[0][0], generation), add_special_tokens=False)["input_ids"])
    if tokenizer.bos_id is not None and expected(probes[0]) == [tokenizer.bos_id, *bare]:
        export_tokenizer(tokenizer, directory, make(tokenizer.decode([tokenizer.bos_id])), length)
        hf = AutoTokenizer.from_pretrained(str(directory))
    _check(hf, probes, expected, generation)


def example_prompts(directory: Path, source: ExportSource) -> list[tuple[str, str]]:
    """(what, text) the exported chat template renders for placeholder messages: the model card shows exactly
    the text a served copy reads, BOS and defaults included."""
    from transformers import AutoTokenizer

    if source.template is None:
        return []
    hf = AutoTokenizer.from_pretrained(str(directory))
    asked = [{"role": "system", "content": "{system prompt}"}, {"role": "user", "content": "{user message}"}]
    if source.kind != ModelKind.steerable:
        rated = [*asked, {"role": "assistant", "content": "{response to rate}"}]
        return [("the conversation whose last response is rated", render(hf, rated, False))]
    examples = [("without `attributes` (the defaults)", render(hf, asked, True))]
    if source.template.config.condition_on_attributes:
        schema = source.template.schema
        one = {schema.attributes[-1]: _value(schema, schema.max_value)}  # laid over the defaults
        examples.insert(0, (f"with `attributes={one}`", render(hf, asked, True, one)))
    return examples


_KINDS = {
    ModelKind.language_model: "language model",
    ModelKind.steerable: "steerable chat model (SteerLM attribute-conditioned SFT)",
    ModelKind.regression_apm: "regression Attribute Prediction Model (a multi-attribute reward model)",
    ModelKind.generative_apm: "generative Attribute Prediction Model (it writes the attribute string)",
}


def trained_values_section(lines: AttributeLines, schema: AttributeSchema) -> list[str]:
    """The model card's account of what a steerable model was trained to answer: per attribute, how many of its
    training data's attribute lines carried each value, and (integer schemas) the values none carried."""
    rows = []
    for name in schema.attributes:
        counts = lines.levels.get(name, {})
        present = ", ".join(f"{value} ({count:,})" for value, count in counts.items()) or "none"
        if schema.integer:
            never = [f"{v}" for v in range(int(schema.min_value), int(schema.max_value) + 1) if f"{v}" not in counts]
            present += f"; never: {', '.join(never)}" if never else ""
        rows.append(f"| {name} | {present} |")
    return [
        "",
        "## Attribute values it was trained on",
        "",
        f"Of the {lines.lines:,} attribute lines in its SFT data, how many carried each value. A request for a value "
        "it never saw in training is answered from a line it was never trained on: expect that answer to follow "
        "the request less well.",
        "",
        "| attribute | value (lines) |",
        "|---|---|",
        *rows,
    ]


def model_card(
    source: ExportSource, config: dict, examples: list[tuple[str, str]], trained: AttributeLines | None = None
) -> str:
    """README.md: what the model is, the exact input format and range of what it reads and writes, and (when its
    SFT run recorded them) the attribute values it was trained on."""
    m = source.model
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [steerlm, {source.family.model_type}"
        + (", reward-model" if source.kind == ModelKind.regression_apm else "")
        + "]",
        "---",
        "",
        f"# {source.path.parent.parent.name or source.path.name}",
        "",
        f"A {_KINDS[source.kind]} trained with steerlm, exported by `recipes/convert.py` from "
        f"`{source.path}` (step {source.step}) as `{source.architecture}`.",
        "",
        f"- {m.num_layers} layers, hidden size {m.hidden_size}, {m.num_attention_heads} attention heads, "
        f"{m.query_groups} key/value heads, vocabulary {m.vocab_size}, context {m.max_position_embeddings} tokens"
        + (f", Llama-3 RoPE scaling x{m.rope_scaling_factor:g}" if m.rope_scaling else "")
        + (f", LongRoPE (pretraining length {m.rope_original_max_positions})" if m.long_rope else "")
        + (
            f", YaRN x{m.rope_yarn_factor:g} (pretraining length {m.rope_original_max_positions})"
            if m.rope_yarn_factor is not None
            else ""
        )
        + (f", linear RoPE scaling x{m.rope_linear_factor:g}" if m.rope_linear_factor is not None else "")
        + (", tied embeddings" if m.share_embeddings_and_output_weights else ""),
        f"- weights: {config['torch_dtype']}",
    ]
    if source.schema is not None and source.template is not None:
        schema = source.schema
        kind = "integers" if schema.integer else "numbers"
        lines += [
            f"- attributes ({schema.name}), in this order: {', '.join(schema.attributes)}; "
            f"{kind} from {schema.min_value:g} to {schema.max_value:g}",
            "",
            "## Input format",
            "",
            "Exactly this text (the tokenizer's chat template renders it from OpenAI-style messages; "
            "`{…}` are placeholders):",
            "",
        ]
        follows = "…" if source.kind == ModelKind.steerable else ""  # the response the model writes
        for what, text in examples:
            lines += [f"{what}:", "", "```", text + follows, "```", ""]
    if source.kind == ModelKind.steerable:
        lines += [
            "Steer with `tokenizer.apply_chat_template(messages, attributes={...}, add_generation_prompt=True)` "
            '(vLLM: `chat_template_kwargs: {"attributes": {...}}`); without `attributes` the defaults apply. '
            "Generation stops at the end-of-turn token (`eos_token_id` in generation_config.json).",
        ]
    if source.kind == ModelKind.steerable and trained is not None and source.schema is not None:
        lines += trained_values_section(trained, source.schema)
    if source.kind == ModelKind.regression_apm:
        lines += [
            f"`logits` are the {len(source.schema.attributes) if source.schema else 0} attribute scores read at the "
            "last token (the label prefix); steerlm's scores are `logits + config.steerlm_score_bias` (the head's "
            f"bias, which {source.architecture} has no place for). Pad on the right "
            "(the tokenizer does).",
        ]
    lines += ["", "See steerlm's docs/deploying.md for transformers, vLLM and TRL/RewardBench commands.", ""]
    return "\n".join(lines)
