"""Command-line interface of onnxbits (installed as the subpackage ``onnxbits.cli``)."""
