r"""CaloClouds: showers as point clouds from EDM diffusion, with a one-step consistency-distilled student.

Two parts, trained together (their losses add; they share no parameters):

1. the shared **shower model** (:class:`~calopc.models.shower.ShowerModel`): points and energy
   of every layer given ``log E_inc``;
2. a **point model**: EDM diffusion (Karras et al.) on the per-point features of variant-II
   preprocessing, ``(α, r, log E/E_l)``, of every point given its context
   ``[log E_inc, layer position, n_l and E_l of its layer, a learnt layer embedding]``.
   Preconditioning with ``σ_data = 0.5``; training noise ``ln σ ~ N(−1.2, 1.2²)``, one ``σ``
   per shower; the L2 loss with the EDM weight, averaged per shower. The denoiser is
   CaloClouds II's per-point ConcatSquash network (``denoiser="pointwise"``) or a transformer
   in which points attend to the points of the nearby layers of their shower
   (``denoiser="transformer"``, ``|Δlayer| ≤ band``).

Generation: the shower model gives the points and energy of each layer; that many points
are sampled in each layer (Heun, 13 steps = 25 network evaluations by default, or the
distilled student in one); the energies of each layer are rescaled to the layer energy.
The result is a :class:`~calopc.models.cells.GeneratedShowers` with a continuous α
(placement ``"nearest-free"``) or, with ``alpha="free"``, without α (placement
``"alpha-free"``: α without replacement per ``(layer, r)`` ring); the placement puts at most
one point in a cell and reports the collision share.

``calopc distill RUN -o RUN_CM`` (:mod:`.distill`) turns a trained run into a consistency
model (``consistency=True``) that samples in ``steps = 1`` (or 2) evaluations.

Points are handled flat (all real points of a batch, with their shower and layer), never
padded; the context of a point depends only on its ``(shower, layer)`` group and its noise
level on its shower, so the gates and biases of the denoiser are computed once per group.
The transformer's attention is a block mask over ``(shower, layer)`` groups
(:func:`~calopc.models.diffusion.band_attention`): points sorted by ``(shower, layer)`` are cut
into tiles, each tile attends to one window of keys bounded by the most cells of a layer
(``max_group``, from the geometry), in one attention call with no read-back from the device;
cost is linear in the number of points (≤ 900 per layer on dataset 3), with no ``P × P`` mask. ``points_per_shower_loss`` trains on a random subset of the points of every
shower (exact for the pointwise denoiser; for the transformer the attention then sees a
thinned shower).

References:
    | CaloClouds (Buhmann et al., 2023) | https://arxiv.org/abs/2305.04847
    | CaloClouds II (Buss et al., 2023) | https://arxiv.org/abs/2309.05704
    | EDM (Karras et al., 2022) | https://arxiv.org/abs/2206.00364
    | Consistency models (Song et al., 2023) | https://arxiv.org/abs/2303.01469
"""

from __future__ import annotations

__all__ = ["CaloClouds", "CaloCloudsConfig"]

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn

from .calopointflow import fit_rings
from .cells import GeneratedShowers
from .data import Batch
from .diffusion import (BandTransformer, ConsistencyPrecond, EDMPrecond, PointwiseNet, consistency_sample, edm_loss,
                        sample, segment_mean)
from .preprocess import Preprocessor
from .shower import ShowerModel, ShowerModelConfig, _prep_call, torch_preprocessor

DENOISERS = ("pointwise", "transformer")
ALPHA = ("model", "free")
OVERFLOW = ("move", "merge")
DEQUANTISATION = ("uniform", "cdf")
#: what a saved config without these switches meant (run directories written before them)
_BEFORE_SWITCHES = {"time_mlp": False, "diffuse_free_alpha": True, "overflow": "merge", "dequantisation": "uniform",
                    "alpha": "model"}

