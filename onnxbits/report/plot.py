"""Render a :class:`onnxbits.report.model.ModelReport`: a PNG of bits, params and MACs per layer, and
a self-contained HTML page. Uses matplotlib's Agg canvas only (no pyplot, no display)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxbits.graph.io import write_bytes_atomic

if TYPE_CHECKING:
    from onnxbits.report.model import ModelReport


def _label(name: str, width: int = 34, head: int = 12) -> str:
    """Shorten long names in the middle, keeping the start (block) and the end (op)."""
    return name if len(name) <= width else name[:head] + "…" + name[-(width - head - 1):]


def plot(report: ModelReport, path: str | Path | None = None) -> bytes:
    """Render bits (top) and params/MACs (bottom, log scale) per layer as a PNG.

    Writes it to ``path`` when given and returns the PNG bytes. Uses the Agg canvas only (no
    pyplot, no display); the width grows with the layer count (0.28 inch per layer).
    """
    return save_png(figure(report), path)


def figure(report: ModelReport) -> Any:
    """The matplotlib Figure :func:`plot` renders (Agg canvas attached)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from onnxbits.report.model import format_count

    rows = report.layers
    x = np.arange(len(rows))
    width = max(8.0, 0.28 * len(rows) + 2.0)
    fig = Figure(figsize=(width, 9.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    bar = 0.4
    _bits_panel(top, x, bar, rows)
    bottom.bar(x - bar / 2, [max(r.params, 1) for r in rows], bar, label="params", color="#2ca02c")
    bottom.bar(x + bar / 2, [max(r.macs or 1, 1) for r in rows], bar, label="MACs", color="#9467bd")
    bottom.set_yscale("log")
    bottom.set_ylabel("count (log)")
    bottom.grid(axis="y", alpha=0.3)
    bottom.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=2, fontsize=8, frameon=False)
    labels = [f"{i} {_label(r.name)}" for i, r in enumerate(rows)]
    bottom.set_xticks(x, labels, rotation=90, fontsize=7)
    top.set_xticks(x, [str(i) for i in x], fontsize=7)  # layer index here, full names below
    for axes in (top, bottom):
        axes.set_xlim(-0.7, len(rows) - 0.3)
    fig.suptitle(f"{Path(report.source).name}: {len(rows)} layers, "
                 f"{format_count(report.total_params)} params, "
                 f"{format_count(report.total_macs)} MACs\navg weight bits "
                 f"{report.avg_weight_bits:.2f}, avg activation bits {report.avg_act_bits:.2f}, "
                 f"avg bits {report.avg_bits:.2f}", fontsize=11)
    return fig


def _bits_panel(ax: Any, x: Any, bar: float, rows: list[Any]) -> None:
    """Weight and activation bits per layer. Unquantized (float) tensors are drawn hatched at
    one bit above the highest quantized bitlength (labelled ``float``), so that 32-bit bars do not
    squash the scale of the learned bits. A layer with per-channel weight bitlengths is drawn at
    their mean (as the averages count it), with a tick at their maximum."""
    quantized = [r.weight_bits for r in rows if r.weight_quantized]
    quantized += [r.act_bits for r in rows if r.act_quantized]
    level = max(quantized + [8]) + 1
    series = (("weight", -bar / 2, "#1f77b4", "learned_weight_bits", "weight_quantized"),
              ("activation", bar / 2, "#ff7f0e", "act_bits", "act_quantized"))
    any_float = False
    for name, offset, color, bits, done in series:
        heights = [getattr(r, bits) if getattr(r, done) else 0 for r in rows]
        ax.bar(x + offset, heights, bar, label=f"{name} bits", color=color)
        floats = [level if not getattr(r, done) else 0 for r in rows]
        if any(floats):
            any_float = True
            ax.bar(x + offset, floats, bar, color="none", edgecolor=color, hatch="//",
                   label=f"{name} float")
    channel = [(xi - bar / 2, r.weight_bits) for xi, r in zip(x, rows)
               if r.weight_quantized and r.weight_bits_mean is not None]
    if channel:
        ax.scatter(*zip(*channel), marker="_", s=60, color="black", zorder=3,
                   label="weight max (per channel)")
    ticks = list(range(0, level, 2 if level > 10 else 1))
    ax.set_yticks(ticks + ([level] if any_float else []),
                  [str(t) for t in ticks] + (["float"] if any_float else []))
    ax.set_ylabel("bits")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1), ncol=4, fontsize=8, frameon=False)
    ax.set_ylim(0, level * 1.08)


def save_png(fig: Any, path: str | Path | None = None) -> bytes:
    """Render a matplotlib figure to PNG bytes (100 dpi); also write them atomically to ``path``."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    data = buffer.getvalue()
    if path is not None:
        write_bytes_atomic(data, path)
    return data


def to_html(report: ModelReport, png: str | Path | bytes | None = None,
            measured: list[str] | None = None) -> str:
    """Return one self-contained HTML page: totals, what the run measured (``measured``: lines
    of :func:`onnxbits.report.measured.measured_lines`), the plot (base64 PNG) and the layer
    table.

    The PNG is read from ``png`` (a path or bytes) or rendered in memory when ``png`` is None.
    """
    from onnxbits.report.model import HEADERS

    data = png if isinstance(png, bytes) else Path(png).read_bytes() if png else plot(report)
    image = base64.b64encode(data).decode("ascii")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in HEADERS)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                     for row in report.rows())
    totals = "".join(f"<li>{html.escape(s)}</li>" for s in report.summary_lines())
    if measured:
        totals += "</ul>\n<h2>measured</h2>\n<ul>" + "".join(
            f"<li>{html.escape(s.strip())}</li>" for s in measured)
    title = html.escape(f"onnxbits report: {report.source}")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:2px 6px}td{text-align:right}"
             "td:nth-child(2),td:nth-child(3){text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{style}</style></head><body>\n<h1>{title}</h1>\n<ul>{totals}</ul>\n"
            f"<img alt='bits per layer' src=\"data:image/png;base64,{image}\">\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
            "</body></html>\n")
