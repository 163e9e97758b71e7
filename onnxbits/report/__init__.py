"""Report: per-layer bitlengths, sizes and BOPs of an emitted model, plots, training history,
accuracy in ONNX Runtime and side-by-side comparisons.

May import :mod:`onnxbits.graph`, :mod:`onnxbits.data`, :mod:`onnxbits.emit` (metadata
and packed sizes) and :mod:`onnxbits.errors`; nothing here imports torch at import time.
"""
