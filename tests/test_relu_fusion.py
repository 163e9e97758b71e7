"""Activation quantizers that absorb the Relu/Relu6 producing their tensor (``fuse_activations``).

Fused and unfused networks are built from the same float graph: outputs, gradients, calibrated
clip values, training trajectories and emitted models must be the same. ONNX Runtime on the float
model is the oracle for the calibration statistics and the float graph; :func:`verify` for the
emitted models.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx, nn

from onnxbits.emit.prepare import limit_clip_alphas, prepare_ort
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import QuantizedNetwork, _clamp_of, attach_quantizers, calibrate
from onnxbits.train.loop import TrainConfig, fine_tune
from tests.builders import OPSET, _Builder, make_model
from tests.conftest import ort_session, random_input

FUSED = {"relu1": (0.0, None), "relu6": (0.0, 6.0), "relu_shared": (0.0, None)}
KEPT = {"clip4", "relu_out"}           # a general Clip; a Relu that is also a graph output


def fusion_model(feature_output: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Clip(0, 6) -> Conv -> Clip(0, 4) -> Conv -> Relu -> {Conv, Conv}
    -> Add -> Relu -> Conv -> GAP -> Flatten -> Gemm; with ``feature_output`` the last Relu's
    output is also the graph output ``feature`` (second output)."""
    b = _Builder(seed)
    zero, six, four = (b.init(n, np.array(v, np.float32)) for n, v in
                       (("zero", 0.0), ("six", 6.0), ("four", 4.0)))
    x = b.node("Relu", [b.conv("input", 3, 8, name="conv1")], name="relu1")
    x = b.node("Clip", [b.conv(x, 8, 8, name="conv2"), zero, six], name="relu6")
    x = b.node("Clip", [b.conv(x, 8, 8, name="conv3"), zero, four], name="clip4")
    x = b.node("Relu", [b.conv(x, 8, 8, name="conv4")], name="relu_shared")
    x = b.node("Add", [b.conv(x, 8, 8, name="conv_a"), b.conv(x, 8, 8, name="conv_b")],
               name="add")
    feature = b.node("Relu", [x], name="relu_out")
    x = b.node("GlobalAveragePool", [b.conv(feature, 8, 8, name="conv5")], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 8, 10, name="fc")
    b.nodes[-1].output[0] = "logits"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])]
    if feature_output:
        outputs.append(helper.make_tensor_value_info(feature, TensorProto.FLOAT,
                                                     ["N", 8, 8, 8]))
    graph = helper.make_graph(b.nodes, "fusion", [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, ["N", 3, 8, 8])], outputs, b.inits)
    model = make_model(graph, OPSET)
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass
class Pair:
    model: onnx.ModelProto
    graph: fx.GraphModule
    nets: dict[bool, QuantizedNetwork]       # fuse_activations -> network
    x: torch.Tensor


def make_pair(feature_output: bool = True, prepare: bool = False) -> Pair:
    model = normalize(fusion_model(feature_output))
    graph = convert(model)
    sites = find_sites(model, graph)
    x = random_input(model, 32) * 4            # large enough to saturate Relu6
    nets = {}
    for fuse in (False, True):
        net = attach_quantizers(model, graph, sites, fuse_activations=fuse)
        if prepare:
            prepare_ort(model, net)
        calibrate(net, [x[:16], x[16:]])
        nets[fuse] = net
    return Pair(model, graph, nets, x)


def tensor_of(model: onnx.ModelProto, node: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == node)


