"""Tests for onnxbits.data.files: layouts, splits, preprocessing numerics, decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxbits.data.decode import ImageTensors, decode_images, iterate_batches
from onnxbits.data.files import ImageSet, holdout_split, load_image_set, split_data_dir
from onnxbits.data.preprocess import PRESETS, Preprocess, image_size_of, resolve_preprocess
from onnxbits.errors import ConfigError, DataError


def write_image(path: Path, size: tuple[int, int] = (8, 8), colour: object = None,
                mode: str = "RGB", seed: int = 0) -> Path:
    """Write a solid-colour (``colour``) or random-pixel image of ``size`` (w, h) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels),
                                                      dtype=np.uint8)
        img = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)
    else:
        img = Image.new(mode, size, colour)  # type: ignore[arg-type]
    img.save(path)
    return path


# ---------------------------------------------------------------- layouts


def test_image_folder_sorted_names(tmp_path: Path) -> None:
    write_image(tmp_path / "dog" / "b.png")
    write_image(tmp_path / "dog" / "a.PNG")
    write_image(tmp_path / "cat" / "x.jpg")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    s = load_image_set(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in s.files] == [
        "cat/x.jpg", "dog/a.PNG", "dog/b.png"]
    assert s.labels.tolist() == [0, 1, 1]
    assert s.labels.dtype == np.int64
    assert s.has_labels and s.classes == ["cat", "dog"]


def test_image_folder_numeric_names(tmp_path: Path) -> None:
    for name in ("0", "2", "10"):
        write_image(tmp_path / name / "i.png")
    s = load_image_set(tmp_path)
    assert sorted(zip(s.labels.tolist(), [f.parent.name for f in s.files])) == [
        (0, "0"), (2, "2"), (10, "10")]


