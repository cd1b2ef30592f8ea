"""The non-finite checks of every training step (steerlm.training.guards): one sum per tensor screens the
gradients and weights, the elementwise check decides when the screen trips — NaN, +Inf and -Inf anywhere are
found, and finite numbers whose sum overflows fp32 are not taken for them."""

from __future__ import annotations

import pytest
import torch

from steerlm.training.guards import NonFiniteTraining, gradients_finite, require_finite_weights


def _model(values: list[float]) -> list[torch.nn.Module]:
    """One chunk of two parameters; the weight's gradient (in megatron DDP's `main_grad`) holds `values`."""
    chunk = torch.nn.Linear(len(values), 1)
    chunk.weight.main_grad = torch.tensor([values])
    chunk.bias.main_grad = torch.zeros(1)
    return [chunk]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_gradient_element_is_found(layout, bad: float) -> None:
    assert not gradients_finite(_model([0.5, bad, -2.0]), layout)


def test_finite_gradients_whose_sum_overflows_are_finite(layout) -> None:
    huge = 3.0e38  # two of them sum past fp32's largest number: the screen trips, the elementwise check clears
    assert float(torch.tensor([huge, huge]).sum()) == float("inf")
    assert gradients_finite(_model([huge, huge, 1.0]), layout)
    assert gradients_finite(_model([0.0, -1.0, 1e-30]), layout)


def test_a_plain_parameter_gradient_is_checked_when_there_is_no_main_grad(layout) -> None:
    chunk = torch.nn.Linear(2, 1)
    chunk.weight.grad = torch.tensor([[1.0, float("nan")]])
    assert not gradients_finite([chunk], layout)
    chunk.weight.grad = torch.tensor([[1.0, 2.0]])
    assert gradients_finite([chunk], layout)


def test_non_finite_weights_refuse_the_save(layout) -> None:
    chunk = torch.nn.Linear(2, 1)
    require_finite_weights([chunk], layout, step=7)  # finite: no error
    with torch.no_grad():
        chunk.weight[0, 1] = float("inf")
    with pytest.raises(NonFiniteTraining, match=r"^step 7: the weights hold NaN/Inf"):
        require_finite_weights([chunk], layout, step=7)
