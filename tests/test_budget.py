"""Budget mode: the lambda controller, the shift onto the ramp, and landing on the budget."""

from __future__ import annotations

import pytest
import torch

from onnxbits.quant.cost import bit_cost
from onnxbits.quant.network import QuantizedNetwork, layer_bits
from onnxbits.train.budget import LambdaController, freeze_to_budget, shift_onto_budget
from onnxbits.train.config import TrainConfig
from onnxbits.train.loop import fine_tune
from tests.builders import residual_block
from tests.conftest import calibrated_network


def _net() -> tuple[QuantizedNetwork, torch.Tensor, torch.Tensor]:
    c = calibrated_network(residual_block())
    return c.net, c.x, c.teacher


def _cost(net: QuantizedNetwork, objective: str) -> float:
    with torch.no_grad():
        return float(bit_cost(objective, layer_bits(net)))


def _spread(net: QuantizedNetwork) -> None:
    with torch.no_grad():
        for i, q in enumerate(net.quantizers()):
            q.bits.fill_(4.0 + 0.37 * (i % 5))


@pytest.mark.parametrize("objective", ["bits", "memory", "bops"])
def test_shift_lands_on_the_budget_and_keeps_the_differences(objective: str) -> None:
    net, _, _ = _net()
    _spread(net)
    before = [q.bits.detach().clone() for q in net.quantizers()]
    budget = _cost(net, objective) * 0.8
    s = shift_onto_budget(net, objective, budget)
    assert _cost(net, objective) == pytest.approx(budget, rel=1e-6)
    assert s > 0
    weights = {id(layer.wq) for layer in net.layers.values()}
    for q, b in zip(net.quantizers(), before):
        if objective == "memory" and id(q) not in weights:    # not in the cost: left alone
            assert torch.equal(q.bits.detach(), b)
        else:
            assert torch.allclose(q.bits.detach(), (b - s).clamp(q.min_bits, q.max_bits),
                                  atol=1e-6)


def test_shift_stops_at_the_bit_range_when_the_budget_is_out_of_reach() -> None:
    net, _, _ = _net()
    _spread(net)
    shift_onto_budget(net, "bits", 0.5)
    assert all(float(q.bits.detach().min()) == q.min_bits for q in net.quantizers())
    shift_onto_budget(net, "bits", 100.0)
    assert all(float(q.bits.detach().max()) == q.max_bits for q in net.quantizers())


def test_shift_leaves_frozen_quantizers_alone() -> None:
    net, _, _ = _net()
    _spread(net)
    frozen = net.quantizers()[0]
    frozen.freeze()
    kept = frozen.frozen_bits.clone()
    shift_onto_budget(net, "bits", 3.0)
    assert torch.equal(frozen.frozen_bits, kept)
    assert _cost(net, "bits") == pytest.approx(3.0, rel=1e-6)


def test_controller_raises_lambda_above_the_ramp_and_lowers_it_below() -> None:
    ctl = LambdaController(target=4.0, start=8.0, learn_steps=100)
    assert ctl.budget_at(59) == pytest.approx(4.0)
    assert ctl(0, 0.1, ctl.budget_at(0) + 1.0) > 0.1
    assert ctl(0, 0.1, ctl.budget_at(0) - 1.0) < 0.1


def test_budget_run_follows_the_ramp_and_freezes_onto_the_target() -> None:
    net, x, teacher = _net()
    cfg = TrainConfig(steps=40, frozen_steps=10, batch_size=16, lam=0.05)
    start = _cost(net, "bits")
    ctl = LambdaController(4.0, start, cfg.learn_steps(), net=net, objective="bits")
    moved: list[str] = []
    history = fine_tune(net, lambda idx: (x[idx], None), teacher, len(x), cfg, lam_schedule=ctl,
                        freeze=lambda n: moved.extend(freeze_to_budget(n, "bits", 4.0)))
    learn = cfg.learn_steps()
    # each step starts from the ramp value the previous step was shifted onto
    for step in range(1, learn):
        assert history[step].cost == pytest.approx(ctl.budget_at(step - 1), abs=1e-4)
    assert all(q.frozen for q in net.quantizers())
    assert 3.9 <= _cost(net, "bits") <= 4.0


def test_freeze_lands_in_the_band_below_the_budget() -> None:
    net, _, _ = _net()
    with torch.no_grad():
        for i, q in enumerate(net.quantizers()):
            q.bits.fill_(4.45 + 0.01 * i)       # rounds to 4 or 5: cost above 4.2
    moved = freeze_to_budget(net, "bits", 4.2, tolerance=0.1)
    assert 4.1 <= _cost(net, "bits") <= 4.2
    assert moved and all(m.endswith("-> 4") for m in moved)


@pytest.mark.parametrize("objective", ["bits", "memory", "bops"])
def test_freeze_with_per_channel_bits_lands_in_the_band(objective: str) -> None:
    net = calibrated_network(residual_block(), per_channel_bits=True).net
    with torch.no_grad():
        for i, q in enumerate(net.quantizers()):
            channels = q.bits.numel()
            q.bits.copy_(4.3 + 0.4 * torch.arange(channels) / max(channels, 1) + 0.01 * i)
    moved = freeze_to_budget(net, objective, 4.2, tolerance=0.1)
    assert 4.1 <= _cost(net, objective) <= 4.2
    channel_lines = [m for m in moved if "channel(s) moved" in m]
    assert channel_lines                        # per-channel quantizers moved channel by channel
    assert len({m.split("moved ")[1] for m in channel_lines}) == 1   # all in one direction
