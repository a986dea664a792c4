r"""Synthetic CaloChallenge showers: parameterised (GFlash-style) showers in the official format.

The real CaloChallenge files are large and not always at hand; this module writes
files with exactly their layout (``incident_energies`` ``(N, 1)``, ``showers``
``(N, n_voxels)``, MeV, float64, gzip) filled with physically plausible showers,
so every tool can be exercised and tested anywhere.

Physics (electromagnetic showers, after Grindhammer & Peters, hep-ex/0001020):

* Deposited energy: ``E_dep = f · E_inc`` with ``f ~ N(0.80, (0.2/√E[GeV])² ⊕ 0.05²)``
  (the files are scaled by 1/sampling-fraction, so ``f`` is O(1)), minus leakage.
* Longitudinal profile: a gamma distribution in depth ``t`` (radiation lengths)
  whose log-centroid ``ln T`` and log-shape ``ln α`` fluctuate from shower to
  shower, jointly Gaussian with energy-dependent widths and correlation.
* Radial profile: two components, ``f(r) = p f_C + (1 − p) f_T`` with
  ``f_i(r) ∝ r R_i² / (r² + R_i²)²``, core radius growing and core fraction falling
  with depth ``τ = t/T``; per-shower and per-layer fluctuations of the radii, and a
  per-layer azimuthal asymmetry.
* Energy is carried by ``N_spot ∝ E^0.876`` spots of gamma-distributed energy.
  Binning independent spots into cells is exactly a compound Poisson process per
  cell (spot count ``~ Poisson(N_spot · p_cell)``), which is what is sampled: no
  loop over spots, so ≳ 1,000 dataset-2 showers/s on one core.
* Cells below the dataset's readout threshold (15.15 keV for datasets 2 and 3) are
  zeroed.

Pions (dataset 1-pions) use a cruder hadronic variant: an exponentially distributed
starting depth, a longer and wider profile and larger response fluctuations.

Incident energies follow the real sets: log-uniform 1 GeV–1 TeV for datasets 2 and
3, the 15 powers of two 256 MeV … 4.19 TeV with the official frequencies for
dataset 1.
"""

from __future__ import annotations

__all__ = ["generate", "incident_energies", "write_synthetic"]

import math
import os
from pathlib import Path

import numpy as np

from .geometry import THRESHOLDS, Geometry, load_geometry

#: showers per random stream: results do not depend on how the caller chunks the work
_BLOCK = 256
#: largest dense float64 block (bytes) of one random stream: geometries with more cells (high granularity)
#: use fewer showers per stream, so memory stays bounded whatever the number of cells
_BLOCK_BYTES = 96 << 20


