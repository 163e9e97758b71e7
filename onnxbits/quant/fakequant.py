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

where ``r_k`` is the clamped integer.

The forward pass computes both integer quantizations and their interpolation
``y_lo + a * (y_hi - y_lo)`` in one elementwise kernel; the backward pass recomputes them from
the saved input and produces all three gradients in a second kernel (the per-group factors
``w_k / qmax_k`` are taken out of the sums). Only the input and a few per-group
numbers are saved. Inputs in float16/bfloat16 (autocast) are quantized in float32 and the result
is cast back to the input's dtype; the clip values and bitlengths stay float32.

The elementwise kernel bodies and how they run (eager or compiled) live in
:mod:`onnxbits.quant.kernels`.

:func:`learned_quant` and :func:`frozen_quant` are what :class:`BitQuantizer` calls: one autograd
node from ``(x, log_alpha, bits)``, optionally with the Relu/Relu6 before the quantizer fused in
(``input_clamp``), so that the activation between them is never written to memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from onnxbits.quant.kernels import (  # noqa: F401  (re-exported: the kernel switch)
    COMPILE_MIN_NUMEL,
    KERNELS,
    SERIAL_MAX_NUMEL,
    Clip,
    _fixed_bwd,
    _fixed_fwd,
    _interp_bwd,
    _interp_fwd,
    _run,
    _state,
    compile_error,
    get_kernel,
    levels,
    set_kernel,
)


