"""Learned weight rounding: start at the float weight, end on the quantizer's grid."""

from __future__ import annotations

import pytest
import torch

from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.quant.rounding import LearnedRounding, rectified_sigmoid


def frozen_weight_quantizer(channels: int, bits: int, alpha: torch.Tensor) -> BitQuantizer:
    q = BitQuantizer(signed=True, narrow=True, num_channels=channels)
    q.init_alpha(alpha)
    q.freeze(torch.tensor(float(bits)))
    return q


def test_starts_as_nearest_rounding() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    q = frozen_weight_quantizer(4, 4, w.abs().amax(dim=(1, 2, 3)) * 0.8)
    rounding = LearnedRounding(w, q)
    with torch.no_grad():
        torch.testing.assert_close(rounding().detach(), q(w))


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_hard_weight_is_floor_or_ceil_on_the_grid_and_nearest_rounding_keeps_it(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 8) * 3
    alpha = w.abs().amax(dim=1) * 0.7                  # some weights outside the clip range
    q = frozen_weight_quantizer(6, bits, alpha)
    rounding = LearnedRounding(w, q)
    with torch.no_grad():
        rounding.logits.copy_(torch.randn_like(rounding.logits) * 4)
    hard = rounding.hard_weight()
    qmax = 2 ** (bits - 1) - 1
    step = (alpha / qmax)[:, None]
    n = hard / step
    torch.testing.assert_close(n, n.round(), atol=1e-4, rtol=0)
    lo = torch.clamp(torch.floor(w / step), -qmax, qmax)
    hi = torch.clamp(torch.floor(w / step) + 1, -qmax, qmax)
    assert bool(((n.round() == lo) | (n.round() == hi)).all())
    with torch.no_grad():
        assert torch.equal(q(hard), hard)


def test_rectified_sigmoid_saturates_and_all_up_logits_round_up() -> None:
    torch.testing.assert_close(rectified_sigmoid(torch.tensor([-20.0, 0.0, 20.0])),
                               torch.tensor([0.0, 0.5, 1.0]))
    w = torch.tensor([[0.3, -1.2, 2.5]])
    rounding = LearnedRounding(w, frozen_weight_quantizer(1, 3, torch.tensor([3.0])))
    with torch.no_grad():
        rounding.logits.fill_(20.0)
    torch.testing.assert_close(rounding.hard_weight(), torch.tensor([[1.0, -1.0, 3.0]]))


def test_needs_frozen_bits() -> None:
    q = BitQuantizer(signed=True, narrow=True, num_channels=2)
    with pytest.raises(ValueError, match="frozen"):
        LearnedRounding(torch.ones(2, 3), q)


def test_hard_rounding_forwards_the_hard_weight_with_the_soft_gradient() -> None:
    torch.manual_seed(2)
    w = torch.randn(3, 5)
    rounding = LearnedRounding(w, frozen_weight_quantizer(3, 3, w.abs().amax(dim=1)))
    out = rounding()
    assert torch.equal(out.detach(), rounding.hard_weight())
    out.sum().backward()
    grad = rounding.logits.grad
    assert grad is not None and bool((grad != 0).any())
