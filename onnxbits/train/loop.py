"""The fine-tune: learn bitlengths under ``loss = task + lambda * cost``, freeze, fine-tune again.

Phase 1 (``learn``, ``steps - frozen_steps`` steps): weights, clip values and fractional
bitlengths are trained on ``task + lambda * R`` (``R`` from :mod:`onnxbits.quant.cost`). Then every
bitlength is frozen with :func:`onnxbits.quant.quantizer.freeze_rule` (``k = floor(n + 1/2)``).
Phase 2 (``frozen``, ``frozen_steps`` steps): weights and clip values are trained on ``task``
alone at the integer bits, with a cosine-decaying learning rate. With ``reconstruct_steps = K >
0`` phase 2 starts with block-wise reconstruction on the fine-tune images
(:mod:`onnxbits.train.reconstruct`, ``K`` steps per block; without a phase 2 it follows the final
freeze; its stored tensors take at most ``RECONSTRUCT_MEMORY_SHARE`` of the device's free
memory, with fewer images if need be).

The task loss is distillation from the float model, ``T^2 KL(softmax(t/T) || softmax(s/T))``
(no labels needed), or cross-entropy with labels. Logits shaped ``(N, C, 1, 1)`` are read as
``(N, C)``.

The network may sit on any device: batches and teacher logits go to the device of its parameters,
and with ``amp`` the forward pass runs under ``torch.autocast`` (bf16, or fp16 with a gradient
scaler); the losses are computed in float32. With a
:class:`onnxbits.train.distributed.DistContext` of several processes, each process computes its shard of
the global batch and the gradients are combined as :mod:`onnxbits.train.distributed` states, so that the
run follows the single-process run; only rank 0 writes checkpoints.

With a :class:`onnxbits.train.checkpoint.CheckpointSpec` the loop saves its state every N steps, at the
end and on Ctrl-C (deferred to the end of the step), and a resumed run continues bit for bit as
the uninterrupted run would have. Apart from those checkpoints, no I/O and no printing happen here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
from torch import Tensor, fx, nn

from onnxbits.data.sampler import BatchSampler, batch_indices
from onnxbits.errors import ConfigError
from onnxbits.importer.batch import Batch, map_batch, pieces, rows
from onnxbits.quant.cost import average_bits, bit_cost
from onnxbits.quant.network import QuantizedNetwork, layer_bits
from onnxbits.train.checkpoint import (
    CheckpointSpec,
    deferred_interrupt,
    load_checkpoint,
    save_checkpoint,
)
from onnxbits.train.config import TrainConfig
from onnxbits.train.device import autocast, available_memory, fast_layout
from onnxbits.train.distributed import (
    DistContext,
    any_rank,
    average_gradients,
    broadcast_,
    local_world_size,
    shard,
)
from onnxbits.train.history import StepRecord
from onnxbits.train.losses import task_loss
from onnxbits.train.reconstruct import BlockResult, ReconstructConfig, gather_images, reconstruct

#: ``teacher(inputs, indices) -> float outputs`` of a batch (one per graph output).
Teacher = Callable[[Tensor, np.ndarray], tuple[Tensor, ...]]

# Share of the device's free memory that block reconstruction's stored tensors may take
# (fewer images beyond it); the rest is for the block's own training step and the run.
RECONSTRUCT_MEMORY_SHARE = 0.7

__all__ = ["StepRecord", "fine_tune", "freeze_all"]


def _optimizer(net: QuantizedNetwork, cfg: TrainConfig, bits: bool) -> torch.optim.Optimizer:
    groups = [{"params": net.kernel_parameters(), "lr": cfg.lr},
              {"params": net.bias_parameters(), "lr": cfg.lr},
              {"params": net.alpha_parameters(), "lr": cfg.alpha_lr}]
    if bits:
        lo, hi = net.quantizers()[0].min_bits, net.quantizers()[0].max_bits
        default = 2.0 * max(hi - lo, 1) / max(cfg.learn_steps(), 1)
        lr = default if cfg.bits_lr is None else cfg.bits_lr
        groups.append({"params": net.bit_parameters(), "lr": lr})
    return torch.optim.Adam(groups)


def freeze_all(net: QuantizedNetwork) -> None:
    """Freeze every quantizer's bitlength with the one freeze rule."""
    for q in net.quantizers():
        q.freeze()


