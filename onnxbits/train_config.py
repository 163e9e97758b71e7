"""Hyper-parameters of the fine-tune and the schedules they imply: the length of each phase
(:meth:`TrainConfig.learn_steps`, :meth:`TrainConfig.n_frozen`, :meth:`TrainConfig.rounding_steps`)
and the bit-annealing sharpness (:meth:`TrainConfig.sharpness`). The phases themselves are
described in :mod:`onnxbits.train`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["MAX_SHARPNESS", "ONLINE_AUGMENTS", "TrainConfig"]


#: Augmentations drawn anew at every step, with the float graph's output on them as teacher
#: (:mod:`onnxbits.augment`); ``flip`` is not one: its mirror images are fixed inputs.
ONLINE_AUGMENTS = ("crop", "mix")
MAX_SHARPNESS = 100.0   # h at the end of bit annealing: a_h in (0, 1) only where |a - 1/2| < 0.005


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the fine-tune (:mod:`onnxbits.train` describes the phases)."""

    steps: int = 300
    frozen_steps: int | None = None      # default: 30 % of steps
    batch_size: int = 64
    lr: float = 1e-4                     # Adam, weights (and biases unless bias_lr)
    bias_lr: float | None = None         # Adam, biases; default lr
    alpha_lr: float = 1e-2               # Adam, log clip values
    bits_lr: float | None = None         # Adam, bitlengths; default 2 (max - min) / learn steps
    lam: float = 0.05
    objective: str = "bits"
    loss: str = "kd"                     # kd | ce | kd+ce
    temperature: float = 1.0
    act_drop: float = 0.0                # QDrop probability on activation quantizers
    feature_kd: float = 0.0              # weight of the feature loss (needs the float graph)
    weight_rounding: str = "nearest"     # nearest | learned (frozen phase)
    rounding_lr: float = 1e-2            # Adam, rounding logits V
    augment: str = "none"                # none | one of ONLINE_AUGMENTS
    bit_anneal: float = 0.0              # fraction of the learning phase that sharpens bits
    reconstruct_steps: int = 0           # block reconstruction steps per block at the freeze
    reconstruct_lr: float = 1e-4         # Adam, weights and biases during block reconstruction
    reconstruct_drop: float = 0.0        # QDrop probability while a block is reconstructed
    reconstruct_mirror: bool = False     # reconstruct on the images and their mirror images
    seed: int = 0
    amp: str | None = None               # None | bf16 | fp16 (autocast of the forward pass)

    def learn_steps(self) -> int:
        """Steps of the learning phase."""
        return self.steps - self.n_frozen()

    def rounding_steps(self) -> int:
        """Frozen-phase steps with learned rounding (80 % of them; 0 with nearest rounding)."""
        if self.weight_rounding == "nearest":
            return 0
        return int(round(0.8 * self.n_frozen()))

    def needs_float_graph(self) -> bool:
        """Feature distillation and online augmentations run the float graph at every step,
        block reconstruction block by block."""
        return self.feature_kd > 0 or self.online_teacher() or self.reconstruct_steps > 0

    def online_teacher(self) -> bool:
        """Whether every step draws new inputs (``ONLINE_AUGMENTS``) and the float graph's
        output on them is the teacher."""
        return self.augment in ONLINE_AUGMENTS

    def sharpness(self, step: int) -> float:
        """Interpolation sharpness ``h`` at a learning ``step``: 1, and over the last
        ``m = round(bit_anneal * learn)`` learning steps ``MAX_SHARPNESS ** ((step - s0 + 1) / m)``
        with ``s0 = learn - m`` (so ``h = MAX_SHARPNESS`` at the last learning step)."""
        learn = self.learn_steps()
        m = int(round(self.bit_anneal * learn))
        if m == 0 or step < learn - m or step >= learn:
            return 1.0
        return float(MAX_SHARPNESS ** ((step - (learn - m) + 1) / m))

    def n_frozen(self) -> int:
        """Steps of the frozen-bit phase."""
        if self.frozen_steps is not None:
            return min(self.frozen_steps, self.steps)
        return int(round(0.3 * self.steps))
