"""What a shrink run reads and checks before it trains: the output path, the data splits, the
batch size and labels, and the fine-tune's batch source.

Every check raises a :class:`onnxbits.errors.ConfigError` or :class:`onnxbits.errors.DataError`
that names the option to change; nothing is written.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from onnxbits.config import ShrinkConfig
from onnxbits.data.decode import ImageTensors
from onnxbits.data.files import holdout_split, load_image_set, select_files, split_data_dir
from onnxbits.data.stream import Images, StreamedImages, open_images
from onnxbits.data.tensors import (
    InputSpec,
    TensorSet,
    input_specs,
    is_tensor_data,
    load_tensor_set,
)
from onnxbits.errors import ConfigError, DataError
from onnxbits.importer.batch import as_tensors, call, map_batch
from onnxbits.quant.network import first_output
from onnxbits.train.device import ResidentImages

Event = Callable[[str, dict[str, Any]], None]
#: Held-out images at most, when the evaluation split is cut from the training data.
MAX_HELDOUT = 10_000
Fetch = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor | None]]


def check_output_path(model_path: Path, output: Path) -> None:
    """Refuse to overwrite the input or to write into a missing or read-only folder.

    Writability is probed with a temporary file (``os.access`` says yes to root on read-only
    file systems).
    """
    if output.resolve() == model_path.resolve():
        raise ConfigError(f"output {output} is the input model; choose another -o/--output path")
    folder = output.resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"output folder {folder} does not exist; create it or change -o/--output")
    if output.suffix != ".onnx":
        raise ConfigError(f"output {output} must end in .onnx; change -o/--output")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxbits-probe.", dir=folder)
    except OSError as exc:
        raise ConfigError(f"output folder {folder} is not writable ({exc.strerror}); "
                          "change -o/--output") from None
    os.close(fd)
    os.unlink(probe)


def relax_batch(model: onnx.ModelProto, fixed: tuple[str, int] | None,
                batch_size: int) -> tuple[onnx.ModelProto, str | None]:
    """A model whose inputs declare a fixed batch other than ``batch_size``: a copy whose graph
    inputs and outputs take any batch (``N``), and a warning saying so; else ``(model, None)``.

    The fine-tune and the emitted model then run at any batch (ONNX Runtime still accepts the
    declared one); :func:`check_batch_free` tells when the graph itself fixes the batch.
    ``fixed`` is :func:`onnxbits.graph.io.fixed_batch` of ``model``.
    """
    if fixed is None or fixed[1] == batch_size:
        return model, None
    relaxed = onnx.ModelProto()
    relaxed.CopyFrom(model)
    inits = {t.name for t in relaxed.graph.initializer}
    for value in [*relaxed.graph.input, *relaxed.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and dims and dims[0].HasField("dim_value") \
                and dims[0].dim_value == fixed[1]:
            dims[0].dim_param = "N"         # clears dim_value (a oneof)
    del relaxed.graph.value_info[:]
    return relaxed, (f"model input '{fixed[0]}' declares a fixed batch of {fixed[1]}; the "
                     f"fine-tune runs at --batch-size {batch_size} and the output model takes "
                     "any batch size")


def check_batch_free(graph: torch.nn.Module, model: onnx.ModelProto, name: str,
                     batch: int) -> None:
    """The float graph must run a batch of 2 where the model declared another fixed batch
    ``batch``; else the graph hard-codes it (e.g. a Reshape to [1, -1])."""
    specs = input_specs(model)
    if not all(s.dims and all(d is not None for d in s.dims[1:]) for s in specs):
        return                      # a size unknown until the data is read
    try:
        with torch.no_grad():
            out = call(graph, tuple(torch.zeros(2, *s.dims[1:], dtype=_torch_dtype(s.dtype))
                                    for s in specs))
        ok = first_output(out).shape[0] == 2
    except RuntimeError:
        ok = False
    if not ok:
        raise ConfigError(f"{name}: the graph only runs at its declared batch of {batch} (it "
                          f"fixes the batch inside, e.g. in a Reshape); use --batch-size {batch} "
                          "or re-export the model with a dynamic batch")


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(1, dtype)).dtype


def emit_event(on_event: Event | None, kind: str, **info: Any) -> None:
    if on_event is not None:
        on_event(kind, info)


class StageClock:
    """Announces the stages of a run (``stage`` events) and times them: a stage lasts from its
    :meth:`start` to the next stage's start or to :meth:`seconds`."""

    def __init__(self, on_event: Event | None) -> None:
        self.on_event = on_event
        self.times: dict[str, float] = {}
        self._current: str | None = None
        self._since = 0.0

    def start(self, name: str, **info: Any) -> None:
        """End the current stage, start ``name`` and emit its ``stage`` event."""
        self._close()
        self._current, self._since = name, time.perf_counter()
        emit_event(self.on_event, "stage", name=name, **info)

    def seconds(self) -> dict[str, float]:
        """Wall seconds per stage so far (the current stage ends here)."""
        self._close()
        return dict(self.times)

    def _close(self) -> None:
        if self._current is not None:
            elapsed = time.perf_counter() - self._since
            self.times[self._current] = round(self.times.get(self._current, 0.0) + elapsed, 3)
            self._current = None


