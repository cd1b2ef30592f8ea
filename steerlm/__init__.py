"""steerlm: SteerLM attribute-conditioned alignment on megatron-core."""

__version__ = "0.1.0"
