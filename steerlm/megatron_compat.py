"""Everything steerlm does that depends on megatron-core internals, private names or unwritten contracts.

A megatron-core upgrade starts here: every item below names what it replaces or relies on, and
`tests/test_megatron_compat.py` checks each one against the installed megatron-core. No other steerlm module
patches megatron, overrides a private method or reads a private attribute.

0. Import cost (`steerlm/_import_hooks.py`, installed by `steerlm/__init__.py` because it must act before the
   first `import megatron.core`): megatron's `torch.compile` wrappers (`megatron.core.jit.jit_fuser`) are built
   at their first call instead of at import, which spares every process importing `torch._dynamo`/`_inductor`.
1. Supported range (`SUPPORTED`): checked when this module is imported, with the fix in the message.
2. CPU stand-ins (`activate`, `thread_mode`, `lifted`): megatron-core assumes CUDA in a handful of places;
   `steerlm.runtime` activates them only when CUDA is absent. Measured needs: docs/architecture.md. The same
   mode routes matrix products (`route_matmuls`): megatron's linear autograd function multiplies with
   `torch.matmul` / `Tensor.matmul` (forward `input @ weight.t()`, backward `grad_output @ weight` and
   `grad_output.t() @ input`), which `steerlm.runtime.cpu_matmul` sends to oneDNN.
3. Synchronous dist-checkpoint saves (`use_in_process_save_queue`): replaces the module-level
   `filesystem_async._results_queue` (a `spawn` multiprocessing Manager queue) by an in-process queue.
4. Own output heads (`GPTModelWithOwnHead`, `GPTModelWithLossHead`): override the private
   `GPTModel._postprocess`, which megatron's forward calls with keywords (`hidden_states`, `labels`, …).
5. SDPA core attention (`SDPACoreAttention`): honours the constructor and forward contract megatron's
   `SelfAttention` uses for `core_attention` submodules (DotProductAttention's signature). Its grouped-query
   attention (`grouped_sdpa`, also the lean decoders') asks torch's private `torch._fused_sdp_choice` which kernel
   SDPA would pick.
6. Weight layouts (`pack_qkv`, `split_qkv`, `split_fc1`): how `linear_qkv` interleaves query groups and how
   `linear_fc1` stacks SwiGLU's gate and up projections.
7. Distributed optimizer over torch's Adam (`complete_torch_adam_state`, `load_optimizer_state`): megatron-core
   0.16's `DistributedOptimizer.state_dict` reads torch Adam's per-parameter `step` (asserting there is
   exactly one value, so it fails on the empty state of an optimizer that has not stepped, e.g. while
   loading); its `load_state_dict` gives every parameter the same `step` tensor object (which torch Adam then
   increments once per parameter) and its private `_set_main_param_and_optimizer_states` copies every state
   key, `step` included, from the loaded tensors, which never carry `step` (KeyError). Reads
   `distrib_optimizer.HAVE_APEX_OR_TE`, the inner optimizer's `state` and `model_param_group_index_map`.
   Which kind of optimizer wrote a checkpoint (`saved_by_distributed_optimizer`): the two store their common state
   in different layouts (the distributed one's records `param_state_sharding_type`), and a checkpoint of one
   loaded into the other fails inside megatron with a KeyError. `TranslatedLoad` reads one kind's or precision's
   checkpoint into the other: it relies on both storing each parameter's moments under the same sharded keys (the
   distributed optimizer in its `fully_reshardable` format), on where each keeps the fp32 master weights (`param` /
   `fp32_param` / the weights themselves), the step (param groups / `state.common_step`) and torch's param groups
   in its common state, and on `param_group_identifier_keys` naming a param group.
8. Transformer Engine layers (`fused_norm_parameters`, `linear_bias`, `unfused_norm_name`): under megatron's TE
   layer spec (`get_gpt_layer_with_transformer_engine_spec`) a layer's `input_layernorm` and `pre_mlp_layernorm` are
   IdentityOp and the norms run inside `TELayerNormColumnParallelLinear` (`linear_qkv`, `linear_fc1`) with TE's
   parameter names `layer_norm_weight` / `layer_norm_bias`, `config.layernorm_epsilon` and `config.normalization`;
   TE linears without bias hold an empty `bias` tensor where megatron's local ones hold None. The parameter names
   are mapped as megatron's local spec maps them for checkpoints (its `sharded_state_dict_keys_map`).
9. Fused torch optimizers (`set_fused`): without Transformer Engine or apex, megatron-core 0.16's
   `get_megatron_optimizer` builds torch's Adam/AdamW (or SGD) with neither `fused` nor `foreach`, and a
   state-dict load restores the flags a checkpoint was saved with; steerlm sets them from `optim.fused` on the
   torch optimizer each megatron optimizer holds (`.optimizer`, `chained_optimizers`).
10. Single-pass gradient scaling (`use_single_pass_scale`): without Transformer Engine or apex, megatron's
   gradient clipping and fp16/bf16 parameter copies call `megatron.core.utils.local_multi_tensor_scale`
   (`dst.copy_(src * scale)`: a temporary and a second pass per tensor) through the module-level name
   `multi_tensor_scale_impl` of `optimizer.clip_grads` and `optimizer.optimizer`; steerlm rebinds those names to
   a drop-in that multiplies into `dst` (the same products).
11. A linear layer's extra parameters in checkpoints (`extra_linear_sharded_state`): LoRA's adapters
   (`steerlm.models.lora`) are parameters of megatron's `ColumnParallelLinear` / `RowParallelLinear`, whose
   `sharded_state_dict` makes every parameter but `weight` / `bias` a replicated ShardedTensor. The layer gets an
   instance-level `sharded_state_dict` (megatron's modules call their children's by attribute) that adds the
   adapters' own: `transformer.utils.make_sharded_tensors_for_checkpoint` with a TP axis per tensor (reading the
   layer's `tp_group` and `metadata["dp_cp_group"]`) and, for SwiGLU's fc1, `transformer.mlp.
   apply_swiglu_sharded_factory`, which `MLP.sharded_state_dict` applies to fc1's weight and bias only.

Moving to megatron-core 0.17+ (it needs Python >= 3.12), the plan: build a Python 3.12 environment with the
new release, widen `SUPPORTED`, and run `pytest tests/test_megatron_compat.py` first — each item has a test
that fails naming it when the release changed what the item relies on (a renamed private attribute, a new
`_postprocess` or `core_attention` signature, a different fused-weight layout). Then items to re-read in the
new source, because a test cannot see them: (2) whether new `torch.cuda` calls appeared outside the patched
ones (run the CPU parity tests); (3) whether synchronous saves still go through a module-level results queue;
(7) whether the distributed optimizer still rebuilds torch Adam's `step` from its param groups (then the
item may be unnecessary).
Then the whole suite, and the GPU tests (`pytest -m gpu`) on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
import re
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import version as installed_version
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SUPPORTED = ((0, 16, 1), (0, 17, 0))  # [lowest, first unsupported)


def _parse(text: str) -> tuple[int, int, int]:
    parts = [int("".join(c for c in piece if c.isdigit()) or 0) for piece in text.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def check_megatron_version(found: str) -> None:
    """Refuse a megatron-core outside `SUPPORTED`, naming the installed and the supported versions."""
    low, high = SUPPORTED
    if not low <= _parse(found) < high:
        raise ImportError(
            f"steerlm supports megatron-core >={'.'.join(map(str, low))},<{'.'.join(map(str, high))}; "
            f"megatron-core {found} is installed. Fix: pip install 'megatron-core>={'.'.join(map(str, low))},"
            f"<{'.'.join(map(str, high))}' (steerlm.megatron_compat lists what a newer release changes)"
        )


check_megatron_version(installed_version("megatron-core"))

from megatron.core import tensor_parallel  # noqa: E402  (after the version check, which names the fix)
from megatron.core.dist_checkpointing.dict_utils import (  # noqa: E402
    dict_list_map_inplace,
    nested_items_iter,
)
from megatron.core.dist_checkpointing.mapping import (  # noqa: E402
    LocalNonpersistentObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

# --- 2. CPU stand-ins ------------------------------------------------------------------------------------

_active_mode: _CudaToCpuMode | None = None
MatmulRoute = Optional[tuple[Callable[..., bool], Callable[..., torch.Tensor]]]  # (routable, matmul): route_matmuls
_matmul_route: MatmulRoute = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Lets the CPU stand in for "the CUDA device" inside megatron-core.

    - `device="cuda"`, `.cuda()`, `.to("cuda")`, `.pin_memory()` → the CPU: replaces the hard-coded
      CUDA devices in the schedules (token counters), optimizer (found-inf / loss-scale buffers),
      grad clipping and `transformer.utils` masks.
    - `tensor.type()` names CPU tensors like CUDA ones ("torch.cuda.BFloat16Tensor"): megatron's
      mixed-precision optimizer and grad clipping accept parameters only by those names.
    - `torch.matmul` / `Tensor.matmul` → the route `route_matmuls` installed, for the products it accepts.
    """

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        if _matmul_route is not None and (func is torch.matmul or func is torch.Tensor.matmul) and not kwargs:
            routable, matmul = _matmul_route
            if len(args) == 2 and routable(*args):
                return matmul(*args)
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def route_matmuls(route: MatmulRoute) -> MatmulRoute:
    """Send `torch.matmul(a, b)` / `a.matmul(b)` calls that `routable(a, b)` accepts to `matmul(a, b)` while the
    stand-ins are active (`route=(routable, matmul)`; None: torch's own). Megatron's linear autograd function
    (`LinearWithGradAccumulationAndAsyncCommunication`) computes its three products with these calls — forward
    `input @ weight.t()`, backward `grad_output @ weight` and `grad_output.t() @ input` — so this is how
    steerlm picks the CPU's GEMM library for megatron's layers without copying that function. The backward's
    products are seen because megatron's schedules start the backward through `custom_backward`, the autograd
    engine directly: `Tensor.backward()` is itself a torch function, inside which the mode is off. Returns the
    route it replaces."""
    global _matmul_route
    previous, _matmul_route = _matmul_route, route
    return previous


