"""normalize + convert against ONNX Runtime, the quantization sites, BN folding and signedness."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxbits.errors import UnsupportedOpError
from onnxbits.graph.normalize import normalize, opset_of
from onnxbits.importer.convert import convert, find_sites, is_unsigned_tensor
from tests.builders import (
    ALL_BUILDERS,
    _Builder,
    batchnorm_model,
    conv_relu_gemm,
    make_model,
    matmul_mlp,
)

RunOrt = Callable[..., np.ndarray]
MakeInput = Callable[..., torch.Tensor]

# node, op, weight, data input, weight_axis, transposed, group, has bias
EXPECTED_SITES = {
    "conv_relu_gemm": [("conv1", "Conv", "conv1.weight", "input", 0, False, 1, True),
                       ("dwconv", "Conv", "dwconv.weight", "relu1_out", 0, False, 8, True),
                       ("fc", "Gemm", "fc.weight", "flatten_out", 0, False, 1, True)],
    "residual_block": [("stem", "Conv", "stem.weight", "input", 0, False, 1, True),
                       ("block_conv1", "Conv", "block_conv1.weight", "stem_relu_out", 0, False, 1,
                        True),
                       ("block_conv2", "Conv", "block_conv2.weight", "block_relu1_out", 0, False,
                        1, True),
                       ("fc", "Gemm", "fc.weight", "flatten_out", 0, False, 1, True)],
    "batchnorm_model": [("conv1", "Conv", "conv1.weight", "input", 0, False, 1, True),
                        ("fc", "Gemm", "fc.weight", "flatten_out", 0, False, 1, True)],
    "matmul_mlp": [("matmul1", "MatMul", "w1", "input", 1, False, 1, False),
                   ("matmul2", "MatMul", "w2", "relu1_out", 1, False, 1, False)],
    "shared_weight": [("conv1", "Conv", "conv1.weight", "input", 0, False, 1, True),
                      ("conv_a", "Conv", "shared.weight", "relu1_out", 0, False, 1, False),
                      ("conv_b", "Conv", "shared.weight", "relu_a_out", 0, False, 1, False),
                      ("fc", "Gemm", "fc.weight", "flatten_out", 0, False, 1, True)],
    "linear_bottleneck": [("stem", "Conv", "stem.weight", "input", 0, False, 1, True),
                          ("project", "Conv", "project.weight", "stem_relu6_out", 0, False, 1,
                           True),
                          ("expand", "Conv", "expand.weight", "project_out", 0, False, 1, True),
                          ("dwconv", "Conv", "dwconv.weight", "expand_relu6_out", 0, False, 12,
                           True),
                          ("fc", "Gemm", "fc.weight", "flatten_out", 0, False, 1, True)],
}


def describe(model: onnx.ModelProto) -> str:
    return onnx.helper.printable_graph(model.graph)


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_converted_graph_matches_onnxruntime(name: str, run_ort: RunOrt,
                                             make_input: MakeInput) -> None:
    original = ALL_BUILDERS[name]()
    model = normalize(original)
    graph = convert(model)
    x = make_input(original, 5)
    with torch.no_grad():
        torch_out = graph(x).numpy()
    np.testing.assert_allclose(torch_out, run_ort(original, x.numpy()), rtol=0, atol=1e-5,
                               err_msg=describe(model))
    np.testing.assert_allclose(run_ort(model, x.numpy()), run_ort(original, x.numpy()), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("name", list(ALL_BUILDERS))
def test_find_sites_names_every_conv_gemm_and_matmul(name: str) -> None:
    model = normalize(ALL_BUILDERS[name]())
    sites = find_sites(model, convert(model))
    got = [(s.node, s.op, s.weight, s.input, s.weight_axis, s.transposed, s.group,
            s.bias is not None) for s in sites]
    assert got == EXPECTED_SITES[name], describe(model)
    modules = dict(convert(model).named_modules())
    for site in sites:
        assert site.module in modules
        node = next(n for n in model.graph.node if n.name == site.node)
        assert node.op_type == site.op and node.output[0] == site.output


def test_gemm_without_transb_is_a_transposed_site() -> None:
    b = _Builder(0)
    w = b.weight("fc.weight", (6, 4), fan_in=6)           # (in, out): transB = 0
    b.node("Gemm", ["input", w], name="fc")
    model = normalize(b.model(["N", 6], "logits", ["N", 4]))
    (site,) = find_sites(model, convert(model))
    assert (site.op, site.weight_axis, site.transposed) == ("Gemm", 1, True)


def test_batchnorm_is_folded_into_the_conv(run_ort: RunOrt, make_input: MakeInput) -> None:
    original = batchnorm_model()
    before = original.SerializeToString()
    folded = normalize(original)
    assert "BatchNormalization" not in [n.op_type for n in folded.graph.node], describe(folded)
    assert [n.op_type for n in original.graph.node].count("BatchNormalization") == 1
    assert original.SerializeToString() == before
    conv = next(n for n in folded.graph.node if n.name == "conv1")
    assert len(conv.input) == 3 and conv.input[2] in {t.name for t in folded.graph.initializer}
    assert not {"bn.scale", "bn.bias", "bn.mean", "bn.var"} & \
        {t.name for t in folded.graph.initializer}
    onnx.checker.check_model(folded)
    x = make_input(original, 6).numpy()
    np.testing.assert_allclose(run_ort(folded, x), run_ort(original, x), rtol=0, atol=1e-5)


def test_batchnorm_after_a_conv_with_another_consumer_is_kept() -> None:
    b = _Builder(0)
    x = b.conv("input", 3, 4, name="conv1")
    scale = b.init("bn.scale", np.ones(4, np.float32))
    shift = b.init("bn.bias", np.zeros(4, np.float32))
    mean = b.init("bn.mean", np.zeros(4, np.float32))
    var = b.init("bn.var", np.ones(4, np.float32))
    y = b.node("BatchNormalization", [x, scale, shift, mean, var], name="bn")
    b.node("Add", [x, y], name="add")
    model = normalize(b.model(["N", 3, 8, 8], "logits", ["N", 4, 8, 8]))
    assert [n.op_type for n in model.graph.node] == ["Conv", "BatchNormalization", "Add"]


def test_unnamed_and_repeated_node_names_become_unique() -> None:
    original = conv_relu_gemm()
    names = ["", "", "dup", "dup", "", "dup", "fc"]
    for node, name in zip(original.graph.node, names, strict=True):
        node.name = name
    before = original.SerializeToString()
    model = normalize(original)
    got = [n.name for n in model.graph.node]
    assert all(got) and len(set(got)) == len(got), got
    assert got == ["Conv_0", "Relu_1", "dup", "dup_1", "GlobalAveragePool_4", "dup_2", "fc"]
    assert original.SerializeToString() == before
    sites = find_sites(model, convert(model))
    assert [s.node for s in sites] == ["Conv_0", "dup", "fc"]


def test_old_opset_is_upgraded_to_13() -> None:
    old = conv_relu_gemm()          # every op of this graph is also valid in opset 9
    old.opset_import[0].version = 9
    onnx.checker.check_model(old)
    model = normalize(old)
    assert opset_of(model) == 13
    assert [s.node for s in find_sites(model, convert(model))] == ["conv1", "dwconv", "fc"]


def maxpool_model() -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Flatten -> Gemm, plus a Clip(min=0) and a Clip(min=-1)."""
    b = _Builder(0)
    x = b.conv("input", 3, 4, name="conv1")
    x = b.node("Relu", [x], name="relu")
    x = b.node("MaxPool", [x], name="pool", kernel_shape=[8, 8])
    x = b.node("Flatten", [x], name="flatten", axis=1)
    low = b.init("low", np.array(0.0, np.float32))
    neg = b.init("neg", np.array(-1.0, np.float32))
    high = b.init("high", np.array(6.0, np.float32))
    y = b.node("Clip", [b.gemm(x, 4, 4, name="fc1"), neg, high], name="clip_neg")
    y = b.node("Clip", [y, low, high], name="clip_pos")
    b.gemm(y, 4, 3, name="fc2")
    return b.model(["N", 3, 8, 8], "logits", ["N", 3])


