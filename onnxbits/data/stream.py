"""Images read on demand: a set too large to hold decoded is decoded batch by batch.

:func:`open_images` returns decoded :class:`onnxbits.data.decode.ImageTensors` when the set fits
:data:`MEMORY_BUDGET` (decoded uint8 bytes) and :class:`StreamedImages` otherwise; both offer
``len()``, ``shape``, ``labels``, ``has_labels``, ``pre`` and :meth:`read`, so that the fine-tune,
calibration and evaluation take either. Only the file list (paths and labels) scales with the
size of the set; decoding happens in a pool of threads (PIL releases the GIL while it decodes
and resizes), a batch at a time, with the same pixels as :func:`onnxbits.data.decode.decode_images`.

An unreadable image met in a batch is left out of that batch and counted (:attr:`StreamedImages.bad`);
once more than :data:`MAX_BAD_FRACTION` of the images read are bad (and at least 100 were read) the
read fails with a :class:`onnxbits.errors.DataError` naming one of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from onnxbits.data.decode import ImageTensors, _hw, _try_decode, decode_images
from onnxbits.data.files import ImageSet
from onnxbits.data.preprocess import Preprocess
from onnxbits.errors import DataError

logger = logging.getLogger(__name__)

#: Decoded bytes (uint8 after resize and crop) up to which a set is decoded once and held.
MEMORY_BUDGET = 1 << 30
MAX_BAD_FRACTION = 0.1
DECODE_THREADS = 4


class StreamedImages:
    """A set of image files decoded on demand (optionally followed by their mirror images).

    Index ``i < len(files)`` is file ``i``; with ``mirror`` index ``len(files) + i`` is the
    horizontal mirror of file ``i`` (the layout of :meth:`ImageTensors.with_mirrors`).
    """

    def __init__(self, image_set: ImageSet, pre: Preprocess, mirror: bool = False,
                 threads: int = DECODE_THREADS) -> None:
        if len(image_set) == 0:
            raise DataError(f"no images to decode in '{image_set.root}'")
        self.image_set, self.pre, self.mirror, self.threads = image_set, pre, mirror, threads
        labels = image_set.labels + (pre.label_offset if image_set.has_labels else 0)
        self.labels = np.concatenate([labels, labels]) if mirror else labels
        self.has_labels = image_set.has_labels
        self._table = pre.lookup_table()
        self._shape: tuple[int, int, int] | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.bad: set[int] = set()
        self.read_count = 0

    def __len__(self) -> int:
        return len(self.image_set) * (2 if self.mirror else 1)

    @property
    def files(self) -> list[Path]:
        return self.image_set.files

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one normalised image (the crop, else the first readable image)."""
        if self._shape is None:
            if self.pre.crop is not None:
                self._shape = (self.pre.channels, self.pre.crop, self.pre.crop)
            else:
                files = self.image_set.files
                for path in files:
                    pixels = _try_decode(path, self.pre)
                    if not isinstance(pixels, str):
                        h, w, c = pixels.shape
                        self._shape = (c, h, w)
                        break
                else:
                    raise DataError(f"{len(files)} of {len(files)} images are unreadable, e.g. "
                                    f"'{files[0]}' ({_try_decode(files[0], self.pre)}); remove "
                                    "or re-encode the broken files")
        return self._shape

    def with_mirrors(self) -> StreamedImages:
        """The images followed by their horizontal mirrors (same labels)."""
        return StreamedImages(self.image_set, self.pre, mirror=True, threads=self.threads)

    def read(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode ``indices``; return float32 NCHW inputs of the readable ones and the boolean
        mask of which indices they are."""
        idx = np.asarray(indices, dtype=np.int64)
        n_files = len(self.image_set)
        files = [self.image_set.files[i % n_files] for i in idx]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads)
        results = list(self._pool.map(_try_decode, files, [self.pre] * len(files)))
        ok = np.array([not isinstance(r, str) for r in results], dtype=bool)
        self.read_count += len(idx)
        for i, r in zip(idx, results, strict=True):
            if isinstance(r, str):
                self._bad(int(i) % n_files, r)
        if self.read_count >= 100 and len(self.bad) > MAX_BAD_FRACTION * self.read_count:
            first = self.image_set.files[min(self.bad)]
            raise DataError(f"{len(self.bad)} of the {self.read_count} images read are "
                            f"unreadable (more than {MAX_BAD_FRACTION:.0%}), e.g. '{first}'; "
                            "remove or re-encode the broken files")
        c, h, w = self.shape
        out = np.empty((int(ok.sum()), c, h, w), dtype=np.float32)
        row = 0
        for i, r in zip(idx, results, strict=True):
            if isinstance(r, str):
                continue
            if r.shape != (h, w, c):
                raise DataError(
                    f"images differ in size: '{self.image_set.files[int(i) % n_files]}' is "
                    f"{_hw(r.shape)}, others {w}x{h}; set --resize and --crop (or a --preset) "
                    "so that all images end the same size")
            if i >= n_files:
                r = r[:, ::-1]
            for ch in range(c):
                out[row, ch] = self._table[ch][r[..., ch]]
            row += 1
        return out, ok

    def kept_labels(self) -> np.ndarray:
        """The labels of the readable images, in order (after a pass over the set)."""
        if not self.bad:
            return self.labels
        bad = np.zeros(len(self.image_set), dtype=bool)
        bad[list(self.bad)] = True
        return self.labels[~np.concatenate([bad, bad]) if self.mirror else ~bad]

    def _bad(self, i: int, reason: str) -> None:
        if i not in self.bad:
            self.bad.add(i)
            logger.debug("skipping unreadable image %s: %s", self.image_set.files[i], reason)

    def close(self) -> None:
        """Stop the decoding threads."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_pool": None}


