"""Round-STE bitlength quantization: the alternative to BitPruning's interpolation (ablation).

The bitlength is rounded in the forward pass with a straight-through estimator and the
quantization step is derived from it, so ``n`` gets its gradient through the step and the
clamp bounds alone (as in Brevitas' learned bit widths)::

    k    = n + stopgrad(round(n) - n)       (n: the clamped bitlength, BitQuantizer.effective_bits)
    qmax = 2**(k - 1) - 1 (signed) or 2**k - 1 (unsigned);  qmin = -qmax (narrow), -qmax - 1, 0
    Q(x) = (r + stopgrad(round(r) - r)) * alpha / qmax,     r = clamp(x qmax / alpha, qmin, qmax)

Eager torch ops; only used when ``BitQuantizer.rounding == "ste"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from onnxbits.quant.kernels import levels


def _round_ste(x: Tensor) -> Tensor:
    return x + (torch.round(x) - x).detach()


def round_ste_quant(x: Tensor, log_alpha: Tensor, bits: Tensor, axis: int | None, signed: bool,
                    narrow: bool) -> Tensor:
    """``Q(x)`` above; ``log_alpha`` per tensor or per channel along ``axis``, ``bits`` (already
    clamped to the bit range) a one-element tensor or one per channel."""
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    qmin, qmax = levels(_round_ste(bits), signed, narrow)
    alpha = log_alpha.exp()
    qmax, qmin, alpha = (t.reshape(shape) if t.numel() > 1 else t.reshape([]) for t in
                         (qmax, qmin, alpha))
    r = torch.minimum(torch.maximum(x.float() * qmax / alpha, qmin), qmax)
    return (_round_ste(r) * alpha / qmax).to(x.dtype)
