"""Serve a steerable model over an OpenAI-compatible HTTP API with an `attributes` extension.

    python recipes/serve.py checkpoint=runs/sft                           # http://127.0.0.1:8000/v1
    python recipes/serve.py checkpoint=runs/sft apm_checkpoint=runs/apm   # + POST /v1/attributes/score
    torchrun --nproc-per-node 2 recipes/serve.py checkpoint=runs/sft parallel=tp2   # rank 0 serves

Any OpenAI client works (`base_url="http://127.0.0.1:8000/v1"`); steer with
`extra_body={"attributes": {"humor": 3}}`. SIGINT/SIGTERM finish in-flight requests, then exit
(docs/inference.md).
"""

import hydra
from omegaconf import DictConfig

from steerlm.config import register_schemas, to_typed
from steerlm.config.inference import ServeConfig
from steerlm.logs import setup_logging

register_schemas()


@hydra.main(config_path="../conf", config_name="serve", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    typed = to_typed(cfg, ServeConfig)
    # Imported after validation, so a bad config fails in about a second, before torch and megatron load.
    from steerlm.inference.server import serve

    serve(typed)


if __name__ == "__main__":
    main()
