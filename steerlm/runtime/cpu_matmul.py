"""fp32 matrix products of megatron's linear layers on the CPU through oneDNN instead of torch's BLAS.

torch's x86 CPU wheels run fp32 `torch.matmul` through MKL, whose kernels dispatch by CPU vendor: on AMD
processors MKL 2024 takes its AVX2 path even where the core has AVX-512 (measured on an AMD EPYC, one thread:
58–89 GFLOP/s, about the AVX2 limit). oneDNN, also in every x86 wheel, picks its kernels from the instruction
set: 122–206 GFLOP/s on the same shapes, both in IEEE fp32 (docs/performance.md). `auto` therefore routes to
oneDNN on AMD x86 CPUs and leaves other CPUs on BLAS, where no gain was measured.

What is routed: through the CPU stand-in mode of `steerlm.megatron_compat`, which sees megatron's
`torch.matmul` calls, products of an fp32 CPU tensor with a 2-D fp32 weight-shaped tensor outside autograd —
the forward, input-gradient and weight-gradient products inside megatron's linear autograd function and
steerlm's chunked loss; through `linear`, the lean decoders' larger products. A product autograd would have to
differentiate stays on BLAS: oneDNN's op has no derivative. Results are IEEE fp32 with another summation order
than BLAS (last-digit differences) and do not depend on the thread count.
"""

from __future__ import annotations

import logging
import math
import platform
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from steerlm import megatron_compat
from steerlm.config.schema import CpuMatmul
from steerlm.errors import ConfigError

log = logging.getLogger(__name__)

ONEDNN_MIN_MACS = 1 << 21  # `linear`: smaller products stay on BLAS (measured per shape, docs/performance.md)
_installed = False  # what `install` chose for this process


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN's inner product (`torch.ops.mkldnn._linear_pointwise`, the op inductor
    emits for CPU linears); takes strided views, keeps x's leading dimensions."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _linear_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a routed product for `torch.utils.flop_counter.FlopCounterMode`, as it counts `aten.mm`."""
    return 2 * math.prod(x_shape[:-1]) * weight_shape[0] * weight_shape[1]


if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # absent from torch builds without oneDNN: `install` says so
    register_flop_formula(torch.ops.mkldnn._linear_pointwise)(_linear_flops)


def routable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a @ b` can go to oneDNN: fp32 CPU tensors, `b` a non-empty matrix, `a` at least a matrix whose
    rows or (2-D) columns are contiguous, no autograd graph to record, and no `torch.compile` tracing it
    (`trainer.torch_compile`): inductor lowers CPU products to its own oneDNN or BLAS calls and rejects the
    eager `_linear_pointwise` call (`InductorError: LoweringException`, torch 2.13)."""
    if torch.compiler.is_compiling():
        return False
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if b.dim() != 2 or a.dim() < 2 or b.shape[0] == 0 or b.shape[1] == 0 or a.shape[-1] != b.shape[0]:
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return False
    return a.stride(-1) == 1 or (a.dim() == 2 and a.stride(0) == 1)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` through oneDNN (`routable(a, b)` must hold).

    A column-major `a` is a weight gradient's `grad_output.t()` (rows: output features, columns: tokens):
    computed as written when the result has no more rows than columns, else as `(b.t() @ a.t()).t()` —
    whichever orientation oneDNN runs faster (its inner product reduces well over long rows of the smaller
    output side; measured per layer shape, docs/performance.md). The result is then a transposed view.
    """
    if a.stride(-1) != 1:
        return _linear(b.t(), a).t() if a.shape[0] > b.shape[1] else _linear(a, b.t())
    # as torch.matmul folds leading dimensions: an `_unsafe_view` is no view to autograd, so a custom
    # function's output computed here may be modified in place (megatron's loss does)
    product = _linear(a.reshape(-1, a.shape[-1]), b.t())
    return torch.ops.aten._unsafe_view(product, (*a.shape[:-1], b.shape[1]))


def _self_check() -> Optional[str]:
    """None when oneDNN's product runs here and agrees with BLAS; else why not."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(37, 24, generator=generator)
    b = torch.randn(24, 19, generator=generator)
    try:
        products = (matmul(a, b), matmul(a.t().contiguous().t(), b), matmul(a.t(), a))
    except (AttributeError, RuntimeError) as error:  # op missing from this torch build, or no kernel for the CPU
        return f"{type(error).__name__}: {error}"
    expected = (a @ b, a @ b, a.t() @ a)
    if not all(torch.allclose(got, want, rtol=1e-5, atol=1e-5) for got, want in zip(products, expected)):
        return "its products differ from BLAS's"
    return None


def cpu_vendor() -> str:
    """The x86 vendor id from /proc/cpuinfo ("AuthenticAMD", "GenuineIntel"), or "" where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def install(choice: CpuMatmul) -> bool:
    """Resolve `parallel.cpu_matmul` and route megatron's products (and `linear`'s) accordingly; True: oneDNN.
    Called by `runtime.initialize` on CPU machines."""
    global _installed
    _installed = use_onednn(choice)
    megatron_compat.route_matmuls((routable, matmul) if _installed else None)
    return _installed


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, weight)` without bias, through oneDNN where `install` chose it and the product has at least
    `ONEDNN_MIN_MACS` multiply-adds: the lean decoders' products, which run outside the stand-in mode. Below
    that, oneDNN's fixed cost per call (~10 µs) outweighs its faster kernel (a decoded token per row of a
    small batch through a small layer)."""
    if _installed and x.numel() * weight.shape[0] >= ONEDNN_MIN_MACS and routable(x, weight.t()):
        return matmul(x, weight.t())
    return F.linear(x, weight)


def use_onednn(choice: CpuMatmul) -> bool:
    """Resolve `parallel.cpu_matmul` for this machine. `onednn` where oneDNN cannot run is an error naming the
    key; `auto` then falls back to BLAS (logged)."""
    if choice == CpuMatmul.blas:
        return False
    amd_x86 = platform.machine().lower() in ("x86_64", "amd64") and cpu_vendor() == "AuthenticAMD"
    if choice == CpuMatmul.auto and not amd_x86:
        return False
    problem = None if torch.backends.mkldnn.is_available() else "torch was built without oneDNN (mkldnn)"
    problem = problem or _self_check()
    if problem is None:
        return True
    if choice == CpuMatmul.onednn:
        raise ConfigError(
            "parallel.cpu_matmul",
            choice.value,
            f"oneDNN's fp32 product does not work here ({problem})",
            "parallel.cpu_matmul=blas (torch's BLAS) or auto",
        )
    log.info("parallel.cpu_matmul=auto: oneDNN unusable here (%s); CPU products stay on BLAS", problem)
    return False
