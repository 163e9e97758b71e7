"""Fidelity of a quantized model's outputs to the float model's, output by output (no labels).

For an output ``s`` of the quantized model and ``t`` of the float model over the same samples
(every element of the output over all samples):

- ``sqnr_db = 10 log10(sum t^2 / sum (t - s)^2)`` (signal-to-quantization-noise ratio; capped at
  :data:`SQNR_CAP_DB` where they are equal);
- ``cosine = <t, s> / (|t| |s|)``;
- ``rel_l2 = |t - s| / |t|``;
- ``agreement``: the percent of positions whose argmax over the class axis agrees, for outputs
  with one (a classifier's logits, a Softmax or LogSoftmax output; ``None`` otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from onnxbits.graph.outputs import GraphOutput, class_rows, output_kind

SQNR_CAP_DB = 200.0

__all__ = ["Fidelity", "SQNR_CAP_DB", "fidelities", "fidelity", "fidelity_drop"]


@dataclass(frozen=True)
class Fidelity:
    """The metrics of one output (module docstring) and the loss its kind gets in a fine-tune."""

    output: str
    kind: str
    sqnr_db: float
    cosine: float
    rel_l2: float
    agreement: float | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def fidelity(reference: np.ndarray, got: np.ndarray, output: GraphOutput) -> Fidelity:
    """The metrics of ``got`` against ``reference`` (the float model's), same shape.

    >>> f = fidelity(np.array([[3.0, 4.0]]), np.array([[3.0, 3.5]]), GraphOutput("y"))
    >>> round(f.sqnr_db, 4), round(f.rel_l2, 4), f.agreement
    (20.0, 0.1, 100.0)
    """
    t = np.asarray(reference, dtype=np.float64)
    s = np.asarray(got, dtype=np.float64).reshape(t.shape)
    signal, noise = float((t * t).sum()), float(((t - s) ** 2).sum())
    if noise == 0.0:
        sqnr = SQNR_CAP_DB
    elif signal == 0.0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise))
    norms = math.sqrt(signal) * math.sqrt(float((s * s).sum()))
    cosine = float((t * s).sum()) / norms if norms > 0 else float(noise == 0.0)
    rel = math.sqrt(noise) / math.sqrt(signal) if signal > 0 else (0.0 if noise == 0 else math.inf)
    kind = output_kind(output, tuple(t.shape))
    agree = None
    if kind != "values":
        a, b = class_rows(t, output, kind), class_rows(s, output, kind)
        if a.shape[1] > 1:
            agree = float(100.0 * np.mean(a.argmax(1) == b.argmax(1)))
    return Fidelity(output.name, kind, sqnr, cosine, rel, agree)


def fidelities(reference: Sequence[np.ndarray], got: Sequence[np.ndarray],
               outputs: Sequence[GraphOutput]) -> list[Fidelity]:
    """:func:`fidelity` of every output, in order."""
    return [fidelity(r, g, o) for r, g, o in zip(reference, got, outputs, strict=True)]


def fidelity_drop(metrics: list[Fidelity]) -> float:
    """The label-free drop ``--max-drop`` bounds: over the outputs, the worst of ``100 -
    agreement`` (outputs with a class axis) and ``100 * rel_l2`` (the others), in points."""
    return max((100.0 - m.agreement) if m.agreement is not None else 100.0 * m.rel_l2
               for m in metrics)
