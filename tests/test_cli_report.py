"""Tests for ``onnxbits report`` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from onnxbits.cli.report import report_command

from tests import builders
from tests.test_report import quantize_layer


@pytest.fixture()
def model_path(tmp_path: Path) -> str:
    model = quantize_layer(builders.conv_relu_gemm(), bits=4, act_bits=4, clip=True)
    return builders.save(model, str(tmp_path / "model.bits.onnx"))


def _invoke(*args: str) -> object:
    return CliRunner().invoke(report_command, list(args))


def test_default_prints_table_and_totals(model_path: str) -> None:
    result = _invoke(model_path)
    assert result.exit_code == 0, result.output
    for text in ("conv1", "dwconv", "fc", "W bits", "avg weight bits", "MACs"):
        assert text in result.output


def test_json_is_one_object_on_stdout(model_path: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(report_command, [model_path, "--json", "--plot",
                                                 str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [layer["name"] for layer in data["layers"]] == ["conv1", "dwconv", "fc"]
    assert data["layers"][0]["weight_bits"] == 4 and data["layers"][0]["act_bits"] == 4
    assert data["avg_weight_bits"] == pytest.approx((4 + 32 + 32) / 3)
    assert "wrote plot" in result.stderr and (tmp_path / "p.png").stat().st_size > 0


def test_markdown(model_path: str) -> None:
    result = _invoke(model_path, "--markdown")
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3  # header + one per layer


def test_plot_and_html_files(model_path: str, tmp_path: Path) -> None:
    png, page = tmp_path / "bits.png", tmp_path / "report.html"
    result = _invoke(model_path, "--plot", str(png), "--html", str(page))
    assert result.exit_code == 0, result.output
    assert png.read_bytes().startswith(b"\x89PNG")
    assert 'src="data:image/png;base64,' in page.read_text()


def test_html_without_plot(model_path: str, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    assert _invoke(model_path, "--html", str(page)).exit_code == 0
    assert "data:image/png;base64," in page.read_text()


def test_missing_model_exits_1(tmp_path: Path) -> None:
    result = _invoke(str(tmp_path / "nope.onnx"))
    assert result.exit_code == 1
    assert "nope.onnx: no such file" in result.output and len(result.output.splitlines()) == 1


def test_corrupt_model_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    result = _invoke(str(bad))
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert "bad.onnx" in result.output


def test_json_and_markdown_conflict(model_path: str) -> None:
    result = _invoke(model_path, "--json", "--markdown")
    assert result.exit_code == 2 and "--json cannot be used with --markdown" in result.output


def test_every_option_has_help() -> None:
    assert report_command.help
    for param in report_command.params:
        if param.param_type_name == "option":
            assert param.help, param.name  # type: ignore[attr-defined]
    result = _invoke("--help")
    assert result.exit_code == 0 and "--plot FILE.png" in result.output


def test_weights_built_by_constantofshape_are_layers(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    model = builders.conv_relu_gemm(classes=3)
    conv = next(n for n in model.graph.node if n.name == "conv1")
    weight = next(t for t in model.graph.initializer if t.name == conv.input[1])
    dims = list(weight.dims)
    model.graph.initializer.remove(weight)           # the weight becomes ConstantOfShape(dims)
    model.graph.initializer.append(numpy_helper.from_array(
        np.array(dims, dtype=np.int64), "w_shape"))
    model.graph.node.insert(0, helper.make_node(
        "ConstantOfShape", ["w_shape"], [conv.input[1]], name="make_w",
        value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.05])))
    onnx.checker.check_model(model)
    path = tmp_path / "cos.onnx"
    onnx.save(model, path)
    result = CliRunner().invoke(report_command, [str(path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [layer["name"] for layer in report["layers"]][:1] == ["conv1"]
    assert len(report["layers"]) == 3 and report["total_params"] > 0


def test_library_warnings_print_as_one_warning_line(model_path: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx.shape_inference
    from onnxbits.cli.main import main

    def failing(*args: object, **kwargs: object) -> object:
        raise onnx.shape_inference.InferenceError("[ShapeInferenceError] rank 1 vs 0")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", failing)
    result = CliRunner().invoke(main, ["report", model_path])
    assert result.exit_code == 0, result.output
    assert ("Warning: ONNX shape inference failed ([ShapeInferenceError] rank 1 vs 0): shapes, "
            "MACs and BOPs are known only for the layers whose inputs are declared\n"
            in result.stderr)


def test_a_library_bug_is_one_line_that_asks_for_a_report(model_path: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxbits.cli.report
    from onnxbits.cli.main import main

    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("layers")

    monkeypatch.setattr(onnxbits.cli.report, "analyze_model", broken)
    result = CliRunner().invoke(main, ["report", model_path])
    assert result.exit_code == 1
    assert result.stderr == ("Error: internal error: KeyError: 'layers' (a bug in onnxbits, not "
                             "in your input: rerun with --debug and report the traceback)\n")
