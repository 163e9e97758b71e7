"""Emit: the original ONNX graph with Q/DQ (or packed weights) at the learned bits, its
quantization parameters, fusion rewrites and verification against ONNX Runtime.

May import :mod:`onnxbits.quant`, :mod:`onnxbits.importer`, :mod:`onnxbits.graph` and
:mod:`onnxbits.errors`.
"""
