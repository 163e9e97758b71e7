"""Hyper-parameters of the fine-tune and the length of each phase they imply
(:meth:`TrainConfig.learn_steps`, :meth:`TrainConfig.n_frozen`). The phases themselves are
described in :mod:`onnxbits.train.loop`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the fine-tune (:mod:`onnxbits.train.loop` describes the phases)."""

    steps: int = 300
    frozen_steps: int | None = None      # default: 30 % of steps
    batch_size: int = 64
    lr: float = 1e-4                     # Adam, weights and biases
    alpha_lr: float = 1e-2               # Adam, log clip values
    bits_lr: float | None = None         # Adam, bitlengths; default 2 (max - min) / learn steps
    lam: float = 0.05
    objective: str = "bits"
    loss: str = "kd"                     # kd | ce | kd+ce
    reconstruct_steps: int = 0           # block reconstruction steps per block at the freeze
    seed: int = 0
    amp: str | None = None               # None | bf16 | fp16 (autocast of the forward pass)
    micro_batch: int | None = None       # rows per forward/backward pass; None: the whole batch

    def learn_steps(self) -> int:
        """Steps of the learning phase."""
        return self.steps - self.n_frozen()

    def needs_float_graph(self) -> bool:
        """Block reconstruction runs the float graph block by block."""
        return self.reconstruct_steps > 0

    def n_frozen(self) -> int:
        """Steps of the frozen-bit phase."""
        if self.frozen_steps is not None:
            return min(self.frozen_steps, self.steps)
        return int(round(0.3 * self.steps))
