"""Tensor data: samples of named arrays for models that do not take images, or take several inputs.

Three forms, keyed by the model's input names (:class:`InputSpec`, from the ONNX graph):

- ``FILE.npz``: one array per input, first axis = samples (a single-input model also takes an
  ``.npz`` holding one array under any key, e.g. ``np.savez(f, x)``'s ``arr_0``); held in memory.
- a folder of ``.npz`` / ``.npy`` files, one sample per file, read on demand (the form for large
  sets): an ``.npz`` holds one array per input, an ``.npy`` the single input's array, with or
  without a leading sample axis of 1; files in name order.
- an iterable of ``{input name: array}`` dicts (the Python API; the ``CalibrationDataReader``
  convention), each a batch with a leading sample axis (or one sample without it); concatenated.

:class:`TensorSet` offers what the image sets offer (``len()``, :meth:`read`, ``labels``,
``has_labels``, :meth:`kept_labels`, :meth:`subset`): :meth:`read` returns one array for a
single-input model, else a tuple in input order. Float arrays are cast to the input's declared
float type; integer and bool inputs must come with their declared type's kind and pass through
unquantized. Tensor data has no labels: a run distils and measures fidelity against the float model.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxbits.data.files import _has_image_extension
from onnxbits.errors import DataError

TENSOR_SUFFIXES = (".npz", ".npy")

__all__ = ["InputSpec", "TensorSet", "input_specs", "is_tensor_data", "load_tensor_set"]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and declared dims (None where symbolic)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | None, ...]

    def check(self, array: np.ndarray, source: str) -> np.ndarray:
        """``array`` (samples first) cast to the input's type; raise when it cannot feed it."""
        if array.ndim != len(self.dims) and self.dims:
            raise DataError(f"{source}: array '{self.name}' has shape {list(array.shape)} but "
                            f"model input '{self.name}' has {len(self.dims)} dims "
                            f"{_dims(self.dims)}; give samples along the first axis")
        for axis, (have, want) in enumerate(zip(array.shape[1:], self.dims[1:]), start=1):
            if want is not None and have != want:
                raise DataError(f"{source}: array '{self.name}' has {have} along axis {axis} "
                                f"but model input '{self.name}' needs {want} "
                                f"{_dims(self.dims)}")
        kind = self.dtype.kind
        if kind == "f":
            if array.dtype.kind not in "fiub":
                raise DataError(f"{source}: array '{self.name}' is {array.dtype}; model input "
                                f"'{self.name}' takes {self.dtype}")
            return array.astype(self.dtype, copy=False)
        if array.dtype.kind not in ("iu" if kind in "iu" else kind):
            raise DataError(f"{source}: array '{self.name}' is {array.dtype}; model input "
                            f"'{self.name}' takes {self.dtype} (convert it before saving)")
        return array.astype(self.dtype, copy=False)


