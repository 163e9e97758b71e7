"""Tests for onnxbits.graph.macs: hand-computed params and MACs per sample."""

from __future__ import annotations

import doctest

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxbits.graph.macs
from onnxbits.graph.index import GraphIndex, quantizable_nodes
from onnxbits.graph.macs import LayerCost, layer_cost, model_costs
from tests import builders


def _single(op: str, x_shape: list[int | str], w_shape: tuple[int, ...], y_rank: int,
            **attrs: object) -> onnx.ModelProto:
    """One ``op`` node reading ``input`` and a constant weight."""
    w = numpy_helper.from_array(np.ones(w_shape, np.float32), "w")
    node = helper.make_node(op, ["input", "w"], ["logits"], name="layer", **attrs)
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("input", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None] * y_rank)], [w])
    model = builders.make_model(graph, 13)
    onnx.checker.check_model(model)
    return model


def test_doctests() -> None:
    assert doctest.testmod(onnxbits.graph.macs).failed == 0


def test_conv_relu_gemm_by_hand() -> None:
    costs = model_costs(builders.conv_relu_gemm())
    assert costs["conv1"] == LayerCost(8 * 3 * 3 * 3, 8, 8 * 8 * 8 * 3 * 3 * 3)   # 13824 MACs
    assert costs["conv1"].macs == 13824
    assert costs["dwconv"] == LayerCost(8 * 1 * 3 * 3, 8, 8 * 8 * 8 * 1 * 3 * 3)  # depthwise
    assert costs["dwconv"].macs == 4608
    assert costs["fc"] == LayerCost(10 * 8, 10, 8 * 10)                          # 80 MACs


def test_residual_and_mlp_by_hand() -> None:
    costs = model_costs(builders.residual_block())
    assert costs["block_conv1"].macs == 8 * 8 * 8 * 8 * 3 * 3  # 36864
    mlp = model_costs(builders.matmul_mlp())
    assert mlp["matmul1"] == LayerCost(16 * 32, 32, 16 * 32)  # [N,16] @ [16,32]: M = 1
    assert mlp["matmul2"] == LayerCost(32 * 10, 10, 32 * 10)


def test_batchnorm_conv_has_no_bias() -> None:
    assert model_costs(builders.batchnorm_model())["conv1"].bias_params == 0


@pytest.mark.parametrize("x_shape, w_shape, attrs, macs", [
    (["N", 4, 16], (6, 4, 3), {"pads": [1, 1]}, 16 * 6 * 4 * 3),                     # Conv1d
    (["N", 4, 16], (6, 4, 3), {"strides": [2]}, 7 * 6 * 4 * 3),                      # (16-3)//2+1
    (["N", 2, 4, 4, 4], (3, 2, 3, 3, 3), {"pads": [1] * 6}, 4 * 4 * 4 * 3 * 2 * 27),  # Conv3d
    (["N", 3, 9, 9], (4, 3, 3, 3), {"strides": [2, 2], "pads": [1, 1, 1, 1]}, 5 * 5 * 4 * 3 * 9),
    (["N", 6, 8, 8], (6, 2, 3, 3), {"group": 3, "pads": [1] * 4}, 8 * 8 * 6 * 2 * 9),  # grouped
    (["N", 3, 8, 8], (4, 3, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4 * 4 * 4 * 27),
], ids=["conv1d", "conv1d-stride2", "conv3d", "conv2d-stride2", "grouped", "same-upper"])
def test_conv_macs(x_shape: list[int | str], w_shape: tuple[int, ...], attrs: dict[str, object],
                   macs: int) -> None:
    model = _single("Conv", x_shape, w_shape, len(x_shape), **attrs)
    assert model_costs(model)["layer"].macs == macs
    # the same numbers from the attributes alone, when shape inference gives no output shape
    index = GraphIndex(model)
    site = quantizable_nodes(model, index)[0]
    shapes = {"input": [1, *x_shape[1:]]}
    assert layer_cost(index, site, shapes).macs == macs  # type: ignore[arg-type]


def test_conv_transpose_macs() -> None:
    # weight [Cin, Cout/g, k, k]: each of the 4x4 input pixels feeds Cout*k*k outputs per channel
    model = _single("ConvTranspose", ["N", 3, 4, 4], (3, 5, 2, 2), 4, strides=[2, 2])
    assert model_costs(model)["layer"] == LayerCost(3 * 5 * 2 * 2, 0, 4 * 4 * 3 * 5 * 2 * 2)


@pytest.mark.parametrize("x_shape, macs", [
    (["N", 16], 16 * 10),          # M = 1 per sample
    (["N", 7, 16], 7 * 16 * 10),   # M = T = 7 per sample
    ([4, 7, 16], 7 * 16 * 10),     # a static batch of 4 still counts one sample
], ids=["2d", "3d-seq", "static-batch"])
def test_matmul_macs(x_shape: list[int | str], macs: int) -> None:
    model = _single("MatMul", x_shape, (16, 10), len(x_shape))
    assert model_costs(model)["layer"].macs == macs


def test_unknown_shapes_give_none_for_conv() -> None:
    model = _single("Conv", ["N", 3, "H", "W"], (4, 3, 3, 3), 4)
    assert model_costs(model)["layer"] == LayerCost(4 * 3 * 3 * 3, 0, None)
