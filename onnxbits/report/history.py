"""The plot of a fine-tune's history (:class:`onnxbits.train.history.StepRecord` per step):
average bits over the steps (and lambda in budget mode), the task loss, and accuracy marks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxbits.report.plot import save_png
from onnxbits.train.history import StepRecord


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

    rows = [r.to_dict() for r in records]
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
