"""Load, check and save ONNX models. Inputs are never modified; outputs are written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx

from onnxbits.errors import InvalidModelError, OutputError

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm"}


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is an InvalidModelError naming the file.

    Weights stored as external data (next to the model) are loaded into the returned model.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file; check the model path")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a folder; pass the .onnx file inside it")
    if not os.access(path, os.R_OK):
        raise InvalidModelError(f"{path}: not readable (permission denied); check its permissions")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for truncated or foreign files
        raise InvalidModelError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}); is it truncated or not "
            "ONNX? re-export or re-download it") from exc
    if not model.graph.node:
        raise InvalidModelError(f"{path}: the ONNX graph has no nodes; is it truncated or not "
                                "ONNX?")
    external = external_data_files(model)
    if external:
        missing = [name for name in external if not (path.parent / name).is_file()]
        if missing:
            raise InvalidModelError(
                f"{path}: external data file '{missing[0]}' (the model's weights) is missing; "
                f"copy it into {path.parent} next to the model")
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:
            raise InvalidModelError(
                f"{path}: its external data ({', '.join(external)}) cannot be read "
                f"({type(exc).__name__}); is it truncated? re-export or re-download it") from exc
    try:
        onnx.checker.check_model(str(path) if external else model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path}: fails the ONNX checker: {first}") from exc
    return model


def external_data_files(model: onnx.ModelProto) -> list[str]:
    """The files (relative to the model) that hold its externally stored tensors."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return sorted({ExternalDataInfo(t).location for t in _tensors(model.graph)
                   if uses_external_data(t)})


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``graph``: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def fixed_batch(model: onnx.ModelProto) -> tuple[str, int] | None:
    """``(input name, batch)`` when the first graph input has a fixed batch dimension."""
    inits = {t.name for t in model.graph.initializer}
    first = next((i for i in model.graph.input if i.name not in inits), None)
    if first is None or not first.type.tensor_type.shape.dim:
        return None
    dim = first.type.tensor_type.shape.dim[0]
    return (first.name, int(dim.dim_value)) if dim.HasField("dim_value") and dim.dim_value > 0 \
        else None


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that show the model is already quantized (Q/DQ pairs or integer kernels)."""
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def save_model_atomic(model: onnx.ModelProto | bytes, path: str | Path) -> Path:
    """Write ``model`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidModelError(f"{path}: the output folder {folder} does not exist; create it "
                                "first")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return write_bytes_atomic(data, path)


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    return write_files_atomic({Path(path): data})[0]


def write_files_atomic(files: Mapping[Path, bytes]) -> list[Path]:
    """Write several files all or nothing as far as the disk allows: every file is first written
    and fsynced to a temporary ``.NAME.*.tmp`` beside it, and only when all of them are on disk
    are they renamed into place, in the given order (put the file whose presence means "done"
    last). A failure while writing (a full disk, a read-only folder) removes the temporaries and
    leaves every existing file as it was.

    Raises:
        OutputError: A file cannot be written; the message names it and the system's reason.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            staged.append((_staged_copy(data, Path(path)), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    return [path for _, path in staged]


def temporary_names(path: Path) -> str:
    """The glob pattern of the temporaries :func:`write_files_atomic` writes for ``path``."""
    return f".{path.name}.*.tmp"


def _staged_copy(data: bytes, path: Path) -> str:
    """``data`` written and fsynced to a new temporary file beside ``path``; its name."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write into {folder} ({exc.strerror}); "
                          "choose a writable output folder") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: writing {len(data)} bytes into {folder} failed "
                          f"({exc.strerror}); free space there or choose another output "
                          "folder (nothing was replaced)") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp
