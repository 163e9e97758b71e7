"""Decode images once: uint8 after resize and center crop, normalised on demand.

:func:`decode_images` decodes every image once to uint8 after resize and center crop (as
torchvision's ``Resize`` + ``CenterCrop`` on PIL images do); :meth:`ImageTensors.batch`
normalises on demand with ``x = (pixel * scale - mean) / std``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import ConfigError, DataError

if TYPE_CHECKING:
    from onnxbits.data.files import ImageSet

logger = logging.getLogger(__name__)


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

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`batch` and an all-True mask (the interface of
        :class:`onnxbits.data.stream.StreamedImages`, whose unreadable images drop out)."""
        return self.batch(indices), np.ones(len(indices), dtype=bool)

    def kept_labels(self) -> np.ndarray:
        """The labels of the images :meth:`read` returns (all of them)."""
        return self.labels

    def with_mirrors(self) -> ImageTensors:
        """Return the ``N`` images followed by their ``N`` horizontal mirrors (same labels)."""
        images = np.concatenate([self.images, self.images[:, :, ::-1]])
        files = self.files + self.files if self.files else None
        return ImageTensors(images, np.concatenate([self.labels, self.labels]), self.has_labels,
                            self.pre, files)

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
    if array.ndim == 2:
        return array[:, :, None]
    return np.ascontiguousarray(array[:, :, ::-1]) if pre.bgr else array


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
