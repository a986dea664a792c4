r"""Invertible coordinate preprocessing for point-cloud showers.

Point features, in order: ``(z, alpha, r, E)``.

* **Per-cell dequantisation** (CaloPointFlow II): a point of cell ``k`` gets a uniform
  position inside that cell's bounds (z ± 0.5, its α-bin, its r-bin), so every
  continuous point maps back to exactly the cell it came from (``Geometry.locate``).
* Coordinates are scaled to (0, 1) with the calorimeter's extent, passed through a
  logit and standardised; energies become ``log(E / E_inc)``, standardised.
* Shower-level features (CaloPointFlow): ``log n − ½ log E_inc`` and
  ``log(ΣE / E_inc)``; the condition is ``log E_inc``. Both standardised.

All statistics are fitted on training data (:meth:`Preprocessor.fit`) and saved in the
checkpoint's ``config.json`` (:meth:`Preprocessor.to_dict`).
"""

from __future__ import annotations

__all__ = ["Preprocessor"]

import math
from dataclasses import dataclass, field, fields

import numpy as np

from ..geometry import Geometry

_EPS = 1e-6  # logit clipping


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
    """

    geometry: Geometry
    point_mean: list[float] = field(default_factory=lambda: [0.0] * 4)
    point_std: list[float] = field(default_factory=lambda: [1.0] * 4)
    shower_mean: list[float] = field(default_factory=lambda: [0.0, 0.0])
    shower_std: list[float] = field(default_factory=lambda: [1.0, 1.0])
    cond_mean: float = 0.0
    cond_std: float = 1.0
    n_max: int = 0

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

    def forward_cond(self, e_inc: np.ndarray) -> np.ndarray:
        """Incident energy (MeV) → standardised ``log E_inc`` ``(B, 1)``."""
        return ((np.log(np.asarray(e_inc, dtype=np.float64)) - self.cond_mean) / self.cond_std).astype(np.float32)[:, None]

    # --------------------------------------------------------------------- fit
    @classmethod
    def fit(cls, geometry: Geometry, cell: np.ndarray, energy: np.ndarray, counts: np.ndarray, e_inc: np.ndarray,
            *, seed: int = 0, max_points: int = 2_000_000) -> Preprocessor:
        """Fit the standardisation on (a subsample of) training data.

        Args:
            cell, energy: flat per-point cell indices and energies ``(P,)``.
            counts: points per shower ``(B,)``; e_inc: incident energies ``(B,)``.
        """
        p = cls(geometry)
        rng = np.random.default_rng(seed)
        e_inc = np.asarray(e_inc, dtype=np.float64)
        inc_pp = np.repeat(e_inc, counts)
        idx = np.arange(cell.shape[0])
        if idx.shape[0] > max_points:
            idx = rng.choice(idx, max_points, replace=False)
        if idx.shape[0] == 0:
            msg = "cannot fit the preprocessing: the training data have no points"
            raise ValueError(msg)
        y = p.forward_points(p.dequantise(cell[idx], rng), energy[idx], inc_pp[idx]).astype(np.float64)
        p.point_mean = y.mean(0).tolist()
        p.point_std = np.maximum(y.std(0), 1e-6).tolist()
        e_sum = np.bincount(np.repeat(np.arange(counts.shape[0]), counts), weights=np.asarray(energy, np.float64),
                            minlength=counts.shape[0])
        s = p.forward_shower(counts, e_sum, e_inc).astype(np.float64)
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
