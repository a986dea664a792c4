r"""Calorimeter geometry: the CaloChallenge binning XML as a frozen object.

A geometry is a list of layers, each with radial bin edges (mm) and a number of
angular bins. Only layers with at least one voxel are kept. The flat voxel order
is the official one: layer, then α-bin, then r-bin, with r running fastest, so
``flat = offset[layer] + a * n_r[layer] + r_bin``.

Coordinates of a cell:

* ``r``: radial bin mid-point in mm.
* ``alpha``: angular bin centre in rad, ``-π + (a + ½)·2π/n_α``; 0 for layers with
  a single angular bin.
* ``z``: layer *ordinal* (0 … n_layers−1, float). For datasets 2 and 3 the
  ordinal equals the XML layer id and the physical depth of the layer centre is
  ``z_mm[layer]`` (3.4 mm per layer). For dataset 1 the XML ids are kept in
  ``layer_ids``.

A cell spans ``[r_lo, r_hi) × [alpha_lo, alpha_hi) × [z − ½, z + ½)``.
"""

from __future__ import annotations

__all__ = [
    "DATASETS",
    "HIGH_GRANULARITY",
    "THRESHOLDS",
    "Geometry",
    "GeometryError",
    "detect_geometry",
    "load_geometry",
    "resolve_threshold",
    "same_binning",
]

import functools
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("1-photons", "1-pions", "2", "3")

#: calopc's high-granularity geometry (shipped with the package, not a CaloChallenge dataset): the 45 layers of
#: dataset 3 with 4× finer α (200 bins) and r (72 bins of 0.58 mm): 648,000 cells, the same readout threshold
HIGH_GRANULARITY = "hg"

_XML = {
    "1-photons": "binning_dataset_1_photons.xml",
    "1-pions": "binning_dataset_1_pions.xml",
    "2": "binning_dataset_2.xml",
    "3": "binning_dataset_3.xml",
    HIGH_GRANULARITY: "binning_high_granularity.xml",
}

#: Per-voxel energy threshold (MeV) of the official evaluation (and of the same readout for the hg geometry).
THRESHOLDS = {"1-photons": 1.0, "1-pions": 1.0, "2": 0.5e-3 / 0.033, "3": 0.5e-3 / 0.033,
              HIGH_GRANULARITY: 0.5e-3 / 0.033}

#: Readout-layer thickness (mm) where the detector is known.
_LAYER_MM = {"2": 3.4, "3": 3.4, HIGH_GRANULARITY: 3.4}

_HG_ALIASES = {"hg", "high-granularity", "highgranularity"}


class GeometryError(ValueError):
    """A geometry could not be built, found or matched."""


