"""Numerics and gradients of BitQuantizer (and of the test oracles interpolated_quant and fixed_quant).

The reference for every forward value is plain k-bit quantization written in numpy
(``clamp(round_half_even(x / s), qmin, qmax) * s`` with ``s = alpha / qmax``); the reference for
the clip-value gradient is plain torch autograd with a straight-through round.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxbits.emit.qparams as qparams_module
import onnxbits.quant.quantizer as quantizer_module
import onnxbits.quant.ranges as ranges_module
from onnxbits.quant.fakequant import levels
from onnxbits.quant.quantizer import BitQuantizer, freeze_rule
from onnxbits.quant.ranges import container_bits, qrange
from tests.fakequant_oracle import fixed_quant, interpolated_quant

# (signed, narrow): weights are signed narrow, activations unsigned or signed full range.
KINDS = {
    "weight-signed-narrow": (True, True),
    "act-unsigned": (False, False),
    "act-signed": (True, False),
}


def limits(k: int, signed: bool, narrow: bool) -> tuple[float, float]:
    """(qmin, qmax) of k-bit integers, written out independently of the library."""
    if not signed:
        return 0.0, 2.0**k - 1
    qmax = 2.0 ** (k - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def q_int(x: np.ndarray, alpha: float | np.ndarray, k: int, signed: bool,
          narrow: bool) -> np.ndarray:
    """Plain k-bit fake quantization in float32 numpy (np.round rounds half to even)."""
    qmin, qmax = limits(k, signed, narrow)
    step = (np.asarray(alpha, np.float32) / np.float32(qmax)).astype(np.float32)
    r = np.clip(np.round(np.asarray(x, np.float32) / step), qmin, qmax)
    return (r * step).astype(np.float32)


def ste_quant(x: torch.Tensor, log_alpha: torch.Tensor, k: int, signed: bool,
              narrow: bool) -> torch.Tensor:
    """Reference Q_int with plain autograd: alpha = exp(log_alpha), straight-through round.

    The straight-through round is written ``round(v) + (v - v.detach())``: gradient 1 and the
    value ``round(v)`` exactly (``v + (round(v) - v).detach()`` can land one ulp above ``qmax``).
    The in-range mask is on the rounded integer with inclusive bounds, as in torch.ao's
    fake_quantize kernels; it is written out because ``torch.clamp`` with scalar bounds has a
    zero gradient at the bounds themselves.
    """
    qmin, qmax = limits(k, signed, narrow)
    step = log_alpha.exp() / qmax
    v = x / step
    r = v.round() + (v - v.detach())
    inside = (v.detach().round() >= qmin) & (v.detach().round() <= qmax)
    return torch.where(inside, r, r.detach().clamp(qmin, qmax)) * step


def make_quantizer(signed: bool, narrow: bool, bits: float, alpha: float = 1.5,
                   **kwargs: object) -> BitQuantizer:
    q = BitQuantizer(signed=signed, narrow=narrow, **kwargs)  # type: ignore[arg-type]
    q.init_alpha(torch.tensor(alpha))
    with torch.no_grad():
        q.bits.fill_(bits)
    return q


def sample(n: int = 256, spread: float = 2.5, seed: int = 0) -> torch.Tensor:
    """Normal values, many of them outside a clip range of 1.5."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy((rng.normal(size=n) * spread).astype(np.float32))


def alpha_of(q: BitQuantizer) -> np.ndarray:
    return q.alpha().detach().numpy()


