"""The bad-input catalog: the cases tests/test_cli_shrink.py does not already cover.

Every case runs ``onnxbits shrink`` through CliRunner and checks the exit code (2 for usage, 1 for
runtime errors), one ``Error:`` line on stderr that names the problem and the fix, no traceback
(unless ``--debug``) and no file left behind.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import numpy_helper
from onnxbits.cli.main import main

from tests.builders import _Builder, conv_relu_gemm, image_folder, matmul_mlp
from tests.test_cli_shrink import assert_clean_failure, error_line, files_under, shrink
from tests.test_model_coverage import gru_model

FAST = ("--steps", "4", "--batch-size", "8", "--threads", "1", "-q")
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0






@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class model and a matching image folder (read-only for the tests)."""
    root = tmp_path_factory.mktemp("bad")
    onnx.save(conv_relu_gemm(classes=3), root / "model.onnx")
    image_folder(root / "data", per_class=4)
    return root


def run_fails(ws: Path, tmp_path: Path, code: int, pattern: str, *args: object) -> None:
    """Run shrink in ``tmp_path`` (output there) and check a clean failure."""
    before, shared = files_under(tmp_path), files_under(ws)
    output = () if "-o" in map(str, args) else ("-o", tmp_path / "out.onnx")
    result = shrink(args[0], *FAST, *args[1:], *output)      # the case's options win over FAST
    assert_clean_failure(result, code, pattern, before, tmp_path)
    assert files_under(ws) == shared


# --- the model file ---------------------------------------------------------------------------


def test_model_path_is_a_folder(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 2, r"Invalid value for 'MODEL': File .*data' is a directory",
              ws / "data", "--data", ws / "data")


