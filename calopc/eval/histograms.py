r"""Feature histograms with the official binnings, and their separation power.

Separation power of two histograms normalised to unit sum (arXiv:2009.03796, eq. 15):
``S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i)``, 0 for identical shapes, 1 for disjoint ones.
Entries outside the binning are ignored, as with ``numpy.histogram(density=True)``.
"""

from __future__ import annotations

__all__ = [
    "DS1_ENERGY_EDGES",
    "FeatureHist",
    "energy_ratio_per_incident",
    "feature_histograms",
    "histogram_ranges",
    "separation_power",
    "voxel_spectrum",
    "voxel_spectrum_edges",
]

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


#: incident-energy bin edges of the per-energy E_tot/E_inc histograms of dataset 1 (2^8 … 2^23 MeV)
DS1_ENERGY_EDGES = 2.0 ** np.linspace(8, 23, 16)


def _ranges(geometry: Geometry, layer: int) -> tuple[float, float, float, float]:
    """(EC range, width max, EC_r max, width_r max) of one layer, in mm.

    Datasets 2 and 3: ±30, 30, 42, 20; dataset 1: ±500, 400 (layers 12, 13) or ±100, 100 (others),
    and [0, 500], [0, 1500] for EC_r and width_r, as the official plotting helper. Any other geometry:
    the outer radius ``R`` of the layer: ±R, R, R and R/2.
    """
    if geometry.name in ("2", "3"):
        return 30.0, 30.0, 42.0, 20.0
    lid = geometry.layer_ids[layer]
    if geometry.name in ("1-photons", "1-pions"):
        if lid in (12, 13):
            return 500.0, 400.0, 500.0, 1500.0
        return 100.0, 100.0, 500.0, 1500.0
    rmax = geometry.r_edges[layer][-1]
    return rmax, rmax, rmax, rmax / 2


def histogram_ranges(geometry: Geometry) -> str:
    """One line saying which centre/width histogram ranges are used for ``geometry``."""
    if geometry.name in ("2", "3"):
        return (f"official ranges of dataset {geometry.name}: centres ±30 mm, widths 0–30 mm, EC_r 0–42 mm, "
                "width_r 0–20 mm")
    if geometry.name in ("1-photons", "1-pions"):
        return (f"official ranges of dataset {geometry.name}: centres ±500 mm (layers 12, 13) or ±100 mm, widths 0–400 "
                "or 0–100 mm, EC_r 0–500 mm, width_r 0–1500 mm")
    return (f"geometry {geometry.name!r} is not an official dataset: per layer of outer radius R, centres ±R, "
            "widths 0–R, EC_r 0–R, width_r 0–R/2")


def voxel_spectrum_edges(threshold: float, ref_max: float) -> np.ndarray:
    """The official voxel-energy histogram edges: 50 log-spaced edges (49 bins), threshold to reference maximum."""
    lo = float(threshold)
    if not lo > 0:
        msg = f"the voxel-energy histogram needs a positive threshold (its lowest edge), got {threshold}"
        raise ValueError(msg)
    hi = max(float(ref_max), lo * 10)
    return np.logspace(np.log10(lo), np.log10(hi), 50)


def voxel_spectrum(ref_voxels: np.ndarray, gen_voxels: np.ndarray, threshold: float) -> FeatureHist:
    """The voxel-energy spectrum of all cells (zeros fall below the first edge), in float64.

    With ``threshold`` 0 the first edge is the smallest non-zero reference cell energy.
    """
    ref_voxels = np.asarray(ref_voxels, dtype=np.float64).reshape(-1)
    gen_voxels = np.asarray(gen_voxels, dtype=np.float64).reshape(-1)
    lo = threshold
    if not lo > 0:  # no threshold: start at the smallest non-zero reference cell
        pos = ref_voxels[ref_voxels > 0]
        lo = float(pos.min()) if pos.size else 1e-3
    edges = voxel_spectrum_edges(lo, ref_voxels.max() if ref_voxels.size else lo * 10)
    return FeatureHist("voxel_spectrum", "cell energy [MeV]", edges, np.histogram(ref_voxels, edges)[0],
                       np.histogram(gen_voxels, edges)[0], log_x=True)


def energy_ratio_per_incident(ref: Features, gen: Features, geometry: Geometry) -> list[FeatureHist]:
    """Dataset 1: E_tot/E_inc per discrete incident energy (15 histograms, as the official helper).

    20 bins on [0.4, 1.4]; for photons above 4 GeV (from the fifth energy on) on [0.9, 1.1].
    Names ``E_ratio_einc_<E in MeV>``.
    """
    out = []
    edges = DS1_ENERGY_EDGES
    for i in range(len(edges) - 1):
        photons_fine = i > 3 and geometry.name == "1-photons"
        bins = np.linspace(0.9, 1.1, 21) if photons_fine else np.linspace(0.4, 1.4, 21)
        sel_r = (ref.e_inc >= edges[i]) & (ref.e_inc < edges[i + 1])
        sel_g = (gen.e_inc >= edges[i]) & (gen.e_inc < edges[i + 1])
        e = int(edges[i])
        label = f"$E_{{dep}}/E_{{inc}}$ at $E_{{inc}}$ = {e / 1e3:g} GeV"
        out.append(FeatureHist(f"E_ratio_einc_{e}", label, bins, np.histogram(ref.e_ratio[sel_r], bins)[0],
                               np.histogram(gen.e_ratio[sel_g], bins)[0]))
    return out


def feature_histograms(ref: Features, gen: Features, geometry: Geometry, *, threshold: float,
                       ref_voxel_max: float | None = None, ref_voxels: np.ndarray | None = None,
                       gen_voxels: np.ndarray | None = None) -> list[FeatureHist]:
    """All histograms of the official set plus sparsity, EC_r and width_r per layer, and hit counts.

    For dataset 1 the 15 per-incident-energy E_tot/E_inc histograms are included.

    ``ref_voxels``/``gen_voxels`` (precomputed voxel-energy histograms over ``voxel_edges``)
    are passed through ``ref_voxel_max`` by the caller; see :func:`calopc.eval.evaluate`.
    """
    out: list[FeatureHist] = []

    def add(name, label, edges, r, g, log_x=False):
        hr, _ = np.histogram(r, bins=edges)
        hg, _ = np.histogram(g, bins=edges)
        out.append(FeatureHist(name, label, np.asarray(edges), hr, hg, log_x))

    add("E_ratio", r"$E_{dep}/E_{inc}$", np.linspace(0.5, 1.5, 101), ref.e_ratio, gen.e_ratio)
    if geometry.name in ("1-photons", "1-pions"):
        out.extend(energy_ratio_per_incident(ref, gen, geometry))
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
