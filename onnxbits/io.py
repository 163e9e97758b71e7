"""Load, check and save ONNX models. Inputs are never modified; outputs are written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from onnxbits.errors import InvalidModelError

QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                 "ConvInteger", "MatMulInteger", "MatMulNBits", "QGemm"}


def load_model(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is an InvalidModelError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InvalidModelError(f"{path}: no such file; check the model path")
    if path.is_dir():
        raise InvalidModelError(f"{path}: is a folder; pass the .onnx file inside it")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for truncated or foreign files
        raise InvalidModelError(
            f"{path}: not a readable ONNX file ({type(exc).__name__}); is it truncated or not ONNX? "
            "re-export or re-download it") from exc
    if not model.graph.node:
        raise InvalidModelError(f"{path}: the ONNX graph has no nodes; is it truncated or not ONNX?")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelError(f"{path}: fails the ONNX checker: {first}") from exc
    return model


def quantized_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that show the model is already quantized (Q/DQ pairs or integer kernels)."""
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS]


def save_model_atomic(model: onnx.ModelProto | bytes, path: str | Path) -> Path:
    """Write ``model`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InvalidModelError(f"{path}: the output folder {folder} does not exist; create it first")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return write_bytes_atomic(data, path)


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InvalidModelError(f"{path}: cannot write into {folder} ({exc.strerror}); "
                                "choose a writable output folder") from exc
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
