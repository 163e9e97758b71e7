"""Tiny ONNX models built in code for tests (random weights from a fixed seed, opset 13).

Every model has one float input ``input`` of shape ``[N, C, H, W]`` (or ``[N, F]``) with a dynamic
batch ``N`` and one output ``logits``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image


def make_model(graph: onnx.GraphProto, opset: int,
               extra: list[onnx.OperatorSetIdProto] | None = None) -> onnx.ModelProto:
    """``helper.make_model`` at the oldest IR version the opsets allow (not this onnx's newest),
    so that an ONNX Runtime older than the installed onnx package still loads the model."""
    opsets = [helper.make_opsetid("", opset), *(extra or [])]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = max(8, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
    return model

OPSET = 13


class _Builder:
    """Accumulate nodes and initializers; name every node and tensor deterministically."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        w = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32)
        return self.init(name, w)

    def node(self, op: str, inputs: list[str], name: str | None = None, **attrs: object) -> str:
        self.count += 1
        name = name or f"{op.lower()}{self.count}"
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             name: str | None = None, bias: bool = True) -> str:
        self.count += 1
        name = name or f"conv{self.count}"
        w = self.weight(f"{name}.weight", (cout, cin // group, k, k), fan_in=cin // group * k * k)
        inputs = [x, w]
        if bias:
            inputs.append(self.init(f"{name}.bias",
                                    self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.node("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4, group=group)

    def gemm(self, x: str, fin: int, fout: int, name: str = "fc") -> str:
        w = self.weight(f"{name}.weight", (fout, fin), fan_in=fin)
        b = self.init(f"{name}.bias", self.rng.normal(0, 0.1, fout).astype(np.float32))
        return self.node("Gemm", [x, w, b], name=name, transB=1)

    def model(self, inp_shape: list[int | str], out: str,
              out_shape: list[int | str]) -> onnx.ModelProto:
        self.nodes[-1].output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, "tiny",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, inp_shape)],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = make_model(graph, OPSET)
        onnx.checker.check_model(model, full_check=True)
        return model


def conv_relu_gemm(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv(3->8) -> Relu -> depthwise Conv(8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    b = _Builder(seed)
    x = b.conv("input", 3, 8, name="conv1")
    x = b.node("Relu", [x], name="relu1")
    x = b.conv(x, 8, 8, group=8, name="dwconv")
    x = b.node("Relu", [x], name="relu2")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 8, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def squeezenet_head(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv -> Relu -> Conv 1x1 (to classes) -> Relu -> GlobalAveragePool: logits of shape
    ``(N, classes, 1, 1)``, as SqueezeNet writes them."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 8, name="conv1")], name="relu1")
    x = b.node("Relu", [b.conv(x, 8, classes, k=1, name="classifier")], name="relu2")
    b.node("GlobalAveragePool", [x], name="gap")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes, 1, 1])


def residual_block(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv -> Relu -> [Conv -> Relu -> Conv] + skip -> Relu -> GAP -> Flatten -> Gemm."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 8, name="stem")], name="stem_relu")
    y = b.node("Relu", [b.conv(x, 8, 8, name="block_conv1")], name="block_relu1")
    y = b.conv(y, 8, 8, name="block_conv2")
    x = b.node("Relu", [b.node("Add", [x, y], name="block_add")], name="block_relu2")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 8, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def batchnorm_model(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Conv (no bias) -> BatchNormalization -> Relu -> GAP -> Flatten -> Gemm (BN not folded)."""
    b = _Builder(seed)
    x = b.conv("input", 3, 8, name="conv1", bias=False)
    scale = b.init("bn.scale", b.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    shift = b.init("bn.bias", b.rng.normal(0, 0.1, 8).astype(np.float32))
    mean = b.init("bn.mean", b.rng.normal(0, 0.1, 8).astype(np.float32))
    var = b.init("bn.var", b.rng.uniform(0.5, 1.5, 8).astype(np.float32))
    x = b.node("BatchNormalization", [x, scale, shift, mean, var], name="bn", epsilon=1e-5)
    x = b.node("Relu", [x], name="relu")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 8, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def matmul_mlp(seed: int = 0, features: int = 16, hidden: int = 32,
               classes: int = 10) -> onnx.ModelProto:
    """MatMul(W1) -> Add(b1) -> Relu -> MatMul(W2) -> Add(b2) on a ``[N, features]`` input."""
    b = _Builder(seed)
    w1 = b.weight("w1", (features, hidden), fan_in=features)
    x = b.node("MatMul", ["input", w1], name="matmul1")
    x = b.node("Add", [x, b.init("b1", np.zeros(hidden, np.float32))], name="add1")
    x = b.node("Relu", [x], name="relu1")
    w2 = b.weight("w2", (hidden, classes), fan_in=hidden)
    x = b.node("MatMul", [x, w2], name="matmul2")
    b.node("Add", [x, b.init("b2", np.zeros(classes, np.float32))], name="add2")
    return b.model(["N", features], "logits", ["N", classes])


def shared_weight(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """Two Convs that read the same weight initializer, then GAP -> Flatten -> Gemm."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 8, name="conv1")], name="relu1")
    w = b.weight("shared.weight", (8, 8, 3, 3), fan_in=72)
    y = b.node("Conv", [x, w], name="conv_a", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.node("Relu", [y], name="relu_a")
    y = b.node("Conv", [y, w], name="conv_b", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.node("Relu", [y], name="relu_b")
    y = b.node("GlobalAveragePool", [y], name="gap")
    y = b.node("Flatten", [y], name="flatten", axis=1)
    b.gemm(y, 8, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


def linear_bottleneck(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """MobileNetV2-style: Conv -> Clip(0, 6) -> 1x1 project Conv (no activation) -> 1x1 expand
    Conv -> Clip(0, 6) -> depthwise Conv -> Relu -> GAP -> Flatten -> Gemm."""
    b = _Builder(seed)
    lo = b.init("clip.min", np.array(0.0, np.float32))
    hi = b.init("clip.max", np.array(6.0, np.float32))
    x = b.node("Clip", [b.conv("input", 3, 8, name="stem"), lo, hi], name="stem_relu6")
    x = b.conv(x, 8, 4, k=1, name="project")
    x = b.node("Clip", [b.conv(x, 4, 12, k=1, name="expand"), lo, hi], name="expand_relu6")
    x = b.node("Relu", [b.conv(x, 12, 12, group=12, name="dwconv")], name="dw_relu")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 12, classes, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", classes])


ALL_BUILDERS = {
    "conv_relu_gemm": conv_relu_gemm,
    "residual_block": residual_block,
    "batchnorm_model": batchnorm_model,
    "matmul_mlp": matmul_mlp,
    "shared_weight": shared_weight,
    "linear_bottleneck": linear_bottleneck,
}


def image_folder(root: Path, classes: int = 3, per_class: int = 12, side: int = 8) -> Path:
    """Class folders ``0..classes-1`` of random (seeded) ``side`` x ``side`` RGB PNGs."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(c) / f"{i}.png")
    return root


def save(model: onnx.ModelProto, path: str) -> str:
    """Write ``model`` to ``path`` and return the path as a string."""
    onnx.save(model, str(path))
    return str(path)


def two_input_two_output(seed: int = 0, features: int = 8, vocab: int = 6, hidden: int = 16,
                         classes: int = 5, targets: int = 3) -> onnx.ModelProto:
    """Inputs ``x [N, features]`` (float) and ``ids [N]`` (int64, an embedding lookup); outputs
    ``logits [N, classes]`` (Gemm) and ``reg [N, targets]`` (a regression head, MatMul)."""
    b = _Builder(seed)
    table = b.init("embedding", b.rng.normal(0, 1, (vocab, features)).astype(np.float32))
    e = b.node("Gather", [table, "ids"], name="embed", axis=0)
    x = b.node("Add", ["x", e], name="add")
    x = b.gemm(x, features, hidden, name="fc1")
    h = b.node("Relu", [x], name="relu")
    w = b.weight("head.weight", (hidden, targets), fan_in=hidden)
    b.nodes.append(helper.make_node("MatMul", [h, w], ["reg"], name="head"))
    b.gemm(h, hidden, classes, name="fc2")
    b.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        b.nodes, "two_in_two_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("reg", TensorProto.FLOAT, ["N", targets])],
        b.inits)
    model = make_model(graph, OPSET)
    onnx.checker.check_model(model, full_check=True)
    return model


def softmax_segmenter(seed: int = 0, classes: int = 4) -> onnx.ModelProto:
    """Conv(3->8) -> Relu -> Conv(8->classes, 1x1) -> Softmax over channels: a per-pixel class
    probability map ``[N, classes, H, W]`` on an input of any height and width."""
    b = _Builder(seed)
    x = b.conv("input", 3, 8, name="conv1")
    x = b.node("Relu", [x], name="relu1")
    x = b.conv(x, 8, classes, k=1, name="conv2")
    b.node("Softmax", [x], name="softmax", axis=1)
    return b.model(["N", 3, "H", "W"], "logits", ["N", classes, "H", "W"])
