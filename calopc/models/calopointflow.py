r"""CaloPointFlow: showers as point clouds from normalising flows.

Three flows and one set encoder:

1. a **shower flow** ``p(s | c)`` over shower-level features given ``c = log E_inc``
   (:class:`~calopc.models.shower.ShowerModel`): ``s = (log n − ½ log E_inc, log ΣE/E_inc)``
   in variant ``"I"``; the number of points and the energy of every layer (``2 L`` features)
   in variant ``"II"`` (the default);
2. a **DeepSets encoder** ``q(z | X, c, s)`` of the whole point cloud into a latent vector;
3. a **latent flow** ``p(z | c, s)``, the learnt prior of that latent;
4. a **point flow** of coupling rational-quadratic spline transforms. Variant I:
   ``p(z, α, r, E | latent, c, s)``. Variant II: points know their layer,
   ``p(α, r, log E/E_l | latent, c, layer, n_l, E_l)``; after sampling the energies of each
   layer are normalised to the sampled layer energy, so layer energies and hit counts come
   from the shower flow exactly.

CaloPointFlow II as published adds three things, each a switch of :class:`CaloPointFlowConfig`
(all on by default; run directories written before they existed load with them off):

* ``dequantisation="cdf"``: integer coordinates are dequantised through the empirical CDF of
  their bins and a probit, so each is marginally standard normal (see :mod:`.preprocess`);
* ``set_summary=True``: the point flow is a **DeepSetFlow**: the conditioner of every
  coupling also gets a summary of the untransformed half of *all* points of the shower
  (per-point MLP → mean per shower and per (shower, layer) → MLP). The Jacobian stays
  triangular over the whole set and the inverse is exact: at each inverse step the
  untransformed half is known;
* ``alpha="free"``: points carry ``(r, E)`` only; α is not modelled and is drawn without
  replacement per ``(layer, r)`` ring when the points are placed in cells
  (:func:`calopc.models.cells.place`, policy ``"alpha-free"``), so that at most one point
  falls in a cell unless a ring gets more points than it has α bins. Beyond the published
  model, ``overflow="move"`` (the default) then passes the least energetic points of an overfull
  ring on to the next ring with room (:func:`fit_rings`), so no cell gets two points;
  ``overflow="merge"`` keeps the published behaviour (the placement adds their energies).

Training maximises ``log p(s|c) + E_q[Σ_i log p(x_i|z,c,s) + log p(z|c,s) − log q(z|X,c,s)]``
(an ELBO); the point part is divided by the number of points.

References:
    | CaloPointFlow (Schnake, Krücker, Borras, 2023) | https://arxiv.org/abs/2304.01266
    | CaloPointFlow II (Schnake, Krücker, Borras, 2024) | https://arxiv.org/abs/2403.15782
    | Neural spline flows (Durkan et al., 2019) | https://arxiv.org/abs/1906.04032
"""

from __future__ import annotations

__all__ = ["CaloPointFlow", "CaloPointFlowConfig", "DeepSetFlow", "fit_rings"]

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import zuko
from torch import Tensor, nn

from ..geometry import Geometry
from ..sparse.functional import segment_max
from .cells import DEFAULT_OVERSAMPLE, GeneratedShowers, cell_tables, locate
from .data import Batch, pack
from .preprocess import Preprocessor
from .shower import ShowerModel, ShowerModelConfig, _as_tensor, _prep_call, torch_preprocessor


