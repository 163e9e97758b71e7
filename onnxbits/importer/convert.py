"""ONNX -> trainable torch graph (onnx2torch) plus the list of quantizable layers.

A *site* is a Conv, Gemm or MatMul node of the ONNX graph whose weight is a constant
initializer; it keeps the ONNX names (node, weight, bias, data input) that the emitter edits, and
the fx target of the torch module that computes it. A layer whose torch module is not a plain
convolution / linear / matmul stays in float (:func:`float_layers` lists it with the reason).
Ops without a converter fail in :func:`convert` with the op, opset, domain and nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from torch import fx, nn

from onnxbits.errors import UnsupportedOpError

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())   # a library: the application decides what is shown

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_OPS = ("Conv", "Gemm", "MatMul")
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


def _without_value_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its intermediate shapes: onnx2torch infers them again, and ONNX's shape
    inference is not idempotent on some exporters' graphs (paddle2onnx: a scalar Constant
    inferred as rank 0 conflicts with rank 1 on the second pass)."""
    if not model.graph.value_info:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    return out


def convert(model: onnx.ModelProto, source: str = "model") -> fx.GraphModule:
    """Convert a normalised ONNX model with onnx2torch, naming the op and node that fail.

    The graph is returned in eval mode: BatchNormalization uses its stored statistics (and
    never updates them) and Dropout is off, exactly as ONNX inference computes them.

    Raises:
        UnsupportedOpError: An op has no torch converter (every such op type is listed, with the
            opset, domain and nodes), or a converter rejects a node (named with its reason).
    """
    import onnx2torch

    from onnxbits.importer.converters import known_versions, register

    register()
    missing = unsupported_ops(model)
    if missing:
        op, version, domain, nodes = missing[0]
        others = "".join(f"; also {o} (opset {v}, domain '{d}') at {', '.join(n[:3])}"
                         for o, v, d, n in missing[1:4])
        versions = known_versions(op, domain)
        advice = (f"onnx2torch converts {op} only at opset versions {versions}; convert the model "
                  "with onnx.version_converter or replace the op" if versions else
                  "onnx2torch converts it at no opset; replace the op")
        raise UnsupportedOpError(
            f"{source}: no torch converter for op {op} (opset {version}, domain '{domain}') at "
            f"node(s) {', '.join(nodes[:3])}{others}; {advice}")
    try:
        graph = onnx2torch.convert(_without_value_info(model), attach_onnx_mapping=True)
    except Exception as exc:  # noqa: BLE001 - converters raise many types; name the node
        node = _failing_node(exc)
        if node is None:
            raise UnsupportedOpError(f"{source}: onnx2torch failed ({type(exc).__name__}: "
                                     f"{_first_line(exc)}); simplify or re-export the model"
                                     ) from exc
        version = _opset(model, node.domain)
        raise UnsupportedOpError(
            f"{source}: cannot convert node '{node.name}' ({node.op_type}, opset {version}, domain "
            f"'{node.domain}'): {_first_line(exc)}; re-export the model without this form of "
            f"{node.op_type} or replace the op") from exc
    return graph.eval()   # BatchNorm statistics and Dropout stay as in ONNX inference


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, int, str, list[str]]]:
    """Ops without a torch converter: ``(op, opset, domain, node names)`` in graph order."""
    from onnx2torch.node_converters import get_converter

    from onnxbits.importer.converters import register

    register()
    found: dict[tuple[str, str], list[str]] = {}
    for node in model.graph.node:
        version = _opset(model, node.domain)
        try:
            get_converter(operation_type=node.op_type, version=version, domain=node.domain)
        except NotImplementedError:
            found.setdefault((node.op_type, node.domain), []).append(node.name or node.op_type)
    return [(op, _opset(model, domain), domain, nodes) for (op, domain), nodes in found.items()]


