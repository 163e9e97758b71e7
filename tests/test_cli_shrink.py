"""``onnxbits shrink`` through CliRunner: the happy path, the error catalog and the help texts."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner, Result
from onnxbits.cli.main import main
from PIL import Image

from onnxbits.config import ShrinkConfig
from tests.builders import _Builder, conv_relu_gemm, image_folder

FAST = ("--steps", "6", "--batch-size", "8", "--threads", "1", "-q")




def flat_folder(root: Path, count: int = 10) -> Path:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}




def shrink(*args: object) -> Result:
    return CliRunner().invoke(main, ["shrink", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model (3 classes) and its image folder, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("shrink")
    onnx.save(conv_relu_gemm(classes=3), root / "model.onnx")
    image_folder(root / "data")
    return root


@pytest.fixture(scope="module")
def shrunk(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result, str]:
    """One successful ``shrink --json`` run in its own folder: (model path, result, input hash)."""
    folder = tmp_path_factory.mktemp("run")
    model = folder / "model.onnx"
    model.write_bytes((workspace / "model.onnx").read_bytes())
    before = sha256(model)
    torch.manual_seed(0)
    result = shrink(model, "--data", workspace / "data", *FAST, "--json")
    return model, result, before


def error_line(result: Result) -> str:
    """The one ``Error:`` line of a failed run; no traceback anywhere."""
    text = result.stderr + result.stdout
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    return lines[0]


def assert_clean_failure(result: Result, code: int, pattern: str, before: set[Path],
                         root: Path) -> None:
    """Exit ``code``, one error line matching ``pattern``, and no file written under ``root``."""
    assert result.exit_code == code, (result.exit_code, result.output)
    line = error_line(result)
    assert re.search(pattern, line), line
    assert files_under(root) == before


# --- the happy path ---------------------------------------------------------------------------


def test_shrink_writes_model_and_report_and_prints_json(shrunk: tuple[Path, Result, str]) -> None:
    model, result, before = shrunk
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for key in ("layers", "avg_weight_bits", "avg_act_bits", "accuracy", "verification"):
        assert key in report, key
    assert [layer["name"] for layer in report["layers"]] == ["conv1", "dwconv", "fc"]
    assert report["verification"]["max_steps"] <= 1
    assert set(report["accuracy"]) == {"float", "quantized", "torch_sim_k_bit"}
    assert 2 <= report["avg_weight_bits"] <= 8
    output = model.with_name("model.bits.onnx")
    report_path = model.with_name("model.bits.json")
    assert output.is_file() and report_path.is_file()
    assert json.loads(report_path.read_text()) == report
    onnx.checker.check_model(onnx.load(str(output)))
    assert sha256(model) == before
    assert not [p for p in model.parent.iterdir() if p.name.endswith(".tmp")]


def test_human_readable_output(workspace: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes((workspace / "model.onnx").read_bytes())
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    result = shrink(model, "--data", workspace / "data", *FAST, "--target", "exact-sim",
                    "-o", out)
    assert result.exit_code == 0, result.output
    assert "verified in ONNX Runtime" in result.stdout and str(out) in result.stdout
    for label in ("float model, ORT", "shrunk model, ORT", "k-bit sim, torch"):
        assert re.search(rf"{label}: .*agreement with float", result.stdout), label
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert not model.with_name("m.bits.onnx").exists()
    fused = json.loads(out.with_suffix(".json").read_text())["verification"]["fused"]
    assert set(fused) == {"rel_l2", "max_abs", "agreement", "tolerance", "output"}
    assert 0 <= fused["rel_l2"] <= fused["tolerance"] and fused["output"] == "logits"
    assert (f"deployed graph (ORT, all optimizations) vs torch: relative error "
            f"{fused['rel_l2']:.4f} (allowed {fused['tolerance']})") in result.stdout


# --- the error catalog ------------------------------------------------------------------------


def test_output_equal_to_input(workspace: Path) -> None:
    model = workspace / "model.onnx"
    before = files_under(workspace)
    result = shrink(model, "--data", workspace / "data", *FAST, "-o", model)
    assert_clean_failure(result, 2, r"is the input model.*-o/--output", before, workspace)


def test_output_folder_missing(workspace: Path) -> None:
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST,
                    "-o", workspace / "missing" / "out.onnx")
    assert_clean_failure(result, 2, r"output folder .*missing does not exist", before, workspace)


def test_output_must_end_in_onnx(workspace: Path) -> None:
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST,
                    "-o", workspace / "out.txt")
    assert_clean_failure(result, 2, r"must end in \.onnx", before, workspace)


@pytest.mark.parametrize(("args", "pattern"), [
    (("--min-bits", "6", "--max-bits", "4"), r"--min-bits \(6\) cannot be larger than "
                                             r"--max-bits \(4\)"),
    (("--lambda", "-1"), r"--lambda must be >= 0"),
    (("--max-bits", "9"), r"--max-bits must be between 2 and 8"),
    (("--steps", "0"), r"--steps must be >= 1"),
    (("--frozen-steps", "50"), r"--frozen-steps must be between 0 and --steps"),
    (("--preset", "nope"), r"Invalid value for '--preset'"),
    (("--objective", "latency"), r"Invalid value for '--objective'"),
    (("--augment", "rotate"), r"Invalid value for '--augment'"),
    (("--reconstruct", "-1"), r"--reconstruct must be >= 0"),
    (("--target-bits", "4", "--objective", "memory"),
     r"--objective memory has no effect with --target-bits: the budget sets the objective"),
    (("--target-size", "0.1", "--min-bits", "4", "--max-bits", "4"),
     r"--min-bits 4 --max-bits 4 fix every bitlength, so --target-size has no effect"),
    (("--epochs", "1"), r"--steps and --epochs both set the length of the fine-tune"),
    (("--eval-data", ".", "--eval-fraction", "0.3"),
     r"--eval-fraction has no effect with --eval-data"),
], ids=["min>max", "negative-lambda", "max-bits-9", "zero-steps", "frozen>steps",
        "unknown-preset", "unknown-objective", "unknown-augment", "negative-reconstruct",
        "objective-with-budget", "fixed-bits-with-budget", "steps-and-epochs", "eval-fraction-with-eval-data"])
def test_bad_options_exit_2(workspace: Path, args: tuple[str, ...], pattern: str) -> None:
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, *args)
    assert_clean_failure(result, 2, pattern, before, workspace)


def test_missing_model_file(workspace: Path) -> None:
    before = files_under(workspace)
    missing = workspace / "nothing.onnx"
    result = shrink(missing, "--data", workspace / "data", *FAST)
    assert result.exit_code in (1, 2)
    assert_clean_failure(result, result.exit_code, r"nothing\.onnx", before, workspace)


def test_corrupt_model(workspace: Path, tmp_path: Path) -> None:
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    before = files_under(tmp_path)
    result = shrink(model, "--data", workspace / "data", *FAST)
    assert_clean_failure(result, 1, r"corrupt\.onnx: not a readable ONNX file", before, tmp_path)


def test_truncated_model(workspace: Path, tmp_path: Path) -> None:
    data = (workspace / "model.onnx").read_bytes()
    model = tmp_path / "half.onnx"
    model.write_bytes(data[: len(data) // 2])
    before = files_under(tmp_path)
    result = shrink(model, "--data", workspace / "data", *FAST)
    assert_clean_failure(result, 1, r"half\.onnx: .*truncated", before, tmp_path)


def test_already_quantized_model(workspace: Path, shrunk: tuple[Path, Result, str]) -> None:
    model, result, _ = shrunk
    assert result.exit_code == 0, result.output
    quantized = model.with_name("model.bits.onnx")
    folder = model.parent
    before = files_under(folder)
    again = shrink(quantized, "--data", workspace / "data", *FAST, "-o", folder / "again.onnx")
    assert_clean_failure(again, 1, r"already quantized.*QuantizeLinear.*pass the float model",
                         before, folder)


def test_model_without_quantizable_layers(workspace: Path, tmp_path: Path) -> None:
    b = _Builder(0)
    b.node("Relu", ["input"], name="relu")
    model = tmp_path / "relu.onnx"
    onnx.save(b.model(["N", 3, 8, 8], "logits", ["N", 3, 8, 8]), model)
    before = files_under(tmp_path)
    result = shrink(model, "--data", workspace / "data", *FAST)
    assert_clean_failure(result, 1, r"relu\.onnx: no quantizable layer", before, tmp_path)


def test_empty_data_folder(workspace: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", tmp_path / "empty", *FAST)
    assert result.exit_code in (1, 2)
    assert_clean_failure(result, result.exit_code, r"no images .* found in .*empty", before,
                         workspace)


def test_folder_with_only_non_image_files(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "texts"
    (data / "0").mkdir(parents=True)
    (data / "notes.txt").write_text("hello")
    (data / "0" / "table.csv").write_text("a,b\n")
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", data, *FAST)
    assert_clean_failure(result, 1, r"no images .* found in .*texts", before, workspace)


def test_files_named_png_that_are_not_images(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "fake"
    (data / "0").mkdir(parents=True)
    for i in range(4):
        (data / "0" / f"{i}.png").write_text("not an image")
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", data, *FAST)
    assert_clean_failure(result, 1, r"images are unreadable", before, workspace)


def test_labels_out_of_range(workspace: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "twelve", classes=12, per_class=2)
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", data, *FAST)
    assert_clean_failure(result, 1, r"label 11 is out of range for the model's 3 outputs",
                         before, workspace)


def test_images_of_the_wrong_size(workspace: Path, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "big", per_class=3, side=16)
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", data, *FAST)
    assert_clean_failure(result, 1, r"expects shape \[N, 3, 8, 8\] but the images give "
                                    r"\[N, 3, 16, 16\]", before, workspace)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(workspace: Path) -> None:
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST,
                    "--device", "cuda")
    assert_clean_failure(result, 2, r"--device cuda: no CUDA device", before, workspace)


def test_cross_entropy_without_labels(workspace: Path, tmp_path: Path) -> None:
    data = flat_folder(tmp_path / "flat")
    before = files_under(workspace)
    result = shrink(workspace / "model.onnx", "--data", data, *FAST, "--loss", "ce")
    assert_clean_failure(result, 2, r"--loss ce needs labels but .*flat has none", before,
                         workspace)


def test_shrink_leaves_the_process_float_state_alone(workspace: Path, tmp_path: Path) -> None:
    b = _Builder(0)
    b.node("Relu", ["input"], name="relu")   # fails right after the set-up, which keeps it fast
    model = tmp_path / "relu.onnx"
    onnx.save(b.model(["N", 3, 8, 8], "logits", ["N", 3, 8, 8]), model)
    torch.set_flush_denormal(False)
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert float(tiny * 1.0) > 0
    result = shrink(model, "--data", workspace / "data", *FAST)
    assert result.exit_code == 1, result.output
    assert float(tiny * 1.0) > 0


# --- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["shrink", "--help"], ["report", "--help"],
                                  ["eval", "--help"]], ids=" ".join)
def test_help_exits_0(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_every_option_of_every_command_has_help() -> None:
    assert set(main.commands) >= {"shrink", "report", "eval"}
    missing = [f"{name} {param.opts}" for name, command in main.commands.items()
               for param in command.params
               if isinstance(param, click.Option) and not (param.help or "").strip()]
    missing += [f"onnxbits {p.opts}" for p in main.params
                if isinstance(p, click.Option) and not (p.help or "").strip()]
    assert not missing
    for name, command in main.commands.items():
        assert (command.help or "").strip(), name


def test_named_recipe_sets_its_defaults_and_explicit_options_win(workspace: Path,
                                                                 tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                    "-o", out, "--recipe", "reconstruct", "--reconstruct", "4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    config = report["config"]
    assert (config["lr"], config["loss"], config["frozen_steps"]) == (1e-5, "kd", 0)
    assert config["reconstruct"] == 4          # given on the command line: not the recipe's 600
    assert report["reconstruction"]
    plain = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                   "-o", tmp_path / "plain.onnx", "--recipe", "finetune")
    assert plain.exit_code == 0, plain.output
    defaults = json.loads(plain.stdout)["config"]
    assert (defaults["lr"], defaults["loss"], defaults["reconstruct"]) == (1e-4, "auto", 0)
    assert defaults["frozen_steps"] is None


def test_reconstruction_short_of_memory_uses_fewer_images_and_says_so(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("onnxbits.train.loop.available_memory", lambda device: 1)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                    "-o", tmp_path / "m.onnx", "--frozen-steps", "0", "--reconstruct", "2")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    blocks = report["reconstruction"]
    assert blocks and all(b["inputs"] == 1 < b["wanted"] for b in blocks)
    assert any(re.search(r"block reconstruction ran on 1 of its \d+ inputs", w)
               for w in report["warnings"]), report["warnings"]
    assert "Warning: block reconstruction ran on 1 of" in result.stderr


def test_recipe_options_reach_the_run(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                    "-o", out, "--target-bits", "5", "--min-act-bits", "4", "--augment", "flip",
                    "--reconstruct", "3")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    config = report["config"]
    assert (config["min_act_bits"], config["augment"], config["reconstruct"]) == (4, "flip", 3)
    blocks = report["reconstruction"]
    assert blocks and all(b["loss_after"] <= b["loss_before"] for b in blocks)
    assert [n for b in blocks for n in b["layers"]] == [
        layer["name"] for layer in report["layers"] if layer["weight_quantized"]]
    assert report["data"]["n_train_views"] == 2 * report["data"]["n_train"]


def test_activation_floor_keeps_activations_up_and_lets_weights_go_lower(
        workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                    "-o", out, "--min-act-bits", "5", "--target-bits", "4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["config"]["min_bits"], report["config"]["min_act_bits"]) == (2, 5)
    acts = [l["act_bits"] for l in report["layers"] if l["act_bits"] is not None]
    weights = [l["weight_bits"] for l in report["layers"] if l["weight_quantized"]]
    assert acts and min(acts) >= 5
    assert min(weights) < 4   # an average of 4 with activations at >= 5 needs low weights
    assert abs(report["avg_bits"] - 4.0) <= 0.1


def test_activations_stay_at_3_bits_or_more_by_default(workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                    "-o", out, "--target-bits", "2.5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["min_act_bits"] == 3
    acts = [l["act_bits"] for l in report["layers"] if l["act_bits"] is not None]
    assert acts and min(acts) >= 3
    assert min(l["weight_bits"] for l in report["layers"]) == 2
    assert abs(report["avg_bits"] - 2.5) <= 0.1   # weights at 2 bits pay for activations at 3


def test_auto_loss_uses_labels_when_there_are_some(workspace: Path, tmp_path: Path) -> None:
    labelled = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "--json",
                      "-o", tmp_path / "a.onnx")
    unlabelled = shrink(workspace / "model.onnx", "--data", flat_folder(tmp_path / "flat", 20),
                        *FAST, "--json", "-o", tmp_path / "b.onnx")
    assert labelled.exit_code == 0 and unlabelled.exit_code == 0, unlabelled.output
    assert json.loads(labelled.stdout)["config"]["task_loss"] == "kd+ce"
    assert json.loads(unlabelled.stdout)["config"]["task_loss"] == "kd"


@pytest.mark.parametrize("recipe", [(), ("--frozen-steps", "0", "--reconstruct", "2")],
                         ids=["default", "reconstruct"])
def test_a_model_with_two_outputs_tunes_on_the_first_and_keeps_both(
        workspace: Path, tmp_path: Path, recipe: tuple[str, ...]) -> None:
    model = conv_relu_gemm(classes=3)
    model.graph.node.append(onnx.helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    model.graph.output.append(onnx.helper.make_tensor_value_info("probs", onnx.TensorProto.FLOAT,
                                                                 ["N", 3]))
    onnx.save(model, tmp_path / "two.onnx")
    out = tmp_path / "two.bits.onnx"
    result = shrink(tmp_path / "two.onnx", "--data", workspace / "data", *FAST, *recipe, "--json",
                    "-o", out)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["max_steps"] <= 1
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    logits, probs = session.run(None, {"input": np.random.default_rng(0).random(
        (2, 3, 8, 8), dtype=np.float32)})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert logits.shape == probs.shape == (2, 3)


# --- the option surface -----------------------------------------------------------------------


def test_every_config_field_is_an_option_and_every_option_a_field() -> None:
    from onnxbits.cli.options import PREPROCESS_KEYS
    from onnxbits.cli.shrink import shrink_command

    params = {p.name for p in shrink_command.params if isinstance(p, click.Option)}
    fields = {f.name for f in dataclasses.fields(ShrinkConfig)} - {"preprocess"}
    cli_only = {"recipe", "as_json", "quiet", "help", *PREPROCESS_KEYS}
    assert params - cli_only == fields


def test_help_lists_at_most_45_options_in_groups() -> None:
    result = CliRunner().invoke(main, ["shrink", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    flags = re.findall(r"^  (?:-\w, )?(--[\w-]+)", result.output, re.M)
    assert len(flags) == len(set(flags)) and len(flags) - 1 <= 45, flags   # and --help
    headings = re.findall(r"^(\w[\w ]+):$", result.output, re.M)
    assert headings == ["Data and preprocessing", "Budget and accuracy", "Training", "Output",
                        "Hardware", "Advanced", "Other"], headings


def test_an_existing_checkpoint_is_never_overwritten_without_resume(
        workspace: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"an interrupted run")
    before = files_under(tmp_path)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST, "-o", out)
    assert_clean_failure(result, 2, r"m\.ckpt holds an interrupted run .*add --resume", before,
                         tmp_path)
    assert ckpt.read_bytes() == b"an interrupted run"


def test_a_failure_after_the_fine_tune_takes_its_checkpoint_with_it(
        workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxbits.pipeline.run as run

    def broken(*args: object, **kwargs: object) -> None:
        assert (tmp_path / "m.ckpt").is_file()       # the finished fine-tune was saved ...
        raise RuntimeError("report failed")

    monkeypatch.setattr(run, "build_report", broken)
    result = shrink(workspace / "model.onnx", "--data", workspace / "data", *FAST,
                    "-o", tmp_path / "m.onnx")
    assert result.exit_code == 1 and "internal error: RuntimeError: report failed" in result.output
    assert files_under(tmp_path) == set()           # ... and removed: a resume would fail alike


def test_logits_of_shape_n_c_1_1_are_read_as_n_c(tmp_path: Path) -> None:
    from tests.builders import squeezenet_head
    onnx.save(squeezenet_head(classes=3), tmp_path / "sq.onnx")
    data = image_folder(tmp_path / "data")
    result = shrink(tmp_path / "sq.onnx", "--data", data, *FAST, "--json",
                    "-o", tmp_path / "sq.bits.onnx")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["verification"]["tensors"] > 0 and 0 <= report["accuracy"]["quantized"]["top1"]
    assert not (tmp_path / "sq.bits.ckpt").exists()


def test_an_interrupted_stage_keeps_its_bar_where_it_stopped() -> None:
    import io

    from onnxbits.cli.shrink import _ProgressView
    from rich.console import Console

    from onnxbits.train.history import StepRecord
    view = _ProgressView(Console(file=io.StringIO()))
    view("stage", {"name": "import"})
    view("stage", {"name": "fine-tune", "total": 300})
    view("step", {"record": StepRecord(step=0, phase="learn", loss=1.0, task=1.0, cost=8.0,
                                       avg_bits=8.0, lam=0.05)})
    view.close(finished=False)
    tasks = view.progress.tasks
    assert (tasks[0].completed, tasks[0].total) == (1, 1)          # a stage that ended
    assert (tasks[1].completed, tasks[1].total) == (1, 300)        # not "300/300"


def test_a_float_model_at_chance_is_warned_about(tmp_path: Path) -> None:
    from onnx import numpy_helper
    model = conv_relu_gemm(classes=3)
    for init in model.graph.initializer:        # every logit tied: the float model guesses
        if init.name.startswith("fc"):
            init.CopyFrom(numpy_helper.from_array(
                np.zeros_like(numpy_helper.to_array(init)), init.name))
    onnx.save(model, tmp_path / "m.onnx")
    result = shrink(tmp_path / "m.onnx", "--data", image_folder(tmp_path / "data"), *FAST,
                    "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert re.search(r"Warning: the float model scores [\d.]+ % top-1 .*\(chance: 33.33 %\).*"
                     r"--preset", result.stderr), result.stderr


def test_help_text_has_no_doubled_percent_signs_and_says_what_pack_is() -> None:
    for command in ("shrink", "eval", "compare", "report"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0 and "%%" not in result.output, command
    text = " ".join(CliRunner().invoke(main, ["shrink", "--help"], terminal_width=200)
                    .output.split())
    assert "pack = smallest file (k-bit weight streams; onnxbits unpack gives the ort model)" in text