def load_splits(cfg: ShrinkConfig, on_event: Event | None = None,
                specs: list[InputSpec] | None = None
                ) -> tuple[Images | TensorSet, Images | TensorSet, dict[str, Any]]:
    """The fine-tune split and the held-out evaluation split (never trained on).

    Images are decoded once when they fit :data:`onnxbits.data.stream.MEMORY_BUDGET`, else
    streamed. Tensor data (an ``.npz``/``.npy`` file, a folder of them, or the API's records:
    :mod:`onnxbits.data.tensors`) needs the model's inputs ``specs``.
    """
    if is_tensors(cfg.data):
        if specs is None:
            raise ValueError("tensor data needs the model's input specs")
        return _tensor_splits(cfg, specs)
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and path.is_file():
            raise ConfigError(f"{flag} {path} is a file; give an image folder, or tensor data "
                              "(an .npz or .npy file, or a folder of them)")
    train_dir, val_dir = split_data_dir(cfg.data)
    if cfg.eval_data is not None:
        val_dir = Path(cfg.eval_data)
    elif val_dir is None and cfg.eval_include is not None:
        val_dir = train_dir
    train_set = select_files(load_image_set(train_dir, cfg.classes), cfg.include, "--include")
    if val_dir is not None:
        eval_set = select_files(load_image_set(val_dir, cfg.classes), cfg.eval_include,
                                "--eval-include")
        split = {"train": str(train_dir), "eval": str(val_dir)}
    else:
        train_idx, eval_idx = holdout_split(len(train_set), cfg.eval_fraction, cfg.seed,
                                            max_eval=MAX_HELDOUT)
        eval_set, train_set = train_set.subset(eval_idx), train_set.subset(train_idx)
        split = {"train": str(train_dir),
                 "eval": f"held-out {len(eval_idx)} images ({cfg.eval_fraction:.0%}, at most "
                         f"{MAX_HELDOUT}) of {train_dir} (seed {cfg.seed})"}
    train_set = _capped(train_set, cfg)
    progress = (lambda k: emit_event(on_event, "decode", n=k))
    emit_event(on_event, "stage", name="decode", total=len(train_set) + len(eval_set))
    train, bad_train = open_images(train_set, cfg.preprocess, workers=2, progress=progress)
    evaluation, bad_eval = open_images(eval_set, cfg.preprocess, workers=2, progress=progress)
    split.update(n_train=len(train), n_eval=len(evaluation), bad_images=bad_train + bad_eval,
                 streamed={"train": isinstance(train, StreamedImages),
                           "eval": isinstance(evaluation, StreamedImages)})
    if len(train) == 0 or len(evaluation) == 0:
        raise DataError(f"{cfg.data}: too few images to fine-tune and evaluate; add images")
    return train, evaluation, split


