"""The learnable-bitlength quantizer module used for weights and activations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onnxbits.quant.fakequant import frozen_quant, learned_quant
from onnxbits.quant.kernels import levels

__all__ = ["BitQuantizer", "freeze_rule"]


def freeze_rule(bits: Tensor, min_bits: int, max_bits: int) -> Tensor:
    """The one rule that turns fractional bitlengths into integers: ``k = floor(n + 1/2)``,
    clamped to ``[min_bits, max_bits]`` (round half up).

    >>> freeze_rule(torch.tensor([2.49, 2.5, 7.9, 9.0]), 2, 8).tolist()
    [2.0, 3.0, 8.0, 8.0]
    """
    return torch.clamp(torch.floor(bits + 0.5), min_bits, max_bits)


class BitQuantizer(nn.Module):
    """Fake-quantizer with a learnable clip value ``alpha`` and a learnable fractional bitlength.

    ``forward(x) = Q(x, n)`` as defined in :mod:`onnxbits.quant.fakequant`, with
    ``alpha = exp(log_alpha)`` (one per channel along ``channel_axis``, or one per tensor) and
    ``n`` one per tensor (``per_channel_bits=False``) or one per channel. After :meth:`freeze`
    the bitlength is an integer ``k`` and ``forward(x) = Q_int(x, k)``. ``exec_bits`` overrides
    the frozen bits to simulate a runtime that executes the tensor at a different resolution over
    the same clip range. ``input_clamp=(lo, hi)`` (``None`` for an open bound) makes the quantizer
    absorb the Relu ``(0, None)`` or Relu6 ``(0, 6)`` that produces its input:
    ``forward(x) = Q(clamp(x, lo, hi), n)`` with the gradients of the two ops in a row, computed
    in one kernel without storing the clamped tensor (see :meth:`quantized_input`).
    """

    def __init__(self, *, signed: bool, narrow: bool = False, num_channels: int = 1,
                 channel_axis: int = 0, per_channel_bits: bool = False, min_bits: int = 2,
                 max_bits: int = 8, init_bits: float | None = None,
                 input_clamp: tuple[float | None, float | None] | None = None) -> None:
        super().__init__()
        if not 1 <= min_bits <= max_bits <= 16:
            raise ValueError(f"need 1 <= min_bits <= max_bits <= 16, got {min_bits}, {max_bits}")
        self.signed = signed
        self.narrow = narrow
        self.channel_axis = channel_axis
        self.min_bits = min_bits
        self.max_bits = max_bits
        n_bits = num_channels if per_channel_bits else 1
        start = float(max_bits if init_bits is None else init_bits)
        self.log_alpha = nn.Parameter(torch.zeros(num_channels))
        self.bits = nn.Parameter(torch.full((n_bits,), start))
        self.register_buffer("frozen_bits", torch.zeros(n_bits))
        self.frozen = False
        self.enabled = True
        self.exec_bits: int | None = None
        self.input_clamp = input_clamp

    def extra_repr(self) -> str:
        bits = self.frozen_bits if self.frozen else self.bits.detach()
        kind = "frozen" if self.frozen else "learned"
        alpha = self.alpha().detach()
        clamp = "" if self.input_clamp is None else f", input_clamp={self.input_clamp}"
        return (f"signed={self.signed}, channels={alpha.numel()}, {kind} bits="
                f"{bits.mean().item():.2f}, alpha~{alpha.mean().item():.4g}{clamp}")

    def quantized_input(self, x: Tensor) -> Tensor:
        """The tensor that is quantized: ``x``, or ``clamp(x, *input_clamp)`` when a Relu/Relu6
        is fused in (use it where the quantizer's input statistics are needed, e.g. calibration)."""
        if self.input_clamp is None:
            return x
        return torch.clamp(x, *self.input_clamp)

    def alpha(self) -> Tensor:
        """The clip value(s) ``exp(log_alpha)``."""
        return self.log_alpha.exp()

    def effective_bits(self) -> Tensor:
        """Per-group bitlength: the fractional ``n`` (clamped, straight-through) or the frozen
        integer."""
        if self.frozen:
            return self.frozen_bits
        return self.bits + (self.bits.clamp(self.min_bits, self.max_bits) - self.bits).detach()

    @torch.no_grad()
    def init_alpha(self, alpha: Tensor) -> None:
        """Set the clip value(s) (broadcast to the channel count); values <= 0 become tiny."""
        self.log_alpha.copy_(torch.log(alpha.float().clamp_min(1e-8)).expand_as(self.log_alpha))

    @torch.no_grad()
    def clamp_bits(self) -> None:
        """Keep the learnable bitlength inside ``[min_bits, max_bits]``.

        Called after every optimizer step."""
        self.bits.clamp_(self.min_bits, self.max_bits)

    @torch.no_grad()
    def freeze(self, bits: Tensor | None = None) -> None:
        """Fix integer bits: ``bits`` if given, else :func:`freeze_rule` of the learned ``n``."""
        k = freeze_rule(self.bits, self.min_bits, self.max_bits) if bits is None else bits
        self.frozen_bits.copy_(torch.as_tensor(k, dtype=torch.float32).expand_as(self.frozen_bits))
        self.frozen = True
        self.bits.requires_grad_(False)

    def step(self) -> Tensor:
        """Quantization step ``alpha / qmax`` at the bits used in forward (frozen or exec)."""
        _, qmax = levels(self._forward_bits(), self.signed, self.narrow)
        return self.alpha() / qmax

    def _forward_bits(self) -> Tensor:
        if self.exec_bits is not None:
            return torch.full_like(self.frozen_bits, float(self.exec_bits))
        return self.frozen_bits

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.quantized_input(x)
        # One autograd node per call: alpha = exp(log_alpha) and the clamp/floor of the bits are
        # computed inside (see fakequant.learned_quant); the arithmetic stays in float32.
        axis = self.channel_axis if self.log_alpha.numel() > 1 else None
        if self.frozen or self.exec_bits is not None:
            return frozen_quant(x, self.log_alpha, self._forward_bits(), axis, self.signed,
                                self.narrow, self.input_clamp)
        return learned_quant(x, self.log_alpha, self.bits, axis, self.min_bits, self.max_bits,
                             self.signed, self.narrow, self.input_clamp)
