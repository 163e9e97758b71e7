"""Bring an ONNX model into the form the importer and the emitter share.

Rules, applied to a copy (the input is never modified):
1. The default domain is spelled ``""`` (``ai.onnx`` is renamed), initializers are removed from
   the graph inputs (IR 3 lists them there) and the IR version is raised to what the opset needs.
2. Opsets below 13 are upgraded to 13 with ``onnx.version_converter``. Newer opsets (18 to 21)
   are kept; :mod:`onnxbits.importer.converters` teaches onnx2torch their ops.
3. Weights held as nodes become initializers: ``Constant``, ``ConstantOfShape`` of a constant
   shape, and shape-only ops (``Identity``, ``Cast``, ``Reshape``, ``Transpose``, ``Squeeze``,
   ``Unsqueeze``, ``Flatten``) whose inputs are all constant.
   Inference-mode ``Dropout`` becomes ``Identity`` and a ``Gemm``'s ``alpha``/``beta`` are
   folded into its constant ``B``/``C`` (:mod:`onnxbits.graph.rewrites`).
4. Every node gets a unique, non-empty name (``<op_type>_<index>`` where missing or repeated).
5. ``BatchNormalization`` that directly follows a ``Conv`` whose only consumer it is, with constant
   weights, is folded: ``W' = W * g``, ``B' = (B - mean) * g + beta``,
   ``g = gamma / sqrt(var + eps)``.
6. Shapes are inferred (best effort) so that later passes can read tensor ranks; a model without
   shape information is still accepted.
7. ``auto_pad`` ``SAME_*`` becomes explicit ``pads``, and the asymmetric part of a Conv's pads
   moves into a ``Pad`` node in front of it, so that every Conv maps to one torch convolution
   (:mod:`onnxbits.graph.rewrites`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxbits.errors import InvalidModelError
from onnxbits.graph.rewrites import (
    drop_unused_initializers,
    dropout_to_identity,
    explicit_pads,
    fold_gemm_scales,
    split_asymmetric_pads,
)

logger = logging.getLogger(__name__)

#: Opsets below this are upgraded to :data:`UPGRADE_TO` (onnx2torch lacks many old versions, and
#: per-channel DequantizeLinear needs 13).
MIN_OPSET = 13
UPGRADE_TO = 13
#: Ops evaluated at import time when every input is a constant (they only move or cast values).
FOLDABLE = {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"}
_DEFAULT_DOMAINS = ("", "ai.onnx")


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version of ``model``."""
    for imp in model.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return imp.version
    return 1


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique non-empty name (in place)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            base = node.name or f"{node.op_type}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(node.name)


def fix_header(model: onnx.ModelProto) -> None:
    """Rule 1 (in place): default domain spelled ``""``, no initializer among the graph
    inputs, and an IR version at least as high as the opsets require."""
    for imp in model.opset_import:
        if imp.domain == "ai.onnx":
            imp.domain = ""
    for node in model.graph.node:
        if node.domain == "ai.onnx":
            node.domain = ""
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)
    try:
        needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    except (TypeError, ValueError):  # an opset newer than this onnx knows: leave the IR alone
        needed = model.ir_version
    model.ir_version = max(model.ir_version, needed, 4)


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (None for sparse or string values)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), np.int64)
    return None


