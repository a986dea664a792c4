r"""DeepTree: showers grown as trees by a graph-network generator, trained as a GAN.

The generator starts from one root node per shower holding a noise vector and grows a tree
level by level: every node is split into ``branches[i]`` children by a learned branching map
that sees the node, the shower's condition and ``n_global`` features pooled over the level.
After each split the new nodes receive messages from **all their ancestors** (one GIN layer
from torch-geometric, edges ancestor → descendant built by index arithmetic). The leaves of
the last level are cut to the shower's number of points, each kept leaf is given its layer
(layers are handed out from the per-layer counts, so they hold exactly) and a point head maps
it (with ``leaf_noise`` fresh noise features per leaf, which the published generator does not
have) to the variant-II point features ``(α, r, log E/E_layer)`` (see :mod:`.preprocess`).

Numbers of points and energies per layer come from the shared :class:`.shower.ShowerModel`,
trained jointly; at generation the energies of the points of each layer are rescaled to the
layer energy sampled by the shower model (``energy_rescale``, default on; the published
DeepTree's weakest observable was ``E_tot/E_inc``).

Two critics (``critic``):

* ``"pool"`` (published): points are pooled iteratively to 30, 6 and 1 learned nodes by
  attention from learned seeds, with one spectral-normalised sub-critic (FFN → sum → FFN) per
  level;
* ``"meanfield"`` (MDMA-style): points attend to a few learned global tokens and the tokens
  to the points, ``O(N)`` per block; the score is read from the tokens.

Both see the same per-point inputs: the point features, the layer of the point, that layer's
(count, energy) shower features and the condition. Training: hinge loss plus 0.1 feature
matching (critic features of real and generated showers), Adam with separate learning rates
for generator (1e-5) and critic (3e-5) and ``critic_steps`` critic updates per generator
update, through the custom training-step interface of :mod:`.train`.

Usage::

    calopc train deeptree --data train.parquet --out run/                 # the published ds2 tree
    calopc train deeptree --data ds3.parquet --out run3/ --set model.preset=ds3 --set model.critic=meanfield
    calopc generate run/ --energies log-uniform:1e3:1e6 -n 1000 -o gen.hdf5

Tree presets: ``ds2`` (published: branches 2-3-4-5-5-10 = 6,000 leaves, features 64-25-15-10-8-6-4)
and ``ds3`` (3-4-5-6-8-10 = 28,800 leaves, above the 21,570 points of the largest of 4,000 synthetic
dataset-3 showers); ``auto`` picks by the number of cells of the geometry.

References:
    | DeepTreeGAN (Scham et al., 2023) | https://arxiv.org/abs/2311.12616
    | DeepTreeGANv2, iterative pooling (Scham et al., 2023) | https://arxiv.org/abs/2312.00042
    | MDMA, mean-field attention (Käch, Melzer-Pellmann, 2023) | https://arxiv.org/abs/2305.15254
    | GIN (Xu et al., 2019) | https://arxiv.org/abs/1810.00826
"""

from __future__ import annotations

__all__ = ["PRESETS", "DeepTree", "DeepTreeConfig", "MeanFieldCritic", "PoolCritic", "TreeGenerator"]

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

try:
    from torch_geometric.nn import GINConv, global_mean_pool
except ModuleNotFoundError as err:  # pragma: no cover - depends on the environment
    msg = "the DeepTree model needs torch-geometric: pip install 'calopc[gnn]'"
    raise ModuleNotFoundError(msg) from err

from .data import Batch
from .preprocess import Preprocessor
from .shower import ShowerModel, ShowerModelConfig

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


def _leaves(branches: tuple[int, ...]) -> int:
    return int(math.prod(branches))


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


