"""The fine-tune: learn bitlengths under ``loss = task + lambda * cost``, freeze, fine-tune again.

Phase 1 (``learn``, ``steps - frozen_steps`` steps): weights, clip values and fractional
bitlengths are trained on ``task + lambda * R`` (``R`` from :mod:`onnxbits.cost`). Then every
bitlength is frozen with :func:`onnxbits.quant.quantizer.freeze_rule` (``k = floor(n + 1/2)``).
Phase 2 (``frozen``, ``frozen_steps`` steps): weights and clip values are trained on ``task``
alone at the integer bits, with a cosine-decaying learning rate.

The task loss is distillation from the float model, ``T^2 KL(softmax(t/T) || softmax(s/T))``
(no labels needed), or cross-entropy with labels. No I/O and no printing happen here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onnxbits.cost import average_bits, bit_cost
from onnxbits.insert import QuantizedNetwork, layer_bits


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the fine-tune (see the module docstring for the phases)."""

    steps: int = 300
    frozen_steps: int | None = None      # default: 30 % of steps
    batch_size: int = 64
    lr: float = 1e-4                     # Adam, weights and biases
    alpha_lr: float = 1e-2               # Adam, log clip values
    bits_lr: float | None = None         # Adam, bitlengths; default 2 (max - min) / learn steps
    lam: float = 0.05
    objective: str = "bits"
    loss: str = "kd"                     # kd | ce | kd+ce
    temperature: float = 1.0
    seed: int = 0

    def learn_steps(self) -> int:
        """Steps of the learning phase."""
        return self.steps - self.n_frozen()

    def n_frozen(self) -> int:
        """Steps of the frozen-bit phase."""
        if self.frozen_steps is not None:
            return min(self.frozen_steps, self.steps)
        return int(round(0.3 * self.steps))


@dataclass
class StepRecord:
    """One row of the training history."""

    step: int
    phase: str
    loss: float
    task: float
    cost: float
    avg_bits: float
    lam: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled mini-batches of ``range(n)`` (a new seeded permutation each epoch)."""
    rng = np.random.default_rng(seed)
    size = min(batch_size, n)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


def task_loss(student: Tensor, teacher: Tensor | None, labels: Tensor | None, kind: str,
              temperature: float) -> Tensor:
    """Distillation (``kd``), cross-entropy (``ce``) or their sum (``kd+ce``)."""
    loss = student.new_zeros(())
    if "kd" in kind:
        t = temperature
        loss = loss + F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                               reduction="batchmean", log_target=True) * t * t
    if "ce" in kind:
        loss = loss + F.cross_entropy(student, labels)
    return loss


def _optimizer(net: QuantizedNetwork, cfg: TrainConfig, bits: bool) -> torch.optim.Optimizer:
    groups = [{"params": net.weight_parameters(), "lr": cfg.lr},
              {"params": net.alpha_parameters(), "lr": cfg.alpha_lr}]
    if bits:
        lo, hi = net.quantizers()[0].min_bits, net.quantizers()[0].max_bits
        default = 2.0 * max(hi - lo, 1) / max(cfg.learn_steps(), 1)
        groups.append({"params": net.bit_parameters(), "lr": cfg.bits_lr or default})
    return torch.optim.Adam(groups)


def freeze_all(net: QuantizedNetwork) -> None:
    """Freeze every quantizer's bitlength with the one freeze rule."""
    for q in net.quantizers():
        q.freeze()


def fine_tune(net: QuantizedNetwork, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]],
              teacher_logits: Tensor | None, n_train: int, cfg: TrainConfig,
              on_step: Callable[[StepRecord], None] | None = None,
              lam_schedule: Callable[[int, float, float], float] | None = None,
              freeze: Callable[[QuantizedNetwork], object] | None = None) -> list[StepRecord]:
    """Run both phases; ``fetch(indices) -> (inputs, labels or None)``.

    ``lam_schedule(step, lam, cost) -> lam`` may adapt lambda during the learning phase;
    ``freeze(net)`` replaces :func:`freeze_all` at the end of it (budget mode).
    """
    freeze = freeze or freeze_all
    torch.manual_seed(cfg.seed)
    batches = batch_indices(n_train, cfg.batch_size, cfg.seed)
    learn = cfg.learn_steps()
    opt = _optimizer(net, cfg, bits=learn > 0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    lam = cfg.lam
    history: list[StepRecord] = []
    net.graph.eval()
    for step in range(cfg.steps):
        if step == learn and not all(q.frozen for q in net.quantizers()):
            freeze(net)
            opt = _optimizer(net, cfg, bits=False)
            base_lrs = [g["lr"] for g in opt.param_groups]
        frozen = step >= learn
        if frozen:
            progress = (step - learn) / max(cfg.steps - learn, 1)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * 0.5 * (1 + math.cos(math.pi * progress))
        idx = next(batches)
        x, labels = fetch(idx)
        teacher = teacher_logits[idx] if teacher_logits is not None else None
        out = net(x)
        task = task_loss(out, teacher, labels, cfg.loss, cfg.temperature)
        layers = layer_bits(net)
        if frozen:
            cost = bit_cost(cfg.objective, layers).detach()
            loss = task
        else:
            cost = bit_cost(cfg.objective, layers)
            loss = task + lam * cost
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not frozen:
            for q in net.quantizers():
                q.clamp_bits()
        record = StepRecord(step, "frozen" if frozen else "learn", float(loss.detach()),
                            float(task.detach()), float(cost.detach()),
                            float(average_bits(layers).detach()), lam)
        history.append(record)
        if lam_schedule is not None and not frozen:
            lam = lam_schedule(step, lam, record.cost)
        if on_step is not None:
            on_step(record)
    if learn == cfg.steps and not all(q.frozen for q in net.quantizers()):
        freeze(net)
    return history
