"""Stage 0: pretrain the base LM that the APM and SFT start from (`apm.init_from`, `sft.init_from`).

    python recipes/prepare_data.py data=synthetic              # writes data/synthetic/corpus.jsonl, once
    python recipes/pretrain.py                                 # tiny model on the synthetic world's corpus
    python recipes/pretrain.py data.train_file=my_corpus.jsonl tokenizer.type=hf tokenizer.path=… model=…
    torchrun --nproc-per-node 2 recipes/pretrain.py parallel=tp2

Writes config.yaml, metrics.jsonl, tensorboard/, checkpoints/ and summary.json (validation loss before and
after against the unigram baseline) to output_dir (default runs/base). Rerunning resumes.
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.pretrain import PretrainConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="pretrain", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, PretrainConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.stages import pretrain

    pretrain.run(typed)


if __name__ == "__main__":
    main()
