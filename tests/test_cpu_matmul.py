"""oneDNN's products for megatron's linear layers on the CPU (`steerlm.runtime.cpu_matmul`): equal to a float64
reference within fp32 rounding for every operand layout megatron uses, independent of the thread count, refused
where autograd or the layout needs torch, and chosen by `parallel.cpu_matmul`."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from steerlm import megatron_compat
from steerlm.config import ParallelConfig
from steerlm.config.schema import CpuMatmul
from steerlm.errors import ConfigError
from steerlm.runtime import cpu_matmul

pytestmark = pytest.mark.skipif(
    cpu_matmul._self_check() is not None, reason="oneDNN's fp32 product does not run on this machine"
)


def _operands(layout: str, rows: int, inner: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`a @ b` as megatron's linear function forms it: `forward` input `[s, b, in]` @ weight.t(); `dgrad`
    grad_output `[s, b, out]` @ weight; `wgrad` grad_output.t() (column-major) @ input `[tokens, in]`."""
    generator = torch.Generator().manual_seed(rows * 7 + inner * 3 + cols)
    if layout == "forward":
        return torch.randn(rows, 3, inner, generator=generator), torch.randn(cols, inner, generator=generator).t()
    if layout == "dgrad":
        return torch.randn(rows, 3, inner, generator=generator), torch.randn(inner, cols, generator=generator)
    return torch.randn(inner, rows, generator=generator).t(), torch.randn(inner, cols, generator=generator)


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("shape", [(40, 24, 56), (40, 56, 24), (64, 32, 32), (1, 8, 5), (0, 8, 5)])
def test_products_equal_a_float64_reference_in_every_layout(layout, shape) -> None:
    a, b = _operands(layout, *shape)
    assert cpu_matmul.routable(a, b)
    got = cpu_matmul.matmul(a, b)
    want = (a.double() @ b.double()).float()
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, a @ b, rtol=1e-5, atol=1e-5)  # and BLAS's own fp32 product


def test_a_forward_product_is_no_view_so_a_custom_function_may_return_it() -> None:
    a, b = _operands("forward", 40, 24, 56)
    assert cpu_matmul.matmul(a, b)._base is None  # as torch.matmul's: autograd forbids in-place edits of views


def test_products_do_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    pairs = [_operands(layout, 300, 96, 200) for layout in ("forward", "dgrad", "wgrad")]
    pairs += [_operands("wgrad", 300, 200, 96)]
    try:
        torch.set_num_threads(1)
        one = [cpu_matmul.matmul(a, b) for a, b in pairs]
        torch.set_num_threads(2)
        two = [cpu_matmul.matmul(a, b) for a, b in pairs]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_products_outside_its_reach_stay_with_torch() -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 5)
    assert cpu_matmul.routable(a, b)
    assert not cpu_matmul.routable(a.double(), b.double())
    assert not cpu_matmul.routable(a.bfloat16(), b.bfloat16())
    assert not cpu_matmul.routable(a, b[:, 0])  # a vector
    assert not cpu_matmul.routable(a, torch.randn(2, 8, 5))  # a batch of matrices
    assert not cpu_matmul.routable(a[:, :0], b[:0])  # nothing to sum over
    assert not cpu_matmul.routable(a, torch.randn(7, 5))  # shapes that do not chain
    assert not cpu_matmul.routable(torch.randn(4, 16)[:, ::2], b)  # neither rows nor columns contiguous
    weight = b.clone().requires_grad_()
    assert not cpu_matmul.routable(a, weight)  # autograd would need the product's derivative
    with torch.no_grad():
        assert cpu_matmul.routable(a, weight)


def test_flop_counter_counts_routed_products_as_matrix_products() -> None:
    a, b = _operands("forward", 40, 24, 56)
    with FlopCounterMode(display=False) as counter:
        cpu_matmul.matmul(a, b)
    assert counter.get_total_flops() == 2 * 40 * 3 * 24 * 56


