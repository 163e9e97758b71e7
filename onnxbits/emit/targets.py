"""Write the ORIGINAL ONNX graph with QuantizeLinear/DequantizeLinear at the frozen bitlengths.

Weights (every target): ``W_int = clamp(round(W / s_c), -(2^(k-1) - 1), 2^(k-1) - 1)`` with
``s_c = alpha_c / (2^(k-1) - 1)`` per output channel, stored as int8 and read through
``DequantizeLinear(W_int, s_c, 0, axis)`` (the zero point input only for Gemm/MatMul, which
ONNX Runtime fuses only with it); the fine-tuned float bias replaces the original.

Activations, one pair per quantized tensor ``t`` with clip value ``alpha`` and bits ``k``:

* ``ort``: ``DequantizeLinear(QuantizeLinear(t, s, z))`` in uint8 with ``s = alpha / qmax_8``:
  ``z = 0`` after Relu (unsigned), ``z = 128`` for signed tensors (the grid of int8 with zero
  point 0, which ONNX Runtime does not fuse when two node units share it). The tensor executes
  at 8-bit resolution over the learned clip range. Layers whose torch model simulates an int32
  bias (:func:`onnxbits.emit.prepare.simulate_int32_bias`) get ``round(b / (s_in s_w))`` as int32,
  read through ``DequantizeLinear(b_int, s_in s_w, 0)``: what ORT's integer kernels add to their
  int32 accumulator (other layers keep a float bias). Tensors that only need to be on a
  quantized tensor's grid for ORT to fuse (see :mod:`onnxbits.emit.fusion`) get a Q/DQ pair with
  that tensor's scale and zero point: exact, so the torch model needs no counterpart. The new
  fixed 8-bit quantizers that fusion needs elsewhere live in the torch model
  (:func:`onnxbits.emit.prepare.add_output_quantizers`) and are emitted like every other one.
  Zero Pads leave the float path (:func:`onnxbits.emit.fusion.integer_pads`): into the next Conv's
  pads, or onto the uint8 tensor.
* ``exact-sim``: ``DequantizeLinear(Clip(QuantizeLinear(t, alpha / qmax_k, 0), qmin_k, qmax_k))``
  (QCDQ) with int8/uint8 containers: exactly the k-bit grid, for tools that read bitlengths
  from the graph. Float biases (the int32-rounded value where the torch model simulates it).
* ``pack``: the ``ort`` model with 4-bit weights in int4 (opset 21) and the others as k-bit
  streams (:mod:`onnxbits.emit.pack`); :func:`onnxbits.emit.pack.unpack_model` (``onnxbits unpack``)
  gives back the ``ort`` model byte for byte.

The learned bits are recorded in ``metadata_props["onnxbits"]`` (JSON, format 1): per layer the
learned weight bits, the container they are stored in (``weight_container_bits``), the learned
input activation bits and the bits ONNX Runtime executes them at (``act_exec_bits``); per
quantized tensor (``tensors``) the same for activations, with ``role`` ``input`` (a layer input)
or ``output`` (only there so that its producer fuses: a fixed 8-bit quantizer). ``pads`` lists
the Pads the ``ort`` target took off the float path (:func:`onnxbits.emit.fusion.integer_pads`).
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxbits.config import TARGETS
from onnxbits.emit.fusion import integer_pads, plan_fusion
from onnxbits.emit.metadata import METADATA_FORMAT, write_metadata
from onnxbits.emit.prepare import bias_integers, bias_scale, weight_step
from onnxbits.emit.qparams import (
    ActParams,
    WeightTensors,
    activation_params,
    lossless_int32,
    quantized_weight,
)
from onnxbits.graph.index import GraphIndex
from onnxbits.importer.convert import Site
from onnxbits.quant.network import QuantizedNetwork


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 1
    while out in taken:
        out, i = f"{name}_{i}", i + 1
    taken.add(out)
    return out


class _Graph:
    """Initializer/node bookkeeping shared by the emission steps."""

    def __init__(self, model: onnx.ModelProto, target: str, exact_bias: bool = True) -> None:
        self.model = model
        self.target = target
        self.exact_bias = exact_bias
        graph = model.graph
        self.taken = {t.name for t in graph.initializer} | {i.name for i in graph.input} \
            | {o for n in graph.node for o in n.output} | {n.name for n in graph.node}
        self.inits = {t.name: t for t in graph.initializer}
        self.users: dict[str, int] = {}
        for n in graph.node:
            for name in n.input:
                self.users[name] = self.users.get(name, 0) + 1
        self.before: dict[str, list[onnx.NodeProto]] = {}  # node -> nodes inserted before it
        self.after: dict[str, list[onnx.NodeProto]] = {}   # node ('' = start) -> nodes after it
        self.act_names: dict[str, tuple[str, str]] = {}      # tensor -> (scale, zero point)

    def name(self, base: str) -> str:
        return _unique(base, self.taken)

    def add(self, array: np.ndarray, base: str) -> str:
        name = self.name(base)
        self.model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def dequantize(self, before: str, base: str, ints: np.ndarray, scale: np.ndarray,
                   axis: int | None, zero_point: bool = False) -> str:
        """Add ``DequantizeLinear(ints, scale, 0)`` before node ``before``; return its output.

        The zero point input is written only with ``zero_point`` (0 is its default): ONNX
        Runtime fuses Conv weights and int32 biases without it, Gemm/MatMul weights only with it.
        """
        inputs = [self.add(ints, f"{base}_quantized"), self.add(scale, f"{base}_scale")]
        if zero_point:
            inputs.append(self.add(np.zeros(scale.shape, ints.dtype), f"{base}_zero_point"))
        out = self.name(f"{base}_DequantizeLinear_Output")
        attrs = {"axis": axis} if axis is not None else {}
        self.before.setdefault(before, []).append(helper.make_node(
            "DequantizeLinear", inputs, [out], name=self.name(f"{base}_DequantizeLinear"),
            **attrs))
        return out


def emit(model: onnx.ModelProto, net: QuantizedNetwork, target: str = "ort",
         source: dict[str, object] | None = None, *, bitpack: bool = True,
         exact_bias: bool = True) -> onnx.ModelProto:
    """Return a copy of the (normalised) ``model`` quantized with the frozen ``net``.

    ``bitpack`` (``pack`` target only): store 2-, 3- and 5-7-bit weights as bit streams (see
    :mod:`onnxbits.emit.pack`); without it they stay in int4/int8 containers. ``exact_bias``
    (``exact-sim`` only): write the float bias of a layer with a quantized input as
    ``DequantizeLinear(int32, 2^e)``, exactly the float value. ONNX Runtime's full optimizations
    would otherwise round a float bias to the int32 grid ``s_in s_w`` of the k-bit scales
    (WeightBiasQuantization), far from the verified model; a bias DQ whose scale is not
    ``s_in s_w`` is left alone (and the layer runs in float, as QCDQ does anyway).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "pack":
        from onnxbits.emit.pack import pack_model

        return pack_model(emit(model, net, "ort", source), bitpack=bitpack)
    plan = plan_fusion(model, set(net.acts), {s.node for s in net.sites}) \
        if target == "ort" else None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = _Graph(out, target, exact_bias)
    nodes = {n.name: n for n in out.graph.node}
    meta_layers: dict[str, dict[str, object]] = {}
    for site in net.sites:
        node = nodes[site.node]
        wt = quantized_weight(site, net)
        if target == "ort" and bias_scale(net, site.node) is not None:
            wt = WeightTensors(wt.integers, weight_step(net, site.node).numpy(), wt.axis)
        base = site.weight if g.users.get(site.weight, 0) == 1 else f"{site.weight}_{site.node}"
        node.input[1] = g.dequantize(site.node, base, wt.integers, wt.scale, wt.axis,
                                     zero_point=site.op != "Conv")
        act = net.layer_act.get(site.node)
        bias_kind = _emit_bias(g, site, node, net, target)
        wbits = net.layers[site.node].wq.frozen_bits
        meta_layers[site.node] = {
            "op": site.op,
            "weight_bits": int(wbits.max()) if wbits.numel() > 1 else int(wbits[0]),
            "weight_bits_mean": float(wbits.mean()),
            "weight_container_bits": 8,
            "act_tensor": act,
            "act_bits": None, "act_signed": None, "act_exec_bits": None,
            "bias": bias_kind,
        }
    tensors = _quantize_activations(g, net, target)
    requant = _requantize(g, net, plan.requant, target) if plan is not None else {}
    for info in meta_layers.values():
        tensor = info["act_tensor"]
        if tensor in net.acts:
            entry = tensors[str(tensor)]
            info["act_bits"] = entry["bits"]
            info["act_signed"] = entry["signed"]
            info["act_exec_bits"] = entry["exec_bits"]
    _insert_nodes(out.graph, g.before, g.after)
    pads = integer_pads(out) if plan is not None else {}
    used = {name for n in out.graph.node for name in n.input}
    keep = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    meta: dict[str, object] = {"format": METADATA_FORMAT, "target": target, "layers": meta_layers,
                               "source": source or {}, "tensors": tensors}
    if plan is not None:
        meta["requantized"] = requant
        meta["pads"] = pads
    write_metadata(out, meta)
    out.producer_name = "onnxbits"
    onnx.checker.check_model(out)
    return out