def _scale_groups(w: np.ndarray, group: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rescale point weights ``w`` so that the points of group ``g`` sum to ``target[g]``.

    Shapes:
        w, group: ``(P,)`` (``group`` in ``[0, G)``); target: ``(G,)``; returns ``(P,)``.
    """
    tot = np.bincount(group, weights=w, minlength=target.shape[0])
    return w * (target / np.maximum(tot, 1e-300))[group]


#: what a saved config without the CaloPointFlow II switches meant (run directories written before them)
_BEFORE_SWITCHES = {"alpha": "model", "set_summary": False, "dequantisation": "uniform", "overflow": "merge"}


def _as_bool(v: object, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    msg = f"CaloPointFlow config {key!r} must be true or false, got {v!r}"
    raise ValueError(msg)


def _r_quadrature(prep: Preprocessor, nodes: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre nodes of every r-bin of every layer in the coordinate the point flow models.

    The nodes lie at Gauss–Legendre points of the bin in its uniformised coordinate ``u`` (CDF
    dequantisation: the training points' CDF of the layer's r-bins, where each bin is an interval
    ``[cdf_k, cdf_{k+1}]``; uniform dequantisation: ``r`` scaled to the layer's extent), mapped to the
    standardised feature ``y = (Φ⁻¹(u) − m) / s`` (or ``(logit u − m) / s``). The weights include the
    Jacobian ``dy/du``, so ``Σ_i w_i f(y_i) ≈ ∫_bin f(y) dy``. Cached on ``prep``.

    Returns:
        ``(y, w)``: float32 node values and float64 weights, ``(L, R, nodes)`` (``R`` the most r-bins
        of a layer; the bins a layer does not have get weight 0).
    """
    key = f"_r_quadrature:{nodes}:{device}"
    hit = prep.__dict__.get(key)
    if hit is not None:
        return hit
    geo = prep.geometry
    n_r = np.asarray(geo.n_r, dtype=np.int64)
    t, gw = np.polynomial.legendre.leggauss(nodes)
    m, sd = float(np.asarray(prep.point_mean)[1]), float(np.asarray(prep.point_std)[1])   # variant II: (α, r, E)
    y = np.zeros((geo.n_layers, int(n_r.max()), nodes))
    w = np.zeros_like(y)
    for i, edges in enumerate(geo.r_edges):
        if prep.dequantisation == "cdf":
            c = np.concatenate([[0.0], np.cumsum(np.asarray(prep.pdf_r[i], dtype=np.float64))])
            lo_hi = c / c[-1]
        else:
            e = np.asarray(edges, dtype=np.float64)
            lo_hi = (e - e[0]) / (e[-1] - e[0])
        lo, hi = lo_hi[:-1, None], lo_hi[1:, None]
        u = lo + (hi - lo) * (1 + t) / 2
        with np.errstate(divide="ignore", invalid="ignore"):
            if prep.dequantisation == "cdf":
                v = torch.special.ndtri(torch.from_numpy(u)).numpy()
                dv = np.sqrt(2 * np.pi) * np.exp(0.5 * v * v)                    # dΦ⁻¹/du = 1 / φ(Φ⁻¹(u))
            else:
                v = np.log(u) - np.log1p(-u)
                dv = 1 / (u * (1 - u))
        ok = (hi > lo) & np.isfinite(v)
        y[i, :len(edges) - 1] = np.where(ok, (v - m) / sd, 0.0)
        w[i, :len(edges) - 1] = np.where(ok, (hi - lo) / 2 * gw * dv / sd, 0.0)
    out = (torch.as_tensor(y, dtype=torch.float32, device=device), torch.as_tensor(w, device=device))
    prep.__dict__[key] = out
    return out


def fit_rings(geometry: Geometry, group: Tensor, n_groups: int, layer: Tensor, r: Tensor,
              energy: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Move points so that no ``(layer, r-bin)`` ring of a group holds more points than it has α bins.

    Ring by ring from the inside out, the points a full ring cannot hold go to the next ring; what
    the last ring cannot hold goes back inwards to the nearest rings with room. Without ``energy``
    the points keep their order in ``r`` (a full ring passes on its outermost points); with it, a
    full ring keeps its most energetic points and passes on the least energetic ones, so the
    energy of a dense core stays in the core (moving whichever points lie outermost shifts a
    random share of the core's energy outwards: on the same trained CaloPointFlow II, synthetic
    ds2, the separation power of EC_r fell from 0.051 to 0.036). Points that change ring get
    a uniform radius inside their new ring. A loop over the r-bins only (vectorised over groups).

    Args:
        geometry: the binning.
        group: group of each point (``shower * L + layer``), ``n_groups`` in all; at most as many
            points per group as its layer has cells.
        layer, r: layer and radius (mm) of each point.
        energy: the energy of each point (any positive weight); None: keep the order in ``r``.

    Returns:
        ``(r, moved)``: the new radii ``(P,)`` and the number of points that changed ring (0-d).
    """
    device = r.device
    p = r.shape[0]
    if p == 0:
        return r, torch.zeros((), dtype=torch.int64, device=device)
    t = cell_tables(geometry, device)
    k_max = max(geometry.n_r)                                                        # from the host: no sync
    _, rb, _ = locate(geometry, layer, r)
    rb = torch.minimum(rb.clamp(min=0), t["n_r"][layer] - 1)                         # outside → nearest ring
    g_layer = torch.zeros(n_groups, dtype=torch.int64, device=device).scatter_(0, group, layer)
    cap = torch.where(torch.arange(k_max, device=device)[None, :] < t["n_r"][g_layer][:, None],
                      t["n_alpha"][g_layer][:, None], torch.zeros((), dtype=torch.int64, device=device))  # (G, K)
    key = group * k_max + rb                      # index_add, not bincount: no read-back of the largest key
    count = torch.zeros(n_groups * k_max, dtype=torch.int64, device=device).index_add_(
        0, key, torch.ones_like(key)).reshape(n_groups, k_max)
    new = torch.empty_like(count)
    carry = torch.zeros(n_groups, dtype=torch.int64, device=device)
    for k in range(k_max):                        # outwards: a full ring passes its outermost points on
        tot = count[:, k] + carry
        new[:, k] = torch.minimum(tot, cap[:, k])
        carry = tot - new[:, k]
    for k in range(k_max - 1, -1, -1):            # what is left goes back inwards where there is room
        add = torch.minimum(cap[:, k] - new[:, k], carry)
        new[:, k] += add
        carry = carry - add
    # the i-th point of a group in (ring, r) or (ring, −energy) order goes to the ring whose cumulative
    # count first exceeds i
    if energy is None:
        o1 = torch.argsort(r, stable=True)
    else:
        o1 = torch.argsort(-energy, stable=True)
        o1 = o1[torch.argsort(rb[o1], stable=True)]                                  # by ring, then energy down
    order = o1[torch.argsort(group[o1], stable=True)]                                # by group
    g_sorted = group[order]
    first = torch.searchsorted(g_sorted, torch.arange(n_groups, device=device))
    rank = torch.arange(p, device=device) - first[g_sorted]
    cum = torch.cumsum(new, 1)                                                       # (G, K)
    stride = p + 1
    flat = (cum + torch.arange(n_groups, device=device)[:, None] * stride).reshape(-1)
    ring = torch.searchsorted(flat, rank + g_sorted * stride, right=True) - g_sorted * k_max
    ring = torch.minimum(ring, t["n_r"][layer[order]] - 1)
    changed = ring != rb[order]
    lo = t["edges"][layer[order], ring]
    hi = t["edges"][layer[order], ring + 1]
    r_new = torch.where(changed, lo + torch.rand(p, dtype=torch.float64, device=device) * (hi - lo),
                        r[order].to(torch.float64))
    out = torch.empty_like(r_new)
    out[order] = r_new
    return out.to(r.dtype), changed.sum()


#: named configurations (``--set model.preset=NAME``); the keys a user gives override the preset's
PRESETS: dict[str, dict] = {
    # calopc's variant: the per-layer shower model shared with CaloClouds and DeepTree, points per layer
    "calopc": {},
    # CaloPointFlow II as published (simonschnake/CaloPointFlow configs/d2_II.yaml): a 2-dim shower flow
    # over (log n − ½ log E_inc, log ΣE/E_inc) with 12 transforms of 128×3 and 12 bins; points (z, r, E/ΣE),
    # z, α and r CDF-dequantised, α free at placement with energies of an overfull ring added (merge);
    # latent 128; DeepSetFlow with 12 couplings of 128×3 and 8 bins; per-shower ELBO weighting. The
    # encoder and latent-flow widths are reduced (640; 256×3) to the 14.2 M parameters of the challenge entry.
    "published": {"variant": "I", "alpha": "free", "dequantisation": "cdf", "set_summary": True, "overflow": "merge",
                  "latent": 128, "encoder_hidden": 640, "point_transforms": 12, "point_hidden": (128, 128, 128),
                  "point_bins": 8, "set_hidden": 256, "set_features": 128, "latent_transforms": 8,
                  "latent_hidden": (256, 256, 256), "shower_transforms": 12, "shower_hidden": (128, 128, 128),
                  "shower_bins": 12, "loss_weighting": "shower"},
}


@dataclass(frozen=True)
class CaloPointFlowConfig:
    """Hyper-parameters of :class:`CaloPointFlow` (defaults: calopc's per-layer CaloPointFlow II; the
    ``published`` preset is CaloPointFlow II as published)."""

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
    shower_bins: int = 8                          # spline bins of the shower flow
    shower_passes: int | None = None              # shower flow: None autoregressive, 2 coupling (faster sampling)
    kl_weight: float = 1.0                        # weight of the latent (prior − entropy) term
    points_per_shower_loss: int = 0               # random points per shower in the point likelihood (0: all)
    thin_encoder: bool = True                     # with points_per_shower_loss: the encoder reads those points only
    alpha: str = "free"                           # II: "free" (α drawn per ring at placement) or "model"
    set_summary: bool = True                      # DeepSetFlow: couplings see a summary of the shower's points
    set_hidden: int = 64                          # width of the per-point set-summary network
    set_features: int = 32                        # size of the set summary given to each conditioner
    dequantisation: str = "cdf"                   # II: "cdf" (empirical CDF + probit) or "uniform" (+ logit)
    overflow: str = "move"                        # α free: a ring's points beyond its α bins "move" or "merge"
    loss_weighting: str = "points"                # "points": ELBO per point; "shower": per-shower means (published)
    preset: str = "calopc"                        # "calopc" (per-layer variant) or "published" (see PRESETS)

    @classmethod
    def from_dict(cls, d: dict) -> CaloPointFlowConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            msg = f"unknown CaloPointFlow config keys {sorted(unknown)}; valid keys: {', '.join(sorted(known))}"
            raise ValueError(msg)
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        preset = d.get("preset", "calopc")
        if preset not in PRESETS:
            msg = f"CaloPointFlow preset must be one of {', '.join(PRESETS)}, got {preset!r}"
            raise ValueError(msg)
        d = {**PRESETS[preset], **d}                                  # the preset, then what is given
        d.setdefault("variant", "I" if "n_layers" not in d and "point_features" in d else "II")  # runs before variants
        if d["variant"] not in ("I", "II"):
            msg = f"CaloPointFlow variant must be 'I' or 'II', got {d['variant']!r}"
            raise ValueError(msg)
        if "n_layers" in d or d["variant"] == "I":
            # a saved config (or variant I): a missing switch means what the model did before the switch existed
            for k, v in _BEFORE_SWITCHES.items():
                d.setdefault(k, v)
        if "n_layers" in d or "point_features" in d:  # a saved run without the key: its encoder read every point
            d.setdefault("thin_encoder", False)
        for key in ("set_summary", "thin_encoder"):
            if key in d:
                d[key] = _as_bool(d[key], key)
        if d.get("alpha", "free") not in ("free", "model"):
            msg = f"CaloPointFlow config 'alpha' must be 'free' or 'model', got {d['alpha']!r}"
            raise ValueError(msg)
        if d.get("overflow", "move") not in ("move", "merge"):
            msg = f"CaloPointFlow config 'overflow' must be 'move' or 'merge', got {d['overflow']!r}"
            raise ValueError(msg)
        if d.get("dequantisation", "cdf") not in ("cdf", "uniform"):
            msg = f"CaloPointFlow config 'dequantisation' must be 'cdf' or 'uniform', got {d['dequantisation']!r}"
            raise ValueError(msg)
        if d.get("loss_weighting", "points") not in ("points", "shower"):
            msg = f"CaloPointFlow config 'loss_weighting' must be 'points' or 'shower', got {d['loss_weighting']!r}"
            raise ValueError(msg)
        if "n_layers" not in d and d.get("points_per_shower_loss", 0) and _as_bool(d.get("set_summary", True),
                                                                                  "set_summary"):
            msg = (f"CaloPointFlow points_per_shower_loss={d['points_per_shower_loss']} with set_summary=true: the set "
                   "summaries of a thinned shower are not those the model samples with (a biased loss); use "
                   "points_per_shower_loss=0 or set_summary=false")
            raise ValueError(msg)
        return cls(**d)

    def preprocessing(self) -> dict:
        """Options of :meth:`Preprocessor.fit` this model needs."""
        if self.dequantisation == "uniform":
            return {"variant": self.variant}
        if self.variant == "I":  # the published points: (z, r, E/ΣE)
            return {"variant": "I", "dequantisation": self.dequantisation, "energy_ref": "sum"}
        return {"variant": self.variant, "dequantisation": self.dequantisation}

    def with_data(self, prep: Preprocessor) -> CaloPointFlowConfig:
        """The config with the sizes that depend on the data (feature counts, layers)."""
        return replace(self, n_layers=prep.geometry.n_layers, point_features=prep.n_point_features,
                       shower_features=prep.n_shower_features)


def _mlp(sizes: list[int], zero_last: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    net = nn.Sequential(*layers[:-1])
    if zero_last:  # the coupling starts close to the identity
        with torch.no_grad():
            net[-1].weight.mul_(1e-2)
            net[-1].bias.zero_()
    return net


@dataclass
class PointSets:
    """Which set (shower) and which group inside it (layer) each flat point belongs to.

    Shapes:
        shower: ``(P,)`` in ``[0, B)``; group: ``(P,)`` in ``[0, G)``; group_shower: ``(G,)``
        the shower of each group; inv_shower ``(B, 1)``, inv_group ``(G, 1)``: 1 / points.
    """

    shower: Tensor
    group: Tensor
    group_shower: Tensor
    inv_shower: Tensor
    inv_group: Tensor

    @classmethod
    def build(cls, shower: Tensor, n_showers: int, group: Tensor | None = None, groups_per_shower: int = 1,
              dtype: torch.dtype = torch.float32) -> PointSets:
        """``group`` defaults to the shower; otherwise ``group = shower * groups_per_shower + g``."""
        if group is None:
            group, groups_per_shower = shower, 1
        n_groups = n_showers * groups_per_shower
        dev = shower.device

        def inv(idx: Tensor, n: int) -> Tensor:
            c = torch.zeros(n, dtype=dtype, device=dev).index_add_(0, idx, torch.ones_like(idx, dtype=dtype))
            return (1 / c.clamp(min=1))[:, None]

        gs = torch.div(torch.arange(n_groups, device=dev), groups_per_shower, rounding_mode="floor")
        return cls(shower, group, gs, inv(shower, n_showers), inv(group, n_groups))


class SetCoupling(nn.Module):
    r"""One coupling of a :class:`DeepSetFlow`: a rational-quadratic spline of the features
    ``transformed`` whose parameters depend on the other features of the point, its context,
    and a summary of the other features of all points of its shower.

    Shapes:
        x: ``(P, F)``; context: ``(P, C)``; returns ``(P, F)`` and ``ladj (P,)``.
    """

    #: the spline class; :func:`calopc.models.flows.use_fast_splines` swaps it (one place for every flow)
    univariate: type = zuko.transforms.MonotonicRQSTransform

    def __init__(self, features: int, context: int, transformed: list[int], hidden: tuple[int, ...], bins: int,
                 set_hidden: int, set_features: int, bound: float = 5.0) -> None:
        super().__init__()
        fixed = [i for i in range(features) if i not in transformed]
        self.register_buffer("idx_t", torch.tensor(transformed, dtype=torch.long), persistent=False)
        self.register_buffer("idx_f", torch.tensor(fixed, dtype=torch.long), persistent=False)
        self.bins, self.bound, self.set_features = bins, bound, set_features
        nf, nt = len(fixed), len(transformed)
        if set_features:
            self.phi = _mlp([nf + context, set_hidden, set_hidden])
            self.rho = _mlp([2 * set_hidden, set_hidden, set_features])
        self.net = _mlp([nf + context + set_features, *hidden, nt * (3 * bins - 1)], zero_last=True)

    def _spline(self, x_fixed: Tensor, context: Tensor, sets: PointSets) -> zuko.transforms.MonotonicRQSTransform:
        h = [x_fixed, context]
        if self.set_features:
            e = self.phi(torch.cat([x_fixed, context], -1))                                     # (P, H)
            by_shower = torch.zeros(sets.inv_shower.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
            by_shower = by_shower.index_add_(0, sets.shower, e) * sets.inv_shower                # (B, H) means
            by_group = torch.zeros(sets.inv_group.shape[0], e.shape[1], dtype=e.dtype, device=e.device)
            by_group = by_group.index_add_(0, sets.group, e) * sets.inv_group                    # (G, H) means
            summary = self.rho(torch.cat([by_group, by_shower[sets.group_shower]], -1))        # (G, S)
            h.append(summary[sets.group])
        p = self.net(torch.cat(h, -1)).unflatten(-1, (self.idx_t.shape[0], 3 * self.bins - 1))
        w, hh, d = p.split((self.bins, self.bins, self.bins - 1), dim=-1)
        return self.univariate(w, hh, d, bound=self.bound)

    def forward(self, x: Tensor, context: Tensor, sets: PointSets) -> tuple[Tensor, Tensor]:
        t = self._spline(x[:, self.idx_f], context, sets)
        y_t, ladj = t.call_and_ladj(x[:, self.idx_t])
        y = x.clone()
        y[:, self.idx_t] = y_t
        return y, ladj.sum(-1)

    def inverse(self, y: Tensor, context: Tensor, sets: PointSets) -> Tensor:
        t = self._spline(y[:, self.idx_f], context, sets)   # the untransformed half is the same in x and y
        x = y.clone()
        x[:, self.idx_t] = t.inv(y[:, self.idx_t])
        return x


class DeepSetFlow(nn.Module):
    r"""Coupling spline flow over the points of a set of showers (DeepSetFlow, CaloPointFlow II).

    Points are flat with the index of their shower (and of their group, e.g. the layer, in the
    shower); there is no loop over showers. With ``set_features = 0`` it is a plain coupling flow
    (points independent given their context).

    Args:
        features: point features ``F`` (at least 2).
        context: per-point context ``C``.
        transforms, hidden, bins: couplings, hidden layers of each conditioner, spline bins.
        set_hidden, set_features: width of the per-point summary network and size of the summary.

    Shapes:
        x: ``(P, F)``; context: ``(P, C)``; :meth:`log_prob` returns ``(P,)``: the point's share
        of the log-density of the whole set (they sum to it).
    """

    def __init__(self, features: int, context: int, *, transforms: int = 6, hidden: tuple[int, ...] = (128, 128),
                 bins: int = 8, set_hidden: int = 64, set_features: int = 32) -> None:
        super().__init__()
        if features < 2:
            msg = f"DeepSetFlow needs at least 2 point features, got {features}"
            raise ValueError(msg)
        self.features = features
        halves = [[i for i in range(features) if i % 2 == k % 2] for k in range(2)]
        self.couplings = nn.ModuleList(
            SetCoupling(features, context, halves[k % 2], tuple(hidden), bins, set_hidden, set_features)
            for k in range(transforms))

    def log_prob(self, x: Tensor, context: Tensor, sets: PointSets) -> Tensor:
        ladj = x.new_zeros(x.shape[0])
        for c in self.couplings:
            x, l = c(x, context, sets)
            ladj = ladj + l
        return -0.5 * (x.square().sum(-1) + self.features * math.log(2 * math.pi)) + ladj

    @torch.no_grad()
    def sample(self, context: Tensor, sets: PointSets) -> Tensor:
        x = torch.randn(context.shape[0], self.features, dtype=context.dtype, device=context.device)
        for c in reversed(self.couplings):
            x = c.inverse(x, context, sets)
        return x


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor,
                packed: tuple[Tensor, Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``packed``: the real points ``(P, F)`` and their shower ``(P,)`` (then ``x`` is not read; no host sync)."""
        b = mask.shape[0]
        if packed is None:
            idx, pts = pack(mask, x)                  # only the real points and their shower
        else:
            pts, idx = packed
        h = self.phi(torch.cat([pts, context[idx]], dim=-1))                        # only real points, no padding
        n = mask.sum(1).clamp(min=1).to(h.dtype)[:, None]
        mean = h.new_zeros(b, h.shape[1]).index_add_(0, idx, h) / n
        mx = segment_max(h, idx, b)
        mu, log_var = self.rho(torch.cat([mean, mx, context], dim=-1)).chunk(2, dim=-1)
        return mu, log_var.clamp(-12, 6)


class CaloPointFlow(nn.Module):
    r"""Conditional flow model of point-cloud showers (CaloPointFlow I/II).

    Args:
        config: hyper-parameters.

    Shapes:
        batch.x: ``(B, N_max, F)``; batch.mask: ``(B, N_max)``; batch.shower: ``(B, S)``;
        batch.cond: ``(B, 1)``. With ``alpha="free"`` the point flow models the columns
        ``(r, E)`` of ``batch.x`` only (``flow_features = 2``).

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
        self.alpha_free = cfg.alpha == "free"
        # columns of batch.x the point flow models: α free drops the α column (II: column 0; I: column 1)
        a_col = 0 if self.layered else 1
        self.point_dims = [i for i in range(cfg.point_features) if not (self.alpha_free and i == a_col)]
        self.flow_features = len(self.point_dims)
        ctx = cfg.cond_features + cfg.shower_features
        # variant II: each point also sees its layer (position in [-1, 1]) and that layer's (n_l, E_l) features
        point_ctx = cfg.latent + (cfg.cond_features + 3 if self.layered else ctx)
        self.shower_flow = ShowerModel(cfg.n_layers, cfg.cond_features,
                                       ShowerModelConfig(cfg.shower_transforms, cfg.shower_hidden, cfg.shower_bins,
                                                         cfg.shower_passes),
                                       features=cfg.shower_features)
        self.encoder = DeepSetsEncoder(self.flow_features + self.layered, ctx, cfg.latent, cfg.encoder_hidden)
        self.latent_flow = zuko.flows.NSF(cfg.latent, ctx, transforms=cfg.latent_transforms,
                                          hidden_features=cfg.latent_hidden)
        if cfg.set_summary:
            self.point_flow = DeepSetFlow(self.flow_features, point_ctx, transforms=cfg.point_transforms,
                                          hidden=cfg.point_hidden, bins=cfg.point_bins, set_hidden=cfg.set_hidden,
                                          set_features=cfg.set_features)
        else:  # points independent given the latent (CaloPointFlow I, and II before the set summary)
            self.point_flow = zuko.flows.NSF(self.flow_features, point_ctx, transforms=cfg.point_transforms,
                                             bins=cfg.point_bins, hidden_features=cfg.point_hidden, passes=2)

    def _layer_pos(self, layer: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (2 * layer.to(dtype) / max(self.config.n_layers - 1, 1) - 1)[..., None]

    def _flat_context(self, z: Tensor, cond: Tensor, shower: Tensor, shower_of: Tensor, lay: Tensor) -> Tensor:
        """Context of flat points of showers ``shower_of`` in layers ``lay``, ``(P, C)``."""
        if not self.layered:
            return torch.cat([z, cond, shower], dim=-1)[shower_of]
        n_l = self.config.n_layers
        per_layer = torch.stack([shower[shower_of, lay], shower[shower_of, n_l + lay]], dim=-1)
        return torch.cat([z[shower_of], cond[shower_of], self._layer_pos(lay, z.dtype), per_layer], dim=-1)

    def _sets(self, shower_of: Tensor, lay: Tensor, b: int, dtype: torch.dtype) -> PointSets | None:
        if not self.config.set_summary:
            return None
        if self.layered:
            n_l = self.config.n_layers
            return PointSets.build(shower_of, b, shower_of * n_l + lay, n_l, dtype=dtype)
        return PointSets.build(shower_of, b, dtype=dtype)

    def _point_log_prob(self, x: Tensor, ctx: Tensor, sets: PointSets | None) -> Tensor:
        if sets is None:
            return self.point_flow(ctx).log_prob(x)
        return self.point_flow.log_prob(x, ctx, sets)

    def _point_sample(self, ctx: Tensor, sets: PointSets | None) -> Tensor:
        if ctx.shape[0] == 0:
            return ctx.new_zeros(0, self.flow_features)
        if sets is None:
            return self.point_flow(ctx).sample()
        return self.point_flow.sample(ctx, sets)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Same as :meth:`loss` (so that DistributedDataParallel sees a forward call)."""
        return self.loss(batch)

    def loss_terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The loss and its parts: ``shower`` (NLL per shower feature), ``points`` (NLL per point),
        ``kl`` (latent prior − entropy per point)."""
        cfg = self.config
        cond, s = batch.cond, batch.shower
        ctx = torch.cat([cond, s], dim=-1)
        shower_nll = self.shower_flow.loss(cond, s)                                        # per feature
        x_all = batch.x[..., self.point_dims]
        k = cfg.points_per_shower_loss
        thin = bool(k) and batch.mask.shape[1] > k
        packed = batch.points is not None and batch.point_shower is not None and batch.point_layer is not None
        keep = weight = None
        if thin and cfg.thin_encoder:  # the loss's points, drawn first: the encoder reads them only
            keep, weight = self._thin(batch.mask, k, batch.x.dtype)
            b, shower_of, lay, xs = self._flat_points(keep, batch.layer, x_all)
            enc_p = torch.cat([xs, self._layer_pos(lay, xs.dtype)], -1) if self.layered else xs
            mu, log_var = self.encoder(batch.x, keep, ctx, packed=(enc_p, shower_of))
        elif packed:  # the collate's packed layout: no boolean indexing (no host sync on CUDA)
            xp = batch.points[:, self.point_dims]
            enc_p = torch.cat([xp, self._layer_pos(batch.point_layer, xp.dtype)], -1) if self.layered else xp
            mu, log_var = self.encoder(batch.x, batch.mask, ctx, packed=(enc_p, batch.point_shower))
        else:
            enc_x = torch.cat([x_all, self._layer_pos(batch.layer, batch.x.dtype)], -1) if self.layered else x_all
            mu, log_var = self.encoder(enc_x, batch.mask, ctx)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        prior = -self.latent_flow(ctx).log_prob(z)                                         # (B,)
        entropy = 0.5 * (log_var + 1 + math.log(2 * math.pi)).sum(-1)                        # (B,)
        if packed and not thin:
            b = batch.mask.shape[0]
            shower_of, lay, xs = batch.point_shower, batch.point_layer, xp
        elif keep is None:  # (with the thinned encoder, shower_of, lay and xs are the points it read)
            mask = batch.mask
            if thin:
                keep, weight = self._thin(mask, k, mu.dtype)
                mask = keep
            b, shower_of, lay, xs = self._flat_points(mask, batch.layer, x_all)
        pc = self._flat_context(z, cond, s, shower_of, lay)
        nll = -self._point_log_prob(xs, pc, self._sets(shower_of, lay, b, pc.dtype))   # (P,)
        if weight is not None:
            nll = nll * weight
        n_points = batch.mask.sum().clamp(min=1)
        points = nll.sum() / n_points
        kl = (prior - entropy).sum() / n_points
        if cfg.loss_weighting == "shower":  # published: per-shower mean NLL / point dims, latent terms / latent dims
            w = torch.ones_like(nll) if weight is None else weight
            per = torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add_(0, shower_of, nll)
            cnt = torch.zeros(b, dtype=nll.dtype, device=nll.device).index_add_(0, shower_of, w)
            points = (per / cnt.clamp(min=1e-12)).mean() / self.flow_features
            kl = (prior - entropy).mean() / cfg.latent
        return {"loss": shower_nll + points + cfg.kl_weight * kl, "shower": shower_nll, "points": points, "kl": kl}

    @staticmethod
    def _flat_points(mask: Tensor, layer: Tensor, x: Tensor) -> tuple[int, Tensor, Tensor, Tensor]:
        """The points of a padded batch where ``mask`` is set, flat: the number of showers, and each point's
        shower, layer and features. Shapes: mask, layer ``(B, N)``; x ``(B, N, F)``; returns ``B``, ``(P,)`` twice
        and ``(P, F)``."""
        return (mask.shape[0], *pack(mask, layer, x))

    @staticmethod
    def _thin(mask: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """A random subset of ``k`` real points per shower and the weight ``n / k`` of each kept point (which keeps
        the point likelihood unbiased). Shapes: mask ``(B, N)``; returns ``(B, N)`` bool and ``(P_kept,)``."""
        score = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)
        keep = torch.zeros_like(mask)
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        keep &= mask
        n = mask.sum(1)
        return keep, (n / keep.sum(1).clamp(min=1)).to(dtype)[:, None].expand_as(mask)[keep]

    def loss(self, batch: Batch) -> torch.Tensor:
        """Scalar training loss of a batch (lower is better)."""
        return self.loss_terms(batch)["loss"]

    @torch.no_grad()
    def sample_shower(self, cond: torch.Tensor) -> torch.Tensor:
        """Shower-level features given the condition. Shapes: cond ``(B, 1)`` → ``(B, S)``."""
        return self.shower_flow.sample(cond)

    @torch.no_grad()
    def sample_points(self, cond: Tensor, shower: Tensor, shower_of: Tensor, lay: Tensor) -> Tensor:
        """Flat points of ``B`` showers whose shower features are given.

        Args:
            cond: standardised ``log E_inc``.
            shower: the standardised shower features.
            shower_of, lay: the shower and the layer of every point (variant I: layer unused).

        Returns:
            The modelled point features (``flow_features`` columns), preprocessed.

        Shapes:
            cond: ``(B, 1)``; shower: ``(B, S)``; shower_of, lay: ``(P,)``; returns ``(P, F)``.
        """
        z = self.latent_flow(torch.cat([cond, shower], dim=-1)).sample()
        pc = self._flat_context(z, cond, shower, shower_of, lay)
        return self._point_sample(pc, self._sets(shower_of, lay, cond.shape[0], pc.dtype))

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, n: torch.Tensor, shower: torch.Tensor,
               layer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the points of ``B`` showers whose point counts and shower features are given, padded.

        Args:
            cond: standardised ``log E_inc``.
            n: number of points of each shower.
            shower: the standardised shower features that go with ``n``.
            layer: variant II, the layer of every point (padded like ``x``).

        Returns:
            ``(x, mask)`` in preprocessed point features (``flow_features`` columns).

        Shapes:
            cond: ``(B, 1)``; n: ``(B,)``; shower: ``(B, S)``; layer: ``(B, N_max)``;
            x: ``(B, N_max, F)``; mask: ``(B, N_max)``.
        """
        if self.layered and layer is None:
            msg = "CaloPointFlow II samples need the layer of every point"
            raise ValueError(msg)
        b = n.shape[0]
        n_max = int(n.max()) if n.numel() else 0
        mask = torch.arange(n_max, device=n.device)[None, :] < n[:, None]
        (shower_of,) = pack(mask)
        lay = layer[mask] if layer is not None else torch.zeros_like(shower_of)
        x = torch.zeros(b, n_max, self.flow_features, device=cond.device, dtype=cond.dtype)
        x[mask] = self.sample_points(cond, shower, shower_of, lay)
        return x, mask

    @torch.no_grad()
    def cell_masses(self, z: Tensor, cond: Tensor, shower: Tensor, n_layer: Tensor, x: Tensor, group: Tensor,
                    prep: Preprocessor, *, r_nodes: int = 2, e_nodes: int = 48, e_pad: float = 2.0,
                    chunk: int = 1 << 17) -> Tensor:
        r"""The probability that one point of a layer falls in each cell, integrated from the point flow's density.

        For every (shower, layer) with points, the point flow's density ``p(y_r, y_E | latent, c,
        layer, n_l, E_l)`` in the standardised features it models is integrated over each r-bin
        (Gauss–Legendre nodes in the bin's uniformised coordinate, :func:`_r_quadrature`) and over
        ``y_E`` (the trapezoid rule on ``e_nodes`` points from ``min − e_pad`` to ``max + e_pad`` of the
        layer's sampled ``y_E``: a trained flow's density is a narrow ridge in ``(y_r, y_E)``, so the
        energy nodes must be close together where the layer's energies are). The masses are
        normalised per layer (the α-free flow puts all of its mass inside the layer: both
        dequantisations map the real line onto its r-range), and a ring's mass is shared evenly
        by its α bins. Variant II with ``alpha="free"`` and no set summary (points independent
        given the shower). Accuracy and cost (``benchmarks/likelihood_placement.py --parts
        density``): on CaloPointFlow II trained on synthetic ds2, the total variation between
        these ring masses and a fine quadrature is about 0.005 per layer; the cost is about
        ``9 r-bins × r_nodes × e_nodes`` flow evaluations per occupied layer.

        Args:
            z, cond, shower: the latent, condition and shower features the points were sampled with.
            n_layer: points per layer.
            x: the sampled points' standardised ``(y_r, y_E)``; group: their ``shower * L + layer``.
            prep: the run's preprocessing.
            r_nodes: Gauss–Legendre nodes per r-bin; e_nodes, e_pad: the energy grid.
            chunk: flow evaluations per call (memory).

        Returns:
            ``(B, n_voxels)`` float64; 0 in the layers without points.

        Shapes:
            z: ``(B, latent)``; cond: ``(B, 1)``; shower: ``(B, 2L)``; n_layer: ``(B, L)``;
            x: ``(P, 2)``; group: ``(P,)``.
        """
        if not (self.layered and self.alpha_free) or self.config.set_summary:
            msg = ("cell masses from the density need CaloPointFlow II with alpha='free' and set_summary=false (points "
                   "independent given their shower); draw candidate points instead (oversample=K)")
            raise ValueError(msg)
        geo = prep.geometry
        device = x.device
        b, n_l = n_layer.shape
        y_r, w_r = _r_quadrature(prep, r_nodes, device)                              # (L, R, I)
        n_rb = y_r.shape[1]
        f64 = torch.float64
        # the range of the sampled y_E of every (shower, layer), widened by e_pad: its energy grid
        ye = x[:, 1].to(f64)
        lo = torch.full((b * n_l,), math.inf, dtype=f64, device=device).scatter_reduce(0, group, ye, "amin")
        hi = torch.full((b * n_l,), -math.inf, dtype=f64, device=device).scatter_reduce(0, group, ye, "amax")
        occ = torch.nonzero(n_layer.reshape(-1) > 0).squeeze(1)                     # (G,) occupied groups
        g_sh, g_l = torch.div(occ, n_l, rounding_mode="floor"), occ % n_l
        lo, width = lo - e_pad, hi - lo + 2 * e_pad
        grid = torch.linspace(0.0, 1.0, e_nodes, dtype=f64, device=device)
        w_e = torch.full((e_nodes,), 1.0 / (e_nodes - 1), dtype=f64, device=device)
        w_e[0] = w_e[-1] = 0.5 / (e_nodes - 1)                                       # trapezoid on [0, 1]
        mass = torch.zeros(occ.shape[0], n_rb, dtype=f64, device=device)
        per = n_rb * r_nodes * e_nodes                                               # evaluations per group
        step = max(1, chunk // per)
        for i in range(0, occ.shape[0], step):
            sl = slice(i, i + step)
            sh, la, gi = g_sh[sl], g_l[sl], occ[sl]
            ctx = self._flat_context(z, cond, shower, sh, la)                          # (g, C)
            yr = y_r[la][:, :, :, None].expand(-1, -1, -1, e_nodes)                   # (g, R, I, J)
            yE = (lo[gi, None] + width[gi, None] * grid).to(torch.float32)            # (g, J)
            yE = yE[:, None, None, :].expand_as(yr)
            pts = torch.stack([yr, yE], -1).reshape(-1, 2)
            lp = self.point_flow(ctx.repeat_interleave(per, 0)).log_prob(pts).to(f64).reshape(yr.shape)
            wt = w_r[la][:, :, :, None] * (width[gi, None] * w_e)[:, None, None, :]  # (g, R, I, J)
            mass[sl] = (lp.exp() * wt).sum((2, 3))
        mass = mass / mass.sum(1, keepdim=True).clamp(min=1e-300)
        t = cell_tables(geo, device)
        cell_l = t["cell_layer"]
        rb = torch.as_tensor(np.array(geo.cell_r_bin), device=device)
        full = torch.zeros(b * n_l, n_rb, dtype=f64, device=device).index_copy_(0, occ, mass)
        full = full.reshape(b, n_l, n_rb)
        return full[:, cell_l, rb] / t["n_alpha"][cell_l].to(f64)

    @torch.no_grad()
    def generate(self, e_inc: np.ndarray | Tensor, prep: Preprocessor, *, oversample: int | None = 1) -> GeneratedShowers:
        """Showers in physical units for the given incident energies.

        Args:
            oversample: for the ``"likelihood"`` placement (:func:`calopc.models.cells.place_likelihood`;
                variant II): None, the model's points with the cell masses integrated from the point
                flow's density (:meth:`cell_masses`; with ``alpha="model"`` or the set summary, where
                that is not available: :data:`~calopc.models.cells.DEFAULT_OVERSAMPLE` candidates);
                ``K > 1`` draws ``K n_l`` candidate points in every layer instead. 1: plain points.

        Returns:
            A :class:`~calopc.models.cells.GeneratedShowers` on the model's device: points
            per shower, and per point its layer, continuous ``r`` (mm), ``α`` (rad; None with
            ``alpha="free"``: drawn per ring at placement) and energy (MeV).
        """
        device = next(self.parameters()).device
        density = oversample is None and self.layered and self.alpha_free and not self.config.set_summary
        k = 1 if density else DEFAULT_OVERSAMPLE if oversample is None else int(oversample)
        if k < 1 or (k > 1 and not self.layered):
            msg = (f"oversample={oversample}: the 'likelihood' placement needs CaloPointFlow variant II (points per "
                   "layer from the shower model) and oversample >= 1")
            raise ValueError(msg)
        if not self.layered:
            e_np = np.asarray(e_inc.cpu() if isinstance(e_inc, Tensor) else e_inc, dtype=np.float64)
            cond = torch.from_numpy(prep.forward_cond(e_np)).to(device)
            s = self.sample_shower(cond)
            n, e_sum = prep.inverse_shower(s.float().cpu().numpy(), e_np)
            x, mask = self.sample(cond, torch.from_numpy(n).to(device), s)
            xm = x[mask]
            if self.alpha_free:  # the α column is not modelled: any value, its inverse is not used
                xm = torch.cat([xm[:, :1], xm.new_zeros(xm.shape[0], 1), xm[:, 1:]], dim=1)
            zar, en = prep.inverse_points(xm.float().cpu().numpy(), np.repeat(e_np, n))
            # scale the point energies so that each shower carries the sampled total
            en = _scale_groups(en, np.repeat(np.arange(e_np.shape[0]), n), e_sum)
            g = GeneratedShowers.from_numpy(n, zar, en, device)
            if self.alpha_free:
                g.alpha = None
                if self.config.overflow == "move":
                    n_l = prep.geometry.n_layers
                    lay = g.layer.clamp(0, n_l - 1)
                    sh = torch.repeat_interleave(torch.arange(g.n_showers, device=device), g.counts)
                    g.r, g.n_moved_ring = fit_rings(prep.geometry, sh * n_l + lay, g.n_showers * n_l, lay, g.r,
                                                    energy=g.E)
            return g
        e = _as_tensor(e_inc, device, torch.float64).reshape(-1)
        b, n_l = e.shape[0], self.config.n_layers
        s, n_layer, e_layer = self.shower_flow.sample_layers(e, prep)
        p = torch_preprocessor(prep, device) or prep   # torch ops on the device; numpy when there are none
        cond = _as_tensor(_prep_call(p.forward_cond, e), device, torch.float32).reshape(b, -1)
        n_points = n_layer * k                        # K > 1: candidates for the likelihood placement
        counts = n_points.sum(1)
        group = torch.repeat_interleave(torch.arange(b * n_l, device=device), n_points.reshape(-1))   # (P,)
        shower_of = torch.div(group, n_l, rounding_mode="floor")
        lay = group - shower_of * n_l
        if density:  # the latent drawn here: the cell masses integrate the density the points come from
            z = self.latent_flow(torch.cat([cond, s], dim=-1)).sample()
            x = self._point_sample(self._flat_context(z, cond, s, shower_of, lay), None)
            mass = self.cell_masses(z, cond, s, n_layer, x, group, prep)
        else:
            x = self.sample_points(cond, s, shower_of, lay)
        if self.alpha_free:  # the α column is not modelled: any value, its inverse is not used
            x = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
        zar, w = _prep_call(p.inverse_points_layer, x, lay)
        zar, w = _as_tensor(zar, device, torch.float64), _as_tensor(w, device, torch.float64)
        r = zar[:, 2]
        # each layer of each shower gets the sampled layer energy
        tot = torch.zeros(b * n_l, dtype=w.dtype, device=device).index_add_(0, group, w)
        energy = w * (e_layer.reshape(-1).to(w.dtype) / tot.clamp(min=1e-300))[group]
        moved = 0
        if self.alpha_free and self.config.overflow == "move" and k == 1 and not density:
            r, moved = fit_rings(prep.geometry, group, b * n_l, lay, r, energy=energy)
        if density:
            return GeneratedShowers(counts, lay, r, None, energy, layer_counts=n_layer, layer_energy=e_layer,
                                    cell_mass=mass)
        if k > 1:
            return GeneratedShowers(counts, lay, r, None if self.alpha_free else zar[:, 1], energy,
                                    layer_counts=n_layer, layer_energy=e_layer, oversample=k)
        return GeneratedShowers(counts, lay, r, None if self.alpha_free else zar[:, 1], energy, n_moved_ring=moved)
