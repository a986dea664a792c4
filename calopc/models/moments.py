r"""Layer moments of packed point clouds and the layer-moment matching loss shared by the generators.

A generator that makes whole showers in one differentiable pass (DeepTree's GIN, the distilled
CaloClouds student) can be given a direct gradient on the radial profile that an adversary or a
per-point loss learns only slowly: per layer, the batch distribution (mean and standard deviation
over showers) of the energy-weighted radial centre and width, generated against real.

* :func:`layer_moments`: centre ``c = Σ w u / Σ w`` and width ``sqrt(Σ w u² / Σ w − c²)`` of every
  ``(shower, layer)``, ``u`` the point's radius as a fraction of its layer's extent and ``w`` its
  energy (any scale: normalised per layer);
* :func:`radial_share`: ``(u, w)`` from standardised variant-II features (logit dequantisation);
* :func:`moment_loss`: the squared differences of the per-layer batch mean and standard deviation
  of both moments, in units of the real batch's pooled spread of each moment.

All functions are differentiable in the generated features and run without host reads.
"""

from __future__ import annotations

__all__ = ["layer_moments", "moment_loss", "radial_share"]

from collections.abc import Sequence

import torch
from torch import Tensor


def radial_share(r: Tensor, log_share: Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``(u, w)`` of points from their standardised variant-II radius and log energy share.

    ``u = sigmoid(r σ_r + μ_r)`` is the radius as a fraction of the layer's radial extent (the
    preprocessing's logit dequantisation), ``w = exp(y σ_E + μ_E)`` the energy share ``E / E_l``.

    Args:
        r, log_share: standardised features ``(P,)``.
        mean, std: ``(μ_r, μ_E)`` and ``(σ_r, σ_E)`` of the preprocessing's standardisation.
    """
    u = torch.sigmoid(r * std[0] + mean[0])
    w = torch.exp((log_share * std[1] + mean[1]).clamp(-80, 80))
    return u, w


def layer_moments(u: Tensor, w: Tensor, layer: Tensor, shower_of: Tensor, n_showers: int, n_layers: int,
                  ) -> tuple[Tensor, Tensor]:
    """Energy-weighted radial centre and width of every layer of every shower.

    Shapes:
        u, w, layer, shower_of: ``(P,)``; returns moments ``(B, L, 2)`` (centre, width; 0 for an
        empty layer) and occupied ``(B, L)`` bool.
    """
    g = shower_of * n_layers + layer
    zero = w.new_zeros(n_showers * n_layers)
    sw = zero.index_add(0, g, w)
    den = sw.clamp_min(torch.finfo(w.dtype).tiny)
    centre = zero.index_add(0, g, w * u) / den
    var = zero.index_add(0, g, w * u * u) / den - centre * centre
    width = torch.sqrt(var.clamp_min(1e-8))
    occupied = zero.index_add(0, g, torch.ones_like(w)) > 0
    return torch.stack([centre, width], -1).view(n_showers, n_layers, 2), occupied.view(n_showers, n_layers)


def moment_loss(fake: tuple[Tensor, Tensor], real: tuple[Tensor, Tensor], cond: Tensor | None = None) -> Tensor:
    """Layer-moment matching loss of generated against real :func:`layer_moments` of the same showers.

    For every layer, the batch mean and standard deviation (over the showers with points in that
    layer in both batches) of the centre and the width; squared differences in units of the real
    batch's spread of each moment over all occupied ``(shower, layer)`` pairs, summed over the two
    moments and both statistics, averaged over the layers occupied in both batches. 0 when both
    batches have the same per-layer moments. Gradients flow into ``fake`` only.

    With ``cond`` (one condition per shower, e.g. the standardised ``log E_inc``; the generated
    shower ``b`` must have the real shower ``b``'s condition) it also compares, per layer, each
    moment's covariance with the condition (how the moment moves with the condition: a generator
    can match the pooled mean and spread of a layer's radial centre with its energy dependence
    reversed), in units of the moment's pooled spread times the condition's.

    Args:
        fake, real: ``(moments (B, L, 2), occupied (B, L))``.
        cond: ``(B,)``, or None for the pooled statistics only.
    """
    m_fake, occ_fake = fake
    m_real, occ_real = real[0].detach(), real[1]
    occ = (occ_fake & occ_real).to(m_fake.dtype)[..., None]                 # (B, L, 1)
    count = occ.sum(0)                                                       # (L, 1)
    per = count.clamp_min(1)

    def stats(m: Tensor) -> tuple[Tensor, Tensor]:
        mean = (m * occ).sum(0) / per
        return mean, torch.sqrt(((m - mean) ** 2 * occ).sum(0) / per + 1e-8)

    mu_f, sd_f = stats(m_fake)
    mu_r, sd_r = stats(m_real)
    all_occ = occ.sum().clamp_min(1)
    pooled = (m_real * occ).sum((0, 1)) / all_occ
    scale = ((m_real - pooled) ** 2 * occ).sum((0, 1)) / all_occ + 1e-6      # (2,)
    per_layer = (((mu_f - mu_r) ** 2 + (sd_f - sd_r) ** 2) / scale).sum(-1)  # (L,)
    if cond is not None:
        c = cond.to(m_fake.dtype).reshape(-1, 1, 1)                          # (B, 1, 1)
        c_mean = (c * occ).sum(0) / per                                      # (L, 1), over each layer's showers
        dc = (c - c_mean) * occ
        c_var = (dc**2).sum() / all_occ + 1e-6

        def cov(m: Tensor, mean: Tensor) -> Tensor:
            return ((m - mean) * dc).sum(0) / per                              # (L, 2)

        per_layer = per_layer + ((cov(m_fake, mu_f) - cov(m_real, mu_r)) ** 2 / (scale * c_var)).sum(-1)
    used = (count[:, 0] > 0).to(m_fake.dtype)
    return (per_layer * used).sum() / used.sum().clamp_min(1)
