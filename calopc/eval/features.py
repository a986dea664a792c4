r"""High-level shower features with the official CaloChallenge definitions.

Per layer ``l`` (only layers with voxels): energy ``E_layer``, energy-weighted centre
and width in ``x = r cos α`` and ``y = r sin α`` (layers with more than one α bin),
in ``r`` (all layers), and sparsity ``1 − (fraction of cells > 0)``. Per shower: total
energy and ``E_tot/E_inc``. ``r`` is the bin mid-point and ``α`` the bin centre, as in
the official evaluation; denominators carry ``+1e-16``.
"""

from __future__ import annotations

__all__ = ["Features", "apply_threshold", "compute_features", "high_level_vector", "match_official"]

from dataclasses import dataclass, fields

import numpy as np

from ..geometry import DATASETS, Geometry, same_binning


def match_official(geometry: Geometry) -> Geometry | None:
    """The official CaloChallenge geometry with the same binning as ``geometry``, or None.

    Binnings are compared layer by layer (XML layer ids, radial edges, number of α bins), so a
    binning XML of an official dataset, whatever its file name, is recognised as that dataset and
    gets its name, threshold and histogram ranges.
    """
    off = same_binning(geometry)  # the shipped geometries' comparison; hg has no official histogram ranges
    return off if off is not None and off.name in DATASETS else None


def apply_threshold(showers: np.ndarray, threshold: float) -> np.ndarray:
    """Cells below ``threshold`` (MeV) set to 0 (a copy; the input is not changed)."""
    return np.where(showers < threshold, 0.0, showers)


@dataclass
class Features:
    """Per-shower features; per-layer arrays have shape ``(N, n_layers)``, x/y ones ``(N, n_alpha_layers)``."""

    e_inc: np.ndarray
    e_tot: np.ndarray
    e_layer: np.ndarray
    ec_x: np.ndarray
    ec_y: np.ndarray
    width_x: np.ndarray
    width_y: np.ndarray
    ec_r: np.ndarray
    width_r: np.ndarray
    sparsity: np.ndarray
    n_hits: np.ndarray  # cells > 0 per shower
    n_hits_layer: np.ndarray  # (N, n_layers)

    def __len__(self) -> int:
        return int(self.e_inc.shape[0])

    @property
    def e_ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.e_tot / self.e_inc

    @classmethod
    def concatenate(cls, parts: list[Features]) -> Features:
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def select(self, idx: np.ndarray | slice) -> Features:
        return Features(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def nonfinite(self) -> np.ndarray:
        """``(N,)`` bool: showers with a NaN or infinite feature (e.g. cell energies whose sums overflow float64)."""
        bad = np.zeros(len(self), dtype=bool)
        for f in fields(self):
            v = np.asarray(getattr(self, f.name))
            if v.dtype.kind == "f":
                bad |= ~np.isfinite(v.reshape(len(v), -1)).all(axis=1)
        return bad


def _tables(geometry: Geometry) -> dict[str, np.ndarray]:
    t = geometry._cache.get("eval_tables")
    if t is None:
        r = geometry.cell_r
        a = geometry.cell_alpha
        layer = geometry.cell_layer
        multi = np.asarray(geometry.n_alpha) > 1
        t = {
            "x": r * np.cos(a),
            "y": r * np.sin(a),
            "r": r,
            "layer": layer,
            "alpha_layers": np.flatnonzero(multi),
        }
        geometry._cache["eval_tables"] = t
    return t


def _per_layer(values: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Sum ``values`` (N, n_voxels) over the cells of each layer: (N, n_layers)."""
    return np.add.reduceat(values, geometry.offsets[:-1], axis=1)


def compute_features(showers: np.ndarray, incident: np.ndarray, geometry: Geometry) -> Features:
    """Features of (already thresholded) showers ``(N, n_voxels)`` with incident energies ``(N,)``."""
    showers = np.asarray(showers, dtype=np.float64)
    t = _tables(geometry)
    e_layer = _per_layer(showers, geometry)
    den = e_layer + 1e-16

    def centre_width(coord: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m1 = _per_layer(showers * coord, geometry) / den
        m2 = _per_layer(showers * coord**2, geometry) / den
        return m1, np.sqrt(np.maximum(m2 - m1**2, 0.0))

    ec_x, w_x = centre_width(t["x"])
    ec_y, w_y = centre_width(t["y"])
    ec_r, w_r = centre_width(t["r"])
    hit = showers > 0
    hits_layer = _per_layer(hit.astype(np.int64), geometry)
    sparsity = 1.0 - hits_layer / np.asarray(geometry.voxels_per_layer)[None, :]
    al = t["alpha_layers"]
    return Features(
        e_inc=np.asarray(incident, dtype=np.float64).reshape(-1),
        e_tot=showers.sum(axis=1),
        e_layer=e_layer,
        ec_x=ec_x[:, al], ec_y=ec_y[:, al], width_x=w_x[:, al], width_y=w_y[:, al],
        ec_r=ec_r, width_r=w_r,
        sparsity=sparsity,
        n_hits=hit.sum(axis=1),
        n_hits_layer=hits_layer,
    )


def high_level_vector(f: Features) -> np.ndarray:
    """The official high-level feature vector (classifier and FPD/KPD input), in the official order.

    ``log10 E_inc``, ``log10(E_layer + 1e-8)``, ``EC_x/100``, ``EC_y/100``, ``width_x/100``,
    ``width_y/100``, ``log10(E_tot + 1e-8)``, ``sparsity``, ``EC_r/100``, ``width_r/100``:
    362 columns for datasets 2 and 3.
    """
    return np.concatenate(
        [
            np.log10(f.e_inc)[:, None],
            np.log10(f.e_layer + 1e-8),
            f.ec_x / 100, f.ec_y / 100, f.width_x / 100, f.width_y / 100,
            np.log10(f.e_tot + 1e-8)[:, None],
            f.sparsity,
            f.ec_r / 100, f.width_r / 100,
        ],
        axis=1,
    )
