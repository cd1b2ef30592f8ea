"""MKL's strict conditional numerical reproducibility for steerlm's CPU processes (`parallel.cpu_reproducible`).

torch's x86 CPU wheels compute fp32 matrix products with MKL, whose default code paths split long reductions
over the threads it has: the same product at one and at two threads differs in its last digits wherever the
reduction is long (a 256 x 4,096 by 4,096 x 256 product on an Intel Xeon, `tests/test_mkl.py`), and a weight
gradient reduces over every token of a micro-batch. So a stage whose thread share grows mid-run (the pipeline
hands a finished stage's cores to the ones still running), a job resumed on a machine with another core count,
or one pipeline stage against the same command run alone, drift apart. MKL's conditional numerical
reproducibility in strict mode (`MKL_CBWR=AUTO,STRICT`: the CPU's own code branch, a summation order fixed
whatever the thread count and memory alignment, for its matrix products) makes those bitwise equal. Measured on
2 cores of an Intel Xeon (docs/performance.md): the training step and batched decoding as fast as without it,
decoding one row at a time ~45 % slower — so the chat and serve recipes leave it off.

MKL reads the variable once, at its first call in the process; `request` therefore runs before anything
multiplies a matrix (`runtime.initialize`), and child processes (torchrun's workers, the pipeline's stages)
inherit it. A MKL_CBWR the user set is left as it is. oneDNN's products (`parallel.cpu_matmul`) already do not
depend on the thread count; CUDA runs are untouched.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

VARIABLE = "MKL_CBWR"
STRICT = "AUTO,STRICT"
_ALL = -1  # MKL_CBWR_ALL: the whole mode word from mkl_cbwr_get
_STRICT_BIT = 0x10000  # MKL_CBWR_STRICT


def mode() -> Optional[int]:
    """MKL's reproducibility mode in this process (`mkl_cbwr_get(MKL_CBWR_ALL)`, read through the symbol torch's
    x86 wheels export from their statically linked MKL), or None where torch has no MKL (ARM, other BLAS).
    The first MKL call of a process reads MKL_CBWR, so calling this fixes the mode."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get = library.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    return int(get(_ALL))


def is_strict(value: Optional[int]) -> bool:
    return value is not None and bool(value & _STRICT_BIT)


def request(strict: bool) -> str:
    """Set MKL_CBWR=AUTO,STRICT for this process and its children when `strict` and the user set none; returns a
    line for the log saying which mode is in effect. A process whose MKL already ran (a notebook, a test session)
    keeps the mode it started with: a warning naming the fix when strict mode was asked for and is not in effect."""
    if strict:
        os.environ.setdefault(VARIABLE, STRICT)
    value = mode()
    if value is None:
        return "MKL's reproducibility mode unknown (this torch has no MKL, or does not export mkl_cbwr_get)"
    where = f"{VARIABLE}={os.environ[VARIABLE]}" if VARIABLE in os.environ else "MKL's default"
    asked = "STRICT" in os.environ.get(VARIABLE, "").upper()
    if asked and not is_strict(value):
        log.warning(
            "%s is set but MKL's products are not in strict reproducibility mode (mode %#x): MKL had already run "
            "in this process, so its products may depend on the thread count. Set %s=%s before starting Python "
            "(or parallel.cpu_reproducible=false to go without)",
            where,
            value,
            VARIABLE,
            STRICT,
        )
    if is_strict(value):
        return f"MKL strict reproducibility ({where})"
    return f"MKL without strict reproducibility ({where}): products may depend on the thread count"
