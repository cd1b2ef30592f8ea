"""The one place that lets megatron-core 0.16.x run on CPU (gloo). Nothing else knows about CPU.

megatron-core assumes CUDA in a handful of places; each patch below replaces exactly one such
assumption and says which. `activate()` is called by `steerlm.runtime` only when CUDA is absent and
is idempotent. Measured needs and traps: shared/notes/megatron-core-cpu.md.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

_CUDA_NAMES = ("cuda",)
_active_mode: "_CudaToCpuMode | None" = None

def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] in _CUDA_NAMES
    return isinstance(device, int) and not isinstance(device, bool)

class _CudaToCpuMode(TorchFunctionMode):
    """Redirects `device="cuda"` (and `.cuda()`, `.to("cuda")`, `.pin_memory()`) to the CPU.

    Replaces the hard-coded CUDA devices in megatron-core's schedules (token counters), optimizer
    (found-inf / loss-scale buffers), grad clipping and `transformer.utils` masks.
    """

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)

def _current_device() -> str:
    """Replaces `torch.cuda.current_device()` (RotaryEmbedding, DDP buffers, p2p buffers)."""
    return "cpu"

def _synchronize(device: Any = None) -> None:
    """Replaces `torch.cuda.synchronize()` (p2p_communication after batch_isend_irecv): no stream to wait on."""

def _clip_grad_by_total_norm_fp32(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False):
    """Replaces megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32.

    The original asserts `torch.cuda.FloatTensor` grads and scales through apex's multi-tensor
    kernel; the norm itself (get_grad_norm_fp32) is device-agnostic and stays megatron's.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.mul_(clip_coeff)

def _patch_megatron() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    # Imported by value into the optimizer module, so both names are replaced.
    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32

@functools.lru_cache(maxsize=None)
def activate() -> None:
    """Install the CPU stand-ins for this process. Call before building megatron modules."""
    global _active_mode
    torch.cuda.current_device = _current_device
    torch.cuda.synchronize = _synchronize
    _patch_megatron()
    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()
