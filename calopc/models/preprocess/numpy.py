r"""The NumPy preprocessing: :class:`Preprocessor` (fit, forward and inverse transforms, serialisation).

The transforms are described in :mod:`calopc.models.preprocess`. Importing this module does not
import torch (the probit and its inverse borrow torch's special functions when they run).
"""

from __future__ import annotations

__all__ = ["DEQUANTISATIONS", "EMPTY_ENERGY", "VARIANTS", "Preprocessor", "layer_sums"]

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np

from ...geometry import Geometry
from ._constants import _DELTA, _EPS, _U_EPS

if TYPE_CHECKING:
    import torch

    from .torch import TorchPreprocessor

VARIANTS = ("I", "II")
EMPTY_ENERGY = ("floor", "occupied")


def _logit(u: np.ndarray) -> np.ndarray:
    u = np.clip(u, _EPS, 1 - _EPS)
    return np.log(u) - np.log1p(-u)


def _sigmoid(y: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * y))


DEQUANTISATIONS = ("uniform", "cdf")


def _ndtri(u: np.ndarray) -> np.ndarray:
    """The standard normal quantile (probit)."""
    import torch

    return torch.special.ndtri(torch.from_numpy(np.asarray(u, dtype=np.float64))).numpy()


def _ndtr(y: np.ndarray) -> np.ndarray:
    """The standard normal CDF."""
    import torch

    return torch.special.ndtr(torch.from_numpy(np.asarray(y, dtype=np.float64))).numpy()


def _cdf_table(edges: list[np.ndarray], pdf: list[list[float]]) -> dict[str, np.ndarray]:
    """Per-layer bin edges and CDFs laid end to end, each layer shifted so that one sorted
    search finds the bin of a value in its own layer (memory ``O(bins)``, not ``O(P × bins)``).

    Keys: ``E`` / ``C`` flat shifted edges / CDFs, ``start`` (L,) index of each layer's first
    entry, ``nb`` (L,) bins per layer, ``span`` the edge shift per layer (the CDF shift is 2).
    """
    lo = min(float(e[0]) for e in edges)
    span = max(float(e[-1]) for e in edges) - lo + 1.0
    cdf = []
    for q in pdf:
        c = np.concatenate([[0.0], np.cumsum(np.asarray(q, dtype=np.float64))])
        cdf.append(c / c[-1])
    nb = np.array([len(e) - 1 for e in edges], dtype=np.int64)
    return {"E": np.concatenate([np.asarray(e, dtype=np.float64) + l * span for l, e in enumerate(edges)]),
            "C": np.concatenate([c + 2.0 * l for l, c in enumerate(cdf)]),
            "start": np.concatenate([[0], np.cumsum(nb + 1)[:-1]]).astype(np.int64), "nb": nb,
            "span": np.float64(span)}


