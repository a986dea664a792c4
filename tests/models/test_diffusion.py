from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from calopc.models.diffusion import (BandTransformer, ConsistencyPrecond, EDMPrecond, PointwiseNet, band_attention,
                                     consistency_loss, consistency_sample, edm_loss, karras_sigmas, sample)


class Affine(nn.Module):
    """F(x_in, c_noise) = a x_in + b: a raw denoiser with a hand-computable output."""

    def __init__(self, a: float, b: float) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
        return self.a * x + self.b


class Counter(nn.Module):
    """Counts the calls of a denoiser."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, *args, **kw):
        self.calls += 1
        return self.fn(*args, **kw)


def gaussian_denoiser(s: float):
    """The exact denoiser of data ~ N(0, s²): D(x; σ) = x s² / (s² + σ²)."""
    return lambda x, sigma, **kw: x * s**2 / (s**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)


def test_edm_preconditioning_hand_values():
    # σ = 1, σ_d = 0.5: c_skip = 0.25/1.25 = 0.2, c_out = 0.5/√1.25, c_in = 1/√1.25, c_noise = 0
    pre = EDMPrecond(Affine(2.0, 1.0), sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = pre.coefficients(torch.tensor([1.0], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.2)
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25))
    assert c_noise.item() == 0.0
    assert pre.coefficients(torch.tensor([math.e**4]))[3].item() == pytest.approx(1.0)   # c_noise = ln σ / 4
    # D = 0.2 x + c_out (2 c_in x + 1) = 0.2 x + 0.8 x + c_out = x + 0.5/√1.25
    x = torch.tensor([[1.0, -3.0]], dtype=torch.float64)
    torch.testing.assert_close(pre(x, 1.0), x + 0.5 / math.sqrt(1.25))
    # consistency parametrisation: the identity at σ_min, EDM's coefficients far from it
    cm = ConsistencyPrecond(Affine(2.0, 1.0), sigma_data=0.5, sigma_min=0.002)
    torch.testing.assert_close(cm(x, 0.002), x)
    c_skip, c_out, _, _ = cm.coefficients(torch.tensor([1.002], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(0.2) and c_out.item() == pytest.approx(0.5 / math.sqrt(1.002**2 + 0.25))


def test_edm_loss_hand_value_and_edm_weight():
    pre = EDMPrecond(Affine(0.0, 0.0), sigma_data=0.5)       # F = 0, so D = c_skip x_σ
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    noise = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    loss = edm_loss(pre, x, torch.tensor([1.0], dtype=torch.float64), noise)
    # x_σ = (1.5, -1); target = (x - 0.2 x_σ)/c_out = (0.7, 0.2) √1.25/0.5; mean of squares = (0.49+0.04)·5/2
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(1.325)
    # = λ(σ) ‖D − x‖² with λ = 1/c_out² = 5
    d = pre(x + noise, 1.0)
    assert loss.item() == pytest.approx(5 * (d - x).pow(2).mean().item())


def test_karras_schedule():
    s = karras_sigmas(13)
    assert s.shape == (13,) and s[0].item() == pytest.approx(80.0) and s[-1].item() == pytest.approx(0.002)
    assert (s[1:] < s[:-1]).all()
    assert karras_sigmas(1).tolist() == [80.0]
    i = 6  # the formula at one interior point
    ref = (80 ** (1 / 7) + i / 12 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert s[i].item() == pytest.approx(ref)


def test_heun_sampler_network_evaluations_and_exactness():
    # for Gaussian data the probability-flow ODE is x(σ) = x_T √(s²+σ²)/√(s²+σ_T²); Heun follows it closely
    s = 0.7
    net = Counter(gaussian_denoiser(s))
    z = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = sample(net, z, num_steps=13)
    assert net.calls == 25
    exact = z * 80 * s / math.sqrt(s**2 + 80**2)
    err13 = ((x - exact) / exact).abs().max().item()
    assert err13 < 0.15                                          # second order: refining converges fast
    err200 = ((sample(net, z, num_steps=200) - exact) / exact).abs().max().item()
    assert err200 < 1e-3 and err200 < err13 / 50
    net.calls = 0
    sample(net, z, num_steps=1)
    assert net.calls == 1
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            sample(net, z, num_steps=bad)


def test_consistency_sampling_evaluations_and_loss():
    s = 0.7
    net = Counter(gaussian_denoiser(s))
    z = torch.randn(50, 3, dtype=torch.float64)
    consistency_sample(net, z, steps=1)
    assert net.calls == 1
    net.calls = 0
    consistency_sample(net, z, steps=2)
    assert net.calls == 2
    with pytest.raises(ValueError, match="steps must be"):
        consistency_sample(net, z, steps=0)
    # the exact consistency function of N(0, s²) data, f(x, σ) = x s/√(s²+σ²) (to σ = 0), has ~zero loss;
    # the plain denoiser (not self-consistent along the ODE) does not
    sig = karras_sigmas(18)
    x = s * torch.randn(400, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    idx = torch.randint(0, 17, (400,), generator=torch.Generator().manual_seed(2))
    def f(xx, ss):
        return xx * s / (s**2 + ss.reshape(-1, 1) ** 2).sqrt()
    teacher = gaussian_denoiser(s)
    good = consistency_loss(f, f, teacher, x, sig, idx).mean().item()
    bad = consistency_loss(teacher, teacher, teacher, x, sig, idx).mean().item()
    assert good < 1e-4 < bad


def test_pointwise_net_points_are_independent():
    torch.manual_seed(0)
    net = PointwiseNet(3, 5, widths=(16, 32, 16), fourier=8)
    x = torch.randn(6, 3, requires_grad=True)
    out = net(x, torch.zeros(6), torch.randn(6, 5))
    (g,) = torch.autograd.grad(out[2].sum(), x)
    assert g[2].abs().sum() > 0 and g[[0, 1, 3, 4, 5]].abs().sum() == 0
    # a context per group of points (shared noise level) gives the same output as one per point
    index = torch.tensor([0, 0, 2, 1, 2, 2])
    ctx_g, c_noise = torch.randn(3, 5), torch.tensor([0.3, -1.0, 0.7])
    torch.testing.assert_close(net(x, c_noise[index], ctx_g, ctx_index=index), net(x, c_noise[index], ctx_g[index]))
    tr = BandTransformer(3, 5, n_layers=4, dim=8, heads=2, blocks=1, mlp=8, fourier=8)
    sh, lay = torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 1, 2, 3, 3])
    torch.testing.assert_close(tr(x, c_noise[index], ctx_g, sh, lay, ctx_index=index),
                               tr(x, c_noise[index], ctx_g[index], sh, lay))
    default = PointwiseNet(3, 12)                     # CaloClouds II widths 128-256-512-256-128
    assert [lay.layer.out_features for lay in default.layers] == [128, 256, 512, 256, 128, 3]
    assert sum(p.numel() for p in default.parameters()) < 600_000


def _dense_reference(q, k, v, shower, layer, band):
    allowed = (shower[:, None] == shower[None, :]) & ((layer[:, None] - layer[None, :]).abs() <= band)
    att = torch.einsum("phd,qhd->hpq", q, k) / math.sqrt(q.shape[-1])
    att = att.masked_fill(~allowed[None], float("-inf")).softmax(-1)
    return torch.einsum("hpq,qhd->phd", att, v)


def test_band_attention_matches_dense_masked_attention():
    g = torch.Generator().manual_seed(3)
    p = 40
    shower = torch.randint(0, 3, (p,), generator=g)
    layer = torch.randint(0, 7, (p,), generator=g)
    q, k, v = (torch.randn(p, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ref = _dense_reference(q, k, v, shower, layer, 2)
    torch.testing.assert_close(band_attention(q, k, v, shower, layer, 7, 2), ref)
    torch.testing.assert_close(band_attention(q, k, v, shower, layer, 7, 2, max_elements=1), ref)  # chunked
    ref0 = _dense_reference(q, k, v, shower, layer, 0)
    torch.testing.assert_close(band_attention(q, k, v, shower, layer, 7, 0), ref0)


def test_transformer_mask_is_block_local():
    torch.manual_seed(0)
    net = BandTransformer(3, 4, n_layers=8, dim=16, heads=2, blocks=1, mlp=16, band=2, fourier=8)
    for prm in net.parameters():          # FiLM starts at zero: give it weights so every path is live
        nn.init.normal_(prm, std=0.3)
    shower = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    layer = torch.tensor([1, 3, 4, 5, 1, 1, 2])
    x = torch.randn(7, 3, requires_grad=True)
    out = net(x, torch.zeros(7), torch.randn(7, 4), shower, layer)
    (g,) = torch.autograd.grad(out[0].sum(), x)      # a point of layer 1 in shower 0
    assert g[1].abs().sum() > 0 and g[4].abs().sum() > 0          # Δlayer 2 and 0: seen
    assert g[2].abs().sum() == 0 and g[3].abs().sum() == 0        # Δlayer 3 and 4: not
    assert g[5:].abs().sum() == 0                                  # another shower: never
    with pytest.raises(ValueError, match="needs the shower and layer"):
        net(x, torch.zeros(7), torch.randn(7, 4))
