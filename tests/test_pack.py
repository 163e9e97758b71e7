"""The ``pack`` target's size: what each layer's weight costs in the file
(:func:`onnxbits.emit.pack.weight_storage`) against the issue's bound, 1.1 x (learned bits / 32) x the
float weight bytes, on a model with realistically sized layers at fixed bits (no fine-tune)."""

from __future__ import annotations

from functools import cache

import onnx
import pytest
import torch
from onnx import TensorProto

from onnxbits.emit.pack import unpack_model, weight_storage
from onnxbits.emit.prepare import limit_clip_alphas, prepare_ort
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import QuantizedNetwork, attach_quantizers, calibrate
from tests.builders import _Builder
from tests.conftest import random_input

BITS = {"conv1": 4, "conv2": 2, "conv3": 3, "conv4": 6, "fc": 4}


def wide_net(seed: int = 0) -> onnx.ModelProto:
    """Four 3x3 Convs of 64 channels (36,864 weights each after the first), GAP, Gemm."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 64, name="conv1")], name="relu1")
    for i in (2, 3, 4):
        x = b.node("Relu", [b.conv(x, 64, 64, name=f"conv{i}")], name=f"relu{i}")
    x = b.node("GlobalAveragePool", [x], name="gap")
    x = b.node("Flatten", [x], name="flatten", axis=1)
    b.gemm(x, 64, 10, name="fc")
    return b.model(["N", 3, 8, 8], "logits", ["N", 10])


@cache
def frozen() -> tuple[onnx.ModelProto, QuantizedNetwork, torch.Tensor]:
    torch.manual_seed(0)
    model = normalize(wide_net())
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph))
    prepare_ort(model, net)
    x = random_input(model, 16)
    calibrate(net, [x])
    for site in net.sites:
        net.layers[site.node].wq.freeze(torch.tensor(float(BITS[site.node])))
    for q in net.acts.values():
        if not q.frozen:
            q.freeze(torch.tensor(8.0))
    limit_clip_alphas(model, net)
    return model, net, x


@cache
def emitted(target: str) -> onnx.ModelProto:
    model, net, _ = frozen()
    return emit(model, net, target)


def test_weight_storage_counts_every_tensor_that_holds_a_weight() -> None:
    packed = emitted("pack")
    rows = {r.layer: r for r in weight_storage(packed)}
    assert {name: r.bits for name, r in rows.items()} == BITS
    assert rows["conv2"].params == 64 * 64 * 9 and rows["fc"].params == 64 * 10
    inits = {t.name: t for t in packed.graph.initializer}
    nodes = {n.name: n for n in packed.graph.node}
    producer = {o: n for n in packed.graph.node for o in n.output}
    for name, row in rows.items():
        dq = producer[nodes[name].input[1]]
        held = [inits[t] for t in dq.input if t in inits]
        if dq.input[0] not in inits:  # bit stream: Unpack(stream, shape)
            held += [inits[t] for t in producer[dq.input[0]].input]
        assert row.stored_bytes == sum(t.ByteSize() for t in held), name
    ort_rows = {r.layer: r for r in weight_storage(emitted("ort"))}
    for name, row in rows.items():  # int8 in the ort model: about 8 / bits times the bytes
        assert ort_rows[name].stored_bytes > row.stored_bytes or BITS[name] == 8


def test_layers_at_4_bits_or_fewer_stay_within_1_1_times_their_learned_bits() -> None:
    rows = [r for r in weight_storage(emitted("pack")) if r.bits <= 4]
    assert {r.layer for r in rows} == {"conv1", "conv2", "conv3", "fc"}
    stored = sum(r.stored_bytes for r in rows)
    learned = sum(r.params * r.bits / 32 * 4 for r in rows)  # (bits / 32) x float bytes
    assert stored <= 1.1 * learned, (stored, learned)
    for r in rows:
        if r.params >= 64 * 64 * 9:  # scales and names are small next to a full layer
            assert r.stored_bytes <= 1.1 * r.learned_bytes, r


@pytest.mark.parametrize("layer, dtype", [("conv1", TensorProto.INT4), ("conv4", None)])
def test_containers(layer: str, dtype: int | None) -> None:
    packed = emitted("pack")
    nodes = {n.name: n for n in packed.graph.node}
    producer = {o: n for n in packed.graph.node for o in n.output}
    inits = {t.name: t for t in packed.graph.initializer}
    dq = producer[nodes[layer].input[1]]
    if dtype is not None:
        assert inits[dq.input[0]].data_type == dtype
    else:  # 6 bits: a uint8 stream of exactly 6 bits per weight
        stream = inits[producer[dq.input[0]].input[0]]
        assert stream.data_type == TensorProto.UINT8
        assert stream.dims[1] == 6 and stream.dims[0] * 8 >= 64 * 64 * 9 > (stream.dims[0] - 1) * 8


def test_packed_model_runs_and_unpacks_to_the_ort_model() -> None:
    model, net, x = frozen()
    packed = emitted("pack")
    result = verify(packed, net, [x], "pack")
    assert result.max_steps <= 1 and result.tensors == len(net.acts)
    assert unpack_model(packed).SerializeToString() == emitted("ort").SerializeToString()
    assert packed.ByteSize() < emitted("ort").ByteSize()
