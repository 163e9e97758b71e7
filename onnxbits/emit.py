"""Write the ORIGINAL ONNX graph with QuantizeLinear/DequantizeLinear at the frozen bitlengths.

Weights (every target): ``W_int = clamp(round(W / s_c), -(2^(k-1) - 1), 2^(k-1) - 1)`` with
``s_c = alpha_c / (2^(k-1) - 1)`` per output channel, stored as int8 and read through
``DequantizeLinear(W_int, s_c, 0, axis)``; the fine-tuned float bias replaces the original.

Activations, one pair per quantized tensor ``t`` with clip value ``alpha`` and bits ``k``:

* ``ort``: ``DequantizeLinear(QuantizeLinear(t, alpha / qmax_8, 0))`` in uint8 (after Relu) or
  int8: ONNX Runtime fuses this pattern into its integer kernels; the tensor executes at 8-bit
  resolution over the learned clip range ``[0, alpha]`` (or ``[-alpha (128/127), alpha]``).
* ``exact-sim``: ``DequantizeLinear(Clip(QuantizeLinear(t, alpha / qmax_k, 0), qmin_k, qmax_k))``
  (QCDQ): exactly the k-bit grid, for tools that read bitlengths from the graph.

The learned bits are recorded in ``metadata_props["onnxbits"]`` (JSON, format 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxbits.importer import Site
from onnxbits.insert import QuantizedNetwork
from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.quant.ranges import qrange

TARGETS = ("ort", "exact-sim")
METADATA_KEY = "onnxbits"
EXEC_BITS_ORT = 8


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


def _act_params(q: BitQuantizer, target: str) -> tuple[np.ndarray, int, int, int, int]:
    """(scale, container type, qmin_k, qmax_k, exec bits) of an activation quantizer."""
    k = int(q.frozen_bits.reshape(-1)[0])
    exec_bits = EXEC_BITS_ORT if target == "ort" else k
    saved = q.exec_bits
    q.exec_bits = exec_bits
    scale = q.step().detach().numpy().astype(np.float32).reshape(())
    q.exec_bits = saved
    dtype = TensorProto.INT8 if q.signed else TensorProto.UINT8
    qmin, qmax = qrange(k, q.signed)
    return scale, dtype, qmin, qmax, exec_bits


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


def emit(model: onnx.ModelProto, net: QuantizedNetwork, target: str = "ort",
         source: dict[str, object] | None = None) -> onnx.ModelProto:
    """Return a copy of the (normalised) ``model`` quantized with the frozen ``net``."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.input} | {n.name for n in graph.node}
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    weight_users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            weight_users[name] = weight_users.get(name, 0) + 1
    new_nodes: dict[str, list[onnx.NodeProto]] = {}   # node name -> nodes to insert before it
    meta_layers: dict[str, dict[str, object]] = {}
    for site in net.sites:
        node = nodes[site.node]
        wt = quantized_weight(site, net)
        base = site.weight if weight_users.get(site.weight, 0) == 1 else f"{site.weight}_{site.node}"
        q_name = _unique(f"{base}_quantized", taken)
        s_name = _unique(f"{base}_scale", taken)
        z_name = _unique(f"{base}_zero_point", taken)
        dq_out = _unique(f"{base}_DequantizeLinear_Output", taken)
        graph.initializer.extend([
            numpy_helper.from_array(wt.integers, q_name),
            numpy_helper.from_array(wt.scale, s_name),
            numpy_helper.from_array(np.zeros(wt.scale.shape, np.int8), z_name)])
        dq = helper.make_node("DequantizeLinear", [q_name, s_name, z_name], [dq_out],
                              name=_unique(f"{base}_DequantizeLinear", taken), axis=wt.axis)
        new_nodes.setdefault(site.node, []).append(dq)
        node.input[1] = dq_out
        bias = net.layers[site.node].bias()
        if site.bias is not None and bias is not None:
            b_name = site.bias if weight_users.get(site.bias, 0) == 1 else \
                _unique(f"{site.bias}_{site.node}", taken)
            array = bias.detach().numpy().astype(np.float32)
            if b_name in inits:
                inits[b_name].CopyFrom(numpy_helper.from_array(array, b_name))
            else:
                graph.initializer.append(numpy_helper.from_array(array, b_name))
            node.input[2] = b_name
        wbits = net.layers[site.node].wq.frozen_bits
        meta_layers[site.node] = {
            "op": site.op,
            "weight_bits": int(wbits.max()) if wbits.numel() > 1 else int(wbits[0]),
            "weight_bits_mean": float(wbits.mean()),
            "weight_container_bits": 8,
            "act_tensor": net.layer_act.get(site.node),
            "act_bits": None, "act_signed": None, "act_exec_bits": None,
        }
    act_nodes = _quantize_activations(out, net, target, taken)
    for info in meta_layers.values():
        tensor = info["act_tensor"]
        if tensor in net.acts:
            q = net.acts[tensor]
            info["act_bits"] = int(q.frozen_bits[0])
            info["act_signed"] = bool(q.signed)
            info["act_exec_bits"] = EXEC_BITS_ORT if target == "ort" else int(q.frozen_bits[0])
    _insert_nodes(graph, new_nodes, act_nodes)
    used = {name for n in graph.node for name in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    meta = {"format": 1, "target": target, "layers": meta_layers, "source": source or {}}
    entry = next((p for p in out.metadata_props if p.key == METADATA_KEY), None)
    if entry is None:
        entry = out.metadata_props.add()
        entry.key = METADATA_KEY
    entry.value = json.dumps(meta)
    out.producer_name = "onnxbits"
    onnx.checker.check_model(out)
    return out


def _quantize_activations(model: onnx.ModelProto, net: QuantizedNetwork, target: str,
                          taken: set[str]) -> dict[str, list[onnx.NodeProto]]:
    """Add Q/DQ (and Clip for exact-sim) on every quantized tensor; return nodes keyed by the
    name of the node they must follow ('' = graph start)."""
    graph = model.graph
    producer = {o: n.name for n in graph.node for o in n.output}
    after: dict[str, list[onnx.NodeProto]] = {}
    for tensor, q in net.acts.items():
        scale, dtype, qmin, qmax, _ = _act_params(q, target)
        s_name = _unique(f"{tensor}_scale", taken)
        z_name = _unique(f"{tensor}_zero_point", taken)
        np_type = np.int8 if dtype == TensorProto.INT8 else np.uint8
        graph.initializer.extend([numpy_helper.from_array(scale, s_name),
                                  numpy_helper.from_array(np.zeros((), np_type), z_name)])
        q_out = _unique(f"{tensor}_QuantizeLinear_Output", taken)
        dq_out = _unique(f"{tensor}_DequantizeLinear_Output", taken)
        chain = [helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out],
                                  name=_unique(f"{tensor}_QuantizeLinear", taken))]
        dq_in = q_out
        if target == "exact-sim":
            lo = _unique(f"{tensor}_clip_min", taken)
            hi = _unique(f"{tensor}_clip_max", taken)
            graph.initializer.extend([numpy_helper.from_array(np.array(qmin, np_type), lo),
                                      numpy_helper.from_array(np.array(qmax, np_type), hi)])
            dq_in = _unique(f"{tensor}_Clip_Output", taken)
            chain.append(helper.make_node("Clip", [q_out, lo, hi], [dq_in],
                                          name=_unique(f"{tensor}_Clip", taken)))
        chain.append(helper.make_node("DequantizeLinear", [dq_in, s_name, z_name], [dq_out],
                                      name=_unique(f"{tensor}_DequantizeLinear", taken)))
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = dq_out
        after.setdefault(producer.get(tensor, ""), []).extend(chain)
    return after


def _insert_nodes(graph: onnx.GraphProto, before: dict[str, list[onnx.NodeProto]],
                  after: dict[str, list[onnx.NodeProto]]) -> None:
    """Rebuild the node list in a topological order with the new nodes in place."""
    ordered = list(after.get("", []))
    for node in graph.node:
        ordered.extend(before.get(node.name, []))
        ordered.append(node)
        ordered.extend(after.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
