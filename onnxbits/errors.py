"""Error types: every user-facing failure is an OnnxbitsError with a one-line message.

The message says what went wrong, where (file, node, option) and how to fix it.
"""

from __future__ import annotations


class OnnxbitsError(Exception):
    """Base class for errors a user can act on (the CLI prints them as one line, exit 1)."""


class InvalidModelError(OnnxbitsError):
    """The ONNX file is missing, unreadable, invalid or unsuitable."""


class UnsupportedOpError(OnnxbitsError):
    """An ONNX operator cannot be converted to torch."""


class DataError(OnnxbitsError):
    """The image data is missing, empty, unreadable or does not match the model."""


class ConfigError(OnnxbitsError):
    """An option or a combination of options is invalid (the CLI exits 2)."""


class OutputError(OnnxbitsError):
    """An output cannot be written: a read-only folder, a full disk, another run writing it."""


class VerificationError(OnnxbitsError):
    """The emitted ONNX model does not match the torch model it was emitted from."""
