r"""CaloPointFlow: showers as point clouds from normalising flows.

Three zuko flows and one set encoder:

1. a **shower flow** ``p(s | c)`` over shower-level features given ``c = log E_inc``:
   ``s = (log n − ½ log E_inc, log ΣE/E_inc)`` in variant ``"I"``; the number of points and
   the energy of every layer (``2 L`` features) in variant ``"II"`` (the default);
2. a **DeepSets encoder** ``q(z | X, c, s)`` of the whole point cloud into a latent vector;
3. a **latent flow** ``p(z | c, s)``, the learnt prior of that latent;
4. a **point flow**, the same for every point of a shower (points are i.i.d. given the
   latent), a coupling rational-quadratic spline flow so that sampling millions of points is
   one pass per transform. Variant I: ``p(z, α, r, E | latent, c, s)``. Variant II: points
   know their layer, ``p(α, r, log E/E_l | latent, c, layer, n_l, E_l)``; after sampling the
   energies of each layer are normalised to the sampled layer energy, so layer energies and
   hit counts come from the shower flow exactly.

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
from dataclasses import dataclass, replace

import numpy as np
import torch
import zuko
from torch import nn

from .data import Batch
from .preprocess import Preprocessor


def _scale_groups(w: np.ndarray, group: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rescale point weights ``w`` so that the points of group ``g`` sum to ``target[g]``.

    Shapes:
        w, group: ``(P,)`` (``group`` in ``[0, G)``); target: ``(G,)``; returns ``(P,)``.
    """
    tot = np.bincount(group, weights=w, minlength=target.shape[0])
    return w * (target / np.maximum(tot, 1e-300))[group]


