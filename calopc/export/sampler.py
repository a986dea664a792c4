r"""A trained run's whole sampler as one traceable torch module: incident energy and noise in, cells out.

:class:`ShowerSampler` reuses the run's modules and weights (the shower model, the point model,
the preprocessing tables) and re-states the steps of ``calopc generate`` in a form that a graph
exporter can follow: no host synchronisation, no data-dependent Python control flow, tensors
whose sizes follow from the sampled counts through one ``nonzero``, no ``searchsorted`` (ONNX has
none: searches are comparisons against the few edges of the point's own layer), and every random
number from :mod:`.noise`, so the module is a deterministic function of its inputs.

Steps for the per-layer models (CaloClouds, CaloPointFlow II):

1. the shower model's flow, inverted on the base draw ``z_shower`` → standardised per-layer
   features → points ``n_l`` and energy ``E_l`` of every layer (the run's preprocessing);
2. one slot per point, ``(shower, layer, rank)``, from ``nonzero(rank < n_l)``;
3. the point model on the slots (CaloClouds: the EDM/consistency sampler on the denoiser;
   CaloPointFlow II: the latent flow and the point flow inverted) → ``α`` (or none), ``r``,
   energy share ``w``; energies rescaled so that every layer carries ``E_l``;
4. placement in cells with the run's collision policy (:func:`place_dense`) and the readout
   threshold → dense cells ``(B, n_voxels)`` in calopc's order, MeV.

Shapes follow the batch: ``B`` showers, ``P`` points (data-dependent), ``L`` layers.
"""

from __future__ import annotations

__all__ = ["PLACEMENTS", "ShowerSampler", "dense_cells", "place_dense", "point_slots"]

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..geometry import Geometry
from . import noise as rnd

#: placement policies a graph can hold (``calopc generate --collisions`` without ``likelihood``)
PLACEMENTS = ("alpha-free", "nearest-free", "sum", "max")
_NEAREST = 24       # neighbours tried by nearest-free (calopc.models.cells)


# ------------------------------------------------------------------------------------------- helpers
def _count_le(rows: Tensor, v: Tensor) -> Tensor:
    """Per element, the number of entries of its row ``<= v`` (``searchsorted(row, v, right=True)``).

    Shapes:
        rows: ``(P, K)`` sorted rows; v: ``(P,)``; returns ``(P,)`` int64.
    """
    return (rows <= v[:, None]).to(torch.int64).sum(1)


def point_slots(n_layer: Tensor, cap: int) -> tuple[Tensor, Tensor, Tensor]:
    """One slot per point: ``(shower, layer, rank in layer)`` of ``n_layer[b, l]`` points, ordered by (shower, layer).

    Shapes:
        n_layer: ``(B, L)`` int64 (each ``<= cap``); returns three ``(P,)`` int64, ``P = n_layer.sum()``.
    """
    mask = torch.arange(cap, device=n_layer.device)[None, None, :] < n_layer[:, :, None]
    idx = torch.nonzero(mask)
    return idx[:, 0], idx[:, 1], idx[:, 2]


def _group_sum(values: Tensor, group: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, group, values)


