"""Import: the ONNX graph as a trainable torch graph (onnx2torch and its extra converters).

May import :mod:`onnxbits.graph` and :mod:`onnxbits.errors`.
"""
