"""Streamed image sets: the same pixels and results as decoded sets, bounded memory, bad images
skipped with a count, and the online teacher."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnxbits.cli.main import main

import onnxbits.data.stream as stream
from onnxbits.data.decode import decode_images
from onnxbits.data.files import load_image_set
from onnxbits.data.preprocess import Preprocess
from onnxbits.data.stream import StreamedImages, open_images
from onnxbits.importer.convert import convert
from onnxbits.report.evaluate import evaluate_model, make_session, predict_logits
from onnxbits.train.teacher import OnlineTeacher
from tests.builders import conv_relu_gemm, image_folder

PRE = Preprocess(scale=1 / 255, mean=(0.5,), std=(0.25,))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = image_folder(tmp_path_factory.mktemp("stream") / "data", classes=3, per_class=10)
    (root / "1" / "5.png").write_bytes(b"not a png")          # one unreadable image mid-set
    return root


def test_streamed_pixels_equal_the_decoded_ones(folder: Path) -> None:
    image_set = load_image_set(folder)
    decoded, bad = decode_images(image_set, PRE)
    streamed = StreamedImages(image_set, PRE, threads=2)
    x, ok = streamed.read(np.arange(len(image_set)))
    assert bad == 1 and streamed.bad == {image_set.files.index(folder / "1" / "5.png")}
    assert ok.sum() == len(decoded) == len(image_set) - 1
    np.testing.assert_array_equal(x, decoded.batch(np.arange(len(decoded))))
    np.testing.assert_array_equal(streamed.kept_labels(), decoded.labels)
    mirrored, _ = streamed.with_mirrors().read(np.array([len(image_set)]))  # mirror of file 0
    np.testing.assert_array_equal(mirrored, decoded.with_mirrors().batch([len(decoded)]))
    streamed.close()


def test_streamed_evaluation_equals_the_in_memory_result(folder: Path) -> None:
    image_set = load_image_set(folder)
    decoded, _ = decode_images(image_set, PRE)
    streamed = StreamedImages(image_set, PRE)
    model = conv_relu_gemm(classes=3)
    session = make_session(model)
    np.testing.assert_array_equal(predict_logits(session, streamed, batch_size=4),
                                  predict_logits(session, decoded, batch_size=4))
    assert evaluate_model(session, streamed, batch_size=4) == \
        evaluate_model(session, decoded, batch_size=4)


def test_open_images_streams_what_exceeds_the_budget(folder: Path) -> None:
    image_set = load_image_set(folder)
    held, _ = open_images(image_set, PRE)
    assert not isinstance(held, StreamedImages)
    streamed, skipped = open_images(image_set, PRE, budget=len(image_set) * 8 * 8 * 3 - 1)
    assert isinstance(streamed, StreamedImages) and skipped == 0   # counted as they are read


def test_too_many_bad_images_fail_naming_one(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data", classes=2, per_class=60)
    for i in range(20):
        (root / "0" / f"{i}.png").write_bytes(b"broken")
    streamed = StreamedImages(load_image_set(root), PRE)
    with pytest.raises(Exception, match=r"images read are unreadable .*0/\d+\.png"):
        for start in range(0, len(streamed), 10):
            streamed.read(np.arange(start, min(start + 10, len(streamed))))


def test_online_teacher_matches_onnx_runtime_and_its_cache_is_exact(folder: Path) -> None:
    model = conv_relu_gemm(classes=3)
    decoded, _ = decode_images(load_image_set(folder), PRE)
    x = torch.from_numpy(decoded.batch(np.arange(8)))
    teacher = OnlineTeacher(convert(model, "m"), cache=len(decoded))
    (first,) = teacher(x, np.arange(8))
    ort_logits = predict_logits(make_session(model), decoded, batch_size=8)[:8]
    np.testing.assert_allclose(first.numpy(), ort_logits, atol=1e-4)
    assert bool(teacher.state["filled"][:8].all()) and not bool(teacher.state["filled"][8:].any())
    (again,) = teacher(x[2:6], np.arange(2, 6))  # from the cache, bit for bit
    assert torch.equal(again, first[2:6])


def _shrink_peak(root: Path, eval_dir: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    model, proto = tmp / "m.onnx", conv_relu_gemm(classes=3)
    for i, name in ((2, "H"), (3, "W")):            # any image size (global average pool)
        proto.graph.input[0].type.tensor_type.shape.dim[i].dim_param = name
    onnx.save(proto, model)
    monkeypatch.setattr(stream, "MEMORY_BUDGET", 0)               # stream every set
    tracemalloc.start()
    try:
        result = CliRunner().invoke(main, [
            "shrink", str(model), "--data", str(root), "--eval-data", str(eval_dir),
            "--scale", str(1 / 255), "--steps", "6", "--batch-size", "8", "--threads", "1",
            "-q", "--json", "-o", str(tmp / "out.onnx")])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["data"]
    assert data["streamed"] == {"train": True, "eval": True}
    return peak


def test_peak_memory_does_not_grow_with_the_number_of_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    eval_dir = image_folder(tmp_path / "eval", classes=3, per_class=8)
    small = image_folder(tmp_path / "small", classes=3, per_class=100, side=32)
    large = image_folder(tmp_path / "large", classes=3, per_class=1500, side=32)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    peak_small = _shrink_peak(small, eval_dir, tmp_path / "a", monkeypatch)
    peak_large = _shrink_peak(large, eval_dir, tmp_path / "b", monkeypatch)
    # 15x the images: decoded they would add 4200 x 32 x 32 x 3 bytes = 12.9 MB (float32 4x
    # that); streamed only the file list grows (a few hundred bytes per image).
    assert peak_large - peak_small < 4200 * 600, (peak_small, peak_large)


def _shrink_bytes(root: Path, out: Path, *extra: str) -> tuple[bytes, dict[str, object]]:
    result = CliRunner().invoke(main, [
        "shrink", str(out.parent / "m.onnx"), "--data", str(root), "--scale", str(1 / 255),
        "--batch-size", "8", "--threads", "1", "-q", "--json", "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out.read_bytes(), json.loads(result.stdout)


def test_a_streamed_run_gives_the_bytes_of_the_in_memory_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = image_folder(tmp_path / "data", classes=3, per_class=10)
    onnx.save(conv_relu_gemm(classes=3), tmp_path / "m.onnx")
    held, report = _shrink_bytes(folder, tmp_path / "held.onnx", "--epochs", "2")
    n_train = report["data"]["n_train"]
    assert report["data"]["streamed"] == {"train": False, "eval": False}
    assert report["config"]["steps"] == -(-2 * n_train // 8)    # ceil(2 epochs x images / 8)
    monkeypatch.setattr(stream, "MEMORY_BUDGET", 0)               # stream, reading ahead
    streamed, report = _shrink_bytes(folder, tmp_path / "streamed.onnx", "--epochs", "2")
    assert report["data"]["streamed"] == {"train": True, "eval": True}
    assert streamed == held