# ---------------------------------------------------------------------------------------------- building blocks
class _OncePerUpdateSpectralNorm(_SpectralNorm):
    """torch's spectral normalisation with one power iteration per weight update instead of one per forward
    pass in train mode: the first forward after :func:`_sn_weights_changed` iterates, the others reuse
    ``u, v``. The critic runs 4 passes per training step but is updated once (same state-dict keys as
    :func:`torch.nn.utils.parametrizations.spectral_norm`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.pending = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.ndim == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training and self.pending:
            self._power_method(weight_mat, self.n_power_iterations)
            self.pending = False
        # u, v change in place only in the first forward after an update, before any graph of that update
        # is built, so unlike torch's version no clone is needed (a misuse fails loudly in backward)
        return weight / torch.vdot(self._u, torch.mv(weight_mat, self._v))


def spectral_norm(module: nn.Linear) -> nn.Linear:
    """``module.weight`` spectral-normalised, with power iterations once per weight update."""
    parametrize.register_parametrization(module, "weight", _OncePerUpdateSpectralNorm(module.weight))
    return module


def _sn_weights_changed(module: nn.Module) -> None:
    """Mark every spectral norm inside ``module``: its next train-mode forward runs a power iteration."""
    for m in module.modules():
        if isinstance(m, _OncePerUpdateSpectralNorm):
            m.pending = True


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


def _mlp(sizes: list[int], *, act: Callable[[], nn.Module] = lambda: nn.LeakyReLU(0.2), sn: bool = False,
         dropout: float = 0.0) -> nn.Sequential:
    """Fully connected network; ``sn``: spectral-normalised linear layers."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        mods.append(spectral_norm(lin) if sn else lin)
        if i < len(sizes) - 2:
            mods.append(act())
            if dropout > 0:
                mods.append(nn.Dropout(dropout))
    return nn.Sequential(*mods)


def _linear(a: int, b: int, *, sn: bool, bias: bool = True) -> nn.Module:
    lin = nn.Linear(a, b, bias=bias)
    return spectral_norm(lin) if sn else lin