def _emit_bias(g: _Graph, site: Site, node: onnx.NodeProto, net: QuantizedNetwork,
               target: str) -> str | None:
    """Write the layer's bias as torch uses it: int32 DQ (``ort``, where the torch model
    simulates it, :func:`onnxbits.emit.prepare.simulate_int32_bias`) or float."""
    scale = bias_scale(net, site.node)
    if site.op == "MatMul":
        return _matmul_bias(g, site, scale) if scale is not None else None
    bias = net.layers[site.node].bias()
    if site.bias is None or bias is None:
        return None
    base = site.bias if g.users.get(site.bias, 0) == 1 else f"{site.bias}_{site.node}"
    if scale is not None:
        ints = bias_integers(bias, scale)
        if target == "ort":
            node.input[2] = g.dequantize(site.node, base, ints.numpy().astype(np.int32),
                                         scale.numpy(), 0)
            return "int32"
        array = (ints * scale).numpy().astype(np.float32)
    else:
        array = bias.detach().numpy().astype(np.float32)
    if target == "exact-sim" and g.exact_bias and site.op == "Conv" and \
            net.layer_act.get(site.node) in net.acts:
        ints32, exact_scale = lossless_int32(array)
        node.input[2] = g.dequantize(site.node, base, ints32, exact_scale, 0)
        return "exact-int32"
    name = base if base == site.bias else g.name(base)
    if name in g.inits:
        g.inits[name].CopyFrom(numpy_helper.from_array(array, name))
    else:
        g.model.graph.initializer.append(numpy_helper.from_array(array, name))
    node.input[2] = name
    return "float"


