"""Extra onnx2torch converters: newer opsets, asymmetric average pooling, ``allowzero`` reshape.

onnx2torch (1.5.15) resolves an op through ``defs.get_schema(op, opset).since_version`` and knows
no version newer than opset 17 for most ops. :func:`register` (idempotent; called by
:func:`onnxbits.importer.convert.convert`) adds, through onnx2torch's ``add_converter``:

* aliases for versions that only widened the accepted types (e.g. Transpose-21, Cast-19/21,
  Conv-22, Dropout-7): they reuse the newest older converter;
* ``ReduceMean``/``ReduceMax``/... at 18 and 20 (axes as an input, ``noop_with_empty_axes``);
* ``Split``-18 (``num_outputs``), ``Pad``-11 to 21 (a ``constant_value`` input, the ``axes``
  input, ``wrap`` mode),
  ``Resize``-18/19 (when the new attributes keep their defaults);
* ``Reshape``-14/19/21 with ``allowzero=1`` and ``AveragePool`` with asymmetric pads or
  dilations of 1 at every version (the onnx2torch converters reject both);
* ``Slice``-10/11/13 with constant starts/ends/axes/steps: the index tuple is built once
  (onnx2torch indexes with a list at every call, which torch deprecates with a warning per call).

Every unsupported case raises ``NotImplementedError`` saying what is missing; the importer turns
it into an :class:`onnxbits.errors.UnsupportedOpError` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from onnx2torch.node_converters.registry import (
    _CONVERTER_REGISTRY,
    OperationDescription,
    add_converter,
)
from onnx2torch.onnx_graph import OnnxGraph
from onnx2torch.onnx_node import OnnxNode
from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node
from torch import Tensor, nn

Converter = Callable[[OnnxNode, OnnxGraph], OperationConverterResult]

#: Versions that only changed the types an op accepts: they reuse the newest older converter.
TYPE_ONLY: dict[str, tuple[int, ...]] = {
    "Cast": (19, 21), "Constant": (19, 21), "ConstantOfShape": (20, 21), "Identity": (19, 21),
    "Shape": (19, 21), "Flatten": (21,), "Transpose": (21,), "Unsqueeze": (21,),
    "Equal": (19,), "GreaterOrEqual": (16,), "LessOrEqual": (16,), "IsInf": (20,),
    "IsNaN": (9, 20), "NonZero": (9,), "Gemm": (7,), "Dropout": (7, 22),
    "BatchNormalization": (7,), "Conv": (22,), "ConvTranspose": (22,), "MaxPool": (22,),
    "GlobalAveragePool": (22,), "InstanceNormalization": (22,), "Elu": (22,), "Selu": (22,),
    "HardSigmoid": (22,), "HardSwish": (22,), "Softplus": (22,), "Softsign": (22,),
    "Round": (22,), "Sin": (22,), "Cos": (22,), "Tan": (22,), "Asin": (22,), "Acos": (22,),
    "Atan": (22,), "EyeLike": (22,), "RoiAlign": (22,),
}
REDUCE_OPS = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
              "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSumSquare")
_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}
_registered = False


def known_versions(op: str, domain: str = "") -> list[int]:
    """The op versions onnx2torch (with these additions) can convert, oldest first."""
    return sorted(d.version for d in _CONVERTER_REGISTRY
                  if d.operation_type == op and d.domain == domain)


def _get(op: str, version: int) -> Converter | None:
    return _CONVERTER_REGISTRY.get(OperationDescription("", op, version))


def _add(op: str, version: int, converter: Converter, replace: bool = False) -> None:
    """Register ``converter`` for ``op``-``version`` (replacing the existing one if asked)."""
    if _get(op, version) is not None:
        if not replace:
            return
        del _CONVERTER_REGISTRY[OperationDescription("", op, version)]
    add_converter(operation_type=op, version=version)(converter)


def _const(node: OnnxNode, graph: OnnxGraph, index: int) -> list[int] | None:
    """A constant integer input of ``node`` as a list (None when absent)."""
    if len(node.input_values) <= index or not node.input_values[index]:
        return None
    name = node.input_values[index]
    if name not in graph.initializers:
        raise NotImplementedError(f"input {index} ('{name}') of {node.operation_type} must be a "
                                  "constant initializer")
    return [int(v) for v in graph.initializers[name].to_torch().reshape(-1).tolist()]


def _result(module: nn.Module, node: OnnxNode,
            inputs: int | None = None) -> OperationConverterResult:
    mapping = onnx_mapping_from_node(node) if inputs is None else OnnxMapping(
        inputs=node.input_values[:inputs], outputs=node.output_values)
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


class AvgPool(nn.Module):
    """ONNX ``AveragePool`` with any pads: ``sum(window of padded x) / count``, where the count
    excludes the pads unless ``count_include_pad`` (windows past the end never count)."""

    def __init__(self, kernel: list[int], strides: list[int], pads: list[int], ceil_mode: bool,
                 count_include_pad: bool) -> None:
        super().__init__()
        self.kernel, self.strides, self.pads = kernel, strides, pads
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad

    def forward(self, x: Tensor) -> Tensor:
        """Average-pool ``x`` (N, C, *spatial)."""
        rank = len(self.kernel)
        torch_pads: list[int] = []
        for begin, end in zip(self.pads[:rank][::-1], self.pads[rank:][::-1], strict=True):
            torch_pads += [begin, end]
        squeeze = rank == 1
        if squeeze:
            x = x.unsqueeze(-2)
        extra = [1] if squeeze else []
        kernel, strides = extra + self.kernel, extra + self.strides
        pool = F.avg_pool3d if len(kernel) == 3 else F.avg_pool2d
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        padded = F.pad(x, torch_pads)
        mask = F.pad(ones, torch_pads, value=1.0 if self.count_include_pad else 0.0)
        total = pool(padded, kernel, strides, 0, self.ceil_mode, True, 1)
        count = pool(mask, kernel, strides, 0, self.ceil_mode, True, 1)
        out = total / count.clamp_min(1.0)
        return out.squeeze(-2) if squeeze else out


def _average_pool(fallback: Converter | None) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        attrs = node.attributes
        kernel = list(attrs["kernel_shape"])
        rank = len(kernel)
        pads = list(attrs.get("pads", [0] * 2 * rank))
        dilations = list(attrs.get("dilations", [1] * rank))
        if any(d != 1 for d in dilations):
            raise NotImplementedError(f"AveragePool with dilations {dilations} is not implemented")
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise NotImplementedError(f"AveragePool auto_pad {attrs['auto_pad']} needs static "
                                      "input shapes")
        if fallback is not None and pads[:rank] == pads[rank:]:
            return fallback(node, graph)
        if rank > 3:
            raise NotImplementedError(f"AveragePool over {rank} spatial dimensions")
        module = AvgPool(kernel, list(attrs.get("strides", [1] * rank)), pads,
                         attrs.get("ceil_mode", 0) == 1, attrs.get("count_include_pad", 0) == 1)
        return _result(module, node)
    return convert


class Reduce(nn.Module):
    """``Reduce*`` over constant ``axes`` (all axes when empty, unless ``noop_with_empty_axes``)."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool, noop: bool) -> None:
        super().__init__()
        self.op, self.axes, self.keepdims, self.noop = op, axes, keepdims, noop

    def forward(self, x: Tensor) -> Tensor:
        """Reduce ``x`` over the axes."""
        if not self.axes and self.noop:
            return x
        dims = sorted(a % x.dim() for a in self.axes) if self.axes else list(range(x.dim()))
        keep = self.keepdims
        if self.op == "ReduceMean":
            return x.mean(dim=dims, keepdim=keep)
        if self.op == "ReduceL1":
            return x.abs().sum(dim=dims, keepdim=keep)
        if self.op == "ReduceL2":
            return x.square().sum(dim=dims, keepdim=keep).sqrt()
        if self.op == "ReduceSumSquare":
            return x.square().sum(dim=dims, keepdim=keep)
        if self.op == "ReduceLogSum":
            return x.sum(dim=dims, keepdim=keep).log()
        if self.op == "ReduceLogSumExp":
            return torch.logsumexp(x, dim=dims, keepdim=keep)
        out = x
        for d in sorted(dims, reverse=True):   # max/min/prod reduce one axis at a time
            if self.op == "ReduceProd":
                out = out.prod(dim=d, keepdim=keep)
            else:
                out = (out.amax if self.op == "ReduceMax" else out.amin)(dim=d, keepdim=keep)
        return out


