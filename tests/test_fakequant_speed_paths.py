"""Every kernel path of the fused quantizer against the reference math of fakequant's docstring.

The reference is written out here in float64 numpy, element by element as the docstring states it:
forward ``(1 - a) Q_int(x, lo) + a Q_int(x, lo + 1)`` and the three gradients
``dQ/dx = (1 - a) 1[in_lo] + a 1[in_hi]``, ``dQ/dalpha = sum_k w_k (r_k - v_k 1[in_k]) / qmax_k``,
``dQ/da = Q_int(x, lo + 1) - Q_int(x, lo)``. The integer grid ``r_k`` comes from float32
``round(x / step_k)`` as in ONNX QuantizeLinear. Paths: ``eager`` and ``compiled`` kernels (forced
for any size), per-tensor and per-channel parameters, channels-last and transposed inputs, the input
of the network (no x gradient), half-precision inputs, and the compile fallback. No timing here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from onnxbits.quant import fakequant
from onnxbits.quant.fakequant import frozen_quant, learned_quant
from onnxbits.quant.quantizer import BitQuantizer
from tests.fakequant_oracle import fixed_quant, interpolated_quant

KERNELS = ["eager", "compiled"]
KINDS = {"weight-signed-narrow": (True, True), "act-unsigned": (False, False),
         "act-signed": (True, False)}


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = fakequant.get_kernel()
    fakequant.set_kernel(request.param)
    yield request.param
    fakequant.set_kernel(previous)
    assert fakequant.compile_error() is None


def limits(k: int, signed: bool, narrow: bool) -> tuple[float, float]:
    if not signed:
        return 0.0, 2.0**k - 1
    qmax = 2.0 ** (k - 1) - 1
    return (-qmax if narrow else -qmax - 1), qmax


def reference(x: np.ndarray, alpha: np.ndarray, lo: np.ndarray, a: np.ndarray, signed: bool,
              narrow: bool, g: np.ndarray) -> dict[str, np.ndarray]:
    """Forward and per-element gradient terms (float64) for broadcastable float32 parameters."""
    out: dict[str, list[np.ndarray]] = {"y": [], "in": [], "alpha": [], "q": []}
    for k_off, w in ((0, 1 - a.astype(np.float64)), (1, a.astype(np.float64))):
        qmin, qmax = np.vectorize(lambda k: limits(int(k) + k_off, signed, narrow),
                                  otypes=[np.float64, np.float64])(lo)
        step = (alpha / qmax.astype(np.float32)).astype(np.float32)
        v32 = (x / step).astype(np.float32)
        rounded = np.round(v32)
        r = np.clip(rounded, qmin, qmax)
        inside = (r == rounded).astype(np.float64)
        q = r * step.astype(np.float64)
        out["q"].append(q)
        out["in"].append(w * inside)
        out["alpha"].append(w * (r - v32.astype(np.float64) * inside) / qmax)
    q_lo, q_hi = out["q"]
    a64 = a.astype(np.float64)
    return {"y": q_lo + a64 * (q_hi - q_lo), "dx": g * (out["in"][0] + out["in"][1]),
            "dalpha": g * (out["alpha"][0] + out["alpha"][1]), "da": g * (q_hi - q_lo)}


def reduce_to(t: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a broadcast gradient back to a parameter's shape (numpy ``sum_to_size``)."""
    lead = t.ndim - len(shape)
    t = t.sum(axis=tuple(range(lead))) if lead else t
    axes = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(axis=axes, keepdims=True).reshape(shape) if axes else t.reshape(shape)


def data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy((rng.normal(size=shape) * 1.5).astype(np.float32))
    g = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    return x, g


def run_interpolated(x: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lo: torch.Tensor,
                     a: torch.Tensor, signed: bool, narrow: bool) -> dict[str, np.ndarray]:
    x = x.detach().clone().requires_grad_(True)
    alpha = alpha.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    y = interpolated_quant(x, alpha, lo, a, signed, narrow)
    y.backward(g)
    return {"y": y.detach().numpy(), "dx": x.grad.numpy(), "dalpha": alpha.grad.numpy(),
            "da": a.grad.numpy()}


