r"""Sparse shower tensors: integer cell coordinates ``(shower, layer, α-bin, r-bin)`` plus per-cell features.

A :class:`SparseShowers` holds only the occupied cells of a batch of showers on a
regular ``(layers, α, r)`` grid (datasets 2 and 3). Its rows are sorted by the
linearised key ``((shower · L + layer) · A + α) · R + r``, which for the full-resolution
grid is ``shower · n_voxels + flat cell index`` (the official flat order, r fastest).
Conversions to and from dense ``(N, L, A, R)`` tensors, flat voxel arrays and
point-cloud events are exact (energies keep their dtype).

The α axis is periodic: the sparse layers (:mod:`calopc.sparse.nn`) let neighbourhoods
wrap around the α seam. Dataset-1 geometries have per-layer binnings (and single-α
layers) and no such grid: building a :class:`SparseShowers` from them raises
:class:`~calopc.geometry.GeometryError`.

Tensors derived from one another by the sparse layers share a cache (``ctx``): the
output coordinates and kernel maps of a layer are computed once per batch and reused
by every later layer with the same coordinates, kernel, stride and padding.
"""

from __future__ import annotations

__all__ = ["SparseShowers", "require_regular"]

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..geometry import Geometry, GeometryError

_IDS = itertools.count(1)


def require_regular(geometry: Geometry, what: str = "sparse shower tensors") -> tuple[int, int, int]:
    """``(L, A, R)`` of a regular geometry; a clear error for irregular ones (dataset 1).

    Raises:
        GeometryError: the layers differ in r-binning or number of α bins.
    """
    if not geometry.is_regular:
        msg = (f"{what} need a regular (layer, alpha, r) grid, but geometry {geometry.name!r} has per-layer "
               f"binnings: n_alpha per layer {list(geometry.n_alpha)}, n_r per layer {list(geometry.n_r)}; "
               "use the point-cloud or flat-voxel representation for this geometry")
        raise GeometryError(msg)
    return geometry.shape


