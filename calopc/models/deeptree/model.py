"""DeepTree's configuration and the model: shower model, generator and critic, their losses, the GAN training
step and generation (see :mod:`calopc.models.deeptree`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..data import Batch
from ..preprocess import Preprocessor
from ..shower import ShowerModel, ShowerModelConfig
from ..moments import layer_moments, moment_loss, radial_share
from .config import ALPHA_MODES, CRITICS, PRESET_SIZES, PRESETS, DeepTreeConfig  # noqa: F401
from .critics import MeanFieldCritic, PoolCritic
from .generator import TreeGenerator
from .layers import _leaves, _sn_weights_changed


def _adam(params: Any, **kw: Any) -> torch.optim.Optimizer:
    """Fused Adam (one kernel per step; non-finite steps skipped on the device), else multi-tensor Adam."""
    params = [p for p in params if p.requires_grad]
    try:
        return torch.optim.Adam(params, fused=True, **kw)
    except RuntimeError:  # a device or dtype fused Adam does not support
        return torch.optim.Adam(params, foreach=True, **kw)


def _packed_index(shower_of: torch.Tensor, n: torch.Tensor, n_max: int) -> torch.Tensor:
    """Position in a flattened ``(B, n_max)`` padded layout of every packed point (shower after shower)."""
    first = torch.cumsum(n, 0) - n
    return shower_of * n_max + torch.arange(shower_of.shape[0], device=n.device) - first[shower_of]


# ---------------------------------------------------------------------------------------------- the model
class DeepTree(nn.Module):
    r"""Tree-generator GAN on variant-II point clouds, with the shared shower model for counts and energies.

    Args:
        config: hyper-parameters, after :meth:`DeepTreeConfig.with_data`.

    Shapes:
        batch.x: ``(B, N, 3)``; batch.layer, batch.mask: ``(B, N)``; batch.shower: ``(B, 2L)``;
        batch.cond: ``(B, 1)``; batch.n: ``(B,)``.

    References:
        | DeepTreeGAN | https://arxiv.org/abs/2311.12616
        | DeepTreeGANv2 | https://arxiv.org/abs/2312.00042
        | MDMA | https://arxiv.org/abs/2305.15254
    """

    def __init__(self, config: DeepTreeConfig) -> None:
        super().__init__()
        if config.n_layers < 1 or not config.branches:
            msg = (f"DeepTree needs the data sizes (config.with_data(prep)); got n_layers={config.n_layers}, "
                   f"branches={config.branches}")
            raise ValueError(msg)
        config.check()
        self.config = cfg = config
        n_l = cfg.n_layers
        cond_features = 3 + 2 * n_l
        self.shower_model = ShowerModel(n_l, 1, ShowerModelConfig(transforms=cfg.shower_transforms,
                                                                  hidden=tuple(cfg.shower_hidden), bins=cfg.shower_bins,
                                                                  passes=cfg.shower_passes))
        self.generator = TreeGenerator(cfg, cond_features)
        critic_cls = PoolCritic if cfg.critic == "pool" else MeanFieldCritic
        self.critic = critic_cls(cfg, cond_features)
        log_nmax = math.log(max(cfg.n_max, cfg.leaves, 2))
        self._n_scale = (0.5 * log_nmax, 0.5 * log_nmax)
        self._en_shift = cfg.cond_mean - 0.5 * log_nmax
        self._en_scale = cfg.cond_std + 0.5 * log_nmax

    # ------------------------------------------------------------------ conditions
    def condition(self, cond: torch.Tensor, n: torch.Tensor, shower: torch.Tensor) -> torch.Tensor:
        """``(E_inc, n, E_inc/n)`` (standardised logs) and the per-layer shower features.

        Shapes:
            cond: ``(B, 1)`` standardised log E_inc; n: ``(B,)``; shower: ``(B, 2L)``; returns ``(B, 3 + 2L)``.
        """
        cfg = self.config
        log_n = torch.log(n.to(cond.dtype).clamp_min(1))[:, None]
        log_e = cond * cfg.cond_std + cfg.cond_mean
        z_n = (log_n - self._n_scale[0]) / self._n_scale[1]
        z_en = (log_e - log_n - self._en_shift) / self._en_scale
        return torch.cat([cond, z_n, z_en, shower], -1)

    def layer_counts(self, batch: Batch) -> torch.Tensor:
        """Points per layer of every shower of a batch. Shapes: returns ``(B, L)`` int64."""
        b = batch.mask.shape[0]
        n_layer = torch.zeros(b, self.config.n_layers, dtype=torch.int64, device=batch.mask.device)
        return n_layer.scatter_add_(1, batch.layer, batch.mask.long())

    @property
    def _energy_norm(self) -> tuple[float, float] | None:
        cfg = self.config
        return (cfg.point_mean[2], cfg.point_std[2]) if cfg.energy_rescale else None

    def fake(self, batch: Batch, cond: torch.Tensor, n_layer: torch.Tensor, noise: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generated showers with the counts of ``batch``, padded like the critic wants them.

        Shapes:
            returns x ``(B, N, 3)``, layer ``(B, N)``, mask ``(B, N)``, ``N = max n``.
        """
        return self._fake(batch, cond, n_layer, noise)[0]

    def _fake(self, batch: Batch, cond: torch.Tensor, n_layer: torch.Tensor, noise: torch.Tensor | None = None,
              ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """:meth:`fake` and the packed layout of the fakes (for the critic). The sizes come from the
        batch's shapes (points ``P`` and padded length ``N``): no host sync."""
        b, n_max = batch.mask.shape
        total = batch.points.shape[0] if batch.points is not None else None
        x, layer, shower_of = self.generator.points(cond, batch.shower, n_layer, noise, energy_norm=self._energy_norm,
                                                    total=total, n_max=n_max)
        n = n_layer.sum(1)
        idx = _packed_index(shower_of, n, n_max)
        xd = x.new_zeros(b * n_max, x.shape[1]).index_copy(0, idx, x).view(b, n_max, -1)
        ld = layer.new_zeros(b * n_max).index_copy(0, idx, layer).view(b, n_max)
        mask = torch.arange(n_max, device=n.device)[None, :] < n[:, None]
        return (xd, ld, mask), (x, layer, shower_of, idx)

    def _real(self, batch: Batch) -> tuple[torch.Tensor, ...] | None:
        """The packed layout of the batch's real points for the critic (None when the batch has none)."""
        if batch.points is None or batch.point_shower is None or batch.point_layer is None:
            return None
        return (batch.points, batch.point_layer, batch.point_shower,
                _packed_index(batch.point_shower, batch.n, batch.mask.shape[1]))

    # ------------------------------------------------------------------ losses
    def critic_loss(self, batch: Batch, fake: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                    cond: torch.Tensor) -> torch.Tensor:
        """Hinge loss of the critic, averaged over its sub-critics."""
        return self._critic_loss(batch, fake, cond)[0]

    def _critic_loss(self, batch: Batch, fake: tuple[torch.Tensor, ...], cond: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`critic_loss` and the critic features of the real showers (detached, for feature matching)."""
        d_real, f_real = self.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, self._real(batch))
        d_fake, _ = self.critic(*fake[:3], cond, batch.shower, *fake[3:])
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean(), f_real.detach()

    def generator_loss(self, batch: Batch, fake: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       cond: torch.Tensor, f_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinge generator loss + ``feature_matching`` × feature matching + ``moment_matching`` × layer-moment
        matching (:meth:`moment_loss`, when the weight is not 0); returns ``(total, feature matching)``.

        ``f_real``: the critic features of the real showers, when already computed (else one more
        critic pass over them, without gradients).
        """
        return self._generator_loss(batch, fake, cond, f_real)[:2]

    def _generator_loss(self, batch: Batch, fake: tuple[torch.Tensor, ...], cond: torch.Tensor,
                        f_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`generator_loss` and the layer-moment term (None when its weight is 0)."""
        cfg = self.config
        d_fake, f_fake = self.critic(*fake[:3], cond, batch.shower, *fake[3:])
        if f_real is None:
            with torch.no_grad():
                _, f_real = self.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, self._real(batch))
        fm = (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
        total = -d_fake.mean() + cfg.feature_matching * fm
        mm = None
        if cfg.moment_matching > 0:
            mm = self.moment_loss(batch, fake)
            total = total + cfg.moment_matching * mm
        return total, fm, mm

    def layer_moments(self, x: torch.Tensor, layer: torch.Tensor, shower_of: torch.Tensor, b: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Energy-weighted radial centre and width of every layer of every shower, from packed variant-II points.

        ``r`` is taken as the fraction of its layer's radial extent (what the model generates), the
        weights are the points' energy shares of their layer (normalised here, so the shares of
        generated points need not sum to 1): per (shower, layer), centre ``c = Σ w u / Σ w`` and
        width ``sqrt(Σ w u² / Σ w − c²)``: the EC_r and width_r of the CaloChallenge features, up to
        the layer's extent. Differentiable in ``x``.

        Shapes:
            x: ``(P, 3)`` standardised variant-II features; layer, shower_of: ``(P,)``; returns
            moments ``(B, L, 2)`` (centre, width; 0 for empty layers) and occupied ``(B, L)`` bool.
        """
        cfg = self.config
        u, w = radial_share(x[:, 1], x[:, 2], cfg.point_mean[1:], cfg.point_std[1:])
        return layer_moments(u, w, layer, shower_of, b, cfg.n_layers)

    def moment_loss(self, batch: Batch, fake: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Layer-moment matching: for every layer, the batch mean and standard deviation (over the showers with
        points in that layer) of the radial centre and width (:meth:`layer_moments`), generated against real.

        Squared differences, in units of the real batch's spread of each moment over all occupied
        (shower, layer) pairs, summed over the two moments and both statistics, averaged over the
        layers occupied in both batches (:func:`calopc.models.moments.moment_loss`, which the
        distilled CaloClouds student shares); with ``moment_condition``, also each moment's covariance
        with the showers' ``log E_inc``. A distribution-level term (batch statistics, not shower
        pairs): it gives the generator a direct gradient on the radial profile that the critic
        learns only slowly. 0 when generated and real batches have the same per-layer moments.

        ``fake``: as :meth:`generator_loss` gets it, with the packed fakes ``(x, layer, shower, idx)``
        as its fourth entry.
        """
        b = batch.mask.shape[0]
        x, layer, shower_of = fake[3][:3]
        real = self._real(batch)
        with torch.no_grad():
            if real is None:
                xr, shower, lay = batch.flat()
                m_real = self.layer_moments(xr, lay, shower, b)
            else:
                m_real = self.layer_moments(real[0], real[1], real[2], b)
        cond = batch.cond[:, 0] if self.config.moment_condition else None
        return moment_loss(self.layer_moments(x, layer, shower_of, b), m_real, cond)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Same as :meth:`loss`."""
        return self.loss(batch)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Shower-model NLL + generator loss of a batch (a monitor: training goes through :meth:`training_step`)."""
        cond = self.condition(batch.cond, batch.n, batch.shower)
        fake, packed = self._fake(batch, cond, self.layer_counts(batch))
        return self.shower_model.loss(batch.cond, batch.shower) + self.generator_loss(batch, (*fake, packed), cond)[0]

    # ------------------------------------------------------------------ training
    def configure_optimizers(self, train_cfg: object) -> dict[str, torch.optim.Optimizer]:
        """Adam for the generator and the critic (their own learning rates), Adam for the shower model
        (fused where torch supports it). A critic update marks its spectral norms for one power iteration."""
        cfg = self.config
        betas = (float(cfg.betas[0]), float(cfg.betas[1]))
        lr_shower = cfg.lr_shower if cfg.lr_shower is not None else float(getattr(train_cfg, "lr", 1e-3))
        critic = _adam(self.critic.parameters(), lr=cfg.lr_critic, betas=betas, weight_decay=cfg.weight_decay)
        critic.register_step_post_hook(lambda *_: _sn_weights_changed(self.critic))
        return {
            "generator": _adam(self.generator.parameters(), lr=cfg.lr_generator, betas=betas,
                               weight_decay=cfg.weight_decay),
            "critic": critic,
            "shower": _adam(self.shower_model.parameters(), lr=lr_shower),
        }

    def training_step(self, batch: Batch, step: int, backward: Callable[[torch.Tensor, str], None],
                      ) -> dict[str, torch.Tensor]:
        """One step: ``shower_steps`` shower-model updates, ``critic_steps`` critic updates, one generator update.

        ``backward(loss, name)`` updates the optimizer ``name`` of :meth:`configure_optimizers`.
        Returns detached scalars; ``loss`` is the sum of the three losses (what the
        divergence guard watches).

        Three critic passes per step (with ``critic_steps=1``), one generator pass: the showers
        generated for the last critic update (with the generator's graph) are the ones the
        generator is then trained on, shown to the updated critic (as the reference alternating
        GAN loops do: one draw of noise per step); the feature-matching target is the mean critic
        feature of the real batch from the critic update's own pass over it (before that update,
        as in Salimans et al. 2016), not a fourth pass.
        """
        for _ in range(self.config.shower_steps):
            ls = self.shower_model.loss(batch.cond, batch.shower)
            backward(ls, "shower")
        cond = self.condition(batch.cond, batch.n, batch.shower)
        n_layer = self.layer_counts(batch)
        steps = self.config.critic_steps
        for i in range(steps):
            with torch.set_grad_enabled(i == steps - 1):
                fake, packed = self._fake(batch, cond, n_layer)
            shown = (*(t.detach() for t in fake), tuple(t.detach() for t in packed))
            with parametrize.cached():   # the spectral-normalised weights once for both passes
                ld, f_real = self._critic_loss(batch, shown, cond)
            backward(ld, "critic")
        self.critic.requires_grad_(False)
        try:
            with parametrize.cached():
                lg, fm, mm = self._generator_loss(batch, (*fake, packed), cond, f_real)
            backward(lg, "generator")
        finally:
            self.critic.requires_grad_(True)
        out = {"shower": ls, "critic": ld, "generator": lg, "feature_matching": fm}
        if mm is not None:
            out["moment_matching"] = mm
        out = {k: v.detach().float() for k, v in out.items()}
        out["loss"] = out["shower"] + out["critic"] + out["generator"]
        return out

    # ------------------------------------------------------------------ generation
    def _fit_leaves(self, n_layer: torch.Tensor) -> torch.Tensor:
        """Scale down the per-layer counts of showers with more points than leaves."""
        n = n_layer.sum(1, keepdim=True)
        cap = self.generator.leaves
        scaled = torch.div(n_layer * cap, n.clamp_min(1), rounding_mode="floor")   # no read-back: always computed
        return torch.where(n > cap, scaled, n_layer)

    def _inverse(self, x: torch.Tensor, layer: torch.Tensor, prep: Preprocessor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Variant-II point features → ``(α rad, r mm, w = E/E_layer)`` on the device (as :meth:`Preprocessor.inverse_points_layer`)."""
        mean = torch.tensor(prep.point_mean, dtype=torch.float64, device=x.device)
        std = torch.tensor(prep.point_std, dtype=torch.float64, device=x.device)
        y = x.to(torch.float64) * std + mean
        geo = prep.geometry
        r_lo = torch.tensor([float(e[0]) for e in geo.r_edges], dtype=torch.float64, device=x.device)[layer]
        r_hi = torch.tensor([float(e[-1]) for e in geo.r_edges], dtype=torch.float64, device=x.device)[layer]
        alpha = torch.sigmoid(y[:, 0]) * (2 * math.pi) - math.pi
        r = r_lo + torch.sigmoid(y[:, 1]) * (r_hi - r_lo)
        return alpha, r, torch.exp(y[:, 2].clamp(-80, 80))

    @torch.no_grad()
    def sample_points(self, e_inc: np.ndarray | torch.Tensor, prep: Preprocessor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Showers in physical units before the α rotation: ``(counts, layer, alpha, r, E, shower index)``.

        Counts and layer energies come from the shower model (counts scaled down where a shower
        would need more points than the tree has leaves).

        Shapes:
            e_inc: ``(B,)``; counts ``(B,)``; the others ``(P,)``, shower after shower, layer after layer.
        """
        device = next(self.parameters()).device
        e = torch.as_tensor(np.asarray(e_inc.cpu() if isinstance(e_inc, torch.Tensor) else e_inc, dtype=np.float64),
                            device=device).reshape(-1)
        shower, n_layer, e_layer = self.shower_model.sample_layers(e, prep)
        shower = shower.to(device=device, dtype=torch.float32)
        n_layer = self._fit_leaves(n_layer.to(device=device, dtype=torch.int64))
        e_layer = torch.where(n_layer > 0, e_layer.to(device=device, dtype=torch.float64), 0.0)
        n = n_layer.sum(1)
        cond = ((torch.log(e) - prep.cond_mean) / prep.cond_std).to(torch.float32)[:, None]
        c = self.condition(cond, n, shower)
        x, layer, shower_of = self.generator.points(c, shower, n_layer, energy_norm=self._energy_norm)
        alpha, r, w = self._inverse(x, layer, prep)
        return n, layer, alpha, r, w * e_layer[shower_of, layer], shower_of

    @torch.no_grad()
    def generate(self, e_inc: np.ndarray | torch.Tensor, prep: Preprocessor):  # noqa: ANN201 (GeneratedShowers)
        """Showers for the given incident energies (MeV), as :class:`calopc.models.cells.GeneratedShowers`.

        Each shower is rotated by a random angle in α (as the published post-processing does);
        ``alpha="free"`` leaves α to the placement (drawn without replacement per ring).

        Shapes:
            e_inc: ``(B,)``; the result holds ``counts (B,)`` and ``layer, r, alpha, E (P,)``.
        """
        from ..cells import GeneratedShowers

        n, layer, alpha, r, energy, shower_of = self.sample_points(e_inc, prep)
        if self.config.alpha == "free":
            return GeneratedShowers(counts=n, layer=layer, r=r, alpha=None, E=energy)
        rot = torch.rand(n.shape[0], dtype=torch.float64, device=n.device) * (2 * math.pi)
        alpha = torch.remainder(alpha + rot[shower_of] + math.pi, 2 * math.pi) - math.pi
        return GeneratedShowers(counts=n, layer=layer, r=r, alpha=alpha, E=energy)
