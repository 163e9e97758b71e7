"""Random resized crops: the stated geometry, exact special cases, and the online teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onnxbits.augment import Crops, apply_crops, sample_crops, step_generator
from onnxbits.train import TrainConfig, fine_tune
from tests.builders import conv_relu_gemm
from tests.conftest import calibrated_network


def crops(width: float, height: float, cx: float, cy: float, flip: float, n: int = 3) -> Crops:
    def column(v: float) -> torch.Tensor:
        return torch.full((n,), v)
    return Crops(column(width), column(height), column(cx), column(cy), column(flip))


def random_crops(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return apply_crops(x, sample_crops(x.shape[0], generator))


def test_whole_image_crop_is_the_identity_and_its_mirror_flips() -> None:
    x = torch.randn(3, 2, 6, 8)
    torch.testing.assert_close(apply_crops(x, crops(1, 1, 0, 0, 1)), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_crops(x, crops(1, 1, 0, 0, -1)), torch.flip(x, [-1]),
                               atol=1e-5, rtol=0)


def test_left_half_crop_is_bilinear_upsampling_of_the_left_half() -> None:
    x = torch.randn(3, 2, 6, 8)
    got = apply_crops(x, crops(0.5, 1, -0.5, 0, 1))
    expected = F.interpolate(x[..., :4], size=(6, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got[..., :7], expected[..., :7], atol=1e-5, rtol=0)
    # output column 7 samples input x = 3.25: it reads the pixel right of the crop too
    torch.testing.assert_close(got[..., 7], 0.75 * x[..., 3] + 0.25 * x[..., 4],
                               atol=1e-5, rtol=0)


def test_sampled_crops_stay_inside_the_image_within_the_area_range() -> None:
    c = sample_crops(4000, torch.Generator().manual_seed(0))
    area = c.width * c.height
    assert float(area.min()) >= 0.25 - 1e-6 and float(area.max()) <= 1 + 1e-6
    assert float((c.cx.abs() + c.width).max()) <= 1 + 1e-6
    assert float((c.cy.abs() + c.height).max()) <= 1 + 1e-6
    assert set(c.flip.tolist()) == {-1.0, 1.0}
    assert 0.45 < float((c.flip < 0).float().mean()) < 0.55
    assert float(area.mean()) == pytest.approx(0.625, abs=0.03)   # E[s] of U(0.25, 1), few clips


def test_crops_depend_only_on_seed_and_step_and_shards_take_their_rows() -> None:
    x = torch.randn(5, 3, 8, 8)
    same = [random_crops(x, step_generator(1, 5)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], random_crops(x, step_generator(1, 6)))
    assert not torch.equal(same[0], random_crops(x, step_generator(2, 5)))
    crops = sample_crops(5, step_generator(1, 5))
    parts = [apply_crops(x[rows], crops.rows(rows)) for rows in (slice(0, 3), slice(3, 5))]
    torch.testing.assert_close(torch.cat(parts), same[0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_crops(torch.randn(4, 3), step_generator(0, 0))


def test_fine_tune_with_crops_uses_the_float_graph_as_teacher() -> None:
    s = calibrated_network(conv_relu_gemm(classes=4))
    assert s.graph is not None
    cfg = TrainConfig(steps=6, batch_size=16, lam=0.1, augment="crop")
    seen: list[torch.Tensor] = []
    hook = s.graph.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
    history = fine_tune(s.net, lambda idx: (s.x[idx], None), None, len(s.x), cfg,
                        float_graph=s.graph)
    hook.remove()
    assert len(history) == 6 and all(r.task > 0 for r in history)
    assert len(seen) == 6 and all(v.shape == (16, *s.x.shape[1:]) for v in seen)
    assert not any(torch.equal(v, s.x[:16]) for v in seen)     # crops, not the stored images
    with pytest.raises(ValueError, match="float graph"):
        fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg)
