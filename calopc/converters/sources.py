r"""Which files a source names: a file, a folder of Parquet shards, a glob, or a list of those.

The path rules every reader and converter shares; nothing here opens a file beyond its first
bytes, and nothing here imports the converters (only the path messages of :mod:`calopc._safety`
and the HDF5 file names of :mod:`calopc.hdf5`).
"""

from __future__ import annotations

__all__ = ["HDF5_SUFFIXES", "MAX_OUTSIDE", "PARQUET_SUFFIXES", "PathsLike", "expand_globs", "has_glob", "is_hdf5",
           "is_parquet", "is_points_source", "points_paths"]

import glob as _glob
import os
from collections.abc import Sequence
from pathlib import Path

from .._safety import missing_message
from ..hdf5 import HDF5_SUFFIXES, is_hdf5

#: Largest share of points that may fall outside the geometry (or outside the cell their index names)
#: before reading or voxelizing a points file is refused: more means the file's geometry is wrong.
MAX_OUTSIDE = 0.01

PARQUET_SUFFIXES = (".parquet", ".pq")
_GLOB_CHARS = "*?["

PathsLike = str | os.PathLike | Sequence[str | os.PathLike]


def has_glob(s: str | os.PathLike) -> bool:
    """Whether ``s`` holds a glob character (``*``, ``?``, ``[``)."""
    return any(c in os.fspath(s) for c in _GLOB_CHARS)


def expand_globs(items: PathsLike) -> list[Path]:
    """``items`` with every quoted glob that names no existing file replaced by its matches, sorted.

    A glob without a match is a ``FileNotFoundError`` naming it; other names are kept as they are
    (whether they exist is for the caller to say).
    """
    if isinstance(items, (str, os.PathLike)):
        items = [items]
    out: list[Path] = []
    for item in items:
        s = os.fspath(item)
        if not os.path.exists(s) and has_glob(s):
            found = sorted(Path(q) for q in _glob.glob(s) if os.path.isfile(q))
            if not found:
                msg = f"{s}: no file matches this pattern"
                raise FileNotFoundError(msg)
            out.extend(found)
        else:
            out.append(Path(s))
    return out


def points_paths(source: PathsLike) -> list[Path]:
    """The Parquet files of ``source``: a file, a folder (its ``*.parquet``/``*.pq`` files), a glob, or a list of those.

    Sorted by name within a folder or glob; a list keeps its order. No file found is an error
    naming the source.
    """
    out: list[Path] = []
    for p in expand_globs(source):
        if p.is_dir():
            files = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in PARQUET_SUFFIXES
                           and not q.name.startswith("."))
            if not files:
                h5 = sorted(q.name for q in p.iterdir() if q.is_file() and q.suffix.lower() in HDF5_SUFFIXES)
                hint = (f"; it holds {len(h5)} HDF5 files: convert them first, e.g. calopc convert "
                        f"'{p / ('*' + Path(h5[0]).suffix)}' -o DIR/" if h5 else "")
                msg = (f"{p}: folder holds no Parquet files (*.parquet); expected a dataset written by 'calopc convert'"
                       f"{hint}")
                raise FileNotFoundError(msg)
            out.extend(files)
        else:
            if not p.exists():
                raise FileNotFoundError(missing_message(p))
            out.append(p)
    if not out:
        msg = "no point-cloud files given"
        raise FileNotFoundError(msg)
    return out


def is_parquet(path: str | os.PathLike) -> bool:
    """Whether the file starts with the Parquet magic bytes ``PAR1``."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PAR1"
    except OSError:
        return False


def is_points_source(source: PathsLike) -> bool:
    """True when ``source`` names Parquet data (a Parquet file, a folder of them, a glob or list of them)."""
    try:
        paths = points_paths(source)
    except (FileNotFoundError, OSError):
        return False
    return is_parquet(paths[0])