def _opset(model: onnx.ModelProto, domain: str) -> int:
    domains = ("", "ai.onnx") if domain in ("", "ai.onnx") else (domain,)
    return next((o.version for o in model.opset_import if o.domain in domains), 1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip("'\"")
    return text.splitlines()[0] if text else type(exc).__name__


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The ONNX node onnx2torch was converting when ``exc`` was raised (from the traceback)."""
    tb = exc.__traceback__
    node = None
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("onnx_node")
        if candidate is not None and hasattr(candidate, "proto"):
            node = candidate.proto
        tb = tb.tb_next
    return node


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    return next((a.f for a in node.attribute if a.name == name), default)


@dataclass(frozen=True)
class FloatLayer:
    """A Conv/Gemm/MatMul with a constant weight that stays in float, and why."""

    node: str
    op: str
    reason: str

    def __str__(self) -> str:
        return f"'{self.node}' ({self.op}: {self.reason})"


def float_layer_warnings(source: str, model: onnx.ModelProto, floats: list[FloatLayer],
                         skip_unsupported: bool = True) -> list[str]:
    """One warning per layer that stays in float (``--skip-unsupported``, the default), or an
    UnsupportedOpError naming the first such node, its op and the opset."""
    if floats and not skip_unsupported:
        first = floats[0]
        more = f" (and {len(floats) - 1} more)" if len(floats) > 1 else ""
        opset = _opset(model, "")
        raise UnsupportedOpError(
            f"{source}: node '{first.node}' ({first.op}, opset {opset}) cannot be quantized: "
            f"{first.reason}{more}; rerun with --skip-unsupported to keep such layers in float")
    return [f"layer {f} stays in float" for f in floats]


def find_sites(model: onnx.ModelProto, gm: fx.GraphModule) -> list[Site]:
    """Quantizable layers in ONNX graph order, matched to their torch modules by output name.

    Layers with a constant weight that cannot be quantized stay in float; they are logged (info;
    the pipeline warns) and listed by :func:`float_layers`.
    """
    sites, skipped = _classify(model, gm)
    if skipped:
        logger.info("%d layer(s) stay in float: %s", len(skipped),
                       "; ".join(map(str, skipped[:10])))
    return sites


def float_layers(model: onnx.ModelProto, gm: fx.GraphModule) -> list[FloatLayer]:
    """Conv/Gemm/MatMul nodes with a constant weight that :func:`find_sites` cannot quantize."""
    return _classify(model, gm)[1]


def _classify(model: onnx.ModelProto, gm: fx.GraphModule) -> tuple[list[Site], list[FloatLayer]]:
    inits = {t.name: t for t in model.graph.initializer}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    modules_by_output: dict[str, tuple[str, nn.Module]] = {}
    for target, module in gm.named_modules():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is not None and mapping.outputs:
            modules_by_output.setdefault(mapping.outputs[0], (target, module))
    sites: list[Site] = []
    skipped: list[FloatLayer] = []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in inits:
            continue
        found = modules_by_output.get(node.output[0])
        if found is None:
            skipped.append(FloatLayer(node.name, node.op_type, "no torch module computes it"))
            continue
        target, module = found
        site, reason = _site(node, target, module, inits)
        if site is not None:
            sites.append(site)
        else:
            skipped.append(FloatLayer(node.name, node.op_type, reason))
    return sorted(sites, key=lambda s: order[s.node]), skipped


def _site(node: onnx.NodeProto, target: str, module: nn.Module,
          inits: dict[str, onnx.TensorProto]) -> tuple[Site | None, str]:
    """The site of one layer node, or None and the reason it stays in float."""
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
    kind = type(module).__name__
    if inits[node.input[1]].data_type != onnx.TensorProto.FLOAT:
        return None, "the weight is not float32"
    if node.op_type == "Conv":
        if not isinstance(module, CONV_TYPES):
            return None, f"onnx2torch made a {kind} (asymmetric or automatic padding?)"
        return Site(node.name, "Conv", target, node.input[1], bias, node.input[0],
                    node.output[0], 0, False, module.groups), ""
    if node.op_type == "Gemm":
        if not isinstance(module, nn.Linear):
            return None, f"onnx2torch made a {kind} (transA set, or a bias that is not 1-D)"
        if _float_attr(node, "alpha", 1.0) != 1.0 or _float_attr(node, "beta", 1.0) != 1.0:
            return None, "alpha or beta is not 1 (normalize() folds them into B and C)"
        trans_b = _attr(node, "transB", 0)
        return Site(node.name, "Gemm", target, node.input[1], bias, node.input[0],
                    node.output[0], 0 if trans_b else 1, not trans_b), ""
    if kind != "OnnxMatMul":
        return None, f"onnx2torch made a {kind}"
    rank = len(inits[node.input[1]].dims)
    if rank != 2:
        return None, f"the weight has rank {rank}, not 2"
    return Site(node.name, "MatMul", target, node.input[1], None, node.input[0],
                node.output[0], 1, False), ""


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
