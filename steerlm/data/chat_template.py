"""The SteerLM template as a Jinja chat template, for tools that build prompts from OpenAI-style messages.

`transformers`' `apply_chat_template`, vLLM and TGI render a tokenizer's `chat_template` with `messages`,
`add_generation_prompt` and any extra variables (vLLM: the request's `chat_template_kwargs`). The templates
here are generated from a checkpoint's `TemplateConfig` literals, its attribute schema and its default
request, and reproduce what steerlm's server does with the same request:

- `steering_chat_template`: system/developer messages first (joined by newlines; none: the default system
  prompt), then user and assistant messages alternating from a user message. The `attributes` variable
  (name → value, null unsetting one; or an attribute string `name:value,name:value`, the mapping of its
  items) is laid over the default values, checked against the schema (name, number, range, integer) and
  written as the attribute line of the prompt and of every earlier assistant turn (one conversation, one set
  of values). `add_generation_prompt` ends with the assistant header and
  attribute line; without it the messages render as SFT trained them.
- `attribute_prompt_template`: what an attribute model reads to rate the last assistant message (the
  conversation without attribute lines, ending with the label prefix); `attributes` is not used.

A request steerlm refuses is refused here too, through `raise_exception` (which transformers and vLLM
provide). Whether the rendered text tokenises to steerlm's ids depends on the tokenizer, so the export
checks it (`steerlm.stages.convert`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from steerlm.data.attributes import AttributeSchema, Labels
from steerlm.data.template import SteerLMTemplate

SYSTEM_ROLES = ("system", "developer")


def _literal(value: object) -> str:
    """A Jinja expression for a Python str, number, bool, None, list or dict."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # Jinja reads JSON's escapes (\n, \", \\, \t, \uXXXX)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_literal(key)}: {_literal(item)}" for key, item in value.items()) + "}"
    raise TypeError(f"no Jinja literal for {type(value).__name__}")


def _raise(message: str) -> str:
    return "{{- raise_exception(" + message + ") -}}"


def _header(template: SteerLMTemplate, prefix: str) -> str:
    """The expression of a turn header: after a response its leading end-of-turn token was already written."""
    end = template.config.end_of_turn
    after = prefix[len(end) :] if end and prefix.startswith(end) else prefix
    return f"({_literal(after)} if ns.after_response else {_literal(prefix)})"


def _messages(last_role: str | None) -> str:
    """Check the message order as steerlm's server does and collect the system prompt into `ns.system`."""
    system_roles = _literal(list(SYSTEM_ROLES))
    return "".join(
        [
            "{%- for message in messages -%}",
            "{%- if message['content'] is not string -%}",
            _raise("'messages[' ~ loop.index0 ~ '].content must be a string'"),
            "{%- elif message['role'] in " + system_roles + " -%}",
            "{%- if ns.turns > 0 -%}",
            _raise("'a ' ~ message['role'] ~ ' message must come before the first user message'"),
            "{%- endif -%}",
            "{%- set ns.system = message['content'] if ns.system is none else "
            "ns.system ~ '\\n' ~ message['content'] -%}",
            "{%- elif message['role'] in ['user', 'assistant'] -%}",
            "{%- if message['role'] != ('user' if ns.turns % 2 == 0 else 'assistant') -%}",
            _raise(
                "'messages[' ~ loop.index0 ~ ']: after the system messages, user and assistant messages "
                "alternate, starting with user'"
            ),
            "{%- elif message['role'] == 'assistant' and message['content'] | trim == '' -%}",
            _raise("'messages[' ~ loop.index0 ~ ']: an assistant message must not be empty'"),
            "{%- endif -%}",
            "{%- set ns.turns = ns.turns + 1 -%}",
            "{%- set ns.last = message['role'] -%}",
            "{%- else -%}",
            _raise("'role ' ~ message['role'] ~ ' is not supported; use system, user or assistant'"),
            "{%- endif -%}",
            "{%- endfor -%}",
            (
                "{%- if ns.last != "
                + _literal(last_role)
                + " -%}"
                + _raise(f"'the last message must be from the {last_role}'")
                + "{%- endif -%}"
                if last_role
                else ""
            ),
        ]
    )


def _attribute_string() -> str:
    """An attribute string (`name:value,name:value`, NeMo-Aligner's attribute line) in `requested` → the mapping
    of its items, as `steerlm.inference.steering.attribute_request` reads it: each item exactly one `name:value`,
    each name once; a value that is no number stays text, for the checks below to refuse by name."""
    return "".join(
        [
            "{%- if requested is string -%}",
            "{%- set ns.pairs = [] -%}",
            "{%- for part in requested.split(',') if part | trim -%}",
            "{%- set item = part | trim -%}",
            "{%- set parts = item.split(':') -%}",
            "{%- if parts | length != 2 -%}",
            _raise(
                '"attributes: \'" ~ item ~ "\' is not name:value; write the attribute string as name:value,name:value"'
            ),
            "{%- endif -%}",
            "{%- set name = parts[0] | trim -%}",
            "{%- set text = parts[1] | trim -%}",
            "{%- if name in ns.pairs | map('first') | list -%}",
            _raise("'attributes: ' ~ name ~ ' is given twice'"),
            "{%- endif -%}",
            "{%- set ns.pairs = ns.pairs + [[name, text | float(text)]] -%}",
            "{%- endfor -%}",
            "{%- set requested = dict(ns.pairs) -%}",
            "{%- endif -%}",
        ]
    )


