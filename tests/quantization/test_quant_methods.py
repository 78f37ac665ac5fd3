"""Each quantization method against its error bound, on random weights (no model needed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.quantization.awq import awq_quantize
from kiln.quantization.gptq import gptq_quantize
from kiln.kernels.dequant import dequantize_codes, fp8_dequantize, unpack_int4
from kiln.quantization.primitives import IntScheme, fp8_quantize, group_qparams, pack_int4, quantize_codes
from kiln.quantization.smoothquant import smooth_scales, w8a8_weight


def _weights(n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 7] = 1.5  # an outlier ("super weight") must survive
    return w


def _activations(rows: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))  # correlated
    x[:, 5] *= 30.0  # an outlier channel, as real models have
    return x


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 32, False), (4, 32, True), (4, 64, False), (4, 128, False)])
def test_rtn_error_within_half_a_step(bits: int, group: int, sym: bool) -> None:
    w = _weights()
    scheme = IntScheme(bits, group, sym)
    scale, zero = group_qparams(w, scheme)
    codes = quantize_codes(w, scale, zero, scheme)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= scheme.qmax
    deq = dequantize_codes(codes, scale, zero, group)
    glen = 96 if group == -1 else group
    step = scale.repeat_interleave(glen, dim=1)[:, :96]  # the ragged last group (96 = 64 + 32) included
    assert torch.all((deq - w).abs() <= step / 2 + 1e-6)
    assert abs(deq[3, 7].item() - 1.5) <= step[3, 7].item() / 2 + 1e-6


def test_ragged_last_group_has_its_own_scale() -> None:
    w = _weights(k=96)
    w[:, 64:] *= 100.0  # the short last group (columns 64..95 of a 64-group layout) is much wider
    scale, _ = group_qparams(w, IntScheme(4, 64, False))
    assert scale.shape == (48, 2)
    assert torch.all(scale[:, 1] > scale[:, 0])


def test_int4_pack_round_trip() -> None:
    codes = torch.randint(0, 16, (5, 34), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (5, 17)
    assert torch.equal(unpack_int4(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4


def test_fp8_relative_error_bound() -> None:
    w = _weights()
    q, scale = fp8_quantize(w)
    assert q.dtype == torch.float8_e4m3fn
    deq = fp8_dequantize(q, scale)
    # E4M3 keeps 3 mantissa bits: relative error ≤ 2^-4 for normal numbers; tiny ones are absolute.
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale.unsqueeze(1) * 2.0 ** -9)
    assert torch.all((deq - w).abs() <= bound + 1e-7)


def _proxy_loss(q: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    d = q - w
    return torch.trace(d @ h @ d.t()).item()


def test_gptq_beats_rtn_on_output_error() -> None:
    w, x = _weights(), _activations(512, 96)
    h = 2.0 * x.t() @ x / x.shape[0]
    scheme = IntScheme(4, 32, False)
    codes, scale, zero = gptq_quantize(w, h, scheme)
    gptq = dequantize_codes(codes, scale, zero, 32)
    rtn_scale, rtn_zero = group_qparams(w, scheme)
    rtn = dequantize_codes(quantize_codes(w, rtn_scale, rtn_zero, scheme), rtn_scale, rtn_zero, 32)
    assert torch.equal(scale, rtn_scale)  # static groups: GPTQ only changes the codes
    assert _proxy_loss(gptq, w, h) < 0.7 * _proxy_loss(rtn, w, h)
    for act_order in (False, True):  # both orders beat RTN
        c, s, z = gptq_quantize(w, h, scheme, act_order=act_order)
        assert _proxy_loss(dequantize_codes(c, s, z, 32), w, h) < _proxy_loss(rtn, w, h)


def test_gptq_rejects_wrong_hessian_shape() -> None:
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(_weights(), torch.eye(5), IntScheme(4, 32, False))


def test_awq_never_worse_than_rtn() -> None:
    w, x = _weights(), _activations(256, 96)
    scheme = IntScheme(4, 32, False)
    codes, scale, zero, smooth, alpha = awq_quantize(w, x, x.abs().mean(0), scheme)
    awq = dequantize_codes(codes, scale, zero, 32) / smooth  # what the layer computes with
    rs, rz = group_qparams(w, scheme)
    rtn = dequantize_codes(quantize_codes(w, rs, rz, scheme), rs, rz, 32)
    err = lambda q: (x @ q.t() - x @ w.t()).pow(2).mean().item()  # noqa: E731
    assert err(awq) <= err(rtn) * (1 + 1e-5)  # α = 0 is RTN, so the search can only improve
    assert 0.0 <= alpha < 1.0 and smooth.shape == (96,)


def test_smoothquant_w8a8_close_and_smoothing_helps() -> None:
    w, x = _weights(), _activations(64, 96)
    ref = x @ w.t()

    def w8a8(alpha: float) -> torch.Tensor:
        s = smooth_scales(w, x.abs().amax(0), alpha)
        qt, scale = w8a8_weight(w, s)
        xs = x / s
        xscale = xs.abs().amax(1, keepdim=True) / 127
        xq = torch.round(xs / xscale).clamp(-127, 127).to(torch.int8)
        return torch._int_mm(xq, qt).float() * xscale * scale

    rel = lambda y: ((y - ref).norm() / ref.norm()).item()  # noqa: E731
    assert rel(w8a8(0.5)) < 0.02
    assert rel(w8a8(0.5)) < rel(w8a8(0.0))  # migrating the outlier channel into the weights helps
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(w, x.abs().amax(0), 1.5)


def test_w8a8_method_matches_its_plain_twin() -> None:
    from kiln.layers.linear import Linear
    from kiln.layers.quant_linear import W8A8LinearMethod

    w, x = _weights(), _activations(7, 96)
    s = smooth_scales(w, x.abs().amax(0), 0.5)
    qt, scale = w8a8_weight(w, s)
    layer = Linear(96, [48], bias=True)
    layer.bias.data.uniform_(-0.1, 0.1)
    layer.set_method(W8A8LinearMethod())
    for name, t in {"qweight_t": qt, "scales": scale, "smooth": s}.items():
        layer.weight_loader(name, t)
    xs = x / s
    xscale = xs.abs().amax(1, keepdim=True) / 127
    xq = torch.round(xs / xscale).clamp(-127, 127)
    twin = (xq @ qt.float()) * xscale * scale + layer.bias  # plain fp32 arithmetic, exact for these sizes
    torch.testing.assert_close(layer(x), twin, rtol=1e-5, atol=1e-5)
    ref = F.linear(x, w, layer.bias)
    assert ((layer(x) - ref).norm() / ref.norm()).item() < 0.02
