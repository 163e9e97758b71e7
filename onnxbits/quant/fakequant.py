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

where ``r_k`` is the clamped integer. The forward pass computes both integer quantizations and
their interpolation ``y_lo + a * (y_hi - y_lo)`` in one elementwise kernel; the backward pass
recomputes them from the saved input and produces all three gradients in a second kernel (the
per-group factors ``w_k / qmax_k`` are taken out of the sums). Only the input and a few per-group
numbers are saved. Inputs in float16/bfloat16 (autocast) are quantized in float32 and the result
is cast back to the input's dtype; the clip values and bitlengths stay float32.

Kernels (:func:`set_kernel`, or the ``ONNXBITS_KERNEL`` environment variable): ``eager`` runs the
kernel bodies as a few in-place torch ops; ``compiled`` runs them through ``torch.compile`` (one
fused C++/OpenMP loop on CPU, one Triton kernel on CUDA); ``auto`` (default) compiles CPU tensors
of at least :data:`COMPILE_MIN_NUMEL` elements (the activations; below that eager is as fast) and
every CUDA tensor; below :data:`SERIAL_MAX_NUMEL` elements a CPU kernel runs on one thread. If
compilation fails (no C++ compiler, no Triton), a warning is logged and every later call runs
eagerly. The kernels compute the same operations in the same order: forward values are identical
to the last bit; gradients differ only in the order of the sums. The CUDA path (Triton kernels,
no host synchronisation in the hot path) has not been run on a GPU yet.

:func:`learned_quant` and :func:`frozen_quant` are what :class:`BitQuantizer` calls: one autograd
node from ``(x, log_alpha, bits)``, optionally with the Relu/Relu6 before the quantizer fused in
(``input_clamp``), so that the activation between them is never written to memory.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

Clip = tuple[float | None, float | None] | None     # a fused input clamp: (lo, hi), None = open

KERNELS = ("auto", "compiled", "eager")
COMPILE_MIN_NUMEL = 1 << 13
# Below this many elements a kernel runs on one thread: waking a second OpenMP thread costs more
# (~10-90 us, more on a busy machine) than the work it would take over (a weight is 0.01-0.3 ms).
SERIAL_MAX_NUMEL = 1 << 17
_state: dict[str, Any] = {"kernel": "auto", "compile_error": None, "compiled": {}}


def set_kernel(name: str) -> None:
    """Choose the elementwise kernel: ``auto``, ``compiled`` or ``eager`` (see module docstring)."""
    if name not in KERNELS:
        raise ValueError(f"unknown quantizer kernel '{name}'; choose one of {', '.join(KERNELS)}")
    _state["kernel"] = name


def get_kernel() -> str:
    """The kernel chosen with :func:`set_kernel` (``auto`` unless changed)."""
    return str(_state["kernel"])


def _kernel_from_env() -> None:
    name = os.environ.get("ONNXBITS_KERNEL")
    if name in KERNELS:
        _state["kernel"] = name
    elif name:
        log.warning("ONNXBITS_KERNEL=%s is not one of %s; using auto", name, ", ".join(KERNELS))


_kernel_from_env()


def compile_error() -> str | None:
    """Why ``torch.compile`` was given up (then every call runs eagerly), or None."""
    return _state["compile_error"]


def levels(bits: Tensor, signed: bool, narrow: bool) -> tuple[Tensor, Tensor]:
    """Return ``(qmin, qmax)`` as float tensors for (possibly per-channel) integer ``bits``."""
    if signed:
        qmax = torch.exp2(bits - 1) - 1
        qmin = -qmax if narrow else -qmax - 1
    else:
        qmax = torch.exp2(bits) - 1
        qmin = torch.zeros_like(qmax)
    return qmin, qmax


# --- kernel bodies on [G, K] views; every other argument is a [G, 1] tensor ------------------