def _current_device() -> str:
    """Replaces `torch.cuda.current_device()` (RotaryEmbedding, DDP buffers, p2p buffers)."""
    return "cpu"


def _synchronize(device: Any = None) -> None:
    """Replaces `torch.cuda.synchronize()` (p2p_communication after batch_isend_irecv): no stream to wait on."""


@functools.cache
def activate() -> None:
    """Install the CPU stand-ins for this process (idempotent). Call before building megatron modules."""
    global _active_mode
    # setattr: a deliberate monkeypatch whose return type ("cpu", a device string) is not torch's `int`
    setattr(torch.cuda, "current_device", _current_device)  # noqa: B010
    torch.cuda.synchronize = _synchronize
    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()


def thread_mode() -> contextlib.AbstractContextManager:
    """The stand-ins for another thread of this process: a TorchFunctionMode covers only the thread that
    entered it, so a thread that runs megatron code (a serving engine's) enters its own."""
    return _CudaToCpuMode() if _active_mode is not None else contextlib.nullcontext()


def lifted() -> contextlib.AbstractContextManager:
    """Runs a block without the stand-in mode (this thread): megatron's inference forward needs none of
    its redirections, and routing every op through a Python `__torch_function__` made CPU decoding ~3x
    slower (a 2-layer model: 3.6 → 1.1 ms per token)."""
    return torch._C.DisableTorchFunction() if _active_mode is not None else contextlib.nullcontext()