# --- forward values -------------------------------------------------------------------------


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_integer_bits_equal_plain_k_bit_quantization(signed: bool, narrow: bool, k: int) -> None:
    q = make_quantizer(signed, narrow, bits=float(k))
    x = sample()
    y = q(x).detach().numpy()
    np.testing.assert_array_equal(y, q_int(x.numpy(), alpha_of(q), k, signed, narrow))
    assert not q.frozen and q.bits.requires_grad


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
def test_fractional_bits_interpolate_between_floor_and_ceil(signed: bool, narrow: bool) -> None:
    q = make_quantizer(signed, narrow, bits=4.3)
    x = sample()
    alpha = alpha_of(q)
    expected = 0.7 * q_int(x.numpy(), alpha, 4, signed, narrow) + \
        0.3 * q_int(x.numpy(), alpha, 5, signed, narrow)
    np.testing.assert_allclose(q(x).detach().numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
def test_max_bits_gives_max_bit_quantization(signed: bool, narrow: bool) -> None:
    q = make_quantizer(signed, narrow, bits=8.0, max_bits=8)
    x = sample()
    expected = q_int(x.numpy(), alpha_of(q), 8, signed, narrow)
    np.testing.assert_allclose(q(x).detach().numpy(), expected, rtol=0, atol=1e-6)


def test_bits_outside_the_range_quantize_at_the_clamped_bits() -> None:
    q = make_quantizer(True, True, bits=11.0, min_bits=2, max_bits=6)
    x = sample()
    expected = q_int(x.numpy(), alpha_of(q), 6, True, True)
    np.testing.assert_allclose(q(x).detach().numpy(), expected, atol=1e-6)


def test_functions_match_the_module() -> None:
    x = sample()
    alpha = torch.tensor(1.25)
    lo, a = torch.tensor(3.0), torch.tensor(0.25)
    y = interpolated_quant(x, alpha, lo, a, True, False)
    expected = 0.75 * q_int(x.numpy(), 1.25, 3, True, False) + \
        0.25 * q_int(x.numpy(), 1.25, 4, True, False)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-6, atol=1e-6)
    fixed = fixed_quant(x, alpha, torch.tensor(5.0), False, False)
    np.testing.assert_array_equal(fixed.numpy(), q_int(x.numpy(), 1.25, 5, False, False))


@pytest.mark.parametrize(("signed", "narrow", "expected"),
                         [(True, True, (-7.0, 7.0)), (True, False, (-8.0, 7.0)),
                          (False, False, (0.0, 15.0))],
                         ids=["signed-narrow", "signed", "unsigned"])
def test_levels_at_4_bits(signed: bool, narrow: bool, expected: tuple[float, float]) -> None:
    qmin, qmax = levels(torch.tensor(4.0), signed, narrow)
    assert (float(qmin), float(qmax)) == expected == qrange(4, signed, narrow)


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize(("n", "lo"), [(4.3, 4), (4.0, 4), (2.0, 2), (7.6, 7), (8.0, 7)],
                         ids=["n=4.3", "n=4-integer", "n=min", "n=7.6", "n=max"])
