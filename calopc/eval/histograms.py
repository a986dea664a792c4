r"""Feature histograms with the official binnings, and their separation power.

Separation power of two histograms normalised to unit sum (arXiv:2009.03796, eq. 15):
``S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i)``, 0 for identical shapes, 1 for disjoint ones.
Entries outside the binning are ignored, as with ``numpy.histogram(density=True)``.
"""

from __future__ import annotations

__all__ = ["FeatureHist", "feature_histograms", "separation_power"]

from dataclasses import dataclass

import numpy as np

from ..geometry import Geometry
from .features import Features


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """Separation power of two histograms (counts or densities over the same bins)."""
    h1 = np.asarray(h1, dtype=np.float64)
    h2 = np.asarray(h2, dtype=np.float64)
    s1, s2 = h1.sum(), h2.sum()
    if s1 <= 0 or s2 <= 0:
        return float("nan")
    p, q = h1 / s1, h2 / s2
    return float(0.5 * np.sum((p - q) ** 2 / (p + q + 1e-16)))


@dataclass
class FeatureHist:
    """One feature histogrammed for the reference and the generated sample."""

    name: str  # e.g. "E_layer_12"
    label: str  # axis label
    edges: np.ndarray
    ref: np.ndarray  # counts
    gen: np.ndarray
    log_x: bool = False

    @property
    def separation(self) -> float:
        return separation_power(self.ref, self.gen)


def _ranges(geometry: Geometry, layer: int) -> tuple[float, float, float, float]:
    """(EC range, width max, EC_r max, width_r max) of one layer, in mm."""
    if geometry.name in ("2", "3"):
        return 30.0, 30.0, 42.0, 20.0
    lid = geometry.layer_ids[layer]
    rmax = geometry.r_edges[layer][-1]
    if lid in (12, 13):
        return 500.0, 400.0, rmax, rmax / 2
    return 100.0, 100.0, rmax, rmax / 2


def feature_histograms(ref: Features, gen: Features, geometry: Geometry, *, threshold: float,
                       ref_voxel_max: float | None = None, ref_voxels: np.ndarray | None = None,
                       gen_voxels: np.ndarray | None = None) -> list[FeatureHist]:
    """All histograms of the official set plus sparsity, EC_r and width_r per layer, and hit counts.

    ``ref_voxels``/``gen_voxels`` (precomputed voxel-energy histograms over ``voxel_edges``)
    are passed through ``ref_voxel_max`` by the caller; see :func:`calopc.eval.evaluate`.
    """
    out: list[FeatureHist] = []

    def add(name, label, edges, r, g, log_x=False):
        hr, _ = np.histogram(r, bins=edges)
        hg, _ = np.histogram(g, bins=edges)
        out.append(FeatureHist(name, label, np.asarray(edges), hr, hg, log_x))

    add("E_ratio", r"$E_{dep}/E_{inc}$", np.linspace(0.5, 1.5, 101), ref.e_ratio, gen.e_ratio)
    alpha_layers = [i for i, na in enumerate(geometry.n_alpha) if na > 1]
    for l in range(geometry.n_layers):
        lid = geometry.layer_ids[l]
        emax = max(ref.e_layer[:, l].max(), threshold * 10)
        add(f"E_layer_{lid}", f"$E$ layer {lid} [MeV]", np.logspace(np.log10(threshold), np.log10(emax), 40),
            ref.e_layer[:, l], gen.e_layer[:, l], log_x=True)
        ec, wmax, rmax, wrmax = _ranges(geometry, l)
        if l in alpha_layers:
            j = alpha_layers.index(l)
            add(f"EC_x_{lid}", f"centre $x$ layer {lid} [mm]", np.linspace(-ec, ec, 101), ref.ec_x[:, j], gen.ec_x[:, j])
            add(f"EC_y_{lid}", f"centre $y$ layer {lid} [mm]", np.linspace(-ec, ec, 101), ref.ec_y[:, j], gen.ec_y[:, j])
            add(f"width_x_{lid}", f"width $x$ layer {lid} [mm]", np.linspace(0, wmax, 101), ref.width_x[:, j], gen.width_x[:, j])
            add(f"width_y_{lid}", f"width $y$ layer {lid} [mm]", np.linspace(0, wmax, 101), ref.width_y[:, j], gen.width_y[:, j])
        add(f"EC_r_{lid}", f"centre $r$ layer {lid} [mm]", np.linspace(0, rmax, 101), ref.ec_r[:, l], gen.ec_r[:, l])
        add(f"width_r_{lid}", f"width $r$ layer {lid} [mm]", np.linspace(0, wrmax, 101), ref.width_r[:, l], gen.width_r[:, l])
        add(f"sparsity_{lid}", f"sparsity layer {lid}", np.linspace(0, 1, 21), ref.sparsity[:, l], gen.sparsity[:, l])
    nmax = max(int(ref.n_hits.max()), int(gen.n_hits.max()), 1)
    add("n_hits", "points per shower", np.linspace(0, nmax * 1.05 + 1, 51), ref.n_hits, gen.n_hits)
    return out
