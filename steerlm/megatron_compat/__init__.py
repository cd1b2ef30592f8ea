"""Everything steerlm does that depends on megatron-core internals, private names or unwritten contracts.

A megatron-core upgrade starts here: every item below names what it replaces or relies on, and
`tests/test_megatron_compat.py` (items 13-15, the layers megatron lacks: `tests/test_megatron_compat_layers.py`)
checks each one against the installed megatron-core. No other steerlm module
patches megatron, overrides a private method or reads a private attribute. Items 7 and 9, the optimizers' state
and kernels, live in `steerlm/megatron_compat/optimizers.py`, item 12 in `async_writes.py`, item 13 in
`scaled_rope.py`, item 14 in `scaled_embedding.py`, item 15 in `gemma2.py`; this module re-exports what the rest of
steerlm uses.

0. Import cost (`steerlm/_import_hooks.py`, installed by `steerlm/__init__.py` because it must act before the
   first `import megatron.core`): megatron's `torch.compile` wrappers (`megatron.core.jit.jit_fuser`) are built
   at their first call instead of at import, which spares every process importing `torch._dynamo`/`_inductor`.
1. Supported range (`SUPPORTED`): checked when this module is imported, with the fix in the message.
2. CPU stand-ins (`activate`, `thread_mode`, `lifted`): megatron-core assumes CUDA in a handful of places;
   `steerlm.runtime` activates them only when CUDA is absent. Measured needs: docs/architecture.md. The same
   mode routes matrix products (`route_matmuls`): megatron's linear autograd function multiplies with
   `torch.matmul` / `Tensor.matmul` (forward `input @ weight.t()`, backward `grad_output @ weight` and
   `grad_output.t() @ input`), which `steerlm.runtime.cpu_matmul` sends to oneDNN. Layer recomputation's
   checkpoint (`tensor_parallel.random.CheckpointFunction`, `model.recompute`) saves and restores the device RNG
   state through the module-level `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state`: without
   CUDA there is none, so they hand over an empty state and restore nothing (the CPU generator, which dropout
   draws from there, is saved and restored beside it by the same function).
3. Synchronous dist-checkpoint saves (`use_in_process_save_queue`): replaces the module-level
   `filesystem_async._results_queue` (a `spawn` multiprocessing Manager queue) by an in-process queue.
4. Own output heads (`GPTModelWithOwnHead`, `GPTModelWithLossHead`): override the private
   `GPTModel._postprocess`, which megatron's forward calls with keywords (`hidden_states`, `labels`, …).
5. SDPA core attention (`SDPACoreAttention`): honours the constructor and forward contract megatron's
   `SelfAttention` uses for `core_attention` submodules (DotProductAttention's signature). Its grouped-query
   attention (`grouped_sdpa`, also the lean decoders') asks torch's private `torch._fused_sdp_choice` which kernel
   SDPA would pick. Sliding windows (`model.sliding_window`) ride on megatron's `window_size` / `window_attn_skip_freq`
   and its `transformer.utils.is_layer_window_attention`, which decides for its own attention which layers slide.
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
12. Asynchronous checkpoint writes (`AsyncShardWrite`, `checkpoint.async_save`): megatron's `async_sharded_save`
   request run by its non-persistent `AsyncCallsQueue` (a forked process), its results handed back through a file
   instead of the module-level results queue of item 3. Relies on the request's fields, the shape of its
   `async_fn_args` and `AsyncCallsQueue.async_calls` (details in `async_writes.py`).
13. RoPE scalings megatron lacks, LongRoPE and transformers' YaRN (`scaled_rope.py`, `model.rope_short_factor` …,
   `model.rope_yarn_factor`), and linear scaling with transformers' roundings (`model.rope_linear_factor`): a built
   GPTModel's `rotary_pos_emb` is replaced by a
   `RotaryEmbedding` subclass overriding `forward(max_seq_len, offset, packed_seq, cp_group)` (what GPTModel calls
   with the forward's rotary length), and the attention factor rides on the module-level
   `transformer.attention._yarn_get_concentration_factor_from_config`, through which megatron's self-attention
   scales RoPE's cos/sin (YaRN's mscale), rebound to read a steerlm attribute of the TransformerConfig first.
   Gemma 3's local RoPE (`model.rope_local_base_freq`, `use_local_rope`): a forward pre-hook on each sliding-window
   layer replaces the `rotary_pos_emb` keyword megatron's TransformerBlock hands every layer by a second table.
14. Scaled input embeddings (`scaled_embedding.py`, `model.apply_embedding_scaling`: Gemma's sqrt(hidden_size)): a
   forward hook on GPTModel's `embedding` (megatron's `LanguageModelEmbedding`) multiplies its output; relies on the
   attribute's name and on that output being the word embeddings after steps linear in them.
15. Gemma 2's layers (`gemma2.py`, `model.post_sublayer_norms`, `model.attn_logit_softcapping`,
   `model.final_logit_softcapping`): norms of each sublayer's output as children of megatron's TransformerLayer with
   forward hooks on its `self_attention` and `mlp` (relying on their `(output, bias)` contract and on the layer's
   `sharded_state_dict` taking every child's parameters), item 5's core attention with soft-capped scores (the cap a
   steerlm attribute of the TransformerConfig), and a forward hook on GPTModel's `output_layer` capping the logits.

Moving to megatron-core 0.17+ (it needs Python >= 3.12), the plan: build a Python 3.12 environment with the
new release, widen `SUPPORTED`, and run `pytest tests/test_megatron_compat.py tests/test_megatron_compat_layers.py`
first — each item has a test that fails naming it when the release changed what the item relies on (a renamed
private attribute, a new `_postprocess` or `core_attention` signature, a different fused-weight layout). Then items
to re-read in the new source, because a test cannot see them: (2) whether new `torch.cuda` calls appeared outside the
patched ones (run the CPU parity tests); (3) whether synchronous saves still go through a module-level results queue;
(7) whether the distributed optimizer still rebuilds torch Adam's `step` from its param groups (then the
item may be unnecessary).
Then the whole suite, and the GPU tests (`pytest -m gpu`) on a CUDA machine.
"""

