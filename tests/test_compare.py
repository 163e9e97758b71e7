"""Tests for onnxbits.report.compare and ``onnxbits compare``: matching, totals, accuracy, formats."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnxbits.cli.compare import compare_command
from PIL import Image

from onnxbits.data.decode import decode_images
from onnxbits.data.files import load_image_set
from onnxbits.data.preprocess import PRESETS
from onnxbits.report.compare import Comparison, LayerPair, compare_models, match_layers
from onnxbits.report.evaluate import evaluate_model
from onnxbits.report.model import analyze_model
from tests import builders
from tests.builders import image_folder
from tests.test_report import quantize_layer


def ort_int8(src: str, dst: Path) -> Path:
    """ONNX Runtime ``quantize_static`` (QDQ, per-channel int8) of ``src``."""
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

    quantize_static(src, str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``float``, ``bits`` (conv1 at 4-bit weights, 5-bit activations) and ``int8`` (ORT)."""
    root = tmp_path_factory.mktemp("models")
    float_path = builders.save(builders.conv_relu_gemm(), str(root / "float.onnx"))
    bits = quantize_layer(builders.conv_relu_gemm(), bits=4, act_bits=5, clip=True)
    return {"float": Path(float_path), "int8": ort_int8(float_path, root / "int8.onnx"),
            "bits": Path(builders.save(bits, str(root / "model.bits.onnx")))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("data") / "images", classes=10, per_class=3)


