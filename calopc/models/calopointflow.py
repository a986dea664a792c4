r"""CaloPointFlow: showers as point clouds from normalising flows.

Three zuko flows and one set encoder:

1. a **shower flow** ``p(s | c)`` over the shower-level features ``s = (log n − ½ log E_inc,
   log ΣE/E_inc)`` given ``c = log E_inc``;
2. a **DeepSets encoder** ``q(z | X, c, s)`` of the whole point cloud into a latent vector;
3. a **latent flow** ``p(z | c, s)``, the learnt prior of that latent;
4. a **point flow** ``p(x | z, c, s)``, the same for every point of a shower (points are
   i.i.d. given the latent), a coupling rational-quadratic spline flow so that sampling
   millions of points is one pass per transform.

Training maximises ``log p(s|c) + E_q[Σ_i log p(x_i|z,c,s) + log p(z|c,s) − log q(z|X,c,s)]``
(an ELBO); the point part is divided by the number of points. As in CaloPointFlow II,
coordinates are dequantised uniformly inside their cells (see :mod:`.preprocess`), and at
generation each point is mapped back to its cell and collisions are resolved so that each
cell holds at most one point (``points_to_voxels(..., collisions="nearest-free")``).

References:
    | CaloPointFlow (Schnake, Krücker, Borras, 2023) | https://arxiv.org/abs/2304.01266
    | CaloPointFlow II (Schnake, Krücker, Borras, 2024) | https://arxiv.org/abs/2403.15782
    | Neural spline flows (Durkan et al., 2019) | https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

__all__ = ["CaloPointFlow", "CaloPointFlowConfig"]

import math
from dataclasses import dataclass

import torch
import zuko
from torch import nn

from .data import Batch


@dataclass(frozen=True)
class CaloPointFlowConfig:
    """Hyper-parameters of :class:`CaloPointFlow` (defaults: the benchmark model)."""

    point_features: int = 4                       # (z, alpha, r, E)
    shower_features: int = 2                      # (log n - ½ log E_inc, log ΣE/E_inc)
    cond_features: int = 1                        # log E_inc
    latent: int = 16                              # size of the shower latent
    encoder_hidden: int = 128                     # DeepSets width
    point_transforms: int = 6                     # coupling spline transforms of the point flow
    point_hidden: tuple[int, ...] = (128, 128)    # hidden layers of each coupling network
    point_bins: int = 8                           # spline bins
    latent_transforms: int = 4                    # autoregressive spline transforms of the latent flow
    latent_hidden: tuple[int, ...] = (128, 128)
    shower_transforms: int = 4                    # autoregressive spline transforms of the shower flow
    shower_hidden: tuple[int, ...] = (64, 64)
    kl_weight: float = 1.0                        # weight of the latent (prior − entropy) term
    points_per_shower_loss: int = 0               # random points per shower in the point likelihood (0: all)

    @classmethod
    def from_dict(cls, d: dict) -> CaloPointFlowConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown CaloPointFlow config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class DeepSetsEncoder(nn.Module):
    r"""Permutation-invariant encoder ``(X, context) -> (mu, log_var)``.

    Shapes:
        x: ``(B, N_max, F)``; mask: ``(B, N_max)``; context: ``(B, C)``;
        returns two ``(B, L)`` tensors.
    """

    def __init__(self, features: int, context: int, latent: int, hidden: int = 128) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(features + context, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden))
        self.rho = nn.Sequential(nn.Linear(2 * hidden + context, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        idx = torch.arange(b, device=x.device)[:, None].expand_as(mask)[mask]     # (P,) shower of each real point
        h = self.phi(torch.cat([x[mask], context[idx]], dim=-1))                    # only real points, no padding
        n = mask.sum(1).clamp(min=1).to(h.dtype)[:, None]
        mean = h.new_zeros(b, h.shape[1]).index_add_(0, idx, h) / n
        mx = h.new_zeros(b, h.shape[1]).scatter_reduce_(0, idx[:, None].expand_as(h), h, "amax", include_self=False)
        mu, log_var = self.rho(torch.cat([mean, mx, context], dim=-1)).chunk(2, dim=-1)
        return mu, log_var.clamp(-12, 6)


class CaloPointFlow(nn.Module):
    r"""Conditional flow model of point-cloud showers (CaloPointFlow I/II).

    Args:
        config: hyper-parameters.

    Shapes:
        batch.x: ``(B, N_max, 4)``; batch.mask: ``(B, N_max)``; batch.shower: ``(B, 2)``;
        batch.cond: ``(B, 1)``. :meth:`sample` returns ``shower (B, 2)``, ``x (B, N_max, 4)``
        and ``mask (B, N_max)``, all in preprocessed units.

    References:
        | CaloPointFlow | https://arxiv.org/abs/2304.01266
        | CaloPointFlow II | https://arxiv.org/abs/2403.15782
    """

    def __init__(self, config: CaloPointFlowConfig) -> None:
        super().__init__()
        self.config = cfg = config
        ctx = cfg.cond_features + cfg.shower_features
        self.shower_flow = zuko.flows.NSF(cfg.shower_features, cfg.cond_features, transforms=cfg.shower_transforms,
                                          hidden_features=cfg.shower_hidden)
        self.encoder = DeepSetsEncoder(cfg.point_features, ctx, cfg.latent, cfg.encoder_hidden)
        self.latent_flow = zuko.flows.NSF(cfg.latent, ctx, transforms=cfg.latent_transforms,
                                          hidden_features=cfg.latent_hidden)
        self.point_flow = zuko.flows.NSF(cfg.point_features, cfg.latent + ctx, transforms=cfg.point_transforms,
                                         bins=cfg.point_bins, hidden_features=cfg.point_hidden, passes=2)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Same as :meth:`loss` (so that DistributedDataParallel sees a forward call)."""
        return self.loss(batch)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss and its parts: ``shower`` (NLL per shower), ``points`` (NLL per point),
        ``kl`` (latent prior − entropy per point)."""
        cfg = self.config
        cond, s = batch.cond, batch.shower
        ctx = torch.cat([cond, s], dim=-1)
        shower_nll = -self.shower_flow(cond).log_prob(s).mean()
        mu, log_var = self.encoder(batch.x, batch.mask, ctx)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        prior = -self.latent_flow(ctx).log_prob(z)                                         # (B,)
        entropy = 0.5 * (log_var + 1 + math.log(2 * math.pi)).sum(-1)                        # (B,)
        mask = batch.mask
        weight = None
        k = cfg.points_per_shower_loss
        if k and mask.shape[1] > k:
            # a random subset of k points per shower; weight n/k keeps the estimate unbiased
            score = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)
            keep = torch.zeros_like(mask)
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
            keep &= mask
            n = mask.sum(1)
            weight = (n / keep.sum(1).clamp(min=1)).to(mu.dtype)[:, None].expand_as(mask)[keep]
            mask = keep
        pc = torch.cat([z, ctx], dim=-1)[:, None, :].expand(-1, mask.shape[1], -1)[mask]
        nll = -self.point_flow(pc).log_prob(batch.x[mask])                                  # (P,)
        if weight is not None:
            nll = nll * weight
        n_points = batch.mask.sum().clamp(min=1)
        points = nll.sum() / n_points
        kl = (prior - entropy).sum() / n_points
        return {"loss": shower_nll + points + cfg.kl_weight * kl, "shower": shower_nll, "points": points, "kl": kl}

    def loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss of a batch (lower is better)."""
        return self.loss_terms(batch)["loss"]

    @torch.no_grad()
    def sample_shower(self, cond: torch.Tensor) -> torch.Tensor:
        """Shower-level features given the condition. Shapes: cond ``(B, 1)`` → ``(B, 2)``."""
        return self.shower_flow(cond).sample()

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, n: torch.Tensor, shower: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the points of ``B`` showers whose point counts and shower features are given.

        Args:
            cond: standardised ``log E_inc``.
            n: number of points of each shower (from :meth:`sample_shower`, after inverting
                the preprocessing).
            shower: the standardised shower features that go with ``n``.

        Returns:
            ``(x, mask)`` in preprocessed point features.

        Shapes:
            cond: ``(B, 1)``; n: ``(B,)``; shower: ``(B, 2)``; x: ``(B, N_max, 4)``; mask: ``(B, N_max)``.
        """
        ctx = torch.cat([cond, shower], dim=-1)
        z = self.latent_flow(ctx).sample()
        n_max = int(n.max()) if n.numel() else 0
        mask = torch.arange(n_max, device=n.device)[None, :] < n[:, None]
        pc = torch.cat([z, ctx], dim=-1)[:, None, :].expand(-1, n_max, -1)[mask]
        x = torch.zeros(n.shape[0], n_max, self.config.point_features, device=cond.device, dtype=cond.dtype)
        if pc.shape[0]:
            x[mask] = self.point_flow(pc).sample()
        return x, mask
