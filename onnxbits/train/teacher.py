"""The teacher of the distillation: the float network, run online on each fine-tune batch.

:class:`OnlineTeacher` computes the float torch graph's outputs (every graph output, float32,
without gradients) on the batch the student sees, on the same device: nothing is computed for
samples a run does not use. With ``cache`` (a set small enough to hold decoded, whose samples
recur epoch after epoch) the outputs of every index are kept on the CPU after their first
computation and reused, as long as they take at most :data:`CACHE_BYTES`; the cache is state of
the run (saved in checkpoints), so a resumed run uses the very values the uninterrupted one would
have.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onnxbits.importer.batch import Batch, call, first, map_batch, pieces, rows
from onnxbits.quant.network import all_outputs

__all__ = ["CACHE_BYTES", "OnlineTeacher"]

#: Bytes the cached teacher outputs may take; larger outputs are computed on every batch.
CACHE_BYTES = 1 << 30


class OnlineTeacher:
    """``teacher(x, indices) -> outputs`` of the float network on the batch ``x`` of samples
    ``indices``: a tuple of every graph output (float32, on ``x``'s device)."""

    def __init__(self, graph: nn.Module, cache: int | None = None,
                 rows_per_pass: int | None = None) -> None:
        self.graph = graph.eval()
        self.state: dict[str, Any] = {}
        self.cache = cache
        self.rows_per_pass = rows_per_pass    # run larger batches in pieces (memory)

    @torch.no_grad()
    def outputs(self, x: Batch) -> tuple[Tensor, ...]:
        """The float network's outputs on ``x``."""
        device = next(self.graph.parameters()).device
        runs = [all_outputs(call(self.graph, map_batch(lambda t: t.to(device), piece)))
                for piece in pieces(x, self.rows_per_pass)]
        out = runs[0] if len(runs) == 1 else [torch.cat(o) for o in zip(*runs, strict=True)]
        return tuple(o.float().to(first(x).device) for o in out)

    def __call__(self, x: Batch, indices: np.ndarray | None = None) -> tuple[Tensor, ...]:
        if self.cache is None or indices is None or len(indices) != rows(x):
            return self.outputs(x)
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if self.state.get("outputs"):
            hit = self.state["filled"][idx]
            if bool(hit.all()):
                return tuple(c[idx].to(first(x).device) for c in self.state["outputs"])
        fresh = self.outputs(x)
        if not self.state:
            size = sum(4 * math.prod(o.shape[1:]) for o in fresh) * self.cache
            if size > CACHE_BYTES:
                self.cache = None
                return fresh
            self.state["outputs"] = [torch.zeros(self.cache, *o.shape[1:]) for o in fresh]
            self.state["filled"] = torch.zeros(self.cache, dtype=torch.bool)
        hit = self.state["filled"][idx]
        result = []
        for out, cached in zip(fresh, self.state["outputs"], strict=True):
            cpu = out.cpu()
            cpu[hit] = cached[idx[hit]]
            cached[idx[~hit]] = cpu[~hit]
            result.append(cpu.to(first(x).device))
        self.state["filled"][idx] = True
        return tuple(result)
