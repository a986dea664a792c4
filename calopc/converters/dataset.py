r"""Point-cloud datasets of several Parquet files: a folder or a glob, read eagerly or lazily (dask-awkward).

``calopc convert a.hdf5 b.hdf5 -o DIR/`` writes one Parquet shard per input into ``DIR``;
every reader of point clouds accepts such a folder, a glob (``"DIR/*.parquet"``) or a list of
files (:func:`points_paths`). :class:`PointsDataset` reads the shards one after the other with
the interface of :class:`~calopc.converters.PointsFile`; :func:`open_points_lazy` (exported as
``calopc.open_points_lazy``) returns a lazy dask-awkward array with one partition per row group.
"""

from __future__ import annotations

__all__ = ["PointsDataset", "convert_files", "open_points_lazy"]

import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import awkward as ak
import numpy as np

from .._h5direct import default_threads
from .._safety import OutputError, missing_message
from ..geometry import Geometry
from ..hdf5 import ShowerFileError
from .files import PointsFile, convert_file
from .sources import MAX_OUTSIDE, PARQUET_SUFFIXES, PathsLike, expand_globs, points_paths


class PointsDataset:
    """Several points files of one geometry, read one after the other (the interface of ``PointsFile``).

    ``len`` is the total number of showers; :meth:`iterate` yields chunks that never span two
    files; :attr:`info` is the first file's. A file of another geometry is an error naming it.
    """

    def __init__(self, source: PathsLike, *, geometry: Geometry | None = None, max_outside: float | None = None
                 ) -> None:
        self.paths = points_paths(source)
        self.path = Path(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else self.paths[0].parent
        self.files: list[PointsFile] = []
        try:
            for p in self.paths:
                f = PointsFile(p, geometry=geometry, max_outside=MAX_OUTSIDE if max_outside is None else max_outside)
                self.files.append(f)
                first = self.files[0]
                if f.geometry != first.geometry:
                    msg = (f"{p}: geometry {f.geometry.name!r} ({f.geometry.n_voxels} voxels) differs from "
                           f"{first.path}'s {first.geometry.name!r} ({first.geometry.n_voxels} voxels)")
                    raise ShowerFileError(msg)
        except BaseException:
            self.close()
            raise
        self.geometry = self.files[0].geometry
        self.info = dict(self.files[0].info)

    def __len__(self) -> int:
        return sum(len(f) for f in self.files)

    def __enter__(self) -> PointsDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self.files:
            f.close()

    def iterate(self, step_size: int = 10_000) -> Iterator[ak.Array]:
        for f in self.files:
            yield from f.iterate(step_size)

    def read(self) -> ak.Array:
        parts = [f.read() for f in self.files]
        return parts[0] if len(parts) == 1 else ak.concatenate(parts)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)


# ----------------------------------------------------------------------------- many files, one dataset
def _convert_one(job: tuple) -> tuple[str, float]:
    import time

    src, dst, kw = job
    t = time.perf_counter()
    convert_file(src, dst, **kw)
    return str(dst), time.perf_counter() - t