from __future__ import annotations

import contextlib
import functools
import math
import queue
from collections.abc import Callable
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
from megatron.core.dist_checkpointing.strategies import filesystem_async  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402
from megatron.core.transformer.utils import is_layer_window_attention  # noqa: E402

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


def _no_device_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Replaces megatron's `_get_cuda_rng_state` (recomputation's checkpoint): no device, no device RNG state."""
    return torch.empty(0, dtype=torch.uint8)


def _restore_no_device_rng_state(*args: Any, **kwargs: Any) -> None:
    """Replaces megatron's `_set_cuda_rng_state`: nothing to restore without a device."""


@functools.cache
def activate() -> None:
    """Install the CPU stand-ins for this process (idempotent). Call before building megatron modules."""
    global _active_mode
    # setattr: a deliberate monkeypatch whose return type ("cpu", a device string) is not torch's `int`
    setattr(torch.cuda, "current_device", _current_device)  # noqa: B010
    torch.cuda.synchronize = _synchronize
    tensor_parallel.random._get_cuda_rng_state = _no_device_rng_state
    tensor_parallel.random._set_cuda_rng_state = _restore_no_device_rng_state
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
        # the positions a query of this layer sees (itself included; megatron's window counts those before it), None
        # for every position: megatron's own attention decides which layers slide the same way
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window = config.window_size[0] + 1 if windowed and config.window_size is not None else None

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
        if self.window is not None:  # causal within the window, the queries the last of the keys (a decode step's)
            window = sliding_window_mask(q.size(2), k.size(2), self.window, q.device)
            sdpa_mask, causal = window if sdpa_mask is None else sdpa_mask & window, False
        dropout_p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork():
            context = self.attend(q, k, v, sdpa_mask, dropout_p, causal)
        sq, b = query.size(0), query.size(1)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)

    def attend(self, q, k, v, mask: Optional[torch.Tensor], dropout_p: float, causal: bool) -> torch.Tensor:
        """`[b, heads, s, hn]` queries, `[b, groups, s, hn]` keys and values, SDPA's mask → `[b, heads, s, hn]`."""
        return grouped_sdpa(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale)


def sliding_window_mask(queries: int, keys: int, window: int, device: torch.device) -> torch.Tensor:
    """`[queries, keys]`, True where the query (the last `queries` of the `keys` positions) may attend: causally, to the
    `window` positions up to its own."""
    query = torch.arange(keys - queries, keys, device=device)[:, None]
    key = torch.arange(keys, device=device)[None]
    return (key <= query) & (query - key < window)


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
    kernel runs. torch's dispatcher decides (`torch._fused_sdp_choice`), once per configuration. With a mask (a
    decode step, a prefill chunk after the first) the query heads of each group may be folded into its positions
    instead (`_folded_groups`), which repeats nothing of the keys and values and holds the mask tiled: whichever
    holds less is taken. On CUDA that is a decode step's case in every configuration, since masked attention runs
    in the memory-efficient kernel, which takes no grouped heads.
    """
    gqa = key.size(1) != query.size(1)
    if gqa and not _native_gqa_kept(query, key, value, attn_mask, dropout_p, is_causal, scale):
        if _folding_holds_less(key, attn_mask, is_causal):
            return _folded_groups(query, key, value, attn_mask, dropout_p, scale)
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


def _folding_holds_less(key, attn_mask, is_causal: bool) -> bool:
    """Whether `_folded_groups` applies (a mask, no causal flag, one mask for every head) and its tiled mask holds
    fewer bytes than the keys and values repeated to every query head."""
    if attn_mask is None or is_causal or (attn_mask.dim() > 2 and attn_mask.size(-3) != 1):
        return False
    # both sides are tiled heads/groups times: the mask along the query positions, the keys and values along heads
    return attn_mask.numel() * attn_mask.element_size() < 2 * key.numel() * key.element_size()


def _folded_groups(query, key, value, attn_mask, dropout_p: float, scale) -> torch.Tensor:
    """Attention of `[b, heads, sq, hn]` queries over `[b, groups, sk, hn]` keys and values, each group's query heads
    folded into its query positions (`[b, groups, heads/groups x sq, hn]`: the heads of a group are adjacent) and
    the mask tiled to match. Exact: every query row attends to the same keys under the same mask."""
    batch, heads, positions, dim = query.shape
    groups = key.size(1)
    repeats = heads // groups
    folded = query.reshape(batch, groups, repeats * positions, dim)
    mask = attn_mask.repeat(*([1] * (attn_mask.dim() - 2)), repeats, 1)  # [..., heads/groups x sq, sk]
    out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.reshape(batch, heads, positions, dim)


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


# --- 7., 9. and 12.: optimizer state and kernels, asynchronous checkpoint writes, in their own modules --------

from steerlm.megatron_compat.async_writes import AsyncShardWrite  # noqa: E402
from steerlm.megatron_compat.optimizers import (  # noqa: E402  (after the version check, as every megatron import)
    TranslatedLoad,
    complete_torch_adam_state,
    is_distributed_optimizer,
    load_optimizer_state,
    saved_by_distributed_optimizer,
    set_fused,
)

__all__ = [
    "AsyncShardWrite",
    "TranslatedLoad",
    "complete_torch_adam_state",
    "is_distributed_optimizer",
    "load_optimizer_state",
    "saved_by_distributed_optimizer",
    "set_fused",
]
