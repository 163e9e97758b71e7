"""What a shrink run measured, as lines of text: accuracy, every output's fidelity and the
verification, read from the run's JSON report (``OUT.json`` next to ``OUT.onnx``).

``onnxbits shrink`` prints them after its table; ``onnxbits report`` shows them (terminal and
HTML page) when the model's run report sits next to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: The distillation loss of each output kind (:mod:`onnxbits.train.losses`).
LOSS_NAMES = {"logits": "KL", "probs": "KL", "logprobs": "KL", "values": "normalised MSE"}
_ACCURACY_ROWS = (("float", "float model, ORT"), ("quantized", "shrunk model, ORT"),
                  ("torch_sim_k_bit", "k-bit sim, torch"))

__all__ = ["LOSS_NAMES", "measured_lines", "run_report_of"]


def measured_lines(report: dict[str, Any]) -> list[str]:
    """The accuracy, fidelity and verification lines of a shrink run's ``report``."""
    lines = []
    accuracy = report.get("accuracy") or {}
    for key, label in _ACCURACY_ROWS:
        if key in accuracy:
            a = accuracy[key]
            top = f"top-1 {a['top1']:.2f}  top-5 {a['top5']:.2f}  " if "top1" in a else ""
            lines.append(f"{label:>17}: {top}agreement with float {a['agreement']:.2f}%")
    for f in report.get("fidelity") or []:
        agree = f"  argmax agreement {f['agreement']:.2f}%" if f["agreement"] is not None else ""
        lines.append(f"output '{f['output']}' ({f['kind']}, {LOSS_NAMES[f['kind']]}) vs float, "
                     f"ORT: SQNR {f['sqnr_db']:.1f} dB  cosine {f['cosine']:.4f}  relative L2 "
                     f"{f['rel_l2']:.4f}{agree}")
    v = report.get("verification") or {}
    if v:
        lines.append(f"verified in ONNX Runtime: max {v['max_steps']:.2f} quantization steps "
                     f"over {v['tensors']} tensors")
    if v.get("fused"):
        f = v["fused"]
        lines.append(f"deployed graph (ORT, all optimizations) vs torch: relative error "
                     f"{f['rel_l2']:.4f} (allowed {f['tolerance']}), argmax agreement "
                     f"{f['agreement']:.1f}%")
    return lines


def run_report_of(model: str | Path) -> dict[str, Any] | None:
    """The shrink run report written with ``model`` (``model`` with ``.json``), None when there
    is none or it belongs to another file."""
    path = Path(model).with_suffix(".json")
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or "verification" not in report:
        return None
    if Path(str(report.get("output", ""))).name != Path(model).name:
        return None
    return report