@dataclass(frozen=True, eq=True)
class Geometry:
    """Binning of a cylindrical calorimeter, one entry per layer with voxels.

    Args:
        name: dataset name (``"1-photons"``, ``"1-pions"``, ``"2"``, ``"3"``) or a
            user label.
        particle: particle name from the XML (``photon``, ``pion``, ``electron``).
        layer_ids: XML id of each kept layer.
        r_edges: radial bin edges (mm) of each kept layer.
        n_alpha: number of angular bins of each kept layer.
        layer_mm: thickness of one layer in mm, if known (datasets 2 and 3).
        threshold: per-voxel threshold (MeV) used by the official evaluation.
    """

    name: str
    particle: str
    layer_ids: tuple[int, ...]
    r_edges: tuple[tuple[float, ...], ...]
    n_alpha: tuple[int, ...]
    layer_mm: float | None = None
    threshold: float = 0.0
    _cache: dict = field(default_factory=dict, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        n = len(self.layer_ids)
        if n == 0:
            msg = f"geometry {self.name!r} has no layer with voxels"
            raise GeometryError(msg)
        if len(self.r_edges) != n or len(self.n_alpha) != n:
            msg = (
                f"geometry {self.name!r}: layer_ids, r_edges and n_alpha must have one entry per "
                f"layer, got {n}, {len(self.r_edges)}, {len(self.n_alpha)}"
            )
            raise GeometryError(msg)
        for lid, edges, na in zip(self.layer_ids, self.r_edges, self.n_alpha):
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
                msg = f"geometry {self.name!r}, layer {lid}: r_edges must be increasing with >= 2 entries, got {edges}"
                raise GeometryError(msg)
            if na < 1:
                msg = f"geometry {self.name!r}, layer {lid}: n_alpha must be >= 1, got {na}"
                raise GeometryError(msg)

    def __hash__(self) -> int:
        return hash((self.name, self.particle, self.layer_ids, self.r_edges, self.n_alpha, self.layer_mm))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def calochallenge(cls, dataset: str | int) -> Geometry:
        """The official geometry of a CaloChallenge dataset (``"1-photons"``, ``"1-pions"``, ``"2"``, ``"3"``)."""
        return _official(_dataset_name(dataset))

    @classmethod
    def high_granularity(cls) -> Geometry:
        """calopc's high-granularity geometry (name ``"hg"``): dataset 3's 45 layers with 4× finer α and r, 648,000
        cells (``calopc/data/binning_high_granularity.xml``); the readout threshold of dataset 3 per cell."""
        return _official(HIGH_GRANULARITY)

    @property
    def cells_per_shower_bytes(self) -> int:
        """Bytes of one dense float64 shower (``n_voxels · 8``): what a dense path allocates per shower."""
        return self.n_voxels * 8

    @classmethod
    def from_xml(cls, path: str | os.PathLike, *, name: str | None = None, threshold: float = 0.0,
                 layer_mm: float | None = None) -> Geometry:
        """Parse a binning XML file in the CaloChallenge format."""
        path = Path(path)
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as err:
            msg = f"{path}: cannot read binning XML: {err}"
            raise GeometryError(msg) from err
        bins = root.findall("Bin") if root.tag != "Bin" else [root]
        if len(bins) != 1:
            msg = f"{path}: expected exactly one <Bin> element, found {len(bins)}"
            raise GeometryError(msg)
        b = bins[0]
        ids, edges, nas = [], [], []
        for layer in b.findall("Layer"):
            try:
                lid = int(layer.attrib["id"])
                e = tuple(float(x) for x in layer.attrib["r_edges"].split(",") if x.strip())
                na = int(layer.attrib.get("n_bin_alpha", "1"))
            except (KeyError, ValueError) as err:
                msg = f"{path}: bad <Layer> element {layer.attrib}: {err}"
                raise GeometryError(msg) from err
            if len(e) < 2:  # r_edges="0": no voxels in this layer
                continue
            ids.append(lid)
            edges.append(e)
            nas.append(na)
        return cls(
            name=name if name is not None else path.stem,
            particle=b.attrib.get("name", ""),
            layer_ids=tuple(ids),
            r_edges=tuple(edges),
            n_alpha=tuple(nas),
            layer_mm=layer_mm,
            threshold=threshold,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`; :class:`GeometryError` naming the field when one is missing or malformed."""
        if not isinstance(d, dict):
            msg = f"expected a geometry mapping with keys name, layer_ids, r_edges, n_alpha; got {type(d).__name__}"
            raise GeometryError(msg)
        missing = [k for k in ("name", "layer_ids", "r_edges", "n_alpha") if k not in d]
        if missing:
            msg = (f"geometry is missing the field(s) {', '.join(missing)}; expected name, layer_ids, r_edges, "
                   f"n_alpha (found {', '.join(sorted(map(str, d))) or 'none'})")
            raise GeometryError(msg)
        try:
            layer_mm = d.get("layer_mm")
            g = cls(
                name=str(d["name"]),
                particle=str(d.get("particle", "")),
                layer_ids=tuple(int(x) for x in d["layer_ids"]),
                r_edges=tuple(tuple(float(x) for x in e) for e in d["r_edges"]),
                n_alpha=tuple(int(x) for x in d["n_alpha"]),
                layer_mm=None if layer_mm is None else float(layer_mm),
                threshold=float(d.get("threshold", 0.0)),
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, GeometryError):
                raise
            msg = (f"geometry fields have the wrong type ({err}); expected lists of numbers in layer_ids, r_edges, "
                   "n_alpha")
            raise GeometryError(msg) from err
        if g.name in _XML:  # a shipped geometry, unchanged: the one instance, whose cell tables are computed once
            off = _official(g.name)
            if off == g:
                return off
        return g

    @classmethod
    def from_json(cls, s: str | bytes) -> Geometry:
        """Inverse of :meth:`to_json`; :class:`GeometryError` when the text is not a valid geometry."""
        try:
            d = json.loads(s)
        except (ValueError, UnicodeDecodeError) as err:
            msg = f"geometry is not valid JSON ({err})"
            raise GeometryError(msg) from err
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "particle": self.particle,
            "layer_ids": list(self.layer_ids),
            "r_edges": [list(e) for e in self.r_edges],
            "n_alpha": list(self.n_alpha),
            "layer_mm": self.layer_mm,
            "threshold": self.threshold,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    # ----------------------------------------------------------------- sizes
    @property
    def n_layers(self) -> int:
        return len(self.layer_ids)

    @property
    def n_r(self) -> tuple[int, ...]:
        return tuple(len(e) - 1 for e in self.r_edges)

    @property
    def voxels_per_layer(self) -> tuple[int, ...]:
        return tuple(nr * na for nr, na in zip(self.n_r, self.n_alpha))

    @property
    def offsets(self) -> np.ndarray:
        """Flat index of the first voxel of each layer, plus the total: shape ``(n_layers + 1,)``."""
        return np.concatenate([[0], np.cumsum(self.voxels_per_layer)]).astype(np.int64)

    @property
    def n_voxels(self) -> int:
        return int(sum(self.voxels_per_layer))

    @property
    def is_regular(self) -> bool:
        """True if every layer has the same r-edges and number of α bins (datasets 2 and 3)."""
        return len(set(self.r_edges)) == 1 and len(set(self.n_alpha)) == 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(n_layers, n_alpha, n_r)`` for a regular geometry; error otherwise."""
        if not self.is_regular:
            msg = f"geometry {self.name!r} is not regular (layers differ in binning); it has no 3-D shape"
            raise GeometryError(msg)
        return (self.n_layers, self.n_alpha[0], self.n_r[0])

    @property
    def z_mm(self) -> np.ndarray | None:
        """Depth (mm) of each layer centre, if the layer thickness is known."""
        if self.layer_mm is None:
            return None
        return (np.arange(self.n_layers) + 0.5) * self.layer_mm

    # ----------------------------------------------------------------- per-cell tables
    def _cells(self) -> dict[str, np.ndarray]:
        c = self._cache.get("cells")
        if c is not None:
            return c
        layer, abin, rbin = [], [], []
        r_lo, r_hi, a_lo, a_hi = [], [], [], []
        for l, (edges, na) in enumerate(zip(self.r_edges, self.n_alpha)):
            e = np.asarray(edges, dtype=np.float64)
            nr = len(e) - 1
            a_idx, r_idx = np.divmod(np.arange(na * nr), nr)
            layer.append(np.full(na * nr, l))
            abin.append(a_idx)
            rbin.append(r_idx)
            r_lo.append(e[r_idx])
            r_hi.append(e[r_idx + 1])
            if na == 1:
                a_lo.append(np.full(nr, -math.pi))
                a_hi.append(np.full(nr, math.pi))
            else:
                width = 2 * math.pi / na
                a_lo.append(-math.pi + a_idx * width)
                a_hi.append(-math.pi + (a_idx + 1) * width)
        c = {
            "layer": np.concatenate(layer).astype(np.int32),
            "alpha_bin": np.concatenate(abin).astype(np.int32),
            "r_bin": np.concatenate(rbin).astype(np.int32),
            "r_lo": np.concatenate(r_lo),
            "r_hi": np.concatenate(r_hi),
            "alpha_lo": np.concatenate(a_lo),
            "alpha_hi": np.concatenate(a_hi),
        }
        c["r"] = 0.5 * (c["r_lo"] + c["r_hi"])
        single = np.repeat(np.asarray(self.n_alpha) == 1, self.voxels_per_layer)
        c["alpha"] = np.where(single, 0.0, 0.5 * (c["alpha_lo"] + c["alpha_hi"]))
        c["z"] = c["layer"].astype(np.float64)
        for v in c.values():
            v.setflags(write=False)
        self._cache["cells"] = c
        return c

    @property
    def cell_layer(self) -> np.ndarray:
        """Layer ordinal of each flat voxel, shape ``(n_voxels,)``."""
        return self._cells()["layer"]

    @property
    def cell_alpha_bin(self) -> np.ndarray:
        return self._cells()["alpha_bin"]

    @property
    def cell_r_bin(self) -> np.ndarray:
        return self._cells()["r_bin"]

    @property
    def cell_r(self) -> np.ndarray:
        """Radial mid-point (mm) of each flat voxel."""
        return self._cells()["r"]

    @property
    def cell_alpha(self) -> np.ndarray:
        """Angular centre (rad) of each flat voxel (0 in single-α layers)."""
        return self._cells()["alpha"]

    @property
    def cell_z(self) -> np.ndarray:
        """Layer ordinal (as float) of each flat voxel."""
        return self._cells()["z"]

    def cell_bounds(self) -> dict[str, np.ndarray]:
        """Per-voxel bounds: ``r_lo, r_hi, alpha_lo, alpha_hi, z_lo, z_hi`` (each ``(n_voxels,)``)."""
        c = self._cells()
        return {
            "r_lo": c["r_lo"], "r_hi": c["r_hi"],
            "alpha_lo": c["alpha_lo"], "alpha_hi": c["alpha_hi"],
            "z_lo": c["z"] - 0.5, "z_hi": c["z"] + 0.5,
        }

    def flat_index(self, layer: np.ndarray, alpha_bin: np.ndarray, r_bin: np.ndarray) -> np.ndarray:
        """Flat voxel index from (layer ordinal, α-bin, r-bin); no range check."""
        layer = np.asarray(layer, dtype=np.int64)
        nr = np.asarray(self.n_r, dtype=np.int64)[layer]
        return self.offsets[layer] + np.asarray(alpha_bin, dtype=np.int64) * nr + np.asarray(r_bin, dtype=np.int64)

    def locate(self, r: np.ndarray, alpha: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Flat voxel index of continuous points, ``-1`` where a point lies outside the calorimeter.

        The layer is ``round(z)``; α is taken modulo 2π; ``r`` must lie in
        ``[r_edges[0], r_edges[-1])`` of that layer.
        """
        r = np.asarray(r, dtype=np.float64)
        alpha = np.asarray(alpha, dtype=np.float64)
        z = np.asarray(z, dtype=np.float64)
        out = np.full(r.shape, -1, dtype=np.int64)
        with np.errstate(invalid="ignore"):
            layer = np.floor(z + 0.5)
        ok = np.isfinite(layer) & (layer >= 0) & (layer < self.n_layers) & np.isfinite(r) & np.isfinite(alpha)
        layer = np.where(ok, layer, 0).astype(np.int64)
        a = np.mod(alpha + math.pi, 2 * math.pi)  # in [0, 2π)
        if self.is_regular:
            edges = np.asarray(self.r_edges[0])
            rb = np.searchsorted(edges, r, side="right") - 1
            ok &= (rb >= 0) & (rb < len(edges) - 1)
            na = self.n_alpha[0]
            ab = np.minimum((a * (na / (2 * math.pi))).astype(np.int64), na - 1)
            flat = layer * (na * (len(edges) - 1)) + ab * (len(edges) - 1) + rb
        else:
            flat = np.zeros(r.shape, dtype=np.int64)
            for l, (edges, na) in enumerate(zip(self.r_edges, self.n_alpha)):
                m = ok & (layer == l)
                if not m.any():
                    continue
                e = np.asarray(edges)
                rb = np.searchsorted(e, r[m], side="right") - 1
                good = (rb >= 0) & (rb < len(e) - 1)
                ab = np.minimum((a[m] * (na / (2 * math.pi))).astype(np.int64), na - 1)
                f = self.offsets[l] + ab * (len(e) - 1) + rb
                idx = np.flatnonzero(m)
                ok[idx[~good]] = False
                flat[idx] = f
        out[ok] = flat[ok]
        return out

    def summary(self) -> str:
        lines = [f"geometry {self.name!r} ({self.particle}): {self.n_layers} layers, {self.n_voxels} voxels"]
        for lid, e, na, nv in zip(self.layer_ids, self.r_edges, self.n_alpha, self.voxels_per_layer):
            lines.append(f"  layer {lid:>2}: {len(e) - 1:>2} r-bins [{e[0]:g}, {e[-1]:g}] mm x {na:>2} alpha-bins = {nv} voxels")
        return "\n".join(lines)


# --------------------------------------------------------------------- look-ups
def _dataset_name(dataset: str | int) -> str:
    s = str(dataset).strip().lower().replace("_", "-")
    aliases = {"1-photon": "1-photons", "photons": "1-photons", "1-pion": "1-pions", "pions": "1-pions"}
    s = aliases.get(s, s)
    if s not in DATASETS:
        msg = f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}"
        raise GeometryError(msg)
    return s


@functools.cache
def _official(name: str) -> Geometry:
    ref = resources.files("calopc") / "data" / _XML[name]
    with resources.as_file(ref) as p:
        return Geometry.from_xml(p, name=name, threshold=THRESHOLDS[name], layer_mm=_LAYER_MM.get(name))


def load_geometry(spec: str | int | os.PathLike | Geometry) -> Geometry:
    """A geometry from a dataset name (``"2"``), a binning XML path, or a :class:`Geometry`."""
    if isinstance(spec, Geometry):
        return spec
    if isinstance(spec, (str, int)) and str(spec).strip().lower().replace("_", "-") in {
        *DATASETS, "1-photon", "photons", "1-pion", "pions"}:
        return Geometry.calochallenge(spec)
    if isinstance(spec, str) and spec.strip().lower().replace("_", "-") in _HG_ALIASES:
        return Geometry.high_granularity()
    p = Path(spec)
    if p.suffix.lower() == ".xml" or p.exists():
        g = Geometry.from_xml(p)
        return same_binning(g) or g
    msg = (f"unknown geometry {spec!r}: expected one of {', '.join(DATASETS)}, {HIGH_GRANULARITY} (high granularity) "
           "or a binning XML path")
    raise GeometryError(msg)


def same_binning(geometry: Geometry) -> Geometry | None:
    """The shipped geometry (a CaloChallenge dataset or ``hg``) with the binning of ``geometry``, or None.

    Binnings are compared layer by layer (XML ids, r-edges to 1e-9 mm, α bins), so a copy of a shipped
    binning XML, whatever its file name, gets that geometry's name, threshold and layer thickness.
    """
    for name in (*DATASETS, HIGH_GRANULARITY):
        off = _official(name)
        if (off.layer_ids == geometry.layer_ids and off.n_alpha == geometry.n_alpha
                and len(off.r_edges) == len(geometry.r_edges)
                and all(len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-9)
                        for a, b in zip(off.r_edges, geometry.r_edges))):
            return off
    return None


def resolve_threshold(value: float | str | None, geometry: Geometry | None = None) -> float:
    """A cell threshold in MeV: a finite number >= 0, or ``None``/``"official"`` for the geometry's readout threshold.

    The meaning is the same in every command: cells with less energy than the threshold are empty.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "official"):
        if geometry is None:
            msg = "threshold 'official' needs a geometry"
            raise ValueError(msg)
        return float(geometry.threshold)
    try:
        v = float(value)
    except (TypeError, ValueError):
        msg = f"threshold must be a number of MeV >= 0 or 'official', got {value!r}"
        raise ValueError(msg) from None
    if not math.isfinite(v) or v < 0:
        msg = f"threshold must be a finite number of MeV >= 0 (or 'official'), got {value!r}"
        raise ValueError(msg)
    return v


def detect_geometry(n_voxels: int) -> Geometry:
    """The official geometry (or calopc's high-granularity one) with ``n_voxels`` voxels per shower."""
    known = {name: _official(name).n_voxels for name in (*DATASETS, HIGH_GRANULARITY)}
    for name, n in known.items():
        if n == n_voxels:
            return _official(name)
    listing = ", ".join(f"{n} ({'dataset ' + name if name in DATASETS else 'high granularity'})"
                        for name, n in known.items())
    msg = f"no known geometry has {n_voxels} voxels per shower; known: {listing}. Pass a binning XML for other detectors."
    raise GeometryError(msg)