def renamed(model: onnx.ModelProto, prefix: str) -> onnx.ModelProto:
    """A copy whose node names all differ from the original's (the edges stay the same)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):
        node.name = f"{prefix}{i}"
    return out


def test_bits_vs_int8_matched_by_name(models: dict[str, Path]) -> None:
    result = compare_models(models["bits"], models["int8"])
    assert [(p.name, p.matched_by) for p in result.pairs] == [
        ("conv1", "name"), ("dwconv", "name"), ("fc", "name")]
    conv = result.pairs[0].to_dict()
    assert (conv["weight_bits_a"], conv["act_bits_a"], conv["weight_bits_b"],
            conv["act_bits_b"]) == (4, 5, 8, 8)
    assert conv["params"] == 216 and conv["macs"] == 13824 and conv["bops_b"] == 13824 * 64
    assert result.pairs[1].to_dict()["weight_quantized_a"] is False
    assert result.accuracy_a is None and result.agreement is None
    assert result.b.avg_weight_bits == 8 and result.b.stored_weight_bytes == 368


def test_match_by_order_when_names_differ(models: dict[str, Path]) -> None:
    result = compare_models(models["float"], renamed(onnx.load(models["int8"]), "n"))
    assert [p.matched_by for p in result.pairs] == ["order"] * 3
    pairs = [(p.a, p.b) for p in result.pairs if p.a and p.b]
    assert [a.name for a, _ in pairs] == ["conv1", "dwconv", "fc"]
    assert all(b.name.startswith("n") and a.op == b.op and a.params == b.params
               for a, b in pairs)
    assert "3 matched by order" in result.to_markdown()
    assert "conv1 / n" in result.layer_rows()[0][1]


def test_unmatched_layers_are_listed_per_side() -> None:
    result = compare_models(builders.conv_relu_gemm(), builders.residual_block())
    kinds = [(p.name, p.matched_by) for p in result.pairs]
    assert kinds == [("conv1", "a_only"), ("dwconv", "a_only"), ("fc", "name"),
                     ("stem", "b_only"), ("block_conv1", "b_only"), ("block_conv2", "b_only")]
    assert result.matching() == {"name": 1, "order": 0, "a_only": 2, "b_only": 3}
    rows = result.layer_rows()
    assert rows[0][6] == "-" and rows[3][5] == "-"  # B's bits of an A-only row and vice versa


def test_match_layers_and_pair_validation() -> None:
    layers = analyze_model(builders.conv_relu_gemm()).layers
    assert [p.matched_by for p in match_layers(layers, layers)] == ["name"] * 3
    with pytest.raises(ValueError, match="needs a layer of A, of B or of both"):
        LayerPair(None, None, "name")
    with pytest.raises(ValueError, match="matched_by must be one of"):
        LayerPair(layers[0], None, "guess")


@pytest.fixture(scope="module")
def with_data(models: dict[str, Path], data_dir: Path) -> Comparison:
    tensors, _ = decode_images(load_image_set(data_dir), PRESETS["cifar10"])
    return compare_models(models["bits"], models["int8"], tensors)


def test_accuracy_of_both_models(with_data: Comparison, models: dict[str, Path],
                                 data_dir: Path) -> None:
    tensors, _ = decode_images(load_image_set(data_dir), PRESETS["cifar10"])
    assert with_data.accuracy_a == evaluate_model(models["bits"], tensors)
    assert with_data.accuracy_b == evaluate_model(models["int8"], tensors)
    assert with_data.images == 30 and 0 <= with_data.agreement <= 100  # type: ignore[operator]
    labels = [row[0] for row in with_data.total_rows()]
    assert labels[-2:] == ["top-1 %", "top-5 %"]


def test_progress_counts_both_models(models: dict[str, Path], data_dir: Path) -> None:
    tensors, _ = decode_images(load_image_set(data_dir), PRESETS["cifar10"])
    seen: list[int] = []
    compare_models(models["float"], models["int8"], tensors, batch_size=7, progress=seen.append)
    assert sum(seen) == 2 * 30


def test_images_without_labels_give_agreement_only(models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    tensors, _ = decode_images(load_image_set(flat), PRESETS["cifar10"])
    result = compare_models(models["float"], models["float"], tensors)
    assert result.accuracy_a is None and result.agreement == 100.0 and result.images == 6
    assert "(no labels: no top-1/top-5)" in result.to_markdown()
    assert result.labels == (str(models["float"]), str(models["float"]))  # same name: full path


def test_to_dict_is_json(with_data: Comparison) -> None:
    data = json.loads(with_data.to_json())
    assert data["a"]["label"] == "model.bits.onnx" and data["b"]["label"] == "int8.onnx"
    assert data["a"]["accuracy"]["n"] == 30 and data["a"]["target"] == "ort"
    assert data["b"]["avg_weight_bits"] == 8 and data["b"]["target"] is None
    assert data["matching"]["name"] == 3 and len(data["layers"]) == 3
    assert {"total_bops", "stored_weight_bytes", "model_file_bytes", "compression"} <= set(
        data["a"])


def test_to_markdown(with_data: Comparison) -> None:
    lines = with_data.to_markdown().splitlines()
    assert lines[0].startswith("| # | layer | op | params | MACs | W bits A | W bits B |")
    assert lines[2] == "| 0 | conv1 | Conv | 216 | 13.82k | 4 | 8 | 5 | 8 | 216 | 216 |"
    assert "| 1 | dwconv | Conv | 72 | 4.61k | float | 8 | float | 8 | 288 | 72 |" in lines
    assert any(line.startswith("| avg weight bits | 22.67 | 8.00 | -14.67 |") for line in lines)
    assert any(line.startswith("| BOPs |") and line.endswith("| 0.23x |") for line in lines)
    assert any("predict the same class" in line for line in lines)


def test_rich_tables(with_data: Comparison) -> None:
    from rich.console import Console

    console = Console(width=200, file=io.StringIO())
    console.print(with_data.to_rich_table())
    console.print(with_data.to_rich_totals())
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert with_data.to_rich_table().row_count == 3
    for expected in ("conv1", "W bits B", "top-1 %", "A (model.bits.onnx)", "B = "):
        assert expected in text


def run(*args: object) -> click.testing.Result:
    return CliRunner().invoke(compare_command, [str(a) for a in args])


def test_cli_table(models: dict[str, Path]) -> None:
    result = run(models["bits"], models["int8"])
    assert result.exit_code == 0, result.output
    for expected in ("conv1", "dwconv", "W bits A", "avg weight bits", "BOPs", "weights stored"):
        assert expected in result.output
    assert "top-1" not in result.output


def test_cli_json_with_data(models: dict[str, Path], data_dir: Path) -> None:
    result = run(models["bits"], models["int8"], "--data", data_dir, "--preset", "cifar10",
                 "--json", "--limit", "20")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["a"]["accuracy"]["n"] == data["b"]["accuracy"]["n"] == 20
    assert data["data"] == str(data_dir) and data["skipped"] == 0
    assert data["preprocess"]["mean"] == list(PRESETS["cifar10"].mean)


def test_cli_markdown_with_data(models: dict[str, Path], data_dir: Path) -> None:
    result = run(models["bits"], models["int8"], "--data", data_dir, "--preset", "cifar10",
                 "--markdown")
    assert result.exit_code == 0, result.output
    assert "| top-1 % |" in result.output and result.output.startswith("| # | layer |")


@pytest.mark.parametrize("args, message", [
    (["--json", "--markdown"], "--json cannot be used with --markdown"),
    (["--preset", "cifar10"], "--preset needs --data DIR"),
    (["--limit", "3"], "--limit needs --data DIR"),
], ids=["json-markdown", "preset-without-data", "limit-without-data"])
def test_cli_usage_errors(models: dict[str, Path], args: list[str], message: str) -> None:
    result = run(models["bits"], models["int8"], *args)
    assert result.exit_code == 2 and message in result.output


def test_cli_missing_model(models: dict[str, Path], tmp_path: Path) -> None:
    result = run(models["bits"], tmp_path / "nope.onnx")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_bad_data_is_one_line_error(models: dict[str, Path], tmp_path: Path) -> None:
    data = image_folder(tmp_path / "big", per_class=1, classes=2, side=16)
    result = run(models["bits"], models["int8"], "--data", data)  # 16x16 images, 8x8 model
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "expects shape" in result.output


def test_every_option_has_help() -> None:
    assert compare_command.help and "Compare" in compare_command.help
    for param in compare_command.params:
        if isinstance(param, click.Option):
            assert param.help, param.name
