"""A batch of model inputs as the imported torch graph takes it.

A single-input model takes one tensor; a model with several inputs a tuple of tensors, one per
graph input in the ONNX graph's order (the positional arguments of the ``fx.GraphModule``). The
helpers here accept either, so that the fine-tune, calibration and verification run any model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

Batch = Tensor | tuple[Tensor, ...]

__all__ = ["Batch", "as_tensors", "call", "concat", "feeds", "first", "map_batch", "rows"]


def call(graph: Callable[..., Any], x: Batch) -> Any:
    """``graph(x)``, or ``graph(*x)`` for a tuple of inputs."""
    return graph(*x) if isinstance(x, tuple) else graph(x)


def first(x: Batch) -> Tensor:
    """The first input."""
    return x[0] if isinstance(x, tuple) else x


def rows(x: Batch) -> int:
    """The number of samples in the batch."""
    return int(first(x).shape[0])


def map_batch(fn: Callable[[Tensor], Tensor], x: Batch) -> Batch:
    """``fn`` applied to every input."""
    return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)


def pieces(x: Batch, size: int | None) -> list[Batch]:
    """``x`` in consecutive pieces of at most ``size`` samples (``[x]`` when ``size`` is None).

    >>> [rows(p) for p in pieces(torch.zeros(5, 2), 2)]
    [2, 2, 1]
    """
    n = rows(x)
    if size is None or size >= n:
        return [x]
    return [map_batch(lambda t, s=slice(i, i + size): t[s], x) for i in range(0, n, size)]


def as_tensors(x: np.ndarray | tuple[np.ndarray, ...]) -> Batch:
    """Numpy arrays (one, or a tuple) as tensors sharing their memory."""
    if isinstance(x, tuple):
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in x)
    return torch.from_numpy(x)


def concat(batches: Sequence[Batch]) -> Batch:
    """The batches joined along the sample axis."""
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))
    return torch.cat(list(batches))


def feeds(x: Batch | np.ndarray | tuple[np.ndarray, ...], names: Sequence[str]
          ) -> dict[str, np.ndarray]:
    """ONNX Runtime's input feed ``{name: array}`` for the batch, ``names`` in input order."""
    parts = x if isinstance(x, tuple) else (x,)
    return {n: (p.numpy() if isinstance(p, Tensor) else p)
            for n, p in zip(names, parts, strict=True)}
