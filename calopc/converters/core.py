r"""Voxel showers ⇄ ragged point clouds (one point per non-empty cell)."""

from __future__ import annotations

__all__ = ["COLLISION_POLICIES", "VoxelizeStats", "neighbour_table", "points_to_voxels", "voxels_to_points"]

from dataclasses import asdict, dataclass

import awkward as ak
import numpy as np

from ..geometry import Geometry, detect_geometry, resolve_threshold

#: Policies for several points in one cell (the same names as ``calopc generate``). ``"auto"``: ``"sum"``
#: for points that carry their ``cell`` (converted files: energy conserving, exact), ``"nearest-free"``
#: for continuous points (model output), as ``calopc generate`` does for points with an angle.
#: ``"alpha-free"`` ignores the stored angle and draws the α bins of each (layer, r-bin) ring without
#: replacement.
COLLISION_POLICIES = ("auto", "alpha-free", "nearest-free", "sum", "max")

#: Fields of a point record, in order.
POINT_FIELDS = ("r", "alpha", "z", "E", "cell")


def voxels_to_points(
    showers: np.ndarray,
    geometry: Geometry | None = None,
    *,
    incident_energies: np.ndarray | None = None,
    threshold: float = 0.0,
) -> ak.Array:
    """Turn dense voxel showers into one ragged point cloud per shower.

    Every cell with energy ``> threshold`` becomes one point. Empty showers are kept
    as empty lists.

    Args:
        showers: ``(N, n_voxels)`` energies in MeV, in the official flat order.
        geometry: the binning; detected from ``n_voxels`` when omitted.
        incident_energies: ``(N,)`` or ``(N, 1)`` MeV; NaN when omitted.
        threshold: cells below this energy (MeV) are not turned into points (zero cells never are).
            Defaults to 0 (every non-zero cell), which makes the conversion exact. Same meaning
            as in :func:`points_to_voxels` and the official evaluation (``E < threshold`` → 0).

    Returns:
        An awkward Array of ``N`` records with fields ``incident_energy`` (float64)
        and ``points``, a list of records ``r, alpha, z`` (float32; cell centre: mm,
        rad, layer ordinal), ``E`` (MeV, the dtype of ``showers`` so the inverse is
        bit-exact) and ``cell`` (int32 flat voxel index).

    Raises:
        ValueError: a cell holds NaN, an infinite or a negative energy, or an incident energy
            is not finite and > 0 (the rule of every file reader); the message names the first
            shower, cell and value. Nothing is dropped silently.

    Example:
        >>> import numpy as np
        >>> from calopc.converters import voxels_to_points, points_to_voxels
        >>> v = np.zeros((2, 6480)); v[0, [3, 200]] = [1.5, 0.25]
        >>> ev = voxels_to_points(v, incident_energies=[1e3, 2e3])
        >>> ev.points.cell.tolist()
        [[3, 200], []]
        >>> bool((points_to_voxels(ev) == v).all())
        True
    """
    showers = np.asarray(showers)
    if showers.ndim != 2:
        msg = f"showers must have shape (N, n_voxels), got {showers.shape}"
        raise ValueError(msg)
    n, n_vox = showers.shape
    if geometry is None:
        geometry = detect_geometry(n_vox)
    elif geometry.n_voxels != n_vox:
        msg = f"showers must have shape (N, {geometry.n_voxels}) for geometry {geometry.name!r}, got {showers.shape}"
        raise ValueError(msg)
    threshold = resolve_threshold(threshold, geometry)
    if showers.dtype.kind != "f":
        showers = showers.astype(np.float64)
    if incident_energies is None:
        inc = np.full(n, np.nan)
    else:
        inc = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
        if inc.shape[0] != n:
            msg = f"incident_energies has {inc.shape[0]} entries but showers has {n} rows"
            raise ValueError(msg)
        bad = ~np.isfinite(inc) | (inc <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (f"incident_energies: {int(bad.sum())} of {n} are NaN, infinite or <= 0 (first: shower {i}, {inc[i]}); "
                   "expected finite energies > 0 MeV")
            raise ValueError(msg)

    flat = showers.reshape(-1)
    if flat.size and not (flat.min() >= 0 and np.isfinite(flat.max())):  # NaN fails >= too: two passes, no copies
        bad = ~np.isfinite(flat) | (flat < 0)
        j = int(np.flatnonzero(bad)[0])
        what = "negative" if np.isfinite(flat[j]) else "non-finite"
        msg = (f"showers: {int(bad.sum())} cells hold NaN, infinite or negative energies (first: shower {j // n_vox}, "
               f"cell {j % n_vox}, {what} value {flat[j]}); expected finite energies >= 0 MeV")
        raise ValueError(msg)
    mask = flat > 0 if threshold <= 0 else flat >= threshold
    counts = np.count_nonzero(mask.reshape(n, n_vox), axis=1)
    nz = np.flatnonzero(mask)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    cell = nz - np.repeat(np.arange(n, dtype=np.int64) * n_vox, counts)
    cell = cell.astype(np.int32)
    tables = _coordinate_tables(geometry)
    fields = {
        "r": tables["r"][cell],
        "alpha": tables["alpha"][cell],
        "z": tables["z"][cell],
        "E": flat[nz],
        "cell": cell,
    }
    return _build_events(inc, offsets, fields)


def _coordinate_tables(geometry: Geometry) -> dict[str, np.ndarray]:
    t = geometry._cache.get("f32")
    if t is None:
        t = {
            "r": geometry.cell_r.astype(np.float32),
            "alpha": geometry.cell_alpha.astype(np.float32),
            "z": geometry.cell_z.astype(np.float32),
        }
        geometry._cache["f32"] = t
    return t


def _build_events(incident: np.ndarray, offsets: np.ndarray, fields: dict[str, np.ndarray]) -> ak.Array:
    c = ak.contents
    rec = c.RecordArray([c.NumpyArray(v) for v in fields.values()], list(fields))
    pts = c.ListOffsetArray(ak.index.Index64(offsets), rec)
    top = c.RecordArray([c.NumpyArray(np.asarray(incident, dtype=np.float64)), pts], ["incident_energy", "points"])
    return ak.Array(top)


@dataclass
class VoxelizeStats:
    """What happened when points were put back into cells."""

    n_showers: int = 0
    n_points: int = 0
    n_outside: int = 0  # points outside the calorimeter: not written
    n_collisions: int = 0  # points that fell in a cell another point of the shower already held
    n_moved: int = 0  # collisions moved to a free neighbouring cell (policy "nearest-free")
    n_merged: int = 0  # collisions summed into the cell (policy "sum", or "nearest-free" with no free neighbour)
    n_dropped: int = 0  # collisions discarded (policy "max")
    n_below_threshold: int = 0  # filled cells zeroed by the threshold

    def __iadd__(self, other: VoxelizeStats) -> VoxelizeStats:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)
        return self

    @property
    def collision_rate(self) -> float:
        """Colliding points / points inside the calorimeter."""
        inside = self.n_points - self.n_outside
        return self.n_collisions / inside if inside else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "collision_rate": self.collision_rate}

    def __str__(self) -> str:
        return (f"{self.n_showers} showers, {self.n_points} points: {self.n_outside} outside, "
                f"{self.n_collisions} collisions ({100 * self.collision_rate:.2f}%; moved {self.n_moved}, "
                f"merged {self.n_merged}, dropped {self.n_dropped}), {self.n_below_threshold} cells below threshold")


