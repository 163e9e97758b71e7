"""Tests for onnxbits.report.model: bits from metadata or Q/DQ, totals, formats, errors."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from onnxbits.emit.metadata import METADATA_KEY, read_metadata, write_metadata
from onnxbits.emit.prepare import prepare_ort
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.errors import InvalidModelError
from onnxbits.report.model import (
    ModelReport,
    TensorReport,
    analyze_model,
)
from onnxbits.report.plot import figure, plot, to_html
from onnxbits.train.loop import freeze_all
from tests import builders
from tests.conftest import calibrated_network

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def layer_entry(weight_bits: int, act_bits: int | None, act_tensor: str | None, act_signed: bool,
                weight_container_bits: int, act_exec_bits: int | None) -> dict[str, object]:
    """One ``layers`` entry of the onnxbits metadata, as :func:`onnxbits.emit.targets.emit`
    writes it."""
    return {"weight_bits": weight_bits, "act_bits": act_bits, "act_tensor": act_tensor,
            "act_signed": act_signed, "weight_container_bits": weight_container_bits,
            "act_exec_bits": act_exec_bits}


def set_meta(model: onnx.ModelProto, target: str, layers: dict[str, dict[str, object]],
             source: dict[str, object] | None = None) -> None:
    write_metadata(model, {"format": 1, "target": target, "layers": layers,
                           "source": source or {}})


def quantize_layer(model: onnx.ModelProto, layer: str = "conv1", bits: int = 4,
                   act_bits: int = 8, clip: bool = False, metadata: bool = True) -> onnx.ModelProto:
    """Return a copy of ``model`` with ``layer`` quantized by hand.

    The weight becomes an int8 initializer on the ``bits``-bit symmetric grid read through
    DequantizeLinear; the data input goes through int8 Q -> [Clip(act_bits range)] -> DQ.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    node = next(n for n in graph.node if n.name == layer)
    init = next(t for t in graph.initializer if t.name == node.input[1])
    w = numpy_helper.to_array(init)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(w).reshape(w.shape[0], -1).max(1) / qmax).astype(np.float32)
    q = np.clip(np.round(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -qmax, qmax).astype(np.int8)
    graph.initializer.remove(init)
    lo, hi = -(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1
    graph.initializer.extend([
        numpy_helper.from_array(q, f"{layer}.weight_q"),
        numpy_helper.from_array(scale, f"{layer}.weight_scale"),
        numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{layer}.weight_zp"),
        numpy_helper.from_array(np.float32(0.05), "x_scale"),
        numpy_helper.from_array(np.int8(0), "x_zp"),
        numpy_helper.from_array(np.int8(lo), "x_lo"),
        numpy_helper.from_array(np.int8(hi), "x_hi")])
    x = node.input[0]
    new = [helper.make_node("DequantizeLinear", [f"{layer}.weight_q", f"{layer}.weight_scale",
                                                 f"{layer}.weight_zp"], [f"{layer}.weight_dq"],
                            name=f"{layer}.weight_DequantizeLinear", axis=0),
           helper.make_node("QuantizeLinear", [x, "x_scale", "x_zp"], ["x_q"], name="x_Q")]
    if clip:
        new.append(helper.make_node("Clip", ["x_q", "x_lo", "x_hi"], ["x_qc"], name="x_Clip"))
    new.append(helper.make_node("DequantizeLinear", ["x_qc" if clip else "x_q", "x_scale", "x_zp"],
                                ["x_dq"], name="x_DQ"))
    node.input[0], node.input[1] = "x_dq", f"{layer}.weight_dq"
    nodes = list(graph.node)
    position = nodes.index(node)
    del graph.node[:]
    graph.node.extend(nodes[:position] + new + nodes[position:])
    if metadata:
        exec_bits = act_bits if clip else 8
        set_meta(out, "ort", {layer: layer_entry(bits, act_bits, x, True, 8, exec_bits)},
                       {"tool": "tests"})
    onnx.checker.check_model(out, full_check=True)
    return out


def _run(model: onnx.ModelProto) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    return sess.run(None, {"input": x})[0]


def test_float_model_is_32_bits_everywhere() -> None:
    report = analyze_model(builders.conv_relu_gemm())
    assert [r.name for r in report.layers] == ["conv1", "dwconv", "fc"]
    assert all(r.weight_bits == 32 and r.act_bits == 32 for r in report.layers)
    assert not any(r.weight_quantized or r.act_quantized for r in report.layers)
    assert (report.avg_weight_bits, report.avg_act_bits, report.avg_bits) == (32, 32, 32)
    assert report.total_params == 216 + 72 + 80
    assert report.total_bias_params == 8 + 8 + 10
    assert report.total_macs == 13824 + 4608 + 80
    assert report.total_bops == (13824 + 4608 + 80) * 32 * 32
    assert report.float_weight_bytes == report.stored_weight_bytes == 4 * 368
    assert report.compression == 1.0 and report.metadata == {}
    assert report.model_file_bytes == builders.conv_relu_gemm().ByteSize()


@pytest.mark.parametrize("clip", [False, True], ids=["qdq", "qcdq"])
def test_onnxbits_metadata_model(clip: bool) -> None:
    model = quantize_layer(builders.conv_relu_gemm(), bits=4, act_bits=5, clip=clip)
    _run(model)  # ONNX Runtime accepts the hand-made graph
    report = analyze_model(model)
    conv = report.layers[0]
    assert (conv.name, conv.weight_bits, conv.act_bits) == ("conv1", 4, 5)
    assert (conv.weight_container_bits, conv.act_exec_bits) == (8, 5 if clip else 8)
    assert conv.bits_from == "metadata" and conv.act_tensor == "input"
    assert conv.weight_bytes == 216 and conv.bops == 13824 * 4 * 5
    assert report.metadata["target"] == "ort" and report.metadata["format"] == 1
    assert report.avg_weight_bits == pytest.approx((4 + 32 + 32) / 3)
    assert report.avg_act_bits == pytest.approx((5 + 32 + 32) / 3)
    assert report.avg_bits == pytest.approx((4 + 32 + 32 + 5 + 32 + 32) / 6)
    assert report.size_weighted_weight_bits == pytest.approx((216 * 4 + 152 * 32) / 368)
    assert report.quantized_weight_bytes == pytest.approx(216 * 4 / 8 + 152 * 4)
    assert report.stored_weight_bytes == 216 + 152 * 4
    assert report.compression == pytest.approx(368 * 4 / (216 + 152 * 4))


@pytest.mark.parametrize("clip, act_bits, exec_bits", [(False, 8, 8), (True, 3, 3)],
                         ids=["qdq", "qcdq"])
def test_bits_inferred_without_metadata(clip: bool, act_bits: int, exec_bits: int) -> None:
    model = quantize_layer(builders.conv_relu_gemm(), bits=3, act_bits=3, clip=clip,
                           metadata=False)
    conv = analyze_model(model).layers[0]
    assert (conv.weight_bits, conv.weight_container_bits) == (3, 8)  # 3-bit grid in int8 reads 3
    assert (conv.act_bits, conv.act_exec_bits) == (act_bits, exec_bits)
    assert conv.bits_from == "graph" and conv.weight_quantized and conv.act_quantized


@pytest.mark.parametrize("clip, exec_bits", [(False, 8), (True, 3)], ids=["qdq", "qcdq"])
def test_activation_tensors_learned_stored_executed(clip: bool, exec_bits: int) -> None:
    """Without a ``tensors`` entry in the metadata, each Q -> [Clip] -> DQ comes from the graph."""
    model = quantize_layer(builders.conv_relu_gemm(), bits=3, act_bits=3, clip=clip,
                           metadata=False)
    report = analyze_model(model)
    assert report.tensors == [TensorReport("input", "input", exec_bits, 8, exec_bits, True)]
    conv, rest = report.layers[0], report.layers[1:]
    assert (conv.act_bits, conv.act_container_bits, conv.act_exec_bits) == (exec_bits, 8, exec_bits)
    assert all(r.act_container_bits == 32 for r in rest)  # float inputs
    line = (f"activations (input): 1 learned at {exec_bits} bits, stored in 8, "
            f"executed at {exec_bits}")
    assert line in report.summary_lines()
    assert "| A stored |" in report.to_markdown().splitlines()[0]


def test_metadata_tensors_are_authoritative() -> None:
    model = quantize_layer(builders.conv_relu_gemm(), bits=3, act_bits=3, clip=True)
    meta = read_metadata(model)
    meta["tensors"] = {"input": {"role": "input", "bits": 3, "exec_bits": 8, "signed": True,
                                 "container_bits": 8},
                       "relu2_out": {"role": "output", "bits": 8, "exec_bits": 8,
                                     "signed": False, "container_bits": 8}}
    next(p for p in model.metadata_props if p.key == METADATA_KEY).value = json.dumps(meta)
    report = analyze_model(model)
    assert [(t.tensor, t.role, t.bits, t.exec_bits) for t in report.tensors] == \
        [("input", "input", 3, 8), ("relu2_out", "output", 8, 8)]
    assert ModelReport.from_dict(json.loads(report.to_json())) == report


def test_metadata_is_authoritative() -> None:
    model = quantize_layer(builders.conv_relu_gemm(), bits=4, metadata=False)
    set_meta(model, "exact-sim", {
        "conv1": layer_entry(5, None, None, False, 8, None),  # weight-only, 5 learned bits
        "fc": layer_entry(6, 7, "flatten_out", False, 32, 32),  # fake-quant in float
        "ghost": layer_entry(2, 2, None, False, 8, 8)})         # not in the graph: ignored
    layers = {r.name: r for r in analyze_model(model).layers}
    assert (layers["conv1"].weight_bits, layers["conv1"].act_bits) == (5, 32)
    assert not layers["conv1"].act_quantized and layers["conv1"].act_tensor is None
    assert (layers["fc"].weight_bits, layers["fc"].act_bits, layers["fc"].weight_bytes) == \
        (6, 7, 80 * 4)
    assert layers["dwconv"].bits_from == "graph" and layers["dwconv"].weight_bits == 32


def test_metadata_roundtrip_and_replace() -> None:
    model = builders.conv_relu_gemm()
    assert read_metadata(model) == {}
    set_meta(model, "pack", {"conv1": layer_entry(4, 4, "input", True, 4, 8)})
    set_meta(model, "ort", {})
    assert [p.key for p in model.metadata_props] == [METADATA_KEY]
    assert read_metadata(model) == {"format": 1, "target": "ort", "layers": {}, "source": {}}


def test_bad_metadata_is_an_invalid_model() -> None:
    model = builders.conv_relu_gemm()
    model.metadata_props.add(key=METADATA_KEY, value="{not json")
    with pytest.raises(InvalidModelError, match="metadata 'onnxbits' is not valid JSON"):
        analyze_model(model)


@pytest.mark.parametrize("weight_type, opset, bits, stored", [
    ("QInt8", 13, 8, 368), ("QInt4", 21, 4, 108 + 36 + 40)], ids=["w8a8", "w4a8-int4"])
def test_ort_quantize_static(tmp_path: Path, weight_type: str, opset: int, bits: int,
                             stored: int) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
                                 for _ in range(4)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    model = builders.conv_relu_gemm()
    if opset != builders.OPSET:
        model = onnx.version_converter.convert_version(model, opset)
    src = builders.save(model, str(tmp_path / "float.onnx"))
    dst = tmp_path / "quantized.onnx"
    quantize_static(src, str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=getattr(QuantType, weight_type))
    report = analyze_model(dst)
    assert [r.name for r in report.layers] == ["conv1", "dwconv", "fc"]
    for row in report.layers:
        assert (row.weight_bits, row.act_bits) == (bits, 8), row
        assert (row.weight_container_bits, row.act_exec_bits) == (bits, 8)
        assert row.weight_quantized and row.act_quantized and row.bits_from == "graph"
    assert (report.avg_weight_bits, report.avg_act_bits) == (bits, 8)
    assert report.total_macs == 13824 + 4608 + 80 and report.total_params == 368
    assert report.stored_weight_bytes == stored  # int4: 216/2 + 72/2 + 80/2 bytes
    assert report.compression == pytest.approx(4 * 368 / stored)
    assert report.model_file_bytes == dst.stat().st_size


def test_shared_weight_counts_once_in_totals() -> None:
    report = analyze_model(builders.shared_weight())
    assert [r.params for r in report.layers] == [216, 576, 576, 80]
    assert report.total_params == 216 + 576 + 80
    assert report.total_macs == 13824 + 2 * 36864 + 80


@pytest.fixture()
def mixed_report() -> ModelReport:
    return analyze_model(quantize_layer(builders.residual_block(), "block_conv1", clip=True))


def test_to_json(mixed_report: ModelReport) -> None:
    data = json.loads(mixed_report.to_json())
    assert {"layers", "avg_weight_bits", "avg_act_bits", "avg_bits", "total_macs"} <= set(data)
    assert {"name", "op", "weight_bits", "act_bits", "params", "macs"} <= set(data["layers"][0])
    assert data["layers"][1]["weight_bits"] == 4 and data["metadata"]["target"] == "ort"


def test_from_dict_round_trip(mixed_report: ModelReport) -> None:
    data = json.loads(mixed_report.to_json())
    assert ModelReport.from_dict(data) == mixed_report
    data.update(accuracy={"float": {"top1": 90.0}}, output="m.bits.onnx")  # a shrink report
    assert ModelReport.from_dict(data) == mixed_report
    with pytest.raises(InvalidModelError, match="not an onnxbits report"):
        ModelReport.from_dict({"layers": [{"name": "conv1"}]})


def test_to_markdown(mixed_report: ModelReport) -> None:
    lines = mixed_report.to_markdown().splitlines()
    assert lines[0].startswith("| # | layer | op |") and set(lines[1]) <= {"|", "-"}
    rows = [line for line in lines[2:] if line.startswith("|")]
    assert len(rows) == len(mixed_report.layers) == 4
    assert "block_conv1" in rows[1] and "| 4 |" in rows[1]
    assert any(line.startswith("- avg weight bits") for line in lines)


def test_to_rich_table(mixed_report: ModelReport) -> None:
    from rich.console import Console

    table = mixed_report.to_rich_table()
    assert table.row_count == 4
    console = Console(width=200, file=io.StringIO())
    console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "block_conv1" in text and "avg weight bits" in text


def test_plot_writes_png(mixed_report: ModelReport, tmp_path: Path) -> None:
    data = plot(mixed_report, tmp_path / "bits.png")
    assert data.startswith(PNG_MAGIC) and (tmp_path / "bits.png").read_bytes() == data


def test_plot_draws_float_tensors_just_above_the_learned_bits(mixed_report: ModelReport) -> None:
    assert not all(r.weight_quantized and r.act_quantized for r in mixed_report.layers)
    bits_axes = figure(mixed_report).axes[0]
    learned = max([r.weight_bits for r in mixed_report.layers if r.weight_quantized] + [8])
    assert bits_axes.get_ylim()[1] == pytest.approx((learned + 1) * 1.08)
    labels = [t.get_text() for t in bits_axes.get_yticklabels()]
    assert labels[-1] == "float" and "32" not in labels


def test_plot_draws_per_channel_weight_bits_at_their_mean_with_a_tick_at_the_max(
        mixed_report: ModelReport) -> None:
    first = next(i for i, r in enumerate(mixed_report.layers) if r.weight_quantized)
    layer = mixed_report.layers[first]
    mixed_report.layers[first] = dataclasses.replace(
        layer, weight_bits_mean=layer.weight_bits - 1.5)
    bits_axes = figure(mixed_report).axes[0]
    weight_bars = bits_axes.containers[0]
    assert weight_bars[first].get_height() == pytest.approx(layer.weight_bits - 1.5)
    ticks = [c for c in bits_axes.collections if c.get_label() == "weight max (per channel)"]
    assert len(ticks) == 1 and ticks[0].get_offsets()[0][1] == layer.weight_bits


def test_plot_many_layers_widens() -> None:
    report = analyze_model(builders.conv_relu_gemm())
    report.layers = report.layers * 25  # 75 layers
    data = plot(report)
    width = struct.unpack(">I", data[16:20])[0]
    assert width >= 75 * 25  # pixels: the figure grows with the layer count


def test_to_html(mixed_report: ModelReport, tmp_path: Path) -> None:
    page = to_html(mixed_report, None)
    assert '<img alt=\'bits per layer\' src="data:image/png;base64,' in page
    assert page.count("<tr>") == 1 + 4 and "block_conv1" in page
    png = tmp_path / "p.png"
    plot(mixed_report, png)
    assert 'src="data:image/png;base64,' in to_html(mixed_report, png)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match=r"nope\.onnx: no such file"):
        analyze_model(tmp_path / "nope.onnx")


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not protobuf \xff\xfe")
    with pytest.raises(InvalidModelError, match=r"bad\.onnx: "):
        analyze_model(bad)


def test_not_a_model() -> None:
    with pytest.raises(InvalidModelError, match="expected an ONNX ModelProto or a path"):
        analyze_model(42)  # type: ignore[arg-type]


@pytest.mark.slow
def test_real_mobilenet_v2() -> None:
    path = Path(__file__).resolve().parents[2] / "shared/models/mobilenet_v2_1.0_224_dq.onnx"
    report = analyze_model(path)
    assert len(report.layers) == 53 and report.avg_bits == 32
    assert 3.4e6 < report.total_params < 3.5e6 and 2.9e8 < report.total_macs < 3.1e8


@pytest.mark.parametrize("target", ["ort", "exact-sim"])
def test_per_channel_bitlengths_emit_verify_and_report_their_mean(target: str) -> None:
    s = calibrated_network(builders.conv_relu_gemm(), per_channel_bits=True,
                           prepare=prepare_ort if target == "ort" else None)
    with torch.no_grad():
        for layer in s.net.layers.values():
            bits = layer.wq.bits
            bits.copy_(3.0 + torch.arange(bits.numel()) % 4)   # 3, 4, 5, 6, 3, ...
    freeze_all(s.net)
    emitted = emit(s.model, s.net, target)
    assert verify(emitted, s.net, [s.x[:16]], target).max_steps <= 1
    report = analyze_model(emitted)
    means = {node: float(layer.wq.frozen_bits.float().mean())
             for node, layer in s.net.layers.items()}
    rows = {r.name: r for r in report.layers}
    for node, mean in means.items():
        assert rows[node].learned_weight_bits == pytest.approx(mean)
        assert rows[node].weight_bits == int(s.net.layers[node].wq.frozen_bits.max())
    assert report.avg_weight_bits == pytest.approx(sum(means.values()) / len(means))
    expected_bytes = sum(rows[n].params * m / 8 for n, m in means.items())
    assert report.quantized_weight_bytes == pytest.approx(expected_bytes)
    assert any("(max 6)" in row[6] for row in report.rows())
    assert ModelReport.from_dict(json.loads(report.to_json())) == report