def check(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], alpha: torch.Tensor,
          a: torch.Tensor) -> None:
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["dx"], ref["dx"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["dalpha"], reduce_to(ref["dalpha"], tuple(alpha.shape)),
                               rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(got["da"], reduce_to(ref["da"], tuple(a.shape)), rtol=2e-5,
                               atol=2e-4)


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
@pytest.mark.parametrize("n", [2.0, 3.3, 4.5, 7.75], ids=["n=2", "n=3.3", "n=4.5", "n=7.75"])
def test_per_tensor_kernel_matches_the_reference(kernel: str, signed: bool, narrow: bool,
                                                 n: float) -> None:
    x, g = data((4, 3, 5, 7))
    alpha, lo = torch.tensor(1.7), torch.tensor(float(int(n)))
    a = torch.tensor(n - int(n))
    got = run_interpolated(x, g, alpha, lo, a, signed, narrow)
    ref = reference(x.numpy(), alpha.numpy(), lo.numpy(), a.numpy(), signed, narrow, g.numpy())
    check(got, ref, alpha, a)


@pytest.mark.parametrize(("shape", "axis"), [((6, 3, 3, 3), 0), ((5, 6), 1), ((2, 6, 4, 4), 1)],
                         ids=["conv-weight-axis0", "matmul-weight-axis1", "act-axis1"])
@pytest.mark.parametrize("bits_per_channel", [False, True], ids=["bits-per-tensor",
                                                                  "bits-per-channel"])
def test_per_channel_kernel_matches_the_reference(kernel: str, shape: tuple[int, ...], axis: int,
                                                  bits_per_channel: bool) -> None:
    x, g = data(shape, seed=1)
    bshape = [1] * len(shape)
    bshape[axis] = 6
    alpha = torch.linspace(0.5, 3.0, 6).reshape(bshape)
    n = torch.tensor([2.0, 2.5, 3.25, 5.0, 6.9, 7.5]).reshape(bshape) if bits_per_channel else \
        torch.tensor(4.4)
    lo = torch.floor(n)
    a = n - lo
    got = run_interpolated(x, g, alpha, lo, a, True, True)
    ref = reference(x.numpy(), alpha.numpy(), lo.numpy(), a.numpy(), True, True, g.numpy())
    check(got, ref, alpha, a)


def test_integer_bits_are_bit_exact_in_every_kernel(kernel: str) -> None:
    x, _ = data((3, 4, 6, 6), seed=2)
    alpha, lo = torch.tensor(0.9), torch.tensor(4.0)
    y = interpolated_quant(x, alpha, lo, torch.tensor(0.0), False, False)
    ref = reference(x.numpy(), alpha.numpy(), lo.numpy(), np.float32(0), False, False,
                    np.zeros(x.shape))
    np.testing.assert_array_equal(y.numpy(), ref["y"].astype(np.float32))
    fixed = fixed_quant(x, alpha, torch.tensor(5.0), True, False)
    ref5 = reference(x.numpy(), alpha.numpy(), np.float32(5), np.float32(0), True, False,
                     np.zeros(x.shape))
    np.testing.assert_array_equal(fixed.numpy(), ref5["y"].astype(np.float32))


@pytest.mark.parametrize(("signed", "narrow"), KINDS.values(), ids=KINDS.keys())
def test_fixed_kernel_gradients_match_the_reference(kernel: str, signed: bool,
                                                    narrow: bool) -> None:
    x, g = data((4, 5, 6), seed=3)
    xr = x.clone().requires_grad_(True)
    alpha = torch.tensor(1.2, requires_grad=True)
    fixed_quant(xr, alpha, torch.tensor(3.0), signed, narrow).backward(g)
    ref = reference(x.numpy(), np.float32(1.2), np.float32(3), np.float32(0), signed, narrow,
                    g.numpy())
    np.testing.assert_allclose(xr.grad.numpy(), ref["dx"], atol=1e-6)
    np.testing.assert_allclose(float(alpha.grad), ref["dalpha"].sum(), rtol=2e-5, atol=2e-4)


def test_compiled_and_eager_kernels_agree_on_a_large_tensor() -> None:
    x, g = data((8, 16, 33, 33), seed=4)
    results = {}
    previous = fakequant.get_kernel()
    for name in KERNELS:
        fakequant.set_kernel(name)
        try:
            results[name] = run_interpolated(x, g, torch.tensor(2.0), torch.tensor(5.0),
                                             torch.tensor(0.625), False, False)
        finally:
            fakequant.set_kernel(previous)
    eager, compiled = results["eager"], results["compiled"]
    np.testing.assert_array_equal(compiled["y"], eager["y"])
    np.testing.assert_array_equal(compiled["dx"], eager["dx"])
    np.testing.assert_allclose(compiled["dalpha"], eager["dalpha"], rtol=1e-4)
    np.testing.assert_allclose(compiled["da"], eager["da"], rtol=1e-4)


def test_channels_last_and_transposed_inputs_keep_their_layout(kernel: str) -> None:
    x, g = data((2, 8, 5, 5), seed=5)
    base = run_interpolated(x, g, torch.tensor(1.5), torch.tensor(3.0), torch.tensor(0.4),
                            True, False)
    cl = x.contiguous(memory_format=torch.channels_last)
    y = interpolated_quant(cl, torch.tensor(1.5), torch.tensor(3.0), torch.tensor(0.4), True,
                           False)
    assert y.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(y.numpy(), base["y"])
    got = run_interpolated(cl, g.contiguous(memory_format=torch.channels_last),
                           torch.tensor(1.5), torch.tensor(3.0), torch.tensor(0.4), True, False)
    np.testing.assert_array_equal(got["dx"], base["dx"])
    xt = x.reshape(10, 40).t()                     # non-contiguous view
    yt = interpolated_quant(xt, torch.tensor(1.5), torch.tensor(3.0), torch.tensor(0.4), True,
                            False)
    np.testing.assert_array_equal(yt.numpy(), base["y"].reshape(10, 40).T)


def test_network_input_needs_no_input_gradient(kernel: str) -> None:
    x, g = data((3, 3, 8, 8), seed=6)
    alpha = torch.tensor(2.0, requires_grad=True)
    a = torch.tensor(0.25, requires_grad=True)
    interpolated_quant(x, alpha, torch.tensor(6.0), a, True, False).backward(g)
    ref = reference(x.numpy(), np.float32(2.0), np.float32(6), np.float32(0.25), True, False,
                    g.numpy())
    np.testing.assert_allclose(float(alpha.grad), ref["dalpha"].sum(), rtol=2e-5, atol=2e-4)
    np.testing.assert_allclose(float(a.grad), ref["da"].sum(), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_inputs_are_quantized_in_float32_and_cast_back(kernel: str,
                                                             dtype: torch.dtype) -> None:
    x, g = data((2, 4, 6, 6), seed=7)
    xh = x.to(dtype).requires_grad_(True)
    alpha = torch.tensor(1.5, requires_grad=True)
    y = interpolated_quant(xh, alpha, torch.tensor(3.0), torch.tensor(0.5), False, False)
    assert y.dtype == dtype
    full = interpolated_quant(xh.detach().float(), torch.tensor(1.5), torch.tensor(3.0),
                              torch.tensor(0.5), False, False)
    assert torch.equal(y, full.to(dtype))
    y.backward(g.to(dtype))
    assert xh.grad is not None and xh.grad.dtype == dtype
    assert alpha.grad is not None and alpha.grad.dtype == torch.float32


def test_quantizer_under_cpu_autocast_keeps_float32_parameters(kernel: str) -> None:
    layer = torch.nn.Linear(12, 8)
    q = BitQuantizer(signed=True)
    q.init_alpha(torch.tensor(0.8))
    with torch.no_grad():
        q.bits.fill_(4.25)
    x = torch.randn(5, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer(x)
        y = q(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    expected = interpolated_quant(h.detach().float(), q.alpha().detach(), torch.tensor(4.0),
                                  torch.tensor(0.25), True, False).to(torch.bfloat16)
    assert torch.equal(y.detach(), expected)
    y.float().sum().backward()
    assert q.log_alpha.grad is not None and q.bits.grad is not None


@pytest.mark.parametrize("per_channel_bits", [False, True], ids=["bits-per-tensor",
                                                                  "bits-per-channel"])
def test_module_path_equals_the_explicit_functions(kernel: str, per_channel_bits: bool) -> None:
    w, g = data((4, 3, 3, 3), seed=8)
    q = BitQuantizer(signed=True, narrow=True, num_channels=4, per_channel_bits=per_channel_bits,
                     max_bits=6)
    q.init_alpha(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    with torch.no_grad():
        q.bits.copy_(torch.tensor([2.3, 4.0, 5.5, 9.0][: q.bits.numel()]))
    y = q(w)
    y.backward(g)
    log_alpha = q.log_alpha.detach().clone().requires_grad_(True)
    bits = q.bits.detach().clone().requires_grad_(True)
    n = bits + (bits.clamp(2, 6) - bits).detach()
    lo = torch.clamp(torch.floor(n.detach()), 2, 5)
    shape = (4, 1, 1, 1) if per_channel_bits else ()
    ref = interpolated_quant(w, log_alpha.exp().reshape(4, 1, 1, 1), lo.reshape(shape),
                             (n - lo).reshape(shape), True, True)
    ref.backward(g)
    assert torch.equal(y.detach(), ref.detach())
    torch.testing.assert_close(q.log_alpha.grad, log_alpha.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bits.grad, bits.grad, rtol=1e-5, atol=1e-6)
    q.freeze()
    w2 = w.clone().requires_grad_(True)
    frozen = q(w2)
    expected = fixed_quant(w, q.alpha().detach().reshape(4, 1, 1, 1),
                           q.frozen_bits.reshape(shape or (1,)).reshape(shape), True, True)
    assert torch.equal(frozen.detach(), expected)


def test_functions_reject_parameters_that_vary_along_two_axes() -> None:
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="must be scalars or vary along one axis"):
        interpolated_quant(x, torch.ones(2, 3, 1), torch.tensor(3.0), torch.tensor(0.5), True,
                           False)
    with pytest.raises(ValueError, match="must be scalars or vary along one axis"):
        fixed_quant(x, torch.ones(2, 1, 1), torch.full((1, 1, 4), 3.0), True, False)


def test_set_kernel_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown quantizer kernel 'fast'"):
        fakequant.set_kernel("fast")


def test_failed_compilation_falls_back_to_eager_for_good(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        def run(*a: object) -> object:
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setitem(fakequant._state, "compiled", {})
    monkeypatch.setitem(fakequant._state, "compile_error", None)
    monkeypatch.setitem(fakequant._state, "kernel", "compiled")
    x, g = data((2, 3, 4, 4), seed=9)
    with caplog.at_level(logging.WARNING, logger="onnxbits.quant.fakequant"):
        got = run_interpolated(x, g, torch.tensor(1.0), torch.tensor(3.0), torch.tensor(0.5),
                               False, False)
    assert fakequant.compile_error() == "RuntimeError: no C++ compiler"
    assert "quantizers run eagerly" in caplog.text
    ref = reference(x.numpy(), np.float32(1.0), np.float32(3), np.float32(0.5), False, False,
                    g.numpy())
    check(got, ref, torch.tensor(1.0), torch.tensor(0.5))


def test_module_level_functions_handle_scalar_inputs(kernel: str) -> None:
    x = torch.tensor(0.4, requires_grad=True)
    y = learned_quant(x, torch.zeros(1, requires_grad=True), torch.tensor([3.5]), 0, 2, 8, False,
                      False)
    y.backward()
    z = frozen_quant(torch.tensor(0.4), torch.zeros(1), torch.tensor([3.0]), None, False, False)
    assert y.shape == () and z.shape == () and x.grad is not None


def test_small_tensors_run_on_one_thread_and_the_thread_count_is_restored(kernel: str) -> None:
    threads = torch.get_num_threads()
    seen: list[int] = []
    body = fakequant._fixed_fwd

    def spy(*args: object) -> object:
        seen.append(torch.get_num_threads())
        return body(*args)

    torch.set_num_threads(2)
    try:
        fakequant.set_kernel("eager")
        x = torch.randn(4, 8)
        layout = fakequant._Layout.along(x, None)
        grid = fakequant._grid_params(torch.ones(1, 1), torch.full((1, 1), 4.0), True, False)
        y = fakequant._run(spy, layout.flat(x), *grid, None)
        assert seen == [1] and torch.get_num_threads() == 2
        np.testing.assert_array_equal(layout.restore(y).numpy(),
                                      fixed_quant(x, torch.tensor(1.0), torch.tensor(4.0), True,
                                                  False).numpy())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("act", "clamp"), [(torch.nn.ReLU(), (0.0, None)),
                                            (torch.nn.ReLU6(), (0.0, 6.0))], ids=["relu", "relu6"])
@pytest.mark.parametrize("frozen", [False, True], ids=["learned", "frozen"])
def test_fused_input_clamp_equals_the_activation_followed_by_the_quantizer(
        kernel: str, act: torch.nn.Module, clamp: tuple[float, float | None],
        frozen: bool) -> None:
    z, g = data((3, 4, 6, 6), seed=10)
    z = z * 4
    z[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 6.0, -1e-3])   # exactly on the bounds
    results = []
    for fused in (False, True):
        q = BitQuantizer(signed=False, input_clamp=clamp if fused else None)
        q.init_alpha(torch.tensor(5.0))
        with torch.no_grad():
            q.bits.fill_(3.4)
        if frozen:
            q.freeze()
        zr = z.clone().requires_grad_(True)
        y = q(zr) if fused else q(act(zr))
        y.backward(g)
        results.append((y.detach(), zr.grad, q.log_alpha.grad, q.bits.grad))
    (y0, gx0, ga0, gb0), (y1, gx1, ga1, gb1) = results
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    torch.testing.assert_close(ga1, ga0, rtol=1e-5, atol=1e-6)
    if not frozen:
        torch.testing.assert_close(gb1, gb0, rtol=1e-5, atol=1e-6)
    q = BitQuantizer(signed=False, input_clamp=clamp)
    assert torch.equal(q.quantized_input(z), act(z))
    assert "input_clamp" in repr(q)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"),
                                   RuntimeError("CUDA out of memory (wrapped by dynamo)"),
                                   ValueError("an error of the input")])
def test_out_of_memory_and_input_errors_are_raised_and_keep_the_compiled_kernels(
        monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Out of memory (raw or wrapped) is the caller's to see, and an error that the eager kernel
    repeats is the input's: neither is a compiler failure that switches to eager for good."""
    from onnxbits.quant import kernels

    def failing(*args: object, **kwargs: object) -> object:
        def run(*a: object) -> object:
            raise error
        return run

    def body(x: torch.Tensor) -> torch.Tensor:      # the eager kernel
        if isinstance(error, ValueError):
            raise error
        return x

    monkeypatch.setattr(torch, "compile", failing)
    monkeypatch.setitem(kernels._state, "compiled", {})
    monkeypatch.setitem(kernels._state, "compile_error", None)
    monkeypatch.setitem(kernels._state, "kernel", "compiled")
    with pytest.raises(type(error), match=str(error).split(" (")[0]):
        kernels._run(body, torch.ones(4, 4))
    assert kernels._state["compile_error"] is None
