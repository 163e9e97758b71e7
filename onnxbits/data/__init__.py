"""Data: image files and labels, preprocessing, decoding, the batches a run draws.

May import :mod:`onnxbits.errors` and :mod:`onnxbits.config`.
"""
