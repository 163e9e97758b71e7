"""Data-parallel fine-tuning over the processes that ``torchrun`` starts.

``torchrun --nproc_per_node=N`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; :func:`init_from_env` joins the process group (NCCL with one GPU per process,
``cuda:LOCAL_RANK``; gloo on CPU). Without ``WORLD_SIZE > 1`` it is a single process and nothing
is initialised.

The batch size is the global batch ``B``: every process draws the same seeded global batch of
``B`` indices and takes its contiguous shard of ``n_r`` indices (:func:`shard`). After the
backward pass each process scales its gradients by ``w_r = n_r / B`` and they are summed over the
processes (:func:`average_gradients`)::

    g = sum_r (n_r / B) * g_r

For a loss ``L_r = mean_{i in shard r} l_i + lambda * R`` (``R`` the bit cost, the same on every
process), ``sum_r w_r L_r = mean_{i in batch} l_i + lambda * R``: ``g`` is exactly the gradient of
the global-batch loss, so the bit cost is counted once and N processes follow one process with the
whole batch up to the order of float sums. Every process then takes the same optimizer step, so
the weights, clip values and bits (and with them the budget controller's lambda and the freeze)
stay equal; :func:`broadcast_` copies rank 0's tensors at the start and after a freeze so that
they start and stay identical by construction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from onnxbits.errors import ConfigError
from onnxbits.train.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group: ``rank`` of ``world``, its device and backend."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False     # True when init_from_env started the process group

    @property
    def active(self) -> bool:
        """True when several processes train together."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes the outputs."""
        return self.rank == 0


def world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_world_size() -> int:
    """``LOCAL_WORLD_SIZE`` from the environment: processes on this machine (1 when unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)


def init_from_env(device: str = "auto") -> DistContext:
    """Resolve ``device`` and, under ``torchrun`` (``WORLD_SIZE > 1``), join the process group.

    With several processes, ``cuda`` and ``auto`` (with CUDA) mean ``cuda:LOCAL_RANK`` and the
    NCCL backend; ``cpu`` (or ``auto`` without CUDA) means gloo.

    Raises:
        ConfigError: an unavailable device, ``cuda:N`` under torchrun, more processes per node
            than GPUs, or a torchrun environment without ``RANK``.
    """
    try:
        base = resolve_device(device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    world = world_size()
    if world <= 1:
        return DistContext(device=base)
    if "RANK" not in os.environ:
        raise ConfigError(f"WORLD_SIZE={world} but RANK is not set; start several processes "
                          "with torchrun --nproc_per_node=N")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if base.type == "cuda":
        if ":" in device:
            raise ConfigError(f"--device {device} cannot be used with torchrun (WORLD_SIZE="
                              f"{world}): each process uses cuda:LOCAL_RANK; use --device cuda")
        count = torch.cuda.device_count()
        if local >= count:
            raise ConfigError(f"torchrun process LOCAL_RANK={local} has no GPU: torch sees {count} "
                              f"CUDA device(s); use --nproc_per_node={count}")
        chosen, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(chosen)
    else:
        chosen, backend = torch.device("cpu"), "gloo"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=chosen if chosen.type == "cuda" else None)
    return DistContext(rank, world, local, chosen, backend, owns)


def close(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group that :func:`init_from_env` started, after a barrier when
    ``wait`` (on an error path, without one: the other processes may never reach it)."""
    if ctx.owns_group and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def shard(batch_idx: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s contiguous share of a global batch: ``np.array_split`` into ``world``
    parts (the first ``len mod world`` parts have one index more).

    >>> [shard(np.arange(7), r, 3).tolist() for r in range(3)]
    [[0, 1, 2], [3, 4], [5, 6]]
    """
    return np.array_split(np.asarray(batch_idx), world)[rank]


def average_gradients(params: Iterable[torch.Tensor], weight: float,
                      extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """``g <- sum_r weight_r * g_r`` over the processes, for every parameter with a gradient.

    All gradients (and ``extra``, a tensor summed the same way, e.g. the shard's mean loss) go
    through one flat ``all_reduce``. Returns the reduced ``extra``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    parts = [g.reshape(-1) for g in grads]
    if extra is not None:
        parts.append(extra.detach().reshape(-1).to(grads[0].dtype if grads else extra.dtype))
    if not parts:
        return extra
    flat = torch.cat(parts).mul_(weight)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    if extra is None:
        return None
    return flat[offset:offset + extra.numel()].view_as(extra).to(extra.dtype)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place, any dtypes) with rank ``src``'s values."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        with torch.no_grad():
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every process when ``flag`` is True on at least one."""
    if not ctx.active:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
