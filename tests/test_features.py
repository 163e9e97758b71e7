"""Feature distillation: the stated relative error, zero for identical graphs, hooks removed."""

from __future__ import annotations

import pytest
import torch

from onnxbits.features import FeatureTaps
from onnxbits.train import TrainConfig, fine_tune
from tests.builders import conv_relu_gemm
from tests.conftest import calibrated_network


def test_feature_loss_is_zero_without_quantization_and_matches_its_formula() -> None:
    s = calibrated_network(conv_relu_gemm(classes=4))
    assert s.graph is not None
    taps = FeatureTaps(s.net, s.graph)
    x = s.x[:8]
    for q in s.net.quantizers():
        q.enabled = False
    taps.run_teacher(x)
    s.net(x)
    assert float(taps.loss().detach()) == pytest.approx(0.0, abs=1e-10)
    for q in s.net.quantizers():
        q.enabled = True
    taps.run_teacher(x)
    teacher = {k: v.clone() for k, v in taps.teacher.items()}
    s.net(x)
    student = {k: v.detach().clone() for k, v in taps.student.items()}
    expected = sum(float(((student[k] - t) ** 2).sum() / (t**2).sum())
                   for k, t in teacher.items()) / len(teacher)
    assert len(teacher) == len(s.net.sites)
    assert float(taps.loss().detach()) == pytest.approx(expected)
    taps.close()
    s.net(x)
    assert not taps.student


def test_fine_tune_with_feature_kd_runs_and_removes_its_hooks() -> None:
    s = calibrated_network(conv_relu_gemm(classes=4))
    assert s.graph is not None
    cfg = TrainConfig(steps=6, batch_size=16, lam=0.1, feature_kd=1.0)
    history = fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg,
                        float_graph=s.graph)
    assert all(torch.isfinite(torch.tensor(r.task)) and r.task > 0 for r in history)
    modules = [*s.net.graph.modules(), *s.graph.modules()]
    assert not any(m._forward_hooks for m in modules)
    with pytest.raises(ValueError, match="float graph"):
        fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg)