def convert_files(inputs: PathsLike, output_dir: str | os.PathLike, *, workers: int = 1, progress: bool = True,
                  log: object = None, **kw: object) -> list[Path]:
    """Convert several HDF5 files (paths or globs) into a dataset folder: one Parquet shard per input.

    Shards are named after their input (``dataset_3_1.hdf5`` → ``DIR/dataset_3_1.parquet``).
    ``workers`` processes convert files in parallel, each with ``cpus // workers`` inflating
    threads (unless ``threads`` is given). Other keywords go to :func:`convert_file`. ``log``:
    called with one line per finished file.

    A folder that already holds other Parquet files (earlier shards) is written into with a
    warning naming them: every reader of the folder includes them.
    """
    srcs = expand_globs(inputs)
    for s in srcs:
        if not s.exists():
            raise FileNotFoundError(missing_message(s))
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"{out_dir}: exists and is not a folder; several inputs need an output folder (-o DIR/)"
        raise OutputError(msg)
    names: dict[str, Path] = {}
    for s in srcs:
        name = s.with_suffix(".parquet").name
        if name in names:
            msg = f"{s}: two inputs would both write {out_dir / name} ({names[name]} and {s}); rename one"
            raise OutputError(msg)
        names[name] = s
    out_dir.mkdir(parents=True, exist_ok=True)
    others = sorted(q.name for q in out_dir.iterdir() if q.is_file() and q.suffix.lower() in PARQUET_SUFFIXES
                    and not q.name.startswith(".") and q.name not in names)
    if others:
        listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        warnings.warn(f"{out_dir}/ also holds {len(others)} other Parquet file(s) ({listed}); every reader of the "
                      "folder includes them: remove them or convert into another folder", stacklevel=2)
    workers = max(1, min(int(workers), len(srcs)))
    if workers > 1 and kw.get("threads") is None:
        kw["threads"] = max(1, default_threads() // workers)
    jobs = [(s, out_dir / name, {**kw, "progress": progress and workers == 1}) for name, s in names.items()]
    done: list[Path] = []
    if workers == 1:
        for job in jobs:
            dst, sec = _convert_one(job)
            done.append(Path(dst))
            if log is not None:
                log(f"wrote {dst} ({sec:.1f} s)")
        return done
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futs = {pool.submit(_convert_one, job): job for job in jobs}
        try:
            for fut in as_completed(futs):
                dst, sec = fut.result()
                done.append(Path(dst))
                if log is not None:
                    log(f"wrote {dst} ({sec:.1f} s)")
        except BaseException:
            for fut in futs:
                fut.cancel()
            raise
    return [job[1] for job in jobs]


# ----------------------------------------------------------------------------- lazy (dask-awkward)
class _ReadRowGroup:
    """Reads one row group of one file as events (a picklable partition function for dask)."""

    def __init__(self, geometry_json: str, max_outside: float) -> None:
        self.geometry_json = geometry_json
        self.max_outside = max_outside

    def __call__(self, part: tuple[str, int]) -> ak.Array:
        path, group = part
        geometry = Geometry.from_json(self.geometry_json)
        with PointsFile(path, geometry=geometry, max_outside=self.max_outside) as f:
            return f.read_row_group(group)


def open_points_lazy(source: PathsLike, *, geometry: Geometry | None = None, max_outside: float | None = None):
    """A lazy dask-awkward array of the events of ``source`` (a file, folder, glob or list), one partition per row group.

    The records are those of :func:`calopc.converters.read_points` (``incident_energy``,
    ``points`` with ``r, alpha, z, E, cell``); nothing is read until ``.compute()``, and every
    partition is validated as it is read. Needs the ``dask`` extra (``pip install
    'calopc[dask]'``: dask and dask-awkward); the computation then runs on any dask scheduler
    or cluster. Example: hits per layer over all showers::

        import awkward as ak, calopc
        ev = calopc.open_points_lazy("showers/")       # a folder written by calopc convert
        layer = ev.points.z                             # layer ordinal of every point
        hits = ak.sum(layer == 0, axis=1).compute()     # hits in layer 0, per shower
    """
    try:
        import dask_awkward as dak
    except ModuleNotFoundError as err:
        msg = "calopc.open_points_lazy needs dask and dask-awkward: pip install 'calopc[dask]'"
        raise ModuleNotFoundError(msg) from err
    paths = points_paths(source)
    parts: list[tuple[str, int]] = []
    rows: list[int] = []
    geo = None
    dtype = None
    for p in paths:
        with PointsFile(p, geometry=geometry) as f:
            if geo is None:
                geo = f.geometry
            elif f.geometry != geo:
                msg = (f"{p}: geometry {f.geometry.name!r} ({f.geometry.n_voxels} voxels) differs from "
                       f"{paths[0]}'s {geo.name!r} ({geo.n_voxels} voxels)")
                raise ShowerFileError(msg)
            sample = f._events(f._pf.read_row_group(0)[:0]) if f.num_row_groups else None
            if sample is not None:
                t = str(sample.type.content)
                if dtype is None:
                    dtype, first = t, p
                elif t != dtype:
                    msg = f"{p}: its points have type {t}, but {first}'s have {dtype}; convert them alike"
                    raise ShowerFileError(msg)
            for g in range(f.num_row_groups):
                parts.append((str(p), g))
                rows.append(f._pf.metadata.row_group(g).num_rows)
    if not parts:
        msg = f"{source}: no row groups to read"
        raise ShowerFileError(msg)
    with PointsFile(parts[0][0], geometry=geo) as f:
        empty = f._events(f._pf.read_row_group(0)[:0])
    meta = ak.Array(empty.layout.to_typetracer(forget_length=True))
    divisions = tuple(int(x) for x in np.r_[0, np.cumsum(rows)])
    fn = _ReadRowGroup(geo.to_json(), MAX_OUTSIDE if max_outside is None else max_outside)
    return dak.from_map(fn, parts, label="calopc-points", meta=meta, divisions=divisions)