def fine_tune(net: QuantizedNetwork, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]],
              teacher_logits: Tensor | Teacher | None, n_train: int, cfg: TrainConfig,
              on_step: Callable[[StepRecord], None] | None = None,
              lam_schedule: Callable[[int, float, float], float] | None = None,
              freeze: Callable[[QuantizedNetwork], object] | None = None,
              checkpoint: CheckpointSpec | None = None,
              dist: DistContext | None = None,
              float_graph: nn.Module | None = None,
              on_block: Callable[[BlockResult], None] | None = None,
              read_ahead: bool = False) -> list[StepRecord]:
    """Run both phases; ``fetch(indices) -> (inputs, labels or None)``.

    The distillation target is ``teacher_logits[indices]`` (a tensor of every image's float
    logits) or ``teacher_logits(inputs, indices)`` (a callable run on each batch, e.g.
    :class:`onnxbits.train.teacher.OnlineTeacher`).

    ``lam_schedule(step, lam, cost) -> lam`` may adapt lambda during the learning phase;
    ``freeze(net)`` replaces :func:`freeze_all` at the end of it (budget mode). With
    ``checkpoint``, the state is saved every ``checkpoint.every`` steps, at the end, and when a
    KeyboardInterrupt arrives (from Ctrl-C or raised by ``on_step``), which is then re-raised;
    ``checkpoint.resume`` continues from the saved state (and returns the whole history).
    With ``dist`` (several processes) every process must call this with the same arguments;
    ``fetch`` receives the process's shard of each global batch. ``float_graph`` (on the
    network's device) is needed when :meth:`TrainConfig.needs_float_graph`; ``on_block``
    receives each reconstructed block's result. With ``read_ahead`` the next batch is fetched
    in a background thread while this step trains (for data decoded on the fly).
    """
    if cfg.needs_float_graph() and float_graph is None:
        raise ValueError("reconstruct_steps > 0 needs the float graph")
    freeze = _synced_freeze(freeze or freeze_all, dist)
    torch.manual_seed(cfg.seed)
    run = _Run(net, cfg, batch_indices(n_train, cfg.batch_size, cfg.seed), n_train, dist)
    run.fetch = _ReadAhead(fetch) if read_ahead else None
    if checkpoint is not None and checkpoint.resume:
        _restore(run, checkpoint)
    if run.dist.active:
        broadcast_([*net.graph.parameters(), *net.graph.buffers()])
    if isinstance(teacher_logits, Tensor):
        teacher_logits = teacher_logits.to(run.device)
    learn = cfg.learn_steps()
    save = checkpoint if run.dist.is_main else None    # only rank 0 writes checkpoints
    net.graph.eval()
    if float_graph is not None:
        float_graph.eval()
    with deferred_interrupt(enabled=checkpoint is not None) as guard, \
            (closing(run.fetch) if run.fetch is not None else nullcontext()):
        for step in range(run.step, cfg.steps):
            if step == learn and not all(q.frozen for q in net.quantizers()):
                freeze(net)
                run.new_optimizer(bits=False)
            if step == learn and cfg.reconstruct_steps > 0:
                _reconstruct(run, fetch, n_train, float_graph, on_block)
            record = _train_step(run, step, fetch, teacher_logits)
            run.history.append(record)
            if lam_schedule is not None and record.phase == "learn":
                run.lam = lam_schedule(step, run.lam, record.cost)
            run.step = step + 1
            try:
                if on_step is not None:
                    on_step(record)
                if (any_rank(guard.requested, run.dist) if checkpoint is not None
                        else guard.requested):
                    raise KeyboardInterrupt
            except KeyboardInterrupt:
                if save is not None:
                    save_checkpoint(save, run.state())
                raise
            if save is not None and save.due(run.step):
                save_checkpoint(save, run.state())
    if learn == cfg.steps and not all(q.frozen for q in net.quantizers()):
        freeze(net)
        if cfg.reconstruct_steps > 0:
            _reconstruct(run, fetch, n_train, float_graph, on_block)
    if save is not None:
        save_checkpoint(save, run.state())
    return run.history


