"""DeepTree's hyper-parameters (:class:`DeepTreeConfig`) and its tree presets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .layers import _leaves

if TYPE_CHECKING:
    from ..preprocess import Preprocessor


#: published-style tree shapes; ``ds3`` has enough leaves for the dataset-3 hit counts
PRESETS: dict[str, dict[str, tuple[int, ...]]] = {
    "ds2": {"branches": (2, 3, 4, 5, 5, 10), "features": (64, 25, 15, 10, 8, 6, 4)},        # 6,000 leaves
    "ds3": {"branches": (3, 4, 5, 6, 8, 10), "features": (64, 25, 15, 10, 8, 6, 4)},        # 28,800 leaves
    "published": {"branches": (2, 3, 4, 5, 5, 10), "features": (64, 25, 15, 10, 8, 6, 4)},  # ds2 tree, wider nets
}
#: sizes a preset sets unless the config gives them (``published``: the generator at the published
#: capacity, ~0.53 M parameters instead of the ~77 k of the default widths)
PRESET_SIZES: dict[str, dict[str, int]] = {
    "published": {"branch_hidden": 480, "gin_hidden": 128, "n_global": 10, "cond_hidden": 64, "head_hidden": 256},
}
CRITICS = ("pool", "meanfield")
ALPHA_MODES = ("model", "free")
_DS3_VOXELS = 10_000  # "auto" picks the ds3 preset for geometries with more voxels than this


@dataclass(frozen=True)
class DeepTreeConfig:
    """Hyper-parameters of :class:`DeepTree` (defaults: the published dataset-2 model)."""

    preset: str = "auto"                          # "ds2", "ds3" or "auto" (from the geometry in with_data)
    branches: tuple[int, ...] = ()                # children per node and level (empty: from the preset)
    features: tuple[int, ...] = ()                # node features per level, len(branches) + 1 (empty: preset)
    n_global: int = 10                            # global features pooled per level
    gin_hidden: int = 100                         # hidden width of the ancestor GIN layers
    branch_hidden: int = 64                       # hidden width of the branching maps
    cond_hidden: int = 32                         # embedding of the condition (E_inc, n, E_inc/n, shower features)
    head_hidden: int = 64                         # hidden width of the per-point head
    leaf_noise: int = 4                           # noise features per kept leaf into the head (0: root noise only)
    layer_embedding: int = 8                      # learned embedding of the layer (generator head and critic)
    critic: str = "pool"                          # "pool" (iterative pooling) or "meanfield" (MDMA-style)
    critic_nodes: tuple[int, ...] = (30, 6, 1)    # pool critic: learned nodes per pooling level
    critic_hidden: int = 64                       # critic width
    critic_heads: int = 16                        # attention heads of the critic
    critic_dropout: float = 0.5                   # dropout inside the sub-critics
    critic_point_level: bool = False              # pool critic: also a sub-critic on the points themselves
    meanfield_blocks: int = 4                     # meanfield critic: attention blocks
    meanfield_tokens: int = 4                     # meanfield critic: global tokens
    critic_steps: int = 1                         # critic updates per generator update
    shower_steps: int = 1                         # shower-model updates per training step (on the same batch)
    feature_matching: float = 0.1                 # weight of the feature-matching term of the generator loss
    moment_matching: float = 0.0                  # weight of the layer-moment term of the generator loss (0: off;
                                                  # the batch's mean and spread of each layer's radial centre, width)
    moment_condition: bool = False                # the layer-moment term also matches each moment's covariance with
                                                  # log E_inc (how the radial profile moves with the energy)
    lr_generator: float = 1e-5                    # Adam learning rate of the generator
    lr_critic: float = 3e-5                       # Adam learning rate of the critic
    lr_shower: float | None = None                # Adam learning rate of the shower model (None: the training lr)
    weight_decay: float = 1e-4
    betas: tuple[float, ...] = (0.5, 0.999)       # Adam betas of generator and critic
    energy_rescale: bool = True                   # point energies of each layer sum to the sampled layer energy
    alpha: str = "model"                          # "model": generated α (nearest-free placement); "free"
    shower_transforms: int = 4                    # shared shower model (counts and energies per layer)
    shower_hidden: tuple[int, ...] = (128, 128)
    shower_bins: int = 8
    shower_passes: int | None = None              # None: autoregressive shower model; 2: coupling (~70x faster to sample)
    n_layers: int = 0                             # set from the data
    n_max: int = 0                                # set from the data: largest number of points of a shower
    cond_mean: float = 0.0                        # set from the data: standardisation of log E_inc
    cond_std: float = 1.0
    point_mean: tuple[float, ...] = (0.0, 0.0, 0.0)  # set from the data: point standardisation (variant II)
    point_std: tuple[float, ...] = (1.0, 1.0, 1.0)

    #: the published GAN recipe: constant learning rates, no warm-up, no gradient clipping, no EMA
    #: (the generic loop's cosine, clip and EMA of generator *and* critic are off); batch 40
    TRAINING_DEFAULTS = {"schedule": "constant", "warmup": 0, "grad_clip": 0.0, "ema_decay": 0.0,
                         "batch_size": 40}

    @classmethod
    def from_dict(cls, d: dict) -> DeepTreeConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown DeepTree config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        d = {**PRESET_SIZES.get(d.get("preset", ""), {}), **d}   # the preset's sizes, unless given
        cfg = cls(**d)
        cfg.check()
        return cfg

    def check(self) -> None:
        """One-line errors for invalid choices (raised by :meth:`from_dict` and :meth:`with_data`)."""
        if self.preset not in ("auto", *PRESETS):
            msg = f"DeepTree preset must be one of auto, {', '.join(PRESETS)}; got {self.preset!r}"
            raise ValueError(msg)
        if self.critic not in CRITICS:
            msg = f"DeepTree critic must be one of {', '.join(CRITICS)}; got {self.critic!r}"
            raise ValueError(msg)
        if self.alpha not in ALPHA_MODES:
            msg = f"DeepTree alpha must be one of {', '.join(ALPHA_MODES)}; got {self.alpha!r}"
            raise ValueError(msg)
        if any(int(b) < 1 for b in self.branches) or any(int(f) < 1 for f in self.features):
            msg = f"DeepTree branches and features must be positive integers; got {self.branches} and {self.features}"
            raise ValueError(msg)
        if self.branches and self.features and len(self.features) != len(self.branches) + 1:
            msg = (f"DeepTree features need one entry per tree level, len(branches) + 1 = {len(self.branches) + 1}; "
                   f"got {len(self.features)} ({self.features})")
            raise ValueError(msg)
        if not self.critic_nodes or any(int(m) < 1 for m in self.critic_nodes):
            msg = f"DeepTree critic_nodes must be positive integers, e.g. (30, 6, 1); got {self.critic_nodes}"
            raise ValueError(msg)
        if self.critic_hidden % self.critic_heads:
            msg = f"DeepTree critic_hidden ({self.critic_hidden}) must be a multiple of critic_heads ({self.critic_heads})"
            raise ValueError(msg)
        if self.moment_matching < 0 or self.feature_matching < 0:
            msg = (f"DeepTree feature_matching and moment_matching must be >= 0; got {self.feature_matching}, "
                   f"{self.moment_matching}")
            raise ValueError(msg)
        if self.critic_steps < 1 or self.shower_steps < 1:
            msg = f"DeepTree critic_steps and shower_steps must be >= 1; got {self.critic_steps}, {self.shower_steps}"
            raise ValueError(msg)

    def resolved(self, n_voxels: int = 0) -> DeepTreeConfig:
        """The config with ``branches`` and ``features`` filled in from the preset."""
        preset = self.preset
        if preset == "auto":
            preset = "ds3" if n_voxels > _DS3_VOXELS else "ds2"
        p = PRESETS[preset]
        branches = self.branches or p["branches"]
        features = self.features or (p["features"] if len(p["features"]) == len(branches) + 1 else ())
        if not features:
            msg = (f"DeepTree branches {branches} have {len(branches)} levels: give features with "
                   f"{len(branches) + 1} entries (the {preset} preset's {p['features']} do not fit)")
            raise ValueError(msg)
        out = replace(self, preset=preset, branches=tuple(int(b) for b in branches),
                      features=tuple(int(f) for f in features))
        out.check()
        return out

    @property
    def leaves(self) -> int:
        """Leaves of the tree, the most points a shower can have."""
        return _leaves(self.branches) if self.branches else 0

    def preprocessing(self) -> dict:
        """Options of :meth:`Preprocessor.fit` this model needs."""
        return {"variant": "II"}

    def with_data(self, prep: Preprocessor) -> DeepTreeConfig:
        """The config with the sizes that depend on the data, checked against the largest shower."""
        if prep.variant != "II":
            msg = f"DeepTree needs the variant-II preprocessing; got variant {prep.variant!r}"
            raise ValueError(msg)
        geo = prep.geometry
        cfg = self.resolved(geo.n_voxels)
        n_max = int(prep.n_max)
        if cfg.leaves < n_max:
            choices = ", ".join(f"{k} = {_leaves(v['branches']):,} leaves" for k, v in PRESETS.items())
            msg = (f"DeepTree branches {cfg.branches} give {cfg.leaves:,} leaves, fewer than the {n_max:,} points of the "
                   f"largest training shower; choose model.preset or model.branches with at least {n_max:,} leaves "
                   f"({choices})")
            raise ValueError(msg)
        return replace(cfg, n_layers=geo.n_layers, n_max=n_max, cond_mean=float(prep.cond_mean),
                       cond_std=float(prep.cond_std), point_mean=tuple(float(v) for v in prep.point_mean),
                       point_std=tuple(float(v) for v in prep.point_std))