class _Tables(nn.Module):
    """The geometry's per-layer tables as buffers (they become graph constants)."""

    def __init__(self, geometry: Geometry) -> None:
        super().__init__()
        n_r = np.asarray(geometry.n_r, dtype=np.int64)
        edges = np.full((geometry.n_layers, int(n_r.max()) + 1), np.inf)
        for i, e in enumerate(geometry.r_edges):
            edges[i, :len(e)] = e
        self.register_buffer("n_r", torch.as_tensor(n_r), persistent=False)
        self.register_buffer("n_alpha", torch.as_tensor(np.asarray(geometry.n_alpha, dtype=np.int64)), persistent=False)
        self.register_buffer("offsets", torch.as_tensor(np.asarray(geometry.offsets, dtype=np.int64)), persistent=False)
        self.register_buffer("edges", torch.as_tensor(edges), persistent=False)
        self.register_buffer("r_lo", torch.as_tensor([float(e[0]) for e in geometry.r_edges], dtype=torch.float64),
                             persistent=False)
        self.register_buffer("r_hi", torch.as_tensor([float(e[-1]) for e in geometry.r_edges], dtype=torch.float64),
                             persistent=False)
        self.n_layers, self.n_voxels = geometry.n_layers, geometry.n_voxels
        self.max_r, self.max_alpha = int(n_r.max()), int(max(geometry.n_alpha))
        self.max_cells = int(max(geometry.voxels_per_layer))
        self.regular = geometry.is_regular
        from ..converters.core import neighbour_table

        nbr = np.asarray(neighbour_table(geometry, _NEAREST))
        if geometry.is_regular:   # every layer is the first one shifted: keep one layer (-1: no neighbour)
            first = nbr[:geometry.voxels_per_layer[0]]
            self.register_buffer("nbr", torch.as_tensor(first.astype(np.int32)), persistent=False)
        else:
            self.register_buffer("nbr", torch.as_tensor(nbr.astype(np.int32)), persistent=False)

    def neighbours(self, cell: Tensor, layer: Tensor) -> Tensor:
        """The nearest cells of the same layer, ``(P, 24)`` int64, ``-1`` where there is none."""
        if self.regular:
            off = self.offsets[layer]
            n = self.nbr[cell - off].to(torch.int64)
            return torch.where(n >= 0, n + off[:, None], n)
        return self.nbr[cell].to(torch.int64)

    def locate(self, layer: Tensor, r: Tensor, alpha: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``(inside, r-bin, cell)`` as :func:`calopc.models.cells.locate` (α-bin 0 when ``alpha`` is None)."""
        r64 = r.to(torch.float64)
        ok = torch.isfinite(r64)
        rb = _count_le(self.edges[layer], torch.where(ok, r64, torch.zeros_like(r64))) - 1
        nr = self.n_r[layer]
        ok = ok & (rb >= 0) & (rb < nr)
        ab = torch.zeros_like(rb)
        if alpha is not None:
            a64 = alpha.to(torch.float64)
            ok = ok & torch.isfinite(a64)
            na = self.n_alpha[layer]
            a = torch.remainder(torch.where(ok, a64, torch.zeros_like(a64)) + math.pi, 2 * math.pi)
            ab = torch.minimum(torch.floor(a * (na.to(torch.float64) / (2 * math.pi))).to(torch.int64), na - 1)
            ab = ab.clamp(min=0)
        rb = torch.minimum(rb.clamp(min=0), nr - 1)   # outside points: any cell of their layer (they carry no energy)
        cell = self.offsets[layer] + ab * nr + rb
        return ok, rb, cell


# ------------------------------------------------------------------------------------------- placement
def place_dense(tables: _Tables, policy: str, b: int, shower: Tensor, layer: Tensor, r: Tensor,
                alpha: Tensor | None, energy: Tensor, group_start: Tensor, shower_keys: Tensor, index: Tensor) -> Tensor:
    """Points → dense cells ``(B · n_voxels,)`` (MeV, float64) with a ``calopc generate --collisions`` policy.

    * ``"alpha-free"``: the points of a ``(shower, layer, r-bin)`` ring take distinct α bins, the
      ring's bins in a random order (keys drawn per cell); points beyond a ring's ``n_α`` share
      cells (energies added). Same distribution as :func:`calopc.models.cells.place` (the points of
      a ring are exchangeable, so ranking them in their order is as good as a random order).
    * ``"nearest-free"``: the most energetic point keeps its cell (the first among equals), the others
      move to the nearest free cell of their layer, most energetic first, in 24 rounds over the
      neighbours; what finds no free cell is added to its cell. Deterministic: the same cells as
      :func:`calopc.models.cells.place`.
    * ``"sum"`` adds, ``"max"`` keeps the most energetic point of a cell.

    Points outside the calorimeter are not placed. ``alpha`` None with a policy other than
    ``"alpha-free"``: uniform angles (stream ``alpha``).

    Args:
        group_start: ``(P,)`` index of the first point of the point's (shower, layer) group (points are
            ordered by shower and layer).
        shower_keys, index: the noise key of every shower ``(B,)`` (:func:`calopc.export.noise.shower_key`) and the
            point's counter in its shower ``(P,)``.
    """
    n_vox = tables.n_voxels
    size = b * n_vox
    dev = energy.device
    if policy != "alpha-free" and alpha is None:
        alpha = (rnd.uniform(shower_keys[shower], index, rnd.STREAMS["alpha"]) * 2 - 1) * math.pi
    inside, rb, cell = tables.locate(layer, r, None if policy == "alpha-free" else alpha)
    e = torch.where(inside, energy.to(torch.float64), torch.zeros_like(energy, dtype=torch.float64))
    if policy == "alpha-free":
        cell = _alpha_free(tables, b, shower, layer, rb, cell, inside, group_start, shower_keys)
    key = shower * n_vox + cell
    if policy == "sum" or policy == "alpha-free":
        return torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, key, e)
    p = torch.arange(key.shape[0], device=dev)
    win = _winners(key, torch.where(inside, e, torch.full_like(e, -1.0)), p, size) & inside
    if policy == "max":
        return torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, key, torch.where(win, e, torch.zeros_like(e)))
    # nearest-free: losers try the 24 nearest cells of their layer, the most energetic first
    occupied = torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, key, win.to(torch.float64)) > 0
    pending = inside & ~win
    final = key
    nbr = tables.neighbours(cell, layer)
    minus = torch.full_like(e, -1.0)
    for k in range(nbr.shape[1]):
        cand = nbr[:, k]
        ck = shower * n_vox + cand.clamp(min=0)
        ok = pending & (cand >= 0) & ~occupied[ck]
        got = _winners(ck, torch.where(ok, e, minus), p, size) & ok
        occupied = occupied | (torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, ck, got.to(torch.float64)) > 0)
        final = torch.where(got, ck, final)
        pending = pending & ~got
    return torch.zeros(size, dtype=torch.float64, device=dev).index_add(0, final, e)


def _winners(key: Tensor, e: Tensor, pos: Tensor, size: int) -> Tensor:
    """True at the most energetic element of each ``key`` (the first index among equals); ``e`` ≥ 0 where it counts."""
    emax = torch.full((size,), -2.0, dtype=e.dtype, device=e.device).scatter_reduce(0, key, e, "amax")
    cand = torch.where(e == emax[key], pos, torch.full_like(pos, pos.shape[0]))
    first = torch.full((size,), 1 << 40, dtype=torch.int64, device=e.device).scatter_reduce(0, key, cand, "amin")
    return pos == first[key]


def _alpha_free(tables: _Tables, b: int, shower: Tensor, layer: Tensor, rb: Tensor, cell0: Tensor, inside: Tensor,
                group_start: Tensor, shower_keys: Tensor) -> Tensor:
    """The cell of every point of ``alpha-free`` placement (``cell0``: its ring's α-bin-0 cell)."""
    dev = rb.device
    n_rmax, n_amax = tables.max_r, tables.max_alpha
    # rank of each point in its ring: the points of a (shower, layer) group are consecutive, so a running
    # count per r-bin, less its value at the group's start, counts the earlier points of the same ring
    onehot = (rb[:, None] == torch.arange(n_rmax, device=dev)[None, :]) & inside[:, None]
    run = torch.cat([torch.zeros(1, n_rmax, dtype=torch.int64, device=dev),
                     torch.cumsum(onehot.to(torch.int64), 0)], 0)                       # (P + 1, R)
    p = torch.arange(rb.shape[0], device=dev)
    rank = run[p + 1, rb] - run[group_start, rb] - 1
    # a random order of the α bins of every ring: one key per cell (counter: the cell index), sorted per ring
    na = tables.n_alpha[layer]
    if tables.regular:   # all rings of the batch at once: B · n_voxels keys (fewer than P · n_α for real showers)
        n_l, n_a, n_r = tables.n_layers, n_amax, n_rmax
        cells = torch.arange(tables.n_voxels, device=dev)
        u = rnd.uniform(shower_keys[:, None].expand(b, tables.n_voxels).reshape(-1), cells.repeat(b),
                        rnd.STREAMS["alpha"])
        perm = torch.argsort(u.reshape(b, n_l, n_a, n_r).transpose(2, 3), dim=3).reshape(-1, n_a)   # (B L R, A)
        ring = (shower * n_l + layer) * n_r + rb
        ab = perm[ring, torch.remainder(rank, na)]
    else:
        j = torch.arange(n_amax, device=dev)
        ring_cell = cell0[:, None] + j[None, :] * tables.n_r[layer][:, None]              # (P, A) cells of the ring
        u = rnd.uniform(shower_keys[shower][:, None].expand(-1, n_amax).reshape(-1), ring_cell.reshape(-1),
                        rnd.STREAMS["alpha"]).reshape(-1, n_amax)
        u = torch.where(j[None, :] < na[:, None], u, torch.full_like(u, 2.0))
        ab = torch.argsort(u, dim=1).gather(1, torch.remainder(rank, na)[:, None])[:, 0]
    return cell0 + ab * tables.n_r[layer]





def dense_cells(dense: Tensor, threshold: float) -> Tensor:
    """Placed energies ``(B · n_vox,)`` float64 → ``(B, n_vox)`` float32 with cells below ``threshold`` MeV emptied,
    as ``calopc generate`` writes them (float32, then the threshold)."""
    d = dense.to(torch.float32)
    if threshold > 0:
        d = torch.where(d < threshold, torch.zeros_like(d), d)
    return d


# ------------------------------------------------------------------------------------------- the sampler
class ShowerSampler(nn.Module):
    """The run's sampler, placement and readout as one module.

    Args:
        loaded: a run from :func:`calopc.models.load`.
        policy: a placement of :data:`PLACEMENTS` (``"auto"`` resolves as ``calopc generate`` does).
        threshold: readout threshold (MeV); cells below are empty.
        steps: sampler steps of diffusion models (default: the run's).
        max_points: points per shower at most (counts are cut to it layer by layer from the last layer;
            None: no cap beyond the cells of each layer).

    ``forward(e_inc, z_shower, z_extra, keys)``: incident energies ``(B,)`` MeV, the shower model's base
    draw ``(B, 2L)``, the model's other fixed-size noise ``(B, extra)`` (CaloPointFlow: its latent flow's
    base draw; none otherwise) and the noise keys ``(B, K)`` (:func:`calopc.export.noise.keys_from_latent`).
    Returns dense cells ``(B, n_voxels)`` float32 MeV in calopc's order.
    """

    def __init__(self, loaded: Any, *, policy: str = "auto", threshold: float = 0.0, steps: int | None = None,
                 max_points: int | None = None) -> None:
        super().__init__()
        self.model = loaded.model.eval()
        self.name = loaded.name
        self.prep = loaded.preprocessor
        self.geometry = loaded.geometry
        cfg = self.model.config
        self.alpha_free = bool(getattr(self.model, "alpha_free", False))
        if policy == "auto":
            policy = "alpha-free" if self.alpha_free else "nearest-free"
        if policy not in PLACEMENTS:
            msg = f"placement {policy!r} cannot be exported; choose one of auto, {', '.join(PLACEMENTS)}"
            raise ValueError(msg)
        self.policy = policy
        self.threshold = float(threshold)
        self.steps = int(steps if steps is not None else getattr(cfg, "steps", 1))
        self.max_points = max_points
        self.tables = _Tables(self.geometry)
        self.tp = self.prep.to_torch("cpu")
        from .flows import FlowInverse

        self.shower_inverse = FlowInverse((self.model.shower if self.name == "caloclouds" else self.model.shower_flow).flow)
        self.latent_inverse = FlowInverse(self.model.latent_flow) if self.name == "calopointflow" else None
        self.n_layers = self.geometry.n_layers
        self.extra = int(cfg.latent) if self.name == "calopointflow" else 0
        if self.prep.dequantisation == "cdf":
            self._cdf_rows()
        # overflow="move" (both families' default with α free): a full ring passes its least energetic points on
        self.move = self.alpha_free and getattr(cfg, "overflow", "merge") == "move"

    # -------------------------------------------------------------------------------- noise sizes
    @property
    def shower_size(self) -> int:
        """Entries of the shower model's base draw (``2 L``)."""
        return int(self.model.config.shower_features)

    @property
    def latent_size(self) -> int:
        """``L`` of Par04's input: the shower draw, the model's fixed-size draw and the noise keys."""
        return self.shower_size + self.extra + rnd.N_KEYS

    def split_latent(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A latent vector ``(B, latent_size)`` → ``(z_shower, z_extra, keys)``."""
        s, x = self.shower_size, self.extra
        return z[:, :s], z[:, s:s + x], rnd.keys_from_latent(z[:, s + x:s + x + rnd.N_KEYS])

    # -------------------------------------------------------------------------------- the stages
    def shower_layers(self, e: Tensor, z_shower: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(cond, s, n_layer, e_layer)``: standardised ``log E_inc`` ``(B, 1)``, shower features ``(B, 2L)``,
        points ``(B, L)`` int64 and energy ``(B, L)`` MeV of every layer."""
        cond = self.tp.forward_cond(e)
        s = self.shower_inverse(cond, z_shower.to(cond.dtype))
        n_layer, e_layer = self.tp.inverse_layers(s, e)
        if self.max_points is not None:
            # cut from the last layer backwards: the points beyond max_points in layer order
            before = torch.cumsum(n_layer, 1) - n_layer
            n_layer = torch.minimum(n_layer, (self.max_points - before).clamp(min=0))
            e_layer = torch.where(n_layer > 0, e_layer, torch.zeros_like(e_layer))
        return cond, s, n_layer, e_layer

    def point_noise(self, keys: Tensor, index: Tensor, features: int, stream: int = rnd.STREAMS["points"]) -> Tensor:
        """``(P, features)`` standard normal draws of points with counters ``index`` (their rank in the shower)."""
        idx = (index[:, None] * features + torch.arange(features, device=index.device)[None, :]).reshape(-1)
        kk = keys[:, None].expand(-1, features).reshape(-1)
        return rnd.normal(kk, idx, stream).reshape(-1, features)

    def points(self, cond: Tensor, s: Tensor, z_extra: Tensor, shower: Tensor, layer: Tensor, keys: Tensor,
               index: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        """``(alpha or None, r, w)`` of the slots: the point model's draws in physical units, ``w`` the
        energy share (normalised per layer by the caller)."""
        if self.name == "caloclouds":
            return self._caloclouds_points(cond, s, shower, layer, keys, index)
        return self._cpf_points(cond, s, z_extra, shower, layer, keys, index)

    def _caloclouds_points(self, cond: Tensor, s: Tensor, shower: Tensor, layer: Tensor, keys: Tensor,
                           index: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        m, cfg = self.model, self.model.config
        dtype = next(m.denoiser.parameters()).dtype
        f = len(m.point_dims)
        x = self.point_noise(keys, index, f).to(dtype)
        kw = m.net_inputs(cond.to(dtype), s.to(dtype), shower, layer)
        from ..models.diffusion import _karras_host

        if cfg.consistency:
            sig = _karras_host(self.steps + 1, cfg.sigma_min, cfg.sigma_max, cfg.rho)
            y = m.denoiser(x * cfg.sigma_max, cfg.sigma_max, **kw)
            for i, sg in enumerate(sig[1:self.steps]):
                z = self.point_noise(keys, index, f, rnd.STREAMS["consistency"] + i).to(dtype)
                y = m.denoiser(y + math.sqrt(max(sg**2 - cfg.sigma_min**2, 0.0)) * z, sg, **kw)
        else:
            from ..models.diffusion import heun_step

            sig = _karras_host(self.steps, cfg.sigma_min, cfg.sigma_max, cfg.rho) + [0.0]
            y = x * sig[0]
            for i in range(self.steps):
                y = heun_step(m.denoiser, y, sig[i], sig[i + 1], **kw)
        alpha, r, w = self._physical(y, layer)
        return (None if cfg.alpha == "free" else alpha), r, w

    def _cpf_points(self, cond: Tensor, s: Tensor, z_extra: Tensor, shower: Tensor, layer: Tensor, keys: Tensor,
                    index: Tensor) -> tuple[Tensor | None, Tensor, Tensor]:
        m = self.model
        b = cond.shape[0]
        z = self.latent_inverse(torch.cat([cond, s], dim=-1), z_extra.to(cond.dtype))
        pc = m._flat_context(z, cond, s, shower, layer)
        x = self.point_noise(keys, index, m.flow_features).to(pc.dtype)
        sets = m._sets(shower, layer, b, pc.dtype)
        if sets is None:
            x = m.point_flow(pc).transform.inv(x)
        else:
            for c in reversed(m.point_flow.couplings):
                x = c.inverse(x, pc, sets)
        alpha, r, w = self._physical(x, layer)
        return (None if m.alpha_free else alpha), r, w

    def _physical(self, x: Tensor, layer: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The point model's standardised features (without α for an α-free model) → ``(alpha, r, w)`` in
        physical units, the twin of the preprocessor's ``inverse_points_layer`` for either dequantisation."""
        if self.alpha_free:  # the α column is not modelled: any value, its inverse is not used
            x = torch.cat([x.new_zeros(x.shape[0], 1), x], dim=1)
        y = x.to(torch.float64) * self.tp.point_std + self.tp.point_mean
        if self.prep.dequantisation == "cdf":
            alpha = self._cdf_inverse(self.cdf_alpha, y[:, 0], layer)
            r = self._cdf_inverse(self.cdf_r, y[:, 1], layer)
        else:
            alpha = torch.sigmoid(y[:, 0]) * 2 * math.pi - math.pi
            r = self.tables.r_lo[layer] + torch.sigmoid(y[:, 1]) * (self.tables.r_hi[layer] - self.tables.r_lo[layer])
        w = torch.exp(y[:, 2].clamp(-80, 80))
        return alpha, r, w

    def _cdf_rows(self) -> None:
        """Per-layer rows of the CDF tables (padded), for searches against the point's own layer."""
        for name, t in zip(("cdf_alpha", "cdf_r"), self.prep._cdf()):
            nb = np.asarray(t["nb"])
            k = int(nb.max()) + 1
            cc = np.full((nb.shape[0], k), 3.0)
            ee = np.zeros((nb.shape[0], k))
            for l in range(nb.shape[0]):
                a = int(t["start"][l])
                cc[l, :nb[l] + 1] = t["C"][a:a + nb[l] + 1] - 2.0 * l
                ee[l, :nb[l] + 1] = t["E"][a:a + nb[l] + 1] - l * float(t["span"])
                ee[l, nb[l] + 1:] = ee[l, nb[l]]
            self.register_buffer(name + "_c", torch.as_tensor(cc), persistent=False)
            self.register_buffer(name + "_e", torch.as_tensor(ee), persistent=False)
            self.register_buffer(name + "_nb", torch.as_tensor(nb), persistent=False)
            setattr(self, name, name)

    def _cdf_inverse(self, name: str, y: Tensor, layer: Tensor) -> Tensor:
        """The inverse CDF dequantisation (:func:`calopc.models.preprocess._cdf_inverse_t`) with row searches."""
        c, e, nb = getattr(self, name + "_c")[layer], getattr(self, name + "_e")[layer], getattr(self, name + "_nb")[layer]
        # Φ(y) in float32: ONNX Runtime has no float64 Erf (the bin edges are searched in float64)
        u = 0.5 * torch.erfc((-y * (1 / math.sqrt(2))).to(torch.float32)).to(torch.float64)
        k = torch.minimum((_count_le(c, u) - 1).clamp(min=0), nb - 1)
        c0, c1 = c.gather(1, k[:, None])[:, 0], c.gather(1, k[:, None] + 1)[:, 0]
        e0, e1 = e.gather(1, k[:, None])[:, 0], e.gather(1, k[:, None] + 1)[:, 0]
        frac = ((u - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0.0, 1.0)
        return e0 + frac * (e1 - e0)

    def fit_rings(self, shower: Tensor, layer: Tensor, r: Tensor, energy: Tensor, n_layer: Tensor, keys: Tensor,
                  index: Tensor) -> Tensor:
        """``overflow="move"`` (:func:`calopc.models.calopointflow.fit_rings` with energies):
        the new radius of every point, a full ring passing its least energetic points on."""
        t = self.tables
        b, n_l = n_layer.shape
        g_n = b * n_l
        k_max = t.max_r
        dev = r.device
        group = shower * n_l + layer
        _, rb, _ = t.locate(layer, r, None)
        rb = torch.minimum(rb, t.n_r[layer] - 1)
        lay_g = torch.arange(n_l, device=dev).repeat(b)
        kk = torch.arange(k_max, device=dev)
        cap = torch.where(kk[None, :] < t.n_r[lay_g][:, None], t.n_alpha[lay_g][:, None],
                          torch.zeros((), dtype=torch.int64, device=dev))                  # (G, K)
        count = _group_sum(torch.ones_like(rb), group * k_max + rb, g_n * k_max).reshape(g_n, k_max)
        cols, carry = [], torch.zeros(g_n, dtype=torch.int64, device=dev)
        for k in range(k_max):
            tot = count[:, k] + carry
            cols.append(torch.minimum(tot, cap[:, k]))
            carry = tot - cols[-1]
        for k in range(k_max - 1, -1, -1):
            add = torch.minimum(cap[:, k] - cols[k], carry)
            cols[k] = cols[k] + add
            carry = carry - add
        new = torch.stack(cols, 1)
        # rank of each point in its group in (ring, energy descending) order: one sort of a composite key
        e_tot = _group_sum(energy.to(torch.float64), group, g_n)[group]
        share = energy.to(torch.float64) / e_tot.clamp(min=1e-300)
        order = torch.argsort((group * k_max + rb).to(torch.float64) * 4.0 + (1.0 - share.clamp(0.0, 1.0)))
        rank_sorted = torch.arange(r.shape[0], device=dev) - (torch.cumsum(n_layer.reshape(-1), 0) - n_layer.reshape(-1))[group[order]]
        rank = torch.empty_like(rank_sorted).index_copy(0, order, rank_sorted)
        ring = _count_le(torch.cumsum(new, 1)[group], rank)
        ring = torch.minimum(ring, t.n_r[layer] - 1)
        lo, hi = t.edges[layer, ring], t.edges[layer, ring + 1]
        u = rnd.uniform(keys, index, rnd.STREAMS["ring_r"])
        return torch.where(ring != rb, lo + u * (hi - lo), r.to(torch.float64))

    # -------------------------------------------------------------------------------- everything
    def forward(self, e_inc: Tensor, z_shower: Tensor, z_extra: Tensor, keys: Tensor) -> Tensor:
        e = e_inc.to(torch.float64)
        b, n_l = e.shape[0], self.n_layers
        shower_key = rnd.shower_key(keys)                                     # (B,)
        cond, s, n_layer, e_layer = self.shower_layers(e, z_shower)
        shower, layer, rank = point_slots(n_layer, self.tables.max_cells)
        counts = n_layer.sum(1)
        start = torch.cumsum(counts, 0) - counts
        p = torch.arange(shower.shape[0], device=e.device)
        index = p - start[shower]                                             # the point's counter in its shower
        pk = shower_key[shower]
        alpha, r, w = self.points(cond, s, z_extra, shower, layer, pk, index)
        group = shower * n_l + layer
        w = w.to(torch.float64)
        tot = _group_sum(w, group, b * n_l)
        energy = w / tot.clamp(min=1e-300)[group] * e_layer.reshape(-1).to(torch.float64)[group]
        if self.move:
            r = self.fit_rings(shower, layer, r, energy, n_layer, pk, index)
        dense = place_dense(self.tables, self.policy, b, shower, layer, r, alpha, energy, p - rank, shower_key, index)
        return dense_cells(dense, self.threshold).reshape(b, self.geometry.n_voxels)