def test_image_folder_class_list(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("n003 dog words\nn001 cat\nn002\n")
    data = tmp_path / "data"
    write_image(data / "n002" / "a.jpeg")
    write_image(data / "n001" / "b.bmp")
    s = load_image_set(data, classes)
    assert [(f.parent.name, lab) for f, lab in zip(s.files, s.labels.tolist())] == [
        ("n001", 1), ("n002", 2)]


def test_image_folder_class_not_in_list(tmp_path: Path) -> None:
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n")
    write_image(tmp_path / "data" / "fish" / "a.png")
    with pytest.raises(DataError, match="class folder 'fish'.*not in the class list"):
        load_image_set(tmp_path / "data", classes)


def test_labels_csv_preferred_and_sorted(tmp_path: Path) -> None:
    write_image(tmp_path / "z" / "b.png")
    write_image(tmp_path / "z" / "a.png")
    (tmp_path / "labels.csv").write_text("file,label,class\nz/b.png,7,seven\nz/a.png,3,three\n")
    s = load_image_set(tmp_path)
    assert [f.name for f in s.files] == ["a.png", "b.png"]
    assert s.labels.tolist() == [3, 7] and s.has_labels


def test_labels_csv_class_names_through_list(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,cat\n")
    classes = tmp_path / "classes.txt"
    classes.write_text("dog\ncat\n")
    assert load_image_set(tmp_path, classes).labels.tolist() == [1]
    with pytest.raises(DataError, match="label 'cat' is not an integer; pass --classes"):
        load_image_set(tmp_path)


def test_labels_csv_missing_file(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,0\ngone.png,1\n")
    with pytest.raises(DataError, match="line 3: file 'gone.png' not found"):
        load_image_set(tmp_path)


def test_labels_csv_bad_header(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("path,class\na.png,0\n")
    with pytest.raises(DataError, match="header with columns file,label"):
        load_image_set(tmp_path)


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    write_image(tmp_path / "b.webp")
    write_image(tmp_path / "a.jpg")
    s = load_image_set(tmp_path)
    assert [f.name for f in s.files] == ["a.jpg", "b.webp"]
    assert not s.has_labels and s.labels.tolist() == [-1, -1]


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data folder .*nope.* not found"):
        load_image_set(tmp_path / "nope")
    with pytest.raises(DataError, match="no images"):
        load_image_set(tmp_path)


def test_split_data_dir(tmp_path: Path) -> None:
    assert split_data_dir(tmp_path) == (tmp_path, None)
    (tmp_path / "train").mkdir()
    assert split_data_dir(tmp_path) == (tmp_path, None)
    (tmp_path / "val").mkdir()
    assert split_data_dir(tmp_path) == (tmp_path / "train", tmp_path / "val")


def test_subset(tmp_path: Path) -> None:
    s = ImageSet(tmp_path, [tmp_path / f"{i}.png" for i in range(4)],
                 np.arange(4, dtype=np.int64), True)
    sub = s.subset([3, 1])
    assert [f.name for f in sub.files] == ["3.png", "1.png"] and sub.labels.tolist() == [3, 1]


# ---------------------------------------------------------------- splits and batches


def test_holdout_split_deterministic_and_disjoint() -> None:
    train, val = holdout_split(100, 0.2, seed=3)
    again = holdout_split(100, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 20 and len(train) == 80
    assert not set(train) & set(val) and sorted({*train, *val}) == list(range(100))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
    assert not np.array_equal(val, holdout_split(100, 0.2, seed=4)[1])


@pytest.mark.parametrize("n", [2, 3, 7])
def test_holdout_split_small(n: int) -> None:
    train, val = holdout_split(n, 0.01, seed=0)
    assert len(val) >= 1 and len(train) >= 1
    train, val = holdout_split(n, 0.99, seed=0)
    assert len(val) >= 1 and len(train) >= 1


def test_holdout_split_bad_fraction() -> None:
    with pytest.raises(ConfigError, match="between 0 and 1"):
        holdout_split(10, 1.0, seed=0)


def test_iterate_batches() -> None:
    batches = list(iterate_batches(10, 4, shuffle=True, seed=1))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    again = list(iterate_batches(10, 4, shuffle=True, seed=1))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ConfigError, match="--batch-size"):
        list(iterate_batches(10, 0, shuffle=False, seed=0))


# ---------------------------------------------------------------- presets and numerics

# The pixel (255, 128, 0), hand-computed per preset: (pixel * scale - mean) / std.
_TV = [(1.0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0.0 - 0.406) / 0.225]
EXPECTED = {
    "torchvision": _TV,
    "cifar10": _TV,
    "tf-mobilenet": [127 / 128, 0.0, -1.0],
    "tf-mobilenet-160": [127 / 128, 0.0, -1.0],
    "tf-mobilenet-128": [127 / 128, 0.0, -1.0],
    "efficientnet-lite": [1.0, 1 / 128, -127 / 128],
}
SIZES = {"torchvision": 224, "tf-mobilenet": 224, "tf-mobilenet-160": 160,
         "tf-mobilenet-128": 128, "efficientnet-lite": 224, "cifar10": 40}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_numerics_on_known_pixel(tmp_path: Path, preset: str) -> None:
    size = (300, 400) if preset != "cifar10" else (40, 40)
    write_image(tmp_path / "c" / "a.png", size=size, colour=(255, 128, 0))
    pre = PRESETS[preset]
    tensors, bad = decode_images(load_image_set(tmp_path), pre)
    x = tensors.batch([0])
    side = SIZES[preset]
    assert bad == 0 and x.dtype == np.float32 and x.shape == (1, 3, side, side)
    for c in range(3):
        np.testing.assert_allclose(x[0, c], EXPECTED[preset][c], rtol=1e-6, atol=1e-6)
    assert tensors.labels.tolist() == [pre.label_offset]


def test_digits_preset_grayscale(tmp_path: Path) -> None:
    write_image(tmp_path / "3" / "a.png", colour=200, mode="L")
    write_image(tmp_path / "3" / "b.png", colour=(10, 20, 30, 40), mode="RGBA")
    tensors, _ = decode_images(load_image_set(tmp_path), PRESETS["digits"])
    x = tensors.batch([0, 1])
    assert x.shape == (2, 1, 8, 8) and tensors.labels.tolist() == [3, 3]
    np.testing.assert_allclose(x[0], 200 / 255, rtol=1e-6)


def test_rgba_and_palette_convert_to_rgb(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", colour=(10, 20, 30, 0), mode="RGBA")
    Image.new("P", (8, 8), 5).save(tmp_path / "b.png")
    tensors, bad = decode_images(load_image_set(tmp_path), Preprocess())
    assert bad == 0 and tensors.images.shape == (2, 8, 8, 3)
    assert tensors.images[0, 0, 0].tolist() == [10, 20, 30]


def test_identity_preprocess_keeps_pixels(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", size=(5, 4), seed=1)
    tensors, _ = decode_images(load_image_set(tmp_path), Preprocess())
    pixels = np.asarray(Image.open(tmp_path / "a.png"))
    np.testing.assert_array_equal(tensors.batch([0])[0], pixels.transpose(2, 0, 1))


@pytest.mark.parametrize(("size", "resize", "crop", "expected"), [
    ((227, 227), 256, 224, (224, 224)),
    ((500, 375), 256, None, (256, 341)),       # (H, W): long side int(500 * 256 / 375) = 341
    ((375, 500), 146, None, (194, 146)),       # int(500 * 146 / 375) = 194
    ((500, 375), 183, 160, (160, 160)),
    ((6, 6), None, 8, (8, 8)),                  # crop larger than the image pads with zeros
], ids=["square", "landscape", "portrait", "mobilenet160", "pad"])
def test_resize_crop_sizes(tmp_path: Path, size: tuple[int, int], resize: int | None,
                           crop: int | None, expected: tuple[int, int]) -> None:
    write_image(tmp_path / "a.png", size=size, colour=(9, 9, 9))
    tensors, _ = decode_images(load_image_set(tmp_path), Preprocess(resize=resize, crop=crop))
    assert tensors.images.shape[1:3] == expected


def test_matches_torchvision_resize_crop(tmp_path: Path) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    write_image(tmp_path / "a.png", size=(61, 45), seed=2)
    pre = Preprocess(resize=37, crop=30)
    ours = decode_images(load_image_set(tmp_path), pre)[0].images[0]
    ref = transforms.Compose([transforms.Resize(37), transforms.CenterCrop(30)])(
        Image.open(tmp_path / "a.png").convert("RGB"))
    np.testing.assert_array_equal(ours, np.asarray(ref))


def test_large_jpeg_uses_draft_and_ends_right_size(tmp_path: Path) -> None:
    write_image(tmp_path / "a.jpg", size=(1024, 768), colour=(200, 100, 50))
    tensors, _ = decode_images(load_image_set(tmp_path), Preprocess(resize=96, crop=64))
    assert tensors.images.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(tensors.images[0].mean(axis=(0, 1)), [200, 100, 50], atol=3)


def test_different_sizes_need_resize(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", size=(8, 8))
    write_image(tmp_path / "b.png", size=(9, 8))
    with pytest.raises(DataError, match="images differ in size.*--resize and --crop"):
        decode_images(load_image_set(tmp_path), Preprocess())
    tensors, _ = decode_images(load_image_set(tmp_path), Preprocess(resize=8, crop=8))
    assert len(tensors) == 2


@pytest.mark.parametrize("workers", [0, 3])
def test_corrupt_images_skipped_and_counted(tmp_path: Path, workers: int) -> None:
    for i in range(9):
        write_image(tmp_path / "1" / f"{i}.png", seed=i)
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "bad.jpg").write_bytes(b"not a jpeg at all")
    tensors, bad = decode_images(load_image_set(tmp_path), Preprocess(label_offset=2),
                                 workers=workers)
    assert bad == 1 and len(tensors) == 9
    assert tensors.labels.tolist() == [3] * 9
    assert all(f.parent.name == "1" for f in tensors.files)


def test_too_many_corrupt_images(tmp_path: Path) -> None:
    for i in range(8):
        write_image(tmp_path / f"{i}.png", seed=i)
    good = (tmp_path / "0.png").read_bytes()
    (tmp_path / "x1.png").write_bytes(good[: len(good) // 3])  # truncated
    (tmp_path / "x2.jpg").write_bytes(b"\xff\xd8garbage")
    with pytest.raises(DataError, match=r"2 of 10 images are unreadable.*x1\.png"):
        decode_images(load_image_set(tmp_path), Preprocess(), max_bad_fraction=0.1)
    assert decode_images(load_image_set(tmp_path), Preprocess(), max_bad_fraction=0.2)[1] == 2


def test_image_tensors_subset_and_len(tmp_path: Path) -> None:
    images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
    t = ImageTensors(images, np.array([4, 5]), True, Preprocess(scale=2.0, mean=(1.0,)))
    assert len(t) == 2 and t.shape == (3, 2, 2)
    sub = t.subset([1])
    assert sub.labels.tolist() == [5]
    np.testing.assert_array_equal(sub.batch([0])[0], images[1].transpose(2, 0, 1) * 2.0 - 1.0)


# ---------------------------------------------------------------- resolve_preprocess


def test_resolve_preprocess_overrides() -> None:
    pre = resolve_preprocess("tf-mobilenet", crop=160, resize=None, mean=(1.0, 2.0, 3.0))
    assert pre.crop == 160 and pre.resize == 256 and pre.mean == (1.0, 2.0, 3.0)
    assert pre.label_offset == 1
    assert resolve_preprocess(None) == Preprocess()
    assert resolve_preprocess("CIFAR10") == PRESETS["cifar10"]
    assert image_size_of(PRESETS["tf-mobilenet-128"]) == 128


def test_resolve_preprocess_unknown_preset() -> None:
    with pytest.raises(ConfigError, match="unknown --preset 'imagenet'.*torchvision.*cifar10"):
        resolve_preprocess("imagenet")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"std": (1.0, 0.0, 1.0)}, "--std must not contain 0"),
    ({"mean": (1.0, 2.0)}, "--mean has 2 values"),
    ({"resize": 0}, "--resize must be a positive integer"),
    ({"grayscale": True, "std": (1.0, 1.0, 1.0)}, "--std has 3 values.*1 channel"),
    ({"scale": 0.0}, "--scale"),
], ids=["zero-std", "mean-length", "resize", "gray-std", "scale"])
def test_preprocess_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_preprocess(None, **kwargs)


def test_with_mirrors_appends_horizontal_mirrors_with_the_same_labels() -> None:
    pre = Preprocess(grayscale=True)
    images = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1)
    tensors = ImageTensors(images, np.array([4, 7]), True, pre)
    both = tensors.with_mirrors()
    assert len(both) == 4 and both.labels.tolist() == [4, 7, 4, 7] and both.has_labels
    np.testing.assert_array_equal(both.images[:2], images)
    np.testing.assert_array_equal(both.images[2:], images[:, :, ::-1])
    np.testing.assert_array_equal(both.batch([3]), tensors.batch([1])[..., ::-1])


def test_bgr_channels_reverse_the_decoded_pixels(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    pixels = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path)
    image_set = load_image_set(tmp_path)
    rgb, _ = decode_images(image_set, Preprocess())
    bgr, _ = decode_images(image_set, Preprocess(bgr=True))
    np.testing.assert_array_equal(rgb.images[0], pixels)
    np.testing.assert_array_equal(bgr.images[0], pixels[:, :, ::-1])
    with pytest.raises(ConfigError, match="a grayscale image has no channel order"):
        Preprocess(bgr=True, grayscale=True)
