"""Attach learnable-bitlength quantizers to the torch graph of an imported ONNX model.

Each site's weight goes through a per-channel symmetric (narrow-range) quantizer. Each distinct
ONNX tensor that feeds a site gets one per-tensor activation quantizer, inserted right after the
tensor's producer so that every consumer of that tensor sees the quantized value, exactly as the
emitted ONNX graph will (one QuantizeLinear/DequantizeLinear pair per tensor; a graph output keeps
the float tensor, as in the emitted graph). Activations are unsigned when the tensor comes from
Relu (or a non-negative Clip), else signed.

Activation fusion (``fuse_activations=True``): when the producer is a Relu (``(lo, hi) = (0,
None)``) or a Relu6/Hardtanh (``(min_val, max_val)``) whose only user is the new quantizer, the
quantizer reads the producer's input with ``input_clamp=(lo, hi)`` and the producer node is
removed: ``Q(clamp(x, lo, hi))`` is computed in one kernel, with the values and gradients of
``Q(relu(x))`` (see :class:`~onnxbits.quant.quantizer.BitQuantizer`), and the Relu output is never
stored. ``QuantizedNetwork.acts`` stays keyed by the ONNX name of the Relu output. A general
``Clip`` (onnx2torch's ``OnnxClip``) is not fused: ``torch.clamp`` passes the gradient at the
bounds, the fused clamp (like Relu/Hardtanh) does not.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from onnxbits.graph.outputs import GraphOutput, graph_outputs
from onnxbits.importer.batch import Batch, call, pieces
from onnxbits.importer.convert import CONV_TYPES, Site, is_unsigned_tensor
from onnxbits.quant.cost import LayerBits
from onnxbits.quant.quantizer import BitQuantizer


def first_output(out: Tensor | tuple[Tensor, ...] | list[Tensor]) -> Tensor:
    """The first output of a graph's forward pass (the only one when it returns a tensor)."""
    return out[0] if isinstance(out, (list, tuple)) else out


def all_outputs(out: Tensor | tuple[Tensor, ...] | list[Tensor]) -> tuple[Tensor, ...]:
    """Every output of a graph's forward pass, as a tuple in graph-output order."""
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class QuantWeightLayer(nn.Module):
    """Conv / Linear / MatMul whose weight is fake-quantized: ``op(x, Q(W, n_w), b)``."""

    def __init__(self, site: Site, module: nn.Module, weight_quantizer: BitQuantizer,
                 matmul_weight: Tensor | None = None) -> None:
        super().__init__()
        self.site_op = site.op
        self.inner = module
        self.wq = weight_quantizer
        if matmul_weight is not None:
            self.weight = nn.Parameter(matmul_weight.detach().clone())
        self.macs_per_sample = 0

    def float_weight(self) -> nn.Parameter:
        """The trainable float weight (torch layout)."""
        return self.weight if self.site_op == "MatMul" else self.inner.weight

    def bias(self) -> nn.Parameter | None:
        """The trainable bias, if any."""
        return None if self.site_op == "MatMul" else self.inner.bias

    def forward(self, x: Tensor, *ignored: Tensor) -> Tensor:
        w = self.wq(self.float_weight())
        if self.site_op == "Conv":
            return self.inner._conv_forward(x, w, self.inner.bias)
        if self.site_op == "Gemm":
            return F.linear(x, w, self.inner.bias)
        return torch.matmul(x, w)


@dataclass
class QuantizedNetwork:
    """The quantized torch graph plus handles on its quantizers, keyed by ONNX names."""

    graph: fx.GraphModule
    sites: list[Site]
    layers: dict[str, QuantWeightLayer]          # site node -> wrapped layer
    acts: dict[str, BitQuantizer]                # ONNX tensor -> activation quantizer
    layer_act: dict[str, str | None] = field(default_factory=dict)  # site node -> tensor
    outputs: list[GraphOutput] = field(default_factory=list)  # what each graph output is

    def __call__(self, x: Batch) -> Tensor:
        """The first graph output, flattened to ``(N, -1)``: the logits the evaluation reads
        (as ONNX Runtime's first output in :func:`onnxbits.report.evaluate.predict_logits`;
        ``(N, 1000, 1, 1)`` -> ``(N, 1000)``). ``x``: one tensor, or a tuple for several inputs."""
        out = first_output(call(self.graph, x))
        return out.flatten(1) if out.dim() > 2 else out

    def forward_all(self, x: Batch) -> tuple[Tensor, ...]:
        """Every graph output, unflattened (what the fine-tune distils)."""
        return all_outputs(call(self.graph, x))

    @property
    def device(self) -> torch.device:
        """The device the graph's parameters live on."""
        return next(iter(self.graph.parameters())).device

    def quantizers(self) -> list[BitQuantizer]:
        """All quantizers: weights in site order, then activations."""
        return [layer.wq for layer in self.layers.values()] + list(self.acts.values())

    def named_quantizers(self) -> list[tuple[str, BitQuantizer]]:
        """``("<node> (weights)" | "<tensor> (activation)", quantizer)`` in :meth:`quantizers`
        order: the names reports use for quantizer groups."""
        return ([(f"{node} (weights)", layer.wq) for node, layer in self.layers.items()]
                + [(f"{tensor} (activation)", q) for tensor, q in self.acts.items()])

    def bit_parameters(self) -> list[nn.Parameter]:
        """The learnable bitlengths."""
        return [q.bits for q in self.quantizers()]

    def alpha_parameters(self, weights: bool = True) -> list[nn.Parameter]:
        """The learnable clip values (log-parametrised); activations only without ``weights``."""
        quantizers = self.quantizers() if weights else list(self.acts.values())
        return [q.log_alpha for q in quantizers]

    def kernel_parameters(self) -> list[nn.Parameter]:
        """Site weights (without biases)."""
        return [layer.float_weight() for layer in self.layers.values()]

    def bias_parameters(self) -> list[nn.Parameter]:
        """Site biases (layers without a bias have none)."""
        return [b for b in (layer.bias() for layer in self.layers.values()) if b is not None]