def _reconstruct(run: _Run, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]],
                 n_train: int, float_graph: nn.Module | None,
                 on_block: Callable[[BlockResult], None] | None) -> None:
    """Block reconstruction on the fine-tune images, then a fresh optimizer; with several
    processes every process computes it and rank 0's parameters are broadcast."""
    if not isinstance(float_graph, fx.GraphModule):
        raise ValueError("block reconstruction needs the float graph as an fx.GraphModule")
    cfg = run.cfg
    rcfg = ReconstructConfig(steps=cfg.reconstruct_steps, batch_size=cfg.batch_size,
                             seed=cfg.seed)
    free = available_memory(run.device)
    if free is not None and run.device.type == "cpu":      # torchrun processes share the RAM
        free //= local_world_size()
    reconstruct(run.net, float_graph, gather_images(fetch, n_train, rcfg, run.device), rcfg,
                on_block if run.dist.is_main else None,
                memory=None if free is None else int(RECONSTRUCT_MEMORY_SHARE * free))
    if run.dist.active:
        broadcast_([*run.net.graph.parameters(), *run.net.graph.buffers()])
    run.new_optimizer(bits=False)


def _synced_freeze(freeze: Callable[[QuantizedNetwork], object],
                   dist: DistContext | None) -> Callable[[QuantizedNetwork], object]:
    """``freeze``, followed with several processes by copying rank 0's frozen bits to all."""
    if dist is None or not dist.active:
        return freeze

    def run(net: QuantizedNetwork) -> None:
        freeze(net)
        broadcast_([q.frozen_bits for q in net.quantizers()])
    return run


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


