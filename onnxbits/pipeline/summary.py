"""Measuring a shrink run and assembling its JSON report (used by :mod:`onnxbits.pipeline.run`).

Measured on the evaluation split: every output's fidelity to the float model
(:mod:`onnxbits.report.fidelity`), and for a classifier (a first output with a class axis) the
accuracies of the float model and the emitted model in ONNX Runtime and of the torch model at the
frozen bits (``torch_sim_k_bit``). ``agreement`` is the share of samples on which a model's top-1
equals the float model's; the accuracy guard's drop is ``top1_float - top1`` with labels, else
:func:`onnxbits.report.fidelity.fidelity_drop`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxbits.config import ShrinkConfig
from onnxbits.data.stream import Images
from onnxbits.data.tensors import TensorSet
from onnxbits.emit.targets import emit
from onnxbits.graph.outputs import GraphOutput
from onnxbits.importer.batch import Batch, as_tensors, map_batch
from onnxbits.quant.network import QuantizedNetwork
from onnxbits.report.evaluate import agreement, make_session, predict_outputs, topk_accuracy
from onnxbits.report.fidelity import Fidelity, fidelities, fidelity_drop
from onnxbits.train.device import device_name, fast_layout
from onnxbits.train.distributed import DistContext


def accuracy(logits: np.ndarray, tensors: Images | TensorSet,
             reference: np.ndarray) -> dict[str, float]:
    """Agreement with ``reference`` and, with labels, top-1/top-5 in percent."""
    out: dict[str, float] = {"agreement": agreement(logits, reference)}
    if tensors.has_labels:
        result = topk_accuracy(logits, tensors.kept_labels())
        out.update(top1=result.top1, top5=result.top5)
    return out


@torch.no_grad()
def torch_logits(net: QuantizedNetwork, tensors: Images | TensorSet,
                 batch_size: int) -> np.ndarray:
    """Logits (first output, ``(N, -1)``) of the torch (simulated k-bit) model on every sample,
    computed on the device the network is on."""
    device = net.device
    parts = []
    for start in range(0, len(tensors), batch_size):
        idx = np.arange(start, min(start + batch_size, len(tensors)))
        x = map_batch(lambda t: fast_layout(t.to(device)), as_tensors(tensors.read(idx)[0]))
        parts.append(net(x).float().cpu().numpy())
    return np.concatenate(parts)


def output_fidelity(net: QuantizedNetwork, reference: list[np.ndarray],
                    got: list[np.ndarray]) -> list[Fidelity]:
    """:func:`onnxbits.report.fidelity.fidelities` of the network's outputs."""
    described = net.outputs or [GraphOutput(f"output {k}", index=k) for k in range(len(got))]
    return fidelities(reference, got, described)


def is_classifier(metrics: list[Fidelity], shape: tuple[int, ...]) -> bool:
    """A first output (of ``shape``) that holds one class score vector per sample: top-1 and
    agreement read it."""
    return metrics[0].kind != "values" and len([d for d in shape[1:] if d != 1]) == 1


def accuracy_drop(net: QuantizedNetwork, outputs: list[np.ndarray], tensors: Images | TensorSet,
                  float_outputs: list[np.ndarray]) -> float:
    """Top-1 points lost vs the float model (labels), else the label-free drop of
    :func:`onnxbits.report.fidelity.fidelity_drop`."""
    if tensors.has_labels:
        labels = tensors.kept_labels()
        first, ref = (o.reshape(len(o), -1) for o in (outputs[0], float_outputs[0]))
        return topk_accuracy(ref, labels).top1 - topk_accuracy(first, labels).top1
    return fidelity_drop(output_fidelity(net, float_outputs, outputs))


def apply_guard(cfg: ShrinkConfig, model: onnx.ModelProto, net: QuantizedNetwork,
                evaluation: Images | TensorSet, float_outputs: list[np.ndarray],
                calib: list[Batch], teachers: list[tuple[torch.Tensor, ...]],
                retune: Callable[[], object], batch_size: int) -> dict[str, Any]:
    """Run :func:`onnxbits.train.guard.enforce_max_drop` with the drop measured on the emitted model
    in ONNX Runtime on the evaluation split (``net`` on the CPU), ``batch_size`` samples a run."""
    from onnxbits.train.guard import enforce_max_drop

    def measure() -> float:
        session = make_session(emit(model, net, cfg.target), threads=cfg.threads)
        outputs = predict_outputs(session, evaluation, batch_size=batch_size)
        return accuracy_drop(net, outputs, evaluation, float_outputs)

    drop, raised = enforce_max_drop(net, measure, cfg.max_drop, calib, teachers, retune)
    return {"max_drop": cfg.max_drop, "final_drop": drop, "held": drop <= cfg.max_drop,
            "raised": raised}


