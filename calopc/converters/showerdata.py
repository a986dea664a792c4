r"""The FLC point-cloud format of the ``showerdata`` package ⇄ calopc showers on a CaloChallenge geometry.

``showerdata`` (PyPI; the format of the AllShowers and PointCountFM models) stores one point
cloud per shower in an HDF5 file:

=============== ============================ ==============================================================
key             shape, dtype                 calopc meaning
=============== ============================ ==============================================================
``showers``     ``(N,)`` vlen float32        points of shower *i*, flattened: ``num_points[i] × F`` numbers,
                                             ``F = shape[2]`` = 4 ``(x, y, z, E)`` or 5 (and a time)
``energies``    ``(N, 1)`` float32           incident energy, **GeV** (calopc: MeV)
``num_points``  ``(N,)`` int32               points per shower
``shape``       ``(3,)`` int32               ``(N, max num_points, F)``
``directions``  ``(N, 3)`` float32           incident direction; written ``(0, 0, 1)`` (CaloChallenge
                                             particles enter along the cylinder axis)
``pdg``         ``(N,)`` int32               incident particle: 22 photon, 11 electron, 211 pion
``shower_ids``  ``(N,)`` int32               the shower's row in the calopc input
=============== ============================ ==============================================================

Point columns: ``x = r·cos α`` and ``y = r·sin α`` in mm (the CaloChallenge convention ``η ≡ x``,
``φ ≡ y``; the shower axis at ``x = y = 0``), ``z`` = the layer ordinal (0 … n_layers − 1, as the
FLC tools count layers: ``int(z + 0.1)``), ``E`` in **GeV**. calopc writes the cell centres.

**Exact round trip.** float32 GeV cannot hold calopc's energies exactly (float64 MeV, or float32
MeV divided by 1000), so :func:`export_showerdata` adds a group ``calopc`` that showerdata's
readers ignore: ``cell`` (int32) and ``E`` (MeV, the input's dtype) of every point, flat in the
order of ``showers``, ``incident_energy`` (MeV, the input's dtype) and the geometry (attribute
``geometry``, JSON). :func:`import_showerdata` uses it when it still matches the points (the
float32 points computed from it equal the stored ones bit for bit), so calopc → showerdata →
calopc gives identical cells and energies. Files from other writers, or whose points were
changed, are projected onto the geometry: ``r = hypot(x, y)``, ``α = atan2(y, x)``, layer
``round(z)``, and binned with a collision policy (:func:`calopc.converters.points_to_voxels`).

Only h5py is needed; the ``showerdata`` package itself is not imported (its reader and writer
are the reference of the tests).
"""

from __future__ import annotations

__all__ = [
    "LAYOUT_VERSION",
    "PDG",
    "ShowerDataFile",
    "events_to_showerdata",
    "export_showerdata",
    "import_showerdata",
    "is_showerdata",
    "open_showerdata",
    "showerdata_to_events",
]

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np

from .._safety import atomic_writer, check_interrupt, check_not_input, missing_message
from .._version import __version__
from ..geometry import Geometry, GeometryError, load_geometry, resolve_threshold
from ..hdf5 import EnergyScale, ShowerFileError, is_hdf5, open_showers, parse_size, shower_writer
from ..progress import progress_bar
from .core import VoxelizeStats, _build_events, points_to_voxels
from .files import points_writer
from .sources import HDF5_SUFFIXES, MAX_OUTSIDE, PARQUET_SUFFIXES, is_parquet

#: the showerdata file layout these functions read and write (``showerdata`` 0.6-0.7), recorded in the
#: ``showerdata_version`` attribute of written files
LAYOUT_VERSION = "0.7.0"
#: incident particle (the geometry's ``particle``) -> PDG id
PDG = {"photon": 22, "electron": 11, "pion": 211}
_MEV_PER_GEV = 1000.0
_REQUIRED = ("showers", "energies", "num_points", "shape")
_SIDECAR = "calopc"


# ----------------------------------------------------------------------------- in memory
def _cell_points(cell: np.ndarray, energy: np.ndarray, geometry: Geometry) -> np.ndarray:
    """``(P, 4)`` float32 showerdata points ``x, y, z, E`` (mm, mm, layer, GeV) of cells (their centres)."""
    cell = np.asarray(cell, dtype=np.int64)
    r, a = geometry.cell_r[cell], geometry.cell_alpha[cell]
    out = np.empty((cell.shape[0], 4), dtype=np.float32)
    out[:, 0] = r * np.cos(a)
    out[:, 1] = r * np.sin(a)
    out[:, 2] = geometry.cell_z[cell]
    out[:, 3] = np.asarray(energy, dtype=np.float64) / _MEV_PER_GEV
    return out


