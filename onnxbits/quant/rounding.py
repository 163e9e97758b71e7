"""Learned weight rounding for weights at frozen bits (AdaRound's parametrisation, hard forward).

With the frozen bitlength ``k`` and the step ``s = alpha / qmax_k`` of every channel held fixed,
each weight ``w`` may round down or up::

    W(V) = s * clamp(floor(w / s) + 1[h(V) >= 1/2], qmin_k, qmax_k)
    h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

with one logit ``V`` per weight, initialised so that ``h(V) = frac(w / s)`` (so ``W(V)`` starts
as nearest rounding). The forward pass uses the hard rounding and the backward pass the gradient
of the soft ``h(V)`` (straight-through): ``dW/dV = s * dh/dV`` inside the clip range. AdaRound's
soft forward ``floor(w / s) + h(V)`` with a penalty driving ``h`` to 0 or 1 needs thousands of
steps to settle; with the frozen phase's few hundred the soft weights never became hard.
:meth:`LearnedRounding.hard_weight` is ``W(V)`` without gradient: a grid point, so nearest
rounding (the frozen quantizer and the emitted graph) reproduces it exactly once it replaces the
float weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onnxbits.quant.kernels import levels
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
    """The up/down rounding of one weight tensor at its quantizer's frozen bits and clip values."""

    def __init__(self, weight: Tensor, quantizer: BitQuantizer) -> None:
        super().__init__()
        if not quantizer.frozen:
            raise ValueError("learned rounding needs a quantizer with frozen bits")
        shape = [1] * weight.dim()
        axis = quantizer.channel_axis if quantizer.log_alpha.numel() > 1 else None
        if axis is not None:
            shape[axis] = -1
        bits = quantizer.frozen_bits.detach()
        qmin, qmax = levels(bits, quantizer.signed, quantizer.narrow)
        step = (quantizer.alpha().detach() / qmax).reshape(shape)
        scaled = weight.detach().float() / step
        bits_shape = shape if bits.numel() > 1 else [1] * weight.dim()
        self.register_buffer("step", step)
        self.register_buffer("base", torch.floor(scaled))
        self.register_buffer("qmin", qmin.reshape(bits_shape))
        self.register_buffer("qmax", qmax.reshape(bits_shape))
        self.logits = nn.Parameter(inverse_rectified_sigmoid(scaled - self.base))

    def forward(self) -> Tensor:
        """``W(V)``, with the straight-through gradient of ``h(V)``."""
        h = rectified_sigmoid(self.logits)
        h = h + ((h >= 0.5).to(h.dtype) - h).detach()
        return torch.clamp(self.base + h, self.qmin, self.qmax) * self.step

    @torch.no_grad()
    def hard_weight(self) -> Tensor:
        """``W(V)`` as a plain tensor: ``s * clamp(floor(w / s) + 1[h(V) >= 1/2], qmin, qmax)``."""
        up = (rectified_sigmoid(self.logits) >= 0.5).to(self.base.dtype)
        return torch.clamp(self.base + up, self.qmin, self.qmax) * self.step
