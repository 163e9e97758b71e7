"""Quantization numerics and the quantizers: integer kernels, fake quantization, learnable-bitlength
quantizers, initial ranges, the bit cost, and the quantized torch network.

May import :mod:`onnxbits.importer`, :mod:`onnxbits.graph` and :mod:`onnxbits.errors`.
"""
