"""A steerlm tokenizer as the files `transformers.AutoTokenizer` (and so vLLM, TGI, TRL) read.

A Hugging Face tokenizer is written by transformers itself, with the SteerLM markers steerlm added at load.
The word tokenizer becomes a `tokenizers` WordLevel `tokenizer.json` that gives the same ids
(`WordTokenizer.hf_tokenizer`). Either way `tokenizer_config.json` gets the chat template, right padding (a
sequence-classification APM reads its scores at the last real token, and a causal model's positions count
from the left) and a pad token, so batches work.
"""

from __future__ import annotations

import json
from pathlib import Path

from steerlm.files import atomic_write_text
from steerlm.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from steerlm.tokenizers.hf import HFTokenizer
from steerlm.tokenizers.word import BOS_ID, EOS_ID, PAD_ID, RESERVED_TOKENS, UNK_ID, WordTokenizer

CONFIG_FILE = "tokenizer_config.json"
# Files with a chat template of their own, which would override the one written here.
_OTHER_TEMPLATES = ("chat_template.jinja", "chat_template.json")
# transformers 5 names its generic fast tokenizer class so; transformers 4 (and what serves with it) only
# knows the older name, which transformers 5 still reads.
_GENERIC_FAST = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def export_tokenizer(tokenizer: Tokenizer, directory: Path, chat_template: str | None, model_max_length: int) -> None:
    """Write `tokenizer` into `directory` with `chat_template` (None: no template, a source's own dropped)."""
    directory = Path(directory)
    if isinstance(tokenizer, WordTokenizer):
        tokenizer.hf_tokenizer().save(str(directory / "tokenizer.json"))
        config: dict = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": RESERVED_TOKENS[BOS_ID],
            "eos_token": RESERVED_TOKENS[EOS_ID],
            "unk_token": RESERVED_TOKENS[UNK_ID],
            "pad_token": RESERVED_TOKENS[PAD_ID],
            "additional_special_tokens": list(SPECIAL_TOKENS),
            "clean_up_tokenization_spaces": False,
        }
    elif isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(directory)
        config = json.loads((directory / CONFIG_FILE).read_text())
        name = config.get("tokenizer_class")
        config["tokenizer_class"] = _GENERIC_FAST.get(name, name) if isinstance(name, str) else name
        if config.get("pad_token") is None:
            config["pad_token"] = tokenizer.decode([tokenizer.pad_id])
    else:
        raise TypeError(f"cannot export a {type(tokenizer).__name__}; only the word and Hugging Face tokenizers")
    for name in _OTHER_TEMPLATES:
        (directory / name).unlink(missing_ok=True)
    config.pop("chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(padding_side="right", model_max_length=model_max_length)
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
