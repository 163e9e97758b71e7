"""Budget mode: adapt lambda so the run lands on a bit budget, and freeze onto the budget.

During the learning phase the budget follows a ramp from the starting cost ``c_0`` to the target
``B`` over the first ``ramp`` share of the learning steps,
``b_t = c_0 + (B - c_0) min(1, t / T_r)``.
After every optimizer step, with the cost ``c_t`` the step left, lambda is updated
multiplicatively::

    lambda_{t+1} = clip(lambda_t * exp(gain * (c_t - b_t)), lambda_min, lambda_max)

so it grows while the bitlengths drift above the ramp and shrinks below it (lambda decides which
groups give up bits: those whose task gradient is weaker than the cost's). Then every learnable
bitlength is shifted by one common amount ``s`` so that the cost lies exactly on the ramp:
``cost(clamp(n - s, min_bits, max_bits)) = b_t`` (a batched grid search on ``s``,
:func:`shift_onto_budget`; the cost falls monotonically in ``s``). Lambda alone oscillates around
the ramp, because Adam moves every bitlength at up to its learning rate per step whatever
lambda's size; the shift removes the excursions while keeping the relative bitlengths lambda and
the task loss chose. Only the bitlengths the cost depends on are shifted: with ``memory`` (a size
budget) the activation bitlengths are left to the task loss.

At the freeze, the integer bits first follow the one freeze rule ``k = floor(n + 1/2)``; if the
integer cost then lies outside the band ``[B - tolerance, B]`` (a budget is not exceeded), the
groups closest to their rounding boundary move to the other integer (down when over budget, up
when more than ``tolerance`` under), one at a time and only when the move brings the cost closer
to the band, until it is inside or no move helps.

:func:`budget_target` turns ``--target-bits`` / ``--target-size`` / ``--target-bops`` into the
objective and the budget in cost units, refusing budgets the bit bounds cannot reach.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from onnxbits.config import ShrinkConfig
from onnxbits.errors import ConfigError
from onnxbits.quant.cost import LayerBits, bit_cost
from onnxbits.quant.network import QuantizedNetwork, layer_bits
from onnxbits.quant.quantizer import BitQuantizer


@dataclass
class LambdaController:
    """Multiplicative lambda controller that tracks a linear ramp towards ``target``.

    With ``net`` it also shifts the learnable bitlengths onto the ramp after every step
    (:func:`shift_onto_budget`) and measures the cost itself after the step.
    """

    target: float
    start: float
    learn_steps: int
    ramp: float = 0.6
    gain: float = 0.5
    lam_min: float = 1e-4
    lam_max: float = 100.0
    net: QuantizedNetwork | None = None
    objective: str = "bits"

    def budget_at(self, step: int) -> float:
        """The ramp ``b_t``."""
        span = max(1.0, self.ramp * self.learn_steps)
        return self.start + (self.target - self.start) * min(1.0, (step + 1) / span)

    def __call__(self, step: int, lam: float, cost: float) -> float:
        """Next lambda after ``step``; ``cost`` is the cost the step started from (used without
        ``net``)."""
        budget = self.budget_at(step)
        if self.net is not None:
            cost = _learned_cost(self.net, self.objective)
        lam = min(self.lam_max, max(self.lam_min, lam * math.exp(self.gain * (cost - budget))))
        if self.net is not None:
            shift_onto_budget(self.net, self.objective, budget)
        return lam


def _learned_cost(net: QuantizedNetwork, objective: str) -> float:
    with torch.no_grad():
        return float(bit_cost(objective, layer_bits(net)))


def cost_quantizers(net: QuantizedNetwork, objective: str) -> list[BitQuantizer]:
    """The quantizers whose bitlengths ``objective``'s cost depends on: the weight quantizers
    for ``memory``, all quantizers for ``bits`` and ``bops``. Only these are shifted onto a
    budget; the others keep what the task loss gives them."""
    if objective == "memory":
        return [layer.wq for layer in net.layers.values()]
    return net.quantizers()


class ShiftedCost:
    """The cost after shifting the learnable bitlengths of ``shifted`` by candidate amounts,
    ``c(s) = cost(clamp(n - s, min_bits, max_bits))``, for a whole batch of ``s`` at once (one
    pass over a ``(m, N)`` matrix of the N shifted bitlengths instead of m passes over the
    network); the other quantizers keep their :meth:`BitQuantizer.effective_bits`."""

    def __init__(self, net: QuantizedNetwork, objective: str,
                 shifted: list[BitQuantizer]) -> None:
        self.net, self.objective = net, objective
        self.column = {id(q): i for i, q in enumerate(shifted)}
        flat = [q.bits.detach().reshape(-1) for q in shifted]
        self.base = torch.cat(flat)
        device = self.base.device
        self.sizes = [len(f) for f in flat]
        sizes = torch.tensor(self.sizes, device=device)
        self.group = torch.repeat_interleave(torch.arange(len(flat), device=device), sizes)
        self.count = sizes.to(self.base.dtype)
        self.low = torch.repeat_interleave(
            torch.tensor([float(q.min_bits) for q in shifted], device=device), sizes)
        self.high = torch.repeat_interleave(
            torch.tensor([float(q.max_bits) for q in shifted], device=device), sizes)

    def bits(self, s: Tensor) -> Tensor:
        """``clamp(n - s, min, max)`` for each shift: shape ``(len(s), N)``."""
        return torch.minimum(torch.maximum(self.base - s[:, None], self.low), self.high)

    def __call__(self, s: Tensor) -> Tensor:
        """The cost at each shift in ``s`` (1-d): shape ``(len(s),)``."""
        bits = self.bits(s)
        means = torch.zeros(len(s), len(self.count), dtype=bits.dtype, device=bits.device)
        means = means.index_add_(1, self.group, bits) / self.count

        def bits_of(q: BitQuantizer) -> Tensor:
            col = self.column.get(id(q))
            return q.effective_bits().mean() if col is None else means[:, col]

        return bit_cost(self.objective, layer_bits(self.net, bits_of))


@torch.no_grad()
def shift_onto_budget(net: QuantizedNetwork, objective: str, budget: float,
                      rounds: int = 4, points: int = 64) -> float:
    """Shift every learnable (not frozen) bitlength that the cost depends on
    (:func:`cost_quantizers`) by one ``s`` so that the cost is ``budget``.

    Solves ``cost(clamp(n - s, min_bits, max_bits)) = budget`` for ``s`` in
    ``[-(max - min), max - min]``, where the cost falls monotonically in ``s``: each of ``rounds``
    rounds evaluates the cost on ``points + 1`` evenly spaced shifts at once
    (:class:`ShiftedCost`) and keeps the interval in which it crosses the budget (width
    ``2 (max - min) / points^rounds`` at the end: 1.4e-6 bits by default, about float32's
    resolution); its upper end is taken. When the budget is out of reach the nearest end of the
    range is used. Everything stays on the bitlengths' device: one host synchronisation, for the
    returned ``s`` (positive: bits went down).
    """
    learnable = [q for q in cost_quantizers(net, objective) if not q.frozen]
    if not learnable:
        return 0.0
    cost = ShiftedCost(net, objective, learnable)
    span = float(max(q.max_bits - q.min_bits for q in learnable))
    device, dtype = cost.base.device, cost.base.dtype
    at_ends = cost(torch.tensor([span, -span], device=device, dtype=dtype))
    lo = torch.tensor(-span, device=device, dtype=torch.float64)
    hi = torch.tensor(span, device=device, dtype=torch.float64)
    steps = torch.linspace(0.0, 1.0, points + 1, device=device, dtype=torch.float64)
    for _ in range(rounds):   # invariant when reachable: cost(lo) > budget >= cost(hi)
        grid = lo + (hi - lo) * steps
        above = (cost(grid.to(dtype)) > budget).sum().clamp(1, points)
        lo, hi = grid.index_select(0, torch.stack([above - 1, above]))  # no host sync
    s = torch.where(at_ends[0] >= budget, span, torch.where(at_ends[1] <= budget, -span, hi))
    s = s.to(dtype)
    for q, bits in zip(learnable, cost.bits(s[None])[0].split(cost.sizes), strict=True):
        q.bits.copy_(bits.reshape(q.bits.shape))
    return float(s)


def _integer_cost(net: QuantizedNetwork, objective: str) -> float:
    return float(bit_cost(objective, layer_bits(net)))


@torch.no_grad()
def freeze_to_budget(net: QuantizedNetwork, objective: str, target: float,
                     tolerance: float = 0.1, max_passes: int = 50) -> list[str]:
    """Freeze every quantizer with the freeze rule, then nudge groups onto the budget.

    Quantizers frozen before the call (pinned layers) are left as they are. Moving any one
    channel of a quantizer by one bit changes the cost by the same amount (its layer's mean
    bits change by ``1 / channels``), so that change is measured once per quantizer; the
    candidates (one per channel that can move) are then taken in order of closeness to their
    rounding boundary, each only when it brings the cost closer to the band, and the pass is
    repeated with the exact cost until the cost is in the band or no move helps (at most
    ``max_passes`` passes: with ``bops`` the change depends on the other bits). Returns a
    description of every group moved off its rounded value (with per-channel bitlengths, one
    line per quantizer).
    """
    quantizers = [q for q in net.quantizers() if not q.frozen]
    names = {id(q): name for name, q in net.named_quantizers()}
    fractional = {id(q): q.bits.detach().clone().reshape(-1) for q in quantizers}
    for q in quantizers:
        q.freeze()
    movers = [q for q in cost_quantizers(net, objective) if id(q) in fractional]
    rounded = {id(q): q.frozen_bits.clone().reshape(-1) for q in movers}
    cost = _integer_cost(net, objective)

    def off(c: float) -> float:          # distance to the band [B - tolerance, B]
        return max(c - target, target - tolerance - c, 0.0)

    for _ in range(max_passes):
        if off(cost) == 0:
            break
        down = cost > target
        candidates = []
        for order, q in enumerate(movers):
            bits = q.frozen_bits.reshape(-1)
            new = bits - 1 if down else bits + 1
            movable = ((new >= q.min_bits) & (new <= q.max_bits)).nonzero().flatten().tolist()
            if not movable:
                continue
            first = movable[0]
            k = float(bits[first])
            bits[first] = new[first]
            delta = _integer_cost(net, objective) - cost
            bits[first] = k
            edge = bits - 0.5 if down else bits + 0.5
            distance = (fractional[id(q)] - edge).abs()
            candidates += [(float(distance[i]), order, i, delta) for i in movable]
        candidates.sort()
        moved_any = False
        for _, order, i, delta in candidates:
            if off(cost + delta) >= off(cost):
                continue
            movers[order].frozen_bits.reshape(-1)[i] += -1 if down else 1
            cost += delta
            moved_any = True
            if off(cost) == 0:
                break
        cost = _integer_cost(net, objective)
        if not moved_any:
            break
    return [line for q in movers
            if (line := describe_move(names[id(q)], rounded[id(q)], q.frozen_bits.reshape(-1)))]


def describe_move(name: str, rounded: torch.Tensor, final: torch.Tensor) -> str | None:
    """``"<group>: k -> k'"`` for a moved tensor-wide quantizer, ``"<group>: n channel(s) moved
    down/up by one bit"`` for a per-channel one, None when nothing moved."""
    changed = (final != rounded).nonzero().flatten()
    if not len(changed):
        return None
    if final.numel() == 1:
        return f"{name}: {float(rounded[0]):.0f} -> {float(final[0]):.0f}"
    way = "down" if float(final[changed[0]]) < float(rounded[changed[0]]) else "up"
    return f"{name}: {len(changed)} channel(s) moved {way} by one bit"