def forward_backward(net: QuantizedNetwork, x: torch.Tensor,
                     grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Outputs, then the gradients of ``sum(out_i * g_i)`` for weights, clip values and bits."""
    outs = net(x)
    outs = list(outs) if isinstance(outs, tuple | list) else [outs]
    loss = sum((o * g).sum() for o, g in zip(outs, grads))
    params = [*net.kernel_parameters(), *net.bias_parameters(), *net.alpha_parameters(), *net.bit_parameters()]
    trainable = [p for p in params if p.requires_grad]
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, trainable))


def test_relu_and_relu6_are_fused_clip_and_graph_output_relu_are_kept() -> None:
    p = make_pair()
    fused, plain = p.nets[True], p.nets[False]
    for node, clamp in FUSED.items():
        tensor = tensor_of(p.model, node)
        assert fused.acts[tensor].input_clamp == clamp
        assert plain.acts[tensor].input_clamp is None
    for node in KEPT:
        assert fused.acts[tensor_of(p.model, node)].input_clamp is None
    assert set(fused.acts) == set(plain.acts)
    onnx_outputs = {m.onnx_mapping.outputs[0] for m in fused.graph.modules()
                    if hasattr(m, "onnx_mapping")}
    assert {tensor_of(p.model, n) for n in FUSED}.isdisjoint(onnx_outputs)
    assert {tensor_of(p.model, n) for n in KEPT} <= onnx_outputs
    relus = [m for m in fused.graph.modules() if isinstance(m, nn.ReLU | nn.Hardtanh)]
    assert len(relus) == 1                   # relu_out only (clip4 is onnx2torch's OnnxClip)


def test_float_graph_with_fused_quantizers_disabled_matches_onnx_runtime() -> None:
    p = make_pair()
    session = ort_session(p.model)
    expected = session.run(None, {"input": p.x.numpy()})
    for q in p.nets[True].quantizers():
        q.enabled = False
    with torch.no_grad():
        got = p.nets[True].graph(p.x)   # every output, not only the first
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)


def test_calibration_measures_the_clamped_tensor() -> None:
    p = make_pair()
    names = [tensor_of(p.model, n) for n in [*FUSED, *KEPT]]
    probe = onnx.ModelProto()
    probe.CopyFrom(p.model)
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in {o.name for o in probe.graph.output})
    session = ort_session(probe)
    batches = [session.run(names, {"input": b.numpy()}) for b in (p.x[:16], p.x[16:])]
    for i, name in enumerate(names):
        expected = np.mean([b[i].max() for b in batches])
        for net in p.nets.values():
            np.testing.assert_allclose(float(net.acts[name].alpha().detach()), expected, rtol=1e-5)
    assert any((b[names.index(tensor_of(p.model, "relu6"))] == 6).any() for b in batches)


@pytest.mark.parametrize("phase", ["learned", "frozen", "exec8"])
def test_fused_and_unfused_give_the_same_outputs_and_gradients(phase: str) -> None:
    p = make_pair()
    for net in p.nets.values():
        with torch.no_grad():
            for i, q in enumerate(net.quantizers()):
                q.bits.fill_(2.3 + 0.37 * (i % 13))
        if phase != "learned":
            for q in net.quantizers():
                q.freeze()
        if phase == "exec8":
            for q in net.acts.values():
                q.exec_bits = 8
    with torch.no_grad():
        shapes = [o.shape for o in p.graph(p.x)]
    grads = [torch.randn(s) for s in shapes]
    plain = forward_backward(p.nets[False], p.x, grads)
    fused = forward_backward(p.nets[True], p.x, grads)
    assert len(plain) == len(fused)
    for a, b in zip(plain, fused):
        assert torch.equal(b, a)


def test_graph_output_reads_the_float_relu_output_not_the_quantized_one() -> None:
    p = make_pair()
    name = tensor_of(p.model, "relu_out")
    for net in p.nets.values():
        seen: list[torch.Tensor] = []
        q = net.acts[name]
        hook = q.register_forward_hook(lambda m, i, o: seen.append(m.quantized_input(i[0])))
        with torch.no_grad():
            feature = net.graph(p.x)[1]
        hook.remove()
        assert torch.equal(feature, seen[0])
        assert not torch.equal(feature, q(seen[0]))


@pytest.mark.parametrize("target", ["ort", "exact-sim"])
def test_fine_tune_and_emission_are_the_same_with_fusion(target: str) -> None:
    p = make_pair(feature_output=False, prepare=target == "ort")
    with torch.no_grad():
        teacher = p.graph(p.x)
    emitted = {}
    for fuse, net in p.nets.items():
        torch.manual_seed(0)
        fine_tune(net, lambda idx: (p.x[idx], None), teacher, len(p.x),
                  TrainConfig(steps=6, frozen_steps=3, batch_size=8, lam=0.5))
        if target == "ort":
            limit_clip_alphas(p.model, net)
        emitted[fuse] = emit(p.model, net, target, source={"test": "fusion"})
    plain, fused = (p.nets[f].graph.state_dict() for f in (False, True))
    assert plain.keys() == fused.keys()
    assert all(torch.equal(fused[k], plain[k]) for k in plain)
    assert emitted[True].SerializeToString() == emitted[False].SerializeToString()
    for net in p.nets.values():    # one step allowed: a rounding tie may flip (verify's rule)
        result = verify(emitted[True], net, [p.x[:16], p.x[16:]], target)
        assert result.max_steps <= 1 + 1e-3
        assert result.tensors == len(net.acts)


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.relu6 = nn.ReLU(), nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.relu(x) + torch.relu(x) + self.relu(x) + self.relu6(x) + torch.clamp(x, 0, 4)
                + F.relu(x, inplace=True))


def test_clamp_of_recognises_relu_forms_and_not_general_clamp() -> None:
    gm = fx.symbolic_trace(_Functional())
    found = [_clamp_of(gm, n) for n in gm.graph.nodes
             if n.op in ("call_function", "call_module") and n.target is not operator.add]
    assert found == [(0.0, None), (0.0, None), (0.0, None), (0.0, 6.0), None, None]