@dataclass(frozen=True)
class _Layout:
    """How ``x`` is viewed as ``[G, K]``: G quantization groups (1, or the channels) of K values."""

    perm: tuple[int, ...] | None      # permutation applied before the reshape (None: identity)
    shape: tuple[int, ...]            # shape of the permuted tensor
    groups: int

    @staticmethod
    def along(x: Tensor, axis: int | None) -> _Layout:
        """Per-tensor (``axis=None``) or per-channel along ``axis``."""
        if axis is None:
            perm, groups = _dense_order(x), 1
        else:
            axis %= x.dim()
            perm = (axis, *[d for d in range(x.dim()) if d != axis])
            if axis == 0:
                perm = _dense_order(x) or None
            groups = x.shape[axis]
        shape = tuple(x.shape) if perm is None else tuple(x.shape[d] for d in perm)
        return _Layout(perm, shape, groups)

    def flat(self, t: Tensor) -> Tensor:
        """``t`` as ``[G, K]``; detached, so that the compiled kernels see one kind of tensor."""
        return (t if self.perm is None else t.permute(self.perm)).reshape(self.groups, -1).detach()

    def restore(self, t: Tensor) -> Tensor:
        t = t.reshape(self.shape)
        if self.perm is None:
            return t
        inverse = [0] * len(self.perm)
        for i, d in enumerate(self.perm):
            inverse[d] = i
        return t.permute(inverse)

    def column(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        """A parameter as a contiguous ``[G, 1]`` tensor of ``dtype``."""
        p = p.detach().to(dtype).reshape(-1, 1)
        return p if p.shape[0] == self.groups else p.expand(self.groups, 1).contiguous()


def _dense_order(x: Tensor) -> tuple[int, ...] | None:
    """A permutation that makes a channels-last ``x`` contiguous (elementwise order is free)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last):
        return (0, 2, 3, 1)
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last_3d):
        return (0, 2, 3, 4, 1)
    return None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _grid_params(alpha: Tensor, bits: Tensor, signed: bool, narrow: bool) -> list[Tensor]:
    """Per-group ``[step, qmin, qmax]`` at integer ``bits`` (``[G, 1]`` columns)."""
    qmin, qmax = levels(bits, signed, narrow)
    return [alpha / qmax, qmin, qmax]


def _interp_forward(ctx: Any, x: Tensor, layout: _Layout, alpha: Tensor, lo: Tensor, a: Tensor,
                    signed: bool, narrow: bool, clip: Clip = None) -> Tensor:
    """Forward of Q(x, n) on ``[G, 1]`` columns; saves what :func:`_interp_backward` needs."""
    grids = [*_grid_params(alpha, lo, signed, narrow), *_grid_params(alpha, lo + 1, signed, narrow)]
    ctx.save_for_backward(x, *grids, a)
    ctx.layout, ctx.clip = layout, clip
    return layout.restore(_run(_interp_fwd, layout.flat(x), *grids, a, clip))


def _interp_backward(ctx: Any, grad: Tensor, need_x: bool,
                     need_a: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    x, *params = ctx.saved_tensors
    layout: _Layout = ctx.layout
    grad_x, grad_alpha, grad_a = _run(_interp_bwd, layout.flat(x), layout.flat(grad), *params,
                                      ctx.clip, need_x, need_a)
    return (layout.restore(grad_x) if need_x else None), grad_alpha, grad_a


def _fixed_forward(ctx: Any, x: Tensor, layout: _Layout, alpha: Tensor, bits: Tensor,
                   signed: bool, narrow: bool, clip: Clip = None) -> Tensor:
    grid = _grid_params(alpha, bits, signed, narrow)
    ctx.save_for_backward(x, *grid)
    ctx.layout, ctx.clip = layout, clip
    return layout.restore(_run(_fixed_fwd, layout.flat(x), *grid, clip))


def _fixed_backward(ctx: Any, grad: Tensor, need_x: bool) -> tuple[Tensor | None, Tensor]:
    x, *grid = ctx.saved_tensors
    layout: _Layout = ctx.layout
    grad_x, grad_alpha = _run(_fixed_bwd, layout.flat(x), layout.flat(grad), *grid, ctx.clip,
                              need_x)
    return (layout.restore(grad_x) if need_x else None), grad_alpha


class _LearnedQuant(torch.autograd.Function):
    """:func:`learned_quant`: gradients for ``x``, ``log_alpha`` and ``bits``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log_alpha: Tensor, bits: Tensor,  # type: ignore[override]
                axis: int | None, min_bits: int, max_bits: int, signed: bool, narrow: bool,
                clip: Clip) -> Tensor:
        layout = _Layout.along(x, axis if max(log_alpha.numel(), bits.numel()) > 1 else None)
        dtype = _compute_dtype(x)
        n = bits.detach().clamp(min_bits, max_bits)
        lo = torch.clamp(torch.floor(n), min_bits, max(min_bits, max_bits - 1))
        a = n - lo
        alpha = layout.column(log_alpha.detach().exp(), dtype)
        ctx.alpha, ctx.numel = alpha, (log_alpha.numel(), bits.numel())
        return _interp_forward(ctx, x, layout, alpha, layout.column(lo, dtype),
                               layout.column(a, dtype), signed, narrow, clip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha, need_bits = ctx.needs_input_grad[:3]
        grad_x, grad_alpha, grad_a = _interp_backward(ctx, grad, need_x, need_bits)
        grad_bits = _sum_to(grad_a, ctx.numel[1]) if need_bits else None
        return (grad_x, _sum_to(grad_alpha * ctx.alpha, ctx.numel[0]) if need_alpha else None,
                grad_bits, None, None, None, None, None, None)


class _FrozenQuant(torch.autograd.Function):
    """:func:`frozen_quant`: gradients for ``x`` and ``log_alpha``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log_alpha: Tensor, bits: Tensor,  # type: ignore[override]
                axis: int | None, signed: bool, narrow: bool, clip: Clip) -> Tensor:
        layout = _Layout.along(x, axis if max(log_alpha.numel(), bits.numel()) > 1 else None)
        dtype = _compute_dtype(x)
        alpha = layout.column(log_alpha.detach().exp(), dtype)
        ctx.alpha, ctx.numel = alpha, log_alpha.numel()
        return _fixed_forward(ctx, x, layout, alpha, layout.column(bits, dtype), signed, narrow,
                              clip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha = ctx.needs_input_grad[:2]
        grad_x, grad_alpha = _fixed_backward(ctx, grad, need_x)
        return (grad_x, _sum_to(grad_alpha * ctx.alpha, ctx.numel) if need_alpha else None,
                None, None, None, None, None)


def _sum_to(grad: Tensor, numel: int) -> Tensor:
    """A ``[G, 1]`` gradient as the 1-D parameter of ``numel`` entries (float32)."""
    grad = grad.float().reshape(-1)
    return grad.sum().reshape(1) if numel == 1 and grad.numel() != 1 else grad


def learned_quant(x: Tensor, log_alpha: Tensor, bits: Tensor, axis: int | None, min_bits: int,
                  max_bits: int, signed: bool, narrow: bool, input_clamp: Clip = None) -> Tensor:
    """``Q(x, n)`` of a :class:`~onnxbits.quant.quantizer.BitQuantizer` in one autograd node.

    ``alpha = exp(log_alpha)``, ``n = clamp(bits, min_bits, max_bits)`` (straight-through: the
    gradient of ``bits`` is ``dQ/da``), ``lo = clamp(floor(n), min_bits, max_bits - 1)``,
    ``a = n - lo``; ``log_alpha`` and ``bits`` are 1-D, one entry or one per channel along
    ``axis``. With ``input_clamp=(lo, hi)`` the quantizer absorbs the
    Relu (``(0, None)``) or Relu6 (``(0, 6)``) that produced ``x``: it computes
    ``Q(clamp(x, lo, hi))`` and its gradients exactly as the two ops in a row would, but the
    clamped tensor is never stored, which halves the memory traffic of the pair.
    """
    return _LearnedQuant.apply(x, log_alpha, bits, axis, min_bits, max_bits, signed, narrow,
                               input_clamp)


def frozen_quant(x: Tensor, log_alpha: Tensor, bits: Tensor, axis: int | None, signed: bool,
                 narrow: bool, input_clamp: Clip = None) -> Tensor:
    """``Q_int(clamp(x), bits)`` with ``alpha = exp(log_alpha)`` in one autograd node (integer
    ``bits``); ``input_clamp`` as in :func:`learned_quant`."""
    return _FrozenQuant.apply(x, log_alpha, bits, axis, signed, narrow, input_clamp)
