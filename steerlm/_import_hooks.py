"""Makes `import megatron.core` ~2.5 s cheaper per process without changing what megatron runs.

megatron-core decorates its fused kernels with `torch.compile` when its package is imported (`megatron.core.jit`:
`jit_fuser = torch.compile`, applied in `megatron.core.fusions.*`). Building those wrappers imports
`torch._dynamo` and `torch._inductor` (measured 2026-12-01 on 2 CPU cores: `import megatron.core` 4.5 s, 1.9 s
without them), paid by every recipe process and every torchrun rank, also on CPU and in runs that never call a
fused kernel. While megatron-core's package imports, `torch.compile(fn)` is replaced by a wrapper that calls the
real `torch.compile(fn)` on its first call: `torch.compile` itself only compiles at the first call, so the
kernels compile exactly when they did before. `torch.compile` is restored as soon as the import returns.

`steerlm/__init__.py` installs the hook; it acts once, on the first import of `megatron.core` in the process.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

PACKAGE = "megatron.core"


def lazy_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A `torch.compile` stand-in: `compile(fn, **options)` (or `compile(**options)(fn)`) returns a wrapper that
    calls `real(fn, **options)` when first called and the compiled function from then on."""

    def compile_later(fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        if fn is None:
            return lambda f: compile_later(f, **options)
        compiled: Callable[..., Any] | None = None

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            nonlocal compiled
            if compiled is None:
                compiled = real(fn, **options)
            return compiled(*args, **kwargs)

        return wrapper

    return compile_later


class _LazyCompileLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        import torch

        real = torch.compile
        torch.compile = lazy_compile(real)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


class LazyCompileFinder(importlib.abc.MetaPathFinder):
    """Finds `megatron.core` as the other finders do and wraps its loader; removes itself after."""

    def find_spec(self, name: str, path: Any = None, target: ModuleType | None = None) -> Any:
        if name != PACKAGE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _LazyCompileLoader(spec.loader)
        return spec


def install() -> None:
    if PACKAGE not in sys.modules and not any(isinstance(f, LazyCompileFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LazyCompileFinder())
