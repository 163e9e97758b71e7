"""Tests for ``onnxbits eval`` and the shared preprocessing options, through CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner
from onnxbits.cli.eval import eval_command, evenly_spaced
from onnxbits.cli.options import preprocess_from_options, preprocess_options
from PIL import Image

from onnxbits.data.decode import decode_images
from onnxbits.data.files import load_image_set
from onnxbits.data.preprocess import PRESETS
from onnxbits.report.evaluate import evaluate_model
from tests.builders import conv_relu_gemm, image_folder

SHARED = Path(__file__).resolve().parents[1].parent / "shared"




@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(conv_relu_gemm(), path)
    return path


def run(*args: object) -> click.testing.Result:
    return CliRunner().invoke(eval_command, [str(a) for a in args])


def test_json_output_matches_library(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=10, per_class=3)
    result = run(model_path, "--data", data, "--preset", "cifar10", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    tensors, _ = decode_images(load_image_set(data), PRESETS["cifar10"])
    expected = evaluate_model(model_path, tensors)
    assert record["top1"] == pytest.approx(expected.top1)
    assert record["top5"] == pytest.approx(expected.top5)
    assert record["n"] == 30 and record["model"] == str(model_path)
    assert record["data"] == str(data) and record["skipped"] == 0


def test_human_output(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=10, per_class=3)
    result = run(model_path, "--data", data, "--mean", "0.5", "--std", "0.25,0.25,0.25",
                 "--scale", 0.00392156862745098, "--batch-size", 4, "--threads", 1, "--quiet")
    assert result.exit_code == 0, result.output
    assert "top-1" in result.stdout and "top-5" in result.stdout and "30 images" in result.stdout


def test_train_val_uses_val(tmp_path: Path, model_path: Path) -> None:
    image_folder(tmp_path / "data" / "train", classes=10, per_class=2)
    image_folder(tmp_path / "data" / "val", classes=10, per_class=1)
    result = run(model_path, "--data", tmp_path / "data", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n"] == 10 and record["data"] == str(tmp_path / "data" / "val")


def test_limit(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=10, per_class=3)
    record = json.loads(run(model_path, "--data", data, "--limit", 5, "--json").stdout)
    assert record["n"] == 5
    assert evenly_spaced(10, 4).tolist() == [0, 2, 5, 7]
    assert evenly_spaced(3, 5).tolist() == [0, 1, 2]


def test_flat_folder_needs_labels(tmp_path: Path, model_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    result = run(model_path, "--data", tmp_path / "flat")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: eval needs labels")
    assert result.stderr.count("\n") == 1


def test_shape_mismatch_one_line(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=2, per_class=3)
    result = run(model_path, "--data", data, "--resize", 16, "--crop", 16)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1
    assert "model input 'input' expects shape [N, 3, 8, 8]" in result.stderr


def test_label_out_of_range(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=10, per_class=1)
    result = run(model_path, "--data", data, "--label-offset", 1)
    assert result.exit_code == 1
    assert "label 10 out of range for 10 model outputs" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--mean", "a,b,c"], "'a,b,c' is not a comma-separated list of numbers"),
    (["--preset", "imagenet"], "--preset"),
    (["--resize", "0"], "--resize"),
], ids=["mean", "preset", "resize"])
def test_bad_options_exit_2(tmp_path: Path, model_path: Path, args: list[str],
                            message: str) -> None:
    data = image_folder(tmp_path / "data", classes=1, per_class=1)
    result = run(model_path, "--data", data, *args)
    assert result.exit_code == 2
    assert message in result.stderr


def test_config_error_exit_2(tmp_path: Path, model_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=1, per_class=1)
    result = run(model_path, "--data", data, "--std", "1,0,1")
    assert result.exit_code == 2
    assert result.stderr == "Error: --std must not contain 0, got 1.0,0.0,1.0\n"


def test_missing_paths_exit_2(tmp_path: Path, model_path: Path) -> None:
    assert run(tmp_path / "nope.onnx", "--data", tmp_path).exit_code == 2
    assert run(model_path, "--data", tmp_path / "nope").exit_code == 2
    assert run(model_path).exit_code == 2


def test_invalid_model_exit_1(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", classes=1, per_class=1)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    result = run(junk, "--data", data)
    assert result.exit_code == 1 and "cannot load" in result.stderr


def test_help_text_everywhere() -> None:
    result = CliRunner().invoke(eval_command, ["--help"])
    assert result.exit_code == 0 and "top-1/top-5" in result.output
    for param in eval_command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.name} has no help text"


def test_group_registers_eval() -> None:
    main = pytest.importorskip("onnxbits.cli.main", exc_type=ImportError).main
    result = CliRunner().invoke(main, ["eval", "--help"])
    assert result.exit_code == 0 and "--preset" in result.output


def test_preprocess_options_reusable() -> None:
    @click.command()
    @preprocess_options(data_required=False)
    def cmd(data: Path | None, classes: Path | None, **options: object) -> None:
        click.echo(repr(preprocess_from_options(**options)))

    result = CliRunner().invoke(cmd, ["--preset", "tf-mobilenet", "--crop", "160"])
    assert result.exit_code == 0, result.output
    assert "crop=160" in result.output and "label_offset=1" in result.output
    pre = preprocess_from_options(preset="digits", mean="0.5", data=None, other=3)
    assert pre.mean == (0.5,) and pre.grayscale


@pytest.mark.slow
def test_resnet20_cifar10_real() -> None:
    model = SHARED / "models" / "resnet20_cifar10.onnx"
    data = SHARED / "data" / "cifar10" / "test"
    if not model.is_file() or not data.is_dir():
        pytest.skip(f"{SHARED} not available")
    result = run(model, "--data", data, "--preset", "cifar10", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n"] == 10000
    assert abs(record["top1"] - 81.03) <= 0.1
