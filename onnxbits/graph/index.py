"""Pure ONNX graph helpers (onnx and numpy only): lookups, shapes, quantizable layers, Q/DQ reading.

A *layer site* is a Conv, ConvTranspose, Gemm or MatMul node whose weight (input 1) is constant:
an initializer, a ``Constant`` node, or ``DequantizeLinear(constant)`` as in QDQ models.
Nodes without a name are named ``<op_type>_<index>`` (as ``normalize.name_nodes`` does).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

log = logging.getLogger(__name__)

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Ops that move or select values without changing them: a quantized tensor stays on its grid.
GRID_PRESERVING = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
                   "MaxPool", "GlobalMaxPool", "Slice"}
_T = TensorProto
DTYPE_BITS: dict[int, int] = {
              _T.INT2: 2, _T.UINT2: 2, _T.INT4: 4, _T.UINT4: 4, _T.INT8: 8, _T.UINT8: 8,
              _T.INT16: 16, _T.UINT16: 16, _T.INT32: 32, _T.UINT32: 32, _T.FLOAT: 32,
              _T.FLOAT16: 16, _T.BFLOAT16: 16, _T.DOUBLE: 64, _T.FLOAT8E4M3FN: 8,
              _T.FLOAT8E4M3FNUZ: 8, _T.FLOAT8E5M2: 8, _T.FLOAT8E5M2FNUZ: 8, _T.FLOAT4E2M1: 4}
SIGNED_INT: set[int] = {_T.INT2, _T.INT4, _T.INT8, _T.INT16, _T.INT32}

Shape = list[int | str | None]


@dataclass(frozen=True)
class LayerSite:
    """A quantizable layer and the ONNX names the report and the emitter use.

    ``weight_name`` is the tensor the node reads (input 1); ``stored_name`` is the constant that
    holds the stored values (it differs when a DequantizeLinear sits between them).
    """

    name: str
    op: str
    weight_name: str
    input_name: str
    output_name: str
    weight_shape: tuple[int, ...]
    group: int = 1
    stored_name: str = ""
    bias_name: str | None = None


@dataclass(frozen=True)
class ActQuant:
    """Q -> [Clip] -> DQ on an activation: ``bits`` are the levels used (ceil(log2(levels)))."""

    tensor: str
    container_bits: int
    exec_bits: int
    bits: int
    signed: bool


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Return unique non-empty node names in graph order (``<op_type>_<index>`` if missing)."""
    seen: set[str] = set()
    names = []
    for index, node in enumerate(graph.node):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
        seen.add(name)
        names.append(name)
    return names


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Value of attribute ``name`` of ``node`` (``default`` when absent)."""
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class GraphIndex:
    """Producer/consumer maps and constant lookup of one (top-level) graph, built once."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.names = node_names(self.graph)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self._consts: dict[str, onnx.TensorProto] = {t.name: t for t in self.graph.initializer}
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers.setdefault(inp, []).append(node)
            if node.op_type == "Constant" and node.output:
                tensor = _constant_tensor(node)
                if tensor is not None:
                    self._consts[node.output[0]] = tensor

    def constant(self, name: str) -> onnx.TensorProto | None:
        """Return the TensorProto of the initializer or ``Constant`` output ``name``, else None."""
        return self._consts.get(name)

    def array(self, name: str) -> np.ndarray | None:
        """Return ``constant(name)`` as a numpy array (int2/int4 widened to int8), else None."""
        tensor = self._consts.get(name)
        if tensor is None:
            return None
        arr = numpy_helper.to_array(tensor)
        if tensor.data_type in (_T.INT2, _T.INT4, _T.UINT2, _T.UINT4):
            arr = arr.astype(np.int8 if tensor.data_type in SIGNED_INT else np.uint8)
        return arr

    def op_of(self, tensor: str) -> str | None:
        """Return the op type producing ``tensor`` (None for graph inputs and initializers)."""
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def q_dtype(self, q: onnx.NodeProto) -> int:
        """Return the output type of a QuantizeLinear: zero point type, output_dtype or uint8."""
        zp = self.constant(q.input[2]) if len(q.input) > 2 and q.input[2] else None
        if zp is not None:
            return zp.data_type
        return int(attr(q, "output_dtype", 0) or 0) or int(_T.UINT8)  # type: ignore[call-overload]


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(a)
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype), node.output[0])
    return None


