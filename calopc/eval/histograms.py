r"""Feature histograms with the official binnings, and their separation power.

Separation power of two histograms normalised to unit sum (arXiv:2009.03796, eq. 15):
``S = ½ Σ_i (h1_i − h2_i)² / (h1_i + h2_i)``, 0 for identical shapes, 1 for disjoint ones.
Entries outside the binning are ignored, as with ``numpy.histogram(density=True)``; but a sample
that has showers and no entry at all inside the binning (e.g. an all-zero generator, whose
E_dep/E_inc is 0) is as different from the other as can be: its separation power is 1, not NaN.
"""

from __future__ import annotations

__all__ = [
    "DS1_ENERGY_EDGES",
    "FeatureHist",
    "HistSpec",
    "energy_ratio_per_incident",
    "feature_histograms",
    "histogram_ranges",
    "separation_power",
    "separation_statistic",
    "separation_tests",
    "shower_histogram_specs",
    "voxel_spectrum",
    "voxel_spectrum_edges",
]

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..geometry import Geometry
from .features import Features
from .permutation import LEVEL, MAX_SHOWERS, PERMUTATIONS, Permutations, draw_permutations, summarize


def separation_power(h1: np.ndarray, h2: np.ndarray, n1: int | None = None, n2: int | None = None) -> float:
    """Separation power of two histograms (counts or densities over the same bins).

    ``n1``, ``n2``: the number of showers behind each histogram, when known. A histogram with no entries
    in its bins from a sample that has showers (all of them fell outside the binning) separates
    completely from a non-empty one: 1. Without showers (or counts) on a side there is nothing to compare: NaN.
    """
    h1 = np.asarray(h1, dtype=np.float64)
    h2 = np.asarray(h2, dtype=np.float64)
    s1, s2 = h1.sum(), h2.sum()
    if s1 <= 0 or s2 <= 0:
        if (s1 <= 0 and bool(n1) and s2 > 0) or (s2 <= 0 and bool(n2) and s1 > 0):
            return 1.0
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
    n_ref: int | None = None  # showers behind each histogram (a sample entirely outside the bins separates fully)
    n_gen: int | None = None

    @property
    def separation(self) -> float:
        return separation_power(self.ref, self.gen, self.n_ref, self.n_gen)


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


def voxel_spectrum(ref_voxels: np.ndarray, gen_voxels: np.ndarray, threshold: float, *, n_ref: int | None = None,
                   n_gen: int | None = None) -> FeatureHist:
    """The voxel-energy spectrum of all cells (zeros fall below the first edge), in float64.

    With ``threshold`` 0 the first edge is the smallest non-zero reference cell energy. ``n_ref``,
    ``n_gen``: showers per sample (a sample of showers without a cell in the bins separates fully).
    """
    ref_voxels = np.asarray(ref_voxels, dtype=np.float64).reshape(-1)
    gen_voxels = np.asarray(gen_voxels, dtype=np.float64).reshape(-1)
    lo = threshold
    if not lo > 0:  # no threshold: start at the smallest non-zero reference cell
        pos = ref_voxels[ref_voxels > 0]
        lo = float(pos.min()) if pos.size else 1e-3
    edges = voxel_spectrum_edges(lo, ref_voxels.max() if ref_voxels.size else lo * 10)
    return FeatureHist("voxel_spectrum", "cell energy [MeV]", edges, np.histogram(ref_voxels, edges)[0],
                       np.histogram(gen_voxels, edges)[0], log_x=True, n_ref=n_ref, n_gen=n_gen)


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
                               np.histogram(gen.e_ratio[sel_g], bins)[0], n_ref=int(sel_r.sum()),
                               n_gen=int(sel_g.sum())))
    return out


class HistSpec(NamedTuple):
    """One histogram with one entry per shower, before filling.

    ``edges`` is the official binning, which may depend on the observed samples (E_layer: up to the
    reference maximum). ``pooled_edges``, when given, is that binning's rule as a function of values:
    the permutation test applies it to the pooled showers of both samples, which do not change under
    relabelling, so that its statistic is a function of the pool and the labels alone (an exact test).
    A plain 6-tuple (without ``pooled_edges``) means the edges do not depend on the samples.
    """

    name: str
    label: str
    edges: np.ndarray
    ref: np.ndarray
    gen: np.ndarray
    log_x: bool = False
    pooled_edges: Callable[[np.ndarray], np.ndarray] | None = None


