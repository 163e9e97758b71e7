"""The ONNX graph: load and save, the index of layers and activations, normalisation and
rewrites before import, MAC counts.

Imports only onnx, numpy and :mod:`onnxbits.errors`; nothing here imports torch.
"""
