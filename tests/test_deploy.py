"""Deployment targets: ORT fusion of the ``ort`` target, ``pack`` containers and the way back,
``exact-sim`` parity, metadata, and the ONNX Runtime 1.32 facts the design rests on.

Each model is quantized with :func:`onnxbits.emit.prepare.prepare_ort` (output quantizers + int32 bias
simulation), calibrated and fine-tuned once (20 steps, lambda 0.5: bits well below 8).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from onnxbits.cli.emit import pack_command, unpack_command
from onnxbits.cli.report import report_command

from onnxbits.emit.metadata import METADATA_KEY
from onnxbits.emit.ortgraph import count_fusion, optimized_model
from onnxbits.emit.pack import graph_view, pack_bits, pack_model, unpack_bits, unpack_model
from onnxbits.emit.prepare import bias_scale, limit_clip_alphas, planned_outputs, prepare_ort
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.errors import InvalidModelError
from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers
from onnxbits.quant.ranges import qrange
from onnxbits.report.model import analyze_model
from onnxbits.train.loop import TrainConfig, fine_tune
from tests.builders import _Builder, conv_relu_gemm, matmul_mlp, residual_block
from tests.conftest import calibrated_network, ort_logits, random_input

DEPLOY_TARGETS = ("ort", "exact-sim", "pack")


def shortcut_block(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """CIFAR ResNet downsampling block: the skip is ``Pad(Slice(x))`` ("option A"), then
    Add -> Relu -> AveragePool -> Reshape -> Gemm."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 8, name="stem")], name="stem_relu")
    y = b.node("Relu", [b.conv(x, 8, 16, stride=2, name="down_conv1")], name="down_relu1")
    y = b.conv(y, 16, 16, name="down_conv2")
    ints = np.array
    s = b.node("Slice", [x, b.init("sl_starts", ints([0, 0], np.int64)),
                         b.init("sl_ends", ints([2**31 - 1] * 2, np.int64)),
                         b.init("sl_axes", ints([2, 3], np.int64)),
                         b.init("sl_steps", ints([2, 2], np.int64))], name="shortcut_slice")
    s = b.node("Pad", [s, b.init("pad_pads", ints([0, 4, 0, 0, 0, 4, 0, 0], np.int64)),
                       b.init("pad_value", ints(0, np.float32))], name="shortcut_pad")
    x = b.node("Relu", [b.node("Add", [y, s], name="down_add")], name="down_relu2")
    x = b.node("AveragePool", [x], name="pool", kernel_shape=[4, 4])
    x = b.node("Reshape", [x, b.init("flat_shape", ints([-1, 16], np.int64))], name="flatten")
    b.gemm(x, 16, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def mobile_block(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """MobileNetV2 block: ReLU6 (Clip), 1x1 expand, explicit Pad (as TF exports have) before a
    depthwise 3x3, linear 1x1 projection whose output is added to the block input (no Relu
    after the Add), GAP -> Flatten -> Gemm."""
    b = _Builder(seed)
    lo = b.init("relu6_min", np.array(0, np.float32))
    hi = b.init("relu6_max", np.array(6, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 8, name="stem"), lo, hi], name="stem_relu6")
    y = b.node("Clip", [b.conv(x, 8, 16, k=1, name="expand"), lo, hi], name="expand_relu6")
    y = b.node("Pad", [y, b.init("dw_pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))],
               name="dw_pad")
    w = b.weight("depthwise.weight", (16, 1, 3, 3), fan_in=9)
    bias = b.init("depthwise.bias", b.rng.normal(0, 0.1, 16).astype(np.float32))
    y = b.node("Conv", [y, w, bias], name="depthwise", kernel_shape=[3, 3], group=16)
    y = b.node("Clip", [y, lo, hi], name="dw_relu6")
    y = b.conv(y, 16, 8, k=1, name="project")
    x = b.node("Add", [x, y], name="block_add")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 8, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def bottleneck_block(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """EfficientNet-style stem and blocks: a stride-2 Conv with asymmetric pads (split into a
    Pad on the graph input by normalisation), a linear 1x1 projection read directly by the next
    1x1 expansion (Conv -> Conv), GAP -> Flatten -> Gemm."""
    b = _Builder(seed)
    w = b.weight("stem.weight", (8, 3, 3, 3), fan_in=27)
    bias = b.init("stem.bias", b.rng.normal(0, 0.1, 8).astype(np.float32))
    x = b.node("Conv", ["input", w, bias], name="stem", kernel_shape=[3, 3], strides=[2, 2],
               pads=[0, 0, 1, 1])
    x = b.node("Relu", [x], name="stem_relu")
    x = b.conv(x, 8, 4, k=1, name="project")
    x = b.node("Relu", [b.conv(x, 4, 16, k=1, name="expand")], name="expand_relu")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 16, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


MODELS = {"residual_block": residual_block, "shortcut_block": shortcut_block,
          "mobile_block": mobile_block, "bottleneck_block": bottleneck_block,
          "conv_relu_gemm": conv_relu_gemm, "matmul_mlp": matmul_mlp}
RESIDUAL_ADDS = {"residual_block": 1, "shortcut_block": 1, "mobile_block": 1,
                 "bottleneck_block": 0, "conv_relu_gemm": 0, "matmul_mlp": 0}


@dataclass
class Trained:
    model: onnx.ModelProto
    net: QuantizedNetwork
    x: torch.Tensor
    prepared: dict[str, list[str]]


@cache
def trained(name: str) -> Trained:
    prepared: dict[str, list[str]] = {}
    c = calibrated_network(MODELS[name](),
                           prepare=lambda model, net: prepared.update(prepare_ort(model, net)))
    fine_tune(c.net, lambda idx: (c.x[idx], None), c.teacher, len(c.x),
              TrainConfig(steps=20, batch_size=16, lam=0.5))
    limit_clip_alphas(c.model, c.net)
    return Trained(c.model, c.net, c.x, prepared)


@cache
def emitted(name: str, target: str) -> onnx.ModelProto:
    t = trained(name)
    return emit(t.model, t.net, target, source={"test": name})


def meta(model: onnx.ModelProto) -> dict:
    return json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))


def inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


def show(model: onnx.ModelProto) -> str:
    return onnx.helper.printable_graph(model.graph)


names = pytest.mark.parametrize("name", list(MODELS))


# ---- ort target: every quantized layer on ORT's integer kernels -------------------------------

@names
def test_every_quantized_layer_is_fused_in_the_ort_target(name: str) -> None:
    t = trained(name)
    counts = count_fusion(optimized_model(emitted(name, "ort")))
    assert counts.fused_layers == len(t.net.sites), counts.ops
    assert counts.float_quantized_layers == 0 and counts.float_layers == 0, counts.ops
    assert counts.ops.get("QLinearAdd", 0) == RESIDUAL_ADDS[name], counts.ops
    assert counts.dequantize == 0, counts.ops


def test_quantizers_of_padded_tensors_move_before_the_pad() -> None:
    """``Q(pad_0(x)) = pad_0(Q(x))``: the quantizer reads x, so the Pad can leave the graph."""
    assert trained("mobile_block").prepared["hoisted"] == ["expand_relu6_out"]
    assert trained("bottleneck_block").prepared["hoisted"] == ["input"]
    assert trained("residual_block").prepared["hoisted"] == []
    t = trained("mobile_block")
    assert "dw_pad_out" not in t.net.acts and t.net.layer_act["depthwise"] == "expand_relu6_out"
    for name in ("mobile_block", "bottleneck_block"):  # the rewired graph still pads
        model = normalize(MODELS[name]())
        graph = convert(model)
        net = attach_quantizers(model, graph, find_sites(model, graph))
        assert prepare_ort(model, net)["hoisted"]
        for q in net.quantizers():
            q.enabled = False
        x = random_input(model, 4)
        with torch.no_grad():
            torch.testing.assert_close(net(x), graph(x), rtol=0, atol=1e-5)


def test_output_quantizers_are_placed_where_fusion_needs_them() -> None:
    assert trained("residual_block").prepared["output_quantizers"] == [
        "block_conv2_out", "block_relu2_out"]     # residual branch before Add; Relu before GAP
    assert trained("mobile_block").prepared["output_quantizers"] == [
        "project_out", "block_add_out"]           # linear bottleneck; Add output before GAP
    assert trained("shortcut_block").prepared["output_quantizers"] == [
        "down_conv2_out", "down_relu2_out"]
    assert trained("matmul_mlp").prepared["output_quantizers"] == []
    t = trained("residual_block")
    assert planned_outputs(t.model, t.net) == []  # nothing left to add once prepared
    for tensor in t.prepared["output_quantizers"]:
        q = t.net.acts[tensor]
        assert q.frozen and int(q.frozen_bits[0]) == 8 and q.min_bits == q.max_bits == 8


@names
def test_ort_structure(name: str) -> None:
    t = trained(name)
    model = emitted(name, "ort")
    info = meta(model)
    init = inits(model)
    counts = Counter(n.op_type for n in model.graph.node)
    requant, pads = info["requantized"], info["pads"]
    biases = [s for s in t.net.sites if info["layers"][s.node]["bias"] == "int32"]
    assert len(biases) == len(t.prepared["int32_bias"]) == len(t.net.sites)
    pad_inputs = {n.input[0] for n in t.model.graph.node
                  if n.op_type == "Pad" and n.output[0] in pads}
    q_inputs = Counter(n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear")
    assert max(q_inputs.values()) == 1, show(model)
    expected = (set(t.net.acts) | set(requant)) - set(pads)
    assert expected <= set(q_inputs) and set(q_inputs) - expected <= pad_inputs, show(model)
    weight_dqs = sum(n.op_type == "DequantizeLinear" and n.input[0] in init
                     for n in model.graph.node)
    assert weight_dqs == len(t.net.sites) + len(biases)
    for dq in (n for n in model.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] not in init):
        assert producer(model, dq.input[0]).op_type in ("QuantizeLinear", "Pad"), show(model)
    assert counts["Pad"] == sum(v == "integer" for v in pads.values())
    assert counts["Clip"] == sum(n.op_type == "Clip" for n in t.model.graph.node)  # ReLU6 only
    for q_node in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):
        zero = init[q_node.input[2]]
        assert zero.data_type == TensorProto.UINT8
        tensor = next((p.output[0] for p in t.model.graph.node if p.op_type == "Pad" and
                       p.input[0] == q_node.input[0] and p.output[0] in pads), q_node.input[0])
        source = t.net.acts.get(tensor) or t.net.acts[requant[tensor]]
        assert int(numpy_helper.to_array(zero)) == (128 if source.signed else 0), tensor


def test_zero_pads_leave_the_float_path() -> None:
    """A Pad before a Conv joins the Conv's pads; a Pad between Q/DQ on one grid runs on uint8."""
    source = {n.name: n for n in trained("mobile_block").model.graph.node}
    model = emitted("mobile_block", "ort")
    assert meta(model)["pads"] == {"dw_pad_out": "conv"}
    dw = next(n for n in model.graph.node if n.name == "depthwise")
    pads = numpy_helper.to_array(inits(trained("mobile_block").model)["dw_pads"]).tolist()
    old = list(next((a.ints for a in source["depthwise"].attribute if a.name == "pads"), [0] * 4))
    assert list(next(a.ints for a in dw.attribute if a.name == "pads")) == \
        [a + b for a, b in zip(old, pads[2:4] + pads[6:], strict=True)]
    assert producer(model, dw.input[0]).op_type == "DequantizeLinear"
    assert producer(model, producer(model, dw.input[0]).input[0]).op_type == "QuantizeLinear"
    model = emitted("shortcut_block", "ort")
    assert meta(model)["pads"] == {"shortcut_pad_out": "integer"}
    pad = next(n for n in model.graph.node if n.op_type == "Pad")
    assert producer(model, pad.input[0]).op_type == "QuantizeLinear"
    assert inits(model)[pad.input[2]].data_type == TensorProto.UINT8
    assert pad.input[2] == producer(model, pad.input[0]).input[2]  # pads with the zero point
    model = emitted("bottleneck_block", "ort")  # the Pad normalisation split off the stem
    assert meta(model)["pads"] == {"stem_padded_input": "conv"}
    stem = next(n for n in model.graph.node if n.name == "stem")
    assert list(next(a.ints for a in stem.attribute if a.name == "pads")) == [0, 0, 1, 1]
    assert producer(model, producer(model, stem.input[0]).input[0]).input[0] == "input"
    for name in ("mobile_block", "shortcut_block", "bottleneck_block"):
        ops = count_fusion(optimized_model(emitted(name, "ort"))).ops
        assert "DequantizeLinear" not in ops and ops.get("Pad", 0) <= 1, ops


@names
def test_int32_bias_scale_is_input_scale_times_weight_scale(name: str) -> None:
    t = trained(name)
    model = emitted(name, "ort")
    init = inits(model)
    for site in t.net.sites:
        node = next(n for n in model.graph.node if n.name == site.node)
        if site.op == "MatMul":
            add = next(n for n in model.graph.node if site.output in n.input)
            bias_dq = producer(model, next(i for i in add.input if i != site.output))
        else:
            bias_dq = producer(model, node.input[2])
        assert bias_dq.op_type == "DequantizeLinear"
        ints = numpy_helper.to_array(init[bias_dq.input[0]])
        assert ints.dtype == np.int32
        w_scale = numpy_helper.to_array(init[producer(model, node.input[1]).input[1]])
        x_dq = producer(model, node.input[0])
        x_scale = numpy_helper.to_array(init[x_dq.input[1]])
        np.testing.assert_array_equal(numpy_helper.to_array(init[bias_dq.input[1]]),
                                      (x_scale * w_scale).astype(np.float32))
        np.testing.assert_array_equal(numpy_helper.to_array(init[bias_dq.input[1]]),
                                      bias_scale(t.net, site.node).numpy())


@names
def test_fully_optimized_ort_model_agrees_with_the_oracle(name: str) -> None:
    t = trained(name)
    model = emitted(name, "ort")
    x = t.x.numpy()
    plain, fused = ort_logits(model, x, "none"), ort_logits(model, x, "all")
    diff, scale = float(np.abs(fused - plain).max()), float(np.abs(plain).max())
    assert diff <= 0.05 * scale, f"fused vs plain: {diff:.4f} of {scale:.4f}"


def test_relu6_fuses_only_with_the_clip_value_inside_the_clip_range() -> None:
    t = trained("mobile_block")
    q = t.net.acts["stem_relu6_out"]
    saved = q.log_alpha.detach().clone()
    try:
        with torch.no_grad():
            q.log_alpha.fill_(float(np.log(8.0)))
        wide = count_fusion(optimized_model(emit(t.model, t.net, "ort")))
        assert wide.fused_layers < len(t.net.sites)           # Clip(0, 6) stays: stem unfused
        assert limit_clip_alphas(t.model, t.net) == ["stem_relu6_out"]
        assert float(q.alpha().detach().max()) <= 6.0
        clamped = count_fusion(optimized_model(emit(t.model, t.net, "ort")))
        assert clamped.fused_layers == len(t.net.sites)
    finally:
        with torch.no_grad():
            q.log_alpha.copy_(saved)


def test_relu6_before_a_pad_limits_the_quantizer_of_the_padded_tensor() -> None:
    """Clip(0, 6) -> Pad -> depthwise: the depthwise input's quantizer (moved before the Pad)
    must stay inside the Clip."""
    t = trained("mobile_block")
    q = t.net.acts["expand_relu6_out"]
    saved = q.log_alpha.detach().clone()
    try:
        with torch.no_grad():
            q.log_alpha.fill_(float(np.log(8.0)))
        assert limit_clip_alphas(t.model, t.net) == ["expand_relu6_out"]
        counts = count_fusion(optimized_model(emit(t.model, t.net, "ort")))
        assert counts.fused_layers == len(t.net.sites), counts.ops
    finally:
        with torch.no_grad():
            q.log_alpha.copy_(saved)


# ---- parity: every target against the torch model --------------------------------------------

@names
@pytest.mark.parametrize("target", DEPLOY_TARGETS)
def test_every_target_matches_the_torch_model_within_one_step(name: str, target: str) -> None:
    t = trained(name)
    model = emitted(name, target)
    onnx.checker.check_model(model, full_check=True)
    result = verify(model, t.net, [t.x[:16], t.x[16:32]], target)
    assert result.max_steps <= 1 and result.tensors == len(t.net.acts)


def test_int32_bias_rounding_is_simulated_in_torch() -> None:
    """Without the simulation the bias rounding alone reaches a sizeable part of a step."""
    t = trained("conv_relu_gemm")
    layer = t.net.layers["conv1"]
    scale = bias_scale(t.net, "conv1")
    step = float(t.net.acts["relu1_out"].alpha().detach()) / 255
    assert float(scale.max()) / 2 / step > 0.05  # what the rounding could move an output by
    hooks = list(layer._forward_hooks.values())
    layer._forward_hooks.clear()
    try:
        with torch.no_grad():
            without = t.net.graph.get_submodule("conv1")(t.x[:4])
    finally:
        for h in hooks:
            layer.register_forward_hook(h)
    with torch.no_grad():
        with_rounding = t.net.graph.get_submodule("conv1")(t.x[:4])
    bias = layer.bias().detach()
    expected = (torch.round(bias / scale) * scale - bias).reshape(1, -1, 1, 1)
    torch.testing.assert_close(with_rounding - without, expected.expand_as(without),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["residual_block", "matmul_mlp"])
def test_a_deep_copy_of_the_prepared_graph_computes_the_same(name: str) -> None:
    import copy

    t = trained(name)
    clone = copy.deepcopy(t.net.graph)
    with torch.no_grad():
        torch.testing.assert_close(clone(t.x[:8]), t.net(t.x[:8]), rtol=0, atol=0)


@names
def test_exact_sim_is_exact_k_bit_qcdq(name: str) -> None:
    t = trained(name)
    model = emitted(name, "exact-sim")
    init = inits(model)
    for tensor, q in t.net.acts.items():
        q_node = next(n for n in model.graph.node
                      if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
        clip = next(n for n in model.graph.node if q_node.output[0] in n.input)
        assert clip.op_type == "Clip"
        bounds = (int(numpy_helper.to_array(init[clip.input[1]])),
                  int(numpy_helper.to_array(init[clip.input[2]])))
        assert bounds == qrange(int(q.frozen_bits[0]), q.signed), tensor
        expected = TensorProto.INT8 if q.signed else TensorProto.UINT8
        assert init[q_node.input[2]].data_type == expected


@names
def test_exact_sim_runs_the_same_with_full_optimizations(name: str) -> None:
    """Conv biases as ``DQ(int32, 2^e)`` keep ORT from rounding them to the k-bit grid."""
    t = trained(name)
    model = emitted(name, "exact-sim")
    x = t.x.numpy()
    plain, fused = ort_logits(model, x, "none"), ort_logits(model, x, "all")
    assert float(np.abs(fused - plain).max()) <= 1e-4 * float(np.abs(plain).max())
    init = inits(model)
    for site in t.net.sites:
        if site.op != "Conv":
            continue
        node = next(n for n in model.graph.node if n.name == site.node)
        dq = producer(model, node.input[2])
        assert meta(model)["layers"][site.node]["bias"] == "exact-int32"
        value = numpy_helper.to_array(init[dq.input[0]]) * numpy_helper.to_array(init[dq.input[1]])
        scale = bias_scale(t.net, site.node)
        expected = torch.round(t.net.layers[site.node].bias().detach() / scale) * scale
        np.testing.assert_array_equal(value, expected.numpy())


# ---- metadata: learned, stored and executed precision ------------------------------------------

@names
@pytest.mark.parametrize("target", DEPLOY_TARGETS)
def test_metadata_separates_learned_stored_and_executed_bits(name: str, target: str) -> None:
    t = trained(name)
    model = emitted(name, target)
    info = meta(model)
    assert info["format"] == 1 and info["target"] == target
    for site in t.net.sites:
        entry = info["layers"][site.node]
        k = int(t.net.layers[site.node].wq.frozen_bits.max())
        assert entry["weight_bits"] == k
        stored = entry["weight_container_bits"]
        assert stored == (8 if target != "pack" else max(k, 2))
        act = t.net.acts[entry["act_tensor"]]
        assert entry["act_bits"] == int(act.frozen_bits[0])
        assert entry["act_exec_bits"] == (entry["act_bits"] if target == "exact-sim" else 8)
    roles = {tensor: e["role"] for tensor, e in info["tensors"].items()}
    read = set(t.net.layer_act.values())  # an added 8-bit quantizer a layer reads is its input
    assert {t_ for t_, r in roles.items() if r == "output"} == \
        set(t.prepared["output_quantizers"]) - read
    report = analyze_model(model)  # a pack model is read through its graph view
    assert [r.name for r in report.layers] == [s.node for s in t.net.sites]
    for row in report.layers:
        entry = info["layers"][row.name]
        assert row.bits_from == "metadata" and row.weight_bits == entry["weight_bits"]
        assert row.weight_container_bits == entry["weight_container_bits"]
        assert (row.act_bits, row.act_exec_bits) == (entry["act_bits"], entry["act_exec_bits"])
        assert row.act_container_bits == 8
    assert {r.tensor: (r.role, r.bits, r.container_bits, r.exec_bits) for r in report.tensors} \
        == {name: (e["role"], e["bits"], 8, e["exec_bits"]) for name, e in info["tensors"].items()}
    assert {r.tensor for r in report.tensors} == set(t.net.acts)
    assert report.model_file_bytes == model.ByteSize()
    assert report.stored_weight_bytes == sum(
        -(-r.params * r.weight_container_bits // 8) for r in report.layers)


@names
def test_report_reads_a_pack_model_like_its_graph_view(name: str) -> None:
    packed = emitted(name, "pack")
    view = graph_view(packed)
    assert graph_view(view) is view  # already unpacked: unchanged
    assert meta(packed)["pack"]["weights"]  # the bits are below 8: something is packed
    with pytest.raises(InvalidModelError, match="unpacked already"):
        unpack_model(view)
    direct, twice = analyze_model(packed), analyze_model(view)
    assert direct.layers == twice.layers and direct.tensors == twice.tensors
    ort_report = analyze_model(emitted(name, "ort"))
    assert [r.weight_bits for r in direct.layers] == [r.weight_bits for r in ort_report.layers]
    assert direct.stored_weight_bytes < ort_report.stored_weight_bytes


# ---- pack target -----------------------------------------------------------------------------

@names
def test_pack_containers_and_opset(name: str) -> None:
    model = emitted(name, "pack")
    info = meta(model)
    opset = next(o.version for o in model.opset_import if o.domain == "")
    formats = {w["format"] for w in info["pack"]["weights"].values()}
    assert opset == (21 if "int4" in formats else 13)
    assert "int2" not in formats  # ORT 1.32 cannot load int2 QDQ Conv at full optimization
    init = inits(model)
    for q_name, w in info["pack"]["weights"].items():
        bits = info["layers"][w["layer"]]["weight_bits"]
        if w["format"] == "int4":
            assert bits == 4 and init[q_name].data_type == TensorProto.INT4
        else:
            assert w["format"] == "bits" and w["bits"] == max(bits, 2)
            stream = init[f"onnxbits_unpack/{q_name}"]
            assert stream.data_type == TensorProto.UINT8 and stream.dims[1] == w["bits"]
    added = Counter(f"Unpack{w['bits']}" for w in info["pack"]["weights"].values()
                    if w["format"] == "bits")
    added["Mul"] += len(info["pack"]["bias_scales"])
    expected = Counter(n.op_type for n in emitted(name, "ort").graph.node) + added
    assert Counter(n.op_type for n in model.graph.node) == expected


@names
def test_unpack_gives_the_ort_model_byte_for_byte(name: str) -> None:
    ort_model, packed = emitted(name, "ort"), emitted(name, "pack")
    assert unpack_model(packed).SerializeToString() == ort_model.SerializeToString()
    assert pack_model(ort_model).SerializeToString() == packed.SerializeToString()


@names
def test_packed_weights_take_at_most_1_1_times_their_learned_bits(name: str) -> None:
    model = emitted(name, "pack")
    info = meta(model)
    init = inits(model)
    for q_name, w in info["pack"]["weights"].items():
        bits = info["layers"][w["layer"]]["weight_bits"]
        tensor = init[q_name] if w["format"] == "int4" else init[f"onnxbits_unpack/{q_name}"]
        params = int(np.prod(numpy_helper.to_array(inits(emitted(name, "ort"))[q_name]).shape))
        float_bytes = 4 * params
        if bits <= 4:
            assert len(tensor.raw_data) <= 1.1 * bits / 32 * float_bytes + w["bits"], q_name


@names
def test_packed_model_runs_on_fused_kernels_after_constant_folding(name: str) -> None:
    """Bit streams and derived bias scales fold to constants; int4 Conv weights stay unfused."""
    model = emitted(name, "pack")
    info = meta(model)
    int4 = sum(w["format"] == "int4" for w in info["pack"]["weights"].values())
    assert info["pack"]["bias_scales"]  # every int32 bias scale is s_in * s_w: stored once
    assert not set(info["pack"]["bias_scales"]) & set(inits(model))
    counts = count_fusion(optimized_model(model))
    assert counts.fused_layers == len(trained(name).net.sites) - int4, counts.ops
    assert counts.fused_layers + counts.float_quantized_layers == len(trained(name).net.sites)


def test_bit_stream_round_trip() -> None:
    rng = np.random.default_rng(0)
    for k in range(2, 9):
        for n in (1, 7, 8, 9, 100):
            q = rng.integers(-(2 ** (k - 1) - 1), 2 ** (k - 1), n).astype(np.int8)
            stream = pack_bits(q, k)
            assert stream.shape == (-(-n // 8), k)
            np.testing.assert_array_equal(unpack_bits(stream, k, n), q)


def test_pack_and_unpack_refuse_the_wrong_model() -> None:
    with pytest.raises(InvalidModelError, match="pack needs an onnxbits 'ort' model"):
        pack_model(emitted("matmul_mlp", "exact-sim"))
    with pytest.raises(InvalidModelError, match="unpack needs an onnxbits 'pack' model"):
        unpack_model(emitted("matmul_mlp", "ort"))
    with pytest.raises(InvalidModelError, match="no onnxbits metadata"):
        unpack_model(matmul_mlp())


def test_cli_pack_and_unpack(tmp_path) -> None:
    ort_path = tmp_path / "m.bits.onnx"
    onnx.save(emitted("residual_block", "ort"), str(ort_path))
    runner = CliRunner()
    result = runner.invoke(pack_command, [str(ort_path), "-o", str(tmp_path / "m.pack.onnx")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(unpack_command, [str(tmp_path / "m.pack.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.ort.onnx").read_bytes() == ort_path.read_bytes()
    result = runner.invoke(unpack_command, [str(ort_path)])
    assert result.exit_code == 1 and "unpack needs an onnxbits 'pack' model" in result.output
    result = runner.invoke(report_command, [str(tmp_path / "m.pack.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stored = meta(emitted("residual_block", "pack"))["layers"]
    assert [r["weight_container_bits"] for r in report["layers"]] == \
        [stored[r["name"]]["weight_container_bits"] for r in report["layers"]]
    assert report["model_file_bytes"] == (tmp_path / "m.pack.onnx").stat().st_size
    for command in (pack_command, unpack_command):
        assert command.help and runner.invoke(command, ["--help"]).exit_code == 0


# ---- ONNX Runtime 1.32 facts the ort target relies on (fusion.py module docstring) -----------

def _conv_add_graph(act_type: int, zero: int, shared: bool = True) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv -> Q/DQ -> Add(DQ(x)) -> Relu -> Q/DQ (uint8): the quantized x is
    read by two node units (Conv and Add), through one DQ or one DQ each."""
    rng = np.random.default_rng(0)
    np_type = np.int8 if act_type == TensorProto.INT8 else np.uint8
    init = [numpy_helper.from_array(np.float32(0.05), "s"),
            numpy_helper.from_array(np.array(zero, np_type), "z"),
            numpy_helper.from_array(np.zeros((), np.uint8), "z_relu"),
            numpy_helper.from_array(rng.integers(-7, 8, (8, 8, 3, 3)).astype(np.int8), "w"),
            numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
            numpy_helper.from_array(np.zeros(8, np.int8), "wz")]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             n("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             n("DequantizeLinear", ["xq", "s", "z"], ["xd2"]),
             n("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             n("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1]),
             n("QuantizeLinear", ["y", "s", "z"], ["yq"]),
             n("DequantizeLinear", ["yq", "s", "z"], ["yd"]),
             n("Add", ["xd" if shared else "xd2", "yd"], ["a"]),
             n("Relu", ["a"], ["r"]),
             n("QuantizeLinear", ["r", "s", "z_relu"], ["rq"]),
             n("DequantizeLinear", ["rq", "s", "z_relu"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 8, 8, 8])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, [1, 8, 8, 8])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize(("act_type", "zero", "shared", "fused"), [
    pytest.param(TensorProto.INT8, 0, True, False, id="int8-one-dq-unfused"),
    pytest.param(TensorProto.INT8, 0, False, False, id="int8-dq-per-consumer-unfused"),
    pytest.param(TensorProto.UINT8, 128, True, True, id="uint8-zp128-fused"),
    pytest.param(TensorProto.UINT8, 128, False, True, id="uint8-zp128-dq-per-consumer-fused"),
])
def test_ort_fact_shared_int8_activations_block_fusion(act_type: int, zero: int, shared: bool,
                                                        fused: bool) -> None:
    ops = count_fusion(optimized_model(_conv_add_graph(act_type, zero, shared))).ops
    assert (ops.get("QLinearConv", 0) == 1 and ops.get("QLinearAdd", 0) == 1) == fused, ops


def test_ort_fact_int2_qdq_conv_does_not_load_at_full_optimization() -> None:
    ort_model = emitted("conv_relu_gemm", "ort")
    packed = pack_model(ort_model, int2=True, bitpack=False)
    assert any(t.data_type == TensorProto.INT2 for t in packed.graph.initializer)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with pytest.raises(Exception, match="int2"):
        ort.InferenceSession(packed.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])


def test_ort_fact_matmulnbits_computes_with_int8_activations_by_default() -> None:
    """Why the ``ort`` target keeps int8 MatMul weights instead of blocked int4: ORT fuses
    ``DQ(int4, block_size) -> MatMul`` into MatMulNBits with ``accuracy_level`` 4, which
    quantizes the float input per block at run time, so it no longer matches the torch model."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    k, n, block = 256, 64, 32
    q = rng.integers(-7, 8, (k, n)).astype(np.int8)
    s = np.repeat(rng.uniform(0.01, 0.02, (1, n)).astype(np.float32), k // block, axis=0)
    init = [numpy_helper.from_array(q.astype(ml_dtypes.int4), "q"),
            numpy_helper.from_array(s, "s"),
            numpy_helper.from_array(np.zeros((k // block, n), ml_dtypes.int4), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0,
                              block_size=block), helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [4, k])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4, n])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    optimized = optimized_model(model)
    node = next(n for n in optimized.graph.node if n.op_type == "MatMulNBits")
    assert next(a.i for a in node.attribute if a.name == "accuracy_level") == 4
    x = rng.normal(size=(4, k)).astype(np.float32)
    plain, fused = ort_logits(model, x, "none"), ort_logits(model, x, "all")
    assert float(np.abs(fused - plain).max()) > 1e-3 * float(np.abs(plain).max())


def test_ort_fact_qgemm_trusts_any_bias_scale() -> None:
    """ORT fuses ``DQ -> Gemm`` with a float output into QGemm whatever the bias DQ's scale is
    and adds the int32 values as if their scale were ``s_in s_w``: a Gemm bias DQ must use
    exactly that scale (the ``ort`` target does; ``exact-sim`` keeps Gemm biases float)."""
    rng = np.random.default_rng(0)
    w = rng.integers(-7, 8, (10, 8)).astype(np.int8)
    init = [numpy_helper.from_array(np.float32(0.05), "s"),
            numpy_helper.from_array(np.uint8(128), "z"),
            numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.01), "ws"),
            numpy_helper.from_array(np.int8(0), "wz"),
            numpy_helper.from_array(np.full(10, 1000, np.int32), "b"),
            numpy_helper.from_array(np.float32(0.05 * 0.01 / 64), "bs"),
            numpy_helper.from_array(np.int32(0), "bz")]
    n = helper.make_node
    nodes = [n("QuantizeLinear", ["x", "s", "z"], ["xq"]),
             n("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
             n("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             n("DequantizeLinear", ["b", "bs", "bz"], ["bd"]),
             n("Gemm", ["xd", "wd", "bd"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [2, 10])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert "QGemm" in count_fusion(optimized_model(model)).ops
    x = rng.normal(size=(2, 8)).astype(np.float32)
    plain, fused = ort_logits(model, x, "none"), ort_logits(model, x, "all")
    np.testing.assert_allclose(fused - plain, 1000 * 0.05 * 0.01 * (1 - 1 / 64), rtol=1e-3)