def infer_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, Shape]:
    """Shapes of all tensors, with the symbolic batch dim (dim 0 of every input) set to ``batch``.

    Works on a copy. Dims are ints, symbolic names (str) or None when unknown. Tensors that
    shape inference cannot reach are missing; when inference fails, a warning says so and the
    shapes declared in the graph remain (best effort).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    inits = {t.name for t in copy.graph.initializer}
    for value in copy.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and len(dims) > 0 and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    del copy.graph.value_info[:]
    try:
        copy = onnx.shape_inference.infer_shapes(copy, strict_mode=False, data_prop=True)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError) as exc:
        # a partial answer beats none: keep the inputs and initializers, and say so
        log.warning("ONNX shape inference failed (%s): shapes, MACs and BOPs are known only "
                    "for the layers whose inputs are declared", str(exc).strip().splitlines()[0]
                    if str(exc).strip() else type(exc).__name__)
    shapes: dict[str, Shape] = {t.name: list(t.dims) for t in copy.graph.initializer}
    for value in [*copy.graph.input, *copy.graph.value_info, *copy.graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value")
                              else (d.dim_param or None) for d in tensor_type.shape.dim]
    return shapes


def weight_source(index: GraphIndex, tensor: str) -> tuple[str, onnx.NodeProto | None] | None:
    """Return ``(stored constant, DQ node or None)`` if ``tensor`` is a constant or DQ(constant)."""
    if index.constant(tensor) is not None:
        return tensor, None
    node = index.producer.get(tensor)
    if node is not None and node.op_type == "DequantizeLinear" and \
            index.constant(node.input[0]) is not None:
        return node.input[0], node
    return None


def quantizable_nodes(model: onnx.ModelProto, index: GraphIndex | None = None) -> list[LayerSite]:
    """Conv/ConvTranspose/Gemm/MatMul nodes with a constant weight input 1, in graph order.

    MatMul needs a 2-D weight (``x @ W``); the data input must not itself be constant.
    """
    index = index or GraphIndex(model)
    sites = []
    for node, name in zip(model.graph.node, index.names, strict=True):
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or not node.input[0]:
            continue
        source = weight_source(index, node.input[1])
        if source is None or weight_source(index, node.input[0]) is not None:
            continue
        stored, _ = source
        shape = tuple(int(d) for d in index.constant(stored).dims)  # type: ignore[union-attr]
        if node.op_type == "MatMul" and len(shape) != 2:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is None and node.op_type == "MatMul":
            bias = _matmul_bias(index, node.output[0], shape[-1])
        group = (int(attr(node, "group", 1))  # type: ignore[call-overload]
                 if node.op_type.startswith("Conv") else 1)
        sites.append(LayerSite(name, node.op_type, node.input[1], node.input[0], node.output[0],
                               shape, group, stored, bias))
    return sites


def _matmul_bias(index: GraphIndex, output: str, features: int) -> str | None:
    """Return the constant addend of a lone ``Add`` after a MatMul if it has ``features`` values."""
    users = index.consumers.get(output, [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    other = [t for t in users[0].input if t != output]
    source = weight_source(index, other[0]) if len(other) == 1 else None
    if source is None:
        return None
    dims = index.constant(source[0]).dims  # type: ignore[union-attr]
    return other[0] if math.prod(dims) == features else None


def activation_quant(index: GraphIndex, tensor: str) -> ActQuant | None:
    """Read ``Q -> [Clip(lo, hi)] -> DQ`` (or ``Clip -> Q -> DQ``) feeding ``tensor``.

    Walks back through grid-preserving ops. Container bits = Q output type bits. With an integer
    Clip between Q and DQ: exec bits = bits = ceil(log2(hi - lo + 1)). With a float Clip on the
    grid before Q: bits = ceil(log2((hi - lo) / scale + 1)), exec bits = container bits.
    """
    node = index.producer.get(tensor)
    while node is not None and node.op_type in GRID_PRESERVING:
        node = index.producer.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" \
            or index.constant(node.input[0]) is not None:
        return None
    q = index.producer.get(node.input[0])
    clip_bits = None
    if q is not None and q.op_type == "Clip":
        bounds = _clip_bounds(index, q)
        if bounds is not None:
            clip_bits = _levels_bits(bounds[1] - bounds[0] + 1)
        q = index.producer.get(q.input[0])
    if q is None or q.op_type != "QuantizeLinear":
        return None
    dtype = index.q_dtype(q)
    container = DTYPE_BITS.get(dtype, 8)
    bits = exec_bits = min(clip_bits or container, container)
    pre = index.producer.get(q.input[0])
    scale = index.array(q.input[1])
    if clip_bits is None and pre is not None and pre.op_type == "Clip" and scale is not None \
            and scale.size == 1:
        bounds = _clip_bounds(index, pre)
        if bounds is not None:
            steps = (bounds[1] - bounds[0]) / float(scale.reshape(-1)[0])
            if abs(steps - round(steps)) < 1e-3:
                bits = min(container, _levels_bits(round(steps) + 1))
    return ActQuant(tensor, container, exec_bits, bits, dtype in SIGNED_INT)


def _clip_bounds(index: GraphIndex, clip: onnx.NodeProto) -> tuple[float, float] | None:
    """Constant (min, max) of a Clip (inputs for opset >= 11, attributes before), else None."""
    if len(clip.input) >= 3 and clip.input[1] and clip.input[2]:
        lo, hi = index.array(clip.input[1]), index.array(clip.input[2])
        if lo is None or hi is None:
            return None
        return float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0])
    lo_attr, hi_attr = attr(clip, "min"), attr(clip, "max")
    if lo_attr is None or hi_attr is None:
        return None
    return float(lo_attr), float(hi_attr)  # type: ignore[arg-type]


def _levels_bits(levels: float) -> int:
    """Bits needed for ``levels`` distinct values: ceil(log2(levels)), at least 1."""
    return max(1, math.ceil(math.log2(max(levels, 2)) - 1e-9))


def weight_bits(index: GraphIndex, site: LayerSite) -> tuple[int, int, bool]:
    """``(bits, container_bits, quantized)`` of a layer's weight.

    Float weight: its float type bits. DQ weight: container = integer type bits; a signed weight
    with zero point 0 whose values fit ``[-(2^(k-1)-1), 2^(k-1)-1]`` reads as k bits
    (k = bit_length(max|q|) + 1, at least 2, at most the container).
    """
    stored = index.constant(site.stored_name)
    if stored is None:
        return 32, 32, False
    container = DTYPE_BITS.get(stored.data_type, 32)
    dq = index.producer.get(site.weight_name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return container, container, False
    zero = index.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
    if stored.data_type not in SIGNED_INT or (zero is not None and np.any(zero != 0)):
        return container, container, True
    values = index.array(site.stored_name)
    peak = int(np.abs(values.astype(np.int64)).max()) if values is not None and values.size else 0
    return min(container, max(2, peak.bit_length() + 1)), container, True