#: named configurations (``--set model.preset=NAME``): model keys and the training recipe (``train``) that
#: ``calopc train caloclouds`` uses unless told otherwise; the keys a user gives override the preset's
PRESETS: dict[str, dict] = {
    # calopc's recipe for budgets of minutes to hours (a time-limited run decays its learning rate over the
    # clock): AdamW with a cosine, a short EMA; α not generated but drawn per (layer, r) ring at placement, a full
    # ring's least energetic points moved outwards (the fidelity table's distilled student: AUC low 0.958 vs 0.971,
    # FPD 208 vs 260 ×10⁻³ for α generated and placed nearest-free; model.alpha=model generates it)
    "calopc": {"model": {"alpha": "free"}, "train": {}},
    # CaloClouds II as published (FLC-QU-hep/CaloClouds-2 configs.py): α generated, RAdam 1e-4 constant,
    # EMA warm-up to 0.9999, batch 128, clip 10; made for ~2 M steps on a GPU
    "published": {"model": {"alpha": "model", "dequantisation": "uniform", "sigma_data": 0.5, "p_mean": -1.2,
                            "p_std": 1.2, "steps": 13, "widths": (128, 256, 512, 256, 128)},
                  "train": {"optimizer": "radam", "lr": 1e-4, "schedule": "constant", "warmup": 0,
                            "ema_decay": 0.9999, "ema_warmup": "power", "batch_size": 128, "grad_clip": 10.0}},
}


