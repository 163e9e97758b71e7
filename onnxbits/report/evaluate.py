"""Running an ONNX model in ONNX Runtime (CPU) on images or tensor data; top-1/top-5 accuracy."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import (
    EPFail,
    Fail,
    InvalidArgument,
    NotImplemented,  # noqa: A004 - ONNX Runtime's name
    RuntimeException,
)

from onnxbits.data.decode import iterate_batches
from onnxbits.data.stream import Images, read_ahead
from onnxbits.data.tensors import TensorSet
from onnxbits.errors import DataError, InvalidModelError
from onnxbits.graph.outputs import graph_outputs
from onnxbits.report.fidelity import Fidelity, fidelities

logger = logging.getLogger(__name__)

ModelLike = str | Path | bytes | onnx.ModelProto
_INPUT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
                "tensor(double)": np.float64}
_FIX_HINT = "choose the model's --preset or set --resize/--crop"


@dataclass
class EvalResult:
    """Accuracy in percent (0..100) over ``n`` images."""

    top1: float
    top5: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Return ``{"top1": ..., "top5": ..., "n": ...}``."""
        return asdict(self)


def _model_name(model: ModelLike) -> str:
    return str(model) if isinstance(model, str | Path) else "<in-memory model>"


def make_session(model: ModelLike, threads: int | None = None,
                 optimize: bool = True) -> ort.InferenceSession:
    """Open ``model`` in ONNX Runtime on the CPU.

    Args:
        model: A path, serialized bytes or a ModelProto.
        threads: Intra-op threads; None lets ONNX Runtime decide.
        optimize: Full graph optimizations when True, ``ORT_DISABLE_ALL`` when False.

    Raises:
        InvalidModelError: The file is missing or ONNX Runtime cannot load it.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    name = _model_name(model)
    if isinstance(model, str | Path):
        if not Path(model).is_file():
            raise InvalidModelError(f"model file '{name}' not found; check the path")
        source: str | bytes = str(model)
    elif isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    else:
        source = bytes(model)
    try:
        return ort.InferenceSession(source, sess_options=options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own pybind11 exception types
        raise InvalidModelError(f"ONNX Runtime cannot load '{name}': {_first_line(exc)}; check "
                                "that it is a valid ONNX model (onnx.checker.check_model)") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _shape_str(dims: list[int | str | None] | tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"


def _layout(inp: ort.NodeArg, chw: tuple[int, int, int]) -> str:
    """Return how images feed the input: ``nchw``, ``nhwc`` or ``flat``; raise on a mismatch."""
    dims = list(inp.shape) if inp.shape is not None else None
    if not dims:
        return "nchw"
    c, h, w = chw

    def fits(expected: tuple[int, ...]) -> bool:
        return len(dims) == len(expected) + 1 and all(
            not isinstance(d, int) or d <= 0 or d == e for d, e in zip(dims[1:], expected))

    if fits((c, h, w)):
        return "nchw"
    if fits((h, w, c)):
        return "nhwc"
    if fits((c * h * w,)):
        return "flat"
    hint = _FIX_HINT
    wanted = {d for d in (dims[1], dims[-1]) if len(dims) == 4 and d in (1, 3)}
    if wanted and c not in wanted:      # a channel count the images do not have
        hint = f"use --channels {'gray' if 1 in wanted else 'rgb'} (or the model's --preset)"
    raise DataError(f"model input '{inp.name}' expects shape {_shape_str(dims)} but the images "
                    f"give {_shape_str(['N', c, h, w])}; {hint}")


def predict_logits(session: ort.InferenceSession, tensors: Images | TensorSet,
                   batch_size: int = 64,
                   progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Run every sample through ``session``; return its first output as float32 ``(N, -1)``
    (a classifier's logits; ``(N, 1000, 1, 1)`` -> ``(N, 1000)``). See :func:`predict_outputs`."""
    (first,) = predict_outputs(session, tensors, batch_size, progress,
                               outputs=[session.get_outputs()[0].name])
    return first.reshape(len(first), -1)


