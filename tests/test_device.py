"""--device / --amp: validation, clean errors, the runtime section of the report, GPU runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner, Result
from onnxbits.cli.main import main

from onnxbits.config import ShrinkConfig
from onnxbits.data.decode import ImageTensors
from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import ConfigError
from onnxbits.train.device import ResidentImages, check_amp, empty_rows, fast_layout, resolve_device
from tests.builders import conv_relu_gemm
from tests.test_cli_shrink import FAST, error_line, image_folder

CHANNELS_LAST = torch.channels_last


def test_fast_layout_makes_cpu_image_batches_channels_last_with_the_same_values() -> None:
    x = torch.randn(3, 4, 5, 6)
    y = fast_layout(x)
    assert y.is_contiguous(memory_format=CHANNELS_LAST) and not y.is_contiguous()
    assert torch.equal(y, x) and y.shape == x.shape
    assert fast_layout(y) is y
    flat = torch.randn(3, 4)
    assert fast_layout(flat) is flat
    rows = empty_rows(y, 7)
    assert rows.shape == (7, 4, 5, 6) and rows.dtype == y.dtype
    assert rows.is_contiguous(memory_format=CHANNELS_LAST) and not rows.is_contiguous()
    assert empty_rows(x, 2).is_contiguous()
    pooled = fast_layout(torch.randn(3, 4, 1, 1))    # both layouts at once: stays contiguous
    assert empty_rows(pooled, 2).is_contiguous()


def test_fine_tune_and_reconstruction_feed_channels_last_batches() -> None:
    from onnxbits.train.loop import TrainConfig, fine_tune
    from onnxbits.train.reconstruct import ReconstructConfig, gather_images
    from tests.conftest import calibrated_network

    s = calibrated_network(conv_relu_gemm(classes=4))
    assert s.graph is not None
    seen: list[torch.Tensor] = []
    hook = s.net.graph.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x),
              TrainConfig(steps=2, batch_size=8, lam=0.1))
    hook.remove()
    assert len(seen) == 2 and all(v.is_contiguous(memory_format=CHANNELS_LAST) for v in seen)
    images = gather_images(lambda idx: (s.x[idx], None), len(s.x), ReconstructConfig(batch_size=4),
                           torch.device("cpu"))
    assert images.is_contiguous(memory_format=CHANNELS_LAST) and torch.equal(images, s.x)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
without_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")




@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("device")
    onnx.save(conv_relu_gemm(classes=3), root / "model.onnx")
    image_folder(root / "data")
    return root


def shrink(root: Path, name: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["shrink", str(root / "model.onnx"), "--data",
                                     str(root / "data"), "-o", str(root / name), *FAST,
                                     "--json", *args])


@without_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_line_and_exit_2(workspace: Path, device: str) -> None:
    result = shrink(workspace, "never.onnx", "--device", device)
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert re.search(rf"--device {device}: no CUDA device is available here .*use --device cpu",
                     line), line
    assert not list(workspace.glob("never.*"))


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "tpu"}, r"--device must be cpu, cuda, cuda:N or auto, got 'tpu'"),
    ({"amp": "fp8"}, r"--amp must be one of off, bf16, fp16, got 'fp8'"),
    ({"device": "cpu", "amp": "fp16"}, r"--amp fp16 needs a CUDA device"),
], ids=["unknown-device", "unknown-amp", "fp16-on-cpu"])
def test_bad_device_options(options: dict[str, str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        ShrinkConfig(data=tmp_path, **options)


def test_fp16_on_cpu_through_the_cli(workspace: Path) -> None:
    result = shrink(workspace, "never.onnx", "--amp", "fp16")
    assert result.exit_code == 2, result.output
    assert "--amp fp16 needs a CUDA device" in error_line(result)


@without_cuda
def test_auto_means_cpu_without_cuda() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    check_amp("bf16", torch.device("cpu"))             # accepted: CPU autocast supports bf16


def test_report_has_the_runtime(workspace: Path) -> None:
    result = shrink(workspace, "cpu.onnx", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runtime = report["runtime"]
    assert runtime["device"] == "cpu" and runtime["amp"] == "off"
    assert runtime["world_size"] == 1 and runtime["images_on_device"] is False
    assert runtime["cpu"]["threads"] == 1 and runtime["cpu"]["flush_denormal"] is True
    tune = runtime["fine_tune"]
    steps, batch = int(FAST[FAST.index("--steps") + 1]), int(FAST[FAST.index("--batch-size") + 1])
    assert tune["steps"] == steps and tune["batch_size"] == batch
    assert 0 < tune["seconds"] < report["seconds"] + 0.1
    assert tune["images_per_second"] == pytest.approx(steps * batch / tune["seconds"], rel=1e-2)
    assert report["config"]["device"] == "cpu" and report["config"]["amp"] == "off"
    stages = runtime["stages"]
    assert list(stages) == ["import", "float eval", "fine-tune", "emit", "evaluate"]
    assert stages["import"] > 0 and stages["fine-tune"] > 0 and min(stages.values()) >= 0
    assert tune["seconds"] <= stages["fine-tune"] + 1e-3
    assert sum(stages.values()) <= report["seconds"] + 0.1


def test_bf16_autocast_on_cpu_runs_and_verifies(workspace: Path) -> None:
    result = shrink(workspace, "bf16.onnx", "--amp", "bf16")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["runtime"]["amp"] == "bf16"
    assert report["verification"]["max_steps"] <= 1
    assert 2 <= report["avg_weight_bits"] <= 8


def test_resident_images_give_the_same_batches_as_the_host(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pre = Preprocess(mean=(120.0, 110.0, 100.0), std=(60.0, 55.0, 50.0))
    images = rng.integers(0, 256, (10, 5, 6, 3), dtype=np.uint8)
    host = ImageTensors(images, np.zeros(10, np.int64), False, pre)
    resident = ResidentImages(images, pre.lookup_table(), torch.device("cpu"))
    idx = np.array([7, 2, 2, 9])
    got = resident.batch(idx)
    assert got.is_contiguous() and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(host.batch(idx)))


@needs_cuda
def test_resident_images_on_the_gpu_equal_the_host() -> None:
    rng = np.random.default_rng(1)
    pre = Preprocess()
    images = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    host = ImageTensors(images, np.zeros(6, np.int64), False, pre)
    resident = ResidentImages(images, pre.lookup_table(), torch.device("cuda"))
    idx = np.array([5, 0, 3])
    assert torch.equal(resident.batch(idx).cpu(), torch.from_numpy(host.batch(idx)))


@needs_cuda
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_shrink_on_the_gpu(workspace: Path, amp: str) -> None:
    result = shrink(workspace, f"gpu-{amp}.onnx", "--device", "cuda", "--amp", amp)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    runtime = report["runtime"]
    assert runtime["device"].startswith("cuda") and runtime["amp"] == amp
    assert runtime["images_on_device"] is True
    assert report["verification"]["max_steps"] <= 1
    assert 2 <= report["avg_weight_bits"] <= 8
