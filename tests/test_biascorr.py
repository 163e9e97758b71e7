"""Empirical bias correction: quantized layer output means match the float model's."""

from __future__ import annotations

import pytest
import torch

from onnxbits.biascorr import _channel_mean, correct_biases
from onnxbits.train import freeze_all
from tests.builders import conv_relu_gemm, linear_bottleneck, matmul_mlp, residual_block
from tests.conftest import calibrated_network


def output_means(module: torch.nn.Module, net_sites: list, graph: torch.fx.GraphModule,
                 x: torch.Tensor) -> dict[str, torch.Tensor]:
    means: dict[str, torch.Tensor] = {}
    hooks = [graph.get_submodule(site.module).register_forward_hook(
        lambda m, i, out, site=site: means.__setitem__(site.node, _channel_mean(out, site.op)))
        for site in net_sites]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return means


@pytest.mark.parametrize("build", [conv_relu_gemm, residual_block, linear_bottleneck])
def test_corrected_means_match_the_float_model(build: object) -> None:
    s = calibrated_network(build())
    for q in s.net.quantizers():
        q.bits.data.fill_(2.0)
    freeze_all(s.net)
    float_state = {k: v.clone() for k, v in s.graph.state_dict().items()}
    before = output_means(s.net, s.net.sites, s.net.graph, s.x)
    reference = output_means(s.graph, s.net.sites, s.graph, s.x)
    shifts = correct_biases(s.graph, s.net, [s.x[:32], s.x[32:]])
    after = output_means(s.net, s.net.sites, s.net.graph, s.x)
    assert [b.node for b in shifts] == [site.node for site in s.net.sites]
    gap_before = max(float((before[n] - reference[n]).abs().max()) for n in reference)
    assert gap_before > 1e-3                      # 2-bit quantization did shift the means
    for node, ref in reference.items():
        torch.testing.assert_close(after[node], ref, atol=1e-4, rtol=1e-4)
    for shift in shifts:
        assert shift.max_shift >= 0 and shift.relative >= 0
    for key, value in s.graph.state_dict().items():   # the float reference is not touched
        assert torch.equal(value, float_state[key])


def test_layers_without_bias_are_left_alone() -> None:
    model = matmul_mlp()
    s = calibrated_network(model)
    weights = [w.clone() for w in s.net.kernel_parameters()]
    shifts = correct_biases(s.graph, s.net, [s.x])
    matmuls = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert not matmuls & {b.node for b in shifts}
    assert all(torch.equal(a, b) for a, b in zip(weights, s.net.kernel_parameters(), strict=True))