def test_bitlength_gradient_is_the_difference_of_neighbouring_grids(
        signed: bool, narrow: bool, n: float, lo: int) -> None:
    q = make_quantizer(signed, narrow, bits=n)
    x = sample()
    g = torch.from_numpy(np.random.default_rng(1).normal(size=x.shape).astype(np.float32))
    (g * q(x)).sum().backward()
    alpha = alpha_of(q)
    diff = q_int(x.numpy(), alpha, lo + 1, signed, narrow) - q_int(x.numpy(), alpha, lo, signed,
                                                                    narrow)
    expected = float((g.numpy().astype(np.float64) * diff).sum())
    assert q.bits.grad is not None and q.bits.grad.shape == (1,)
    assert float(q.bits.grad[0]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert expected != 0.0


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("n", [3.0, 4.3, 5.75, 8.0])
def test_clip_value_gradient_matches_straight_through_autograd(signed: bool, narrow: bool,
                                                               n: float) -> None:
    q = make_quantizer(signed, narrow, bits=n)
    x = sample()
    g = torch.from_numpy(np.random.default_rng(2).normal(size=x.shape).astype(np.float32))
    (g * q(x)).sum().backward()

    log_alpha = q.log_alpha.detach().clone().requires_grad_(True)
    lo = min(math.floor(n), q.max_bits - 1)
    a = n - lo
    ref = (1 - a) * ste_quant(x, log_alpha, lo, signed, narrow) + \
        a * ste_quant(x, log_alpha, lo + 1, signed, narrow)
    (g * ref).sum().backward()
    assert q.log_alpha.grad is not None
    torch.testing.assert_close(q.log_alpha.grad, log_alpha.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
def test_frozen_clip_value_gradient_matches_straight_through_autograd(signed: bool,
                                                                      narrow: bool) -> None:
    q = make_quantizer(signed, narrow, bits=5.0)
    q.freeze()
    x = sample()
    g = torch.from_numpy(np.random.default_rng(3).normal(size=x.shape).astype(np.float32))
    (g * q(x)).sum().backward()
    log_alpha = q.log_alpha.detach().clone().requires_grad_(True)
    (g * ste_quant(x, log_alpha, 5, signed, narrow)).sum().backward()
    torch.testing.assert_close(q.log_alpha.grad, log_alpha.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("frozen", [False, True], ids=["learned", "frozen"])
def test_input_gradient_is_one_inside_and_zero_outside_the_clip_range(
        signed: bool, narrow: bool, frozen: bool) -> None:
    q = make_quantizer(signed, narrow, bits=4.5, alpha=1.0)
    if frozen:
        q.freeze()
    low = -1.0 if signed else 0.0
    inside = torch.linspace(low * 0.9, 0.9, 101)
    outside = torch.tensor([-3.0, -1.5, 1.2, 2.0, 50.0]) if signed else \
        torch.tensor([-3.0, -1.0, -0.5, 1.2, 2.0, 50.0])
    x = torch.cat([inside, outside]).requires_grad_(True)
    q(x).sum().backward()
    assert x.grad is not None
    np.testing.assert_array_equal(x.grad[: len(inside)].numpy(), np.ones(len(inside)))
    np.testing.assert_array_equal(x.grad[len(inside):].numpy(), np.zeros(len(outside)))


def test_input_gradient_mask_is_on_the_rounded_integer() -> None:
    """Values up to half a step beyond the clip value round onto the grid's edge and keep the
    straight-through gradient (torch.ao's convention); beyond that the gradient is 0."""
    q = make_quantizer(True, True, bits=4.0, alpha=1.0)
    q.freeze()
    step = 1.0 / 7
    x = torch.tensor([1.0, 1.0 + 0.4 * step, 1.0 + 0.6 * step,
                      -1.0, -1.0 - 0.4 * step, -1.0 - 0.6 * step], requires_grad=True)
    q(x).sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


# --- per-channel clip values and bits ---------------------------------------------------------


def per_channel_expected(w: np.ndarray, alpha: np.ndarray, bits: np.ndarray,
                         axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel interpolated quantization of ``w`` and each channel's ``Q_hi - Q_lo``."""
    out = np.empty_like(w)
    diffs = np.empty_like(w)
    for c in range(w.shape[axis]):
        index = [slice(None)] * w.ndim
        index[axis] = c
        n = float(np.float32(bits[c]))
        lo = min(math.floor(n), 7)
        a = np.float32(n) - np.float32(lo)
        q_lo = q_int(w[tuple(index)], alpha[c], lo, True, True)
        q_hi = q_int(w[tuple(index)], alpha[c], lo + 1, True, True)
        out[tuple(index)] = q_lo + a * (q_hi - q_lo)
        diffs[tuple(index)] = q_hi - q_lo
    return out, diffs


@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 3, 3), 0), ((5, 4), 1)],
                         ids=["conv-4d-axis0", "matmul-2d-axis1"])
@pytest.mark.parametrize("per_channel_bits", [True, False], ids=["bits-per-channel",
                                                                  "bits-per-tensor"])
