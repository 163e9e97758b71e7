"""Check an emitted model against the torch model it came from, in ONNX Runtime.

Every quantized activation tensor is compared after its DequantizeLinear, in units of that
tensor's quantization step: ``d = max |ORT - torch| / step``. ONNX Runtime runs with all graph
optimizations off so that fusions cannot change the numerics; ties in rounding may flip one step,
so ``d <= 1`` passes. On the ``ort`` and ``pack`` targets the torch activation quantizers run
at the 8 bits ONNX Runtime executes (``exec_bits``), elsewhere at their learned bits. The
model's outputs are gated too: in that forced run each may differ from torch's by
:data:`LOGIT_TOLERANCE` of its largest magnitude (float summation order only).

Then the graph users deploy: ONNX Runtime with all its optimizations (QLinearConv, QGemm,
QLinearAdd... with their own integer requantization) runs the batches, and each output is
compared with the torch model's free run: the relative L2 error ``|ORT - torch| / |torch|`` must
stay within :data:`FUSED_TOLERANCE` (the report's ``verification.fused``, with the largest
difference and the argmax agreement).
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
from onnxbits.importer.batch import Batch, feeds, pieces
from onnxbits.quant.network import QuantizedNetwork

#: Largest first-output difference of the unoptimized graph (torch fed ORT's quantized tensors),
#: relative to the largest output magnitude.
LOGIT_TOLERANCE = 1e-3
#: Largest relative L2 error of the fully optimized (deployed) graph's first output against the
#: torch model's free run.
FUSED_TOLERANCE = 0.1


@dataclass(frozen=True)
class FusedCheck:
    """The deployed graph (ORT, all optimizations) against the torch model's free run."""

    rel_l2: float
    max_abs: float
    agreement: float
    tolerance: float = FUSED_TOLERANCE
    output: str | None = None       # the output with the largest error (all are compared)

    def to_dict(self) -> dict[str, object]:
        return {"rel_l2": self.rel_l2, "max_abs": self.max_abs, "agreement": self.agreement,
                "tolerance": self.tolerance, "output": self.output}


