"""Rewrites of ONNX forms that onnx2torch converts wrongly or not at all (used by normalize).

Rules, each in place on the copy :func:`onnxbits.graph.normalize.normalize` works on:

1. ``dropout_to_identity``: inference-mode ``Dropout`` (no ``training_mode`` or a constant false
   one, mask unused) becomes ``Identity`` (onnx2torch's Dropout-12/13 fails on a ``ratio`` input).
2. ``fold_gemm_scales``: a ``Gemm``'s ``alpha`` and ``beta`` are folded into its constant ``B``
   and ``C`` (onnx2torch folds them into the torch weights, so the quantized weights written back
   into the ONNX Gemm would be scaled twice).
3. ``explicit_pads``: ``auto_pad`` ``SAME_UPPER``/``SAME_LOWER`` of Conv and pooling becomes
   explicit ``pads`` where the input's spatial shape is known (onnx2torch rejects SAME).
4. ``split_asymmetric_pads``: the asymmetric part of a Conv's pads moves into a ``Pad`` node in
   front of it (``Conv(pads=[0, 0, 1, 1])`` -> ``Pad([0, 0, 0, 0, 0, 0, 1, 1]) -> Conv(pads=0)``),
   so that every Conv maps to one torch convolution and can be quantized.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers that no node (subgraphs included) and no graph output reads."""
    graph = model.graph
    used = _reads(graph) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Names read by the nodes of ``graph`` and of its control-flow bodies."""
    names = {name for node in graph.node for name in node.input}
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                names |= _reads(attr.g)
            for sub in attr.graphs:
                names |= _reads(sub)
    return names


def dropout_to_identity(model: onnx.ModelProto) -> int:
    """Rule 1: inference-mode Dropout -> Identity; return how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "Dropout" or node.domain not in ("", "ai.onnx"):
            continue
        if len(node.output) > 1 and node.output[1] and node.output[1] in used:
            continue
        mode = node.input[2] if len(node.input) > 2 else ""
        if mode and (mode not in inits or bool(numpy_helper.to_array(inits[mode]).any())):
            continue
        data, out = node.input[0], node.output[0]
        node.op_type = "Identity"
        del node.input[:], node.output[:], node.attribute[:]
        node.input.append(data)
        node.output.append(out)
        changed += 1
    if changed:
        drop_unused_initializers(model)
    return changed


def fold_gemm_scales(model: onnx.ModelProto) -> int:
    """Rule 2: ``Gemm(alpha, beta)`` with constant B (and C) -> ``B' = alpha B``,
    ``C' = beta C``, ``alpha = beta = 1`` (a shared tensor is copied); return how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    folded = 0
    for node in graph.node:
        if node.op_type != "Gemm":
            continue
        attrs = {a.name: a for a in node.attribute}
        for slot, key in ((1, "alpha"), (2, "beta")):
            if key not in attrs or attrs[key].f == 1.0 or len(node.input) <= slot:
                continue
            name = node.input[slot]
            if name not in inits:
                continue
            value = numpy_helper.to_array(inits[name]) * np.float32(attrs[key].f)
            target = name if users.get(name, 0) == 1 else f"{name}_{node.name}_{key}"
            tensor = numpy_helper.from_array(value.astype(np.float32), target)
            if target in inits:
                inits[target].CopyFrom(tensor)
            else:
                graph.initializer.append(tensor)
                inits[target] = graph.initializer[-1]
            node.input[slot] = target
            node.attribute.remove(attrs[key])
            folded += 1
    drop_unused_initializers(model)
    return folded


def _shape(model: onnx.ModelProto, tensor: str) -> list[int] | None:
    for info in [*model.graph.value_info, *model.graph.input]:
        if info.name == tensor and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            return [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
    return None


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == name), None)


def _set_ints(node: onnx.NodeProto, name: str, values: list[int]) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)
    node.attribute.append(helper.make_attribute(name, values))


def explicit_pads(model: onnx.ModelProto) -> int:
    """Rule 3: SAME auto-padding -> explicit pads; return how many."""
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        mode = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
        if node.op_type not in ("Conv", "MaxPool", "AveragePool") or not mode.startswith("SAME"):
            continue
        shape = _shape(model, node.input[0])
        kernel = _ints(node, "kernel_shape")
        if kernel is None and node.op_type == "Conv" and node.input[1] in inits:
            kernel = list(inits[node.input[1]].dims[2:])
        if shape is None or kernel is None or any(d <= 0 for d in shape[2:]):
            continue
        rank = len(kernel)
        strides = _ints(node, "strides") or [1] * rank
        dilations = _ints(node, "dilations") or [1] * rank
        begin, end = [], []
        for size, k, s, d in zip(shape[2:], kernel, strides, dilations, strict=False):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            small = total // 2
            begin.append(small if mode == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        for attr in list(node.attribute):
            if attr.name == "auto_pad":
                node.attribute.remove(attr)
        _set_ints(node, "pads", begin + end)
        changed += 1
    return changed


def split_asymmetric_pads(model: onnx.ModelProto) -> int:
    """Rule 4: move the asymmetric part of Conv pads into a Pad node; return how many."""
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} \
        | {n.name for n in graph.node} | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        return name

    nodes: list[onnx.NodeProto] = []
    split = 0
    for node in graph.node:
        pads = _ints(node, "pads") if node.op_type == "Conv" else None
        if pads is None or pads[: len(pads) // 2] == pads[len(pads) // 2:]:
            nodes.append(node)
            continue
        rank = len(pads) // 2
        keep = [min(b, e) for b, e in zip(pads[:rank], pads[rank:], strict=True)]
        extra = [0, 0] + [b - k for b, k in zip(pads[:rank], keep, strict=True)] + [0, 0] + \
            [e - k for e, k in zip(pads[rank:], keep, strict=True)]
        amounts = fresh(f"{node.name}_pads")
        graph.initializer.append(numpy_helper.from_array(np.array(extra, np.int64), amounts))
        padded = fresh(f"{node.name}_padded_input")
        nodes.append(helper.make_node("Pad", [node.input[0], amounts], [padded],
                                      name=fresh(f"{node.name}_pad"), mode="constant"))
        node.input[0] = padded
        _set_ints(node, "pads", keep + keep)
        nodes.append(node)
        split += 1
    if split:
        del graph.node[:]
        graph.node.extend(nodes)
    return split