def _fold_node(node: onnx.NodeProto, values: list[np.ndarray], opset: int) -> np.ndarray | None:
    """Evaluate one shape-only node on constant inputs with the ONNX reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" for i in range(len(values))]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, values, strict=True)]
    copy = helper.make_node(node.op_type, names, ["out"], domain=node.domain)
    copy.attribute.extend(node.attribute)
    graph = helper.make_graph([copy], "fold", inputs,
                              [helper.make_tensor_value_info("out", onnx.TensorProto.UNDEFINED,
                                                             None)])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        feeds = dict(zip(names, values, strict=True))
        return np.asarray(ReferenceEvaluator(probe).run(None, feeds)[0])
    except Exception:  # noqa: BLE001 - leave anything the evaluator cannot do to onnx2torch
        return None


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Rule 3 (in place): turn constant-valued nodes into initializers; return how many.

    A node is folded only when none of its outputs is a graph output, so the graph's interface
    stays as it was.
    """
    graph = model.graph
    opset = opset_of(model)
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    folded = 0
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        value = None
        if node.domain == "" and len(node.output) == 1 and node.output[0] not in outputs:
            inputs = [n for n in node.input if n]
            if node.op_type == "Constant":
                value = _constant_value(node)
            elif node.op_type == "ConstantOfShape" and inputs and inputs[0] in inits:
                shape = numpy_helper.to_array(inits[inputs[0]]).astype(np.int64)
                fill = next((numpy_helper.to_array(a.t).reshape(-1)[:1] for a in node.attribute
                             if a.name == "value"), np.zeros(1, np.float32))
                value = np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)
            elif node.op_type in FOLDABLE and inputs and all(n in inits for n in inputs):
                arrays = [numpy_helper.to_array(inits[n]) for n in node.input if n]
                if len(arrays) == len(node.input):
                    value = _fold_node(node, arrays, opset)
        if value is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(np.ascontiguousarray(value), node.output[0])
        graph.initializer.append(tensor)
        inits[tensor.name] = graph.initializer[-1]
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        drop_unused_initializers(model)
    return folded


def fold_batchnorm(model: onnx.ModelProto) -> int:
    """Fold Conv -> BatchNormalization pairs (in place); return how many were folded."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    folded = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        users = consumers.get(conv.output[0], [])
        if len(users) != 1 or users[0].op_type != "BatchNormalization":
            continue
        bn = users[0]
        if conv.output[0] in graph_outputs or len(bn.output) > 1 and any(bn.output[1:]):
            continue
        if not all(name in inits for name in bn.input[1:5]):
            continue
        if len(consumers.get(conv.input[1], [])) != 1:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64)
                                  for n in bn.input[1:5])
        g = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        w_new = (w * g.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            bias_name = conv.input[2]
        else:
            b = np.zeros_like(g)
            bias_name = f"{conv.input[1]}_bn_bias"
        b_new = ((b - mean) * g + beta).astype(np.float32)
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array(w_new, conv.input[1]))
        if bias_name in inits and len(consumers.get(bias_name, [])) == 1:
            inits[bias_name].CopyFrom(numpy_helper.from_array(b_new, bias_name))
        else:
            bias_name = f"{conv.name}_folded_bias"
            graph.initializer.append(numpy_helper.from_array(b_new, bias_name))
            inits[bias_name] = graph.initializer[-1]
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
        folded += 1
    drop_unused_initializers(model)
    return folded


def upgrade_opset(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """Rule 2: a copy of ``model`` at opset 13 when it is older than opset 11."""
    old = opset_of(model)
    if old >= MIN_OPSET:
        return model
    try:
        out = onnx.version_converter.convert_version(model, UPGRADE_TO)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(
            f"{source}: opset {old} could not be upgraded to {UPGRADE_TO} ({first}); upgrade it "
            f"with onnx.version_converter.convert_version(model, {UPGRADE_TO}) or re-export it at "
            f"opset {UPGRADE_TO}-17") from exc
    fix_header(out)
    return out


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rule 6: ``model`` with inferred shapes, or unchanged when inference fails."""
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception as exc:  # noqa: BLE001 - shape information is a help, not a requirement
        logger.info("shape inference failed (%s); continuing without shapes", exc)
        return model


def normalize(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """Return a normalised copy of ``model`` (see the module docstring for the rules)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fix_header(out)
    out = upgrade_opset(out, source)
    constants_to_initializers(out)
    dropout_to_identity(out)
    name_nodes(out)
    fold_gemm_scales(out)
    fold_batchnorm(out)
    out = infer_shapes(out)
    if explicit_pads(out) + split_asymmetric_pads(out):
        out = infer_shapes(out)
    return out
