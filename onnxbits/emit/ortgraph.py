"""The graph ONNX Runtime (CPU) actually runs, and how many quantized layers it fused.

:func:`optimized_model` returns the graph after ORT's optimizations (the
``optimized_model_filepath`` of a session); :func:`count_fusion` counts the integer kernels
that replaced quantized node units and the quantized layers left in float.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass

import onnx

# Integer kernels ONNX Runtime puts in place of quantized node units.
FUSED_LAYER_OPS = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulNBits",
                   "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul"}
FUSED_OTHER_OPS = {"QLinearAdd", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
                   "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"}
FLOAT_LAYER_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul",
                   "ConvTranspose"}


def optimized_model(model: onnx.ModelProto | bytes, level: str = "all") -> onnx.ModelProto:
    """The graph ONNX Runtime (CPU) actually runs after its optimizations (``all``/``extended``)."""
    import onnxruntime as ort

    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC}
    data = model if isinstance(model, bytes) else model.SerializeToString()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = levels[level]
        options.optimized_model_filepath = path
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return onnx.load(path)


@dataclass(frozen=True)
class FusionCount:
    """Quantized layers on integer kernels vs in float, in ORT's optimized graph."""

    fused_layers: int            # QLinearConv, QGemm, MatMulIntegerToFloat, MatMulNBits, ...
    float_quantized_layers: int  # Conv/Gemm/MatMul that read a DequantizeLinear output
    fused_other: int             # QLinearAdd, QLinearAveragePool, ...
    float_layers: int            # every float Conv/Gemm/MatMul left
    dequantize: int              # DequantizeLinear nodes left (run on every inference)
    ops: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return {"fused_layers": self.fused_layers,
                "float_quantized_layers": self.float_quantized_layers,
                "fused_other": self.fused_other, "float_layers": self.float_layers,
                "dequantize": self.dequantize, "ops": self.ops}


def count_fusion(optimized: onnx.ModelProto) -> FusionCount:
    """Count fused and unfused quantized ops in an optimized graph (see :func:`optimized_model`)."""
    nodes = list(optimized.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    ops = Counter(n.op_type for n in nodes)

    def from_dq(tensor: str) -> bool:
        node = producer.get(tensor)
        while node is not None and node.op_type in ("Transpose", "Reshape", "ReorderInput"):
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    float_layers = [n for n in nodes if n.op_type in FLOAT_LAYER_OPS]
    return FusionCount(
        fused_layers=sum(ops[op] for op in FUSED_LAYER_OPS),
        float_quantized_layers=sum(1 for n in float_layers if any(from_dq(t) for t in n.input)),
        fused_other=sum(ops[op] for op in FUSED_OTHER_OPS),
        float_layers=len(float_layers), dequantize=ops["DequantizeLinear"],
        ops=dict(sorted(ops.items())))
