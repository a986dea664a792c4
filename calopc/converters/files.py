r"""Point clouds on disk: one awkward Parquet file, written (:class:`PointsWriter`) and read
(:class:`PointsFile`), and the streaming converter HDF5 voxels -> Parquet (:func:`convert_file`)."""

from __future__ import annotations

__all__ = [
    "PointsFile",
    "PointsWriter",
    "convert_file",
    "events_from_arrow",
    "open_parquet",
    "points_writer",
    "write_points",
]

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np

from .._safety import (
    OutputError,
    atomic_writer,
    check_interrupt,
    check_not_input,
    missing_message,
)
from .._version import __version__
from ..geometry import Geometry, GeometryError, resolve_threshold
from ..hdf5 import EnergyScale, ShowerFileError, is_hdf5, open_showers, parse_size
from ..progress import progress_bar
from .core import _build_events, _coordinate_tables
from .sources import HDF5_SUFFIXES, MAX_OUTSIDE
from .validate import check_cells, check_points_schema

_META_GEOMETRY = b"calopc.geometry"
_META_VERSION = b"calopc.version"
_META_INFO = b"calopc.info"


def check_suffix(path: Path, wrong: tuple[str, ...], kind: str, hint: str) -> None:
    """Refuse an output name whose suffix says the other format (``wrong``): one :class:`OutputError` with ``hint``."""
    if path.suffix.lower() in wrong:
        msg = f"{path}: this writes {kind}, but the name ends in {path.suffix!r}; {hint}"
        raise OutputError(msg)


#: Schema metadata key naming the column layout: ``cell-E`` (only ``cell`` and ``E`` stored; ``r``, ``alpha``,
#: ``z`` are the cell centres, looked up on read). Files without it store every point field.
_META_LAYOUT = b"calopc.layout"
_LAYOUT_CELL_E = b"cell-E"

#: Points per Parquet row group (about 25 MB of float64 energies and cells before compression): what
#: training and the lazy reader read at once.
ROW_GROUP_POINTS = 1 << 21

#: Energy dtypes ``convert`` can store. float32 keeps 24 significant bits: relative rounding error <= 2**-24
#: (6.0e-8) per cell, exact for float32 input.
ENERGY_DTYPES = ("float64", "float32")


def _column_options(compression: str) -> dict:
    """ParquetWriter options of the compact layout: delta-encoded cells, byte-stream-split energies."""
    return {
        "compression": compression,
        "compression_level": 1 if compression == "zstd" else None,
        "use_dictionary": False,
        "column_encoding": {"incident_energy": "PLAIN", "points.list.element.cell": "DELTA_BINARY_PACKED",
                            "points.list.element.E": "BYTE_STREAM_SPLIT"},
    }