# --- 3. synchronous dist-checkpoint saves ---------------------------------------------------------------


@functools.cache
def use_in_process_save_queue() -> None:
    """Synchronous saves collect their writers' results through `filesystem_async._results_queue`, which
    megatron creates on first use with a `spawn` multiprocessing Manager: a new interpreter that re-imports
    `__main__` (~4 s per process, and a hang in scripts without a main guard). The writers it forks report
    through their own queue and only the saving process reads the module-level one, so an in-process queue is
    equivalent for the synchronous saves steerlm makes. Refuses to run (instead of silently doing nothing)
    when megatron no longer has the attribute."""
    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError(
            "megatron.core.dist_checkpointing.strategies.filesystem_async has no _results_queue: this "
            "megatron-core changed how synchronous saves collect results; update "
            "steerlm.megatron_compat.use_in_process_save_queue"
        )
    filesystem_async._results_queue = queue.Queue()


# --- 4. own output heads --------------------------------------------------------------------------------


class GPTModelWithOwnHead(GPTModel):
    """A GPTModel whose last pipeline stage returns `own_head(hidden_states)` instead of vocabulary logits.

    Overrides the private `GPTModel._postprocess(hidden_states, input_ids, position_ids, labels, …)`, which
    megatron's forward calls on every stage after the decoder; earlier stages pass `hidden_states` on.
    """

    def own_head(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[s, b, hidden]` (sequence-parallel split when that is on) → the model's output."""
        raise NotImplementedError

    def _postprocess(self, hidden_states, *args, **kwargs):
        if not self.post_process:
            return hidden_states
        return self.own_head(hidden_states)


class GPTModelWithLossHead(GPTModel):
    """A GPTModel whose last pipeline stage, given labels, returns `loss_head(hidden_states, labels)` (the
    per-token loss `[b, s]`, as megatron's own path returns it) instead of computing vocabulary logits first.
    Without labels (inference, logits) and with multi-token prediction megatron's `_postprocess` runs."""

    def loss_head(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`[s, b, hidden]` (sequence-parallel split when that is on) and `[b, s]` labels → `[b, s]` loss."""
        raise NotImplementedError

    def _postprocess(self, hidden_states, labels=None, **kwargs):
        if not self.post_process or labels is None or self.config.mtp_num_layers is not None:
            return super()._postprocess(hidden_states=hidden_states, labels=labels, **kwargs)
        return self.loss_head(hidden_states, labels)


# --- 5. SDPA core attention -----------------------------------------------------------------------------


class SDPACoreAttention(MegatronModule):
    """Core attention through `torch.nn.functional.scaled_dot_product_attention`, a drop-in for megatron's
    DotProductAttention with megatron-core's local layers (no Transformer Engine): SDPA picks flash /
    memory-efficient kernels on GPU and a fused CPU kernel otherwise, and handles grouped-query attention
    without materialising repeated key/value heads.

    query [sq, b, np, hn], key/value [sk, b, ng, hn] → context [sq, b, np * hn] (per TP rank). The
    constructor takes exactly the keywords `SelfAttention` passes to its `core_attention` submodule.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError(
                "SDPACoreAttention takes neither packed_seq_params nor attention_bias; "
                "use model.transformer_impl=transformer_engine for those"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        # Megatron masks are True where attention is forbidden; SDPA's boolean masks are True where allowed.
        sdpa_mask = None if attention_mask is None else ~attention_mask
        causal = sdpa_mask is None and mask_type == AttnMaskType.causal
        dropout_p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = grouped_sdpa(
                q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale
            )
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def grouped_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` over `[b, heads, s, hn]` queries and `[b, groups, s, hn]` keys/values, where
    heads is a multiple of groups (grouped-query attention).

    SDPA's `enable_gqa` stays in a fused kernel only where that kernel takes it: torch 2.13's CPU flash kernel does,
    torch 2.6's (pyproject's floor) does not, and on CUDA only the flash kernel does (not the memory-efficient or
    cuDNN ones, so not fp32). Elsewhere SDPA falls back to the math path, which materialises the `[b, heads, sq, sk]`
    probabilities for the backward and, on the tiny model's SFT shape, takes 1.5x the time of the fused kernel
    (fwd+bwd, torch 2.6, 1 CPU thread, 2026-12-03). There the key/value heads are repeated instead, so the fused
    kernel runs. torch's dispatcher decides (`torch._fused_sdp_choice`), once per configuration.
    """
    gqa = key.size(1) != query.size(1)
    if gqa and not _native_gqa_kept(query, key, value, attn_mask, dropout_p, is_causal, scale):
        key, value = _repeated_heads(query, key, value)
        gqa = False
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=gqa
    )


_NATIVE_GQA: dict[tuple, bool] = {}


def _native_gqa_kept(query, key, value, attn_mask, dropout_p, is_causal, scale) -> bool:
    """False where SDPA would run `enable_gqa` on the math path and repeated key/value heads in a fused kernel."""
    config = (
        query.device.type,
        query.dtype,
        query.size(1),
        key.size(1),
        query.size(-1),
        None if attn_mask is None else (attn_mask.dtype, attn_mask.dim()),
        is_causal,
        dropout_p > 0,
        torch.is_grad_enabled() and query.requires_grad,
    )
    if config not in _NATIVE_GQA:
        math_path = torch.nn.attention.SDPBackend.MATH.value

        def backend(k: torch.Tensor, v: torch.Tensor, gqa: bool) -> int:
            return torch._fused_sdp_choice(query, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=gqa)

        _NATIVE_GQA[config] = (
            backend(key, value, True) != math_path or backend(*_repeated_heads(query, key, value), False) == math_path
        )
    return _NATIVE_GQA[config]


def _repeated_heads(query, key, value) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value with each of their heads repeated for the query heads of its group."""
    repeats = query.size(1) // key.size(1)
    return key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)


