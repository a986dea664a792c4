r"""Invertible coordinate preprocessing for point-cloud showers.

Point features, in order: ``(z, alpha, r, E)``.

* **Per-cell dequantisation** (CaloPointFlow II): a point of cell ``k`` gets a uniform
  position inside that cell's bounds (z ± 0.5, its α-bin, its r-bin), so every
  continuous point maps back to exactly the cell it came from (``Geometry.locate``).
* Coordinates are scaled to (0, 1) with the calorimeter's extent, passed through a
  logit and standardised; energies become ``log(E / E_inc)``, standardised.
* Shower-level features, two variants:

  - ``"I"`` (CaloPointFlow): ``log n − ½ log E_inc`` and ``log(ΣE / E_inc)``; points are
    ``(z, α, r, log E/E_inc)`` with ``z`` dequantised inside its layer.
  - ``"II"`` (CaloPointFlow II, the default): the number of points and the energy of every
    layer, ``log(n_l + u)`` with ``u ~ U(0, 1)`` (dequantised counts, ``n_l = ⌊exp⌋`` inverts
    it exactly) and ``log(E_l / E_inc + δ v)`` (``δ = 1e-9``, ``v ~ U(0, 1)``, so that empty
    layers are not a point mass; the inverse subtracts ``δ/2``); points are ``(α, r, log E/E_l)`` and carry their layer.

  The condition is ``log E_inc``. Everything is standardised.

All statistics are fitted on training data (:meth:`Preprocessor.fit`) and saved in the
checkpoint's ``config.json`` (:meth:`Preprocessor.to_dict`).
"""

from __future__ import annotations

__all__ = ["VARIANTS", "Preprocessor", "layer_sums"]

import math
from dataclasses import dataclass, field, fields

import numpy as np

from ..geometry import Geometry

_EPS = 1e-6  # logit clipping
_DELTA = 1e-9  # energy-fraction floor of the layer energies (variant II)
VARIANTS = ("I", "II")


def _logit(u: np.ndarray) -> np.ndarray:
    u = np.clip(u, _EPS, 1 - _EPS)
    return np.log(u) - np.log1p(-u)


def _sigmoid(y: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * y))


