"""Where ONNX Runtime can run a quantized graph on its integer kernels, and what that needs.

ONNX Runtime (CPU, 1.32) replaces ``DQ -> op -> Q`` node units by integer kernels (QLinearConv,
QGemm, QLinearAdd, QLinearAveragePool, ...). A node unit only fuses when every data input comes
from a DequantizeLinear and its output goes into a QuantizeLinear; Gemm/MatMul may instead end
the graph with a float output (QGemm, MatMulIntegerToFloat) when the bias is an int32 DQ.
Rules measured with ORT 1.32 (``tests/test_deploy.py`` keeps them true):

1. A Relu between the op and Q is removed (and the op fused) only when Q is uint8 with zero
   point 0; ``Clip(0, hi)`` only when the Q range ``[0, 255 s]`` lies inside ``[0, hi]``.
2. A signed int8 activation read by two node units (a residual block's input) blocks the fusion
   of both; the same grid as uint8 with zero point 128 fuses everywhere. So the ``ort`` target
   writes signed activations as uint8, zero point 128.
3. A float Gemm bias blocks QGemm with a float output; an int32 bias with scale
   ``s_in * s_w`` fuses. QGemm does not check that scale (it adds the int32 values as if it
   were ``s_in * s_w``), while a Conv bias DQ with another scale keeps the Conv in float. With
   full optimizations ORT rounds a float Conv bias to ``s_in * s_w`` itself
   (WeightBiasQuantization). A Conv whose output is not quantized (graph output) runs in float.
4. ``DQ -> GlobalAveragePool/AveragePool -> Q`` fuses (QLinear[Global]AveragePool), as do
   ``DQ -> Slice -> Q`` (Slice on uint8); ``DQ -> Pad -> Q`` stays a float Pad (see
   :func:`integer_pads`, which moves such Pads into the Conv or onto the integers).
5. ``DQ(int4, block_size) -> MatMul`` becomes MatMulNBits with ``accuracy_level`` 4, which
   quantizes its float input per block at run time: not the verified numerics, so MatMul
   weights stay int8 (QGemm). ``DQ(int2) -> Conv`` makes ORT 1.32 fail at session creation.
6. ORT quantizes the float weights of a Conv between DQ and Q by itself (WeightBiasQuantization):
   every Conv/Gemm/MatMul that sits between quantized tensors should be a quantized site.

:func:`plan_fusion` walks the graph in order and, for every *fusable producer* (a layer whose
input is quantized, a residual Add whose inputs are quantized, an average pool after a quantized
tensor), finds its *fusion output*: its output, moved through a constant bias Add (MatMul) and a
single-consumer Relu or ``Clip(0, hi)``. That output is then

* already quantized (a layer input): nothing to do;
* followed, through grid-preserving single-consumer ops (reshape, flatten, max pooling, ...),
  by a quantized tensor: the emitter re-quantizes it with that tensor's scale and zero point
  (``requant``). Rounding commutes with these ops, so this is exact and needs no torch change;
* the graph output of a Gemm/MatMul: fused with a float output;
* otherwise it needs a new fixed 8-bit quantizer in the torch model and the graph
  (``outputs``; see :func:`onnxbits.emit.prepare.add_output_quantizers`).

A residual Add input that is not quantized but reached from a quantized tensor through
grid-preserving ops (the ``Slice -> Pad`` shortcut of CIFAR ResNets) is re-quantized along that
chain with the source's scale and zero point: exact as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxbits.graph.index import GraphIndex, attr

# Ops whose output values are a subset of (or a monotone selection from) their data input's values:
# quantizing before or after them gives the same result.
GRID_OPS = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Slice",
            "MaxPool", "GlobalMaxPool", "Pad"}
LAYER_OPS = ("Conv", "Gemm", "MatMul")
POOL_OPS = ("AveragePool", "GlobalAveragePool")
@dataclass(frozen=True)
class OutputNeed:
    """A tensor that needs a new fixed-bit quantizer for its producer to fuse."""

    tensor: str
    signed: bool
    producer: str  # node name of the fusable producer


@dataclass
class FusionPlan:
    """What the ``ort`` target needs so that every quantized layer runs on integer kernels."""

    outputs: list[OutputNeed] = field(default_factory=list)
    requant: dict[str, str] = field(default_factory=dict)     # tensor -> quantized source tensor
    fusable: dict[str, str] = field(default_factory=dict)     # producer node -> fusion output
    float_outputs: list[str] = field(default_factory=list)    # Gemm/MatMul nodes ending the graph
    clip_limits: dict[str, float] = field(default_factory=dict)  # tensor -> Clip max (alpha <= it)


def _single_consumer(index: GraphIndex, tensor: str, outputs: set[str]) -> onnx.NodeProto | None:
    users = index.consumers.get(tensor, [])
    if len(users) != 1 or tensor in outputs:
        return None
    return users[0]


def _is_const(index: GraphIndex, tensor: str) -> bool:
    return index.constant(tensor) is not None


def _grid_op(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """True when ``node`` keeps its data input's quantization grid (see GRID_OPS)."""
    if node.op_type not in GRID_OPS or len([o for o in node.output if o]) != 1:
        return False
    if node.op_type == "Pad":
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        if mode != "constant":
            return False
        if len(node.input) > 2 and node.input[2]:
            value = index.array(node.input[2])
            return value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 0.0
    return True


