"""Fake quantization with a fractional bitlength, as one autograd function.

For a clip value ``alpha > 0`` and an integer bitlength ``k``::

    step_k     = alpha / qmax_k
    Q_int(x,k) = clamp(round(x / step_k), qmin_k, qmax_k) * step_k      (round half to even)

and for a fractional bitlength ``n`` with ``lo = clamp(floor(n), min_bits, max_bits - 1)`` and
``a = n - lo`` (BitPruning's interpolation)::

    Q(x, n) = (1 - a) * Q_int(x, lo) + a * Q_int(x, lo + 1)

Gradients (straight-through estimator for the rounding; LSQ for the clip value)::

    dQ/dx     = (1 - a) * 1[x in range_lo] + a * 1[x in range_hi]
    dQ/dalpha = sum_k w_k * (r_k - (x / step_k) * 1[x in range_k]) / qmax_k,  w_lo = 1 - a, w_hi = a
    dQ/da     = Q_int(x, lo + 1) - Q_int(x, lo)

where ``r_k`` is the clamped integer. Both integer quantizations and all gradients are computed in
one forward and one backward pass; nothing but the inputs is saved for backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def levels(bits: Tensor, signed: bool, narrow: bool) -> tuple[Tensor, Tensor]:
    """Return ``(qmin, qmax)`` as float tensors for (possibly per-channel) integer ``bits``."""
    if signed:
        qmax = torch.exp2(bits - 1) - 1
        qmin = -qmax if narrow else -qmax - 1
    else:
        qmax = torch.exp2(bits) - 1
        qmin = torch.zeros_like(qmax)
    return qmin, qmax


def _quantize(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool,
              narrow: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return ``(y, v, r, qmax)``: output, scaled input, clamped integer and qmax at ``bits``."""
    qmin, qmax = levels(bits, signed, narrow)
    step = alpha / qmax
    v = x / step
    r = torch.minimum(torch.maximum(torch.round(v), qmin), qmax)
    return r * step, v, r, qmax


def _alpha_grad(v: Tensor, r: Tensor, qmax: Tensor) -> Tensor:
    """Per-element ``dQ_int/dalpha = (r - v * 1[in range]) / qmax`` (LSQ)."""
    inside = r == torch.round(v)
    return (r - torch.where(inside, v, torch.zeros_like(v))) / qmax


class _InterpolatedQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, lo: Tensor, a: Tensor,  # type: ignore[override]
                signed: bool, narrow: bool) -> Tensor:
        ctx.save_for_backward(x, alpha, lo, a)
        ctx.signed, ctx.narrow = signed, narrow
        y_lo = _quantize(x, alpha, lo, signed, narrow)[0]
        y_hi = _quantize(x, alpha, lo + 1, signed, narrow)[0]
        return y_lo + a * (y_hi - y_lo)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, alpha, lo, a = ctx.saved_tensors
        y_lo, v_lo, r_lo, qmax_lo = _quantize(x, alpha, lo, ctx.signed, ctx.narrow)
        y_hi, v_hi, r_hi, qmax_hi = _quantize(x, alpha, lo + 1, ctx.signed, ctx.narrow)
        w_hi = a
        w_lo = 1 - a
        in_lo = (r_lo == torch.round(v_lo)).to(grad.dtype)
        in_hi = (r_hi == torch.round(v_hi)).to(grad.dtype)
        grad_x = grad * (w_lo * in_lo + w_hi * in_hi) if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            d_alpha = w_lo * _alpha_grad(v_lo, r_lo, qmax_lo) + w_hi * _alpha_grad(v_hi, r_hi, qmax_hi)
            grad_alpha = (grad * d_alpha).sum_to_size(alpha.shape)
        grad_a = (grad * (y_hi - y_lo)).sum_to_size(a.shape) if ctx.needs_input_grad[3] else None
        return grad_x, grad_alpha, None, grad_a, None, None


class _FixedQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, bits: Tensor,  # type: ignore[override]
                signed: bool, narrow: bool) -> Tensor:
        ctx.save_for_backward(x, alpha, bits)
        ctx.signed, ctx.narrow = signed, narrow
        return _quantize(x, alpha, bits, signed, narrow)[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, alpha, bits = ctx.saved_tensors
        _, v, r, qmax = _quantize(x, alpha, bits, ctx.signed, ctx.narrow)
        inside = (r == torch.round(v)).to(grad.dtype)
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            grad_alpha = (grad * _alpha_grad(v, r, qmax)).sum_to_size(alpha.shape)
        return grad_x, grad_alpha, None, None, None


def interpolated_quant(x: Tensor, alpha: Tensor, lo: Tensor, a: Tensor, signed: bool,
                       narrow: bool) -> Tensor:
    """``(1 - a) * Q_int(x, lo) + a * Q_int(x, lo + 1)``; ``lo`` integer-valued, no gradient."""
    return _InterpolatedQuant.apply(x, alpha, lo, a, signed, narrow)


def fixed_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, narrow: bool) -> Tensor:
    """``Q_int(x, bits)`` with the straight-through estimator for x and LSQ for alpha."""
    return _FixedQuant.apply(x, alpha, bits, signed, narrow)
