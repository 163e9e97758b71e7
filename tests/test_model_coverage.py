"""Model coverage: every model shipped in the onnx package (``backend/test/data/light``: real
architectures with generated weights), every model in ../shared/models and synthetic models for
each normalisation rule (opsets 7 to 21, Constant weights, external data, no shape information,
SAME padding) import, fine-tune for 2 steps, emit, verify and run in ONNX Runtime, or are
rejected with an error naming the op, opset and node.

Each test id reads ``<model>:<outcome>``. Heavy models are marked ``slow`` (``-m slow``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxbits.emit.targets import emit
from onnxbits.emit.verify import Verification, verify
from onnxbits.errors import UnsupportedOpError
from onnxbits.graph.io import load_model
from onnxbits.graph.normalize import normalize, opset_of
from onnxbits.importer.convert import FloatLayer, convert, find_sites, float_layers
from onnxbits.quant.network import attach_quantizers, calibrate
from onnxbits.train.loop import TrainConfig, fine_tune
from tests.builders import conv_relu_gemm, make_model

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "models"
#: Light models cheap enough for the default suite (seconds on two busy cores). The other light
#: models and every ../shared model (STYLE.md: real models only under ``slow``) run with -m slow.
FAST = {"light_squeezenet", "light_inception_v1", "light_resnet50"}


# --- the synthetic models ---------------------------------------------------------------------


class _Graph:
    """Nodes and initializers of a test graph at one opset."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, array: object) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        return self.init(name, self.rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32))

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1,
             **attrs: object) -> str | list[str]:
        outs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def model(self, opset: int, inp: list[int | str], out: list[int | str]) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, f"opset{opset}",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, inp)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out)], self.inits)
        model = make_model(graph, opset)
        model.ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
        if model.ir_version < 4:   # IR 3 lists every initializer among the graph inputs
            model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                     for t in self.inits)
        onnx.checker.check_model(model, full_check=True)
        return model


