"""The teacher of the distillation: the float network, run online on each fine-tune batch.

:class:`OnlineTeacher` computes the float torch graph's logits on the batch the student sees, on
the same device, in float32 and without gradients: nothing is computed for images a run does not
use. With ``cache`` (a set small enough to hold decoded, whose images recur epoch after epoch) the
logits of every index are kept on the CPU after their first computation and reused; the cache is
state of the run (saved in checkpoints), so a resumed run uses the very values the uninterrupted
one would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["OnlineTeacher"]


class OnlineTeacher:
    """``teacher(x, indices) -> logits`` of the float network on the batch ``x`` of images
    ``indices`` (``(N, classes)``, on ``x``'s device)."""

    def __init__(self, graph: nn.Module, cache: int | None = None) -> None:
        self.graph = graph.eval()
        self.state: dict[str, Any] = {}
        self.cache = cache

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """The float network's logits on ``x`` (its first output, float32, flattened to
        ``(N, classes)``)."""
        device = next(self.graph.parameters()).device
        out = self.graph(x.to(device))
        if isinstance(out, list | tuple):     # several outputs: the run tunes on the first
            out = out[0]
        out = out.float()
        return out.flatten(1).to(x.device) if out.dim() > 2 else out.to(x.device)

    def __call__(self, x: Tensor, indices: np.ndarray | None = None) -> Tensor:
        if self.cache is None or indices is None or len(indices) != len(x):
            return self.logits(x)
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if self.state:
            hit = self.state["filled"][idx]
            if bool(hit.all()):
                return self.state["logits"][idx].to(x.device)
        fresh = self.logits(x)
        if not self.state:
            self.state["logits"] = torch.zeros(self.cache, fresh.shape[1])
            self.state["filled"] = torch.zeros(self.cache, dtype=torch.bool)
        hit = self.state["filled"][idx]
        cpu = fresh.cpu()
        cpu[hit] = self.state["logits"][idx[hit]]
        self.state["logits"][idx[~hit]] = cpu[~hit]
        self.state["filled"][idx] = True
        return cpu.to(x.device)