def _reduce(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    module = Reduce(node.operation_type, _const(node, graph, 1),
                    attrs.get("keepdims", 1) == 1, attrs.get("noop_with_empty_axes", 0) == 1)
    return _result(module, node, inputs=1)


class SplitN(nn.Module):
    """``Split``-18 into ``num_outputs`` chunks of ``ceil(n / num_outputs)`` (the last smaller)."""

    def __init__(self, axis: int, num_outputs: int) -> None:
        super().__init__()
        self.axis, self.num_outputs = axis, num_outputs

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """Split ``x`` along the axis."""
        size = math.ceil(x.shape[self.axis] / self.num_outputs)
        return torch.split(x, size, dim=self.axis)


def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    if len(node.input_values) > 1 and node.input_values[1]:
        return _nearest("Split", 18)(node, graph)
    axis = node.attributes.get("axis", 0)
    num = node.attributes.get("num_outputs", len(node.output_values))
    return _result(SplitN(axis, num), node, inputs=1)


class Pad(nn.Module):
    """``Pad``-18+: ONNX pads (optionally only on ``axes``) in mode constant/reflect/edge/wrap."""

    def __init__(self, mode: str, axes: list[int] | None) -> None:
        super().__init__()
        self.mode, self.axes = _PAD_MODES[mode], axes

    def forward(self, x: Tensor, pads: Tensor, value: Tensor | None = None) -> Tensor:
        """Pad ``x`` by the ONNX ``pads`` (begins, then ends) with ``value`` or 0."""
        rank, given = x.dim(), [int(p) for p in pads.reshape(-1).tolist()]
        axes = [a % rank for a in self.axes] if self.axes else list(range(rank))
        begin, end = [0] * rank, [0] * rank
        for i, axis in enumerate(axes):
            begin[axis], end[axis] = given[i], given[i + len(axes)]
        torch_pads: list[int] = []
        for axis in reversed(range(rank)):
            torch_pads += [begin[axis], end[axis]]
        if self.mode != "constant":
            while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
                torch_pads = torch_pads[:-2]
            return F.pad(x, torch_pads, mode=self.mode)
        fill = 0.0 if value is None or value.numel() == 0 else float(value.reshape(-1)[0])
        return F.pad(x, torch_pads, mode="constant", value=fill)


def _pad18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    mode = node.attributes.get("mode", "constant")
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"Pad mode '{mode}' is not implemented")
    return _result(Pad(mode, _const(node, graph, 3)), node, inputs=3)