@dataclass(frozen=True)
class Verification:
    """Largest ORT-vs-torch difference, in steps of the worst tensor and on the logits, and the
    deployed graph's check."""

    max_steps: float
    worst_tensor: str | None
    max_logit_diff: float
    tensors: int
    drift_share: float = 0.0
    logit_scale: float = 0.0
    fused: FusedCheck | None = None

    def to_dict(self) -> dict[str, object]:
        return {"max_steps": self.max_steps, "worst_tensor": self.worst_tensor,
                "max_logit_diff": self.max_logit_diff, "logit_scale": self.logit_scale,
                "tensors": self.tensors, "drift_share": self.drift_share,
                "fused": self.fused.to_dict() if self.fused is not None else None}


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
def verify(emitted: onnx.ModelProto, net: QuantizedNetwork, batches: list[Batch], target: str,
           tolerance_steps: float = 1.0, rows_per_pass: int | None = None) -> Verification:
    """Compare ``emitted`` in ORT with ``net`` (frozen) on ``batches``.

    Each quantized tensor is checked locally: torch computes it from ONNX Runtime's values of
    the quantized tensors upstream (each torch activation quantizer's output is replaced by ORT's
    DequantizeLinear output), so that float summation-order differences cannot pile up through
    the network. Raises VerificationError when a tensor is off by more than ``tolerance_steps``.
    The share of elements that differ by more than one step when torch runs freely (drift from
    rounding ties through the depth of the network) is reported as ``drift_share``. With
    ``rows_per_pass`` (a forward pass's memory budget in samples) each batch runs in pieces of
    a quarter of it: the check holds four copies of every quantized tensor.
    """
    if rows_per_pass is not None:
        batches = [p for x in batches for p in pieces(x, max(1, rows_per_pass // 4))]
    exec_bits = EXEC_BITS_ORT if target in INT8_TARGETS else None
    acts = list(net.acts.items())
    outputs = {tensor: _dq_output(emitted, tensor) for tensor, _ in acts}
    names = [o for o in outputs.values() if o is not None]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(_with_outputs(emitted, names), options,
                                   providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    n_out = len(emitted.graph.output)
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
    worst, worst_tensor, logit_diff, scale, ratio = 0.0, None, 0.0, 0.0, -1.0
    drift, elements = 0, 0
    free: list[list[np.ndarray]] = []
    try:
        for x in batches:
            results = dict(zip(out_names, session.run(None, feeds(x, input_names))))
            forced.clear()
            free.append([o.numpy() for o in net.forward_all(x)])  # free run: measure drift
            for tensor, q in acts:
                name = outputs[tensor]
                if name is not None and tensor in captured:
                    steps = np.abs(results[name] - captured[tensor].numpy()) / _step(q)
                    drift += int((steps > 1.001).sum())
                    elements += steps.size
            forced.update({t: torch.from_numpy(results[outputs[t]]) for t, _ in acts
                           if outputs[t] is not None})
            captured.clear()
            for name, out in zip(out_names[:n_out], net.forward_all(x), strict=True):
                got = out.numpy()  # forced run: local differences only
                diff = float(np.abs(results[name].reshape(got.shape) - got).max(initial=0.0))
                size = float(np.abs(got).max(initial=0.0))
                if diff / (size + 1e-6) > ratio:       # the worst output, relative to its size
                    ratio, logit_diff, scale = diff / (size + 1e-6), diff, size
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
    if worst > tolerance_steps + 1e-3:
        raise VerificationError(
            f"the emitted model differs from the torch model by {worst:.2f} quantization steps at "
            f"tensor '{worst_tensor}' (allowed {tolerance_steps}); this is a bug in onnxbits, "
            "please report it with the model")
    if logit_diff > LOGIT_TOLERANCE * scale + 1e-6:
        raise VerificationError(
            f"the emitted model's output differs from the torch model's by {logit_diff:.4g} "
            f"(largest output {scale:.4g}, allowed {LOGIT_TOLERANCE:g} of it) with all quantized "
            "tensors equal; this is a bug in onnxbits, please report it with the model")
    fused = _check_fused(emitted, batches, free)
    if fused.rel_l2 > fused.tolerance:
        raise VerificationError(
            f"ONNX Runtime's optimized graph (what deploys) differs from the torch model by a "
            f"relative L2 error of {fused.rel_l2:.3f} on output '{fused.output}' (allowed "
            f"{fused.tolerance}); this is a bug in onnxbits or ONNX Runtime "
            f"{ort.__version__}, please report it with the model")
    return Verification(worst, worst_tensor, logit_diff, len(names),
                        drift / elements if elements else 0.0, scale, fused)


def _check_fused(emitted: onnx.ModelProto, batches: list[Batch],
                 free: list[list[np.ndarray]]) -> FusedCheck:
    """Run ``emitted`` with all ORT optimizations; compare every output with ``free`` (the
    worst output's relative L2 error; the first output's argmax agreement)."""
    session = ort.InferenceSession(emitted.SerializeToString(), ort.SessionOptions(),
                                   providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    runs = [session.run(None, feeds(x, input_names)) for x in batches]
    worst: FusedCheck | None = None
    for k in range(len(runs[0])):
        got = np.concatenate([r[k].reshape(len(r[k]), -1) for r in runs])
        want = np.concatenate([f[k].reshape(len(f[k]), -1) for f in free]).reshape(got.shape)
        diff = got - want
        rel = float(np.linalg.norm(diff) / max(float(np.linalg.norm(want)), 1e-12))
        if k == 0:
            agree = (float(100.0 * np.mean(got.argmax(1) == want.argmax(1)))
                     if want.shape[1] > 1 else 100.0)
        if worst is None or rel > worst.rel_l2:
            worst = FusedCheck(rel, float(np.abs(diff).max(initial=0.0)), agree,
                               output=session.get_outputs()[k].name)
    assert worst is not None
    return worst


def _step(q: torch.nn.Module) -> float:
    return float(q.step().reshape(-1)[0])