def open_parquet(path: str | os.PathLike) -> object:
    """``pyarrow.parquet.ParquetFile`` that verifies the page checksums (CRC32) where the file has them.

    calopc writes a checksum for every data page, so damaged bytes inside a page are a read
    error instead of silently changed energies; files without checksums read as before.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, page_checksum_verification=True)


class PointsWriter:
    """Append event chunks to a Parquet file; the geometry goes into the schema metadata.

    Every data page carries a CRC32 checksum, which the readers verify (:func:`open_parquet`).

    Points in cells (a ``cell`` field, and ``r``, ``alpha``, ``z`` absent or the cell centres) are
    stored compactly: ``cell`` (sorted within a shower, delta encoded) and ``E`` (byte-stream
    split), zstd; readers add the centres back. Other points (continuous coordinates) are
    stored field by field. Row groups hold about ``row_group_points`` points.
    ``background=True``: compression and writing run in a thread, overlapping the caller's work.
    """

    def __init__(self, path: Path, geometry: Geometry, *, info: dict | None = None, compression: str = "zstd",
                 row_group_points: int = ROW_GROUP_POINTS, background: bool = False) -> None:
        self.path = Path(path)
        self.geometry = geometry
        self.info = info or {}
        self.compression = compression
        self.row_group_points = max(1, int(row_group_points))
        self._writer = None
        self._compact: bool | None = None
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_points = 0
        self.n = 0
        self._thread = None
        if background:
            import queue
            import threading

            self._queue: queue.Queue = queue.Queue(maxsize=2)
            self._error: BaseException | None = None
            self._thread = threading.Thread(target=self._run, name="calopc-parquet", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- background thread
    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    self._write_table(job)
                except BaseException as err:  # reported to the caller at its next call
                    self._error = err

    def _raise_background(self) -> None:
        if self._thread is not None and self._error is not None:
            err, self._error = self._error, None
            raise err

    def _metadata(self, compact: bool) -> dict:
        meta = {_META_GEOMETRY: self.geometry.to_json().encode(), _META_VERSION: __version__.encode(),
                _META_INFO: json.dumps(self.info).encode()}
        if compact:
            meta[_META_LAYOUT] = _LAYOUT_CELL_E
        return meta

    def _write_table(self, table: object) -> None:
        import pyarrow.parquet as pq

        if self._writer is None:
            kw = _column_options(self.compression) if self._compact else {"compression": self.compression}
            self._writer = pq.ParquetWriter(self.path, table.schema, write_page_checksum=True, **kw)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))

    def _emit(self, table: object) -> None:
        if self._thread is None:
            self._write_table(table)
            return
        self._raise_background()
        self._queue.put(table)
        self._raise_background()

    # ---------------------------------------------------------------- compact rows
    def append_sparse(self, incident: np.ndarray, counts: np.ndarray, cell: np.ndarray, energy: np.ndarray) -> None:
        """Append showers given as ``incident (n,)``, ``counts (n,)`` and flat ``cell``/``E`` (cells increasing per shower)."""
        check_interrupt()
        if self._compact is False:
            msg = "this file stores continuous points; append_sparse cannot be mixed with them"
            raise ValueError(msg)
        self._compact = True
        incident = np.asarray(incident, dtype=np.float64).reshape(-1)
        counts = np.asarray(counts, dtype=np.int64)
        self._pending.append((incident, counts, np.asarray(cell, dtype=np.int32), np.asarray(energy)))
        self._pending_points += int(cell.shape[0])
        self.n += incident.shape[0]
        if self._pending_points >= self.row_group_points:
            self._flush_groups(final=False)

    def _flush_groups(self, *, final: bool) -> None:
        if not self._pending:
            return
        if len(self._pending) == 1:
            inc, counts, cell, e = self._pending[0]
        else:
            inc, counts, cell, e = (np.concatenate(x) for x in zip(*self._pending))
        offsets = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        # whole row groups of about row_group_points points (at least one shower each)
        cuts = [0]
        target = self.row_group_points
        while True:
            k = int(np.searchsorted(offsets, offsets[cuts[-1]] + target, side="left"))
            k = max(k, cuts[-1] + 1)
            if k >= counts.shape[0]:
                break
            cuts.append(k)
        if final:
            cuts.append(counts.shape[0])
        for a, b in zip(cuts[:-1], cuts[1:]):
            self._emit(self._table(inc[a:b], offsets[a:b + 1], cell, e))
        rest = cuts[-1]
        if rest < counts.shape[0]:
            p0 = offsets[rest]
            self._pending = [(inc[rest:], counts[rest:], cell[p0:], e[p0:])]
            self._pending_points = int(offsets[-1] - p0)
        else:
            self._pending, self._pending_points = [], 0

    def _table(self, inc: np.ndarray, offsets: np.ndarray, cell: np.ndarray, e: np.ndarray) -> object:
        import pyarrow as pa

        p0, p1 = int(offsets[0]), int(offsets[-1])
        c, ev = pa.array(np.ascontiguousarray(cell[p0:p1])), pa.array(np.ascontiguousarray(e[p0:p1]))
        # no nulls anywhere: non-nullable fields, so that awkward/pandas readers see plain (not option) types
        item = pa.struct([pa.field("cell", c.type, nullable=False), pa.field("E", ev.type, nullable=False)])
        values = pa.StructArray.from_arrays([c, ev], fields=list(item))
        points = pa.LargeListArray.from_arrays(pa.array(offsets - p0, type=pa.int64()), values)
        points = points.cast(pa.large_list(pa.field("element", item, nullable=False)))
        schema = pa.schema([pa.field("incident_energy", pa.float64(), nullable=False),
                            pa.field("points", points.type, nullable=False)], metadata=self._metadata(True))
        return pa.Table.from_arrays([pa.array(np.ascontiguousarray(inc)), points], schema=schema)

    # ---------------------------------------------------------------- events
    def append(self, events: ak.Array) -> None:
        """Append awkward events (as from :func:`voxels_to_points`); points in cells are stored compactly."""
        sparse = _as_sparse(events, self.geometry) if self._compact is not False else None
        if sparse is not None:
            self.append_sparse(*sparse)
            return
        if self._compact:
            msg = "this file stores points in cells; events with other coordinates cannot be appended"
            raise ValueError(msg)
        self._compact = False
        check_interrupt()
        table = ak.to_arrow_table(events, extensionarray=False)
        meta = dict(table.schema.metadata or {})
        meta.update(self._metadata(False))
        self._emit(table.replace_schema_metadata(meta))
        self.n += len(events)

    def close(self) -> None:
        try:
            if self._compact:
                self._flush_groups(final=True)
            elif self._writer is None and self._compact is None:  # nothing at all: a valid, empty file
                self._compact = True
                z = np.zeros(0)
                self._emit(self._table(z, np.zeros(1, dtype=np.int64), np.zeros(0, np.int32), z))
            self._stop_thread()
        except BaseException:
            self.abort()
            raise
        if self._writer is not None:
            self._writer.close()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            if self._error is not None:
                err, self._error = self._error, None
                raise err

    def abort(self) -> None:
        """Stop the background thread and close the file without finishing it (it is about to be removed)."""
        if self._thread is not None:
            with contextlib.suppress(BaseException):
                while True:  # drop what waits, then stop
                    self._queue.get_nowait()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()


def _as_sparse(events: ak.Array, geometry: Geometry) -> tuple[np.ndarray, ...] | None:
    """``(incident, counts, cell, E)`` when the points are in cells (r/alpha/z absent or the cell centres), else None."""
    if "points" not in ak.fields(events) or "incident_energy" not in ak.fields(events):
        return None
    pts = events["points"]
    fields = set(ak.fields(pts))
    if not {"cell", "E"} <= fields or not fields <= {"cell", "E", "r", "alpha", "z"}:
        return None
    cell = np.asarray(ak.flatten(pts["cell"], axis=None))
    e = np.asarray(ak.flatten(pts["E"], axis=None))
    if cell.dtype.kind not in "iu" or e.dtype.kind != "f":
        return None
    counts = np.asarray(ak.num(pts, axis=1), dtype=np.int64)
    # cells outside the geometry are kept (readers give them NaN coordinates and count them as outside)
    inside = (cell >= 0) & (cell < geometry.n_voxels)
    tab = _coordinate_tables(geometry)
    for f in ("r", "alpha", "z"):
        if f in fields:
            v = np.asarray(ak.flatten(pts[f], axis=None))
            if v.dtype != np.float32 or not np.array_equal(v[inside], tab[f][cell[inside]]):
                return None
    return np.asarray(events["incident_energy"], dtype=np.float64), counts, cell.astype(np.int32), e


@contextlib.contextmanager
def points_writer(path: str | os.PathLike, geometry: Geometry, **kw: object) -> Iterator[PointsWriter]:
    """Atomically write a points file chunk by chunk (temporary file + rename).

    Ctrl-C and SIGTERM are honoured at the next :meth:`PointsWriter.append` (the temporary file is
    removed). ``expected_bytes`` (keyword): rough output size for the free-space check.
    """
    expected = float(kw.pop("expected_bytes", 0) or 0)
    with atomic_writer(path, lambda tmp: PointsWriter(tmp, geometry, **kw), expected_bytes=expected) as w:
        yield w


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
        self.path = Path(path)
        self.max_outside = float(max_outside)
        if not self.path.exists():
            raise FileNotFoundError(missing_message(self.path))
        if self.path.is_dir():
            msg = f"{self.path}: is a folder, expected a Parquet file"
            raise ShowerFileError(msg)
        try:
            self._pf = open_parquet(self.path)
        except PermissionError as err:
            msg = f"{self.path}: cannot read ({err.strerror or 'permission denied'})"
            raise ShowerFileError(msg) from err
        except Exception as err:  # pyarrow raises several types for corrupt files
            if self.path.stat().st_size == 0:
                msg = f"{self.path}: is empty (0 bytes); expected a Parquet file (an interrupted copy or download?)"
            elif is_hdf5(self.path):
                msg = (f"{self.path}: this is an HDF5 file (CaloChallenge voxels?), not point clouds in Parquet; "
                       f"run 'calopc convert {self.path}' first")
            else:
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
        check_points_schema(self.path, self._pf.schema_arrow)  # column types: one rule for every reader
        #: only ``cell`` and ``E`` stored; the cell centres are added on read
        self.compact = meta.get(_META_LAYOUT) == _LAYOUT_CELL_E
        if self.compact:
            ptype = self._pf.schema_arrow.field("points").type
            inner = getattr(ptype, "value_type", None)
            sub = [inner.field(i).name for i in range(inner.num_fields)] if inner is not None and \
                hasattr(inner, "num_fields") else []
            if not {"cell", "E"} <= set(sub):
                msg = f"{self.path}: the points of a 'cell-E' file need 'cell' and 'E' fields; found {sub}"
                raise ShowerFileError(msg)
        self._checked = False
        self._scale = EnergyScale(self.path)

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
            group = self._events(self._read_group(i))
            pending.append(group)
            n_pending += len(group)
            while n_pending >= step_size:
                buf = pending[0] if len(pending) == 1 else ak.concatenate(pending)
                chunk = buf[:step_size]
                self.check(chunk, done)
                yield chunk
                done += len(chunk)
                rest = ak.to_packed(buf[step_size:])  # a slice keeps (and concatenate copies) the whole content
                pending, n_pending = ([rest] if len(rest) else []), len(rest)
        if n_pending:
            chunk = pending[0] if len(pending) == 1 else ak.concatenate(pending)
            self.check(chunk, done)
            yield chunk

    def _read_group(self, i: int):
        try:
            import pyarrow as pa

            pa.default_memory_pool().release_unused()  # the previous group's buffers (the pool keeps them otherwise)
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
        events = self._events(table)
        self.check(events, 0)
        return events

    @property
    def num_row_groups(self) -> int:
        return int(self._pf.metadata.num_row_groups)

    def read_row_group(self, i: int) -> ak.Array:
        """Row group ``i`` as events (validated like :meth:`iterate` chunks, the geometry check included)."""
        events = self._events(self._read_group(i))
        first = sum(self._pf.metadata.row_group(k).num_rows for k in range(i))
        self.check(events, first)
        return events

    def _events(self, table: object) -> ak.Array:
        """Awkward events of an Arrow table: compact files get their cell centres back (vectorised lookup)."""
        if not self.compact:
            return ak.from_arrow(table, highlevel=True)
        return events_from_arrow(table, self.geometry)

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
        if self.compact:  # r, alpha and z were looked up from the cells: nothing to compare
            fields -= {"r", "alpha", "z"}
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
        self._scale.check(inc, counts, e)
        if "cell" in fields:  # one rule for every reader: a cell index outside the geometry is an error
            check_cells(np.asarray(ak.flatten(pts["cell"], axis=None)), counts, self.geometry.n_voxels,
                        self.geometry.name, where, start)
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


def events_from_arrow(table: object, geometry: Geometry) -> ak.Array:
    """Events of an Arrow table of the compact layout (``incident_energy``, ``points: list<cell, E>``).

    ``r``, ``alpha`` and ``z`` are the cell centres (float32, as :func:`voxels_to_points` gives
    them); cells outside the geometry get NaN coordinates (the file check counts them).
    """
    import pyarrow as pa

    pts = table.column("points")
    pts = pts.combine_chunks() if isinstance(pts, pa.ChunkedArray) else pts
    offsets = np.asarray(pts.offsets, dtype=np.int64)
    values = pts.values
    p0, p1 = int(offsets[0]), int(offsets[-1])
    # copies: NumPy owns the memory, Arrow's buffers go at once (views of them kept Arrow's allocator from
    # giving memory back, so reading a file chunk by chunk grew without bound)
    cell = np.array(values.field("cell").to_numpy(zero_copy_only=False)[p0:p1], dtype=np.int32)
    e = np.array(values.field("E").to_numpy(zero_copy_only=False)[p0:p1])
    inc = np.array(table.column("incident_energy").to_numpy(), dtype=np.float64)
    offsets = offsets.copy()
    del pts, values
    tab = _coordinate_tables(geometry)
    n_vox = geometry.n_voxels
    outside = (cell < 0) | (cell >= n_vox) if cell.size else np.zeros(0, dtype=bool)
    if outside.any():
        safe = np.where(outside, 0, cell)
        xyz = {k: np.where(outside, np.float32(np.nan), tab[k][safe]) for k in ("r", "alpha", "z")}
    else:
        xyz = {k: tab[k][cell] for k in ("r", "alpha", "z")}
    return _build_events(inc, offsets - p0, {**xyz, "E": e, "cell": cell})


def convert_file(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    geometry: Geometry | None = None,
    step_size: int | str = "256 MB",
    threshold: float | str = 0.0,
    progress: bool = True,
    energy_dtype: str | np.dtype | None = None,
    threads: int | None = None,
    row_group_points: int = ROW_GROUP_POINTS,
) -> Path:
    """Convert a CaloChallenge HDF5 file to a point-cloud Parquet file, streaming in chunks.

    Gzip chunks are inflated, scanned for non-empty cells and validated in ``threads`` worker
    threads (default: the usable CPUs, at most 8), while another thread compresses and writes the Parquet
    row groups. Memory is bounded by the points of ``step_size`` of dense input plus a few HDF5
    chunks. Returns the output path (default: the input with suffix ``.parquet``).

    ``energy_dtype``: ``"float64"`` or ``"float32"`` for the stored energies; default: the
    file's dtype (lossless). float32 rounds each energy to 24 significant bits (relative error
    <= 2**-24 = 6.0e-8) and halves the file; it is exact for float32 input.
    """
    input = Path(input)
    output = Path(output) if output is not None else input.with_suffix(".parquet")
    threshold = resolve_threshold(threshold, geometry)
    step = parse_size(step_size) if isinstance(step_size, str) else int(step_size)
    if step <= 0:
        msg = f"step size must be > 0, got {step_size!r}"
        raise ValueError(msg)
    edt = _energy_dtype(energy_dtype)
    check_not_input(output, [input])
    check_suffix(output, HDF5_SUFFIXES, "Parquet point clouds", "use a .parquet name (voxelize writes HDF5)")
    with open_showers(input, geometry=geometry) as f:
        f.threads = threads
        store = f.dtype if edt is None else edt
        info = {"source": input.name, "n_showers": len(f), "dtype": str(store),
                "incident_dtype": str(f.incident_dtype), "threshold": threshold}
        if store != f.dtype:
            info["source_dtype"] = str(f.dtype)
        expected = 0.5 * input.stat().st_size
        with points_writer(output, f.geometry, info=info, expected_bytes=expected, background=True,
                           row_group_points=row_group_points) as w, \
                progress_bar(len(f), f"convert {input.name}", enabled=progress) as bar:
            for _, inc, counts, cell, e in f.iterate_sparse(step_size, threshold=threshold):
                w.append_sparse(inc, counts, cell, e.astype(store, copy=False))
                bar.update(len(inc))
    return output


def _energy_dtype(name: str | np.dtype | None) -> np.dtype | None:
    if name is None:
        return None
    try:
        dt = np.dtype(name)
    except TypeError:
        dt = None
    if dt is None or dt.name not in ENERGY_DTYPES:
        msg = f"energy dtype must be one of {', '.join(ENERGY_DTYPES)}, got {name!r}"
        raise ValueError(msg)
    return dt
