"""Torch-side changes that let the ``ort`` target run every quantized layer on integer kernels.

ONNX Runtime fuses ``DQ -> Conv -> [Relu] -> Q`` into QLinearConv, so a layer whose output is
not quantized (a residual branch before its Add, the last block before the average pool, a
linear bottleneck that is not read by another layer) runs in float. :func:`add_output_quantizers`
gives each such tensor a fixed 8-bit activation quantizer (per tensor, clip value calibrated and
then learned like every other one, bits fixed at 8: ``min_bits = max_bits = 8``), so the torch
model simulates exactly what the emitted graph computes. The quantizers are registered in
``net.acts`` and inserted with torch.fx right after the tensor's producer, as
:func:`onnxbits.quant.network.attach_quantizers` does for layer inputs. A layer whose input has no
quantizer of its own reads the new one (``net.layer_act``), so the bit cost counts it at its
fixed 8 bits; otherwise the bit cost does not count them.

:func:`simulate_int32_bias` makes the torch model add each layer's bias the way ONNX Runtime's
integer kernels do: rounded to the int32 accumulator grid ``s = s_in s_w`` (``s_in`` the layer
input's step at 8 bits, ``s_w`` the per-channel weight step), ``b_q = round(b / s) s``. The
rounding moves an output by up to ``s / 2``, which at 2-bit weights reaches half an output step,
so it must be simulated for the one-step check to hold. A forward hook adds ``b_q - b``
(detached: a straight-through estimator for ``b``) once the weight bits are frozen; the emitter
writes ``round(b / s)`` as the int32 bias of exactly those layers.

:func:`limit_clip_alphas` keeps the clip value of a tensor that comes out of ``Clip(0, hi)``
(ReLU6) at most ``hi``: only then does ONNX Runtime drop the Clip and fuse the layer.

:func:`hoist_pad_quantizers` moves a quantizer that reads a zero Pad to the Pad's input (the
same values), so that the Pad can be folded away in the graph.

:func:`prepare_ort` does all but :func:`limit_clip_alphas`; call it for the ``ort`` and ``pack``
targets right after :func:`onnxbits.quant.network.attach_quantizers`, before calibration.
"""

from __future__ import annotations

import math

import onnx
import torch
from torch import Tensor, fx, nn

from onnxbits.emit.fusion import OutputNeed, plan_fusion, zero_pad_amounts
from onnxbits.graph.index import GraphIndex
from onnxbits.importer.convert import Site, is_unsigned_tensor
from onnxbits.quant.network import QuantizedNetwork, QuantWeightLayer
from onnxbits.quant.quantizer import BitQuantizer

OUTPUT_BITS = 8
EXEC_BITS = 8
BIAS_ATTR = "int32_bias_input"  # set on a QuantWeightLayer whose bias is simulated as int32
CONST_ATTR = "int32_bias_const"  # MatMul layers: the constant addend of the following Add


def _fx_producer(gm: fx.GraphModule, tensor: str) -> fx.Node | None:
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = modules[node.target]
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is None:
            mapping = getattr(getattr(module, "inner", None), "onnx_mapping", None)
        if mapping is not None and len(mapping.outputs) == 1 and mapping.outputs[0] == tensor:
            return node
    return None


def planned_outputs(model: onnx.ModelProto, net: QuantizedNetwork) -> list[OutputNeed]:
    """Tensors that need an output quantizer for the ``ort`` target (nothing is changed)."""
    return plan_fusion(model, set(net.acts), {s.node for s in net.sites}).outputs


def add_output_quantizers(model: onnx.ModelProto, net: QuantizedNetwork,
                          bits: int = OUTPUT_BITS) -> list[str]:
    """Insert fixed ``bits``-bit quantizers on the tensors :func:`planned_outputs` names.

    ``model`` is the normalised ONNX model ``net`` was imported from. Call it after
    :func:`onnxbits.quant.network.attach_quantizers` and before :func:`onnxbits.quant.network.calibrate`
    (which sets their clip values). Returns the quantized tensor names; tensors whose producer
    has no torch module of its own are skipped (their layer then stays in float in ORT).
    """
    gm = net.graph
    added = []
    for need in planned_outputs(model, net):
        producer = _fx_producer(gm, need.tensor)
        if producer is None:
            continue
        signed = not is_unsigned_tensor(model, need.tensor)
        quantizer = BitQuantizer(signed=signed, min_bits=bits, max_bits=bits)
        quantizer.freeze(torch.tensor(float(bits)))
        name = f"onnxbits_out_{len(added)}"
        gm.add_submodule(name, quantizer)
        with gm.graph.inserting_after(producer):
            new = gm.graph.call_module(name, (producer,))
        producer.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        net.acts[need.tensor] = quantizer
        for site in net.sites:  # a layer that reads the tensor now reads it at 8 bits
            if site.input == need.tensor and net.layer_act.get(site.node) is None:
                net.layer_act[site.node] = need.tensor
        added.append(need.tensor)
    gm.graph.lint()
    gm.recompile()
    return added