def _log_edges_to_max(threshold: float, n: int = 40) -> Callable[[np.ndarray], np.ndarray]:
    """The official E_layer binning as a rule: ``n`` log-spaced edges from ``threshold`` to the largest value
    (at least ten times ``threshold``)."""
    def rule(values: np.ndarray) -> np.ndarray:
        top = float(np.max(values, initial=0.0, where=np.isfinite(values)))
        return np.logspace(np.log10(threshold), np.log10(max(top, threshold * 10)), n)

    return rule


def shower_histogram_specs(ref: Features, gen: Features, geometry: Geometry, *, threshold: float) -> list[HistSpec]:
    """Every histogram with one entry per shower (:class:`HistSpec`).

    The official set (E_dep/E_inc, per layer E, centres and widths in x/y) plus sparsity, EC_r and
    width_r per layer, and hit counts; the order of :func:`feature_histograms` (without dataset 1's
    per-incident-energy histograms, which hold subsets of the showers). The per-layer energies carry
    their binning rule (``pooled_edges``) for the permutation test.
    """
    out: list[HistSpec] = [HistSpec("E_ratio", r"$E_{dep}/E_{inc}$", np.linspace(0.5, 1.5, 101), ref.e_ratio,
                                    gen.e_ratio)]

    def add(name, label, edges, r, g, log_x=False, pooled=None):
        out.append(HistSpec(name, label, np.asarray(edges), r, g, log_x, pooled))

    alpha_layers = [i for i, na in enumerate(geometry.n_alpha) if na > 1]
    e_rule = _log_edges_to_max(threshold)
    for l in range(geometry.n_layers):
        lid = geometry.layer_ids[l]
        add(f"E_layer_{lid}", f"$E$ layer {lid} [MeV]", e_rule(ref.e_layer[:, l]), ref.e_layer[:, l], gen.e_layer[:, l],
            log_x=True, pooled=e_rule)
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
    # both samples set the range: fixed under relabelling already
    nmax = max(int(ref.n_hits.max()), int(gen.n_hits.max()), 1)
    add("n_hits", "points per shower", np.linspace(0, nmax * 1.05 + 1, 51), ref.n_hits, gen.n_hits)
    return out


def feature_histograms(ref: Features, gen: Features, geometry: Geometry, *, threshold: float,
                       ref_voxel_max: float | None = None, ref_voxels: np.ndarray | None = None,
                       gen_voxels: np.ndarray | None = None) -> list[FeatureHist]:
    """All histograms of the official set plus sparsity, EC_r and width_r per layer, and hit counts.

    For dataset 1 the 15 per-incident-energy E_tot/E_inc histograms are included (after E_dep/E_inc).

    ``ref_voxels``/``gen_voxels`` (precomputed voxel-energy histograms over ``voxel_edges``)
    are passed through ``ref_voxel_max`` by the caller; see :func:`calopc.eval.evaluate`.
    """
    out: list[FeatureHist] = []
    for i, (name, label, edges, r, g, log_x, _rule) in enumerate(shower_histogram_specs(ref, gen, geometry,
                                                                                         threshold=threshold)):
        hr, _ = np.histogram(r, bins=edges)
        hg, _ = np.histogram(g, bins=edges)
        out.append(FeatureHist(name, label, edges, hr, hg, log_x, n_ref=len(r), n_gen=len(g)))
        if i == 0 and geometry.name in ("1-photons", "1-pions"):
            out.extend(energy_ratio_per_incident(ref, gen, geometry))
    return out


def _separations(h_ref: np.ndarray, h_gen: np.ndarray, n_ref: int, n_gen: int) -> np.ndarray:
    """:func:`separation_power` of every column pair of ``(bins, k)`` count matrices."""
    s1, s2 = h_ref.sum(0), h_gen.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p, q = h_ref / s1, h_gen / s2
        s = 0.5 * np.sum((p - q) ** 2 / (p + q + 1e-16), axis=0)
    s[(s1 <= 0) | (s2 <= 0)] = np.nan
    s[((s1 <= 0) & (n_ref > 0) & (s2 > 0)) | ((s2 <= 0) & (n_gen > 0) & (s1 > 0))] = 1.0
    return s


