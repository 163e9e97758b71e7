"""Check an emitted model against the torch model it came from, in ONNX Runtime.

Every quantized activation tensor is compared after its DequantizeLinear, in units of that
tensor's quantization step: ``d = max |ORT - torch| / step``. ONNX Runtime runs with all graph
optimizations off so that fusions cannot change the numerics; ties in rounding may flip one step,
so ``d <= 1`` passes. On the ``ort`` and ``pack`` targets the torch activation quantizers run
at the 8 bits ONNX Runtime executes (``exec_bits``), elsewhere at their learned bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import Tensor

from onnxbits.emit.qparams import EXEC_BITS_ORT, INT8_TARGETS
from onnxbits.errors import VerificationError
from onnxbits.quant.network import QuantizedNetwork


@dataclass(frozen=True)
class Verification:
    """Largest ORT-vs-torch difference, in steps of the worst tensor and on the logits."""

    max_steps: float
    worst_tensor: str | None
    max_logit_diff: float
    tensors: int
    drift_share: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"max_steps": self.max_steps, "worst_tensor": self.worst_tensor,
                "max_logit_diff": self.max_logit_diff, "tensors": self.tensors,
                "drift_share": self.drift_share}


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return probe.SerializeToString()


def _dq_output(model: onnx.ModelProto, tensor: str) -> str | None:
    q = next((n for n in model.graph.node
              if n.op_type == "QuantizeLinear" and n.input[0] == tensor), None)
    if q is None:
        return None
    current = q.output[0]
    while True:
        nxt = next((n for n in model.graph.node if current in n.input), None)
        if nxt is None:
            return None
        if nxt.op_type == "DequantizeLinear":
            return nxt.output[0]
        current = nxt.output[0]


@torch.no_grad()
def verify(emitted: onnx.ModelProto, net: QuantizedNetwork, batches: list[Tensor], target: str,
           tolerance_steps: float = 1.0) -> Verification:
    """Compare ``emitted`` in ORT with ``net`` (frozen) on ``batches``.

    Each quantized tensor is checked locally: torch computes it from ONNX Runtime's values of
    the quantized tensors upstream (each torch activation quantizer's output is replaced by ORT's
    DequantizeLinear output), so that float summation-order differences cannot pile up through
    the network. Raises VerificationError when a tensor is off by more than ``tolerance_steps``.
    The share of elements that differ by more than one step when torch runs freely (drift from
    rounding ties through the depth of the network) is reported as ``drift_share``.
    """
    exec_bits = EXEC_BITS_ORT if target in INT8_TARGETS else None
    acts = list(net.acts.items())
    outputs = {tensor: _dq_output(emitted, tensor) for tensor, _ in acts}
    names = [o for o in outputs.values() if o is not None]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_with_outputs(emitted, names), options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    out_names = [o.name for o in session.get_outputs()]
    captured: dict[str, Tensor] = {}
    forced: dict[str, Tensor] = {}
    hooks = []
    saved = {}

    def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], out: Tensor,
             tensor: str) -> Tensor:
        captured[tensor] = out.detach()
        return forced.get(tensor, out)

    for tensor, q in acts:
        saved[tensor] = q.exec_bits
        q.exec_bits = exec_bits
        hooks.append(q.register_forward_hook(
            lambda m, i, o, tensor=tensor: hook(m, i, o, tensor)))
    worst, worst_tensor, logit_diff = 0.0, None, 0.0
    drift, elements = 0, 0
    try:
        for x in batches:
            results = dict(zip(out_names, session.run(None, {input_name: x.numpy()})))
            forced.clear()
            net(x)  # free run: measure drift
            for tensor, q in acts:
                name = outputs[tensor]
                if name is not None and tensor in captured:
                    steps = np.abs(results[name] - captured[tensor].numpy()) / _step(q)
                    drift += int((steps > 1.001).sum())
                    elements += steps.size
            forced.update({t: torch.from_numpy(results[outputs[t]]) for t, _ in acts
                           if outputs[t] is not None})
            captured.clear()
            logits = net(x).numpy()  # forced run: local differences only
            logit_diff = max(logit_diff, float(np.abs(results[out_names[0]] - logits).max()))
            for tensor, q in acts:
                name = outputs[tensor]
                if name is None or tensor not in captured:
                    continue
                diff = float(np.abs(results[name] - captured[tensor].numpy()).max()) / _step(q)
                if diff > worst:
                    worst, worst_tensor = diff, tensor
    finally:
        for h in hooks:
            h.remove()
        for tensor, q in acts:
            q.exec_bits = saved[tensor]
    result = Verification(worst, worst_tensor, logit_diff, len(names),
                          drift / elements if elements else 0.0)
    if worst > tolerance_steps + 1e-3:
        raise VerificationError(
            f"the emitted model differs from the torch model by {worst:.2f} quantization steps at "
            f"tensor '{worst_tensor}' (allowed {tolerance_steps}); this is a bug in onnxbits, "
            "please report it with the model")
    return result


def _step(q: torch.nn.Module) -> float:
    return float(q.step().reshape(-1)[0])
