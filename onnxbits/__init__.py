"""onnxbits: learned fractional bitlengths (BitPruning) for any pretrained ONNX network.

Public API::

    from onnxbits import shrink, ShrinkConfig
    result = shrink("model.onnx", ShrinkConfig(data="images/"))
"""

from __future__ import annotations

__version__ = "0.1.0"
