"""The task loss of the fine-tune: every output distilled from the float model by its kind,
cross-entropy on labels, or both.

Each graph output gets the loss of its kind (:func:`onnxbits.graph.outputs.output_kind`):

- ``logits`` (a classifier's ``(N, K)`` scores, the first output): ``KL(softmax(t) ||
  softmax(s))``;
- ``probs`` (a Softmax output) and ``logprobs`` (a LogSoftmax output): the same KL on the
  probabilities the model gives, over its class axis;
- ``values`` (anything else: boxes, maps, embeddings, regression): the normalised squared error
  ``sum((s - t)^2) / sum(t^2)`` over the batch.

KL terms are means over positions (a classifier's samples; a sequence model's samples x
positions), summed over outputs. Temperatures 0.5 and 4 measured worse than 1 on ImageNet
(docs/method.md), so there is none. Cross-entropy applies to the first output, the classifier's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from onnxbits.graph.outputs import GraphOutput, class_rows, output_kind

__all__ = ["output_loss", "task_loss"]

LOGITS = GraphOutput("logits")
_EPS = 1e-12


def output_loss(student: Tensor, teacher: Tensor, output: GraphOutput = LOGITS) -> Tensor:
    """The distillation loss of one output (module docstring)."""
    kind = output_kind(output, tuple(teacher.shape))
    if kind == "values":
        err = ((student - teacher) ** 2).sum()
        return err / (teacher ** 2).sum().clamp_min(_EPS)
    s, t = class_rows(student, output, kind), class_rows(teacher, output, kind)
    if kind == "logits":
        s, t = F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)
    elif kind == "probs":
        s, t = s.clamp_min(_EPS).log(), t.clamp_min(_EPS).log()
    return F.kl_div(s, t, reduction="batchmean", log_target=True)


def task_loss(student: Tensor | Sequence[Tensor], teacher: Tensor | Sequence[Tensor] | None,
              labels: Tensor | None, kind: str,
              outputs: Sequence[GraphOutput] | None = None) -> Tensor:
    """Distillation (``kd``), cross-entropy (``ce``) or their sum (``kd+ce``).

    ``student`` and ``teacher`` are one output or a sequence of them (one per graph output,
    ``outputs`` describing each; without it every output is read as logits or values by its
    shape).
    """
    students = list(student) if isinstance(student, list | tuple) else [student]
    loss = students[0].new_zeros(())
    if "kd" in kind:
        if teacher is None:
            raise ValueError(f"loss {kind!r} needs teacher logits")
        teachers = list(teacher) if isinstance(teacher, list | tuple) else [teacher]
        described = list(outputs) if outputs else [GraphOutput(f"output {k}", index=k)
                                                   for k in range(len(students))]
        for s, t, out in zip(students, teachers, described, strict=True):
            loss = loss + output_loss(s, t, out)
    if "ce" in kind:
        loss = loss + F.cross_entropy(students[0].flatten(1), labels)
    return loss
