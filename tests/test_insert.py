"""Where activation quantizers go: one per tensor that feeds a quantized layer."""

from __future__ import annotations

import pytest

from onnxbits.graph.normalize import normalize
from onnxbits.importer.convert import convert, find_sites
from onnxbits.quant.network import attach_quantizers
from tests.builders import ALL_BUILDERS


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
def test_every_layer_input_has_a_quantizer(name: str) -> None:
    model = normalize(ALL_BUILDERS[name]())
    graph = convert(model)
    sites = find_sites(model, graph)
    net = attach_quantizers(model, graph, sites)
    for site in sites:
        assert net.layer_act[site.node] == site.input
        assert site.input in net.acts, f"{site.node}: input {site.input} is not quantized"


def test_a_layer_fed_directly_by_another_layer_gets_its_own_quantizer() -> None:
    model = normalize(ALL_BUILDERS["linear_bottleneck"]())
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph))
    assert "project_out" in net.acts           # project -> expand, no activation between
    assert net.acts["project_out"].signed
    assert net.layer_act["expand"] == "project_out"


def test_activation_floor_applies_to_activation_quantizers_only() -> None:
    model = normalize(ALL_BUILDERS["linear_bottleneck"]())
    graph = convert(model)
    net = attach_quantizers(model, graph, find_sites(model, graph), min_bits=2, max_bits=8,
                            min_act_bits=4)
    assert net.acts and {q.min_bits for q in net.acts.values()} == {4}
    assert net.layers and {l.wq.min_bits for l in net.layers.values()} == {2}
