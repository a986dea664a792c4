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
import os
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np

from .. import __version__
from ..geometry import Geometry
from ..io import ShowerFileError, atomic_output, open_showers, parse_size, shower_writer
from .core import VoxelizeStats, points_to_voxels, voxels_to_points

_META_GEOMETRY = b"calopc.geometry"
_META_VERSION = b"calopc.version"
_META_INFO = b"calopc.info"


def _progress(total: int, desc: str, enabled: bool, unit: str = "shower"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True, leave=False)


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
        self._writer.write_table(table)
        self.n += len(events)

    def close(self) -> None:
        if self._writer is None:  # no chunk at all: still write a valid, empty file
            empty = voxels_to_points(np.zeros((0, self.geometry.n_voxels)), self.geometry)
            self.append(empty)
        self._writer.close()


@contextlib.contextmanager
def points_writer(path: str | os.PathLike, geometry: Geometry, **kw: object) -> Iterator[PointsWriter]:
    """Atomically write a points file chunk by chunk (temporary file + rename)."""
    with atomic_output(path) as tmp:
        w = PointsWriter(tmp, geometry, **kw)
        ok = False
        try:
            yield w
            ok = True
        finally:
            if ok:
                w.close()
            elif w._writer is not None:
                w._writer.close()


def write_points(path: str | os.PathLike, events: ak.Array, geometry: Geometry, *, info: dict | None = None) -> None:
    """Write events (as from :func:`voxels_to_points`) to Parquet, atomically."""
    with points_writer(path, geometry, info=info) as w:
        w.append(events)