def _continuous_points(r: np.ndarray, alpha: np.ndarray, z: np.ndarray, energy: np.ndarray) -> np.ndarray:
    """``(P, 4)`` float32 showerdata points of continuous calopc points (r mm, α rad, z layer, E MeV)."""
    r = np.asarray(r, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    out = np.empty((r.shape[0], 4), dtype=np.float32)
    out[:, 0] = r * np.cos(a)
    out[:, 1] = r * np.sin(a)
    out[:, 2] = z
    out[:, 3] = np.asarray(energy, dtype=np.float64) / _MEV_PER_GEV
    return out


def _flat_points(events: ak.Array, geometry: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                                 np.ndarray | None]:
    """``(counts, (P, 4) points, cell or None, E MeV or None)`` of calopc events; cells when the points carry them."""
    pts = events["points"]
    fields = set(ak.fields(pts))
    counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
    e = np.asarray(ak.flatten(pts["E"], axis=None))
    if "cell" in fields:
        cell = np.asarray(ak.flatten(pts["cell"], axis=None)).astype(np.int32)
        return counts, _cell_points(cell, e, geometry), cell, e
    if not {"r", "alpha", "z"} <= fields:
        msg = f"points need a 'cell' field or 'r', 'alpha' and 'z'; found fields {sorted(fields)}"
        raise ValueError(msg)
    r, a, z = (np.asarray(ak.flatten(pts[f], axis=None)) for f in ("r", "alpha", "z"))
    return counts, _continuous_points(r, a, z, e), None, None


def events_to_showerdata(events: ak.Array, geometry: Geometry) -> dict[str, np.ndarray]:
    """calopc events as the arrays of a ``showerdata.Showers`` (``showerdata.Showers(**d)`` builds one).

    Args:
        events: records ``incident_energy`` (MeV) and ``points`` (``cell`` and ``E``, or ``r``,
            ``alpha``, ``z``, ``E``), as from :func:`calopc.converters.voxels_to_points`.
        geometry: the events' geometry (cell centres, particle).

    Returns:
        ``points`` ``(N, P_max, 4)`` float32 ``x, y, z, E`` (mm, mm, layer ordinal, GeV; zero
        padded), ``num_points`` ``(N,)`` int32, ``energies`` ``(N, 1)`` float32 GeV, ``pdg``
        ``(N,)`` int32 and ``directions`` ``(N, 3)`` float32 ``(0, 0, 1)``.
    """
    counts, flat, _, _ = _flat_points(events, geometry)
    n = counts.shape[0]
    width = int(counts.max()) if n else 0
    points = np.zeros((n, width, 4), dtype=np.float32)
    rows = np.repeat(np.arange(n), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if n else np.zeros(0, dtype=np.int64)
    cols = np.arange(flat.shape[0]) - np.repeat(starts, counts)
    points[rows, cols] = flat
    directions = np.zeros((n, 3), dtype=np.float32)
    directions[:, 2] = 1
    inc = np.asarray(events["incident_energy"], dtype=np.float64)
    return {"points": points, "num_points": counts.astype(np.int32),
            "energies": (inc / _MEV_PER_GEV).astype(np.float32).reshape(-1, 1),
            "pdg": np.full(n, PDG.get(geometry.particle, 0), dtype=np.int32), "directions": directions}


def showerdata_to_events(points: np.ndarray, energies: np.ndarray, num_points: np.ndarray | None = None) -> ak.Array:
    """showerdata arrays as calopc events of continuous points (``r``, ``alpha``, ``z``, ``E``; MeV).

    Args:
        points: ``(N, P, F)`` with ``F >= 4`` columns ``x, y, z, E`` (mm, mm, layer, GeV), zero padded
            (``showerdata.Showers.points``).
        energies: ``(N,)`` or ``(N, 1)`` incident energies in GeV.
        num_points: points per shower; default: the points with ``E > 0`` (showerdata's rule).

    Returns:
        Records ``incident_energy`` (MeV) and ``points`` ``{r, alpha, z, E}`` (``r = hypot(x, y)``,
        ``alpha = atan2(y, x)``, ``z`` as stored, ``E`` MeV float64): pass them to
        :func:`calopc.converters.points_to_voxels` with a geometry and a collision policy.
    """
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] < 4:
        msg = f"points must have shape (N, P, 4 or 5) (x, y, z, E), got {points.shape}"
        raise ValueError(msg)
    n = points.shape[0]
    counts = (np.count_nonzero(points[:, :, 3], axis=1) if num_points is None
              else np.asarray(num_points, dtype=np.int64).reshape(-1))
    if counts.shape[0] != n or (counts < 0).any() or (counts > points.shape[1]).any():
        msg = f"num_points must be {n} counts in 0..{points.shape[1]}, got {counts.shape[0]} values"
        raise ValueError(msg)
    keep = np.arange(points.shape[1])[None, :] < counts[:, None]
    inc = np.asarray(energies, dtype=np.float64).reshape(-1) * _MEV_PER_GEV
    if inc.shape[0] != n:
        msg = f"energies has {inc.shape[0]} entries but points has {n} showers"
        raise ValueError(msg)
    return _events_of(inc, counts, points[keep])


def _events_of(inc_mev: np.ndarray, counts: np.ndarray, flat: np.ndarray) -> ak.Array:
    x = flat[:, 0].astype(np.float64)
    y = flat[:, 1].astype(np.float64)
    offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    fields = {"r": np.hypot(x, y), "alpha": np.arctan2(y, x), "z": flat[:, 2].astype(np.float64),
              "E": flat[:, 3].astype(np.float64) * _MEV_PER_GEV}
    return _build_events(inc_mev, offsets, fields)


# ----------------------------------------------------------------------------- reading
def is_showerdata(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an HDF5 file in the showerdata layout (a vlen ``showers`` dataset and ``num_points``)."""
    if not Path(path).is_file() or not is_hdf5(path):
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f.get("showers")
            return (isinstance(ds, h5py.Dataset) and h5py.check_vlen_dtype(ds.dtype) is not None
                    and "num_points" in f)
    except OSError:
        return False


class ShowerDataFile:
    """An open, validated showerdata file, read in chunks (:func:`open_showerdata`).

    Attributes:
        n_features: columns per point (4: ``x, y, z, E``; 5: and a time, which calopc ignores).
        geometry: the geometry the ``calopc`` group records (files written by calopc), else None.
        has_exact: whether the file has the ``calopc`` group of exact cells and energies.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(missing_message(self.path))
        if self.path.is_dir() or not is_hdf5(self.path):
            what = "a folder" if self.path.is_dir() else "not an HDF5 file"
            msg = f"{self.path}: is {what}; expected a showerdata HDF5 file (keys {', '.join(_REQUIRED)})"
            raise ShowerFileError(msg)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            msg = f"{self.path}: cannot open as HDF5 (truncated or not an HDF5 file?): {err}"
            raise ShowerFileError(msg) from err
        try:
            self._check_layout()
        except BaseException:
            self._f.close()
            raise
        self._scale = EnergyScale(self.path)

    def _fail(self, key: str, expected: str, found: str) -> None:
        msg = f"{self.path}: dataset {key!r}: expected {expected}, found {found}"
        raise ShowerFileError(msg)

    def _check_layout(self) -> None:
        import h5py

        f = self._f
        missing = [k for k in _REQUIRED if k not in f]
        if missing:
            hint = (" (a CaloChallenge voxel file: use it without --from showerdata)"
                    if "incident_energies" in f else "")
            msg = (f"{self.path}: dataset {missing[0]!r} not found; expected the showerdata keys "
                   f"{', '.join(_REQUIRED)}, found {sorted(f.keys())}{hint}")
            raise ShowerFileError(msg)
        for k in _REQUIRED:
            if not isinstance(f[k], h5py.Dataset):
                self._fail(k, "a dataset", f"a {type(f[k]).__name__}")
        sh = f["showers"]
        base = h5py.check_vlen_dtype(sh.dtype)
        if sh.ndim != 1 or base is None or np.dtype(base).kind != "f":
            self._fail("showers", "shape (N,) of variable-length float arrays",
                       f"shape {sh.shape}, dtype {base if base is not None else sh.dtype}")
        n = sh.shape[0]
        shape = np.asarray(f["shape"][()])
        if shape.shape != (3,) or shape.dtype.kind not in "iu":
            self._fail("shape", "3 integers (N, max points, features)", f"shape {shape.shape}, dtype {shape.dtype}")
        if int(shape[2]) < 4:
            self._fail("shape", "at least 4 features per point (x, y, z, E)", f"{int(shape[2])} ({shape.tolist()})")
        if int(shape[0]) != n:
            self._fail("shape", f"N = {n} (the rows of 'showers')", f"{shape.tolist()}")
        self.n_features = int(shape[2])
        en = f["energies"]
        if en.dtype.kind != "f" or en.shape[0:1] != (n,) or en.ndim > 2 or (en.ndim == 2 and en.shape[1] != 1):
            self._fail("energies", f"shape ({n}, 1) floats (incident energies, GeV)",
                       f"shape {en.shape}, dtype {en.dtype}")
        npts = f["num_points"]
        if npts.dtype.kind not in "iu" or npts.shape != (n,):
            self._fail("num_points", f"shape ({n},) integers", f"shape {npts.shape}, dtype {npts.dtype}")
        self.geometry: Geometry | None = None
        self.has_exact = False
        side = f.get(_SIDECAR)
        if isinstance(side, h5py.Group) and {"cell", "E", "incident_energy"} <= set(side.keys()):
            try:
                self.geometry = Geometry.from_json(side.attrs["geometry"])
                self.has_exact = True
            except (KeyError, GeometryError, TypeError) as err:
                warnings.warn(f"{self.path}: group {_SIDECAR!r} has no valid 'geometry' attribute ({err}); "
                              "reading the points only", stacklevel=2)

    def __len__(self) -> int:
        return int(self._f["showers"].shape[0])

    def __enter__(self) -> ShowerDataFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def iterate(self, step: int = 10_000) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first row, incident MeV (n,) float64, counts (n,), points (P, F) float32)`` per ``step`` showers.

        Every chunk is validated: the stored numbers of each shower are ``num_points × F``, incident
        energies finite and > 0, coordinates finite, point energies finite and >= 0.
        """
        f = self._f
        n, nf = len(self), self.n_features
        step = max(1, int(step))
        for a in range(0, n, step):
            b = min(n, a + step)
            where = f"{self.path} showers {a}:{b}"
            try:
                raw = f["showers"][a:b]
                inc = np.asarray(f["energies"][a:b], dtype=np.float64).reshape(-1)
                counts = np.asarray(f["num_points"][a:b], dtype=np.int64)
            except (OSError, ValueError, RuntimeError) as err:
                msg = f"{where}: failed to read (corrupt or truncated file?): {err}"
                raise ShowerFileError(msg) from err
            sizes = np.fromiter((len(x) for x in raw), dtype=np.int64, count=len(raw))
            bad = sizes != counts * nf
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                msg = (f"{where}: dataset 'showers', shower {a + i}: expected num_points × {nf} = "
                       f"{int(counts[i]) * nf} numbers, found {int(sizes[i])}")
                raise ShowerFileError(msg)
            flat = (np.concatenate(raw).astype(np.float32, copy=False) if sizes.sum()
                    else np.zeros(0, dtype=np.float32)).reshape(-1, nf)
            self._check(where, a, inc, counts, flat)
            yield a, inc * _MEV_PER_GEV, counts, flat

    def _check(self, where: str, a: int, inc: np.ndarray, counts: np.ndarray, flat: np.ndarray) -> None:
        bad = ~np.isfinite(inc) | (inc <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (f"{where}: dataset 'energies': expected finite incident energies > 0 GeV, found {inc[i]} "
                   f"(shower {a + i}; {int(bad.sum())} such)")
            raise ShowerFileError(msg)
        if not flat.size:
            return
        bad_xyz = ~np.isfinite(flat[:, :3]).all(axis=1)
        bad_e = ~np.isfinite(flat[:, 3]) | (flat[:, 3] < 0)
        bad = bad_xyz | bad_e
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            i = int(np.searchsorted(np.cumsum(counts), j, side="right"))
            what = "finite x, y, z" if bad_xyz[j] else "finite energies E >= 0 GeV"
            msg = (f"{where}: dataset 'showers': expected {what}, found point {flat[j, :4].tolist()} "
                   f"(shower {a + i}; {int(bad.sum())} such points)")
            raise ShowerFileError(msg)
        self._scale.check(inc * _MEV_PER_GEV, counts, flat[:, 3].astype(np.float64) * _MEV_PER_GEV)

    def target_geometry(self, geometry: Geometry | str | os.PathLike | None) -> Geometry:
        """``geometry`` (a name, XML or :class:`~calopc.geometry.Geometry`), else the recorded one; error if neither."""
        if geometry is not None:
            return load_geometry(geometry)
        if self.geometry is None:
            msg = (f"{self.path}: a showerdata file records no CaloChallenge geometry; pass one (--geometry "
                   "1-photons, 1-pions, 2, 3, hg or a binning XML)")
            raise ShowerFileError(msg)
        return self.geometry

    def is_exact_for(self, geometry: Geometry) -> bool:
        """Whether the exact cells of the ``calopc`` group are on ``geometry``."""
        return self.has_exact and self.geometry == geometry

    def dtypes(self, geometry: Geometry) -> tuple[np.dtype, np.dtype]:
        """Energy and incident-energy dtypes on ``geometry``: the recorded ones on the exact path, else float64."""
        if self.is_exact_for(geometry):
            side = self._f[_SIDECAR]
            return side["E"].dtype, side["incident_energy"].dtype
        return np.dtype(np.float64), np.dtype(np.float64)

    def cells(self, geometry: Geometry | None = None, *, collisions: str = "auto", threshold: float = 0.0,
              dtype: np.dtype | None = None, step: int | None = None, rng: np.random.Generator | None = None
              ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, VoxelizeStats]]:
        """The showers on a geometry's cells, chunk by chunk.

        Yields ``(first row, incident (n,) MeV, counts (n,), cell (P,) int32, E (P,) MeV, stats)``: the
        occupied cells of each shower in increasing order. Showers that still match the ``calopc``
        group (and ``geometry`` is the recorded one) come from it exactly; the others are projected
        and binned (see :func:`import_showerdata`), with :class:`~calopc.converters.VoxelizeStats`
        saying how (points outside the geometry are counted, not placed).

        Args:
            geometry: default: the recorded one (error when there is none).
            collisions: policy for several points in one cell (``"auto"``: ``nearest-free``).
            threshold: cells with less energy (MeV) are left out.
            dtype: energy dtype (default: the recorded one on the exact path, else float64).
            step: showers per chunk (default: about 256 MB of dense voxels).
            rng: random numbers of ``alpha-free``.
        """
        g = self.target_geometry(geometry)
        e_dtype, inc_dtype = self.dtypes(g)
        dtype = e_dtype if dtype is None else np.dtype(dtype)
        side = self._f[_SIDECAR] if self.is_exact_for(g) else None
        step = step or max(1, min(10_000, parse_size("256 MB") // (g.n_voxels * 8)))
        rng = rng if rng is not None else np.random.default_rng(0)
        warned = False
        p0 = 0
        for a, inc, counts, flat in self.iterate(step):
            b, p1 = a + counts.shape[0], p0 + flat.shape[0]
            use_exact = False
            if side is not None:
                inc_x = np.asarray(side["incident_energy"][a:b])
                cell, e = np.asarray(side["cell"][p0:p1]), np.asarray(side["E"][p0:p1])
                use_exact = (cell.shape[0] == flat.shape[0] and ((cell >= 0) & (cell < g.n_voxels)).all()
                             and np.array_equal(_cell_points(cell, e, g), flat[:, :4])
                             and np.array_equal((inc_x.astype(np.float64) / _MEV_PER_GEV).astype(np.float32),
                                                (inc / _MEV_PER_GEV).astype(np.float32)))
                if not use_exact and not warned:
                    warnings.warn(f"{self.path}: showers {a}:{b} differ from the exact copy calopc stored (group "
                                  f"{_SIDECAR!r}); their points are binned instead (collisions {collisions})",
                                  stacklevel=2)
                    warned = True
            p0 = p1
            if use_exact:
                st = VoxelizeStats(n_showers=b - a, n_points=int(cell.shape[0]))
                e = e.astype(dtype, copy=False)
                if threshold > 0:
                    keep = e >= threshold
                    st.n_below_threshold = int((~keep).sum())
                    shower = np.repeat(np.arange(b - a), counts)
                    counts = np.bincount(shower[keep], minlength=b - a)
                    cell, e = cell[keep], e[keep]
                yield a, inc_x, counts, cell.astype(np.int32, copy=False), e, st
                continue
            dense, st = points_to_voxels(_events_of(inc, counts, flat), g, collisions=collisions, threshold=threshold,
                                         dtype=dtype, return_stats=True, rng=rng)
            nz = dense != 0
            yield a, inc.astype(inc_dtype), nz.sum(axis=1), np.nonzero(nz)[1].astype(np.int32), dense[nz], st


def open_showerdata(path: str | os.PathLike) -> ShowerDataFile:
    """Open a showerdata file for reading (validated layout; see :class:`ShowerDataFile`)."""
    return ShowerDataFile(path)


# ----------------------------------------------------------------------------- writing
class _Writer:
    """Writes a showerdata file chunk by chunk with h5py (``num_points`` known per chunk, ``shape`` at the end)."""

    def __init__(self, path: Path, n: int, geometry: Geometry, *, exact: bool, e_dtype: np.dtype,
                 inc_dtype: np.dtype, info: dict) -> None:
        import h5py

        self._f = h5py.File(path, "w")
        f = self._f
        self.n, self.i, self.p, self.width = n, 0, 0, 0
        self.geometry, self.exact, self.info = geometry, exact, info
        self.e_dtype, self.inc_dtype = e_dtype, inc_dtype
        self._side = None
        self._sh = f.create_dataset("showers", shape=(n,), dtype=h5py.vlen_dtype(np.dtype(np.float32)))
        self._energies = f.create_dataset("energies", shape=(n, 1), dtype=np.float32)
        directions = np.zeros((n, 3), dtype=np.float32)
        directions[:, 2] = 1
        f.create_dataset("directions", data=directions)
        f.create_dataset("pdg", data=np.full(n, PDG.get(geometry.particle, 0), dtype=np.int32))
        f.create_dataset("shower_ids", data=np.arange(n, dtype=np.int32))
        self._num = f.create_dataset("num_points", shape=(n,), dtype=np.int32)
        f.attrs["showerdata_version"] = LAYOUT_VERSION
        f.attrs["writer"] = f"calopc {__version__}"

    def _sidecar(self) -> dict:
        """The ``calopc`` group of exact cells and energies (created with the first chunk that has cells)."""
        if self._side is None:
            gz = {"compression": "gzip", "compression_opts": 1, "shuffle": True}
            g = self._f.create_group(_SIDECAR)
            g.attrs["geometry"] = self.geometry.to_json()
            g.attrs["info"] = json.dumps(self.info)
            g.attrs["calopc_version"] = __version__
            self._side = {
                "incident_energy": g.create_dataset("incident_energy", shape=(self.n,), dtype=self.inc_dtype),
                "cell": g.create_dataset("cell", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,), **gz),
                "E": g.create_dataset("E", shape=(0,), maxshape=(None,), dtype=self.e_dtype, chunks=(1 << 17,), **gz),
            }
        return self._side

    def append(self, inc: np.ndarray, counts: np.ndarray, flat: np.ndarray, cell: np.ndarray | None,
               energy: np.ndarray | None) -> None:
        """Showers ``(inc MeV (k,), counts (k,), points (P, 4) float32)``; ``cell`` and ``energy`` (MeV) if in cells."""
        check_interrupt()
        k = counts.shape[0]
        a, b = self.i, self.i + k
        bounds = np.concatenate([[0], np.cumsum(counts)]) * 4
        data = flat.reshape(-1)
        rows = np.empty(k, dtype=object)
        for j in range(k):
            rows[j] = data[bounds[j]:bounds[j + 1]]
        if k > 1 and (counts != counts[0]).any():
            self._sh[a:b] = rows
        else:  # rows of one length would be taken for a 2-D array: one at a time
            for j in range(k):
                self._sh[a + j] = rows[j]
        self._energies[a:b, 0] = (np.asarray(inc, dtype=np.float64) / _MEV_PER_GEV).astype(np.float32)
        self._num[a:b] = counts
        if self.exact and cell is not None:
            side = self._sidecar()
            side["incident_energy"][a:b] = inc
            p, q = self.p, self.p + cell.shape[0]
            side["cell"].resize((q,))
            side["E"].resize((q,))
            if q > p:
                side["cell"][p:q] = cell
                side["E"][p:q] = energy
            self.p = q
        self.width = max(self.width, int(counts.max()) if k else 0)
        self.i = b

    def close(self) -> None:
        self._f.create_dataset("shape", data=np.array([self.n, self.width, 4], dtype=np.int32))
        self._f.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # the file is about to be removed
            self._f.close()


def export_showerdata(input: str | os.PathLike, output: str | os.PathLike, *, geometry: Geometry | None = None,
                      threshold: float | str = 0.0, step_size: int | str = "256 MB", exact: bool = True,
                      progress: bool = True) -> Path:
    """Write a CaloChallenge HDF5 file or a calopc points file as a showerdata file (streamed in chunks).

    Args:
        input: CaloChallenge voxel HDF5, or calopc point-cloud Parquet (``convert``/``generate`` output).
        output: the showerdata HDF5 file (written under a temporary name, renamed when complete).
        geometry: instead of the detected one (HDF5) or the file's metadata (Parquet).
        threshold: cells with less energy (MeV) are left out; ``"official"``: the dataset's readout threshold.
        step_size: dense input per chunk (HDF5), e.g. ``"256 MB"``.
        exact: also store the exact cells and energies (group ``calopc``), so that
            :func:`import_showerdata` gives them back bit for bit. Continuous points (without
            cells) are written as they are, without the group.
        progress: a progress bar (terminal) or log lines.

    Returns:
        The output path.

    Raises:
        ShowerFileError: invalid input (one line naming the file, key, expectation and finding).
        OutputError: the output cannot be written, or is the input.
    """
    input, output = Path(input), Path(output)
    check_not_input(output, [input])
    if output.suffix.lower() in PARQUET_SUFFIXES:
        msg = f"{output}: this writes a showerdata HDF5 file, but the name ends in {output.suffix!r}; use .h5 or .hdf5"
        raise ShowerFileError(msg)
    if is_parquet(input):
        from .api import _stored_dtype, open_points

        src = open_points(input, geometry=geometry)
        g = src.geometry
        thr = resolve_threshold(threshold, g)
        n = len(src)
        e_dtype = _stored_dtype(src.info.get("dtype"), np.float64)  # the dtypes calopc convert recorded
        inc_dtype = _stored_dtype(src.info.get("incident_dtype"), np.float64)

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]:
            for ev in src.iterate(max(1, min(10_000, (256 << 20) // (8 * g.n_voxels)))):
                if thr > 0:
                    ev = ak.with_field(ev, ev["points"][ev["points", "E"] >= thr], "points")
                counts, flat, cell, e = _flat_points(ev, g)
                yield np.asarray(ev["incident_energy"]).astype(inc_dtype), counts, flat, cell, e
    else:
        src = open_showers(input, geometry=geometry)
        g = src.geometry
        thr = resolve_threshold(threshold, g)
        n = len(src)
        e_dtype, inc_dtype = src.dtype, src.incident_dtype

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]]:
            for _, inc, counts, cell, e in src.iterate_sparse(step_size, threshold=thr):
                yield inc, counts, _cell_points(cell, e, g), cell, e

    info = {"source": input.name, "n_showers": n, "dtype": str(e_dtype), "incident_dtype": str(inc_dtype),
            "threshold": thr}
    with src, _showerdata_writer(output, n, g, exact=exact, e_dtype=e_dtype, inc_dtype=inc_dtype, info=info,
                                 expected_bytes=input.stat().st_size) as w, \
            progress_bar(n, f"convert {input.name}", enabled=progress) as bar:
        for inc, counts, flat, cell, e in chunks():
            w.append(inc, counts, flat, cell, e)
            bar.update(len(counts))
    return output


@contextlib.contextmanager
def _showerdata_writer(output: Path, n: int, geometry: Geometry, *, expected_bytes: float = 0, **kw: object
                       ) -> Iterator[_Writer]:
    """Atomically write a showerdata file chunk by chunk (temporary file + rename; Ctrl-C between chunks)."""
    with atomic_writer(output, lambda tmp: _Writer(tmp, n, geometry, **kw), expected_bytes=expected_bytes) as w:
        yield w


# ----------------------------------------------------------------------------- importing
def import_showerdata(input: str | os.PathLike, output: str | os.PathLike, *, geometry: Geometry | str | None = None,
                      collisions: str = "auto", threshold: float | str = 0.0, max_outside: float = MAX_OUTSIDE,
                      seed: int = 0, energy_dtype: str | np.dtype | None = None, progress: bool = True
                      ) -> VoxelizeStats:
    """Put the showers of a showerdata file on a CaloChallenge geometry: calopc Parquet or voxel HDF5.

    Files written by :func:`export_showerdata` (with their ``calopc`` group, points unchanged, and
    the same geometry) give back their cells and energies exactly. Otherwise each point is
    projected (``r = hypot(x, y)`` mm, ``α = atan2(y, x)``, layer ``round(z)``, ``E`` GeV → MeV) and
    binned; several points in one cell follow ``collisions`` (``"auto"``: ``nearest-free`` for
    these continuous points; ``"sum"`` conserves the energy of every cell; see
    :func:`calopc.converters.points_to_voxels`). The shower axis must be at ``x = y = 0``.

    Args:
        input: the showerdata HDF5 file.
        output: ``.parquet``/``.pq`` (calopc point clouds, one point per cell) or ``.hdf5``/``.h5``
            (official voxel format).
        geometry: a dataset name, binning XML or :class:`~calopc.geometry.Geometry`; required
            unless the file records one (written by calopc).
        collisions: ``auto``, ``sum``, ``max``, ``nearest-free`` or ``alpha-free``.
        threshold: cells with less energy (MeV) are empty; ``"official"``: the readout threshold.
        max_outside: largest share of points outside the calorimeter before it is an error.
        seed: random numbers of ``alpha-free``.
        energy_dtype: stored energies (default: the exact group's dtype, else float64).
        progress: a progress bar (terminal) or log lines.

    Returns:
        What binning did (:class:`~calopc.converters.VoxelizeStats`; no collisions on the exact path).

    Raises:
        ShowerFileError: invalid input, no geometry, or more than ``max_outside`` of the points outside.
    """
    input, output = Path(input), Path(output)
    check_not_input(output, [input])
    suffix = output.suffix.lower()
    if suffix not in PARQUET_SUFFIXES + HDF5_SUFFIXES:
        msg = (f"{output}: the output name must end in .parquet (calopc point clouds) or .hdf5 (CaloChallenge "
               f"voxels), got {output.suffix!r}")
        raise ShowerFileError(msg)
    to_voxels = suffix in HDF5_SUFFIXES
    if not 0 <= max_outside <= 1:
        msg = f"max_outside must be a fraction in [0, 1], got {max_outside}"
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    total = VoxelizeStats()
    with open_showerdata(input) as f:
        g = f.target_geometry(geometry)
        thr = resolve_threshold(threshold, g)
        e_dtype, inc_dtype = f.dtypes(g)
        if energy_dtype is not None:
            e_dtype = np.dtype(energy_dtype)
        info = {"source": input.name, "n_showers": len(f), "dtype": str(e_dtype), "incident_dtype": str(inc_dtype),
                "threshold": thr, "from": "showerdata", "collisions": collisions}
        expected = 0.5 * input.stat().st_size
        sink = (shower_writer(output, g.n_voxels, dtype=e_dtype, incident_dtype=inc_dtype, expected_bytes=expected)
                if to_voxels else points_writer(output, g, info=info, expected_bytes=expected))
        with sink as w, progress_bar(len(f), f"convert {input.name}", enabled=progress) as bar:
            for a, inc, counts, cell, e, st in f.cells(g, collisions=collisions, threshold=thr, dtype=e_dtype, rng=rng):
                b = a + counts.shape[0]
                total += st
                if total.n_outside > max_outside * total.n_points:
                    share = 100 * total.n_outside / total.n_points
                    msg = (f"{input}: {total.n_outside} of {total.n_points} points ({share:.1f}%) of showers "
                           f"0:{b} lie outside geometry {g.name!r} (more than {100 * max_outside:g}% allowed; r = "
                           f"hypot(x, y) beyond {max(r[-1] for r in g.r_edges):g} mm or z outside layers "
                           f"0..{g.n_layers - 1}); is it the right geometry, with the shower axis at x = y = 0? "
                           "(--geometry, --max-outside)")
                    raise ShowerFileError(msg)
                if to_voxels:
                    dense = np.zeros((b - a, g.n_voxels), dtype=e_dtype)
                    dense[np.repeat(np.arange(b - a), counts), cell] = e
                    w.append(inc, dense)
                else:
                    w.append_sparse(inc, counts, cell, e)
                bar.update(b - a)
    return total
