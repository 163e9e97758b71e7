"""What the emitter writes for each quantizer: integer weights and scales, activation Q/DQ
parameters per target, and exact int32 encodings of float values.

Weights: ``W_int = clamp(round(W / s_c), -(2^(k-1) - 1), 2^(k-1) - 1)``, ``s_c`` the weight
quantizer's per-channel step, computed exactly as the torch forward does. Activations on the
``ort`` / ``pack`` targets execute at 8 bits over the learned clip range (uint8, zero point 0
after Relu, 128 for signed tensors); on ``exact-sim`` at the learned ``k`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto

from onnxbits.importer.convert import Site
from onnxbits.quant.network import QuantizedNetwork
from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.quant.ranges import qrange

EXEC_BITS_ORT = 8
INT8_TARGETS = ("ort", "pack")  # activations execute at 8 bits over the learned clip range


def exec_bits(target: str, bits: int) -> int:
    """Bits ONNX Runtime executes an activation learned at ``bits`` at, on ``target``."""
    return EXEC_BITS_ORT if target in INT8_TARGETS else bits


@dataclass(frozen=True)
class WeightTensors:
    """Integer weight (ONNX layout), per-channel scale and the channel axis."""

    integers: np.ndarray
    scale: np.ndarray
    axis: int


def quantized_weight(site: Site, net: QuantizedNetwork) -> WeightTensors:
    """Integers and scales of a site's weight, computed exactly as the torch forward does."""
    layer = net.layers[site.node]
    wq = layer.wq
    w = layer.float_weight().detach()
    step = wq.step().detach()
    shape = [1] * w.dim()
    shape[wq.channel_axis] = -1
    step_b = step.reshape(shape) if step.numel() > 1 else step.reshape(())
    qmax = (torch.exp2(wq.frozen_bits - 1) - 1).expand_as(step)
    qmax_b = qmax.reshape(shape) if qmax.numel() > 1 else qmax.reshape(())
    r = torch.minimum(torch.maximum(torch.round(w / step_b), -qmax_b), qmax_b)
    integers = r.to(torch.int8).numpy()
    scale = np.broadcast_to(step.numpy().astype(np.float32), (w.shape[wq.channel_axis],)).copy()
    if site.transposed:
        integers = integers.T.copy()
    return WeightTensors(integers, scale, site.weight_axis)


@dataclass(frozen=True)
class ActParams:
    """How one activation quantizer is written: scale, container, zero point, Clip range."""

    scale: np.ndarray   # float32 scalar
    dtype: int          # TensorProto.UINT8 / INT8
    zero_point: int
    qmin: int           # k-bit range (exact-sim Clip bounds)
    qmax: int
    bits: int
    exec_bits: int


def activation_params(q: BitQuantizer, target: str) -> ActParams:
    """The Q/DQ parameters of activation quantizer ``q`` on ``target``."""
    k = int(q.frozen_bits.reshape(-1)[0])
    bits = exec_bits(target, k)
    saved = q.exec_bits
    q.exec_bits = bits
    scale = q.step().detach().numpy().astype(np.float32).reshape(())
    q.exec_bits = saved
    qmin, qmax = qrange(k, q.signed)
    if target in INT8_TARGETS:
        return ActParams(scale, TensorProto.UINT8, 128 if q.signed else 0, qmin, qmax, k, bits)
    dtype = TensorProto.INT8 if q.signed else TensorProto.UINT8
    return ActParams(scale, dtype, 0, qmin, qmax, k, bits)


def lossless_int32(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(q, s)``, int32 and float32 per element, with ``q * s == values`` exactly:
    ``s = 2^(e - 24)`` for ``values = m 2^e``, ``0.5 <= |m| < 1`` (subnormals flush to 0).

    >>> q, s = lossless_int32(np.array([0.1, -3.0, 0.0], np.float32))
    >>> bool(np.all(q * s == np.array([0.1, -3.0, 0.0], np.float32)))
    True
    """
    v = values.astype(np.float32)
    _, exponent = np.frexp(v)
    scale = np.ldexp(np.float32(1.0), np.maximum(exponent - 24, -126)).astype(np.float32)
    return np.round(v / scale).astype(np.int32), scale