def predict_outputs(session: ort.InferenceSession, tensors: Images | TensorSet,
                    batch_size: int = 64, progress: Callable[[int], None] | None = None,
                    outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run every sample through ``session``; return each output (all, or ``outputs``) over the
    samples, float32 with its shape (integer and bool outputs keep their type).

    Tensor data (:class:`onnxbits.data.tensors.TensorSet`) feeds the inputs by name. Images feed
    the single float input as NCHW, NHWC (transposed) or ``[N, C*H*W]`` (flattened), whichever
    its declared shape allows. A model whose batch dimension is fixed runs in batches of that
    size (the last one padded).

    Args:
        session: From :func:`make_session`.
        tensors: The decoded images or the tensor data.
        batch_size: Samples per run when the batch dimension is dynamic.
        progress: Called with the number of samples just finished.
        outputs: The output names to return; None: every output.

    Raises:
        DataError: The data does not fit the model's declared inputs.
        InvalidModelError: Images for a model that needs several inputs or a non-float input.
    """
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    layout = None
    if not isinstance(tensors, TensorSet):
        if len(inputs) != 1:
            raise InvalidModelError(f"the model has {len(inputs)} inputs ({', '.join(names)}); "
                                    "images feed one input: give tensor data (--data FILE.npz "
                                    "with one array per input)")
        if _INPUT_TYPES.get(inputs[0].type) is None:
            raise InvalidModelError(f"model input '{inputs[0].name}' has type {inputs[0].type}; "
                                    "images feed a float input: give tensor data "
                                    "(--data FILE.npz)")
        layout = _layout(inputs[0], tensors.shape)
    dtypes = [_INPUT_TYPES.get(i.type) for i in inputs]
    batch_dim = inputs[0].shape[0] if inputs[0].shape else None
    fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    step = fixed or max(1, batch_size)
    wanted = outputs or [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in wanted]
    batches = iterate_batches(len(tensors), step, shuffle=False, seed=0)
    for indices, x, _ in read_ahead(tensors, batches):
        parts = list(x) if isinstance(x, tuple) else [x]
        rows = len(parts[0])
        if rows == 0:
            continue
        if layout == "nhwc":
            parts = [np.ascontiguousarray(parts[0].transpose(0, 2, 3, 1))]
        elif layout == "flat":
            parts = [parts[0].reshape(rows, -1)]
        if fixed is not None and rows < fixed:
            parts = [np.concatenate([p, np.zeros((fixed - rows, *p.shape[1:]), p.dtype)])
                     for p in parts]
        feed = {n: (p.astype(d, copy=False) if d is not None else p)
                for n, p, d in zip(names, parts, dtypes, strict=True)}
        shape = _shape_str(parts[0].shape)
        try:
            ys = session.run(wanted, feed)
        except InvalidArgument as exc:   # the inputs do not fit: a preprocessing matter
            raise DataError(f"ONNX Runtime refused model input '{names[0]}' with a batch of "
                            f"shape {shape}: {_first_line(exc)}; "
                            f"{_FIX_HINT if layout else 'check the arrays'}") from exc
        except (Fail, RuntimeException, NotImplemented, EPFail) as exc:  # the model failed
            fix = "--preset, --resize/--crop" if layout else "other arrays"
            raise InvalidModelError(f"ONNX Runtime failed running the model on a batch of "
                                    f"shape {shape}: {_first_line(exc)}; where "
                                    "a node's shape is the cause, the inputs may need another "
                                    f"size ({fix})") from exc
        for chunk, y in zip(chunks, ys, strict=True):
            y = np.asarray(y)
            chunk.append((y.astype(np.float32, copy=False) if y.dtype.kind == "f" else y)[:rows])
        if progress is not None:
            progress(len(indices))
    if not chunks[0]:
        raise DataError("no samples to run the model on")
    return [np.concatenate(c) for c in chunks]


def topk_accuracy(logits: np.ndarray, labels: np.ndarray) -> EvalResult:
    """Return top-1/top-5 accuracy (percent) of ``logits (N, K)`` against ``labels (N,)``.

    Top-5 counts the label among the ``min(5, K)`` largest logits.

    >>> topk_accuracy(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([1, 1])).to_dict()
    {'top1': 50.0, 'top5': 100.0, 'n': 2}

    Raises:
        DataError: A label is unknown (< 0) or not below the number of model outputs.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or len(logits) != len(labels):
        raise DataError(f"logits {logits.shape} do not match {len(labels)} labels")
    if len(labels) == 0:
        raise DataError("no labelled images to score")
    k = logits.shape[1]
    if labels.min() < 0:
        raise DataError("some images have no label; accuracy needs labels.csv or class folders")
    if labels.max() >= k:
        raise DataError(f"label {labels.max()} out of range for {k} model outputs; "
                        "check --label-offset/--classes")
    top = min(5, k)
    # one ranking for both, ties broken by index as argmax does (so every top-1 hit is a top-5
    # hit): the label's rank is the number of logits above it, plus equal ones at lower indices
    true = logits[np.arange(len(labels)), labels][:, None]
    earlier = np.arange(k)[None, :] < labels[:, None]
    rank = (logits > true).sum(axis=1) + ((logits == true) & earlier).sum(axis=1)
    top1 = rank == 0
    top5 = rank < top
    n = len(labels)
    return EvalResult(top1=float(100.0 * top1.sum() / n), top5=float(100.0 * top5.sum() / n), n=n)


def evaluate_model(model: ModelLike | ort.InferenceSession, tensors: Images,
                   batch_size: int = 64, threads: int | None = None,
                   progress: Callable[[int], None] | None = None) -> EvalResult:
    """Return the top-1/top-5 accuracy of ``model`` on the labelled ``tensors``.

    Raises:
        DataError: The images have no labels or do not fit the model.
        InvalidModelError: ONNX Runtime cannot load the model.
    """
    if not tensors.has_labels:
        raise DataError("evaluation needs labels; give a folder with labels.csv or class "
                        "sub-folders (a flat folder of images has none)")
    session = (model if isinstance(model, ort.InferenceSession)
               else make_session(model, threads=threads))
    logits = predict_logits(session, tensors, batch_size=batch_size, progress=progress)
    return topk_accuracy(logits, tensors.kept_labels())


def agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Return the percent of rows whose argmax agrees (for data without labels).

    >>> agreement(np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[2.0, 1.0], [3.0, 1.0]]))
    50.0
    """
    a, b = np.asarray(logits_a), np.asarray(logits_b)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise DataError(f"cannot compare logits of shapes {a.shape} and {b.shape}")
    return float(100.0 * np.mean(np.argmax(a, axis=1) == np.argmax(b, axis=1)))


def evaluate_fidelity(model: ModelLike, reference: str | Path, tensors: Images | TensorSet,
                      batch_size: int = 64, threads: int | None = None,
                      progress: Callable[[int], None] | None = None) -> list[Fidelity]:
    """Every output's fidelity (:mod:`onnxbits.report.fidelity`) of ``model`` against the
    ``reference`` model (the float one) on ``tensors``, both in ONNX Runtime.

    Raises:
        InvalidModelError: A model cannot be loaded, or their outputs differ in name.
        DataError: The data does not fit the models.
    """
    from onnxbits.graph.io import load_model

    described = graph_outputs(load_model(reference))
    session, ref = make_session(model, threads=threads), make_session(reference, threads=threads)
    names = [o.name for o in session.get_outputs()]
    if names != [o.name for o in described]:
        raise InvalidModelError(f"{_model_name(model)} has outputs {names} but the reference "
                                f"{reference} has {[o.name for o in described]}; give the float "
                                "model this one was made from as --reference")
    got = predict_outputs(session, tensors, batch_size, progress)
    want = predict_outputs(ref, tensors, batch_size)
    return fidelities(want, got, described)
