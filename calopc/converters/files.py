r"""Point clouds on disk (awkward Parquet) and the streaming file converters."""

from __future__ import annotations

__all__ = [
    "PointsFile",
    "PointsWriter",
    "convert_file",
    "file_info",
    "open_points",
    "read_points",
    "voxelize_file",
    "write_points",
]

import contextlib
import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np

from .. import __version__
from ..geometry import Geometry, GeometryError, resolve_threshold
from ..io import (
    OutputError,
    ShowerFileError,
    atomic_output,
    check_interrupt,
    check_not_input,
    deferred_interrupts,
    open_showers,
    parse_size,
    progress_bar,
    shower_writer,
)
from .core import VoxelizeStats, points_to_voxels, voxels_to_points

_META_GEOMETRY = b"calopc.geometry"
_META_VERSION = b"calopc.version"
_META_INFO = b"calopc.info"

#: Largest share of points that may fall outside the geometry (or outside the cell their index names)
#: before reading or voxelizing a points file is refused: more means the file's geometry is wrong.
MAX_OUTSIDE = 0.01

_HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _progress(total: int, desc: str, enabled: bool, unit: str = "shower"):
    return progress_bar(total, desc, enabled=enabled, unit=unit)


def _check_suffix(path: Path, wrong: tuple[str, ...], kind: str, hint: str) -> None:
    if path.suffix.lower() in wrong:
        msg = f"{path}: this writes {kind}, but the name ends in {path.suffix!r}; {hint}"
        raise OutputError(msg)


class PointsWriter:
    """Append event chunks to a Parquet file; the geometry goes into the schema metadata."""

    def __init__(self, path: Path, geometry: Geometry, *, info: dict | None = None, compression: str = "zstd") -> None:
        self.path = Path(path)
        self.geometry = geometry
        self.info = info or {}
        self.compression = compression
        self._writer = None
        self.n = 0

    def append(self, events: ak.Array) -> None:
        import pyarrow.parquet as pq

        table = ak.to_arrow_table(events, extensionarray=False)
        meta = dict(table.schema.metadata or {})
        meta[_META_GEOMETRY] = self.geometry.to_json().encode()
        meta[_META_VERSION] = __version__.encode()
        meta[_META_INFO] = json.dumps(self.info).encode()
        table = table.replace_schema_metadata(meta)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression=self.compression)
        check_interrupt()
        self._writer.write_table(table)
        self.n += len(events)

    def close(self) -> None:
        if self._writer is None:  # no chunk at all: still write a valid, empty file
            empty = voxels_to_points(np.zeros((0, self.geometry.n_voxels)), self.geometry)
            self.append(empty)
        self._writer.close()


@contextlib.contextmanager
def points_writer(path: str | os.PathLike, geometry: Geometry, **kw: object) -> Iterator[PointsWriter]:
    """Atomically write a points file chunk by chunk (temporary file + rename).

    Ctrl-C and SIGTERM are honoured at the next :meth:`PointsWriter.append` (the temporary file is
    removed). ``expected_bytes`` (keyword): rough output size for the free-space check.
    """
    expected = float(kw.pop("expected_bytes", 0) or 0)
    with deferred_interrupts(), atomic_output(path, expected_bytes=expected) as tmp:
        w = PointsWriter(tmp, geometry, **kw)
        ok = False
        try:
            yield w
            ok = True
        finally:
            if ok:
                w.close()
            elif w._writer is not None:
                with contextlib.suppress(Exception):
                    w._writer.close()
        check_interrupt()


def write_points(path: str | os.PathLike, events: ak.Array, geometry: Geometry, *, info: dict | None = None) -> None:
    """Write events (as from :func:`voxels_to_points`) to Parquet, atomically."""
    with points_writer(path, geometry, info=info) as w:
        w.append(events)