def mixed_model(opset: int) -> onnx.ModelProto:
    """Conv -> Clip -> Pad -> Conv -> Relu -> BatchNorm -> Split -> Concat [-> Resize -> MaxPool]
    -> Conv (asymmetric pads) -> Relu -> AveragePool (asymmetric pads) -> ReduceMean -> Reshape
    -> Gemm -> Dropout, each op written in the form of ``opset`` (attributes or inputs,
    ``num_outputs``, ``axes`` inputs, ``allowzero``), on ``[N, 3, 8, 8]``."""
    g = _Graph(opset)
    zeros = np.zeros(8, np.float32)
    x = g.node("Conv", ["input", g.weight("c1.w", (8, 3, 3, 3), 27), g.init("c1.b", zeros)],
               "conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    if opset < 11:
        x = g.node("Clip", [x], "clip", min=0.0, max=6.0)
        x = g.node("Pad", [x], "pad", pads=[0, 0, 1, 1, 0, 0, 1, 1])
    else:
        x = g.node("Clip", [x, g.init("lo", np.float32(0)), g.init("hi", np.float32(6))], "clip")
        pads = [0, 0, 1, 1, 0, 0, 1, 1] if opset < 18 else [1, 1, 1, 1]
        axes = ["", g.init("pad_axes", np.array([2, 3], np.int64))] if opset >= 18 else []
        x = g.node("Pad", [x, g.init("pads", np.array(pads, np.int64)), *axes], "pad")
    x = g.node("Relu", [g.node("Conv", [x, g.weight("c2.w", (8, 8, 3, 3), 72)], "conv2",
                               kernel_shape=[3, 3])], "relu")
    stats = [g.rng.uniform(.5, 1.5, 8), g.rng.normal(0, .1, 8), g.rng.normal(0, .1, 8),
             g.rng.uniform(.5, 1.5, 8)]
    x = g.node("BatchNormalization",
               [x, *[g.init(f"bn.{i}", v.astype(np.float32)) for i, v in enumerate(stats)]], "bn")
    if opset < 13:
        a, b = g.node("Split", [x], "split", outputs=2, axis=1, split=[4, 4])
    elif opset < 18:
        a, b = g.node("Split", [x, g.init("sizes", np.array([4, 4], np.int64))], "split", outputs=2,
                      axis=1)
    else:
        a, b = g.node("Split", [x], "split", outputs=2, axis=1, num_outputs=2)
    x = g.node("Concat", [b, a], "concat", axis=1)
    if opset >= 11:
        roi = "" if opset >= 13 else g.init("roi", np.zeros(0, np.float32))
        x = g.node("Resize", [x, roi, g.init("scales", np.array([1, 1, 2, 2], np.float32))],
                   "resize", mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")
        x = g.node("MaxPool", [x], "maxpool", kernel_shape=[2, 2], strides=[2, 2])
    x = g.node("Conv", [x, g.weight("c3.w", (8, 8, 3, 3), 72), g.init("c3.b", zeros)], "conv3",
               kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1])
    x = g.node("AveragePool", [g.node("Relu", [x], "relu3")], "avgpool", kernel_shape=[3, 3],
               pads=[0, 0, 1, 1])
    if opset < 18:
        x = g.node("ReduceMean", [x], "mean", axes=[2, 3], keepdims=1)
    else:
        x = g.node("ReduceMean", [x, g.init("mean_axes", np.array([2, 3], np.int64))], "mean")
    x = g.node("Reshape", [x, g.init("shape", np.array([-1, 8], np.int64))], "reshape",
               **({"allowzero": 1} if opset >= 14 else {}))
    x = g.node("Gemm", [x, g.weight("fc.w", (5, 8), 8), g.init("fc.b", np.zeros(5, np.float32))],
               "fc", transB=1)
    if opset < 12:
        g.node("Dropout", [x], "dropout", ratio=0.25)
    else:
        g.node("Dropout", [x, g.init("ratio", np.float32(0.25))], "dropout")
    return g.model(opset, ["N", 3, 8, 8], ["N", 5])


def weights_as_constant_nodes() -> onnx.ModelProto:
    """conv_relu_gemm with its weights in Constant / ConstantOfShape / Identity nodes."""
    model = conv_relu_gemm()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    moved = [helper.make_node("Constant", [], ["conv1.weight"], name="w1",
                              value=inits["conv1.weight"]),
             helper.make_node("Constant", [], ["dw_raw"], name="w2", value=inits["dwconv.weight"]),
             helper.make_node("Identity", ["dw_raw"], ["dwconv.weight"], name="w2_identity"),
             helper.make_node("ConstantOfShape", ["fc_bias_shape"], ["fc.bias"], name="b3",
                              value=numpy_helper.from_array(np.array([0.1], np.float32)))]
    keep = [t for t in graph.initializer if t.name not in ("conv1.weight", "dwconv.weight",
                                                           "fc.bias")]
    keep.append(numpy_helper.from_array(np.array([10], np.int64), "fc_bias_shape"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = moved + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model, full_check=True)
    return model


def same_autopad_model() -> onnx.ModelProto:
    """Conv (SAME_UPPER, stride 2) -> Relu -> MaxPool (SAME_LOWER) -> AveragePool (SAME_UPPER)
    -> GlobalAveragePool -> Flatten -> Gemm on ``[N, 3, 9, 9]``."""
    g = _Graph(1)
    x = g.node("Conv", ["input", g.weight("w", (4, 3, 3, 3), 27)], "conv", kernel_shape=[3, 3],
               strides=[2, 2], auto_pad="SAME_UPPER")
    x = g.node("MaxPool", [g.node("Relu", [x], "relu")], "maxpool", kernel_shape=[2, 2],
               auto_pad="SAME_LOWER")
    x = g.node("AveragePool", [x], "avgpool", kernel_shape=[2, 2], strides=[2, 2],
               auto_pad="SAME_UPPER")
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x], "gap")], "flatten")
    g.node("Gemm", [x, g.weight("fc.w", (3, 4), 4)], "fc", transB=1)
    return g.model(13, ["N", 3, 9, 9], ["N", 3])


