"""k-bit weight streams for the ``pack`` target (:mod:`onnxbits.emit.pack`): numpy packing and the
ONNX function that decodes a stream back into int8 weights.

Layout: weights in C order, shifted to ``u = q + 2^(k-1) - 1`` (so ``0 <= u < 2^k``), padded
with ``u = 0`` to a multiple of 8; value ``i`` occupies bits ``k i .. k i + k - 1`` of the
little-endian stream; the stream is stored as ``[groups, k]`` bytes (8 values per k bytes).
Value ``j`` of a group is ``(b[lo_j] + 256 b[hi_j]) // 2^(k j mod 8) mod 2^k`` with
``lo_j = floor(k j / 8)`` and ``hi_j = min(lo_j + 1, k - 1)`` (:func:`decoder_tables`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FUNCTION_DOMAIN = "onnxbits"


def pack_bits(q: np.ndarray, k: int) -> np.ndarray:
    """Pack narrow-range signed ``k``-bit integers into a ``[groups, k]`` uint8 stream.

    >>> pack_bits(np.array([-3, 3, 0, 1], np.int8), 3).tolist()
    [[240, 8, 0]]
    >>> unpack_bits(pack_bits(np.array([-3, 3, 0, 1], np.int8), 3), 3, 4).tolist()
    [-3, 3, 0, 1]
    """
    offset = 2 ** (k - 1) - 1
    u = q.reshape(-1).astype(np.int64) + offset
    if u.size and (u.min() < 0 or u.max() >= 2**k):
        raise ValueError(f"values outside the {k}-bit range")
    groups = -(-u.size // 8)
    padded = np.zeros(groups * 8, np.int64)
    padded[:u.size] = u
    bits = (padded[:, None] >> np.arange(k)) & 1            # [n, k] little-endian bits
    stream = bits.reshape(groups, k, 8)
    return (stream << np.arange(8)).sum(axis=2).astype(np.uint8)


def decoder_tables(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte index of the low byte, of the high byte (clamped) and the shift of each of 8 values."""
    start = np.arange(8) * k
    lo = start // 8
    hi = np.minimum(lo + 1, k - 1)
    return lo.astype(np.int64), hi.astype(np.int64), (2 ** (start % 8)).astype(np.int32)


def unpack_bits(stream: np.ndarray, k: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`, computed as the decoder subgraph does."""
    lo, hi, div = decoder_tables(k)
    b = stream.astype(np.int32)
    word = b[:, lo] + b[:, hi] * 256
    u = (word // div) % (2**k)
    return (u - (2 ** (k - 1) - 1)).astype(np.int8).reshape(-1)[:count]


def decoder_function(k: int, opset: int) -> onnx.FunctionProto:
    """``onnxbits.Unpack<k>(stream uint8 [groups, k], shape int64 [rank]) -> int8 weights``."""
    lo, hi, div = decoder_tables(k)

    def const(name: str, array: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))

    nodes = [
        const("lo_idx", lo), const("hi_idx", hi), const("div", div),
        const("mod", np.array(2**k, np.int32)),
        const("offset", np.array(2 ** (k - 1) - 1, np.int32)),
        const("byte", np.array(256, np.int32)), const("flat_shape", np.array([-1], np.int64)),
        const("start", np.array([0], np.int64)),
        helper.make_node("Cast", ["stream"], ["b"], to=TensorProto.INT32),
        helper.make_node("Gather", ["b", "lo_idx"], ["lo"], axis=1),
        helper.make_node("Gather", ["b", "hi_idx"], ["hi"], axis=1),
        helper.make_node("Mul", ["hi", "byte"], ["hi_shifted"]),
        helper.make_node("Add", ["lo", "hi_shifted"], ["word"]),
        helper.make_node("Div", ["word", "div"], ["shifted"]),
        helper.make_node("Mod", ["shifted", "mod"], ["u"]),
        helper.make_node("Sub", ["u", "offset"], ["q32"]),
        helper.make_node("Cast", ["q32"], ["q8"], to=TensorProto.INT8),
        helper.make_node("Reshape", ["q8", "flat_shape"], ["flat"]),
        helper.make_node("ReduceProd", ["shape"], ["count"], keepdims=1),
        helper.make_node("Slice", ["flat", "start", "count"], ["values"]),
        helper.make_node("Reshape", ["values", "shape"], ["weights"]),
    ]
    return helper.make_function(FUNCTION_DOMAIN, f"Unpack{k}", ["stream", "shape"], ["weights"],
                                nodes, [helper.make_opsetid("", opset)],
                                doc_string=f"{k}-bit stream -> int8 (onnxbits.emit.pack)")
