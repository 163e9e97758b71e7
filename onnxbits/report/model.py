"""Per-layer bit report of any ONNX model (float, onnxbits output, ORT QDQ) and its formatters.

Bits come from the ``onnxbits`` metadata entry when present (authoritative), else from the graph:
weight bits from the DequantizeLinear on the weight (see ``graph.weight_bits``), activation bits
from Q -> [Clip] -> DQ on the data input (``graph.activation_quant``); float tensors count as 32.
Each quantized tensor has three precisions: learned (``*_bits``), stored (``*_container_bits``,
the integer type in the file) and executed (``act_exec_bits``: the grid ONNX Runtime computes
the activation on; weights always execute on their learned grid). A ``pack`` model is read
through :func:`onnxbits.emit.pack.graph_view`; its sizes are those of the packed file.

Totals: ``avg_weight_bits = mean_l w_l``, ``avg_act_bits = mean_l a_l``,
``avg_bits = (sum w + sum a) / (2 L)``, ``size_weighted_weight_bits = sum p_l w_l / sum p_l``,
``bops_l = macs_l * w_l * a_l``, ``quantized_weight_bytes = sum p * w / 8``, where ``w_l`` is
the mean over channels for per-channel bitlengths (the table shows mean and max),
``compression = float_weight_bytes / stored_weight_bytes`` (weights read by several layers count
once in the byte and param totals). The library never prints; formatters return values.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import onnx

from onnxbits.emit.metadata import read_metadata
from onnxbits.emit.pack import graph_view
from onnxbits.errors import InvalidModelError
from onnxbits.graph.index import (
    GraphIndex,
    activation_quant,
    infer_shapes,
    quantizable_nodes,
    weight_bits,
)
from onnxbits.graph.io import load_model
from onnxbits.graph.macs import layer_cost
from onnxbits.graph.normalize import constants_to_initializers

__all__ = ["HEADERS", "LayerReport", "ModelReport", "TensorReport", "analyze_model",
           "format_bytes", "format_count"]

log = logging.getLogger(__name__)
FLOAT_BITS = 32


@dataclass
class LayerReport:
    """One quantizable layer. Float tensors have bits 32; ``*_quantized`` says which are not."""

    name: str
    op: str
    weight_shape: list[int]
    params: int
    bias_params: int
    macs: int | None
    weight_bits: int
    act_bits: int
    weight_container_bits: int
    act_exec_bits: int
    weight_bytes: int
    bops: int
    weight_quantized: bool
    act_quantized: bool
    act_tensor: str | None
    bits_from: str  # "metadata" or "graph"
    act_container_bits: int = FLOAT_BITS
    weight_bits_mean: float | None = None  # per-channel bitlengths: their mean (weight_bits: max)

    @property
    def learned_weight_bits(self) -> float:
        """The layer's weight bitlength in the totals: the mean over channels when the bits
        are per channel (as the fine-tune's cost counts it), else ``weight_bits``."""
        return self.weight_bits if self.weight_bits_mean is None else self.weight_bits_mean


@dataclass
class TensorReport:
    """One quantized activation: learned, stored (container) and executed bits. ``role`` is
    ``input`` (read by a layer), ``output`` (an 8-bit quantizer added so its producer fuses)
    or ``other``."""

    tensor: str
    role: str
    bits: int
    container_bits: int
    exec_bits: int
    signed: bool


@dataclass
class ModelReport:
    """Per-layer rows and model totals (see the module docstring for the formulas)."""

    source: str
    layers: list[LayerReport]
    avg_weight_bits: float
    avg_act_bits: float
    avg_bits: float
    size_weighted_weight_bits: float
    total_params: int
    total_bias_params: int
    total_macs: int
    total_bops: int
    float_weight_bytes: int
    quantized_weight_bytes: float
    stored_weight_bytes: int
    model_file_bytes: int
    compression: float
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain, JSON-ready dict."""
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        """Return the report as one JSON object."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelReport:
        """Rebuild a report from :meth:`to_dict` output; other keys (e.g. shrink's) are ignored.

        Raises:
            InvalidModelError: A report field is missing.
        """
        names = {f.name for f in fields(cls)}
        layer_names = {f.name for f in fields(LayerReport)}
        try:
            layers = [LayerReport(**{k: v for k, v in row.items() if k in layer_names})
                      for row in data["layers"]]
            tensors = [TensorReport(**row) for row in data.get("tensors", [])]
            return cls(**{**{k: v for k, v in data.items() if k in names}, "layers": layers,
                          "tensors": tensors})
        except (KeyError, TypeError) as exc:
            raise InvalidModelError(f"not an onnxbits report ({exc}); pass the dict from "
                                    "ModelReport.to_dict() or a shrink report") from exc

    def summary_lines(self) -> list[str]:
        """Return the totals as short ``label: value`` lines."""
        return [
            f"layers: {len(self.layers)}",
            f"avg weight bits: {self.avg_weight_bits:.2f}  avg activation bits: "
            f"{self.avg_act_bits:.2f}  avg bits: {self.avg_bits:.2f}",
            f"size-weighted weight bits: {self.size_weighted_weight_bits:.2f}",
            f"params: {format_count(self.total_params)} "
            f"(+{format_count(self.total_bias_params)} bias)  "
            f"MACs: {format_count(self.total_macs)}  BOPs: {format_count(self.total_bops)}",
            f"weights: float {format_bytes(self.float_weight_bytes)}, at learned bits "
            f"{format_bytes(self.quantized_weight_bytes)}, "
            f"stored {format_bytes(self.stored_weight_bytes)} "
            f"({self.compression:.2f}x)  file: {format_bytes(self.model_file_bytes)}",
            *_tensor_lines(self.tensors),
        ]

    def rows(self) -> list[list[str]]:
        """Return the table cells per layer, in the order of ``HEADERS``."""
        return [[str(i), r.name, r.op, "x".join(map(str, r.weight_shape)), format_count(r.params),
                 format_count(r.macs), _weight_bits_cell(r),
                 _bits(r.act_bits, r.act_quantized), str(r.weight_container_bits),
                 str(r.act_container_bits), str(r.act_exec_bits), format_count(r.weight_bytes)]
                for i, r in enumerate(self.layers)]

    def to_markdown(self) -> str:
        """Return a Markdown table (header, one row per layer) and the totals as a list."""
        lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
                  for row in self.rows()]
        return "\n".join([*lines, "", *(f"- {s}" for s in self.summary_lines())]) + "\n"

    def to_rich_table(self) -> Any:
        """Return a ``rich.table.Table`` of the layers with the totals as its caption."""
        from rich.table import Table

        table = Table(title=f"onnxbits report: {self.source}",
                      caption="\n".join(self.summary_lines()), caption_justify="left",
                      caption_style="none")
        for i, header in enumerate(HEADERS):
            table.add_column(header, justify="left" if i in (1, 2, 3) else "right",
                             overflow="fold" if i == 1 else "ellipsis")
        for row in self.rows():
            table.add_row(*row)
        return table