class _ReadAhead:
    """``fetch`` with the next batch read in a background thread while a step trains."""

    def __init__(self, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]]) -> None:
        self.fetch = fetch
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: tuple[np.ndarray, Future[tuple[Tensor, Tensor | None]]] | None = None

    def __call__(self, idx: np.ndarray, upcoming: np.ndarray | None
                 ) -> tuple[Tensor, Tensor | None]:
        pending, self.pending = self.pending, None
        if pending is not None and np.array_equal(pending[0], idx):
            batch = pending[1].result()
        else:
            batch = self.fetch(idx)
        if upcoming is not None:
            self.pending = (upcoming, self.pool.submit(self.fetch, upcoming))
        return batch

    def close(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
        self.pool.shutdown(wait=True)


class _Run:
    """The mutable state of one fine-tune: what a checkpoint saves and restores."""

    def __init__(self, net: QuantizedNetwork, cfg: TrainConfig, batches: BatchSampler,
                 n_train: int, dist: DistContext | None = None) -> None:
        self.net, self.cfg, self.batches, self.n_train = net, cfg, batches, n_train
        self.device = net.device
        self.dist = dist or DistContext(device=self.device)
        self.step, self.lam = 0, cfg.lam
        self.fetch: _ReadAhead | None = None
        self.history: list[StepRecord] = []
        self.scaler = (torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None)
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
                "torch_rng": torch.get_rng_state(), "train_config": asdict(self.cfg),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def restore(self, state: dict[str, Any]) -> None:
        for q, flags in zip(self.net.quantizers(), state["quantizers"], strict=True):
            q.frozen, q.enabled, q.exec_bits = flags["frozen"], flags["enabled"], flags["exec_bits"]
            q.bits.requires_grad_(flags["bits_grad"])
        self.net.graph.load_state_dict(state["graph"])
        self.new_optimizer(bits=state["opt_bits"])
        self.opt.load_state_dict(state["optimizer"])
        self.base_lrs = list(state["base_lrs"])
        self.batches.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.lam = int(state["step"]), float(state["lam"])
        self.history = [StepRecord(**r) for r in state["history"]]


def _train_step(run: _Run, step: int, fetch: Callable[[np.ndarray], tuple[Tensor, Tensor | None]],
                teacher_logits: Tensor | Teacher | None) -> StepRecord:
    """One optimizer step of the learning or the frozen phase."""
    cfg, net, opt = run.cfg, run.net, run.opt
    learn = cfg.learn_steps()
    frozen = step >= learn
    if frozen:
        progress = (step - learn) / max(cfg.steps - learn, 1)
        for group, base in zip(opt.param_groups, run.base_lrs, strict=True):
            group["lr"] = base * 0.5 * (1 + math.cos(math.pi * progress))
    idx = next(run.batches)
    part = shard(idx, run.dist.rank, run.dist.world) if run.dist.active else idx
    if run.fetch is not None:
        upcoming = run.batches.peek() if step + 1 < cfg.steps else None
        if upcoming is not None and run.dist.active:
            upcoming = shard(upcoming, run.dist.rank, run.dist.world)
        x, labels = run.fetch(part, upcoming)
    else:
        x, labels = fetch(part)
    x = map_batch(lambda t: fast_layout(t.to(run.device, non_blocking=True)), x)
    labels = labels.to(run.device) if labels is not None else None
    teacher = None
    if isinstance(teacher_logits, Tensor):
        teacher = teacher_logits[torch.as_tensor(part, device=teacher_logits.device)]
    elif teacher_logits is not None and "kd" in cfg.loss:
        teacher = teacher_logits(x, part)
    whole = not isinstance(teacher, Tensor)     # a tensor of logits: the first output only
    opt.zero_grad(set_to_none=True)
    n = rows(x)
    size = n if cfg.micro_batch is None or cfg.micro_batch >= n else \
        math.ceil(n / math.ceil(n / cfg.micro_batch))      # equal pieces
    if size >= n:
        task = _task(run, x, teacher, labels, whole)
        task_value = task.detach()
    else:              # micro-batches: their gradients add up to the whole batch's
        task_value = torch.zeros((), device=run.device)
        xs = pieces(x, size)
        ts = pieces(teacher, size) if teacher is not None else [None] * len(xs)
        ls = pieces(labels, size) if labels is not None else [None] * len(xs)
        for xp, tp, lp in zip(xs, ts, ls, strict=True):
            task = _task(run, xp, tp, lp, whole) * rows(xp) / n
            _backward(run, task)
            task_value = task_value + task.detach()
    layers = layer_bits(net)
    cost = bit_cost(cfg.objective, layers)
    if frozen:
        cost = cost.detach()
    if size >= n:
        _backward(run, task if frozen else task + run.lam * cost)
    elif not frozen:
        _backward(run, run.lam * cost)
    if run.dist.active:   # the global batch's task loss and gradients (onnxbits.train.distributed)
        params = [p for group in opt.param_groups for p in group["params"]]
        task_value = average_gradients(params, len(part) / len(idx), extra=task_value)
    if run.scaler is not None:
        run.scaler.step(opt)
        run.scaler.update()
    else:
        opt.step()
    if not frozen:
        for q in net.quantizers():
            q.clamp_bits()
    cost = cost.detach()
    loss_value = task_value if frozen else task_value + run.lam * cost
    values = torch.stack([loss_value, task_value, cost, average_bits(layers).detach()]).tolist()
    return StepRecord(step, "frozen" if frozen else "learn", loss=values[0], task=values[1],
                      cost=values[2], avg_bits=values[3], lam=run.lam)


def _task(run: _Run, x: Batch, teacher: Tensor | tuple[Tensor, ...] | None,
          labels: Tensor | None, whole: bool) -> Tensor:
    """The task loss of the network on ``x`` (all outputs with ``whole``, else the first)."""
    net, cfg = run.net, run.cfg
    with autocast(run.device, cfg.amp):
        out = net.forward_all(x) if whole else (net(x),)
    return task_loss([o.float() for o in out], teacher, labels, cfg.loss,
                     (net.outputs or None) if whole else None)


def _backward(run: _Run, loss: Tensor) -> None:
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()
