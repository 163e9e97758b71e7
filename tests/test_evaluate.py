"""Tests for onnxbits.report.evaluate: sessions, batched prediction, top-k, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxbits.data.decode import ImageTensors
from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import DataError, InvalidModelError
from onnxbits.report.evaluate import (
    EvalResult,
    agreement,
    evaluate_model,
    make_session,
    predict_logits,
    topk_accuracy,
)
from tests import builders
from tests.builders import conv_relu_gemm, matmul_mlp

PRE = Preprocess(scale=1 / 255, mean=(0.5,), std=(0.25,))


def tensors(n: int = 7, side: int = 8, labels: np.ndarray | None = None) -> ImageTensors:
    images = np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    has = labels is not None
    return ImageTensors(images, labels if has else np.full(n, -1), has, PRE)


def reference(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in (*fixed.graph.input, *fixed.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return fixed


# ---------------------------------------------------------------- topk


def test_topk_hand_computed() -> None:
    logits = np.array([
        [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],   # label 6: top-1 hit
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],   # label 4: 5th largest -> top-5 hit only
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],   # label 5: 6th largest -> miss
        [0.1, 0.9, 0.3, 0.2, 0.5, 0.4, 0.6],   # label 1: top-1 hit
    ])
    result = topk_accuracy(logits, np.array([6, 4, 5, 1]))
    assert result == EvalResult(top1=50.0, top5=75.0, n=4)
    assert result.to_dict() == {"top1": 50.0, "top5": 75.0, "n": 4}


def test_topk_fewer_than_five_outputs() -> None:
    result = topk_accuracy(np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0]]), np.array([0, 0]))
    assert result.top1 == 50.0 and result.top5 == 100.0


def test_topk_label_out_of_range() -> None:
    with pytest.raises(DataError, match="label 10 out of range for 10 model outputs; "
                                        "check --label-offset/--classes"):
        topk_accuracy(np.zeros((2, 10)), np.array([3, 10]))


def test_topk_unknown_labels() -> None:
    with pytest.raises(DataError, match="no label"):
        topk_accuracy(np.zeros((2, 10)), np.array([3, -1]))


def test_agreement() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.1], [0.0, 5.0]])
    b = np.array([[2.0, 1.0], [3.0, 1.0], [0.3, 0.0], [1.0, 2.0]])
    assert agreement(a, b) == 75.0
    with pytest.raises(DataError, match="cannot compare"):
        agreement(a, b[:2])


# ---------------------------------------------------------------- sessions


def test_make_session_sources(tmp_path: Path) -> None:
    model = conv_relu_gemm()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    for source in (model, model.SerializeToString(), path, str(path)):
        session = make_session(source, threads=1, optimize=False)
        assert session.get_inputs()[0].name == "input"


def test_make_session_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="model file .*missing.onnx.* not found"):
        make_session(tmp_path / "missing.onnx")


def test_make_session_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"this is not protobuf")
    with pytest.raises(InvalidModelError, match="cannot load .*junk.onnx"):
        make_session(path)


# ---------------------------------------------------------------- prediction


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_predict_matches_ort(batch_size: int) -> None:
    model, t = conv_relu_gemm(), tensors()
    done: list[int] = []
    logits = predict_logits(make_session(model), t, batch_size=batch_size, progress=done.append)
    np.testing.assert_allclose(logits, reference(model, t.batch(np.arange(7))), atol=1e-5)
    assert logits.shape == (7, 10) and logits.dtype == np.float32
    assert sum(done) == 7 and max(done) == min(batch_size, 7)


@pytest.mark.parametrize("batch", [1, 4])
def test_fixed_batch_dimension(batch: int) -> None:
    model, t = conv_relu_gemm(), tensors()
    done: list[int] = []
    logits = predict_logits(make_session(with_batch(model, batch)), t, batch_size=64,
                            progress=done.append)
    np.testing.assert_allclose(logits, reference(model, t.batch(np.arange(7))), atol=1e-5)
    assert max(done) == batch and sum(done) == 7


def test_shape_mismatch() -> None:
    with pytest.raises(DataError, match=r"model input 'input' expects shape \[N, 3, 8, 8\] but "
                                        r"the images give \[N, 3, 16, 16\].*--preset.*--resize"):
        predict_logits(make_session(conv_relu_gemm()), tensors(side=16))


def test_nhwc_input_is_transposed() -> None:
    model = conv_relu_gemm()
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(model)
    graph = nhwc.graph
    for node in graph.node:
        node.input[:] = ["input_nchw" if i == "input" else i for i in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["input"], ["input_nchw"],
                                          perm=[0, 3, 1, 2]))
    graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                          ["N", 8, 8, 3]))
    t = tensors()
    np.testing.assert_allclose(predict_logits(make_session(nhwc), t),
                               reference(model, t.batch(np.arange(7))), atol=1e-5)


def test_flat_input_is_flattened() -> None:
    model, t = matmul_mlp(features=48), tensors(side=4)
    np.testing.assert_allclose(predict_logits(make_session(model), t),
                               reference(model, t.batch(np.arange(7)).reshape(7, -1)), atol=1e-5)


def test_evaluate_model_end_to_end(tmp_path: Path) -> None:
    model = conv_relu_gemm()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    logits = reference(model, tensors().batch(np.arange(7)))
    labels = logits.argmax(axis=1)
    labels[0] = (labels[0] + 1) % 10
    result = evaluate_model(path, tensors(labels=labels), batch_size=2, threads=1)
    assert result.n == 7 and result.top1 == pytest.approx(600 / 7)
    assert result == evaluate_model(make_session(model), tensors(labels=labels))


def test_evaluate_model_needs_labels() -> None:
    with pytest.raises(DataError, match="needs labels"):
        evaluate_model(conv_relu_gemm(), tensors())


def test_top1_and_top5_break_ties_alike() -> None:
    # a constant output (every logit tied): top-1 picks class 0, top-5 classes 0-4, so that
    # top-5 can never be below top-1
    logits = np.zeros((10, 1000), dtype=np.float32)
    labels = np.arange(10)
    result = topk_accuracy(logits, labels)
    assert (result.top1, result.top5) == (10.0, 50.0)
    tied = np.array([[1.0, 3.0, 3.0, 0.0, 0.0, 0.0, 3.0]])
    assert topk_accuracy(tied, np.array([1])).top1 == 100.0
    assert topk_accuracy(tied, np.array([2])).top1 == 0.0
    assert topk_accuracy(tied, np.array([3])).top5 == 100.0   # ranks 1,2,6,0,3
    assert topk_accuracy(tied, np.array([5])).top5 == 0.0


def test_an_ort_failure_inside_the_model_is_not_called_a_preprocessing_problem(
        tmp_path: Path) -> None:
    # Reshape to a fixed 7 elements fails at run time for any image
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [1, 7])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    images = ImageTensors(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), True,
                          Preprocess())
    with pytest.raises(InvalidModelError, match=r"ONNX Runtime failed running the model"):
        predict_logits(make_session(model), images)


@pytest.mark.parametrize("error", ["NotImplemented", "EPFail", "Fail", "RuntimeException"])
def test_every_ort_failure_while_running_is_a_model_error(tmp_path: Path, error: str) -> None:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    session = make_session(builders.conv_relu_gemm())

    def run(*args: object, **kwargs: object) -> object:
        raise getattr(state, error)("kernel missing for this node")

    session.run = run  # type: ignore[method-assign]
    images = ImageTensors(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64), True,
                          Preprocess())
    with pytest.raises(InvalidModelError, match=r"ONNX Runtime failed running the model on a "
                                                r"batch of shape .*: kernel missing"):
        predict_logits(session, images)
