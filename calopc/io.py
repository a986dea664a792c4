r"""Reading and writing CaloChallenge HDF5 files, with validation and atomic output.

The official format: two datasets, ``incident_energies`` of shape ``(N, 1)`` and
``showers`` of shape ``(N, n_voxels)``, both in MeV, gzip-compressed, no groups.
"""

from __future__ import annotations

__all__ = [
    "ShowerFile",
    "ShowerFileError",
    "atomic_output",
    "check_energies",
    "open_showers",
    "write_showers",
]

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .geometry import Geometry, GeometryError, detect_geometry

INCIDENT_KEY = "incident_energies"
SHOWERS_KEY = "showers"


class ShowerFileError(ValueError):
    """An input file is not a valid CaloChallenge shower file."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    An interrupted or failed write leaves nothing under the final name (and removes the
    temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def check_energies(values: np.ndarray, *, where: str, key: str) -> None:
    """Raise :class:`ShowerFileError` if ``values`` holds NaN, inf or negative numbers."""
    bad = ~np.isfinite(values)
    if bad.any():
        idx = np.argwhere(bad)[0]
        msg = f"{where}: dataset {key!r} holds non-finite values (first at index {tuple(int(i) for i in idx)}: {values[tuple(idx)]}); expected finite energies in MeV"
        raise ShowerFileError(msg)
    neg = values < 0
    if neg.any():
        idx = np.argwhere(neg)[0]
        msg = f"{where}: dataset {key!r} holds negative values (first at index {tuple(int(i) for i in idx)}: {values[tuple(idx)]}); expected energies >= 0 MeV"
        raise ShowerFileError(msg)


class ShowerFile:
    """An open, validated CaloChallenge HDF5 file; read it whole or in chunks.

    Use as a context manager::

        with open_showers("dataset_2_1.hdf5") as f:
            for e_inc, showers in f.iterate(step_size="256 MB"):
                ...
    """

    def __init__(self, path: str | os.PathLike, *, geometry: Geometry | None = None, validate: bool = True) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            msg = f"{self.path}: no such file"
            raise FileNotFoundError(msg)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            msg = f"{self.path}: cannot open as HDF5 (truncated or not an HDF5 file?): {err}"
            raise ShowerFileError(msg) from err
        try:
            self._check_layout(geometry)
            self.validate = validate
        except BaseException:
            self._f.close()
            raise

    def _check_layout(self, geometry: Geometry | None) -> None:
        keys = sorted(self._f.keys())
        for key in (INCIDENT_KEY, SHOWERS_KEY):
            if key not in self._f:
                msg = f"{self.path}: dataset {key!r} not found; expected keys {INCIDENT_KEY!r} and {SHOWERS_KEY!r}, found {keys}"
                raise ShowerFileError(msg)
        inc, sh = self._f[INCIDENT_KEY], self._f[SHOWERS_KEY]
        import h5py

        for key, ds in ((INCIDENT_KEY, inc), (SHOWERS_KEY, sh)):
            if not isinstance(ds, h5py.Dataset):
                msg = f"{self.path}: {key!r} is a {type(ds).__name__}, expected a dataset"
                raise ShowerFileError(msg)
            if ds.dtype.kind != "f":
                msg = f"{self.path}: dataset {key!r} has dtype {ds.dtype}, expected floating point (MeV)"
                raise ShowerFileError(msg)
        if inc.ndim != 2 or inc.shape[1] != 1:
            if inc.ndim == 1:
                pass  # tolerated: (N,) incident energies
            else:
                msg = f"{self.path}: dataset {INCIDENT_KEY!r} must have shape (N, 1), got {inc.shape}"
                raise ShowerFileError(msg)
        if sh.ndim != 2:
            msg = f"{self.path}: dataset {SHOWERS_KEY!r} must have shape (N, n_voxels), got {sh.shape}"
            raise ShowerFileError(msg)
        if inc.shape[0] != sh.shape[0]:
            msg = (f"{self.path}: {INCIDENT_KEY!r} has {inc.shape[0]} rows but {SHOWERS_KEY!r} has "
                   f"{sh.shape[0]}; expected the same number of showers")
            raise ShowerFileError(msg)
        n_vox = sh.shape[1]
        if geometry is None:
            try:
                geometry = detect_geometry(n_vox)
            except GeometryError as err:
                msg = f"{self.path}: dataset {SHOWERS_KEY!r} has shape {sh.shape}: {err}"
                raise ShowerFileError(msg) from err
        elif geometry.n_voxels != n_vox:
            msg = (f"{self.path}: dataset {SHOWERS_KEY!r} must have shape (N, {geometry.n_voxels}) for "
                   f"geometry {geometry.name!r}, got {sh.shape}")
            raise ShowerFileError(msg)
        self.geometry = geometry
        self._inc, self._sh = inc, sh

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self._sh.shape[0])

    @property
    def dtype(self) -> np.dtype:
        return self._sh.dtype

    @property
    def n_voxels(self) -> int:
        return int(self._sh.shape[1])

    def __enter__(self) -> ShowerFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    # ------------------------------------------------------------------ reading
    def read(self, start: int | None = None, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Incident energies ``(n,)`` and showers ``(n, n_voxels)`` of rows ``start:stop``."""
        n = len(self)
        start, stop, _ = slice(start, stop).indices(n)
        stop = max(start, stop)
        try:
            inc = np.asarray(self._inc[start:stop]).reshape(-1)
            sh = np.asarray(self._sh[start:stop])
        except (OSError, RuntimeError, ValueError) as err:
            msg = f"{self.path}: failed to read rows {start}:{stop} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        if self.validate:
            check_energies(inc, where=f"{self.path} rows {start}:{stop}", key=INCIDENT_KEY)
            check_energies(sh, where=f"{self.path} rows {start}:{stop}", key=SHOWERS_KEY)
        return inc, sh

    def rows_per_step(self, step_size: int | str) -> int:
        """Rows per chunk for ``step_size`` given as a row count or a size string (``"256 MB"``)."""
        if isinstance(step_size, int):
            return max(1, step_size)
        nbytes = parse_size(step_size)
        row = max(1, self.n_voxels * self.dtype.itemsize)
        return max(1, nbytes // row)

    def iterate(self, step_size: int | str = "256 MB", *, start: int = 0, stop: int | None = None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield ``(incident (n,), showers (n, n_voxels))`` chunks; at most ``step_size`` of dense data each."""
        stop = len(self) if stop is None else min(stop, len(self))
        step = self.rows_per_step(step_size)
        for i in range(start, stop, step):
            yield self.read(i, min(i + step, stop))


def open_showers(path: str | os.PathLike, *, geometry: Geometry | None = None, validate: bool = True) -> ShowerFile:
    """Open and validate a CaloChallenge HDF5 file (see :class:`ShowerFile`)."""
    return ShowerFile(path, geometry=geometry, validate=validate)


def parse_size(s: str | int) -> int:
    """``"256 MB"`` → bytes (1 MB = 10⁶ B; KiB/MiB/GiB are binary)."""
    if isinstance(s, int):
        return s
    t = s.strip().replace(" ", "")
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    for u, f in units.items():
        if t.lower().endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, f = t, 1
    try:
        return int(float(num) * f)
    except ValueError:
        msg = f"cannot parse size {s!r}; expected e.g. '256 MB' or a number of bytes"
        raise ValueError(msg) from None


class ShowerWriter:
    """Append showers chunk by chunk to a new file in the official format (used by :func:`write_showers`)."""

    def __init__(self, path: Path, n_voxels: int, *, dtype: np.dtype | type = np.float64, compression: str | None = "gzip",
                 attrs: dict | None = None) -> None:
        import h5py

        self._f = h5py.File(path, "w")
        chunk_rows = max(1, min(1000, (1 << 20) // max(1, n_voxels)))
        kw = {"compression": compression} if compression else {}
        self._inc = self._f.create_dataset(INCIDENT_KEY, shape=(0, 1), maxshape=(None, 1), dtype=dtype,
                                           chunks=(max(chunk_rows, 1024), 1), **kw)
        self._sh = self._f.create_dataset(SHOWERS_KEY, shape=(0, n_voxels), maxshape=(None, n_voxels), dtype=dtype,
                                          chunks=(chunk_rows, n_voxels), **kw)
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = v
        self.n = 0

    def append(self, incident: np.ndarray, showers: np.ndarray) -> None:
        incident = np.asarray(incident).reshape(-1, 1)
        n = incident.shape[0]
        if showers.shape[0] != n:
            msg = f"append: {n} incident energies but {showers.shape[0]} showers"
            raise ValueError(msg)
        self._inc.resize(self.n + n, axis=0)
        self._sh.resize(self.n + n, axis=0)
        self._inc[self.n:] = incident
        self._sh[self.n:] = showers
        self.n += n

    def close(self) -> None:
        self._f.close()


@contextlib.contextmanager
def shower_writer(path: str | os.PathLike, n_voxels: int, **kw: object) -> Iterator[ShowerWriter]:
    """Atomically write a shower file chunk by chunk: ``with shower_writer(p, 6480) as w: w.append(e, s)``."""
    with atomic_output(path) as tmp:
        w = ShowerWriter(tmp, n_voxels, **kw)
        try:
            yield w
        finally:
            w.close()


def write_showers(path: str | os.PathLike, incident: np.ndarray, showers: np.ndarray, *,
                  compression: str | None = "gzip", attrs: dict | None = None) -> None:
    """Write one file in the official format, atomically (temporary file + rename)."""
    showers = np.asarray(showers)
    incident = np.asarray(incident).reshape(-1, 1)
    if showers.ndim != 2 or showers.shape[0] != incident.shape[0]:
        msg = f"write_showers: expected showers (N, n_voxels) and incident (N, 1), got {showers.shape} and {incident.shape}"
        raise ValueError(msg)
    dtype = np.result_type(showers.dtype, np.float32)
    with shower_writer(path, showers.shape[1], dtype=dtype, compression=compression, attrs=attrs) as w:
        w.append(incident, showers)
