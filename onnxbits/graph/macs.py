"""Parameters and multiply-accumulates (MACs) per layer, per sample (batch 1).

Formulas (weight shapes as stored in ONNX):
- Conv, weight ``[Cout, Cin/g, k1..kd]``: MACs = prod(out spatial) * Cout * (Cin/g) * prod(k)
  = prod(out spatial) * numel(W). Grouped/depthwise convs and 1D/2D/3D follow from the shape.
- ConvTranspose, weight ``[Cin, Cout/g, k...]``: MACs = prod(in spatial) * numel(W).
- Gemm/MatMul, output ``[.., M, N]`` with reduction K: MACs = M * K * N per sample; an ``[N, K]``
  input has M = 1, so MACs = numel(W) (K * N). A ``[N, T, K]`` input has M = T.
- Params = numel(W); bias elements are counted separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx

from onnxbits.graph.index import GraphIndex, LayerSite, Shape, attr, infer_shapes, quantizable_nodes


@dataclass(frozen=True)
class LayerCost:
    """Weight elements, bias elements and MACs (None when shapes are unknown) of one layer."""

    params: int
    bias_params: int
    macs: int | None


def _known(shape: Shape | None) -> list[int] | None:
    if shape is None:
        return None
    dims = [d for d in shape if isinstance(d, int) and d > 0]
    return dims if len(dims) == len(shape) else None


def conv_output_spatial(in_spatial: list[int], kernel: list[int], strides: list[int],
                        pads: list[int], dilations: list[int],
                        auto_pad: str = "NOTSET") -> list[int]:
    """Return the Conv output sizes: ``floor((i + p_begin + p_end - d*(k-1) - 1) / s) + 1``.

    ``SAME_*`` gives ``ceil(i / s)``, ``VALID`` gives ``ceil((i - d*(k-1)) / s)``.

    >>> conv_output_spatial([8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1])
    [8, 8]
    >>> conv_output_spatial([224], [3], [2], [0, 1], [1], "SAME_UPPER")
    [112]
    """
    dims = len(in_spatial)
    out = []
    for i, (size, k, s, d) in enumerate(zip(in_spatial, kernel, strides, dilations, strict=True)):
        if auto_pad.startswith("SAME"):
            out.append(-(-size // s))
        elif auto_pad == "VALID":
            out.append(-(-(size - d * (k - 1)) // s))
        else:
            out.append((size + pads[i] + pads[i + dims] - d * (k - 1) - 1) // s + 1)
    return out


def conv_macs(out_spatial: list[int], weight_shape: tuple[int, ...]) -> int:
    """Return the MACs of a Conv per sample: ``prod(out_spatial) * numel(W)``.

    >>> conv_macs([8, 8], (8, 3, 3, 3))   # 8x8 out * Cout 8 * Cin 3 * 3x3
    13824
    >>> conv_macs([8, 8], (8, 1, 3, 3))   # depthwise: Cin/g = 1
    4608
    """
    return math.prod(out_spatial) * math.prod(weight_shape)


def matmul_macs(rows: int, weight_shape: tuple[int, ...]) -> int:
    """Return the MACs of ``[rows, K] @ [K, N]`` per sample: ``rows * K * N``.

    >>> matmul_macs(1, (8, 10))
    80
    """
    return rows * math.prod(weight_shape)


def layer_cost(index: GraphIndex, site: LayerSite, shapes: dict[str, Shape]) -> LayerCost:
    """Return params, bias params and MACs of ``site`` from the batch-1 ``shapes``."""
    params = math.prod(site.weight_shape)
    bias = 0
    if site.bias_name:
        tensor = index.constant(site.bias_name)
        src = index.producer.get(site.bias_name)
        if tensor is None and src is not None and src.op_type == "DequantizeLinear":
            tensor = index.constant(src.input[0])
        bias = math.prod(tensor.dims) if tensor is not None else 0
    return LayerCost(params, bias, _macs(index, site, shapes))


def _macs(index: GraphIndex, site: LayerSite, shapes: dict[str, Shape]) -> int | None:
    out = _known(shapes.get(site.output_name))
    inp = _known(shapes.get(site.input_name))
    if site.op == "ConvTranspose":
        return conv_macs(inp[2:], site.weight_shape) if inp else None
    if site.op == "Conv":
        if out is None and inp is not None:
            node = index.producer[site.output_name]
            rank = len(site.weight_shape) - 2
            kernel = list(site.weight_shape[2:])
            out = [1, 1, *conv_output_spatial(
                inp[2:], kernel,
                list(attr(node, "strides", [1] * rank)),  # type: ignore[call-overload]
                list(attr(node, "pads", [0] * 2 * rank)),  # type: ignore[call-overload]
                list(attr(node, "dilations", [1] * rank)),  # type: ignore[call-overload]
                _text(attr(node, "auto_pad", "NOTSET")))]
        return conv_macs(out[2:], site.weight_shape) if out else None
    if site.op == "Gemm":  # 2-D [N, K] input: one row per sample
        return matmul_macs(1, site.weight_shape)
    shape = inp or out  # MatMul: rows per sample = prod of the dims between batch and the last
    return matmul_macs(math.prod(shape[1:-1]) if shape else 1, site.weight_shape)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def model_costs(model: onnx.ModelProto, index: GraphIndex | None = None,
                shapes: dict[str, Shape] | None = None) -> dict[str, LayerCost]:
    """Return layer name -> LayerCost for every quantizable layer of ``model`` (graph order)."""
    index = index or GraphIndex(model)
    shapes = shapes if shapes is not None else infer_shapes(model)
    return {s.name: layer_cost(index, s, shapes) for s in quantizable_nodes(model, index)}


def activation_bytes(model: onnx.ModelProto) -> int | None:
    """Bytes of every node output of one sample (float32): about what a training step keeps
    for its backward pass per sample. Outputs of unknown shape (dynamic sizes) are left out;
    None when no shape is known.

    >>> from onnx import helper, TensorProto
    >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])
    >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"]),
    ...                        helper.make_node("Neg", ["r"], ["y"])], "g", [x], [y])
    >>> activation_bytes(helper.make_model(g))   # two outputs of 3 * 4 * 4 floats
    384
    """
    shapes = infer_shapes(model, batch=1)
    sizes = [math.prod(dims) for node in model.graph.node for name in node.output
             if name and (dims := _known(shapes.get(name))) is not None]
    return 4 * sum(sizes) if sizes else None
