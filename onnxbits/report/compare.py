"""Side-by-side bits, bytes, BOPs and accuracy of two ONNX models of the same network.

Typical use: an onnxbits output (A) against ONNX Runtime's ``quantize_static`` int8 model (B).
Each model is read with :func:`onnxbits.report.model.analyze_model`. Layers are matched by node name;
the layers left over on both sides are then paired in graph order when both sides have as many
left (an unnamed node gets a name from its position, which differs once Q/DQ nodes are
inserted); anything else is listed as only in A or only in B. With decoded images, both models
run in ONNX Runtime on the same tensors: top-1/top-5 when the images have labels, and always the
share of images on which A and B predict the same class. Nothing here prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from onnxbits.data.stream import Images
from onnxbits.report.evaluate import (
    EvalResult,
    agreement,
    make_session,
    predict_logits,
    topk_accuracy,
)
from onnxbits.report.model import (
    LayerReport,
    ModelReport,
    analyze_model,
    format_bytes,
    format_count,
)

ModelLike = str | Path | onnx.ModelProto

#: Per-layer fields reported for each side, as ``<field>_a`` / ``<field>_b`` in JSON.
LAYER_FIELDS = ("name", "op", "weight_bits", "act_bits", "weight_quantized", "act_quantized",
                "weight_container_bits", "act_exec_bits", "weight_bytes", "bops")
#: Model totals reported for each side (``ModelReport`` attributes).
TOTAL_FIELDS = ("avg_weight_bits", "avg_act_bits", "avg_bits", "size_weighted_weight_bits",
                "total_params", "total_macs", "total_bops", "float_weight_bytes",
                "quantized_weight_bytes", "stored_weight_bytes", "model_file_bytes",
                "compression")
LAYER_HEADERS = ["#", "layer", "op", "params", "MACs", "W bits A", "W bits B", "A bits A",
                 "A bits B", "W bytes A", "W bytes B"]
#: How a row was matched: same node name, same position among the unnamed rest, or one side only.
MATCHES = ("name", "order", "a_only", "b_only")
_MATCH_TEXT = {"name": "by name", "order": "by order", "a_only": "only in A", "b_only": "only in B"}


@dataclass
class LayerPair:
    """One row: the same layer in A and B (``None`` on the side that lacks it)."""

    a: LayerReport | None
    b: LayerReport | None
    matched_by: str  # one of MATCHES

    def __post_init__(self) -> None:
        if self.a is None and self.b is None:
            raise ValueError("a LayerPair needs a layer of A, of B or of both")
        if self.matched_by not in MATCHES:
            raise ValueError(f"matched_by must be one of {MATCHES}, got {self.matched_by!r}")

    @property
    def either(self) -> LayerReport:
        """A's layer, else B's."""
        return self.a if self.a is not None else self.b  # type: ignore[return-value]

    @property
    def name(self) -> str:
        """The node name, ``A name / B name`` when they differ."""
        names = [r.name for r in (self.a, self.b) if r is not None]
        return names[0] if len(set(names)) == 1 else " / ".join(names)

    def to_dict(self) -> dict[str, Any]:
        """Return ``{params, macs, matched_by, <field>_a, <field>_b ...}`` (None where absent)."""
        out: dict[str, Any] = {"params": self.either.params, "macs": self.either.macs,
                               "matched_by": self.matched_by}
        for key in LAYER_FIELDS:
            out[f"{key}_a"] = getattr(self.a, key) if self.a else None
            out[f"{key}_b"] = getattr(self.b, key) if self.b else None
        return out


def match_layers(a: list[LayerReport], b: list[LayerReport]) -> list[LayerPair]:
    """Pair the layers of A and B by node name, then the remaining ones in graph order.

    The rows follow A's order; layers only in B come last.
    """
    b_by_name = {r.name: r for r in b}
    a_names = {r.name for r in a}
    rest_a = [r for r in a if r.name not in b_by_name]
    rest_b = [r for r in b if r.name not in a_names]
    by_order = dict(zip(map(id, rest_a), rest_b, strict=True)) if len(rest_a) == len(rest_b) else {}
    pairs = []
    for row in a:
        if row.name in b_by_name:
            pairs.append(LayerPair(row, b_by_name[row.name], "name"))
        elif id(row) in by_order:
            pairs.append(LayerPair(row, by_order[id(row)], "order"))
        else:
            pairs.append(LayerPair(row, None, "a_only"))
    if not by_order:
        pairs += [LayerPair(None, row, "b_only") for row in rest_b]
    return pairs


@dataclass
class Comparison:
    """Two model reports, their matched layers and, with images, their accuracy."""

    a: ModelReport
    b: ModelReport
    pairs: list[LayerPair]
    accuracy_a: EvalResult | None = None
    accuracy_b: EvalResult | None = None
    agreement: float | None = None  # percent of images where A and B predict the same class
    images: int | None = None

    @property
    def labels(self) -> tuple[str, str]:
        """Short names of A and B: the file names, or the full sources when those are equal."""
        a, b = Path(self.a.source).name, Path(self.b.source).name
        return (a, b) if a != b else (self.a.source, self.b.source)

    def matching(self) -> dict[str, int]:
        """Count the rows per match kind (keys: :data:`MATCHES`)."""
        counts = dict.fromkeys(MATCHES, 0)
        for pair in self.pairs:
            counts[pair.matched_by] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, JSON-ready dict: ``a``, ``b`` (totals + accuracy), ``layers`` etc."""

        def side(report: ModelReport, label: str, acc: EvalResult | None) -> dict[str, Any]:
            return {"model": report.source, "label": label, "layers": len(report.layers),
                    **{k: getattr(report, k) for k in TOTAL_FIELDS},
                    "target": report.metadata.get("target"),
                    "accuracy": acc.to_dict() if acc else None}

        label_a, label_b = self.labels
        return {"a": side(self.a, label_a, self.accuracy_a),
                "b": side(self.b, label_b, self.accuracy_b),
                "matching": self.matching(), "agreement": self.agreement, "images": self.images,
                "layers": [p.to_dict() for p in self.pairs]}

    def to_json(self, indent: int | None = 2) -> str:
        """Return :meth:`to_dict` as one JSON object."""
        return json.dumps(self.to_dict(), indent=indent)

    def layer_rows(self) -> list[list[str]]:
        """Return the per-layer cells, in the order of ``LAYER_HEADERS``."""
        rows = []
        for i, p in enumerate(self.pairs):
            ops = dict.fromkeys(r.op for r in (p.a, p.b) if r is not None)
            suffix = "" if p.matched_by == "name" else f" ({_MATCH_TEXT[p.matched_by]})"
            rows.append([str(i), p.name + suffix, "/".join(ops), format_count(p.either.params),
                         format_count(p.either.macs),
                         _bits(p.a, "weight"), _bits(p.b, "weight"), _bits(p.a, "act"),
                         _bits(p.b, "act"), _bytes(p.a), _bytes(p.b)])
        return rows

    def total_rows(self) -> list[list[str]]:
        """Return the totals as ``[metric, A, B, B vs A]`` cells."""
        a, b = self.a, self.b
        rows = [["layers", str(len(a.layers)), str(len(b.layers)),
                 _change(len(a.layers), len(b.layers), "diff", "{:+d}")]]
        for label, key in (("avg weight bits", "avg_weight_bits"),
                           ("avg activation bits", "avg_act_bits"),
                           ("avg bits (W + A)", "avg_bits"),
                           ("size-weighted weight bits", "size_weighted_weight_bits")):
            va, vb = getattr(a, key), getattr(b, key)
            rows.append([label, f"{va:.2f}", f"{vb:.2f}", _change(va, vb, "diff", "{:+.2f}")])
        rows.append(["BOPs", format_count(a.total_bops), format_count(b.total_bops),
                     _change(a.total_bops, b.total_bops, "ratio")])
        for label, key in (("weights at learned bits", "quantized_weight_bytes"),
                           ("weights stored", "stored_weight_bytes"),
                           ("model file", "model_file_bytes")):
            va, vb = getattr(a, key), getattr(b, key)
            rows.append([label, format_bytes(va), format_bytes(vb), _change(va, vb, "ratio")])
        rows.append(["compression vs float weights", f"{a.compression:.2f}x",
                     f"{b.compression:.2f}x", _change(a.compression, b.compression, "ratio")])
        if self.accuracy_a is not None and self.accuracy_b is not None:
            for label, key in (("top-1 %", "top1"), ("top-5 %", "top5")):
                va, vb = getattr(self.accuracy_a, key), getattr(self.accuracy_b, key)
                rows.append([label, f"{va:.2f}", f"{vb:.2f}",
                             _change(va, vb, "diff", "{:+.2f} pt")])
        return rows

    def notes(self) -> list[str]:
        """Return the legend and the matching/agreement lines shown under the tables."""
        label_a, label_b = self.labels
        lines = [f"A = {self.a.source}", f"B = {self.b.source}"]
        counts = self.matching()
        if counts["name"] != len(self.pairs):
            lines.append("layers: " + ", ".join(f"{n} matched {_MATCH_TEXT[k]}"
                                                 if k in ("name", "order")
                                                 else f"{n} {_MATCH_TEXT[k]}"
                                                 for k, n in counts.items() if n))
        if self.agreement is not None:
            text = (f"{label_a} and {label_b} predict the same class on {self.agreement:.2f}% of "
                    f"{self.images} images")
            lines.append(text if self.accuracy_a else text + " (no labels: no top-1/top-5)")
        return lines

    def to_markdown(self) -> str:
        """Return the per-layer table, the totals table and the notes as Markdown."""
        label_a, label_b = self.labels
        return "\n".join([
            *_md_table(LAYER_HEADERS, self.layer_rows()), "",
            *_md_table(["", f"A ({label_a})", f"B ({label_b})", "B vs A"], self.total_rows()),
            "", *(f"- {line}" for line in self.notes())]) + "\n"

    def to_rich_table(self) -> Any:
        """Return a ``rich.table.Table`` of the matched layers (B's bits green when fewer)."""
        from rich.table import Table

        label_a, label_b = self.labels
        table = Table(title=f"onnxbits compare: A = {label_a}, B = {label_b}")
        for i, header in enumerate(LAYER_HEADERS):
            table.add_column(header, justify="left" if i in (1, 2) else "right",
                             overflow="fold" if i == 1 else "ellipsis")
        for pair, row in zip(self.pairs, self.layer_rows(), strict=True):
            for col, kind in ((6, "weight_bits"), (8, "act_bits")):
                row[col] = _colour(row[col], pair, kind)
            table.add_row(*row)
        return table

    def to_rich_totals(self) -> Any:
        """Return a ``rich.table.Table`` of the totals with the notes as its caption."""
        from rich.table import Table

        label_a, label_b = self.labels
        table = Table(title="totals", caption="\n".join(self.notes()), caption_justify="left",
                      caption_style="none")
        for i, header in enumerate(["", f"A ({label_a})", f"B ({label_b})", "B vs A"]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in self.total_rows():
            table.add_row(*row)
        return table


def _bits(row: LayerReport | None, kind: str) -> str:
    if row is None:
        return "-"
    bits, quantized = getattr(row, f"{kind}_bits"), getattr(row, f"{kind}_quantized")
    return str(bits) if quantized else "float"


def _bytes(row: LayerReport | None) -> str:
    return "-" if row is None else format_count(row.weight_bytes)


def _change(a: float, b: float, kind: str, fmt: str = "{:+.2f}") -> str:
    if kind == "ratio":
        return f"{b / a:.2f}x" if a else "-"
    return "=" if a == b else fmt.format(b - a)


def _colour(text: str, pair: LayerPair, kind: str) -> str:
    if pair.a is None or pair.b is None:
        return text
    a, b = getattr(pair.a, kind), getattr(pair.b, kind)
    return text if a == b else f"[green]{text}[/]" if b < a else f"[red]{text}[/]"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *(line(r) for r in rows)]


