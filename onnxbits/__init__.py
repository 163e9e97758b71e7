"""onnxbits: learned fractional bitlengths (BitPruning) for any pretrained ONNX network.

Public API (loaded on first use, so that ``import onnxbits`` stays light)::

    from onnxbits import shrink, ShrinkConfig
    result = shrink("model.onnx", ShrinkConfig(data="images/"))

Stages, each a subpackage that imports only the ones before it: :mod:`onnxbits.graph` (the ONNX
graph), :mod:`onnxbits.importer` (ONNX to torch), :mod:`onnxbits.quant` (quantizers),
:mod:`onnxbits.data`, :mod:`onnxbits.train` (the fine-tune), :mod:`onnxbits.emit` (ONNX with
Q/DQ), :mod:`onnxbits.report`; :mod:`onnxbits.pipeline` runs them in order, :mod:`onnxbits.cli`
is the command line. :mod:`onnxbits.config` and :mod:`onnxbits.errors` are leaves.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Preprocess", "ShrinkConfig", "ShrinkResult", "shrink"]

_API = {"shrink": "onnxbits.pipeline.run", "ShrinkResult": "onnxbits.pipeline.run",
        "ShrinkConfig": "onnxbits.config", "Preprocess": "onnxbits.data.preprocess"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'onnxbits' has no attribute {name!r}")
