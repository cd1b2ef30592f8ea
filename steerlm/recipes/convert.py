"""Convert a model between steerlm and Hugging Face (docs/deploying.md).

    python recipes/convert.py input=runs/sft output=exports/sft            # → LlamaForCausalLM + chat template
    python recipes/convert.py input=runs/apm output=exports/apm            # → LlamaForSequenceClassification
    torchrun --nproc-per-node 2 recipes/convert.py input=runs/big output=exports/big parallel=tp2  # rank by rank
    python recipes/convert.py input=exports/sft output=runs/sft_back parallel=pp2 to=steerlm     # and back
    python recipes/convert.py input=runs/sft_lora output=exports/lora to=peft   # a LoRA run's adapters (PEFT)

The direction follows from `input` (a steerlm run or checkpoint → hf; a Hugging Face directory → steerlm).
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.convert import ConvertConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="convert", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, ConvertConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import convert

    output = convert.run(typed)
    if output is not None:
        print(output)


if __name__ == "__main__":
    main()
