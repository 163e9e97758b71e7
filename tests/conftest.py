"""Shared test helpers: seeded RNGs, ONNX Runtime sessions and inputs for the tiny builders.

torch runs on one thread: the test tensors are tiny, and with several threads on a busy
machine the OpenMP pool spends far longer waiting than computing (a 16x8x8x8 ``torch.round``
goes from microseconds to milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers, calibrate

torch.set_num_threads(1)

LEVELS = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_denormals() -> Iterator[None]:
    """Keep later tests independent of the float state, whatever a failing shrink left."""
    yield
    torch.set_flush_denormal(False)


def ort_session(model: onnx.ModelProto, level: str = "none") -> ort.InferenceSession:
    """A single-threaded CPU session; ``level`` is ``none`` (the oracle) or ``all`` (deployed)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def ort_logits(model: onnx.ModelProto, x: np.ndarray, level: str = "none") -> np.ndarray:
    """First output of ``model`` on ``x`` in ONNX Runtime."""
    session = ort_session(model, level)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    """Shape of the model's first input with every symbolic dimension set to ``batch``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else batch for d in dims)


def random_input(model: onnx.ModelProto, batch: int, seed: int = 0) -> torch.Tensor:
    """Standard-normal float32 input of ``batch`` samples for ``model``."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.normal(size=input_shape(model, batch)).astype(np.float32))


@pytest.fixture
def run_ort() -> Callable[..., np.ndarray]:
    """``run_ort(model, x, level="none")``: the first output in ONNX Runtime."""
    return ort_logits


@pytest.fixture
def make_input() -> Callable[..., torch.Tensor]:
    """``make_input(model, batch, seed=0)``: a seeded standard-normal input tensor."""
    return random_input


@dataclass
class Calibrated:
    """A builder model ready to fine-tune: the normalised model, its quantized network, a
    seeded input and the float graph's logits on it."""

    model: onnx.ModelProto
    net: QuantizedNetwork
    x: torch.Tensor
    teacher: torch.Tensor
    graph: torch.fx.GraphModule | None = None   # the float torch graph the network copies


def calibrated_network(model: onnx.ModelProto, batch: int = 64,
                       prepare: Callable[[onnx.ModelProto, QuantizedNetwork], object] | None = None,
                       **attach_options: Any) -> Calibrated:
    """``model`` normalised, imported, quantized (``attach_options`` go to
    :func:`attach_quantizers`), passed to ``prepare(model, net)`` if given (e.g.
    :func:`onnxbits.emit.prepare.prepare_ort`), then calibrated on a seeded input of ``batch``
    samples split in two halves."""
    torch.manual_seed(0)
    model = normalize(model)
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph), **attach_options)
    if prepare is not None:
        prepare(model, net)
    x = random_input(model, batch)
    with torch.no_grad():
        teacher = graph(x)
    calibrate(net, [x[: batch // 2], x[batch // 2:]])
    return Calibrated(model, net, x, teacher, graph)