# --- 6. weight layouts ----------------------------------------------------------------------------------


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Megatron's fused `linear_qkv` rows (dim 0) are grouped per query group: [the group's query heads, its
    key head, its value head] x groups. Returns (q `[heads*head_dim, …]`, k, v `[groups*head_dim, …]`) in
    head order, as HF's q_proj/k_proj/v_proj hold them. Works on weights and on activations whose dim 0 is
    that axis (use `movedim` first)."""
    per_group = heads // groups
    grouped = qkv.reshape(groups, per_group + 2, head_dim, *qkv.shape[1:])
    rest = qkv.shape[1:]
    return (
        grouped[:, :per_group].reshape(heads * head_dim, *rest),
        grouped[:, per_group].reshape(groups * head_dim, *rest),
        grouped[:, per_group + 1].reshape(groups * head_dim, *rest),
    )


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int) -> torch.Tensor:
    """The inverse of `split_qkv`: megatron's `linear_qkv` rows from separate q, k, v rows."""
    per_group = heads // groups
    rest = q.shape[1:]
    grouped = [
        q.reshape(groups, per_group, head_dim, *rest),
        k.reshape(groups, 1, head_dim, *rest),
        v.reshape(groups, 1, head_dim, *rest),
    ]
    return torch.cat(grouped, dim=1).reshape(groups * (per_group + 2) * head_dim, *rest)


