r"""Generated points → calorimeter cells, as torch operations on the tensors' device.

A model's :meth:`generate` returns a :class:`GeneratedShowers`: flat points, shower after
shower, with a layer, a continuous radius, an angle (or none) and an energy. :func:`place`
maps them to cells so that every cell of a shower holds at most one point, with sort,
unique, scatter and searchsorted only (no host round trip but one read of the statistics):

* ``"alpha-free"`` (models that do not generate α): the points of a shower that fall in the
  same ``(layer, r-bin)`` ring draw that ring's α bins without replacement, in chunks of
  ``n_α``; only points beyond the ``n_α``-th of a ring share a cell (their energies are added,
  counted as ``n_merged``).
* ``"nearest-free"`` (CaloPointFlow II): each point goes to its cell; the most energetic
  point keeps it, the others move to the nearest free cell of the same layer
  (:func:`calopc.converters.core.neighbour_table`, rounds over the neighbours, most energetic
  first); those with no free cell among the neighbours are added to their cell.
* ``"sum"`` adds the energies of points sharing a cell; ``"max"`` keeps the most energetic.
* ``"auto"``: ``"alpha-free"`` when ``alpha`` is None, else ``"nearest-free"``. Another policy
  for showers without ``alpha`` draws uniform angles first.
* ``"likelihood"`` (models that sample points independently given their shower, beyond the
  published models): every cell of a (shower, layer) is chosen with the probability that the
  model hits it, ``π_c = n_l q_c`` capped at 1 (``q``: the model's density of one point over the
  layer's cells), exactly ``n_l`` distinct cells by systematic sampling in a random order; ``q``
  is integrated from the point flow's density (:attr:`GeneratedShowers.cell_mass`, CaloPointFlow
  II) or estimated from ``K`` candidate points per point (:attr:`GeneratedShowers.oversample`,
  CaloClouds). No collisions by construction; see :func:`place_likelihood`.

Points outside the calorimeter (layer out of range, radius outside the layer's edges,
non-finite coordinates) are not placed and are counted in ``n_outside``. The same
``torch.Generator`` state gives the same placement.
"""

from __future__ import annotations

__all__ = ["PLACEMENT_POLICIES", "GeneratedShowers", "Placed", "cell_tables", "inclusion_probabilities", "locate", "place",
           "place_likelihood", "systematic_sample"]

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..geometry import Geometry

PLACEMENT_POLICIES = ("auto", "alpha-free", "nearest-free", "sum", "max", "likelihood")
#: candidate points per point of ``"likelihood"`` placement for models without a density (``calopc generate
#: --oversample``): the noise of the estimated hit probabilities leaves a cell with π = 1 out about 1/√(2πK) of the
#: time; on a 40-cell toy (n = 12) K = 16 includes such cells 0.985 of the time and sends 1.5 % of the points
#: elsewhere than π does (K = 4: 0.947 and 5.5 %), at K times the sampling (benchmarks/likelihood_placement.py)
DEFAULT_OVERSAMPLE = 16


@dataclass
class GeneratedShowers:
    """Generated showers as flat points, shower after shower, on the model's device.

    With ``oversample = K > 1`` the points are *candidates* for ``"likelihood"`` placement:
    ``K n_l`` of them in layer ``l`` of a shower that gets ``n_l = layer_counts[b, l]`` points
    carrying ``layer_energy[b, l]`` MeV.

    Shapes:
        counts: ``(B,)`` int64 points per shower; layer: ``(P,)`` int64; r: ``(P,)`` mm;
        alpha: ``(P,)`` rad or None (α not modelled: drawn at placement); E: ``(P,)`` MeV;
        layer_counts: ``(B, L)`` int64 or None; layer_energy: ``(B, L)`` MeV or None;
        n_moved_ring: 0-d, points the model moved to another ``(layer, r)`` ring before placement
        (CaloPointFlow's ``overflow="move"``), reported by :func:`place` as ``n_moved_ring``;
        cell_mass: ``(B, n_voxels)`` float64 or None, the model's probability that one point of a
        layer falls in each cell (sums to 1 over the cells of a layer with points), integrated
        from its density: the ``"likelihood"`` placement draws the cells from it (with
        ``oversample = 1``, the points only give their energies); other policies ignore it.
    """

    counts: torch.Tensor
    layer: torch.Tensor
    r: torch.Tensor
    alpha: torch.Tensor | None
    E: torch.Tensor
    layer_counts: torch.Tensor | None = None
    layer_energy: torch.Tensor | None = None
    oversample: int = 1
    n_moved_ring: torch.Tensor | int = 0
    cell_mass: torch.Tensor | None = None

    @property
    def n_showers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_points(self) -> int:
        return int(self.E.shape[0])

    @property
    def device(self) -> torch.device:
        return self.E.device

    def to(self, device: torch.device | str) -> GeneratedShowers:
        opt = lambda t: None if t is None else t.to(device)  # noqa: E731
        return GeneratedShowers(self.counts.to(device), self.layer.to(device), self.r.to(device), opt(self.alpha),
                                self.E.to(device), opt(self.layer_counts), opt(self.layer_energy), self.oversample,
                                self.n_moved_ring.to(device) if isinstance(self.n_moved_ring, torch.Tensor)
                                else self.n_moved_ring, opt(self.cell_mass))

    @classmethod
    def from_numpy(cls, counts: np.ndarray, zar: np.ndarray, energy: np.ndarray,
                   device: torch.device | str = "cpu") -> GeneratedShowers:
        """From the older ``(counts, zar, E)`` tuple: continuous ``(z, α, r)``, layer ``round(z)``.

        Shapes:
            counts: ``(B,)``; zar: ``(P, 3)``; energy: ``(P,)``.
        """
        zar = np.asarray(zar, dtype=np.float64).reshape(-1, 3)
        with np.errstate(invalid="ignore"):
            z = np.floor(zar[:, 0] + 0.5)
        layer = np.where(np.isfinite(z), z, -1).astype(np.int64)
        t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa: E731
        return cls(t(counts, torch.int64), t(layer, torch.int64), t(zar[:, 2], torch.float64),
                   t(zar[:, 1], torch.float64), t(energy, torch.float64))


