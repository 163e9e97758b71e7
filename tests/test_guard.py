"""Accuracy guard: measured sensitivities, doubling raises, and the drop it holds."""

from __future__ import annotations

import pytest
import torch

from onnxbits.quant.network import QuantizedNetwork
from onnxbits.train.guard import enforce_max_drop, sensitivities
from tests.builders import residual_block
from tests.conftest import calibrated_network


def _frozen_net(bits: int = 2) -> tuple[QuantizedNetwork, torch.Tensor, torch.Tensor]:
    c = calibrated_network(residual_block())
    net, x, teacher = c.net, c.x, c.teacher
    for q in net.quantizers():
        q.freeze(torch.tensor(float(bits)))
    return net, x, teacher


def _disagreement(net: QuantizedNetwork, x: torch.Tensor, teacher: torch.Tensor) -> float:
    with torch.no_grad():
        same = (net(x).argmax(-1) == teacher.argmax(-1)).float().mean()
    return 100.0 * (1.0 - float(same))


def test_sensitivities_rank_groups_by_measured_gain() -> None:
    net, x, teacher = _frozen_net()
    ranked = sensitivities(net, [x], [teacher])
    assert len(ranked) == len(net.quantizers())
    gains = [g for g, _, _ in ranked]
    assert gains == sorted(gains, reverse=True)
    assert gains[0] > 0


def test_guard_raises_doubling_groups_until_the_drop_holds() -> None:
    net, x, teacher = _frozen_net()
    start = _disagreement(net, x, teacher)
    assert start > 0
    first = sensitivities(net, [x], [teacher])[0][1]
    drop, raised = enforce_max_drop(net, lambda: _disagreement(net, x, teacher), 0.0, [x],
                                    [teacher])
    assert raised[0]["group"] == first and raised[0]["round"] == 0
    rounds = [r["round"] for r in raised]
    for r in set(rounds):
        assert rounds.count(r) <= 2**r
    at_max = all(bool((q.frozen_bits >= q.max_bits).all()) for q in net.quantizers())
    assert drop == _disagreement(net, x, teacher)
    assert drop <= 0.0 or at_max
    assert all(r["bits_after"] == min(r["bits_before"] + 2, 8) for r in raised)


def test_guard_does_nothing_when_the_drop_already_holds() -> None:
    net, x, teacher = _frozen_net(bits=8)
    drop, raised = enforce_max_drop(net, lambda: _disagreement(net, x, teacher), 100.0, [x],
                                    [teacher])
    bits = [q.frozen_bits.tolist() for q in net.quantizers()]
    assert raised == [] and drop == pytest.approx(_disagreement(net, x, teacher))
    assert [q.frozen_bits.tolist() for q in net.quantizers()] == bits