def split_qkv_heads(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """`split_qkv` for activations: `linear_qkv`'s output `[..., groups*(heads/groups+2)*head_dim]` → views
    query `[..., heads, head_dim]`, key and value `[..., groups, head_dim]` (no copy but the query's reshape)."""
    per_group = heads // groups
    grouped = qkv.view(*qkv.shape[:-1], groups, per_group + 2, head_dim)
    query = grouped[..., :per_group, :].reshape(*qkv.shape[:-1], heads, head_dim)
    return query, grouped[..., per_group, :], grouped[..., per_group + 1, :]


def split_fc1(fc1: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU's `linear_fc1` stacks [gate; up] along its output axis (dim 0 of the weight, the last dim of the
    activation; per TP rank, each rank holding its slice of both)."""
    gate, up = torch.chunk(fc1, 2, dim=dim)
    return gate, up


# --- 7. distributed optimizer over torch's Adam -----------------------------------------------------------


def _distributed_over_torch_adam(optimizer) -> list:
    """The megatron DistributedOptimizers in `optimizer` (chained or not) that drive a torch Adam/AdamW (none
    when megatron runs Transformer Engine's or apex's fused Adam, which keep `step` in their param groups)."""
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return []
    return [
        part
        for part in getattr(optimizer, "chained_optimizers", [optimizer])
        if isinstance(part, distrib_optimizer.DistributedOptimizer)
        and isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # AdamW is no Adam before torch 2.6
    ]


def complete_torch_adam_state(optimizer) -> None:
    """Give every parameter of a distributed optimizer's torch Adam the state Adam creates at its first step
    (`step` 0, zero moments) where it has none yet — the same numbers, since Adam would create exactly these.
    Call before `optimizer.sharded_state_dict`: megatron's `DistributedOptimizer.state_dict` takes the one
    `step` value of the per-parameter states and fails on a run that has not stepped (always so when a
    checkpoint is being loaded into a fresh optimizer)."""
    for distributed in _distributed_over_torch_adam(optimizer):
        adam = distributed.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                state = adam.state[param]
                if not state:
                    state["step"] = _initial_step(group, param)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


@contextlib.contextmanager
def _step_left_out_of_parameter_loads(distributed) -> Any:
    """Wrap this DistributedOptimizer's `_set_main_param_and_optimizer_states` (private; called per parameter
    by every checkpoint format's load) so it copies the loaded master weight and moments but leaves torch
    Adam's `step` to `load_state_dict`, which sets it from the param groups."""
    original = distributed._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = distributed.model_param_group_index_map[model_param]
        state = distributed.optimizer.state[distributed.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    distributed._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del distributed._set_main_param_and_optimizer_states  # the class's method again


def is_distributed_optimizer(optimizer) -> bool:
    """Whether megatron's `optimizer` (chained or not) is a DistributedOptimizer."""
    from megatron.core.optimizer import distrib_optimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(part, distrib_optimizer.DistributedOptimizer) for part in parts)


def saved_by_distributed_optimizer(saved: dict) -> bool:
    """Whether a checkpoint's common optimizer state (`dist_checkpointing.load_common_state_dict(…)["optimizer"]`)
    is a DistributedOptimizer's: its `sharded_state_dict` records `param_state_sharding_type` (per part, when
    chained); a plain optimizer's holds torch's `state` and `param_groups`."""

    def records(state: Any) -> bool:
        return isinstance(state, dict) and (
            "param_state_sharding_type" in state or any(records(value) for value in state.values())
        )

    return records(saved)


_STATE_KEY = re.compile(r"^((?:chained_\d+\.)?optimizer\.state\.)([A-Za-z0-9_]+)\.(.+)$")


def _parts(state: Any, count: int) -> list:
    """One state dict per part of a (chained) optimizer: megatron stores a lone part's as the whole."""
    return [state] if count == 1 else [state[index] for index in range(count)]


def _torch_state(part: dict) -> dict:
    """The torch optimizer's state dict within a part's: mixed-precision and distributed optimizers keep it under
    `optimizer`, a plain fp32 one's is the part's own."""
    return part.get("optimizer", part)


def _master_key(part: dict, distributed: bool) -> str | None:
    """The state key of an optimizer's fp32 master weights in a checkpoint (`part`: one part's state dict): the
    distributed optimizer's `param`, a plain mixed-precision one's `fp32_param` (its parts hold `optimizer`); none
    for a plain fp32 one, whose master weights are the weights themselves."""
    if distributed:
        return "param"
    return "fp32_param" if "optimizer" in part else None


def _group_identity(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return tuple(group.get(key, group.get(f"pre_{key}")) for key in param_group_identifier_keys)


def _placement(item: Any) -> tuple:
    """Where a model parameter's sharded item lies in the checkpoint: its key and its offset (a factory, SwiGLU's
    fc1, holds the offset in its build function). An optimizer's item of that parameter keeps the placement under
    another key."""
    return (item.key, id(item.build_fn)) if isinstance(item, ShardedTensorFactory) else (item.key, item.global_offset)


def _saved_step(saved: dict) -> float:
    """The step of a checkpoint's torch optimizer state: in its param groups (the distributed optimizer's, or a
    Transformer Engine / apex fused Adam's), else a plain torch Adam's `state.common_step` (left out when 0)."""
    first = saved["param_groups"][0]
    return float(first["step"] if "step" in first else saved.get("state", {}).get("common_step", 0))


def _split(key: str) -> tuple[str, str, str]:
    """An optimizer item's key: its prefix, its state key (`exp_avg`, `param`, ...) and its parameter's key."""
    match = _STATE_KEY.match(key)
    if match is None:
        raise ValueError(f"unexpected optimizer state key {key!r}")
    return match.group(1), match.group(2), match.group(3)


def _in_fp32(item: Any) -> Any:
    """A model item that reads its tensor in fp32 (into a buffer of its own) whatever the parameter's dtype."""
    if item.data.dtype == torch.float32:
        return item
    buffer = torch.empty_like(item.data, dtype=torch.float32)
    if isinstance(item, ShardedTensorFactory):
        return replace(item, data=buffer)
    return replace(item, data=buffer, dtype=torch.float32)


class TranslatedLoad:
    """Reads a checkpoint whose optimizer state another kind of megatron optimizer or another precision laid out:
    distributed into plain or plain into distributed, fp32 into bf16 or back. A run can so switch
    `parallel.use_distributed_optimizer` or `precision.dtype` when it resumes, e.g. to the distributed optimizer
    when it moves to more data-parallel ranks to fit. megatron's own load of such a checkpoint fails on a missing
    key, or (plain bf16 into plain fp32) reads the bf16 weights instead of their fp32 master copy.

    Every layout stores each parameter's Adam moments at the parameter's full shape under the same keys. They
    differ in three places:
    - the fp32 master weights (`_master_key`): `optimizer.state.param.<p>` (distributed),
      `optimizer.state.fp32_param.<p>` (plain bf16), or none (plain fp32: the weights are the master weights). A
      run that keeps none reads its weights from the checkpoint's master weights; a run that keeps them, from a
      checkpoint that has none, reads them from its fp32 weights;
    - the step: in each param group (distributed, or a fused Adam's), or in `state.common_step` (plain torch Adam,
      which keeps a step per parameter);
    - where torch's param groups sit in the common state.

    `own` is this optimizer's sharded state dict for loading; `saved` the checkpoint's common optimizer state.
    `model` holds the model's sharded state dicts by their request keys: their items are redirected where the
    weights or the master weights come from the other. `request` lists what to read for `own`: its sharded items
    under the checkpoint's keys. `state` turns what was read into this optimizer's `load_state_dict` input."""

    def __init__(self, optimizer, own: dict, saved: dict, model: dict[str, dict]) -> None:
        self.parts = getattr(optimizer, "chained_optimizers", [optimizer])
        self.count = len(self.parts)
        self.distributed = is_distributed_optimizer(optimizer)
        self.own, self.saved = own, saved
        self.ours_master = _master_key(_parts(own, self.count)[0], self.distributed)
        self.saved_master = _master_key(_parts(saved, self.count)[0], saved_by_distributed_optimizer(saved))
        self.read: list[tuple[dict | list, Any]] = []  # where in `own` each requested item's value goes
        self.from_weights: list[tuple[dict | list, Any, str, str]] = []  # …and each value read as a model weight's
        self.request: list = []
        trained: dict[tuple, str] = {}  # a trained parameter's placement → its optimizer items' key prefix
        weights = {
            _placement(item): (key, name)
            for key, state in model.items()
            for name, item in state.items()
            if isinstance(item, (ShardedTensor, ShardedTensorFactory))
        }
        for container, slot, item in nested_items_iter(own):
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)):
                continue
            prefix, state_key, param = _split(item.key)
            trained[(param, _placement(item)[1])] = prefix
            if state_key == self.ours_master:
                if self.saved_master is None:  # the checkpoint's fp32 weights are its master weights
                    key, name = weights[(param, _placement(item)[1])]
                    model[key][name] = _in_fp32(model[key][name])
                    self.from_weights.append((container, slot, key, name))
                    continue
                state_key = self.saved_master
            self.read.append((container, slot))
            self.request.append(replace(item, key=f"{prefix}{state_key}.{param}"))
        if self.ours_master is None and self.saved_master is not None:  # the weights from the master weights
            for placement, prefix in trained.items():
                key, name = weights[placement]
                model[key][name] = replace(model[key][name], key=f"{prefix}{self.saved_master}.{placement[0]}")

    def describe(self) -> str:
        """Both layouts, for the log: the kinds and where each keeps its fp32 master weights."""

        def layout(distributed: bool, master: str | None) -> str:
            kind = "the distributed optimizer" if distributed else "a plain optimizer"
            return f"{kind} ({f'master weights in {master}' if master else 'the weights as master weights'})"

        saved = layout(saved_by_distributed_optimizer(self.saved), self.saved_master)
        return f"saved by {saved}, read into {layout(self.distributed, self.ours_master)}"

    @staticmethod
    def needed(optimizer, own: dict, saved: dict) -> bool:
        """Whether the checkpoint's optimizer state (`saved`, its common part) is laid out otherwise than this
        optimizer's (`own`, its sharded state dict): another kind, or the master weights elsewhere."""
        count = len(getattr(optimizer, "chained_optimizers", [optimizer]))
        ours, theirs = is_distributed_optimizer(optimizer), saved_by_distributed_optimizer(saved)
        masters = _master_key(_parts(own, count)[0], ours), _master_key(_parts(saved, count)[0], theirs)
        return ours != theirs or masters[0] != masters[1]

    def state(self, loaded: dict, read: list) -> dict:
        """This optimizer's `load_state_dict` input from the tensors `request` read (`read`) and the model's loaded
        state dicts (`loaded`, by request key)."""
        for (container, slot), value in zip(self.read, read, strict=True):
            container[slot] = value
        for container, slot, key, name in self.from_weights:
            container[slot] = loaded[key][name].detach().clone()
        dict_list_map_inplace(lambda x: x.unwrap() if isinstance(x, LocalNonpersistentObject) else x, self.own)
        for part, own, saved in zip(self.parts, _parts(self.own, self.count), _parts(self.saved, self.count)):
            own_torch, saved_torch = _torch_state(own), _torch_state(saved)
            step = _saved_step(saved_torch)
            per_parameter = isinstance(part.optimizer, (torch.optim.Adam, torch.optim.AdamW))  # not a fused Adam
            groups = {_group_identity(group): group for group in saved_torch["param_groups"]}
            own_groups = []
            for group in own_torch["param_groups"]:
                if _group_identity(group) not in groups:
                    raise ValueError(f"the checkpoint's optimizer has no param group {_group_identity(group)}")
                ours = {key: value for key, value in groups[_group_identity(group)].items() if key != "step"}
                if not self.distributed:
                    ours["params"] = group["params"]
                if self.distributed or not per_parameter:
                    ours["step"] = step if per_parameter else int(step)
                own_groups.append(ours)
            own_torch["param_groups"] = own_groups
            if not self.distributed and per_parameter:
                own_torch["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
            if "grad_scaler" in saved:
                own["grad_scaler"] = saved["grad_scaler"]
        return self.own


def load_optimizer_state(optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)` (any megatron optimizer), made to work for distributed optimizers
    over torch Adam: the per-parameter loads leave `step` alone, and afterwards every parameter gets its own
    `step` tensor — torch Adam increments each in place, so the one tensor megatron shares would advance once
    per parameter per step and change every later bias correction."""
    distributed = _distributed_over_torch_adam(optimizer)
    with contextlib.ExitStack() as stack:
        for part in distributed:
            stack.enter_context(_step_left_out_of_parameter_loads(part))
        optimizer.load_state_dict(state)
    for part in distributed:
        for param_state in part.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = param_state["step"].clone()
    for torch_optimizer in _torch_optimizers(optimizer):  # the configured kernels, not the checkpoint's
        _set_fused(torch_optimizer, bool(torch_optimizer.defaults.get("fused")))


def _step_device(group: dict, param: torch.Tensor) -> torch.device:
    """Where torch Adam keeps a parameter's `step`: on the parameter's device for the fused (and capturable)
    kernels, on the CPU otherwise."""
    return param.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def _initial_step(group: dict, param: torch.Tensor) -> torch.Tensor:
    """The `step` torch Adam creates at a parameter's first step."""
    return torch.zeros((), dtype=torch.float32, device=_step_device(group, param))


# --- 8. Transformer Engine layers -----------------------------------------------------------------------


def fused_norm_parameters(linear: torch.nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]] | None:
    """(weight, bias or None) of the norm a TE `LayerNormLinear` (megatron's `TELayerNormColumnParallelLinear`:
    `linear_qkv`, `linear_fc1` under the TE spec) applies to its input before its matrix product; None for a
    linear without a fused norm (megatron's local layers, whose norms are the layer's own modules)."""
    weight = getattr(linear, "layer_norm_weight", None)
    if weight is None:
        return None
    return weight, getattr(linear, "layer_norm_bias", None)


def linear_bias(linear: torch.nn.Module) -> Optional[torch.Tensor]:
    """A linear layer's bias, or None without one (TE keeps an empty tensor there, megatron's local layers None)."""
    bias = getattr(linear, "bias", None)
    return None if bias is None or bias.numel() == 0 else bias


# The local layer spec's own names of the norms TE fuses (the reverse of its `sharded_state_dict_keys_map`).
_FUSED_NORM_PREFIXES = {
    "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
    "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
}


def unfused_norm_name(name: str) -> str:
    """A parameter name under the TE spec → its name under megatron's local spec (`….self_attention.linear_qkv.
    layer_norm_weight` → `….input_layernorm.weight`); other names unchanged. One model, one set of names, for
    every place that keys parameters by name (initialisation, HF export, parity)."""
    for fused, own in _FUSED_NORM_PREFIXES.items():
        if f".{fused}" in name:
            return name.replace(fused, own, 1)
    return name


# --- 9. fused torch optimizers ----------------------------------------------------------------------------

_FUSABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers megatron's optimizer (chained or not) drives, where torch has a fused kernel for them
    (not Transformer Engine's or apex's FusedAdam, fused already)."""
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [part.optimizer for part in parts if isinstance(part.optimizer, _FUSABLE)]


def _set_fused(torch_optimizer: torch.optim.Optimizer, fused: bool) -> None:
    for group in [torch_optimizer.defaults, *torch_optimizer.param_groups]:
        group["fused"] = fused
        group["foreach"] = False if fused else None  # torch refuses both; None: torch's own choice
    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            state = torch_optimizer.state.get(param)
            if state and "step" in state:  # where the kernel now in use keeps it
                state["step"] = state["step"].to(_step_device(group, param), torch.float32)


def set_fused(optimizer, fused: bool) -> None:
    """Run the torch optimizers inside megatron's `optimizer` with torch's fused kernels (`fused`) or its
    default ones. Fused Adam makes one pass over parameters, gradients and moments
    where the default makes several (52M parameters, 2 CPU cores: 40 instead of 242 ms a step) and is HF
    Trainer's default (`adamw_torch_fused`); its numbers differ from the default's in the last bits. Set
    again after every state-dict load (`load_optimizer_state`), which would restore the checkpoint's flags."""
    for torch_optimizer in _torch_optimizers(optimizer):
        _set_fused(torch_optimizer, fused)


# --- 10. single-pass gradient scaling -----------------------------------------------------------------------


def _multi_tensor_scale(chunk_size: int, noop_flag: torch.Tensor, tensor_lists: list, scale: float) -> None:
    """`local_multi_tensor_scale`'s contract (dst = src * scale, pairwise), the product written into `dst` where
    the dtypes agree; a dtype-changing copy (fp32 master weights into bf16 ones) goes megatron's way."""
    for src, dst in zip(tensor_lists[0], tensor_lists[1]):
        if src.dtype == dst.dtype:
            torch.mul(src, scale, out=dst)
        else:
            dst.copy_(src * scale)


@functools.cache
def use_single_pass_scale() -> None:
    """Rebind megatron's local `multi_tensor_scale` fallback (idempotent; leaves TE's or apex's kernel alone).
    The `small` preset's fp32 training step on 2 CPU cores: 1397 → 1358 ms (docs/performance.md)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as base

    for module in (clip_grads, base):
        if module.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
            module.multi_tensor_scale_impl = _multi_tensor_scale


# --- 11. a linear layer's extra parameters in checkpoints ---------------------------------------------------


def extra_linear_sharded_state(
    linear: Any,
    tensors: dict[str, torch.Tensor],
    axes: dict[str, int],
    swiglu: tuple[str, ...],
    prefix: str,
    sharded_offsets: tuple,
    metadata: dict | None,
) -> dict:
    """`linear`'s own sharded state plus ShardedTensors for `tensors` (parameters it holds beside its weight): split
    over the TP group along `axes[name]`, replicated when a name has no axis, the names in `swiglu` laid out as
    megatron lays out SwiGLU's fc1 ([gate; up] whatever the TP size), so they load at any layout."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = type(linear).sharded_state_dict(linear, prefix, sharded_offsets, metadata)
    extra = make_sharded_tensors_for_checkpoint(
        tensors,
        prefix,
        axes,
        sharded_offsets,
        tp_group=linear.tp_group,
        dp_cp_group=(metadata or {}).get("dp_cp_group"),
    )
    for name in swiglu:
        extra[f"{prefix}{name}"] = apply_swiglu_sharded_factory(extra[f"{prefix}{name}"], sharded_offsets)
    state.update(extra)
    return state
