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

where ``r_k`` is the clamped integer. With a sharpness ``h >= 1`` (annealed by the fine-tune
towards the integer bits the freeze will pick) the interpolation weight becomes
``a_h = clamp(h (a - 1/2) + 1/2, 0, 1)`` and ``dQ/dn = h 1[0 < a_h < 1] (Q_int(x, lo + 1) -
Q_int(x, lo))``; ``h = 1`` is the plain interpolation, ``h -> inf`` rounds ``n`` half up.

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


@dataclass(frozen=True)
class _Like:
    """Shape and dtype of a parameter, to give its gradient the same."""

    shape: torch.Size
    dtype: torch.dtype

    @staticmethod
    def of(p: Tensor) -> _Like:
        return _Like(p.shape, p.dtype)

    def grad(self, grad: Tensor) -> Tensor:
        """A ``[G, 1]`` gradient summed/reshaped to the parameter's shape and dtype."""
        grad = grad.sum() if self.shape.numel() == 1 else grad
        return grad.reshape(self.shape).to(self.dtype)


def _group_axis(x: Tensor, params: tuple[Tensor, ...]) -> int | None:
    """The one axis of ``x`` along which the parameters vary, or None if all are scalars."""
    axis = None
    for p in params:
        if p.numel() == 1:
            continue
        shape = (1,) * (x.dim() - p.dim()) + tuple(p.shape)
        axes = [d for d, size in enumerate(shape) if size != 1]
        if len(shape) != x.dim() or len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]] or (
                axis is not None and axes[0] != axis):
            raise ValueError(f"clip value and bits of shape {tuple(p.shape)} must be scalars or "
                             f"vary along one axis of the input (shape {tuple(x.shape)})")
        axis = axes[0]
    return axis


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


class _InterpolatedQuant(torch.autograd.Function):
    """``interpolated_quant``: gradients for ``x``, ``alpha`` and ``a``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, lo: Tensor, a: Tensor,  # type: ignore[override]
                signed: bool, narrow: bool) -> Tensor:
        layout = _Layout.along(x, _group_axis(x, (alpha, lo, a)))
        dtype = _compute_dtype(x)
        ctx.like = (_Like.of(alpha), _Like.of(a))
        return _interp_forward(ctx, x, layout, layout.column(alpha, dtype),
                               layout.column(lo, dtype), layout.column(a, dtype), signed, narrow)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha, _, need_a = ctx.needs_input_grad[:4]
        grad_x, grad_alpha, grad_a = _interp_backward(ctx, grad, need_x, need_a)
        alpha, a = ctx.like
        return (grad_x, alpha.grad(grad_alpha) if need_alpha else None, None,
                a.grad(grad_a) if need_a else None, None, None)


class _FixedQuant(torch.autograd.Function):
    """``fixed_quant``: gradients for ``x`` and ``alpha``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, bits: Tensor,  # type: ignore[override]
                signed: bool, narrow: bool) -> Tensor:
        layout = _Layout.along(x, _group_axis(x, (alpha, bits)))
        dtype = _compute_dtype(x)
        ctx.like = _Like.of(alpha)
        return _fixed_forward(ctx, x, layout, layout.column(alpha, dtype),
                              layout.column(bits, dtype), signed, narrow)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha = ctx.needs_input_grad[:2]
        grad_x, grad_alpha = _fixed_backward(ctx, grad, need_x)
        return (grad_x, ctx.like.grad(grad_alpha) if need_alpha else None, None, None, None)


def sharpened_bits(n: Tensor, min_bits: Tensor | float, max_bits: Tensor | float,
                   sharpness: Tensor | float) -> Tensor:
    """The bitlength a sharpened interpolation uses: ``lo + a_h`` with ``lo = clamp(floor(n),
    min_bits, max(min_bits, max_bits - 1))`` (as :func:`learned_quant`), ``a = n - lo`` and
    ``a_h = clamp(h (a - 1/2) + 1/2, 0, 1)`` (``n`` already clamped to ``[min_bits, max_bits]``;
    gradient ``h`` where ``0 < a_h < 1``).

    >>> sharpened_bits(torch.tensor([4.25, 4.5, 4.5625, 4.625, 8.0]), 2, 8, 4.0).tolist()
    [4.0, 4.5, 4.75, 5.0, 8.0]
    """
    low = torch.as_tensor(min_bits)
    top = torch.maximum(torch.as_tensor(max_bits) - 1, low)
    lo = torch.minimum(torch.maximum(torch.floor(n.detach()), low), top).to(n.dtype)
    return lo + torch.clamp(sharpness * (n - lo - 0.5) + 0.5, 0.0, 1.0)


