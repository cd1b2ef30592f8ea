"""steerlm: SteerLM attribute-conditioned alignment on megatron-core."""

import warnings

from steerlm import _import_hooks

_import_hooks.install()  # megatron-core imports without building its torch.compile wrappers up front

# steerlm chooses megatron-core's local fallbacks itself when Transformer Engine / apex are absent
# (see steerlm.models.gpt); megatron's import-time notices about them, and its deprecation notice
# for its own default cuda_graph_scope, are noise for users.
for _message in ("Transformer Engine and Apex are not installed", "Apex is not installed", "full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)
# dist_checkpointing (megatron-core 0.16) still goes through torch's deprecated ShardedTensor path.
for _message in ("Please use DTensor instead", "`load_state_dict` is deprecated"):
    warnings.filterwarnings("ignore", message=_message, category=FutureWarning)

__version__ = "0.1.0"
