"""Round-STE bitlength quantizer (the ablation of BitPruning's interpolation)."""

from __future__ import annotations

import pytest
import torch

from onnxbits.quant.quantizer import BitQuantizer


@pytest.mark.parametrize("signed, narrow", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("bits", [2.0, 3.4, 4.6, 8.0])
def test_forward_is_plain_quantization_at_the_rounded_bits(bits: float, signed: bool,
                                                           narrow: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5) * 2
    ste = BitQuantizer(signed=signed, narrow=narrow, num_channels=4, init_bits=bits,
                       rounding="ste")
    ste.init_alpha(torch.tensor([0.5, 1.0, 2.0, 3.0]))
    ref = BitQuantizer(signed=signed, narrow=narrow, num_channels=4)
    ref.load_state_dict(ste.state_dict())
    ref.freeze(torch.tensor(float(round(bits))))
    torch.testing.assert_close(ste(x), ref(x), rtol=0, atol=1e-6)


def test_bitlength_and_clip_value_get_gradients() -> None:
    torch.manual_seed(0)
    q = BitQuantizer(signed=True, narrow=True, init_bits=3.3, rounding="ste")
    q.init_alpha(torch.tensor(1.0))
    x = torch.randn(1000, requires_grad=True)
    (q(x) - x.detach()).pow(2).sum().backward()
    assert q.bits.grad is not None and float(q.bits.grad.abs()) > 0
    assert q.log_alpha.grad is not None and float(q.log_alpha.grad.abs()) > 0
    assert x.grad is not None


def test_unknown_rounding_is_rejected() -> None:
    with pytest.raises(ValueError, match="rounding"):
        BitQuantizer(signed=True, rounding="stochastic")