def config_dict(cfg: ShrinkConfig) -> dict[str, Any]:
    """The options as plain JSON values."""
    out = {}
    for key, value in cfg.__dict__.items():
        out[key] = str(value) if isinstance(value, Path) else value
        if key in ("data", "eval_data") and isinstance(value, tuple):   # the API's records
            out[key] = f"{len(value)} in-memory record(s)"
    out["min_act_bits"] = cfg.act_floor
    out["preprocess"] = (cfg.preprocess.__dict__ if hasattr(cfg.preprocess, "__dict__")
                         else str(cfg.preprocess))
    return json.loads(json.dumps(out, default=str))


def runtime_info(ctx: DistContext, amp: str, cpu: dict[str, object], steps: int, images: int,
                 seconds: float, resident: bool) -> dict[str, Any]:
    """Where and how fast the fine-tune ran: ``images_per_second = steps * images / seconds``
    with ``images`` the global batch (every process's shard together) and ``seconds`` the wall
    time of the fine-tune's ``steps`` steps in this run."""
    return {"device": str(ctx.device), "device_name": device_name(ctx.device), "amp": amp,
            "world_size": ctx.world, "backend": ctx.backend, "torch": torch.__version__,
            "cpu": cpu, "images_on_device": resident,
            "fine_tune": {"steps": steps, "batch_size": images, "seconds": round(seconds, 6),
                          "images_per_second": round(steps * images / seconds, 2)
                          if seconds > 0 else None}}


def build_report(cfg: ShrinkConfig, emitted: onnx.ModelProto, net: QuantizedNetwork,
                 evaluation: Images | TensorSet, float_outputs: list[np.ndarray],
                 device: torch.device, batch_size: int) -> dict[str, Any]:
    """The per-layer report of ``emitted`` plus target, options, the ``fidelity`` of every
    output of ``emitted`` in ONNX Runtime against ``float_outputs``, and for a classifier the
    three accuracies: ``float``, ``quantized`` (``emitted`` in ONNX Runtime) and
    ``torch_sim_k_bit`` (``net`` run on ``device``, then returned to the CPU); ``batch_size``
    samples a run."""
    from onnxbits.report.model import analyze_model

    quant_outputs = predict_outputs(make_session(emitted, threads=cfg.threads), evaluation,
                                    batch_size=batch_size)
    metrics = output_fidelity(net, float_outputs, quant_outputs)
    report = analyze_model(emitted).to_dict()
    report.update(target=cfg.target, config=config_dict(cfg),
                  fidelity=[m.to_dict() for m in metrics], accuracy={})
    if is_classifier(metrics, float_outputs[0].shape):
        net.graph.to(device)
        try:
            sim_eval = torch_logits(net, evaluation, batch_size)
        finally:
            net.graph.cpu()
        float_eval, quant_eval = (o.reshape(len(o), -1) for o in (float_outputs[0],
                                                                  quant_outputs[0]))
        report["accuracy"] = {"float": accuracy(float_eval, evaluation, float_eval),
                              "quantized": accuracy(quant_eval, evaluation, float_eval),
                              "torch_sim_k_bit": accuracy(sim_eval, evaluation, float_eval)}
    return report


def chance_warning(evaluation: Images, float_eval: np.ndarray, cfg: ShrinkConfig) -> list[str]:
    """A warning when the float model itself is near chance on the labelled eval split: the
    preprocessing (or the labels) most likely do not match the model."""
    classes = float_eval.shape[1]
    if not evaluation.has_labels or classes < 2:
        return []
    top1 = topk_accuracy(float_eval, evaluation.kept_labels()).top1
    chance = 100.0 / classes
    if top1 >= 2 * chance:
        return []
    return [f"the float model scores {top1:.2f} % top-1 on the eval images of {cfg.data} "
            f"(chance: {chance:.2f} %): the preprocessing or the labels probably do not match "
            "the model; choose its --preset or set --resize/--crop/--mean/--std (and --classes, "
            "--label-offset)"]
