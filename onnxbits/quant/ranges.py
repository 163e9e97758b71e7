"""Integer ranges of k-bit quantization (pure functions, no torch).

Signed weights use the narrow symmetric range ``[-(2^(k-1) - 1), 2^(k-1) - 1]`` so that the
zero point is 0 and the grid is symmetric. Signed activations use the full two's-complement range
``[-2^(k-1), 2^(k-1) - 1]`` because that is where ONNX QuantizeLinear saturates an int8/int16
container. Unsigned values use ``[0, 2^k - 1]``. The step of a quantizer with clip value
``alpha`` is always ``alpha / qmax``.
"""

from __future__ import annotations


def qrange(bits: int, signed: bool, narrow: bool = False) -> tuple[int, int]:
    """Return ``(qmin, qmax)`` of ``bits``-bit integers.

    >>> qrange(4, signed=False)
    (0, 15)
    >>> qrange(4, signed=True)
    (-8, 7)
    >>> qrange(4, signed=True, narrow=True)
    (-7, 7)
    >>> qrange(2, signed=True, narrow=True)
    (-1, 1)
    """
    if bits < 2 and signed:
        raise ValueError(f"signed quantization needs at least 2 bits, got {bits}")
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if not signed:
        return 0, 2**bits - 1
    qmax = 2 ** (bits - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def container_bits(bits: int) -> int:
    """Smallest ONNX integer container (2, 4, 8, 16 or 32 bits) that holds ``bits``-bit values.

    >>> [container_bits(b) for b in (2, 3, 4, 5, 8, 9)]
    [2, 4, 4, 8, 8, 16]
    """
    for size in (2, 4, 8, 16, 32):
        if bits <= size:
            return size
    raise ValueError(f"bits must be <= 32, got {bits}")
