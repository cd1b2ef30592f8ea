"""Rank-aware logging: INFO on global rank 0, warnings only elsewhere."""

from __future__ import annotations

import logging
import os


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the `steerlm` logger for this process (call once, before `runtime.initialize`)."""
    rank = int(os.environ.get("RANK", "0"))
    logger = logging.getLogger("steerlm")
    logger.setLevel(level if rank == 0 else logging.WARNING)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank} %(name)s] %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    # megatron-core logs every parameter and its whole optimizer config at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # Hydra applies its logging config (even "disabled") with disable_existing_loggers, which silences
    # the steerlm loggers modules created at import; they belong to us, so switch them back on.
    for name, existing in logging.root.manager.loggerDict.items():
        if name.startswith("steerlm") and isinstance(existing, logging.Logger):
            existing.disabled = False