def _group_log_normalise(logw: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``logw − logsumexp`` over the members of each group, so that ``exp`` sums to 1 per group.

    Shapes:
        logw, group: ``(P,)``; returns ``(P,)``.
    """
    mx = logw.new_full((n_groups,), -torch.inf).scatter_reduce(0, group, logw.detach(), "amax", include_self=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    s = logw.new_zeros(n_groups).index_add(0, group, torch.exp(logw - mx[group]))
    return logw - (mx + torch.log(s.clamp_min(1e-30)))[group]


class _Attention(nn.Module):
    """Multi-head attention of queries to a (masked) key/value set, with a residual feed-forward.

    Shapes:
        q: ``(B, M, H)`` (or ``(M, H)``, shared by the batch); kv: ``(B, N, H)``;
        mask: ``(B, N)`` bool (True on real entries) or None; returns ``(B, M, H)``.
    """

    def __init__(self, hidden: int, heads: int, *, sn: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (_linear(hidden, hidden, sn=sn) for _ in range(4))
        self.ff = _mlp([hidden, hidden, hidden], sn=sn)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, h = kv.shape
        qp = self.q(q)
        if q.dim() == 2:  # learned seeds, shared by the batch: project once
            q, qp = q[None].expand(b, -1, -1), qp[None].expand(b, -1, -1)
        m = q.shape[1]
        d = h // self.heads
        qh = qp.reshape(b, m, self.heads, d).transpose(1, 2)
        kh = self.k(kv).view(b, n, self.heads, d).transpose(1, 2)
        vh = self.v(kv).view(b, n, self.heads, d).transpose(1, 2)
        att = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=att).transpose(1, 2).reshape(b, m, h)
        out = q + self.o(out)
        return out + self.ff(out)


# ---------------------------------------------------------------------------------------------- generator
class TreeGenerator(nn.Module):
    r"""Tree-growing generator: root noise → ``branches`` splits → pruned leaves → point features.

    Args:
        config: the resolved model config (``branches``, ``features``, sizes).
        cond_features: size of the per-shower condition vector.

    Shapes:
        :meth:`grow`: cond ``(B, C)``, noise ``(B, features[0])`` → leaves ``(B · prod(branches), features[-1])``.
        :meth:`points`: cond ``(B, C)``, shower ``(B, 2L)``, n_layer ``(B, L)`` → x ``(P, 3)``,
        layer ``(P,)``, shower index ``(P,)`` with ``P = n_layer.sum()``, shower after shower and layer
        after layer.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        self.branches = tuple(cfg.branches)
        self.features = tuple(cfg.features)
        self.n_layers = cfg.n_layers
        depth = len(self.branches)
        fs = self.features
        self.cond_embed = _mlp([cond_features, cfg.cond_hidden, cfg.cond_hidden])
        c = cfg.cond_hidden
        self.glob = nn.ModuleList(_mlp([fs[i] + c, cfg.n_global, cfg.n_global]) for i in range(depth))
        self.branch = nn.ModuleList(_mlp([fs[i] + c + cfg.n_global, cfg.branch_hidden, self.branches[i] * fs[i + 1]])
                                    for i in range(depth))
        # ancestor k of level t → level t's width (one bias-free projection per pair of levels)
        self.proj = nn.ModuleList(nn.ModuleList(nn.Linear(fs[k], fs[t], bias=False) for k in range(t))
                                  for t in range(1, depth + 1))
        self.gin = nn.ModuleList(GINConv(_mlp([fs[t], cfg.gin_hidden, fs[t]]), train_eps=True)
                                 for t in range(1, depth + 1))
        self.layer_embed = nn.Embedding(max(cfg.n_layers, 1), cfg.layer_embedding)
        self.leaf_noise = cfg.leaf_noise
        self.head = _mlp([fs[-1] + cfg.leaf_noise + cfg.layer_embedding + 3 + c, cfg.head_hidden, cfg.head_hidden, 3])
        # the leaf noise also reaches the output linearly, starting as the identity: the untrained generator
        # draws points from the standardised marginals (spread over the layer) instead of one spot per shower
        self.noise_skip = nn.Linear(cfg.leaf_noise, 3, bias=False) if cfg.leaf_noise else None
        if self.noise_skip is not None:
            with torch.no_grad():
                self.noise_skip.weight.copy_(torch.eye(3, cfg.leaf_noise))

    @property
    def leaves(self) -> int:
        return _leaves(self.branches)

    def ancestor_edges(self, level: int, n_showers: int, offsets: list[int], nodes: torch.Tensor | None = None,
                       ) -> torch.Tensor:
        """Edges from every ancestor to every node of ``level`` (index arithmetic, no search).

        Nodes of a level are numbered shower after shower, children of a node consecutively, so
        the ancestor at level ``k`` of node ``j`` of level ``t`` is ``j // prod(branches[k:t])``.

        Args:
            nodes: only these nodes of the level (their numbers); default: all.

        Shapes:
            returns ``(2, N_t · t)`` int64: row 0 indexes the concatenated ancestor levels (level
            ``k`` starts at ``offsets[k]``), row 1 the nodes of level ``t`` (positions in ``nodes``).
        """
        device = self.layer_embed.weight.device
        if nodes is None:
            nodes = torch.arange(n_showers * _leaves(self.branches[:level]), device=device)
        dst = torch.arange(nodes.shape[0], device=device)
        src = [offsets[k] + nodes // _leaves(self.branches[k:level]) for k in range(level)]
        return torch.stack([torch.cat(src), dst.repeat(level)])

    def grow(self, cond: torch.Tensor, noise: torch.Tensor | None = None, keep: torch.Tensor | None = None, *,
             keep_nodes: torch.Tensor | None = None) -> torch.Tensor:
        """Grow the trees; returns the leaves, shower after shower.

        Args:
            keep: ``(B · prod(branches),)`` bool, the leaves to return (pruning). Leaves see only
                their ancestors, so pruning before the last message passing changes nothing but
                the cost. Default: all leaves.
            keep_nodes: the same as leaf numbers (int64, increasing): no host sync on CUDA.
        """
        b = cond.shape[0]
        c = self.cond_embed(cond)
        h = noise if noise is not None else torch.randn(b, self.features[0], device=cond.device, dtype=cond.dtype)
        levels = [h]
        n_nodes = 1
        depth = len(self.branches)
        for i, k in enumerate(self.branches):
            shower = torch.arange(b, device=cond.device).repeat_interleave(n_nodes)   # (N_i,) shower of each node
            g = self.glob[i](torch.cat([global_mean_pool(h, shower, size=b), c], -1))  # (B, n_global)
            child = self.branch[i](torch.cat([h, c[shower], g[shower]], -1))            # (N_i, k · F_{i+1})
            h = child.reshape(h.shape[0] * k, self.features[i + 1])                     # children consecutive
            n_nodes *= k
            t = i + 1
            nodes = None
            if t == depth and (keep is not None or keep_nodes is not None):
                nodes = keep_nodes if keep_nodes is not None else keep.nonzero().squeeze(1)
                h = h[nodes]
            src = torch.cat([self.proj[i][a](levels[a]) for a in range(t)])
            offsets = np.cumsum([0] + [x.shape[0] for x in levels[:-1]]).tolist()
            h = h + self.gin[i]((src, h), self.ancestor_edges(t, b, offsets, nodes))
            levels.append(h)
        return h

    def points(self, cond: torch.Tensor, shower: torch.Tensor, n_layer: torch.Tensor,
               noise: torch.Tensor | None = None, *, energy_norm: tuple[float, float] | None = None,
               total: int | None = None, n_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Grow, keep the first ``n`` leaves of each shower, give them their layers and map them to points.

        Args:
            energy_norm: ``(mean, std)`` of the standardised energy feature: when given, the
                energies of each (shower, layer) are normalised to shares that sum to 1.
            total, n_max: the number of points ``n_layer.sum()`` and an upper bound of the points of
                a shower, when the host knows them (training: the batch's shapes): then nothing is
                read back from the device.
        """
        b, n_l = n_layer.shape
        n = n_layer.sum(1)
        if n_max is None or n_max > self.leaves or total is None:
            most, tot = (int(v) for v in torch.stack([n.max(), n.sum()]).tolist())   # one read-back
            if most > self.leaves:
                msg = f"a shower of {most} points needs more than the tree's {self.leaves} leaves"
                raise ValueError(msg)
            total = tot if total is None else total
        shower_of = torch.arange(b, device=n.device).repeat_interleave(n, output_size=total)
        first = torch.cumsum(n, 0) - n
        leaf = shower_of * self.leaves + torch.arange(total, device=n.device) - first[shower_of]  # first n leaves
        h = self.grow(cond, noise, keep_nodes=leaf)                                              # (P, F)
        layer = torch.arange(n_l, device=n.device).repeat(b).repeat_interleave(n_layer.reshape(-1), output_size=total)
        pos = 2 * layer.to(h.dtype) / max(n_l - 1, 1) - 1
        per_layer = torch.stack([shower[shower_of, layer], shower[shower_of, n_l + layer]], -1)
        c = self.cond_embed(cond)
        z = torch.randn(h.shape[0], self.leaf_noise, device=h.device, dtype=h.dtype)
        x = self.head(torch.cat([h, z, self.layer_embed(layer), pos[:, None], per_layer, c[shower_of]], -1))
        if self.noise_skip is not None:
            x = x + self.noise_skip(z)
        if energy_norm is not None:
            mean, std = energy_norm
            loge = _group_log_normalise(x[:, 2] * std + mean, shower_of * n_l + layer, b * n_l)
            x = torch.cat([x[:, :2], ((loge - mean) / std)[:, None]], -1)
        return x, layer, shower_of


# ---------------------------------------------------------------------------------------------- critics
class _PointInput(nn.Module):
    """Per-point critic input: features, transverse position ``(r cos α, r sin α)`` (``r`` as a fraction of
    the layer's extent), layer (embedding and position), that layer's shower features, condition.

    Only the real points are embedded (the padding gets zeros); the condition enters through
    a per-shower projection added to the first layer.

    Shapes:
        x: ``(B, N, 3)``; layer, mask: ``(B, N)``; cond: ``(B, C)``; shower: ``(B, 2L)``; returns ``(B, N, H)``.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        self.n_layers = cfg.n_layers
        self.register_buffer("mean", torch.tensor(cfg.point_mean[:2], dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.point_std[:2], dtype=torch.float32), persistent=False)
        self.layer_embed = nn.Embedding(max(cfg.n_layers, 1), cfg.layer_embedding)
        self.point = _linear(5 + cfg.layer_embedding + 3, cfg.critic_hidden, sn=True)
        self.cond = _linear(cond_features, cfg.critic_hidden, sn=True, bias=False)
        self.out = _linear(cfg.critic_hidden, cfg.critic_hidden, sn=True)

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``packed``: ``(points (P, 3), layer (P,), shower (P,), position in the flattened (B, N) layout (P,))``
        of the real points (no boolean indexing: no host sync on CUDA)."""
        b, n = mask.shape
        n_l = self.n_layers
        if packed is None:
            shower_of = torch.arange(b, device=mask.device)[:, None].expand(b, n)[mask]
            lay = layer[mask]
            xm = x[mask]
            idx = mask.reshape(-1).nonzero().squeeze(1)
        else:
            xm, lay, shower_of, idx = packed
        pos = 2 * lay.to(xm.dtype) / max(n_l - 1, 1) - 1
        per_layer = torch.stack([shower[shower_of, lay], shower[shower_of, n_l + lay]], -1)
        u = torch.sigmoid(xm[:, :2] * self.std + self.mean)                              # α, r in (0, 1)
        ang = (2 * u[:, 0] - 1) * math.pi
        xy = torch.stack([u[:, 1] * torch.cos(ang), u[:, 1] * torch.sin(ang)], -1)
        h = self.point(torch.cat([xm, xy, self.layer_embed(lay), pos[:, None], per_layer], -1))
        h = self.out(F.leaky_relu(h + self.cond(cond)[shower_of], 0.2))
        return h.new_zeros(b * n, h.shape[-1]).index_copy(0, idx, h).view(b, n, -1)


class _SumCritic(nn.Module):
    """Sub-critic: per-node FFN → sum over the nodes (mean over the real ones with a mask) → FFN with the
    condition → score."""

    def __init__(self, hidden: int, cond_features: int, dropout: float) -> None:
        super().__init__()
        self.phi = _mlp([hidden, hidden, hidden], sn=True, dropout=dropout)
        self.rho = _mlp([hidden + cond_features, hidden, 1], sn=True, dropout=dropout)

    def forward(self, h: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if mask is None:
            s = self.phi(h).sum(1)
        else:
            w = mask.to(h.dtype)[..., None]
            s = (self.phi(h) * w).sum(1) / w.sum(1).clamp_min(1)
        return self.rho(torch.cat([s, cond], -1)).squeeze(-1), s


class PoolCritic(nn.Module):
    r"""Iterative-pooling critic: points → ``critic_nodes`` learned nodes, one sub-critic per level.

    With ``critic_point_level`` the cloud itself is a level too (a DeepSets sub-critic, mean over the
    points; not in the published critic).

    Shapes:
        x: ``(B, N, 3)``; layer: ``(B, N)`` int64; mask: ``(B, N)``; cond: ``(B, C)``; shower: ``(B, 2L)``;
        returns scores ``(B, levels)`` and features ``(B, levels · H)`` (for feature matching).
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        hdim = cfg.critic_hidden
        self.inp = _PointInput(cfg, cond_features)
        self.seeds = nn.ParameterList(nn.Parameter(torch.randn(m, hdim) / math.sqrt(hdim)) for m in cfg.critic_nodes)
        self.pool = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in cfg.critic_nodes)
        self.sub = nn.ModuleList(_SumCritic(hdim, cond_features, cfg.critic_dropout) for _ in cfg.critic_nodes)
        self.point_sub = _SumCritic(hdim, cond_features, cfg.critic_dropout) if cfg.critic_point_level else None

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x, layer, mask, cond, shower, packed)
        m: torch.Tensor | None = mask
        scores, feats = [], []
        if self.point_sub is not None:
            s, f = self.point_sub(h, cond, mask)
            scores.append(s)
            feats.append(f)
        for seeds, pool, sub in zip(self.seeds, self.pool, self.sub):
            h = pool(seeds, h, m)
            m = None
            s, f = sub(h, cond)
            scores.append(s)
            feats.append(f)
        return torch.stack(scores, -1), torch.cat(feats, -1)


class MeanFieldCritic(nn.Module):
    r"""MDMA-style mean-field critic: ``k`` global tokens read the points, the points read the tokens (``O(N k)``).

    The tokens start as learned vectors plus the mean of the embedded points; every block has
    tokens ← points attention, a condition-gated (GLU) update of the tokens, points ← tokens
    attention. The score and the feature-matching features come from the tokens. Unlike MDMA
    (weight norm, WGAN-GP) it is spectral-normalised and trained with the same hinge loss as
    :class:`PoolCritic`, so the two critics are interchangeable.

    Shapes:
        as :class:`PoolCritic`; scores ``(B, 1)``, features ``(B, H)``.
    """

    def __init__(self, config: DeepTreeConfig, cond_features: int) -> None:
        super().__init__()
        cfg = config
        hdim = cfg.critic_hidden
        self.inp = _PointInput(cfg, cond_features)
        self.tokens = nn.Parameter(torch.randn(cfg.meanfield_tokens, hdim) / math.sqrt(hdim))
        self.read = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in range(cfg.meanfield_blocks))
        self.gate = nn.ModuleList(_linear(hdim + cond_features, 2 * hdim, sn=True) for _ in range(cfg.meanfield_blocks))
        self.write = nn.ModuleList(_Attention(hdim, cfg.critic_heads) for _ in range(cfg.meanfield_blocks))
        self.out = _mlp([hdim + cond_features, hdim, 1], sn=True, dropout=cfg.critic_dropout)

    def forward(self, x: torch.Tensor, layer: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor,
                shower: torch.Tensor, packed: tuple[torch.Tensor, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.inp(x, layer, mask, cond, shower, packed)
        w = mask.to(h.dtype)[..., None]
        mean = (h * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        t = self.tokens[None] + mean                                                   # (B, k, H)
        k = t.shape[1]
        for read, gate, write in zip(self.read, self.gate, self.write):
            t = read(t, h, mask)
            t = t + F.glu(gate(torch.cat([t, cond[:, None, :].expand(-1, k, -1)], -1)), -1)
            h = write(h, t)
        f = t.mean(1)
        return self.out(torch.cat([f, cond], -1)), f


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
        d_real, _ = self.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, self._real(batch))
        d_fake, _ = self.critic(*fake[:3], cond, batch.shower, *fake[3:])
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()

    def generator_loss(self, batch: Batch, fake: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                       cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hinge generator loss + ``feature_matching`` × feature matching; returns ``(total, feature matching)``."""
        d_fake, f_fake = self.critic(*fake[:3], cond, batch.shower, *fake[3:])
        with torch.no_grad():
            _, f_real = self.critic(batch.x, batch.layer, batch.mask, cond, batch.shower, self._real(batch))
        fm = (f_real.mean(0) - f_fake.mean(0)).pow(2).mean()
        return -d_fake.mean() + self.config.feature_matching * fm, fm

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
        """
        for _ in range(self.config.shower_steps):
            ls = self.shower_model.loss(batch.cond, batch.shower)
            backward(ls, "shower")
        cond = self.condition(batch.cond, batch.n, batch.shower)
        n_layer = self.layer_counts(batch)
        for _ in range(self.config.critic_steps):
            with torch.no_grad():
                fake, packed = self._fake(batch, cond, n_layer)
            with parametrize.cached():   # the spectral-normalised weights once for both passes
                ld = self.critic_loss(batch, (*fake, packed), cond)
            backward(ld, "critic")
        self.critic.requires_grad_(False)
        try:
            fake, packed = self._fake(batch, cond, n_layer)
            with parametrize.cached():
                lg, fm = self.generator_loss(batch, (*fake, packed), cond)
            backward(lg, "generator")
        finally:
            self.critic.requires_grad_(True)
        out = {"shower": ls, "critic": ld, "generator": lg, "feature_matching": fm}
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
        from .cells import GeneratedShowers

        n, layer, alpha, r, energy, shower_of = self.sample_points(e_inc, prep)
        if self.config.alpha == "free":
            return GeneratedShowers(counts=n, layer=layer, r=r, alpha=None, E=energy)
        rot = torch.rand(n.shape[0], dtype=torch.float64, device=n.device) * (2 * math.pi)
        alpha = torch.remainder(alpha + rot[shower_of] + math.pi, 2 * math.pi) - math.pi
        return GeneratedShowers(counts=n, layer=layer, r=r, alpha=alpha, E=energy)
