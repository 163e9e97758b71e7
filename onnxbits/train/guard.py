"""Accuracy guard: raise the bits of the layers that hurt most until a maximum drop holds.

Sensitivity is measured, not guessed: for every quantizer group ``g`` (a layer's weights or an
activation tensor), its bits are set to ``max_bits`` alone and the distillation loss
(``KL(teacher || student)`` for a classifier) on fixed fine-tune images is recomputed; the gain
``KL_base - KL_g`` ranks the groups. In round ``r = 0, 1, 2, ...`` the ``2**r`` most sensitive
groups are raised by ``step`` bits (capped at ``max_bits``), the network is fine-tuned briefly at
the new frozen bits, and the drop is measured again; this repeats until ``drop <= max_drop``,
every group is at ``max_bits`` or ``max_rounds`` rounds have run. Doubling the raise keeps the
first rounds cheap in bits and still reaches every group within ``log2(groups) + 1`` rounds, so
the guard holds whenever the network at ``max_bits`` meets the drop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from onnxbits.importer.batch import Batch
from onnxbits.quant.network import QuantizedNetwork
from onnxbits.quant.quantizer import BitQuantizer
from onnxbits.train.losses import task_loss


@torch.no_grad()
def kl_to_teacher(net: QuantizedNetwork, batches: list[Batch],
                  teachers: list[Tensor | tuple[Tensor, ...]]) -> float:
    """Mean over batches of the distillation loss (:func:`onnxbits.train.losses.task_loss`:
    ``KL(softmax(t) || softmax(s))`` for a classifier) of the network against the teacher's
    outputs (a tensor of logits, or a tuple of every output)."""
    total = 0.0
    for x, t in zip(batches, teachers, strict=True):
        if isinstance(t, Tensor):
            total += float(task_loss(net(x).float(), t.float(), None, "kd"))
        else:
            out = [o.float() for o in net.forward_all(x)]
            total += float(task_loss(out, list(t), None, "kd", net.outputs or None))
    return total / max(len(batches), 1)


@torch.no_grad()
def sensitivities(net: QuantizedNetwork, batches: list[Batch],
                  teachers: list[Tensor | tuple[Tensor, ...]]) -> list[tuple[float, str, BitQuantizer]]:
    """``(gain, name, quantizer)`` for every group below max bits, largest gain first."""
    base = kl_to_teacher(net, batches, teachers)
    ranked = []
    for name, q in net.named_quantizers():
        if bool((q.frozen_bits >= q.max_bits).all()):
            continue
        saved = q.frozen_bits.clone()
        q.frozen_bits.fill_(float(q.max_bits))
        ranked.append((base - kl_to_teacher(net, batches, teachers), name, q))
        q.frozen_bits.copy_(saved)
    return sorted(ranked, key=lambda r: -r[0])


@torch.no_grad()
def enforce_max_drop(net: QuantizedNetwork, measure_drop: Callable[[], float], max_drop: float,
                     batches: list[Batch], teachers: list[Tensor | tuple[Tensor, ...]],
                     retune: Callable[[], object] | None = None, step: int = 2,
                     max_rounds: int = 10) -> tuple[float, list[dict[str, object]]]:
    """Raise the most sensitive groups, re-tune, re-measure, until ``drop <= max_drop``.

    After each round ``retune()`` (a short fine-tune at the frozen bits) lets the weights adapt
    to the new grid: weights tuned at few bits do not improve by a finer grid alone. Returns the
    final drop and one record per raised group (round, group, bits before/after, drop after the
    round).
    """
    drop = measure_drop()
    raised: list[dict[str, object]] = []
    for round_ in range(max_rounds):
        if drop <= max_drop:
            break
        with torch.enable_grad():
            ranked = sensitivities(net, batches, teachers)
        if not ranked:
            break
        chosen = ranked[: 2**round_]
        records = []
        for _, name, q in chosen:
            before = float(q.frozen_bits.mean())
            q.frozen_bits.add_(step).clamp_(max=q.max_bits)
            records.append({"round": round_, "group": name, "bits_before": before,
                            "bits_after": float(q.frozen_bits.mean())})
        if retune is not None:
            with torch.enable_grad():
                retune()
        drop = measure_drop()
        raised += [{**r, "drop_after": drop} for r in records]
    return drop, raised
