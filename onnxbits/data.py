"""Image data: folder layouts, preprocessing presets and a decoded-once image cache.

Three layouts are read by :func:`load_image_set`: ``DIR/labels.csv`` (``file,label`` columns),
an ImageFolder tree ``DIR/<class>/<image>`` and a flat folder of images without labels.
:func:`decode_images` decodes every image once to uint8 after resize and center crop (as
torchvision's ``Resize`` + ``CenterCrop`` on PIL images do); :meth:`ImageTensors.batch`
normalises on demand with ``x = (pixel * scale - mean) / std``.
"""

from __future__ import annotations

import csv
import fnmatch
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from onnxbits.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
LABELS_CSV = "labels.csv"
_TORCHVISION_MEAN = (0.485, 0.456, 0.406)
_TORCHVISION_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input.

    The shorter side is resized to ``resize`` (bilinear; the longer side becomes
    ``int(long * resize / short)`` as in torchvision), then a ``crop`` x ``crop`` square is cut
    from the center, then each channel is normalised::

        x = (pixel * scale - mean) / std        # pixel in 0..255

    Attributes:
        resize: Shorter side after resizing; None keeps the size.
        crop: Side of the center crop; None keeps the size.
        mean: Per-channel mean (one value or one per channel), in units of scaled pixels.
        std: Per-channel standard deviation (one value or one per channel), no zeros.
        scale: Factor applied to the 0..255 pixel before the mean is subtracted.
        grayscale: Convert to a single channel (PIL mode ``L``) instead of RGB.
        label_offset: Model output index = dataset label + label_offset.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    grayscale: bool = False
    label_offset: int = 0

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ConfigError(f"--{name} must be a positive integer, got {value}")
        mean = tuple(float(v) for v in _as_tuple(self.mean))
        std = tuple(float(v) for v in _as_tuple(self.std))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        for name, values in (("mean", mean), ("std", std)):
            if len(values) not in (1, self.channels):
                raise ConfigError(
                    f"--{name} has {len(values)} values but the images have {self.channels} "
                    f"channel(s); give 1 or {self.channels} comma-separated values")
        if any(s == 0 for s in std):
            raise ConfigError(f"--std must not contain 0, got {','.join(map(str, std))}")
        if not self.scale or not np.isfinite(self.scale):
            raise ConfigError(f"--scale must be a finite non-zero number, got {self.scale}")

    @property
    def channels(self) -> int:
        """Number of image channels: 1 for grayscale, else 3."""
        return 1 if self.grayscale else 3

    def lookup_table(self) -> np.ndarray:
        """Return the float32 table ``(channels, 256)`` mapping each pixel value to its input.

        >>> Preprocess(mean=(128.0,), std=(128.0,)).lookup_table()[:, [0, 128, 255]].tolist()
        [[-1.0, 0.0, 0.9921875], [-1.0, 0.0, 0.9921875], [-1.0, 0.0, 0.9921875]]
        """
        pixels = np.arange(256, dtype=np.float64)
        mean = np.broadcast_to(np.asarray(self.mean, np.float64), (self.channels,))
        std = np.broadcast_to(np.asarray(self.std, np.float64), (self.channels,))
        table = (pixels[None, :] * self.scale - mean[:, None]) / std[:, None]
        return table.astype(np.float32)


def _as_tuple(values: float | Sequence[float]) -> tuple[float, ...]:
    if isinstance(values, int | float):
        return (float(values),)
    return tuple(values)


PRESETS: dict[str, Preprocess] = {
    "torchvision": Preprocess(resize=256, crop=224, scale=1 / 255,
                              mean=_TORCHVISION_MEAN, std=_TORCHVISION_STD),
    "tf-mobilenet": Preprocess(resize=256, crop=224, mean=(128.0,), std=(128.0,), label_offset=1),
    "tf-mobilenet-160": Preprocess(resize=183, crop=160, mean=(128.0,), std=(128.0,),
                                   label_offset=1),
    "tf-mobilenet-128": Preprocess(resize=146, crop=128, mean=(128.0,), std=(128.0,),
                                   label_offset=1),
    "efficientnet-lite": Preprocess(resize=256, crop=224, mean=(127.0,), std=(128.0,)),
    "cifar10": Preprocess(scale=1 / 255, mean=_TORCHVISION_MEAN, std=_TORCHVISION_STD),
    "digits": Preprocess(grayscale=True, scale=1 / 255, mean=(0.0,), std=(1.0,)),
}

