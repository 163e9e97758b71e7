"""Feature distillation: every quantized layer's output follows the float model's.

For the outputs ``s_l`` of the quantized network's sites and ``t_l`` of the same layers of the
float graph on the same batch (``t_l`` without gradient)::

    L_feat = (1 / L) * sum_l  sum((s_l - t_l)^2) / sum(t_l^2)

(each layer's squared error relative to its float output's energy, averaged over the L sites).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from onnxbits.insert import QuantizedNetwork


class FeatureTaps:
    """Forward hooks that record the site outputs of the quantized and of the float graph."""

    def __init__(self, net: QuantizedNetwork, float_graph: nn.Module) -> None:
        self.float_graph = float_graph
        self.student: dict[str, Tensor] = {}
        self.teacher: dict[str, Tensor] = {}
        self._hooks = []
        for site in net.sites:
            self._hooks.append(net.layers[site.node].register_forward_hook(
                self._recorder(self.student, site.node)))
            self._hooks.append(float_graph.get_submodule(site.module).register_forward_hook(
                self._recorder(self.teacher, site.node)))

    @staticmethod
    def _recorder(store: dict[str, Tensor], name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            store[name] = out
        return record

    @torch.no_grad()
    def run_teacher(self, x: Tensor) -> Tensor:
        """Record the float graph's site outputs for batch ``x``; returns its output."""
        self.teacher.clear()
        return self.float_graph(x)

    def loss(self) -> Tensor:
        """``L_feat`` of the last student and teacher passes (float32); clears the records."""
        terms = []
        for name, s in self.student.items():
            t = self.teacher[name].float()
            terms.append((s.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
        self.student.clear()
        self.teacher.clear()
        return torch.stack(terms).mean()

    def close(self) -> None:
        """Remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
