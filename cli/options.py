"""Data and preprocessing options shared by the commands that read images (eval, shrink).

Usage::

    @click.command()
    @preprocess_options                      # or @preprocess_options(data_required=False)
    def cmd(data, classes, **options):
        pre = preprocess_from_options(**options)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from onnxbits.cli.groups import GroupedOption

from onnxbits.data.preprocess import PRESETS, Preprocess, resolve_preprocess

F = TypeVar("F", bound=Callable[..., Any])

#: The keyword arguments the decorator adds that feed :func:`preprocess_from_options`.
#: The ``--help`` heading of these options.
DATA_GROUP = "data and preprocessing"

PREPROCESS_KEYS = ("preset", "resize", "crop", "mean", "std", "scale", "label_offset", "channels")
CHANNELS = ("rgb", "bgr", "gray")


class FloatList(click.ParamType):
    """A comma-separated list of floats, e.g. ``0.485,0.456,0.406`` -> ``(0.485, 0.456, 0.406)``."""

    name = "FLOATS"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[float, ...]:
        """Parse ``value``; a bad number fails with click's usage error (exit 2)."""
        if isinstance(value, tuple | list):
            return tuple(float(v) for v in value)
        parts = [p.strip() for p in str(value).split(",")]
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            self.fail(f"'{value}' is not a comma-separated list of numbers (e.g. 0.5,0.5,0.5)",
                      param, ctx)


def _preset_help() -> str:
    return "Preprocessing preset: " + "; ".join(
        f"{name} ({_describe(pre)})" for name, pre in PRESETS.items()
    ) + ". Without a preset images are used as is, x = pixel (0..255)."


def _describe(pre: Preprocess) -> str:
    parts = []
    if pre.resize:
        parts.append(f"resize {pre.resize}")
    if pre.crop:
        parts.append(f"crop {pre.crop}")
    if pre.grayscale:
        parts.append("grayscale")
    if pre.bgr:
        parts.append("BGR")
    parts.append(f"scale {pre.scale:.4g}")
    parts.append("mean " + ",".join(f"{m:g}" for m in pre.mean))
    parts.append("std " + ",".join(f"{s:g}" for s in pre.std))
    if pre.label_offset:
        parts.append(f"label offset {pre.label_offset}")
    return ", ".join(parts)


def _option(*decls: str, **kwargs: Any) -> Callable[[F], F]:
    return click.option(*decls, cls=GroupedOption, group=DATA_GROUP, **kwargs)


def _options(data_required: bool) -> list[Callable[[F], F]]:
    return [
        _option("--data", type=click.Path(exists=True, path_type=Path),
                     required=data_required,
                     help="Image folder: labels.csv (file,label), class sub-folders or flat "
                          "images; with train/ and val/ inside, val/ is used for measuring. "
                          "Or tensor data: FILE.npz (one array per model input, samples "
                          "first) or a folder of .npz/.npy files, one sample each."),
        _option("--classes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Class list, one folder name per line; line number = label "
                          "(e.g. ImageNet wnids.txt). Default: numeric or sorted folder names."),
        _option("--preset", type=click.Choice(sorted(PRESETS), case_sensitive=False),
                     metavar="NAME", help=_preset_help()),
        _option("--resize", type=click.IntRange(min=1), metavar="N",
                     help="Resize the shorter image side to N pixels (bilinear)."),
        _option("--crop", type=click.IntRange(min=1), metavar="N",
                     help="Center-crop an N x N square after resizing."),
        _option("--mean", type=FloatList(), metavar="A[,B,C]",
                     help="Per-channel mean subtracted after scaling, e.g. 0.485,0.456,0.406."),
        _option("--std", type=FloatList(), metavar="A[,B,C]",
                     help="Per-channel std dividing after the mean, e.g. 0.229,0.224,0.225."),
        _option("--scale", type=float, metavar="F",
                     help="Pixel (0..255) factor before the mean: x = (pixel*F - mean) / std."),
        _option("--channels", type=click.Choice(CHANNELS),
                     help="Channel layout the model takes: rgb, bgr (OpenCV-style) or gray "
                          "(one channel) [default: the preset's, else rgb]."),
        _option("--label-offset", type=int, metavar="K",
                     help="Model output index = dataset label + K (1 for 1001-class "
                          "TF MobileNets)."),
    ]


def preprocess_options(func: F | None = None, *, data_required: bool = True) -> Any:
    """Add ``--data --classes --preset --resize --crop --mean --std --scale --label-offset``.

    Use bare (``@preprocess_options``) or with arguments
    (``@preprocess_options(data_required=False)``). The command receives the keyword arguments
    ``data``, ``classes`` and those in :data:`PREPROCESS_KEYS`.
    """

    def decorate(f: F) -> F:
        for option in reversed(_options(data_required)):
            f = option(f)
        return f

    return decorate(func) if func is not None else decorate


def preprocess_from_options(**kwargs: Any) -> Preprocess:
    """Build the Preprocess from the command's keyword arguments (other keys are ignored).

    Raises:
        ConfigError: Unknown preset or invalid values (e.g. a zero std).
    """
    options = {k: kwargs.get(k) for k in PREPROCESS_KEYS}
    for key in ("mean", "std"):
        if isinstance(options[key], str):
            options[key] = FloatList().convert(options[key], None, None)
    preset = options.pop("preset")
    channels = options.pop("channels")
    if channels is not None:
        options.update(grayscale=channels == "gray", bgr=channels == "bgr")
    return resolve_preprocess(preset, **options)