_FIELDS = tuple(f.name for f in dataclasses.fields(Preprocess))


def resolve_preprocess(preset: str | None, **overrides: object) -> Preprocess:
    """Return the preset ``preset`` (or the identity preprocessing) with ``overrides`` applied.

    Overrides whose value is None are ignored, so CLI options can be passed straight through.

    >>> resolve_preprocess("tf-mobilenet", crop=160, resize=None).crop
    160
    """
    if preset is None:
        base = Preprocess()
    elif preset.lower() in PRESETS:
        base = PRESETS[preset.lower()]
    else:
        raise ConfigError(f"unknown --preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown preprocessing option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(_FIELDS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base  # type: ignore[arg-type]


def image_size_of(pre: Preprocess) -> int | None:
    """Return the square side the images end with, or None when the preprocessing keeps sizes."""
    return pre.crop


@dataclass
class ImageSet:
    """A list of image files with their labels (-1 where unknown).

    Attributes:
        root: The folder the set was read from.
        files: Image paths, sorted.
        labels: int64 labels, one per file; -1 where the set has no labels.
        has_labels: True when labels came from labels.csv or class folders.
        classes: Class names by index when known (ImageFolder layouts), else None.
    """

    root: Path
    files: list[Path]
    labels: np.ndarray
    has_labels: bool
    classes: list[str] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageSet:
        """Return the images at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageSet(self.root, [self.files[i] for i in idx], self.labels[idx].copy(),
                        self.has_labels, self.classes)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _read_class_list(classes_file: Path) -> dict[str, int]:
    """Map class name -> line number; a line ``wnid words...`` also maps its first token."""
    path = Path(classes_file)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read class list '{path}': {exc.strerror}; "
                        "check the --classes path") from exc
    names: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for index, line in enumerate(lines):
        name = line.strip()
        if not name:
            continue
        if name in names:
            raise DataError(f"class list '{path}' names '{name}' twice (lines "
                            f"{names[name] + 1} and {index + 1}); remove the duplicate")
        names[name] = index
        tokens.setdefault(name.split()[0], index)
    if not names:
        raise DataError(f"class list '{path}' is empty; give one class name per line")
    return {**tokens, **names}


def _read_labels_csv(root: Path, classes_file: Path | None) -> ImageSet:
    path = root / LABELS_CSV
    class_map = _read_class_list(classes_file) if classes_file is not None else None
    rows: list[tuple[str, int]] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        if "file" not in fields or "label" not in fields:
            raise DataError(f"'{path}' needs a header with columns file,label; got "
                            f"{','.join(fields) or 'no header'}")
        reader.fieldnames = fields
        for line, row in enumerate(reader, start=2):
            name, label = (row.get("file") or "").strip(), (row.get("label") or "").strip()
            if not name:
                raise DataError(f"'{path}' line {line}: empty file name")
            if not (root / name).is_file():
                raise DataError(f"'{path}' line {line}: file '{name}' not found in '{root}'; "
                                "fix the row or remove it")
            rows.append((name, _parse_label(label, class_map, path, line)))
    if not rows:
        raise DataError(f"'{path}' lists no images; add rows 'file,label'")
    rows.sort(key=lambda r: r[0])
    return ImageSet(root, [root / r[0] for r in rows],
                    np.array([r[1] for r in rows], dtype=np.int64), True)


def _parse_label(label: str, class_map: dict[str, int] | None, path: Path, line: int) -> int:
    try:
        value = int(label)
    except ValueError:
        if class_map is not None and label in class_map:
            return class_map[label]
        hint = ("it is not in the --classes list" if class_map
                else "pass --classes FILE to map class names")
        raise DataError(f"'{path}' line {line}: label '{label}' is not an integer; "
                        f"{hint}") from None
    if value < 0:
        raise DataError(f"'{path}' line {line}: label {value} is negative; labels start at 0")
    return value


def _read_image_folder(root: Path, class_dirs: list[Path], classes_file: Path | None) -> ImageSet:
    names = [d.name for d in class_dirs]
    if classes_file is not None:
        class_map = _read_class_list(classes_file)
        for name in names:
            if name not in class_map:
                raise DataError(f"class folder '{name}' in '{root}' is not in the class list "
                                f"'{classes_file}'; add it or remove the folder")
        by_index = sorted(class_map.items(), key=lambda kv: kv[1])
        classes: list[str] | None = [k for k, _ in by_index]
    elif all(n.isdigit() for n in names):
        class_map, classes = {n: int(n) for n in names}, None
    else:
        class_map = {n: i for i, n in enumerate(sorted(names))}
        classes = sorted(names)
    pairs = sorted((f.relative_to(root).as_posix(), class_map[d.name])
                   for d in class_dirs for f in d.rglob("*") if _is_image(f))
    return ImageSet(root, [root / p for p, _ in pairs],
                    np.array([c for _, c in pairs], dtype=np.int64), True, classes)


def load_image_set(directory: str | Path, classes_file: str | Path | None = None) -> ImageSet:
    """Read the images (and labels where present) of ``directory``.

    Layouts, first match wins: ``DIR/labels.csv`` with ``file,label`` columns; an ImageFolder
    tree ``DIR/<class>/<image>`` (class index from ``classes_file``, where line number = index,
    else from numeric folder names, else from sorted folder names); a flat folder of images
    without labels.

    Raises:
        DataError: The folder is missing or holds no images, a class folder is not in the class
            list, or a labels.csv row names a missing file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"data folder '{root}' not found; check the --data path")
    classes_path = Path(classes_file) if classes_file is not None else None
    if (root / LABELS_CSV).is_file():
        return _read_labels_csv(root, classes_path)
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                        and any(_is_image(f) for f in d.rglob("*")))
    if class_dirs:
        return _read_image_folder(root, class_dirs, classes_path)
    files = sorted(f for f in root.iterdir() if _is_image(f))
    if not files:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in '{root}'; "
                        "use labels.csv, class folders or a flat folder of images")
    return ImageSet(root, files, np.full(len(files), -1, dtype=np.int64), False)


