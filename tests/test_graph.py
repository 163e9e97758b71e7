"""Tests for onnxbits.graph.index: lookups, shapes, quantizable layers and Q/DQ reading."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxbits.graph.index import (
    GraphIndex,
    LayerSite,
    activation_quant,
    infer_shapes,
    node_names,
    quantizable_nodes,
    weight_bits,
)
from onnxbits.graph.normalize import name_nodes
from tests import builders


def _dq_weight_model(values: np.ndarray, dtype: int = TensorProto.INT8,
                     zero: int = 0) -> onnx.ModelProto:
    """Gemm whose [4, 3] weight is DequantizeLinear(stored integers of ``dtype``)."""
    stored = helper.make_tensor("w_q", dtype, values.shape, values.reshape(-1).tolist())
    scale = numpy_helper.from_array(np.float32(0.1), "w_scale")
    zp = helper.make_tensor("w_zp", dtype, [], [zero])
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w_dq"),
             helper.make_node("Gemm", ["input", "w"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(
        nodes, "dq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [stored, scale, zp])
    opset = 21 if dtype in (TensorProto.INT4, TensorProto.UINT4) else 13
    model = builders.make_model(graph, opset)
    onnx.checker.check_model(model)
    return model


def _act_model(clip: tuple[int, int] | None = None, float_clip: tuple[float, float] | None = None,
               signed: bool = False, through: str | None = None) -> onnx.ModelProto:
    """[Clip(float)] -> Q -> [Clip(int)] -> DQ -> [through] -> MatMul(W) with scale 0.5."""
    zdtype = TensorProto.INT8 if signed else TensorProto.UINT8
    inits = [numpy_helper.from_array(np.float32(0.5), "s"),
             helper.make_tensor("z", zdtype, [], [0]),
             numpy_helper.from_array(np.ones((3, 2), np.float32), "w")]
    nodes, x = [], "input"
    if float_clip:
        inits += [numpy_helper.from_array(np.float32(v), n)
                  for v, n in zip(float_clip, "ab", strict=True)]
        nodes.append(helper.make_node("Clip", [x, "a", "b"], ["xc"], name="fclip"))
        x = "xc"
    nodes.append(helper.make_node("QuantizeLinear", [x, "s", "z"], ["xq"], name="q"))
    x = "xq"
    if clip:
        inits += [helper.make_tensor(n, zdtype, [], [v])
                  for v, n in zip(clip, ("lo", "hi"), strict=True)]
        nodes.append(helper.make_node("Clip", [x, "lo", "hi"], ["xqc"], name="iclip"))
        x = "xqc"
    nodes.append(helper.make_node("DequantizeLinear", [x, "s", "z"], ["xd"], name="dq"))
    x = "xd"
    if through:
        nodes.append(helper.make_node(through, [x], ["xt"], name="through"))
        x = "xt"
    nodes.append(helper.make_node("MatMul", [x, "w"], ["logits"], name="mm"))
    graph = helper.make_graph(
        nodes, "act", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = builders.make_model(graph, 13)
    onnx.checker.check_model(model)
    return model


def test_producer_consumer_maps() -> None:
    index = GraphIndex(builders.conv_relu_gemm())
    assert index.producer["conv1_out"].name == "conv1"
    assert index.op_of("relu1_out") == "Relu"
    assert index.op_of("input") is None
    assert [n.name for n in index.consumers["conv1_out"]] == ["relu1"]
    assert [n.name for n in index.consumers["input"]] == ["conv1"]


def test_constant_lookup_initializer_and_constant_node() -> None:
    model = builders.matmul_mlp()
    const = helper.make_node("Constant", [], ["k"], name="k", value_floats=[1.0, 2.0])
    model.graph.node.insert(0, const)
    index = GraphIndex(model)
    assert index.array("w1").shape == (16, 32)
    np.testing.assert_array_equal(index.array("k"), [1.0, 2.0])
    assert index.constant("input") is None and index.array("nope") is None


def test_infer_shapes_sets_batch_to_one_on_a_copy() -> None:
    model = builders.conv_relu_gemm()
    shapes = infer_shapes(model)
    assert shapes["input"] == [1, 3, 8, 8]
    assert shapes["conv1_out"] == [1, 8, 8, 8]
    assert shapes["flatten_out"] == [1, 8]
    assert shapes["fc.weight"] == [10, 8]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("name, expected", [
    ("conv_relu_gemm", [("conv1", "Conv", (8, 3, 3, 3), 1), ("dwconv", "Conv", (8, 1, 3, 3), 8),
                        ("fc", "Gemm", (10, 8), 1)]),
    ("batchnorm_model", [("conv1", "Conv", (8, 3, 3, 3), 1), ("fc", "Gemm", (10, 8), 1)]),
    ("matmul_mlp", [("matmul1", "MatMul", (16, 32), 1), ("matmul2", "MatMul", (32, 10), 1)]),
    ("shared_weight", [("conv1", "Conv", (8, 3, 3, 3), 1), ("conv_a", "Conv", (8, 8, 3, 3), 1),
                       ("conv_b", "Conv", (8, 8, 3, 3), 1), ("fc", "Gemm", (10, 8), 1)]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_quantizable_nodes(name: str,
                           expected: list[tuple[str, str, tuple[int, ...], int]]) -> None:
    sites = quantizable_nodes(builders.ALL_BUILDERS[name]())
    assert [(s.name, s.op, s.weight_shape, s.group) for s in sites] == expected
    assert all(isinstance(s, LayerSite) for s in sites)


def test_site_names_and_biases() -> None:
    sites = {s.name: s for s in quantizable_nodes(builders.conv_relu_gemm())}
    conv = sites["conv1"]
    assert (conv.weight_name, conv.input_name, conv.output_name) == \
        ("conv1.weight", "input", "conv1_out")
    assert conv.bias_name == "conv1.bias" and conv.stored_name == "conv1.weight"
    mlp = {s.name: s for s in quantizable_nodes(builders.matmul_mlp())}
    assert mlp["matmul1"].bias_name == "b1"  # the Add after the MatMul


def test_quantizable_nodes_skip_non_constant_weights() -> None:
    model = builders.matmul_mlp()
    model.graph.node[0].input[1] = "input"  # x @ x: no constant weight
    assert [s.name for s in quantizable_nodes(model)] == ["matmul2"]


def test_dq_weight_is_a_site() -> None:
    model = _dq_weight_model(np.arange(-6, 6).reshape(4, 3))
    (site,) = quantizable_nodes(model)
    assert (site.name, site.weight_name, site.stored_name, site.weight_shape) == \
        ("fc", "w", "w_q", (4, 3))


def test_unnamed_nodes_get_the_normalize_names() -> None:
    model = builders.residual_block()
    for node in model.graph.node:
        node.name = ""
    model.graph.node[1].name = "Conv_0"  # a clash the rule must resolve like normalize does
    names = node_names(model.graph)
    name_nodes(model)
    assert names == [n.name for n in model.graph.node]
    assert quantizable_nodes(model)[0].name == "Conv_0"


@pytest.mark.parametrize("values, dtype, zero, expected", [
    (np.arange(-6, 6), TensorProto.INT8, 0, (4, 8, True)),        # |q| <= 7 -> 4 bits in int8
    (np.array([-127, 127] + [0] * 10), TensorProto.INT8, 0, (8, 8, True)),
    (np.array([-128] + [0] * 11), TensorProto.INT8, 0, (8, 8, True)),  # capped at the container
    (np.array([1, -1] + [0] * 10), TensorProto.INT8, 0, (2, 8, True)),
    (np.arange(-6, 6), TensorProto.INT4, 0, (4, 4, True)),
    (np.arange(0, 12), TensorProto.UINT8, 128, (8, 8, True)),     # asymmetric: container bits
    (np.arange(-6, 6), TensorProto.INT8, 3, (8, 8, True)),
], ids=["int8-4bit", "int8-full", "int8-minus128", "int8-2bit", "int4", "uint8-asym", "int8-zp"])
def test_weight_bits(values: np.ndarray, dtype: int, zero: int,
                     expected: tuple[int, int, bool]) -> None:
    model = _dq_weight_model(values.reshape(4, 3), dtype, zero)
    index = GraphIndex(model)
    assert weight_bits(index, quantizable_nodes(model, index)[0]) == expected


def test_float_weight_bits() -> None:
    model = builders.conv_relu_gemm()
    index = GraphIndex(model)
    assert weight_bits(index, quantizable_nodes(model, index)[0]) == (32, 32, False)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, (8, 8, 8, False)),
    ({"signed": True}, (8, 8, 8, True)),
    ({"clip": (0, 15)}, (8, 4, 4, False)),                         # QCDQ: 16 levels
    ({"clip": (-4, 3), "signed": True}, (8, 3, 3, True)),
    ({"clip": (-7, 7), "signed": True}, (8, 4, 4, True)),          # 15 levels -> 4 bits
    ({"float_clip": (0.0, 7.5)}, (8, 8, 4, False)),                # 16 grid levels, runs at 8
    ({"float_clip": (0.0, 6.2)}, (8, 8, 8, False)),                # off the grid: not a k-bit clip
    ({"through": "Identity"}, (8, 8, 8, False)),
], ids=["qdq-u8", "qdq-s8", "qcdq-u4", "qcdq-s3", "qcdq-narrow4", "float-clip-4",
        "relu6-like", "through-identity"])
def test_activation_quant(kwargs: dict[str, object], expected: tuple[int, int, int, bool]) -> None:
    model = _act_model(**kwargs)  # type: ignore[arg-type]
    index = GraphIndex(model)
    (site,) = quantizable_nodes(model, index)
    act = activation_quant(index, site.input_name)
    assert act is not None
    assert (act.container_bits, act.exec_bits, act.bits, act.signed) == expected
    assert act.tensor == site.input_name


def test_activation_quant_absent() -> None:
    model = builders.conv_relu_gemm()
    index = GraphIndex(model)
    assert all(activation_quant(index, s.input_name) is None
               for s in quantizable_nodes(model, index))