def float_kept_layers() -> onnx.ModelProto:
    """A Conv, a Gemm with a 2-D bias and a MatMul with a rank-3 weight on ``[N, 4]``."""
    g = _Graph(2)
    x = g.node("Reshape", ["input", g.init("to4d", np.array([-1, 4, 1, 1], np.int64))], "to4d")
    x = g.node("Conv", [x, g.weight("conv.w", (6, 4, 1, 1), 4)], "conv", kernel_shape=[1, 1])
    x = g.node("Flatten", [x], "flatten")
    x = g.node("Gemm", [x, g.weight("gemm.w", (6, 6), 6), g.init("bias2d", np.ones((1, 6),
               np.float32))], "scaled_gemm", transB=1)
    x = g.node("Reshape", [x, g.init("to3d", np.array([-1, 2, 3], np.int64))], "to3d")
    x = g.node("MatMul", [x, g.weight("mm.w", (2, 3, 2), 3)], "batched_matmul")
    g.node("Reshape", [x, g.init("to2d", np.array([-1, 4], np.int64))], "to2d")
    return g.model(13, ["N", 4], ["N", 4])


def scaled_gemm() -> onnx.ModelProto:
    """conv_relu_gemm whose Gemm has alpha 0.5 and beta 2 (folded into B and C)."""
    model = conv_relu_gemm()
    fc = next(n for n in model.graph.node if n.op_type == "Gemm")
    fc.attribute.extend([helper.make_attribute("alpha", 0.5), helper.make_attribute("beta", 2.0)])
    return model


def gru_model() -> onnx.ModelProto:
    """One GRU layer (no torch converter exists for it)."""
    g = _Graph(3)
    g.node("GRU", ["input", g.weight("W", (1, 12, 3), 3), g.weight("R", (1, 12, 4), 4)], "the_gru",
           hidden_size=4)
    return g.model(13, [5, "N", 3], [5, 1, "N", 4])


def avgpool_with_dilations() -> onnx.ModelProto:
    """AveragePool-19 with dilations 2: converted by no torch module."""
    g = _Graph(4)
    x = g.node("Conv", ["input", g.weight("w", (4, 3, 1, 1), 3)], "conv", kernel_shape=[1, 1])
    g.node("AveragePool", [x], "dilated_pool", kernel_shape=[2, 2], dilations=[2, 2])
    return g.model(19, ["N", 3, 8, 8], ["N", 4, 6, 6])


# --- the library run ------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one model gave: layers, float layers, the verification and the ORT output."""

    model: onnx.ModelProto
    sites: list[str]
    floats: list[FloatLayer]
    verification: Verification
    output: np.ndarray


def input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    """The first graph input's shape, symbolic dimensions set to ``batch``."""
    inits = {t.name for t in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in inits)
    return tuple(d.dim_value if d.HasField("dim_value") else batch
                 for d in first.type.tensor_type.shape.dim)


