"""Re-estimate output statistics after the fine-tune: empirical bias correction.

Batch normalisation is folded into the convolutions of the imported models, so the statistic
left to re-estimate is each layer's per-channel output mean. Quantization shifts it: a layer ``l``
of the quantized network gives ``y_q = op(Q(x_q), Q(W)) + b`` where the float model gives ``y_f``.
In site order, with the earlier layers already corrected, every layer with a bias gets

    b_c <- b_c + mean(y_f[c]) - mean(y_q[c])

(means over the batch and the spatial positions of channel ``c``, on the given images), so that
each quantized layer's output mean matches the float model's. Layers without a bias (MatMul, Conv
without bias) are left alone. The float reference is the original float graph, not the
fine-tuned weights with quantizers off.

Measured after a fine-tune this hurts (resnet20 at 3.5 bits: -5.7 points, README ablation): the
fine-tuned layers are co-adapted to quantized inputs. It is an option (``--bias-correction``),
off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from onnxbits.insert import QuantizedNetwork


@dataclass(frozen=True)
class BiasShift:
    """The correction one layer received: largest ``|mean(y_f) - mean(y_q)|`` over channels, and
    that value relative to the layer's output standard deviation in the float model."""

    node: str
    max_shift: float
    relative: float

    def to_dict(self) -> dict[str, float | str]:
        return {"node": self.node, "max_shift": self.max_shift, "relative": self.relative}


class _Reached(Exception):
    """Raised by the hook once the corrected layer's output is seen: the rest of the forward
    pass is not needed."""


def _channel_mean(y: Tensor, op: str) -> Tensor:
    """Per-output-channel mean: axis 1 of Conv/Gemm outputs, the last axis of MatMul's."""
    if op == "MatMul":
        return y.reshape(-1, y.shape[-1]).mean(dim=0)
    return y.transpose(0, 1).reshape(y.shape[1], -1).mean(dim=1)


@torch.no_grad()
def _float_stats(float_graph: fx.GraphModule, net: QuantizedNetwork,
                 batches: list[Tensor]) -> dict[str, tuple[Tensor, float]]:
    """Per site: the float model's per-channel output mean and overall output std."""
    sums: dict[str, list[Tensor]] = {s.node: [] for s in net.sites}
    stds: dict[str, list[float]] = {s.node: [] for s in net.sites}
    hooks = []
    for site in net.sites:
        def record(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor,
                   node: str = site.node, op: str = site.op) -> None:
            sums[node].append(_channel_mean(out.float(), op))
            stds[node].append(float(out.float().std()))
        hooks.append(float_graph.get_submodule(site.module).register_forward_hook(record))
    try:
        for x in batches:
            float_graph(x)
    finally:
        for h in hooks:
            h.remove()
    return {node: (torch.stack(sums[node]).mean(dim=0), sum(stds[node]) / len(stds[node]))
            for node in sums if sums[node]}


@torch.no_grad()
def correct_biases(float_graph: fx.GraphModule, net: QuantizedNetwork,
                   batches: list[Tensor]) -> list[BiasShift]:
    """Apply the correction of the module docstring to ``net`` in place, layer by layer.

    Costs one forward pass of ``batches`` through the float graph and, per corrected layer, one
    through ``net`` up to that layer. Returns one :class:`BiasShift` per corrected layer, in
    site order.
    """
    reference = _float_stats(float_graph, net, batches)
    was_training = net.graph.training
    net.graph.eval()
    shifts: list[BiasShift] = []
    try:
        for site in net.sites:
            layer = net.layers[site.node]
            bias = layer.bias()
            if bias is None or site.node not in reference:
                continue
            seen: list[Tensor] = []

            def record(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor,
                       op: str = site.op) -> None:
                seen.append(_channel_mean(out.float(), op))
                raise _Reached

            hook = layer.register_forward_hook(record)
            try:
                for x in batches:
                    try:
                        net(x)
                    except _Reached:
                        pass
            finally:
                hook.remove()
            float_mean, float_std = reference[site.node]
            shift = float_mean - torch.stack(seen).mean(dim=0)
            bias.add_(shift.to(bias.dtype))
            largest = float(shift.abs().max())
            shifts.append(BiasShift(site.node, largest, largest / max(float_std, 1e-12)))
    finally:
        net.graph.train(was_training)
    return shifts