@dataclass
class SparseShowers:
    """Occupied cells of ``batch_size`` showers on a ``(L, A, R)`` grid.

    Args:
        coords: ``(P, 4)`` int64 ``(shower, layer, α-bin, r-bin)``, sorted by :attr:`key`, unique.
        feats: ``(P, C)`` features (column 0 is the energy for tensors built from showers).
        batch_size: number of showers (empty showers have no rows).
        shape: ``(L, A, R)`` grid of this resolution.
        geometry: the full-resolution geometry, if known.
        stride: cumulative stride of this resolution with respect to the geometry's grid.
        ctx: cache shared by tensors of one batch (coordinates and kernel maps).
        cid: identifier of the coordinate set (equal for tensors with the same coordinates).

    Shapes:
        coords: ``(P, 4)``; feats: ``(P, C)``; dense: ``(N, L, A, R)`` or ``(N, C, L, A, R)``.
    """

    coords: torch.Tensor
    feats: torch.Tensor
    batch_size: int
    shape: tuple[int, int, int]
    geometry: Geometry | None = None
    stride: tuple[int, int, int] = (1, 1, 1)
    ctx: dict[Any, Any] = field(default_factory=dict, repr=False)
    cid: int = field(default_factory=lambda: next(_IDS))

    def __post_init__(self) -> None:
        if self.coords.ndim != 2 or self.coords.shape[1] != 4:
            msg = f"coords must have shape (P, 4) (shower, layer, alpha, r), got {tuple(self.coords.shape)}"
            raise ValueError(msg)
        if self.feats.ndim != 2 or self.feats.shape[0] != self.coords.shape[0]:
            msg = f"feats must have shape (P, C) with P = {self.coords.shape[0]}, got {tuple(self.feats.shape)}"
            raise ValueError(msg)
        self.shape = tuple(int(s) for s in self.shape)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def n_channels(self) -> int:
        return int(self.feats.shape[1])

    @property
    def key(self) -> torch.Tensor:
        """``(P,)`` int64 linearised coordinates (sorted, unique)."""
        k = self.ctx.get(("key", self.cid))
        if k is None:
            k = linearise(self.coords, self.shape)
            self.ctx[("key", self.cid)] = k
        return k

    @property
    def counts(self) -> torch.Tensor:
        """``(batch_size,)`` occupied cells per shower."""
        return torch.bincount(self.coords[:, 0], minlength=self.batch_size)

    @property
    def occupancy(self) -> float:
        """Fraction of the ``batch_size · L · A · R`` cells that are occupied."""
        return len(self) / max(1, self.batch_size * int(np.prod(self.shape)))

    def replace(self, feats: torch.Tensor) -> SparseShowers:
        """Same coordinates (and cache), new features ``(P, C')``."""
        return SparseShowers(self.coords, feats, self.batch_size, self.shape, self.geometry, self.stride, self.ctx,
                             self.cid)

    def to(self, device: torch.device | str) -> SparseShowers:
        return SparseShowers(self.coords.to(device), self.feats.to(device), self.batch_size, self.shape, self.geometry,
                             self.stride, {}, next(_IDS))

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_cells(cls, cell: Any, counts: Any, feats: Any, geometry: Geometry, *,
                   device: torch.device | str | None = None) -> SparseShowers:
        """From flat cell indices grouped by shower.

        Args:
            cell: ``(P,)`` flat voxel index of each point (official order), shower after shower.
            counts: ``(N,)`` points per shower.
            feats: ``(P,)`` or ``(P, C)`` per-point features (e.g. the energy).
            geometry: a regular geometry.

        Raises:
            GeometryError: irregular geometry. ValueError: a cell outside the geometry or twice in one shower.
        """
        shape = require_regular(geometry)
        cell = torch.as_tensor(np.asarray(cell) if not torch.is_tensor(cell) else cell, device=device).long()
        counts = torch.as_tensor(np.asarray(counts) if not torch.is_tensor(counts) else counts,
                                 device=cell.device).long()
        f = feats if torch.is_tensor(feats) else torch.as_tensor(np.asarray(feats))
        f = f.to(cell.device)
        if f.ndim == 1:
            f = f[:, None]
        if cell.ndim != 1 or f.shape[0] != cell.shape[0] or int(counts.sum()) != cell.shape[0]:
            msg = (f"cell ({tuple(cell.shape)}), feats ({tuple(f.shape)}) and counts (sum {int(counts.sum())}) "
                   "must describe the same points")
            raise ValueError(msg)
        n_vox = geometry.n_voxels
        if cell.numel() and (int(cell.min()) < 0 or int(cell.max()) >= n_vox):
            msg = (f"cell indices must lie in [0, {n_vox}) for geometry {geometry.name!r}, "
                   f"got [{int(cell.min())}, {int(cell.max())}]")
            raise ValueError(msg)
        shower = torch.repeat_interleave(torch.arange(counts.shape[0], device=cell.device), counts)
        key = shower * n_vox + cell
        if key.numel() > 1 and not bool((key[1:] > key[:-1]).all()):  # cells not already in key order: sort
            key, order = torch.sort(key)
            if bool((key[1:] == key[:-1]).any()):
                msg = ("a cell occurs twice in one shower; sparse showers hold at most one entry per cell "
                       "(merge points first)")
                raise ValueError(msg)
            f = f[order]
        coords = delinearise(key, (counts.shape[0], *shape))
        return cls(coords, f, int(counts.shape[0]), shape, geometry)

    @classmethod
    def from_events(cls, events: Any, geometry: Geometry, *, features: tuple[str, ...] = ("E",),
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SparseShowers:
        """From awkward events as written by :func:`calopc.converters.voxels_to_points`.

        Points use their ``cell`` field; points without one are located from ``(r, alpha, z)``.

        Args:
            events: records with a ``points`` field (or the ragged points themselves).
            features: point fields to stack as features, energy first by default.
            dtype: feature dtype (default: that of the fields).
        """
        import awkward as ak

        pts = events["points"] if "points" in ak.fields(events) else events
        names = set(ak.fields(pts))
        missing = [f for f in features if f not in names]
        if missing:
            msg = f"points have no field(s) {missing}; found {sorted(names)}"
            raise ValueError(msg)
        counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
        if "cell" in names:
            cell = np.asarray(ak.flatten(pts["cell"], axis=None)).astype(np.int64)
        elif {"r", "alpha", "z"} <= names:
            cell = geometry.locate(*(np.asarray(ak.flatten(pts[f], axis=None)) for f in ("r", "alpha", "z")))
            if (cell < 0).any():
                msg = f"{int((cell < 0).sum())} points lie outside geometry {geometry.name!r}"
                raise ValueError(msg)
        else:
            msg = f"points need a 'cell' field or 'r', 'alpha', 'z'; found {sorted(names)}"
            raise ValueError(msg)
        cols = [np.asarray(ak.flatten(pts[f], axis=None)) for f in features]
        f = torch.from_numpy(np.stack(cols, axis=1) if len(cols) > 1 else cols[0][:, None].copy())
        if dtype is not None:
            f = f.to(dtype)
        return cls.from_cells(cell, counts, f, geometry, device=device)

    @classmethod
    def from_voxels(cls, showers: np.ndarray | torch.Tensor, geometry: Geometry, *,
                    device: torch.device | str | None = None) -> SparseShowers:
        """From flat voxel showers ``(N, n_voxels)`` (non-zero cells become rows, feature = energy)."""
        shape = require_regular(geometry)
        x = showers if torch.is_tensor(showers) else torch.from_numpy(np.asarray(showers))
        if x.ndim != 2 or x.shape[1] != geometry.n_voxels:
            msg = (f"showers must have shape (N, {geometry.n_voxels}) for geometry {geometry.name!r}, "
                   f"got {tuple(x.shape)}")
            raise ValueError(msg)
        return cls.from_dense(x.reshape(x.shape[0], *shape).to(device) if device else x.reshape(x.shape[0], *shape),
                              geometry=geometry)

    @classmethod
    def from_dense(cls, x: torch.Tensor, *, geometry: Geometry | None = None) -> SparseShowers:
        """From a dense ``(N, L, A, R)`` (one feature) or ``(N, C, L, A, R)`` tensor: the cells where any channel
        is non-zero."""
        if x.ndim == 4:
            x = x[:, None]
        if x.ndim != 5:
            msg = f"dense showers must have shape (N, L, A, R) or (N, C, L, A, R), got {tuple(x.shape)}"
            raise ValueError(msg)
        shape = tuple(x.shape[2:])
        if geometry is not None and require_regular(geometry) != shape:
            msg = f"dense grid {shape} does not match geometry {geometry.name!r} {geometry.shape}"
            raise ValueError(msg)
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # (N·V, C), key order
        key = torch.nonzero((flat != 0).any(1)).squeeze(1)
        coords = delinearise(key, (n, *shape))
        return cls(coords, flat[key], n, shape, geometry)

    @classmethod
    def from_batch(cls, batch: Any, prep: Any, *, features: str = "x") -> SparseShowers:
        """From a model :class:`~calopc.models.data.Batch` and its fitted preprocessor.

        The cells are recovered from the dequantised point positions (exact: the noise stays
        inside each cell); the features are the batch's preprocessed point features
        (``features="x"``) or the energy (``features="E"``, variant I only: needs ``E_inc``).
        """
        g = prep.geometry
        require_regular(g)
        mask = batch.mask.bool()
        x = batch.x[mask].detach().cpu().numpy()
        counts = mask.sum(1).cpu().numpy()
        if prep.variant == "II":
            layer = batch.layer[mask].cpu().numpy()
            zar, _ = prep.inverse_points_layer(x, layer)
        else:
            e_inc = np.exp(batch.cond[:, 0].double().cpu().numpy() * prep.cond_std + prep.cond_mean)
            zar, energy = prep.inverse_points(x, np.repeat(e_inc, counts))
        cell = g.locate(zar[:, 2], zar[:, 1], zar[:, 0])
        if (cell < 0).any():
            msg = f"{int((cell < 0).sum())} batch points fall outside geometry {g.name!r}"
            raise ValueError(msg)
        if features == "x":
            f = batch.x[mask]
        elif features == "E" and prep.variant == "I":
            f = torch.from_numpy(energy)[:, None].to(batch.x.device)
        else:
            msg = f"features must be 'x' (or 'E' for variant-I batches), got {features!r}"
            raise ValueError(msg)
        return cls.from_cells(cell, counts, f, g, device=batch.x.device)

    # --------------------------------------------------------------- outputs
    def to_dense(self) -> torch.Tensor:
        """Dense ``(N, L, A, R)`` for one feature, ``(N, C, L, A, R)`` otherwise; empty cells are 0."""
        n, c = self.batch_size, self.n_channels
        out = self.feats.new_zeros(n * int(np.prod(self.shape)), c)
        out = out.index_copy(0, self.key, self.feats)
        out = out.reshape(n, *self.shape, c)
        return out[..., 0] if c == 1 else out.permute(0, 4, 1, 2, 3)

    def to_voxels(self, channel: int = 0) -> np.ndarray:
        """Flat ``(N, n_voxels)`` numpy showers of one feature (full-resolution tensors only)."""
        self._need_full_resolution("to_voxels")
        out = self.feats.new_zeros(self.batch_size * int(np.prod(self.shape)))
        out = out.index_copy(0, self.key, self.feats[:, channel])
        return out.reshape(self.batch_size, -1).detach().cpu().numpy()

    def to_events(self, incident_energy: Any = None, *, channel: int = 0) -> Any:
        """Point-cloud events as :func:`calopc.converters.voxels_to_points` writes them (``r, alpha, z, E, cell``).

        Args:
            incident_energy: ``(N,)`` MeV (NaN when omitted).
            channel: feature column that becomes ``E``.
        """
        from ..converters.core import _build_events, _coordinate_tables

        g = self._need_full_resolution("to_events")
        n_vox = g.n_voxels
        key = self.key.cpu().numpy()
        shower = key // n_vox
        cell = (key - shower * n_vox).astype(np.int32)
        counts = np.bincount(shower, minlength=self.batch_size)
        offsets = np.zeros(self.batch_size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        t = _coordinate_tables(g)
        inc = (np.full(self.batch_size, np.nan) if incident_energy is None
               else np.asarray(incident_energy, dtype=np.float64).reshape(-1))
        fields = {"r": t["r"][cell], "alpha": t["alpha"][cell], "z": t["z"][cell],
                  "E": self.feats[:, channel].detach().cpu().numpy(), "cell": cell}
        return _build_events(inc, offsets, fields)

    def _need_full_resolution(self, what: str) -> Geometry:
        if self.geometry is None or self.shape != self.geometry.shape:
            msg = (f"{what} needs a full-resolution tensor with a geometry; this one has grid {self.shape} "
                   f"and geometry {None if self.geometry is None else self.geometry.name!r}")
            raise ValueError(msg)
        return self.geometry


def linearise(coords: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``((b · L + l) · A + a) · R + r`` for ``(P, 4)`` coordinates."""
    L, A, R = shape
    return ((coords[:, 0] * L + coords[:, 1]) * A + coords[:, 2]) * R + coords[:, 3]


def delinearise(key: torch.Tensor, full_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Inverse of :func:`linearise`: ``(P,)`` keys → ``(P, 4)`` coordinates."""
    _, L, A, R = full_shape
    r = key % R
    t = key // R
    a = t % A
    t = t // A
    return torch.stack([t // L, t % L, a, r], dim=1)