def _resize18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attrs = node.attributes
    changed = {name: attrs[name] for name, default in (
        ("antialias", 0), ("axes", None), ("keep_aspect_ratio_policy", "stretch"))
        if name in attrs and attrs[name] != default}
    if attrs.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        changed["coordinate_transformation_mode"] = "half_pixel_symmetric"
    if changed:
        raise NotImplementedError(f"Resize with {changed} is not implemented")
    return _nearest("Resize", 18)(node, graph)


class ReshapeAllowZero(nn.Module):
    """``Reshape`` with ``allowzero=1``: a 0 in ``shape`` is a dimension of size 0."""

    def forward(self, x: Tensor, shape: Tensor) -> Tensor:
        """Reshape ``x`` to ``shape`` taken literally."""
        return torch.reshape(x, [int(d) for d in shape.tolist()])


class ConstSlice(nn.Module):
    """ONNX ``Slice`` with constant arguments: ``flip(x, flip_dims)[index]``; a negative step
    flips the axis and maps ``start, end -> -start - 1, -end - 1`` (as onnx2torch does)."""

    def __init__(self, index: tuple[slice, ...], flip_dims: list[int]) -> None:
        super().__init__()
        self.index = index
        self.flip_dims = flip_dims

    def forward(self, x: Tensor, *constants: Tensor) -> Tensor:
        """Slice ``x`` (the constant inputs are already in ``index``)."""
        if self.flip_dims:
            x = torch.flip(x, dims=self.flip_dims)
        return x[self.index]


def _slice(fallback: Converter) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        try:
            starts, ends, axes, steps = (_const(node, graph, i) for i in range(1, 5))
        except NotImplementedError:          # a computed (not constant) argument
            return fallback(node, graph)
        axes = list(range(len(starts))) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        if min(axes, default=0) < 0:
            return fallback(node, graph)
        slices: dict[int, slice] = {}
        flip_dims = []
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            if step < 0:
                flip_dims.append(axis)
                start, end, step = -start - 1, -end - 1, -step
            slices[axis] = slice(start, end, step)
        index = tuple(slices.get(a, slice(None)) for a in range(max(axes, default=-1) + 1))
        return _result(ConstSlice(index, flip_dims), node)
    return convert


def _reshape(fallback: Converter) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        if node.attributes.get("allowzero", 0) != 1:
            return fallback(node, graph)
        return _result(ReshapeAllowZero(), node)
    return convert


def _nearest(op: str, version: int) -> Converter:
    """The newest converter below ``version``, else the oldest above it."""
    versions = sorted(d.version for d in _CONVERTER_REGISTRY
                      if d.domain == "" and d.operation_type == op and d.version != version)
    below = [v for v in versions if v < version]
    chosen = below[-1] if below else versions[0]
    return _CONVERTER_REGISTRY[OperationDescription("", op, chosen)]


def _alias(op: str, version: int) -> Converter:
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return _nearest(op, version)(node, graph)
    return convert


def register() -> None:
    """Add the converters listed in the module docstring to onnx2torch (once)."""
    global _registered
    if _registered:
        return
    reshape14 = _reshape(_nearest("Reshape", 14))
    for version in (14, 19, 21):
        _add("Reshape", version, reshape14, replace=version == 14)
    for version in (7, 10, 11, 19, 22):
        _add("AveragePool", version, _average_pool(_get("AveragePool", version)),
             replace=True)
    for op in REDUCE_OPS:
        _add(op, 18, _reduce)
    for op in ("ReduceMax", "ReduceMin"):
        _add(op, 20, _reduce)
    _add("Split", 18, _split18)
    for version in (10, 11, 13):
        _add("Slice", version, _slice(_get("Slice", version)), replace=True)
    for version in (11, 13, 18, 19, 21):   # onnx2torch's 11/13 pass constant_value as a Tensor
        _add("Pad", version, _pad18, replace=True)
    for version in (18, 19):
        _add("Resize", version, _resize18)
    for op, versions in TYPE_ONLY.items():
        for version in versions:
            _add(op, version, _alias(op, version))
    _registered = True