def test_empty_model_file(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    run_fails(ws, tmp_path, 1, r"empty\.onnx: the ONNX graph has no nodes; is it truncated",
              tmp_path / "empty.onnx", "--data", ws / "data")


def test_model_that_fails_the_onnx_checker(ws: Path, tmp_path: Path) -> None:
    model = conv_relu_gemm(classes=3)
    model.graph.node[1].input[0] = "nowhere"
    onnx.save(model, tmp_path / "broken.onnx")
    run_fails(ws, tmp_path, 1, r"broken\.onnx: fails the ONNX checker: .*topologically sorted",
              tmp_path / "broken.onnx", "--data", ws / "data")


def test_external_data_file_missing(ws: Path, tmp_path: Path) -> None:
    onnx.save(conv_relu_gemm(classes=3), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    (tmp_path / "ext.weights").unlink()
    run_fails(ws, tmp_path, 1, r"ext\.onnx: external data file 'ext\.weights' .* is missing; "
                               r"copy it into", tmp_path / "ext.onnx", "--data", ws / "data")


@pytest.mark.skipif(ROOT or sys.platform == "win32", reason="root reads any file")
def test_unreadable_model_file(ws: Path, tmp_path: Path) -> None:
    model = tmp_path / "locked.onnx"
    onnx.save(conv_relu_gemm(classes=3), model)
    model.chmod(0)
    try:
        run_fails(ws, tmp_path, 1, r"locked\.onnx: not readable \(permission denied\)", model,
                  "--data", ws / "data")
    finally:
        model.chmod(0o644)


def test_op_without_torch_converter(ws: Path, tmp_path: Path) -> None:
    onnx.save(gru_model(), tmp_path / "gru.onnx")
    run_fails(ws, tmp_path, 1, r"gru\.onnx: no torch converter for op GRU \(opset 13, domain ''\) "
                               r"at node\(s\) the_gru; .*replace the op",
              tmp_path / "gru.onnx", "--data", ws / "data")


def gemm_with_2d_bias(path: Path) -> Path:
    """conv_relu_gemm whose Gemm bias is ``(1, 3)``: onnx2torch makes no nn.Linear of it."""
    model = conv_relu_gemm(classes=3)
    bias = next(t for t in model.graph.initializer if t.name == "fc.bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(1, 3), "fc.bias"))
    onnx.save(model, path)
    return path


def test_layer_that_cannot_be_quantized_is_an_error_without_skip(ws: Path,
                                                                 tmp_path: Path) -> None:
    model = gemm_with_2d_bias(tmp_path / "gemm2d.onnx")
    run_fails(ws, tmp_path, 1, r"gemm2d\.onnx: node 'fc' \(Gemm, opset 13\) cannot be quantized: "
                               r".*rerun with --skip-unsupported", model, "--data", ws / "data",
              "--no-skip-unsupported")


def test_layer_that_cannot_be_quantized_stays_in_float_with_a_warning(ws: Path,
                                                                      tmp_path: Path) -> None:
    model = gemm_with_2d_bias(tmp_path / "gemm2d.onnx")
    result = shrink(model, "--data", ws / "data", *FAST, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "Warning: layer 'fc' (Gemm: onnx2torch made a OnnxGemm" in result.stderr
    assert (tmp_path / "out.onnx").is_file()


# --- the data ---------------------------------------------------------------------------------


def test_grayscale_images_into_a_three_channel_model(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 1, r"expects shape \[N, 3, 8, 8\] but the images give \[N, 1, 8, 8\]; "
                               r"use --channels rgb", ws / "model.onnx", "--data",
              ws / "data", "--preset", "digits")
    # and what the hint says works: the preset's grayscale is overridden
    result = shrink(ws / "model.onnx", "--data", ws / "data", "--preset", "digits",
                    "--channels", "rgb", *FAST, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output


def test_images_into_a_model_of_another_input_rank(ws: Path, tmp_path: Path) -> None:
    onnx.save(matmul_mlp(features=16, classes=3), tmp_path / "mlp.onnx")
    run_fails(ws, tmp_path, 1, r"expects shape \[N, 16\] but the images give \[N, 3, 8, 8\]; "
                               r"choose the model's --preset", tmp_path / "mlp.onnx", "--data",
              ws / "data")


def corrupt(folder: Path, names: list[str]) -> None:
    """Overwrite some images: garbage bytes, or a PNG cut in half (truncated)."""
    for i, name in enumerate(names):
        path = folder / name
        data = path.read_bytes()
        path.write_bytes(b"not an image" if i % 2 == 0 else data[: len(data) // 2])


def test_too_many_unreadable_images_fail(ws: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "imgs", per_class=4)
    corrupt(data, ["0/0.png", "1/1.png"])                       # 2 of 12 > 10 %
    run_fails(ws, tmp_path, 1, r"2 of \d+ images are unreadable \(more than 10%\), e\.g\. .*; "
                               r"remove or re-encode the broken files", ws / "model.onnx",
              "--data", data)


def test_a_few_unreadable_images_are_skipped_with_a_warning(ws: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "imgs", per_class=12)
    corrupt(data, ["0/0.png", "2/5.png"])                       # 2 of 36 <= 10 %
    result = shrink(ws / "model.onnx", "--data", data, *FAST, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "Warning: skipped 2 unreadable image(s)" in result.stderr
    assert "remove or re-encode them" in result.stderr
    assert (tmp_path / "out.onnx").is_file()


def test_class_list_without_a_folder(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("0\n1\n")
    run_fails(ws, tmp_path, 1, r"class folder '2' in .* is not in the class list .*classes\.txt'; "
                               r"add it or remove the folder", ws / "model.onnx", "--data",
              ws / "data", "--classes", tmp_path / "classes.txt")


def test_class_list_with_a_duplicate(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "dup.txt").write_text("0\n1\n0\n2\n")
    run_fails(ws, tmp_path, 1, r"class list .*dup\.txt' names '0' twice \(lines 1 and 3\); remove "
                               r"the duplicate", ws / "model.onnx", "--data", ws / "data",
              "--classes", tmp_path / "dup.txt")


def test_empty_class_list(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "none.txt").write_text("\n\n")
    run_fails(ws, tmp_path, 1, r"class list .*none\.txt' is empty; give one class name per line",
              ws / "model.onnx", "--data", ws / "data", "--classes", tmp_path / "none.txt")


def test_labels_csv_naming_a_missing_file(ws: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "csv", per_class=2)
    (data / "labels.csv").write_text("file,label\n0/0.png,0\n0/9.png,1\n")
    run_fails(ws, tmp_path, 1, r"labels\.csv' line 3: file '0/9\.png' not found .*; fix the row "
                               r"or remove it", ws / "model.onnx", "--data", data)


def test_data_path_is_a_file(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 2, r"--data .*model\.onnx is a file; give an image folder, or tensor "
                               r"data \(an \.npz or \.npy file",
              ws / "model.onnx", "--data", ws / "model.onnx")


# --- the output path --------------------------------------------------------------------------


def test_output_folder_is_a_file(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    run_fails(ws, tmp_path, 2, r"output folder .*plain does not exist; create it or change "
                               r"-o/--output", ws / "model.onnx", "--data", ws / "data",
              "-o", tmp_path / "plain" / "out.onnx")


@pytest.mark.skipif(ROOT or sys.platform == "win32", reason="root writes into any folder")
def test_output_folder_not_writable(ws: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        run_fails(ws, tmp_path, 2, r"output folder .*locked is not writable.*change -o/--output",
                  ws / "model.onnx", "--data", ws / "data", "-o", locked / "out.onnx")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_folder_that_nobody_can_write(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 2, r"output folder /proc is not writable .*change -o/--output",
              ws / "model.onnx", "--data", ws / "data", "-o", "/proc/out.onnx")


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "pattern"), [
    (("--batch-size", "0"), r"--batch-size must be >= 1, got 0"),
    (("--lr", "-1"), r"--lr must be >= 0"),
    (("--std", "0"), r"--std must not contain 0"),
    (("--mean", "1,2"), r"--mean has 2 values but the images have 3 channel\(s\); give 1 or 3"),
    (("--eval-fraction", "1"), r"--eval-fraction must be in \(0, 1\)"),
    (("--target-bits", "9"), r"--target-bits must lie between --min-bits \(2\) and --max-bits"),
    (("--target-bits", "4", "--target-size", "1"), r"--target-bits and --target-size cannot be "
                                                   r"used together; give one budget"),
    (("--mean", "a,b"), r"'a,b' is not a comma-separated list of numbers"),
    (("--min-act-bits", "9"), r"--min-act-bits must be between 2 and --max-bits \(8\), got 9"),
    (("--min-act-bits", "6", "--target-bits", "2.5"),
     r"--target-bits is outside what --min-bits/--min-act-bits/--max-bits allow for this model"),
    (("--target-bits", "2.2"), r"lower --min-act-bits \(activations stay at >= 3 bits\)"),
    (("--min-act-bits", "2", "--target-bits", "1.5"), r"--target-bits must lie between"),
], ids=["batch-size-0", "negative-lr", "zero-std", "mean-2-values", "eval-fraction-1",
        "target-bits-9", "two-budgets", "mean-not-numbers", "min-act-bits-9",
        "target-below-act-floor", "target-below-default-act-floor", "target-below-min-bits"])
def test_impossible_options_exit_2(ws: Path, tmp_path: Path, args: tuple[str, ...],
                                   pattern: str) -> None:
    run_fails(ws, tmp_path, 2, pattern, ws / "model.onnx", "--data", ws / "data", *args)


def test_negative_checkpoint_interval(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 2, r"--checkpoint-every must be >= 0", ws / "model.onnx", "--data",
              ws / "data", "--checkpoint-every", "-1")


def test_resume_without_a_checkpoint(ws: Path, tmp_path: Path) -> None:
    run_fails(ws, tmp_path, 2, r"--resume: no checkpoint .*out\.ckpt to resume from; run without "
                               r"--resume", ws / "model.onnx", "--data", ws / "data", "--resume")


def _batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 1
    return model


def test_a_model_declaring_batch_1_fine_tunes_at_any_batch(ws: Path, tmp_path: Path) -> None:
    onnx.save(_batch_one(conv_relu_gemm(classes=3)), tmp_path / "fixed.onnx")
    out = tmp_path / "out.onnx"
    result = shrink(tmp_path / "fixed.onnx", "--data", ws / "data", *FAST, "-o", out)
    assert result.exit_code == 0, result.output
    assert "Warning: model input 'input' declares a fixed batch of 1; the fine-tune runs at " \
           "--batch-size 8" in result.stderr
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):      # the declared batch still runs, and others too
        (y,) = session.run(None, {"input": np.zeros((batch, 3, 8, 8), np.float32)})
        assert y.shape == (batch, 3)


def test_a_graph_that_fixes_its_batch_inside_asks_for_that_batch(ws: Path,
                                                                 tmp_path: Path) -> None:
    model = _batch_one(conv_relu_gemm(classes=3))
    flatten = next(n for n in model.graph.node if n.op_type == "Flatten")
    shape = onnx.numpy_helper.from_array(np.array([1, 8], np.int64), "fixed_shape")
    model.graph.initializer.append(shape)
    reshape = onnx.helper.make_node("Reshape", [flatten.input[0], "fixed_shape"],
                                    [flatten.output[0]], name="reshape")
    flatten.CopyFrom(reshape)
    onnx.save(model, tmp_path / "fixed.onnx")
    run_fails(ws, tmp_path, 2, r"the graph only runs at its declared batch of 1 .*use "
                               r"--batch-size 1", tmp_path / "fixed.onnx", "--data", ws / "data")


# --- --debug ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "args"), [
    (1, ("corrupt.onnx",)),
    (2, ("model.onnx", "--lambda", "-1")),
], ids=["runtime-error", "usage-error"])
def test_debug_shows_the_traceback_and_the_default_one_line(ws: Path, tmp_path: Path, code: int,
                                                            args: tuple[str, ...]) -> None:
    (tmp_path / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(512))
    model = tmp_path / args[0] if args[0] == "corrupt.onnx" else ws / args[0]
    argv = [str(model), "--data", str(ws / "data"), *args[1:], *FAST,
            "-o", str(tmp_path / "out.onnx")]
    before = files_under(tmp_path)
    plain = CliRunner().invoke(main, ["shrink", *argv])
    assert plain.exit_code == code
    line = error_line(plain)                                  # exactly one line, no traceback
    debug = CliRunner().invoke(main, ["--debug", "shrink", *argv])
    assert debug.exit_code == code
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.rstrip().splitlines()[-1] == line
    assert files_under(tmp_path) == before


def test_a_tiny_set_and_a_mostly_float_model_are_warned_about(ws: Path, tmp_path: Path) -> None:
    b = _Builder(0)
    x = b.node("Relu", [b.conv("input", 3, 8, name="conv1")], name="relu1")
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x], name="gap")], name="flat", axis=1)
    x = b.gemm(x, 8, 8, name="fc1")
    b.gemm(x, 8, 3, name="fc2")
    model = b.model(["N", 3, 8, 8], "logits", ["N", 3])
    for name in ("fc1.bias", "fc2.bias"):      # (1, K) biases: both Gemms stay float
        bias = next(t for t in model.graph.initializer if t.name == name)
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias)[None], name))
    onnx.save(model, tmp_path / "m.onnx")
    result = shrink(tmp_path / "m.onnx", "--data", ws / "data", *FAST, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "Warning: 2 of the 3 layers stay in float" in result.stderr, result.stderr
    assert re.search(r"Warning: only \d+ fine-tune images in .*give at least 100", result.stderr)