def test_per_channel_alpha_and_bits_broadcast_along_the_channel_axis(
        shape: tuple[int, ...], axis: int, per_channel_bits: bool) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32)
    channels = shape[axis]
    q = BitQuantizer(signed=True, narrow=True, num_channels=channels, channel_axis=axis,
                     per_channel_bits=per_channel_bits)
    q.init_alpha(torch.tensor([0.5, 1.0, 1.5, 2.0][:channels]))
    bits = np.array([3.0, 4.5, 6.25, 8.0][:channels], np.float32) if per_channel_bits else \
        np.full(channels, 4.5, np.float32)
    with torch.no_grad():
        q.bits.copy_(torch.from_numpy(bits[: q.bits.numel()]))
    wt = torch.from_numpy(w)
    g = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    y = q(wt)
    (g * y).sum().backward()
    expected, diffs = per_channel_expected(w, alpha_of(q), bits, axis)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert q.log_alpha.grad is not None and q.log_alpha.grad.shape == (channels,)
    other = tuple(d for d in range(len(shape)) if d != axis)
    bits_grad = (g.numpy().astype(np.float64) * diffs).sum(axis=other)
    if per_channel_bits:
        np.testing.assert_allclose(q.bits.grad.numpy(), bits_grad, rtol=1e-5, atol=1e-6)
    else:
        assert float(q.bits.grad[0]) == pytest.approx(bits_grad.sum(), rel=1e-5, abs=1e-6)


def test_frozen_per_channel_bits_quantize_each_channel_at_its_own_bits() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    q = BitQuantizer(signed=True, narrow=True, num_channels=3, per_channel_bits=True)
    q.init_alpha(torch.tensor([1.0, 1.5, 2.0]))
    with torch.no_grad():
        q.bits.copy_(torch.tensor([2.4, 4.5, 7.2]))
    q.freeze()
    assert q.frozen_bits.tolist() == [2.0, 5.0, 7.0]
    y = q(torch.from_numpy(w)).detach().numpy()
    alpha = alpha_of(q)
    for c, k in enumerate((2, 5, 7)):
        np.testing.assert_array_equal(y[c], q_int(w[c], alpha[c], k, True, True))


# --- freezing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(2.49, 2), (2.5, 3), (3.5, 4), (4.0, 4), (4.51, 5),
                                      (7.49, 7), (7.5, 8), (7.9, 8), (9.0, 8), (1.2, 2)])
def test_freeze_rule_rounds_half_up_and_clamps(n: float, k: int) -> None:
    assert freeze_rule(torch.tensor([n]), 2, 8).tolist() == [float(k)]


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
def test_frozen_quantizer_is_plain_k_bit_and_bits_get_no_gradient(signed: bool,
                                                                  narrow: bool) -> None:
    q = make_quantizer(signed, narrow, bits=4.6)
    q.freeze()
    assert q.frozen and q.frozen_bits.tolist() == [5.0]
    assert not q.bits.requires_grad
    x = sample().requires_grad_(True)
    y = q(x)
    np.testing.assert_array_equal(y.detach().numpy(),
                                  q_int(x.detach().numpy(), alpha_of(q), 5, signed, narrow))
    y.sum().backward()
    assert q.bits.grad is None
    assert q.log_alpha.grad is not None and x.grad is not None
    assert "frozen bits=5.00" in repr(q)


def test_freeze_with_explicit_bits() -> None:
    q = make_quantizer(True, True, bits=7.9)
    q.freeze(torch.tensor(3.0))
    x = sample()
    np.testing.assert_array_equal(q(x).detach().numpy(), q_int(x.numpy(), alpha_of(q), 3, True,
                                                                True))


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "learned"])
def test_exec_bits_overrides_the_bits(frozen: bool) -> None:
    q = make_quantizer(False, False, bits=3.0)
    if frozen:
        q.freeze()
    q.exec_bits = 8
    x = sample()
    np.testing.assert_array_equal(q(x).detach().numpy(), q_int(x.numpy(), alpha_of(q), 8, False,
                                                                False))
    assert float(q.step().detach()) == pytest.approx(float(alpha_of(q)[0]) / 255)
    q.exec_bits = None
    if frozen:
        np.testing.assert_array_equal(q(x).detach().numpy(),
                                      q_int(x.numpy(), alpha_of(q), 3, False, False))


def test_disabled_quantizer_is_the_identity() -> None:
    q = make_quantizer(True, False, bits=2.0)
    q.enabled = False
    x = sample()
    assert torch.equal(q(x), x)