def _points_of(events: ak.Array) -> ak.Array:
    fields = ak.fields(events)
    if "points" in fields:
        return events["points"]
    return events


def points_to_voxels(
    events: ak.Array,
    geometry: Geometry | None = None,
    *,
    collisions: str = "sum",
    threshold: float = 0.0,
    use_cells: bool | None = None,
    dtype: np.dtype | type | None = None,
    return_stats: bool = False,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray | tuple[np.ndarray, VoxelizeStats]:
    """Put point clouds back into dense voxel showers.

    Points that carry a ``cell`` index go back to that cell (bit-exact inverse of
    :func:`voxels_to_points`). Points without one (model output) are binned by their
    ``(z, r, alpha)`` coordinates: layer ``round(z)``, α modulo 2π, the layer's r-edges.

    Args:
        events: records with a ``points`` field (as from :func:`voxels_to_points`), or
            the ragged points themselves; each point needs ``E`` and either ``cell``
            or ``r, alpha, z``.
        geometry: the binning. Required unless every point has a ``cell`` and the
            geometry can be detected.
        collisions: what to do when several points of a shower fall in one cell:
            ``"auto"`` is ``"sum"`` for points with a ``cell`` and ``"nearest-free"`` otherwise;
            ``"sum"`` adds their energies (energy conserving); ``"max"`` keeps the most
            energetic point and drops the others; ``"nearest-free"`` keeps the most
            energetic one and moves each other point to the nearest empty cell of the
            same layer (falling back to ``"sum"`` if none is free within the 24 nearest);
            ``"alpha-free"`` keeps each point's layer and r-bin, ignores its α and gives the
            points of a ring distinct α bins drawn at random (summing only when a ring holds
            more points than α bins).
        threshold: cells whose final energy is below this (MeV) are set to 0 (finite, >= 0;
            ``"official"``: the geometry's readout threshold).
        use_cells: use the ``cell`` field (default: when present).
        dtype: output dtype; defaults to the dtype of ``E``.
        return_stats: also return a :class:`VoxelizeStats`.
        rng: random numbers of ``"alpha-free"`` (a Generator or a seed; default: seed 0).

    Returns:
        ``(N, n_voxels)`` array, or ``(array, stats)``.
    """
    if collisions not in COLLISION_POLICIES:
        msg = f"collisions must be one of {', '.join(COLLISION_POLICIES)}, got {collisions!r}"
        raise ValueError(msg)
    threshold = resolve_threshold(threshold, geometry)
    pts = _points_of(events)
    fields = set(ak.fields(pts))
    if "E" not in fields:
        msg = f"points need an 'E' field (MeV); found fields {sorted(fields)}"
        raise ValueError(msg)
    if use_cells is None:
        use_cells = "cell" in fields
    if use_cells and "cell" not in fields:
        msg = f"use_cells=True but points have no 'cell' field; found {sorted(fields)}"
        raise ValueError(msg)
    if not use_cells and not {"r", "alpha", "z"} <= fields:
        msg = f"points without 'cell' need 'r', 'alpha' and 'z' fields; found {sorted(fields)}"
        raise ValueError(msg)
    if collisions == "auto":
        collisions = "sum" if use_cells else "nearest-free"
    if geometry is None:
        if not use_cells:
            msg = "a geometry is needed to bin continuous points"
            raise ValueError(msg)
        msg = "pass the geometry explicitly (point clouds do not carry their voxel count)"
        raise ValueError(msg)

    counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
    n = counts.shape[0]
    n_vox = geometry.n_voxels
    e = np.asarray(ak.flatten(pts["E"], axis=None))
    if dtype is None:
        dtype = e.dtype if e.dtype.kind == "f" else np.float64
    stats = VoxelizeStats(n_showers=n, n_points=int(e.shape[0]))
    bad = ~np.isfinite(e)
    if bad.any():
        msg = f"{int(bad.sum())} of {e.shape[0]} points have non-finite energy E; expected finite MeV"
        raise ValueError(msg)
    if (e < 0).any():
        msg = f"{int((e < 0).sum())} of {e.shape[0]} points have negative energy E (min {e.min()}); expected >= 0 MeV"
        raise ValueError(msg)

    if use_cells:
        cell = np.asarray(ak.flatten(pts["cell"], axis=None)).astype(np.int64)
        cell = np.where((cell >= 0) & (cell < n_vox), cell, -1)
    else:
        r, a, z = (np.asarray(ak.flatten(pts[f], axis=None)) for f in ("r", "alpha", "z"))
        if collisions == "alpha-free":  # α is not used: any finite angle finds the ring
            a = np.where(np.isfinite(a), a, 0.0)
        cell = geometry.locate(r, a, z)
    ev = np.repeat(np.arange(n, dtype=np.int64), counts)

    inside = cell >= 0
    stats.n_outside = int((~inside).sum())
    ev, cell, e = ev[inside], cell[inside], e[inside]
    if collisions == "alpha-free":
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        cell = _alpha_free_cells(ev, cell, geometry, gen)
        collisions = "sum"

    out = np.zeros(n * n_vox, dtype=dtype)
    key = ev * n_vox + cell
    if key.size > 1 and not (key[1:] > key[:-1]).all():  # not strictly increasing: there may be collisions
        shared = np.bincount(key, minlength=n * n_vox)[key] > 1
    else:
        shared = np.zeros(key.shape[0], dtype=bool)
    single = ~shared
    out[key[single]] = e[single]
    if shared.any():
        # cells holding several points: the most energetic point keeps the cell
        key, e, cell, ev = key[shared], e[shared], cell[shared], ev[shared]
        order = np.lexsort((-e, key))
        key, e, cell, ev = key[order], e[order], cell[order], ev[order]
        first = np.ones(key.shape[0], dtype=bool)
        first[1:] = key[1:] != key[:-1]
        out[key[first]] = e[first]
        losers = ~first
        stats.n_collisions = int(losers.sum())
        lk, le = key[losers], e[losers]
        if collisions == "sum":
            np.add.at(out, lk, le.astype(dtype))
            stats.n_merged = stats.n_collisions
        elif collisions == "max":
            stats.n_dropped = stats.n_collisions
        else:
            moved, merged = _place_nearest_free(out, ev[losers], cell[losers], le, geometry)
            stats.n_moved, stats.n_merged = moved, merged
    if threshold > 0:
        low = (out > 0) & (out < threshold)
        stats.n_below_threshold = int(low.sum())
        out[low] = 0
    out = out.reshape(n, n_vox)
    return (out, stats) if return_stats else out


def _alpha_free_cells(ev: np.ndarray, cell: np.ndarray, geometry: Geometry, rng: np.random.Generator) -> np.ndarray:
    """New cells: each point keeps its layer and r-bin; the points of a (shower, layer, r-bin) ring get α bins
    drawn without replacement (after ``n_α`` points of a ring the bins repeat, and those points are summed)."""
    if cell.size == 0:
        return cell
    n_alpha = np.asarray(geometry.n_alpha, dtype=np.int64)
    n_r = np.asarray(geometry.n_r, dtype=np.int64)
    layer = geometry.cell_layer[cell].astype(np.int64)
    rbin = geometry.cell_r_bin[cell].astype(np.int64)
    ring0 = geometry.offsets[layer] + rbin  # the cell of α bin 0 names the ring
    key = ev * geometry.n_voxels + ring0
    order = np.lexsort((rng.random(key.shape[0]), key))  # random order of the points inside each ring
    ks = key[order]
    new = np.ones(ks.shape[0], dtype=bool)
    new[1:] = ks[1:] != ks[:-1]
    start = np.flatnonzero(new)
    ring_of = np.cumsum(new) - 1
    rank = np.arange(ks.shape[0]) - start[ring_of]
    lay = layer[order]
    na = n_alpha[lay]
    na_max = int(n_alpha.max())
    ring_na = na[start]
    abin = np.empty(ks.shape[0], dtype=np.int64)
    step = max(1, (1 << 22) // na_max)  # rings per batch: bounded memory for the random permutations
    for lo in range(0, start.shape[0], step):
        hi = min(lo + step, start.shape[0])
        u = rng.random((hi - lo, na_max), dtype=np.float32)
        u[np.arange(na_max)[None, :] >= ring_na[lo:hi, None]] = 2.0  # bins a layer does not have sort last
        perm = np.argsort(u, axis=1)
        sel = (ring_of >= lo) & (ring_of < hi)
        abin[sel] = perm[ring_of[sel] - lo, rank[sel] % na[sel]]
    out = np.empty_like(cell)
    out[order] = ring0[order] + abin * n_r[lay]
    return out


def neighbour_table(geometry: Geometry, k: int = 24) -> np.ndarray:
    """For each flat voxel, the ``k`` nearest other voxels of the same layer, nearest first.

    Distance is between cell centres in the transverse plane (x = r cos α, y = r sin α).
    Layers with fewer than ``k + 1`` cells pad with ``-1``. Shape ``(n_voxels, k)``, int64.
    """
    key = f"nbr{k}"
    t = geometry._cache.get(key)
    if t is not None:
        return t
    t = np.full((geometry.n_voxels, k), -1, dtype=np.int64)
    x = geometry.cell_r * np.cos(geometry.cell_alpha)
    y = geometry.cell_r * np.sin(geometry.cell_alpha)
    off = geometry.offsets
    first = None  # regular geometries: every layer has the table of the first one, shifted
    for layer in range(geometry.n_layers):
        lo, hi = off[layer], off[layer + 1]
        kk = min(k, hi - lo - 1)
        if kk <= 0:
            continue
        if first is not None and geometry.is_regular:
            t[lo:hi, :kk] = first + lo
            continue
        idx = _nearest_in_layer(x[lo:hi], y[lo:hi], kk)
        t[lo:hi, :kk] = idx + lo
        first = idx
    t.setflags(write=False)
    geometry._cache[key] = t
    return t


def _nearest_in_layer(xs: np.ndarray, ys: np.ndarray, kk: int) -> np.ndarray:
    """``(m, kk)`` indices of the ``kk`` nearest other cells, nearest first, ties by index (as a stable argsort),
    in row chunks of bounded memory (a partition per row, then a sort of the few candidates)."""
    m = xs.shape[0]
    out = np.empty((m, kk), dtype=np.int64)
    step = max(1, (1 << 23) // m)
    for a in range(0, m, step):
        b = min(a + step, m)
        d2 = (xs[a:b, None] - xs[None]) ** 2 + (ys[a:b, None] - ys[None]) ** 2
        d2[np.arange(b - a), np.arange(a, b)] = np.inf
        vk = np.partition(d2, kk - 1, axis=1)[:, kk - 1]
        rows, cols = np.nonzero(d2 <= vk[:, None])  # the kk nearest plus any ties at the kk-th distance
        order = np.lexsort((cols, d2[rows, cols], rows))
        rows, cols = rows[order], cols[order]
        start = np.searchsorted(rows, np.arange(b - a))
        out[a:b] = cols[start[:, None] + np.arange(kk)[None, :]]
    return out


def _place_nearest_free(out: np.ndarray, ev: np.ndarray, cell: np.ndarray, e: np.ndarray,
                        geometry: Geometry) -> tuple[int, int]:
    """Move colliding points to free same-layer cells, most energetic first; returns (moved, merged)."""
    n_vox = geometry.n_voxels
    nbr = neighbour_table(geometry)
    order = np.argsort(-e, kind="stable")
    ev, cell, e = ev[order], cell[order], e[order]
    pending = np.arange(e.shape[0])
    moved = 0
    for k in range(nbr.shape[1]):
        if pending.size == 0:
            break
        cand = nbr[cell[pending], k]
        ok = cand >= 0
        ck = ev[pending] * n_vox + np.where(ok, cand, 0)
        ok &= out[ck] == 0
        if not ok.any():
            continue
        idx = pending[ok]
        ck = ck[ok]
        # several points may want the same free cell in this round: the most energetic wins
        _, win = np.unique(ck, return_index=True)
        out[ck[win]] = e[idx[win]]
        moved += win.size
        done = np.zeros(e.shape[0], dtype=bool)
        done[idx[win]] = True
        pending = pending[~done[pending]]
    if pending.size:
        np.add.at(out, ev[pending] * n_vox + cell[pending], e[pending].astype(out.dtype))
    return moved, int(pending.size)