@dataclass
class Placed:
    """Points in cells, at most one per cell and shower, sorted by (shower, cell).

    Shapes:
        cell: ``(P',)`` int64 flat voxel index; E: ``(P',)`` MeV; counts: ``(B,)`` int64.
    """

    cell: torch.Tensor
    E: torch.Tensor
    counts: torch.Tensor
    stats: dict = field(default_factory=dict)

    @property
    def shower(self) -> torch.Tensor:
        """Shower of every placed point, ``(P',)`` int64."""
        return torch.repeat_interleave(torch.arange(self.counts.shape[0], device=self.counts.device), self.counts)


def cell_tables(geometry: Geometry, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The geometry's per-layer tables as tensors on ``device`` (cached on the geometry).

    Keys: ``n_r``, ``n_alpha``, ``offsets`` (``(L,)``/``(L + 1,)`` int64), ``edges`` (``(L, max n_r + 1)``
    float64, padded with +inf), ``edges_flat`` (the r-edges of
    every layer, layer ``l`` shifted by ``l * edges_span``), ``edges_start`` (``(L,)``), ``edges_span``,
    ``cell_layer``, ``cell_r``, ``cell_alpha``, ``cell_z`` (``(n_voxels,)``).
    """
    device = torch.device(device)
    key = f"torch-cells:{device}"
    t = geometry._cache.get(key)
    if t is not None:
        return t
    n_r = np.asarray(geometry.n_r, dtype=np.int64)
    # the r-edges of all layers end to end, layer l shifted by l * span: one sorted search finds the r-bin
    # of a point in its own layer (no (P, edges) gather)
    lo = min(e[0] for e in geometry.r_edges)
    span = max(e[-1] for e in geometry.r_edges) - lo + 1.0
    flat = np.concatenate([np.asarray(e, dtype=np.float64) + i * span for i, e in enumerate(geometry.r_edges)])
    start = np.concatenate([[0], np.cumsum(n_r + 1)[:-1]]).astype(np.int64)
    edges = np.full((geometry.n_layers, int(n_r.max()) + 1), np.inf)
    for i, e in enumerate(geometry.r_edges):
        edges[i, :len(e)] = e
    t = {"n_r": n_r, "n_alpha": np.asarray(geometry.n_alpha, dtype=np.int64), "offsets": geometry.offsets,
         "edges": edges, "edges_flat": flat, "edges_start": start, "edges_span": np.float64(span),
         "cell_layer": np.asarray(geometry.cell_layer, dtype=np.int64),
         "cell_r": geometry.cell_r, "cell_alpha": geometry.cell_alpha, "cell_z": geometry.cell_z}
    t = {k: torch.as_tensor(np.array(v), device=device) for k, v in t.items()}
    geometry._cache[key] = t
    return t


def _neighbours(geometry: Geometry, device: torch.device) -> torch.Tensor:
    key = f"torch-nbr:{device}"
    t = geometry._cache.get(key)
    if t is None:
        from ..converters.core import neighbour_table

        t = torch.as_tensor(np.array(neighbour_table(geometry)), device=device)
        geometry._cache[key] = t
    return t


def locate(geometry: Geometry, layer: torch.Tensor, r: torch.Tensor,
           alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cells of continuous points (the torch twin of :meth:`Geometry.locate`, layer given).

    Returns:
        ``(inside, r_bin, cell)``: bool mask, r-bin, flat voxel index (``-1`` outside; with
        ``alpha`` None the α-bin 0 of the ring).

    Shapes:
        layer, r, alpha: ``(P,)``; all outputs ``(P,)``.
    """
    t = cell_tables(geometry, r.device)
    n_l = t["n_r"].shape[0]
    r64 = r.to(torch.float64)
    ok = (layer >= 0) & (layer < n_l) & torch.isfinite(r64)
    lay = torch.where(ok, layer, torch.zeros_like(layer))
    shifted = torch.where(ok, r64, torch.zeros_like(r64)) + lay.to(torch.float64) * t["edges_span"]
    rb = torch.searchsorted(t["edges_flat"], shifted, right=True) - 1 - t["edges_start"][lay]
    nr = t["n_r"][lay]
    ok &= (rb >= 0) & (rb < nr)
    ab = torch.zeros_like(rb)
    if alpha is not None:
        a64 = alpha.to(torch.float64)
        ok &= torch.isfinite(a64)
        na = t["n_alpha"][lay]
        a = torch.remainder(torch.where(ok, a64, torch.zeros_like(a64)) + math.pi, 2 * math.pi)
        ab = torch.minimum((a * (na.to(torch.float64) / (2 * math.pi))).to(torch.int64), na - 1).clamp(min=0)
    cell = t["offsets"][lay] + ab * nr + rb.clamp(min=0)
    return ok, rb, torch.where(ok, cell, torch.full_like(cell, -1))


def _first_of_groups(key: torch.Tensor) -> torch.Tensor:
    """True at the first element of each run of equal values of a sorted ``key``."""
    first = torch.ones_like(key, dtype=torch.bool)
    if key.numel() > 1:
        first[1:] = key[1:] != key[:-1]
    return first


def _winners(key: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """For a sorted ``key``: True at the most energetic element of each run of equal keys (the first
    one among equals), without sorting the energies (float sorts are slow on the CPU)."""
    p = key.shape[0]
    gid = torch.cumsum(_first_of_groups(key).to(torch.int64), 0) - 1
    gmax = torch.full((p,), -math.inf, dtype=energy.dtype, device=key.device).scatter_reduce(
        0, gid, energy, "amax", include_self=True)
    pos = torch.arange(p, device=key.device)
    cand = torch.where(energy == gmax[gid], pos, torch.full_like(pos, p))
    first_max = torch.full((p,), p, dtype=torch.int64, device=key.device).scatter_reduce(
        0, gid, cand, "amin", include_self=True)
    return pos == first_max[gid]


def place(g: GeneratedShowers, geometry: Geometry, *, policy: str = "auto",
          generator: torch.Generator | None = None) -> Placed:
    """Map generated points to cells, at most one point per cell of a shower.

    Args:
        g: the generated showers (any device; the work happens there).
        geometry: the binning.
        policy: ``"auto"``, ``"alpha-free"``, ``"nearest-free"``, ``"sum"``, ``"max"`` or ``"likelihood"``
            (see the module docstring; ``"likelihood"`` needs candidate points, ``g.oversample > 1``).
        generator: random numbers of ``"alpha-free"`` and ``"likelihood"`` (on the tensors' device).

    Returns:
        A :class:`Placed` with ``stats``: ``n_points, n_outside, n_collisions, n_moved, n_merged,
        n_dropped, n_moved_ring`` (ints; ``n_moved_ring``: points the model itself moved to another
        ring before placement, ``g.n_moved_ring``) and ``collision_rate`` (collisions / points inside).
    """
    if policy not in PLACEMENT_POLICIES:
        msg = f"collision policy must be one of {', '.join(PLACEMENT_POLICIES)}, got {policy!r}"
        raise ValueError(msg)
    if policy == "likelihood":
        return place_likelihood(g, geometry, generator=generator)
    if g.oversample != 1:
        msg = (f"these are {g.oversample}x candidate points for the 'likelihood' placement; policy {policy!r} "
               "needs the model's points (generate without oversampling)")
        raise ValueError(msg)
    if policy == "auto":
        policy = "alpha-free" if g.alpha is None else "nearest-free"
    device = g.E.device
    alpha = g.alpha
    if alpha is None and policy != "alpha-free":
        # α not modelled but another policy asked for: uniform angles, then that policy
        alpha = (torch.rand(g.E.shape[0], generator=generator, device=device, dtype=torch.float64) * 2 - 1) * math.pi
    b = g.counts.shape[0]
    n_vox = geometry.n_voxels
    shower = torch.repeat_interleave(torch.arange(b, device=device), g.counts.to(device))
    if shower.shape[0] != g.E.shape[0]:
        msg = f"generated showers: counts sum to {shower.shape[0]} points but E has {g.E.shape[0]}"
        raise ValueError(msg)
    inside, rb, cell = locate(geometry, g.layer, g.r, None if policy == "alpha-free" else alpha)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    n_outside = (~inside).sum()
    shower, cell, energy, rb, layer = shower[inside], cell[inside], g.E[inside], rb[inside], g.layer[inside]
    moved = dropped = zero
    if policy == "alpha-free":
        cell, merged = _alpha_free(geometry, shower, layer, rb, cell, generator)
        key = shower * n_vox + cell
        key, inv = torch.unique(key, return_inverse=True)
        e_out = torch.zeros(key.shape[0], dtype=energy.dtype, device=device).index_add_(0, inv, energy)
        collisions = merged
    else:
        key = shower * n_vox + cell
        order = torch.sort(key, stable=True).indices
        key, energy, cell, shower = key[order], energy[order], cell[order], shower[order]
        first = _winners(key, energy) if policy != "sum" else _first_of_groups(key)
        collisions = (~first).sum()
        if policy == "sum":
            key, inv = torch.unique_consecutive(key, return_inverse=True)
            e_out = torch.zeros(key.shape[0], dtype=energy.dtype, device=device).index_add_(0, inv, energy)
            merged = collisions
        elif policy == "max":
            key, e_out = key[first], energy[first]
            merged, dropped = zero, collisions
        else:
            key, e_out, moved, merged = _nearest_free(geometry, key, energy, cell, shower, first, b)
    counts = torch.bincount(torch.div(key, n_vox, rounding_mode="floor"), minlength=b)
    ring = torch.as_tensor(g.n_moved_ring, dtype=torch.int64, device=device)
    vals = torch.stack([n_outside, collisions, moved, merged, dropped, ring]).tolist()  # the one read-back
    n_points = int(g.E.shape[0])
    stats = {"n_points": n_points, **dict(zip(("n_outside", "n_collisions", "n_moved", "n_merged", "n_dropped",
                                               "n_moved_ring"), vals))}
    n_in = n_points - stats["n_outside"]
    stats["collision_rate"] = stats["n_collisions"] / n_in if n_in else 0.0
    return Placed(key % n_vox, e_out, counts, stats)


def _alpha_free(geometry: Geometry, shower: torch.Tensor, layer: torch.Tensor, rb: torch.Tensor, cell0: torch.Tensor,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """α bins without replacement per (shower, layer, r-bin) ring; returns ``(cell, n_merged)``."""
    device = shower.device
    t = cell_tables(geometry, device)
    p = shower.shape[0]
    if p == 0:
        return cell0, torch.zeros((), dtype=torch.int64, device=device)
    # ring of each point: the cell of α-bin 0 identifies (layer, r-bin); with the shower, the ring
    ring = shower * geometry.n_voxels + cell0
    # random order of the points within each ring: one integer sort of (ring, 24 random bits)
    u = torch.randint(0, 1 << 24, (p,), generator=generator, device=device)
    order = torch.sort(ring * (1 << 24) + u, stable=True).indices
    ring_s = ring[order]
    rings, ring_idx, n_in_ring = torch.unique_consecutive(ring_s, return_inverse=True, return_counts=True)
    start = torch.cumsum(n_in_ring, 0) - n_in_ring
    rank = torch.arange(p, device=device) - start[ring_idx]
    lay = layer[order]
    na = t["n_alpha"][lay]
    # one random permutation of the α bins of every occupied ring (padded to the widest layer)
    na_max = int(t["n_alpha"].max())
    ring_na = t["n_alpha"][t["cell_layer"][rings % geometry.n_voxels]]
    keys = torch.rand(rings.shape[0], na_max, generator=generator, device=device)
    keys = keys.masked_fill(torch.arange(na_max, device=device)[None, :] >= ring_na[:, None], 2.0)
    perm = torch.argsort(keys, dim=1)
    ab = perm[ring_idx, rank % na]                   # chunks of n_α: beyond the n_α-th point, bins repeat
    cell = torch.empty_like(cell0)
    cell[order] = cell0[order] + ab * t["n_r"][lay]
    return cell, (rank >= na).sum()


def _nearest_free(geometry: Geometry, key: torch.Tensor, energy: torch.Tensor, cell: torch.Tensor, shower: torch.Tensor,
                  first: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Winners keep their cells; the others move to the nearest free cell of their layer, most energetic first."""
    device = key.device
    n_vox = geometry.n_voxels
    win_key, win_e = key[first], energy[first]
    lose = ~first
    l_e, l_cell, l_shower, l_key = energy[lose], cell[lose], shower[lose], key[lose]
    o = torch.sort(l_e, descending=True, stable=True).indices
    l_e, l_cell, l_shower, l_key = l_e[o], l_cell[o], l_shower[o], l_key[o]
    zero = torch.zeros((), dtype=torch.int64, device=device)
    if l_e.shape[0] == 0:
        return win_key, win_e, zero, zero
    occupied = torch.zeros(b * n_vox, dtype=torch.bool, device=device)
    occupied[win_key] = True
    nbr = _neighbours(geometry, device)
    pending = torch.arange(l_e.shape[0], device=device)
    new_key, new_e = [], []
    for k in range(nbr.shape[1]):
        if pending.numel() == 0:
            break
        cand = nbr[l_cell[pending], k]
        ck = l_shower[pending] * n_vox + cand.clamp(min=0)
        ok = (cand >= 0) & ~occupied[ck]
        idx, ck = pending[ok], ck[ok]
        # several points may want the same free cell in this round: the most energetic (first) wins
        s = torch.sort(ck, stable=True)
        ck_s, idx_s = s.values, idx[s.indices]
        w = _first_of_groups(ck_s)
        ck_w, idx_w = ck_s[w], idx_s[w]
        occupied[ck_w] = True
        new_key.append(ck_w)
        new_e.append(l_e[idx_w])
        done = torch.zeros(l_e.shape[0], dtype=torch.bool, device=device)
        done[idx_w] = True
        pending = pending[~done[pending]]
    moved = torch.stack([x.new_tensor(x.shape[0]) for x in new_key]).sum() if new_key else zero
    keys = torch.cat([win_key, *new_key, l_key[pending]])
    es = torch.cat([win_e, *new_e, l_e[pending]])
    keys, inv = torch.unique(keys, return_inverse=True)    # the leftovers are added to their cells
    e_out = torch.zeros(keys.shape[0], dtype=es.dtype, device=device).index_add_(0, inv, es)
    return keys, e_out, moved, pending.new_tensor(pending.numel())


# ------------------------------------------------------------------------------------------- likelihood placement
#: weight of a cell with neither candidates nor density, per unit of its neighbours' weight: such cells are drawn
#: only when every other cell of the layer is certain (inclusion probability 1)
_FALLBACK = 1e-30
#: inclusion probabilities from 1 − 1e-9 up are certain (always chosen), so no interval of the systematic draw is
#: as long as its grid step, whatever the rounding of the cumulative sums
_CERTAIN = 1.0 - 1e-9
#: the start of the systematic grid is ``u × (1 − 2⁻³⁰)``: its last point stays below the total after rounding
_U_SCALE = 1.0 - 2.0 ** -30


def inclusion_probabilities(weight: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    r"""Inclusion probabilities proportional to ``weight``, capped at 1, summing to ``n`` in every row.

    ``π_c = min(1, λ w_c)`` with the ``λ`` of each row that makes ``Σ_c π_c = n``: cells whose
    share ``n w_c / Σ w`` exceeds 1 become certain and their excess is spread over the others in
    proportion to their weights, again and again until no ``π`` exceeds 1. In closed form: with the
    weights of a row sorted down, ``w_(1) ≥ w_(2) ≥ …``, the number of certain cells is the smallest
    ``m`` with ``(n − m) w_(m+1) ≤ Σ_{j>m} w_(j)``, and ``λ = (n − m) / Σ_{j>m} w_(j)``. One sort and
    one cumulative sum per row; no loop, no data-dependent shape.

    Args:
        weight: non-negative weights (0: never chosen, e.g. padding), float.
        n: cells to choose in each row, ``0 ≤ n ≤`` the row's number of positive weights (not checked:
            a row with fewer positive weights gets ``Σ π < n``).

    Returns:
        ``π``, the shape and dtype of ``weight``.

    Shapes:
        weight: ``(..., C)``; n: ``(...)``.
    """
    c = weight.shape[-1]
    ws, idx = torch.sort(weight, dim=-1, descending=True)
    tail = ws.flip(-1).cumsum(-1).flip(-1)                             # Σ_{j ≥ m} w_(j), summed from the smallest
    m = torch.arange(c, device=weight.device, dtype=weight.dtype)
    nf = n.to(weight.dtype)[..., None]
    ok = ((nf - m) * ws <= tail) | (m >= nf)
    m_star = torch.argmax(ok.to(torch.int32), dim=-1, keepdim=True)  # the first m that holds
    lam = (nf - m_star.to(weight.dtype)) / tail.gather(-1, m_star).clamp(min=torch.finfo(weight.dtype).tiny)
    pi_sorted = torch.where(m < m_star.to(weight.dtype), torch.ones_like(ws), (lam * ws).clamp(max=1.0))
    return torch.empty_like(weight).scatter_(-1, idx, pi_sorted)


def systematic_sample(pi: torch.Tensor, n: torch.Tensor, *, u: torch.Tensor | None = None,
                      order: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Exactly ``n`` cells per row, cell ``c`` included with probability ``π_c``: systematic πps in a random order.

    The cells of a row are put in a random order (``order``: argsort of uniform keys); the cells
    with ``π ≥ 1 − 10⁻⁹`` are always chosen, the others cover consecutive intervals of lengths ``π_c``
    on ``[0, n')`` (``n'`` = ``n`` minus the certain cells, the lengths rescaled to sum to exactly
    ``n'``); the grid ``u, u + 1, …, u + n' − 1`` with one uniform ``u`` per row picks the cells whose
    intervals it hits. An interval of length ``π_c < 1`` holds a grid point with probability ``π_c``
    whatever the order, and never two, so the design is exact: ``P(c chosen) = π_c`` (up to 1e-9)
    and exactly ``n`` distinct cells; the random order makes the joint choice of two cells depend
    on them only through ``π`` (a fixed order would tie neighbours in the list together).

    A pure tensor function (sort, gather, cumsum, ceil, scatter), traceable: with ``u`` and ``order``
    given it draws nothing.

    Args:
        pi: inclusion probabilities in ``[0, 1]`` summing to ``n`` per row (:func:`inclusion_probabilities`).
        n: cells per row.
        u: ``(...)`` uniform in ``[0, 1)``, the grid start (drawn when None).
        order: ``(..., C)`` keys whose ascending order is the random order of the cells (uniform keys
            drawn when None).
        generator: random numbers when ``u`` or ``order`` is None.

    Returns:
        A bool mask of the chosen cells, the shape of ``pi``.

    Shapes:
        pi: ``(..., C)``; n: ``(...)``.
    """
    dt = torch.float64
    pi = pi.to(dt)
    certain = pi >= _CERTAIN
    rest = torch.where(certain, torch.zeros_like(pi), pi)
    n_rest = (n.to(torch.int64) - certain.sum(-1)).clamp(min=0).to(dt)[..., None]
    if order is None:
        order = torch.rand(pi.shape, generator=generator, device=pi.device, dtype=dt)
    if u is None:
        u = torch.rand(pi.shape[:-1], generator=generator, device=pi.device, dtype=dt)
    perm = torch.argsort(order, dim=-1)
    s = rest.gather(-1, perm).cumsum(-1)
    s = s * (n_rest / s[..., -1:].clamp(min=torch.finfo(dt).tiny))     # the total is exactly n'
    hits = torch.ceil(s - u.to(dt)[..., None] * _U_SCALE).clamp(min=0).minimum(n_rest)   # grid points below s
    first = torch.cat([hits[..., :1] > 0, hits[..., 1:] > hits[..., :-1]], -1)
    return torch.zeros_like(certain).scatter_(-1, perm, first) | certain


def _likelihood_tables(geometry: Geometry, device: torch.device) -> dict[str, torch.Tensor]:
    """Per cell: its ring (the cell of α-bin 0 of its (layer, r-bin)) and 1/n_α of its layer; per layer the
    cells, padded with ``n_voxels``, ``(L, C_max)``, and their number ``(L,)``. Cached on the geometry."""
    key = f"torch-likelihood:{device}"
    t = geometry._cache.get(key)
    if t is not None:
        return t
    lay = np.asarray(geometry.cell_layer, dtype=np.int64)
    off = np.asarray(geometry.offsets, dtype=np.int64)
    n_r = np.asarray(geometry.n_r, dtype=np.int64)[lay]
    cells = np.arange(geometry.n_voxels, dtype=np.int64)
    ring = off[lay] + (cells - off[lay]) % n_r
    per_layer = np.diff(off)
    table = np.full((geometry.n_layers, int(per_layer.max())), geometry.n_voxels, dtype=np.int64)
    for i in range(geometry.n_layers):
        table[i, :per_layer[i]] = np.arange(off[i], off[i + 1])
    inv_na = 1.0 / np.asarray(geometry.n_alpha, dtype=np.float64)[lay]
    t = {"ring": torch.as_tensor(ring, device=device), "inv_na": torch.as_tensor(inv_na, device=device),
         "layer_cells": torch.as_tensor(table, device=device), "per_layer": torch.as_tensor(per_layer, device=device)}
    geometry._cache[key] = t
    return t


def place_likelihood(g: GeneratedShowers, geometry: Geometry, *, generator: torch.Generator | None = None,
                     neighbours: int = 8, floor: float = 1e-9) -> Placed:
    r"""Cell-likelihood placement: each cell of a layer chosen with the probability that the model hits it.

    A model trained on showers with at most one point per cell learns a density ``q`` of a point
    over the cells of a layer with ``n_l q_c = π_c``, the probability that cell ``c`` is hit. For
    every shower and layer this draws exactly ``n_l`` distinct cells with inclusion probabilities
    ``π_c = min(1, λ q_c)`` (:func:`inclusion_probabilities`: ``λ = n_l`` unless a cell would exceed
    1, whose excess then goes to the others) by systematic sampling in a random order
    (:func:`systematic_sample`). ``q`` comes from the model:

    * **density** (``g.cell_mass``, CaloPointFlow II): the mass of each cell integrated from the
      point flow's density; ``g`` holds the model's ``n_l`` points per layer, whose energies go to
      the chosen cells by rank: the points of a (shower, layer) sorted by radius, the chosen cells
      by the radius of their ring (random among equals), the ``i``-th energy to the ``i``-th cell.
      So the energy-vs-radius correlation of the model carries over and the point energies are
      kept as they are (their layer sums included);
    * **candidates** (``g.oversample = K``): ``K n_l`` points per layer, ``q_c`` their share in the
      cell (``alpha`` None: the ring's share spread evenly over its α bins). Each chosen cell gets
      the energy of one of its candidates drawn uniformly (the energy of a point given its cell);
      the estimate ``q̂`` is noisy: a cell with ``π = 1`` is left out whenever fewer than ``K`` of
      its candidates fall in it (about ``1 / √(2π K)`` of the time).

    A cell without candidates (or mass) is drawn only when all the others of its layer are certain
    (``n_fallback``; weight ``Σ_{j ≤ neighbours} w_j + δ`` over its nearest cells, so next to the
    others first); with candidates it gets the lowest candidate energy of the layer. The energies of
    each layer are rescaled to ``g.layer_energy`` (to the candidates' layer sum / K when None).

    Torch operations on the device of ``g``: sorts, scatters, cumulative sums, no data-dependent
    shapes (the number of placed points is ``P / K``, known from the shapes) and one read of the
    statistics at the end, which also carries the consistency checks. Memory: a few
    ``B × L × (most cells of a layer)`` float64 tensors.

    Args:
        g: the model's points with ``layer_counts`` (and ``layer_energy``) and either ``cell_mass``
            or ``oversample`` ``K ≥ 1`` candidates per point.
        geometry: the binning.
        generator: random numbers (order and start of the systematic draw, candidate choice, ties).
        neighbours: nearest cells of the same layer whose weight lends weight to a cell without any.
        floor: ``δ`` above.

    Returns:
        A :class:`Placed` (sorted by shower and cell) with ``stats``: ``n_points`` (placed),
        ``n_candidates``, ``n_candidates_outside``, ``n_fallback``, ``n_certain`` (cells with
        ``π = 1``) and ``n_outside, n_collisions, n_moved, n_merged, n_dropped, n_moved_ring`` (all 0)
        and ``collision_rate`` 0.

    Raises:
        ValueError: ``g`` has no ``layer_counts``; ``layer_counts`` or ``cell_mass`` has the wrong shape;
            the number of points of a (shower, layer) is not ``K n_l`` (or ``g.counts`` does not add up
            to the points); a layer asks for more points than it has cells.
    """
    density = g.cell_mass is not None
    if g.layer_counts is None or g.oversample < 1:
        msg = ("the 'likelihood' placement needs points with per-layer counts and cell masses or candidates "
               "(GeneratedShowers.layer_counts, cell_mass or oversample, from a model's generate(..., oversample=K)); "
               "this model output has none")
        raise ValueError(msg)
    device = g.E.device
    k = int(g.oversample)
    b = int(g.counts.shape[0])
    n_vox, n_l = geometry.n_voxels, geometry.n_layers
    p = int(g.E.shape[0])
    n_cnt = g.layer_counts.to(device=device, dtype=torch.int64)
    if tuple(n_cnt.shape) != (b, n_l):
        msg = f"likelihood placement: layer_counts has shape {tuple(n_cnt.shape)}, expected ({b}, {n_l})"
        raise ValueError(msg)
    if density and (k != 1 or tuple(g.cell_mass.shape) != (b, n_vox)):
        msg = (f"likelihood placement: cell_mass of shape {tuple(g.cell_mass.shape)} with oversample={k}; expected "
               f"({b}, {n_vox}) with oversample=1 (the model's points, no candidates)")
        raise ValueError(msg)
    if p % k:
        msg = f"likelihood placement: {p} candidate points is not a multiple of oversample={k}"
        raise ValueError(msg)
    n_total = p // k                                              # from the shapes: no host read
    t = cell_tables(geometry, device)
    lt = _likelihood_tables(geometry, device)
    ring_mode = g.alpha is None
    f64 = torch.float64
    i64 = dict(dtype=torch.int64, device=device)
    # the shower of every point without a read: points beyond Σ counts get shower b (flagged below)
    ends = torch.cumsum(g.counts.to(**i64), 0)
    shower = torch.searchsorted(ends, torch.arange(p, **i64), right=True)
    valid = (shower < b) & (g.layer >= 0) & (g.layer < n_l)
    shower = shower.clamp(max=max(b - 1, 0))
    lay = g.layer.clamp(0, n_l - 1)
    grp = torch.where(valid, shower * n_l + lay, torch.full_like(shower, b * n_l))
    # consistency, read with the statistics: K n_l points in every (shower, layer), n_l ≤ cells of the layer
    in_grp = torch.zeros(b * n_l + 1, **i64).index_add_(0, grp, torch.ones_like(grp))
    total = torch.cat([ends.new_zeros(1), ends])[-1]
    n_bad = (in_grp[:b * n_l] != (n_cnt * k).reshape(-1)).sum() + in_grp[b * n_l] + (total != p).to(torch.int64)
    cap = lt["per_layer"]
    n_over = ((n_cnt > cap) | (n_cnt < 0)).sum()
    n_eff = n_cnt.clamp(min=0).minimum(cap)                       # keeps the work in range until the check
    inside, _, cell = locate(geometry, g.layer, g.r, g.alpha)
    inside &= valid
    dump = b * n_vox
    # the weight of every cell: its mass, or its candidates (ring mode: the ring's, spread over its α bins)
    if density:
        w2 = g.cell_mass.to(device=device, dtype=f64)
        w2 = torch.where(torch.isfinite(w2) & (w2 > 0), w2, torch.zeros_like(w2))
    else:
        ckey = torch.where(inside, shower * n_vox + cell, torch.full_like(cell, dump))
        cnt = torch.zeros(dump + 1, dtype=f64, device=device).index_add_(0, ckey, torch.ones(p, dtype=f64, device=device))
        w2 = cnt[:dump].view(b, n_vox)
        w2 = w2[:, lt["ring"]] * lt["inv_na"] if ring_mode else w2
    have = w2 > 0
    nbr = _neighbours(geometry, device)[:, :neighbours]
    near = torch.zeros_like(w2)
    for j in range(nbr.shape[1]):
        col = nbr[:, j]
        near += torch.where(col >= 0, w2[:, col.clamp(min=0)], torch.zeros((), dtype=f64, device=device))
    weight = torch.where(have, w2, _FALLBACK * (near + floor))
    table = lt["layer_cells"]                                     # (L, C), padded with n_vox
    c_max = table.shape[1]
    pad = lambda x, v: torch.cat([x, x.new_full((b, 1), v)], 1)[:, table]  # noqa: E731  (B, L, C), padding v
    pi = inclusion_probabilities(pad(weight, 0.0), n_eff)
    chosen = systematic_sample(pi, n_eff, generator=generator)    # (B, L, C), cells in increasing order
    n_fallback = (chosen & ~pad(have, False)).sum()
    n_certain = (pi >= _CERTAIN).sum()
    # compaction without a host read: the i-th chosen cell goes to slot i, the others to slot n_total
    flat = chosen.reshape(-1)
    pos = torch.cumsum(flat.to(torch.int64), 0) - 1
    slot = torch.where(flat & (pos < n_total), pos, torch.full_like(pos, n_total))
    cell_all = (table[None].expand(b, n_l, c_max) + torch.arange(b, device=device)[:, None, None] * n_vox).reshape(-1)
    out_key = torch.zeros(n_total + 1, **i64).scatter_(0, slot, cell_all)[:n_total]
    out_shower = torch.div(out_key, n_vox, rounding_mode="floor")
    out_cell = (out_key - out_shower * n_vox).clamp(max=n_vox - 1)
    lay_out = t["cell_layer"][out_cell]
    grp_out = out_shower * n_l + lay_out
    if density:
        e_cell = _energies_by_radius(g, grp, out_cell, grp_out, t, generator)
    else:
        e_cell = _energies_of_candidates(g, n_vox, inside, shower, cell, grp, out_key, out_shower, out_cell, grp_out,
                                         lt, ring_mode, generator)
    e_cell = e_cell.clamp(min=1e-300)
    if g.layer_energy is not None:
        target = g.layer_energy.to(device=device, dtype=e_cell.dtype).reshape(-1)
    else:
        target = torch.zeros(b * n_l + 1, dtype=e_cell.dtype, device=device).index_add_(
            0, grp, g.E.to(e_cell.dtype))[:b * n_l] / k
    tot = torch.zeros(b * n_l, dtype=e_cell.dtype, device=device).index_add_(0, grp_out, e_cell)
    energy = e_cell * (target / tot.clamp(min=1e-300))[grp_out]
    counts = n_eff.sum(1)
    n_out, n_fb, n_cert, bad, over, n_sum = torch.stack(   # the one read-back
        [(~inside).sum(), n_fallback, n_certain, n_bad, n_over, n_cnt.sum()]).tolist()
    if over:
        msg = (f"likelihood placement: layer_counts ask for more points than the layer has cells (or fewer than 0) "
               f"in {over} (shower, layer) pairs; geometry {geometry.name!r} has at most {int(cap.max())} cells per "
               "layer")
        raise ValueError(msg)
    if bad:
        what = "candidate points" if k > 1 else "points"
        msg = (f"likelihood placement: {p} {what} do not match layer_counts (K={k} × Σ n_l = {k * n_sum}; "
               f"{bad} (shower, layer) groups hold another number of points or g.counts does not add up to {p})")
        raise ValueError(msg)
    stats = {"n_points": n_total, "n_candidates": p, "n_candidates_outside": n_out, "n_fallback": n_fb,
             "n_certain": n_cert, "n_outside": 0, "n_collisions": 0, "n_moved": 0, "n_merged": 0, "n_dropped": 0,
             "n_moved_ring": 0, "collision_rate": 0.0}
    return Placed(out_cell, energy, counts, stats)


def _energies_by_radius(g: GeneratedShowers, grp: torch.Tensor, out_cell: torch.Tensor, grp_out: torch.Tensor,
                        t: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
    """Energies of the chosen cells by rank: the ``i``-th point of a (shower, layer) by radius gives its energy
    to the ``i``-th chosen cell of it by the radius of the cell's ring (random among equal radii)."""
    o = torch.argsort(g.r.to(torch.float64), stable=True)
    o = o[torch.argsort(grp[o], stable=True)]                     # by group, then radius (invalid groups last)
    n = out_cell.shape[0]
    c = torch.argsort(torch.rand(n, generator=generator, device=out_cell.device, dtype=torch.float64))
    c = c[torch.argsort(t["cell_r"][out_cell[c]], stable=True)]
    c = c[torch.argsort(grp_out[c], stable=True)]                 # by group, then ring radius, ties at random
    e = torch.empty(n, dtype=g.E.dtype, device=g.E.device)
    e[c] = g.E[o[:n]]
    return e


def _energies_of_candidates(g: GeneratedShowers, n_vox: int, inside: torch.Tensor, shower: torch.Tensor,
                            cell: torch.Tensor, grp: torch.Tensor, out_key: torch.Tensor, out_shower: torch.Tensor,
                            out_cell: torch.Tensor, grp_out: torch.Tensor, lt: dict[str, torch.Tensor], ring_mode: bool,
                            generator: torch.Generator | None) -> torch.Tensor:
    """Energy of every chosen cell: one of its candidates (of its ring with ``alpha`` None) drawn uniformly; the
    lowest candidate energy of the layer for a cell without candidates."""
    device = g.E.device
    b = int(g.counts.shape[0])
    p, n_total = g.E.shape[0], out_key.shape[0]
    n_l = lt["layer_cells"].shape[0]
    dump = b * n_vox
    bkey = out_shower * n_vox + lt["ring"][out_cell] if ring_mode else out_key
    if ring_mode:
        of = torch.where(inside, shower * n_vox + lt["ring"][cell.clamp(min=0)], torch.full_like(cell, dump))
    else:
        of = torch.where(inside, shower * n_vox + cell, torch.full_like(cell, dump))
    skey, sidx = torch.sort(of)
    e_sorted = g.E[sidx]
    start = torch.searchsorted(skey, bkey)
    n_bin = torch.searchsorted(skey, bkey, right=True) - start
    pick = start + (torch.rand(n_total, generator=generator, device=device, dtype=torch.float64)
                    * n_bin.to(torch.float64)).to(torch.int64).clamp(max=(n_bin - 1).clamp(min=0))
    e_pick = e_sorted[pick.clamp(max=max(p - 1, 0))] if p else g.E.new_zeros(n_total)
    c_grp = torch.where(inside, grp, torch.full_like(grp, b * n_l))
    e_min = torch.full((b * n_l + 1,), math.inf, dtype=g.E.dtype, device=device).scatter_reduce(
        0, c_grp, g.E, "amin", include_self=True)[:b * n_l]
    e_min = torch.where(torch.isfinite(e_min), e_min, torch.ones_like(e_min))
    return torch.where(n_bin == 0, e_min[grp_out], e_pick)
