"""Training history of a shrink (one :class:`onnxbits.train.StepRecord` per step): JSON, CSV, plot.

Formats (columns ``step, phase, loss, task, cost, avg_bits, lam`` in both):

- JSON: a list of objects, one line per step; a non-finite number is written as ``null`` and
  read back as NaN.
- CSV: a header line, then one row per step; floats are written with ``repr`` so that they read
  back exactly.

:func:`write_run_outputs` writes, next to ``OUT.onnx``: ``OUT.png`` (the per-layer report plot),
``OUT.history.json``, ``OUT.history.csv`` and ``OUT.history.png``, each atomically. Nothing here
prints.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxbits.io import write_bytes_atomic
from onnxbits.report import ModelReport, plot, save_png

if TYPE_CHECKING:
    from onnxbits.train import StepRecord

#: The columns of every history format, in order.
FIELDS = ("step", "phase", "loss", "task", "cost", "avg_bits", "lam")
_FLOATS = ("loss", "task", "cost", "avg_bits", "lam")


def _row(record: StepRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def history_to_json(records: Sequence[StepRecord]) -> str:
    """Return the history as a JSON list of objects, one step per line.

    >>> from onnxbits.train import StepRecord
    >>> text = history_to_json([StepRecord(0, "learn", 1.5, 0.5, 8.0, 8.0, float("nan"))])
    >>> text.splitlines()[1][:43], json.loads(text)[0]["lam"]
    ('{"step": 0, "phase": "learn", "loss": 1.5, ', None)
    """
    lines = []
    for record in records:
        row = _row(record)
        row["step"] = int(row["step"])
        row.update({k: _finite_or_none(float(row[k])) for k in _FLOATS})
        lines.append(json.dumps(row, allow_nan=False))
    return "[\n" + ",\n".join(lines) + ("\n]" if lines else "]")


def history_from_json(text: str) -> list[StepRecord]:
    """Parse :func:`history_to_json` output back into StepRecords (``null`` -> NaN).

    Raises:
        ValueError: The text is not a JSON list of history rows.
    """
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError("a history JSON must be a list of step objects")
    return [_record(row) for row in data]


def history_to_csv(records: Sequence[StepRecord]) -> str:
    """Return the history as CSV with the header ``step,phase,loss,task,cost,avg_bits,lam``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(FIELDS)
    for record in records:
        row = _row(record)
        writer.writerow([int(row["step"]), row["phase"], *(repr(float(row[k])) for k in _FLOATS)])
    return buffer.getvalue()


def history_from_csv(text: str) -> list[StepRecord]:
    """Parse :func:`history_to_csv` output back into StepRecords.

    Raises:
        ValueError: The header is not the history header or a value is not a number.
    """
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != FIELDS:
        raise ValueError(f"a history CSV must start with the header {','.join(FIELDS)}")
    return [_record(row) for row in reader]


def _record(row: Any) -> StepRecord:
    from onnxbits.train import StepRecord

    if not isinstance(row, dict) or set(row) != set(FIELDS):
        raise ValueError(f"a history row needs exactly the keys {', '.join(FIELDS)}, got {row!r}")
    numbers = [math.nan if row[k] in (None, "") else float(row[k]) for k in _FLOATS]
    return StepRecord(int(row["step"]), str(row["phase"]), *numbers)


def _smooth(values: list[float], window: int) -> list[float]:
    """Exponential moving average with span ``window`` (NaN-tolerant)."""
    alpha, out, level = 2.0 / (window + 1), [], math.nan
    for v in values:
        level = v if math.isnan(level) else level if math.isnan(v) else level + alpha * (v - level)
        out.append(level)
    return out