@dataclass(frozen=True)
class CaloPointFlowConfig:
    """Hyper-parameters of :class:`CaloPointFlow` (defaults: the benchmark model)."""

    variant: str = "II"                           # "I" (n, ΣE) or "II" (points and energy per layer)
    n_layers: int = 0                             # set from the data (variant II)
    point_features: int = 4                       # set from the data: I (z, alpha, r, E); II (alpha, r, E)
    shower_features: int = 2                      # set from the data: I 2; II 2 per layer
    cond_features: int = 1                        # log E_inc
    latent: int = 16                              # size of the shower latent
    encoder_hidden: int = 128                     # DeepSets width
    point_transforms: int = 6                     # coupling spline transforms of the point flow
    point_hidden: tuple[int, ...] = (128, 128)    # hidden layers of each coupling network
    point_bins: int = 8                           # spline bins
    latent_transforms: int = 4                    # autoregressive spline transforms of the latent flow
    latent_hidden: tuple[int, ...] = (128, 128)
    shower_transforms: int = 4                    # autoregressive spline transforms of the shower flow
    shower_hidden: tuple[int, ...] = (128, 128)
    kl_weight: float = 1.0                        # weight of the latent (prior − entropy) term
    points_per_shower_loss: int = 0               # random points per shower in the point likelihood (0: all)

    @classmethod
    def from_dict(cls, d: dict) -> CaloPointFlowConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown CaloPointFlow config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        d.setdefault("variant", "I" if "n_layers" not in d and "point_features" in d else "II")  # runs before variants
        if d["variant"] not in ("I", "II"):
            msg = f"CaloPointFlow variant must be 'I' or 'II', got {d['variant']!r}"
            raise ValueError(msg)
        return cls(**d)

    def preprocessing(self) -> dict:
        """Options of :meth:`Preprocessor.fit` this model needs."""
        return {"variant": self.variant}

    def with_data(self, prep: Preprocessor) -> CaloPointFlowConfig:
        """The config with the sizes that depend on the data (feature counts, layers)."""
        return replace(self, n_layers=prep.geometry.n_layers, point_features=prep.n_point_features,
                       shower_features=prep.n_shower_features)


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
        self.layered = cfg.variant == "II"
        if self.layered and (cfg.n_layers < 1 or cfg.shower_features != 2 * cfg.n_layers):
            msg = (f"CaloPointFlow II needs n_layers and shower_features = 2 n_layers (config.with_data(prep)); "
                   f"got n_layers={cfg.n_layers}, shower_features={cfg.shower_features}")
            raise ValueError(msg)
        ctx = cfg.cond_features + cfg.shower_features
        # variant II: each point also sees its layer (position in [-1, 1]) and that layer's (n_l, E_l) features
        point_ctx = cfg.latent + (cfg.cond_features + 3 if self.layered else ctx)
        self.shower_flow = zuko.flows.NSF(cfg.shower_features, cfg.cond_features, transforms=cfg.shower_transforms,
                                          hidden_features=cfg.shower_hidden)
        self.encoder = DeepSetsEncoder(cfg.point_features + self.layered, ctx, cfg.latent, cfg.encoder_hidden)
        self.latent_flow = zuko.flows.NSF(cfg.latent, ctx, transforms=cfg.latent_transforms,
                                          hidden_features=cfg.latent_hidden)
        self.point_flow = zuko.flows.NSF(cfg.point_features, point_ctx, transforms=cfg.point_transforms,
                                         bins=cfg.point_bins, hidden_features=cfg.point_hidden, passes=2)

    def _layer_pos(self, layer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (2 * layer.to(dtype) / max(self.config.n_layers - 1, 1) - 1)[..., None]

    def _point_context(self, z: torch.Tensor, cond: torch.Tensor, shower: torch.Tensor, mask: torch.Tensor,
                       layer: torch.Tensor) -> torch.Tensor:
        """Context of every real point, ``(P, C)``."""
        b, n = mask.shape
        if not self.layered:
            return torch.cat([z, cond, shower], dim=-1)[:, None, :].expand(-1, n, -1)[mask]
        n_l = self.config.n_layers
        shower_of = torch.arange(b, device=mask.device)[:, None].expand(b, n)[mask]
        lay = layer[mask]
        per_layer = torch.stack([shower[shower_of, lay], shower[shower_of, n_l + lay]], dim=-1)
        return torch.cat([z[shower_of], cond[shower_of], self._layer_pos(lay, z.dtype), per_layer], dim=-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Same as :meth:`loss` (so that DistributedDataParallel sees a forward call)."""
        return self.loss(batch)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss and its parts: ``shower`` (NLL per shower feature), ``points`` (NLL per point),
        ``kl`` (latent prior − entropy per point)."""
        cfg = self.config
        cond, s = batch.cond, batch.shower
        ctx = torch.cat([cond, s], dim=-1)
        shower_nll = -self.shower_flow(cond).log_prob(s).mean() / cfg.shower_features   # per feature
        enc_x = torch.cat([batch.x, self._layer_pos(batch.layer, batch.x.dtype)], -1) if self.layered else batch.x
        mu, log_var = self.encoder(enc_x, batch.mask, ctx)
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
        pc = self._point_context(z, cond, s, mask, batch.layer)
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
    def sample(self, cond: torch.Tensor, n: torch.Tensor, shower: torch.Tensor,
               layer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the points of ``B`` showers whose point counts and shower features are given.

        Args:
            cond: standardised ``log E_inc``.
            n: number of points of each shower (from :meth:`sample_shower`, after inverting
                the preprocessing).
            shower: the standardised shower features that go with ``n``.
            layer: variant II, the layer of every point (padded like ``x``).

        Returns:
            ``(x, mask)`` in preprocessed point features.

        Shapes:
            cond: ``(B, 1)``; n: ``(B,)``; shower: ``(B, S)``; layer: ``(B, N_max)``;
            x: ``(B, N_max, F)``; mask: ``(B, N_max)``.
        """
        ctx = torch.cat([cond, shower], dim=-1)
        z = self.latent_flow(ctx).sample()
        n_max = int(n.max()) if n.numel() else 0
        mask = torch.arange(n_max, device=n.device)[None, :] < n[:, None]
        if self.layered and layer is None:
            msg = "CaloPointFlow II samples need the layer of every point"
            raise ValueError(msg)
        pc = self._point_context(z, cond, shower, mask, layer if layer is not None else mask.long())
        x = torch.zeros(n.shape[0], n_max, self.config.point_features, device=cond.device, dtype=cond.dtype)
        if pc.shape[0]:
            x[mask] = self.point_flow(pc).sample()
        return x, mask

    @torch.no_grad()
    def generate(self, e_inc: np.ndarray, prep: Preprocessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Showers in physical units for the given incident energies.

        Returns:
            ``(counts (B,), zar (P, 3), E (P,))``: points per shower, continuous ``(z, α, r)``
            and energies (MeV) of all points, shower after shower.
        """
        device = next(self.parameters()).device
        e_inc = np.asarray(e_inc, dtype=np.float64)
        cond = torch.from_numpy(prep.forward_cond(e_inc)).to(device)
        s = self.sample_shower(cond)
        s_np = s.float().cpu().numpy()
        if not self.layered:
            n, e_sum = prep.inverse_shower(s_np, e_inc)
            x, mask = self.sample(cond, torch.from_numpy(n).to(device), s)
            zar, en = prep.inverse_points(x[mask].float().cpu().numpy(), np.repeat(e_inc, n))
            # scale the point energies so that each shower carries the sampled total
            return n, zar, _scale_groups(en, np.repeat(np.arange(e_inc.shape[0]), n), e_sum)
        n_layer, e_layer = prep.inverse_layers(s_np, e_inc)
        b, n_l = n_layer.shape
        n = n_layer.sum(1)
        layer = np.repeat(np.tile(np.arange(n_l), b), n_layer.ravel())                   # (P,) shower after shower
        from .utils import pad

        lay, _ = pad(list(torch.split(torch.from_numpy(layer), n.tolist())), device=device)
        x, mask = self.sample(cond, torch.from_numpy(n).to(device), s, lay)
        zar, w = prep.inverse_points_layer(x[mask].float().cpu().numpy(), layer)
        # and each layer of each shower the sampled layer energy
        return n, zar, _scale_groups(w, np.repeat(np.arange(b), n) * n_l + layer, e_layer.ravel())