HEADERS = ["#", "layer", "op", "weight shape", "params", "MACs", "W bits", "A bits",
           "W stored", "A stored", "A exec", "W bytes"]


def _tensor_lines(tensors: list[TensorReport]) -> list[str]:
    """One line per (role, learned, stored, executed) group of quantized activations."""
    groups: dict[tuple[str, int, int, int], int] = {}
    for t in tensors:
        key = (t.role, t.bits, t.container_bits, t.exec_bits)
        groups[key] = groups.get(key, 0) + 1
    return [f"activations ({role}): {n} learned at {bits} bits, stored in {stored}, "
            f"executed at {run}" for (role, bits, stored, run), n in sorted(groups.items())]


def _weight_bits_cell(r: LayerReport) -> str:
    """``k``, or ``mean (max k)`` for per-channel bitlengths."""
    if r.weight_bits_mean is not None and r.weight_quantized:
        return f"{r.weight_bits_mean:.2f} (max {r.weight_bits})"
    return _bits(r.weight_bits, r.weight_quantized)


def _bits(bits: int, quantized: bool) -> str:
    return str(bits) if quantized else f"{bits} (float)"


def format_count(value: float | None) -> str:
    """Format a count with a k/M/G suffix (``None`` -> ``?``).

    >>> format_count(13824), format_count(3.4e6), format_count(80)
    ('13.82k', '3.40M', '80')
    """
    if value is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_bytes(value: float) -> str:
    """Format a byte count as kB (below 100 kB) or MB.

    >>> format_bytes(1472), format_bytes(3.5e6)
    ('1.5 kB', '3.500 MB')
    """
    return f"{value / 1e6:.3f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB"


