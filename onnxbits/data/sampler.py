"""The fine-tune's mini-batches: endless seeded shuffles of the training set.

Every process of a data-parallel run draws the same global batches from the same seed and takes
its shard of each (:func:`onnxbits.train.distributed.shard`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


class BatchSampler(Iterator[np.ndarray]):
    """Endless shuffled mini-batches of ``range(n)``: a new seeded permutation each epoch, cut
    into ``min(batch_size, n)``-sized batches (a short remainder is dropped).

    Its state (the generator's state, the current permutation and the position in it) can be
    saved and restored, so a resumed run draws the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.size = n, min(batch_size, n)
        self.rng = np.random.default_rng(seed)
        self.order: np.ndarray = np.empty(0, dtype=np.int64)
        self.position = 0

    def __next__(self) -> np.ndarray:
        if self.position + self.size > len(self.order):
            self.order, self.position = self.rng.permutation(self.n), 0
        batch = self.order[self.position:self.position + self.size]
        self.position += self.size
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for a checkpoint."""
        return {"rng": self.rng.bit_generator.state, "order": self.order.tolist(),
                "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.rng.bit_generator.state = state["rng"]
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.position = int(state["position"])


def batch_indices(n: int, batch_size: int, seed: int) -> BatchSampler:
    """Endless shuffled mini-batches of ``range(n)`` (a new seeded permutation each epoch)."""
    return BatchSampler(n, batch_size, seed)
