"""Image data: folder layouts, file selection and splits (decoding: :mod:`onnxbits.data.decode`,
preprocessing: :mod:`onnxbits.data.preprocess`).

Three layouts are read by :func:`load_image_set`: ``DIR/labels.csv`` (``file,label`` columns),
an ImageFolder tree ``DIR/<class>/<image>`` and a flat folder of images without labels.
"""

from __future__ import annotations

import csv
import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxbits.errors import ConfigError, DataError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
LABELS_CSV = "labels.csv"


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
    return _has_image_extension(path.name) and path.is_file()


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_names(folder: Path, first_only: bool = False) -> list[str]:
    """Paths (relative to ``folder``, POSIX, unsorted) of the files with an image extension
    under ``folder`` (hidden folders skipped), or just the first one with ``first_only``.

    One ``scandir`` per folder and no ``stat`` for a name with an image extension (only other
    names are asked whether they are folders), so that listing a million images takes seconds;
    an unreadable file is found when it is decoded.
    """
    names: list[str] = []
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(folder / rel if rel else folder) as entries:
            for entry in entries:
                if _has_image_extension(entry.name):
                    names.append(rel + entry.name)
                    if first_only:
                        return names
                elif not entry.name.startswith(".") and entry.is_dir():
                    pending.append(rel + entry.name + "/")
    return names


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
    pairs = sorted((f"{d.name}/{name}", class_map[d.name])
                   for d in class_dirs for name in _image_names(d))
    return ImageSet(root, [root / p for p, _ in pairs],
                    np.fromiter((c for _, c in pairs), dtype=np.int64, count=len(pairs)), True,
                    classes)


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
                        and _image_names(d, first_only=True))
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


def holdout_split(n: int, eval_fraction: float, seed: int,
                  max_eval: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted, disjoint ``(train_idx, eval_idx)`` by a seeded permutation.

    The eval part has ``round(n * eval_fraction)`` indices (at most ``max_eval``), at least 1 and
    at most ``n - 1`` when ``n >= 2``.

    >>> [a.tolist() for a in holdout_split(5, 0.4, seed=0)]
    [[0, 1, 3], [2, 4]]
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    wanted = round(n * eval_fraction) if max_eval is None else min(round(n * eval_fraction),
                                                                     max_eval)
    n_eval = min(max(1, wanted), n - 1) if n >= 2 else 0
    return np.sort(perm[n_eval:]).astype(np.int64), np.sort(perm[:n_eval]).astype(np.int64)