def _matmul_bias(g: _Graph, site: Site, scale: torch.Tensor) -> str | None:
    """The constant addend of the Add after a MatMul, on the int32 grid ``scale``."""
    index = GraphIndex(g.model)
    users = index.consumers.get(site.output, [])
    if len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    slot = next((i for i, t in enumerate(add.input) if t != site.output), None)
    value = index.array(add.input[slot]) if slot is not None else None
    if value is None or value.size != scale.numel():
        return None
    ints = bias_integers(torch.from_numpy(value.reshape(-1).astype(np.float32)), scale)
    if g.target == "ort":
        add.input[slot] = g.dequantize(add.name, f"{add.input[slot]}_{add.name}",
                                       ints.numpy().astype(np.int32), scale.numpy(), 0)
        return "int32"
    add.input[slot] = g.add((ints * scale).numpy().reshape(value.shape).astype(np.float32),
                            f"{add.input[slot]}_{add.name}")
    return "float"


def _qdq(g: _Graph, tensor: str, p: ActParams, s_name: str, z_name: str,
         clip: tuple[str, str] | None) -> tuple[list[onnx.NodeProto], str]:
    q_out = g.name(f"{tensor}_QuantizeLinear_Output")
    dq_out = g.name(f"{tensor}_DequantizeLinear_Output")
    chain = [helper.make_node("QuantizeLinear", [tensor, s_name, z_name], [q_out],
                              name=g.name(f"{tensor}_QuantizeLinear"))]
    dq_in = q_out
    if clip is not None:
        dq_in = g.name(f"{tensor}_Clip_Output")
        chain.append(helper.make_node("Clip", [q_out, *clip], [dq_in],
                                      name=g.name(f"{tensor}_Clip")))
    chain.append(helper.make_node("DequantizeLinear", [dq_in, s_name, z_name], [dq_out],
                                  name=g.name(f"{tensor}_DequantizeLinear")))
    for node in g.model.graph.node:
        for i, name in enumerate(node.input):
            if name == tensor:
                node.input[i] = dq_out
    return chain, dq_out


def _quantize_activations(g: _Graph, net: QuantizedNetwork,
                          target: str) -> dict[str, dict[str, object]]:
    """Add Q/DQ (and Clip for exact-sim) on every quantized tensor; return their metadata."""
    graph = g.model.graph
    producer = {o: n.name for n in graph.node for o in n.output}
    inputs = set(net.layer_act.values())
    meta: dict[str, dict[str, object]] = {}
    for tensor, q in net.acts.items():
        p = activation_params(q, target)
        np_type = np.int8 if p.dtype == TensorProto.INT8 else np.uint8
        s_name = g.add(p.scale, f"{tensor}_scale")
        z_name = g.add(np.array(p.zero_point, np_type), f"{tensor}_zero_point")
        g.act_names[tensor] = (s_name, z_name)
        clip = None
        if target == "exact-sim":
            clip = (g.add(np.array(p.qmin, np_type), f"{tensor}_clip_min"),
                    g.add(np.array(p.qmax, np_type), f"{tensor}_clip_max"))
        chain, _ = _qdq(g, tensor, p, s_name, z_name, clip)
        g.after.setdefault(producer.get(tensor, ""), []).extend(chain)
        meta[tensor] = {"role": "input" if tensor in inputs else "output", "bits": p.bits,
                        "exec_bits": p.exec_bits, "signed": bool(q.signed),
                        "container_bits": 8, "zero_point": p.zero_point}
    return meta


def _requantize(g: _Graph, net: QuantizedNetwork, requant: dict[str, str],
                target: str) -> dict[str, str]:
    """Q/DQ with the source quantizer's scale and zero point on grid-equivalent tensors."""
    graph = g.model.graph
    producer = {o: n.name for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    done = {}
    for tensor, source in requant.items():
        if source not in net.acts or tensor in outputs or tensor in net.acts:
            continue
        p = activation_params(net.acts[source], target)
        s_name, z_name = g.act_names[source]
        chain, _ = _qdq(g, tensor, p, s_name, z_name, None)
        g.after.setdefault(producer.get(tensor, ""), []).extend(chain)
        done[tensor] = source
    return done


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
