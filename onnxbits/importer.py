"""ONNX -> trainable torch graph (onnx2torch) plus the list of quantizable layers.

A *site* is a Conv, Gemm or MatMul node of the ONNX graph whose weight is a constant
initializer; it keeps the ONNX names (node, weight, bias, data input) that the emitter edits, and
the fx target of the torch module that computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx
from torch import fx, nn

from onnxbits.errors import UnsupportedOpError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
UNSIGNED_PRODUCERS = {"Relu"}
PASS_THROUGH = {"MaxPool", "GlobalMaxPool", "AveragePool", "GlobalAveragePool", "Flatten",
                "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Resize",
                "Upsample", "SpaceToDepth", "DepthToSpace", "Slice", "Concat", "Pad"}


@dataclass(frozen=True)
class Site:
    """A quantizable layer: ONNX names on one side, the torch module on the other."""

    node: str
    op: str
    module: str
    weight: str
    bias: str | None
    input: str
    output: str
    weight_axis: int
    transposed: bool
    group: int = 1


def convert(model: onnx.ModelProto, source: str = "model") -> fx.GraphModule:
    """Convert a normalised ONNX model with onnx2torch, naming the op that fails."""
    import onnx2torch

    try:
        return onnx2torch.convert(model, attach_onnx_mapping=True)
    except NotImplementedError as exc:
        match = re.search(r"operation_type='([^']+)', version=(\d+)", str(exc))
        op, version = (match.group(1), match.group(2)) if match else ("?", "?")
        nodes = [n.name for n in model.graph.node if n.op_type == op][:3]
        raise UnsupportedOpError(
            f"{source}: no torch converter for op {op} (opset {version}, domain "
            f"'{_domain(str(exc))}') at node(s) {', '.join(nodes) or '?'}; convert the model to "
            f"opset 13-17 or replace the op") from exc


def _domain(text: str) -> str:
    match = re.search(r"domain='([^']*)'", text)
    return match.group(1) if match else ""


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def find_sites(model: onnx.ModelProto, gm: fx.GraphModule) -> list[Site]:
    """Quantizable layers in ONNX graph order, matched to their torch modules by output name."""
    inits = {t.name for t in model.graph.initializer}
    by_output = {n.output[0]: n for n in model.graph.node if n.output}
    modules = dict(gm.named_modules())
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    sites = []
    for target, module in modules.items():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is None or not mapping.outputs:
            continue
        node = by_output.get(mapping.outputs[0])
        if node is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
        if node.op_type == "Conv" and isinstance(module, CONV_TYPES):
            sites.append(Site(node.name, "Conv", target, node.input[1], bias, node.input[0],
                              node.output[0], 0, False, module.groups))
        elif node.op_type == "Gemm" and isinstance(module, nn.Linear):
            trans_b = _attr(node, "transB", 0)
            sites.append(Site(node.name, "Gemm", target, node.input[1], bias, node.input[0],
                              node.output[0], 0 if trans_b else 1, not trans_b))
        elif node.op_type == "MatMul" and type(module).__name__ == "OnnxMatMul":
            weight = next(t for t in model.graph.initializer if t.name == node.input[1])
            if len(weight.dims) == 2:
                sites.append(Site(node.name, "MatMul", target, node.input[1], None,
                                  node.input[0], node.output[0], 1, False))
    return sorted(sites, key=lambda s: order[s.node])


def is_unsigned_tensor(model: onnx.ModelProto, tensor: str) -> bool:
    """True when ``tensor`` is produced by Relu (or Clip with min >= 0), possibly through
    shape-only ops such as pooling, flatten or reshape (so its values are never negative)."""
    by_output = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    seen = set()
    while tensor in by_output and tensor not in seen:
        seen.add(tensor)
        node = by_output[tensor]
        if node.op_type in UNSIGNED_PRODUCERS:
            return True
        if node.op_type == "Clip":
            low = _clip_min(node, inits)
            return low is not None and low >= 0
        if node.op_type in PASS_THROUGH and node.op_type != "Concat":
            tensor = node.input[0]
            continue
        return False
    return False


def _clip_min(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> float | None:
    for a in node.attribute:
        if a.name == "min":
            return a.f
    if len(node.input) > 1 and node.input[1] in inits:
        return float(onnx.numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
    return None
