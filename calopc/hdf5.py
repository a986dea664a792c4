r"""CaloChallenge HDF5 shower files: reading and writing, validated, chunk by chunk.

The official format: two datasets, ``incident_energies`` of shape ``(N, 1)`` and
``showers`` of shape ``(N, n_voxels)``, both in MeV, gzip-compressed, no groups.
:func:`open_showers` gives a :class:`ShowerFile` (read whole, in chunks, or as sparse cells);
:func:`write_showers` and :func:`shower_writer` write files atomically (:mod:`calopc._safety`).
Gzip chunks are inflated and deflated in worker threads by :mod:`calopc._h5direct`; anything
else is left to h5py.
"""

from __future__ import annotations

__all__ = [
    "INCIDENT_KEY",
    "SHOWERS_KEY",
    "ShowerFile",
    "ShowerFileError",
    "ShowerWriter",
    "HDF5_SUFFIXES",
    "MAX_CELL_MEV",
    "RESPONSE_RANGE",
    "EnergyScale",
    "check_energies",
    "hdf5_write_failed",
    "is_hdf5",
    "native_float_dtype",
    "open_showers",
    "parse_size",
    "shower_writer",
    "write_showers",
]

import contextlib
import errno as _errno
import os
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from . import _h5direct
from ._safety import OutputError, atomic_output, check_interrupt, deferred_interrupts, missing_message
from .geometry import Geometry, GeometryError, detect_geometry

INCIDENT_KEY = "incident_energies"
SHOWERS_KEY = "showers"
#: Names of HDF5 files
HDF5_SUFFIXES = (".hdf5", ".h5", ".hdf")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether the file holds an HDF5 superblock signature (at byte 0, or 512, 1024, ... after a userblock)."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == _HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else 2 * offset
    except OSError:
        return False
    return False


class ShowerFileError(ValueError):
    """An input file is not a valid CaloChallenge shower file."""


_hdf5_failed = False
_hdf5_zombies: list = []  # h5py objects of failed writes: never closed nor freed (freeing them can crash)

def hdf5_write_failed() -> bool:
    """True once an HDF5 write failed in this process.

    After such a failure (typically a full disk) h5py can crash while the interpreter shuts
    down (h5py issue 914), so ``calopc.cli`` leaves with ``os._exit`` once it has reported the error.
    """
    return _hdf5_failed