class _LearnedQuant(torch.autograd.Function):
    """:func:`learned_quant`: gradients for ``x``, ``log_alpha`` and ``bits``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, log_alpha: Tensor, bits: Tensor,  # type: ignore[override]
                axis: int | None, min_bits: int, max_bits: int, signed: bool, narrow: bool,
                clip: Clip, sharpness: float = 1.0) -> Tensor:
        layout = _Layout.along(x, axis if max(log_alpha.numel(), bits.numel()) > 1 else None)
        dtype = _compute_dtype(x)
        n = bits.detach().clamp(min_bits, max_bits)
        lo = torch.clamp(torch.floor(n), min_bits, max(min_bits, max_bits - 1))
        a = n - lo
        ctx.slope = None
        if sharpness != 1.0:
            a = sharpened_bits(n, min_bits, max_bits, sharpness) - lo
            ctx.slope = sharpness * ((a > 0) & (a < 1)).float()
        alpha = layout.column(log_alpha.detach().exp(), dtype)
        ctx.alpha, ctx.numel = alpha, (log_alpha.numel(), bits.numel())
        return _interp_forward(ctx, x, layout, alpha, layout.column(lo, dtype),
                               layout.column(a, dtype), signed, narrow, clip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha, need_bits = ctx.needs_input_grad[:3]
        grad_x, grad_alpha, grad_a = _interp_backward(ctx, grad, need_x, need_bits)
        grad_bits = None
        if need_bits:
            grad_bits = _sum_to(grad_a, ctx.numel[1])
            if ctx.slope is not None:
                grad_bits = grad_bits * ctx.slope
        return (grad_x, _sum_to(grad_alpha * ctx.alpha, ctx.numel[0]) if need_alpha else None,
                grad_bits, None, None, None, None, None, None, None)


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


def interpolated_quant(x: Tensor, alpha: Tensor, lo: Tensor, a: Tensor, signed: bool,
                       narrow: bool) -> Tensor:
    """``(1 - a) * Q_int(x, lo) + a * Q_int(x, lo + 1)``; ``lo`` integer-valued, no gradient.

    ``alpha``, ``lo`` and ``a`` are scalars or vary along one axis of ``x`` (per channel).
    """
    return _InterpolatedQuant.apply(x, alpha, lo, a, signed, narrow)


def fixed_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, narrow: bool) -> Tensor:
    """``Q_int(x, bits)`` with the straight-through estimator for x and LSQ for alpha."""
    return _FixedQuant.apply(x, alpha, bits, signed, narrow)


def learned_quant(x: Tensor, log_alpha: Tensor, bits: Tensor, axis: int | None, min_bits: int,
                  max_bits: int, signed: bool, narrow: bool, input_clamp: Clip = None,
                  sharpness: float = 1.0) -> Tensor:
    """``Q(x, n)`` of a :class:`~onnxbits.quant.quantizer.BitQuantizer` in one autograd node.

    ``alpha = exp(log_alpha)``, ``n = clamp(bits, min_bits, max_bits)`` (straight-through: the
    gradient of ``bits`` is ``dQ/da``), ``lo = clamp(floor(n), min_bits, max_bits - 1)``,
    ``a = n - lo``; ``log_alpha`` and ``bits`` are 1-D, one entry or one per channel along
    ``axis``. The same numbers as ``interpolated_quant(x, exp(log_alpha), lo, a)`` without the
    autograd nodes of the parametrisation. With ``input_clamp=(lo, hi)`` the quantizer absorbs the
    Relu (``(0, None)``) or Relu6 (``(0, 6)``) that produced ``x``: it computes
    ``Q(clamp(x, lo, hi))`` and its gradients exactly as the two ops in a row would, but the
    clamped tensor is never stored, which halves the memory traffic of the pair. ``sharpness``
    ``h`` replaces ``a`` by ``a_h`` as the module docstring states.
    """
    return _LearnedQuant.apply(x, log_alpha, bits, axis, min_bits, max_bits, signed, narrow,
                               input_clamp, sharpness)


def frozen_quant(x: Tensor, log_alpha: Tensor, bits: Tensor, axis: int | None, signed: bool,
                 narrow: bool, input_clamp: Clip = None) -> Tensor:
    """``Q_int(clamp(x), bits)`` with ``alpha = exp(log_alpha)`` in one autograd node (integer
    ``bits``); ``input_clamp`` as in :func:`learned_quant`."""
    return _FrozenQuant.apply(x, log_alpha, bits, axis, signed, narrow, input_clamp)