class PointsFile:
    """An open point-cloud Parquet file written by calopc."""

    def __init__(self, path: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        if not self.path.exists():
            msg = f"{self.path}: no such file"
            raise FileNotFoundError(msg)
        try:
            self._pf = pq.ParquetFile(self.path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            msg = f"{self.path}: cannot open as Parquet (truncated or not a Parquet file?): {err}"
            raise ShowerFileError(msg) from err
        meta = self._pf.schema_arrow.metadata or {}
        if _META_GEOMETRY not in meta:
            msg = f"{self.path}: Parquet file has no calopc geometry metadata (key {_META_GEOMETRY.decode()!r}); was it written by 'calopc convert'?"
            raise ShowerFileError(msg)
        self.geometry = Geometry.from_json(meta[_META_GEOMETRY])
        self.info = json.loads(meta.get(_META_INFO, b"{}"))
        names = self._pf.schema_arrow.names
        if "points" not in names or "incident_energy" not in names:
            msg = f"{self.path}: expected columns 'incident_energy' and 'points', found {names}"
            raise ShowerFileError(msg)

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
        for i in range(self._pf.metadata.num_row_groups):
            group = ak.from_arrow(self._pf.read_row_group(i), highlevel=True)
            pending.append(group)
            n_pending += len(group)
            while n_pending >= step_size:
                buf = pending[0] if len(pending) == 1 else ak.concatenate(pending)
                yield buf[:step_size]
                rest = buf[step_size:]
                pending, n_pending = ([rest] if len(rest) else []), len(rest)
        if n_pending:
            yield pending[0] if len(pending) == 1 else ak.concatenate(pending)

    def read(self) -> ak.Array:
        return ak.from_arrow(self._pf.read(), highlevel=True)


def open_points(path: str | os.PathLike) -> PointsFile:
    return PointsFile(path)


def read_points(path: str | os.PathLike) -> tuple[ak.Array, Geometry]:
    """Read a whole points file: ``(events, geometry)``."""
    with PointsFile(path) as f:
        return f.read(), f.geometry


def convert_file(
    input: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    geometry: Geometry | None = None,
    step_size: int | str = "256 MB",
    threshold: float = 0.0,
    progress: bool = True,
) -> Path:
    """Convert a CaloChallenge HDF5 file to a point-cloud Parquet file, streaming in chunks.

    Memory is bounded by ``step_size`` of dense input (plus the points of one chunk).
    Returns the output path (default: the input with suffix ``.parquet``).
    """
    input = Path(input)
    output = Path(output) if output is not None else input.with_suffix(".parquet")
    if output.resolve() == input.resolve():
        msg = f"{output}: output would overwrite the input"
        raise ValueError(msg)
    with open_showers(input, geometry=geometry) as f:
        info = {"source": input.name, "n_showers": len(f), "dtype": str(f.dtype), "threshold": threshold}
        with points_writer(output, f.geometry, info=info) as w, _progress(len(f), f"convert {input.name}", progress) as bar:
            for inc, sh in f.iterate(step_size):
                w.append(voxels_to_points(sh, f.geometry, incident_energies=inc, threshold=threshold))
                bar.update(len(inc))
    return output


def voxelize_file(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    collisions: str = "sum",
    threshold: float = 0.0,
    step_size: int = 10_000,
    dtype: np.dtype | type | None = None,
    progress: bool = True,
) -> VoxelizeStats:
    """Convert a point-cloud Parquet file back to the official HDF5 format, streaming in chunks."""
    input = Path(input)
    total = VoxelizeStats()
    with PointsFile(input) as f:
        g = f.geometry
        if dtype is None:
            dtype = np.dtype(f.info.get("dtype", "float64"))
        step = max(1, min(step_size, parse_size("256 MB") // (g.n_voxels * np.dtype(dtype).itemsize)))
        with shower_writer(output, g.n_voxels, dtype=dtype) as w, _progress(len(f), f"voxelize {input.name}", progress) as bar:
            for chunk in f.iterate(step):
                sh, st = points_to_voxels(chunk, g, collisions=collisions, threshold=threshold, dtype=dtype,
                                          return_stats=True)
                w.append(np.asarray(chunk["incident_energy"]), sh)
                total += st
                bar.update(len(chunk))
    return total


def file_info(path: str | os.PathLike, *, step_size: int | str = "256 MB", progress: bool = False) -> dict:
    """Dataset, number of showers and hits-per-shower statistics of an HDF5 or Parquet file."""
    path = Path(path)
    hits: list[np.ndarray] = []
    inc: list[np.ndarray] = []
    etot: list[np.ndarray] = []
    if _is_parquet(path):
        with PointsFile(path) as f:
            g, kind, n = f.geometry, "points (Parquet)", len(f)
            with _progress(n, f"info {path.name}", progress) as bar:
                for ch in f.iterate():
                    hits.append(np.asarray(ak.num(ch["points"], axis=1)))
                    inc.append(np.asarray(ch["incident_energy"]))
                    etot.append(np.asarray(ak.sum(ch["points", "E"], axis=1)))
                    bar.update(len(ch))
            dtype = f.info.get("dtype", "")
    else:
        with open_showers(path) as f:
            g, kind, n, dtype = f.geometry, "voxels (HDF5)", len(f), str(f.dtype)
            with _progress(n, f"info {path.name}", progress) as bar:
                for e, sh in f.iterate(step_size):
                    hits.append(np.count_nonzero(sh, axis=1))
                    inc.append(e)
                    etot.append(sh.sum(axis=1))
                    bar.update(len(e))
    h = np.concatenate(hits) if hits else np.zeros(0)
    ei = np.concatenate(inc) if inc else np.zeros(0)
    et = np.concatenate(etot) if etot else np.zeros(0)
    out = {
        "file": str(path), "kind": kind, "dataset": g.name, "n_voxels": g.n_voxels, "n_showers": int(n), "dtype": dtype,
    }
    if n:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = et / ei
        out.update({
            "hits_mean": float(h.mean()), "hits_std": float(h.std()), "hits_min": int(h.min()),
            "hits_median": float(np.median(h)), "hits_max": int(h.max()), "empty_showers": int((h == 0).sum()),
            "occupancy_mean": float(h.mean() / g.n_voxels),
            "e_inc_min": float(np.nanmin(ei)) if np.isfinite(ei).any() else float("nan"),
            "e_inc_max": float(np.nanmax(ei)) if np.isfinite(ei).any() else float("nan"),
            "e_dep_over_e_inc_mean": float(np.nanmean(ratio)) if np.isfinite(ratio).any() else float("nan"),
            "e_dep_over_e_inc_std": float(np.nanstd(ratio)) if np.isfinite(ratio).any() else float("nan"),
        })
    return out


def _is_parquet(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False
