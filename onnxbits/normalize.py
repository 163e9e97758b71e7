"""Bring an ONNX model into the form the importer and the emitter share.

Rules, applied to a copy (the input is never modified):
1. Every node gets a unique, non-empty name (``<op_type>_<index>`` where missing or repeated).
2. Opsets below 11 are upgraded to 13 with ``onnx.version_converter``.
3. ``BatchNormalization`` that directly follows a ``Conv`` whose only consumer it is, with constant
   weights, is folded: ``W' = W * g``, ``B' = (B - mean) * g + beta``, ``g = gamma / sqrt(var + eps)``.
4. Shapes are inferred (best effort) so that later passes can read tensor ranks.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxbits.errors import InvalidModelError


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset version of ``model``."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
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
    used = {name for node in graph.node for name in node.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return folded


def normalize(model: onnx.ModelProto, source: str = "model") -> onnx.ModelProto:
    """Return a normalised copy of ``model`` (see the module docstring for the rules)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if opset_of(out) < 11:
        try:
            out = onnx.version_converter.convert_version(out, 13)
        except Exception as exc:
            raise InvalidModelError(
                f"{source}: opset {opset_of(model)} could not be upgraded to 13 ({exc}); "
                "upgrade it with onnx.version_converter first") from exc
    name_nodes(out)
    fold_batchnorm(out)
    try:
        out = onnx.shape_inference.infer_shapes(out)
    except Exception:  # shape information is a help, not a requirement
        pass
    return out
