"""Bit rebalance: the greedy plan, the cost it keeps and the loss it lowers."""

from __future__ import annotations

import pytest
import torch

from onnxbits.cost import bit_cost
from onnxbits.guard import kl_to_teacher
from onnxbits.insert import QuantizedNetwork, layer_bits
from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.rebalance import _Move, _plan, rebalance_bits
from tests.builders import residual_block
from tests.conftest import calibrated_network


def _quantizer() -> BitQuantizer:
    return BitQuantizer(signed=True)


def _move(q: BitQuantizer, step: int, effect: float, cost: float = 1.0) -> _Move:
    return _Move(f"g{id(q)}", q, step, effect, cost if step > 0 else -cost)


def test_plan_pairs_best_ups_with_cheapest_downs_and_cuts_at_the_best_prediction() -> None:
    a, b, c, d = (_quantizer() for _ in range(4))
    ups = [_move(a, 1, 5.0), _move(b, 1, 0.5), _move(c, 1, 2.0), _move(d, 1, 0.1)]
    downs = [_move(a, -1, -9.0), _move(b, -1, -0.2), _move(c, -1, -3.0), _move(d, -1, -0.3)]
    plan, predicted = _plan(ups, downs, room=0.0)
    # a up (+5) funded by b down (-0.2), c up (+2) by d down (-0.3); then no down is left
    assert [(m.quantizer, m.step) for m in plan] == [(b, -1), (a, 1), (d, -1), (c, 1)]
    assert predicted == pytest.approx(5.0 - 0.2 + 2.0 - 0.3)


def test_plan_takes_nothing_when_no_swap_pays() -> None:
    a, b = _quantizer(), _quantizer()
    plan, predicted = _plan([_move(a, 1, 0.1)], [_move(b, -1, -0.5)], room=0.0)
    assert plan == [] and predicted == 0.0


def test_plan_uses_free_room_before_taking_bits_away() -> None:
    a, b = _quantizer(), _quantizer()
    plan, _ = _plan([_move(a, 1, 1.0)], [_move(b, -1, -0.1)], room=1.0)
    assert [(m.quantizer, m.step) for m in plan] == [(a, 1)]


def _frozen(bits: list[int]) -> tuple[QuantizedNetwork, torch.Tensor, torch.Tensor]:
    c = calibrated_network(residual_block())
    for q, k in zip(c.net.quantizers(), bits * len(c.net.quantizers()), strict=False):
        q.freeze(torch.tensor(float(k)))
    return c.net, c.x, c.teacher


def _cost(net: QuantizedNetwork) -> float:
    return float(bit_cost("bits", layer_bits(net)))


def test_rebalance_lowers_the_loss_at_no_more_than_the_budget() -> None:
    net, x, teacher = _frozen([2, 6, 3, 5])
    budget = _cost(net)
    before = kl_to_teacher(net, [x], [teacher])
    rounds = rebalance_bits(net, "bits", budget, [x], [teacher], rounds=3)
    after = kl_to_teacher(net, [x], [teacher])
    assert rounds[0].moves, "an uneven allocation should leave a swap that pays"
    assert after < before and after == pytest.approx(rounds[-1].kl_after)
    assert _cost(net) <= budget + 1e-9
    assert [r.kl_before for r in rounds[1:]] == [r.kl_after for r in rounds[:-1]]
    assert all(r.kl_after < r.kl_before for r in rounds if r.moves)
    assert all(bool(((q.frozen_bits >= 2) & (q.frozen_bits <= 8)).all())
               for q in net.quantizers())


def test_rebalance_moves_nothing_when_every_group_is_at_max_bits() -> None:
    net, x, teacher = _frozen([8])
    saved = [q.frozen_bits.clone() for q in net.quantizers()]
    rounds = rebalance_bits(net, "bits", _cost(net), [x], [teacher], rounds=2)
    assert len(rounds) == 1 and rounds[0].moves == []
    assert all(torch.equal(q.frozen_bits, s) for q, s in zip(net.quantizers(), saved))


def test_rebalance_leaves_fixed_groups_alone() -> None:
    net, x, teacher = _frozen([2, 6, 3, 5])
    fixed = net.quantizers()[:2]
    saved = [q.frozen_bits.clone() for q in fixed]
    moved = rebalance_bits(net, "bits", _cost(net), [x], [teacher], rounds=3, fixed=fixed)
    assert all(torch.equal(q.frozen_bits, s) for q, s in zip(fixed, saved))
    names = {name for name, q in net.named_quantizers() if any(q is f for f in fixed)}
    assert not any(m.split(":")[0] in names for r in moved for m in r.moves)