def plot_history(records: Sequence[StepRecord], path: str | Path | None = None,
                 eval_points: list[tuple[int, float]] | None = None,
                 reference_top1: float | None = None, eval_label: str = "top-1 (%)") -> bytes:
    """Render average bits (top) and task loss (bottom) over the steps as a PNG.

    The loss axis is logarithmic when the loss spans more than one decade.

    The learn phase and the frozen-bit phase are shaded differently, with a line where the bits
    were frozen. ``eval_points`` ``[(step, top-1 %), ...]`` are drawn on a right-hand accuracy axis
    of the loss panel (legend ``eval_label``), ``reference_top1`` (e.g. the float model's top-1)
    as a dashed line on it.
    When lambda changes over the steps (budget mode) it is drawn on a right-hand axis of the top
    panel. Writes the PNG to ``path`` when given and returns its bytes (Agg canvas, no pyplot).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [_row(r) for r in records]
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1.15])
    if not rows:
        top.text(0.5, 0.5, "no training steps recorded", ha="center", va="center",
                 transform=top.transAxes)
        return save_png(fig, path)
    steps = [int(r["step"]) for r in rows]
    bits = [float(r["avg_bits"]) for r in rows]
    task = [max(float(r["task"]), 1e-8) for r in rows]
    frozen_at = next((s for s, r in zip(steps, rows, strict=True) if r["phase"] == "frozen"), None)
    first, last = steps[0], steps[-1]
    for axes in (top, bottom):
        _shade_phases(axes, first, last, frozen_at, labels=axes is top)
    top.plot(steps, bits, color="#1f77b4", lw=2, label="average bits (weights + activations)")
    top.set_ylabel("average bits per layer")
    low, high = min(bits), max(bits)
    top.set_ylim(max(0.0, math.floor(low) - 0.5), math.ceil(high) + 0.5)
    top.grid(alpha=0.3)
    if frozen_at is not None:
        top.annotate(f"bits frozen at step {frozen_at}: {bits[steps.index(frozen_at)]:.2f}",
                     (frozen_at, bits[steps.index(frozen_at)]), xytext=(8, 12),
                     textcoords="offset points", fontsize=9)
    handles, labels = top.get_legend_handles_labels()
    lams = [float(r["lam"]) for r in rows]
    if max(lams) - min(lams) > 1e-12 * max(1.0, abs(max(lams))):
        twin = top.twinx()
        twin.plot(steps, lams, color="0.45", lw=1, ls=":", label="lambda")
        twin.set_ylabel("lambda", color="0.35")
        h, lab = twin.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    _legend(top, handles, labels)
    window = max(1, len(task) // 40)
    smooth = window > 1
    bottom.plot(steps, task, color="#ff7f0e", lw=0.8 if smooth else 1.8,
                alpha=0.35 if smooth else 1.0, label="task loss (per step)")
    if smooth:
        bottom.plot(steps, _smooth(task, window), color="#d62728", lw=2,
                    label=f"task loss (moving average, {window} steps)")
    if max(task) >= 10 * min(task):  # a log axis only helps over more than one decade
        bottom.set_yscale("log")
        bottom.set_ylabel("task loss (log scale)")
    else:
        bottom.set_ylabel("task loss")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3, which="both")
    handles, labels = bottom.get_legend_handles_labels()
    if eval_points or reference_top1 is not None:
        acc = bottom.twinx()
        if reference_top1 is not None:
            acc.axhline(reference_top1, color="#2ca02c", ls="--", lw=1.2,
                        label=f"float top-1 {reference_top1:.2f}%")
        if eval_points:
            xs, ys = zip(*eval_points, strict=True)
            acc.plot(xs, ys, "o", color="#2ca02c", ms=8, label=eval_label, clip_on=False,
                     zorder=5)
            for x, y in eval_points:
                acc.annotate(f"{y:.2f}%", (x, y), xytext=(-6, 8), textcoords="offset points",
                             ha="right", fontsize=9, color="#2ca02c")
        values = [*(y for _, y in eval_points or []),
                  *([reference_top1] if reference_top1 is not None else [])]
        acc.set_ylim(max(0.0, min(values) - 10), min(100.0, max(values) + 5) + 1)
        acc.set_ylabel("top-1 (%)", color="#2ca02c")
        h, lab = acc.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    _legend(bottom, handles, labels)
    bottom.set_xlim(first - 0.5, last + 0.5)
    learn = sum(1 for r in rows if r["phase"] != "frozen")
    fig.suptitle(f"training history: {len(rows)} steps ({learn} learning bits, "
                 f"{len(rows) - learn} at frozen bits); average bits {bits[0]:.2f} -> "
                 f"{bits[-1]:.2f}", fontsize=11)
    return save_png(fig, path)


def _legend(axes: Any, handles: list[Any], labels: list[str]) -> None:
    """One legend above the panel (outside the data, like the report plot)."""
    axes.legend(handles, labels, loc="lower left", bbox_to_anchor=(0, 1), ncol=len(labels),
                fontsize=9, frameon=False)


def _shade_phases(axes: Any, first: int, last: int, frozen_at: int | None,
                 labels: bool) -> None:
    """Shade the learn phase blue and the frozen phase grey, with a dashed line between."""
    split = (frozen_at if frozen_at is not None else last + 1) - 0.5
    axes.axvspan(first - 0.5, split, color="#1f77b4", alpha=0.06, lw=0)
    if frozen_at is not None:
        axes.axvspan(split, last + 0.5, color="0.5", alpha=0.14, lw=0)
        axes.axvline(split, color="0.3", ls="--", lw=1)
    if labels:
        where = axes.get_xaxis_transform()  # x in steps, y in axes fraction
        axes.text(first, 0.03, " learning bits", transform=where, fontsize=9, color="0.3")
        if frozen_at is not None:
            axes.text(split, 0.03, " bits frozen", transform=where, fontsize=9, color="0.3")


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
    """Write the report plot and the history (JSON, CSV, plot) next to ``output_model``.

    Args:
        output_model: The written model ``OUT.onnx``.
        report: Its :class:`ModelReport` or the shrink report dict (``ModelReport.to_dict()``
            plus ``accuracy``); with ``accuracy.quantized.top1`` the history plot marks the final
            top-1 at the last step and ``accuracy.float.top1`` as the reference line.
        records: The fine-tune history.

    Returns:
        The written paths: ``OUT.png``, ``OUT.history.json``, ``OUT.history.csv``,
        ``OUT.history.png``.

    Raises:
        InvalidModelError: ``report`` is not a report, or a file cannot be written.
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
    return [write_bytes_atomic(contents[key], paths[key]) for key in paths]
