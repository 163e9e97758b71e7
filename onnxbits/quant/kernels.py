"""Elementwise bodies of the fake-quantization kernels and how they run.

Kernels (:func:`set_kernel`, or the ``ONNXBITS_KERNEL`` environment variable): ``eager`` runs the
kernel bodies as a few in-place torch ops; ``compiled`` runs them through ``torch.compile`` (one
fused C++/OpenMP loop on CPU, one Triton kernel on CUDA); ``auto`` (default) compiles CPU tensors
of at least :data:`COMPILE_MIN_NUMEL` elements (the activations; below that eager is as fast) and
every CUDA tensor; below :data:`SERIAL_MAX_NUMEL` elements a CPU kernel runs on one thread. If
compilation fails (no C++ compiler, no Triton), a warning is logged and every later call runs
eagerly. The kernels compute the same operations in the same order: forward values are identical
to the last bit; gradients differ only in the order of the sums. The CUDA path (Triton kernels,
no host synchronisation in the hot path) has run on a GPU (an H200): ``tests/test_device.py``
shrinks with ``--device cuda`` and verifies the emitted model in ONNX Runtime; no test compares
the Triton and the eager kernels element by element on a GPU.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Callable
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
        except torch.OutOfMemoryError:    # not a compiler failure: the caller must see it
            raise
        except Exception as exc:  # noqa: BLE001 - inductor/dynamo/C-compiler failures: run eagerly
            if "out of memory" in str(exc).lower():       # an OOM wrapped by dynamo
                raise
            result = body(x, *args)    # an error of the inputs repeats here, raised as it is
            _state["compile_error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            log.warning("torch.compile of the quantizer kernel failed (%s); quantizers run "
                        "eagerly from now on", _state["compile_error"])
            return result
    return body(x, *args)