def _grid(x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(v, r, inside)``: scaled input, clamped integer and ``1[round(v) in [qmin, qmax]]``."""
    v = x / step
    rounded = torch.round(v)
    r = torch.clamp(rounded, qmin, qmax)
    return v, r, r == rounded


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b, dim=1, keepdim=True)``: part of the fused loop when compiled; in eager one
    BLAS dot for a single group (the large activations) and a product and a sum otherwise."""
    if a.shape[0] == 1 and not torch.compiler.is_compiling():
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1, 1)
    return (a * b).sum(dim=1, keepdim=True)


def _input(x: Tensor, dtype: torch.dtype, clip: Clip) -> Tensor:
    """The input in the compute dtype, clamped to ``clip`` (a fused Relu/Relu6) if given."""
    xc = x.to(dtype)
    return xc if clip is None else torch.clamp(xc, clip[0], clip[1])


def _clip_grad(grad_x: Tensor, x: Tensor, clip: Clip) -> Tensor:
    """Zero the gradient where the fused clamp is saturated, as Relu/Hardtanh backward does:
    it passes where ``lo < x < hi`` (strict, an absent bound is no condition)."""
    if clip is None:
        return grad_x
    lo, hi = clip
    if lo is not None:
        grad_x = torch.where(x > lo, grad_x, 0.0)
    if hi is not None:
        grad_x = torch.where(x < hi, grad_x, 0.0)
    return grad_x


def _fixed_fwd(x: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor, clip: Clip) -> Tensor:
    y = torch.div(_input(x, step.dtype, clip), step).round_().clamp_(qmin, qmax).mul_(step)
    return y.to(x.dtype)


def _fixed_bwd(x: Tensor, g: Tensor, step: Tensor, qmin: Tensor, qmax: Tensor, clip: Clip,
               need_x: bool) -> tuple[Tensor | None, Tensor]:
    gc = g.to(step.dtype)
    v, r, inside = _grid(_input(x, step.dtype, clip), step, qmin, qmax)
    grad_x = None
    if need_x:
        grad_x = _clip_grad(torch.where(inside, gc, 0.0), x, clip).to(g.dtype)
    grad_alpha = _rowdot(gc, torch.where(inside, r - v, r)) / qmax
    return grad_x, grad_alpha


def _interp_fwd(x: Tensor, step_lo: Tensor, qmin_lo: Tensor, qmax_lo: Tensor, step_hi: Tensor,
                qmin_hi: Tensor, qmax_hi: Tensor, a: Tensor, clip: Clip) -> Tensor:
    xc = _input(x, a.dtype, clip)
    y_lo = torch.div(xc, step_lo).round_().clamp_(qmin_lo, qmax_lo).mul_(step_lo)
    y_hi = torch.div(xc, step_hi).round_().clamp_(qmin_hi, qmax_hi).mul_(step_hi)
    return y_hi.sub_(y_lo).mul_(a).add_(y_lo).to(x.dtype)