def compare_models(a: ModelLike, b: ModelLike, tensors: Images | None = None, *,
                   batch_size: int = 64, threads: int | None = None,
                   progress: Callable[[int], None] | None = None) -> Comparison:
    """Compare per-layer bits, totals and (with ``tensors``) the accuracy of models A and B.

    Args:
        a: Model A (a path or a ModelProto), e.g. the onnxbits output.
        b: Model B, e.g. an ONNX Runtime ``quantize_static`` model of the same network.
        tensors: Decoded images, run through both models in ONNX Runtime; top-1/top-5 need
            labels, the A/B agreement does not.
        batch_size: Images per ONNX Runtime run (a fixed model batch wins).
        threads: ONNX Runtime intra-op threads; None lets it decide.
        progress: Called with the number of images just finished (``2 * len(tensors)`` in all).

    Raises:
        InvalidModelError: A model cannot be read or loaded by ONNX Runtime.
        DataError: The images do not fit a model.
    """
    report_a, report_b = analyze_model(a), analyze_model(b)
    result = Comparison(report_a, report_b, match_layers(report_a.layers, report_b.layers))
    if tensors is None:
        return result
    logits = [predict_logits(make_session(m, threads=threads), tensors, batch_size=batch_size,
                             progress=progress) for m in (a, b)]
    result.agreement, result.images = agreement(*logits), len(tensors)
    if tensors.has_labels:
        labels = tensors.kept_labels()
        result.accuracy_a = topk_accuracy(logits[0], labels)
        result.accuracy_b = topk_accuracy(logits[1], labels)
    return result
