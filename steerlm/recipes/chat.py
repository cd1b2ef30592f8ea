"""Chat with a steerable model on the terminal; change its attributes between turns.

    python recipes/chat.py checkpoint=runs/sft attributes.verbosity=4 attributes.humor=0
    torchrun --nproc-per-node 2 recipes/chat.py checkpoint=runs/sft parallel=tp2    # rank 0 chats

In the chat: /set NAME VALUE, /unset NAME, /show, /system TEXT, /reset, /help, /quit (docs/inference.md).
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.inference import ChatConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="chat", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, ChatConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.inference.chat import chat

    chat(typed)


if __name__ == "__main__":
    main()
