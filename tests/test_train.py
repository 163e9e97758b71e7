"""The fine-tune loop: bits and cost fall, bits stay in range, freezing, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxbits.data.sampler import batch_indices
from onnxbits.emit.targets import emit
from onnxbits.emit.verify import verify
from onnxbits.train.config import TrainConfig
from onnxbits.train.history import StepRecord
from onnxbits.train.loop import fine_tune
from onnxbits.train.losses import task_loss
from tests.builders import conv_relu_gemm
from tests.conftest import Calibrated, calibrated_network

Setup = Calibrated


def setup(min_bits: int = 2, max_bits: int = 8, classes: int = 10) -> Setup:
    return calibrated_network(conv_relu_gemm(classes=classes), min_bits=min_bits,
                              max_bits=max_bits)


def run(s: Setup, cfg: TrainConfig, **kwargs: object) -> list[StepRecord]:
    return fine_tune(s.net, lambda idx: (s.x[idx], None), s.teacher, len(s.x), cfg,
                     **kwargs)  # type: ignore[arg-type]


def test_smoke_bits_and_cost_fall_and_the_result_verifies() -> None:
    s = setup(min_bits=3, max_bits=8)
    cfg = TrainConfig(steps=40, batch_size=16, lam=1.0)
    seen: list[tuple[float, float]] = []

    def check(record: StepRecord) -> None:
        for q in s.net.quantizers():
            bits = q.frozen_bits if q.frozen else q.bits.detach()
            seen.append((float(bits.min()), float(bits.max())))

    history = run(s, cfg, on_step=check)
    learn = cfg.learn_steps()
    assert [r.phase for r in history] == ["learn"] * learn + ["frozen"] * (40 - learn)
    assert history[learn - 1].avg_bits < history[0].avg_bits
    assert history[learn - 1].cost < history[0].cost
    assert history[0].avg_bits == pytest.approx(8.0)
    assert all(3.0 <= lo and hi <= 8.0 for lo, hi in seen)
    for q in s.net.quantizers():
        assert q.frozen and not q.bits.requires_grad
        bits = q.frozen_bits
        assert torch.equal(bits, bits.round()) and 3 <= float(bits.min()) <= float(bits.max()) <= 8
    frozen_costs = {r.cost for r in history[learn:]}
    assert len(frozen_costs) == 1          # the bits cannot move after freezing
    emitted = emit(s.model, s.net, "exact-sim")
    assert verify(emitted, s.net, [s.x[:16]], "exact-sim").max_steps <= 1


def test_same_seed_gives_the_same_bits_twice() -> None:
    cfg = TrainConfig(steps=12, batch_size=16, lam=0.3)
    results = []
    for _ in range(2):
        s = setup()
        history = run(s, cfg)
        results.append(([q.frozen_bits.tolist() for q in s.net.quantizers()],
                         [r.loss for r in history]))
    assert results[0] == results[1]


def test_no_frozen_phase_still_freezes_at_the_end() -> None:
    s = setup()
    history = run(s, TrainConfig(steps=3, frozen_steps=0, batch_size=16, lam=1.0))
    assert [r.phase for r in history] == ["learn"] * 3
    assert all(q.frozen for q in s.net.quantizers())


def test_lambda_schedule_is_called_in_the_learning_phase_only() -> None:
    s = setup()
    calls: list[int] = []

    def schedule(step: int, lam: float, avg_bits: float) -> float:
        calls.append(step)
        return lam * 2

    history = run(s, TrainConfig(steps=5, frozen_steps=2, batch_size=16, lam=0.1),
                  lam_schedule=schedule)
    assert calls == [0, 1, 2]
    assert [r.lam for r in history[:3]] == pytest.approx([0.1, 0.2, 0.4])


def test_cross_entropy_with_labels() -> None:
    s = setup(classes=3)
    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 3, len(s.x)))
    history = fine_tune(s.net, lambda idx: (s.x[idx], labels[idx]), None, len(s.x),
                        TrainConfig(steps=4, batch_size=16, lam=0.1, loss="ce"))
    assert all(np.isfinite(r.task) and r.task > 0 for r in history)


@pytest.mark.parametrize(("steps", "frozen", "expected"), [(300, None, 90), (40, None, 12),
                                                           (10, 4, 4), (10, 20, 10)])
def test_frozen_step_count(steps: int, frozen: int | None, expected: int) -> None:
    cfg = TrainConfig(steps=steps, frozen_steps=frozen)
    assert cfg.n_frozen() == expected and cfg.learn_steps() == steps - expected


def test_batch_indices_cover_each_epoch_once_and_repeat_per_seed() -> None:
    first = batch_indices(10, 4, seed=3)
    epoch = np.concatenate([next(first) for _ in range(2)])      # 10 // 4 = 2 full batches
    assert len(set(epoch.tolist())) == 8 and epoch.max() < 10
    again = batch_indices(10, 4, seed=3)
    np.testing.assert_array_equal(np.concatenate([next(again) for _ in range(2)]), epoch)
    small = batch_indices(3, 8, seed=0)
    assert sorted(next(small).tolist()) == [0, 1, 2]


def test_task_losses() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    labels = torch.tensor([0, 2])
    assert float(task_loss(logits, logits, None, "kd")) == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert float(task_loss(logits, None, labels, "ce")) == pytest.approx(float(ce))
    both = task_loss(logits, logits + 1.0, labels, "kd+ce")  # a shift leaves softmax alone
    assert float(both) == pytest.approx(float(ce), abs=1e-6)


def test_kd_is_the_kl_of_the_teacher_and_student_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    expected = float((p * (p.log() - q.log())).sum(-1).mean())
    assert float(task_loss(student, teacher, None, "kd")) == pytest.approx(expected, rel=1e-5)




def test_sampler_state_is_constant_size_and_resumes_the_exact_next_batch() -> None:
    import pickle
    run = batch_indices(100_000, 64, seed=5)
    for _ in range(1600):                     # into the second epoch (1562 batches each)
        next(run)
    state = run.state_dict()
    assert len(pickle.dumps(state)) < 2000 and state["epoch"] == 2
    resumed = batch_indices(100_000, 64, seed=5)
    resumed.load_state_dict(state)
    for _ in range(3):
        expected = run.peek()
        batch = next(run)
        np.testing.assert_array_equal(expected, batch)
        np.testing.assert_array_equal(next(resumed), batch)
    fresh = batch_indices(10, 4, seed=1)
    fresh.load_state_dict(batch_indices(10, 4, seed=1).state_dict())   # before any batch
    np.testing.assert_array_equal(next(fresh), next(batch_indices(10, 4, seed=1)))
    assert fresh.peek() is not None          # the second batch of the epoch
    next(fresh)
    assert fresh.peek() is None              # the next batch starts a new permutation


def test_read_ahead_fetches_the_same_batches_as_a_plain_fetch() -> None:
    s = setup()
    seen: list[list[int]] = []

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, None]:
        seen.append(idx.tolist())
        return s.x[torch.as_tensor(idx)], None

    cfg = TrainConfig(steps=7, frozen_steps=2, batch_size=4, loss="kd")
    plain_net = setup().net
    ahead_net = setup().net
    plain = fine_tune(plain_net, fetch, s.teacher, len(s.x), cfg)
    plain_seen, seen[:] = list(seen), []
    ahead = fine_tune(ahead_net, fetch, s.teacher, len(s.x), cfg, read_ahead=True)
    assert [r.to_dict() for r in ahead] == [r.to_dict() for r in plain]
    assert seen == plain_seen      # each step's batch once, in order, read one step early


@pytest.mark.parametrize("loss", ["kd", "kd+ce"])
@pytest.mark.parametrize("online", [False, True])
def test_micro_batches_give_the_whole_batch_gradient(loss: str, online: bool) -> None:
    """A batch of 16 run as 4 pieces of 4 (``micro_batch=5`` rounds to equal pieces): the same
    gradients of every parameter (bitlengths and clip values included) and the same loss."""
    from onnxbits.train.teacher import OnlineTeacher

    labels = torch.from_numpy(np.random.default_rng(0).integers(0, 10, 64))
    grads, tasks = [], []
    for micro in (None, 5):
        s = setup()
        teacher = OnlineTeacher(s.graph, rows_per_pass=micro) if online else s.teacher
        history = fine_tune(s.net, lambda idx, s=s: (s.x[idx], labels[idx]), teacher, len(s.x),
                            TrainConfig(steps=1, batch_size=16, lam=0.5, loss=loss,
                                        micro_batch=micro))
        grads.append({n: p.grad.clone() for n, p in s.net.graph.named_parameters()
                      if p.grad is not None})
        tasks.append(history[0].task)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, whole in grads[0].items():
        torch.testing.assert_close(grads[1][name], whole, rtol=1e-4, atol=1e-6, msg=name)
    assert tasks[1] == pytest.approx(tasks[0], rel=1e-5, abs=1e-7)   # a KL near 0: absolute


def test_rows_per_pass_splits_only_batches_whose_activations_do_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxbits.graph.macs import activation_bytes
    from onnxbits.train import device

    model = conv_relu_gemm()
    per_sample = activation_bytes(model)
    assert per_sample is not None and per_sample > 0
    monkeypatch.setattr(device, "PASS_BYTES", 10 * per_sample)
    assert device.rows_per_pass(model, 64, fixed=False) == 10
    assert device.rows_per_pass(model, 10, fixed=False) is None       # fits in one pass
    assert device.rows_per_pass(model, 64, fixed=True) is None        # runs only at its batch


def test_calibration_in_pieces_gives_the_same_clip_values() -> None:
    from onnxbits.quant.network import calibrate

    s = setup()
    batches = [s.x[:32], s.x[32:]]
    calibrate(s.net, batches)
    whole = {t: q.alpha().detach().clone() for t, q in s.net.acts.items()}
    calibrate(s.net, batches, rows_per_pass=5)
    for tensor, q in s.net.acts.items():
        torch.testing.assert_close(q.alpha().detach(), whole[tensor], msg=tensor)
