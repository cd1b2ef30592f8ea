"""Bytes of tensor memory a block of code allocates, at its peak: `with PeakMeter() as meter: …`.

CPU tensors carry no allocator statistics, so the meter watches every operator's outputs (a `TorchDispatchMode`):
a storage first seen as an output counts its bytes until the last tensor viewing it is collected (a weak-reference
finalizer per tensor). Tensors that existed before (parameters, a cache built earlier) count only when an operator
makes a new storage; views of them and in-place writes into them do not. Exact under `torch.inference_mode` /
`no_grad` (no autograd graph keeping tensors alive unseen); used by the tests of the decoders' cache handling and
of the generation memory estimate (`launchers/generation_memory.py`).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakMeter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage address → [bytes, tensors viewing it]
        self.current = 0  # bytes of the storages made inside the block and still alive
        self.peak = 0

    def reset_peak(self) -> None:
        """Start a new peak from what is alive now."""
        self.peak = self.current

    def _release(self, address: int) -> None:
        entry = self.live.get(address)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[address]
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = tree_flatten((args, kwargs))[0]
        inputs = {t.untyped_storage().data_ptr() for t in given if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            address = storage.data_ptr()
            entry = self.live.get(address)
            if entry is None:
                if address == 0 or address in inputs:  # empty, or a view of / write into a tensor made before
                    continue
                entry = self.live[address] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(tensor, self._release, address)
        return out
