"""Bit costs that the regularizer minimises (differentiable in the fractional bitlengths).

For layers ``i = 1..L`` with weight bitlength ``w_i`` (the mean over channels when bits are per
channel), input-activation bitlength ``a_i``, ``P_i`` weight parameters and ``M_i`` MACs per sample:

* ``bits``   (BitPruning's objective, the average per-layer bitlength):
  ``(sum_i w_i + sum_i a_i) / (L_w + L_a)``, each layer's activation counted once per layer
* ``memory`` (weight bits per parameter): ``sum_i P_i w_i / sum_i P_i``
* ``bops``   (bit operations, normalised to read as bits): ``sum_i M_i w_i a_i / (8 sum_i M_i)``,
  so that a uniform 8-bit network costs 8 under every objective.

A bitlength is a 0-d tensor, or a batch ``(m,)`` of candidate values (all batched ones of the same
``m``, scalars broadcast): the cost is then one value per candidate, shape ``(m,)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from onnxbits.config import OBJECTIVES


@dataclass(frozen=True)
class LayerBits:
    """Differentiable bitlengths of one layer and its size."""

    weight_bits: Tensor
    act_bits: Tensor | None
    params: int
    macs: int


def average_bits(layers: list[LayerBits]) -> Tensor:
    """The paper's average per-layer bitlength over weights and activations."""
    values = ([l.weight_bits for l in layers]
              + [l.act_bits for l in layers if l.act_bits is not None])
    return torch.stack(torch.broadcast_tensors(*values)).mean(0)


def memory_bits(layers: list[LayerBits]) -> Tensor:
    """Size-weighted weight bitlength ``sum P_i w_i / sum P_i``."""
    total = sum(l.params for l in layers)
    return torch.stack(torch.broadcast_tensors(*[l.weight_bits * (l.params / total)
                                                 for l in layers])).sum(0)


def bops_bits(layers: list[LayerBits]) -> Tensor:
    """BOPs normalised to bits: ``sum M_i w_i a_i / (8 sum M_i)`` (a missing a_i counts as 32)."""
    total = sum(l.macs for l in layers) or 1
    terms = []
    for l in layers:
        act = l.act_bits if l.act_bits is not None else torch.tensor(32.0)
        terms.append(l.weight_bits * act * (l.macs / (8.0 * total)))
    return torch.stack(torch.broadcast_tensors(*terms)).sum(0)


def bit_cost(objective: str, layers: list[LayerBits]) -> Tensor:
    """The regularizer ``R`` for ``objective`` in :data:`OBJECTIVES`."""
    if objective == "bits":
        return average_bits(layers)
    if objective == "memory":
        return memory_bits(layers)
    if objective == "bops":
        return bops_bits(layers)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def total_bops(layers: list[LayerBits]) -> float:
    """Bit operations per sample ``sum M_i w_i a_i`` at the current bitlengths."""
    return float(sum(l.macs * float(l.weight_bits) *
                     float(l.act_bits if l.act_bits is not None else 32.0) for l in layers))