def clip_range(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """Constant ``(min, max)`` of a Clip node (attributes before opset 11, inputs after)."""
    lo: float | None = -np.inf
    hi: float | None = np.inf
    for a in node.attribute:
        if a.name == "min":
            lo = a.f
        if a.name == "max":
            hi = a.f
    for i, slot in ((1, "lo"), (2, "hi")):
        if len(node.input) > i and node.input[i]:
            value = index.array(node.input[i])
            if value is None:
                return None
            if slot == "lo":
                lo = float(value.reshape(-1)[0])
            else:
                hi = float(value.reshape(-1)[0])
    return float(lo), float(hi)  # type: ignore[arg-type]


def fusion_output(index: GraphIndex, node: onnx.NodeProto,
                  outputs: set[str]) -> tuple[str, float | None]:
    """The tensor whose QuantizeLinear ORT fuses into ``node``, and a Clip max it depends on."""
    tensor = node.output[0]
    user = _single_consumer(index, tensor, outputs)
    if node.op_type == "MatMul" and user is not None and user.op_type == "Add":
        other = [t for t in user.input if t != tensor]
        if len(other) == 1 and _is_const(index, other[0]):
            tensor = user.output[0]
            user = _single_consumer(index, tensor, outputs)
    if user is not None and user.op_type == "Relu":
        return user.output[0], None
    if user is not None and user.op_type == "Clip":
        bounds = clip_range(index, user)
        if bounds is not None and bounds[0] == 0.0:
            return user.output[0], bounds[1]
    return tensor, None


def _downstream(index: GraphIndex, tensor: str, quantized: set[str],
                outputs: set[str]) -> str | None:
    """The quantized tensor reached from ``tensor`` through single-consumer grid ops, if any."""
    seen = set()
    while tensor not in quantized:
        if tensor in seen:
            return None
        seen.add(tensor)
        user = _single_consumer(index, tensor, outputs)
        if user is None or not _grid_op(index, user) or user.input[0] != tensor:
            return None
        tensor = user.output[0]
    return tensor


def _upstream(index: GraphIndex, tensor: str, quantized: set[str]) -> list[str] | None:
    """Tensors from a quantized source down to ``tensor`` through grid ops (source first)."""
    chain = [tensor]
    while chain[-1] not in quantized:
        node = index.producer.get(chain[-1])
        if node is None or not _grid_op(index, node):
            return None
        chain.append(node.input[0])
    return chain[::-1]


def plan_fusion(model: onnx.ModelProto, quantized: set[str], layer_nodes: set[str],
                signed: dict[str, bool] | None = None) -> FusionPlan:
    """Plan the ``ort`` target's extra quantization (see the module docstring).

    ``quantized`` are the tensors with an activation quantizer, ``layer_nodes`` the names of the
    quantized Conv/Gemm/MatMul nodes, ``signed`` an optional sign per new output tensor
    (default: unsigned after Relu or ``Clip(0, .)``, else signed).
    """
    index = GraphIndex(model)
    outputs = {o.name for o in model.graph.output}
    known = set(quantized)
    plan = FusionPlan()

    def dq_able(tensor: str) -> bool:
        if tensor in known or tensor in plan.requant:
            return True
        chain = _upstream(index, tensor, known)
        if chain is None:
            return False
        source = plan.requant.get(chain[0], chain[0])
        for t in chain[1:]:
            plan.requant[t] = source
        return True

    for node, name in zip(model.graph.node, index.names, strict=True):
        if node.op_type in LAYER_OPS and name in layer_nodes:
            if not dq_able(node.input[0]):
                continue
        elif node.op_type == "Add":
            data = [t for t in node.input if not _is_const(index, t)]
            if len(data) != 2 or not all(t in known or t in plan.requant
                                         or _upstream(index, t, known) for t in data):
                continue
            for t in data:
                dq_able(t)
        elif node.op_type in POOL_OPS:
            if not dq_able(node.input[0]):
                continue
        else:
            continue
        tensor, clip_max = fusion_output(index, node, outputs)
        target = _downstream(index, tensor, known, outputs)
        if clip_max is not None:  # the quantizer whose range must fit inside the Clip
            source = plan.requant.get(target, target) if target is not None else tensor
            plan.clip_limits[source] = min(clip_max, plan.clip_limits.get(source, clip_max))
        if target is not None:
            if target != tensor:
                plan.requant[tensor] = plan.requant.get(target, target)
        elif tensor in outputs and node.op_type in ("Gemm", "MatMul"):
            plan.float_outputs.append(name)
        elif node.op_type in POOL_OPS or index.producer.get(tensor) is None:
            continue
        else:
            is_signed = (signed or {}).get(tensor, not _unsigned(index, tensor))
            plan.outputs.append(OutputNeed(tensor, is_signed, name))
            known.add(tensor)
        plan.fusable[name] = tensor
    return plan


def _unsigned(index: GraphIndex, tensor: str) -> bool:
    node = index.producer.get(tensor)
    if node is None:
        return False
    if node.op_type == "Relu":
        return True
    if node.op_type == "Clip":
        bounds = clip_range(index, node)
        return bounds is not None and bounds[0] >= 0
    return False


def zero_pad_amounts(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The ``pads`` of a constant-mode Pad that pads with 0 on all axes, else None."""
    mode = attr(node, "mode", b"constant")
    if node.op_type != "Pad" or mode not in (b"constant", "constant") or len(node.input) > 3:
        return None
    pads = index.array(node.input[1]) if len(node.input) > 1 else None
    if len(node.input) > 2 and node.input[2]:
        value = index.array(node.input[2])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            return None
    return None if pads is None else [int(p) for p in pads.reshape(-1)]


def integer_pads(model: onnx.ModelProto) -> dict[str, str]:
    """Take every zero Pad of an ``ort`` graph off the float path, in place; exact.

    1. ``Pad(x) -> Q(s, z) -> DQ(s, z) -> Conv`` with pads ``p >= 0`` on the spatial axes only:
       ``p`` joins the Conv's ``pads`` (QLinearConv pads with ``z``, which is 0 after DQ) and Q
       reads ``x``, or the Conv reads ``x`` when ``x = DQ(s, z)(q)`` already (``"conv"``).
    2. ``DQ(s, z)(q) -> Pad -> Q(s, z)``: the Pad runs on ``q`` with constant ``z``
       (``DQ(pad_z(q)) = pad_0(DQ(q))`` and ``Q(DQ(q)) = q``) and replaces the Q
       (``"integer"``).

    Returns ``{Pad output tensor: "conv" | "integer"}``; the tensor is gone from the graph.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    done: dict[str, str] = {}
    for pad in [n for n in graph.node if n.op_type == "Pad"]:
        index = GraphIndex(model)
        pads, q = zero_pad_amounts(index, pad), _single_consumer(index, pad.output[0], outputs)
        if pads is None or q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3:
            continue
        src = index.producer.get(pad.input[0])
        if src is not None and (src.op_type != "DequantizeLinear"
                                or src.input[1:3] != q.input[1:3]):
            src = None  # src: a DQ on the same grid as q
        dq = _single_consumer(index, q.output[0], outputs)
        conv = _single_consumer(index, dq.output[0], outputs) \
            if dq is not None and dq.op_type == "DequantizeLinear" else None
        rank = len(pads) // 2
        spatial = pads[2:rank] + pads[rank + 2:]
        if conv is not None and dq is not None and conv.op_type == "Conv" and \
                conv.input[0] == dq.output[0] and min(pads) >= 0 and \
                not any(pads[:2] + pads[rank:rank + 2]) and \
                attr(conv, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"):
            old = attr(conv, "pads", None) or [0] * len(spatial)
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend(kept)
            conv.attribute.append(onnx.helper.make_attribute(
                "pads",
                [a + b for a, b in zip(old, spatial, strict=True)]))  # type: ignore[call-overload]
            if src is not None:
                conv.input[0] = src.output[0]
                _remove(graph, [pad, q, dq])
            else:
                q.input[0] = pad.input[0]
                _remove(graph, [pad])
            done[pad.output[0]] = "conv"
        elif src is not None and getattr(index.array(q.input[2]), "size", 0) == 1:
            alone = len(index.consumers[src.output[0]]) == 1 and src.output[0] not in outputs
            pad.input[0] = src.input[0]
            pad.input.extend([""] * (3 - len(pad.input)))
            pad.input[2] = q.input[2]
            tensor, pad.output[0] = pad.output[0], q.output[0]
            _remove(graph, [q, src] if alone else [q])
            done[tensor] = "integer"
    return done


def _remove(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    for node in nodes:
        graph.node.remove(node)