def _cdf_forward(t: dict, v: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Continuous coordinate ``v`` of points in ``layer`` → ``Φ⁻¹(cdf[k] + pdf[k]·frac)``."""
    layer = np.asarray(layer, dtype=np.int64)
    key = np.asarray(v, dtype=np.float64) + layer * t["span"]
    k = np.clip(np.searchsorted(t["E"], key, side="right") - 1 - t["start"][layer], 0, t["nb"][layer] - 1)
    i = t["start"][layer] + k
    frac = np.clip((key - t["E"][i]) / (t["E"][i + 1] - t["E"][i]), 0.0, 1.0)
    u = t["C"][i] - 2.0 * layer + (t["C"][i + 1] - t["C"][i]) * frac
    return _ndtri(np.clip(u, _U_EPS, 1 - _U_EPS))


def _cdf_inverse(t: dict, y: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_cdf_forward`: the bin by a search on the CDF, then the position inside it."""
    layer = np.asarray(layer, dtype=np.int64)
    key = _ndtr(y) + 2.0 * layer
    k = np.clip(np.searchsorted(t["C"], key, side="right") - 1 - t["start"][layer], 0, t["nb"][layer] - 1)
    i = t["start"][layer] + k
    frac = np.clip((key - t["C"][i]) / np.maximum(t["C"][i + 1] - t["C"][i], 1e-300), 0.0, 1.0)
    return t["E"][i] - layer * t["span"] + frac * (t["E"][i + 1] - t["E"][i])


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
        dequantisation: ``"uniform"`` (logit of the scaled coordinate) or ``"cdf"`` (variant II).
        pdf_alpha, pdf_r: ``"cdf"``: per layer, the training points' distribution over its α / r bins.
        empty_energy: variant II, the energy feature of empty layers: ``"floor"`` (the default
            of a saved config without the key: runs written before it existed) or ``"occupied"``
            (what :meth:`fit` uses; see the module docstring).
        empty_mean, empty_std: ``"occupied"``: per layer, mean and spread of ``log(E_l/E_inc)``
            where the layer has points.
        energy_ref: variant I, point energies relative to ``"inc"`` (``E_inc``) or ``"sum"`` (the
            shower's ``ΣE``, CaloPointFlow II as published).
        pdf_z: variant I with ``"cdf"``: the training points' distribution over the layers.
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
    dequantisation: str = "uniform"
    pdf_alpha: list[list[float]] = field(default_factory=list)
    pdf_r: list[list[float]] = field(default_factory=list)
    empty_energy: str = "floor"
    empty_mean: list[float] = field(default_factory=list)
    empty_std: list[float] = field(default_factory=list)
    energy_ref: str = "inc"
    pdf_z: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            msg = f"preprocessing variant must be one of {VARIANTS}, got {self.variant!r}"
            raise ValueError(msg)
        if self.dequantisation not in DEQUANTISATIONS:
            msg = f"preprocessing dequantisation must be one of {DEQUANTISATIONS}, got {self.dequantisation!r}"
            raise ValueError(msg)
        if self.empty_energy not in EMPTY_ENERGY:
            msg = f"preprocessing empty_energy must be one of {EMPTY_ENERGY}, got {self.empty_energy!r}"
            raise ValueError(msg)
        if self.energy_ref not in ("inc", "sum"):
            msg = f"preprocessing energy_ref must be 'inc' or 'sum', got {self.energy_ref!r}"
            raise ValueError(msg)

    # ------------------------------------------------------------ CDF dequantisation
    def _bin_edges(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        g = self.geometry
        alpha = [np.linspace(-math.pi, math.pi, na + 1) for na in g.n_alpha]
        return alpha, [np.asarray(e, dtype=np.float64) for e in g.r_edges]

    def _fit_pdfs(self, cell: np.ndarray) -> None:
        """Per-layer distribution of the points ``cell`` over the α and r bins (+½ per bin, so none is empty)."""
        g = self.geometry
        per_cell = np.bincount(np.asarray(cell, dtype=np.int64), minlength=g.n_voxels).astype(np.float64)
        layer = np.asarray(g.cell_layer, dtype=np.int64)
        out = []
        for nb, binned in ((g.n_alpha, g.cell_alpha_bin), (g.n_r, g.cell_r_bin)):
            width = int(max(nb))
            h = np.bincount(layer * width + np.asarray(binned, dtype=np.int64), weights=per_cell,
                            minlength=g.n_layers * width).reshape(g.n_layers, width)
            out.append([((h[l, :n] + 0.5) / (h[l, :n].sum() + 0.5 * n)).tolist() for l, n in enumerate(nb)])
        self.pdf_alpha, self.pdf_r = out
        if self.variant == "I":
            h = np.bincount(layer, weights=per_cell, minlength=g.n_layers)
            self.pdf_z = ((h + 0.5) / (h.sum() + 0.5 * g.n_layers)).tolist()
        self.__dict__.pop("_cdf_tables", None)
        self.__dict__.pop("_cdf_z_table", None)

    def _cdf_z(self) -> dict:
        """The (cached) search table of the layer CDF (variant I with ``"cdf"``): one "layer" of ``L`` bins."""
        t = self.__dict__.get("_cdf_z_table")
        if t is None:
            n_l = self.geometry.n_layers
            if len(self.pdf_z) != n_l:
                msg = (f"CDF dequantisation of z needs pdf_z with one entry per layer ({n_l}); got {len(self.pdf_z)} "
                       "(fit the preprocessing with dequantisation='cdf')")
                raise ValueError(msg)
            t = _cdf_table([np.arange(n_l + 1, dtype=np.float64) - 0.5], [self.pdf_z])
            self.__dict__["_cdf_z_table"] = t
        return t

    def _layer_of_z(self, z: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(np.asarray(z, dtype=np.float64) + 0.5), 0, self.geometry.n_layers - 1).astype(np.int64)

    def _cdf(self) -> tuple[dict, dict]:
        """The (cached) search tables of the α and r CDFs."""
        t = self.__dict__.get("_cdf_tables")
        if t is None:
            n_l = self.geometry.n_layers
            if len(self.pdf_alpha) != n_l or len(self.pdf_r) != n_l:
                msg = (f"CDF dequantisation needs pdf_alpha and pdf_r with one row per layer ({n_l}); got "
                       f"{len(self.pdf_alpha)} and {len(self.pdf_r)} (fit the preprocessing with dequantisation='cdf')")
                raise ValueError(msg)
            ea, er = self._bin_edges()
            t = (_cdf_table(ea, self.pdf_alpha), _cdf_table(er, self.pdf_r))
            self.__dict__["_cdf_tables"] = t
        return t

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
    def forward_points(self, zar: np.ndarray, energy: np.ndarray, e_inc: np.ndarray,
                       e_sum: np.ndarray | None = None) -> np.ndarray:
        """Continuous ``(z, alpha, r)``, energies and per-point incident energy → model features.

        ``e_sum``: per-point shower energy ``ΣE`` (needed with ``energy_ref="sum"``).

        Shapes:
            zar: ``(P, 3)``; energy, e_inc, e_sum: ``(P,)``; returns ``(P, 4)`` float32.
        """
        z0, z1, r0, r1 = self._ranges
        y = np.empty((zar.shape[0], 4))
        if self.dequantisation == "cdf":
            ta, tr = self._cdf()
            layer = self._layer_of_z(zar[:, 0])
            y[:, 0] = _cdf_forward(self._cdf_z(), zar[:, 0], np.zeros_like(layer))
            y[:, 1] = _cdf_forward(ta, zar[:, 1], layer)
            y[:, 2] = _cdf_forward(tr, zar[:, 2], layer)
        else:
            y[:, 0] = _logit((zar[:, 0] - z0) / (z1 - z0))
            y[:, 1] = _logit((zar[:, 1] + math.pi) / (2 * math.pi))
            y[:, 2] = _logit((zar[:, 2] - r0) / (r1 - r0))
        y[:, 3] = np.log(np.maximum(energy, 1e-30)) - np.log(self._energy_ref(e_inc, e_sum))
        return ((y - np.asarray(self.point_mean)) / np.asarray(self.point_std)).astype(np.float32)

    def inverse_points(self, y: np.ndarray, e_inc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model features → ``((z, alpha, r) (P, 3), E (P,))``; exact inverse of :meth:`forward_points`
        (up to the logit clipping at 1e-6). With ``energy_ref="sum"`` the energies are relative to
        ``e_inc``, not to the unknown ``ΣE``: rescale them per shower to the sampled ``ΣE``."""
        y = np.asarray(y, dtype=np.float64) * np.asarray(self.point_std) + np.asarray(self.point_mean)
        z0, z1, r0, r1 = self._ranges
        zar = np.empty((y.shape[0], 3))
        if self.dequantisation == "cdf":
            ta, tr = self._cdf()
            zar[:, 0] = _cdf_inverse(self._cdf_z(), y[:, 0], np.zeros(y.shape[0], dtype=np.int64))
            layer = self._layer_of_z(zar[:, 0])
            zar[:, 1] = _cdf_inverse(ta, y[:, 1], layer)
            zar[:, 2] = _cdf_inverse(tr, y[:, 2], layer)
        else:
            zar[:, 0] = z0 + _sigmoid(y[:, 0]) * (z1 - z0)
            zar[:, 1] = _sigmoid(y[:, 1]) * 2 * math.pi - math.pi
            zar[:, 2] = r0 + _sigmoid(y[:, 2]) * (r1 - r0)
        energy = np.exp(np.clip(y[:, 3], -80, 80)) * e_inc
        return zar, energy

    def _energy_ref(self, e_inc: np.ndarray, e_sum: np.ndarray | None) -> np.ndarray:
        if self.energy_ref == "inc":
            return np.asarray(e_inc, dtype=np.float64)
        if e_sum is None:
            msg = "preprocessing energy_ref='sum' needs the shower energies (e_sum) of the points"
            raise ValueError(msg)
        return np.maximum(np.asarray(e_sum, dtype=np.float64), 1e-30)

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
        if self.dequantisation == "cdf":
            ta, tr = self._cdf()
            y[:, 0] = _cdf_forward(ta, zar[:, 1], layer)
            y[:, 1] = _cdf_forward(tr, zar[:, 2], layer)
        else:
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
        if self.dequantisation == "cdf":
            ta, tr = self._cdf()
            zar[:, 1] = _cdf_inverse(ta, y[:, 0], layer)
            zar[:, 2] = _cdf_inverse(tr, y[:, 1], layer)
        else:
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
        if self.empty_energy == "floor":
            le = np.log(frac + _DELTA * v)
        else:
            mu, sd = self._empty_stats()
            le = np.where(n_layer > 0, np.log(np.maximum(frac, 1e-30)), mu + sd * _ndtri(v))
        s = np.concatenate([np.log(n_layer + u), le], axis=1)
        return ((s - np.asarray(self.shower_mean)) / np.asarray(self.shower_std)).astype(np.float32)

    def _empty_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(μ_l, σ_l)`` of ``empty_energy="occupied"``, ``(L,)`` each."""
        n_l = self.geometry.n_layers
        if len(self.empty_mean) != n_l or len(self.empty_std) != n_l:
            msg = (f"empty_energy='occupied' needs empty_mean and empty_std with one entry per layer ({n_l}); got "
                   f"{len(self.empty_mean)} and {len(self.empty_std)} (fit the preprocessing)")
            raise ValueError(msg)
        return np.asarray(self.empty_mean, dtype=np.float64), np.asarray(self.empty_std, dtype=np.float64)

    def _fit_empty(self, n_layer: np.ndarray, e_layer: np.ndarray, e_inc: np.ndarray) -> None:
        """Per layer, mean and spread of ``log(E_l/E_inc)`` over the showers where the layer has points
        (layers with fewer than two such showers get the values of all occupied layers)."""
        occ = np.asarray(n_layer) > 0
        lf = np.log(np.maximum(np.asarray(e_layer, dtype=np.float64) / np.asarray(e_inc, dtype=np.float64)[:, None],
                               1e-30))
        all_occ = lf[occ]
        g_mu = float(all_occ.mean()) if all_occ.size else 0.0
        g_sd = float(all_occ.std()) if all_occ.size > 1 else 1.0
        cnt = occ.sum(0)
        mu = np.where(cnt >= 2, (lf * occ).sum(0) / np.maximum(cnt, 1), g_mu)
        var = (((lf - mu) ** 2) * occ).sum(0) / np.maximum(cnt, 1)
        sd = np.where(cnt >= 2, np.sqrt(var), g_sd)
        self.empty_mean = mu.tolist()
        self.empty_std = np.maximum(sd, 1e-3).tolist()

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
        if self.empty_energy == "floor":
            frac = np.clip(np.exp(np.clip(s[:, n_l:], -80, 0)) - 0.5 * _DELTA, 0.01 * _DELTA, 1.0)  # ≤ E_inc
        else:
            frac = np.exp(np.clip(s[:, n_l:], -80, 0))
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
            *, seed: int = 0, max_points: int = 2_000_000, variant: str = "I",
            dequantisation: str = "uniform", empty_energy: str = "occupied", energy_ref: str = "inc") -> Preprocessor:
        """Fit the standardisation on (a subsample of) training data.

        Args:
            cell, energy: flat per-point cell indices and energies ``(P,)``.
            counts: points per shower ``(B,)``; e_inc: incident energies ``(B,)``.
            variant: ``"I"`` or ``"II"``.
            dequantisation: ``"uniform"`` or ``"cdf"`` (variant II; the bin distributions are fitted here).
            empty_energy: variant II, the energy feature of empty layers (``"occupied"`` or the older ``"floor"``).
            energy_ref: variant I, point energies relative to ``"inc"`` or ``"sum"``.
        """
        p = cls(geometry, variant=variant, dequantisation=dequantisation, empty_energy=empty_energy,
                energy_ref=energy_ref)
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
        if dequantisation == "cdf":
            p._fit_pdfs(cell_s)
        if variant == "I":
            y = p.forward_points(p.dequantise(cell_s, rng), energy_s, e_inc[shower_of],
                                 e_layer.sum(1)[shower_of]).astype(np.float64)
            s = p.forward_shower(counts, e_layer.sum(1), e_inc).astype(np.float64)
        else:
            p.point_mean, p.point_std = [0.0] * 3, [1.0] * 3
            p.shower_mean, p.shower_std = [0.0] * p.n_shower_features, [1.0] * p.n_shower_features
            if p.empty_energy == "occupied":
                p._fit_empty(n_layer, e_layer, e_inc)
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

    def to_torch(self, device: torch.device | str = "cpu") -> TorchPreprocessor:
        """The forward path as torch operations on ``device`` (:class:`TorchPreprocessor`)."""
        from .torch import TorchPreprocessor

        return TorchPreprocessor(self, device)

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

