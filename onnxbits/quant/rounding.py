"""Learned weight rounding (AdaRound, Nagel et al. 2020) for weights at frozen bits.

With the frozen bitlength ``k`` and the step ``s = alpha / qmax_k`` of every channel held fixed,
a weight ``w`` is quantized as::

    W(V) = s * clamp(floor(w / s) + h(V), qmin_k, qmax_k)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

with one ``V`` per weight, initialised so that ``h(V) = frac(w / s)`` (``W(V) = w`` inside the
clip range). The penalty ``R(V, beta) = sum(1 - |2 h(V) - 1|^beta)`` pushes every ``h`` to 0 or 1.
:meth:`LearnedRounding.hard_weight` is ``s * clamp(floor(w / s) + 1[h(V) >= 1/2], qmin, qmax)``:
a grid point, so nearest rounding (the frozen quantizer and the emitted graph) reproduces it
exactly once it replaces the float weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onnxbits.quant.quantizer import BitQuantizer

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: Tensor) -> Tensor:
    """``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def inverse_rectified_sigmoid(h: Tensor) -> Tensor:
    """``V`` with ``h(V) = h`` for ``h`` in ``(0, 1)`` (clamped a little inside)."""
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


class LearnedRounding(nn.Module):
    """The rounding of one weight tensor at its quantizer's frozen bits and clip values.

    ``hard=True``: the forward pass uses the hard rounding ``1[h(V) >= 1/2]`` and the backward
    pass the gradient of the soft ``h(V)`` (straight-through), so that the loss is always that of
    a quantized weight.
    """

    def __init__(self, weight: Tensor, quantizer: BitQuantizer, hard: bool = False) -> None:
        super().__init__()
        self.hard = hard
        if not quantizer.frozen:
            raise ValueError("learned rounding needs a quantizer with frozen bits")
        shape = [1] * weight.dim()
        axis = quantizer.channel_axis if quantizer.log_alpha.numel() > 1 else None
        if axis is not None:
            shape[axis] = -1
        bits = quantizer.frozen_bits.detach()
        qmax = torch.exp2(bits - 1) - 1 if quantizer.signed else torch.exp2(bits) - 1
        qmin = -qmax if quantizer.signed and quantizer.narrow else (
            -qmax - 1 if quantizer.signed else torch.zeros_like(qmax))
        step = (quantizer.alpha().detach() / qmax).reshape(shape)
        scaled = weight.detach().float() / step
        self.register_buffer("step", step)
        self.register_buffer("base", torch.floor(scaled))
        bits_shape = shape if bits.numel() > 1 else [1] * weight.dim()
        self.register_buffer("qmin", qmin.reshape(bits_shape))
        self.register_buffer("qmax", qmax.reshape(bits_shape))
        self.logits = nn.Parameter(inverse_rectified_sigmoid(scaled - self.base))

    def forward(self) -> Tensor:
        """The soft-rounded weight ``W(V)`` (hard-rounded with ``hard``)."""
        h = rectified_sigmoid(self.logits)
        if self.hard:
            h = h + ((h >= 0.5).to(h.dtype) - h).detach()
        q = torch.clamp(self.base + h, self.qmin, self.qmax)
        return q * self.step

    def penalty(self, beta: float) -> Tensor:
        """``R(V, beta) = sum(1 - |2 h(V) - 1|^beta)``."""
        h = rectified_sigmoid(self.logits)
        return (1 - (2 * h - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """``s * clamp(floor(w / s) + 1[h(V) >= 1/2], qmin, qmax)``."""
        up = (rectified_sigmoid(self.logits) >= 0.5).to(self.base.dtype)
        return torch.clamp(self.base + up, self.qmin, self.qmax) * self.step

    @torch.no_grad()
    def undecided(self) -> float:
        """Share of weights whose ``h(V)`` is strictly between 0 and 1."""
        h = rectified_sigmoid(self.logits)
        return float(((h > 0) & (h < 1)).float().mean())