@dataclass
class Preprocessor:
    """Per-dataset normalisation of points, shower features and conditions.

    Args:
        geometry: the binning (sets the coordinate ranges and the cell bounds).
        point_mean, point_std: standardisation of the 4 transformed point features.
        shower_mean, shower_std: standardisation of the 2 shower features.
        cond_mean, cond_std: standardisation of ``log E_inc``.
        n_max: largest number of points seen in training (sampling clips to it).
        variant: ``"I"`` or ``"II"`` (see the module docstring).
    """

    geometry: Geometry
    point_mean: list[float] = field(default_factory=lambda: [0.0] * 4)
    point_std: list[float] = field(default_factory=lambda: [1.0] * 4)
    shower_mean: list[float] = field(default_factory=lambda: [0.0, 0.0])
    shower_std: list[float] = field(default_factory=lambda: [1.0, 1.0])
    cond_mean: float = 0.0
    cond_std: float = 1.0
    n_max: int = 0
    variant: str = "I"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            msg = f"preprocessing variant must be one of {VARIANTS}, got {self.variant!r}"
            raise ValueError(msg)

    @property
    def n_point_features(self) -> int:
        return 4 if self.variant == "I" else 3

    @property
    def n_shower_features(self) -> int:
        return 2 if self.variant == "I" else 2 * self.geometry.n_layers

    # ------------------------------------------------------------------ ranges
    @property
    def _ranges(self) -> tuple[float, float, float, float]:
        g = self.geometry
        r_lo = min(e[0] for e in g.r_edges)
        r_hi = max(e[-1] for e in g.r_edges)
        return -0.5, g.n_layers - 0.5, float(r_lo), float(r_hi)

    # --------------------------------------------------------------- dequantise
    def dequantise(self, cell: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Uniform continuous ``(z, alpha, r)`` inside each point's cell.

        Shapes:
            cell: ``(P,)`` flat voxel indices; returns ``(P, 3)`` float64.
        """
        b = self.geometry.cell_bounds()
        cell = np.asarray(cell, dtype=np.int64)
        u = rng.random((cell.shape[0], 3))
        # keep a margin so float32 round-off cannot push a point into the next cell
        u = 1e-4 + (1 - 2e-4) * u
        out = np.empty((cell.shape[0], 3))
        for j, k in enumerate(("z", "alpha", "r")):
            lo, hi = b[f"{k}_lo"][cell], b[f"{k}_hi"][cell]
            out[:, j] = lo + u[:, j] * (hi - lo)
        return out

    # ------------------------------------------------------------ point features
    def forward_points(self, zar: np.ndarray, energy: np.ndarray, e_inc: np.ndarray) -> np.ndarray:
        """Continuous ``(z, alpha, r)``, energies and per-point incident energy → model features.

        Shapes:
            zar: ``(P, 3)``; energy, e_inc: ``(P,)``; returns ``(P, 4)`` float32.
        """
        z0, z1, r0, r1 = self._ranges
        y = np.empty((zar.shape[0], 4))
        y[:, 0] = _logit((zar[:, 0] - z0) / (z1 - z0))
        y[:, 1] = _logit((zar[:, 1] + math.pi) / (2 * math.pi))
        y[:, 2] = _logit((zar[:, 2] - r0) / (r1 - r0))
        y[:, 3] = np.log(np.maximum(energy, 1e-30)) - np.log(e_inc)
        return ((y - np.asarray(self.point_mean)) / np.asarray(self.point_std)).astype(np.float32)

    def inverse_points(self, y: np.ndarray, e_inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model features → ``((z, alpha, r) (P, 3), E (P,))``; exact inverse of :meth:`forward_points`
        (up to the logit clipping at 1e-6)."""
        y = np.asarray(y, dtype=np.float64) * np.asarray(self.point_std) + np.asarray(self.point_mean)
        z0, z1, r0, r1 = self._ranges
        zar = np.empty((y.shape[0], 3))
        zar[:, 0] = z0 + _sigmoid(y[:, 0]) * (z1 - z0)
        zar[:, 1] = _sigmoid(y[:, 1]) * 2 * math.pi - math.pi
        zar[:, 2] = r0 + _sigmoid(y[:, 2]) * (r1 - r0)
        energy = np.exp(np.clip(y[:, 3], -80, 80)) * e_inc
        return zar, energy

    # ------------------------------------------------------- shower / condition
    def forward_shower(self, n: np.ndarray, e_sum: np.ndarray, e_inc: np.ndarray) -> np.ndarray:
        """``(n points, ΣE, E_inc)`` → standardised shower features ``(B, 2)``."""
        s = np.stack([np.log(np.maximum(n, 1)) - 0.5 * np.log(e_inc),
                      np.log(np.maximum(e_sum, 1e-30)) - np.log(e_inc)], axis=-1)
        return ((s - np.asarray(self.shower_mean)) / np.asarray(self.shower_std)).astype(np.float32)

    def inverse_shower(self, s: np.ndarray, e_inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised shower features → ``(n (int, ≥ 1, ≤ n_max), ΣE)``."""
        s = np.asarray(s, dtype=np.float64) * np.asarray(self.shower_std) + np.asarray(self.shower_mean)
        n = np.rint(np.exp(np.clip(s[:, 0] + 0.5 * np.log(e_inc), 0, 30)))
        n = np.clip(n, 1, self.n_max or self.geometry.n_voxels).astype(np.int64)
        return n, np.exp(np.clip(s[:, 1], -80, 80)) * e_inc

    # ------------------------------------------------------------ variant II
    def _layer_r_range(self, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([e[0] for e in self.geometry.r_edges], dtype=np.float64)
        hi = np.array([e[-1] for e in self.geometry.r_edges], dtype=np.float64)
        layer = np.asarray(layer, dtype=np.int64)
        return lo[layer], hi[layer]

    def forward_points_layer(self, zar: np.ndarray, energy: np.ndarray, e_layer: np.ndarray,
                             layer: np.ndarray) -> np.ndarray:
        """Variant II point features: ``(α, r)`` in their cells (``r`` scaled by the extent of
        the point's layer) and ``log(E / E_l)``.

        Shapes:
            zar: ``(P, 3)`` (the ``z`` column is not used: points carry their layer);
            energy, e_layer, layer: ``(P,)`` (``e_layer``: energy of the point's layer);
            returns ``(P, 3)`` float32.
        """
        r0, r1 = self._layer_r_range(layer)
        y = np.empty((zar.shape[0], 3))
        y[:, 0] = _logit((zar[:, 1] + math.pi) / (2 * math.pi))
        y[:, 1] = _logit((zar[:, 2] - r0) / (r1 - r0))
        y[:, 2] = np.log(np.maximum(energy, 1e-30)) - np.log(np.maximum(e_layer, 1e-30))
        return ((y - np.asarray(self.point_mean)) / np.asarray(self.point_std)).astype(np.float32)

    def inverse_points_layer(self, y: np.ndarray, layer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Variant II features and layers → ``((z, α, r) (P, 3), w (P,))`` where ``w = E / E_l``
        (normalise ``w`` per shower and layer and multiply by the layer energy)."""
        y = np.asarray(y, dtype=np.float64) * np.asarray(self.point_std) + np.asarray(self.point_mean)
        r0, r1 = self._layer_r_range(layer)
        zar = np.empty((y.shape[0], 3))
        zar[:, 0] = np.asarray(layer, dtype=np.float64)
        zar[:, 1] = _sigmoid(y[:, 0]) * 2 * math.pi - math.pi
        zar[:, 2] = r0 + _sigmoid(y[:, 1]) * (r1 - r0)
        return zar, np.exp(np.clip(y[:, 2], -80, 80))

    def forward_layers(self, n_layer: np.ndarray, e_layer: np.ndarray, e_inc: np.ndarray,
                       rng: np.random.Generator | None = None) -> np.ndarray:
        """Variant II shower features from points and energy per layer.

        ``rng`` draws the dequantisation noise; without one the mid-point ``u = v = ½`` is used.

        Shapes:
            n_layer, e_layer: ``(B, L)``; e_inc: ``(B,)``; returns ``(B, 2L)`` float32.
        """
        n_layer = np.asarray(n_layer, dtype=np.float64)
        frac = np.asarray(e_layer, dtype=np.float64) / np.asarray(e_inc, dtype=np.float64)[:, None]
        if rng is None:
            u = v = np.full(n_layer.shape, 0.5)
        else:
            u = 1e-3 + (1 - 2e-3) * rng.random(n_layer.shape)
            v = 1e-3 + (1 - 2e-3) * rng.random(n_layer.shape)
        s = np.concatenate([np.log(n_layer + u), np.log(frac + _DELTA * v)], axis=1)
        return ((s - np.asarray(self.shower_mean)) / np.asarray(self.shower_std)).astype(np.float32)

    def inverse_layers(self, s: np.ndarray, e_inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Standardised variant II shower features → ``(n_l (B, L) int64, E_l (B, L) MeV)``.

        Counts are capped by the cells of each layer; a layer without points gets no energy.
        At least one point per shower is kept (in the layer of largest energy).
        """
        n_l = self.geometry.n_layers
        s = np.asarray(s, dtype=np.float64) * np.asarray(self.shower_std) + np.asarray(self.shower_mean)
        cap = np.asarray(self.geometry.voxels_per_layer, dtype=np.int64)
        n = np.floor(np.exp(np.clip(s[:, :n_l], -30, 30))).astype(np.int64)
        n = np.clip(n, 0, cap)
        frac = np.clip(np.exp(np.clip(s[:, n_l:], -80, 0)) - 0.5 * _DELTA, 0.01 * _DELTA, 1.0)  # ≤ E_inc
        e = frac * np.asarray(e_inc, dtype=np.float64)[:, None]
        empty = n.sum(1) == 0
        if empty.any():
            n[empty, e[empty].argmax(1)] = 1
        return n, np.where(n > 0, e, 0.0)

    def forward_cond(self, e_inc: np.ndarray) -> np.ndarray:
        """Incident energy (MeV) → standardised ``log E_inc`` ``(B, 1)``."""
        return ((np.log(np.asarray(e_inc, dtype=np.float64)) - self.cond_mean) / self.cond_std).astype(np.float32)[:, None]

    # --------------------------------------------------------------------- fit
    @classmethod
    def fit(cls, geometry: Geometry, cell: np.ndarray, energy: np.ndarray, counts: np.ndarray, e_inc: np.ndarray,
            *, seed: int = 0, max_points: int = 2_000_000, variant: str = "I") -> Preprocessor:
        """Fit the standardisation on (a subsample of) training data.

        Args:
            cell, energy: flat per-point cell indices and energies ``(P,)``.
            counts: points per shower ``(B,)``; e_inc: incident energies ``(B,)``.
            variant: ``"I"`` or ``"II"``.
        """
        p = cls(geometry, variant=variant)
        rng = np.random.default_rng(seed)
        e_inc = np.asarray(e_inc, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        offsets = np.r_[0, np.cumsum(counts)]
        n_points = int(offsets[-1])
        if n_points == 0:
            msg = "cannot fit the preprocessing: the training data have no points"
            raise ValueError(msg)
        idx = np.arange(n_points) if n_points <= max_points else np.sort(rng.choice(n_points, max_points, replace=False))
        shower_of = np.searchsorted(offsets, idx, side="right") - 1  # of the subsampled points only
        # per-shower sums in chunks of showers, so memory stays small whatever the data size
        n_layer = np.zeros((counts.shape[0], geometry.n_layers), dtype=np.int64)
        e_layer = np.zeros((counts.shape[0], geometry.n_layers))
        step = 4096
        for a in range(0, counts.shape[0], step):
            b = min(a + step, counts.shape[0])
            lo, hi = offsets[a], offsets[b]
            n_layer[a:b], e_layer[a:b] = layer_sums(geometry, cell[lo:hi], energy[lo:hi], counts[a:b])
        cell_s = np.asarray(cell[idx], dtype=np.int64)
        energy_s = np.asarray(energy[idx], dtype=np.float64)
        if variant == "I":
            y = p.forward_points(p.dequantise(cell_s, rng), energy_s, e_inc[shower_of]).astype(np.float64)
            s = p.forward_shower(counts, e_layer.sum(1), e_inc).astype(np.float64)
        else:
            p.point_mean, p.point_std = [0.0] * 3, [1.0] * 3
            p.shower_mean, p.shower_std = [0.0] * p.n_shower_features, [1.0] * p.n_shower_features
            layer = np.asarray(geometry.cell_layer)[cell_s]
            y = p.forward_points_layer(p.dequantise(cell_s, rng), energy_s, e_layer[shower_of, layer],
                                       layer).astype(np.float64)
            s = p.forward_layers(n_layer, e_layer, e_inc, rng).astype(np.float64)
        p.point_mean = y.mean(0).tolist()
        p.point_std = np.maximum(y.std(0), 1e-6).tolist()
        ok = counts > 0
        p.shower_mean = s[ok].mean(0).tolist()
        p.shower_std = np.maximum(s[ok].std(0), 1e-6).tolist()
        c = np.log(e_inc)
        p.cond_mean, p.cond_std = float(c.mean()), float(max(c.std(), 1e-6))
        p.n_max = int(counts.max()) if counts.size else 0
        return p

    # --------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "geometry"}

    @classmethod
    def from_dict(cls, d: dict, geometry: Geometry) -> Preprocessor:
        return cls(geometry, **d)


def layer_sums(geometry: Geometry, cell: np.ndarray, energy: np.ndarray,
               counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points and energy per layer of each shower.

    Shapes:
        cell, energy: ``(P,)`` flat; counts: ``(B,)`` points per shower; returns two ``(B, L)``
        arrays (int64 counts, float64 energies).
    """
    n_l = geometry.n_layers
    b = counts.shape[0]
    key = np.repeat(np.arange(b), counts) * n_l + np.asarray(geometry.cell_layer)[np.asarray(cell, dtype=np.int64)]
    n = np.bincount(key, minlength=b * n_l).reshape(b, n_l)
    e = np.bincount(key, weights=np.asarray(energy, dtype=np.float64), minlength=b * n_l).reshape(b, n_l)
    return n, e
