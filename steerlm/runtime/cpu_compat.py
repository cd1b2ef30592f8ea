"""The one place that lets megatron-core 0.16.x run on CPU (gloo). Nothing else knows about CPU.

megatron-core assumes CUDA in a handful of places; each patch below replaces exactly one such
assumption and says which. `activate()` is called by `steerlm.runtime` only when CUDA is absent and
is idempotent. Measured needs and traps: shared/notes/megatron-core-cpu.md.
"""

from __future__ import annotations

import contextlib
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
    """Lets the CPU stand in for "the CUDA device" inside megatron-core.

    - `device="cuda"`, `.cuda()`, `.to("cuda")`, `.pin_memory()` → the CPU: replaces the hard-coded
      CUDA devices in the schedules (token counters), optimizer (found-inf / loss-scale buffers),
      grad clipping and `transformer.utils` masks.
    - `tensor.type()` names CPU tensors like CUDA ones ("torch.cuda.BFloat16Tensor"): megatron's
      mixed-precision optimizer and grad clipping accept parameters only by those names.
    """

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
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

def _current_device() -> str:
    """Replaces `torch.cuda.current_device()` (RotaryEmbedding, DDP buffers, p2p buffers)."""
    return "cpu"

def _synchronize(device: Any = None) -> None:
    """Replaces `torch.cuda.synchronize()` (p2p_communication after batch_isend_irecv): no stream to wait on."""

@functools.lru_cache(maxsize=None)
def activate() -> None:
    """Install the CPU stand-ins for this process. Call before building megatron modules."""
    global _active_mode
    torch.cuda.current_device = _current_device
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
