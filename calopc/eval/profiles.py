r"""Shower profiles gathered while a sample streams past: radial profile and average showers per energy bin.

The first-look plots of the report need per-shower sums that the high-level features do not keep:
the energy per radial bin (for a mean radial profile with its standard error) and the average
shower in bins of incident energy (the official ``avg-E`` view). :class:`ProfileAccumulator`
collects them chunk by chunk in one pass, in ``O(n_bins × n_voxels)`` memory.
"""

from __future__ import annotations

__all__ = ["ProfileAccumulator", "Profiles", "energy_bins", "radial_edges", "radial_matrix"]

from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry


def energy_bins(geometry: Geometry) -> np.ndarray:
    """Incident-energy bin edges (MeV) of the official ``avg-E`` view.

    Dataset 1: one bin per discrete energy (edges ``2**linspace(8, 23, 16)``); otherwise the decades
    ``[1e3, 1e4), [1e4, 1e5), [1e5, 1e6)`` MeV.
    """
    if geometry.name.startswith("1"):
        return 2.0 ** np.linspace(8, 23, 16)
    return np.array([1e3, 1e4, 1e5, 1e6])


def radial_edges(geometry: Geometry) -> np.ndarray:
    """Radial bin edges (mm) common to all layers: the union of every layer's edges."""
    return np.unique(np.concatenate([np.asarray(e, dtype=np.float64) for e in geometry.r_edges]))


def radial_matrix(geometry: Geometry, edges: np.ndarray) -> np.ndarray:
    """Share of each cell's energy in each radial bin of ``edges``, by overlap of ring areas.

    A cell spanning several bins (layers binned more coarsely than ``edges``) spreads its energy over them
    in proportion to the area it shares with each, i.e. a uniform energy density within the cell.

    Shapes:
        returns: ``(n_voxels, len(edges) - 1)``, rows summing to 1.
    """
    b = geometry.cell_bounds()
    lo, hi = b["r_lo"][:, None], b["r_hi"][:, None]
    e0, e1 = edges[None, :-1], edges[None, 1:]
    overlap = np.clip(np.minimum(hi, e1) ** 2 - np.maximum(lo, e0) ** 2, 0.0, None)
    return overlap / np.maximum(overlap.sum(axis=1, keepdims=True), 1e-300)


@dataclass
class Profiles:
    """What :class:`ProfileAccumulator` gathered; all energies in MeV.

    Shapes:
        r_edges: ``(n_r + 1,)`` radial bin edges in mm.
        radial_mean, radial_sem: ``(n_r,)`` mean energy per shower in each radial bin and its standard error.
        e_edges: ``(n_e + 1,)`` incident-energy bin edges.
        e_counts: ``(n_e,)`` showers in each energy bin.
        e_mean_shower: ``(n_e, n_voxels)`` average shower in each energy bin (zeros where the bin is empty).
    """

    r_edges: np.ndarray
    radial_mean: np.ndarray
    radial_sem: np.ndarray
    e_edges: np.ndarray
    e_counts: np.ndarray
    e_mean_shower: np.ndarray


class ProfileAccumulator:
    """Accumulate radial profiles and per-energy average showers over chunks of thresholded showers.

    Example::

        acc = ProfileAccumulator(geometry)
        for e_inc, showers in chunks:
            acc.update(showers, e_inc)
        profiles = acc.result()
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self.r_edges = radial_edges(geometry)
        n_r = len(self.r_edges) - 1
        self._to_r = radial_matrix(geometry, self.r_edges)
        self.e_edges = energy_bins(geometry)
        n_e = len(self.e_edges) - 1
        self._n = 0
        self._r_sum = np.zeros(n_r)
        self._r_sq = np.zeros(n_r)
        self._e_counts = np.zeros(n_e, dtype=np.int64)
        self._e_sum = np.zeros((n_e, geometry.n_voxels))

    def update(self, showers: np.ndarray, e_inc: np.ndarray) -> None:
        """Add a chunk: thresholded ``showers`` ``(B, n_voxels)`` and incident energies ``(B,)``."""
        showers = np.asarray(showers, dtype=np.float64)
        e_inc = np.asarray(e_inc, dtype=np.float64).reshape(-1)
        radial = showers @ self._to_r
        self._n += len(showers)
        self._r_sum += radial.sum(axis=0)
        self._r_sq += (radial**2).sum(axis=0)
        idx = np.searchsorted(self.e_edges, e_inc, side="right") - 1
        ok = (idx >= 0) & (idx < len(self.e_edges) - 1)
        if ok.any():
            self._e_counts += np.bincount(idx[ok], minlength=len(self._e_counts))
            for b in np.unique(idx[ok]):  # a handful of energy bins: one masked sum each
                self._e_sum[b] += showers[idx == b].sum(axis=0)

    def result(self) -> Profiles:
        """The accumulated profiles (means and standard errors over all showers seen)."""
        n = max(self._n, 1)
        mean = self._r_sum / n
        var = np.maximum(self._r_sq / n - mean**2, 0.0)
        sem = np.sqrt(var / max(self._n - 1, 1))
        e_mean = self._e_sum / np.maximum(self._e_counts, 1)[:, None]
        return Profiles(self.r_edges, mean, sem, self.e_edges, self._e_counts.copy(), e_mean)
