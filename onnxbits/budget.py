"""Budget mode: adapt lambda so the run lands on a bit budget, and freeze onto the budget.

During the learning phase the budget follows a ramp from the starting cost ``c_0`` to the target
``B`` over the first ``ramp`` share of the learning steps, ``b_t = c_0 + (B - c_0) min(1, t / T_r)``,
and lambda is updated multiplicatively after every step::

    lambda_{t+1} = clip(lambda_t * exp(gain * (c_t - b_t)), lambda_min, lambda_max)

so it grows while the cost is above the ramp and shrinks below it. At the freeze, the integer
bits first follow the one freeze rule ``k = floor(n + 1/2)``; if the integer cost is then more
than ``tolerance`` away from ``B``, the groups closest to their rounding boundary move to the
other integer (down when over budget, up when under), one at a time and only when the move brings
the cost closer to ``B``, until it is within the tolerance or no move helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from onnxbits.cost import bit_cost
from onnxbits.insert import QuantizedNetwork, layer_bits


@dataclass
class LambdaController:
    """Multiplicative lambda controller that tracks a linear ramp towards ``target``."""

    target: float
    start: float
    learn_steps: int
    ramp: float = 0.6
    gain: float = 0.5
    lam_min: float = 1e-4
    lam_max: float = 100.0

    def budget_at(self, step: int) -> float:
        """The ramp ``b_t``."""
        span = max(1.0, self.ramp * self.learn_steps)
        return self.start + (self.target - self.start) * min(1.0, (step + 1) / span)

    def __call__(self, step: int, lam: float, cost: float) -> float:
        """Next lambda after ``step`` with cost ``cost``."""
        lam = lam * math.exp(self.gain * (cost - self.budget_at(step)))
        return min(self.lam_max, max(self.lam_min, lam))


def _integer_cost(net: QuantizedNetwork, objective: str) -> float:
    return float(bit_cost(objective, layer_bits(net)))


@torch.no_grad()
def freeze_to_budget(net: QuantizedNetwork, objective: str, target: float,
                     tolerance: float = 0.1) -> list[str]:
    """Freeze every quantizer with the freeze rule, then nudge groups onto the budget.

    Returns a description of every group moved off its rounded value.
    """
    quantizers = net.quantizers()
    names = {id(layer.wq): f"{node} (weights)" for node, layer in net.layers.items()}
    names.update({id(q): f"{tensor} (activation)" for tensor, q in net.acts.items()})
    fractional = {id(q): q.bits.detach().clone() for q in quantizers}
    for q in quantizers:
        q.freeze()
    moved: list[str] = []
    cost = _integer_cost(net, objective)
    while abs(cost - target) > tolerance:
        down = cost > target
        best = None
        for q in quantizers:
            n = fractional[id(q)]
            for i in range(q.frozen_bits.numel()):
                k = float(q.frozen_bits[i])
                new = k - 1 if down else k + 1
                if not q.min_bits <= new <= q.max_bits:
                    continue
                q.frozen_bits[i] = new
                new_cost = _integer_cost(net, objective)
                q.frozen_bits[i] = k
                if abs(new_cost - target) >= abs(cost - target):
                    continue
                distance = abs(float(n[i]) - (k - 0.5 if down else k + 0.5))
                if best is None or distance < best[0]:
                    best = (distance, q, i, k, new, new_cost)
        if best is None:
            break
        _, q, i, k, new, cost = best
        q.frozen_bits[i] = new
        moved.append(f"{names[id(q)]}: {k:.0f} -> {new:.0f}")
    return moved
