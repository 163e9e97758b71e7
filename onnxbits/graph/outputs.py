"""What each graph output is: probabilities (a Softmax), log-probabilities (a LogSoftmax),
a classifier's logits (the first output, shaped ``(N, K)``) or other values (:func:`output_kind`).

A Softmax or LogSoftmax is recognised through Identity, Reshape, Flatten, Squeeze and Unsqueeze
nodes between it and the output. Its class axis is the node's ``axis``; before opset 13 the
operator normalises over the flattened dimensions from ``axis`` on (``flatten`` is True).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import onnx

#: Nodes that keep the values of a (log-)softmax (and, for Identity, its shape).
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze"}

__all__ = ["GraphOutput", "class_rows", "graph_outputs", "output_kind"]


@dataclass(frozen=True)
class GraphOutput:
    """One graph output: its name, ``probs`` / ``logprobs`` / ``values``, and for (log-)
    probabilities the class axis and whether the trailing dimensions from it are flattened."""

    name: str
    producer: str = "values"
    axis: int = -1
    flatten: bool = False
    keeps_shape: bool = True
    index: int = 0              # position among the graph outputs


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def graph_outputs(model: onnx.ModelProto) -> list[GraphOutput]:
    """One :class:`GraphOutput` per graph output, in order."""
    producers = {o: n for n in model.graph.node for o in n.output}
    opset = _opset(model)
    out = []
    for index, value in enumerate(model.graph.output):
        name, keeps = value.name, True
        node = producers.get(name)
        while node is not None and node.op_type in _PASS_THROUGH and node.input:
            keeps = keeps and node.op_type == "Identity"
            node = producers.get(node.input[0])
        if node is None or node.op_type not in ("Softmax", "LogSoftmax"):
            out.append(GraphOutput(value.name, index=index))
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"),
                    -1 if opset >= 13 else 1)
        out.append(GraphOutput(value.name, "probs" if node.op_type == "Softmax" else "logprobs",
                               axis, flatten=opset < 13, keeps_shape=keeps, index=index))
    return out


def output_kind(output: GraphOutput, shape: tuple[int, ...]) -> str:
    """``probs``, ``logprobs``, ``logits`` or ``values`` for an output of ``shape`` (batch first).

    ``logits``: the first graph output when it is not a (log-)softmax and has the shape
    ``(N, K)`` (or ``(N, K, 1, ...)``) with ``K > 1`` (a classifier's scores; a later output of
    that shape, e.g. a box regression, is ``values``). A (log-)softmax whose shape was changed
    after it counts as ``values`` unless it is ``(N, K)``.
    """
    squeezed = [d for d in shape[1:] if d != 1] if len(shape) > 2 else list(shape[1:])
    classifier = len(squeezed) == 1 and squeezed[0] > 1 and (len(shape) == 2 or shape[1] > 1)
    if output.producer != "values" and (output.keeps_shape or classifier):
        return output.producer
    return "logits" if classifier and output.index == 0 else "values"


def class_rows(x: Any, output: GraphOutput, kind: str) -> Any:
    """``x`` (a numpy array or a torch tensor, batch first) as ``(positions, classes)`` rows over
    its class axis: what the fine-tune's KL and the fidelity's argmax agreement read
    (``logits``: ``(N, K)``)."""
    if kind == "logits" or not output.keeps_shape:
        return x.reshape(len(x), -1)
    axis = output.axis % x.ndim
    if output.flatten:              # before opset 13: the dims from ``axis`` on are the classes
        return x.reshape(math.prod(x.shape[:axis]), -1)
    return x.swapaxes(axis, -1).reshape(-1, x.shape[axis])