def test_auto_picks_onednn_on_amd_only(monkeypatch) -> None:
    assert ParallelConfig().cpu_matmul == CpuMatmul.auto
    monkeypatch.setattr(cpu_matmul.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: "GenuineIntel")
    assert not cpu_matmul.use_onednn(CpuMatmul.auto)
    assert cpu_matmul.use_onednn(CpuMatmul.onednn)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: "AuthenticAMD")
    assert cpu_matmul.use_onednn(CpuMatmul.auto)
    assert not cpu_matmul.use_onednn(CpuMatmul.blas)


def test_a_broken_onednn_is_refused_when_asked_for_and_skipped_by_auto(monkeypatch) -> None:
    def missing(x, weight):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(cpu_matmul, "_linear", missing)
    monkeypatch.setattr(cpu_matmul, "cpu_vendor", lambda: "AuthenticAMD")
    monkeypatch.setattr(cpu_matmul.platform, "machine", lambda: "x86_64")
    assert not cpu_matmul.use_onednn(CpuMatmul.auto)
    with pytest.raises(ConfigError, match=r"parallel.cpu_matmul='onednn'.*could not create.*parallel.cpu_matmul=blas"):
        cpu_matmul.use_onednn(CpuMatmul.onednn)


def test_linear_takes_onednn_for_large_products_once_installed(monkeypatch) -> None:
    """The lean decoders' `linear`: torch's own product until `install` picks oneDNN, and then for products of
    fewer than ONEDNN_MIN_MACS multiply-adds (a token per row of a small batch), where oneDNN's call costs more."""
    weight = torch.randn(96, 128)
    small, large = torch.randn(1, 2, 128), torch.randn(4, 64, 128)  # 24,576 and 3,145,728 multiply-adds
    assert small.numel() * 96 < cpu_matmul.ONEDNN_MIN_MACS <= large.numel() * 96
    onednn = cpu_matmul._linear
    calls: list[tuple[int, ...]] = []

    def recorded(x, w):
        calls.append(tuple(x.shape))
        return onednn(x, w)

    previous = megatron_compat.route_matmuls(None)
    try:
        for choice in (CpuMatmul.blas, CpuMatmul.onednn):
            assert cpu_matmul.install(choice) == (choice == CpuMatmul.onednn)
            monkeypatch.setattr(cpu_matmul, "_linear", recorded)  # after install's self-check
            for x in (small, large):
                got = cpu_matmul.linear(x, weight)
                torch.testing.assert_close(got, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-5)
            monkeypatch.undo()
    finally:
        cpu_matmul.install(ParallelConfig().cpu_matmul)
        megatron_compat.route_matmuls(previous)
    assert calls == [(4 * 64, 128)]  # the large product once installed, folded to a matrix


class _MegatronLikeLinear(torch.autograd.Function):
    """The three products of megatron's `LinearWithGradAccumulationAndAsyncCommunication`, as it calls them."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.matmul(x, weight.t())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_weight = torch.matmul(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return torch.matmul(grad, weight), grad_weight


def test_compiled_layers_leave_products_to_inductor_under_the_route() -> None:
    """`trainer.torch_compile=true` on a CPU that routes to oneDNN: inductor rejected the routed
    `_linear_pointwise` call (`LoweringException`), so a compiled region's products are left to it; the
    compiled forward and gradients equal the eager routed ones."""
    megatron_compat.activate()
    previous = megatron_compat.route_matmuls(None)
    try:
        assert cpu_matmul.install(CpuMatmul.onednn)

        def step(x, weight):
            return torch.nn.functional.silu(_MegatronLikeLinear.apply(x, weight)).square().sum()

        results = []
        for run in (step, torch.compile(step, fullgraph=True)):
            generator = torch.Generator().manual_seed(5)
            x = torch.randn(3, 40, 64, generator=generator).requires_grad_()
            weight = torch.randn(96, 64, generator=generator).div(8).requires_grad_()
            loss = run(x, weight)
            loss.backward()
            results.append((loss.detach(), x.grad, weight.grad))
    finally:
        cpu_matmul.install(ParallelConfig().cpu_matmul)
        megatron_compat.route_matmuls(previous)
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
