r"""The readers that take any points source (one Parquet file, a folder, a glob or a list) and ``info``.

:func:`open_points` gives a :class:`~calopc.converters.files.PointsFile` for one file and a
:class:`~calopc.converters.dataset.PointsDataset` (same interface) for several;
:func:`read_points`, :func:`voxelize_file` (Parquet -> HDF5 voxels) and :func:`file_info` (HDF5
or Parquet) build on it.
"""

from __future__ import annotations

__all__ = ["file_info", "open_points", "read_points", "voxelize_file"]

import os
import warnings
from pathlib import Path

import awkward as ak
import numpy as np

from .._safety import check_not_input, missing_message
from ..geometry import Geometry, resolve_threshold
from ..hdf5 import ShowerFileError, open_showers, parse_size, shower_writer
from ..progress import progress_bar
from .core import VoxelizeStats, points_to_voxels
from .dataset import PointsDataset
from .files import PointsFile, check_suffix
from .sources import MAX_OUTSIDE, PARQUET_SUFFIXES, has_glob, is_parquet, is_points_source


def open_points(path: str | os.PathLike | list, *, geometry: Geometry | None = None, max_outside: float = MAX_OUTSIDE
                ) -> PointsFile:
    """Open a points file (see :class:`PointsFile`), or a dataset: a folder of them, a glob or a list
    (a :class:`~calopc.converters.dataset.PointsDataset`, same interface)."""
    if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
        return PointsFile(path, geometry=geometry, max_outside=max_outside)
    if isinstance(path, (str, os.PathLike)) and not Path(path).exists() and not has_glob(path):
        raise FileNotFoundError(missing_message(path))
    return PointsDataset(path, geometry=geometry, max_outside=max_outside)


def read_points(path: str | os.PathLike | list, *, geometry: Geometry | None = None) -> tuple[ak.Array, Geometry]:
    """Read a whole points file (or a folder, glob or list of them): ``(events, geometry)``."""
    with open_points(path, geometry=geometry) as f:
        return f.read(), f.geometry


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
    check_not_input(output, [input] if Path(input).exists() else [])
    check_suffix(output, PARQUET_SUFFIXES, "HDF5 voxels", "use a .hdf5 name (convert writes Parquet)")
    total = VoxelizeStats()
    rng = np.random.default_rng(seed)
    with open_points(input, geometry=geometry, max_outside=max_outside) as f:
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
        in_bytes = f.size_bytes if hasattr(f, "size_bytes") else input.stat().st_size
        with shower_writer(output, g.n_voxels, dtype=dtype, incident_dtype=inc_dtype,
                           expected_bytes=0.3 * in_bytes) as w, \
                progress_bar(len(f), f"voxelize {input.name}", enabled=progress) as bar:
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
    dataset = path.is_dir() or (not path.exists() and has_glob(path))
    if not path.exists() and not dataset:
        raise FileNotFoundError(missing_message(path))
    if not dataset and path.stat().st_size == 0:
        msg = f"{path}: is empty (0 bytes); expected an HDF5 or Parquet file (an interrupted copy or download?)"
        raise ShowerFileError(msg)
    hits: list[np.ndarray] = []
    inc: list[np.ndarray] = []
    etot: list[np.ndarray] = []
    if is_points_source(path) if dataset else is_parquet(path):
        with open_points(path, geometry=geometry) as f:
            g, n = f.geometry, len(f)
            kind = f"points (Parquet, {len(f.paths)} files)" if dataset else "points (Parquet)"
            with progress_bar(n, f"info {path.name}", enabled=progress) as bar:
                for ch in f.iterate():
                    hits.append(np.asarray(ak.num(ch["points"], axis=1)))
                    inc.append(np.asarray(ch["incident_energy"]))
                    etot.append(np.asarray(ak.sum(ch["points", "E"], axis=1), dtype=np.float64))
                    bar.update(len(ch))
            dtype = f.info.get("dtype", "")
    else:
        with open_showers(path, geometry=geometry) as f:
            g, kind, n, dtype = f.geometry, "voxels (HDF5)", len(f), str(f.dtype)
            with progress_bar(n, f"info {path.name}", enabled=progress) as bar:
                for _, e, counts, _, en in f.iterate_sparse(step_size):  # non-empty cells only, scanned in threads
                    hits.append(counts)
                    inc.append(e)
                    with np.errstate(over="ignore"):
                        etot.append(np.bincount(np.repeat(np.arange(len(counts)), counts),
                                                weights=en.astype(np.float64), minlength=len(counts)))
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