@torch.no_grad()
def limit_clip_alphas(model: onnx.ModelProto, net: QuantizedNetwork) -> list[str]:
    """Clamp ``alpha <= hi`` for quantized tensors produced by ``Clip(0, hi)``; return their names.

    Call after the fine-tune and before emitting (torch and ONNX then share the clamped value).
    """
    plan = plan_fusion(model, set(net.acts), {s.node for s in net.sites})
    changed = []
    for tensor, hi in plan.clip_limits.items():
        q = net.acts.get(tensor)
        if q is None or not math.isfinite(hi) or hi <= 0:
            continue
        limit = math.log(hi) - 1e-6
        if float(q.log_alpha.max()) > limit:
            q.log_alpha.clamp_(max=limit)
            changed.append(tensor)
    return changed


def exec_step(q: BitQuantizer, bits: int = EXEC_BITS) -> Tensor:
    """Step of activation quantizer ``q`` executed at ``bits`` over its clip range."""
    saved = q.exec_bits
    q.exec_bits = bits
    try:
        return q.step()
    finally:
        q.exec_bits = saved


def _bias_value(layer: QuantWeightLayer) -> Tensor | None:
    const = getattr(layer, CONST_ATTR, None)
    return const if const is not None else layer.bias()


def _input_quantizer(net: QuantizedNetwork, node: str) -> BitQuantizer | None:
    tensor = getattr(net.layers[node], BIAS_ATTR, None)
    return net.acts.get(tensor) if tensor is not None else None


def _weight_step(layer: QuantWeightLayer, act: BitQuantizer) -> Tensor:
    step = layer.wq.step().detach().float()
    bias = _bias_value(layer)
    if bias is None or step.numel() == 1:
        return step
    s_in = exec_step(act).detach().float()
    w = layer.float_weight().detach()
    axis = layer.wq.channel_axis
    shape = [1] * w.dim()
    shape[axis] = -1
    dims = [d for d in range(w.dim()) if d != axis]
    zero = torch.round(w / step.reshape(shape)).abs().amax(dim=dims) == 0
    safe = bias.detach().float().abs().reshape(-1) / (s_in * 2.0**24)
    return torch.where(zero, torch.maximum(step, safe), step)


def _bias_scale(layer: QuantWeightLayer, act: BitQuantizer) -> Tensor:
    return (exec_step(act).detach().float() * _weight_step(layer, act)).float()


def weight_step(net: QuantizedNetwork, node: str) -> Tensor:
    """Per-channel weight step the ``ort`` target writes: the quantizer's step, except that a
    channel whose weights all round to 0 gets a step large enough for its int32 bias
    (``|b| / (s_in s_w) <= 2^24``); its weights are 0 at any step."""
    act = _input_quantizer(net, node)
    layer = net.layers[node]
    return layer.wq.step().detach().float() if act is None else _weight_step(layer, act)


def bias_scale(net: QuantizedNetwork, node: str) -> Tensor | None:
    """The int32 accumulator step ``s_in s_w`` (float32, one per output channel) of a layer
    whose bias is simulated as int32 (``s_w`` from :func:`weight_step`), else None."""
    act = _input_quantizer(net, node)
    return None if act is None else _bias_scale(net.layers[node], act)


def bias_integers(bias: Tensor, scale: Tensor) -> Tensor:
    """``round(b / s)`` saturated to the int32 range (as float32 values)."""
    limit = float(2**31 - 2**7)  # the largest float32 below 2^31
    return torch.clamp(torch.round(bias.detach().float().reshape(-1) / scale), -limit, limit)


class _BiasRounding:
    """Forward hook: ``out + (round(b / s) s - b)`` along the channel axis, once bits are frozen.

    Holds the layer and its input quantizer (not the network), so a deep copy of the graph
    module copies a consistent hook.
    """

    def __init__(self, layer: QuantWeightLayer, act: BitQuantizer, channel_dim: int) -> None:
        self.layer, self.act, self.channel_dim = layer, act, channel_dim

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        bias = _bias_value(self.layer)
        if not self.layer.wq.frozen or bias is None:
            return out
        scale = _bias_scale(self.layer, self.act)
        correction = (bias_integers(bias, scale) * scale - bias.detach()).to(out.dtype)
        shape = [1] * out.dim()
        shape[self.channel_dim] = -1
        return out + correction.reshape(shape)