def native_float_dtype(dtype: np.dtype | type | str) -> np.dtype:
    """The native-byte-order float dtype to compute with: big-endian → native, long double → float64."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize > 8:
        return np.dtype(np.float64)
    return dt.newbyteorder("=")

def check_energies(values: np.ndarray, *, where: str, key: str, positive: bool = False) -> None:
    """Raise :class:`ShowerFileError` if ``values`` holds NaN, inf or negative numbers (or zeros, with ``positive``)."""
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
    if positive:
        zero = values == 0
        if zero.any():
            idx = np.argwhere(zero)[0]
            msg = (f"{where}: dataset {key!r} holds zeros (first at index {tuple(int(i) for i in idx)}); "
                   "expected energies > 0 MeV")
            raise ShowerFileError(msg)


#: Median deposited / incident energy (showers with deposits) outside this range is reported as a likely unit
#: mistake. A calorimeter's response is of order 1 (0.3-1 for the CaloChallenge sets, sampling fraction
#: included); a factor 1000 off (keV or GeV for MeV) gives about 800 or 0.0008.
RESPONSE_RANGE = (1e-3, 5.0)
#: A cell above this (MeV; 1 PeV) is reported: the highest CaloChallenge incident energy is 4.2 TeV.
MAX_CELL_MEV = 1e9


class EnergyScale:
    """Warns once per file when its energies look like a unit mistake or corruption (:data:`RESPONSE_RANGE`,
    :data:`MAX_CELL_MEV`): one line with the value and the likely cause. Such data are read anyway.

    The response is judged on the first chunk holding showers with deposits; the largest cell on every
    chunk until a warning is given.
    """

    def __init__(self, where: str | os.PathLike) -> None:
        self.where = str(where)
        self.ratio_checked = False
        self.warned = False

    def check(self, e_inc: np.ndarray, counts: np.ndarray, energy: np.ndarray) -> None:
        """Showers given sparsely: incident ``(n,)`` MeV, points per shower ``(n,)``, flat point energies ``(P,)``."""
        if self.warned or not len(energy):
            return
        e_dep = None
        if not self.ratio_checked:
            cs = np.zeros(len(energy) + 1)
            with np.errstate(all="ignore"):  # huge cells overflow to inf: judged below, not a numpy warning
                np.cumsum(energy, dtype=np.float64, out=cs[1:])
                ends = np.cumsum(counts)
                e_dep = cs[ends] - cs[ends - counts]
        self._judge(e_inc, e_dep, float(np.max(energy)))

    def check_dense(self, e_inc: np.ndarray, showers: np.ndarray) -> None:
        """Showers given dense: incident ``(n,)`` MeV and ``(n, n_voxels)`` cells."""
        if self.warned or not showers.size:
            return
        with np.errstate(all="ignore"):
            e_dep = None if self.ratio_checked else showers.sum(axis=1, dtype=np.float64)
        self._judge(e_inc, e_dep, float(showers.max()))

    def _judge(self, e_inc: np.ndarray, e_dep: np.ndarray | None, e_max: float) -> None:
        msg = None
        if e_max > MAX_CELL_MEV:
            msg = (f"a cell holds {e_max:.4g} MeV, more than {MAX_CELL_MEV:.0e} MeV (1 PeV): corrupt or wrongly scaled "
                   "energies?")
        elif e_dep is not None:
            hit = e_dep > 0
            if hit.any():
                self.ratio_checked = True
                with np.errstate(all="ignore"):
                    r = float(np.median(e_dep[hit] / np.asarray(e_inc, dtype=np.float64)[hit]))
                lo, hi = RESPONSE_RANGE
                if r > hi:
                    msg = (f"median deposited / incident energy is {r:.4g} (a calorimeter's is of order 1): cells in "
                           "keV, or incident energies in GeV? Both must be in MeV")
                elif r < lo:
                    msg = (f"median deposited / incident energy is {r:.4g} (a calorimeter's is of order 1): cells in "
                           "GeV, or incident energies in keV? Both must be in MeV")
        if msg is not None:
            self.warned = True
            warnings.warn(f"{self.where}: {msg}", stacklevel=3)


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
            raise FileNotFoundError(missing_message(self.path))
        if self.path.is_dir():
            h5 = sorted(q.name for q in self.path.iterdir() if q.suffix.lower() in HDF5_SUFFIXES and q.is_file())
            msg = (f"{self.path}: is a folder of {len(h5)} HDF5 files, expected one HDF5 file (e.g. {self.path / h5[0]}); "
                   f"'calopc convert' takes them all as a quoted glob: '{self.path / ('*' + Path(h5[0]).suffix)}'"
                   if h5 else f"{self.path}: is a folder, expected an HDF5 file")
            raise ShowerFileError(msg)
        if not os.access(self.path, os.R_OK):
            msg = f"{self.path}: cannot read (permission denied)"
            raise ShowerFileError(msg)
        if self.path.stat().st_size == 0:
            msg = f"{self.path}: is empty (0 bytes); expected an HDF5 file (an interrupted copy or download?)"
            raise ShowerFileError(msg)
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            if "unable to lock file" in str(err) or getattr(err, "errno", None) == _errno.EAGAIN:
                # another process holds the file open for writing (HDF5 file locking), it is not damaged
                msg = (f"{self.path}: cannot open: another process has it open for writing (HDF5 file lock; "
                       f"{err}); wait until it is written, or read it anyway with HDF5_USE_FILE_LOCKING=FALSE")
            else:
                msg = f"{self.path}: cannot open as HDF5 (truncated or not an HDF5 file?): {err}"
            raise ShowerFileError(msg) from err
        try:
            self._check_layout(geometry)
            self.validate = validate
            self._scale = EnergyScale(self.path)
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
        self._plan = _h5direct.chunk_plan(sh)  # None: h5py reads (other filters, contiguous, ...)
        self.threads: int | None = None  # inflating threads of the direct reader (None: the usable CPUs, at most 8)

    # ------------------------------------------------------------------ info
    def __len__(self) -> int:
        return int(self._sh.shape[0])

    @property
    def dtype(self) -> np.dtype:
        """The dtype :meth:`read` returns for the showers: the stored one, native byte order (long double → float64)."""
        return native_float_dtype(self._sh.dtype)

    @property
    def incident_dtype(self) -> np.dtype:
        """The dtype :meth:`read` returns for the incident energies (see :attr:`dtype`)."""
        return native_float_dtype(self._inc.dtype)

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
            if self._plan is not None:
                sh = np.empty((stop - start, self.n_voxels), dtype=self.dtype)

                def put(r0: int, r1: int, band: np.ndarray) -> None:
                    sh[r0 - start:r1 - start] = band  # in the worker thread; casts big-endian to native

                for _ in self._plan.map_bands(put, start, stop, threads=self.threads):
                    pass
            else:
                sh = np.asarray(self._sh[start:stop])
        except (OSError, RuntimeError, ValueError, zlib.error) as err:
            msg = f"{self.path}: failed to read rows {start}:{stop} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        # big-endian or long-double files: compute in native float (awkward and torch need it)
        inc = inc.astype(self.incident_dtype, copy=False)
        sh = sh.astype(self.dtype, copy=False)
        if self.validate:
            check_energies(inc, where=f"{self.path} rows {start}:{stop}", key=INCIDENT_KEY, positive=True)
            check_energies(sh, where=f"{self.path} rows {start}:{stop}", key=SHOWERS_KEY)
            self._scale.check_dense(inc, sh)
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


    def iterate_sparse(self, step_size: int | str = "256 MB", *, threshold: float = 0.0, start: int = 0,
                       stop: int | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(first row, incident (n,), counts (n,), cell int32 (P,), E (P,))`` per chunk of about ``step_size``.

        The non-empty cells of each shower in increasing cell order: energies ``> 0`` (with a
        ``threshold`` > 0: ``>= threshold``), in the file's float dtype (native byte order).
        Gzip files are inflated, scanned and validated in worker threads (:attr:`threads`);
        validation sees every non-zero value (NaN, inf and negative energies are errors) and
        the incident energies. Memory: the sparse data of one step plus a few HDF5 chunks.
        """
        stop = len(self) if stop is None else min(stop, len(self))
        step = self.rows_per_step(step_size)
        n_vox = self.n_voxels
        dtype = self.dtype

        def sparse(r0: int, r1: int, band: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a = band if band.dtype == dtype else band.astype(dtype)
            flat = a.reshape(-1)
            idx = np.flatnonzero(flat != 0)  # (a bool mask first: 3x faster); NaN is non-zero too: validated below
            e = flat[idx]
            if self.validate:
                bad = ~np.isfinite(e) | (e < 0)
                if bad.any():
                    j = int(idx[np.flatnonzero(bad)[0]])
                    row, col = r0 + j // n_vox, j % n_vox
                    what = "negative" if np.isfinite(e[bad][0]) else "non-finite"
                    want = "energies >= 0 MeV" if what == "negative" else "finite energies in MeV"
                    msg = (f"{self.path} rows {r0}:{r1}: dataset {SHOWERS_KEY!r} holds {what} values (first at "
                           f"index ({row}, {col}): {flat[j]}); expected {want}")
                    raise ShowerFileError(msg)
            if threshold > 0:
                keep = e >= threshold
                idx, e = idx[keep], e[keep]
            bounds = np.searchsorted(idx, np.arange(r1 - r0 + 1, dtype=np.int64) * n_vox)
            counts = np.diff(bounds)
            cell = (idx - np.repeat(np.arange(r1 - r0, dtype=np.int64) * n_vox, counts)).astype(np.int32)
            return counts, cell, e

        def bands() -> Iterator[tuple[int, int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
            if self._plan is not None:  # one pipeline over the whole range: the threads never wait for a step
                yield from self._plan.map_bands(sparse, start, stop, threads=self.threads)
                return
            for i in range(start, stop, step):
                j = min(i + step, stop)
                yield i, j, sparse(i, j, np.asarray(self._sh[i:j]))

        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        first = last = start
        it = bands()
        while True:
            try:
                item = next(it, None)
            except ShowerFileError:
                raise
            except (OSError, RuntimeError, ValueError, zlib.error) as err:
                msg = f"{self.path}: failed to read rows {first}:{min(first + step, stop)} (corrupt or truncated file?): {err}"
                raise ShowerFileError(msg) from err
            if item is not None:
                parts.append(item[2])
                last = item[1]
                if last - first < step:
                    continue
            if not parts:
                break
            counts, cell, e = parts[0] if len(parts) == 1 else (np.concatenate(x) for x in zip(*parts))
            parts = []
            while last - first >= step or (item is None and last > first):  # chunks of exactly step rows
                k = min(step, last - first)
                p = int(counts[:k].sum())
                inc = self._read_incident(first, first + k)
                if self.validate:
                    self._scale.check(inc, counts[:k], e[:p])
                yield first, inc, counts[:k], cell[:p], e[:p]
                counts, cell, e = counts[k:], cell[p:], e[p:]
                first += k
            if last > first:
                parts = [(counts, cell, e)]
            if item is None:
                break

    def _read_incident(self, start: int, stop: int) -> np.ndarray:
        try:
            inc = np.asarray(self._inc[start:stop]).reshape(-1).astype(self.incident_dtype, copy=False)
        except (OSError, RuntimeError, ValueError) as err:
            msg = f"{self.path}: failed to read rows {start}:{stop} (corrupt or truncated file?): {err}"
            raise ShowerFileError(msg) from err
        if self.validate:
            check_energies(inc, where=f"{self.path} rows {start}:{stop}", key=INCIDENT_KEY, positive=True)
        return inc


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
                 attrs: dict | None = None, incident_dtype: np.dtype | type | None = None,
                 target: Path | None = None, threads: int | None = None) -> None:
        import h5py

        self.target = Path(target) if target is not None else Path(path)
        self._f = None
        self._failed_here = False
        try:
            self._f = h5py.File(path, "w")
            chunk_rows = max(1, min(1000, (1 << 20) // max(1, n_voxels)))
            kw = {"compression": compression} if compression else {}
            self._inc = self._f.create_dataset(INCIDENT_KEY, shape=(0, 1), maxshape=(None, 1),
                                               dtype=dtype if incident_dtype is None else incident_dtype,
                                               chunks=(max(chunk_rows, 1024), 1), **kw)
            self._sh = self._f.create_dataset(SHOWERS_KEY, shape=(0, n_voxels), maxshape=(None, n_voxels), dtype=dtype,
                                              chunks=(chunk_rows, n_voxels), **kw)
            for k, v in (attrs or {}).items():
                self._f.attrs[k] = v
            self._direct = None
            if compression == "gzip" and _h5direct.enabled():  # chunks deflated in worker threads, stored directly
                self._direct = _h5direct.DeflateWriter(self._sh, threads=threads)
        except BaseException:
            self._failed()
            self.abort()
            raise
        self.n = 0

    def _failed(self) -> None:
        global _hdf5_failed
        _hdf5_failed = True
        self._failed_here = True

    def append(self, incident: np.ndarray, showers: np.ndarray) -> None:
        """Append ``(n,)`` incident energies (MeV, > 0) and ``(n, n_voxels)`` showers; checks for Ctrl-C first."""
        check_interrupt()
        incident = np.asarray(incident).reshape(-1, 1)
        n = incident.shape[0]
        if showers.shape[0] != n:
            msg = f"append: {n} incident energies but {showers.shape[0]} showers"
            raise ValueError(msg)
        if n:
            try:
                check_energies(incident[:, 0], where=f"{self.target}: refusing to write showers {self.n}:{self.n + n}",
                               key=INCIDENT_KEY, positive=True)
            except ShowerFileError as err:
                raise OutputError(str(err)) from None
        try:
            self._inc.resize(self.n + n, axis=0)
            self._inc[self.n:] = incident
            if self._direct is not None:
                self._direct.append(showers)
            else:
                self._sh.resize(self.n + n, axis=0)
                self._sh[self.n:] = showers
        except BaseException:
            self._failed()
            raise
        self.n += n
        check_interrupt()

    def set_attrs(self, attrs: dict) -> None:
        """Set root attributes of the file (e.g. statistics known only at the end); before :meth:`close`."""
        for k, v in attrs.items():
            self._f.attrs[k] = v

    def close(self) -> None:
        if self._f is None:
            return
        try:
            if self._direct is not None:
                self._direct.close()
                self._direct = None
            self._f.close()
        except BaseException:
            self._failed()
            self.abort()
            raise
        self._f = None

    def abort(self) -> None:
        """Let go of the file after a failure (it is about to be removed).

        After a failed HDF5 write (disk full) closing or even freeing the h5py objects can crash
        the process (h5py issue 914), so they are parked, never closed; ``calopc.cli`` then leaves
        with ``os._exit``. After other failures the file is closed normally.
        """
        direct = getattr(self, "_direct", None)
        if direct is not None:
            with contextlib.suppress(Exception):
                direct.abort()
            self._direct = None
        if self._f is None:
            return
        if self._failed_here:
            _hdf5_zombies.append((self._f, getattr(self, "_inc", None), getattr(self, "_sh", None)))
        else:
            with contextlib.suppress(Exception):
                self._f.close()
        self._f = self._inc = self._sh = None


@contextlib.contextmanager
def shower_writer(path: str | os.PathLike, n_voxels: int, *, expected_bytes: float = 0, **kw: object
                  ) -> Iterator[ShowerWriter]:
    """Atomically write a shower file chunk by chunk: ``with shower_writer(p, 6480) as w: w.append(e, s)``.

    Ctrl-C and SIGTERM are deferred to the next :meth:`ShowerWriter.append` (h5py would swallow
    them); the temporary file is removed and :class:`Interrupted` raised. ``expected_bytes``: rough
    output size for the free-space check.
    """
    with deferred_interrupts(), atomic_output(path, expected_bytes=expected_bytes) as tmp:
        w = ShowerWriter(tmp, n_voxels, target=Path(path), **kw)
        try:
            yield w
        except BaseException:
            w.abort()
            raise
        w.close()
        check_interrupt()  # a signal during the last chunk: remove the file rather than keep it


def write_showers(path: str | os.PathLike, incident: np.ndarray, showers: np.ndarray, *,
                  compression: str | None = "gzip", attrs: dict | None = None) -> None:
    """Write one file in the official format, atomically (temporary file + rename)."""
    showers = np.asarray(showers)
    incident = np.asarray(incident).reshape(-1, 1)
    if showers.ndim != 2 or showers.shape[0] != incident.shape[0]:
        msg = f"write_showers: expected showers (N, n_voxels) and incident (N, 1), got {showers.shape} and {incident.shape}"
        raise ValueError(msg)
    dtype = np.result_type(showers.dtype, np.float32)
    inc_dtype = np.result_type(incident.dtype, np.float32)
    with shower_writer(path, showers.shape[1], dtype=dtype, incident_dtype=inc_dtype, compression=compression,
                       attrs=attrs, expected_bytes=0.1 * showers.nbytes) as w:
        w.append(incident, showers)
