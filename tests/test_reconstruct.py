"""Block reconstruction: cuts, blocks that chain into the whole network, the block objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxbits.train.loop import TrainConfig, fine_tune, freeze_all
from onnxbits.train.reconstruct import (
    ReconstructConfig,
    bytes_per_input,
    find_cuts,
    gather_images,
    reconstruct,
    split_blocks,
)
from tests.builders import ALL_BUILDERS, linear_bottleneck, residual_block
from tests.conftest import Calibrated, calibrated_network


def _frozen(build, bits: int = 3) -> Calibrated:
    s = calibrated_network(build(classes=4))
    freeze_all(s.net)
    for q in s.net.quantizers():
        q.frozen_bits.fill_(bits)
    return s


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def test_no_cut_falls_inside_a_residual_block() -> None:
    s = calibrated_network(residual_block(classes=4))
    assert s.graph is not None
    cuts = find_cuts(s.graph.graph)
    assert "stem_relu" in cuts and "block_add" in cuts
    assert not {"block_conv1", "block_relu1", "block_conv2"} & set(cuts)
    assert not any(n.op == "placeholder" for n in s.graph.graph.nodes if n.name in cuts)


@pytest.mark.parametrize("name", sorted(ALL_BUILDERS))
@pytest.mark.parametrize("min_layers", [1, 2, 3])
def test_blocks_chain_into_the_whole_network(name: str, min_layers: int) -> None:
    s = _frozen(ALL_BUILDERS[name])
    assert s.graph is not None
    blocks = split_blocks(s.net, s.graph, min_layers)
    assert [n for b in blocks for n in b.layers] == [site.node for site in s.net.sites]
    assert len(blocks) == 1 or all(len(b.layers) >= min_layers for b in blocks)
    x = s.x[:8]
    quant, flt = x, x
    with torch.no_grad():
        for block in blocks:
            quant, flt = block.quantized(quant), block.float(flt)
        torch.testing.assert_close(_first(quant), s.net(x), rtol=0, atol=0)
        torch.testing.assert_close(_first(flt), _first(s.graph(x)), rtol=1e-6, atol=1e-6)


def test_reconstruction_lowers_every_block_loss_and_keeps_the_bits() -> None:
    s = _frozen(linear_bottleneck)
    assert s.graph is not None
    bits = [q.frozen_bits.clone() for q in s.net.quantizers()]
    first = split_blocks(s.net, s.graph, 1)[0]
    with torch.no_grad():
        expected = float(((first.quantized(s.x) - first.float(s.x)) ** 2).mean())
    seen = []
    cfg = ReconstructConfig(steps=40, batch_size=16, lr=1e-3, min_layers=1)
    results = reconstruct(s.net, s.graph, s.x, cfg, on_block=seen.append)
    assert seen == results and [r.block for r in results] == list(range(len(results)))
    assert all(r.loss_after <= r.loss_before for r in results)
    assert sum(r.loss_after for r in results) < sum(r.loss_before for r in results)
    assert all(torch.equal(q.frozen_bits, b) for q, b in zip(s.net.quantizers(), bits))
    assert results[0].layers == first.layers
    assert results[0].loss_before == pytest.approx(expected, rel=1e-5)


def test_a_block_that_gets_worse_gets_its_parameters_back() -> None:
    s = _frozen(residual_block)
    assert s.graph is not None
    before = {node: (layer.float_weight().detach().clone(), layer.wq.log_alpha.detach().clone())
              for node, layer in s.net.layers.items()}
    cfg = ReconstructConfig(steps=5, batch_size=16, lr=10.0, alpha_lr=10.0, min_layers=1)
    results = reconstruct(s.net, s.graph, s.x, cfg)
    for r in results:
        assert r.loss_after <= r.loss_before
    worse = [r for r in results if r.loss_after == r.loss_before]
    assert worse    # a learning rate of 10 ruins at least one block
    for node in (n for r in worse for n in r.layers):
        layer = s.net.layers[node]
        assert torch.equal(layer.float_weight(), before[node][0])
        assert torch.equal(layer.wq.log_alpha, before[node][1])


def test_reported_losses_are_those_of_the_reconstructed_quantized_blocks() -> None:
    s = _frozen(residual_block)
    assert s.graph is not None
    cfg = ReconstructConfig(steps=3, batch_size=16, min_layers=1)
    results = reconstruct(s.net, s.graph, s.x, cfg)
    blocks = split_blocks(s.net, s.graph, 1)
    quant, flt = s.x, s.x
    with torch.no_grad():              # the reported losses are those of the quantized blocks
        for block, result in zip(blocks, results, strict=True):
            quant, flt = _first(block.quantized(quant)), _first(block.float(flt))
            assert result.loss_after == pytest.approx(float(((quant - flt) ** 2).mean()),
                                                      rel=1e-5)


def test_fine_tune_reconstructs_at_the_freeze_and_needs_the_float_graph() -> None:
    s = calibrated_network(residual_block(classes=4))
    assert s.graph is not None
    cfg = TrainConfig(steps=6, frozen_steps=2, batch_size=16, reconstruct_steps=4)
    blocks = []
    history = fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg,
                        float_graph=s.graph, on_block=blocks.append)
    assert len(history) == 6 and blocks
    assert all(q.frozen for q in s.net.quantizers())
    with pytest.raises(ValueError, match="float graph"):
        fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg)


def test_reconstruction_without_a_frozen_phase_runs_after_the_freeze() -> None:
    s = calibrated_network(residual_block(classes=4))
    assert s.graph is not None
    cfg = TrainConfig(steps=3, frozen_steps=0, batch_size=16, reconstruct_steps=2)
    blocks: list = []
    frozen_then: list[bool] = []

    def on_block(result) -> None:
        blocks.append(result)
        frozen_then.append(all(q.frozen for q in s.net.quantizers()))

    history = fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg,
                        float_graph=s.graph, on_block=on_block)
    assert len(history) == 3 and blocks and all(frozen_then)


def test_images_are_capped_by_a_seeded_subset_in_order() -> None:
    seen: list[np.ndarray] = []

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, None]:
        seen.append(idx)
        return torch.from_numpy(idx.astype(np.float32))[:, None], None

    cfg = ReconstructConfig(batch_size=4, max_images=10, seed=3)
    images = gather_images(fetch, 25, cfg, torch.device("cpu"))
    picked = images[:, 0].numpy()
    assert len(picked) == 10 and len(set(picked)) == 10 and (np.diff(picked) > 0).all()
    assert all(len(i) <= 4 for i in seen)
    assert torch.equal(gather_images(fetch, 25, cfg, torch.device("cpu")), images)
    everything = gather_images(fetch, 7, cfg, torch.device("cpu"))
    assert everything[:, 0].tolist() == list(range(7))


def test_bytes_per_input_counts_the_inputs_and_the_largest_block_twice() -> None:
    s = _frozen(residual_block)
    assert s.graph is not None
    blocks = split_blocks(s.net, s.graph, 1)
    x, peak = s.x[:1], 0
    with torch.no_grad():
        for block in blocks:
            y = _first(block.float(x))
            peak = max(peak, 4 * (2 * x.numel() + 2 * y.numel()))     # float32
            x = y
    assert bytes_per_input(blocks, s.x[:1]) == 4 * s.x[:1].numel() + peak


def test_a_memory_limit_reconstructs_on_a_seeded_subset() -> None:
    s = _frozen(residual_block)
    assert s.graph is not None
    first = split_blocks(s.net, s.graph, 1)[0]
    per = bytes_per_input(split_blocks(s.net, s.graph, 1), s.x[:1])
    cfg = ReconstructConfig(steps=0, batch_size=16, min_layers=1, seed=3)
    whole = reconstruct(s.net, s.graph, s.x, cfg, memory=10**12)
    assert (whole[0].inputs, whole[0].wanted) == (len(s.x),) * 2
    results = reconstruct(s.net, s.graph, s.x, cfg, memory=5 * per + per // 2)
    assert all((r.inputs, r.wanted) == (5, len(s.x)) for r in results)
    keep = np.sort(np.random.default_rng(3).choice(len(s.x), 5, replace=False))
    x = s.x[torch.from_numpy(keep)]
    with torch.no_grad():
        expected = float(((_first(first.quantized(x)) - _first(first.float(x))) ** 2).mean())
    assert results[0].loss_before == pytest.approx(expected, rel=1e-5)
