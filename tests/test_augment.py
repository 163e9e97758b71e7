"""Random resized crops and mixes: the stated geometry, exact special cases, the online teacher."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from onnxbits.augment import Crops, apply_crops, apply_mix, sample_crops, sample_mixes, step_generator
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


def test_mixes_draw_partners_among_all_images_and_weights_in_the_unit_interval() -> None:
    mixes = sample_mixes(4000, 7, torch.Generator().manual_seed(0))
    assert mixes.partners.dtype == torch.int64
    assert set(mixes.partners.tolist()) == set(range(7))
    assert 0 <= float(mixes.weight.min()) and float(mixes.weight.max()) < 1
    assert float(mixes.weight.mean()) == pytest.approx(0.5, abs=0.02)
    again = sample_mixes(4000, 7, torch.Generator().manual_seed(0))
    assert torch.equal(again.partners, mixes.partners) and torch.equal(again.weight, mixes.weight)
    part = mixes.rows(slice(10, 20))
    assert torch.equal(part.partners, mixes.partners[10:20])


def test_mix_is_the_stated_convex_combination() -> None:
    x, partner = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    weight = torch.tensor([0.0, 0.25, 1.0])
    got = apply_mix(x, partner, weight)
    torch.testing.assert_close(got[0], partner[0])
    torch.testing.assert_close(got[1], 0.25 * x[1] + 0.75 * partner[1])
    torch.testing.assert_close(got[2], x[2])
    with pytest.raises(ValueError, match="one shape"):
        apply_mix(x, partner[:2], weight)


def test_fine_tune_with_mixes_fetches_partners_and_distils_on_the_mixed_images() -> None:
    s = calibrated_network(conv_relu_gemm(classes=4))
    assert s.graph is not None
    cfg = TrainConfig(steps=4, batch_size=8, lam=0.1, augment="mix")
    fetched: list[list[int]] = []
    seen: list[torch.Tensor] = []

    def fetch(idx):
        fetched.append([int(i) for i in idx])
        return s.x[idx], None

    hooks = [m.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0]))
             for m in (s.graph, s.net.graph)]
    history = fine_tune(s.net, fetch, None, len(s.x), cfg, float_graph=s.graph)
    for hook in hooks:
        hook.remove()
    assert len(history) == 4 and all(r.task > 0 for r in history)
    assert len(fetched) == 8                        # the batch, then its partners, every step
    partners = [fetched[i] for i in range(1, 8, 2)]
    assert all(len(p) == 8 and all(0 <= i < len(s.x) for i in p) for p in partners)
    assert len({tuple(p) for p in partners}) == 4   # fresh partners every step
    teacher_inputs, student_inputs = seen[0::2], seen[1::2]
    assert all(torch.equal(t, u) for t, u in zip(teacher_inputs, student_inputs, strict=True))
    with pytest.raises(ValueError, match="needs loss='kd'"):
        fine_tune(s.net, fetch, None, len(s.x),
                  TrainConfig(steps=2, batch_size=8, augment="mix", loss="kd+ce"),
                  float_graph=s.graph)