def select_files(image_set: ImageSet, pattern: str | None, option: str) -> ImageSet:
    """Keep the images whose path relative to the set's root matches the glob ``pattern``."""
    if pattern is None:
        return image_set
    keep = [i for i, f in enumerate(image_set.files)
            if fnmatch.fnmatchcase(Path(f).relative_to(image_set.root).as_posix(), pattern)]
    if not keep:
        raise DataError(f"{option} '{pattern}' matches no image under {image_set.root}; patterns "
                        "match paths relative to the data folder, e.g. '*/0[0-4]*.jpg'")
    return image_set.subset(keep)


def split_data_dir(directory: str | Path) -> tuple[Path, Path | None]:
    """Return ``(DIR/train, DIR/val)`` when both exist, else ``(DIR, None)``."""
    root = Path(directory)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root / "train", root / "val"
    return root, None


def holdout_split(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted, disjoint ``(train_idx, eval_idx)`` by a seeded permutation.

    The eval part has ``round(n * eval_fraction)`` indices, at least 1 and at most ``n - 1``
    when ``n >= 2``.

    >>> [a.tolist() for a in holdout_split(5, 0.4, seed=0)]
    [[0, 1, 3], [2, 4]]
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n >= 2 else 0
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)


class ImageTensors:
    """All images decoded once to uint8 ``(N, H, W, C)`` after resize/crop; normalised on demand.

    Attributes:
        images: uint8 array ``(N, H, W, C)``.
        labels: int64 model output indices (dataset label + label_offset), -1 where unknown.
        has_labels: True when the labels are known.
        pre: The preprocessing the images were decoded with.
        files: The file of each image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, has_labels: bool,
                 pre: Preprocess, files: list[Path] | None = None) -> None:
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[3] != pre.channels:
            raise ValueError(f"images must be uint8 (N, H, W, {pre.channels}), "
                             f"got {images.dtype} {images.shape}")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.has_labels = has_labels
        self.pre = pre
        self.files = files if files is not None else []
        self._table = pre.lookup_table()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one normalised image."""
        _, h, w, c = self.images.shape
        return c, h, w

    def batch(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Return float32 NCHW inputs ``(pixel * scale - mean) / std`` for ``indices``."""
        pixels = self.images[np.asarray(indices, dtype=np.int64)]
        out = np.empty((pixels.shape[0], *self.shape), dtype=np.float32)
        for c in range(pixels.shape[3]):
            out[:, c] = self._table[c][pixels[..., c]]
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageTensors:
        """Return the images at ``indices`` (copied)."""
        idx = np.asarray(indices, dtype=np.int64)
        files = [self.files[i] for i in idx] if self.files else None
        return ImageTensors(self.images[idx], self.labels[idx], self.has_labels, self.pre, files)


def _resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """Return the size after resizing the shorter side to ``shorter`` (torchvision's rule)."""
    w, h = size
    if w <= h:
        return shorter, int(shorter * h / w)
    return int(shorter * w / h), shorter


def _center_crop_box(size: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """Return the PIL crop box of torchvision's ``CenterCrop`` (zero padding when too small)."""
    w, h = size
    left = int(round((w - crop) / 2.0)) if w >= crop else -((crop - w) // 2)
    top = int(round((h - crop) / 2.0)) if h >= crop else -((crop - h) // 2)
    return left, top, left + crop, top + crop


def _decode_one(path: Path, pre: Preprocess) -> np.ndarray:
    """Open, convert, resize and crop one image; return uint8 ``(H, W, C)``."""
    with Image.open(path) as opened:
        if pre.resize is not None and opened.format == "JPEG":
            opened.draft(None, _resized_size(opened.size, pre.resize))  # DCT downscale, >= target
        img = opened.convert("L" if pre.grayscale else "RGB")
    if pre.resize is not None:
        new_size = _resized_size(img.size, pre.resize)
        if new_size != img.size:
            img = img.resize(new_size, Image.Resampling.BILINEAR)
    if pre.crop is not None and img.size != (pre.crop, pre.crop):
        img = img.crop(_center_crop_box(img.size, pre.crop))
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _try_decode(path: Path, pre: Preprocess) -> np.ndarray | str:
    try:
        return _decode_one(path, pre)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on corrupt files
        return f"{type(exc).__name__}: {exc}"


def decode_images(image_set: ImageSet, pre: Preprocess, max_bad_fraction: float = 0.1,
                  workers: int = 0, progress: Callable[[int], None] | None = None,
                  ) -> tuple[ImageTensors, int]:
    """Decode every image of ``image_set`` once; skip and count unreadable ones.

    Args:
        image_set: The files and labels.
        pre: Resize/crop/colour settings (normalisation happens later, in ``batch``).
        max_bad_fraction: Largest share of unreadable images tolerated.
        workers: Threads decoding in parallel; 0 decodes in this thread.
        progress: Called with the number of images just finished (for a progress bar).

    Returns:
        ``(tensors, bad)``: the decoded images with labels shifted by ``pre.label_offset``, and
        the number of unreadable images skipped.

    Raises:
        DataError: Too many unreadable images, or the images end with different sizes.
    """
    n = len(image_set.files)
    if n == 0:
        raise DataError(f"no images to decode in '{image_set.root}'")
    images: np.ndarray | None = None
    kept: list[int] = []
    bad: list[tuple[Path, str]] = []
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 0 else None
    try:
        results: Iterator[np.ndarray | str] = (
            pool.map(_try_decode, image_set.files, [pre] * n) if pool is not None
            else (_try_decode(f, pre) for f in image_set.files))
        for i, result in enumerate(results):
            if progress is not None:
                progress(1)
            if isinstance(result, str):
                bad.append((image_set.files[i], result))
                logger.debug("skipping unreadable image %s: %s", image_set.files[i], result)
                continue
            if images is None:
                images = np.empty((n, *result.shape), dtype=np.uint8)
            elif result.shape != images.shape[1:]:
                first = image_set.files[kept[0]]
                raise DataError(
                    f"images differ in size: '{first}' is {_hw(images.shape[1:])} but "
                    f"'{image_set.files[i]}' is {_hw(result.shape)}; set --resize and --crop "
                    "(or a --preset) so that all images end the same size")
            images[len(kept)] = result
            kept.append(i)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if images is None or len(bad) > max_bad_fraction * n:
        path, reason = bad[0]
        raise DataError(f"{len(bad)} of {n} images are unreadable (more than "
                        f"{max_bad_fraction:.0%}), e.g. '{path}' ({reason}); "
                        "remove or re-encode the broken files")
    idx = np.asarray(kept, dtype=np.int64)
    labels = image_set.labels[idx]
    if image_set.has_labels:
        labels = labels + pre.label_offset
    files = [image_set.files[i] for i in kept]
    return ImageTensors(images[: len(kept)], labels, image_set.has_labels, pre, files), len(bad)


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def iterate_batches(n: int, batch_size: int, shuffle: bool, seed: int) -> Iterator[np.ndarray]:
    """Yield int64 index batches covering ``range(n)`` (the last one may be shorter).

    >>> [b.tolist() for b in iterate_batches(5, 2, shuffle=False, seed=0)]
    [[0, 1], [2, 3], [4]]
    """
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    order = (np.random.default_rng(seed).permutation(n) if shuffle
             else np.arange(n)).astype(np.int64)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
