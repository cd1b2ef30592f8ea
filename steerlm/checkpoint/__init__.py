"""Checkpoint I/O below training and inference: sharded steerlm checkpoints (megatron dist_checkpointing).

Training saves and resumes through it; inference, scoring and annotation read weights through it, so
neither reaches into `steerlm.training` for files (docs/architecture.md).
"""
