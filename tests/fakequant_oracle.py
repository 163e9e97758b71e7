"""Test oracles for the fake quantizer: ``interpolated_quant`` and ``fixed_quant`` take the clip
value ``alpha`` and the bits as plain tensors (scalars or varying along one axis of ``x``) and run
the same kernels as :func:`onnxbits.quant.fakequant.learned_quant` / ``frozen_quant``, with their
own autograd functions (gradients for ``x``, ``alpha`` and the interpolation weight ``a``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from onnxbits.quant.fakequant import (
    _compute_dtype,
    _fixed_backward,
    _fixed_forward,
    _interp_backward,
    _interp_forward,
    _Layout,
)


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


def interpolated_quant(x: Tensor, alpha: Tensor, lo: Tensor, a: Tensor, signed: bool,
                       narrow: bool) -> Tensor:
    """``(1 - a) * Q_int(x, lo) + a * Q_int(x, lo + 1)``; ``lo`` integer-valued, no gradient.

    ``alpha``, ``lo`` and ``a`` are scalars or vary along one axis of ``x`` (per channel).
    """
    return _InterpolatedQuant.apply(x, alpha, lo, a, signed, narrow)


def fixed_quant(x: Tensor, alpha: Tensor, bits: Tensor, signed: bool, narrow: bool) -> Tensor:
    """``Q_int(x, bits)`` with the straight-through estimator for x and LSQ for alpha."""
    return _FixedQuant.apply(x, alpha, bits, signed, narrow)


