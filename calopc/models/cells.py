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

Points outside the calorimeter (layer out of range, radius outside the layer's edges,
non-finite coordinates) are not placed and are counted in ``n_outside``. The same
``torch.Generator`` state gives the same placement.
"""

from __future__ import annotations

__all__ = ["PLACEMENT_POLICIES", "GeneratedShowers", "Placed", "cell_tables", "locate", "place"]

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..geometry import Geometry

PLACEMENT_POLICIES = ("auto", "alpha-free", "nearest-free", "sum", "max")


@dataclass
class GeneratedShowers:
    """Generated showers as flat points, shower after shower, on the model's device.

    Shapes:
        counts: ``(B,)`` int64 points per shower; layer: ``(P,)`` int64; r: ``(P,)`` mm;
        alpha: ``(P,)`` rad or None (α not modelled: drawn at placement); E: ``(P,)`` MeV.
    """

    counts: torch.Tensor
    layer: torch.Tensor
    r: torch.Tensor
    alpha: torch.Tensor | None
    E: torch.Tensor

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
        return GeneratedShowers(self.counts.to(device), self.layer.to(device), self.r.to(device),
                                None if self.alpha is None else self.alpha.to(device), self.E.to(device))

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
        policy: ``"auto"``, ``"alpha-free"``, ``"nearest-free"``, ``"sum"`` or ``"max"`` (see the module docstring).
        generator: random numbers of ``"alpha-free"`` (on the tensors' device).

    Returns:
        A :class:`Placed` with ``stats``: ``n_points, n_outside, n_collisions, n_moved, n_merged,
        n_dropped`` (ints) and ``collision_rate`` (collisions / points inside).
    """
    if policy not in PLACEMENT_POLICIES:
        msg = f"collision policy must be one of {', '.join(PLACEMENT_POLICIES)}, got {policy!r}"
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
    vals = torch.stack([n_outside, collisions, moved, merged, dropped]).tolist()  # the one read-back
    n_points = int(g.E.shape[0])
    stats = {"n_points": n_points, **dict(zip(("n_outside", "n_collisions", "n_moved", "n_merged", "n_dropped"), vals))}
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