def separation_statistic(spec: HistSpec | tuple, perm: Permutations) -> np.ndarray:
    """The separation power of one histogram for every labelling of ``perm``: ``(P + 1,)``, column 0 observed.

    The pooled values (the subsets of ``perm``) are binned once, with ``spec.pooled_edges`` applied to
    them when given, else with ``spec.edges``; each labelling's two histograms come from one cumulative
    sum over the values sorted by bin. Values outside the bins (and non-finite ones) are not counted, as
    with ``numpy.histogram``. NaN where neither sample has an entry in the bins.
    """
    spec = HistSpec(*spec)
    z = perm.labels
    n_ref, n_gen = perm.n_ref, perm.n_gen
    n = n_ref + n_gen
    v = np.concatenate([perm.ref(np.asarray(spec.ref, dtype=np.float64)), perm.gen(np.asarray(spec.gen, dtype=np.float64))])
    edges = spec.edges if spec.pooled_edges is None else spec.pooled_edges(v)
    edges = np.asarray(edges, dtype=np.float64)
    nb = len(edges) - 1
    with np.errstate(invalid="ignore"):
        b = np.searchsorted(edges, v, side="right") - 1
    b[v == edges[-1]] = nb - 1  # numpy.histogram: the last bin is closed
    b[(b < 0) | (b >= nb) | ~np.isfinite(v)] = nb  # outside: not counted
    order = np.argsort(b, kind="stable")
    c = np.zeros((n + 1, z.shape[1]))
    np.cumsum(z[order], axis=0, out=c[1:])
    lims = np.searchsorted(b[order], np.arange(nb + 1))
    h_ref = c[lims[1:]] - c[lims[:-1]]  # (nb, k): counts per bin for every labelling
    h_all = np.bincount(b, minlength=nb + 1)[:nb, None].astype(np.float64)
    return _separations(h_ref, h_all - h_ref, n_ref, n_gen)


def separation_tests(specs: list[HistSpec] | list[tuple], *, permutations: int = PERMUTATIONS, seed: int = 0,
                     level: float = LEVEL, max_showers: int = MAX_SHOWERS) -> dict:
    """Permutation tests of the separation powers: what a perfect generator gives at these sample sizes.

    The showers of both samples are pooled and the labels shuffled ``permutations`` times (sizes kept);
    every histogram of ``specs`` (:class:`HistSpec` from :func:`shower_histogram_specs`, or plain
    ``(name, label, edges, ref, gen, log_x)`` tuples, one entry per shower) is refilled for each shuffle
    from one sort of its pooled values (the labellings, p-value and summary of
    :mod:`calopc.eval.permutation`). The test is exact: its binning must not depend on which showers
    are labelled reference, so a histogram whose official edges do (E_layer: up to the reference
    maximum) is binned for the test by the same rule applied to the pooled showers (``pooled_edges``;
    e.g. up to the maximum of both samples); its entry then says ``"binning": "pooled"`` and gives the
    official S beside the tested one (``"official"``). Edges fixed in advance are used as they are.

    Returns ``{"per_histogram": {name: {observed, null_mean, null_sd, excess, p_value, ...}}, "E_ratio":
    {...}, "mean": {...}}``; ``observed`` is the tested S, ``"mean"`` tests the mean of the tested S over
    all these histograms. ``p = (1 + #{null >= observed}) / (1 + permutations)``: a perfect generator
    reads "differs" (``p <= level``) in at most ``level`` of its samples (exactly, for
    ``level · (permutations + 1)`` an integer and no ties). Samples larger than ``max_showers`` are
    tested on a random subset of that size (``observed`` and ``official`` are then the subset's).
    """
    if not specs:
        return {}
    full = (len(specs[0][3]), len(specs[0][4]))
    perm = draw_permutations(*full, permutations, seed=seed, max_showers=max_showers)
    n_ref, n_gen = perm.n_ref, perm.n_gen
    per: dict[str, dict] = {}
    total = np.zeros(permutations + 1)
    count = np.zeros(permutations + 1)
    for spec in specs:
        spec = HistSpec(*spec)
        if (len(spec.ref), len(spec.gen)) != full:
            continue
        s = separation_statistic(spec, perm)
        if not np.isfinite(s[0]) or not np.isfinite(s[1:]).any():
            continue
        info = {}
        if spec.pooled_edges is not None:
            r, g = perm.ref(np.asarray(spec.ref, dtype=np.float64)), perm.gen(np.asarray(spec.gen, dtype=np.float64))
            official = separation_power(np.histogram(r, spec.edges)[0], np.histogram(g, spec.edges)[0], n_ref, n_gen)
            info = {"binning": "pooled", "official": official}
        # shuffles without a defined S are left out
        per[spec.name] = summarize(float(s[0]), s[1:], level=level, n_ref=n_ref, n_gen=n_gen, **info)
        ok = np.isfinite(s)
        total[ok] += s[ok]
        count[ok] += 1
    out = {"per_histogram": per, "permutations": permutations, "n_ref": n_ref, "n_gen": n_gen, "level": level}
    if "E_ratio" in per:
        out["E_ratio"] = per["E_ratio"]
    if count[0] > 0:
        with np.errstate(invalid="ignore"):
            mean = total / count
        out["mean"] = summarize(float(mean[0]), mean[1:], level=level, histograms=len(per), n_ref=n_ref, n_gen=n_gen)
    return out

