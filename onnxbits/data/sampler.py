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
        self.epoch = 0
        self._epoch_state: dict[str, Any] | None = None   # generator state that drew ``order``

    def __next__(self) -> np.ndarray:
        if self.position + self.size > len(self.order):
            self._new_epoch()
        batch = self.order[self.position:self.position + self.size]
        self.position += self.size
        return batch

    def peek(self) -> np.ndarray | None:
        """The batch :meth:`__next__` returns next, or None when it starts a new epoch."""
        if self.position + self.size > len(self.order):
            return None
        return self.order[self.position:self.position + self.size]

    def _new_epoch(self) -> None:
        self._epoch_state = self.rng.bit_generator.state
        self.order, self.position = self.rng.permutation(self.n), 0
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for a checkpoint, of constant size: the permutation is stored as
        the generator state that drew it, not as ``n`` indices."""
        return {"epoch_rng": self._epoch_state, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict`."""
        if state["epoch_rng"] is None:       # saved before the first batch
            self.order, self.position, self._epoch_state = np.empty(0, dtype=np.int64), 0, None
        else:                                # draw that epoch's permutation again
            self.rng.bit_generator.state = state["epoch_rng"]
            self._new_epoch()
            self.position = int(state["position"])
        self.epoch = int(state["epoch"])


def batch_indices(n: int, batch_size: int, seed: int) -> BatchSampler:
    """Endless shuffled mini-batches of ``range(n)`` (a new seeded permutation each epoch)."""
    return BatchSampler(n, batch_size, seed)