def _interp_bwd(x: Tensor, g: Tensor, step_lo: Tensor, qmin_lo: Tensor, qmax_lo: Tensor,
                step_hi: Tensor, qmin_hi: Tensor, qmax_hi: Tensor, a: Tensor, clip: Clip,
                need_x: bool, need_a: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    xc, gc = _input(x, a.dtype, clip), g.to(a.dtype)
    v_lo, r_lo, in_lo = _grid(xc, step_lo, qmin_lo, qmax_lo)
    v_hi, r_hi, in_hi = _grid(xc, step_hi, qmin_hi, qmax_hi)
    w_lo = 1 - a
    grad_x = None
    if need_x:
        grad_x = gc * (torch.where(in_lo, w_lo, 0.0) + torch.where(in_hi, a, 0.0))
        grad_x = _clip_grad(grad_x, x, clip).to(g.dtype)
    grad_alpha = (w_lo / qmax_lo * _rowdot(gc, torch.where(in_lo, r_lo - v_lo, r_lo))
                  + a / qmax_hi * _rowdot(gc, torch.where(in_hi, r_hi - v_hi, r_hi)))
    grad_a = _rowdot(gc, r_hi * step_hi - r_lo * step_lo) if need_a else None
    return grad_x, grad_alpha, grad_a


# --- dispatch ----------------------------------------------------------------------------------


def _import_cpp_extension_quietly() -> None:
    """Import ``torch.utils.cpp_extension`` (inductor does) without its import-time warning
    'No CUDA runtime is found' on CUDA builds of torch running on machines without a GPU."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)


def _compiled(body: Callable[..., Any], key: tuple[Any, ...]) -> Callable[..., Any]:
    """``torch.compile(body)`` for one kind of call (dtype, device, one group or many, threads,
    static arguments).

    Each kind gets its own copy of the body's code object, hence its own dynamo cache: sizes are
    dynamic, so every kind compiles once and no cache reaches dynamo's recompile limit.
    """
    compiled = _state["compiled"]
    if key not in compiled:
        _import_cpp_extension_quietly()
        code = body.__code__.replace()
        clone = types.FunctionType(code, body.__globals__, body.__name__, body.__defaults__,
                                   body.__closure__)
        compiled[key] = torch.compile(clone, dynamic=True, fullgraph=True)
    return compiled[key]


def _run(body: Callable[..., Any], x: Tensor, *args: Any) -> Any:
    """Run a kernel body eagerly or through ``torch.compile`` (see the module docstring)."""
    if torch.is_autocast_enabled(x.device.type):     # the bodies choose their own dtypes
        with torch.autocast(x.device.type, enabled=False):
            return _run(body, x, *args)
    threads = torch.get_num_threads()
    if threads > 1 and x.numel() < SERIAL_MAX_NUMEL and not x.is_cuda:
        torch.set_num_threads(1)                          # see SERIAL_MAX_NUMEL
        try:
            return _run(body, x, *args)
        finally:
            torch.set_num_threads(threads)
    kernel = _state["kernel"]
    use_compiled = _state["compile_error"] is None and (kernel == "compiled" or (
        kernel == "auto" and (x.is_cuda or x.numel() >= COMPILE_MIN_NUMEL)))
    if use_compiled:
        flags = tuple(arg for arg in args if not isinstance(arg, Tensor))   # static arguments
        # inductor's CPU code depends on the thread count (dynamo guards on it): one entry each
        key = (body.__name__, x.dtype, x.device.type, x.shape[0] == 1, x.shape[1] == 1,
               torch.get_num_threads(), *flags)
        try:
            return _compiled(body, key)(x, *args)
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
            _state["compile_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("torch.compile of the quantizer kernel failed (%s); quantizers run "
                        "eagerly from now on", _state["compile_error"])
    return body(x, *args)


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
        alpha = layout.column(log_alpha.detach().exp(), dtype)
        ctx.alpha, ctx.numel = alpha, (log_alpha.numel(), bits.numel())
        return _interp_forward(ctx, x, layout, alpha, layout.column(lo, dtype),
                               layout.column(n - lo, dtype), signed, narrow, clip)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_alpha, need_bits = ctx.needs_input_grad[:3]
        grad_x, grad_alpha, grad_a = _interp_backward(ctx, grad, need_x, need_bits)
        return (grad_x, _sum_to(grad_alpha * ctx.alpha, ctx.numel[0]) if need_alpha else None,
                _sum_to(grad_a, ctx.numel[1]) if need_bits else None, None, None, None, None, None,
                None)


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
                  max_bits: int, signed: bool, narrow: bool, input_clamp: Clip = None) -> Tensor:
    """``Q(x, n)`` of a :class:`~onnxbits.quant.quantizer.BitQuantizer` in one autograd node.

    ``alpha = exp(log_alpha)``, ``n = clamp(bits, min_bits, max_bits)`` (straight-through: the
    gradient of ``bits`` is ``dQ/da``), ``lo = clamp(floor(n), min_bits, max_bits - 1)``,
    ``a = n - lo``; ``log_alpha`` and ``bits`` are 1-D, one entry or one per channel along
    ``axis``. The same numbers as ``interpolated_quant(x, exp(log_alpha), lo, a)`` without the
    autograd nodes of the parametrisation. With ``input_clamp=(lo, hi)`` the quantizer absorbs the
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