def budget_target(cfg: ShrinkConfig, net: QuantizedNetwork) -> tuple[str, float | None]:
    """The objective and the budget in cost units (see :mod:`onnxbits.quant.cost`).

    ``--target-size MB`` -> memory cost ``MB * 8e6 / sum P_i`` (bits per weight);
    ``--target-bops G`` -> BOPs cost ``G * 1e9 / (8 sum M_i)``.
    """
    objective = cfg.budget_objective()
    if objective is None:
        return cfg.objective, None
    layers = layer_bits(net)
    if objective == "bits":
        value = float(cfg.target_bits)
    elif objective == "memory":
        value = cfg.target_size_mb * 8e6 / sum(l.params for l in layers)
    else:
        value = cfg.target_bops_g * 1e9 / (8.0 * sum(l.macs for l in layers))
    low = float(bit_cost(objective, _uniform(layers, cfg.min_bits, cfg.act_floor)))
    high = float(bit_cost(objective, _uniform(layers, cfg.max_bits, cfg.max_bits)))
    if not low - 1e-6 <= value <= high + 1e-6:
        option = {"bits": "--target-bits", "memory": "--target-size",
                  "bops": "--target-bops"}[objective]
        hint = (f"lower --min-act-bits (activations stay at >= {cfg.act_floor} bits) or change "
                "the budget" if value < low and cfg.act_floor > cfg.min_bits else
                "change the budget")
        raise ConfigError(f"{option} is outside what --min-bits/--min-act-bits/--max-bits allow "
                          f"for this model (cost {value:.2f}, possible {low:.2f} to "
                          f"{high:.2f}); {hint}")
    return objective, value


def _uniform(layers: list[LayerBits], weight_bits: int, act_bits: int) -> list[LayerBits]:
    w, a = torch.tensor(float(weight_bits)), torch.tensor(float(act_bits))
    return [LayerBits(w, a if l.act_bits is not None else None, l.params, l.macs)
            for l in layers]


def budget_freezer(objective: str, budget: float | None,
                   moved: list[str]) -> Callable[[QuantizedNetwork], None] | None:
    """The freeze at the end of the learning phase onto the budget when there is one (``moved``
    receives the groups moved off their rounded bits); None: the plain freeze."""
    if budget is None:
        return None

    def freeze(net: QuantizedNetwork) -> None:
        moved.extend(freeze_to_budget(net, objective, budget))
    return freeze