def _unwrap_conv(module: nn.Module) -> nn.Module:
    if isinstance(module, CONV_TYPES):
        return module
    for child in module.modules():
        if isinstance(child, CONV_TYPES):
            return child
    return module


def _producer(gm: fx.GraphModule, tensor: str, graph_inputs: list[str]) -> fx.Node | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if tensor in graph_inputs:
        return placeholders[graph_inputs.index(tensor)]
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mapping = getattr(modules[node.target], "onnx_mapping", None)
        if mapping is not None and len(mapping.outputs) == 1 and mapping.outputs[0] == tensor:
            return node
    return None


def _clamp_of(gm: fx.GraphModule, node: fx.Node) -> tuple[float, float | None] | None:
    """``(lo, hi)`` when ``node`` is ``relu(x)`` or ``hardtanh(x, lo, hi)`` (Relu6), else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_module" and not node.kwargs and len(node.args) == 1:
        module = gm.get_submodule(str(node.target))
        if isinstance(module, nn.ReLU):
            return (0.0, None)
        if isinstance(module, nn.Hardtanh):
            return (float(module.min_val), float(module.max_val))
    if node.op == "call_function" and node.target in (F.relu, torch.relu) and \
            len(node.args) == 1 and not node.kwargs.get("inplace", False):
        return (0.0, None)
    return None


def _fuse_producer(gm: fx.GraphModule, node: fx.Node, quantizer: BitQuantizer) -> bool:
    """Absorb the Relu/Relu6 feeding quantizer ``node`` if it feeds nothing else (module
    docstring); True if fused."""
    producer = node.args[0]
    clamp = _clamp_of(gm, producer) if isinstance(producer, fx.Node) else None
    if clamp is None or list(producer.users) != [node]:
        return False
    quantizer.input_clamp = clamp
    node.args = (producer.args[0],)
    gm.graph.erase_node(producer)
    if producer.op == "call_module" and not any(
            n.op == "call_module" and n.target == producer.target for n in gm.graph.nodes):
        gm.delete_submodule(str(producer.target))
    return True


def attach_quantizers(model: onnx.ModelProto, float_graph: fx.GraphModule, sites: list[Site], *,
                      min_bits: int = 2, max_bits: int = 8, per_channel_bits: bool = False,
                      quantize_acts: bool = True, fuse_activations: bool = True,
                      min_act_bits: int | None = None) -> QuantizedNetwork:
    """Deep-copy ``float_graph`` and attach weight and activation quantizers at ``sites``.

    Weight bitlengths live in ``[min_bits, max_bits]``, activation bitlengths in
    ``[min_act_bits, max_bits]`` (``min_act_bits`` defaults to ``min_bits``).

    ``fuse_activations`` lets activation quantizers absorb the Relu/Relu6 that produces their
    tensor (module docstring); the outputs and gradients are the same either way.
    """
    act_floor = min_bits if min_act_bits is None else min_act_bits
    gm = copy.deepcopy(float_graph)
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = [i.name for i in model.graph.input if i.name not in init_names]
    layers: dict[str, QuantWeightLayer] = {}
    for site in sites:
        module = gm.get_submodule(site.module)
        mapping = getattr(module, "onnx_mapping", None)
        matmul_weight = None
        if site.op == "MatMul":
            node = next(n for n in gm.graph.nodes
                        if n.op == "call_module" and n.target == site.module)
            matmul_weight = _get_attr(gm, node.args[1].target)
        else:
            module = _unwrap_conv(module) if site.op == "Conv" else module
        weight = matmul_weight if matmul_weight is not None else module.weight
        axis = 1 if site.op == "MatMul" else 0
        wq = BitQuantizer(signed=True, narrow=True, num_channels=weight.shape[axis],
                          channel_axis=axis, per_channel_bits=per_channel_bits,
                          min_bits=min_bits, max_bits=max_bits)
        reduce_dims = [d for d in range(weight.dim()) if d != axis]
        wq.init_alpha(weight.detach().abs().amax(dim=reduce_dims))
        layer = QuantWeightLayer(site, module, wq, matmul_weight)
        if mapping is not None:
            layer.onnx_mapping = mapping   # the layer's output stays findable by ONNX name
        gm.set_submodule(site.module, layer)
        layers[site.node] = layer
    acts: dict[str, BitQuantizer] = {}
    layer_act: dict[str, str | None] = {}
    for site in sites:
        layer_act[site.node] = None
        if not quantize_acts:
            continue
        if site.input not in acts:
            producer = _producer(gm, site.input, graph_inputs)
            if producer is None:
                continue
            quantizer = BitQuantizer(signed=not is_unsigned_tensor(model, site.input),
                                     min_bits=act_floor, max_bits=max_bits)
            name = f"onnxbits_act_{len(acts)}"
            gm.add_submodule(name, quantizer)
            with gm.graph.inserting_after(producer):
                new = gm.graph.call_module(name, (producer,))
            producer.replace_all_uses_with(
                new, delete_user_cb=lambda user, new=new: user is not new and user.op != "output")
            if fuse_activations:
                _fuse_producer(gm, new, quantizer)
            acts[site.input] = quantizer
        layer_act[site.node] = site.input
    gm.graph.lint()
    gm.recompile()
    return QuantizedNetwork(gm, sites, layers, acts, layer_act, graph_outputs(model))


def _get_attr(gm: fx.GraphModule, target: str) -> Tensor:
    owner = gm
    *path, last = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return getattr(owner, last)


@torch.no_grad()
def calibrate(net: QuantizedNetwork, batches: list[Batch], rows_per_pass: int | None = None
              ) -> None:
    """Initialise activation clip values from float statistics and count MACs per sample.

    For each activation tensor, ``alpha`` = mean over batches of the batch maximum of ``x``
    (unsigned) or ``|x|`` (signed), measured with every quantizer disabled; ``x`` is the tensor
    the quantizer quantizes (after a fused Relu/Relu6: ``BitQuantizer.quantized_input``).
    A batch runs in pieces of at most ``rows_per_pass`` samples (memory), its maximum taken
    over them.
    """
    quantizers = net.quantizers()
    for q in quantizers:
        q.enabled = False
    stats: dict[str, list[Tensor]] = {t: [] for t in net.acts}
    hooks = []
    for tensor, q in net.acts.items():
        def record(module: BitQuantizer, inputs: tuple[Tensor, ...], tensor: str = tensor) -> None:
            x = module.quantized_input(inputs[0]).detach()
            stats[tensor].append(x.abs().amax() if module.signed else x.amax())
        hooks.append(q.register_forward_pre_hook(record))
    for layer in net.layers.values():
        def count(module: QuantWeightLayer, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            per_sample = out[0].numel() if out.dim() > 1 else out.numel()
            w = module.float_weight()
            k = w.shape[0] if module.site_op == "MatMul" else w[0].numel()
            module.macs_per_sample = int(per_sample * k)
        hooks.append(layer.register_forward_hook(count))
    try:
        for x in batches:
            before = {t: len(v) for t, v in stats.items()}
            split = pieces(x, rows_per_pass)
            for piece in split:
                net(piece)
            for tensor, values in stats.items():     # the batch's maximum over its pieces
                if len(split) > 1 and len(values) > before[tensor]:
                    values[before[tensor]:] = [torch.stack(values[before[tensor]:]).amax()]
    finally:
        for h in hooks:
            h.remove()
        for q in quantizers:
            q.enabled = True
    for tensor, q in net.acts.items():
        if stats[tensor]:
            q.init_alpha(torch.stack(stats[tensor]).mean())


def layer_bits(net: QuantizedNetwork,
               bits_of: Callable[[BitQuantizer], Tensor] | None = None) -> list[LayerBits]:
    """Per-layer bitlengths and sizes, in site order (for :mod:`onnxbits.quant.cost`). A quantizer's
    bitlength is ``bits_of(q)``, by default the differentiable mean of its
    :meth:`BitQuantizer.effective_bits` over channels."""
    bits_of = bits_of or (lambda q: q.effective_bits().mean())
    out = []
    for site in net.sites:
        layer = net.layers[site.node]
        tensor = net.layer_act.get(site.node)
        act = bits_of(net.acts[tensor]) if tensor in net.acts else None
        out.append(LayerBits(bits_of(layer.wq), act, int(layer.float_weight().numel()),
                             layer.macs_per_sample))
    return out