def _attribute_line(schema: AttributeSchema, defaults: Labels, conditioned: bool) -> str:
    """Check `attributes`, lay it over `defaults` (schema order) and set `ns.line` to the attribute string."""
    kind = "an integer" if schema.integer else "a number"
    allowed = f"{kind} from {schema.min_value:g} to {schema.max_value:g}"
    low, high = _literal(float(schema.min_value)), _literal(float(schema.max_value))
    not_integer = " or value != value | int" if schema.integer else ""
    check = "".join(
        [
            "{%- if value is boolean or value is not number or value != value -%}",
            _raise(f"'attributes.' ~ name ~ '=' ~ value ~ ' is not a number; give {allowed}'"),
            f"{{%- elif value < {low} or value > {high}{not_integer} -%}}",
            _raise(
                f"'attributes.' ~ name ~ '=' ~ value ~ ' is out of range or not allowed: ' ~ name ~ ' takes {allowed}'"
            ),
            "{%- endif -%}",
        ]
    )
    unconditioned = (
        ""
        if conditioned
        else "{%- if ns.line -%}"
        + _raise(
            "'this model was trained without attribute conditioning (sft.condition_on_attributes=false), so "
            "attributes cannot steer it; send none'"
        )
        + "{%- endif -%}"
    )
    return "".join(
        [
            "{%- set requested = attributes if attributes is defined and attributes is not none else {} -%}",
            _attribute_string(),
            "{%- if requested is not mapping -%}",
            _raise("'attributes must map attribute names to values, or be an attribute string name:value,…'"),
            "{%- endif -%}",
            "{%- for name in requested -%}{%- if name not in " + _literal(list(schema.attributes)) + " -%}",
            _raise(
                _literal(f"schema {schema.name!r} has no attribute ")
                + " ~ name ~ "
                + _literal(f"; its attributes are {', '.join(schema.attributes)}")
            ),
            "{%- endif -%}{%- endfor -%}",
            "{%- set defaults = " + _literal(dict(defaults)) + " -%}",
            "{%- for name in " + _literal(list(schema.attributes)) + " -%}",
            "{%- set value = requested[name] if name in requested else defaults.get(name) -%}",
            "{%- if value is not none -%}",
            check,
            "{%- set shown = (value | int | string) if value == value | int else ('%g' | format(value)) -%}",
            "{%- set ns.line = ns.line ~ (',' if ns.line else '') ~ name ~ ':' ~ shown -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
            unconditioned,
        ]
    )


def _turns(template: SteerLMTemplate, label_line: str, last_label: str | None) -> str:
    """The user and assistant turns; with `last_label` the last (assistant) message ends with it instead."""
    c = template.config
    assistant_end = f"{_literal(c.turn_suffix)} ~ {_literal(c.end_of_turn)}"
    if last_label is not None:
        assistant_end = f"({_literal(c.turn_suffix + last_label)} if loop.last else {assistant_end})"
    return "".join(
        [
            "{%- for message in messages if message['role'] in ['user', 'assistant'] -%}",
            "{%- if message['role'] == 'user' -%}",
            "{{- " + _header(template, c.user_prefix) + " ~ message['content'] ~ " + _literal(c.turn_suffix) + " -}}",
            "{%- set ns.after_response = false -%}",
            "{%- else -%}",
            "{{- "
            + _header(template, c.assistant_prefix)
            + f" ~ {label_line} ~ message['content'] ~ {assistant_end} -}}}}",
            "{%- set ns.after_response = true -%}",
            "{%- endif -%}",
            "{%- endfor -%}",
        ]
    )


_NAMESPACE = "{%- set ns = namespace(system=none, turns=0, last=none, line='', after_response=false) -%}"


def _opening(template: SteerLMTemplate, bos: str | None, system_prompt: str) -> str:
    """BOS (when steerlm puts one first) and the system turn: the messages' system prompt or the default."""
    c = template.config
    system = f"(ns.system if ns.system is not none else {_literal(system_prompt)})"
    return f"{{{{- {_literal((bos or '') + c.system_prefix)} ~ {system} ~ {_literal(c.turn_suffix)} -}}}}"


def steering_chat_template(template: SteerLMTemplate, defaults: Labels, system_prompt: str, bos: str | None) -> str:
    """The chat template of a steerable model (see the module docstring); `bos`: the text of the BOS token
    steerlm puts first, or None."""
    c = template.config
    line = f"({_literal(c.label_prefix)} ~ ns.line ~ {_literal(c.turn_suffix)} if ns.line else '')"
    return "".join(
        [
            _NAMESPACE,
            _messages(None),
            _attribute_line(template.schema, defaults, c.condition_on_attributes),
            _opening(template, bos, system_prompt),
            _turns(template, line, None),
            "{%- if add_generation_prompt is defined and add_generation_prompt -%}",
            "{%- if ns.last != 'user' -%}" + _raise("'the last message must be from the user'") + "{%- endif -%}",
            "{{- " + _header(template, c.assistant_prefix) + f" ~ {line} -}}}}",
            "{%- endif -%}",
        ]
    )


def attribute_prompt_template(template: SteerLMTemplate, system_prompt: str, bos: str | None) -> str:
    """The chat template of an attribute model: the conversation ending with the rated assistant message and
    the label prefix, where the scores are read (regression) or the attribute string follows (generative)."""
    return "".join(
        [
            _NAMESPACE,
            _messages("assistant"),
            _opening(template, bos, system_prompt),
            _turns(template, "''", template.config.label_prefix),
        ]
    )
