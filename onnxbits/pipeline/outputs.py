"""Files a shrink writes next to ``OUT.onnx`` besides the model and its report JSON:
``OUT.png`` (the per-layer report plot), ``OUT.history.json``, ``OUT.history.csv`` and
``OUT.history.png`` (:mod:`onnxbits.train.history`), each atomically. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxbits.graph.io import write_files_atomic
from onnxbits.report.history import plot_history
from onnxbits.report.model import ModelReport
from onnxbits.report.plot import plot
from onnxbits.train.history import StepRecord, history_to_csv, history_to_json


def run_output_paths(output_model: str | Path) -> dict[str, Path]:
    """Return the files written next to ``OUT.onnx`` by :func:`write_run_outputs`.

    Keys: ``plot``, ``json``, ``csv``, ``history_plot``.

    >>> sorted(p.name for p in run_output_paths("m.bits.onnx").values())
    ['m.bits.history.csv', 'm.bits.history.json', 'm.bits.history.png', 'm.bits.png']
    """
    out = Path(output_model)
    return {"plot": out.with_suffix(".png"), "json": out.with_suffix(".history.json"),
            "csv": out.with_suffix(".history.csv"),
            "history_plot": out.with_suffix(".history.png")}


def write_run_outputs(output_model: str | Path, report: ModelReport | dict[str, Any],
                      records: Sequence[StepRecord]) -> list[Path]:
    """Write the report plot and the history (JSON, CSV, plot) next to ``output_model``
    (:func:`run_output_files`, written with :func:`onnxbits.graph.io.write_files_atomic`)."""
    return write_files_atomic(run_output_files(output_model, report, records))


def run_output_files(output_model: str | Path, report: ModelReport | dict[str, Any],
                     records: Sequence[StepRecord]) -> dict[Path, bytes]:
    """The report plot and the history (JSON, CSV, plot) to write next to ``output_model``.

    Args:
        output_model: The written model ``OUT.onnx``.
        report: Its :class:`ModelReport` or the shrink report dict (``ModelReport.to_dict()``
            plus ``accuracy``); with ``accuracy.quantized.top1`` the history plot marks the final
            top-1 at the last step and ``accuracy.float.top1`` as the reference line.
        records: The fine-tune history.

    Returns:
        Each file's bytes by path: ``OUT.png``, ``OUT.history.json``, ``OUT.history.csv``,
        ``OUT.history.png``.

    Raises:
        InvalidModelError: ``report`` is not a report.
    """
    model_report = report if isinstance(report, ModelReport) else ModelReport.from_dict(report)
    model_report = dataclasses.replace(model_report, source=str(output_model))  # plot title
    accuracy = report.get("accuracy", {}) if isinstance(report, dict) else {}
    final = (accuracy.get("quantized") or {}).get("top1")
    reference = (accuracy.get("float") or {}).get("top1")
    points = [(int(records[-1].step), float(final))] if final is not None and records else None
    paths = run_output_paths(output_model)
    contents = {
        "plot": plot(model_report),
        "json": (history_to_json(records) + "\n").encode(),
        "csv": history_to_csv(records).encode(),
        "history_plot": plot_history(records, eval_points=points, reference_top1=reference,
                                     eval_label="quantized top-1 (ONNX Runtime)"),
    }
    return {paths[key]: contents[key] for key in paths}