def block_size(geometry: Geometry) -> int:
    """Showers per random stream for ``geometry``: 256 up to dataset 3, fewer for finer geometries."""
    return max(1, min(_BLOCK, _BLOCK_BYTES // (8 * geometry.n_voxels)))

_Z_W = 74.0
_EC_W = 8.0  # critical energy of tungsten, MeV
_X0_PER_LAYER = 0.8  # datasets 2/3: one readout layer (2 × (1.4 mm W + 0.3 mm Si)) ≈ 0.8 X0
_RM_MM = 9.3  # Molière radius (mm) of datasets 2/3 (r-cell 4.65 mm ≈ ½ R_M)

# dataset 1: depth range (X0) of each ATLAS sampling (by XML layer id), rough values
_DS1_DEPTH = {0: (1.5, 2.0), 1: (2.0, 6.5), 2: (6.5, 22.5), 3: (22.5, 25.0),
              12: (25.0, 45.0), 13: (45.0, 85.0), 14: (85.0, 100.0)}
_DS1_RM_MM = 20.0

# dataset 1 incident energies: 2**8 … 2**22 MeV, showers per energy in one official file
_DS1_COUNTS = {
    "1-photons": [10000] * 10 + [10000, 5000, 3000, 2000, 1000],
    "1-pions": [10000] * 10 + [9800, 5000, 3000, 2000, 1000],
}


def incident_energies(dataset: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` incident energies (MeV) distributed as in the official dataset."""
    if dataset in _DS1_COUNTS:
        w = np.asarray(_DS1_COUNTS[dataset], dtype=np.float64)
        k = rng.choice(len(w), size=n, p=w / w.sum())
        return np.ldexp(1.0, k + 8)
    return 10.0 ** rng.uniform(3.0, 6.0, size=n)


def _lgamma(x: np.ndarray) -> np.ndarray:
    return np.frompyfunc(math.lgamma, 1, 1)(x).astype(np.float64)


def _layer_depths(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Start and end depth (X0) of every layer."""
    if geometry.name in ("1-photons", "1-pions"):
        lo = np.array([_DS1_DEPTH.get(i, (i, i + 1))[0] for i in geometry.layer_ids], dtype=np.float64)
        hi = np.array([_DS1_DEPTH.get(i, (i, i + 1))[1] for i in geometry.layer_ids], dtype=np.float64)
        return lo, hi
    lo = np.arange(geometry.n_layers) * _X0_PER_LAYER
    return lo, lo + _X0_PER_LAYER


def _gamma_fractions(lo: np.ndarray, hi: np.ndarray, shape: np.ndarray, rate: np.ndarray,
                     start: np.ndarray, sub: int = 12) -> np.ndarray:
    """Fraction of a gamma(shape, rate) profile starting at depth ``start`` inside each layer: ``(N, L)``."""
    # midpoint rule on `sub` points per layer, in units of the profile variable s = rate * (t - start)
    u = (np.arange(sub) + 0.5) / sub
    t = lo[None, :, None] + (hi - lo)[None, :, None] * u[None, None, :]  # (1, L, sub)
    s = rate[:, None, None] * (t - start[:, None, None])
    pos = s > 0
    s = np.where(pos, s, 1.0)
    logpdf = (shape[:, None, None] - 1) * np.log(s) - s - _lgamma(shape)[:, None, None]
    pdf = np.where(pos, np.exp(logpdf), 0.0)
    ds = rate[:, None] * (hi - lo)[None, :] / sub
    return pdf.sum(axis=2) * ds


def _profile(geometry: Geometry, e_inc: np.ndarray, hadronic: bool, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Per-shower response, longitudinal fractions ``(N, L)`` and per-layer cell fractions ``(N, nα, n_r)``."""
    n = e_inc.shape[0]
    e_gev = e_inc / 1000.0
    lo, hi = _layer_depths(geometry)
    t_mid = 0.5 * (lo + hi)
    if hadronic:
        resp = rng.normal(0.74, np.sqrt(0.5**2 / e_gev + 0.18**2))
        resp = np.clip(resp, 0.05, 1.4)
        start = rng.exponential(10.0, size=n)
        shape = np.maximum(np.exp(rng.normal(np.log(1.8), 0.35, size=n)), 1.1)
        tmax = 6.0 * (1 + 0.15 * np.log(e_gev + 1)) * np.exp(rng.normal(0, 0.3, size=n))
        rate = shape / tmax  # mean depth after the start: tmax
        rm = 3.0 * _DS1_RM_MM
    else:
        # response (scaled to O(1) by the files' 1/sampling-fraction): ds1 photons ≈ 0.97, ds2/3 ≈ 0.79
        mu, stoch, const = (0.97, 0.1, 0.03) if geometry.name == "1-photons" else (0.80, 0.2, 0.05)
        resp = rng.normal(mu, np.sqrt(stoch**2 / e_gev + const**2))
        resp = np.clip(resp, 0.05, 1.5)
        lny = np.log(e_inc / _EC_W)
        mean_lnT = np.log(np.maximum(lny - 0.858, 0.5))
        mean_lna = np.log(0.21 + (0.492 + 2.38 / _Z_W) * lny)
        s_t = 1.0 / (-1.4 + 1.26 * lny)
        s_a = 1.0 / (-0.58 + 0.86 * lny)
        rho = 0.705 - 0.023 * lny
        z1, z2 = rng.standard_normal((2, n))
        ln_t = mean_lnT + s_t * z1
        ln_a = mean_lna + s_a * (rho * z1 + np.sqrt(1 - rho**2) * z2)
        tmax, shape = np.exp(ln_t), np.maximum(np.exp(ln_a), 1.05)
        rate = (shape - 1) / tmax
        start = np.zeros(n)
        rm = _DS1_RM_MM if geometry.name.startswith("1-") else _RM_MM
    long = _gamma_fractions(lo, hi, shape, rate, start)  # (N, L)

    # radial parameters (in Molière radii), GFlash homogeneous-medium forms
    tau = np.maximum(t_mid[None, :] - start[:, None], 0.0) / (tmax[:, None] + 1e-9)  # (N, L)
    lne = np.log(e_gev)[:, None]
    r_core = (0.0251 + 0.00319 * lne) + (0.1162 - 0.000381 * _Z_W) * tau
    k4 = 0.3585 + 0.0421 * lne
    r_tail = (0.659 - 0.00309 * _Z_W) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    p3 = 1.313 - 0.0686 * lne
    arg = (0.401 + 0.00187 * _Z_W - tau) / p3
    p_core = np.clip((2.632 - 0.00094 * _Z_W) * np.exp(arg - np.exp(arg)), 0.02, 0.98)
    if hadronic:
        r_core, r_tail, p_core = r_core * 2 + 0.2, r_tail * 2.5 + 0.5, p_core * 0.6
    fluct = np.exp(rng.normal(0, 0.12, size=(n, 1)) + rng.normal(0, 0.06, size=r_core.shape))
    r_core = np.maximum(r_core * fluct * rm, 0.05)
    r_tail = np.maximum(r_tail * fluct * rm, r_core * 1.5)

    cells = []
    for l, (edges, na) in enumerate(zip(geometry.r_edges, geometry.n_alpha)):
        e = np.asarray(edges, dtype=np.float64)
        e2 = e**2

        def cdf(rad: np.ndarray, e2: np.ndarray = e2) -> np.ndarray:
            return e2[None, :] / (e2[None, :] + rad[:, None] ** 2)

        cc, ct = cdf(r_core[:, l]), cdf(r_tail[:, l])
        pr = p_core[:, l, None] * np.diff(cc, axis=1) + (1 - p_core[:, l, None]) * np.diff(ct, axis=1)  # (N, n_r)
        if na > 1:
            centres = -math.pi + (np.arange(na) + 0.5) * 2 * math.pi / na
            eps = np.minimum(0.25 * np.abs(rng.standard_normal(n)), 0.6)
            phi = rng.uniform(-math.pi, math.pi, size=n)
            w = 1 + eps[:, None] * np.cos(centres[None, :] - phi[:, None])
            w /= w.sum(axis=1, keepdims=True)
        else:
            w = np.ones((n, 1))
        cells.append(w[:, :, None] * pr[:, None, :])  # (N, nα, n_r)
    return resp, long, cells


def generate(dataset: str | Geometry = "2", n: int = 1000, *, seed: int = 0,
             energies: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic showers of one CaloChallenge dataset.

    Args:
        dataset: ``"1-photons"``, ``"1-pions"``, ``"2"``, ``"3"``, ``"hg"`` (high granularity), a binning XML
            path or a :class:`Geometry` (electromagnetic showers in a user geometry).
        n: number of showers.
        seed: random seed; the same seed gives the same showers.
        energies: incident energies (MeV) to use instead of drawing them.

    Returns:
        ``(incident_energies (N,), showers (N, n_voxels))``, float64, MeV.
    """
    geometry = load_geometry(dataset)
    if energies is not None:
        energies = np.asarray(energies, dtype=np.float64).reshape(-1)
        n = energies.shape[0]
    inc = np.empty(n)
    out = np.empty((n, geometry.n_voxels))
    bs = block_size(geometry)
    for b, i in enumerate(range(0, n, bs)):
        j = min(i + bs, n)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(b,)))
        e = energies[i:j] if energies is not None else None
        inc[i:j], out[i:j] = _block(geometry, j - i, rng, e)
    return inc, out


def _block(geometry: Geometry, n: int, rng: np.random.Generator, energies: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray]:
    e_inc = incident_energies(geometry.name, n, rng) if energies is None else energies
    if (e_inc <= 0).any() or not np.isfinite(e_inc).all():
        msg = "incident energies must be finite and > 0 MeV"
        raise ValueError(msg)
    hadronic = geometry.particle == "pion"
    resp, long, cells = _profile(geometry, e_inc, hadronic, rng)
    e_gev = e_inc / 1000.0
    n_spot = 0.33 * 93.0 * math.log(_Z_W) * e_gev**1.1 + 20.0
    spot_shape = 0.45  # gamma shape of one spot's energy: broad, many soft deposits
    e_spot = resp * e_inc / n_spot  # mean spot energy (MeV)
    dens = np.concatenate([(long[:, l, None, None] * c).reshape(n, -1) for l, c in enumerate(cells)], axis=1)
    lam = n_spot[:, None] * dens
    k = rng.poisson(lam)
    nz = k > 0
    vals = np.zeros_like(lam)
    vals[nz] = rng.gamma(k[nz] * spot_shape, 1.0) * (np.broadcast_to(e_spot[:, None], lam.shape)[nz] / spot_shape)
    # the readout threshold of the geometry; electromagnetic showers in a user geometry without one get the
    # dataset-2/3 readout's (15.15 keV per cell); dataset 1 files keep every deposit
    thr = 0.0 if geometry.name.startswith("1-") else (geometry.threshold or THRESHOLDS["3"])
    if thr > 0:
        vals[vals < thr] = 0.0
    return e_inc, vals


def write_synthetic(path: str | os.PathLike, *, dataset: str = "2", n: int = 1000, seed: int = 0,
                    progress: bool = False) -> Path:
    """Write ``n`` synthetic showers to ``path`` in the official HDF5 format (atomically).

    Ctrl-C or SIGTERM stops it within one block of showers and leaves no file behind.
    """
    from ._safety import OutputError
    from .hdf5 import shower_writer
    from .progress import progress_bar

    geometry = load_geometry(dataset)
    if isinstance(n, bool) or int(n) < 0:
        msg = f"number of showers must be >= 0, got {n}"
        raise ValueError(msg)
    bs = block_size(geometry)
    rows = bs * max(1, (64 << 20) // (geometry.n_voxels * 8 * bs))
    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        msg = (f"{path}: synth writes HDF5, but the name ends in {path.suffix!r}; use a .hdf5 name and "
               "'calopc convert' it")
        raise OutputError(msg)
    # gzip-compressed output: about 1-2 bytes per voxel at dataset-2 occupancy
    with shower_writer(path, geometry.n_voxels, dtype=np.float64, expected_bytes=0.5 * n * geometry.n_voxels,
                       attrs={"generator": "calopc.synth", "dataset": geometry.name, "seed": seed}) as w, \
            progress_bar(n, f"synth {path.name}", enabled=progress) as bar:
        for i in range(0, n, rows):
            j = min(i + rows, n)
            inc, sh = _generate_range(geometry, i, j, seed)
            w.append(inc, sh)
            bar.update(j - i)
    return path


def _generate_range(geometry: Geometry, i: int, j: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Showers ``i:j`` of the sequence that :func:`generate` makes for ``seed`` (``i`` a multiple of the block)."""
    inc = np.empty(j - i)
    out = np.empty((j - i, geometry.n_voxels))
    from ._safety import check_interrupt

    bs = block_size(geometry)
    for s in range(i, j, bs):
        check_interrupt()  # honour Ctrl-C between blocks (deferred while an HDF5 file is being written)
        t = min(s + bs, j)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(s // bs,)))
        inc[s - i:t - i], out[s - i:t - i] = _block(geometry, t - s, rng, None)
    return inc, out