Images = ImageTensors | StreamedImages


def read_ahead(images: Images, batches: Iterable[np.ndarray]
               ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(indices, inputs, ok)`` for each batch of ``batches``, reading the next batch in
    a background thread while the caller works on this one (decoding overlaps inference)."""
    if isinstance(images, ImageTensors):      # held in memory: nothing to overlap
        for idx in batches:
            yield (idx, *images.read(idx))
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: tuple[np.ndarray, Future[tuple[np.ndarray, np.ndarray]]] | None = None
        try:
            for idx in batches:
                future = pool.submit(images.read, idx)
                if pending is not None:
                    yield (pending[0], *pending[1].result())
                pending = (idx, future)
            if pending is not None:
                yield (pending[0], *pending[1].result())
        finally:
            if pending is not None:
                pending[1].cancel()


def decoded_bytes(image_set: ImageSet, pre: Preprocess) -> int | None:
    """Bytes the set takes decoded (uint8 after resize and crop), None when the size is only
    known after decoding (no crop)."""
    if pre.crop is None:
        return None
    return len(image_set) * pre.crop * pre.crop * pre.channels


def open_images(image_set: ImageSet, pre: Preprocess, budget: int | None = None,
                workers: int = 2, progress: Callable[[int], None] | None = None
                ) -> tuple[Images, int]:
    """The set decoded once when it fits ``budget`` bytes (default :data:`MEMORY_BUDGET`), else
    streamed; and the number of
    unreadable images skipped so far (streamed sets count theirs as they are read).

    A set without a crop is measured by its first readable image.
    """
    budget = MEMORY_BUDGET if budget is None else budget
    streamed = StreamedImages(image_set, pre, threads=max(1, workers))
    size = decoded_bytes(image_set, pre)
    if size is None:                     # the first readable image gives the size
        c, h, w = streamed.shape
        size = len(image_set) * c * h * w
    if size <= budget:
        return decode_images(image_set, pre, max_bad_fraction=MAX_BAD_FRACTION, workers=workers,
                             progress=progress)
    return streamed, 0