def _dims(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The graph inputs that are not initializers, in order."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def is_tensor_data(path: Path) -> bool:
    """True for an ``.npz``/``.npy`` file, or a folder whose first data file met (image or
    tensor) is one; the listing stops there, so a folder of a million images costs one entry."""
    if path.is_file():
        return path.suffix.lower() in TENSOR_SUFFIXES
    if not path.is_dir():
        return False
    with os.scandir(path) as entries:
        for entry in entries:
            if Path(entry.name).suffix.lower() in TENSOR_SUFFIXES:
                return True
            if _has_image_extension(entry.name):
                return False
    return False


class TensorSet:
    """Samples of the model's inputs, in memory (``arrays``) or one file per sample (``files``)."""

    def __init__(self, specs: Sequence[InputSpec], source: str,
                 arrays: Mapping[str, np.ndarray] | None = None,
                 files: Sequence[Path] | None = None) -> None:
        if (arrays is None) == (files is None):
            raise ValueError("give arrays or files")
        self.specs = list(specs)
        self.source = source
        self.arrays = dict(arrays) if arrays is not None else None
        self.files = list(files) if files is not None else None
        n = len(self.files) if self.files is not None else len(next(iter(self.arrays.values())))
        self.labels = np.full(n, -1, dtype=np.int64)
        self.has_labels = False

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def on_demand(self) -> bool:
        """True when samples are read from their files as needed (a folder), not held."""
        return self.files is not None

    def read(self, indices: Sequence[int] | np.ndarray
             ) -> tuple[np.ndarray | tuple[np.ndarray, ...], np.ndarray]:
        """The samples ``indices`` (one array, or a tuple in input order) and an all-True mask."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.arrays is not None:
            parts = [self.arrays[s.name][idx] for s in self.specs]
        else:
            samples = [self._sample(int(i)) for i in idx]
            parts = [np.stack([s[k] for s in samples]) if samples
                     else np.empty((0,), spec.dtype) for k, spec in enumerate(self.specs)]
        ok = np.ones(len(idx), dtype=bool)
        return (parts[0] if len(parts) == 1 else tuple(parts)), ok

    def _sample(self, i: int) -> list[np.ndarray]:
        path = self.files[i]
        arrays = _read_file(path, self.specs)
        out = []
        for spec in self.specs:
            a = arrays[spec.name]
            if spec.dims and a.ndim == len(spec.dims):       # a leading sample axis
                if a.shape[0] != 1:
                    raise DataError(f"{path}: array '{spec.name}' holds {a.shape[0]} samples; "
                                    "a folder holds one sample per file (or give one .npz "
                                    "with every sample)")
                a = a[0]
            out.append(spec.check(a[None], str(path))[0])
        return out

    def kept_labels(self) -> np.ndarray:
        return self.labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> TensorSet:
        idx = np.asarray(indices, dtype=np.int64)
        if self.arrays is not None:
            return TensorSet(self.specs, self.source,
                             arrays={k: v[idx] for k, v in self.arrays.items()})
        return TensorSet(self.specs, self.source, files=[self.files[i] for i in idx])


def _read_file(path: Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz``/``.npy`` file keyed by input name."""
    try:
        if path.suffix.lower() == ".npy":
            if len(specs) != 1:
                raise DataError(f"{path}: an .npy file holds one array but the model has "
                                f"{len(specs)} inputs ({', '.join(s.name for s in specs)}); "
                                "save .npz files keyed by input name")
            return {specs[0].name: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            return _match_keys({k: npz[k] for k in npz.files}, specs, str(path))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read '{path}': {exc}; save it with numpy.savez or "
                        "numpy.save") from None


def _match_keys(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec],
                source: str) -> dict[str, np.ndarray]:
    names = [s.name for s in specs]
    if len(specs) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no array for model input(s) {', '.join(repr(m) for m in missing)}")
        if extra:
            parts.append(f"array(s) {', '.join(repr(e) for e in extra)} match no model input")
        raise DataError(f"{source}: {'; '.join(parts)}; key the arrays by the model's input "
                        f"names ({', '.join(names)})")
    return {n: arrays[n] for n in names}


def load_tensor_set(data: str | Path | Iterable[Mapping[str, np.ndarray]],
                    specs: Sequence[InputSpec]) -> TensorSet:
    """The :class:`TensorSet` of an ``.npz``/``.npy`` file, a folder of them, or an iterable of
    ``{input name: array}`` batches (module docstring).

    Raises:
        DataError: Missing or unreadable data, arrays that match no input or the wrong shape or
            type, sample counts that differ between inputs, or no sample at all.
    """
    if not isinstance(data, str | Path):
        return _from_records(data, specs)
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in TENSOR_SUFFIXES)
        if not files:
            raise DataError(f"no .npz or .npy files in '{path}'")
        out = TensorSet(specs, str(path), files=files)
        out.read([0])                            # the first sample must fit the model
        return out
    if not path.is_file():
        raise DataError(f"data '{path}' not found; give an .npz file or a folder")
    return _checked(_read_file(path, specs), specs, str(path))


def _from_records(records: Iterable[Mapping[str, np.ndarray]],
                  specs: Sequence[InputSpec]) -> TensorSet:
    parts: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise DataError(f"data record {i} is a {type(record).__name__}; give dicts of "
                            "{input name: array}")
        arrays = _match_keys({k: np.asarray(v) for k, v in record.items()}, specs,
                             f"data record {i}")
        for spec in specs:
            a = arrays[spec.name]
            if spec.dims and a.ndim == len(spec.dims) - 1:     # one sample without its axis
                a = a[None]
            parts[spec.name].append(a)
    if not parts[specs[0].name]:
        raise DataError("the data iterable gave no records")
    return _checked({k: np.concatenate(v) for k, v in parts.items()}, specs, "data")


def _checked(arrays: dict[str, np.ndarray], specs: Sequence[InputSpec], source: str) -> TensorSet:
    checked = {s.name: s.check(arrays[s.name], source) for s in specs}
    counts = {k: len(v) for k, v in checked.items()}
    if len(set(counts.values())) > 1:
        raise DataError(f"{source}: the inputs hold different numbers of samples "
                        f"({', '.join(f'{k}: {v}' for k, v in counts.items())})")
    if not next(iter(counts.values())):
        raise DataError(f"{source}: no samples")
    return TensorSet(specs, source, arrays=checked)
