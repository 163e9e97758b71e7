"""Fine-tune: the loop and its configuration, losses, the bit budget, data parallelism,
checkpoints, block reconstruction, the accuracy guard, devices.

May import :mod:`onnxbits.quant`, :mod:`onnxbits.data`, :mod:`onnxbits.graph`,
:mod:`onnxbits.config` and :mod:`onnxbits.errors`.
"""
