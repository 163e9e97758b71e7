"""Preprocessing of decoded images: ``x = (pixel * scale - mean) / std`` and named presets.

:class:`Preprocess` holds the options (resize of the shorter side, center crop, scale, mean, std,
label offset, grayscale); :data:`PRESETS` the named families; :func:`resolve_preprocess` a preset
with explicit overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from onnxbits.errors import ConfigError

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
        bgr: Feed the channels in BGR order (OpenCV-style exports) instead of RGB.
        label_offset: Model output index = dataset label + label_offset.
    """

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    grayscale: bool = False
    label_offset: int = 0
    bgr: bool = False

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
        if self.bgr and self.grayscale:
            raise ConfigError("a grayscale image has no channel order: drop --channels bgr or "
                              "use --channels gray")
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