class PointsFile:
    """An open point-cloud Parquet file written by calopc.

    Args:
        path: the Parquet file.
        geometry: use this geometry instead of the one in the file's metadata (a file without
            metadata can then be read too).
        max_outside: largest share of points of the first chunk that may lie outside the geometry
            or outside the cell their ``cell`` index names; more is an error (wrong geometry).

    Every chunk is checked: incident energies finite and > 0, point energies finite and >= 0.
    """

    def __init__(self, path: str | os.PathLike, *, geometry: Geometry | None = None,
                 max_outside: float = MAX_OUTSIDE) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.max_outside = float(max_outside)
        if not self.path.exists():
            msg = f"{self.path}: no such file"
            raise FileNotFoundError(msg)
        if self.path.is_dir():
            msg = f"{self.path}: is a folder, expected a Parquet file"
            raise ShowerFileError(msg)
        try:
            self._pf = pq.ParquetFile(self.path)
        except PermissionError as err:
            msg = f"{self.path}: cannot read ({err.strerror or 'permission denied'})"
            raise ShowerFileError(msg) from err
        except Exception as err:  # pyarrow raises several types for corrupt files
            msg = f"{self.path}: cannot open as Parquet (truncated or not a Parquet file?): {err}"
            raise ShowerFileError(msg) from err
        meta = self._pf.schema_arrow.metadata or {}
        key = _META_GEOMETRY.decode()
        if geometry is not None:
            self.geometry = geometry
        elif _META_GEOMETRY not in meta:
            msg = (f"{self.path}: Parquet file has no calopc geometry metadata (key {key!r}); was it written by "
                   "'calopc convert'? Pass the geometry (--geometry) to read it anyway")
            raise ShowerFileError(msg)
        else:
            try:
                self.geometry = Geometry.from_json(meta[_META_GEOMETRY])
            except GeometryError as err:
                msg = f"{self.path}: schema metadata key {key!r}: {err} (pass --geometry to override it)"
                raise ShowerFileError(msg) from err
        try:
            self.info = json.loads(meta.get(_META_INFO, b"{}"))
            if not isinstance(self.info, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            msg = f"{self.path}: schema metadata key {_META_INFO.decode()!r} is not a JSON object ({err})"
            raise ShowerFileError(msg) from err
        names = self._pf.schema_arrow.names
        if "points" not in names or "incident_energy" not in names:
            msg = f"{self.path}: expected columns 'incident_energy' and 'points', found {names}"
            raise ShowerFileError(msg)
        self._checked = False

    def __len__(self) -> int:
        return int(self._pf.metadata.num_rows)

    def __enter__(self) -> PointsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pf.close()

    def iterate(self, step_size: int = 10_000) -> Iterator[ak.Array]:
        """Yield chunks of ``step_size`` events (the last one may be shorter).

        Reads one row group at a time (pyarrow's ``iter_batches`` holds on to memory
        across batches, so it is not used): memory stays bounded by a row group plus a chunk.
        """
        step_size = max(1, int(step_size))
        pending: list[ak.Array] = []
        n_pending = 0
        done = 0
        for i in range(self._pf.metadata.num_row_groups):
            group = ak.from_arrow(self._read_group(i), highlevel=True)
            pending.append(group)
            n_pending += len(group)
            while n_pending >= step_size:
                buf = pending[0] if len(pending) == 1 else ak.concatenate(pending)
                chunk = buf[:step_size]
                self.check(chunk, done)
                yield chunk
                done += len(chunk)
                rest = buf[step_size:]
                pending, n_pending = ([rest] if len(rest) else []), len(rest)
        if n_pending:
            chunk = pending[0] if len(pending) == 1 else ak.concatenate(pending)
            self.check(chunk, done)
            yield chunk

    def _read_group(self, i: int):
        try:
            return self._pf.read_row_group(i)
        except Exception as err:  # corrupt data pages
            msg = f"{self.path}: failed to read row group {i} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err

    def read(self) -> ak.Array:
        try:
            table = self._pf.read()
        except Exception as err:
            msg = f"{self.path}: failed to read (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        events = ak.from_arrow(table, highlevel=True)
        self.check(events, 0)
        return events

    def check(self, chunk: ak.Array, start: int = 0) -> None:
        """Validate showers ``start:start+len(chunk)``; the first non-empty chunk also against the geometry."""
        where = f"{self.path} showers {start}:{start + len(chunk)}"
        if not len(chunk):
            return
        inc = np.asarray(chunk["incident_energy"], dtype=np.float64)
        bad = ~np.isfinite(inc) | (inc <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (f"{where}: {int(bad.sum())} incident energies are NaN, infinite or <= 0 (first: shower {start + i}, "
                   f"{inc[i]}); expected finite energies > 0 MeV")
            raise ShowerFileError(msg)
        pts = chunk["points"]
        fields = set(ak.fields(pts))
        if "E" not in fields:
            msg = f"{self.path}: the points have no 'E' field (energy, MeV); found fields {sorted(fields)}"
            raise ShowerFileError(msg)
        if "cell" not in fields and not {"r", "alpha", "z"} <= fields:
            msg = f"{self.path}: the points need a 'cell' field or 'r', 'alpha' and 'z'; found fields {sorted(fields)}"
            raise ShowerFileError(msg)
        counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
        e = np.asarray(ak.flatten(pts["E"], axis=None))
        bad = ~np.isfinite(e) | (e < 0)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            i = int(np.searchsorted(np.cumsum(counts), j, side="right"))
            msg = (f"{where}: {int(bad.sum())} of {e.size} points have a NaN, infinite or negative energy E (first: "
                   f"shower {start + i}, E = {e[j]}); expected finite energies >= 0 MeV")
            raise ShowerFileError(msg)
        if not self._checked and e.size:
            # a sample tells a wrong geometry: the first showers, up to ~200,000 points
            k = max(1, int(np.searchsorted(np.cumsum(counts), 200_000, side="right")))
            sub = f"{self.path} showers {start}:{start + min(k, len(counts))}"
            self._check_geometry(pts[:k], fields, counts[:k], sub)
            self._checked = True

    def _check_geometry(self, pts: ak.Array, fields: set, counts: np.ndarray, where: str) -> None:
        g = self.geometry
        n = int(counts.sum())
        has_xyz = {"r", "alpha", "z"} <= fields
        xyz = None
        if has_xyz:
            xyz = [np.asarray(ak.flatten(pts[f], axis=None), dtype=np.float64) for f in ("r", "alpha", "z")]
        limit = self.max_outside * n
        hint = "the file's geometry metadata does not fit its points; pass the right geometry with --geometry"
        if "cell" in fields:
            cell = np.asarray(ak.flatten(pts["cell"], axis=None)).astype(np.int64)
            out = (cell < 0) | (cell >= g.n_voxels)
            if out.sum() > limit:
                msg = (f"{where}: {int(out.sum())} of {n} points ({100 * out.mean():.1f}%) have a cell index outside "
                       f"geometry {g.name!r} (0..{g.n_voxels - 1}); {hint}")
                raise ShowerFileError(msg)
            if xyz is None:
                return
            ok = ~out
            c = cell[ok]
            r, a, z = (x[ok] for x in xyz)
            b = g.cell_bounds()
            tol = 1e-4
            with np.errstate(invalid="ignore"):
                bad_r = (r < b["r_lo"][c] - tol * (1 + np.abs(r))) | (r > b["r_hi"][c] + tol * (1 + np.abs(r)))
                bad_z = np.abs(z - g.cell_z[c]) > 0.5 + tol
                width = b["alpha_hi"][c] - b["alpha_lo"][c]
                da = np.mod(a - 0.5 * (b["alpha_hi"][c] + b["alpha_lo"][c]) + math.pi, 2 * math.pi) - math.pi
                bad_a = (width < 2 * math.pi - 1e-9) & (np.abs(da) > 0.5 * width + tol)
            bad = bad_r | bad_z | bad_a  # NaN coordinates compare False: the cell is used
            if bad.sum() > limit:
                k = int(np.flatnonzero(bad)[0])
                msg = (f"{where}: geometry {g.name!r} does not match the points: {int(bad.sum())} of {n} points have "
                       f"r/alpha/z outside the cell their 'cell' index names (e.g. cell {int(c[k])}: r {r[k]:g} mm, "
                       f"alpha {a[k]:g}, z {z[k]:g}; the cell spans r {b['r_lo'][c[k]]:g}-{b['r_hi'][c[k]]:g} mm, "
                       f"layer {g.cell_z[c[k]]:g}); {hint}")
                raise ShowerFileError(msg)
        else:
            loc = g.locate(*xyz)
            out = loc < 0
            if out.sum() > limit:
                msg = (f"{where}: {int(out.sum())} of {n} points ({100 * out.mean():.1f}%) lie outside geometry "
                       f"{g.name!r}; {hint}")
                raise ShowerFileError(msg)


def open_points(path: str | os.PathLike, *, geometry: Geometry | None = None, max_outside: float = MAX_OUTSIDE
                ) -> PointsFile:
    """Open a points file (see :class:`PointsFile`)."""
    return PointsFile(path, geometry=geometry, max_outside=max_outside)


def read_points(path: str | os.PathLike, *, geometry: Geometry | None = None) -> tuple[ak.Array, Geometry]:
    """Read a whole points file: ``(events, geometry)``."""
    with PointsFile(path, geometry=geometry) as f:
        return f.read(), f.geometry


def convert_file(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    geometry: Geometry | None = None,
    step_size: int | str = "256 MB",
    threshold: float | str = 0.0,
    progress: bool = True,
) -> Path:
    """Convert a CaloChallenge HDF5 file to a point-cloud Parquet file, streaming in chunks.

    Memory is bounded by ``step_size`` of dense input (plus the points of one chunk).
    Returns the output path (default: the input with suffix ``.parquet``).
    """
    input = Path(input)
    output = Path(output) if output is not None else input.with_suffix(".parquet")
    threshold = resolve_threshold(threshold, geometry)
    step = parse_size(step_size) if isinstance(step_size, str) else int(step_size)
    if step <= 0:
        msg = f"step size must be > 0, got {step_size!r}"
        raise ValueError(msg)
    check_not_input(output, [input])
    _check_suffix(output, _HDF5_SUFFIXES, "Parquet point clouds", "use a .parquet name (voxelize writes HDF5)")
    with open_showers(input, geometry=geometry) as f:
        info = {"source": input.name, "n_showers": len(f), "dtype": str(f.dtype),
                "incident_dtype": str(f.incident_dtype), "threshold": threshold}
        expected = 0.5 * input.stat().st_size
        with points_writer(output, f.geometry, info=info, expected_bytes=expected) as w, \
                _progress(len(f), f"convert {input.name}", progress) as bar:
            for inc, sh in f.iterate(step_size):
                w.append(voxels_to_points(sh, f.geometry, incident_energies=inc, threshold=threshold))
                bar.update(len(inc))
    return output


def voxelize_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    collisions: str = "auto",
    threshold: float | str | None = "file",
    step_size: int = 10_000,
    dtype: np.dtype | type | None = None,
    geometry: Geometry | None = None,
    max_outside: float = MAX_OUTSIDE,
    seed: int = 0,
    progress: bool = True,
) -> VoxelizeStats:
    """Convert a point-cloud Parquet file back to the official HDF5 format, streaming in chunks.

    The showers and the incident energies are written with the dtypes recorded at conversion
    (so voxels → points → voxels is bit-exact). More than ``max_outside`` of the points
    outside the geometry (or the file's metadata not matching its cells) is an error, as are
    invalid energies; ``geometry`` overrides the file's metadata. ``seed``: random numbers of the
    ``"alpha-free"`` policy.

    ``threshold``: MeV, ``"official"`` (the geometry's) or ``"file"`` (default): the threshold the
    file's metadata records (``calopc convert`` records the one it applied, so the default is
    lossless; a file without one: 0). Cells with less energy are empty.
    """
    input = Path(input)
    output = Path(output)
    if not (0 <= max_outside <= 1):
        msg = f"max_outside must be a fraction in [0, 1], got {max_outside}"
        raise ValueError(msg)
    if int(step_size) <= 0:
        msg = f"step_size must be >= 1 showers, got {step_size}"
        raise ValueError(msg)
    check_not_input(output, [input])
    _check_suffix(output, _PARQUET_SUFFIXES, "HDF5 voxels", "use a .hdf5 name (convert writes Parquet)")
    total = VoxelizeStats()
    rng = np.random.default_rng(seed)
    with PointsFile(input, geometry=geometry, max_outside=max_outside) as f:
        g = f.geometry
        if isinstance(threshold, str) and threshold.strip().lower() == "file":
            recorded = f.info.get("threshold", 0.0)
            try:
                threshold = resolve_threshold(0.0 if recorded is None else recorded, g)
            except ValueError as err:
                msg = f"{input}: metadata key 'calopc.info' records an invalid threshold: {err}"
                raise ShowerFileError(msg) from err
        else:
            threshold = resolve_threshold(threshold, g)
        if dtype is None:
            dtype = _stored_dtype(f.info.get("dtype"), np.float64)
        inc_dtype = _stored_dtype(f.info.get("incident_dtype"), np.float64)  # older files: float64 (lossless)
        step = max(1, min(int(step_size), parse_size("256 MB") // (g.n_voxels * np.dtype(dtype).itemsize)))
        with shower_writer(output, g.n_voxels, dtype=dtype, incident_dtype=inc_dtype,
                           expected_bytes=0.3 * input.stat().st_size) as w, \
                _progress(len(f), f"voxelize {input.name}", progress) as bar:
            for chunk in f.iterate(step):
                sh, st = points_to_voxels(chunk, g, collisions=collisions, threshold=threshold, dtype=dtype,
                                          return_stats=True, rng=rng)
                total += st
                if total.n_outside > max_outside * total.n_points:
                    share = 100 * total.n_outside / total.n_points
                    msg = (f"{input}: {total.n_outside} of {total.n_points} points ({share:.1f}%) "
                           f"of showers 0:{total.n_showers} lie outside geometry {g.name!r} (more than "
                           f"{100 * max_outside:g}% allowed); is it the right geometry? (--geometry, --max-outside)")
                    raise ShowerFileError(msg)
                w.append(np.asarray(chunk["incident_energy"]), sh)
                bar.update(len(chunk))
    return total


def _stored_dtype(name: object, default: type) -> np.dtype:
    """The dtype a file's metadata recorded, native; ``default`` when missing or not a float dtype."""
    try:
        dt = np.dtype(str(name)) if name else np.dtype(default)
    except TypeError:
        return np.dtype(default)
    if dt.kind != "f":
        return np.dtype(default)
    return dt.newbyteorder("=") if dt.itemsize <= 8 else np.dtype(np.float64)


def file_info(path: str | os.PathLike, *, step_size: int | str = "256 MB", progress: bool = False,
              geometry: Geometry | None = None) -> dict:
    """Dataset, number of showers and hits-per-shower statistics of an HDF5 or Parquet file."""
    path = Path(path)
    if not path.exists():
        msg = f"{path}: no such file"
        raise FileNotFoundError(msg)
    hits: list[np.ndarray] = []
    inc: list[np.ndarray] = []
    etot: list[np.ndarray] = []
    if _is_parquet(path):
        with PointsFile(path, geometry=geometry) as f:
            g, kind, n = f.geometry, "points (Parquet)", len(f)
            with _progress(n, f"info {path.name}", progress) as bar:
                for ch in f.iterate():
                    hits.append(np.asarray(ak.num(ch["points"], axis=1)))
                    inc.append(np.asarray(ch["incident_energy"]))
                    etot.append(np.asarray(ak.sum(ch["points", "E"], axis=1), dtype=np.float64))
                    bar.update(len(ch))
            dtype = f.info.get("dtype", "")
    else:
        with open_showers(path, geometry=geometry) as f:
            g, kind, n, dtype = f.geometry, "voxels (HDF5)", len(f), str(f.dtype)
            with _progress(n, f"info {path.name}", progress) as bar:
                for e, sh in f.iterate(step_size):
                    hits.append(np.count_nonzero(sh, axis=1))
                    inc.append(e)
                    with np.errstate(over="ignore"):
                        etot.append(sh.sum(axis=1, dtype=np.float64))
                    bar.update(len(e))
    h = np.concatenate(hits) if hits else np.zeros(0)
    ei = np.concatenate(inc) if inc else np.zeros(0)
    et = np.concatenate(etot) if etot else np.zeros(0)
    out = {
        "file": str(path), "kind": kind, "dataset": g.name, "n_voxels": g.n_voxels, "n_showers": int(n), "dtype": dtype,
    }
    if n:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # extreme values give inf/nan statistics, not warnings
            out.update(_stats(h, ei, et, g))
    return out


def _stats(h: np.ndarray, ei: np.ndarray, et: np.ndarray, g: Geometry) -> dict:
    """Hits and response statistics of a non-empty file (call with numpy warnings silenced)."""
    ratio = et / ei
    return {
        "hits_mean": float(h.mean()), "hits_std": float(h.std()), "hits_min": int(h.min()),
        "hits_median": float(np.median(h)), "hits_max": int(h.max()), "empty_showers": int((h == 0).sum()),
        "occupancy_mean": float(h.mean() / g.n_voxels),
        "e_inc_min": float(np.nanmin(ei)) if np.isfinite(ei).any() else float("nan"),
        "e_inc_max": float(np.nanmax(ei)) if np.isfinite(ei).any() else float("nan"),
        "e_dep_over_e_inc_mean": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else float("nan"),
        "e_dep_over_e_inc_std": float(np.nanstd(ratio)) if np.isfinite(ratio).any() else float("nan"),
    }


def _is_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False
