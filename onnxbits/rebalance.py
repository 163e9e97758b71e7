"""Bit rebalance at a fixed budget: after the freeze, move bits from the groups that need them
least to the groups that gain most from them, measured on fine-tune images.

Each round measures, for every group ``g`` whose bits the cost depends on (a layer's weights
or an activation tensor, :func:`onnxbits.budget.cost_quantizers`; ``fixed`` ones, such as pinned
end layers, excepted), the distillation loss
``KL(teacher || student)`` on fixed fine-tune images with ``g`` one bit up and one bit down
(all its channels, within ``[min_bits, max_bits]``)::

    gain_g = KL - KL(g + 1)        loss_g = KL(g - 1) - KL

and the cost change of each move, ``c_g^+ > 0`` and ``c_g^- < 0`` (exact, from the cost
function). The plan pairs them greedily: the ups ordered by ``gain / c^+`` (highest first), the
downs by ``loss / |c^-|`` (lowest first); before each up, downs are taken in order until the
cost has room for it (``cost <= B``, the budget), each group moving at most once. Its predicted
change ``sum(gain) - sum(loss)`` is tallied after every up and the plan is cut where that is
largest (nothing when it never exceeds 0). Every prefix of the plan keeps ``cost <= B``. The
plan is applied and KL measured again; while it is not below the round's starting KL the plan is
halved (its first half kept), down to nothing. Rounds repeat on the new bits until ``rounds``
have run or a round moves nothing. No I/O, no printing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from onnxbits.budget import cost_quantizers, describe_move
from onnxbits.cost import bit_cost
from onnxbits.guard import kl_to_teacher
from onnxbits.insert import QuantizedNetwork, layer_bits
from onnxbits.quant.quantizer import BitQuantizer

__all__ = ["RebalanceRound", "rebalance_bits"]


@dataclass
class RebalanceRound:
    """One round: KL before and after, the moves kept (``"<group>: k -> k'"``), the predicted
    change of the kept moves and the integer cost after."""

    round: int
    kl_before: float
    kl_after: float
    predicted_gain: float
    cost_after: float
    moves: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The round as a plain dict (JSON report)."""
        return asdict(self)


@dataclass(frozen=True)
class _Move:
    name: str
    quantizer: BitQuantizer
    step: int           # +1 or -1
    effect: float       # KL saved by the move (gain for an up, -loss for a down)
    cost: float         # cost change


def _shift(q: BitQuantizer, step: int) -> bool:
    """Move every channel of ``q`` by ``step`` bits within its range; False if none can."""
    bits = q.frozen_bits
    new = (bits + step).clamp(q.min_bits, q.max_bits)
    if bool((new == bits).all()):
        return False
    bits.copy_(new)
    return True


def _candidate_moves(net: QuantizedNetwork, objective: str, batches: list[Tensor],
                     teachers: list[Tensor], base_kl: float, fixed: set[int]
                     ) -> tuple[list[_Move], list[_Move]]:
    """Every possible one-bit up and down move of a group not in ``fixed`` (ids) with its
    measured KL effect and cost change."""
    names = {id(q): name for name, q in net.named_quantizers()}
    cost = float(bit_cost(objective, layer_bits(net)))
    ups, downs = [], []
    for q in (q for q in cost_quantizers(net, objective) if id(q) not in fixed):
        saved = q.frozen_bits.clone()
        for step, into in ((1, ups), (-1, downs)):
            if _shift(q, step):
                moved_cost = float(bit_cost(objective, layer_bits(net)))
                effect = base_kl - kl_to_teacher(net, batches, teachers)
                q.frozen_bits.copy_(saved)
                if moved_cost != cost:
                    into.append(_Move(names[id(q)], q, step, effect, moved_cost - cost))
    return ups, downs


def _plan(ups: list[_Move], downs: list[_Move], room: float) -> tuple[list[_Move], float]:
    """The greedy pairing of the module docstring: the moves in order and their predicted
    gain, cut where that is largest."""
    ups = sorted((m for m in ups if m.cost > 0), key=lambda m: -m.effect / m.cost)
    downs = sorted((m for m in downs if m.cost < 0), key=lambda m: m.effect / m.cost)
    plan: list[_Move] = []
    used: set[int] = set()
    predicted, best, best_len = 0.0, 0.0, 0
    d = 0
    for up in ups:
        if id(up.quantizer) in used:
            continue
        while room < up.cost and d < len(downs):
            down = downs[d]
            d += 1
            if id(down.quantizer) in used or down.quantizer is up.quantizer:
                continue
            plan.append(down)
            used.add(id(down.quantizer))
            room -= down.cost
            predicted += down.effect
        if room < up.cost:
            break
        plan.append(up)
        used.add(id(up.quantizer))
        room -= up.cost
        predicted += up.effect
        if predicted > best:
            best, best_len = predicted, len(plan)
    return plan[:best_len], best


@torch.no_grad()
def rebalance_bits(net: QuantizedNetwork, objective: str, budget: float, batches: list[Tensor],
                   teachers: list[Tensor], rounds: int = 1,
                   fixed: Iterable[BitQuantizer] = ()) -> list[RebalanceRound]:
    """Rebalance the frozen bits of ``net`` at cost at most ``budget`` (module docstring),
    leaving the ``fixed`` quantizers alone; ``batches`` and ``teachers`` (the float model's
    logits for them) may sit on any device: they go to the network's. Returns one
    :class:`RebalanceRound` per round run."""
    keep = {id(q) for q in fixed}
    device = net.device
    batches = [x.to(device) for x in batches]
    teachers = [t.to(device) for t in teachers]
    results = []
    for r in range(rounds):
        base = kl_to_teacher(net, batches, teachers)
        ups, downs = _candidate_moves(net, objective, batches, teachers, base, keep)
        room = budget - float(bit_cost(objective, layer_bits(net)))
        plan, predicted = _plan(ups, downs, room)
        saved = {id(m.quantizer): m.quantizer.frozen_bits.clone() for m in plan}
        after = base
        while plan:
            for m in plan:
                _shift(m.quantizer, m.step)
            after = kl_to_teacher(net, batches, teachers)
            if after < base:
                break
            for m in plan:
                m.quantizer.frozen_bits.copy_(saved[id(m.quantizer)])
            plan, after = plan[: len(plan) // 2], base
            predicted = sum(m.effect for m in plan)
        results.append(RebalanceRound(
            r, base, after, predicted, float(bit_cost(objective, layer_bits(net))),
            [line for m in plan if (line := describe_move(
                m.name, saved[id(m.quantizer)].reshape(-1),
                m.quantizer.frozen_bits.reshape(-1)))]))
        if not plan:
            break
    return results