@dataclass(frozen=True)
class CaloCloudsConfig:
    """Hyper-parameters of :class:`CaloClouds` (defaults: the ``calopc`` preset; ``preset="published"``
    is CaloClouds II as published, see :data:`PRESETS`)."""

    n_layers: int = 0                                      # set from the data
    point_features: int = 3                                # set from the data: (alpha, r, E share)
    shower_features: int = 0                               # set from the data: 2 per layer
    cond_features: int = 1                                 # log E_inc
    denoiser: str = "pointwise"                            # "pointwise" (CaloClouds II) or "transformer"
    widths: tuple[int, ...] = (128, 256, 512, 256, 128)   # pointwise: ConcatSquash widths
    fourier: int = 64                                      # Fourier features of c_noise = ln(sigma)/4
    layer_embedding: int = 8                               # learnt layer embedding in the point context
    dim: int = 64                                          # transformer: width
    heads: int = 4                                         # transformer: attention heads
    blocks: int = 2                                        # transformer: blocks
    mlp: int = 128                                         # transformer: hidden width of the MLPs
    band: int = 2                                          # transformer: layers each side a point attends to
    max_group: int = 0                                     # set from the data: most cells of a layer (0: read per call)
    sigma_data: float = 0.5                                # EDM data scale
    p_mean: float = -1.2                                   # training ln(sigma) mean
    p_std: float = 1.2                                     # training ln(sigma) standard deviation
    sigma_min: float = 0.002                               # sampling schedule
    sigma_max: float = 80.0
    rho: float = 7.0
    steps: int = 13                                        # Heun steps (2 steps - 1 evaluations); student: evaluations
    consistency: bool = False                              # a consistency-distilled student (calopc distill)
    alpha: str = "free"                                    # "free": drawn at placement; "model": generate alpha
    overflow: str = "move"                                 # α drawn at placement: a full ring's extra points "move"/"merge"
    dequantisation: str = "uniform"                        # (α, r) in their cells: "uniform" + logit, or "cdf" + probit
    max_points: int = 500_000                              # points per sampler call at generation (memory)
    points_per_shower_loss: int = 0                        # random points per shower in the loss (0: all)
    shower_transforms: int = 4                             # shower model: autoregressive spline transforms
    shower_hidden: tuple[int, ...] = (128, 128)            # shower model: hidden layers
    shower_bins: int = 8                                   # shower model: spline bins
    shower_passes: int | None = None                       # shower model: None autoregressive; 2 coupling (~70x faster to sample)
    time_mlp: bool = True                                  # pointwise: Linear(fourier, fourier) + LeakyReLU on the time features
    diffuse_free_alpha: bool = False                       # alpha="free": also diffuse the (unused) α column (older runs)
    preset: str = "calopc"                                 # "calopc" or "published" (see PRESETS)

    #: the training recipe of the default preset (``calopc``); :meth:`training_defaults` gives a preset's
    TRAINING_DEFAULTS = PRESETS["calopc"]["train"]

    @staticmethod
    def training_defaults(model_config: dict | None = None) -> dict:
        """The training options of the preset named in ``model_config`` (default ``calopc``).

        Raises:
            ValueError: an unknown preset.
        """
        preset = (model_config or {}).get("preset", "calopc")
        if preset not in PRESETS:
            msg = f"CaloClouds preset must be one of {', '.join(PRESETS)}, got {preset!r}"
            raise ValueError(msg)
        return dict(PRESETS[preset]["train"])

    def __post_init__(self) -> None:
        for name, value, allowed in (("denoiser", self.denoiser, DENOISERS), ("alpha", self.alpha, ALPHA),
                                     ("overflow", self.overflow, OVERFLOW),
                                     ("dequantisation", self.dequantisation, DEQUANTISATION),
                                     ("preset", self.preset, tuple(PRESETS))):
            if value not in allowed:
                msg = f"CaloClouds {name} must be one of {', '.join(allowed)}, got {value!r}"
                raise ValueError(msg)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            msg = f"CaloClouds steps must be an integer >= 1, got {self.steps!r}"
            raise ValueError(msg)

    @classmethod
    def from_dict(cls, d: dict) -> CaloCloudsConfig:
        """The config of ``d``: its ``preset``'s model keys (:data:`PRESETS`), then the keys ``d`` gives.

        Raises:
            ValueError: an unknown key or preset.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown CaloClouds config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "n_layers" in d:  # a saved config: a missing switch means what the model did before it existed
            for k, v in _BEFORE_SWITCHES.items():
                d.setdefault(k, v)
        preset = d.get("preset", "calopc")
        if preset not in PRESETS:
            msg = f"CaloClouds preset must be one of {', '.join(PRESETS)}, got {preset!r}"
            raise ValueError(msg)
        return cls(**{**PRESETS[preset]["model"], **d})

    def preprocessing(self) -> dict:
        """Options of :meth:`Preprocessor.fit` this model needs."""
        return {"variant": "II", "dequantisation": self.dequantisation}

    def with_data(self, prep: Preprocessor) -> CaloCloudsConfig:
        """The config with the sizes that depend on the data (feature counts, layers)."""
        if prep.variant != "II":
            msg = f"CaloClouds needs variant-II preprocessing, got variant {prep.variant!r}"
            raise ValueError(msg)
        return replace(self, n_layers=prep.geometry.n_layers, point_features=prep.n_point_features,
                       shower_features=prep.n_shower_features, max_group=max(prep.geometry.voxels_per_layer))


class CaloClouds(nn.Module):
    r"""Shower model + EDM point diffusion (or its consistency-distilled student).

    Args:
        config: hyper-parameters (after :meth:`CaloCloudsConfig.with_data`).

    Shapes:
        batch: a variant-II :class:`~calopc.models.data.Batch`, ``x (B, N_max, 3)``,
        ``shower (B, 2L)``, ``cond (B, 1)``; internally points are flat ``(P, 3)`` with their
        shower ``(P,)`` and layer ``(P,)``.
    """

    def __init__(self, config: CaloCloudsConfig) -> None:
        super().__init__()
        self.config = cfg = config
        if cfg.n_layers < 1 or cfg.shower_features != 2 * cfg.n_layers:
            msg = (f"CaloClouds needs n_layers and shower_features = 2 n_layers (config.with_data(prep)); "
                   f"got n_layers={cfg.n_layers}, shower_features={cfg.shower_features}")
            raise ValueError(msg)
        self.shower = ShowerModel(cfg.n_layers, cfg.cond_features,
                                  ShowerModelConfig(cfg.shower_transforms, cfg.shower_hidden, cfg.shower_bins,
                                                    cfg.shower_passes))
        self.layer_emb = nn.Embedding(cfg.n_layers, cfg.layer_embedding)
        self.alpha_free = cfg.alpha == "free" and not cfg.diffuse_free_alpha
        ctx = cfg.cond_features + 3 + cfg.layer_embedding
        # alpha="free": α is drawn at placement, so only (r, log E/E_l) are diffused
        self.point_dims = list(range(1, cfg.point_features)) if self.alpha_free else list(range(cfg.point_features))
        feats = len(self.point_dims)
        if cfg.denoiser == "pointwise":
            net: nn.Module = PointwiseNet(feats, ctx, cfg.widths, cfg.fourier, time_mlp=cfg.time_mlp)
        else:
            net = BandTransformer(feats, ctx, cfg.n_layers, dim=cfg.dim, heads=cfg.heads,
                                  blocks=cfg.blocks, mlp=cfg.mlp, band=cfg.band, fourier=cfg.fourier,
                                  max_group=cfg.max_group or None)
        self.denoiser = (ConsistencyPrecond(net, cfg.sigma_data, cfg.sigma_min) if cfg.consistency
                         else EDMPrecond(net, cfg.sigma_data))

    # -------------------------------------------------------------------------------------------- context
    def context(self, cond: Tensor, shower: Tensor) -> Tensor:
        """Context of every ``(shower, layer)`` group, row ``b L + l``: ``[cond, layer position, n_l, E_l,
        layer embedding]``. A point of shower ``b`` in layer ``l`` reads row ``b L + l`` (``ctx_index``).

        Shapes:
            cond: ``(B, C)``; shower: ``(B, 2L)``; returns ``(B L, C + 3 + emb)``.
        """
        b, n_l = cond.shape[0], self.config.n_layers
        lay = torch.arange(n_l, device=cond.device)
        pos = (2 * lay.to(cond.dtype) / max(n_l - 1, 1) - 1)[None, :, None].expand(b, n_l, 1)
        emb = self.layer_emb(lay).to(cond.dtype)[None].expand(b, n_l, -1)
        ctx = torch.cat([cond[:, None, :].expand(b, n_l, -1), pos, shower[:, :n_l, None], shower[:, n_l:, None], emb],
                        dim=-1)
        return ctx.reshape(b * n_l, -1)

    def net_inputs(self, cond: Tensor, shower: Tensor, shower_of: Tensor, layer: Tensor) -> dict[str, Tensor]:
        """The keyword inputs of the denoiser for points of the given showers and layers."""
        return {"ctx": self.context(cond, shower), "ctx_index": shower_of * self.config.n_layers + layer,
                "shower": shower_of, "layer": layer}

    @staticmethod
    def flatten(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """The real points of a padded batch: ``(x (P, F), shower_of (P,), layer (P,))`` (the collate's
        packed layout when the batch has it: no boolean indexing, no host sync on CUDA)."""
        return batch.flat()

    @staticmethod
    def subsample(shower_of: Tensor, n_showers: int, k: int) -> Tensor:
        """Indices of ``k`` random points of every shower (all of a shower with fewer), in order.

        Shapes:
            shower_of: ``(P,)`` sorted; returns ``(P',)`` int64.
        """
        p = shower_of.shape[0]
        order = torch.argsort(shower_of.to(torch.float64) + torch.rand(p, device=shower_of.device, dtype=torch.float64))
        counts = torch.zeros(n_showers, dtype=torch.int64, device=shower_of.device).index_add_(
            0, shower_of, torch.ones_like(shower_of))
        start = torch.cumsum(counts, 0) - counts
        return torch.sort(order[torch.arange(p, device=shower_of.device) - start[shower_of[order]] < k]).values

    # -------------------------------------------------------------------------------------------- training
    def forward(self, batch: Batch) -> Tensor:
        """Same as :meth:`loss` (so that DistributedDataParallel sees a forward call)."""
        return self.loss(batch)

    def loss_terms(self, batch: Batch) -> dict[str, Tensor]:
        """The loss and its parts: ``shower`` (NLL per shower feature) and ``points`` (EDM loss,
        mean over the points of a shower, then over showers)."""
        cfg = self.config
        cond, s = batch.cond, batch.shower
        shower_nll = self.shower.loss(cond, s)
        x, shower_of, layer = self.flatten(batch)
        if self.alpha_free:
            x = x[:, 1:]
        b = cond.shape[0]
        if cfg.points_per_shower_loss and x.shape[0] > cfg.points_per_shower_loss:
            keep = self.subsample(shower_of, b, cfg.points_per_shower_loss)
            x, shower_of, layer = x[keep], shower_of[keep], layer[keep]
        sigma = (cfg.p_mean + cfg.p_std * torch.randn(b, device=x.device, dtype=x.dtype)).exp()  # one per shower
        per_point = edm_loss(self.denoiser, x, sigma[shower_of], **self.net_inputs(cond, s, shower_of, layer))
        if x.shape[0]:  # mean over the showers that have points (no boolean indexing: no host sync)
            has = torch.zeros(b, dtype=per_point.dtype, device=x.device).index_fill_(0, shower_of, 1.0)
            points = (segment_mean(per_point, shower_of, b) * has).sum() / has.sum().clamp(min=1)
        else:
            points = per_point.sum()
        return {"loss": shower_nll + points, "shower": shower_nll, "points": points}

    def loss(self, batch: Batch) -> Tensor:
        """Scalar training loss of a batch (lower is better)."""
        return self.loss_terms(batch)["loss"]

    # -------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_points(self, cond: Tensor, shower: Tensor, shower_of: Tensor, layer: Tensor, *,
                      steps: int | None = None, latents: Tensor | None = None, max_group: int | None = None) -> Tensor:
        """Sample the preprocessed features of points whose shower and layer are given.

        Args:
            cond, shower: standardised conditions and shower features of the ``B`` showers.
            shower_of, layer: shower and layer of every point to sample.
            steps: Heun steps (``2 steps − 1`` evaluations) or, for a consistency model,
                evaluations. Defaults to ``config.steps``.
            latents: the ``N(0, 1)`` start noise (drawn when None).

        Shapes:
            cond: ``(B, C)``; shower: ``(B, 2L)``; shower_of, layer: ``(P,)``; returns ``(P, F)``
            (``F`` diffused features: without the α column when α is free).
        """
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        if latents is None:
            latents = torch.randn(shower_of.shape[0], len(self.point_dims), device=cond.device, dtype=cond.dtype)
        kw = self.net_inputs(cond, shower, shower_of, layer)
        if max_group and cfg.denoiser == "transformer":   # the most points of one (shower, layer), if known
            kw["max_group"] = int(max_group)
        run = consistency_sample if cfg.consistency else sample
        key = "steps" if cfg.consistency else "num_steps"
        return run(self.denoiser, latents, sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho,
                   **{key: steps}, **kw)

    @torch.no_grad()
    def generate(self, e_inc: np.ndarray | Tensor, prep: Preprocessor, *, steps: int | None = None,
                 oversample: int = 1, overflow: str | None = None) -> GeneratedShowers:
        """Showers in physical units for the given incident energies.

        Args:
            e_inc: incident energies (MeV).
            prep: the run's preprocessing.
            steps: sampler steps (see :meth:`sample_points`). Defaults to ``config.steps``.
            oversample: ``K > 1`` draws ``K n_l`` candidate points in every layer for the ``"likelihood"``
                placement (:func:`calopc.models.cells.place_likelihood`; pointwise denoiser only: the
                transformer's points attend to each other, so they are not independent given the shower).
            overflow: ``"move"``: α is left to the placement (drawn per ``(layer, r)`` ring without
                replacement) and a ring with more points than α bins passes its least energetic points
                on to the next ring with room (:func:`calopc.models.calopointflow.fit_rings`), so no cell
                gets two points; ``"merge"``: the rings stay as sampled. Defaults to ``config.overflow``
                with ``alpha="free"``; a model of α generates α unless ``"move"`` is asked for (then its
                α is discarded).

        Returns:
            A :class:`GeneratedShowers` on the model's device: per-layer point counts and
            layer energies from the shower model, ``α`` (None with ``alpha="free"`` or
            ``overflow="move"``), ``r`` and energies rescaled so that each layer of each shower
            carries its layer energy; ``n_moved_ring`` counts the points the overflow moved.

        Raises:
            ValueError: ``oversample`` > 1 with the transformer denoiser, or an unknown ``overflow``.

        Shapes:
            e_inc: ``(B,)``.
        """
        cfg = self.config
        k = int(oversample)
        if overflow is not None and overflow not in OVERFLOW:
            msg = f"CaloClouds overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}"
            raise ValueError(msg)
        move = (overflow or (cfg.overflow if self.alpha_free else "merge")) == "move"
        if k < 1 or (k > 1 and cfg.denoiser != "pointwise"):
            msg = (f"oversample={oversample}: the 'likelihood' placement needs points sampled independently given "
                   f"their shower (denoiser='pointwise'), this CaloClouds has denoiser={cfg.denoiser!r}")
            raise ValueError(msg)
        device = next(self.parameters()).device
        dtype = next(self.denoiser.parameters()).dtype
        e = torch.as_tensor(np.asarray(e_inc) if not isinstance(e_inc, Tensor) else e_inc, dtype=torch.float64,
                            device=device).reshape(-1)
        s, n_layer, e_layer = self.shower.sample_layers(e, prep)
        e_host = e_inc.detach().cpu().numpy() if isinstance(e_inc, Tensor) else np.asarray(e_inc, dtype=np.float64)
        cond = torch.as_tensor(prep.forward_cond(e_host.reshape(-1)), device=device, dtype=dtype)
        s = s.to(dtype)
        b, n_l = n_layer.shape
        n_points = n_layer * k                        # K > 1: candidates for the likelihood placement
        counts = n_points.sum(1)
        # whole showers per sampler call, at most max_points points (unless one shower has more), and the most
        # points of one (shower, layer) (the transformer's attention window): the one read-back
        *ends, most = torch.cat([torch.cumsum(counts, 0), n_points.max().reshape(1)]).tolist() if b else [0]
        group = torch.repeat_interleave(torch.arange(b * n_l, device=device), n_points.reshape(-1),
                                        output_size=ends[-1] if ends else 0)   # (P,)
        shower_of, layer = group // n_l, group % n_l
        y_parts, start = [], 0
        for i in range(b):
            if i == b - 1 or ends[i + 1] - start > cfg.max_points:
                sl = slice(start, ends[i])
                y_parts.append(self.sample_points(cond, s, shower_of[sl], layer[sl], steps=steps, max_group=most))
                start = ends[i]
        y = torch.cat(y_parts) if y_parts else s.new_zeros(0, len(self.point_dims))
        if self.alpha_free:  # the α column is not diffused: any value, its inverse is not used
            y = torch.cat([y.new_zeros(y.shape[0], 1), y], dim=1)
        p = torch_preprocessor(prep, device) or prep   # torch ops on the device; numpy when there are none
        zar, w = _prep_call(p.inverse_points_layer, y, layer)
        zar = torch.as_tensor(zar, dtype=torch.float64, device=device)
        w = torch.as_tensor(w, dtype=torch.float64, device=device)
        alpha, r = zar[:, 1], zar[:, 2]
        tot = torch.zeros(b * n_l, dtype=w.dtype, device=device).index_add_(0, group, w)
        energy = w / tot.clamp(min=1e-300)[group] * e_layer.reshape(-1).to(w.dtype)[group]
        if k > 1:
            return GeneratedShowers(counts, layer, r, None if cfg.alpha == "free" else alpha, energy,
                                    layer_counts=n_layer, layer_energy=e_layer, oversample=k)
        moved: Tensor | int = 0
        if move:   # α left to the placement; a full ring keeps its most energetic points
            r, moved = fit_rings(prep.geometry, group, b * n_l, layer, r, energy=energy)
        keep_alpha = cfg.alpha != "free" and not move
        return GeneratedShowers(counts, layer, r, alpha if keep_alpha else None, energy, n_moved_ring=moved)