def test_init_alpha_replaces_non_positive_values_by_a_tiny_clip() -> None:
    q = BitQuantizer(signed=True, num_channels=2)
    q.init_alpha(torch.tensor([0.0, 2.0]))
    alpha = q.alpha().detach()
    assert alpha[0] > 0 and float(alpha[1]) == pytest.approx(2.0)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("min_bits", "max_bits"), [(5, 4), (0, 8), (2, 17)])
def test_quantizer_rejects_bad_bit_ranges(min_bits: int, max_bits: int) -> None:
    with pytest.raises(ValueError, match=r"1 <= min_bits <= max_bits <= 16"):
        BitQuantizer(signed=True, min_bits=min_bits, max_bits=max_bits)


def test_ranges_reject_bad_bits() -> None:
    with pytest.raises(ValueError, match="signed quantization needs at least 2 bits"):
        qrange(1, signed=True)
    with pytest.raises(ValueError, match="bits must be >= 1"):
        qrange(0, signed=False)
    with pytest.raises(ValueError, match="bits must be <= 32"):
        container_bits(33)


kinds = st.sampled_from(list(KINDS.values()))
values = st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32),
                  min_size=1, max_size=32)


@settings(deadline=None, max_examples=60)
@given(kind=kinds, k=st.integers(2, 8), alpha=st.floats(1e-2, 1e2), xs=values)
def test_quantization_is_idempotent_at_frozen_bits(kind: tuple[bool, bool], k: int, alpha: float,
                                                    xs: list[float]) -> None:
    q = make_quantizer(*kind, bits=float(k), alpha=alpha)
    q.freeze()
    with torch.no_grad():
        y = q(torch.tensor(xs, dtype=torch.float32))
        assert torch.equal(q(y), y)


@settings(deadline=None, max_examples=60)
@given(kind=kinds, k=st.integers(2, 8), alpha=st.floats(1e-2, 1e2),
       ts=st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=1, max_size=32))
def test_error_is_at_most_half_a_step_inside_the_range(kind: tuple[bool, bool], k: int,
                                                       alpha: float, ts: list[float]) -> None:
    signed, narrow = kind
    qmin, qmax = limits(k, signed, narrow)
    step = alpha / qmax
    x = torch.tensor([(qmin + t * (qmax - qmin)) * step for t in ts], dtype=torch.float32)
    y = fixed_quant(x, torch.tensor(alpha), torch.tensor(float(k)), signed, narrow)
    assert float((y - x).abs().max()) <= step / 2 * (1 + 1e-5) + 1e-6


@settings(deadline=None, max_examples=60)
@given(min_bits=st.integers(1, 8), span=st.integers(0, 8),
       value=st.floats(-100, 100, allow_nan=False, allow_subnormal=False))
def test_clamp_bits_keeps_bits_within_the_range(min_bits: int, span: int, value: float) -> None:
    max_bits = min(min_bits + span, 16)
    q = BitQuantizer(signed=False, min_bits=min_bits, max_bits=max_bits)
    with torch.no_grad():
        q.bits.fill_(value)
    q.clamp_bits()
    assert min_bits <= float(q.bits.detach()) <= max_bits
    assert min_bits <= float(freeze_rule(q.bits.detach(), min_bits, max_bits)) <= max_bits


def test_clamp_bits_after_a_large_optimizer_step() -> None:
    q = make_quantizer(True, True, bits=3.0)
    opt = torch.optim.SGD([q.bits], lr=1e6)
    (q(sample()) ** 2).sum().backward()
    opt.step()
    q.clamp_bits()
    assert 2.0 <= float(q.bits.detach()) <= 8.0


# --- doctests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [ranges_module, quantizer_module, qparams_module],
                         ids=lambda m: m.__name__)
def test_doctests_pass(module: object) -> None:
    result = doctest.testmod(module, verbose=False)  # type: ignore[arg-type]
    assert result.attempted > 0
    assert result.failed == 0