def analyze_model(model: onnx.ModelProto | str | Path) -> ModelReport:
    """Read per-layer bits, params, MACs and sizes of ``model`` (a ModelProto or a file path)."""
    if isinstance(model, (str, Path)):
        source = str(model)
        proto = load_model(model)
        file_bytes = Path(model).stat().st_size
    elif isinstance(model, onnx.ModelProto):
        source, proto, file_bytes = model.graph.name or "model", model, model.ByteSize()
        if not proto.graph.node:
            raise InvalidModelError(f"{source}: the ONNX graph has no nodes; "
                                    "pass a complete model")
    else:
        raise InvalidModelError("expected an ONNX ModelProto or a path, got "
                                f"{type(model).__name__}")
    meta = read_metadata(proto, source)
    if meta.get("target") == "pack":
        proto = graph_view(proto)
    elif not meta:   # a float model: weights built by Constant/ConstantOfShape nodes count too,
        folded = onnx.ModelProto()           # as shrink sees them (onnxbits outputs have none)
        folded.CopyFrom(proto)
        if constants_to_initializers(folded):
            proto = folded
    index = GraphIndex(proto)
    shapes = infer_shapes(proto)
    sites = quantizable_nodes(proto, index)
    entries = meta.get("layers", {})
    unknown = set(entries) - {s.name for s in sites}
    if unknown:
        log.warning("%s: metadata names layers not in the graph: %s", source, sorted(unknown)[:5])
    tensors = _meta_tensors(meta) or _graph_tensors(index, {s.input_name for s in sites})
    containers = {t.tensor: t.container_bits for t in tensors}
    layers: list[LayerReport] = []
    stored: dict[str, tuple[int, float, int]] = {}
    for site in sites:
        cost = layer_cost(index, site, shapes)
        w_bits, w_container, w_quant = weight_bits(index, site)
        act = activation_quant(index, site.input_name)
        a_bits, a_exec = (act.bits, act.exec_bits) if act else (FLOAT_BITS, FLOAT_BITS)
        a_quant, a_tensor = act is not None, act.tensor if act else None
        a_container = act.container_bits if act else FLOAT_BITS
        entry = entries.get(site.name)
        w_mean = None
        if entry is not None:
            w_bits, w_quant = int(entry["weight_bits"]), True
            if entry.get("weight_bits_mean") is not None and entry["weight_bits_mean"] != w_bits:
                w_mean = float(entry["weight_bits_mean"])
            w_container = int(entry.get("weight_container_bits") or w_container)
            a_quant = entry.get("act_bits") is not None
            a_bits = int(entry["act_bits"]) if a_quant else FLOAT_BITS
            a_exec = int(entry.get("act_exec_bits") or (a_exec if a_quant else FLOAT_BITS))
            a_tensor = (entry.get("act_tensor") or a_tensor) if a_quant else None
            a_container = containers.get(str(a_tensor), a_container if act else a_exec)
        w_bytes = math.ceil(cost.params * w_container / 8)
        learned = w_bits if w_mean is None else w_mean
        layers.append(LayerReport(
            site.name, site.op, list(site.weight_shape), cost.params, cost.bias_params, cost.macs,
            w_bits, a_bits, w_container, a_exec, w_bytes,
            round((cost.macs or 0) * learned * a_bits), w_quant, a_quant, a_tensor,
            "metadata" if entry is not None else "graph", a_container, w_mean))
        prev = stored.get(site.stored_name)
        stored[site.stored_name] = (cost.params, max(learned, prev[1] if prev else 0), w_bytes)
    report = _totals(source, layers, stored, file_bytes, meta)
    report.tensors = tensors
    return report


def _meta_tensors(meta: dict[str, Any]) -> list[TensorReport]:
    """The ``tensors`` entry of onnxbits metadata (emit.py writes it), in its order."""
    return [TensorReport(name, str(e.get("role", "other")), int(e["bits"]),
                         int(e.get("container_bits", 8)), int(e["exec_bits"]),
                         bool(e.get("signed", False)))
            for name, e in meta.get("tensors", {}).items()]


def _graph_tensors(index: GraphIndex, layer_inputs: set[str]) -> list[TensorReport]:
    """Every ``Q -> [Clip] -> DQ`` on a non-constant tensor, read from the graph."""
    out = []
    for q in index.graph.node:
        if q.op_type != "QuantizeLinear" or index.constant(q.input[0]) is not None:
            continue
        users = index.consumers.get(q.output[0], [])
        if len(users) == 1 and users[0].op_type == "Clip":
            users = index.consumers.get(users[0].output[0], [])
        dq = next((n for n in users if n.op_type == "DequantizeLinear"), None)
        act = activation_quant(index, dq.output[0]) if dq is not None else None
        if act is not None:
            role = "input" if dq.output[0] in layer_inputs else "other"  # type: ignore[union-attr]
            out.append(TensorReport(q.input[0], role, act.bits, act.container_bits,
                                    act.exec_bits, act.signed))
    return out


def _totals(source: str, layers: list[LayerReport], stored: dict[str, tuple[int, float, int]],
            file_bytes: int, meta: dict[str, Any]) -> ModelReport:
    count = len(layers) or 1
    sum_w = sum(r.learned_weight_bits for r in layers)
    sum_a = sum(r.act_bits for r in layers)
    layer_params = sum(r.params for r in layers) or 1
    params = sum(p for p, _, _ in stored.values())
    stored_bytes = sum(b for _, _, b in stored.values())
    return ModelReport(
        source=source, layers=layers, avg_weight_bits=sum_w / count, avg_act_bits=sum_a / count,
        avg_bits=(sum_w + sum_a) / (2 * count),
        size_weighted_weight_bits=sum(r.params * r.learned_weight_bits for r in layers)
        / layer_params,
        total_params=params, total_bias_params=sum(r.bias_params for r in layers),
        total_macs=sum(r.macs or 0 for r in layers), total_bops=sum(r.bops for r in layers),
        float_weight_bytes=4 * params,
        quantized_weight_bytes=sum(p * w / 8 for p, w, _ in stored.values()),
        stored_weight_bytes=stored_bytes, model_file_bytes=file_bytes,
        compression=4 * params / stored_bytes if stored_bytes else 1.0, metadata=meta)