@pytest.mark.parametrize(("tensor", "unsigned"), [
    ("input", False), ("conv1_out", False), ("relu_out", True), ("pool_out", True),
    ("flatten_out", True), ("fc1_out", False), ("clip_neg_out", False), ("clip_pos_out", True),
])
def test_is_unsigned_tensor(tensor: str, unsigned: bool) -> None:
    model = normalize(maxpool_model())
    assert is_unsigned_tensor(model, tensor) is unsigned


def test_is_unsigned_tensor_on_the_builders() -> None:
    model = normalize(conv_relu_gemm())
    assert is_unsigned_tensor(model, "relu1_out")
    assert is_unsigned_tensor(model, "flatten_out")
    assert not is_unsigned_tensor(model, "input")
    mlp = normalize(matmul_mlp())
    assert is_unsigned_tensor(mlp, "relu1_out") and not is_unsigned_tensor(mlp, "input")


def single_op_model(op: str, domain: str = "") -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name="the_node", domain=domain)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return make_model(graph, 13, [helper.make_opsetid(domain, 1)] if domain else None)


@pytest.mark.parametrize(("op", "domain", "message"), [
    ("Det", "", r"no torch converter for op Det \(opset \d+, domain ''\) at node\(s\) the_node"),
    ("MyOp", "com.example",
     r"no torch converter for op MyOp \(opset 1, domain 'com.example'\) at node\(s\) the_node"),
], ids=["Det", "custom-domain"])
def test_unsupported_op_names_op_opset_and_node(op: str, domain: str, message: str) -> None:
    with pytest.raises(UnsupportedOpError, match=message):
        convert(normalize(single_op_model(op, domain)), "tiny.onnx")


def test_unsupported_op_message_names_the_source() -> None:
    with pytest.raises(UnsupportedOpError, match=r"^tiny\.onnx: .*replace the op"):
        convert(single_op_model("Det"), "tiny.onnx")


@pytest.mark.parametrize("starts, ends, axes, steps", [
    ([0, 0], [100, 100], [2, 3], [2, 2]),      # the CIFAR ResNet "option A" shortcut
    ([1], [-1], [1], [1]),
    ([-1], [-100], [2], [-1]),                  # reversed axis
    ([0, 1], [3, 9], [0, 1], None),
])
def test_constant_slice_matches_onnxruntime_without_warnings(
        starts: list[int], ends: list[int], axes: list[int], steps: list[int] | None,
        run_ort: RunOrt) -> None:
    values = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), k)
             for k, v in values.items() if v is not None]
    graph = helper.make_graph(
        [helper.make_node("Slice", ["x"] + [t.name for t in inits], ["y"], name="slice")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = make_model(graph, 13)
    x = np.random.default_rng(0).random((2, 4, 6, 6), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = convert(model)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, run_ort(model, x))