def _matmul_add_module(gm: fx.GraphModule, site: Site) -> nn.Module | None:
    """The torch module of the constant bias Add that follows a MatMul site, if any."""
    for _, module in gm.named_modules():
        mapping = getattr(module, "onnx_mapping", None)
        if mapping is not None and site.output in mapping.inputs and len(mapping.inputs) == 2:
            return module
    return None


def simulate_int32_bias(model: onnx.ModelProto, net: QuantizedNetwork) -> list[str]:
    """Simulate int32 biases (see the module docstring) for every layer with a quantized input.

    Returns the layer names. MatMul layers count when a constant Add follows them (ORT fuses
    the pair into QGemm).
    """
    index = GraphIndex(model)
    done = []
    for site in net.sites:
        layer: QuantWeightLayer = net.layers[site.node]
        tensor = net.layer_act.get(site.node)
        if tensor not in net.acts or getattr(layer, BIAS_ATTR, None) is not None:
            continue
        if site.op == "MatMul":
            users = index.consumers.get(site.output, [])
            if len(users) != 1:
                continue
            other = [t for t in users[0].input if t != site.output]
            value = index.array(other[0]) if len(other) == 1 else None
            module = _matmul_add_module(net.graph, site)
            if users[0].op_type != "Add" or value is None or module is None or \
                    value.size != layer.wq.step().numel():
                continue
            layer.register_buffer(CONST_ATTR, torch.from_numpy(value.astype("float32").reshape(-1)),
                                  persistent=False)
            module.register_forward_hook(_BiasRounding(layer, net.acts[tensor], -1))
        elif layer.bias() is not None:
            channel_dim = 1 if site.op == "Conv" else -1
            layer.register_forward_hook(_BiasRounding(layer, net.acts[tensor], channel_dim))
        else:
            continue
        setattr(layer, BIAS_ATTR, tensor)
        done.append(site.node)
    return done


def hoist_pad_quantizers(model: onnx.ModelProto, net: QuantizedNetwork) -> list[str]:
    """Move each activation quantizer that reads a zero ``Pad`` to the Pad's input.

    ``Q(pad_0(x)) = pad_0(Q(x))`` because 0 is on every grid, so the network computes the same;
    the emitter can then fold the Pad into the Conv (:func:`onnxbits.emit.fusion.integer_pads`) with
    every quantizer still observable in the graph. Returns the new tensors (``net.acts`` and
    ``net.layer_act`` now name the Pad input).
    """
    index = GraphIndex(model)
    modules = {id(m): name for name, m in net.graph.named_modules()}
    nodes = {n.target: n for n in net.graph.graph.nodes if n.op == "call_module"}
    moved = []
    for tensor, q in list(net.acts.items()):
        pad = index.producer.get(tensor)
        if pad is None or zero_pad_amounts(index, pad) is None or pad.input[0] in net.acts:
            continue
        q_node = nodes.get(modules.get(id(q)))
        pad_node = q_node.args[0] if q_node is not None else None
        if not isinstance(pad_node, fx.Node) or not isinstance(pad_node.args[0], fx.Node):
            continue
        source = pad_node.args[0]
        for user in list(q_node.users):     # readers of Q(pad(x)) now read pad(Q(x))
            user.replace_input_with(q_node, pad_node)
        q_node.args = (source, *q_node.args[1:])
        source.replace_all_uses_with(q_node, delete_user_cb=lambda user, q=q_node: user is not q)
        pad_node.prepend(q_node)
        net.acts[pad.input[0]] = net.acts.pop(tensor)
        net.layer_act = {k: pad.input[0] if v == tensor else v for k, v in net.layer_act.items()}
        moved.append(pad.input[0])
    net.graph.graph.lint()
    net.graph.recompile()
    return moved


def prepare_ort(model: onnx.ModelProto, net: QuantizedNetwork) -> dict[str, list[str]]:
    """:func:`hoist_pad_quantizers`, :func:`add_output_quantizers`, then
    :func:`simulate_int32_bias`; returns what each did."""
    hoisted = hoist_pad_quantizers(model, net)
    outputs = add_output_quantizers(model, net)
    return {"hoisted": hoisted, "output_quantizers": outputs,
            "int32_bias": simulate_int32_bias(model, net)}