def session(model: onnx.ModelProto, optimize: bool = True,
            outputs: list[str] | None = None) -> ort.InferenceSession:
    probe = model
    if outputs:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                                  for name in outputs)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def check_float_import(original: onnx.ModelProto, graph: torch.fx.GraphModule,
                       x: torch.Tensor) -> None:
    """The torch float graph matches ONNX Runtime on the source model before any softmax."""
    out = original.graph.output[0].name
    producer = {o: n for n in original.graph.node for o in n.output}.get(out)
    tensor = producer.input[0] if producer is not None and producer.op_type == "Softmax" else out
    captured: dict[str, torch.Tensor] = {}

    def capture(module: torch.nn.Module, inputs: object, out: torch.Tensor) -> None:
        captured["t"] = out

    hooks = [m.register_forward_hook(capture) for m in graph.modules()
             if tensor in getattr(getattr(m, "onnx_mapping", None), "outputs", ())]
    try:
        with torch.no_grad():
            graph(x)
    finally:
        for hook in hooks:
            hook.remove()
    sess = session(original, optimize=False, outputs=[tensor] if tensor != out else None)
    results = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {sess.get_inputs()[0].name: x.numpy()}), strict=True))
    ref = results[tensor]
    got = captured["t"].numpy().reshape(ref.shape)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def shrink_in_library(path: Path, batch: int = 2, steps: int = 2) -> Outcome:
    """load -> normalize -> convert -> sites -> quantizers -> 2 fine-tune steps -> emit -> verify
    -> ONNX Runtime, on random inputs of the declared shape (a fixed batch size is kept)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    original = load_model(path)
    model = normalize(original, path.name)
    graph = convert(model, path.name)
    sites = find_sites(model, graph)
    shape = input_shape(original, batch)
    batch = shape[0]
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2 * batch, *shape[1:]))
                         .astype(np.float32))
    check_float_import(original, graph, x[:batch])
    with torch.no_grad():
        teacher = torch.cat([graph(x[:batch]), graph(x[batch:])])
    net = attach_quantizers(model, graph, sites)
    calibrate(net, [x[:batch]])
    torch.manual_seed(0)
    fine_tune(net, lambda idx: (x[idx], None), teacher, len(x),
              TrainConfig(steps=steps, frozen_steps=1, batch_size=batch, lam=0.1))
    emitted = emit(model, net, "ort", source={"model": path.name})
    verification = verify(emitted, net, [x[:batch]], "ort")
    deployed = session(emitted)
    output = deployed.run(None, {deployed.get_inputs()[0].name: x[:batch].numpy()})[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input was modified"
    return Outcome(emitted, [s.node for s in sites], float_layers(model, graph), verification,
                   output)


def assert_runnable(outcome: Outcome, reference: onnx.ModelProto, x_shape_batch: int) -> None:
    assert outcome.sites, "no quantizable layer found"
    assert outcome.verification.max_steps <= 1.0 + 1e-3
    scale = max(1.0, float(np.abs(outcome.output).max()))
    assert outcome.verification.max_logit_diff <= 1e-3 * scale, outcome.verification
    assert np.isfinite(outcome.output).all()
    ref = session(reference)
    x = np.zeros(input_shape(reference, x_shape_batch), np.float32)
    assert outcome.output.shape == ref.run(None, {ref.get_inputs()[0].name: x})[0].shape
    kinds = {n.op_type for n in outcome.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds


# --- real models ------------------------------------------------------------------------------


def real_models() -> list[object]:
    paths = sorted(LIGHT.glob("*.onnx")) + sorted(SHARED.glob("*.onnx"))
    marks = {p.stem: [] if p.parent == LIGHT and p.stem in FAST else [pytest.mark.slow]
             for p in paths}
    return [pytest.param(p, id=f"{p.stem}:runnable", marks=marks[p.stem]) for p in paths]


@pytest.mark.parametrize("path", real_models())
def test_real_model_shrinks_and_runs_in_onnxruntime(path: Path) -> None:
    outcome = shrink_in_library(path)
    assert not outcome.floats, outcome.floats          # every Conv/Gemm/MatMul is quantized
    assert_runnable(outcome, load_model(path), 2)


def test_every_light_model_is_listed() -> None:
    names = {p.stem for p in LIGHT.glob("*.onnx")}
    assert {"light_resnet50", "light_squeezenet", "light_vgg19", "light_densenet121",
            "light_inception_v1", "light_inception_v2", "light_shufflenet", "light_bvlc_alexnet",
            "light_zfnet512"} <= names


# --- synthetic models: one per normalisation rule ---------------------------------------------


def external_data(tmp_path: Path) -> Path:
    path = tmp_path / "external.onnx"
    onnx.save(conv_relu_gemm(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="external.weights", size_threshold=0)
    assert (tmp_path / "external.weights").is_file()
    return path


def no_shape_information() -> onnx.ModelProto:
    model = conv_relu_gemm()
    del model.graph.value_info[:]
    for dim in model.graph.output[0].type.tensor_type.shape.dim:
        dim.Clear()                                   # unknown: neither a value nor a name
    return model


def default_domain_spelled_out() -> onnx.ModelProto:
    model = conv_relu_gemm()
    model.opset_import[0].domain = "ai.onnx"
    return model


SYNTHETIC: dict[str, Callable[[], onnx.ModelProto]] = {
    **{f"opset{v}": (lambda v=v: mixed_model(v)) for v in range(7, 22)},
    "constant-node-weights": weights_as_constant_nodes,
    "no-shape-information": no_shape_information,
    "ai.onnx-domain": default_domain_spelled_out,
    "same-autopad": same_autopad_model,
    "gemm-alpha-beta": scaled_gemm,
}


@pytest.mark.parametrize("name", [pytest.param(n, id=f"{n}:runnable") for n in SYNTHETIC])
def test_synthetic_model_shrinks_and_runs(name: str, tmp_path: Path) -> None:
    original = SYNTHETIC[name]()
    path = tmp_path / f"{name}.onnx"
    onnx.save(original, path)
    outcome = shrink_in_library(path)
    assert not outcome.floats, outcome.floats
    assert_runnable(outcome, original, 2)


def test_mixed_models_keep_new_opsets_and_upgrade_old_ones() -> None:
    assert [opset_of(normalize(mixed_model(v))) for v in (7, 11, 12, 13, 18, 21)] == \
        [13, 13, 13, 13, 18, 21]


@pytest.mark.parametrize("name", ["external-data:runnable"])
def test_external_data_model(name: str, tmp_path: Path) -> None:
    path = external_data(tmp_path)
    outcome = shrink_in_library(path)
    assert_runnable(outcome, load_model(path), 2)


def test_layers_that_cannot_be_quantized_stay_in_float_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "float_kept.onnx"
    onnx.save(float_kept_layers(), path)
    with caplog.at_level(logging.INFO, logger="onnxbits.importer.convert"):
        outcome = shrink_in_library(path)
    assert outcome.sites == ["conv"]
    assert [(f.node, f.op) for f in outcome.floats] == [("scaled_gemm", "Gemm"),
                                                        ("batched_matmul", "MatMul")]
    assert "weight has rank 3" in outcome.floats[1].reason
    assert "2 layer(s) stay in float: 'scaled_gemm' (Gemm" in caplog.text
    assert "'batched_matmul' (MatMul" in caplog.text
    assert_runnable(outcome, float_kept_layers(), 2)


@pytest.mark.parametrize(("build", "pattern"), [
    pytest.param(gru_model, r"gru\.onnx: no torch converter for op GRU \(opset 13, domain ''\) "
                 r"at node\(s\) the_gru; .*replace the op", id="gru:rejected"),
    pytest.param(avgpool_with_dilations,
                 r"dilated\.onnx: cannot convert node 'dilated_pool' \(AveragePool, opset 19, "
                 r"domain ''\): AveragePool with dilations \[2, 2\] is not implemented",
                 id="dilated-avgpool:rejected"),
])
def test_unconvertible_models_are_rejected_naming_op_opset_and_node(
        build: Callable[[], onnx.ModelProto], pattern: str, tmp_path: Path) -> None:
    name = "gru.onnx" if build is gru_model else "dilated.onnx"
    model = normalize(build(), name)
    with pytest.raises(UnsupportedOpError, match=pattern):
        convert(model, name)


def test_batchnorm_statistics_stay_untouched_by_calibration() -> None:
    model = normalize(mixed_model(13))
    graph = convert(model)
    assert not graph.training
    before = {k: v.clone() for k, v in graph.state_dict().items() if "running" in k}
    net = attach_quantizers(model, graph, find_sites(model, graph))
    calibrate(net, [torch.randn(4, 3, 8, 8) * 5 + 3])
    after = net.graph.state_dict()
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


def test_asymmetric_conv_padding_moves_into_a_pad_node() -> None:
    model = normalize(mixed_model(13))
    pads = {n.name: n for n in model.graph.node if n.op_type == "Pad"}
    assert "conv3_pad" in pads
    amounts = next(t for t in model.graph.initializer if t.name == pads["conv3_pad"].input[1])
    assert numpy_helper.to_array(amounts).tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    conv3 = next(n for n in model.graph.node if n.name == "conv3")
    assert conv3.input[0] == pads["conv3_pad"].output[0]
    assert [list(a.ints) for a in conv3.attribute if a.name == "pads"] == [[0, 0, 0, 0]]

