"""bit_cost for the three objectives on hand-made layers, with the numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from onnxbits.config import OBJECTIVES
from onnxbits.quant.cost import LayerBits, average_bits, bit_cost, total_bops


def bits(value: float) -> torch.Tensor:
    return torch.tensor(value, requires_grad=True)


def value(t: torch.Tensor) -> float:
    return float(t.detach())


def two_layers() -> list[LayerBits]:
    """w = (4, 6), a = (8, 2), params = (100, 300), MACs = (1000, 3000)."""
    return [LayerBits(bits(4.0), bits(8.0), params=100, macs=1000),
            LayerBits(bits(6.0), bits(2.0), params=300, macs=3000)]


# bits   = (4 + 6 + 8 + 2) / 4                             = 5
# memory = (100*4 + 300*6) / (100 + 300) = 2200 / 400       = 5.5
# bops   = (1000*4*8 + 3000*6*2) / (8 * 4000) = 68000/32000 = 2.125
@pytest.mark.parametrize(("objective", "expected"), [("bits", 5.0), ("memory", 5.5),
                                                     ("bops", 2.125)])
def test_two_layer_costs(objective: str, expected: float) -> None:
    assert value(bit_cost(objective, two_layers())) == pytest.approx(expected, abs=1e-6)


# d/dw1, d/dw2, d/da1, d/da2 of each objective:
# bits:   every bitlength counts 1/4
# memory: P_i / sum P = 100/400, 300/400; activations do not count
# bops:   M_i a_i / (8 sum M) and M_i w_i / (8 sum M):
#         w1: 1000*8/32000 = 0.25, w2: 3000*2/32000 = 0.1875,
#         a1: 1000*4/32000 = 0.125, a2: 3000*6/32000 = 0.5625
@pytest.mark.parametrize(("objective", "grads"), [
    ("bits", (0.25, 0.25, 0.25, 0.25)),
    ("memory", (0.25, 0.75, None, None)),
    ("bops", (0.25, 0.1875, 0.125, 0.5625)),
])
def test_gradients_flow_to_the_bitlengths(objective: str,
                                          grads: tuple[float | None, ...]) -> None:
    layers = two_layers()
    bit_cost(objective, layers).backward()
    tensors = [layers[0].weight_bits, layers[1].weight_bits, layers[0].act_bits,
               layers[1].act_bits]
    for tensor, expected in zip(tensors, grads):
        assert tensor is not None
        if expected is None:
            assert tensor.grad is None
        else:
            assert tensor.grad is not None
            assert float(tensor.grad) == pytest.approx(expected, abs=1e-7)


def test_a_layer_without_activation_quantizer() -> None:
    layers = [LayerBits(bits(4.0), None, params=100, macs=1000),
              LayerBits(bits(6.0), bits(2.0), params=300, macs=3000)]
    # bits: (4 + 6 + 2) / 3 = 4; the float input counts as 32 bits in bops:
    # (1000*4*32 + 3000*6*2) / (8 * 4000) = (128000 + 36000) / 32000 = 5.125
    assert value(bit_cost("bits", layers)) == pytest.approx(4.0)
    assert value(bit_cost("memory", layers)) == pytest.approx(5.5)
    assert value(bit_cost("bops", layers)) == pytest.approx(5.125)


def test_uniform_8_bit_network_costs_8_under_every_objective() -> None:
    layers = [LayerBits(torch.tensor(8.0), torch.tensor(8.0), params=p, macs=m)
              for p, m in ((27, 500), (1000, 90000), (10, 10))]
    for objective in OBJECTIVES:
        assert value(bit_cost(objective, layers)) == pytest.approx(8.0)


def test_average_bits_and_total_bops() -> None:
    layers = two_layers()
    assert value(average_bits(layers)) == pytest.approx(5.0)
    frozen = [LayerBits(l.weight_bits.detach(), l.act_bits.detach(), l.params, l.macs)
              for l in layers if l.act_bits is not None]
    assert total_bops(frozen) == pytest.approx(1000 * 4 * 8 + 3000 * 6 * 2)


def test_per_channel_weight_bits_enter_as_their_mean() -> None:
    w = torch.tensor([3.0, 5.0], requires_grad=True)
    layers = [LayerBits(w.mean(), bits(8.0), params=100, macs=1000)]
    bit_cost("bits", layers).backward()
    assert value(bit_cost("bits", layers)) == pytest.approx((4.0 + 8.0) / 2)
    assert w.grad is not None and w.grad.tolist() == pytest.approx([0.25, 0.25])


def test_unknown_objective_raises() -> None:
    with pytest.raises(ValueError, match=r"unknown objective 'latency'; choose one of bits, "
                                         r"memory, bops"):
        bit_cost("latency", two_layers())
