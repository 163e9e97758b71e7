"""The fine-tune: learn bitlengths under ``loss = task + lambda * cost``, freeze, fine-tune again.

Phase 1 (``learn``, ``steps - frozen_steps`` steps): weights, clip values and fractional
bitlengths are trained on ``task + lambda * R`` (``R`` from :mod:`onnxbits.cost`). Then every
bitlength is frozen with :func:`onnxbits.quant.quantizer.freeze_rule` (``k = floor(n + 1/2)``).
Phase 2 (``frozen``, ``frozen_steps`` steps): weights and clip values are trained on ``task``
alone at the integer bits, with a cosine-decaying learning rate.

The task loss is distillation from the float model, ``T^2 KL(softmax(t/T) || softmax(s/T))``
(no labels needed), or cross-entropy with labels. Logits shaped ``(N, C, 1, 1)`` are read as
``(N, C)``.

With a :class:`onnxbits.checkpoint.CheckpointSpec` the loop saves its state every N steps, at the
end and on Ctrl-C (deferred to the end of the step), and a resumed run continues bit for bit as
the uninterrupted run would have. Apart from those checkpoints, no I/O and no printing happen here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from onnxbits.checkpoint import CheckpointSpec, deferred_interrupt, load_checkpoint, save_checkpoint
from onnxbits.cost import average_bits, bit_cost
from onnxbits.errors import ConfigError
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
        """The record as a plain dict (JSON, checkpoints)."""
        return asdict(self)


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


def task_loss(student: Tensor, teacher: Tensor | None, labels: Tensor | None, kind: str,
              temperature: float) -> Tensor:
    """Distillation (``kd``), cross-entropy (``ce``) or their sum (``kd+ce``)."""
    student = _as_logits(student)
    teacher = _as_logits(teacher) if teacher is not None else None
    loss = student.new_zeros(())
    if "kd" in kind:
        if teacher is None:
            raise ValueError(f"loss {kind!r} needs teacher logits")
        t = temperature
        loss = loss + F.kl_div(F.log_softmax(student / t, dim=-1),
                               F.log_softmax(teacher / t, dim=-1),
                               reduction="batchmean", log_target=True) * t * t
    if "ce" in kind:
        loss = loss + F.cross_entropy(student, labels)
    return loss


def _as_logits(x: Tensor) -> Tensor:
    """``(N, C, 1, 1, ...)`` -> ``(N, C)``; other shapes unchanged."""
    if x.dim() > 2 and all(d == 1 for d in x.shape[2:]):
        return x.flatten(1)
    return x


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
              freeze: Callable[[QuantizedNetwork], object] | None = None,
              checkpoint: CheckpointSpec | None = None) -> list[StepRecord]:
    """Run both phases; ``fetch(indices) -> (inputs, labels or None)``.

    ``lam_schedule(step, lam, cost) -> lam`` may adapt lambda during the learning phase;
    ``freeze(net)`` replaces :func:`freeze_all` at the end of it (budget mode). With
    ``checkpoint``, the state is saved every ``checkpoint.every`` steps, at the end, and when a
    KeyboardInterrupt arrives (from Ctrl-C or raised by ``on_step``), which is then re-raised;
    ``checkpoint.resume`` continues from the saved state (and returns the whole history).
    """
    freeze = freeze or freeze_all
    torch.manual_seed(cfg.seed)
    run = _Run(net, cfg, batch_indices(n_train, cfg.batch_size, cfg.seed))
    if checkpoint is not None and checkpoint.resume:
        _restore(run, checkpoint)
    learn = cfg.learn_steps()
    net.graph.eval()
    with deferred_interrupt(enabled=checkpoint is not None) as guard:
        for step in range(run.step, cfg.steps):
            if step == learn and not all(q.frozen for q in net.quantizers()):
                freeze(net)
                run.new_optimizer(bits=False)
            record = _train_step(run, step, fetch, teacher_logits)
            run.history.append(record)
            if lam_schedule is not None and record.phase == "learn":
                run.lam = lam_schedule(step, run.lam, record.cost)
            run.step = step + 1
            try:
                if on_step is not None:
                    on_step(record)
                if guard.requested:
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                if checkpoint is not None:
                    save_checkpoint(checkpoint, run.state())
                raise
            if checkpoint is not None and checkpoint.due(run.step):
                save_checkpoint(checkpoint, run.state())
    if learn == cfg.steps and not all(q.frozen for q in net.quantizers()):
        freeze(net)
    if checkpoint is not None:
        save_checkpoint(checkpoint, run.state())
    return run.history


def _restore(run: _Run, checkpoint: CheckpointSpec) -> None:
    """Load ``checkpoint`` into ``run``; a checkpoint of another configuration or network is
    refused with a ConfigError."""
    state = load_checkpoint(checkpoint)
    current = asdict(run.cfg)
    saved = state.get("train_config", current)
    differ = [f"{k}: {saved.get(k)!r} then, {v!r} now" for k, v in current.items()
              if saved.get(k) != v]
    if differ:
        raise ConfigError(f"--resume: {checkpoint.path} was written with another training "
                          f"configuration ({'; '.join(differ[:4])}); run without --resume")
    try:
        run.restore(state)
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--resume: {checkpoint.path} does not fit this network ({first}); "
                          "run without --resume") from exc


class _Run:
    """The mutable state of one fine-tune: what a checkpoint saves and restores."""

    def __init__(self, net: QuantizedNetwork, cfg: TrainConfig, batches: BatchSampler) -> None:
        self.net, self.cfg, self.batches = net, cfg, batches
        self.step, self.lam = 0, cfg.lam
        self.history: list[StepRecord] = []
        self.new_optimizer(bits=cfg.learn_steps() > 0)

    def new_optimizer(self, bits: bool) -> None:
        self.opt = _optimizer(self.net, self.cfg, bits=bits)
        self.opt_bits = bits
        self.base_lrs = [float(g["lr"]) for g in self.opt.param_groups]

    def state(self) -> dict[str, Any]:
        quantizers = [{"frozen": q.frozen, "enabled": q.enabled, "exec_bits": q.exec_bits,
                       "bits_grad": q.bits.requires_grad} for q in self.net.quantizers()]
        return {"step": self.step, "lam": self.lam, "history": [r.to_dict() for r in self.history],
                "graph": self.net.graph.state_dict(), "quantizers": quantizers,
                "optimizer": self.opt.state_dict(), "opt_bits": self.opt_bits,
                "base_lrs": self.base_lrs, "sampler": self.batches.state_dict(),
                "torch_rng": torch.get_rng_state(), "train_config": asdict(self.cfg)}

    def restore(self, state: dict[str, Any]) -> None:
        self.net.graph.load_state_dict(state["graph"])
        for q, flags in zip(self.net.quantizers(), state["quantizers"], strict=True):
            q.frozen, q.enabled, q.exec_bits = flags["frozen"], flags["enabled"], flags["exec_bits"]
            q.bits.requires_grad_(flags["bits_grad"])
        self.new_optimizer(bits=state["opt_bits"])
        self.opt.load_state_dict(state["optimizer"])
        self.base_lrs = list(state["base_lrs"])
        self.batches.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.lam = int(state["step"]), float(state["lam"])
        self.history = [StepRecord(**r) for r in state["history"]]


def _train_step(run: _Run, step: int, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]],
                teacher_logits: Tensor | None) -> StepRecord:
    """One optimizer step of the learning or the frozen phase."""
    cfg, net, opt = run.cfg, run.net, run.opt
    learn = cfg.learn_steps()
    frozen = step >= learn
    if frozen:
        progress = (step - learn) / max(cfg.steps - learn, 1)
        for group, base in zip(opt.param_groups, run.base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * progress))
    idx = next(run.batches)
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
        loss = task + run.lam * cost
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if not frozen:
        for q in net.quantizers():
            q.clamp_bits()
    return StepRecord(step, "frozen" if frozen else "learn", float(loss.detach()),
                      float(task.detach()), float(cost.detach()),
                      float(average_bits(layers).detach()), run.lam)