def _capped(data: Any, cfg: ShrinkConfig) -> Any:
    """``data`` (an ImageSet or a TensorSet), or a seeded sample of ``--max-train-images`` of
    it (kept in order)."""
    if cfg.max_train_images is None or len(data) <= cfg.max_train_images:
        return data
    keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(data))
                   [:cfg.max_train_images])
    return data.subset(keep)


def is_tensors(data: Any) -> bool:
    """True for tensor data: an ``.npz``/``.npy`` file or folder, or the API's records."""
    return not isinstance(data, Path) or is_tensor_data(data)


def _describe(data: Any) -> str:
    return str(data) if isinstance(data, Path) else f"{len(data)} in-memory record(s)"


def _tensor_splits(cfg: ShrinkConfig, specs: list[InputSpec]
                   ) -> tuple[TensorSet, TensorSet, dict[str, Any]]:
    for flag, value in (("--include", cfg.include), ("--eval-include", cfg.eval_include)):
        if value is not None:
            raise ConfigError(f"{flag} selects image files; it does not apply to tensor data "
                              f"{_describe(cfg.data)}")
    train = load_tensor_set(cfg.data, specs)
    if cfg.eval_data is not None:
        if not is_tensors(cfg.eval_data):
            raise ConfigError(f"--eval-data {cfg.eval_data} holds images but --data "
                              f"{_describe(cfg.data)} is tensor data; give the same kind")
        evaluation = load_tensor_set(cfg.eval_data, specs)
        split = {"train": _describe(cfg.data), "eval": _describe(cfg.eval_data)}
    else:
        if len(train) < 2:
            raise DataError(f"{_describe(cfg.data)}: {len(train)} sample; give at least 2 (or "
                            "--eval-data) to fine-tune on some and measure on others")
        train_idx, eval_idx = holdout_split(len(train), cfg.eval_fraction, cfg.seed,
                                            max_eval=MAX_HELDOUT)
        train, evaluation = train.subset(train_idx), train.subset(eval_idx)
        split = {"train": _describe(cfg.data),
                 "eval": f"held-out {len(eval_idx)} samples ({cfg.eval_fraction:.0%}, at most "
                         f"{MAX_HELDOUT}) of {_describe(cfg.data)} (seed {cfg.seed})"}
    train = _capped(train, cfg)
    split.update(n_train=len(train), n_eval=len(evaluation), bad_images=0,
                 streamed={"train": train.on_demand, "eval": evaluation.on_demand},
                 kind="tensors")
    return train, evaluation, split


def batch_fetcher(train: Images | TensorSet, device: torch.device) -> tuple[Fetch, bool]:
    """``fetch(indices) -> (inputs, labels or None)`` for the fine-tune, and whether the images
    are held on ``device`` (:class:`onnxbits.train.device.ResidentImages`: on CUDA when the uint8
    images take at most a quarter of the free GPU memory)."""
    resident = None
    if (isinstance(train, ImageTensors) and device.type == "cuda"
            and train.images.nbytes <= torch.cuda.mem_get_info(device)[0] // 4):
        resident = ResidentImages(train.images, train.pre.lookup_table(), device)
    labels = torch.from_numpy(train.labels) if train.has_labels else None

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        if resident is not None:
            return resident.batch(idx), (labels[idx] if labels is not None else None)
        pixels, ok = train.read(idx)     # a streamed set leaves unreadable images out
        x = as_tensors(pixels)
        if device.type == "cuda":
            x = map_batch(lambda t: t.pin_memory(), x)
        return x, (labels[idx[ok]] if labels is not None else None)

    return fetch, resident is not None


def check_labels(tensors: Images | TensorSet, outputs: int) -> None:
    """Labels must index the model's outputs."""
    if tensors.has_labels and len(tensors.labels) and int(tensors.labels.max()) >= outputs:
        raise DataError(f"label {int(tensors.labels.max())} is out of range for the model's "
                        f"{outputs} outputs; check --classes and --label-offset")
